"""lipapers.attribution: path baselines against mta 0.0.9 (test-only reference), Markov removal against a hand-solved
chain and a Monte Carlo of the fitted chain, the exact truth against brute-force simulation, Shapley efficiency,
IG completeness, attention credits, bad inputs."""
import math

import numpy as np
import polars as pl
import pytest
import torch

from lipapers import attribution as A
from lipapers.data import path_data

torch.set_num_threads(1)


def _mta(paths: pl.DataFrame, allow_loops=False):
    mta = pytest.importorskip("mta")  # test-only reference (needs `arrow`); `pip install --no-deps mta==0.0.9`
    df = paths.select(path=pl.col("path").list.join(" > "), total_conversions="conversions", total_null="nulls").to_pandas()
    return mta.MTA(data=df, allow_loops=allow_loops, add_timepoints=False)


def _random_paths(seed, n=300, chs="abcde", max_len=6):
    rng = np.random.default_rng(seed)
    paths = [list(rng.choice(list(chs), rng.integers(1, max_len + 1))) for _ in range(n)]
    conv = rng.integers(0, 4, n)
    return pl.DataFrame({"path": paths, "conversions": conv, "nulls": rng.integers(0, 4, n) + (conv == 0)})


def _close(ours: dict, ref: dict, tol=2e-6):  # mta rounds its shares to 6 decimals
    assert set(k for k, v in ref.items() if v) <= set(ours)
    for k in ours:
        assert abs(ours[k] - ref.get(k, 0.0)) <= tol, (k, ours[k], ref.get(k))


@pytest.fixture(scope="module")
def pdat():
    return path_data()


@pytest.mark.parametrize("src", ["pathdata", "random0", "random1"])
def test_rules_equal_mta(src, pdat):
    p = pdat if src == "pathdata" else _random_paths(int(src[-1]))
    m = _mta(p)
    m.last_touch().first_touch().linear(share="same")
    _close(A.last_touch(p), m.attribution["last_touch"])
    _close(A.first_touch(p), m.attribution["first_touch"])
    _close(A.linear(p), m.attribution["linear"])


@pytest.mark.parametrize("src", ["pathdata7", "random2"])
def test_shapley_paths_equals_mta(src, pdat):
    if src == "pathdata7":  # PathData's journeys over its 7 most used channels (mta's enumeration is slow for 12)
        top = pdat["path"].explode().value_counts(sort=True)["path"][:7].to_list()
        p = pdat.filter(pl.col("path").list.eval(pl.element().is_in(top)).list.all())
    else:
        p = _random_paths(2)
    m = _mta(p).shapley()
    _close(A.shapley_paths(p), m.attribution["shapley"])
    _close(A.shapley_paths(p), A.linear(p), tol=1e-12)  # a sum of unanimity games: Shapley = equal split


def test_markov_hand_chain():
    # counts: start→A 700; A→B 500, A→C 300; C→A 100, C→null 200; B→conv 500. So P(A→B)=5/8, P(C→A)=1/3 and
    # P(conv) = x_A with x_A = 5/8 + 3/8·x_C, x_C = x_A/3  ⇒ x_A = 5/7. Without A or B nothing converts (effect 1);
    # without C, x_A = 5/8 (effect 1 − 7/8 = 1/8). Shares 8/17, 8/17, 1/17.
    p = pl.DataFrame({"path": [["A", "B"], ["A", "C", "A", "B"], ["A", "C"]], "conversions": [400, 100, 0], "nulls": [0, 0, 200]})
    s = A.markov_removal(p)
    np.testing.assert_allclose([s["A"], s["B"], s["C"]], [8 / 17, 8 / 17, 1 / 17], atol=1e-12)


def test_markov_monte_carlo():
    p = _random_paths(3, n=400, chs="abcd")
    # an independent reference: count the transitions by hand (loops collapsed), then simulate the chain
    states = ["(start)", "a", "b", "c", "d", "(conv)", "(null)"]
    ix = {s: i for i, s in enumerate(states)}
    M = np.zeros((7, 7))
    for path, cv, nl in p.select("path", "conversions", "nulls").iter_rows():
        path = [c for j, c in enumerate(path) if j == 0 or c != path[j - 1]]
        seq = ["(start)"] + path
        for u, v in zip(seq, seq[1:]):
            M[ix[u], ix[v]] += cv + nl
        M[ix[path[-1]], 5] += cv
        M[ix[path[-1]], 6] += nl
    P = M[:5] / M[:5].sum(1, keepdims=True)
    rng = np.random.default_rng(0)

    def p_conv(drop=None, n=40_000):
        s = np.zeros(n, int)
        done = np.zeros(n, bool)
        conv = np.zeros(n, bool)
        while not done.all():
            live = np.flatnonzero(~done)
            cum = P[s[live]].cumsum(1)
            nxt = (rng.random(len(live))[:, None] > cum).sum(1)
            if drop is not None:
                nxt = np.where(nxt == drop, 6, nxt)
            fin = nxt >= 5
            conv[live[fin]] = nxt[fin] == 5
            done[live[fin]] = True
            s[live[~fin]] = nxt[~fin]
        return conv.mean(), conv.std() / math.sqrt(n)

    base, se0 = p_conv()
    ours = A.markov_removal(p, normalize=False)
    for c in "abcd":
        pc, se = p_conv(ix[c])
        se_eff = math.sqrt((se / base) ** 2 + (pc * se0 / base**2) ** 2)  # delta method for 1 - pc/base
        assert abs((1 - pc / base) - ours[c]) < 3 * se_eff, (c, 1 - pc / base, ours[c], se_eff)


def _brute_logits(sim, keep):
    "Log-odds by looping over touches (an independent re-implementation of the hazard)."
    cfg = sim.cfg
    z = sim.base.astype(np.float64).copy()
    t = sim.touches.to_dicts()
    beta = {c: (0.0 if c == cfg.null_channel else b) for c, b in zip(cfg.channels, cfg.beta)}
    tau = dict(zip(cfg.channels, cfg.tau))
    first_search = {}
    for r in t:
        if cfg.channels[r["channel"]] == "search":
            first_search[r["member_id"]] = min(first_search.get(r["member_id"], 99), r["week"])
    for r in t:
        c = cfg.channels[r["channel"]]
        if c not in keep:
            continue
        w = np.arange(r["week"], cfg.n_weeks)
        k = np.exp(-(w - r["week"]) / tau[c])
        z[r["member_id"], w] += beta[c] * k
        if c == "webinar" and "search" in keep and first_search.get(r["member_id"], 99) <= r["week"]:
            z[r["member_id"], w] += cfg.order_effect * k
    return z


def test_true_credits_vs_brute_force():
    cfg = A.world_config("main", n_members=200, n_weeks=16)
    sim = A.simulate_journeys(cfg, 3)
    rng = np.random.default_rng(1)
    for keep in [list(cfg.channels), ["display", "email", "webinar"], []]:
        z = _brute_logits(sim, keep)
        p = 1 / (1 + np.exp(-z))
        draws = np.array([(rng.random(p.shape) < p).any(1).sum() for _ in range(400)])  # members converting by the horizon
        exact = A.expected_conversions(sim, keep)
        assert abs(draws.mean() - exact) < 3 * draws.std() / math.sqrt(len(draws)) + 1e-9, (keep, draws.mean(), exact)
    phi = A.true_credits(cfg, sim)
    np.testing.assert_allclose(sum(phi.values()), A.expected_conversions(sim, list(cfg.channels)) - A.expected_conversions(sim, []), rtol=1e-9)


def test_shapley_properties():
    v = A.subset_values(lambda S: len(S) ** 2, 4)  # symmetric game: equal split
    np.testing.assert_allclose(A.shapley_from_values(v), [4.0] * 4)
    v = A.subset_values(lambda S: 3.0 * (0 in S) + 2.0 * (1 in S), 3)  # additive game with a null player 2
    np.testing.assert_allclose(A.shapley_from_values(v), [3.0, 2.0, 0.0])


def test_null_channel_truth_is_exactly_zero():
    cfg = A.world_config("null", n_members=300, n_weeks=12)
    sim = A.simulate_journeys(cfg, 0)
    assert A.true_credits(cfg, sim)["social"] == 0.0
    assert A.true_credits(cfg, sim, "removal")["social"] == 0.0


@pytest.fixture(scope="module")
def small():
    sim = A.simulate_journeys(A.world_config("main", n_members=400, n_weeks=20), 0)
    mw = A.member_weeks(sim, neg_rate=0.2, seed=0)
    torch.manual_seed(0)
    m = A.ConversionTransformer(5, d_model=16, n_heads=4, n_layers=2)
    return sim, mw, m


def test_ig_completeness(small):
    _, mw, m = small
    b = mw.take(torch.arange(24))
    ig = A.ig_credits(m, b.ch, b.tb, steps=256)
    with torch.no_grad():
        e, ctx = m.parts(b.ch, b.tb)
        gap = m.encode(e + ctx, b.ch == 0)[0] - m.encode(ctx, b.ch == 0)[0]
    torch.testing.assert_close(ig.sum(1), gap, atol=1e-3, rtol=0)
    assert (ig[b.ch == 0] == 0).all()


def test_attention_credits_sum_to_one_and_skip_padding(small):
    _, mw, m = small
    b = mw.take(torch.arange(200))
    has = (b.ch > 0).any(1)
    for layer in (0, -1):
        a = A.attention_credits(m, b.ch, b.tb, layer=layer)
        torch.testing.assert_close(a[has].sum(1), torch.ones(int(has.sum())), atol=1e-5, rtol=0)
        assert (a[b.ch == 0] == 0).all() and (a >= 0).all()


def test_restrict_and_model_shapley(small):
    _, mw, m = small
    b = mw.take(torch.arange(50))
    ch, tb = A.restrict(b.ch, b.tb, torch.tensor([1, 3]))
    assert set(ch.unique().tolist()) <= {0, 1, 3}
    # same touches in the same order, re-packed to the front
    for r in range(50):
        keep = [(c, t) for c, t in zip(b.ch[r].tolist(), b.tb[r].tolist()) if c in (1, 3)]
        assert list(zip(ch[r].tolist(), tb[r].tolist()))[: len(keep)] == keep and (ch[r, len(keep):] == 0).all()
    fit = A.FitResult(m, [], 0.0, 0.2)
    phi = A.model_shapley_credits(fit, b, 5)
    full = float((b.wt * A.predict_proba(fit, b.ch, b.tb)).sum())
    none = float((b.wt * A.predict_proba(fit, *A.restrict(b.ch, b.tb, torch.tensor([], dtype=torch.long)))).sum())
    np.testing.assert_allclose(phi.sum(), full - none, rtol=1e-4)  # efficiency


def test_member_weeks_no_leak(small):
    sim, mw, _ = small
    conv = sim.members["conv_week"].to_numpy()
    w, i = mw.week.numpy(), mw.member.numpy()
    assert ((conv[i] < 0) | (w <= conv[i])).all()  # no week after a conversion
    np.testing.assert_array_equal(mw.y.numpy().astype(bool), w == conv[i])
    dt, wk = mw.dt.numpy(), np.repeat(w[:, None], mw.ch.shape[1], 1)
    real = mw.ch.numpy() > 0
    assert (dt[real] >= 0).all() and (dt[real] <= wk[real]).all() and (dt[~real] == -1).all()


def test_time_decay_limits():
    p = _random_paths(4).with_columns(dt=pl.col("path").list.eval(pl.int_range(pl.len()).reverse().cast(pl.Float64)))
    _close(A.time_decay(p, half_life=1e-6), A.last_touch(p), tol=1e-9)  # all weight on the last touch
    prop = _mta(p, allow_loops=True).linear(share="proportional").attribution["linear"]
    _close(A.time_decay(p, half_life=1e9), prop)  # flat weights: touch-proportional linear


def test_mmm_and_reconcile():
    rng = np.random.default_rng(0)
    W = 156
    x = rng.uniform(0, 100, (W, 2)) * (rng.random((W, 2)) < 0.6)
    y = 50 + 30 * A.hill(A.adstock(x[:, 0], 0.6), 80) + 10 * A.hill(A.adstock(x[:, 1], 0.0), 50) + rng.normal(0, 0.5, W)
    m = A.fit_mmm(pl.DataFrame({"conversions": y, "a": x[:, 0], "b": x[:, 1]}), ["a", "b"], alpha=1e-3)
    assert m.theta["a"] > m.theta["b"] and m.r2 > 0.9
    s = A.shares(m.contribution)
    true = A.shares({"a": (30 * A.hill(A.adstock(x[:, 0], 0.6), 80)).sum(), "b": (10 * A.hill(x[:, 1], 50)).sum()})
    assert abs(s["a"] - true["a"]) < 0.1
    assert A.reconcile({"x": 1.0}, {"x": 1.0, "tv": 1.0}, ["tv"], mode="channel") == {"x": 0.5, "tv": 0.5}


def test_run_world_smoke():
    tc = A.TrainConfig(d_model=8, n_layers=1, n_heads=2, epochs=1, ig_steps=4, ig_n=16, shapley_n=100)
    df = A.run_world("tv", 0, tc, n_members=300, n_weeks=16)
    assert {"auc", "l1", "spearman", "share", "mmm_r2"} <= set(df["metric"].unique().to_list())
    tr = df.filter((pl.col("method") == "truth") & (pl.col("metric") == "share"))
    np.testing.assert_allclose(tr["value"].sum(), 1.0)
    assert "tv" in tr["channel"].to_list()


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"channels has duplicates: \['email', 'email'\]"):
        A.world_config("main", channels=("email", "email", "a", "b", "c"))
    with pytest.raises(ValueError, match=r"null_channel must be one of \['display'"):
        A.world_config("main", null_channel="radio")
    with pytest.raises(ValueError, match="timing must be one of"):
        A.world_config("main", timing="linear")
    with pytest.raises(ValueError, match="rate needs one value per channel"):
        A.world_config("main", rate=(0.1,))
    hand = pl.DataFrame({"path": [["A", "B"]], "conversions": [1], "nulls": [0]})
    with pytest.raises(ValueError, match="conversions: negative counts"):
        A.markov_removal(hand.with_columns(conversions=pl.lit(-1)))
    with pytest.raises(ValueError, match="empty path"):
        A.shapley_paths(pl.DataFrame({"path": [[]], "conversions": [1], "nulls": [0]}, schema_overrides={"path": pl.List(pl.Utf8)}))
    with pytest.raises(ValueError, match=r"unknown channels \['B'\]; valid: \['A'\]"):
        A.check_paths(hand, ["A"])
    with pytest.raises(ValueError, match="channels has duplicates"):
        A.check_paths(hand, ["A", "A", "B"])
    with pytest.raises(ValueError, match="time_decay needs a `dt` column"):
        A.time_decay(hand)
    m = A.ConversionTransformer(3, d_model=8, n_heads=2, max_len=4)
    with pytest.raises(ValueError, match="exceed max_len=4"):
        m(torch.ones(2, 5, dtype=torch.long), torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"ch ids must be in \[0, 3\]"):
        m(torch.full((2, 3), 7), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="divisible by n_heads"):
        A.ConversionTransformer(3, d_model=10, n_heads=4)
    sim = A.simulate_journeys(A.world_config("main", n_members=50, n_weeks=8), 0)
    bad = A.Sim(sim.cfg, sim.touches.with_columns(week=pl.col("week") + 20), sim.members, sim.weekly, sim.base, sim.parts)
    with pytest.raises(ValueError, match=r"touches: weeks .*past the horizon n_weeks=8"):
        A.member_weeks(bad)
    with pytest.raises(ValueError, match=r"keep: unknown players \['radio'\]"):
        A.expected_conversions(sim, ["radio"])
    with pytest.raises(ValueError, match="kind must be one of"):
        A.true_credits(sim.cfg, sim, "banzhaf")
