"""Guides for vimodels: Pyro autoguides and hand-written guides behind one registry."""

from guides.registry import GENERIC, HANDWRITTEN, get_guide_spec, guide_names, make_guide
from guides.spec import GuideSpec

__all__ = ["GENERIC", "HANDWRITTEN", "GuideSpec", "get_guide_spec", "guide_names", "make_guide"]
