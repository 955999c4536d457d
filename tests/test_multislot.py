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
