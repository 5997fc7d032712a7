"""A gallery of valid Pyro models that are not in the catalog: each fits, and NUTS samples it.

ImproperUniform sites with ``pyro.factor`` priors, ``pyro.param`` inside the model,
``obs_mask``, subsampled plates (SVI only: NUTS refuses them with a clear message), a
custom distribution with a support, discrete sites (summed out), positional-only
arguments and deterministic sites.
"""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import constraints

import vimodels
from diagnostics import _arviz
from diagnostics.nuts.reference import run_nuts
from vimodels.errors import DataError, IncompatibleError, ModelError

X = torch.linspace(-1.0, 1.0, 12)
Y = 0.5 + 1.5 * X + 0.3 * torch.sin(7.0 * X)


def improper(y):
    mu = pyro.sample("mu", dist.ImproperUniform(constraints.ordered_vector, (), (2,)))
    pyro.factor("prior", dist.Normal(0.0, 2.0).log_prob(mu).sum())
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Normal(mu.mean(-1, keepdim=True), 1.0), obs=y)


def improper_positive(y):
    s = pyro.sample("s", dist.ImproperUniform(constraints.positive, (), ()))
    pyro.factor("prior", dist.LogNormal(0.0, 1.0).log_prob(s))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Normal(0.0, s), obs=y)


def proper_positive(y):
    s = pyro.sample("s", dist.LogNormal(0.0, 1.0))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Normal(0.0, s), obs=y)


def param_in_model(x, y):
    offset = pyro.param("offset", torch.tensor(0.5))
    b = pyro.sample("b", dist.Normal(0.0, 2.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(offset + b * x, 0.5), obs=y)


def masked(y, mask):
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y, obs_mask=mask)


def subsampled(x, y):
    b = pyro.sample("b", dist.Normal(0.0, 2.0))
    with pyro.plate("data", x.shape[0], subsample_size=6) as idx:
        pyro.sample("y", dist.Normal(b * x[idx], 0.5), obs=y[idx])


class HalfLaplace(dist.TorchDistribution):
    """A user's distribution: exponential on the positive reals, with its support."""

    support = constraints.positive
    arg_constraints = {"scale": constraints.positive}
    has_rsample = True

    def __init__(self, scale, validate_args=None):
        self.scale = torch.as_tensor(scale, dtype=torch.get_default_dtype())
        super().__init__(self.scale.shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        return HalfLaplace(self.scale.expand(batch_shape))

    def rsample(self, sample_shape=()):
        u = torch.rand(self._extended_shape(torch.Size(sample_shape)))
        return -self.scale * torch.log1p(-u)

    def log_prob(self, value):
        return -torch.log(self.scale) - value / self.scale


def custom(y):
    s = pyro.sample("s", HalfLaplace(2.0))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Normal(0.0, s), obs=y)


def mixture(y):
    w = pyro.sample("w", dist.Beta(2.0, 2.0))
    locs = pyro.sample("locs", dist.Normal(torch.tensor([-2.0, 2.0]), 1.0).to_event(1))
    with pyro.plate("data", y.shape[0]):
        z = pyro.sample("z", dist.Bernoulli(w)).to(locs.dtype)
        pyro.sample("y", dist.Normal(locs[..., 0] * (1 - z) + locs[..., 1] * z, 1.0), obs=y)


def positional(x, y, /):
    b = pyro.sample("b", dist.Normal(0.0, 2.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(b * x, 0.5), obs=y)


def deterministic(x, y):
    a = pyro.sample("a", dist.Normal(0.0, 2.0))
    b = pyro.sample("b", dist.Normal(0.0, 2.0))
    pyro.deterministic("twice_b", 2 * b)
    with pyro.plate("data", x.shape[0]):
        mean = pyro.deterministic("mean", a + b * x)
        pyro.sample("y", dist.Normal(mean, 0.5), obs=y)


# name: (model, data, ELBO, latent sites NUTS must return)
GALLERY = {
    "improper": (improper, {"y": Y}, "trace", ("mu",)),
    "improper_positive": (improper_positive, {"y": Y}, "trace", ("s",)),
    "param_in_model": (param_in_model, {"x": X, "y": Y}, "trace", ("b",)),
    "masked": (masked, {"y": Y, "mask": torch.arange(12) % 3 != 0}, "trace", ("mu",)),
    "subsampled": (subsampled, {"x": X, "y": Y}, "trace", None),
    "custom": (custom, {"y": Y}, "trace", ("s",)),
    "mixture": (mixture, {"y": torch.cat([Y - 2.0, Y + 2.0])}, "enum", ("w", "locs", "z")),
    "positional": (positional, {"x": X, "y": Y}, "trace", ("b",)),
    "deterministic": (deterministic, {"x": X, "y": Y}, "trace", ("a", "b", "twice_b", "mean")),
}
SMALL_NUTS = {"num_chains": 2, "num_warmup": 100, "num_samples": 100}


@pytest.mark.parametrize("name", list(GALLERY))
def test_gallery_model_fits(name):
    model, data, elbo, _ = GALLERY[name]
    r = vimodels.fit(model, data, elbo=elbo, num_steps=100, seed=0, progress=False)
    assert r.status in ("converged", "max_steps"), r.message
    assert np.isfinite(r.elbo)
    draws = r.sample(20)
    assert draws and all(np.all(np.isfinite(v)) for v in draws.values())
    if name == "improper":
        assert np.all(np.diff(draws["mu"], axis=-1) > 0)  # the ordered support is kept


@pytest.mark.slow
@pytest.mark.parametrize("name", list(GALLERY))
def test_gallery_model_nuts(name, tmp_path):
    model, data, _, sites = GALLERY[name]
    if sites is None:
        with pytest.raises(IncompatibleError, match="subsamples plate 'data'"):
            run_nuts(model, data, settings=SMALL_NUTS, cache_dir=tmp_path)
        return
    settings = dict(SMALL_NUTS)
    if name == "masked":
        # obs_mask makes y_unobserved a full-size latent site whose observed coordinates
        # carry no density (flat): NUTS runs to its maximum tree depth along them
        settings["max_tree_depth"] = 4
    ref = run_nuts(model, data, settings=settings, seed=1, cache_dir=tmp_path)
    for site in sites:
        assert site in ref.draws and np.all(np.isfinite(ref.draws[site])), site
        assert ref.draws[site].shape[:2] == (2, 100)
    if name == "improper":
        assert np.all(np.diff(ref.draws["mu"], axis=-1) > 0)


@pytest.mark.slow
def test_improper_prior_by_factor_is_the_proper_prior(tmp_path):
    """ImproperUniform + pyro.factor(LogNormal) is the LogNormal prior: same posterior."""
    settings = {"num_chains": 2, "num_warmup": 200, "num_samples": 400}
    a = run_nuts(improper_positive, {"y": Y}, settings=settings, seed=2, cache_dir=tmp_path)
    b = run_nuts(proper_positive, {"y": Y}, settings=settings, seed=3, cache_dir=tmp_path)
    sa, sb = a.draws["s"], b.draws["s"]
    mcse = np.hypot(_arviz.mcse_mean(sa), _arviz.mcse_mean(sb))
    assert abs(sa.mean() - sb.mean()) <= 5 * mcse


def test_errors_blame_the_model_or_the_data():
    def buggy(x):
        m = pyro.sample("m", dist.Normal(0.0, 1.0))
        return undefined_name + m  # noqa: F821

    def counts(x):
        m = pyro.sample("m", dist.Normal(0.0, 1.0))
        with pyro.plate("d", x.shape[0]):
            pyro.sample("x", dist.Poisson(torch.exp(m)), obs=x)

    with pytest.raises(
        ModelError, match=r"model 'buggy' raised NameError at test_user_models.py:\d+"
    ):
        vimodels.fit(buggy, {"x": np.zeros(3)}, num_steps=2, progress=False)
    with pytest.raises(DataError, match="data does not fit model 'counts'.*site 'x'") as info:
        vimodels.fit(counts, {"x": np.array([0.5, 1.2])}, num_steps=2, progress=False)
    assert not isinstance(info.value, ModelError)


def test_degenerate_guide_draws_get_zero_weight():
    """A guide drawing where the model has no density (a scale of 0) gives weight 0, no error."""
    from vimodels.svi.draws import model_info, replay_model, sample_guide

    def model():
        s = pyro.sample("s", dist.HalfNormal(1.0))
        pyro.sample("x", dist.Normal(0.0, s), obs=torch.tensor(0.3))

    def guide():
        pyro.sample("s", dist.Delta(torch.tensor(0.0)))

    info = model_info(model, (), {}, 0)
    draws, lw = sample_guide(model, guide, (), {}, info, 5)
    assert np.all(draws["s"] == 0) and np.all(lw == -np.inf)
    replay = replay_model(model, (), {}, info, {"s": np.zeros(3)})
    assert replay.log_likelihood["x"].shape == (3,)
