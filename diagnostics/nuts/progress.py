"""Live progress of NUTS chains on a terminal.

Each chain keeps a :class:`ChainStatus` that the sampler updates after every
transition (a few attribute writes). A :class:`LiveProgress` redraws one line
per chain on a terminal at most every half second: draws done in warm-up and
sampling, draws per second, divergences so far, step size, last tree depth,
gradients per draw and the time left. Where the stream is not a terminal it
writes nothing (:func:`live_progress` then gives ``None``).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import IO

REDRAW_S = 0.5  # at most one redraw per this many seconds


@dataclass
class ChainStatus:
    """Where one chain is: updated by the sampler after each transition.

    Attributes
    ----------
    chain : int
        The chain's index.
    num_warmup, num_samples : int
        Its warm-up and kept iterations.
    iteration : int
        Transitions done (warm-up included).
    warmup_divergences, divergences : int
        Divergent transitions in warm-up and after it.
    step_size : float
        The step size of the last transition.
    tree_depth : int
        The last transition's tree depth.
    n_steps : int
        Leapfrog steps (gradients) so far, warm-up included.
    started : float
        ``time.monotonic()`` at the chain's start.
    on_update : callable or None
        Called after each update (the display's throttled redraw).
    """

    chain: int
    num_warmup: int
    num_samples: int
    iteration: int = 0
    warmup_divergences: int = 0
    divergences: int = 0
    step_size: float = math.nan
    tree_depth: int = 0
    n_steps: int = 0
    started: float = field(default_factory=time.monotonic)
    on_update: Callable[[], None] | None = field(default=None, repr=False)

    @property
    def total(self) -> int:
        """Warm-up plus kept iterations."""
        return self.num_warmup + self.num_samples

    @property
    def in_warmup(self) -> bool:
        """Whether the chain is still warming up."""
        return self.iteration < self.num_warmup

    def record(self, info: dict, warmup: bool) -> None:
        """Account for one transition's statistics (the kernel's ``info`` dict)."""
        self.iteration += 1
        if info["diverging"]:
            if warmup:
                self.warmup_divergences += 1
            else:
                self.divergences += 1
        self.step_size = float(info["step_size"])
        self.tree_depth = int(info["tree_depth"])
        self.n_steps += int(info["n_steps"])
        if self.on_update is not None:
            self.on_update()


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds // 60:.0f} min {seconds % 60:02.0f} s"
    return f"{seconds // 3600:.0f} h {(seconds % 3600) // 60:02.0f} min"


def format_status(status: ChainStatus, now: float) -> str:
    """One line for one chain.

    Parameters
    ----------
    status : ChainStatus
    now : float
        ``time.monotonic()`` now.

    Returns
    -------
    str
        E.g. ``chain 0: warm-up 120/300, sampling 0/700 | 45.2 draws/s | 0 divergent
        | step 0.123 | depth 3, 7.0 grad/draw | 22 s left``.
    """
    s = status
    warm = min(s.iteration, s.num_warmup)
    kept = max(0, s.iteration - s.num_warmup)
    elapsed = max(now - s.started, 1e-9)
    rate = s.iteration / elapsed
    left = (s.total - s.iteration) / rate if rate > 0 else math.inf
    divergent = f"{s.divergences} divergent"
    if s.warmup_divergences:
        divergent += f" (+{s.warmup_divergences} in warm-up)"
    grads = s.n_steps / s.iteration if s.iteration else math.nan
    done = s.iteration >= s.total
    return (
        f"chain {s.chain}: warm-up {warm}/{s.num_warmup}, sampling {kept}/{s.num_samples}"
        f" | {rate:.1f} draws/s | {divergent} | step {s.step_size:.3g}"
        f" | depth {s.tree_depth}, {grads:.1f} grad/draw"
        f" | {'done' if done else _duration(left) + ' left'}"
    )


class LiveProgress:
    """Redraws one line per chain on a terminal, throttled to one redraw per :data:`REDRAW_S`.

    Parameters
    ----------
    stream : file
        A terminal (the caller checks).
    clock : callable
        ``time.monotonic`` (tests pass their own).
    """

    def __init__(self, stream: IO[str], clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream
        self.clock = clock
        self.statuses: list[ChainStatus] = []
        self._drawn = 0
        self._last = -math.inf

    def add(self, chain: int, num_warmup: int, num_samples: int) -> ChainStatus:
        """A new chain's status, redrawn with the others."""
        status = ChainStatus(chain, num_warmup, num_samples, started=self.clock())
        status.on_update = self.tick
        self.statuses.append(status)
        return status

    def tick(self) -> None:
        """Redraw when the last redraw is older than :data:`REDRAW_S`."""
        now = self.clock()
        if now - self._last >= REDRAW_S:
            self._last = now
            self.draw(now)

    def draw(self, now: float | None = None) -> None:
        """Overwrite the lines drawn before with the chains' current lines."""
        now = self.clock() if now is None else now
        lines = [format_status(s, now) for s in self.statuses]
        out = [f"\x1b[{self._drawn}F"] if self._drawn else []
        out += ["\x1b[2K" + line + "\n" for line in lines]
        self.stream.write("".join(out))
        self.stream.flush()
        self._drawn = len(lines)

    def close(self) -> None:
        """Draw the final state; the lines stay, and chains added later get new lines."""
        if self.statuses:
            self.draw()
        self.statuses = []
        self._drawn = 0


def live_progress(enabled: bool, stream: IO[str] | None = None) -> LiveProgress | None:
    """A :class:`LiveProgress` on ``stream`` (default stderr) on a terminal, else None."""
    stream = sys.stderr if stream is None else stream
    if not enabled:
        return None
    isatty = getattr(stream, "isatty", None)
    try:
        tty = bool(isatty()) if isatty is not None else False
    except (OSError, ValueError):
        tty = False
    return LiveProgress(stream) if tty else None


def statuses_for(
    monitor: LiveProgress | None, chains: Sequence[int], num_warmup: int, num_samples: int
) -> list[ChainStatus] | None:
    """One status per chain from ``monitor``, or None without one."""
    if monitor is None:
        return None
    return [monitor.add(c, num_warmup, num_samples) for c in chains]
