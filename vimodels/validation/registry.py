"""The validation suite's registry: nine posteriordb posteriors as catalog entries.

Kept apart from the catalog (:data:`vimodels.catalog.registry.MODELS`, what
``vimodels list`` shows) but usable wherever a catalog name is:
:func:`vimodels.catalog.registry.get_model` resolves ``pdb_*`` names here.
Each entry's ``nuts`` settings are those under which the project's NUTS on it
passes its checks; :data:`POSTERIORS` names the posteriordb folder whose
``reference.json`` is the external ground truth (:mod:`vimodels.validation.reference`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

import vimodels.validation.models as m
from vimodels.catalog.base import CatalogEntry, DataDict, NutsSettings
from vimodels.errors import UnknownNameError

PREFIX = "pdb_"
GUIDES = ("auto_normal", "auto_multivariate_normal")

# Flat-prior regressions: 4 chains x 250 draws after 250 warm-up steps give bulk and
# tail ESS >= 400 for every coefficient (near-Gaussian posteriors, short trees).
_REGRESSION_NUTS = NutsSettings(num_warmup=250, num_samples=250, num_chains=4, metric="diag")


def _regression(
    name: str,
    description: str,
    loader: Callable[[], DataDict],
    nuts: NutsSettings,
    reference_from: str | None = None,
) -> CatalogEntry:
    return CatalogEntry(
        name=name,
        description=description,
        model=m.flat_regression,
        loader=loader,
        sites=("beta", "sigma"),
        family="pdb_flat_regression",
        observed=("y",),
        nuts=nuts,
        default_guides=GUIDES,
        max_plate_nesting=1,
        reference_from=reference_from,
    )


def _qr_twin(entry: CatalogEntry) -> CatalogEntry:
    """The entry on QR coordinates (:func:`~vimodels.validation.models.flat_regression_qr`)."""

    def loader() -> DataDict:
        return m.qr_data(entry.data())

    return CatalogEntry(
        name=entry.name + "_qr",
        description=entry.description.split(":")[0]
        + ": the same posterior on QR coordinates theta = R beta (flat prior on theta, "
        "constant Jacobian), beta recorded; the NUTS reference of " + entry.name,
        model=m.flat_regression_qr,
        loader=loader,
        sites=("beta", "sigma"),
        family="pdb_flat_regression_qr",
        # near-independent coordinates: ~6 leapfrog steps per draw, so 500 draws per
        # chain are cheap and keep split R-hat clear of 1.01 (250 gave 1.011-1.013)
        nuts=NutsSettings(num_warmup=300, num_samples=500, num_chains=4, metric="diag"),
        default_guides=GUIDES,
        max_plate_nesting=1,
    )


# Unscaled predictors (IQ ~100, height ~66 inches and their products) make intercept and
# slopes correlate near +-1: under the diagonal metric of the project's NUTS the trees are
# 6-8 deep and 4 x 250 draws are not enough (kidiq: R-hat 1.03, bulk ESS 298 in 23 s).
# These entries take their reference from NUTS on QR coordinates (`reference_from`), the
# same posterior (the flat prior on beta is flat on theta = R beta), in trees 2-3 deep;
# `run_nuts` on the entry itself still samples the direct form.
PDB_KIDIQ_INTERACTION = _regression(
    "pdb_kidiq_interaction",
    "posteriordb kidiq-kidscore_interaction: child test score on mother's IQ, high-school "
    "diploma and their interaction (N = 434); flat beta, half-Cauchy sigma",
    m.load_kidiq,
    _REGRESSION_NUTS,
    reference_from="pdb_kidiq_interaction_qr",
)

PDB_MESQUITE_LOGVOLUME = _regression(
    "pdb_mesquite_logvolume",
    "posteriordb mesquite-logmesquite_logvolume: log leaf weight of mesquite bushes on log "
    "canopy volume (N = 46); flat priors",
    m.load_mesquite,
    _REGRESSION_NUTS,
)

PDB_EARNINGS_LOGEARN_INTERACTION = _regression(
    "pdb_earnings_logearn_interaction",
    "posteriordb earnings-logearn_interaction: log earnings on height (inches, unscaled), "
    "sex and their interaction (N = 1192); flat priors, coefficients correlated near -1",
    m.load_earnings,
    _REGRESSION_NUTS,
    reference_from="pdb_earnings_logearn_interaction_qr",
)

PDB_NES1972 = _regression(
    "pdb_nes1972",
    "posteriordb nes1972-nes: party identification (7-point) on ideology, race, age group, "
    "education, gender and income, 1972 National Election Study (N = 1330); flat priors",
    m.load_nes,
    _REGRESSION_NUTS,
    reference_from="pdb_nes1972_qr",
)

PDB_ARK = CatalogEntry(
    name="pdb_ark",
    description="posteriordb arK-arK: AR(5) on a simulated series (T = 200); normal(0, 10) "
    "priors on alpha and beta, half-Cauchy(2.5) sigma",
    model=m.ar_k,
    loader=m.load_ark,
    sites=("alpha", "beta", "sigma"),
    family="pdb_ark",
    # 4 x 250 draws under the diagonal metric left split R-hat at 1.0102 on another machine
    # (the rounding of a CPU moves the draws): a borderline reference. The dense metric
    # (7 dimensions, correlated coefficients) with 4 x 1000 draws: R-hat 1.0013-1.0045 and
    # bulk ESS >= 4900 over seeds 0-2 in 4-6 s, where diag needed 13-15 s for 1000 draws.
    nuts=NutsSettings(num_warmup=250, num_samples=1000, num_chains=4, metric="dense"),
    default_guides=GUIDES,
    max_plate_nesting=0,
)

PDB_ARMA11 = CatalogEntry(
    name="pdb_arma11",
    description="posteriordb arma-arma11: ARMA(1,1) on a simulated series (T = 200)",
    model=m.arma11,
    loader=m.load_arma,
    sites=("mu", "phi", "theta", "sigma"),
    family="pdb_arma11",
    nuts=NutsSettings(num_warmup=250, num_samples=250, num_chains=4, metric="diag"),
    default_guides=GUIDES,
    max_plate_nesting=0,
    # |theta| > 1 makes the MA recursion explode (err ~ theta^200, log density ~ -1e45):
    # a chain started there (init uniform in (-2, 2): half the chains) collapses its step
    # size and never comes back. The reference comes from `pdb_arma11_scaled`, the same
    # posterior with theta = 0.4 * theta_raw, whose starts all have |theta| < 0.8.
    reference_from="pdb_arma11_scaled",
)

PDB_ARMA11_SCALED = CatalogEntry(
    name="pdb_arma11_scaled",
    description="posteriordb arma-arma11 on theta = 0.4 * theta_raw (the same posterior); "
    "the NUTS reference of pdb_arma11 (every start has |theta| < 1)",
    model=m.arma11,
    loader=m.load_arma,
    sites=("mu", "phi", "theta", "sigma"),
    family="pdb_arma11_scaled",
    nuts=NutsSettings(num_warmup=250, num_samples=250, num_chains=4, metric="diag"),
    default_guides=GUIDES,
    max_plate_nesting=0,
    options={"theta_unit": 0.4},
)

PDB_GARCH11 = CatalogEntry(
    name="pdb_garch11",
    description="posteriordb garch-garch11: GARCH(1,1) on a simulated series (T = 200); "
    "flat priors, beta1 < 1 - alpha1 (sampled as beta1_raw on (0, 1) with its Jacobian)",
    model=m.garch11,
    loader=m.load_garch,
    sites=("mu", "alpha0", "alpha1", "beta1"),
    family="pdb_garch11",
    # 4 x 300 diagonal draws: R-hat 1.0107 on another machine (borderline); dense, 4 x 1000:
    # R-hat 1.0003-1.0016, bulk ESS >= 2100 over seeds 0-2 in 8-11 s (diag 1000: 14-16 s).
    nuts=NutsSettings(num_warmup=300, num_samples=1000, num_chains=4, metric="dense"),
    default_guides=GUIDES,
    max_plate_nesting=0,
)

PDB_GP_POIS_REGR = CatalogEntry(
    name="pdb_gp_pois_regr",
    description="posteriordb gp_pois_regr-gp_pois_regr: latent GP (exp-quad kernel) with "
    "Poisson counts, 11 points, non-centered f = L f_tilde",
    model=m.gp_pois_regr,
    loader=m.load_gp,
    sites=("rho", "alpha", "f"),
    family="pdb_gp_pois_regr",
    # The translation is Stan's program (non-centered f = L f_tilde, the same 1e-10
    # jitter); it is hard for NUTS in Stan too (posteriordb ran adapt_delta 0.99,
    # max_treedepth 15). Why: the counts pin f down (posterior sd 0.1-0.27), and the first
    # elements of f_tilde are f's innovations divided by alpha * L[j, j] (2.9, 1.0, 0.46 at
    # the posterior mean, against a data sd ~0.17): each lies on a thin curved ridge
    # f_tilde[j] ~ const / (alpha L[j, j](rho)). Measured (4 chains, seed 0): target 0.95,
    # 300 + 300: 1 divergence; target 0.99: none but bulk ESS 342 in 2.5x the time; dense
    # metric (0.95 or 0.99, up to 400 + 800): 0-1 divergences, R-hat 1.012-1.016, ESS
    # 240-420 for rho. The centered form is no way out: the prior precision of f has
    # eigenvalues ~1e8 (smooth kernel, rho ~ 2.8 grid steps). The reference comes from
    # `pdb_gp_pois_regr_pc`, the same posterior with those three elements centered.
    nuts=NutsSettings(
        num_warmup=300, num_samples=300, num_chains=4, target_accept_prob=0.95, metric="diag"
    ),
    default_guides=GUIDES,
    max_plate_nesting=0,
    reference_from="pdb_gp_pois_regr_pc",
)

PDB_GP_POIS_REGR_PC = CatalogEntry(
    name="pdb_gp_pois_regr_pc",
    description="posteriordb gp_pois_regr on partially non-centered coordinates (the same "
    "posterior): f's first 3 innovations centered, the rest non-centered; the NUTS reference "
    "of pdb_gp_pois_regr",
    model=m.gp_pois_regr,
    loader=m.load_gp,
    sites=("rho", "alpha", "f"),
    family="pdb_gp_pois_regr_pc",
    # Centered where the counts dominate the prior: alpha L[j, j] / data sd (1 / sqrt(k))
    # is 18, 6, 2.5 for j = 1..3 at the posterior mean, 0.9 and below from j = 4.
    # Target 0.9, trees ~200 steps, no divergence (seeds 0-2). 4 x 300 draws left rho's
    # split R-hat at 1.012 on seed 1 (bulk ESS 480-650); 4 x 500: R-hat 1.003, bulk ESS
    # >= 750 (seeds 0, 1), about 90 s of one core. The dense metric (issue 17, 4 x (300 + 500)
    # through get_reference, seeds 0-2) is 3-4x faster (13-18 s against 55 s for the diagonal,
    # seed 0, at load 1.5-2.9) but not trusted: 4-5 divergences on every seed at target 0.9 (R-hat
    # 1.012 on seed 0, min bulk ESS 355) and 1-5 at 0.95 (R-hat 1.012 on seed 0): kept diagonal.
    nuts=NutsSettings(
        num_warmup=300, num_samples=500, num_chains=4, target_accept_prob=0.9, metric="diag"
    ),
    default_guides=GUIDES,
    max_plate_nesting=0,
    options={"centered": 3},
)

PDB_HMM_EXAMPLE = CatalogEntry(
    name="pdb_hmm_example",
    description="posteriordb hmm_example-hmm_example: 2-state Gaussian HMM (N = 100), states "
    "summed out by the forward algorithm, positive ordered means",
    model=m.hmm_example,
    loader=m.load_hmm,
    sites=("theta1", "theta2", "mu"),
    family="pdb_hmm_example",
    # 4 x 250 draws left split R-hat at 1.011 (mu[1]): the simplex coordinates near 0.07
    # and the ordered means need ~28 leapfrog steps per draw; 350 draws per chain pass.
    # and 350 diagonal draws left R-hat 1.0101 on another machine (borderline). Dense, 4 x 700:
    # R-hat 1.0014-1.0036, bulk ESS >= 2100 over seeds 0-2 in 8 s (diag 4 x 1000: 68 s).
    nuts=NutsSettings(num_warmup=250, num_samples=700, num_chains=4, metric="dense"),
    default_guides=GUIDES,
    max_plate_nesting=0,
)


def _garch_latents(draws: dict[str, np.ndarray], data: DataDict) -> dict[str, np.ndarray]:
    """``beta1_raw = beta1 / (1 - alpha1)`` from the reference's (alpha1, beta1)."""
    return {"beta1_raw": draws["beta1"] / (1.0 - draws["alpha1"])}


def _gp_latents(draws: dict[str, np.ndarray], data: DataDict) -> dict[str, np.ndarray]:
    """``f_tilde = L^{-1} f`` from the reference's (rho, alpha, f), as the program builds f."""
    x = data["x"].to(torch.float64)
    rho = torch.as_tensor(draws["rho"], dtype=torch.float64)[..., None, None]
    alpha = torch.as_tensor(draws["alpha"], dtype=torch.float64)[..., None, None]
    d2 = (x[:, None] - x[None, :]) ** 2
    cov = alpha**2 * torch.exp(-0.5 * d2 / rho**2) + 1e-10 * torch.eye(len(x), dtype=x.dtype)
    L = torch.linalg.cholesky(cov)
    f = torch.as_tensor(draws["f"], dtype=torch.float64)[..., None]
    return {"f_tilde": torch.linalg.solve_triangular(L, f, upper=False)[..., 0].numpy()}


def _gp_pc_latents(draws: dict[str, np.ndarray], data: DataDict) -> dict[str, np.ndarray]:
    """``f_innov``, ``f_tilde_rest`` of ``pdb_gp_pois_regr_pc`` from (rho, alpha, f)."""
    f_tilde = _gp_latents(draws, data)["f_tilde"]
    c = int(PDB_GP_POIS_REGR_PC.options["centered"])
    x = data["x"].to(torch.float64)
    rho = torch.as_tensor(draws["rho"], dtype=torch.float64)[..., None, None]
    alpha = torch.as_tensor(draws["alpha"], dtype=torch.float64)[..., None, None]
    d2 = (x[:, None] - x[None, :]) ** 2
    cov = alpha**2 * torch.exp(-0.5 * d2 / rho**2) + 1e-10 * torch.eye(len(x), dtype=x.dtype)
    scale = torch.diagonal(torch.linalg.cholesky(cov), dim1=-2, dim2=-1)[..., :c].numpy()
    return {"f_innov": f_tilde[..., :c] * scale, "f_tilde_rest": f_tilde[..., c:]}


def _qr_latents(draws: dict[str, np.ndarray], data: DataDict) -> dict[str, np.ndarray]:
    """``theta = R beta`` of a QR twin from the reference's ``beta``."""
    R = np.linalg.inv(data["R_inv"].numpy())
    return {"theta": np.asarray(draws["beta"]) @ R.T}


def _arma_scaled_latents(draws: dict[str, np.ndarray], data: DataDict) -> dict[str, np.ndarray]:
    """``theta_raw = theta / theta_unit`` of ``pdb_arma11_scaled``."""
    return {"theta_raw": np.asarray(draws["theta"]) / float(data["theta_unit"])}


@dataclass(frozen=True)
class ValidationSpec:
    """A validation entry and where its external reference comes from.

    Attributes
    ----------
    entry : CatalogEntry
    posterior : str
        posteriordb folder (``<data>-<model>``) under ``vimodels/validation/posteriordb``.
    latents_from_reference : callable or None
        ``f(draws, data) -> dict`` giving latent sites the Stan program does not
        report (a reparameterised site: ``beta1_raw``, ``f_tilde``) from the
        reference's parameters, draws with a leading ``(n,)`` axis.
    """

    entry: CatalogEntry
    posterior: str
    latents_from_reference: Callable[[dict[str, np.ndarray], DataDict], dict] | None = None


_SPECS: tuple[ValidationSpec, ...] = (
    ValidationSpec(PDB_KIDIQ_INTERACTION, "kidiq-kidscore_interaction"),
    ValidationSpec(PDB_MESQUITE_LOGVOLUME, "mesquite-logmesquite_logvolume"),
    ValidationSpec(PDB_EARNINGS_LOGEARN_INTERACTION, "earnings-logearn_interaction"),
    ValidationSpec(PDB_NES1972, "nes1972-nes"),
    ValidationSpec(PDB_ARK, "arK-arK"),
    ValidationSpec(PDB_GARCH11, "garch-garch11", _garch_latents),
    ValidationSpec(PDB_GP_POIS_REGR, "gp_pois_regr-gp_pois_regr", _gp_latents),
    ValidationSpec(PDB_GP_POIS_REGR_PC, "gp_pois_regr-gp_pois_regr", _gp_pc_latents),
    ValidationSpec(PDB_HMM_EXAMPLE, "hmm_example-hmm_example"),
    ValidationSpec(PDB_ARMA11, "arma-arma11"),
    ValidationSpec(PDB_ARMA11_SCALED, "arma-arma11", _arma_scaled_latents),
    ValidationSpec(_qr_twin(PDB_KIDIQ_INTERACTION), "kidiq-kidscore_interaction", _qr_latents),
    ValidationSpec(
        _qr_twin(PDB_EARNINGS_LOGEARN_INTERACTION), "earnings-logearn_interaction", _qr_latents
    ),
    ValidationSpec(_qr_twin(PDB_NES1972), "nes1972-nes", _qr_latents),
)

POSTERIORS: dict[str, ValidationSpec] = {s.entry.name: s for s in _SPECS}
VALIDATION_MODELS: dict[str, CatalogEntry] = {s.entry.name: s.entry for s in _SPECS}
assert len(VALIDATION_MODELS) == len(_SPECS), "validation names must be unique"
assert all(n.startswith(PREFIX) for n in VALIDATION_MODELS)


def get_validation_model(name: str) -> CatalogEntry:
    """Return the validation entry ``name`` (raises UnknownNameError listing valid names)."""
    try:
        return VALIDATION_MODELS[name]
    except (KeyError, TypeError):
        raise UnknownNameError("validation model", name, VALIDATION_MODELS) from None


def get_spec(name: str | CatalogEntry | ValidationSpec) -> ValidationSpec:
    """The :class:`ValidationSpec` of an entry or its name."""
    if isinstance(name, ValidationSpec):
        return name
    key = name.name if isinstance(name, CatalogEntry) else name
    try:
        return POSTERIORS[key]
    except (KeyError, TypeError):
        raise UnknownNameError("validation model", key, VALIDATION_MODELS) from None


def list_validation_models() -> list[str]:
    """Names of the validation entries, in registration order."""
    return list(VALIDATION_MODELS)


def list_posteriors() -> list[str]:
    """One name per posteriordb posterior (the nine), in registration order.

    Leaves out the twins that another entry takes its reference from
    (``reference_from``: QR coordinates, a rescaled theta, a partly centered GP).
    """
    twins = {e.reference_from for e in VALIDATION_MODELS.values() if e.reference_from}
    return [name for name in VALIDATION_MODELS if name not in twins]
