"""lipapers.jobs: link enumeration and pruning against brute force, L1 and ratio on a hand case, liquidity, the
batch-softmax loss against F.cross_entropy, hybrid search against exact V2 and the numpy oracle, budget utilization,
and the bad-input contract."""
import itertools
from collections import Counter

import numpy as np
import polars as pl
import pytest
import torch
import torch.nn.functional as F

from lipapers.jobs import (LinkSet, Templates, _combos, batch_softmax_loss, budget_utilization, hybrid_search,
                           learn_links, link_retrieve, link_scores, meta_links, n_easy, recall_at_ks, faiss_topk,
                           train_two_tower, TwoTower, tower_cards, inbatch_kl, balance_log, job_world)
from lipapers.linr import C, Index, SCHEMA, filter_for_pass_rate, oracle_topk, synthetic_items


def _random_templates(seed=0, n_m=30, n_j=25, names=("a", "b", "c", "d")):
    rng = np.random.default_rng(seed)
    voc = {n: int(rng.integers(2, 5)) for n in names}
    return Templates({n: rng.integers(0, voc[n], n_m) for n in names}, {n: rng.integers(0, voc[n], n_j) for n in names},
                     names)


def _apps(T, n=400, seed=0):
    rng = np.random.default_rng(seed)
    m, j = rng.integers(0, len(T.member["a"]), n), rng.integers(0, len(T.job["a"]), n)
    hired = (rng.random(n) < 0.15 + 0.5 * (T.member["a"][m] == T.job["a"][j])).astype(np.int8)
    return pl.DataFrame(dict(member_id=m, job_id=j, hired=hired))


@pytest.mark.parametrize("k,order", [(1, 1), (3, 2), (4, 2), (4, 4), (5, 3)])
def test_link_count_matches_itertools(k, order):
    names = tuple("abcde"[:k])
    T = _random_templates(names=names)
    X, links = meta_links({n: T.member[n][:7] for n in names}, {n: T.job[n][:7] for n in names}, T, order)
    n_comb = sum(1 for r in range(1, order + 1) for _ in itertools.combinations(names, r))
    assert (X.sum(1).A1 == n_comb).all()
    assert len(_combos(names, order)) == n_comb
    assert links["combo"].max() == n_comb - 1


def test_pruning_and_ratio_equal_brute_force():
    T = _random_templates(1)
    apps = _apps(T, seed=1)
    ls = learn_links(apps, T, "ratio", min_support=3, max_order=2)
    m, j, y = (apps[c].to_numpy() for c in ("member_id", "job_id", "hired"))
    H, N = y.sum(), len(y) - y.sum()
    cnt = Counter()
    for mm, jj, yy in zip(m, j, y):  # brute force: every combination's (member values, job values) per application
        for ci, c in enumerate(_combos(T.names, 2)):
            key = (ci, tuple(int(T.member[t][mm]) for t in c), tuple(int(T.job[t][jj]) for t in c))
            cnt[key + ("s",)] += 1; cnt[key + ("h",)] += int(yy)
    want = {}
    for key in {k[:3] for k in cnt}:
        s, h = cnt[key + ("s",)], cnt[key + ("h",)]
        if s >= 3 and h * N >= (s - h) * H and h > 0: want[key] = h / (s - h + 1)
    got = {}
    for r in ls.links.iter_rows(named=True):
        c = _combos(T.names, 2)[r["combo"]]
        vocab = [T.vocab[t] for t in c]
        mv = np.unravel_index(r["m_code"], vocab) if len(c) > 1 else (r["m_code"],)
        jv = np.unravel_index(r["j_code"], vocab) if len(c) > 1 else (r["j_code"],)
        got[(r["combo"], tuple(int(x) for x in mv), tuple(int(x) for x in jv))] = r["quality"]
    assert got.keys() == want.keys()
    for k in want: assert got[k] == pytest.approx(want[k])


def test_l1_keeps_the_deciding_link_only():
    T = Templates(dict(a=np.array([0, 1, 0, 1]), b=np.array([0, 1, 1, 0])), dict(a=np.array([0, 1]), b=np.array([0, 1])),
                  ("a", "b"))
    apps = pl.DataFrame(dict(member_id=np.repeat([0, 1, 2, 3], 10), job_id=np.tile([0, 1], 20)))
    apps = apps.with_columns(hired=((pl.col("member_id") % 2 == 1) & (pl.col("job_id") == 1)).cast(pl.Int8))
    ls = learn_links(apps, T, "l1", C=10.0, max_order=1)
    assert ls.links.select("combo", "m_code", "j_code").rows() == [(0, 1, 1)]
    s = link_scores(ls, [1, 3, 0], [1, 1, 1])
    assert np.isfinite(s[:2]).all() and s[2] == -np.inf


def test_liquidity_stops_at_the_first_link_reaching_theta():
    T = Templates(dict(a=np.array([0])), dict(a=np.array([0, 0, 1, 1, 1, 2])), ("a",))
    links = pl.DataFrame(dict(link=[0, 1, 2], combo=[0, 0, 0], m_code=[0, 0, 0], j_code=[1, 0, 2],
                              quality=[3.0, 2.0, 1.0]))
    ls = LinkSet(links, T, _combos(("a",), 1), "hand", 3)
    assert link_retrieve(ls, [0], liquidity=3)[0].tolist() == [2, 3, 4]
    assert link_retrieve(ls, [0], liquidity=4)[0].tolist() == [0, 1, 2, 3, 4]
    assert link_retrieve(ls, [0])[0].tolist() == [0, 1, 2, 3, 4, 5]


def test_loss_limits():
    g = torch.Generator().manual_seed(1)
    u, v = F.normalize(torch.randn(7, 5, generator=g), dim=1), F.normalize(torch.randn(11, 5, generator=g), dim=1)
    ids = torch.arange(11)
    torch.testing.assert_close(batch_softmax_loss(u, v[:7], ids[:7]), F.cross_entropy(u @ v[:7].T / 0.1, torch.arange(7)))
    full = batch_softmax_loss(u, v[:7], ids[:7], v[7:], ids[7:])
    torch.testing.assert_close(batch_softmax_loss(u, v[:7], ids[:7], v[7:], ids[7:], hard_k=10), full)
    # top-K equals sorting the negatives by score and keeping the K largest
    z = u @ v.T / 0.1
    neg = z.clone(); neg[torch.arange(7), torch.arange(7)] = float("-inf")
    top = neg.sort(1, descending=True).values[:, :3]
    ref = F.cross_entropy(torch.cat([z.diagonal()[:7, None], top], 1), torch.zeros(7, dtype=torch.long))
    torch.testing.assert_close(batch_softmax_loss(u, v[:7], ids[:7], v[7:], ids[7:], hard_k=3), ref)
    # an accidental hit (the row's own job among the easy negatives) is masked
    dup = batch_softmax_loss(u, v[:7], ids[:7], v[:1], ids[:1])
    ref2 = F.cross_entropy(torch.cat([u @ v[:7].T, torch.cat([torch.full((1, 1), float("-inf")),
                                                                 u[1:] @ v[:1].T])], 1) / 0.1, torch.arange(7))
    torch.testing.assert_close(dup, ref2)


def test_hybrid_search_equals_exact_and_oracle():
    X, A = synthetic_items(1500, 12, n_clusters=6, seed=3)
    ix = Index(12, SCHEMA, capacity=1500, n_bits=512, seed=3).upsert(torch.arange(1500), X, A)
    cnf = filter_for_pass_rate(A["title"], 0.1, 0, np.random.default_rng(3))
    Q = F.normalize(X[:5] + 0.2 * torch.randn(5, 12), dim=1)
    ex = ix.search(Q, 7, cnf, variant="v2")[1]
    An = {a: v.numpy() for a, v in A.items()}
    for b in range(5): assert ex[b].tolist() == oracle_topk(X.numpy(), An, Q[b].numpy(), cnf, 7).tolist()
    assert torch.equal(hybrid_search(ix, Q, 7, cnf)[1], ex)
    P = int(ix.mask(cnf).sum())
    assert torch.equal(hybrid_search(ix, Q, 7, cnf, quant_k=P)[1], ex)
    _, _, n = hybrid_search(ix, Q, 7, cnf, quant_k=20)
    assert int(n.max()) <= 20


def test_budget_utilization_hand_case():
    u = budget_utilization(([0, 1, 2, 0], [0, 0, 1, 2]), np.array([1.0, 0.5, 2.0]), [0.6, 0.7, 0.9, 0.4],
                           [True, True, True, False])
    assert u == pytest.approx((1.0 + 0.5 + 0.0) / 3.5)


def test_recall_and_faiss_topk_against_torch():
    U, V = F.normalize(torch.randn(4, 6), dim=1), F.normalize(torch.randn(33, 6), dim=1)
    assert np.array_equal(faiss_topk(U, V, 5), (U @ V.T).topk(5, dim=1).indices.numpy())
    assert recall_at_ks(np.array([[1, 2], [3, 4]]), np.array([0, 1, 1]), np.array([2, 3, 9]), [1, 2]) == {1: 1 / 3,
                                                                                                       2: 2 / 3}


def test_bad_input():
    T = _random_templates()
    with pytest.raises(ValueError, match="unknown template"): Templates(T.member, T.job, ("a", "zz"))
    with pytest.raises(ValueError, match="unknown template"): meta_links(T.member, T.job, ["a", "q"])
    with pytest.raises(ValueError, match="max_order"): meta_links(T.member, T.job, T, max_order=5)
    with pytest.raises(ValueError, match="easy_frac"): n_easy(1.0, 8)
    with pytest.raises(ValueError, match="easy_frac"): n_easy(-0.1, 8)
    apps = _apps(T)
    with pytest.raises(ValueError, match="hire label"): learn_links(apps.drop("hired"), T)
    with pytest.raises(ValueError, match="hire label"):
        learn_links(apps.with_columns(hired=pl.lit(None, pl.Int8)), T)
    with pytest.raises(ValueError, match="> 0"): budget_utilization(([0], [0]), np.array([1.0, -1.0]), [1.0], [True])
    mc, jc = (tower_cards(T, np.ones((len(T.member["a"]), 3), bool), "member"),
              tower_cards(T, np.ones((len(T.job["a"]), 3), bool), "job"))
    model = TwoTower(mc, jc, dim=4, hidden=8)
    pairs = (np.arange(10), np.arange(10))
    with pytest.raises(ValueError, match="hard_k"): train_two_tower(model, pairs, 0.0, hard_k=0, steps=1, batch=8)
    with pytest.raises(ValueError, match="hard_k"): train_two_tower(model, pairs, 0.0, hard_k=8, steps=1, batch=8)
    X, A = synthetic_items(200, 8, seed=0)
    ix = Index(8, SCHEMA, capacity=200, n_bits=64).upsert(torch.arange(200), X, A)
    with pytest.raises(ValueError, match="quant_k"): hybrid_search(ix, X[:2], 5, None, quant_k=4)
    with pytest.raises(ValueError, match="unknown attribute"): hybrid_search(ix, X[:2], 5, [C("nope", 1)])


def test_two_tower_learns_a_planted_pairing():
    torch.manual_seed(0)
    n = 40
    T = Templates(dict(a=np.arange(n)), dict(a=np.arange(n)), ("a",))
    sk = np.zeros((n, 1), bool); sk[:, 0] = True
    model = TwoTower(tower_cards(T, sk, "member"), tower_cards(T, sk, "job"), dim=8, hidden=16)
    pairs = (np.arange(n), np.arange(n))  # member i applies to job i
    losses = train_two_tower(model, pairs, 0.5, steps=150, batch=16, lr=0.03)
    with torch.no_grad(): top = faiss_topk(model.members(torch.arange(n)), model.jobs(), 5)
    assert losses[-1] < losses[0]
    assert recall_at_ks(top, np.arange(n), np.arange(n), [5])[5] > 0.5


@pytest.mark.parametrize("n_jobs,n", [(7, 50), (300, 20_000), (1000, 3000)])
def test_inbatch_kl_against_scipy_and_limits(n_jobs, n):
    from scipy.stats import entropy
    j = np.random.default_rng(n_jobs).zipf(1.3, n) % n_jobs
    c = np.bincount(j, minlength=n_jobs)
    want = np.log(n_jobs) - entropy(c) - ((c > 0).sum() - 1) / (2 * n)  # KL = log N − (plug-in H + (K − 1)/2n)
    assert inbatch_kl(j, n_jobs) == pytest.approx(want, abs=1e-9)
    assert inbatch_kl(np.zeros(5, int), n_jobs) == pytest.approx(np.log(n_jobs))  # all on one job: log N
    u = np.random.default_rng(1).integers(0, n_jobs, 50 * n_jobs)  # uniform applies: the corrected KL is ≈ 0
    assert abs(inbatch_kl(u, n_jobs)) < 0.01


def test_balance_log_flattens_the_marginal_and_keeps_rows():
    rng = np.random.default_rng(0)
    j = rng.zipf(1.5, 30_000) % 200
    apps = pl.DataFrame(dict(member_id=np.arange(len(j)), job_id=j, hired=np.zeros(len(j), np.int8)))
    b = balance_log(apps, seed=1)
    assert len(b) == len(apps) and set(b["member_id"].to_list()) <= set(apps["member_id"].to_list())
    assert (b.join(apps, on="member_id")["job_id_right"] == b["job_id"]).all()  # rows are copies, not new pairs
    cb, ca = np.bincount(b["job_id"], minlength=200), np.bincount(j, minlength=200)
    assert set(np.flatnonzero(cb)) <= set(np.flatnonzero(ca))
    assert inbatch_kl(b["job_id"], 200) < 0.05 < 0.5 < inbatch_kl(j, 200)
    assert b.equals(balance_log(apps, seed=1))


def test_job_world_controls():
    from lipapers.world import WorldConfig
    w = job_world("links", "negative", 0, 200, 200)
    assert w.cfg.hire_skill == 0 and w.cfg.hire_seniority == 0 and w.cfg.exposure == "sourced"
    u = job_world("ebr", "positive", 0, 200, 200, "uniform")
    assert u.cfg.exposure == "uniform" and u.cfg.hire_skill == WorldConfig().hire_skill
    assert np.array_equal(u.j_ind, w.j_ind) and np.array_equal(u.m_skills, w.m_skills)  # same entities
