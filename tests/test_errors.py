"""Bad input gets a specific exception naming the problem and the fix."""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

import vimodels
from vimodels.errors import (
    DataError,
    IncompatibleError,
    OptionError,
    UnknownNameError,
    VimodelsError,
)

FAST = dict(num_steps=5, num_eval=10, progress=False)


def normal_model(x):
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("obs", dist.Normal(mu, 1.0), obs=x)


def discrete_model(x):
    p = pyro.sample("p", dist.Beta(1.0, 1.0))
    z = pyro.sample("z", dist.Bernoulli(p))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("obs", dist.Normal(3.0 * z, 1.0), obs=x)


def test_errors_are_value_errors():
    assert issubclass(VimodelsError, ValueError)


@pytest.mark.parametrize(
    ("kwargs", "kind", "listed"),
    [
        (dict(model="eight_school"), "model", "eight_schools_noncentered"),
        (dict(model="eight_schools_noncentered", guide="auto_normall"), "guide", "auto_normal"),
        (dict(model="eight_schools_noncentered", elbo="elbo"), "ELBO", "meanfield"),
    ],
)
def test_unknown_names_list_valid_ones(kwargs, kind, listed):
    model = kwargs.pop("model")
    with pytest.raises(UnknownNameError) as info:
        vimodels.fit(model, **kwargs, **FAST)
    assert f"unknown {kind}" in str(info.value) and listed in str(info.value)


def test_handwritten_guide_of_another_model_is_refused():
    with pytest.raises(IncompatibleError, match="hand-written for eight_schools"):
        vimodels.fit("conjugate_linear_regression", guide="structured", **FAST)


def test_handwritten_guide_refused_for_user_model():
    with pytest.raises(IncompatibleError, match="not for a user model") as info:
        vimodels.fit(normal_model, data={"x": np.zeros(3)}, guide="mean_field", **FAST)
    # the list offered instead holds only guides that work here (it listed mean_field itself)
    offered = str(info.value).split("guides for this model: ")[1].split(", ")
    assert "mean_field" not in offered and "structured" not in offered
    assert "auto_normal" in offered and "auto_multivariate_normal" in offered


def test_user_guide_with_wrong_sites_is_refused():
    def guide(x):
        pyro.sample("sigma", dist.LogNormal(0.0, 1.0))

    with pytest.raises(IncompatibleError, match="model sites not in the guide: mu"):
        vimodels.fit(normal_model, data={"x": np.zeros(3)}, guide=guide, **FAST)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"x": np.array([1.0, np.nan, 2.0])}, r"NaN or infinite.*\(1,\)"),
        ({"x": np.array([1.0, np.inf])}, "NaN or infinite"),
        ({"x": np.array(["a", "b"])}, "dtype"),
        ({}, "missing key"),
        ({"x": np.zeros(3), "y": np.zeros(3)}, "takes no argument"),
        ({"x": np.zeros((3, 2))}, "does not fit model"),
        ([1.0, 2.0], "must be a dict"),
    ],
)
def test_bad_data(data, match):
    with pytest.raises(DataError, match=match):
        vimodels.fit(normal_model, data=data, **FAST)


def test_mis_shaped_catalog_data():
    with pytest.raises(DataError, match="does not fit model 'eight_schools_centered'"):
        vimodels.fit("eight_schools_centered", data={"y": torch.zeros(7)}, **FAST)


def test_nan_in_catalog_data_override():
    y = torch.tensor([28.0, 8, -3, 7, -1, 1, float("nan"), 12])
    with pytest.raises(DataError, match=r"data\['y'\]"):
        vimodels.fit("eight_schools_noncentered", data={"y": y}, **FAST)


@pytest.mark.parametrize("elbo", ["trace", "meanfield", "iwae", "renyi", "tracegraph"])
def test_discrete_model_refuses_non_enum_elbo(elbo):
    with pytest.raises(IncompatibleError, match="only the 'enum' ELBO"):
        vimodels.fit(discrete_model, data={"x": np.zeros(4)}, elbo=elbo, **FAST)


def test_discrete_model_fits_with_enum():
    x = np.r_[np.zeros(5), 3 * np.ones(5)]
    result = vimodels.fit(discrete_model, data={"x": x}, elbo="enum", **FAST)
    assert np.all(np.isfinite(result.losses)) and result.settings["discrete_sites"] == ["z"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(num_steps=-3), "num_steps must be >= 1"),
        (dict(num_steps="10"), "num_steps must be int"),
        (dict(num_steps=2.5), "num_steps must be int"),
        (dict(lr=0.0), "lr must be > 0"),
        (dict(lr=-1.0), "lr must be > 0"),
        (dict(num_particles=0), "num_particles must be >= 1"),
        (dict(seed=-1), "seed must be >= 0"),
        (dict(lr_decay=2.0), "lr_decay must be <= 1"),
        (dict(guide_options={"init_scale": -1.0}), "init_scale must be > 0"),
        (dict(guide_options={"rank": 2}), "does not take option"),
        (
            dict(guide="auto_lowrank_multivariate_normal", guide_options={"rank": 0}),
            "rank must be >= 1",
        ),
        (dict(elbo="renyi", elbo_options={"alpha": 1.0}), "alpha must differ from 1"),
        (dict(elbo="meanfield", elbo_options={"alpha": 0.5}), "takes no options"),
        (dict(elbo="trace", elbo_options={"alpha": 0.5}), "takes only 'estimator'"),
        (dict(guide_options={"init_loc_fn": "nonsense"}), "init_loc_fn must be"),
    ],
)
def test_bad_options(kwargs, match):
    args = {**FAST, **kwargs}
    with pytest.raises(OptionError, match=match):
        vimodels.fit("eight_schools_noncentered", **args)


def test_bad_model_argument():
    with pytest.raises(OptionError, match="model must be"):
        vimodels.fit(42, **FAST)


def test_sample_count_checked():
    result = vimodels.fit("eight_schools_noncentered", **FAST)
    with pytest.raises(OptionError, match="num_samples must be >= 1"):
        result.sample(0)
