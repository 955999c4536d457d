"""lipapers.multislot: env vs slate_value, native == sync, check_env, SlotContext vs recomputation, SGA limits and
brute force, MMR, replay limits and exact expectations, PL marginals, Pareto/hypervolume, bad input."""
import itertools, math
import numpy as np
import pytest
from lipapers.world import World
from lipapers.multislot import *

@pytest.fixture(scope="module")
def w(): return World.generate(0, n_members=300, n_posts=800, slate_effects=1.0, task_corr=0.5)

@pytest.fixture(scope="module")
def w_add(): return World.generate(0, n_members=300, n_posts=800, slate_effects=0.0, rep_topic=0.0, rep_author=0.0)

def _req(w, R=4, N=10, seed=0):
    rq = draw_requests(w, R, N, seed=seed); return rq, candidates(w, rq)

def test_episode_return_is_slate_value(w):
    env = SlateEnv(w, 10, 4); env.reset(seed=1); ret, acts = 0.0, [3, 1, 8, 0]
    for a in acts: _, r, term, _, info = env.step(a); ret += r
    assert term and info["action_mask"][acts].sum() == 0
    assert ret == pytest.approx(w.slate_value(env.req.member[0], env.req.items[0, acts], env.req.t[0]), abs=1e-12)

def test_native_equals_sync(w):
    for reward in REWARDS:
        a = rollout(make_vec_env(w, 3, "native", n_candidates=9, n_slots=3, reward=reward), 9, seed=2)
        b = rollout(make_vec_env(w, 3, "sync", n_candidates=9, n_slots=3, reward=reward), 9, seed=2)
        np.testing.assert_allclose(a[1], b[1], atol=1e-12); np.testing.assert_allclose(a[0], b[0], atol=1e-6)

def test_check_env(w):
    from gymnasium.utils.env_checker import check_env
    check_env(SlateEnv(w, 8, 3), skip_render_check=True)

def test_env_bad_actions(w):
    env = SlateEnv(w, 8, 3); env.reset(seed=0); env.step(2)
    with pytest.raises(ValueError, match="already placed"): env.step(2)
    with pytest.raises(ValueError, match="out of range"): env.step(8)
    with pytest.raises(ValueError, match="reward must be one of"): SlateEnv(w, 8, 3, reward="mean")
    with pytest.raises(ValueError, match="mode must be one of"): make_vec_env(w, 2, "ray")

def test_slot_context_matches_recomputation(w):
    rq, cd = _req(w, 3, 12); ctx = SlotContext.of(cd); rng = np.random.default_rng(0)
    S = np.stack([rng.permutation(12)[:7] for _ in range(3)]); r = np.arange(3)
    for k in range(7):
        P = S[:, :k]
        for name, arr in (("same_topic", cd.topic), ("same_author", cd.author), ("same_type", cd.ptype)):
            ref = np.array([[sum(arr[i, p] == arr[i, c] for p in P[i]) for c in range(12)] for i in range(3)])
            np.testing.assert_array_equal(getattr(ctx, name), ref)
        ref_cos = np.array([[max([0.0] + [float(cd.emb[i, p] @ cd.emb[i, c]) for p in P[i]]) for c in range(12)]
                            for i in range(3)])
        np.testing.assert_allclose(ctx.max_cos, ref_cos, atol=1e-12)
        F = ctx.features(); assert (F[..., 0] == k + 1).all()
        np.testing.assert_allclose(F[r, 0, CONTEXT_FEATURES.index("n_topics_above")],
                                   [len(set(cd.topic[i, P[i]])) for i in range(3)])
        ctx.place(S[:, k])

def test_sga_limits_and_brute_force():
    v = np.random.default_rng(1).random(7); f = lambda k, p, r: v[r]
    assert sga(f, 7, 1).tolist() == [int(np.argmax(v))]
    assert sga(f, 7, 5).tolist() == greedy_pointwise(v, 5).tolist()
    add = lambda B: (np.arange(1, B.shape[1] + 1) ** -0.8 * v[B]).sum(1)
    brute = max(itertools.permutations(range(7), 3), key=lambda s: add(np.array([s]))[0])
    assert exhaustive_slate(add, 7, 3)[0].tolist() == list(brute) == sga(f, 7, 3).tolist()
    cnt = []; sga(lambda k, p, r: (cnt.append(len(r)), v[r])[1], 7, 4); assert sum(cnt) == 4 * 7 - 4 * 3 // 2

def test_sga_oracle_equals_exhaustive_on_additive_world(w_add):
    rq, cd = _req(w_add, 3, 6, seed=3)
    for i in range(3):
        one = rq.take(np.array([i])); cdi = take_cd(cd, np.array([i]))
        S = sga_batch(oracle_score_fn(w_add, one, cdi), SlotContext.of(cdi), 3)[0]
        val = lambda B: slot_probs(w_add, rq.take(np.full(len(B), i)), take_cd(cd, np.full(len(B), i)), B).sum(1)
        best, bv = exhaustive_slate(val, 6, 3)
        assert val(S[None])[0] == pytest.approx(bv, rel=1e-12)

def test_mmr():
    v = np.array([.2, .9, .5, .7]); assert mmr(v, np.eye(4), 4, lam=1.0).tolist() == [1, 3, 2, 0]
    sim = np.array([[1, .9, 0, 0], [.9, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.]])
    assert mmr(np.array([1, .95, .5, .1]), sim, 3, lam=0.5).tolist() == [0, 2, 3]

def test_pl_marginals_match_enumeration():
    s = np.array([0.5, -1.0, 1.7, 0.1, -0.3])
    perm = np.array(list(itertools.permutations(range(5)))); lw = s[perm]
    pr = np.exp((lw - np.logaddexp.accumulate(lw[:, ::-1], 1)[:, ::-1]).sum(1))
    ref = np.stack([np.bincount(perm[:, k], pr, 5) for k in range(3)], 1)
    np.testing.assert_allclose(pl_slot_marginals(s, 3), ref, atol=1e-10)
    cond = pl_conditional(s[None], perm[:1, :3])[0]
    e = np.exp(s); a = perm[0, :3]
    np.testing.assert_allclose(cond, [e[a[0]] / e.sum(), e[a[1]] / (e.sum() - e[a[0]]),
                                      e[a[2]] / (e.sum() - e[a[0]] - e[a[1]])], rtol=1e-12)

def test_replay_k1_is_ips_and_sn_uniform():
    g = np.random.default_rng(0); L = g.integers(0, 6, (500, 1)); T = g.integers(0, 6, (500, 1))
    r = g.random((500, 1)); mu = g.uniform(0.1, 1, (500, 1))
    ips = sum(r[i, 0] / mu[i, 0] for i in range(500) if L[i, 0] == T[i, 0]) / 500
    assert replay_value(L, r, mu, T).value == pytest.approx(ips, rel=1e-12)
    assert replay_value(L, r, np.full_like(mu, 1 / 6), T, self_normalize=True).value == pytest.approx(r[L == T].mean())

def _exact_replay(w, mode, N=5, K=3):
    rq, cd = _req(w, 1, N, seed=4); s = cd.log_score[0]
    slates = np.array(list(itertools.permutations(range(N), K)))             # all 60 logged lists
    lw = s[slates]
    pr = np.exp(np.array([sum(lw[j, k] - np.log(np.exp(s).sum() - np.exp(lw[j, :k]).sum()) for k in range(K))
                          for j in range(len(slates))]))
    rew = slot_probs(w, rq.take(np.zeros(len(slates), int)), take_cd(cd, np.zeros(len(slates), int)), slates)
    target = np.array([[2, 0, 4]]); truth = slot_probs(w, rq, cd, target).sum()
    prop = pl_conditional(np.repeat(s[None], len(slates), 0), slates) if mode == "prefix" else \
        pl_slot_marginals(s, K)[slates, np.arange(K)]
    per = [replay_value(slates[j:j + 1], rew[j:j + 1], prop[j:j + 1], target, mode).value for j in range(len(slates))]
    return float(np.dot(pr, per)), float(truth), pr.sum()

def test_replay_exact_expectation(w, w_add):
    e, t, tot = _exact_replay(w, "prefix"); assert tot == pytest.approx(1, abs=1e-12); assert e == pytest.approx(t, rel=1e-9)
    e, t, _ = _exact_replay(w_add, "slot"); assert e == pytest.approx(t, rel=1e-9)
    e, t, _ = _exact_replay(w_add, "prefix"); assert e == pytest.approx(t, rel=1e-9)

def test_pareto_and_hypervolume():
    P = np.random.default_rng(2).random((80, 3))
    brute = [not any((q >= p).all() and (q > p).any() for q in P) for p in P]
    assert pareto_front(P).tolist() == brute
    U = np.random.default_rng(3).random((100_000, 3)); inside = (U[:, None] <= P[None]).all(2).any(1)
    assert abs(hypervolume(P, [0, 0, 0]) - inside.mean()) < 3 * inside.std() / math.sqrt(len(U))
    assert hypervolume([[1, 1]], [0, 0]) == 1.0 and hypervolume([[2, 1], [1, 2]], [0, 0]) == 3.0

def test_bad_input(w):
    with pytest.raises(ValueError, match=r"n_slots \(K=5\) must be <= n_candidates \(N=4\)"): greedy_pointwise(np.ones(4), 5)
    with pytest.raises(ValueError, match="N!/\\(N-K\\)! = 19,958,400"): exhaustive_slate(lambda B: B.sum(1), 12, 8)
    L = np.array([[0, 1]]); r = np.ones((1, 2))
    with pytest.raises(ValueError, match="duplicate"): replay_value(np.array([[1, 1]]), r, r, L)
    with pytest.raises(ValueError, match=r"\(0, 1\]"): replay_value(L, r, r * 1.5, L)
    with pytest.raises(ValueError, match="share one"): replay_value(L, r, np.ones((1, 3)), L)
    with pytest.raises(ValueError, match="'slot', 'prefix'"): replay_value(L, r, r, L, mode="all")
    with pytest.raises(ValueError, match="weights must name"): model_score_fn(("mlp", None, "multislot"), None, None, {"ctr": 1})
    with pytest.raises(ValueError, match="control must be one of"): make_world(0, "both")
    with pytest.raises(ValueError, match="sim must be"): mmr(np.ones(3), np.eye(4), 2)

def test_same_seed_same_requests(w):
    a, b = draw_requests(w, 3, 8, seed=5), draw_requests(w, 3, 8, seed=5)
    assert (a.items == b.items).all() and (a.t == b.t).all()

def test_async_equals_native(w):
    "gymnasium's AsyncVectorEnv (forkserver subprocesses) steps the same episodes as the native batch."
    a = rollout(make_vec_env(w, 2, "native", n_candidates=8, n_slots=3, reward="sampled"), 8, seed=3)
    env = make_vec_env(w, 2, "async", n_candidates=8, n_slots=3, reward="sampled")
    try: b = rollout(env, 8, seed=3)
    finally: env.close()
    np.testing.assert_allclose(a[1], b[1], atol=1e-12); np.testing.assert_allclose(a[0], b[0], atol=1e-6)

def test_speed_rows_ratios_are_paired_by_repeat():
    import polars as pl
    ss = pl.DataFrame([dict(repeat=r, N=N, K=K, seconds=(r + 1) * N * K * 1e-6, rows=K * N - K * (K - 1) // 2)
                       for r in range(3) for N, K in SPEED_GRID])
    es = pl.DataFrame([dict(repeat=r, mode=m, num_envs=4, steps_per_s=v * (r + 1))
                       for r in range(3) for m, v in (("native", 60.0), ("sync", 10.0))])
    rows = pl.DataFrame(speed_rows(ss, es), infer_schema_length=None)
    get = lambda m: rows.filter(pl.col("metric") == m).sort("repeat")["value"].to_list()
    assert get("time_ratio_N") == pytest.approx([8.0] * 3) and get("time_ratio_K") == pytest.approx([4.0] * 3)
    assert get("native_over_sync") == pytest.approx([6.0] * 3) and get("rows_exact") == [1.0]

def test_expected_auc_pair_sum_binary_and_sampling():
    from sklearn.metrics import roc_auc_score
    g = np.random.default_rng(5); s = g.normal(size=123).round(1); p = g.beta(0.5, 3, 123)   # ties, skewed p
    gt = (s[:, None] > s[None]) + 0.5 * (s[:, None] == s[None])
    assert expected_auc(p, s) == pytest.approx((p[:, None] * (1 - p)[None] * gt).sum() / (p.sum() * (1 - p).sum()), abs=1e-12)
    y = (g.random(123) < 0.3).astype(float)
    assert expected_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    from scipy.stats import rankdata
    Y = (g.random((3000, 123)) < p).astype(float); n1 = Y.sum(1); Y = Y[(n1 > 0) & (n1 < 123)]; n1 = Y.sum(1)
    draws = (Y @ rankdata(s) - n1 * (n1 + 1) / 2) / (n1 * (123 - n1))                     # Mann-Whitney, per draw
    assert draws[0] == pytest.approx(roc_auc_score(Y[0], s), abs=1e-12)
    assert abs(draws.mean() - expected_auc(p, s)) < 0.01     # the mean of sampled AUCs (a ratio: close, not equal)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"): expected_auc(p * 3, s)
    with pytest.raises(ValueError, match="one shape"): expected_auc(p, s[:5])

def test_marginal_replay_limits_and_unbiasedness():
    g = np.random.default_rng(6); n, K = 7, 3
    q = g.random((n, K)) * 0.3; pi = g.dirichlet(np.ones(n), K).T; truth = (pi * q).sum()
    A, S = np.repeat(np.arange(n), K), np.tile(np.arange(K), n)                       # complete uniform log
    assert marginal_replay(A, S, q[A, S], np.full(n * K, 1 / n), pi).value == pytest.approx(truth, abs=1e-12)
    mu = g.dirichlet(np.ones(n), K).T; T = 200_000; k = g.integers(0, K, T)             # non-uniform logging
    a = (np.cumsum(mu, 0)[:, k].T < g.random(T)[:, None]).sum(1); r = (g.random(T) < q[a, k]).astype(float)
    for sn in (False, True):
        rp = marginal_replay(a, k, r, mu[a, k], pi, self_normalize=sn)
        assert abs(rp.value - truth) < 4 * rp.se and rp.matches.sum() == T
    on = sum(r[k == j].mean() for j in range(K))                                          # target = logging policy
    assert marginal_replay(a, k, r, mu[a, k], mu, self_normalize=True).value == pytest.approx(on, abs=1e-12)
    one = np.eye(n)[:, [3, 0, 5]]; L1 = one.argmax(0)[k][:, None]
    ref = sum(replay_value(a[k == j, None], r[k == j, None], mu[a[k == j], j][:, None], L1[k == j]).value for j in range(K))
    assert marginal_replay(a, k, r, mu[a, k], one).value == pytest.approx(ref, rel=1e-12)

def test_marginal_replay_bad_input():
    a, k, r, mu = np.array([0, 1, 2, 0]), np.array([0, 0, 1, 1]), np.ones(4), np.full(4, 0.5)
    U = np.full((3, 2), 1 / 3)
    with pytest.raises(ValueError, match="share one 1-D shape"): marginal_replay(a, k, r[:3], mu, U)
    with pytest.raises(ValueError, match=r"\(0, 1\]"): marginal_replay(a, k, r, mu * 0, U)
    with pytest.raises(ValueError, match="summing to 1"): marginal_replay(a, k, r, mu, U * 2)
    with pytest.raises(ValueError, match=r"items must be in \[0, 2\)"): marginal_replay(a, k, r, mu, U[:2] * 1.5)
    with pytest.raises(ValueError, match=r"slots must be in \[0, 1\)"): marginal_replay(a, k, r, mu, np.full((3, 1), 1 / 3))
    with pytest.raises(ValueError, match="slot 1 has 1"): marginal_replay(a[:3], k[:3], r[:3], mu[:3], U)
    with pytest.raises(ValueError, match=r"no impression at slot\(s\) \[2\]"): empirical_marginals(a, k, 3, 3)

def test_obd_replay_table_on_the_open_bandit_sample():
    import polars as pl
    from lipapers.data import open_bandit
    R, B = open_bandit("random").log, open_bandit("bts").log
    t = obd_replay_table(R, B)
    assert t.height == 7 * 6 and t["day"].n_unique() == 7
    d = R.filter(pl.col("timestamp").dt.date() == R["timestamp"].dt.date().min())           # first day, by hand
    hand = 1e3 * sum(d.filter(pl.col("position") == j)["click"].mean() for j in (1, 2, 3))
    got = t.filter((pl.col("method") == "obd_uniform_on_policy") & (pl.col("day") == str(d["timestamp"].dt.date()[0])))
    assert got["clicks_per_1k"][0] == pytest.approx(hand, rel=1e-12)
    U = np.full((80, 3), 1 / 80)        # replaying the random policy from its own log is its on-policy value
    rp = marginal_replay(R["item_id"].to_numpy(), R["position"].to_numpy() - 1, R["click"].to_numpy(), R["propensity"].to_numpy(), U)
    assert rp.value == pytest.approx(sum(R.filter(pl.col("position") == j)["click"].mean() for j in (1, 2, 3)), rel=1e-12)
