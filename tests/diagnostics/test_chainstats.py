"""diagnostics.chainstats matches ArviZ's R-hat, bulk/tail ESS and MCSE to 1e-10 (the oracle)."""

from __future__ import annotations

import warnings

import arviz as az
import numpy as np
import pytest

from diagnostics import chainstats


def _cases() -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(20261202)
    cases = []
    for chains, draws in [(2, 4), (1, 50), (4, 101), (4, 1000), (8, 257)]:
        cases.append((f"normal {chains}x{draws}", rng.normal(size=(chains, draws))))
    # autocorrelated AR(1) chains with different means: R-hat well above 1
    x = np.zeros((4, 500))
    for t in range(1, 500):
        x[:, t] = 0.95 * x[:, t - 1] + rng.normal(size=4)
    cases.append(("ar1 shifted", x + 5.0 * np.arange(4)[:, None]))
    # anticorrelated chains: the ESS exceeds the number of draws
    y = np.zeros((4, 400))
    for t in range(1, 400):
        y[:, t] = -0.7 * y[:, t - 1] + rng.normal(size=4)
    cases.append(("antithetic", y))
    cases.append(("heavy tails", rng.standard_cauchy(size=(4, 300))))
    cases.append(("ties (discrete)", rng.poisson(2.0, size=(4, 300)).astype(float)))
    cases.append(("binary", (rng.random(size=(3, 200)) < 0.1).astype(float)))
    cases.append(("one chain constant", np.vstack([np.full(100, 1.5), rng.normal(size=100)])))
    cases.append(("constant", np.full((4, 100), 2.0)))
    cases.append(("too short", rng.normal(size=(4, 3))))
    nan = rng.normal(size=(4, 100))
    nan[2, 7] = np.nan
    cases.append(("nan", nan))
    return cases


CASES = _cases()


def _close(ours: float, oracle: float) -> bool:
    if np.isnan(oracle):
        return bool(np.isnan(ours))
    return abs(ours - oracle) <= 1e-10 * max(1.0, abs(oracle))


@pytest.mark.parametrize(("label", "x"), CASES, ids=[c[0] for c in CASES])
def test_matches_arviz(label, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ArviZ warns on NaN / short / constant input
        oracle = {
            "rhat": float(az.rhat(x, method="rank")) if x.shape[0] > 1 else float("nan"),
            "bulk": float(az.ess(x, method="bulk")),
            "tail": float(az.ess(x, method="tail")),
            "mean": float(az.ess(x, method="mean")),
            "mcse": float(az.mcse(x, method="mean")),
        }
        ours = {
            "rhat": chainstats.rhat(x),
            "bulk": chainstats.ess(x, "bulk"),
            "tail": chainstats.ess(x, "tail"),
            "mean": chainstats.ess(x, "mean"),
            "mcse": chainstats.mcse_mean(x),
        }
    wrong = {k: (ours[k], oracle[k]) for k in oracle if not _close(ours[k], oracle[k])}
    assert not wrong, f"{label}: (ours, ArviZ) {wrong}"


def test_the_cases_are_not_trivial():
    """The oracle cases cover R-hat far from 1 and ESS above the draw count."""
    values = dict(CASES)
    assert chainstats.rhat(values["ar1 shifted"]) > 1.5
    assert chainstats.ess(values["antithetic"], "bulk") > values["antithetic"].size


def test_comparison_can_fail():
    x = CASES[3][1]
    assert not _close(chainstats.ess(x, "bulk"), float(az.ess(x[:, :-1], method="bulk")))
    assert not _close(chainstats.rhat(x), float(az.rhat(x[:, 1:])))


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="bulk"):
        chainstats.ess(np.zeros((2, 10)), "median")
