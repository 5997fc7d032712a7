"""A fit's own Pyro parameter-store scope, for running its model or guide after the fit."""

from __future__ import annotations

import contextlib
from typing import Any

import pyro


def param_scope(result: Any) -> contextlib.AbstractContextManager:
    """The fit's own Pyro parameter-store scope, for running its model or guide.

    A model with ``pyro.param`` sites reads the fitted values there and never
    touches the caller's global store. A result that keeps no parameter state
    (a stored fit read back from disk) gets an empty scope of its own.
    """
    return pyro.get_param_store().scope(getattr(result, "param_state", None))
