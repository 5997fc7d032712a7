"""Minibatch training for amortized models: epochs, early stopping, checkpoints.

:func:`train` runs SVI over epochs of shuffled minibatches of a data set: the
model and guide take the full data and the minibatch indices as
``subsample=idx`` for their data plate, which scales the likelihood by
``N / batch``. The objective is any ELBO of :mod:`vimodels.svi.elbos` by name.

After each epoch a validation bound (the per-data-point IWAE bound with
``val_particles`` draws per point, always with the same random numbers, in
nats per data point) decides early stopping; the parameters of the best epoch
are kept. A checkpoint is a ``torch.save`` of tensors and plain types only
(model and guide parameters, the Adam state, the torch RNG state, the history
and the best parameters) written atomically; it loads with
``torch.load(weights_only=True)`` and a resumed run reproduces the
uninterrupted one exactly for the same seed.
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch
from pyro import poutine

from vimodels.errors import DataError, OptionError, check_option, check_seed
from vimodels.io import atomic_write, jsonable
from vimodels.svi import elbos as elbo_registry
from vimodels.svi.iwae import IWAE

CHECKPOINT_FORMAT = "vimodels.vae.trainer/1"
EARLY_STOPPED = "early_stopped"
MAX_EPOCHS = "max_epochs"
TIME_BUDGET = "time_budget"
INTERRUPTED = "interrupted"
NONFINITE = "nonfinite"

# settings that must agree for a checkpoint to be resumed
_IDENTITY = (
    "model",
    "guide",
    "elbo",
    "num_particles",
    "elbo_options",
    "batch_size",
    "lr",
    "weight_decay",
    "lr_patience",
    "lr_factor",
    "seed",
    "val_particles",
    "num_data",
    "num_val",
    "static",
)


@dataclass(frozen=True)
class TrainResult:
    """What a training run produced. Immutable; parameters are copies.

    Attributes
    ----------
    elbo_name : str
    settings : dict
        Settings actually used (JSON-friendly).
    train_loss : ndarray, shape (epochs,)
        Mean loss (negative objective) per data point per epoch, nats.
    val_bound : ndarray, shape (epochs,)
        Validation bound per data point after each epoch, nats (NaN without
        validation data).
    epoch_time : ndarray, shape (epochs,)
        Seconds of optimisation per epoch (validation excluded).
    epochs : int
        Epochs completed.
    best_epoch : int
        Epoch (1-based) whose parameters are kept; the last one without validation.
    best_val : float
    status : str
        ``early_stopped``, ``max_epochs``, ``time_budget``, ``interrupted`` or ``nonfinite``.
    message : str
    wall_time : float
        Seconds of optimisation in total (validation excluded), over resumes.
    elapsed : float
        Seconds of optimisation and validation together, over resumes (what
        ``time_budget`` counts).
    params : dict of str to Tensor
        Unconstrained parameter values (model and guide).
    model_params, guide_params : tuple of str
        Names of the model's and the guide's parameters.
    checkpoint : str or None
        Path of the last checkpoint written.
    """

    elbo_name: str
    settings: dict[str, Any]
    train_loss: np.ndarray
    val_bound: np.ndarray
    epoch_time: np.ndarray
    epochs: int
    best_epoch: int
    best_val: float
    status: str
    message: str
    wall_time: float
    params: dict[str, torch.Tensor] = field(repr=False)
    elapsed: float = math.nan
    model_params: tuple[str, ...] = ()
    guide_params: tuple[str, ...] = ()
    checkpoint: str | None = None
    constraints: dict[str, Any] = field(repr=False, default_factory=dict)

    @property
    def seconds_per_epoch(self) -> float:
        """Median optimisation time of one epoch, seconds."""
        return float(np.median(self.epoch_time)) if len(self.epoch_time) else math.nan

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        """Load copies of the trained parameters into Pyro's param store within the block."""
        state = {
            "params": {n: v.detach().clone().requires_grad_(True) for n, v in self.params.items()},
            "constraints": dict(self.constraints),
        }
        with pyro.get_param_store().scope(state):
            yield

    def summary(self) -> dict[str, Any]:
        """JSON-friendly summary."""
        return {
            "elbo_name": self.elbo_name,
            "status": self.status,
            "message": self.message,
            "epochs": self.epochs,
            "best_epoch": self.best_epoch,
            "best_val": self.best_val,
            "wall_time_s": self.wall_time,
            "elapsed_s": self.elapsed,
            "seconds_per_epoch": self.seconds_per_epoch,
            "train_loss": [float(v) for v in self.train_loss],
            "val_bound": [float(v) for v in self.val_bound],
            "settings": self.settings,
        }


def split_data(data: Mapping[str, Any]) -> tuple[dict, dict, int]:
    """Split ``data`` into per-data-point tensors (first dim ``N``) and static values."""
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    static = {k: v for k, v in data.items() if k not in tensors}
    if not tensors:
        raise DataError("training data needs at least one tensor with a data dimension")
    sizes = {k: v.shape[0] if v.dim() else None for k, v in tensors.items()}
    n = set(sizes.values())
    if len(n) != 1 or None in n:
        raise DataError(
            f"every training tensor must have the same first (data) dimension, got {sizes}"
        )
    return tensors, static, n.pop()


def validation_bound(
    model: Callable,
    guide: Callable,
    data: Mapping[str, Any],
    num_particles: int = 64,
    seed: int = 0,
    chunk: int = 500,
) -> float:
    """Per-data-point IWAE bound with ``num_particles`` draws, averaged over points (nats).

    Uses its own random numbers (``seed``) and leaves the global RNG untouched.
    """
    tensors, static, n = split_data(data)
    total = 0.0
    elbo = IWAE(num_particles=num_particles, max_plate_nesting=1)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for start in range(0, n, chunk):
            part = {k: v[start : start + chunk] for k, v in tensors.items()}
            total += -elbo.loss(model, guide, **part, **static)
    return total / n


def _param_names(model: Callable, guide: Callable, kwargs: dict) -> tuple[tuple, tuple]:
    """Create the parameters (first call) and return the model's and the guide's names."""
    with poutine.block(), torch.no_grad():
        with poutine.trace(param_only=True) as g:
            guide_tr = poutine.trace(guide).get_trace(**kwargs)
        with poutine.trace(param_only=True) as m:
            poutine.replay(model, trace=guide_tr)(**kwargs)
    return tuple(m.trace.nodes), tuple(n for n in g.trace.nodes if n not in m.trace.nodes)


def _unconstrained(names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    store = pyro.get_param_store()
    return {n: store[n].unconstrained().detach().clone() for n in names}


def _load_unconstrained(values: Mapping[str, torch.Tensor]) -> None:
    store = pyro.get_param_store()
    with torch.no_grad():
        for name, value in values.items():
            if name not in store:
                raise DataError(f"checkpoint has parameter {name!r} that the model does not")
            target = store[name].unconstrained()
            if target.shape != value.shape:
                raise DataError(
                    f"checkpoint parameter {name!r} has shape {tuple(value.shape)}, the model "
                    f"{tuple(target.shape)}: were the network sizes changed?"
                )
            target.copy_(value)


def save_checkpoint(path: str | Path, state: Mapping[str, Any]) -> Path:
    """Atomically ``torch.save`` a checkpoint dict of tensors and plain types."""
    return atomic_write(path, lambda tmp: torch.save(dict(state), tmp))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint with ``torch.load(weights_only=True)``; checks its format tag."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DataError(f"no checkpoint at {str(path)!r} to resume from") from None
    except Exception as exc:  # corrupt file or unsafe content
        raise DataError(f"cannot read checkpoint {str(path)!r}: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise DataError(f"{str(path)!r} is not a vimodels training checkpoint")
    return state


def _step(
    loss_fn: Any,
    model: Callable,
    guide: Callable,
    optimizer: torch.optim.Optimizer,
    params: list[torch.Tensor],
    kwargs: dict,
) -> float:
    """One SVI step; gradients are applied only when the loss and gradients are finite."""
    loss = float(loss_fn.loss_and_grads(model, guide, **kwargs))
    grads = [p.grad for p in params if p.grad is not None]
    finite = math.isfinite(loss) and (
        not grads or bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))
    )
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss if finite else math.nan


def train(
    model: Callable,
    guide: Callable,
    data: Mapping[str, Any],
    *,
    val_data: Mapping[str, Any] | None = None,
    elbo: str = "trace",
    num_particles: int | None = None,
    elbo_options: Mapping[str, Any] | None = None,
    batch_size: int = 100,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    max_epochs: int = 100,
    patience: int = 20,
    lr_patience: int | None = None,
    lr_factor: float = 0.3,
    val_particles: int = 64,
    seed: int = 0,
    time_budget: float | None = None,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 10,
    resume: bool = False,
    progress: bool | None = None,
    num_threads: int | None = 1,
) -> TrainResult:
    """Train ``guide`` and the model's parameters by minibatch SVI over epochs.

    Parameters
    ----------
    model, guide : callable
        Called as ``fn(**data, subsample=idx)``; their data plate must take ``subsample``.
    data : dict
        Training data: tensors share the first (data) dimension ``N``; other
        entries are static options passed unchanged.
    val_data : dict, optional
        Validation data (same keys); enables early stopping and best-epoch selection.
    elbo : str
        Objective by name (:data:`vimodels.svi.elbos.ELBOS`), e.g. ``trace``, ``iwae``.
    num_particles : int, optional
        Particles per step (K for ``iwae``); the ELBO's default when omitted.
    elbo_options : dict, optional
        E.g. ``{"estimator": "dreg"}``, ``{"beta": 0.5}``.
    batch_size : int
        Minibatch size ``b``; the last batch of an epoch may be smaller.
    lr : float
        Adam learning rate.
    weight_decay : float
        Adam's L2 penalty on the parameters (0: none).
    max_epochs : int
        Epochs to run at most (counting those of a resumed run).
    patience : int
        Stop after this many epochs without a better validation bound.
    lr_patience : int, optional
        Multiply the learning rate by ``lr_factor`` after this many epochs
        without a better validation bound (``ReduceLROnPlateau``); off when None.
    lr_factor : float
        Learning-rate reduction factor, in (0, 1).
    val_particles : int
        Draws per data point for the validation IWAE bound.
    seed : int
        Seeds the initialisation, minibatch order and Monte Carlo draws.
    time_budget : float, optional
        Stop after this many seconds of training, optimisation and validation
        together (checked after each epoch).
    checkpoint : path, optional
        Checkpoint file, written every ``checkpoint_every`` epochs and at the end.
    resume : bool
        Continue from ``checkpoint`` (settings must match; ``max_epochs`` may grow).
    progress : bool, optional
        Progress bar with the loss; default when stderr is a terminal.
    num_threads : int or None
        Torch threads during training (1 by default; None keeps torch's).

    Returns
    -------
    TrainResult
    """
    check_option("batch_size", batch_size, kind=int, low=1)
    check_option("max_epochs", max_epochs, kind=int, low=1)
    check_option("patience", patience, kind=int, low=1)
    if lr_patience is not None:
        check_option("lr_patience", lr_patience, kind=int, low=1)
    check_option("lr_factor", float(lr_factor), kind=float, low=0.0, low_inclusive=False, high=1.0)
    check_option("val_particles", val_particles, kind=int, low=1)
    seed = check_seed(seed)
    check_option("checkpoint_every", checkpoint_every, kind=int, low=1)
    if isinstance(lr, int) and not isinstance(lr, bool):
        lr = float(lr)
    check_option("lr", lr, kind=float, low=0.0, low_inclusive=False)
    weight_decay = float(weight_decay)
    check_option("weight_decay", weight_decay, kind=float, low=0.0)
    if time_budget is not None:
        check_option("time_budget", float(time_budget), kind=float, low=0.0, low_inclusive=False)
    if resume and checkpoint is None:
        raise OptionError("resume=True needs a checkpoint path")
    tensors, static, n = split_data(data)
    n_val = split_data(val_data)[2] if val_data is not None else 0
    elbo_opts = dict(elbo_options or {})
    loss_fn = elbo_registry.make_elbo(
        elbo, num_particles=num_particles, max_plate_nesting=1, **elbo_opts
    )
    settings = {
        "model": getattr(model, "__name__", type(model).__name__),
        "guide": getattr(guide, "__name__", type(guide).__name__),
        "elbo": elbo,
        "elbo_class": type(getattr(loss_fn, "inner", loss_fn)).__name__,
        "num_particles": loss_fn.num_particles,
        "elbo_options": jsonable(elbo_opts),
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": weight_decay,
        "optimizer": "Adam",
        "seed": seed,
        "val_particles": val_particles,
        "patience": patience,
        "lr_patience": lr_patience,
        "lr_factor": float(lr_factor),
        "max_epochs": max_epochs,
        "time_budget": time_budget,
        "num_data": n,
        "num_val": n_val,
        "static": jsonable(static),
    }
    if progress is None:
        progress = sys.stderr.isatty()
    threads_before = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        with pyro.get_param_store().scope():
            return _train_loop(
                model, guide, tensors, static, n, val_data, loss_fn, settings,
                checkpoint=None if checkpoint is None else Path(checkpoint),
                checkpoint_every=checkpoint_every, resume=resume, progress=progress,
            )  # fmt: skip
    finally:
        torch.set_num_threads(threads_before)


def _train_loop(
    model: Callable,
    guide: Callable,
    tensors: dict,
    static: dict,
    n: int,
    val_data: Mapping[str, Any] | None,
    loss_fn: Any,
    settings: dict,
    *,
    checkpoint: Path | None,
    checkpoint_every: int,
    resume: bool,
    progress: bool,
) -> TrainResult:
    seed, batch_size = settings["seed"], settings["batch_size"]
    pyro.set_rng_seed(seed)
    first = {**tensors, **static, "subsample": torch.arange(min(batch_size, n))}
    model_names, guide_names = _param_names(model, guide, first)
    # one-time set-up of the objective (e.g. IWAE's structure analysis draws from the
    # RNG): done here so that a resumed run, which then restores the RNG, matches
    with pyro.validation_enabled(False):
        loss_fn.loss(model, guide, **first)
    # one Adam over every parameter (multi-tensor): far cheaper per step than one
    # optimizer per parameter; its state_dict holds tensors and plain types only
    store = pyro.get_param_store()
    params = [store[name].unconstrained() for name in model_names + guide_names]
    optim = torch.optim.Adam(
        params, lr=settings["lr"], weight_decay=settings["weight_decay"], foreach=True
    )
    scheduler = None
    if settings["lr_patience"] is not None and val_data is not None:
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optim, mode="max", factor=settings["lr_factor"], patience=settings["lr_patience"]
        )
    history: dict[str, list[float]] = {"train_loss": [], "val_bound": [], "epoch_time": []}
    best = {"epoch": 0, "val": -math.inf, "params": None}
    bad_epochs, wall, loop_time, epoch = 0, 0.0, 0.0, 0
    if resume:
        state = load_checkpoint(checkpoint)
        saved = state["settings"]
        diff = [k for k in _IDENTITY if saved.get(k) != settings.get(k)]
        if diff:
            raise OptionError(
                f"checkpoint {str(checkpoint)!r} was made with other settings ("
                + "; ".join(f"{k}: {saved.get(k)!r} there, {settings.get(k)!r} now" for k in diff)
                + "); use the same settings or another checkpoint"
            )
        _load_unconstrained({**state["model"], **state["guide"]})
        if state["param_order"] != list(model_names + guide_names):
            raise DataError(f"checkpoint {str(checkpoint)!r} lists other parameters")
        optim.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        history = {k: list(v) for k, v in state["history"].items()}
        best = dict(state["best"])
        bad_epochs, wall, epoch = state["bad_epochs"], state["wall_time"], state["epoch"]
        loop_time = state["loop_time"]

    def snapshot() -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "epoch": epoch,
            "model": _unconstrained(model_names),
            "guide": _unconstrained(guide_names),
            "optimizer": optim.state_dict(),
            "param_order": list(model_names + guide_names),
            "scheduler": None if scheduler is None else scheduler.state_dict(),
            "rng": torch.get_rng_state(),
            "history": {k: list(v) for k, v in history.items()},
            "best": dict(best),
            "bad_epochs": bad_epochs,
            "wall_time": wall,
            "loop_time": loop_time,
            "settings": settings,
        }

    max_epochs, patience = settings["max_epochs"], settings["patience"]
    budget = settings["time_budget"]
    status, message = MAX_EPOCHS, f"ran all {max_epochs} epochs"
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=max_epochs, initial=epoch, desc=f"{settings['model']}/{settings['elbo']}",
            file=sys.stderr, leave=False,
        )  # fmt: skip
    written = None
    boundary = copy.deepcopy(snapshot()) if checkpoint is not None else None
    try:
        while epoch < max_epochs:
            if best["epoch"] and bad_epochs >= patience:
                status = EARLY_STOPPED
                break
            if budget is not None and loop_time >= budget:
                status = TIME_BUDGET
                break
            order = torch.from_numpy(np.random.default_rng([seed, epoch]).permutation(n))
            t0 = time.perf_counter()
            total = 0.0
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]
                with pyro.validation_enabled(epoch == 0 and start == 0):
                    loss = _step(
                        loss_fn,
                        model,
                        guide,
                        optim,
                        params,
                        {**tensors, **static, "subsample": idx},
                    )
                if not math.isfinite(loss):
                    raise FloatingPointError(f"epoch {epoch + 1}, batch starting at {start}")
                total += loss * len(idx) / n  # each step estimates the full-data loss
            elapsed = time.perf_counter() - t0
            wall += elapsed
            epoch += 1
            history["train_loss"].append(total / n)
            history["epoch_time"].append(elapsed)
            val = math.nan
            if val_data is not None:
                val = validation_bound(
                    model, guide, val_data, settings["val_particles"], seed=seed + 7919
                )
                if scheduler is not None:
                    scheduler.step(val)
                if val > best["val"]:
                    best = {"epoch": epoch, "val": val, "params": _unconstrained(
                        model_names + guide_names)}  # fmt: skip
                    bad_epochs = 0
                else:
                    bad_epochs += 1
            history["val_bound"].append(val)
            loop_time += time.perf_counter() - t0
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{total / n:.3f}", val=f"{val:.3f}")
            if checkpoint is not None:
                # an epoch-boundary state, so that an interrupted run resumes exactly
                boundary = copy.deepcopy(snapshot())
                if epoch % checkpoint_every == 0:
                    written = save_checkpoint(checkpoint, boundary)
    except FloatingPointError as exc:
        status = NONFINITE
        message = f"stopped: non-finite loss or gradient at {exc}; kept the last good parameters"
    except KeyboardInterrupt:
        status = INTERRUPTED
        message = f"interrupted after epoch {epoch}; kept the parameters learned"
    finally:
        if bar is not None:
            bar.close()
    if checkpoint is not None:
        written = save_checkpoint(checkpoint, boundary)
    if status == EARLY_STOPPED:
        message = f"early stop after epoch {epoch}: no better validation bound in {patience} epochs"
    elif status == TIME_BUDGET:
        message = f"time budget of {budget:g} s used after epoch {epoch}"
    if best["params"] is not None:
        _load_unconstrained(best["params"])
        message += f"; kept epoch {best['epoch']} (best validation bound {best['val']:.4f})"
    names = model_names + guide_names
    constraints = pyro.get_param_store().get_state()["constraints"]
    return TrainResult(
        elbo_name=settings["elbo"],
        settings=settings,
        train_loss=np.asarray(history["train_loss"], dtype=float),
        val_bound=np.asarray(history["val_bound"], dtype=float),
        epoch_time=np.asarray(history["epoch_time"], dtype=float),
        epochs=epoch,
        best_epoch=best["epoch"] or epoch,
        best_val=float(best["val"]) if best["params"] is not None else math.nan,
        status=status,
        message=message,
        wall_time=wall,
        elapsed=loop_time,
        params=_unconstrained(names),
        model_params=model_names,
        guide_params=guide_names,
        checkpoint=None if written is None else str(written),
        constraints={nm: constraints[nm] for nm in names},
    )
