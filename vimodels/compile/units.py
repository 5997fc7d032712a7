"""TorchScript compilation units that are freed with what was traced into them.

``torch.jit.trace`` puts every traced function, and every traced module's type
and methods, into one process-wide compilation unit
(``torch.jit._state._python_cu``) that nothing ever empties: a traced function
or module that is no longer referenced still holds its graphs and the graph
executor's profiled and optimised plans there. Each fit with Pyro's
``JitTrace_ELBO`` traces a new function (about 20 MB for eight schools), and
each compiled step (:mod:`vimodels.compile.step`) a new module, so a
long-lived process (a calibration loop, a process-pool or Dask worker, a
test worker) grew by that much per fit.

A traced function or module holds a strong reference to the compilation unit
it was traced into. Traced into a unit of its own instead, it is freed, with
its unit, when its last reference goes. :func:`private_units` makes
``torch.jit.trace`` (of a function, as Pyro's ``JitTrace_ELBO`` and
``NUTS(jit_compile=True)`` do, or of a module: its type and methods) use a
fresh unit within the block, by swapping the process-wide unit that torch
looks up at each trace (``torch.jit.trace``'s ``_compilation_unit`` argument
is ignored for modules). Nested and concurrent blocks (threads) are safe:
while any block is open, traces go into an open block's unit, and torch's
unit is restored when the last block ends.

``torch.jit.script`` of a function resolves calls to other scripted functions
through the process-wide unit; functions scripted inside a block land in the
block's unit and remain usable (they hold it), but are not found by name by
later scripts outside the block. Nothing in the fits scripts functions or
classes (a class scripted in a block is registered by torch for the process
while its type lives in the block's unit: do not script classes in a block).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
import torch.jit._state as _jit_state

ENABLED = True  # False: torch's behaviour (everything in the global unit), for benchmarks
_LOCK = threading.Lock()
_OPEN: list = []  # units of the open blocks, in the order they were entered
_ORIGINAL: list = []  # torch's unit while any block is open


def global_unit() -> torch._C.CompilationUnit:
    """The compilation unit ``torch.jit.trace`` uses now."""
    return _jit_state._python_cu


@contextlib.contextmanager
def private_units() -> Iterator[torch._C.CompilationUnit]:
    """Within the block, what ``torch.jit.trace`` traces goes into a unit of its own.

    Yields the block's unit. What is traced in the block is freed when it is
    no longer referenced, instead of staying in torch's process-wide unit
    until the process ends. When the block ends, the unit of the latest block
    still open (another thread's, or an enclosing one) becomes current, or
    torch's own when none is.
    """
    if not ENABLED:
        yield _jit_state._python_cu
        return
    unit = torch._C.CompilationUnit()
    with _LOCK:
        if not _OPEN:
            _ORIGINAL[:] = [_jit_state._python_cu]
        _OPEN.append(unit)
        _jit_state._python_cu = unit
    try:
        yield unit
    finally:
        with _LOCK:
            _OPEN.remove(unit)
            _jit_state._python_cu = _OPEN[-1] if _OPEN else _ORIGINAL.pop()
