"""Floating data that float32 would round stays float64 (vimodels/data.py).

Data near 1e6 with a spread of 0.05 (float32's spacing at 1e6 is 0.0625) was cast
to float32 without a word: the posterior of a normal mean model moved by 0.53
posterior sd. Ordinary data (values of order one) still becomes float32.
"""

from __future__ import annotations

import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

import vimodels
from vimodels.data import prepare_data, trace_check
from vimodels.errors import ModelError

SIGMA = 0.05
# ten draws of 1e6 + N(0, 0.05): float32 rounds each by up to 0.031 (0.6 of the spread)
Y_FAR = 1e6 + SIGMA * np.random.default_rng(3).standard_normal(10)


def offset(y):
    """A normal mean model that computes in its data's dtype (float64 data: float64 model)."""
    delta = pyro.sample("delta", dist.Normal(torch.tensor(0.0, dtype=y.dtype), 1.0))
    with pyro.plate("n", y.shape[0]):
        pyro.sample("y", dist.Normal(1.0e6 + delta, SIGMA), obs=y)


def offset_float32(y):
    """The same model with float32 latents: its ``1e6 + delta`` rounds to float32's grid."""
    delta = pyro.sample("delta", dist.Normal(0.0, 1.0))
    with pyro.plate("n", y.shape[0]):
        pyro.sample("y", dist.Normal(1.0e6 + delta, SIGMA), obs=y)


def regression(x, y):
    w = pyro.sample("w", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    with pyro.plate("n", y.shape[0]):
        pyro.sample("y", dist.Normal(x @ w, 1.0), obs=y)


def exact_posterior(y: np.ndarray) -> tuple[float, float]:
    """Posterior mean and sd of ``delta`` (prior N(0, 1), likelihood N(1e6 + delta, SIGMA))."""
    precision = 1.0 + len(y) / SIGMA**2
    return float((y - 1e6).sum() / SIGMA**2 / precision), precision**-0.5


def test_far_from_zero_data_stays_float64():
    for value in (Y_FAR, list(Y_FAR)):
        y = prepare_data(offset, {"y": value})["y"]
        assert y.dtype == torch.float64
        assert np.array_equal(y.numpy(), Y_FAR)  # not rounded
    # one column far from zero makes the whole array float64
    x = np.stack([np.ones(10), Y_FAR], axis=1)
    out = prepare_data(regression, {"x": x, "y": np.zeros(10)})
    assert out["x"].dtype == torch.float64
    assert out["y"].dtype == torch.float32


def test_far_from_zero_pandas_stays_float64():
    pd = pytest.importorskip("pandas")
    y = prepare_data(offset, {"y": pd.Series(Y_FAR)})["y"]
    assert y.dtype == torch.float64
    assert np.array_equal(y.numpy(), Y_FAR)


def test_ordinary_data_still_float32():
    rng = np.random.default_rng(0)
    data = {
        "x": rng.standard_normal((50, 2)),
        "y": 3.0 + rng.standard_normal(50),  # order one: float32 rounds by ~1e-7 of sd
    }
    out = prepare_data(regression, data)
    assert out["x"].dtype == torch.float32 and out["y"].dtype == torch.float32
    heights = 170.0 + 10.0 * rng.standard_normal(1000)  # cm: rounded by < 1e-6 of sd
    assert prepare_data(offset, {"y": heights})["y"].dtype == torch.float32
    # tensors are the user's choice: kept as given
    y32 = torch.as_tensor(Y_FAR, dtype=torch.float32)
    assert prepare_data(offset, {"y": y32})["y"] is y32


def test_float32_rounding_measure():
    from vimodels.data import FLOAT32_TOLERANCE, float32_rounding

    assert float32_rounding(Y_FAR) > 0.1
    assert float32_rounding(Y_FAR.astype(np.float32)) == 0.0
    assert float32_rounding(np.linspace(-1.0, 1.0, 7)) < FLOAT32_TOLERANCE
    assert float32_rounding(np.array([1e6 + 0.01])) < FLOAT32_TOLERANCE  # no spread: |x|
    assert float32_rounding(np.full(5, 1e6 + 0.01)) < FLOAT32_TOLERANCE
    assert float32_rounding(np.array([1.0, 1e39])) == np.inf  # beyond float32's range
    big = prepare_data(offset, {"y": np.array([1.0, 1e39])})["y"]
    assert big.dtype == torch.float64 and bool(torch.isfinite(big).all())


def test_laplace_fit_gives_the_float64_posterior():
    """The reviewer's case: float32 data moved the posterior mean by 0.53 sd."""
    mean, sd = exact_posterior(Y_FAR)
    mean32, _ = exact_posterior(Y_FAR.astype(np.float32).astype(np.float64))
    assert abs(mean32 - mean) > 0.3 * sd  # what the float32 data did
    n = 4000
    r = vimodels.fit(offset, data={"y": Y_FAR}, guide="auto_laplace", seed=0)
    draws = r.sample(n, seed=1)["delta"].astype(np.float64)
    # Laplace is exact for this Gaussian posterior: draws' mean and sd within 5 MCSE
    assert abs(draws.mean() - mean) < 5 * sd / np.sqrt(n)
    assert abs(draws.std(ddof=1) / sd - 1.0) < 5 / np.sqrt(2 * n)


def test_float32_latents_with_float64_data_warn():
    data = prepare_data(offset_float32, {"y": Y_FAR})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trace_check(offset_float32, data, "offset_float32")
    from vimodels.errors import PrecisionWarning

    messages = [str(w.message) for w in caught if issubclass(w.category, PrecisionWarning)]
    assert len(messages) == 1
    assert "data['y'] is float64" in messages[0] and "delta" in messages[0]
    # a model that follows the data's dtype: no warning
    data = prepare_data(offset, {"y": Y_FAR})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trace_check(offset, data, "offset")


def test_mixed_dtype_matmul_names_the_float64_key():
    x = np.stack([np.ones(10), Y_FAR], axis=1)
    data = prepare_data(regression, {"x": x, "y": np.zeros(10)})
    with pytest.raises(ModelError, match=r"data\['x'\] is float64 \(float32 would round it"):
        trace_check(regression, data, "regression")


def test_memory_mapped_far_from_zero_rows_are_float64(tmp_path):
    from vimodels.data import RowArray, load_arrays

    rng = np.random.default_rng(1)
    np.save(tmp_path / "far.npy", 1e6 + SIGMA * rng.standard_normal(3000))
    np.save(tmp_path / "near.npy", rng.standard_normal(3000))
    far = RowArray("far", load_arrays(tmp_path / "far.npy")["far"])
    near = RowArray("near", load_arrays(tmp_path / "near.npy")["near"])
    idx = torch.tensor([0, 5, 2999])
    rows = far[idx]
    assert rows.dtype == torch.float64
    assert np.array_equal(rows.numpy(), np.load(tmp_path / "far.npy")[[0, 5, 2999]])
    assert near[idx].dtype == torch.float32
    assert far.rows_read == 3  # the rows read to measure the rounding are not counted


def test_float32_rounding_in_chunks_matches_the_whole(monkeypatch):
    """Chunked over rows (a few chunks of extra memory), the measure is the direct formula's."""
    import vimodels.data as data_mod

    rng = np.random.default_rng(2)
    x = np.stack([rng.standard_normal(999), 1e5 + rng.standard_normal(999)], axis=1)
    x[:, 0] *= 1e-3
    direct = np.max(np.abs(x.astype(np.float32) - x).max(axis=0) / x.std(axis=0))
    whole = data_mod.float32_rounding(x)
    monkeypatch.setattr(data_mod, "_CHUNK", 10)
    chunked = data_mod.float32_rounding(x)
    assert whole == pytest.approx(direct, rel=1e-9)
    assert chunked == pytest.approx(direct, rel=1e-9)
