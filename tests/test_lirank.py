"""Tests of lipapers.lirank: each layer against its formula or a limiting case, the planted crosses against the world's
oracle, the baselines wired through lipapers.baselines, the experiment functions on tiny worlds, and the error contract.

Tolerances: float32 layers use torch.testing defaults (rtol 1.3e-6, atol 1e-5); float64 checks use rtol 1e-7/1e-10;
the quantization bound is s/2 per row plus float32 rounding of m and s (relative 1e-4 of s, absolute 1e-7); the planted
cross terms are compared in float32 (the world stores true_logit as float32): atol 1e-4."""
import math

import numpy as np
import polars as pl
import pytest
import torch

import lipapers.baselines as baselines
import lipapers.lirank as lr
from lipapers.baselines import calibration_error
from lipapers.lirank import (
    ARMS, SPARSE, CrossNetV2, DenseGating, IncConfig, IncrementalPenalty, IsotonicCalibration, MLP, QREmbedding,
    QuantizedEmbedding, RankingModel, ResidualDCN, TrainConfig, ablation, dequantize_rowwise, emb_nbytes,
    empirical_fisher, feed_batch, fit, incremental, incremental_init, make_model, multitask, paired_lifts,
    posthoc_isotonic, predict, quantize_embeddings, quantize_rowwise, snapshot, split_world,
)
from lipapers.world import START_EPOCH, World

torch.set_num_threads(1)


def _loop_cross(x0, Ws, bs):
    """Eq. 1 one example at a time with explicit matrices (independent of the module's batched code)."""
    out = []
    for x0i in x0:
        x = x0i.clone()
        for W, b in zip(Ws, bs):
            x = x0i * (W @ x + b) + x
        out.append(x)
    return torch.stack(out)


@pytest.mark.parametrize("d,n_layers,B", [(1, 1, 1), (7, 3, 5), (33, 2, 17)])
def test_cross_full_matches_formula_fwd_bwd(d, n_layers, B):
    torch.manual_seed(d)
    cn = CrossNetV2(d, n_layers)
    x0 = torch.randn(B, d, requires_grad=True)
    y = cn(x0)
    ref = _loop_cross(x0, [l.weight for l in cn.W], [l.bias for l in cn.W])
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x0, cn.W[0].weight), g)
    rx, rw = torch.autograd.grad(ref, (x0, cn.W[0].weight), g)
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gw, rw)


@pytest.mark.parametrize("d,rank", [(5, 2), (13, 13), (24, 7)])
def test_cross_lowrank_matches_formula(d, rank):
    torch.manual_seed(0)
    cn = CrossNetV2(d, 2, rank)
    x0 = torch.randn(6, d)
    Ws = [U.weight @ V.weight for U, V in zip(cn.U, cn.V)]
    torch.testing.assert_close(cn(x0), _loop_cross(x0, Ws, [U.bias for U in cn.U]))


@pytest.mark.parametrize("d", [3, 11])
def test_lowrank_equals_full_at_full_rank(d):
    torch.manual_seed(1)
    low, full = CrossNetV2(d, 3, rank=d), CrossNetV2(d, 3)
    with torch.no_grad():
        for l in range(3):
            full.W[l].weight.copy_(low.U[l].weight @ low.V[l].weight)
            full.W[l].bias.copy_(low.U[l].bias)
    x0 = torch.randn(9, d)
    torch.testing.assert_close(low(x0), full(x0), rtol=1e-5, atol=1e-5)


def test_full_matrix_is_reachable_by_full_rank_factorisation():
    # any full W factorises as U V^T with U = W, V = I at rank d: the limiting case low-rank -> full
    torch.manual_seed(2)
    d = 6
    full, low = CrossNetV2(d, 2), CrossNetV2(d, 2, rank=d)
    with torch.no_grad():
        for l in range(2):
            low.U[l].weight.copy_(full.W[l].weight)
            low.U[l].bias.copy_(full.W[l].bias)
            low.V[l].weight.copy_(torch.eye(d))
    x0 = torch.randn(4, d)
    torch.testing.assert_close(low(x0), full(x0))


def test_residual_dcn_reduces_to_lowrank_dcnv2():
    torch.manual_seed(3)
    rd = ResidualDCN(10, 2, rank=4, attention=False, skip=False, parallel=False)
    lr = CrossNetV2(10, 2, rank=4)
    for l in range(2):
        lr.V[l].load_state_dict(rd.Vv[l].state_dict())
        lr.U[l].load_state_dict(rd.U[l].state_dict())
    x0 = torch.randn(5, 10)
    torch.testing.assert_close(rd(x0), lr(x0))


def test_residual_dcn_matches_explicit_per_example_formula():
    torch.manual_seed(4)
    d, r, tau = 9, 3, 0.7
    rd = ResidualDCN(d, 2, rank=r, tau=tau)
    x0 = torch.randn(4, d, dtype=torch.float64)
    rd = rd.double()
    out = []
    for x0i in x0:
        x = x0i.clone()
        for l in range(2):
            q, k, v = rd.Vq[l].weight @ x, rd.Vk[l].weight @ x, rd.Vv[l].weight @ x
            S = torch.outer(q, k) / tau
            A = torch.exp(S - S.max(1, keepdim=True).values)
            A = A / A.sum(1, keepdim=True)
            att = rd.U[l].weight @ (A @ v + v) + rd.U[l].bias
            plain = rd.plain.U[l].weight @ (rd.plain.V[l].weight @ x) + rd.plain.U[l].bias
            x = x0i * att + x0i * plain + x
        out.append(x)
    torch.testing.assert_close(rd(x0), torch.stack(out), rtol=1e-10, atol=1e-10)


def test_dense_gating_and_mlp():
    torch.manual_seed(5)
    g = DenseGating(7)
    h = torch.randn(3, 7)
    torch.testing.assert_close(g(h), h * torch.sigmoid(h @ g.g.weight.T + g.g.bias))
    m = MLP(5, (4, 3), gating=True)
    assert m(torch.randn(2, 5)).shape == (2, 3) and m.d_out == 3
    assert sum(isinstance(x, DenseGating) for x in m) == 2


def _eq2(y, w, step, b):
    """Eq. 2 of the paper written literally for one scalar y >= 0."""
    y = max(y, 0.0)
    ks = [j for j in range(len(w)) if y - step * j > 0]
    k = min(max(ks, default=0), len(w) - 1)
    return sum(max(w[i], 0.0) * step for i in range(k)) + max(w[k], 0.0) * (y - step * k) + b


def test_isotonic_matches_eq2():
    torch.manual_seed(6)
    iso = IsotonicCalibration(n_buckets=7, step=0.6, shift=3.0).double()
    with torch.no_grad():
        iso.w.copy_(torch.randn(7, dtype=torch.float64))
        iso.b.fill_(-0.4)
    ys = torch.linspace(-6, 8, 57, dtype=torch.float64)
    ref = torch.tensor([_eq2(float(y) + 3.0, iso.w.tolist(), 0.6, -0.4) for y in ys], dtype=torch.float64)
    torch.testing.assert_close(iso(ys), ref)


def test_isotonic_identity_at_init():
    iso = IsotonicCalibration(n_buckets=40, step=0.5, shift=10.0)
    y = torch.linspace(-9.9, 15, 101)
    torch.testing.assert_close(iso(y), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", range(8))
def test_isotonic_monotone_for_any_parameters(seed):
    g = torch.Generator().manual_seed(seed)
    n_calib = 3
    iso = IsotonicCalibration(n_buckets=13, step=0.37, shift=2.0, n_calib=n_calib)
    with torch.no_grad():
        iso.w.copy_(torch.randn(13, generator=g) * 3)
        iso.b.copy_(torch.randn((), generator=g) * 5)
        iso.e.weight.copy_(torch.randn(n_calib, 13, generator=g) * 3)
    y = torch.sort(torch.randn(400, generator=g) * 6).values
    for c in range(n_calib):
        out = iso(y, torch.full((400,), c))
        assert (out.diff() >= -1e-5).all(), f"not monotone for calib value {c}"


def test_isotonic_gradients_flow_to_weights():
    iso = IsotonicCalibration(n_buckets=5, step=1.0, shift=0.0)
    iso(torch.tensor([2.5])).sum().backward()
    # y = 2.5 fills buckets 0, 1 fully (v=1) and bucket 2 by 0.5
    torch.testing.assert_close(iso.w.grad, torch.tensor([1.0, 1.0, 0.5, 0.0, 0.0]))


@pytest.mark.parametrize("N,c", [(1, 1), (97, 1), (1000, 10), (1682, 7), (943, 1000)])
def test_qr_shapes_and_collisions(N, c):
    torch.manual_seed(7)
    qr = QREmbedding(N, 5, compression=c)
    m = math.ceil(N / c)
    assert qr.m == m and qr.R.num_embeddings == m and qr.Q.num_embeddings == math.ceil(N / m)
    ids = torch.arange(N)
    E = qr(ids)
    assert E.shape == (N, 5)
    # rows shared: ids with the same remainder use the same R row, the same quotient the same Q row
    torch.testing.assert_close(E, qr.Q.weight[ids // m] + qr.R.weight[ids % m])
    # but no two ids share both, so every id keeps a distinct embedding (the hashing trick i mod m would give m)
    assert torch.unique(E, dim=0).shape[0] == N
    assert torch.unique(qr.R.weight[ids % m], dim=0).shape[0] == m


def test_qr_mult_aggregation():
    torch.manual_seed(8)
    qr = QREmbedding(50, 3, compression=5, agg="mult")
    ids = torch.tensor([0, 9, 10, 49])
    torch.testing.assert_close(qr(ids), qr.Q.weight[ids // 10] * qr.R.weight[ids % 10])


@pytest.mark.parametrize("scheme", ["middle_max", "min_max"])
@pytest.mark.parametrize("shape", [(1, 1), (3, 2), (37, 129)])
def test_quantize_error_at_most_half_step(scheme, shape):
    torch.manual_seed(9)
    scales = torch.logspace(-4, 3, shape[0])[:, None]
    w = torch.randn(*shape) * scales + torch.randn(shape[0], 1) * scales
    q, s, m = quantize_rowwise(w, scheme=scheme)
    assert q.dtype == (torch.int8 if scheme == "middle_max" else torch.uint8)
    err = (dequantize_rowwise(q, s, m) - w).abs().amax(1)
    assert (err <= s / 2 * (1 + 1e-4) + 1e-7).all(), (err / s).max()


def test_middle_max_endpoints_and_formula():
    w = torch.tensor([[-1.0, 0.0, 0.5, 3.0], [2.0, 2.0, 2.0, 2.0]], dtype=torch.float32)
    q, s, m = quantize_rowwise(w)
    # hand-computed from Eq. 3: s = 4/255, m = (3*128 + (-1)*127)/255
    torch.testing.assert_close(s[0], torch.tensor(4 / 255))
    torch.testing.assert_close(m[0], torch.tensor((3 * 128 - 127) / 255))
    assert q[0, 0] == -128 and q[0, 3] == 127
    assert (q[1] == 0).all() and (dequantize_rowwise(q, s, m)[1] == 2.0).all()  # constant row is exact


def test_quantized_embedding_serving():
    torch.manual_seed(10)
    e = torch.nn.Embedding(300, 16)
    qe = QuantizedEmbedding(e.weight)
    ids = torch.tensor([0, 5, 299, 5])
    q, s, m = quantize_rowwise(e.weight)
    torch.testing.assert_close(qe(ids), dequantize_rowwise(q, s, m)[ids])
    assert qe.nbytes == 300 * 16 + 300 * 8


CARDS = {"user": 40, "item": 25, "dev": 3}


def _data(n=600, seed=0, share=False):
    g = torch.Generator().manual_seed(seed)
    d = {"user": torch.randint(0, 40, (n,), generator=g), "item": torch.randint(0, 25, (n,), generator=g),
         "dev": torch.randint(0, 3, (n,), generator=g), "dense": torch.randn(n, 4, generator=g)}
    logit = 1.5 * d["dense"][:, 0] + (d["item"] % 3 - 1).float()
    d["click"] = (torch.rand(n, generator=g) < torch.sigmoid(logit)).long()
    if share:
        d["share"] = (torch.rand(n, generator=g) < 0.2).long()
    return d


@pytest.mark.parametrize("cross", ["none", "dcnv2", "lowrank", "rdcn"])
def test_ranking_model_variants_train(cross):
    torch.manual_seed(11)
    data = _data(share=True)
    m = RankingModel(CARDS, 4, emb_dim=4, hidden=(16,), cross=cross, rank=3, gating=True, tasks=("click", "share"),
                     isotonic=True, calib_feature="dev", qr={"user": 4})
    assert m(data).shape == (600, 2)
    r = fit(m, data, epochs=3, lr=1e-2, batch_size=128)
    assert np.mean(r["losses"][-3:]) < np.mean(r["losses"][:3])
    p = predict(m, data)
    assert p.shape == (600, 2) and ((p > 0) & (p < 1)).all()


def test_same_seed_same_result():
    def run():
        torch.manual_seed(12)
        m = RankingModel(CARDS, 4, emb_dim=4, hidden=(8,), cross="rdcn", rank=2)
        fit(m, _data(), epochs=1, batch_size=100, seed=3)
        return predict(m, _data())
    np.testing.assert_array_equal(run(), run())


def test_posthoc_isotonic_is_monotone_and_calibrates():
    rng = np.random.default_rng(1)
    p = rng.uniform(0.01, 0.99, 4000)
    y = (rng.uniform(size=4000) < p ** 3).astype(int)  # p is badly over-confident
    pc = posthoc_isotonic(p[:2000], y[:2000], p[2000:])
    order = np.argsort(p[2000:])
    assert (np.diff(pc[order]) >= 0).all()
    assert calibration_error(y[2000:], pc) < calibration_error(y[2000:], p[2000:]) / 3


def test_quantize_embeddings_model_size_and_parity():
    torch.manual_seed(13)
    data = _data()
    m = RankingModel(CARDS, 4, emb_dim=8, hidden=(8,), qr={"user": 4})
    qm = quantize_embeddings(m)
    rows = 10 + 4 + 25 + 3  # QR user (10 + 4 rows), item, dev
    assert emb_nbytes(m) == rows * 8 * 4 and emb_nbytes(qm) == rows * (8 + 8)
    np.testing.assert_allclose(predict(qm, data), predict(m, data), atol=2e-3)


def test_empirical_fisher_matches_per_example_loop():
    torch.manual_seed(14)
    data = _data(40)
    m = RankingModel(CARDS, 4, emb_dim=3, hidden=(5,), cross="lowrank", rank=2, isotonic=True)
    H = empirical_fisher(m, data, n=10)
    ref = {k: torch.zeros_like(v) for k, v in m.named_parameters()}
    for i in range(10):
        m.zero_grad()
        row = {k: v[i:i + 1] for k, v in data.items() if k != "share"}
        torch.nn.functional.binary_cross_entropy_with_logits(m(row)[:, 0], row["click"].float(), reduction="sum").backward()
        for k, p in m.named_parameters():
            ref[k] += p.grad ** 2 / 10
    for k in ref:
        torch.testing.assert_close(H[k], ref[k], rtol=1e-4, atol=1e-7)


def test_incremental_penalty_formula_and_gradient():
    torch.manual_seed(15)
    lin = torch.nn.Linear(3, 2)
    w = snapshot(lin)
    w0 = {k: torch.randn_like(v) for k, v in w.items()}
    wp = {k: torch.randn_like(v) for k, v in w.items()}
    H0 = {k: torch.rand_like(v) for k, v in w.items()}
    Hp = {k: torch.rand_like(v) for k, v in w.items()}
    pen = IncrementalPenalty(w0, H0, wp, Hp, lam=2.5, alpha=0.3)
    val = pen(lin)
    ref = 2.5 / 2 * sum(0.3 * (H0[k] * (w[k] - w0[k]) ** 2).sum() + 0.7 * (Hp[k] * (w[k] - wp[k]) ** 2).sum() for k in w)
    torch.testing.assert_close(val, ref)
    val.backward()
    gref = 2.5 * (0.3 * H0["weight"] * (w["weight"] - w0["weight"]) + 0.7 * Hp["weight"] * (w["weight"] - wp["weight"]))
    torch.testing.assert_close(lin.weight.grad, gref)
    incremental_init(lin, w0, wp, alpha=0.0)
    assert IncrementalPenalty(w0, H0, wp, Hp, lam=1.0, alpha=0.0)(lin) == 0  # alpha=0 at w = w_{t-1}
    incremental_init(lin, w0, wp, alpha=0.3)
    torch.testing.assert_close(lin.weight.detach(), 0.3 * w0["weight"] + 0.7 * wp["weight"])




SMALL = dict(n_posts=200, n_members=300)
TINY = TrainConfig(emb_dim=4, hidden=(8,), rank=2, epochs=1, batch_size=512)


def test_cross_knob_terms_appear_in_the_oracle_and_nowhere_else():
    """Same seed, κ = 0 vs κ = 2: identical impressions and model inputs; the true logit moves by exactly κ·Σβx."""
    w0, w2 = World.generate(0, cross_strength=0.0, **SMALL), World.generate(0, cross_strength=2.0, **SMALL)
    i0, i2 = w0.feed_impressions(3000), w2.feed_impressions(3000)
    same = ["member_id", "post_id", "position", "timestamp", "age_hours", "is_connection", "true_affinity"]
    assert i0.select(same).equals(i2.select(same))
    b0, st = feed_batch(w0, i0)
    b2, _ = feed_batch(w2, i2, stats=st)
    assert set(b0) == set(SPARSE) | {"dense", "click"}  # no true_logit, true_affinity or p_* column reaches a model
    for k in (*SPARSE, "dense"):
        torch.testing.assert_close(b0[k], b2[k], rtol=0, atol=0)
    m, p = i0["member_id"].to_numpy(), i0["post_id"].to_numpy()
    t = (i0["timestamp"] - i0["position"] - START_EPOCH).to_numpy() / 3600
    cross = w2._feed_cross(m, p, t, i0["is_connection"].to_numpy(), i0["age_hours"].to_numpy().astype(np.float64))
    assert np.abs(cross).max() > 0.5
    dz = i2["true_logit"].to_numpy().astype(np.float64) - i0["true_logit"].to_numpy()
    np.testing.assert_allclose(dz, 2.0 * cross, atol=1e-4)
    assert not np.allclose(i0["p_click"].to_numpy(), i2["p_click"].to_numpy())  # the oracle sees them


def test_baselines_are_the_shared_module(monkeypatch):
    calls = []
    real = baselines.ranking_baselines

    def spy(*a, **k):
        calls.append(k)
        return real(*a, **k)

    monkeypatch.setattr(baselines, "ranking_baselines", spy)
    df = ablation(0, 2.0, TINY, arms=("mlp",), n_impressions=5000, **SMALL)
    assert len(calls) == 1 and calls[0]["oracle"] is not None and calls[0]["items_train"] is not None
    auc = df.filter(pl.col("metric") == "auc")
    assert set(auc["method"]) == {"popularity", "logistic_regression", "gbdt", "oracle", "mlp"}
    w, tr, va, te = split_world(0, 5000, cross_strength=2.0, **SMALL)
    fr = pl.concat([tr, va])
    ref = real(w.feed_features(fr, extended=True)[0], fr["click"].to_numpy(), w.feed_features(te, extended=True)[0],
               te["click"].to_numpy(), methods=("logistic_regression",))
    got = auc.filter(pl.col("method") == "logistic_regression")["value"].item()
    assert got == pytest.approx(ref["auc"].item(), abs=1e-12)


def test_ablation_rows_qr_and_int8():
    df = ablation(1, 1.0, TINY, arms=("lowrank_dcnv2", "dense_gating"), n_impressions=5000, qr_factors=(4,), int8=True,
                  **SMALL)
    methods = set(df.filter(pl.col("metric") == "auc")["method"])
    assert {"qr_4", "lowrank_int8", "posthoc_isotonic", "dense_gating"} <= methods
    rows = df.filter(pl.col("metric") == "emb_rows")["value"].item()
    assert rows == 2 * (math.ceil(300 / 75) + 75) + (math.ceil(200 / 50) + 50)  # member, author (N=300), post (N=200)
    assert (df["kappa"] == 1.0).all() and (df["seed"] == 1).all()


def test_incremental_and_multitask_rows():
    inc = incremental(0, 1.0, TINY, IncConfig(n_windows=3, fisher_n=32, epochs=1), 6000, **SMALL)
    assert set(inc["method"]) == {"cold", "warm", "incremental"} and set(inc["step"]) == {1}
    assert set(inc["metric"]) == {"auc_next", "auc_old", "train_seconds"} and inc["value"].is_finite().all()
    mt = multitask(0, 0.3, TINY, 6000, **SMALL)
    assert set(mt["method"]) == {"shared", "grouped"} and (mt["task_corr"] == 0.3).all()
    assert set(mt.filter(pl.col("metric") == "auc")["task"]) == set(lr.MTL_TASKS)


def test_paired_lifts_match_hand_computation():
    df = pl.DataFrame(dict(kappa=[0.0] * 4, seed=[0, 0, 1, 1], method=["mlp", "dcn"] * 2, metric=["auc"] * 4,
                           value=[0.80, 0.808, 0.90, 0.891]))
    r = paired_lifts(df, "mlp", ["dcn"], "kappa").row(0, named=True)
    assert r["lift"] == pytest.approx((1.0 - 1.0) / 2) and r["n"] == 2


def test_bad_inputs_give_clear_errors():
    w = World.generate(0, **SMALL)
    with pytest.raises(ValueError, match="arm must be one of"):
        make_model("dcn", {"post_id": 5}, 3, TINY, 0)
    with pytest.raises(ValueError, match="unknown arms"):
        ablation(0, 0.0, TINY, arms=("transformer",))
    with pytest.raises(ValueError, match="unknown task columns"):
        feed_batch(w, w.feed_impressions(100), tasks=("purchase",))
    with pytest.raises(ValueError, match="n_windows must be >= 3"):
        IncConfig(n_windows=2)
    with pytest.raises(ValueError, match="alpha must be in"):
        IncConfig(alpha=1.5)
    with pytest.raises(ValueError, match="cross must be one of"):
        RankingModel({"a": 3}, cross="dcn3")
    with pytest.raises(ValueError, match="needs sparse features"):
        RankingModel({}, 0)
    with pytest.raises(ValueError, match="qr names unknown features"):
        RankingModel({"a": 3}, qr={"b": 2})
    with pytest.raises(ValueError, match="must be a positive int"):
        QREmbedding(0, 4)
    with pytest.raises(ValueError, match="scheme must be one of"):
        quantize_rowwise(torch.ones(2, 2), scheme="absmax")
    with pytest.raises(ValueError, match="alpha must be in"):
        IncrementalPenalty({}, {}, {}, {}, alpha=2)
    with pytest.raises(ValueError, match="outside"):
        RankingModel({"a": 3}).check({"a": torch.tensor([3])})
    with pytest.raises(ValueError, match="tau must be > 0"):
        ResidualDCN(4, tau=0)
