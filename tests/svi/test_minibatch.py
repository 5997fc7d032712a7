"""Minibatch SVI (issue 20): index streams, minibatch ELBO, memory-mapped data."""

from __future__ import annotations

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.poutine.subsample_messenger import _Subsample

import vimodels
from vimodels.data import RowArray, load_arrays
from vimodels.errors import DataError, OptionError
from vimodels.svi.minibatch_eval import group_sizes, grouped_estimate, minibatch_elbo
from vimodels.svi.particles import NUM_CHECK
from vimodels.svi.subsample import IndexStream, IndexSupplier


def normal_mean(x, batch=None):
    """x_i ~ N(mu, 1), mu ~ N(0, 1); the rows subsampled by the plate."""
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("n", x.shape[0], subsample_size=batch) as idx:
        pyro.sample("x", dist.Normal(mu, 1.0), obs=x[idx])


def regression(x, y, batch=None):
    """Linear regression with unit noise; rows subsampled by the plate."""
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[1]]).to_event(1))
    with pyro.plate("n", x.shape[0], subsample_size=batch) as idx:
        pyro.sample("y", dist.Normal((x[idx] * w).sum(-1), 1.0), obs=y[idx])


def exact_normal_mean_elbo(x: np.ndarray, m: float, s: float) -> float:
    """Full-data ELBO of ``normal_mean`` under q(mu) = N(m, s^2), in closed form."""
    c = -0.5 * math.log(2 * math.pi)
    prior = c - 0.5 * (m**2 + s**2)
    lik = len(x) * c - 0.5 * float(np.sum((x - m) ** 2) + len(x) * s**2)
    entropy = 0.5 * math.log(2 * math.pi * math.e * s**2)
    return prior + lik + entropy


@pytest.mark.parametrize(("size", "batch"), [(10, 3), (1000, 7), (1009, 100), (5, 5)])
def test_index_stream_visits_every_row_once_per_epoch(size, batch):
    stream = IndexStream(size, batch, seed=3)
    period = size * batch // math.gcd(size, batch)  # rows in a whole number of epochs
    batches = [stream.next() for _ in range(2 * period // batch)]
    assert all(len(np.unique(b)) == batch for b in batches)  # no row twice in a batch
    counts = np.bincount(np.concatenate(batches), minlength=size)
    assert (counts == 2 * period // size).all()
    assert stream.epochs == pytest.approx(2 * period / size)


def test_index_stream_is_reproducible_and_sorted():
    a, b, c = (IndexStream(100_000, 64, seed) for seed in (0, 0, 1))
    first = [a.next() for _ in range(3)]
    assert all((x == b.next()).all() for x in first)
    assert not (first[0] == c.next()).all()
    assert all((np.diff(x) > 0).all() for x in first)
    ind = IndexStream(100_000, 64, 0, "independent")
    draws = [ind.next() for _ in range(5)]
    assert all(len(np.unique(d)) == 64 and d.max() < 100_000 for d in draws)


def test_supplier_draws_plate_indices_and_restores_pyro():
    original = _Subsample.sample
    with IndexSupplier(7) as supplier:
        with pyro.plate("n", 50_000, subsample_size=100) as idx:
            pass
        assert _Subsample.sample is not original
    assert _Subsample.sample is original
    assert torch.equal(idx, torch.from_numpy(IndexStream(50_000, 100, 7).next()))
    assert supplier.record()["plates"] == [
        {"size": 50_000, "batch": 100, "batches": 1, "epochs": 0.002}
    ]
    with pytest.raises(OptionError, match="subsample must be one of"):
        IndexSupplier(0, "bogus")


def test_grouped_estimate_matches_cluster_formula():
    log_w = np.array([1.0, 3.0, 2.0, 2.0, 10.0])
    sizes = group_sizes(5, 3)
    assert sizes.tolist() == [2, 1, 2]
    est, se = grouped_estimate(log_w, sizes)
    assert est == pytest.approx(log_w.mean())
    means = np.array([2.0, 2.0, 6.0])
    share = sizes / 5
    assert se == pytest.approx(math.sqrt(3 / 2 * np.sum(share**2 * (means - est) ** 2)))


def test_minibatch_elbo_is_unbiased_on_a_conjugate_model():
    rng = np.random.default_rng(0)
    x = rng.normal(0.7, 1.0, size=20_000)
    m, s = 0.69, 0.02

    def guide(x, batch=None):
        pyro.sample("mu", dist.Normal(m, s))

    exact = exact_normal_mean_elbo(x, m, s)
    kwargs = {"x": torch.as_tensor(x, dtype=torch.float32), "batch": 200}
    pyro.set_rng_seed(0)
    est, se = minibatch_elbo(normal_mean, guide, kwargs, 2000, 1, seed=0)
    assert abs(est - exact) <= 5 * se
    # the standard error holds the subsampling noise: far above the noise from z alone
    assert se > 1.0


def test_fit_elbo_matches_the_exact_full_data_elbo():
    rng = np.random.default_rng(1)
    x = rng.normal(-0.3, 1.0, size=10_000)
    r = vimodels.fit(normal_mean, data={"x": x, "batch": 500}, num_steps=300, progress=False)
    m = float(r.params["AutoNormal.locs.mu"])
    s = float(r.params["AutoNormal.scales.mu"])
    exact = exact_normal_mean_elbo(x.astype(np.float32).astype(float), m, s)
    assert abs(r.elbo - exact) <= 5 * r.elbo_se
    sub = r.settings["subsample"]
    assert sub["scheme"] == "epoch" and sub["eval_batches"] == 100
    assert sub["plates"][0]["size"] == 10_000 and sub["plates"][0]["batch"] == 500
    assert r.settings["jit"] is False and r.settings["step_compiler"] == "python"
    assert r.settings["eval_vectorized"] is True, r.settings["eval_vectorized_note"]
    lw = r.log_weights(200)
    assert lw.shape == (200,) and np.isfinite(lw).all()


def test_subsampled_fit_is_reproducible_from_its_seed():
    x = np.random.default_rng(2).normal(size=5000)
    a, b = (
        vimodels.fit(normal_mean, data={"x": x, "batch": 100}, num_steps=30, progress=False)
        for _ in range(2)
    )
    np.testing.assert_array_equal(a.losses, b.losses)
    assert a.elbo == b.elbo


@pytest.mark.parametrize("jit", [True, False])
def test_pyro_scheme_counts_the_batches_of_every_step(jit):
    # Pyro's own draws ran inside the JIT-traced step, unseen: 7 batches for 1000 steps
    x = np.random.default_rng(2).normal(size=500)
    steps = 120
    r = vimodels.fit(
        normal_mean, data={"x": x, "batch": 50}, num_steps=steps, subsample="pyro", jit=jit,
        progress=False, num_eval=20,
    )  # fmt: skip
    assert r.settings["jit"] is jit
    (plate,) = r.settings["subsample"]["plates"]
    # one batch per step (the guide draws it, the model replays it), plus a few checks
    assert steps <= plate["batches"] <= steps + 5
    assert plate["epochs"] == pytest.approx(plate["batches"] * 50 / 500)


def test_unknown_subsample_scheme_is_an_option_error():
    with pytest.raises(OptionError, match="subsample must be one of"):
        vimodels.fit(normal_mean, data={"x": np.zeros(10), "batch": 2}, subsample="rows")


@pytest.mark.slow
def test_fits_with_and_without_subsampling_agree():
    rng = np.random.default_rng(4)
    n, d = 10_000, 3
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = (x @ np.array([0.5, -1.0, 0.25]) + rng.normal(size=n)).astype(np.float32)
    kw = dict(num_steps=1500, progress=False, seed=0)
    full = vimodels.fit(regression, data={"x": x, "y": y}, **kw)
    mini = vimodels.fit(regression, data={"x": x, "y": y, "batch": 500}, **kw)
    assert full.settings["subsample"] is None and mini.settings["subsample"] is not None
    se = math.hypot(full.elbo_se, mini.elbo_se)
    assert abs(full.elbo - mini.elbo) <= 5 * se
    post_sd = full.params["AutoNormal.scales.w"]
    diff = np.abs(full.params["AutoNormal.locs.w"] - mini.params["AutoNormal.locs.w"])
    assert (diff <= 0.5 * post_sd).all(), diff / post_sd


def test_fit_on_memory_mapped_data_reads_only_its_batches(tmp_path):
    n, batch, steps = 100_000, 100, 40
    rng = np.random.default_rng(5)
    np.save(tmp_path / "x.npy", rng.normal(0.2, 1.0, size=n).astype(np.float32))
    data = load_arrays(tmp_path / "x.npy")
    assert isinstance(data["x"], np.memmap)
    r = vimodels.fit(
        normal_mean, data={**data, "batch": batch}, num_steps=steps, progress=False, num_eval=100
    )
    x = r.data["x"]
    assert isinstance(x, RowArray)
    drawn = r.settings["subsample"]["plates"][0]["batches"]
    # every row read belongs to a batch: the fit's, and the final ELBO's (whose first
    # group is also evaluated once more per checked draw, on the same batch)
    reads = drawn + r.settings["subsample"]["eval_batches"] + 1 + NUM_CHECK
    assert x.rows_read <= reads * batch
    assert x.rows_read < n / 5
    assert np.isfinite(r.elbo)


def test_row_array_reads_rows_and_checks_them():
    arr = np.arange(12, dtype=np.float64).reshape(6, 2)
    arr[4, 1] = np.nan
    rows = RowArray("x", arr)
    assert rows.shape == (6, 2) and len(rows) == 6 and rows.size(0) == 6 and rows.dim() == 2
    out = rows[torch.tensor([0, 2])]
    assert out.dtype == torch.float32 and out.tolist() == [[0.0, 1.0], [4.0, 5.0]]
    assert rows.index_select(0, torch.tensor([1])).tolist() == [[2.0, 3.0]]
    assert rows.rows_read == 3
    with pytest.raises(DataError, match=r"data\['x'\] has NaN"):
        rows[np.array([3, 4])]
    assert RowArray("k", np.arange(3))[np.array([2])].dtype == torch.int64


def test_load_arrays_memory_maps_npz_members(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.arange(12.0).reshape(4, 3), y=np.arange(4))
    d = load_arrays(tmp_path / "d.npz")
    assert isinstance(d["x"], np.memmap) and d["x"][2].tolist() == [6.0, 7.0, 8.0]
    assert d["y"].tolist() == [0, 1, 2, 3]
    np.savez_compressed(tmp_path / "c.npz", x=np.ones(3))
    assert load_arrays(tmp_path / "c.npz")["x"].tolist() == [1.0, 1.0, 1.0]
    np.save(tmp_path / "v.npy", np.zeros(3))
    assert list(load_arrays(tmp_path / "v.npy", "obs")) == ["obs"]
    with pytest.raises(DataError, match="does not exist"):
        load_arrays(tmp_path / "missing.npy")
    (tmp_path / "t.csv").write_text("1,2")
    with pytest.raises(DataError, match="not .npy or .npz"):
        load_arrays(tmp_path / "t.csv")


def test_cli_fit_refuses_a_missing_data_file(tmp_path, capsys):
    from vimodels.cli.main import main

    code = main(["fit", "eight_schools_noncentered", "--mmap", str(tmp_path / "no.npz")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "does not exist" in err[0]


def test_only_row_arrays_are_read_lazily(tmp_path):
    from vimodels.data import prepare_data

    def model(x, s, m, batch=None):
        pass

    np.save(tmp_path / "m.npy", np.zeros((4, 2)))
    out = prepare_data(
        model, {"x": np.zeros(3), "s": np.float64(2.0), "m": np.load(tmp_path / "m.npy", "r")}
    )
    assert isinstance(out["x"], torch.Tensor)
    assert isinstance(out["s"], np.float64)  # a scalar stays as given
    assert isinstance(out["m"], RowArray) and out["m"].shape == (4, 2)


def test_row_array_used_whole_names_the_fix(tmp_path):
    def whole(x):
        pyro.sample("obs", dist.Normal(0.0, 1.0), obs=x.sum())

    np.save(tmp_path / "x.npy", np.zeros(5))
    with pytest.raises(DataError, match=r"read by rows .*x\[idx\]"):
        vimodels.fit(whole, data=load_arrays(tmp_path / "x.npy"), num_steps=2)


def test_a_callback_that_samples_does_not_change_a_subsampled_fit():
    x = np.random.default_rng(6).normal(size=5000)
    kw = dict(data={"x": x, "batch": 100}, num_steps=20, progress=False, num_eval=10)
    plain = vimodels.fit(normal_mean, **kw)
    seen = []
    sampled = vimodels.fit(normal_mean, callback=lambda p: seen.append(p.sample(5)), **kw)
    np.testing.assert_array_equal(plain.losses, sampled.losses)
    assert len(seen) == 20
