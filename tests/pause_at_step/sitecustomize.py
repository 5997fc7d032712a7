"""Test hook: pause a fit at a given step until Ctrl-C, after leaving a marker file.

Put this folder first on ``PYTHONPATH`` of a subprocess (and of the worker
processes it spawns, which inherit the environment) and set

- ``VIMODELS_TEST_PAUSE_DIR``: folder for the marker files;
- ``VIMODELS_TEST_PAUSE_STEP``: the step after which the fit pauses;
- ``VIMODELS_TEST_PAUSE_GUIDE`` (optional): pause only fits of this guide;
- ``VIMODELS_TEST_PAUSE_SKIP`` (optional): let this many such fits of each
  process run to their end first (pause the next one).

Once :func:`vimodels.svi.fit.fit` is imported it is wrapped: the fit's
callback writes ``<dir>/<guide>.paused`` (the process id) after that step,
then sleeps until a KeyboardInterrupt arrives, which the fit handles as a
Ctrl-C at that step. A test waits for the file, then sends SIGINT: the
interrupt always lands inside the fit's steps, however fast or loaded the
machine. Without the variables this module does nothing.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import time

_DIR = os.environ.get("VIMODELS_TEST_PAUSE_DIR")
_STEP = int(os.environ.get("VIMODELS_TEST_PAUSE_STEP", "0") or 0)
_GUIDE = os.environ.get("VIMODELS_TEST_PAUSE_GUIDE")
_SKIP = int(os.environ.get("VIMODELS_TEST_PAUSE_SKIP", "0") or 0)
_started = [0]  # fits of the guide started in this process
_TARGET = "vimodels.svi.fit"
_MAX_PAUSE_S = 600  # a test that never sends Ctrl-C fails instead of hanging


def _pause(guide: str) -> None:
    path = os.path.join(_DIR, f"{guide}.paused")
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as fh:
        fh.write(str(os.getpid()))
    os.replace(tmp, path)  # appears whole
    deadline = time.monotonic() + _MAX_PAUSE_S
    while time.monotonic() < deadline:
        time.sleep(0.05)  # KeyboardInterrupt arrives here
    raise RuntimeError(f"paused at step {_STEP} for {_MAX_PAUSE_S} s without a Ctrl-C")


def _wrap(module) -> None:
    original = module.fit

    def fit(*args, **kwargs):
        guide = kwargs.get("guide", "auto_normal")
        name = guide if isinstance(guide, str) else getattr(guide, "__name__", "guide")
        if _GUIDE and name != _GUIDE:
            return original(*args, **kwargs)
        _started[0] += 1
        if _started[0] <= _SKIP:
            return original(*args, **kwargs)
        user_callback = kwargs.get("callback")

        def callback(progress):
            if user_callback is not None:
                user_callback(progress)
            if progress.step == _STEP:
                _pause(name)

        kwargs["callback"] = callback
        return original(*args, **kwargs)

    fit.__wrapped__ = original
    module.fit = fit


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return None
        exec_module = spec.loader.exec_module

        def exec_and_wrap(module):
            exec_module(module)
            _wrap(module)

        spec.loader.exec_module = exec_and_wrap
        return spec


if _DIR and _STEP > 0:
    sys.meta_path.insert(0, _Finder())
