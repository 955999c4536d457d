"""Tests for lipapers.world: determinism, the true probabilities against an independent recomputation from the public
frames, in-session context by brute force, chunking, baselines vs the oracle, bad arguments and bounded memory."""
import numpy as np
import polars as pl
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss, roc_auc_score

from lipapers.data import time_split
from lipapers.world import (FEED_FEATURES, FEED_SCHEMA, JOB_SCHEMA, POST_TYPES, World, WorldConfig, measure_write,
                            popularity_scores)

SMALL = dict(n_members=600, n_posts=1_500, n_jobs=300, n_companies=50)


@pytest.fixture(scope="module")
def world():
    return World.generate(seed=7, **SMALL)


@pytest.fixture(scope="module")
def feed(world):
    return world.feed_impressions(40_000)


def _frames(w):
    return [w.members, w.companies, w.jobs, w.posts, w.connections, w.skills, w.history]


def test_same_seed_same_frames_different_seed_different(world, feed):
    again = World.generate(seed=7, **SMALL)
    assert all(a.equals(b) for a, b in zip(_frames(world), _frames(again)))
    assert again.feed_impressions(40_000).equals(feed)
    assert again.job_impressions(5_000).equals(world.job_impressions(5_000))
    other = World.generate(seed=8, **SMALL)
    assert not other.members.equals(world.members) and not other.posts.equals(world.posts)
    assert not other.feed_impressions(5_000).equals(feed.head(5_000))
    assert not world.feed_impressions(5_000, stream=1).equals(feed.head(5_000))


def test_schemas_and_probability_ranges(world, feed):
    jobs = world.job_impressions(5_000)
    assert dict(feed.schema) == FEED_SCHEMA and dict(jobs.schema) == JOB_SCHEMA
    for df in (feed, jobs):
        for c in [c for c in df.columns if c.startswith("p_")]:
            assert df[c].is_between(0, 1).all(), c
    assert (feed["p_long_dwell"] <= feed["p_click"]).all()
    assert (feed["long_dwell"] <= feed["click"]).all() and (jobs["hired"] <= jobs["apply"]).all()


def test_chunking_does_not_change_rows(world, feed):
    parts = list(world.iter_impressions("feed", 40_000, chunk_size=7_000))
    assert [p.height for p in parts] == [7_000] * 5 + [5_000]
    assert pl.concat(parts).equals(feed)


def test_write_parquet_roundtrip(world, feed, tmp_path):
    paths = world.write_parquet(tmp_path / "feed", 40_000, chunk_size=15_000)
    assert len(paths) == 3
    assert pl.read_parquet(tmp_path / "feed" / "*.parquet").equals(feed)


def test_positions_and_session_context_brute_force(feed):
    sub = feed.filter(pl.col("session_id") < 300)
    for _, s in sub.group_by("session_id", maintain_order=True):
        assert s["position"].to_list() == list(range(1, s.height + 1))
        topics, authors = s["topic"].to_list(), s["author_id"].to_list()
        assert s["rep_topic"].to_list() == [topics[:i].count(t) for i, t in enumerate(topics)]
        assert s["rep_author"].to_list() == [authors[:i].count(a) for i, a in enumerate(authors)]
        assert s["member_id"].n_unique() == 1
    assert feed.group_by("session_id", "post_id").len()["len"].max() == 1  # a session never repeats a post


def test_true_probabilities_recomputed_from_public_frames(world, feed):
    """Rebuild p_click from the entity frames and the documented formula, independently of the generator's arrays."""
    c = world.cfg
    df = feed.head(3_000).join(world.posts.select("post_id", "embedding", "true_quality", "created_hours"), on="post_id",
                               maintain_order="left")
    df = df.join(world.members.select("member_id", "true_interest"), on="member_id", maintain_order="left")
    u, e = np.stack(df["true_interest"].to_numpy()), np.stack(df["embedding"].to_numpy())
    aff = (u * e).sum(1)
    hist = {(r["member_id"], r["topic"]): r["n"] for r in world.history.iter_rows(named=True)}
    h = np.array([hist.get((m, t), 0) for m, t in zip(df["member_id"], df["topic"])])
    edges = set(zip(world.connections["member_a"], world.connections["member_b"]))
    conn = np.array([(min(m, a), max(m, a)) in edges for m, a in zip(df["member_id"], df["author_id"])])
    age_days = (df["timestamp"].to_numpy() - df["position"].to_numpy() - 1_767_225_600) / 86400 - df["created_hours"].to_numpy() / 24
    ty = df["post_type"].to_numpy()  # index into POST_TYPES
    z = (c.b0 + c.affinity * aff + c.quality * df["true_quality"].to_numpy() + c.connection * conn + c.history * np.log1p(h)
         + c.rep_topic * df["rep_topic"].to_numpy() + c.rep_author * df["rep_author"].to_numpy()
         + c.recency * np.log1p(age_days) + np.asarray(c.type_effects)[ty])
    p = df["position"].to_numpy().astype(float) ** -c.eta / (1 + np.exp(-z))
    assert df["post_type"].max() < len(POST_TYPES)
    np.testing.assert_array_equal(conn, df["is_connection"].to_numpy())
    np.testing.assert_array_equal(h, df["history_topic"].to_numpy())
    np.testing.assert_allclose(aff, df["true_affinity"].to_numpy(), atol=1e-5)
    np.testing.assert_allclose(z, df["true_logit"].to_numpy(), atol=2e-3)  # float32 storage; age from rounded seconds
    np.testing.assert_allclose(p, df["p_click"].to_numpy(), atol=2e-4)


def test_outcomes_follow_probabilities(world, feed):
    n = feed.height
    for col, p in (("click", "p_click"), ("like", "p_like"), ("dismiss", "p_dismiss")):
        pp = feed[p].to_numpy().astype(float)
        se = np.sqrt((pp * (1 - pp)).sum()) / n
        assert abs(feed[col].mean() - pp.mean()) < 4 * se, col


def test_job_features_brute_force(world):
    jobs = world.job_impressions(2_000)
    ms = dict(zip(world.members["member_id"], world.members["skills"].to_list()))
    js = dict(zip(world.jobs["job_id"], world.jobs["skills"].to_list()))
    ov = [len(set(ms[m]) & set(js[j])) / len(js[j]) for m, j in zip(jobs["member_id"], jobs["job_id"])]
    np.testing.assert_allclose(ov, jobs["skill_overlap"].to_numpy(), atol=1e-6)
    np.testing.assert_allclose(world.job_logit(jobs["member_id"], jobs["job_id"]), jobs["true_logit"].to_numpy(), atol=1e-4)
    h = world.hires(20_000)
    assert h.height > 0 and set(h.columns) == {"member_id", "job_id", "company_id", "timestamp"}


def test_connections_are_a_simple_undirected_graph(world):
    e = world.connections
    assert (e["member_a"] < e["member_b"]).all() and e.unique().height == e.height
    deg = np.bincount(np.concatenate([e["member_a"], e["member_b"]]), minlength=world.cfg.n_members)
    assert abs(deg.mean() - world.cfg.mean_degree) < 0.15 * world.cfg.mean_degree


def test_oracle_beats_logistic_regression_beats_popularity(world, feed):
    tr, te = time_split(feed, test_frac=0.25)
    (Xtr, names), (Xte, _) = world.feed_features(tr), world.feed_features(te)
    assert names == FEED_FEATURES
    lr = LogisticRegression(max_iter=1000).fit(Xtr, tr["click"].to_numpy())
    y = te["click"].to_numpy()
    s = {"oracle": te["p_click"].to_numpy().astype(float), "lr": lr.predict_proba(Xte)[:, 1], "pop": popularity_scores(tr, te)}
    auc = {k: roc_auc_score(y, v) for k, v in s.items()}
    ll = {k: log_loss(y, np.clip(v, 1e-7, 1 - 1e-7)) for k, v in s.items()}
    assert auc["oracle"] > auc["lr"] > auc["pop"], auc
    assert ll["oracle"] < ll["lr"] < ll["pop"], ll


def test_no_position_bias_when_eta_zero():
    w = World.generate(seed=1, eta=0.0, **SMALL)
    assert (w.feed_impressions(2_000)["p_exam"] == 1).all()


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_members=-3), "n_members must be a positive int"),
    (dict(n_posts=0), "n_posts must be a positive int"),
    (dict(dim=2.5), "dim must be a positive int"),
    (dict(feed_sources=(0.7, 0.7, -0.4)), "probabilities in \\[0, 1\\]"),
    (dict(job_sources=(0.5, 0.5)), "3 probabilities"),
    (dict(eta=-1.0), "eta must be >= 0"),
    (dict(session_len=0.5), "session_len must be >= 1"),
    (dict(type_effects=(0.0,)), "type_effects needs 4 values"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        World.generate(seed=0, **kwargs)


def test_bad_arguments(world):
    with pytest.raises(TypeError, match="unknown WorldConfig field"):
        World.generate(seed=0, n_users=10)
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        World.generate(seed=-1)
    with pytest.raises(ValueError, match="n must be a positive int"):
        world.feed_impressions(0)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        world.iter_impressions("feed", 10, chunk_size=-5)
    with pytest.raises(ValueError, match="kind must be 'feed' or 'job'"):
        world.write_parquet("/tmp/never_written", 10, kind="ads")
    with pytest.raises(ValueError, match="n_members must be a positive int"):
        measure_write([10], n_members=0)
    with pytest.raises(ValueError):
        WorldConfig(n_members=1)


def test_chunked_generation_memory_is_bounded():
    """Peak memory (measured) of streaming 400k impressions in 50k chunks stays close to streaming 100k."""
    m = measure_write([100_000, 400_000], 50_000, n_members=2_000, n_posts=5_000, n_jobs=500)
    small, large = m["peak_mib"].to_list()
    assert large < small + 40, (small, large)
    assert large < 400
    assert m["parts"].to_list() == [2, 8]


# ---------------------------------------------------------------- world v2 (issue 14)
import hashlib  # noqa: E402

from lipapers.world import (CROSS_TERMS, FEED_TASKS, HISTORY_SCHEMA, KNOBS, SLATE_TERMS, START_EPOCH,  # noqa: E402
                            TYPE_CROSS)

ON = dict(cross_strength=1.0, n_interests=3, drift=1.0, task_corr=0.0, heterogeneity=1.0, activity_skew=1.0,
          slate_effects=1.0, exposure="uniform")
V1_COLS = ["session_id", "member_id", "post_id", "author_id", "topic", "post_type", "position", "timestamp", "age_hours",
           "source", "is_connection", "history_topic", "rep_topic", "rep_author", "true_affinity", "true_logit", "p_exam",
           "p_click", "p_like", "p_comment", "p_long_dwell", "p_dismiss", "click", "like", "comment", "long_dwell", "dismiss"]


def _digest(df, cols):
    h = hashlib.sha256()
    for c in cols:
        s = df[c]
        if s.dtype in (pl.Float32, pl.Float64):
            s = (s * 1e3).round().cast(pl.Int64)
        h.update(s.to_numpy().tobytes())
    return h.hexdigest()[:16]


def test_knobs_off_reproduce_the_v1_world_draw_for_draw():
    """Digests of the v1 generator's output (commit 389154f, before the knobs existed) for this seed and size."""
    w = World.generate(seed=7, **SMALL, **{k: v[0] for k, v in KNOBS.items()})
    f = w.feed_impressions(20_000)
    assert _digest(f, V1_COLS) == "d065e3b24c7839a9"
    assert _digest(w.members, ["member_id", "seniority", "company_id", "activity", "history_len"]) == "4476472c2dbc2d2a"
    assert _digest(w.posts, ["post_id", "author_id", "topic", "created_hours", "true_quality"]) == "1d725588df92ead9"
    assert f["click"].mean() == pytest.approx(0.05685, abs=1e-9)  # v1 click rate on this sample


@pytest.mark.parametrize("knob", [k for k in ON])
def test_same_seed_same_frames_for_every_knob(knob):
    kw = dict(SMALL, n_members=300, n_posts=600, n_jobs=100, **{knob: ON[knob]})
    a, b = World.generate(seed=3, **kw), World.generate(seed=3, **kw)
    fa = a.feed_impressions(3_000)
    assert fa.equals(b.feed_impressions(3_000)) and a.job_impressions(1_000).equals(b.job_impressions(1_000))
    assert not fa.equals(World.generate(seed=4, **kw).feed_impressions(3_000))
    off = World.generate(seed=3, **dict(SMALL, n_members=300, n_posts=600, n_jobs=100)).feed_impressions(3_000)
    assert not fa["p_click"].equals(off["p_click"])  # the knob changes the truth


@pytest.fixture(scope="module")
def on_world():
    return World.generate(seed=11, **{**ON, "exposure": "sourced"}, **SMALL)


def test_all_on_oracle_calibrated_per_decile(on_world):
    f = on_world.feed_impressions(120_000)
    for c in [c for c in f.columns if c.startswith("p_") and c != "p_exam"]:
        assert ((f[c] > 0) & (f[c] < 1)).all(), c
    assert ((f["p_exam"] > 0) & (f["p_exam"] <= 1)).all()
    d = f.with_columns(dec=pl.col("p_click").qcut(10, labels=[str(i) for i in range(10)], allow_duplicates=True))
    g = d.group_by("dec").agg(n=pl.len(), y=pl.col("click").mean(), p=pl.col("p_click").cast(pl.Float64).mean(),
                              v=(pl.col("p_click").cast(pl.Float64) * (1 - pl.col("p_click"))).sum())
    z = ((g["y"] - g["p"]).abs() / (g["v"].sqrt() / g["n"])).to_numpy()
    assert (z < 3).all(), g.sort("dec")


def test_cross_terms_recomputed_from_public_columns():
    """Same seed with κ = 1 vs 0: the feed logging order is unchanged, so rows align; the logit difference is the
    documented CROSS_TERMS formula computed from public columns."""
    off, on = World.generate(seed=5, **SMALL), World.generate(seed=5, cross_strength=1.0, **SMALL)
    a, b = off.feed_impressions(5_000), on.feed_impressions(5_000)
    assert a["post_id"].equals(b["post_id"])
    mem = off.members.select("member_id", "seniority", "industry")
    df = b.join(mem, on="member_id", how="left", maintain_order="left")
    ind = {n: i for i, n in enumerate(["Software", "Finance", "Healthcare", "Education", "Retail", "Manufacturing",
                                        "Media", "Consulting"])}
    prof = off.ind_topic  # industry topic profile: top-3 topics by weight
    top3 = {(g, t) for g in range(len(prof)) for t in np.argsort(-prof[g])[:3]}
    s = (df["seniority"].to_numpy() - 3) / 3
    ty = np.asarray(TYPE_CROSS)[df["post_type"].to_numpy()]
    match = np.array([(ind[i], t) in top3 for i, t in zip(df["industry"], df["topic"])])
    hour = ((df["timestamp"] - df["position"]).to_numpy() - START_EPOCH) // 3600 % 24
    work, conn = (hour >= 9) & (hour < 17), df["is_connection"].to_numpy()
    fresh = df["age_hours"].to_numpy() < 24
    want = (CROSS_TERMS["seniority_x_type"][0] * s * ty + CROSS_TERMS["industry_x_topic_x_hour"][0] * (2 * match - 1)
            * (2 * work - 1) + CROSS_TERMS["connection_x_fresh"][0] * (2 * conn - 1) * (2 * fresh - 1))
    near_edge = np.abs(df["age_hours"].to_numpy() - 24) < 1e-3  # float32 storage of the age
    got = (b["true_logit"] - a["true_logit"]).to_numpy()
    np.testing.assert_allclose(got[~near_edge], want[~near_edge], atol=2e-5)
    j = off.job_impressions(2_000)
    m, jid = j["member_id"].to_numpy(), j["job_id"].to_numpy()
    ov, gap = j["skill_overlap"].to_numpy(), j["seniority_gap"].to_numpy()
    sl, si = j["same_location"].to_numpy(), j["same_industry"].to_numpy()
    sm = (off.members["seniority"].to_numpy()[m] - 3) / 3
    wantj = (CROSS_TERMS["overlap_x_gap"][0] * (ov - 0.5) * (gap - 1) + CROSS_TERMS["location_x_industry"][0]
             * (2 * sl - 1) * (2 * si - 1) + CROSS_TERMS["seniority_x_industry_x_overlap"][0] * sm * (2 * si - 1) * (ov - 0.5))
    np.testing.assert_allclose(on.job_logit(m, jid) - off.job_logit(m, jid), wantj, atol=1e-5)


def test_interest_prototypes_soft_maximum():
    w1, w3 = World.generate(seed=2, **SMALL), World.generate(seed=2, n_interests=3, **SMALL)
    m, p = np.repeat(np.arange(50), 30), np.tile(np.arange(30), 50)
    np.testing.assert_allclose(w1.affinity(m, p), (w1.u[m] * w1.e[p]).sum(1), atol=1e-12)
    cos = np.einsum("nkd,nd->nk", w3.U[m].astype(float), w3.e[p])
    tau = w3.cfg.interest_temp
    want = tau * np.log(np.exp(cos / tau).mean(1))
    np.testing.assert_allclose(w3.affinity(m, p), want, atol=1e-6)
    assert (want <= cos.max(1) + 1e-9).all() and (want >= cos.max(1) - tau * np.log(3) - 1e-9).all()
    np.testing.assert_allclose(w3.U[:, 0], w1.u, atol=1e-6)  # prototype 0 is the v1 interest


def test_drift_moves_interests_and_starts_at_u():
    w = World.generate(seed=2, drift=1.0, **SMALL)
    m, p = np.arange(200), np.arange(200)
    t0 = -w.cfg.post_age_days * 24
    np.testing.assert_allclose(w.affinity(m, p, t0), (w.u[m] * w.e[p]).sum(1), atol=1e-6)
    end = w.affinity(m, p, w.cfg.horizon_days * 24)
    assert np.abs(end - w.affinity(m, p, t0)).mean() > 0.1
    still = World.generate(seed=2, **SMALL)
    np.testing.assert_array_equal(still.affinity(m, p, 0.0), still.affinity(m, p, 500.0))


def test_task_corr_one_is_a_shared_logit_zero_decouples():
    def rank_corr(w):
        f = w.feed_impressions(20_000)
        a, b = (f["p_click"] / f["p_exam"]).rank(), (f["p_like"] / f["p_exam"]).rank()
        return np.corrcoef(a.to_numpy(), b.to_numpy())[0, 1]
    assert rank_corr(World.generate(seed=1, **SMALL)) > 0.999
    assert rank_corr(World.generate(seed=1, task_corr=0.0, **SMALL)) < 0.8


def test_heterogeneity_and_activity_skew():
    off, het = World.generate(seed=1, **SMALL), World.generate(seed=1, heterogeneity=1.0, **SMALL)
    p = np.flatnonzero(off.p_type == 3)[:1].repeat(300)  # one article post for 300 members
    d = het.post_logit(np.arange(300), p) - off.post_logit(np.arange(300), p)
    assert d.std() > 0.1 and abs(d.mean()) < 4 * d.std() / np.sqrt(300)
    sk = World.generate(seed=1, activity_skew=1.0, **SMALL)
    assert np.log(sk.m_act).std() == pytest.approx(2 * np.log(off.m_act).std(), rel=1e-9)
    heavy = lambda w: (w.activity_bucket(np.arange(600)) == "heavy").mean()
    assert heavy(sk) > heavy(off)
    assert set(off.activity_bucket(np.arange(600))) <= {"sparse", "medium", "heavy"}


def test_histories_sorted_and_history_before_never_leaks():
    w = World.generate(seed=4, drift=1.0, **SMALL)
    h = w.histories(5_000)
    assert dict(h.schema) == HISTORY_SCHEMA and h.height == 5_000 and h["timestamp"].is_sorted()
    posts = h.filter(pl.col("kind") == "post").join(w.posts.select(pl.col("post_id").alias("item_id"), "created_hours"),
                                                   on="item_id")
    assert ((posts["timestamp"] - START_EPOCH) / 3600 >= posts["created_hours"]).all()  # no event before its post exists
    imps = w.feed_impressions(2_000)
    q = w.history_before(imps["member_id"].to_numpy(), imps["timestamp"].to_numpy(), 20)
    ts = np.where(q["item_id"] >= 0, q["timestamp"], 0)
    assert (ts < imps["timestamp"].to_numpy()[:, None]).all()
    assert (np.diff(q["timestamp"], axis=1)[q["item_id"][:, :-1] >= 0] >= 0).all()  # oldest first
    log = w._history_index(0)[0]
    for i in range(0, 2_000, 97):  # brute force: the last 20 events of the member strictly before t
        mm, t = imps["member_id"][i], imps["timestamp"][i]
        sel = (log["member_id"] == mm) & (log["timestamp"] < t)
        want = log["item_id"][sel][-20:]
        assert q["length"][i] == len(want) and q["item_id"][i][20 - len(want):].tolist() == want.tolist()


def test_histories_with_more_jobs_than_posts():
    # regression: job events were checked against post creation times by job id (IndexError when n_jobs > n_posts)
    w = World.generate(seed=2, **dict(SMALL, n_posts=300, n_jobs=1_000))
    h = w.histories(3_000)
    jobs = h.filter(pl.col("kind") == "job")["item_id"]
    assert h.height == 3_000 and jobs.len() > 0 and jobs.max() >= 300 and jobs.max() < 1_000
    posts = h.filter(pl.col("kind") == "post")["item_id"]
    assert posts.max() < 300


def test_slate_value_exact_vs_monte_carlo_and_logged_sessions():
    w0 = World.generate(seed=6, **SMALL)
    f = w0.feed_impressions(3_000)
    for sid in f["session_id"].unique().sort()[:20]:  # slate_effects = 0: the sum of the logged per-slot probabilities
        s = f.filter(pl.col("session_id") == sid)
        t = int(s["timestamp"][0] - s["position"][0])
        v = w0.slate_value(int(s["member_id"][0]), s["post_id"].to_numpy(), t)
        assert v == pytest.approx(float(s["p_click"].cast(pl.Float64).sum()), abs=1e-5)
    w = World.generate(seed=6, slate_effects=1.0, **SMALL)
    slate, t = np.array([5, 17, 33, 8, 90, 41]), START_EPOCH + 3 * 86400
    v, draws = w.slate_value(2, slate, t), w.sample_slate(2, slate, t, n_samples=40_000).sum(1)
    assert abs(draws.mean() - v) < 3 * draws.std() / np.sqrt(len(draws))
    p0, p1 = w0._slate_probs(2, slate, t)[0], w._slate_probs(2, slate, t)[0]
    ex = np.arange(1, 7) ** -w.cfg.eta
    z0, z1 = np.log(p0 / ex / (1 - p0 / ex)), np.log(p1 / ex / (1 - p1 / ex))
    top, au = w.p_topic[slate], w.p_author[slate]
    rt = np.array([(top[:k] == top[k]).sum() for k in range(6)]); ra = np.array([(au[:k] == au[k]).sum() for k in range(6)])
    S = SLATE_TERMS
    want = S["rep_topic"] * rt + S["rep_author"] * ra + S["diversity"] * ((rt == 0) & (np.arange(6) > 0)) + S["fatigue"] * np.arange(6)
    np.testing.assert_allclose(z1 - z0, want, atol=1e-8)


def test_logging_propensities():
    w = World.generate(seed=8, **SMALL)
    items, t = np.array([3, 9, 27, 81, 243]), START_EPOCH + 86400
    P, se = w.logging_propensities(1, items, t)
    np.testing.assert_allclose(P.sum(0), 1, atol=1e-12); np.testing.assert_allclose(P.sum(1), 1, atol=1e-12)
    s = 2.5 * (w.u[1] * w.e[items]).sum(1) + w.q[items]  # independent Monte Carlo of the Gumbel policy
    o = np.argsort(-(s + np.random.default_rng(0).gumbel(size=(50_000, 5))), 1)
    mc = np.stack([np.bincount(o[:, k], minlength=5) for k in range(5)], 1) / 50_000
    assert (np.abs(mc - P) < 4 * np.sqrt(P * (1 - P) / 50_000) + 1e-9).all()
    P8, se8 = w.logging_propensities(1, np.arange(8), t, n_samples=5_000)
    np.testing.assert_allclose(P8.sum(0), 1, atol=1e-12)
    assert (se8 > 0).any()
    f = w.feed_impressions(2_000)  # logged column: w_k / Σ_{j ≥ k} w_j within the session
    df = f.join(w.posts.select("post_id", "true_quality"), on="post_id", maintain_order="left")
    df = df.filter(pl.col("session_id") < df["session_id"].max())  # the last session is cut by head(n)
    for _, s_ in df.group_by("session_id", maintain_order=True):
        wk = np.exp(2.5 * s_["true_affinity"].cast(pl.Float64).to_numpy() + s_["true_quality"].to_numpy())
        want = wk / np.cumsum(wk[::-1])[::-1]
        np.testing.assert_allclose(s_["propensity"].to_numpy(), want, rtol=1e-4)
    u = World.generate(seed=8, exposure="uniform", **SMALL).feed_impressions(3_000)
    assert (u["source"] == 2).all()
    u = u.filter(pl.col("session_id") < u["session_id"].max())
    L = u.group_by("session_id").len()
    u = u.join(L, on="session_id")
    np.testing.assert_allclose(u["propensity"].to_numpy(), 1 / (u["len"] - u["position"] + 1).to_numpy(), rtol=1e-6)


def test_jobs_side_titles_skills_applications_hires():
    w = World.generate(seed=9, hire_merit=2.0, **SMALL)
    assert w.jobs["title"].str.split(" ").list.first().is_in(["Intern", "Entry", "Associate", "Senior", "Manager",
                                                               "Director", "Executive"]).all()
    assert w.skills["name"].n_unique() == w.cfg.n_skills and w.skills["category"].null_count() == 0
    a, h = w.applications(40_000), w.hires(40_000)
    assert h.height == a["hired"].sum() and h.height > 0
    merit = w.m_merit[a["member_id"].to_numpy()]
    assert a["p_hire"].to_numpy()[merit > 1].mean() > a["p_hire"].to_numpy()[merit < -1].mean()  # recruiter side


def test_text_is_deterministic_and_names_the_attributes():
    a, b = World.generate(seed=3, **SMALL), World.generate(seed=3, **SMALL)
    m = a.members.row(5, named=True)
    s = a.describe_member(5)
    assert s == b.describe_member(5) and m["title"] in s and m["industry"] in s and m["location"] in s
    j = a.jobs.row(4, named=True)
    sj = a.describe_job(4)
    assert sj == b.describe_job(4) and j["title"] in sj and j["location"] in sj
    assert a.posts["post_type"][7] in a.describe_post(7)
    t = START_EPOCH + 20 * 86400
    assert a.history_text(5, t, 5) == b.history_text(5, t, 5) and "Activity of" in a.history_text(5, t, 5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_interests=0), "n_interests must be an int >= 1"),
    (dict(n_interests=2.5), "n_interests must be an int >= 1"),
    (dict(cross_strength=-0.1), "cross_strength must be >= 0"),
    (dict(task_corr=1.5), "task_corr must be in \\[0, 1\\]"),
    (dict(exposure="random"), "exposure must be one of 'sourced', 'uniform'"),
    (dict(drift=-1.0), "drift must be >= 0"),
    (dict(slate_effects=float("nan")), "slate_effects must be >= 0"),
])
def test_bad_knobs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        World.generate(seed=0, **kwargs)


def test_bad_slates_and_times(world):
    t = START_EPOCH + 86400
    with pytest.raises(TypeError, match="unknown WorldConfig field.*cross_strenght"):
        World.generate(seed=0, cross_strenght=1.0)
    with pytest.raises(ValueError, match="duplicate post ids"):
        world.slate_value(0, [1, 2, 1], t)
    with pytest.raises(ValueError, match="unknown post ids \\[99999\\]"):
        world.slate_value(0, [1, 99999], t)
    with pytest.raises(ValueError, match="t must be epoch seconds in"):
        world.slate_value(0, [1, 2], START_EPOCH - 10)
    with pytest.raises(ValueError, match="t must be epoch seconds in"):
        world.history_before([0], START_EPOCH + 10**8, 5)
    with pytest.raises(ValueError, match="member_ids must be ints in"):
        world.history_before([10**6], t, 5)
    with pytest.raises(ValueError, match="task must be one of"):
        world.slate_value(0, [1, 2], t, task="purchase")
