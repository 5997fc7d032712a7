"""What a fit returns: the immutable :class:`FitResult`, and :class:`FitProgress` for callbacks."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyro

from vimodels.catalog.base import CatalogEntry
from vimodels.errors import OptionError, check_option, check_seed, derive_seed
from vimodels.io import jsonable
from vimodels.svi.binding import keyword_call, positional_kwargs
from vimodels.svi.draws import model_info, sample_guide
from vimodels.svi.minibatch_eval import EVAL_BATCHES, minibatch_log_weights
from vimodels.svi.resample import POOL_FACTOR, resampled_draws
from vimodels.svi.scope import param_scope
from vimodels.svi.subsample import IndexSupplier
from vimodels.svi.weights import log_weights

CONVERGED = "converged"
MAX_STEPS = "max_steps"
NONFINITE = "nonfinite"
DIVERGED = "diverged"
INTERRUPTED = "interrupted"


@dataclass(frozen=True)
class FitProgress:
    """What a fit's ``callback`` sees after each successful step.

    Attributes
    ----------
    step : int
        Steps completed so far (1 after the first step).
    loss : float
        Loss of the step just taken (negative objective, nats).
    elapsed : float
        Seconds since the loop started, excluding the time spent in earlier
        callbacks.
    """

    step: int
    loss: float
    elapsed: float
    _draw: Callable = field(repr=False)

    def sample(
        self, num_samples: int = 1000, seed: int | None = None, sites: tuple[str, ...] | None = None
    ) -> dict[str, np.ndarray]:
        """Draw from the guide at the current parameters, as :meth:`FitResult.sample` does.

        The fit's random stream is saved and restored around the draws, so a
        callback that samples does not change the fit. (An ``auto_laplace`` guide
        draws its MAP point here; its Laplace approximation is built at the end.)

        Returns
        -------
        dict of str to ndarray
            ``(num_samples, *site_shape)`` per site (default: the sites of interest).
        """
        check_option("num_samples", num_samples, kind=int, low=1)
        state = pyro.util.get_rng_state()
        try:
            if seed is not None:
                pyro.set_rng_seed(seed)
            # subsampled plates draw their own batch here (one for all draws), not the fit's next
            batches = IndexSupplier(self.step if seed is None else seed, "independent", hold=True)
            with pyro.validation_enabled(False), batches:
                return self._draw(num_samples, sites)
        finally:
            pyro.util.set_rng_state(state)


@dataclass(frozen=True)
class FitResult:
    """What a fit produced. Immutable; parameters are kept in their own store state.

    Attributes
    ----------
    model_name, guide_name, elbo_name : str
    losses : ndarray, shape (num_steps,)
        Loss (negative objective, nats) per step.
    elbo, elbo_se : float
        ELBO estimate (nats) from ``num_eval`` draws and its standard error.
    params : dict of str to ndarray
        Constrained parameter values.
    status : str
        ``converged``, ``max_steps``, ``nonfinite``, ``diverged`` (a finite loss or
        ELBO out of any plausible range, :mod:`vimodels.svi.divergence`) or
        ``interrupted``.
    converged : bool
        Whether the stopping rule declared convergence.
    num_steps : int
        Steps completed (excluding a failed one).
    wall_time : float
        Seconds spent in the loop.
    seed : int
    settings : dict
        Settings actually used (ELBO class, particles, JIT, threads, guide options...);
        ``settings["spikes"]``: the steps skipped because their loss spiked
        (:mod:`vimodels.svi.spike`), None when none was.
    message : str
        One-line account of how the fit ended.
    sites : tuple of str
        Sites returned by :meth:`sample`.
    subsample : dict or None
        ``settings["subsample"]`` when the model subsamples its data: then
        :meth:`sample` and :meth:`log_weights` draw batches in O(batch) and
        :meth:`log_weights` returns minibatch estimates
        (:mod:`vimodels.svi.minibatch_eval`).
    """

    model_name: str
    guide_name: str
    elbo_name: str
    losses: np.ndarray
    elbo: float
    elbo_se: float
    params: dict[str, np.ndarray]
    status: str
    converged: bool
    num_steps: int
    wall_time: float
    seed: int
    settings: dict[str, Any]
    message: str
    sites: tuple[str, ...]
    entry: CatalogEntry | None = field(repr=False, default=None)
    model: Callable = field(repr=False, default=None)
    guide: Callable = field(repr=False, default=None)
    args: tuple = field(repr=False, default=())
    data: dict = field(repr=False, default_factory=dict)
    param_state: dict = field(repr=False, default_factory=dict)
    max_plate_nesting: int = 1
    discrete_sites: tuple[str, ...] = ()
    site_shapes: dict[str, tuple[int, ...]] = field(repr=False, default_factory=dict)
    subsample: dict | None = field(repr=False, default=None)

    @property
    def partial(self) -> bool:
        """True when the fit was interrupted, stopped on a non-finite loss or diverged."""
        return self.status in (INTERRUPTED, NONFINITE, DIVERGED)

    def sample(
        self, num_samples: int = 1000, seed: int | None = None, sites: tuple[str, ...] | None = None
    ) -> dict[str, np.ndarray]:
        """Draw from the fitted guide.

        Parameters
        ----------
        num_samples : int
            Number of draws.
        seed : int, optional
            Defaults to the fit's seed + 1.
        sites : tuple of str, optional
            Defaults to the sites of interest.

        Returns
        -------
        dict of str to ndarray
            Each array has shape ``(num_samples, *site_shape)``, constrained space.
            For a fit with ``settings["resample"]`` (``pathfinder``, ``auto_laplace_is``):
            draws resampled by Pareto-smoothed importance weights from four times as
            many guide draws (:mod:`vimodels.svi.resample`).
            For a model that subsamples its data, a local latent of a subsampled plate
            comes back for ONE batch of rows, the same for every draw (shape
            ``(num_samples, batch, ...)``): :meth:`rows` with the same ``seed`` says
            which rows of the data they are (``to_inference_data`` with that seed uses
            the same rows and the same draws).
        """
        num_samples = check_option("num_samples", num_samples, kind=int, low=1)
        sites = tuple(sites or self.sites)
        unknown = [x for x in sites if x not in self.site_shapes]
        if unknown:
            raise OptionError(
                f"unknown site(s) {unknown}; this fit can draw: {', '.join(self.sites)} "
                f"(and the model's other sample sites: {', '.join(self.site_shapes)})"
            )
        pyro.set_rng_seed(derive_seed(self.seed, 1) if seed is None else check_seed(seed))
        # a subsampled plate: one batch of rows for every draw (see rows())
        with param_scope(self), self._batches(seed, 1, hold=True):
            info = model_info(self.model, self.args, {}, self.max_plate_nesting)
            check = self.settings.get("eval_vectorized") is not True
            if self.settings.get("resample"):  # Pathfinder, auto_laplace_is: PSIS-resampled
                return resampled_draws(
                    self.model, self.guide, self.args, {}, info, num_samples,
                    self.settings["resample"].get("pool_factor", POOL_FACTOR),
                    sites=sites, check=check,
                )[0]  # fmt: skip
            # the draws of to_inference_data with the same seed; the particle check
            # is skipped where the fit's ELBO draws passed it
            return sample_guide(
                self.model, self.guide, self.args, {}, info, num_samples, sites=sites,
                check=check, weights=False,
            )[0]  # fmt: skip

    def rows(self, seed: int | None = None) -> dict[str, np.ndarray]:
        """The data rows of each subsampled plate in :meth:`sample` with the same ``seed``.

        Parameters
        ----------
        seed : int, optional
            As given to :meth:`sample` / :meth:`to_inference_data` (default: the fit's
            seed + 1).

        Returns
        -------
        dict of str to ndarray
            Plate name to the indices (int64, shape ``(batch,)``, sorted) into the full
            data of the rows its local latents and observed values are drawn for;
            empty when the model subsamples no plate.
        """
        if self.subsample is None:
            return {}
        with param_scope(self), self._batches(seed, 1, hold=True):
            info = model_info(self.model, self.args, {}, self.max_plate_nesting)
        return dict(info.plate_rows)

    def log_weights(self, num_samples: int = 1000, seed: int | None = None) -> np.ndarray:
        """``log p(x, z) - log q(z)`` for ``num_samples`` guide draws, shape ``(num_samples,)``.

        For a model that subsamples its data, per-draw unbiased estimates from
        groups of draws on independent batches
        (:func:`~vimodels.svi.minibatch_eval.minibatch_log_weights`).
        """
        seed = derive_seed(self.seed, 2) if seed is None else check_seed(seed)
        pyro.set_rng_seed(seed)
        if self.subsample is not None:  # a model that subsamples its data
            with param_scope(self):
                return minibatch_log_weights(
                    keyword_call(self.model),
                    keyword_call(self.guide),
                    self._kwargs(),
                    num_samples,
                    self.max_plate_nesting,
                    seed=seed,
                    batches=self.subsample.get("eval_batches", EVAL_BATCHES),
                )[0]
        with param_scope(self):
            return log_weights(
                keyword_call(self.model),
                keyword_call(self.guide),
                self._kwargs(),
                num_samples,
                self.max_plate_nesting,
            )

    def _kwargs(self) -> dict:
        return positional_kwargs(self.args)

    def _batches(
        self, seed: int | None, offset: int, hold: bool = False
    ) -> contextlib.AbstractContextManager:
        """Subsampled plates draw independent batches in O(batch) (when the model has any).

        With ``hold`` every plate entry gets one batch (the same rows for all draws).
        """
        if self.subsample is None:
            return contextlib.nullcontext()
        return IndexSupplier(
            derive_seed(self.seed, offset) if seed is None else seed, "independent", hold=hold
        )

    def to_inference_data(self, num_samples: int = 1000, seed: int | None = None):
        """ArviZ InferenceData of guide draws (see :mod:`diagnostics.convert`).

        The one import of ``diagnostics`` from ``vimodels.svi``, deferred on purpose
        (docs/architecture.md): ArviZ costs about two seconds to import, and the
        conversion belongs with the other ArviZ code.
        """
        from diagnostics.convert import fit_to_inference_data  # lazy: heavy, upward

        return fit_to_inference_data(self, num_samples=num_samples, seed=seed)

    def summary(self) -> dict[str, Any]:
        """JSON-friendly summary: names, status, ELBO, timing and settings."""
        return {
            "model": self.model_name,
            "guide": self.guide_name,
            "elbo_name": self.elbo_name,
            "status": self.status,
            "converged": self.converged,
            "message": self.message,
            "num_steps": self.num_steps,
            "final_loss": float(self.losses[-1]) if len(self.losses) else None,
            "elbo": self.elbo,
            "elbo_se": self.elbo_se,
            "wall_time_s": self.wall_time,
            "seed": self.seed,
            "settings": jsonable(self.settings),
        }
