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
