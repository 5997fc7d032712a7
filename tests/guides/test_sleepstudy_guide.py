"""The sleep-study structured guide's subject conditional, and its compiled SVI step."""

from __future__ import annotations

import math

import numpy as np
import torch

import vimodels
from guides.sleepstudy import covariance_tril


def test_covariance_tril_is_the_factor_of_the_inverse_precision():
    a = torch.tensor([[[2.0, 0.3], [0.3, 0.5]], [[1.0, -0.9], [-0.9, 4.0]]], dtype=torch.float64)
    tril = covariance_tril(a)
    torch.testing.assert_close(tril @ tril.transpose(-1, -2), torch.linalg.inv(a))
    assert torch.all(tril.triu(1) == 0)
    # torch's own factor for precision_matrix= (the same algorithm, with its error check)
    ref = torch.distributions.MultivariateNormal(
        torch.zeros(2, 2, dtype=a.dtype), precision_matrix=a
    )
    torch.testing.assert_close(tril, ref.scale_tril, rtol=1e-12, atol=1e-12)


def test_a_precision_that_is_not_positive_definite_gives_nan_not_a_factor():
    bad = torch.tensor([[[1.0, 2.0], [2.0, 1.0]], [[2.0, 0.0], [0.0, 3.0]]], dtype=torch.float64)
    tril = covariance_tril(bad)
    assert torch.isnan(tril[0]).all()
    torch.testing.assert_close(
        tril[1], torch.diag(torch.tensor([1 / math.sqrt(2), 1 / math.sqrt(3)], dtype=torch.float64))
    )


def test_the_structured_guide_fit_runs_the_compiled_step():
    # torch.linalg.solve and MultivariateNormal(precision_matrix=) read an error status back
    # into Python, which kept the step out of the compiled graph ("jit": 2-3x slower a step)
    r = vimodels.fit(
        "sleepstudy_random_slopes",
        guide="structured",
        num_steps=1000,
        seed=0,
        num_eval=8,
        progress=False,
    )
    assert r.settings["step_compiler"] == "fx", r.settings["step_compiler_note"]
    assert np.isfinite(r.losses).all()
