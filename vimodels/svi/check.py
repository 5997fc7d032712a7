"""``debug()``-style checks of a model, cheapest first.

1. the data loads and passes validation; 2. one trace runs; 3. the log density
is finite at the initial point (``init_to_median``); 4. its gradient w.r.t.
the unconstrained latents is finite; 5. every constraint transform
round-trips ``x -> unconstrained -> x``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from pyro import poutine
from pyro.infer import TraceEnum_ELBO, config_enumerate
from pyro.infer.autoguide.initialization import init_to_median
from pyro.infer.util import is_validation_enabled  # noqa: F401  (re-exported for users)
from pyro.poutine.util import site_is_subsample
from torch.distributions import biject_to

from vimodels.catalog.base import CatalogEntry
from vimodels.catalog.registry import get_model
from vimodels.data import prepare_data, trace_check
from vimodels.errors import VimodelsError


@dataclass(frozen=True)
class CheckItem:
    """One check: name, whether it passed, and what was seen."""

    name: str
    ok: bool
    detail: str


def check_model(
    model: str | CatalogEntry | Callable, data: dict[str, Any] | None = None
) -> list[CheckItem]:
    """Run the checks in order and stop at the first failure.

    Returns
    -------
    list of CheckItem
    """
    items: list[CheckItem] = []
    entry = (
        get_model(model)
        if isinstance(model, str)
        else (model if isinstance(model, CatalogEntry) else None)
    )
    fn = entry.model if entry is not None else model
    name = entry.name if entry is not None else getattr(model, "__name__", "model")
    try:
        raw = entry.data() if entry is not None else data
        if entry is not None and data:
            raw.update(data)
        d = prepare_data(fn, raw)
        items.append(CheckItem("data", True, f"{len(d)} entries: {', '.join(d)}"))
        tr = trace_check(fn, d, name)
    except VimodelsError as exc:
        items.append(CheckItem("data", False, str(exc)))
        return items
    latent = {
        n: s
        for n, s in tr.nodes.items()
        if s["type"] == "sample" and not s["is_observed"] and not site_is_subsample(s)
    }
    items.append(CheckItem("trace", True, f"{len(latent)} latent sites: {', '.join(latent)}"))
    discrete = [n for n, s in latent.items() if s["fn"].support.is_discrete]
    continuous = {n: s for n, s in latent.items() if n not in discrete}
    unconstrained = {}
    for n, s in continuous.items():
        value = init_to_median(s)
        unconstrained[n] = biject_to(s["fn"].support).inv(value).detach().requires_grad_(True)

    def log_density() -> torch.Tensor:
        values = {n: biject_to(continuous[n]["fn"].support)(u) for n, u in unconstrained.items()}
        cond = poutine.condition(fn, data=values)
        if discrete:
            elbo = TraceEnum_ELBO(
                max_plate_nesting=entry.max_plate_nesting or 1 if entry is not None else 1
            )
            return -elbo.differentiable_loss(
                config_enumerate(cond, "parallel"), lambda **kw: None, **d
            )
        t = poutine.trace(cond).get_trace(**d)
        total = t.log_prob_sum()
        for n, u in unconstrained.items():
            tf = biject_to(continuous[n]["fn"].support)
            total = total + tf.log_abs_det_jacobian(u, tf(u)).sum()
        return total

    try:
        lp = log_density()
        ok = bool(torch.isfinite(lp))
        items.append(CheckItem("log density", ok, f"{float(lp.detach()):.4f} at the initial point"))
        if not ok:
            return items
        if unconstrained:
            grads = torch.autograd.grad(lp, list(unconstrained.values()), allow_unused=True)
            bad = [
                n
                for n, g in zip(unconstrained, grads)
                if g is not None and not bool(torch.isfinite(g).all())
            ]
            items.append(
                CheckItem(
                    "gradients",
                    not bad,
                    "finite for all sites" if not bad else f"non-finite for {', '.join(bad)}",
                )
            )
            if bad:
                return items
    except (ValueError, RuntimeError) as exc:
        items.append(CheckItem("log density", False, f"{type(exc).__name__}: {exc}"))
        return items
    worst, worst_site = 0.0, None
    for n, u in unconstrained.items():
        tf = biject_to(continuous[n]["fn"].support)
        x = tf(u.detach())
        err = float((tf(tf.inv(x)) - x).abs().max()) if x.numel() else 0.0
        if err > worst:
            worst, worst_site = err, n
    ok = worst < 1e-4
    items.append(
        CheckItem(
            "transforms",
            ok,
            f"max round-trip error {worst:.2e}" + (f" at {worst_site}" if worst_site else ""),
        )
    )
    if discrete:
        items.append(
            CheckItem(
                "discrete",
                True,
                f"sites {', '.join(discrete)} summed out by enumeration; use elbo='enum'",
            )
        )
    return items
