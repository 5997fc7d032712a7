"""Training the digits VAE under a named objective.

An :class:`Objective` names the ELBO, its particles and gradient estimator
(``trace``, ``trace-stl``, ``meanfield``, ``iwae-8``, ``iwae-8-dreg``,
``weighted_kl-beta0.5``...). :func:`train_digits_vae` holds out a stratified
validation set from the training images and calls :func:`vimodels.vae.trainer.train`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from guides.vae import encoder_guide
from vimodels.catalog.vae import (
    HIDDEN_DIM,
    LATENT_DIM,
    NUM_LAYERS,
    PRIOR_COMPONENTS,
    digits_split,
    digits_vae,
)
from vimodels.errors import OptionError, check_option
from vimodels.svi.elbos import get_elbo_spec
from vimodels.vae.trainer import TrainResult, train

VAL_FRACTION = 0.1
VAL_SEED = 7


@dataclass(frozen=True)
class Objective:
    """A training objective: ELBO name, particles, estimator and KL weight.

    Attributes
    ----------
    elbo : str
        ``trace``, ``meanfield``, ``iwae`` or ``weighted_kl`` (any registered ELBO).
    num_particles : int or None
        Particles per step (K for ``iwae``); the ELBO's default when None.
    estimator : str
        ``standard``, ``stl`` (``trace``) or ``dreg`` (``iwae``).
    beta : float or None
        KL weight of ``weighted_kl``.
    """

    elbo: str = "trace"
    num_particles: int | None = None
    estimator: str = "standard"
    beta: float | None = None

    def __post_init__(self) -> None:
        spec = get_elbo_spec(self.elbo)
        if self.num_particles is not None:
            check_option("num_particles", self.num_particles, kind=int, low=1)
        if self.estimator != "standard" and "estimator" not in spec.options:
            raise OptionError(f"ELBO {self.elbo!r} has only the standard estimator")
        if self.beta is not None and self.elbo != "weighted_kl":
            raise OptionError("beta applies only to the 'weighted_kl' ELBO")

    @property
    def elbo_options(self) -> dict[str, Any]:
        """Options passed to :func:`vimodels.svi.elbos.make_elbo`."""
        opts: dict[str, Any] = {}
        if self.estimator != "standard":
            opts["estimator"] = self.estimator
        if self.beta is not None:
            opts["beta"] = float(self.beta)
        return opts

    @property
    def particles(self) -> int:
        """Particles actually used."""
        spec = get_elbo_spec(self.elbo)
        return spec.default_particles if self.num_particles is None else self.num_particles

    @property
    def tag(self) -> str:
        """Short name, e.g. ``iwae-8-dreg``, ``trace-stl``, ``weighted_kl-beta0.5``."""
        parts = [self.elbo]
        if self.elbo == "iwae" or self.particles != 1:
            parts.append(str(self.particles))
        if self.estimator != "standard":
            parts.append(self.estimator)
        if self.beta is not None:
            parts.append(f"beta{self.beta:g}")
        return "-".join(parts)


_TAG = re.compile(
    r"^(?P<elbo>[a-z_]+?)(?:-(?P<k>\d+))?(?:-(?P<est>stl|dreg))?(?:-beta(?P<beta>[\d.]+))?$"
)


def parse_objective(tag: str) -> Objective:
    """Inverse of :attr:`Objective.tag` (``iwae-8-dreg`` -> ``Objective("iwae", 8, "dreg")``)."""
    m = _TAG.match(tag)
    if m is None:
        raise OptionError(f"cannot read objective {tag!r}; e.g. trace, trace-stl, iwae-8-dreg")
    return Objective(
        elbo=m["elbo"],
        num_particles=None if m["k"] is None else int(m["k"]),
        estimator=m["est"] or "standard",
        beta=None if m["beta"] is None else float(m["beta"]),
    )


def train_val_split(
    val_fraction: float = VAL_FRACTION, seed: int = VAL_SEED
) -> tuple[np.ndarray, np.ndarray]:
    """Indices into the training images: (train, validation), stratified by digit."""
    from sklearn.model_selection import train_test_split

    labels = digits_split().y_train
    idx = np.arange(len(labels))
    tr, va = train_test_split(idx, test_size=val_fraction, random_state=seed, stratify=labels)
    return np.sort(tr), np.sort(va)


def network_options(
    latent_dim: int = LATENT_DIM,
    hidden_dim: int = HIDDEN_DIM,
    num_layers: int = NUM_LAYERS,
    prior_components: int = PRIOR_COMPONENTS,
) -> dict[str, int]:
    """Static model options (validated); see :func:`vimodels.catalog.vae.digits_vae`."""
    check_option("latent_dim", latent_dim, kind=int, low=1)
    check_option("hidden_dim", hidden_dim, kind=int, low=1)
    check_option("num_layers", num_layers, kind=int, low=0)
    check_option("prior_components", prior_components, kind=int, low=0)
    return {
        "latent_dim": latent_dim,
        "hidden_dim": hidden_dim,
        "num_layers": num_layers,
        "prior_components": prior_components,
    }


def train_digits_vae(
    objective: Objective | None = None,
    *,
    epochs: int = 500,
    batch_size: int = 100,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    patience: int = 30,
    lr_patience: int | None = None,
    lr_factor: float = 0.3,
    val_particles: int = 64,
    seed: int = 0,
    time_budget: float | None = None,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 10,
    resume: bool = False,
    progress: bool | None = None,
    num_train: int | None = None,
    **network: int,
) -> TrainResult:
    """Train the digits VAE with ``objective`` (see :func:`vimodels.vae.trainer.train`).

    Parameters
    ----------
    objective : Objective, optional
        Default ``Objective()`` (``trace``).
    epochs, batch_size, lr, weight_decay, patience, lr_patience, lr_factor, val_particles, seed,
    time_budget :
        As in :func:`vimodels.vae.trainer.train` (``epochs`` is ``max_epochs``).
    checkpoint, checkpoint_every, resume, progress :
        As in :func:`vimodels.vae.trainer.train`.
    num_train : int, optional
        Use only the first ``num_train`` training images (quick runs).
    **network : int
        ``latent_dim``, ``hidden_dim``, ``num_layers``, ``prior_components``
        (:func:`network_options`).
    """
    objective = objective or Objective()
    static = network_options(**network)
    x = digits_split().x_train
    tr, va = train_val_split()
    if num_train is not None:
        check_option("num_train", num_train, kind=int, low=1)
        tr = tr[:num_train]
    return train(
        digits_vae,
        encoder_guide,
        {"x": x[tr], **static},
        val_data={"x": x[va], **static},
        elbo=objective.elbo,
        num_particles=objective.num_particles,
        elbo_options=objective.elbo_options,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        max_epochs=epochs,
        patience=patience,
        lr_patience=lr_patience,
        lr_factor=lr_factor,
        val_particles=val_particles,
        seed=seed,
        time_budget=time_budget,
        checkpoint=checkpoint,
        checkpoint_every=checkpoint_every,
        resume=resume,
        progress=progress,
    )
