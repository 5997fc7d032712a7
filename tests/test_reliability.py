"""No silently wrong number, no raw traceback: each user mistake gets its own error and fix.

Every test names the exact error class (never a broad exception); command-line
tests check exit status 2 with one line on stderr and no traceback.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import pytest
import torch
from cli_runner import run_cli

import vimodels
from diagnostics.nuts.reference import run_nuts
from vimodels.cli.main import main
from vimodels.errors import DataError, IncompatibleError, OptionError, UnknownNameError

FAST = dict(num_steps=5, num_eval=10, progress=False)
TINY_NUTS = {"num_chains": 1, "num_warmup": 20, "num_samples": 20}


def plate_model(y):
    """mu ~ N(0, 10); y_i ~ N(mu, 1) under a plate of len(y)... of 30 fixed points."""
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    with pyro.plate("data", 30):
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def regression(x, y):
    beta = pyro.sample("beta", dist.Normal(0.0, 1.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(beta * x, 1.0), obs=y)


def _one_line_exit_2(capsys, argv: list[str], needle: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert needle in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------ mis-shaped data (broadcast)


@pytest.mark.parametrize(
    ("shape", "counted"),
    [((30, 1), "(30, 30)"), ((2, 30), "(2, 30)"), ((30, 1, 1), "(30, 30, 30)")],
    ids=["trailing_singleton", "leading_batch_dim", "two_trailing_singletons"],
)
def test_observed_data_broadcast_by_pyro_is_a_data_error(shape, counted):
    y = np.zeros(shape)
    with pytest.raises(DataError) as info:
        vimodels.fit(plate_model, {"y": y}, **FAST)
    msg = str(info.value)
    assert f"data['y'] has shape {shape}" in msg and "expects shape (30,)" in msg
    assert "reshape" in msg  # the fix
    if shape[0] == 30 and len(shape) == 2:
        assert f"log-likelihood has shape {counted}" in msg


def test_broadcast_data_is_refused_by_nuts_too():
    with pytest.raises(DataError, match=r"data\['y'\] has shape \(30, 1\)"):
        run_nuts(plate_model, {"y": np.zeros((30, 1))}, settings=TINY_NUTS, cache=False)


def test_well_shaped_data_passes_the_shape_check():
    result = vimodels.fit(plate_model, {"y": np.zeros(30)}, **FAST)
    assert result.num_steps == 5


def test_data_error_keeps_pyros_shapes_on_one_line():
    with pytest.raises(DataError) as info:
        vimodels.fit(plate_model, {"y": np.zeros(29)}, **FAST)
    msg = str(info.value)
    assert "torch.Size([29]) vs torch.Size([30])" in msg and "site 'y'" in msg
    assert "\n" not in msg and "Trace Shapes" not in msg


# ------------------------------------------------------------ pandas data


def _data(kind: str) -> dict:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=20), rng.normal(size=20)
    df = pd.DataFrame({"x": x, "y": y})
    return {
        "ndarray": {"x": x, "y": y},
        "series": {"x": df["x"], "y": df["y"]},
        "one_column_frame": {"x": df[["x"]], "y": df[["y"]]},
        "nullable_float": {"x": df["x"].astype("Float64"), "y": df["y"].astype("Float64")},
    }[kind]


@pytest.mark.parametrize("kind", ["series", "one_column_frame", "nullable_float"])
def test_pandas_data_is_accepted_as_its_values(kind):
    base = vimodels.fit(regression, _data("ndarray"), **FAST, seed=3)
    got = vimodels.fit(regression, _data(kind), **FAST, seed=3)
    np.testing.assert_array_equal(got.losses, base.losses)


def test_nullable_integer_column_is_accepted():
    def counts(n, k):
        p = pyro.sample("p", dist.Beta(1.0, 1.0))
        with pyro.plate("data", n.shape[0]):
            pyro.sample("k", dist.Binomial(n, p), obs=k)

    n = pd.Series([10, 12, 9], dtype="Int64")
    k = pd.Series([3, 4, 2], dtype="Int64")
    result = vimodels.fit(counts, {"n": n, "k": k}, **FAST)
    assert np.isfinite(result.losses).all()


@pytest.mark.parametrize("dtype", ["Float64", "Int64"])
def test_pandas_missing_values_name_the_key_and_count(dtype):
    y = pd.Series([1, None, 2, None, 3] + [0] * 25, dtype=dtype)
    with pytest.raises(DataError, match=r"data\['y'\] has 2 missing value\(s\).*dropna"):
        vimodels.fit(plate_model, {"y": y}, **FAST)


# ------------------------------------------------------------ degenerate models and data


def no_latent(y):
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Normal(0.0, 1.0), obs=y)


def test_model_without_latent_sites_fit():
    with pytest.raises(IncompatibleError, match="no latent site.*add a pyro.sample"):
        vimodels.fit(no_latent, {"y": np.zeros(3)}, **FAST)


def test_model_without_latent_sites_nuts():
    with pytest.raises(IncompatibleError, match="no latent site.*add a pyro.sample"):
        run_nuts(no_latent, {"y": np.zeros(3)}, settings=TINY_NUTS, cache=False)


def test_empty_arrays_fit_and_nuts():
    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", y.shape[0]):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    with pytest.raises(DataError, match=r"data\['y'\] is empty \(shape \(0,\)\)"):
        vimodels.fit(model, {"y": np.zeros(0)}, **FAST)
    with pytest.raises(DataError, match=r"data\['y'\] is empty"):
        run_nuts(model, {"y": np.zeros(0)}, settings=TINY_NUTS, cache=False)


def nan_region(y):
    """Finite for mu <= 1, NaN above: a model with a hole in its density."""
    mu = pyro.sample("mu", dist.Normal(0.0, 0.3))
    pyro.factor("hole", torch.where(mu > 1.0, torch.tensor(float("nan")), torch.tensor(0.0)))


def nan_where_nuts_looks(y):
    """NaN wherever the density is differentiated (every point NUTS evaluates)."""
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    bad = torch.tensor(float("nan") if mu.requires_grad else 0.0)
    pyro.factor("hole", bad)


@pytest.mark.parametrize("seed", [0, 1, 2, 4])  # seeds whose initial points fell in the hole
def test_nuts_on_a_density_with_a_nan_region_samples_around_it(seed):
    ref = run_nuts(nan_region, {"y": np.zeros(1)}, settings=TINY_NUTS, seed=seed, cache=False)
    assert np.isfinite(ref.draws["mu"]).all() and ref.draws["mu"].max() <= 1.0


def test_nuts_on_a_density_nan_everywhere_it_looks():
    with pytest.raises(IncompatibleError, match="no initial point.*finite"):
        run_nuts(nan_where_nuts_looks, {"y": np.zeros(1)}, settings=TINY_NUTS, cache=False)


def test_nuts_refuses_a_subsampled_plate():
    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", y.shape[0], subsample_size=2) as idx:
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y[idx])

    with pytest.raises(IncompatibleError, match="subsamples plate 'data'.*full data"):
        run_nuts(model, {"y": np.zeros(5)}, settings=TINY_NUTS, cache=False)


# ------------------------------------------------------------ option values


@pytest.mark.parametrize("seed", [2**32, 2**70])
def test_seed_out_of_range(seed):
    with pytest.raises(OptionError, match="seed must be <= 4294967295"):
        vimodels.fit("eight_schools_noncentered", seed=seed, **FAST)
    with pytest.raises(OptionError, match="seed must be <= 4294967295"):
        run_nuts("eight_schools_noncentered", seed=seed, settings=TINY_NUTS, cache=False)


def test_largest_seed_is_accepted():
    assert vimodels.fit("eight_schools_noncentered", seed=2**32 - 1, **FAST).seed == 2**32 - 1


@pytest.mark.parametrize(
    ("lr", "match"), [(math.nan, "lr must be a number, got nan"), (3e38, "lr must be <= 1000")]
)
def test_lr_must_be_finite_and_sensible(lr, match):
    with pytest.raises(OptionError, match=match):
        vimodels.fit("eight_schools_noncentered", lr=lr, **FAST)


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--lr", "nan"], "lr must be a number, got nan"),
        (["--lr", "3e38"], "lr must be <= 1000"),
        (["--seed", str(2**32)], "seed must be <= 4294967295"),
    ],
)
def test_cli_option_values(capsys, tmp_path, argv, needle):
    out = tmp_path / "never"
    _one_line_exit_2(
        capsys, ["fit", "eight_schools_noncentered", "--quiet", "--out", str(out), *argv], needle
    )
    assert not out.exists()  # nothing written, not even an empty folder


def test_numpy_integers_are_integers():
    result = vimodels.fit(
        "eight_schools_noncentered",
        num_steps=np.int64(5),
        num_particles=np.int32(2),
        seed=np.uint32(1),
        num_eval=np.int64(10),
        progress=False,
    )
    assert result.num_steps == 5 and type(result.seed) is int
    assert json.dumps(result.summary())  # plain ints all the way to JSON
    assert result.sample(np.int64(7))["mu"].shape == (7,)


def test_unknown_sites_are_refused_with_the_valid_ones():
    with pytest.raises(OptionError, match=r"unknown site\(s\) \['nope'\].*mu, tau, theta_tilde"):
        vimodels.fit("eight_schools_noncentered", sites=("nope",), **FAST)
    result = vimodels.fit("eight_schools_noncentered", **FAST)
    with pytest.raises(OptionError, match=r"unknown site\(s\) \['nope'\]"):
        result.sample(10, sites=("nope",))


# ------------------------------------------------------------ the user's own model


def test_error_raised_by_the_model_itself_says_so():
    def picky(y):
        pyro.sample("mu", dist.Normal(0.0, 1.0))
        if (y <= 0).any():
            raise ValueError("picky needs positive y")

    with pytest.raises(DataError) as info:
        vimodels.fit(picky, {"y": np.zeros(3)}, **FAST)
    msg = str(info.value)
    assert "model 'picky' raised ValueError" in msg and "picky needs positive y" in msg
    assert "model's own code" in msg and "data does not fit" not in msg


def positional(y, /):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def test_positional_only_model_is_accepted_and_named_by_its_parameters():
    """Once told "it takes: nothing"; positional-only parameters are now bound by name."""
    assert vimodels.fit(positional, {"y": np.zeros(3)}, **FAST).num_steps == 5
    with pytest.raises(DataError) as info:
        vimodels.fit(positional, {"x": np.zeros(3)}, **FAST)
    assert str(info.value).endswith("it takes: y")


# ------------------------------------------------------------ command line: compare and fit


def test_compare_with_an_unknown_elbo_exits_2_before_any_work(capsys, tmp_path):
    out = tmp_path / "cmp"
    line = _one_line_exit_2(
        capsys,
        ["compare", "conjugate_linear_regression", "--guides", "mean_field"]
        + ["--elbos", "trace", "nope", "--out", str(out), "--quiet"],
        "unknown ELBO 'nope'; valid ELBOs are:",
    )
    assert "trace" in line and not out.exists()


def test_compare_with_an_unknown_guide_exits_2(capsys, tmp_path):
    _one_line_exit_2(
        capsys,
        ["compare", "conjugate_linear_regression", "--guides", "mean_feild"]
        + ["--out", str(tmp_path / "cmp"), "--quiet"],
        "unknown guide 'mean_feild'; valid guides are:",
    )


def test_run_compare_refuses_an_unknown_name_before_any_work(tmp_path):
    from vimodels.runs.compare import run_compare

    with pytest.raises(UnknownNameError, match="unknown ELBO 'nope'"):
        run_compare("conjugate_linear_regression", ["mean_field"], ["trace", "nope"], 10, tmp_path)
    assert list(tmp_path.iterdir()) == []  # no reference, no fit, no file


@pytest.mark.slow
def test_compare_lists_an_inapplicable_pair_on_stderr(tmp_path):
    common = ["--steps", "30", "--draws", "100", "--iwae-k", "5", "--no-netcdf", "--quiet"]
    common += ["--executor", "serial", "--reference", "exact"]
    proc = run_cli(
        "compare",
        "conjugate_linear_regression",
        "--guides",
        "mean_field",
        "structured",  # hand-written for other models
        "--out",
        str(tmp_path / "a"),
        *common,
    )
    assert proc.returncode == 0, proc.stderr
    warned = [x for x in proc.stderr.splitlines() if x.startswith("vimodels: warning: skipped")]
    assert len(warned) == 1 and "structured/trace" in warned[0], proc.stderr
    # nothing at all could run: exit 2, one line
    proc = run_cli(
        "compare",
        "conjugate_linear_regression",
        "--guides",
        "structured",
        "--out",
        str(tmp_path / "b"),
        *common,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "could be fitted" in lines[0], proc.stderr


def test_fits_of_two_seeds_keep_both_files(tmp_path, capsys):
    out = tmp_path / "fits"
    base = ["fit", "eight_schools_noncentered", "--steps", "20", "--draws", "20", "--quiet"]
    for seed in ("0", "1"):
        assert main([*base, "--seed", seed, "--out", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        f"eight_schools_noncentered__auto_normal__trace__seed{k}.{ext}"
        for k in (0, 1)
        for ext in ("json", "nc")
    ]
    assert json.loads((out / names[2]).read_text())["seed"] == 1


def test_non_finite_fit_exits_1_with_a_clear_line(tmp_path, capsys):
    out = tmp_path / "fits"
    argv = ["fit", "eight_schools_noncentered", "--lr", "1000", "--steps", "50", "--quiet"]
    assert main([*argv, "--no-jit", "--draws", "20", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "vimodels: fit failed:" in err and "Lower --lr" in err, err
    summary = json.loads(
        (out / "eight_schools_noncentered__auto_normal__trace__seed0.json").read_text()
    )
    assert summary["status"] == "nonfinite"


def test_failed_fit_leaves_no_empty_folder(tmp_path, capsys):
    out = tmp_path / "new" / "deeper"
    _one_line_exit_2(
        capsys,
        ["fit", "eight_schools_noncentered", "--elbo", "nope", "--out", str(out), "--quiet"],
        "unknown ELBO 'nope'",
    )
    assert not (tmp_path / "new").exists()


def test_unknown_name_error_is_still_a_key_error():
    with pytest.raises(UnknownNameError):
        vimodels.fit("eight_schools_noncentered", elbo="nope", **FAST)
