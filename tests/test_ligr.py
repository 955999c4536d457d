"""lipapers.ligr: LiGRLayer against torch.nn.MultiheadAttention + lipapers.lm.MLP (weights copied) and its gate-off
limit; HSTU against a per-query loop; setwise_mask against a brute-force loop over the rule; the three scoring modes
against each other (fp32 ≤ 1e-5, fp64 ≤ 1e-10), forward and backward; set-wise pass = each set alone; leakage and
locality; train_flops hand count; scaling_fit exact recovery; rule_rerank against its definition; bad inputs; seeds."""
import itertools
import numpy as np
import pytest
import torch
import torch.nn as nn

from lipapers import ligr as G
from lipapers.history import amortized_mask

torch.set_num_threads(1)
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
CARDS = G.toy_cards()


def brute_setwise(n, L, sets, causal=True):
    B, m = sets.shape; out = torch.zeros(B, 1, n + m, n + m, dtype=torch.bool)
    for b, i, j in itertools.product(range(B), range(n + m), range(n + m)):
        if i == j: ok = True
        elif j < n and j >= L[b]: ok = False
        elif i < n: ok = j < n and (j <= i or not causal)
        elif j < n: ok = True
        else: ok = bool(sets[b, i - n] == sets[b, j - n] and sets[b, i - n] >= 0)
        out[b, 0, i, j] = ok
    return out


@pytest.mark.parametrize("n,m", [(0, 3), (1, 1), (5, 0), (6, 5)])
@pytest.mark.parametrize("causal", [True, False])
def test_setwise_mask_brute_force(n, m, causal):
    g = torch.Generator().manual_seed(n * 7 + m)
    L, sets = torch.tensor([0, n, n // 2]), torch.randint(-2, 3, (3, m), generator=g)  # ragged, mixed, padding (<0)
    torch.testing.assert_close(G.setwise_mask(L, sets, causal, n), brute_setwise(n, L, sets, causal))
    distinct = torch.arange(m).expand(3, m)
    torch.testing.assert_close(G.setwise_mask(L, distinct, causal, n), amortized_mask(n, m, L, causal))


def _mha_ref(layer, x, allow):
    from lipapers.lm import LMConfig, MLP
    d = layer.d; mha = nn.MultiheadAttention(d, layer.h, batch_first=True).double()
    mha.in_proj_weight.data, mha.in_proj_bias.data = layer.qkv.weight.data, layer.qkv.bias.data
    mha.out_proj.weight.data, mha.out_proj.bias.data = layer.out.weight.data, layer.out.bias.data
    ff = MLP(LMConfig(d_model=d, n_heads=layer.h, d_ff=4 * d)).double()
    ff.gate_proj.weight.data, ff.up_proj.weight.data = layer.ff.w_g.weight.data, layer.ff.w_u.weight.data
    ff.down_proj.weight.data = layer.ff.w_d.weight.data
    g = (lambda lin, t: torch.sigmoid(lin(t))) if layer.gate else (lambda lin, t: 1.0)
    z = layer.ln1(x); mask = ~allow.expand(len(x), layer.h, -1, -1).reshape(-1, *allow.shape[-2:])
    h = x + g(layer.g1, x) * mha(z, z, z, attn_mask=mask, need_weights=False)[0]
    return h + g(layer.g2, h) * ff(layer.ln2(h))


@pytest.mark.parametrize("gate", [True, False])
def test_ligr_layer_equals_torch_modules(gate):
    torch.manual_seed(0); layer = G.LiGRLayer(12, 3, gate=gate).double()
    x = torch.randn(2, 9, 12, dtype=torch.float64)
    allow = G.setwise_mask(torch.tensor([4, 6]), torch.tensor([[0, 0, 1], [2, -1, 2]]), True, 6)
    torch.testing.assert_close(layer(x, allow), _mha_ref(layer, x, allow), atol=1e-10, rtol=0)


def test_gate_limit_is_vanilla():
    torch.manual_seed(1); lg, lv = G.LiGRLayer(8, 2), G.LiGRLayer(8, 2, gate=False)
    lv.load_state_dict({k: v for k, v in lg.state_dict().items() if not k.startswith(("g1", "g2"))})
    for g in (lg.g1, lg.g2): nn.init.zeros_(g.weight); nn.init.constant_(g.bias, 30.0)
    x = torch.randn(3, 7, 8)
    assert (lg(x) - lv(x)).abs().max() <= 1e-6


def test_hstu_per_query_loop():
    torch.manual_seed(2); layer = G.HSTULayer(8, 2).double(); x = torch.randn(2, 6, 8, dtype=torch.float64)
    allow = G.setwise_mask(torch.tensor([2, 4]), torch.tensor([[0, 0], [1, -1]]), True, 4)
    q, k, v, u = layer.heads(x); out = torch.zeros(2, 2, 6, 4, dtype=torch.float64)
    for b, h, i in itertools.product(range(2), range(2), range(6)):
        js = [j for j in range(6) if allow[b, 0, i, j]]
        out[b, h, i] = sum(torch.nn.functional.silu(q[b, h, i] @ k[b, h, j] / 2.0) * v[b, h, j] for j in js) / len(js)
    torch.testing.assert_close(layer(x, allow), layer.finish(x, out, u), atol=1e-10, rtol=0)


def _model(layer="ligr", setwise=False, dtype=torch.float32, seed=0, n_layers=2):
    torch.manual_seed(seed)
    return G.LiGRRanker(CARDS, 5, d=16, n_layers=n_layers, n_heads=2, layer=layer, setwise=setwise).to(dtype).eval()


@pytest.mark.parametrize("layer", list(G.LAYERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_modes_agree_forward_and_backward(layer, dtype):
    b = G.toy_batch(CARDS, B=3, n=9, m=5); mdl = _model(layer, dtype=dtype)
    ref = mdl.score(b, "per_candidate")
    for mode in ("one_pass", "cached"):
        assert (mdl.score(b, mode) - ref).abs().max() <= TOL[dtype]
    grads = {}
    for mode in ("per_candidate", "one_pass", "cached"):
        mdl.zero_grad(); mdl.score(b, mode).square().sum().backward()
        grads[mode] = torch.cat([p.grad.flatten() for p in mdl.parameters() if p.grad is not None])
    for mode in ("one_pass", "cached"):
        torch.testing.assert_close(grads[mode], grads["per_candidate"], atol=TOL[dtype] * 100, rtol=TOL[dtype] * 100)


@pytest.mark.parametrize("layer", list(G.LAYERS))
def test_setwise_pass_equals_each_set_alone(layer):
    b = G.toy_batch(CARDS, B=2, n=8, m=6); mdl = _model(layer, setwise=True)
    with torch.no_grad():
        full = mdl.score(b); assert (mdl.score(b, "cached") - full).abs().max() <= 1e-5
        for s in (0, 1):
            idx = torch.nonzero(b["cand_set"][0] == s)[:, 0]
            sub = b | {k: v[:, idx] for k, v in b.items() if k.startswith("cand_")}
            assert (mdl.score(sub) - full[:, idx]).abs().max() <= 1e-5


def test_labels_do_not_move_scores_and_candidates_stay_local():
    b = G.toy_batch(CARDS, B=2, n=8, m=6) | dict(y_long_dwell=torch.zeros(2, 6, dtype=torch.long))
    mdl = _model(setwise=True)
    with torch.no_grad():
        s0 = mdl.score(b); s1 = mdl.score(b | dict(y_long_dwell=torch.ones(2, 6, dtype=torch.long)))
        torch.testing.assert_close(s0, s1, atol=0, rtol=0)
        b2 = b | dict(cand_topic=b["cand_topic"].clone()); b2["cand_topic"][:, 1] = (b["cand_topic"][:, 1] + 1) % 5
        moved = (mdl.score(b2) - s0).abs().amax((0, 2)) > 1e-7
        assert moved.tolist() == [False, True, False, True, False, True]  # candidate 1 and its set (odd slots)
        c0, c1 = mdl.encode_history(b), mdl.encode_history(b2)
        for (k0, v0), (k1, v1) in zip(c0.kv, c1.kv): assert torch.equal(k0, k1) and torch.equal(v0, v1)


def test_train_flops_hand_count():
    torch.manual_seed(0); mdl = G.LiGRRanker(CARDS, 5, d=4, n_layers=1, n_heads=1)
    layer = 2 * 8 + (4 * 12 + 12) + (16 + 4) + 3 * 4 * 16 + 2 * (16 + 4)  # 2 LN, qkv, out, SwiGLU, 2 gates = 328
    top = 8 + (8 * 16 + 16) + (16 * 16 + 16) + (16 * 2 + 2)  # ln_f, MLP (2d → 4d → 4d), 2-task head = 458
    assert G.dense_params(mdl) == layer + top == 786
    assert G.train_flops(mdl, 1000) == 6 * 786 * 1000
    assert G.train_flops(mdl, 1000, 50) == 6 * 786 * 1000 + 12 * 4 * 1 * 50


def test_scaling_fit_exact():
    f = np.array([1e5, 1e6, 1e7, 1e8, 1e9]); r = G.scaling_fit(f, 0.61 + 0.015 * np.log10(f))
    assert abs(r["slope"] - 0.015) < 1e-12 and abs(r["intercept"] - 0.61) < 1e-10 and abs(r["hi"] - r["lo"]) < 1e-10
    with pytest.raises(ValueError, match="distinct FLOP"): G.scaling_fit([1e6, 1e6], [0.6, 0.7])


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("gap", [1, 2, 3])
def test_rule_rerank_definition(seed, gap):
    rng = np.random.default_rng(seed); m = 7
    s, a, t = rng.normal(size=m), rng.integers(0, 3, m), rng.integers(0, 3, m)
    order = G.rule_rerank(s, a, t, gap)
    assert sorted(order.tolist()) == list(range(m))
    for k, i in enumerate(order):
        recent, left = order[max(0, k - gap + 1):k], order[k:]
        ok = [j for j in left if all(a[j] != a[r] and t[j] != t[r] for r in recent)]
        best = max(ok or left, key=lambda j: (s[j], -j))
        assert i == best


def test_bad_inputs():
    b = G.toy_batch(CARDS); mdl = _model()
    with pytest.raises(ValueError, match="'ligr', 'vanilla', 'hstu'"): G.LiGRRanker(CARDS, 5, layer="x")
    with pytest.raises(ValueError, match="long_dwell"): G.LiGRRanker(CARDS, 5, tasks=("dwell",))
    with pytest.raises(ValueError, match="d % n_heads"): G.LiGRRanker(CARDS, 5, d=10, n_heads=4)
    with pytest.raises(ValueError, match="vocabulary size"): G.LiGRRanker({"post_id": 3}, 5)
    with pytest.raises(ValueError, match="no action"): mdl.score(b | dict(cand_action=b["cand_item"]))
    with pytest.raises(ValueError, match="one set id per candidate"): mdl.score(b | dict(cand_set=b["cand_set"][:, :2]))
    with pytest.raises(ValueError, match=r"cards\['author_id'\]"):
        mdl.score(b | dict(cand_author_id=b["cand_author_id"] + 100))
    with pytest.raises(ValueError, match="hist_topic"): mdl.score(b | dict(hist_topic=b["hist_topic"] + 100))
    with pytest.raises(ValueError, match="one_pass"): mdl.score(b, "fast")
    with pytest.raises(ValueError, match="k must be an int in"): G.greedy_topk(mdl, b, 7)
    with pytest.raises(ValueError, match="positive"): G.make_world("nope", 0)
    with pytest.raises(ValueError, match="arms must be from"): G.run_control("positive", 0, arms=["xgb"])
    with pytest.raises(ValueError, match="setwise=False"): _model(setwise=True).score(b, "per_candidate")


def test_same_seed_same_result_and_sessions():
    w = G.make_world("positive", 0, 100, 200, 8); data, imps = G.world_sessions(w, 60, 8)
    assert data["cand_valid"].sum() == len(imps) and (data["time"].diff() >= 0).all()
    t0 = data["time"]; hist_ok = data["hist_len"] <= 8
    assert hist_ok.all() and (data["cand_item"][data["cand_valid"]].numpy() == imps["post_id"].to_numpy()).all()
    runs = []
    for _ in range(2):
        (tr, _), (va, _), (te, _) = G.split_sessions(data, imps)
        m = G.make_arm("ligr_setwise", G.world_cards(w), 8, 1, 2, seed=3, max_len=8)
        G.fit(m, tr, va, 1, batch_size=32, seed=3); runs.append(G.predict(m, te))
    np.testing.assert_array_equal(runs[0], runs[1])
