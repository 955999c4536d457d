"""lipapers.graph: the reconstruction's Gaussian limit against sklearn's graphical_lasso, its B-step against a scipy
minimizer, a brute-force glasso on p = 3, monotone objective, the nonparanormal estimator against Pearson, edge metrics
against networkx, network/moral-graph counts, bad inputs."""
import importlib.util
import warnings

import networkx as nx
import numpy as np
import pytest
from scipy.optimize import minimize
from sklearn.covariance import graphical_lasso

from lipapers import graph as G


def _gauss(n=300, p=6, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, p))
    X[:, 1] += 0.8 * X[:, 0]
    X[:, 2] -= 0.5 * X[:, 1]
    return X


@pytest.mark.parametrize("n,p,lam", [(200, 3, 0.05), (57, 7, 0.1), (500, 11, 0.02)])
def test_gaussian_limit_is_graphical_lasso(n, p, lam):
    X = _gauss(n, p, seed=p)
    fit = G.iggl(X, "gaussian", lam=lam, noise_var=0)
    ref = graphical_lasso(np.cov(X.T, bias=True), alpha=lam, max_iter=100, tol=1e-4)[1]
    np.testing.assert_allclose(fit.precision, ref, atol=1e-6, rtol=0)  # same solver and settings: float64 rounding


def test_glasso_limit_matches_brute_force_p3():
    X = _gauss(150, 3, seed=3)
    S, lam = np.cov(X.T, bias=True), 0.05
    obj = lambda W: np.sum(S * W) - np.linalg.slogdet(W)[1] + lam * G.offdiag_l1(W)

    def f(v):  # Ω = L Lᵀ, L lower-triangular with a log diagonal: unconstrained brute force over all Ω ≻ 0
        L = np.zeros((3, 3)); L[np.tril_indices(3)] = v; L[np.diag_indices(3)] = np.exp(np.diag(L))
        return obj(L @ L.T)

    best = min((minimize(f, np.random.default_rng(s).normal(0, 0.3, 6), method="Nelder-Mead",
                         options=dict(xatol=1e-10, fatol=1e-12, maxiter=20000)) for s in range(4)), key=lambda r: r.fun)
    fit = G.iggl(X, "gaussian", lam=lam, noise_var=0)
    assert obj(fit.precision) <= best.fun + 1e-6


@pytest.mark.parametrize("family", ["gaussian", "poisson"])
def test_b_step_is_the_row_minimizer(family):
    rng = np.random.default_rng(1)
    p = 5
    Om = np.eye(p) + 0.3 * np.diag(np.ones(p - 1), 1) + 0.3 * np.diag(np.ones(p - 1), -1)
    alpha = rng.normal(0.5, 0.2, p)
    y = rng.poisson(2.0, (1, p)).astype(float) if family == "poisson" else rng.normal(0, 1, (1, p))
    loss = G.make_loss(family, 0.3 if family == "gaussian" else None)
    row = lambda b: loss.moments(y, alpha + b[None], np.zeros((1, p)), grad=False).sum() + 0.5 * b @ Om @ b
    ref = minimize(row, np.zeros(p), method="BFGS", options=dict(gtol=1e-10)).x
    M = np.zeros((1, p))
    for _ in range(1 if family == "gaussian" else 30):  # Gaussian: closed form; Poisson: Newton steps to the fixed point
        M, V = G.b_step(y, loss, alpha, M, None, Om, em_correction=False)
    np.testing.assert_allclose(M[0], ref, atol=1e-5)
    np.testing.assert_allclose(V[0], np.linalg.inv(np.diag(loss.moments(y, alpha + M, 0 * M)[2][0]) + Om), atol=1e-10)


@pytest.mark.parametrize("family,channel,damping", [("poisson", "poisson", 1.0), ("poisson", "poisson", 0.5),
                                                    ("bernoulli", "bernoulli", 1.0), ("huber", "t3", 1.0),
                                                    ("gaussian", "gaussian", 0.7)])
def test_objective_non_increasing(family, channel, damping):
    for seed in range(2):
        Y, _, _ = G.simulate_latent_graph("chain", 80, channel, -0.3 if channel == "poisson" else 0.0, seed, p=6)
        fit = G.iggl(Y, family, lam=0.05, max_iter=15, damping=damping, noise_var=0.25 if family == "gaussian" else None)
        F = np.array(fit.objective)
        assert np.all(np.diff(F) <= 1e-9 * np.abs(F[:-1])), F


def test_gaussian_em_decreases_without_backtracking():
    "True EM monotonicity (no line search): the exact Gaussian E-step, α-step and glasso M-step never increase (R1)."
    Y, _, _ = G.simulate_latent_graph("hub", 120, "gaussian", 0.0, 0, p=8)
    loss, lam = G.make_loss("gaussian", 0.25), 0.05
    n, p = Y.shape
    a, M, V, Om = Y.mean(0), np.zeros((n, p)), np.broadcast_to(np.eye(p), (n, p, p)), np.eye(p)
    F = [G.iggl_objective(Y, loss, lam, a, M, V, Om)]
    for _ in range(10):
        M, V = G.b_step(Y, loss, a, M, V, Om)
        a = G.alpha_step(Y, loss, a, M, V)
        Om, _ = G.omega_step(M, V, lam)
        F.append(G.iggl_objective(Y, loss, lam, a, M, V, Om))
    assert np.all(np.diff(F) <= 1e-6 * np.abs(F[0])), F  # sklearn's glasso stops at tol 1e-4: allow its rounding


def test_poisson_latent_correlation_recovered():
    rng = np.random.default_rng(1)
    Sig = np.array([[1, 0.7, 0], [0.7, 1, 0], [0, 0, 1.0]])
    B = rng.multivariate_normal(np.zeros(3), Sig, size=2000)
    Y = rng.poisson(np.exp(B)).astype(float)
    fit = G.iggl(Y, "poisson", lam=1e-3, max_iter=200, tol=1e-8)
    np.testing.assert_allclose(fit.S, Sig, atol=0.1)  # the EM covariance, not the attenuated moment estimate


def test_nonparanormal_equals_pearson_on_gaussian_data():
    rng = np.random.default_rng(0)
    C = np.array([[1, 0.6, 0.2], [0.6, 1, -0.4], [0.2, -0.4, 1.0]])
    X = rng.multivariate_normal(np.zeros(3), C, size=5000)
    P = np.corrcoef(X.T)
    se = (1 - P ** 2) / np.sqrt(len(X))
    for rank in ("spearman", "kendall"):
        R = G.rank_correlation(X, rank)
        assert np.all(np.abs(R - P) <= 3 * se + 1e-12), (rank, R - P)


def test_edge_metrics_hand_case_and_networkx_shd():
    T = np.zeros((4, 4), bool); T[0, 1] = T[1, 2] = T[2, 3] = True; T |= T.T
    E = np.zeros((4, 4), bool); E[0, 1] = E[0, 3] = True; E |= E.T
    m = G.edge_metrics(E, T)
    assert m == dict(precision=0.5, recall=1 / 3, f1=0.4, shd=3, n_edges=2)
    rng = np.random.default_rng(0)
    for _ in range(5):
        A = np.triu(rng.random((9, 9)) < 0.3, 1); A |= A.T
        B = np.triu(rng.random((9, 9)) < 0.3, 1); B |= B.T
        ga, gb = nx.from_numpy_array(A.astype(int)), nx.from_numpy_array(B.astype(int))
        sym = {frozenset(e) for e in ga.edges} ^ {frozenset(e) for e in gb.edges}
        assert G.edge_metrics(B, A)["shd"] == len(sym)


def test_path_auc_and_top_k():
    T = np.zeros((5, 5), bool); T[0, 1] = T[2, 3] = True; T |= T.T
    s = T * 1.0 + 0.1 * np.random.default_rng(0).random((5, 5))
    assert G.path_auc(s, T) == dict(roc_auc=1.0, pr_auc=1.0)
    assert np.array_equal(G.top_k_edges(s, 2), T)
    assert G.path_auc(-s, T)["roc_auc"] == 1.0  # scores are magnitudes |Ω_ij|


def test_graph_precision_support_and_scale():
    for g, k in [("chain", 19), ("hub", 18)]:
        Om, A = G.graph_precision(g, 20)
        assert A.sum() // 2 == k
        np.testing.assert_allclose(np.diag(np.linalg.inv(Om)), 1, atol=1e-10)
        assert np.array_equal(G.edge_set(Om), A)


needs_pgmpy = pytest.mark.skipif(importlib.util.find_spec("pgmpy") is None, reason="pip install pgmpy==1.1.2")
needs_cdt = pytest.mark.skipif(importlib.util.find_spec("cdt") is None, reason="pip install --no-deps cdt==0.6.0")


@needs_pgmpy
@pytest.mark.parametrize("name,nodes,moral", [("ecoli70", 46, 84), ("magic-niab", 44, 213)])
def test_network_moral_graph_counts(name, nodes, moral):
    Om, A, names = G.network_precision(name)
    assert len(names) == nodes and A.sum() // 2 == moral
    assert np.array_equal(G.edge_set(Om, 1e-10), A)  # supp Ω of the SEM = moral graph
    m = G.load_network(name)
    ref = nx.Graph(m.moralize().edges())
    assert {frozenset(e) for e in ref.edges} == {frozenset((names[i], names[j])) for i, j in zip(*np.nonzero(np.triu(A)))}


@needs_pgmpy
def test_asia_sample_and_moral_graph():
    Y, A, names = G.simulate_discrete_network("asia", 200, 0)
    assert Y.shape == (200, 8) and set(np.unique(Y)) <= {0.0, 1.0} and A.sum() // 2 == 10


@needs_cdt
def test_sachs_loader_and_truths():
    X, edges = G.sachs()
    assert X.shape == (7466, 11) and len(edges) == 18
    assert G.skeleton_adjacency(edges, X.columns).sum() // 2 == 18
    M = G.moral_adjacency(edges, X.columns)
    ix = {v: i for i, v in enumerate(X.columns)}
    assert M.sum() // 2 == 20 and M[ix["PIP3"], ix["PKA"]] and M[ix["PKA"], ix["PKC"]]


def test_bad_inputs():
    X = _gauss(30, 3)
    cases = [
        (lambda: G.iggl(np.where(np.eye(30, 3) > 0, np.nan, X), "gaussian"), "NaN or inf"),
        (lambda: G.iggl(np.where(np.eye(30, 3) > 0, np.inf, np.abs(X)), "poisson"), "NaN or inf"),
        (lambda: G.iggl(-np.abs(X), "poisson"), "counts ≥ 0"),
        (lambda: G.iggl(np.abs(X), "bernoulli"), "{0, 1}"),
        (lambda: G.iggl(np.c_[X, np.ones(30)], "gaussian"), "constant columns"),
        (lambda: G.iggl(X, "gaussian", lam=0), "lam must be > 0"),
        (lambda: G.iggl(X, "gaussian", lam=-1), "lam must be > 0"),
        (lambda: G.iggl(X, "student"), "family must be one of"),
        (lambda: G.edge_metrics(np.eye(3), np.ones((3, 2))), "square"),
        (lambda: G.edge_metrics(np.eye(3), np.triu(np.ones((3, 3)), 1)), "symmetric"),
        (lambda: G.edge_metrics(np.eye(3), np.ones((3, 3))), "zero diagonal"),
        (lambda: G.simulate_latent_graph("star"), "graph must be one of ['chain', 'hub', 'erdos_renyi']"),
        (lambda: G.load_network("alarm"), "network must be one of ['ecoli70', 'magic-niab', 'asia']"),
        (lambda: G.experiment_cells("all"), "experiment must be one of"),
        (lambda: G.experiment_cells("demo", graphs=("chain", "grid")), "unknown graphs ['grid']"),
    ]
    for fn, msg in cases:
        with pytest.raises(ValueError, match=None) as e:
            fn()
        assert msg in str(e.value), (msg, str(e.value))


def _em_map(Y, fit, family="poisson"):
    "One full undamped EM map from a fit's state (B-step, centering, α-step, Ω-step): the fixed-point check."
    loss = G.make_loss(family)
    Mn, Vn = G.b_step(Y, loss, fit.alpha, fit.B, fit.V, fit.precision)
    an, Mn = G.center_step(fit.alpha, Mn)
    an = G.alpha_step(Y, loss, an, Mn, Vn)
    On, _ = G.omega_step(Mn, Vn, fit.lam)
    return G.em_residual(fit.alpha, fit.B, fit.precision, an, Mn, On)


def test_high_counts_reach_the_fixed_point_and_old_rule_stops_early():
    "High counts (mean ≈ 30): the residual rule reaches the EM fixed point; the old |ΔF|/|F| < 1e-5 rule stopped early."
    Y, _, _ = G.simulate_latent_graph("hub", 120, "poisson", 3.0, 0, p=12)
    fit = G.iggl(Y, "poisson", lam=0.04, max_iter=200, tol=1e-4)
    assert fit.converged and fit.n_iter < 200 and fit.residual <= 1e-4
    assert _em_map(Y, fit) <= 1e-4  # recomputed independently of the loop's bookkeeping
    old = G.iggl(Y, "poisson", lam=0.04, max_iter=200, tol=1e-5, center=False, stop="objective", expand=False)
    assert old.converged and old.n_iter <= 10  # the old rule fires after a few iterations ...
    assert _em_map(Y, old) > 10 * 1e-4  # ... far from its fixed point
    assert fit.objective[-1] < old.objective[-1]  # and the converged fit has the lower (R1)


def test_center_step_never_increases_the_objective():
    Y, _, _ = G.simulate_latent_graph("chain", 80, "poisson", 1.0, 1, p=6)
    loss, lam = G.make_loss("poisson"), 0.05
    fit = G.iggl(Y, "poisson", lam=lam, max_iter=3, center=False, stop="objective", expand=False)
    M = fit.B + np.random.default_rng(0).normal(0.3, 0.1, fit.B.shape[1])  # column means away from 0
    a2, M2 = G.center_step(fit.alpha - 0.3, M)
    np.testing.assert_allclose(a2[None] + M2, fit.alpha - 0.3 + M, atol=1e-12)  # θ = α + b unchanged
    F = lambda a, m: G.iggl_objective(Y, loss, lam, a, m, fit.V, fit.precision)
    assert F(a2, M2) <= F(fit.alpha - 0.3, M)


def test_cap_is_reported_not_silent():
    Y, _, _ = G.simulate_latent_graph("chain", 100, "poisson", -0.7, 0, p=8)
    with pytest.warns(G.IgglConvergenceWarning, match="max_iter=2 reached"):
        fit = G.iggl(Y, "poisson", lam=0.05, max_iter=2)
    assert not fit.converged and fit.residual > 1e-4
    est = G.iggl_estimate([fit])
    assert est.info["em_unconverged"] == 1 and est.info["em_residual"] == fit.residual
    with pytest.raises(ValueError, match="stop must be one of"):
        G.iggl(Y, "poisson", stop="gap")


def _reference_state(Y, loss, lam, Om):
    "Brute-force reference: minimize (R1) over (α, M, V) with Ω fixed (convex there), L-BFGS from α = 0, M = 0, V = I."
    n, p = Y.shape
    tri = np.tril_indices(p)

    def unpack(x):
        a, M = x[:p], x[p:p + n * p].reshape(n, p)
        L = np.zeros((n, p, p)); L[:, tri[0], tri[1]] = x[p + n * p:].reshape(n, -1)
        return a, M, L

    def f(x):
        a, M, L = unpack(x)
        V = L @ L.transpose(0, 2, 1)
        _, g, h = loss.moments(Y, a + M, np.diagonal(V, axis1=1, axis2=2))
        gL = (h[:, :, None] * np.eye(p) + Om) @ L - np.linalg.inv(L).transpose(0, 2, 1)
        return G.iggl_objective(Y, loss, lam, a, M, V, Om), np.concatenate([g.sum(0), (g + M @ Om).ravel(),
                                                                             gL[:, tri[0], tri[1]].ravel()])

    x0 = np.concatenate([np.zeros(p + n * p), np.broadcast_to(np.eye(p)[tri], (n, len(tri[0]))).ravel()])
    r = minimize(f, x0, jac=True, method="L-BFGS-B", options=dict(maxiter=5000, gtol=1e-9, ftol=1e-14))
    a, M, L = unpack(r.x)
    return a, M, L @ L.transpose(0, 2, 1), r.fun


@pytest.mark.parametrize("family,channel,b0", [("bernoulli", "bernoulli", 0.0), ("poisson", "poisson", -0.7)])
def test_converged_fit_is_stationary_against_scipy_reference(family, channel, b0):
    "KKT of (R1): given the fit's Ω, scipy's minimum over (α, M, V) from a neutral start is the fit's state; Ω is glasso(S)."
    Y, _, _ = G.simulate_latent_graph("chain", 40, channel, b0, 2, p=3, latent_sd=1.5)
    loss, lam = G.make_loss(family), 0.05
    with warnings.catch_warnings():  # binary: the state is stationary long before M's relative change is < tol
        warnings.simplefilter("ignore", G.IgglConvergenceWarning)
        fit = G.iggl(Y, family, lam=lam, max_iter=200, tol=1e-5)
    a, M, V, F = _reference_state(Y, loss, lam, fit.precision)
    assert fit.objective[-1] <= F + 1e-6 * abs(F)  # no lower point of (R1) in (α, M, V) given Ω
    np.testing.assert_allclose(fit.alpha, a, atol=1e-3)
    np.testing.assert_allclose(fit.B, M, atol=1e-3)
    np.testing.assert_allclose(fit.V, V, atol=1e-3)
    ref = graphical_lasso(fit.S, alpha=lam, max_iter=1000, tol=1e-10)[1]  # Ω-block: glasso at a tight tolerance
    np.testing.assert_allclose(fit.precision, ref, atol=2e-3)
    kkt = G.stationarity(Y, fit)
    assert max(kkt["alpha"], kkt["M"], kkt["V"]) < 1e-3 and kkt["omega"] < 0.05, kkt  # as the state tolerance


def test_scale_step_leaves_the_prior_invariant_and_never_increases_the_objective():
    Y, _, _ = G.simulate_latent_graph("hub", 90, "bernoulli", 0.0, 3, p=6, latent_sd=1.5)
    loss, lam = G.make_loss("bernoulli"), 0.05
    fit = G.iggl(Y, "bernoulli", lam=lam, max_iter=5, expand=False)
    a, M, V, Om = fit.alpha, fit.B, fit.V, fit.precision
    c = np.random.default_rng(0).uniform(0.5, 2.0, 6)
    prior = lambda M, V, Om: G.iggl_objective(Y, loss, 0.0, a, M, V, Om) - loss.moments(
        Y, a + M, np.diagonal(V, axis1=1, axis2=2), grad=False).sum()  # (R1) without E ℓ and without the penalty
    np.testing.assert_allclose(prior(M * c, V * np.outer(c, c), Om / np.outer(c, c)), prior(M, V, Om), rtol=1e-10)
    Ms, Vs, Os, cs = G.scale_step(Y, loss, lam, a, M, V, Om)
    assert G.iggl_objective(Y, loss, lam, a, Ms, Vs, Os) <= G.iggl_objective(Y, loss, lam, a, M, V, Om)
    assert np.abs(np.log(cs)).max() > 1e-3  # it moves: plain EM is slow in exactly this direction


def test_scale_step_removes_the_binary_slow_mode():
    "Binary data: with the scale step the EM converges in far fewer iterations and to a lower (R1) than plain EM's cap."
    Y, _, _ = G.simulate_latent_graph("chain", 150, "bernoulli", 0.0, 0, p=8, latent_sd=1.5)
    px = G.iggl(Y, "bernoulli", lam=0.05, max_iter=300)
    with pytest.warns(G.IgglConvergenceWarning):
        em = G.iggl(Y, "bernoulli", lam=0.05, max_iter=px.n_iter, expand=False)
    assert px.converged and not em.converged
    assert px.objective[-1] < em.objective[-1]
    assert np.all(np.diff(px.objective) <= 1e-9 * np.abs(px.objective[:-1]))
    assert G.stationarity(Y, px)["kkt"] < G.stationarity(Y, em)["kkt"]
