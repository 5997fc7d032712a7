"""The project's NUTS against posteriordb's Stan reference, on the nine posteriors.

For each validation posterior, :func:`diagnostics.get_reference` (the
project's NUTS under the entry's settings; for entries with
``reference_from``, NUTS on the named equivalent form) must pass its own
checks (split R-hat < 1.01, bulk/tail ESS >= 400, no divergence, E-BFMI >= 0.3 on
every chain), and every parameter's posterior mean must lie within 5 combined MCSE of
posteriordb's:

    |mean_nuts - mean_pdb| <= 5 * sqrt(mcse_nuts^2 + mcse_pdb^2),

``mcse_nuts`` from the project's draws (ArviZ), ``mcse_pdb`` from the 10
chains x 100 thinned reference draws (:func:`vimodels.validation.reference_table`).
"""

from __future__ import annotations

import numpy as np
import pytest

from vimodels.validation import list_posteriors, reference_table

POSTERIORS = tuple(list_posteriors())


def test_the_nine_posteriors_are_listed():
    assert len(POSTERIORS) == 9 and "pdb_gp_pois_regr_pc" not in POSTERIORS


Z_MAX = 5.0


@pytest.mark.slow
# a trajectory into ARMA's explosive region (|theta| > 1) or the GP's far tails overflows
# the kinetic energy: the sampler counts it as divergent, numpy warns
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("name", POSTERIORS)
def test_nuts_agrees_with_posteriordb(name):
    from diagnostics import get_reference

    ref = get_reference(name, seed=0)
    assert ref.trusted, ref.describe()
    # every check ran, E-BFMI (Stan's energy diagnostic) and the unvisited-mode search included
    assert {c.name for c in ref.checks} == {
        "rhat",
        "ess_bulk",
        "ess_tail",
        "divergences",
        "ebfmi",
        "modes",
    }
    _assert_means_agree(ref, name)


def _assert_means_agree(ref, name: str) -> None:
    """Every posteriordb mean within :data:`Z_MAX` combined MCSE of the reference's."""
    ours = ref.site_table().set_index("element")
    theirs = reference_table(name).set_index("element")
    assert set(theirs.index) <= set(ours.index)
    ours = ours.loc[theirs.index]
    se = np.sqrt(ours["mcse_mean"] ** 2 + theirs["mcse_mean"] ** 2)
    z = (ours["mean"] - theirs["mean"]) / se
    worst = z.abs().idxmax()
    assert z.abs().max() <= Z_MAX, (
        f"{name}: {worst} NUTS {ours.loc[worst, 'mean']:.5g} vs posteriordb "
        f"{theirs.loc[worst, 'mean']:.5g} ({z[worst]:+.2f} combined MCSE)"
    )


# 8 s at load 2.4 under -n 2 (the nutpie import included)
@pytest.mark.slow
def test_nutpie_agrees_with_posteriordb_on_kidiq():
    from diagnostics.nuts.reference import run_nuts

    name = "pdb_kidiq_interaction"  # correlated coefficients: the diagonal metric's worst case
    ref = run_nuts(name, settings={"sampler": "nutpie"}, seed=0, cache=False)
    assert ref.settings["sampler_used"] == "nutpie"
    assert ref.trusted, ref.describe()
    _assert_means_agree(ref, name)
    # the low-rank metric's short trees: posteriordb's regressions need 3-6 gradients per
    # draw with it, 77 with a diagonal metric (benchmarks/README.md, 3c)
    assert ref.sample_stats["n_steps"].mean() < 16
