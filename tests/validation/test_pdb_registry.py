"""Fast tests over the validation registry (posteriordb posteriors, ``pdb_*``).

Every entry builds without reading data, loads its data, has a finite log
density (with log-Jacobians) at random unconstrained points, and every
parameter of posteriordb's reference maps to an element of a Pyro site.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from torch.distributions import biject_to

from vimodels.catalog.registry import MODELS, get_model
from vimodels.errors import UnknownNameError
from vimodels.validation import (
    POSTERIORS,
    VALIDATION_MODELS,
    parse_stan_name,
    reference_draws,
    reference_json,
    reference_table,
)
from vimodels.validation.models import DATA_DIR

NAMES = list(VALIDATION_MODELS)
POSTERIOR_DIRS = sorted({spec.posterior for spec in POSTERIORS.values()})


def _trace(entry):
    return poutine.trace(entry.model).get_trace(**entry.data())


def _latent(tr):
    return {
        n: s
        for n, s in tr.nodes.items()
        if s["type"] == "sample" and not s["is_observed"] and not site_is_subsample(s)
    }


def test_importing_the_suite_reads_no_data():
    code = (
        "import vimodels.validation as v, vimodels.catalog.registry as r; "
        "r.get_model('pdb_ark'); "
        "print(sum(e.data_loaded for e in v.VALIDATION_MODELS.values()))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "0"


def test_names_are_unique_prefixed_and_kept_out_of_the_catalog():
    assert len(set(NAMES)) == len(NAMES)
    assert all(n.startswith("pdb_") for n in NAMES)
    assert not set(NAMES) & set(MODELS), "the catalog table stays the catalog"
    assert len(POSTERIOR_DIRS) == 9
    for name in NAMES:
        assert get_model(name) is VALIDATION_MODELS[name]
    with pytest.raises(UnknownNameError):
        get_model("pdb_no_such_posterior")


def test_every_posterior_folder_is_copied_with_its_licence():
    readme = (DATA_DIR / "README.md").read_text()
    assert "BSD" in readme
    for posterior in POSTERIOR_DIRS:
        for f in ("model.stan", "data.json", "reference.json"):
            assert (DATA_DIR / posterior / f).is_file(), (posterior, f)
        ref = json.loads((DATA_DIR / posterior / "reference.json").read_text())
        assert ref["posterior"] == posterior
        assert ref["model_licence"] == "BSD3"


@pytest.mark.parametrize("name", NAMES)
def test_entry_loads_lazily_and_has_a_finite_log_density(name):
    entry = get_model(name)
    assert entry.description and entry.sites and entry.max_plate_nesting is not None
    assert entry.default_guides == ("auto_normal", "auto_multivariate_normal")
    if entry.reference_from is not None:
        assert entry.reference_from in VALIDATION_MODELS
    data = entry.data()
    assert entry.data_loaded and data
    tr = _trace(entry)
    latent = _latent(tr)
    assert latent
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        values, log_jac = {}, 0.0
        for n, s in latent.items():
            t = biject_to(s["fn"].support)
            u0 = t.inv(s["value"])
            u = (torch.rand(u0.shape, generator=gen, dtype=u0.dtype) * 4 - 2).requires_grad_()
            values[n] = t(u)
            log_jac = log_jac + t.log_abs_det_jacobian(u, values[n]).sum()
        cond = poutine.trace(poutine.condition(entry.model, data=values)).get_trace(**data)
        lp = cond.log_prob_sum() + log_jac
        assert torch.isfinite(lp), (name, {k: v.tolist() for k, v in values.items()})
        (grad,) = torch.autograd.grad(lp, [next(iter(values.values()))], allow_unused=True)
        assert grad is None or bool(torch.isfinite(grad).all())


@pytest.mark.parametrize("name", NAMES)
def test_every_reference_parameter_maps_to_a_site_element(name):
    entry = get_model(name)
    tr = _trace(entry)
    shapes = {
        n: tuple(s["value"].shape)
        for n, s in tr.nodes.items()
        if s["type"] == "sample"
        and (not s["is_observed"] or s["infer"].get("_deterministic", False))
    }
    ref = reference_json(name)
    assert set(ref["summary"]) == set(ref["thinned_draws_every_10th"])
    seen = set()
    for param in ref["summary"]:
        site, idx = parse_stan_name(param)
        assert site in shapes, f"{param}: no site {site!r} in {sorted(shapes)}"
        assert len(idx) == len(shapes[site]) and all(
            0 <= i < n for i, n in zip(idx, shapes[site])
        ), (param, shapes[site])
        seen.add((site, idx))
    assert len(seen) == len(ref["summary"])
    for site in entry.sites:  # the sites of interest are what the reference reports
        assert site in {s for s, _ in seen}
    draws = reference_draws(name)
    for site, x in draws.items():
        assert x.shape == (10, 100) + shapes[site]
        assert np.isfinite(x).all()


def test_parse_stan_name():
    assert parse_stan_name("beta[1]") == ("beta", (0,))
    assert parse_stan_name("sigma") == ("sigma", ())
    assert parse_stan_name("z[2,3]") == ("z", (1, 2))
    with pytest.raises(ValueError):
        parse_stan_name("beta[1")


def test_reference_table_mcse_is_sd_over_root_ess():
    tab = reference_table("pdb_kidiq_interaction")
    assert list(tab["parameter"]) == ["beta[1]", "beta[2]", "beta[3]", "beta[4]", "sigma"]
    assert (tab["ess_bulk"] > 400).all()
    approx = tab["sd"] / np.sqrt(tab["ess_bulk"])
    assert np.allclose(tab["mcse_mean"], approx, rtol=0.3)
    # the thinned draws' mean agrees with posteriordb's mean over all 10 000 draws
    assert (np.abs(tab["mean"] - tab["mean_full"]) < 5 * tab["mcse_mean"]).all()


@pytest.mark.parametrize(
    "name",
    [
        "pdb_garch11",
        "pdb_gp_pois_regr",
        "pdb_gp_pois_regr_pc",
        "pdb_hmm_example",
        "pdb_arma11_scaled",
        "pdb_kidiq_interaction_qr",
    ],
)
def test_external_reference_has_every_latent_site(name):
    from diagnostics import get_reference

    ref = get_reference(name, kind="external")
    assert ref.kind == "external"
    tr = _trace(get_model(name))
    for site in _latent(tr):
        assert ref.draws[site].shape[:2] == (10, 100)
    for site in ref.sites:
        assert np.isfinite(ref.draws[site]).all()
    # the derived latents reproduce the reported parameters (f = L f_tilde, beta1 = ...)
    raw = reference_draws(name)
    for site, x in raw.items():
        np.testing.assert_allclose(ref.draws[site], x, rtol=1e-7, atol=1e-9)
    assert ref.log_likelihood and all(np.isfinite(v).all() for v in ref.log_likelihood.values())


def test_external_kind_rejects_catalog_models():
    from diagnostics import get_reference

    with pytest.raises(UnknownNameError):
        get_reference("eight_schools_noncentered", kind="external")


@pytest.mark.parametrize("name", ["pdb_garch11", "pdb_hmm_example", "pdb_kidiq_interaction"])
def test_model_checks_pass(name):
    from vimodels.svi.check import check_model

    report = check_model(name)
    assert all(item.ok for item in report), [i for i in report if not i.ok]


def test_catalog_listing_stays_the_catalog():
    from vimodels.cli.basic import markdown_tables

    assert "pdb_" not in markdown_tables("models")


@pytest.mark.slow
def test_compare_runs_against_the_external_reference(tmp_path):
    from vimodels.runs.compare import run_compare

    run = run_compare(
        "pdb_mesquite_logvolume",
        guides=["auto_normal"],
        steps=300,
        out=tmp_path,
        reference="external",
        num_draws=500,
        progress=False,
        netcdf=False,
    )
    c = run.comparison
    assert c.reference.kind == "external" and c.reference.trusted
    assert set(c.sites["element"]) == {"beta[0]", "beta[1]", "sigma"}
    assert (tmp_path / "report.md").is_file()
