"""The Laplace approximation: exact on a Gaussian posterior, a clear error where it cannot be."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mode_models import flat_direction_model

from vimodels.catalog.registry import get_model
from vimodels.errors import CurvatureError, OptionError
from vimodels.mode.laplace import check_positive_definite, laplace
from vimodels.mode.potential import make_potential


def test_laplace_recovers_the_conjugate_posterior():
    """The posterior is Gaussian: mean and covariance to 1e-3 relative (float64: far better)."""
    entry = get_model("conjugate_linear_regression")
    exact = entry.exact(entry.data())
    lap = laplace(entry)
    mean, cov = lap.loc.numpy(), lap.cov.numpy()
    scale = np.abs(exact.mean["beta"]).max()
    assert np.abs(mean - exact.mean["beta"]).max() / scale < 1e-3
    assert np.abs(cov - exact.cov).max() / np.abs(exact.cov).max() < 1e-3
    # and the precision is the exact one, X^T X + I / prior^2
    data = entry.data()
    X = data["X"].double().numpy()
    precision = X.T @ X / data["noise_scale"] ** 2 + np.eye(3) / data["prior_scale"] ** 2
    np.testing.assert_allclose(lap.hessian.numpy(), precision, rtol=1e-6)


def test_a_flat_direction_is_named():
    y = torch.tensor([0.3, -1.2, 2.0, 0.8])
    with pytest.raises(CurvatureError, match=r"not positive definite.*mostly c \(100% of"):
        laplace(flat_direction_model, {"y": y}, num_inits=1)


def test_a_saddle_names_the_site_element():
    """A Hessian with one negative eigenvalue along theta_tilde[3] (a synthetic saddle)."""
    entry = get_model("eight_schools_noncentered")
    pot = make_potential(entry.model, entry.data())
    h = torch.eye(pot.dim, dtype=torch.float64) * 4.0
    v = torch.zeros(pot.dim, dtype=torch.float64)
    v[5], v[2] = 0.9, 0.1  # theta_tilde[3] (index 2 + 3) dominates
    v /= v.norm()
    h = h - 6.0 * torch.outer(v, v)  # eigenvalue 4 - 6 = -2 along v
    with pytest.raises(CurvatureError) as err:
        check_positive_definite(h, pot)
    msg = str(err.value)
    assert "theta_tilde[3]" in msg and "smallest -2" in msg and "1 of 10 eigenvalue" in msg
    # positive definite: the Cholesky factor comes back
    chol = check_positive_definite(torch.eye(pot.dim, dtype=torch.float64) * 4.0, pot)
    assert torch.allclose(chol, 2.0 * torch.eye(pot.dim, dtype=torch.float64))


def test_the_size_limit_is_an_option_error():
    with pytest.raises(OptionError, match="max_dim=2.*guide='pathfinder'"):
        laplace("conjugate_linear_regression", max_dim=2)
