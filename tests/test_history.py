"""lipapers.history: the amortized mask against a brute-force loop over the note's rule; the three scoring modes and
per-row forward against each other on ragged batches (fp32 ≤ 1e-5, fp64 ≤ 1e-10), forward and backward; EncoderLayer
against torch.nn.TransformerEncoderLayer; candidate-(in)dependence of history states; permutation equivariance;
encoder_flops against a hand count; the leakage rule on both loaders; bad inputs."""
import numpy as np
import pytest
import torch

from lipapers import history as H

torch.set_num_threads(1)
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}  # max |Δ logit| between paths that sum the same terms in another order


def brute_mask(n, m, hist_len=None, causal=True):
    """The note's allow(i, j), one entry at a time (padding hidden, every row sees itself)."""
    Ls = [n] if hist_len is None else list(hist_len)
    out = torch.zeros(len(Ls), n + m, n + m, dtype=torch.bool)
    for b, L in enumerate(Ls):
        for i in range(n + m):
            for j in range(n + m):
                if i == j: ok = True
                elif j >= n: ok = False  # nobody else attends a candidate
                elif j >= L: ok = False  # padded history key
                elif i < n: ok = (j <= i) if causal else True
                else: ok = True  # candidate → valid history
                out[b, i, j] = ok
    return out[0] if hist_len is None else out[:, None]


@pytest.mark.parametrize("n,m", [(0, 3), (1, 1), (5, 0), (7, 4), (13, 6)])
@pytest.mark.parametrize("causal", [True, False])
def test_mask_equals_brute_force(n, m, causal):
    torch.testing.assert_close(H.amortized_mask(n, m, causal=causal), brute_mask(n, m, causal=causal))
    L = torch.tensor([0, n, n // 2])
    torch.testing.assert_close(H.amortized_mask(n, m, L, causal), brute_mask(n, m, L.tolist(), causal))


def ragged_batch(seed=0, B=3, n=20, n_items=40, lens=(7, 20, 13)):
    g = torch.Generator().manual_seed(seed)
    L = torch.tensor(lens)
    item = torch.randint(0, n_items, (B, n), generator=g)
    item = torch.where(torch.arange(n)[None] < L[:, None], item, -1)  # padding marked -1
    act = torch.where(item >= 0, torch.randint(0, 4, (B, n), generator=g), -1)
    return dict(hist_item=item, hist_action=act, hist_len=L)


def model(fusion="append_cross", dtype=torch.float32, causal=True, seed=0, feats=True, **kw):
    torch.manual_seed(seed)
    f = torch.randn(40, 5) if feats else None
    return H.HistoryRanker(40, 4, f, d=12, n_layers=2, n_heads=3, fusion=fusion, causal=causal, hidden=(16, 8),
                           max_len=32, **kw).to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lens", [(7, 20, 13), (0, 1, 20)])
def test_modes_equal_per_row_forward(dtype, causal, lens):
    mdl, b = model(dtype=dtype, causal=causal), ragged_batch(lens=lens)
    c = torch.randint(0, 40, (3, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        rows = torch.stack([mdl(b | dict(cand_item=c[:, j])) for j in range(5)], 1)
        outs = {"per_candidate": mdl.score(b, c, "per_candidate"), "one_pass": mdl.score(b, c, "one_pass"),
                "one_pass@2": mdl.score(b, c, "one_pass", chunk=2), "cached@2": mdl.score(b, c, "cached", chunk=2),
                "cached_api": mdl.score_cached(mdl.encode_history(b), c, chunk=3)}
    for k, v in outs.items():
        assert v.dtype == dtype
        assert (v - rows).abs().max().item() <= TOL[dtype], k


@pytest.mark.parametrize("fusion", ["none", "pooled"])
def test_trivially_amortizable_fusions(fusion):
    mdl, b = model(fusion), ragged_batch()
    c = torch.randint(0, 40, (3, 4))
    with torch.no_grad():
        ref = mdl.score(b, c, "per_candidate")
        for mode in ("one_pass", "cached"): torch.testing.assert_close(mdl.score(b, c, mode, chunk=3), ref, atol=1e-5, rtol=0)


def test_backward_matches_between_modes():
    b, c = ragged_batch(), torch.randint(0, 40, (3, 5), generator=torch.Generator().manual_seed(2))
    grads = {}
    for mode in H.MODES:
        mdl = model(dtype=torch.float64)
        mdl.score(b, c, mode, chunk=2).square().sum().backward()
        grads[mode] = {k: p.grad.clone() for k, p in mdl.named_parameters() if p.grad is not None}
    for mode in ("one_pass", "cached"):
        assert grads[mode].keys() == grads["per_candidate"].keys()
        for k in grads[mode]: torch.testing.assert_close(grads[mode][k], grads["per_candidate"][k], atol=1e-9, rtol=1e-7)


def test_encoder_layer_equals_torch():
    torch.manual_seed(0)
    d, h = 12, 3
    ours = H.EncoderLayer(d, h).eval()
    ref = torch.nn.TransformerEncoderLayer(d, h, dim_feedforward=4 * d, dropout=0.0, norm_first=True,
                                           batch_first=True).eval()
    with torch.no_grad():
        ref.self_attn.in_proj_weight.copy_(ours.qkv.weight); ref.self_attn.in_proj_bias.copy_(ours.qkv.bias)
        ref.self_attn.out_proj.weight.copy_(ours.out.weight); ref.self_attn.out_proj.bias.copy_(ours.out.bias)
        ref.linear1.load_state_dict(ours.ff[0].state_dict()); ref.linear2.load_state_dict(ours.ff[3].state_dict())
        ref.norm1.load_state_dict(ours.ln1.state_dict()); ref.norm2.load_state_dict(ours.ln2.state_dict())
    x = torch.randn(2, 9, d, requires_grad=True)
    allow = H.amortized_mask(6, 3)
    y1, y2 = ours(x, allow), ref(x, src_mask=~allow)
    torch.testing.assert_close(y1, y2, atol=1e-5, rtol=1e-5)
    g1, = torch.autograd.grad(y1.sum(), x); g2, = torch.autograd.grad(y2.sum(), x)
    torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-5)


def _hist_states(mdl, b, c):
    """Final history states of the one-candidate sequence [H, C] under the model's own mask."""
    xh, _ = mdl.hist_tokens(b); n = xh.shape[1]
    allow = H.amortized_mask(n, 1, b["hist_len"], mdl.causal).clone()
    if mdl.fusion == "append_self": allow[..., :n, n] = True
    return mdl.encode(torch.cat([xh, mdl.cand_tokens(c[:, None])], 1), allow)[:, :n]


@pytest.mark.parametrize("fusion,independent", [("append_cross", True), ("append_self", False)])
def test_history_states_and_candidate(fusion, independent):
    mdl, b = model(fusion), ragged_batch(lens=(20, 20, 20))
    with torch.no_grad():
        a, z = _hist_states(mdl, b, torch.tensor([1, 2, 3])), _hist_states(mdl, b, torch.tensor([9, 8, 7]))
    assert torch.allclose(a, z, atol=1e-6) == independent


def test_permuting_candidates_permutes_scores():
    mdl, b = model(), ragged_batch()
    c = torch.randint(0, 40, (3, 6)); p = torch.randperm(6)
    with torch.no_grad():
        for mode in H.MODES: torch.testing.assert_close(mdl.score(b, c[:, p], mode), mdl.score(b, c, mode)[:, p])


def test_encoder_flops_hand_count():
    n, m, d, l = 2, 3, 4, 1
    tok, pair = 2 * (4 * d * d + 2 * d * 4 * d), 2 * 2 * d  # QKV+out and FFN MACs ×2; scores + weighted sum ×2
    assert tok == 384 and pair == 16
    assert H.encoder_flops("append_cross", n, m, d, l, "per_candidate") == m * (3 * 384 + 9 * 16) == 3888
    assert H.encoder_flops("append_cross", n, m, d, l, "one_pass") == 5 * 384 + 25 * 16 == 2320
    assert H.encoder_flops("append_cross", n, m, d, l, "cached") == 2 * 384 + 4 * 16 + 3 * 384 + 3 * 3 * 16 == 2128
    assert H.encoder_flops("concat", n, m, d, l) == m * (2 * (384 + 2 * d * d * 2) + 4 * 16)
    assert H.encoder_flops("none", n, m, d, l) == 0
    assert H.flop_ratio_limit(n, m) == pytest.approx(9 / 5)
    with pytest.raises(ValueError, match="not amortizable"): H.encoder_flops("concat", n, m, d, l, "cached")


def test_world_loader_leakage_and_padding():
    from lipapers.world import World, WorldConfig
    w = World(WorldConfig(seed=1, n_members=200, n_posts=400, n_jobs=100, n_interests=3, drift=1.0))
    sq = H.world_sequences(w, w.feed_impressions(1500), n_hist=12)
    L, n = sq["hist_len"], 12
    ok = torch.arange(n)[None] < L[:, None]
    assert (sq["hist_time"][ok] < sq["time"][:, None].expand(-1, n)[ok]).all()  # strictly before the candidate
    assert (sq["hist_item"][~ok] == -1).all() and (sq["hist_item"][ok] >= 0).all()
    assert (sq["time"][1:] >= sq["time"][:-1]).all()  # time-ordered
    tt = torch.where(ok, sq["hist_time"], torch.iinfo(torch.int64).max)
    assert (tt[:, 1:] >= tt[:, :-1]).all()  # oldest first within a row
    tr, va, te = H.time_split(sq)
    assert tr["time"].max() <= va["time"].min() and va["time"].max() <= te["time"].min()


def test_movielens_loader_leakage():
    pytest.importorskip("recbole")
    from lipapers.data import movielens_100k
    sq, feats = H.movielens_sequences(movielens_100k(), n_hist=30, n_rows=3000)
    ok = torch.arange(30)[None] < sq["hist_len"][:, None]
    assert (sq["hist_time"][ok] < sq["time"][:, None].expand(-1, 30)[ok]).all()
    assert (sq["hist_action"][ok] >= 0).all() and (sq["hist_action"][ok] <= 4).all()
    assert feats.shape[0] > int(sq["cand_item"].max()) and len(sq["label"]) == 3000


def test_shuffle_keeps_labels_moves_histories():
    b = ragged_batch(B=3) | dict(cand_item=torch.tensor([1, 2, 3]), label=torch.tensor([0, 1, 0]))
    s = H.shuffle_histories(b, seed=3)
    assert torch.equal(s["label"], b["label"]) and torch.equal(s["cand_item"], b["cand_item"])
    assert sorted(s["hist_len"].tolist()) == sorted(b["hist_len"].tolist())


def test_fit_learns_a_planted_rule():
    """Label = 1 iff the candidate appears in the history: append_cross must learn it (AUC > 0.75 after 6 epochs; 0.83 seen); none cannot."""
    from sklearn.metrics import roc_auc_score
    g = torch.Generator().manual_seed(0); N, n = 3000, 6
    hist = torch.randint(0, 30, (N, n), generator=g)
    y = torch.rand(N, generator=g) < 0.5
    other = torch.randint(0, 30, (N,), generator=g)
    cand = torch.where(y, hist[torch.arange(N), torch.randint(0, n, (N,), generator=g)], other)
    y = (hist == cand[:, None]).any(1)
    d = dict(hist_item=hist, hist_action=torch.zeros(N, n, dtype=torch.long), hist_len=torch.full((N,), n),
             cand_item=cand, label=y.long())
    tr, te = {k: v[:2400] for k, v in d.items()}, {k: v[2400:] for k, v in d.items()}
    auc = {}
    for f in ("none", "append_cross"):
        torch.manual_seed(0)
        mdl = H.HistoryRanker(30, 1, d=16, fusion=f, hidden=(32,), max_len=n)
        H.fit(mdl, tr, epochs=6, lr=3e-3, batch_size=64, seed=0)
        auc[f] = roc_auc_score(te["label"].numpy(), H.predict(mdl, te))
    assert auc["append_cross"] > 0.75 and auc["none"] < 0.65, auc


def test_bad_inputs():
    mdl, b = model(), ragged_batch()
    c = torch.randint(0, 40, (3, 4))
    with pytest.raises(ValueError, match="fusion must be one of"): H.HistoryRanker(40, 4, fusion="sum")
    with pytest.raises(ValueError, match="mode must be one of"): mdl.score(b, c, "batched")
    for f in ("concat", "append_self"):
        with pytest.raises(ValueError, match="history attends the candidate"): model(f).score(b, c, "one_pass")
        with pytest.raises(ValueError, match="history attends the candidate"): model(f).encode_history(b)
    with pytest.raises(ValueError, match=r"hist_len must be in \[0, 20\]"): mdl.score(b | dict(hist_len=torch.tensor([1, 21, 2])), c)
    with pytest.raises(ValueError, match=r"hist_len must be in \[0, 20\]"): mdl.score(b | dict(hist_len=torch.tensor([1, -1, 2])), c)
    with pytest.raises(ValueError, match="cand_items must be ids in"): mdl.score(b, c + 40)
    with pytest.raises(ValueError, match="hist_item .valid slots. must be ids in"):
        mdl.score(b | dict(hist_item=b["hist_item"].clamp_min(0) + 40), c)
    with pytest.raises(ValueError, match="hist_action .valid slots. must be ids in"):
        mdl.score(b | dict(hist_action=b["hist_action"] + 9), c)
    with pytest.raises(ValueError, match=r"cand_items must be \(B=3, m\)"): mdl.score(b, c[:2])
    with pytest.raises(ValueError, match=r"hist_action must have shape \(3, 20\)"): mdl.score(b | dict(hist_action=b["hist_action"][:2]), c)
    with pytest.raises(ValueError, match="chunk must be None or an int ≥ 1"): mdl.score(b, c, chunk=0)
    with pytest.raises(ValueError, match="training mode with dropout"): model(dropout=0.1).train().score(b, c)
    with pytest.raises(ValueError, match="candidates carry no action"): mdl(b | dict(cand_item=c[:, 0], cand_action=c[:, 0]))
    with pytest.raises(ValueError, match="batch is missing"): mdl({"hist_item": b["hist_item"]})
    with pytest.raises(ValueError, match="more than max_len=32"): mdl.score(ragged_batch(n=40, lens=(1, 2, 3)), c)
    with pytest.raises(ValueError, match="item_feats must be"): H.HistoryRanker(40, 4, item_feats=np.zeros((39, 3)))
    with pytest.raises(ValueError, match="n_heads must be ≥ 1 and divide"): H.EncoderLayer(10, 3)
    with pytest.raises(ValueError, match="dataset must be one of"): H.make_dataset("criteo", 0, 10)
    with pytest.raises(ValueError, match="fusion must be one of"): H.encoder_flops("sum", 1, 1, 1)
