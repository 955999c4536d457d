"""lipapers.noah: the allocation LP against HiGHS and closed forms, the dual bound, the randomized and dual methods,
the A/B tests against scipy and their own definitions, simulation-based type-I error, dilution, and bad inputs."""
import numpy as np
import polars as pl
import pytest
import torch
from scipy import stats
from scipy.optimize import minimize

from lipapers.noah import (AllocationProblem, make_allocation_problem, solve_highs, greedy_legacy, dual_bound,
                           dual_ascent, sampled_duals, assign_by_duals, partition_solve, violation, welch_t, log_t,
                           mann_whitney, zero_trimmed_u, two_part_test, simulate_zero_inflated, rejection_rate,
                           triggered_analysis, simulate_targeting, lp_rows, power_rows, dilution_rows, scale_rows,
                           slope_rows, lp_table, power_table, allocation_ab, _project)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def binding():
    P = make_allocation_problem(600, 5, 0.5, seed=3)
    return P, solve_highs(P)


# ---------------------------------------------------------------- the LP
@pytest.mark.parametrize("F", [1.0, 2.0])
def test_one_campaign_is_a_fractional_knapsack(F):
    g = np.random.default_rng(0)
    v, c = g.random((80, 1)), g.uniform(0.2, 3, (80, 1))
    B = 0.3 * c.sum()
    o = np.argsort(-(v / c)[:, 0])
    take = np.clip((B - np.r_[0, np.cumsum(c[o, 0])[:-1]]) / c[o, 0], 0, 1)
    sol = solve_highs(AllocationProblem(v, c, np.full(80, F), [B]))
    assert sol.objective == pytest.approx((v[o, 0] * take).sum(), rel=1e-8)
    assert sol.violation < 1e-9


def test_slack_budgets_greedy_equals_highs():
    P = make_allocation_problem(700, 6, 1.0, seed=1)   # tightness 1: the budgets exactly fit the unconstrained choice
    assert greedy_legacy(P).objective == pytest.approx(solve_highs(P).objective, rel=1e-9)


def test_binding_budgets_lp_beats_greedy(binding):
    P, h = binding
    g = greedy_legacy(P)
    assert g.violation == 0 and h.objective > 1.01 * g.objective


def test_dual_bound_strong_duality_and_weak_duality(binding):
    P, h = binding
    assert dual_bound(P, h.duals) == pytest.approx(h.objective, rel=1e-6)   # scipy's marginals are <= 0: we negate
    for lam in np.random.default_rng(0).exponential(1.0, (50, 5)):
        assert dual_bound(P, lam) >= h.objective * (1 - 1e-9)
    assert dual_bound(P, np.zeros(5)) >= h.objective


def test_dual_ascent_approaches_highs_as_gamma_shrinks(binding):
    P, h = binding
    gaps = [dual_bound(P, dual_ascent(P, gamma=g, steps=300).duals) / h.objective - 1 for g in (0.3, 0.03, 0.003)]
    assert all(x >= -1e-9 for x in gaps)
    assert gaps[-1] < 2e-3 and gaps[-1] <= gaps[0] + 1e-9


def test_projection_matches_a_generic_solver():
    g = np.random.default_rng(0)
    y = torch.as_tensor(g.normal(0.5, 1.0, (6, 5))); F = torch.full((6,), 2.0, dtype=torch.float64)
    x = _project(y.clone(), F).numpy()
    for row, yr in zip(x, y.numpy()):
        cons = [{"type": "ineq", "fun": lambda z: 2.0 - z.sum()}]
        ref = minimize(lambda z: ((z - yr) ** 2).sum(), np.clip(yr, 0, 1) / 3, bounds=[(0, 1)] * 5, constraints=cons,
                       method="SLSQP", options=dict(ftol=1e-12, maxiter=500)).x
        np.testing.assert_allclose(row, ref, atol=1e-5)
        assert row.sum() <= 2 + 1e-6


def test_sampled_duals_with_every_member_is_the_lp(binding):
    P, h = binding
    a = assign_by_duals(P, sampled_duals(P, 1.0))
    assert a.violation == 0 and a.objective >= 0.99 * h.objective


def test_repair_always_feasible_and_partitions(binding):
    P, h = binding
    for lam in np.random.default_rng(1).exponential(0.3, (10, 5)):
        a = assign_by_duals(P, lam)
        assert a.violation == 0 and a.objective <= h.objective * (1 + 1e-9)
        assert (a.x.sum(1) <= P.member_caps).all()
    assert partition_solve(P, 1).objective == pytest.approx(h.objective, rel=1e-9)
    pt = partition_solve(P, 4, seed=2)
    assert pt.violation < 1e-9 and pt.objective <= h.objective * (1 + 1e-9)


# ---------------------------------------------------------------- tests vs scipy and definitions
@pytest.mark.parametrize("shape_a,shape_b", [((7,), (5,)), ((3, 40), (3, 33)), ((2, 2, 9), (2, 2, 4))])
def test_welch_and_mann_whitney_equal_scipy(shape_a, shape_b):
    g = np.random.default_rng(0)
    a, b = np.round(g.normal(size=shape_a), 1), np.round(g.normal(0.4, 2, size=shape_b), 1)   # ties on purpose
    np.testing.assert_allclose(welch_t(a, b).pvalue, stats.ttest_ind(b, a, axis=-1, equal_var=False).pvalue, rtol=1e-10)
    ref = stats.mannwhitneyu(b, a, axis=-1, method="asymptotic", use_continuity=False)
    np.testing.assert_allclose(mann_whitney(a, b).pvalue, ref.pvalue, rtol=1e-10)
    np.testing.assert_allclose(log_t(np.abs(a), np.abs(b)).pvalue,
                               stats.ttest_ind(np.log1p(np.abs(b)), np.log1p(np.abs(a)), axis=-1, equal_var=False).pvalue, rtol=1e-10)


def test_zero_trimmed_u_reduces_to_rank_sum_without_zeros():
    g = np.random.default_rng(1)
    a, b = np.exp(g.normal(size=(4, 30))), np.round(np.exp(g.normal(0.3, 1, (4, 21))), 1)
    np.testing.assert_allclose(zero_trimmed_u(a, b).pvalue, mann_whitney(a, b).pvalue, rtol=1e-12)


def test_zero_trimmed_u_antisymmetric_and_permutation_agrees():
    g = np.random.default_rng(2)
    a = np.where(g.random(400) < 0.75, 0, np.exp(g.normal(size=400)))
    b = np.where(g.random(350) < 0.68, 0, np.exp(g.normal(0.2, 1, 350)))
    assert zero_trimmed_u(a, b).statistic == pytest.approx(-zero_trimmed_u(b, a).statistic, abs=1e-12)
    p_as, p_perm = zero_trimmed_u(a, b).pvalue, zero_trimmed_u(a, b, "permutation", n_perm=3000).pvalue
    assert abs(p_as - p_perm) < 0.03


def test_zero_trimmed_u_type_one_error_by_simulation():
    sim = lambda S, s: simulate_zero_inflated(300, 0.3, seed=s, n_sims=S)
    r = rejection_rate(zero_trimmed_u, sim, 4000, alpha=0.05, seed=7, chunk=1000)
    assert r.lo <= 0.05 <= r.hi or abs(r.rate - 0.05) < 0.01, r.rate


def test_two_part_with_equal_zero_shares_is_its_continuous_part_squared():
    g = np.random.default_rng(3)
    a = np.r_[np.zeros(30), np.exp(g.normal(size=20))]; b = np.r_[np.zeros(30), np.exp(g.normal(0.5, 1, 20))]
    t = stats.ttest_ind(np.log(b[30:]), np.log(a[30:]), equal_var=False).statistic
    r = two_part_test(a, b)
    assert r.statistic == pytest.approx(t ** 2, rel=1e-10) and r.pvalue == pytest.approx(stats.chi2.sf(t ** 2, 2), rel=1e-10)


def test_power_ordering_on_zero_inflated_heavy_tails():
    sim = lambda S, s: simulate_zero_inflated(1000, 0.1, 0.3, 0.3, seed=s, n_sims=S)
    r = rejection_rate(dict(t=welch_t, ztu=zero_trimmed_u), sim, 400, seed=1, chunk=200)
    assert r["ztu"].rate > r["t"].rate + 0.05


def test_triggered_set_from_both_policies_never_outcomes():
    y, tr, d0, d1 = simulate_targeting(4000, 0.1, 0.5, seed=0)
    r = triggered_analysis(y, tr, d0, d1)
    assert r.n_triggered == int((d0 != d1).sum()) and r.share == pytest.approx(0.1, abs=1e-3)
    assert ((d0 != d1) & ~tr).any()                              # control units are triggered too (counterfactual)
    r2 = triggered_analysis(np.random.default_rng(0).permutation(y), tr, d0, d1)
    assert r2.n_triggered == r.n_triggered                       # outcomes do not move the triggered set
    yt, yc = y[tr & (d0 != d1)], y[~tr & (d0 != d1)]
    assert r.triggered.pvalue == pytest.approx(welch_t(yc, yt).pvalue)


# ---------------------------------------------------------------- experiments
def test_experiment_rows_are_paired_long_format():
    df = pl.DataFrame(lp_rows(200, 3, 0.5, [0, 1], fracs=(0.1,), partitions=2, steps=20))
    counts = df.group_by("method", "metric").agg(pl.col("seed").n_unique())
    assert (counts["seed"] == 2).all()
    t = lp_table(df, 0.5)
    assert t.filter(pl.col("method") == "highs")["gap_pct"][0] == 0
    pr = pl.DataFrame(power_rows("x", [(0.0, lambda S, s: simulate_zero_inflated(30, 0.5, seed=s, n_sims=S))],
                                 dict(t=welch_t), 30, chunk=10))
    assert pr.height == 3 and power_table(pr, "x")["n"][0] == 30
    assert pl.DataFrame(dilution_rows(300, 0.2, [0.5], 6, chunk=3)).height == 4
    sr = pl.DataFrame(scale_rows([300, 600], n_campaigns=3, highs_max=300, seeds=2, timing_steps=2))
    assert sr.filter(pl.col("metric") == "gap_pct").height == 2 and len(slope_rows(sr)) == 2


def test_allocation_ab_outcomes_are_zero_inflated():
    P = make_allocation_problem(500, 4, 0.5, seed=0)
    a, b = allocation_ab(P, greedy_legacy(P).x, solve_highs(P).x, 300)(5, 0)
    assert a.shape == b.shape == (5, 300) and (a == 0).mean() > 0.5 and (a >= 0).all()


def test_cdnow_split_is_an_a_a_test_without_effect():
    pool = np.r_[np.zeros(600), np.arange(1, 401.0)]
    a, b = simulate_zero_inflated(400, dist="split", pool=pool, seed=0, n_sims=3)
    assert a.shape == (3, 400)
    for r in range(3):
        assert sorted(np.r_[a[r], b[r]]) != [] and len(set(np.r_[a[r], b[r]][np.r_[a[r], b[r]] > 0])) == (np.r_[a[r], b[r]] > 0).sum()


def test_cdnow_loader():
    from lipapers.data import cdnow
    sp = cdnow("spend")["spend"].to_numpy()
    assert len(sp) == 23_570 and (sp == 0).mean() == pytest.approx(0.6465, abs=1e-3)
    with pytest.raises(ValueError, match="start and end must be ISO dates"): cdnow("spend", start="July")


# ---------------------------------------------------------------- bad input, before any work
P0 = make_allocation_problem(50, 3, 0.5, seed=0)


@pytest.mark.parametrize("kw,msg", [
    (dict(budgets=-P0.budgets), "budgets must be >= 0"),
    (dict(member_caps=-P0.member_caps), "member_caps must be >= 0"),
    (dict(costs=np.zeros_like(P0.costs)), "costs must be > 0"),
    (dict(values=np.where(np.eye(50, 3) > 0, np.nan, P0.values)), "values must be finite"),
    (dict(costs=P0.costs[:, :2]), "costs must be the shape of values"),
    (dict(budgets=P0.budgets[:2]), "budgets must be one per campaign"),
])
def test_problem_rejects_bad_data(kw, msg):
    args = dict(values=P0.values, costs=P0.costs, member_caps=P0.member_caps, budgets=P0.budgets) | kw
    with pytest.raises(ValueError, match=msg): AllocationProblem(**args)


def test_method_arguments_rejected():
    with pytest.raises(ValueError, match=r"frac must be in \(0, 1\]"): sampled_duals(P0, 0.0)
    with pytest.raises(ValueError, match=r"frac must be in \(0, 1\]"): sampled_duals(P0, 1.2)
    with pytest.raises(ValueError, match="use the dual methods: sampled_duals"): solve_highs(P0, max_vars=10)
    with pytest.raises(ValueError, match="duals must be finite and >= 0"): assign_by_duals(P0, [0, -1, 0])
    with pytest.raises(ValueError, match="gamma must be > 0"): dual_ascent(P0, gamma=-1)
    with pytest.raises(ValueError, match="k must be an int"): partition_solve(P0, 0)
    with pytest.raises(ValueError, match="tightness must be"): make_allocation_problem(10, tightness=0)


@pytest.mark.parametrize("test", [welch_t, log_t, mann_whitney, zero_trimmed_u, two_part_test])
def test_arms_rejected(test):
    with pytest.raises(ValueError, match="at least 2 values"): test([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="contains NaN"): test([1.0, np.nan], [1.0, 2.0])


def test_zero_trimmed_u_all_zero_and_stat_arguments():
    with pytest.raises(ValueError, match="both arms are all zeros"): zero_trimmed_u(np.zeros(4), np.zeros(3))
    with pytest.raises(ValueError, match="method must be one of"): zero_trimmed_u([1, 2], [1, 2], method="exact")
    with pytest.raises(ValueError, match="negative values"): zero_trimmed_u([1, -2], [1, 2])
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\)"): rejection_rate(welch_t, None, 10, alpha=0)
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\)"): rejection_rate(welch_t, None, 10, alpha=1.0)
    with pytest.raises(ValueError, match="dist must be one of"): simulate_zero_inflated(10, dist="pareto")
    with pytest.raises(ValueError, match="treated must be a boolean"):
        triggered_analysis(np.zeros(4), np.array([0, 1, 0, 1]), np.zeros(4), np.ones(4))
