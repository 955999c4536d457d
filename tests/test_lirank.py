"""Tests of lipapers.lirank: each layer against its formula or a limiting case, metrics against scikit-learn,
off-policy estimators against exact values, and the error contract.

Tolerances: float32 layers use torch.testing defaults (rtol 1.3e-6, atol 1e-5); float64 checks use rtol 1e-7/1e-10;
the quantization bound is s/2 per row plus float32 rounding of m and s (relative 1e-4 of s, absolute 1e-7)."""
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss, roc_auc_score

from lipapers.lirank import (
    CrossNetV2, DenseGating, IncrementalPenalty, IsotonicCalibration, MLP, NeuralLinearTS, QREmbedding,
    QuantizedEmbedding, RankingModel, ResidualDCN, binary_metrics, dequantize_rowwise, dr_value, emb_nbytes,
    empirical_fisher, fit, incremental_init, ips_value, posthoc_isotonic, predict, quantize_embeddings,
    quantize_rowwise, snapshot,
)

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


def test_binary_metrics_match_sklearn_and_hand_ece():
    rng = np.random.default_rng(0)
    p = rng.uniform(0.01, 0.99, 500)
    y = (rng.uniform(size=500) < p ** 2).astype(int)
    met = binary_metrics(y, p, n_bins=10)
    assert met["auc"] == roc_auc_score(y, p) and met["logloss"] == log_loss(y, p)
    bins = np.minimum((p * 10).astype(int), 9)  # equal-width bins, hand-computed ECE
    ece = sum((bins == b).mean() * abs(y[bins == b].mean() - p[bins == b].mean()) for b in range(10) if (bins == b).any())
    assert met["ece"] == pytest.approx(ece, rel=1e-5)
    assert met["oe"] == pytest.approx(y.sum() / p.sum())


def test_posthoc_isotonic_is_monotone_and_calibrates():
    rng = np.random.default_rng(1)
    p = rng.uniform(0.01, 0.99, 4000)
    y = (rng.uniform(size=4000) < p ** 3).astype(int)  # p is badly over-confident
    pc = posthoc_isotonic(p[:2000], y[:2000], p[2000:])
    order = np.argsort(p[2000:])
    assert (np.diff(pc[order]) >= 0).all()
    assert binary_metrics(y[2000:], pc)["ece"] < binary_metrics(y[2000:], p[2000:])["ece"] / 3


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


def test_neural_linear_posterior_matches_closed_form_ridge():
    g = torch.Generator().manual_seed(16)
    Z = torch.randn(200, 4, generator=g)
    r = Z @ torch.tensor([1.0, -2.0, 0.5, 0.0]) + 0.1 * torch.randn(200, generator=g)
    ts = NeuralLinearTS(4, lam=2.0, noise=0.5).update(Z[:120], r[:120]).update(Z[120:], r[120:])
    Zd, rd = Z.double(), r.double()
    A = 2.0 * torch.eye(4, dtype=torch.float64) + Zd.T @ Zd / 0.25
    torch.testing.assert_close(ts.mean, torch.linalg.solve(A, Zd.T @ rd / 0.25))
    torch.testing.assert_close(ts.cov, torch.linalg.inv(A))
    S = ts.sample(20000, torch.Generator().manual_seed(0))
    torch.testing.assert_close(S.mean(0), ts.mean, atol=0.01, rtol=0)  # posterior sd is ~0.03 here


def test_thompson_action_dist_is_a_distribution_and_greedy_is_argmax():
    g = torch.Generator().manual_seed(17)
    ts = NeuralLinearTS(3, lam=1.0, noise=1.0).update(torch.randn(10, 3, generator=g), torch.randn(10, generator=g))
    Z = torch.randn(6, 5, 3, generator=g)
    pi = ts.action_dist(Z, n_samples=300, generator=g)
    torch.testing.assert_close(pi.sum(1), torch.ones(6, dtype=torch.float64))
    greedy = ts.action_dist(Z, greedy=True)
    best = torch.einsum("nad,d->na", Z.double(), ts.mean).argmax(1)
    torch.testing.assert_close(greedy, torch.nn.functional.one_hot(best, 5).double())


def test_ips_of_logging_policy_equals_empirical_value():
    rng = np.random.default_rng(18)
    n, k = 3000, 6
    logits = rng.normal(size=(n, k))
    pi_b = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)  # a context-dependent logging policy
    a = np.array([rng.choice(k, p=p) for p in pi_b])
    r = rng.binomial(1, 0.1 + 0.1 * (a % 2))
    est = ips_value(r, a, pi_b[np.arange(n), a], pi_b)
    assert est["value"] == pytest.approx(r.mean(), rel=1e-12)
    uniform = np.full((n, k), 1 / k)
    assert ips_value(r, a, np.full(n, 1 / k), uniform)["value"] == pytest.approx(r.mean(), rel=1e-12)


def test_dr_reduces_to_ips_and_to_direct_method():
    rng = np.random.default_rng(19)
    n, k = 500, 4
    a = rng.integers(0, k, n)
    r = rng.binomial(1, 0.3, n)
    pi = rng.dirichlet(np.ones(k), n)
    ps = np.full(n, 1 / k)
    # q_hat = 0 gives IPS exactly
    assert dr_value(r, a, ps, pi, np.zeros((n, k)))["value"] == pytest.approx(ips_value(r, a, ps, pi)["value"])
    # a q_hat that is exact on the logged actions gives the direct method
    q = rng.uniform(size=(n, k))
    q[np.arange(n), a] = r
    assert dr_value(r, a, ps, pi, q)["value"] == pytest.approx((pi * q).sum(1).mean())


def test_ope_on_synthetic_bandit_recovers_true_value():
    rng = np.random.default_rng(20)
    n, k = 40000, 5
    true_q = np.array([0.05, 0.1, 0.2, 0.3, 0.4])
    a = rng.integers(0, k, n)
    r = rng.binomial(1, true_q[a])
    pi = np.tile(np.array([0, 0, 0.2, 0.3, 0.5]), (n, 1))
    v = (pi[0] * true_q).sum()
    for est in (ips_value(r, a, np.full(n, 1 / k), pi), dr_value(r, a, np.full(n, 1 / k), pi, np.full((n, k), 0.2))):
        assert abs(est["value"] - v) < 4 * est["se"]


# ---------------------------------------------------------------- bad inputs
def test_bad_inputs_give_clear_errors():
    data = _data(50)
    m = RankingModel(CARDS, 4, emb_dim=4, hidden=(8,))
    with pytest.raises(ValueError, match="unknown batch keys.*colour.*valid"):
        m.check({**data, "colour": data["user"]})
    with pytest.raises(ValueError, match="missing.*item"):
        m.check({k: v for k, v in data.items() if k != "item"})
    with pytest.raises(ValueError, match=r"shape \(B, 4\)"):
        m.check({**data, "dense": torch.randn(50, 3)})
    with pytest.raises(ValueError, match="outside"):
        m.check({**data, "user": data["user"] + 40})
    with pytest.raises(ValueError, match="missing.*click"):
        fit(m, {k: v for k, v in data.items() if k != "click"})
    with pytest.raises(ValueError, match="cross must be one of"):
        RankingModel(CARDS, cross="dcn3")
    with pytest.raises(ValueError, match="calib_feature.*valid"):
        RankingModel(CARDS, isotonic=True, calib_feature="device")
    with pytest.raises(ValueError, match="qr names unknown"):
        RankingModel(CARDS, qr={"usr": 4})
    with pytest.raises(ValueError, match=r"x0 must have shape \(B, 8\)"):
        CrossNetV2(8)(torch.randn(2, 7))
    with pytest.raises(ValueError, match="rank must be a positive int"):
        CrossNetV2(8, rank=0)
    with pytest.raises(ValueError, match="tau must be a positive"):
        ResidualDCN(8, tau=0)
    with pytest.raises(ValueError, match="agg must be one of"):
        QREmbedding(10, 2, agg="concat")
    with pytest.raises(ValueError, match="scheme must be one of"):
        quantize_rowwise(torch.randn(2, 3), scheme="absmax")
    with pytest.raises(ValueError, match="2-D float"):
        quantize_rowwise(torch.randint(0, 3, (2, 3)))
    with pytest.raises(ValueError, match="calib ids are required"):
        IsotonicCalibration(n_calib=2)(torch.randn(3))
    with pytest.raises(ValueError, match="alpha must be in"):
        IncrementalPenalty({}, {}, {}, {}, alpha=1.5)
    with pytest.raises(ValueError, match="pscore"):
        ips_value([1, 0], [0, 1], [0.0, 0.5], np.full((2, 2), 0.5))
    with pytest.raises(ValueError, match="sum to 1"):
        ips_value([1, 0], [0, 1], [0.5, 0.5], np.full((2, 2), 0.3))
    with pytest.raises(ValueError, match="q_hat"):
        dr_value([1, 0], [0, 1], [0.5, 0.5], np.full((2, 2), 0.5), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="y and p"):
        binary_metrics([0, 1], [0.5])


def test_middle_max_and_min_max_share_the_grid():
    # m = min + 2^(b-1) s, so both schemes reconstruct the same values (codes differ by 2^(b-1))
    torch.manual_seed(21)
    w = torch.randn(50, 33, dtype=torch.float64).float()
    a, b = quantize_rowwise(w, scheme="middle_max"), quantize_rowwise(w, scheme="min_max")
    torch.testing.assert_close(a[0].long() + 128, b[0].long(), atol=1, rtol=0)  # equal up to a rounding tie
    torch.testing.assert_close(dequantize_rowwise(*a), dequantize_rowwise(*b), rtol=0, atol=float(b[1].max()) * 1.01)


# ---------------------------------------------------------------- feature builders on the real substrates
def test_movielens_features_match_ratings():
    from lipapers.data import movielens_100k
    from lipapers.lirank import movielens_features
    ml = movielens_100k()
    d, cards = movielens_features(ml)
    assert len(d["like"]) == 100_000 and d["dense"].shape == (100_000, 20)
    assert d["like"].float().mean().item() == pytest.approx((ml.ratings["rating"].to_numpy() >= 4).mean())
    RankingModel(cards, n_dense=20, tasks=("like",)).check(d, labels=True)  # every id inside its table
    ts = ml.ratings.sort("timestamp", maintain_order=True)
    np.testing.assert_array_equal(d["user_id"].numpy(), ts["user_id"].to_numpy())  # time-ordered rows


def test_world_features_fit_the_model():
    from lipapers.lirank import world_features
    from lipapers.world import World
    w = World.generate(seed=1, n_members=60, n_posts=120, n_companies=10, n_jobs=20)
    imps = w.feed_impressions(700)
    d, cards = world_features(w, imps, ("click", "long_dwell"))
    m = RankingModel(cards, n_dense=d["dense"].shape[1], emb_dim=4, hidden=(8,), tasks=("click", "long_dwell"))
    assert m.check(d, labels=True) == 700 and m(d).shape == (700, 2)
    with pytest.raises(ValueError, match="unknown task columns"):
        world_features(w, imps, ("clicks",))


def test_obd_uniform_logging_policy_ips_equals_ctr_and_candidates():
    from lipapers.data import open_bandit
    from lipapers.lirank import obd_candidates, obd_features
    rand = open_bandit("random")
    (d,), cards, (aff,) = obd_features(rand)
    r, a = d["click"].numpy(), d["item_id"].numpy()
    est = ips_value(r, a, rand.log["propensity"].to_numpy(), np.full((len(r), 80), 1 / 80))
    assert est["value"] == pytest.approx(r.mean(), rel=1e-12) and r.sum() == 38
    f0 = rand.items.sort("item_id")["item_feature_0"].to_numpy()
    sub = {k: v[:3] for k, v in d.items() if k != "click"}
    c = obd_candidates(sub, aff[:3], f0)
    assert len(c["item_id"]) == 240 and (c["item_id"][:80] == torch.arange(80)).all()
    torch.testing.assert_close(c["dense"][:, 0], torch.from_numpy(aff[:3].ravel()).float())
    assert (c["position"][:80] == d["position"][0]).all()
    RankingModel(cards, n_dense=2).check(c)
