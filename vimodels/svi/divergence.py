"""When a finite loss is still a failure: the divergence rule of a fit.

A fit whose parameters run away can keep finite losses, e.g. a full-rank
Gaussian over 1000 dimensions whose loss went from 1.9e3 to -1e26 within 20
steps while the convergence rule, seeing a flat (huge) loss, called it
converged. Two checks, each with a stated false-alarm rate, make such a fit a
failure (status ``diverged``) instead:

1. **Above the evidence** (where ``log p(x)``, or an upper bound ``U`` on it,
   is known, e.g. a catalog entry's exact log evidence). Each step's loss is
   ``-log w`` for a draw ``w = p(x, z) / q(z)`` (or a mean of ``-log w`` over
   particles, or ``-log`` of a mean of ``w``), and ``E[w] = p(x)``; by Markov's
   inequality ``P(-loss > log p(x) + a) <= exp(-a)``. A loss below
   ``-U - a`` with ``a = EVIDENCE_MARGIN + log(num_steps)`` therefore happens
   in a correct run with probability below ``exp(-EVIDENCE_MARGIN)`` (union
   over the steps). After the fit, an ELBO estimate more than ``Z_FINAL``
   standard errors above ``U`` is a failure too (the ELBO is a lower bound).
2. **Exploding loss** (always). Without a bound on ``log p(x)`` the loss is
   judged against the scale of the first loss ``L0`` (the loss at the
   initial guide): a loss below ``L0 - EXPLOSION_FACTOR * max(|L0|, 1)`` is a
   failure, and so is a final ELBO estimate above ``-(L0 - EXPLOSION_FACTOR *
   max(|L0|, 1))``. A sound fit improves ``-ELBO`` from ``L0`` by the
   initial guide's KL divergence to the posterior at most; a gain a thousand
   times the initial loss's own magnitude is the mark of numerical runaway
   (float32 overflow of a covariance, a log-determinant gone wrong), not of
   learning. The rule is a guard, not a proof: a model whose evidence is
   many orders of magnitude above its initial loss would need a larger
   factor (``DivergenceRule(explosion_factor=...)``).

The first check that fires ends the fit with the step number in the message.
Check 1 needs ``q`` to be a density: a point-mass guide (``AutoDelta``, and
``AutoLaplaceApproximation`` while it trains) reports ``log p(x, z*)``, which
exceeds ``log p(x)`` by the log posterior density at the mode, so for it only
check 2 applies (:meth:`DivergenceRule.for_guide`).

Both checks look down (a loss too good to be true). Upward spikes, one guide
draw where the model's density explodes, are :mod:`vimodels.svi.spike`'s: such
a step is skipped, and a fit whose latest steps mostly spike stops as
``diverged`` too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from pyro.infer.autoguide import AutoDelta, AutoLaplaceApproximation

#: Margin in nats (plus ``log(num_steps)``) above a known ``log p(x)``.
EVIDENCE_MARGIN = 30.0
#: How many times the initial loss's magnitude the loss may fall below it.
EXPLOSION_FACTOR = 1000.0
#: Standard errors an ELBO estimate may lie above a known ``log p(x)``.
Z_FINAL = 5.0


@dataclass(frozen=True)
class DivergenceRule:
    """Thresholds of the divergence checks (see the module docstring).

    Attributes
    ----------
    log_evidence : float or None
        Known ``log p(x)`` or an upper bound on it (nats).
    explosion_factor : float
        Multiple of ``max(|L0|, 1)`` the loss may fall below the first loss.
    evidence_margin : float
        Nats (plus ``log(num_steps)``) a loss may imply above ``log_evidence``.
    """

    log_evidence: float | None = None
    explosion_factor: float = EXPLOSION_FACTOR
    evidence_margin: float = EVIDENCE_MARGIN

    def for_guide(self, guide: Any) -> DivergenceRule:
        """The rule for ``guide``: no evidence bound for a point-mass guide."""
        if isinstance(guide, (AutoDelta, AutoLaplaceApproximation)):
            return replace(self, log_evidence=None)
        return self

    def as_dict(self) -> dict[str, Any]:
        """The thresholds, for a fit's settings."""
        return {
            "log_evidence": self.log_evidence,
            "explosion_factor": self.explosion_factor,
            "evidence_margin": self.evidence_margin,
            "z_final": Z_FINAL,
        }

    def floor(self, first_loss: float, num_steps: int) -> tuple[float, str]:
        """The lowest plausible loss and what sets it."""
        floor = first_loss - self.explosion_factor * max(abs(first_loss), 1.0)
        why = (
            f"more than {self.explosion_factor:g} times the first loss's magnitude below "
            f"the first loss {first_loss:.4g}"
        )
        if self.log_evidence is not None and math.isfinite(self.log_evidence):
            bound = -self.log_evidence - self.evidence_margin - math.log(max(num_steps, 1))
            if bound > floor:
                floor = bound
                why = (
                    f"implying log w above the exact log evidence {self.log_evidence:.4g} "
                    f"by more than {-(bound + self.log_evidence):.1f} nats (probability "
                    f"below exp(-{self.evidence_margin:g}) in a sound fit)"
                )
        return floor, why

    def check_step(self, step: int, loss: float, first_loss: float, num_steps: int) -> str | None:
        """A one-line reason when step ``step``'s loss is implausible, else None."""
        floor, why = self.floor(first_loss, num_steps)
        if loss < floor:
            return f"diverged at step {step}: loss {loss:.4g} is {why}"
        return None

    def check_elbo(
        self, elbo: float, elbo_se: float, first_loss: float, num_steps: int
    ) -> str | None:
        """A one-line reason when a final ELBO estimate is implausible, else None."""
        if not math.isfinite(elbo):
            return None
        if self.log_evidence is not None and math.isfinite(self.log_evidence):
            se = elbo_se if math.isfinite(elbo_se) else 0.0
            if elbo - Z_FINAL * se > self.log_evidence:
                return (
                    f"diverged: the ELBO estimate {elbo:.4g} +- {se:.2g} exceeds the exact "
                    f"log evidence {self.log_evidence:.4g} (the ELBO is a lower bound)"
                )
        floor = first_loss - self.explosion_factor * max(abs(first_loss), 1.0)
        if -elbo < floor:
            return (
                f"diverged: the ELBO estimate {elbo:.4g} is more than "
                f"{self.explosion_factor:g} times the first loss's magnitude above "
                f"-(first loss) = {-first_loss:.4g}"
            )
        return None
