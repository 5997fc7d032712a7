"""Minibatch indices for subsampled plates in O(batch) per step.

A user's model subsamples its data the usual Pyro way::

    with pyro.plate("n", x.shape[0], subsample_size=1000) as idx:
        pyro.sample("y", dist.Bernoulli(logits=x[idx] @ w), obs=y[idx])

Pyro draws each plate's indices with ``torch.randperm(N)[:batch]``: the cost of
a step grows with ``N`` (7.6 ms per step at ``N = 1e6``). During a fit,
:class:`IndexSupplier` draws them instead, from an :class:`IndexStream` per
plate, without changing the model:

- ``"epoch"`` (the default): one pseudo-random permutation of the rows per
  pass over the data (an epoch), computed on demand by a keyed Feistel network
  (:class:`IndexStream`); consecutive batches are consecutive runs of it, so
  every row is visited exactly once per epoch. O(batch) time and memory per
  batch: nothing of size ``N`` is held or shuffled.
- ``"independent"``: each batch is ``batch`` distinct rows drawn afresh
  (uniform draws, repeats rejected; O(batch)); batches are independent of each
  other, which the final ELBO's standard error needs
  (:mod:`vimodels.svi.minibatch_eval`).

Either way every row is in a batch with probability ``batch / N`` and Pyro's
plate scales the batch's log density by ``N / batch``, so the loss of a step is
an unbiased estimate of the full-data loss. Indices within a batch are sorted
(reads from a memory-mapped file then go forward through it).

How it hooks in: Pyro's plate asks its ``_Subsample`` distribution for the
indices only when nobody supplied them (a replayed guide trace, the user's
``subsample=``). While an :class:`IndexSupplier` is active its ``sample``
method is replaced, so only those draws change; they change inside
``poutine.block`` too (the autoguide's prototype trace, the data checks),
which a Messenger on the stack would not see. Each plate entry takes the next
batch, as Pyro's plate draws anew on every entry (``hold=True``: one batch
until :meth:`IndexSupplier.advance`). The patch is process-wide while active:
do not run fits in parallel threads of one process. Streams are keyed by the
plate's ``(size, subsample_size)``; two plates with the same key share one
stream. Under ``torch.jit`` tracing Pyro's own draw runs (a traced
``randperm``), since indices drawn in NumPy would be frozen into the graph.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from pyro.poutine.subsample_messenger import SubsampleMessenger, _Subsample

from vimodels.errors import OptionError

SCHEMES = ("epoch", "independent", "pyro")


class IndexStream:
    """Batches of row indices of ``range(size)``, reproducible from a seed.

    ``"epoch"`` batches are consecutive runs of a pseudo-random permutation of
    the rows, a new one per epoch: a keyed Feistel network permutes the
    smallest power-of-two domain that holds ``size`` rows and the permutation
    is read in domain order, skipping values ``>= size``. Each batch costs
    O(batch) time and the stream O(batch) memory; no permutation of ``size``
    rows is ever held (a NumPy shuffle of 1e7 rows takes seconds). A batch that
    crosses into the next epoch takes the old epoch's last rows and the new
    epoch's first; the new epoch visits those old rows last, so no batch
    repeats a row and every ``size`` consecutive rows of the stream from the
    start (an epoch) hold every row exactly once.
    ``"independent"`` batches are ``batch`` distinct rows drawn uniformly,
    independently of other batches (uniform draws, repeats rejected).

    Parameters
    ----------
    size : int
        Number of rows.
    batch : int
        Rows per batch (``1 <= batch <= size``).
    seed : int
        Seed of the stream (with ``size`` and ``batch``: see :func:`stream_seed`).
    scheme : {"epoch", "independent"}
        Epoch-wise permutations (every row once per epoch) or independent batches.
    """

    def __init__(self, size: int, batch: int, seed: int, scheme: str = "epoch"):
        if scheme not in ("epoch", "independent"):
            raise OptionError(f"scheme must be 'epoch' or 'independent', got {scheme!r}")
        if not 1 <= batch <= size:
            raise OptionError(f"batch must be in 1..{size}, got {batch}")
        self.size = int(size)
        self.batch = int(batch)
        self.scheme = scheme
        self.rng = np.random.default_rng(stream_seed(seed, size, batch))
        self._perm: _Permutation | None = None
        self._pos = 0
        self.batches = 0

    @property
    def epochs(self) -> float:
        """Passes over the data so far (batches x batch / size)."""
        return self.batches * self.batch / self.size

    def next(self) -> np.ndarray:
        """The next batch: ``batch`` distinct row indices, sorted, int64."""
        self.batches += 1
        if self.scheme == "independent":
            return self._independent()
        if self._perm is None:
            self._perm = _Permutation(self.size, self.rng)
        rest = self.size - self._pos
        if rest >= self.batch:
            idx = self._perm.take(self.batch)
            self._pos += self.batch
        else:
            tail = self._perm.take(rest)
            self._perm = _Permutation(self.size, self.rng, last=tail)
            take = self.batch - rest
            idx = np.concatenate([tail, self._perm.take(take)])
            self._pos = take
        return np.sort(idx)

    def _independent(self) -> np.ndarray:
        idx = np.unique(self.rng.integers(0, self.size, self.batch))
        while len(idx) < self.batch:  # repeats rejected: a uniform subset of distinct rows
            more = self.rng.integers(0, self.size, self.batch - len(idx))
            idx = np.unique(np.concatenate([idx, more]))
        return idx.astype(np.int64, copy=False)


_ROUNDS = 4
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


class _Permutation:
    """One epoch's pseudo-random order of ``range(size)``, read forward in pieces.

    The order is ``f(0), f(1), ...`` for a keyed Feistel bijection ``f`` of
    ``range(2**bits)``, values ``>= size`` dropped. With ``last``, those rows
    are left out of that order and come at the end instead.
    """

    def __init__(self, size: int, rng: np.random.Generator, last: np.ndarray | None = None):
        self.size = size
        self.bits = max(2, int(size - 1).bit_length())
        self.domain = 1 << self.bits
        self.keys = [np.uint64(k) for k in rng.integers(0, 2**63, _ROUNDS, dtype=np.int64)]
        self.last = np.sort(np.asarray(last if last is not None else [], dtype=np.int64))
        self._cursor = 0
        self._buffer = np.empty(0, dtype=np.int64)

    def take(self, n: int) -> np.ndarray:
        """The next ``n`` rows of the order."""
        parts, have = [self._buffer], len(self._buffer)
        while have < n and self._cursor < self.domain:
            # read ahead about 16 requests' worth: NumPy's per-call cost is then shared
            want = max(n - have, 16 * n)
            m = min(self.domain - self._cursor, int(1.25 * want * self.domain / self.size) + 32)
            rows = self._feistel(np.arange(self._cursor, self._cursor + m, dtype=np.uint64))
            self._cursor += m
            rows = rows[rows < np.uint64(self.size)].astype(np.int64)
            if len(self.last):
                rows = rows[~np.isin(rows, self.last, assume_unique=True)]
            parts.append(rows)
            have += len(rows)
        if have < n:  # the domain is read: the rows put last end the epoch
            parts.append(self.last)
            self.last = self.last[:0]
        out = np.concatenate(parts)
        self._buffer = out[n:]
        return out[:n]

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        """An unbalanced Feistel network on ``bits``-bit integers (a bijection)."""
        hi = self.bits // 2
        lo = self.bits - hi
        with np.errstate(over="ignore"):
            for key in self.keys:
                left, right = x >> np.uint64(lo), x & np.uint64((1 << lo) - 1)
                z = (right + key) * _M1
                z ^= z >> np.uint64(31)
                z *= _M2
                z ^= z >> np.uint64(29)
                x = (right << np.uint64(hi)) | (left ^ (z & np.uint64((1 << hi) - 1)))
                hi, lo = lo, hi
        return x


def stream_seed(seed: int, size: int, batch: int) -> list[int]:
    """The NumPy seed sequence of a plate's stream: the fit's seed, size and batch."""
    return [int(seed), int(size) % 2**32, int(size) // 2**32, int(batch), zlib.crc32(b"vimodels")]


class IndexSupplier:
    """Draws the indices of subsampled plates while active (a context manager).

    Parameters
    ----------
    seed : int
        Seed of the index streams (independent of torch's and Pyro's).
    scheme : {"epoch", "independent", "pyro"}
        How batches are drawn (see the module docstring); ``"pyro"`` leaves
        Pyro's ``randperm`` in place (the supplier only records the plates).
    hold : bool
        Give every entry of a plate the same batch until :meth:`advance` (the
        final ELBO: all draws of a group, and the one-draw re-evaluations that
        check a vectorized pass, see one batch). Default: a new batch per
        entry, as Pyro's plate draws.
    """

    _active: list[IndexSupplier] = []
    _original = _Subsample.sample

    def __init__(self, seed: int, scheme: str = "epoch", hold: bool = False):
        if scheme not in SCHEMES:
            raise OptionError(f"subsample must be one of {', '.join(SCHEMES)}, got {scheme!r}")
        self.seed = int(seed)
        self.scheme = scheme
        self.hold = bool(hold)
        self._held: dict[tuple[int, int], torch.Tensor] = {}
        self.streams: dict[tuple[int, int], IndexStream] = {}
        self.plates: dict[tuple[int, int], int] = {}

    def __enter__(self) -> IndexSupplier:
        IndexSupplier._active.append(self)
        _Subsample.sample = _supplied_sample
        return self

    def __exit__(self, *exc: Any) -> None:
        IndexSupplier._active.remove(self)
        if not IndexSupplier._active:
            _Subsample.sample = IndexSupplier._original

    def advance(self) -> None:
        """With ``hold``: the next plate entries get new batches."""
        self._held.clear()

    @property
    def subsampled(self) -> bool:
        """Whether a plate with ``subsample_size < size`` has drawn indices here."""
        return bool(self.plates)

    def indices(self, d: _Subsample) -> torch.Tensor:
        """Indices for one plate entry (``d`` is the plate's ``_Subsample``)."""
        size, batch = int(d.size), d.subsample_size
        if batch is None or batch >= size:
            return torch.arange(size, device=d.device)
        key = (size, int(batch))
        if self.hold and key in self._held:
            return self._held[key]
        self.plates[key] = self.plates.get(key, 0) + 1
        if self.scheme == "pyro" or torch._C._get_tracing_state() is not None:
            return IndexSupplier._original(d)
        stream = self.streams.get(key)
        if stream is None:
            stream = self.streams[key] = IndexStream(size, int(batch), self.seed, self.scheme)
        idx = torch.from_numpy(stream.next()).to(d.device)
        if self.hold:
            self._held[key] = idx
        return idx

    def record(self) -> dict[str, Any]:
        """What ran, for ``settings["subsample"]``: scheme, seed, and per plate its batches."""
        return {
            "scheme": self.scheme,
            "seed": self.seed,
            "plates": [
                {
                    "size": size,
                    "batch": batch,
                    "batches": draws,
                    # passes over the data (Pyro's draws: expected passes, batches x batch / size)
                    "epochs": (
                        round(self.streams[(size, batch)].epochs, 4)
                        if (size, batch) in self.streams
                        else round(draws * batch / size, 4)
                    ),
                }
                for (size, batch), draws in sorted(self.plates.items())
            ],
        }


def _supplied_sample(d: _Subsample, sample_shape: tuple = ()) -> torch.Tensor:
    if sample_shape:
        raise NotImplementedError
    return IndexSupplier._active[-1].indices(d)


@contextmanager
def supplied(seed: int, scheme: str = "epoch") -> Iterator[IndexSupplier]:
    """``with supplied(seed) as s:`` -- an active :class:`IndexSupplier`."""
    with IndexSupplier(seed, scheme) as supplier:
        yield supplier


@contextmanager
def full_data() -> Iterator[None]:
    """``with full_data():`` -- every subsampled plate takes all its rows (scale 1).

    A plate declared with ``subsample_size`` (and no explicit ``subsample=``)
    runs on ``range(size)`` while active, so a model's and a guide's log
    densities are the full-data ones instead of a batch's scaled by
    ``size / batch``: what exact log weights (PSIS k-hat, IWAE) need. The cost
    is that of the full data. Process-wide while active, like
    :class:`IndexSupplier`.
    """
    original = SubsampleMessenger.__dict__["_subsample"]

    def whole(name, size=None, subsample_size=None, subsample=None, use_cuda=None, device=None):
        if size is not None and subsample is None:
            subsample_size = None  # the plate draws range(size)
        return original.__func__(name, size, subsample_size, subsample, use_cuda, device)

    SubsampleMessenger._subsample = staticmethod(whole)
    try:
        yield
    finally:
        SubsampleMessenger._subsample = original
