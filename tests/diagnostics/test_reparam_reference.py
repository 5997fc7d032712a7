"""A reference for a centered model: retried decentered, mapped back, labelled everywhere.

Neal's funnel written the natural way (``x ~ Normal(0, exp(y / 2))``) makes NUTS
diverge; :mod:`diagnostics.reparam` reruns it with ``x`` decentered. The truth is
closed form: ``y ~ Normal(0, 3)`` and ``P(|x_i| < 1) = E[2 Phi(exp(-y / 2)) - 1]``
(1-D quadrature), so the retried draws are checked within 5 MCSE of it.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import pytest
import torch
from scipy import integrate, stats

from diagnostics import _arviz
from diagnostics.convert import reference_to_inference_data, save_netcdf
from diagnostics.nuts.reference import run_nuts
from diagnostics.references import get_reference
from diagnostics.reparam import reparam_label, retry_reparameterized, should_retry
from vimodels.resolve import resolve_model
from vimodels.runs.compare import run_compare
from vimodels.svi.reparam import decentering_sites, reparam_settings, reparameterized_model


def centered_funnel(n: int = 2) -> None:
    """Neal's funnel, centered: the scale of ``x`` depends on the latent ``y``."""
    y = pyro.sample("y", dist.Normal(0.0, 3.0))
    with pyro.plate("units", n):
        pyro.sample("x", dist.Normal(0.0, torch.exp(y / 2)))


def centered_horseshoe(x: torch.Tensor, y: torch.Tensor | None = None) -> None:
    """A horseshoe regression written centered (``beta ~ Normal(0, tau * lam)``)."""
    tau = pyro.sample("tau", dist.HalfCauchy(1.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    with pyro.plate("coefs", x.shape[1]):
        lam = pyro.sample("lam", dist.HalfCauchy(1.0))
        beta = pyro.sample("beta", dist.Normal(0.0, tau * lam))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("obs", dist.Normal(x @ beta, sigma), obs=y)


def _p_inside_one() -> float:
    """P(|x_i| < 1) under the funnel: the mean over y ~ N(0, 3) of 2 Phi(exp(-y/2)) - 1."""

    def integrand(y: float) -> float:
        return (2 * stats.norm.cdf(np.exp(-y / 2)) - 1) * stats.norm.pdf(y, 0, 3)

    value, _ = integrate.quad(integrand, -40, 40, limit=200)
    return float(value)


def test_decentering_sites_are_the_dependent_loc_scale_ones():
    x = torch.randn(10, 3)
    _, fn, data, _ = resolve_model(centered_horseshoe, {"x": x, "y": torch.randn(10)})
    # tau, lam, sigma have fixed parameters; beta's scale depends on tau and lam
    assert decentering_sites(fn, data) == ("beta",)
    _, fn, data, _ = resolve_model(centered_funnel, {})
    assert decentering_sites(fn, data) == ("x",)


def test_reparameterized_model_records_the_users_sites():
    model = reparameterized_model(centered_funnel, ("x",), "centered_funnel")
    tr = pyro.poutine.trace(model).get_trace()
    assert not tr.nodes["x_decentered"]["is_observed"]
    assert tr.nodes["x"]["infer"].get("_deterministic")  # a deterministic site, not data
    y, xd = tr.nodes["y"]["value"], tr.nodes["x_decentered"]["value"]
    assert torch.allclose(tr.nodes["x"]["value"], torch.exp(y / 2) * xd)


def test_no_retry_without_a_geometry_failure(tiny_nuts_eight_schools):
    # the tiny eight-schools run fails on ESS and R-hat, but its model is non-centered:
    # nothing to decenter, the reference comes back as it was
    ref = tiny_nuts_eight_schools
    assert not ref.trusted
    again = retry_reparameterized("eight_schools_noncentered", None, ref)
    assert again is ref
    assert ref.reference_from is None


@pytest.mark.slow
def test_centered_funnel_gets_a_trusted_reference_from_the_reparameterized_model(tmp_path):
    settings = {"num_chains": 4, "num_warmup": 400, "num_samples": 500}
    first = run_nuts(centered_funnel, {}, settings=settings, seed=1, cache_dir=tmp_path)
    assert should_retry(first), first.describe()  # divergences in the funnel's neck
    ref = get_reference(centered_funnel, {}, settings=settings, seed=1, cache_dir=tmp_path)
    label = reparam_label(("x",))
    assert label == (
        "reference from the reparameterized model (LocScaleReparam(centered=0), a "
        "MultivariateNormal as loc + scale_tril @ z, on: x)"
    )
    assert ref.trusted, ref.describe()
    assert ref.reference_from == label
    # recorded as a decentered fit records it (one schema for fits and references)
    assert ref.settings["reparam"] == reparam_settings(("x",))
    assert ref.settings["reparam"]["method"] == "decenter"
    assert label in ref.describe()
    assert ref.model_name == "centered_funnel"
    assert set(ref.draws) == {"y", "x"}  # the user's sites, not x_decentered
    assert ref.latent_sites == ("y", "x")
    assert ref.dims["x"] == ("units",)
    assert ref.cache_key != first.cache_key  # cached under its own key

    # the truth: y ~ N(0, 3) and P(|x_i| < 1) by quadrature, each within 5 MCSE
    y = ref.draws["y"]
    assert abs(y.mean()) <= 5 * _arviz.mcse_mean(y)
    neck = (y < -3.0).astype(float)  # the funnel's neck, where centered NUTS diverges
    assert abs(neck.mean() - stats.norm.cdf(-1.0)) <= 5 * _arviz.mcse_mean(neck)
    inside = (np.abs(ref.draws["x"]) < 1).astype(float)
    truth = _p_inside_one()
    for i in range(2):
        d = inside[:, :, i]
        assert abs(d.mean() - truth) <= 5 * _arviz.mcse_mean(d), (i, d.mean(), truth)

    # every output names it: JSON summary, netcdf attrs, and a second call is cached
    assert ref.summary()["reference_from"] == label
    path = save_netcdf(reference_to_inference_data(ref), tmp_path / "reference.nc")
    idata = _arviz.from_netcdf(path)
    assert idata.attrs["reference_from"] == label
    assert "x_decentered" not in idata.posterior
    json.dumps(ref.summary())
    again = get_reference(centered_funnel, {}, settings=settings, seed=1, cache_dir=tmp_path)
    assert again.from_cache and again.reference_from == label

    # and a comparison's report, CSV, JSON and reference.nc (the reference from the cache)
    out = tmp_path / "compare"
    run_compare(
        centered_funnel,
        data={},
        guides=("auto_normal",),
        steps=200,
        out=out,
        seed=1,
        num_draws=200,
        nuts_settings=settings,
        cache_dir=tmp_path,
        progress=False,
    )
    assert label in (out / "report.md").read_text()
    assert label in (out / "report.html").read_text()
    csv = pd.read_csv(out / "summary.csv")
    assert (csv["reference"] == f"nuts, {label}").all()
    payload = json.loads((out / "diagnostics.json").read_text())
    assert payload["reference"]["reference_from"] == label
    assert _arviz.from_netcdf(out / "reference.nc").attrs["reference_from"] == label


def _hier_noncentered(y: torch.Tensor, sigma: torch.Tensor) -> None:
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfNormal(5.0))
    with pyro.plate("units", y.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        theta = pyro.deterministic("theta", mu + tau * z)
        pyro.sample("y", dist.Normal(theta, sigma), obs=y)


def _hier_centered(y: torch.Tensor, sigma: torch.Tensor) -> None:
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfNormal(5.0))
    with pyro.plate("units", y.shape[0]):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(theta, sigma), obs=y)


def test_rebadged_reference_names_observed_dims_by_plate_and_keeps_no_foreign_lp(tmp_path):
    """Draws of another parameterization stand in for a model: the observed site's
    dimension is the model's plate (was ``y_dim_0`` in reference.nc) and the source's
    log density, whose Jacobian is another model's, is not this model's ``lp``."""
    from diagnostics.nuts.reference import rebadged
    from vimodels.svi.draws import model_info

    data = {"y": torch.tensor([2.0, -1.0, 0.5, 3.0]), "sigma": torch.tensor([1.0, 2.0, 1.0, 1.5])}
    settings = {"num_chains": 2, "num_warmup": 50, "num_samples": 50}
    source = run_nuts(_hier_noncentered, data, settings=settings, seed=0, cache_dir=tmp_path)
    assert "lp" in source.sample_stats
    ref = rebadged(
        source,
        model_info(_hier_centered, (), data, None),
        model_name="hier_centered",
        sites=("mu", "tau", "theta"),
        reference_from="reference from hier_noncentered",
        note="test",
    )
    assert ref.dims["theta"] == ("units",) and ref.dims["y"] == ("units",)
    assert "lp" not in ref.sample_stats
    np.testing.assert_array_equal(ref.sample_stats["lp_source"], source.sample_stats["lp"])
    idata = _arviz.from_netcdf(save_netcdf(reference_to_inference_data(ref), tmp_path / "r.nc"))
    assert idata.observed_data["y"].dims == ("units",)
    assert idata.log_likelihood["y"].dims == ("chain", "draw", "units")
    assert "lp" not in idata.sample_stats and "y_dim_0" not in idata.observed_data.dims
