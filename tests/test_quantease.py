"""Tests for lipapers.quantease: grids, RTN, GPTQ, QuantEase (+ outliers, GPTQ-init) and the layer-wise driver.

Tolerances: float32 everywhere. Grid membership is checked to 1e-5 of the step size; objective monotonicity allows a
relative slack of 1e-6 (float32 summation order); GPTQ(identity H) == RTN is exact (no error is propagated)."""
import pytest
import torch

from lipapers.quantease import (
    BEDS, SUPPORTED_BITS, VARIANTS, compare_on_layer, eval_windows, gptq_quantease, gptq_quantize, grid_dequantize,
    grid_quantize, grid_round, layer_error, make_grid, on_grid, quantease, quantease_outliers, quantize_variant,
    rel_error, relaxed_sweep, rtn_quantize, synthetic_layer,
)

torch.set_num_threads(1)


def correlated(q=24, p=40, n=300, seed=0, rho=0.8):  # noqa: D401
    "Random layer W (q, p) and H = XXᵀ of inputs with strongly correlated channels."
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(q, p, generator=g)
    A = rho * torch.randn(p, 4, generator=g) @ torch.randn(4, n, generator=g)  # low-rank shared factors
    X = A + (1 - rho) * torch.randn(p, n, generator=g) + 0.3 * torch.randn(p, 1, generator=g)
    X = X * torch.rand(p, 1, generator=g).add(0.2)  # unequal channel scales
    return W, X @ X.T


def brute_rtn(W, bits):
    "Independent per-row RTN: nearest of the 2^b grid points by exhaustive search."
    out = torch.empty_like(W)
    for r in range(W.shape[0]):
        lo, hi = min(W[r].min().item(), 0.0), max(W[r].max().item(), 0.0)
        s = (hi - lo) / (2**bits - 1)
        z = round(-lo / s)
        pts = s * (torch.arange(2**bits, dtype=torch.float32) - z)
        out[r] = pts[(W[r, :, None] - pts).abs().argmin(-1)]
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_rtn_equals_grid_rounding_and_brute_force(bits):
    W, _ = correlated(q=7, p=13, seed=bits)
    g = make_grid(W, bits)
    torch.testing.assert_close(rtn_quantize(W, bits), grid_round(W, g), rtol=0, atol=0)
    torch.testing.assert_close(rtn_quantize(W, bits), brute_rtn(W, bits), rtol=0, atol=1e-6)


@pytest.mark.parametrize("group_size,mse", [(None, False), (8, False), (None, True), (8, True)])
def test_every_method_on_grid(group_size, mse):
    W, H = correlated(q=10, p=32, seed=1)
    g = make_grid(W, 3, group_size=group_size, mse=mse)
    kw = dict(grid=g)
    for What in [rtn_quantize(W, 3, **kw), gptq_quantize(W, H, 3, **kw), gptq_quantize(W, H, 3, act_order=True, **kw),
                 quantease(W, H, 3, iters=7, **kw), gptq_quantease(W, H, 3, iters=3, **kw)]:
        assert on_grid(What, g).all()
        codes = grid_quantize(What, g)
        assert codes.min() >= 0 and codes.max() <= 2**3 - 1


def test_mse_grid_not_worse_than_minmax():
    W, _ = correlated(q=16, p=64, seed=2)
    W[:, 0] *= 8  # an outlier column stretches the min-max range
    e = lambda g: ((grid_round(W, g) - W) ** 2).sum(1)
    assert (e(make_grid(W, 3, mse=True)) <= e(make_grid(W, 3)) + 1e-6).all()


def test_quantize_dequantize_round_trip():
    W, _ = correlated(q=9, p=24, seed=3)
    g = make_grid(W, 4, group_size=6)
    Q = grid_quantize(W, g)
    assert torch.equal(Q, Q.round()) and Q.min() >= 0 and Q.max() <= 15
    Wq = grid_dequantize(Q, g)
    torch.testing.assert_close(grid_quantize(Wq, g), Q, rtol=0, atol=0)  # codes survive a round trip
    torch.testing.assert_close(grid_round(Wq, g), Wq, rtol=0, atol=1e-6)  # grid points are fixed points
    assert ((Wq - W).abs() <= g.expand(24)[0] / 2 + 1e-6).all()  # inside the range: error ≤ s/2


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_identity_H_equals_rtn(bits):
    W, _ = correlated(q=12, p=300, seed=bits)  # p > block_size: crosses a lazy-batch boundary
    p = W.shape[1]
    for act_order in (False, True):
        torch.testing.assert_close(gptq_quantize(W, torch.eye(p), bits, act_order=act_order), rtn_quantize(W, bits),
                                   rtol=0, atol=0)


def naive_obs_gptq(W, H, bits, damp=0.01, perm=None):
    "GPTQ in its original OBS form (GPTQ paper Eq. 2-3): explicit inverse, one column at a time, float64, in `perm` order."
    g = make_grid(W, bits)
    perm = torch.arange(W.shape[1]) if perm is None else perm
    W, H = W[:, perm].double().clone(), H[perm][:, perm].double().clone()
    s, z = g.scale[:, 0].double(), g.zero[:, 0].double()
    Q = _obs_loop(W, H, s, z, bits, damp)
    return Q[:, torch.argsort(perm)].float()


def _obs_loop(W, H, s, z, bits, damp):
    H += damp * torch.diagonal(H).mean() * torch.eye(H.shape[0], dtype=torch.float64)
    Hinv, Q = torch.linalg.inv(H), torch.zeros_like(W)
    for j in range(W.shape[1]):
        Q[:, j] = s * (torch.clamp(torch.round(W[:, j] / s) + z, 0, 2**bits - 1) - z)
        err = (W[:, j] - Q[:, j]) / Hinv[j, j]
        W[:, j:] -= err[:, None] * Hinv[j, j:][None]
        Hinv = Hinv - Hinv[:, j:j + 1] @ Hinv[j:j + 1, :] / Hinv[j, j]  # remove column j (Gaussian elimination)
    return Q


@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_matches_naive_obs_reference(bits):
    W, H = correlated(q=10, p=30, seed=20 + bits)
    torch.testing.assert_close(gptq_quantize(W, H, bits, block_size=8), naive_obs_gptq(W, H, bits), rtol=0, atol=1e-4)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_act_order_matches_naive_obs_in_the_same_order(bits):
    W, H = correlated(q=10, p=30, seed=40 + bits)
    perm = torch.argsort(torch.diagonal(H), descending=True)
    assert not torch.equal(perm, torch.arange(30))  # the order really differs here
    ours = gptq_quantize(W, H, bits, block_size=8, act_order=True)
    torch.testing.assert_close(ours, naive_obs_gptq(W, H, bits, perm=perm), rtol=0, atol=1e-4)
    assert not torch.equal(ours, gptq_quantize(W, H, bits, block_size=8))  # and the order changes the answer


def test_gptq_lazy_batches_match_unblocked():
    W, H = correlated(q=8, p=50, seed=4)
    torch.testing.assert_close(gptq_quantize(W, H, 3, block_size=7), gptq_quantize(W, H, 3, block_size=50),
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("bits,seed", [(2, 0), (3, 1), (4, 2), (3, 3)])
def test_quantease_beats_rtn_and_gptq_init_never_worse(bits, seed):
    W, H = correlated(seed=seed)
    rtn, gq = rtn_quantize(W, bits), gptq_quantize(W, H, bits)
    qe, gqe = quantease(W, H, bits, iters=15), gptq_quantease(W, H, bits, iters=4)
    assert layer_error(W, qe, H) <= layer_error(W, rtn, H)
    assert layer_error(W, gqe, H) <= layer_error(W, gq, H) * (1 + 1e-6)
    assert layer_error(W, qe, H) < 0.8 * layer_error(W, rtn, H)  # not just "no worse": clearly better here


def official_relaxed(it, iters):
    "The official loop's test, written for a 1-based sweep: 0-based i = it - 1 rounds unless i % 3 == 1, i <= 25, not last."
    i = it - 1
    return not (i % 3 != 1 or i == iters - 1 or i > 25)


def naive_cd(W, H, bits, iters):
    "Paper's CD written directly from Eq. (2), one column at a time, float64, with the official relaxed schedule."
    g = make_grid(W, bits)
    s, z = g.scale[:, 0].double(), g.zero[:, 0].double()
    W, S = W.double(), H.double()
    What = W.clone()
    for it in range(1, iters + 1):
        relaxed = official_relaxed(it, iters)
        for j in torch.argsort(torch.diagonal(S), descending=True).tolist():
            u = W[:, j] + sum((W[:, k] - What[:, k]) * S[k, j] / S[j, j] for k in range(W.shape[1]) if k != j)
            What[:, j] = u if relaxed else s * (torch.clamp(torch.round(u / s) + z, 0, 2**bits - 1) - z)
    return What.float()


def test_quantease_matches_naive_cd():
    W, H = correlated(q=6, p=14, seed=13)
    torch.testing.assert_close(quantease(W, H, 3, iters=5, block_size=4), naive_cd(W, H, 3, 5), rtol=0, atol=1e-4)


def test_relaxed_schedule_is_the_official_one():
    assert [it for it in range(1, 31) if relaxed_sweep(it, 30)] == [2, 5, 8, 11, 14, 17, 20, 23, 26]
    for iters in (1, 2, 3, 5, 10, 27, 28, 30, 40):
        assert [relaxed_sweep(it, iters) for it in range(1, iters + 1)] == \
            [official_relaxed(it, iters) for it in range(1, iters + 1)]
    assert not relaxed_sweep(1, 30)  # the first sweep rounds (it starts from W)


def official_form(W, H, bits, iters):
    "QuantEase in the official code's formulation (our transcription): P = W·Σ/diag, P̂ = Ŵ·N per sweep, running ΔŴ."
    g = make_grid(W, bits)
    s, z, maxq = g.scale[:, 0], g.zero[:, 0], 2**bits - 1
    perm = torch.argsort(torch.diagonal(H), descending=True)
    W, S = W[:, perm].float(), H[perm][:, perm].float()
    N = S / torch.diagonal(S)  # N[k, j] = Σ_kj / Σ_jj
    P = W @ N
    N.fill_diagonal_(0)
    NT, What = N.T.contiguous(), W.clone()
    for i in range(iters):
        delta = What.clone().T
        Phat = (NT @ delta).T
        for j in range(W.shape[1]):
            u = P[:, j] - Phat[:, j]
            if j > 0: u = u + NT[j, :j] @ delta[:j, :]
            if i % 3 != 1 or i == iters - 1 or i > 25:
                u = s * (torch.clamp(torch.round(u / s) + z, 0, maxq) - z)
            What[:, j] = u
            delta[j, :] -= u
    return What[:, torch.argsort(perm)]


@pytest.mark.parametrize("bits,iters,seed", [(3, 30, 0), (4, 10, 1), (2, 7, 2), (3, 5, 3)])
def test_quantease_equals_the_official_formulation_bit_for_bit(bits, iters, seed):
    W, H = correlated(q=16, p=48, seed=seed)
    assert torch.equal(quantease(W, H, bits, iters=iters), official_form(W, H, bits, iters))


def test_quantease_block_size_does_not_change_result():
    W, H = correlated(seed=5)
    torch.testing.assert_close(quantease(W, H, 3, iters=4, block_size=5), quantease(W, H, 3, iters=4, block_size=128),
                               rtol=0, atol=1e-5)


def _single_column_reference(W, H, bits, j, What):
    "Brute force: best grid value of column j given the other columns (each row separately)."
    g = make_grid(W, bits)
    s, z = g.scale[:, 0], g.zero[:, 0]
    best = What.clone()
    for r in range(W.shape[0]):
        pts = s[r] * (torch.arange(2**bits, dtype=torch.float32) - z[r])
        errs = []
        for v in pts:
            cand = What.clone(); cand[r, j] = v
            errs.append(layer_error(W, cand, H))
        best[r, j] = pts[int(torch.tensor(errs).argmin())]
    return best


def test_one_column_update_is_exact_block_minimiser():
    W, H = correlated(q=5, p=6, seed=6)
    start = rtn_quantize(W, 2)
    # one quantized sweep visiting columns in order: its first column update is the exact minimiser over the grid
    out = quantease(W, H, 2, iters=1, init=start, act_order=False, relax=False, block_size=1)
    ref = _single_column_reference(W, H, 2, 0, start)
    torch.testing.assert_close(out[:, 0], ref[:, 0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits", [3, 4])
def test_objective_monotone_over_quantized_sweeps(bits):
    W, H = correlated(seed=7)
    hist = []
    quantease(W, H, bits, iters=12, history=hist)
    assert [h[1] for h in hist[1:]] == [i not in (2, 5, 8, 11) for i in range(1, 13)]  # the official relaxed schedule
    for (i0, q0, f0), (i1, q1, f1) in zip(hist, hist[1:]):
        if q0 and q1 and i0 > 0: assert f1 <= f0 * (1 + 1e-6) + 1e-6, (i0, f0, f1)
        if not q1: assert f1 <= f0 * (1 + 1e-6) + 1e-6  # a relaxed sweep is also exact CD (continuous)
    h2 = []
    gptq_quantease(W, H, bits, iters=6, history=h2)
    fs = [h[2] for h in h2]
    assert all(b <= a * (1 + 1e-6) for a, b in zip(fs, fs[1:]))


def test_outliers_count_grid_and_gain():
    W, H = correlated(q=20, p=50, seed=8)
    W[3, 7] = 25.0; W[11, 40] = -30.0  # two planted outliers
    hist = []
    Q, S = quantease_outliers(W, H, 3, outlier_frac=0.02, iters=9, history=hist)
    k = round(0.02 * W.numel())
    assert int((S != 0).sum()) == k
    assert S[3, 7] != 0 and S[11, 40] != 0
    g = make_grid(W - torch.where(S != 0, W, 0), 3)
    assert on_grid(Q, g).all()
    plain = quantease(W, H, 3, iters=9)
    assert layer_error(W, Q + S, H) < layer_error(W, plain, H)
    q = [h for h in hist[1:] if h[1]]
    fs = [h[2] for h in q]
    assert fs[-1] <= fs[0]
    Q0, S0 = quantease_outliers(W, H, 3, outlier_frac=0.0, iters=3)
    assert not S0.any()


def brute_structured(W, H, bits, c):
    "Global optimum of Eq. (3) with input column c in full precision: the other columns on the grid of W without c."
    import itertools
    Wz = W.clone(); Wz[:, c] = 0
    g = make_grid(Wz, bits)
    others = [k for k in range(W.shape[1]) if k != c]
    best = 0.0
    for r in range(W.shape[0]):
        pts = g.scale[r, 0] * (torch.arange(2**bits, dtype=torch.float64) - g.zero[r, 0])
        fr = float("inf")
        for codes in itertools.product(range(2**bits), repeat=len(others)):
            d = W[r].double().clone()
            d[others] -= pts[list(codes)]
            d[c] = -(d[others] @ H[others, c].double()) / H[c, c]  # optimal full-precision column entry
            fr = min(fr, float(d @ H.double() @ d))
        best += fr
    return best


def test_structured_outliers_against_brute_force():
    W, H = correlated(q=3, p=5, n=60, seed=30)
    W[:, 2] *= 6  # a planted outlier input column
    Q, S = quantease_outliers(W, H, 2, outlier_frac=0.2, iters=30, structured=True)  # round(0.2·5) = 1 column
    assert torch.equal((S != 0).any(0), torch.tensor([False, False, True, False, False]))
    Wz = W.clone(); Wz[:, 2] = 0
    assert on_grid(Q, make_grid(Wz, 2)).all()
    f, fstar = layer_error(W, Q + S, H), brute_structured(W, H, 2, 2)
    best_other = min(brute_structured(W, H, 2, c) for c in (0, 1, 3, 4))
    assert fstar < best_other  # the planted column is the right one to keep
    assert fstar * (1 - 1e-6) <= f <= fstar * 1.05, (f, fstar)


def test_outliers_zero_fraction_is_plain_quantease():
    W, H = correlated(q=8, p=20, seed=31)
    for structured in (False, True):
        Q, S = quantease_outliers(W, H, 3, outlier_frac=0.0, iters=5, structured=structured)
        assert not S.any()
        torch.testing.assert_close(Q, quantease(W, H, 3, iters=5), rtol=0, atol=0)


def test_synthetic_beds_and_variants():
    for kind in BEDS:
        W, H = synthetic_layer(kind, 8, 16, seed=1)
        assert W.shape == (8, 16) and H.shape == (16, 16) and torch.allclose(H, H.T)
    assert torch.linalg.matrix_rank(synthetic_layer("lowrank", 8, 16)[1]) <= 4
    W, H = synthetic_layer("iid", 8, 16, seed=2)
    rows = compare_on_layer(W, H, list(VARIANTS), 3, outlier_iters=3)
    assert [r["method"] for r in rows] == list(VARIANTS) and all(r["rel_error"] > 0 for r in rows)
    with pytest.raises(ValueError, match="unknown variants"):
        compare_on_layer(W, H, ["rtn", "awq"], 3)
    with pytest.raises(ValueError, match="kind must be one of"):
        synthetic_layer("heavy")
    g = make_grid(W, 3, group_size=4)
    assert on_grid(quantize_variant(W, H, "quantease_10", 3, group_size=4), g).all()


def test_eval_windows_are_seeded_whole_windows():
    t = torch.arange(10_000)
    a, b = eval_windows(t, 1000, 100, seed=0), eval_windows(t, 1000, 100, seed=1)
    assert a.numel() == 1000 and torch.equal(a, eval_windows(t, 1000, 100, seed=0)) and not torch.equal(a, b)
    assert (a.view(10, 100)[:, 0] % 100 == 0).all() and (a.view(10, 100).diff(dim=1) == 1).all()


def test_zero_and_constant_columns_and_rows():
    W, H = correlated(q=8, p=20, seed=9)
    W[:, 2] = 0.0; W[:, 5] = 0.37; W[4] = 0.0; W[6] = -1.5  # zero / constant columns, zero / constant rows
    H[3, :] = 0; H[:, 3] = 0  # a dead input channel
    g = make_grid(W, 3)
    for What in [rtn_quantize(W, 3), gptq_quantize(W, H, 3), quantease(W, H, 3, iters=4),
                 quantease_outliers(W, H, 3, 0.01, iters=3)[0]]:
        assert torch.isfinite(What).all()
        assert torch.equal(What[4], torch.zeros(20))  # zero row stays exactly zero (0 is on every grid)
    assert on_grid(quantease(W, H, 3, iters=4), g).all()
    torch.testing.assert_close(rtn_quantize(W, 3)[6], torch.full((20,), -1.5))  # constant row is representable


def test_singular_H_handled_by_damping():
    g = torch.Generator().manual_seed(10)
    W, X = torch.randn(6, 30, generator=g), torch.randn(30, 5, generator=g)  # rank 5 < p = 30
    H = X @ X.T
    What = gptq_quantize(W, H, 4)
    assert torch.isfinite(What).all() and on_grid(What, make_grid(W, 4)).all()
    assert layer_error(W, What, H) <= layer_error(W, rtn_quantize(W, 4), H) * 1.05
    assert torch.isfinite(quantease(W, H, 4, iters=3)).all()
    with pytest.raises(ValueError, match="damp"):
        gptq_quantize(W, H, 4, damp=0.0)
    assert torch.equal(gptq_quantize(W, torch.zeros(30, 30), 4), rtn_quantize(W, 4))  # all-dead H: plain rounding


def test_bad_inputs_raise_clear_errors():
    W, H = correlated(q=4, p=8, seed=11)
    for bad in (1, 7, 16, 3.0, True):
        with pytest.raises(ValueError, match="bits must be one of"):
            rtn_quantize(W, bad)
    assert 3 in SUPPORTED_BITS
    with pytest.raises(ValueError, match=r"H must be \(p, p\)"):
        quantease(W, H[:7, :7], 3)
    with pytest.raises(ValueError, match=r"H must be \(p, p\)"):
        gptq_quantize(W, torch.eye(9), 3)
    with pytest.raises(ValueError, match="2-D"):
        rtn_quantize(W[0], 3)
    with pytest.raises(ValueError, match="group_size"):
        make_grid(W, 3, group_size=3)
    with pytest.raises(TypeError, match="floating"):
        rtn_quantize(W.long(), 3)
    with pytest.raises(ValueError, match="iters"):
        quantease(W, H, 3, iters=0)
    with pytest.raises(ValueError, match="outlier_frac"):
        quantease_outliers(W, H, 3, outlier_frac=1.5)
    with pytest.raises(ValueError, match="init must have"):
        quantease(W, H, 3, init=W[:, :4])


def test_same_seed_same_result():
    W, H = correlated(seed=12)
    torch.testing.assert_close(quantease(W, H, 3, iters=5), quantease(W, H, 3, iters=5), rtol=0, atol=0)


# ---------------------------------------------------------------- driver (layer-by-layer, forward hooks)
import copy  # noqa: E402

import torch.nn as nn  # noqa: E402

from lipapers.quantease import calib_hessian, find_blocks, quantize_model  # noqa: E402


def tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=56, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def tiny_lm(seed=0):
    from lipapers.lm import LM, LMConfig
    torch.manual_seed(seed)
    return LM(LMConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, max_seq_len=32)).eval()


def _inputs_of(model, lin):
    "Independent capture of every input a Linear receives in one full forward."
    xs = []
    h = lin.register_forward_pre_hook(lambda m, a: xs.append(a[0].detach()))
    with torch.no_grad():
        model(CALIB)
    h.remove()
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in xs])


CALIB = torch.randint(0, 61, (6, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("make", [tiny_llama, tiny_lm])
def test_driver_rtn_matches_per_weight_rtn(make):
    m = make()
    ref = {n: rtn_quantize(p.data, 3) for n, p in m.named_parameters() if p.ndim == 2 and ".layers." in f".{n}"}
    recs = quantize_model(m, CALIB, "rtn", 3, batch_size=4)
    assert len(recs) == 7 * 2 and {r["layer"] for r in recs} >= {"self_attn.q_proj", "mlp.down_proj"}
    for n, p in m.named_parameters():
        if n in ref: torch.testing.assert_close(p.data, ref[n], rtol=0, atol=0)
    assert isinstance(find_blocks(m), nn.ModuleList)


@pytest.mark.parametrize("make", [tiny_llama, tiny_lm])
def test_driver_is_sequential_and_hessians_are_right(make):
    fp = make()
    m = copy.deepcopy(fp)
    recs = quantize_model(m, CALIB, "gptq", 3, batch_size=4)
    blocks_fp, blocks_q = find_blocks(fp), find_blocks(m)
    # down_proj of the last block is quantized last: its Σ must come from the *quantized* model's own activations
    x = _inputs_of(m, blocks_q[-1].mlp.down_proj)
    H_ref = x.T.double() @ x.double() / x.shape[0]
    torch.testing.assert_close(calib_hessian(x) / x.shape[0], H_ref.float(), rtol=1e-5, atol=1e-6)
    r = [r for r in recs if r["block"] == 1 and r["layer"] == "mlp.down_proj"][0]
    W0, W1 = blocks_fp[-1].mlp.down_proj.weight.data, blocks_q[-1].mlp.down_proj.weight.data
    assert r["rel_error"] == pytest.approx(rel_error(W0, W1, H_ref.float()), rel=1e-4)
    # ... and the quantized weight is exactly GPTQ on that Σ
    torch.testing.assert_close(W1, gptq_quantize(W0, H_ref.float(), 3), rtol=0, atol=1e-5)
    # the FP model's activations differ, so sequential ≠ parallel here
    x_fp = _inputs_of(fp, blocks_fp[-1].mlp.down_proj)
    assert not torch.allclose(x_fp, x, atol=1e-4)


def test_driver_quantease_all_weights_on_grid_and_bad_method():
    m = tiny_llama(1)
    fp = copy.deepcopy(m)
    quantize_model(m, CALIB, "quantease", 4, iters=4)
    for (n, p), p0 in zip(m.named_parameters(), fp.parameters()):
        if p.ndim == 2 and ".layers." in n: assert on_grid(p.data, make_grid(p0.data, 4)).all(), n
    with pytest.raises(ValueError, match="method must be one of"):
        quantize_model(m, CALIB, "awq", 4)
    with pytest.raises(ValueError, match="bits must be one of"):
        quantize_model(m, CALIB, "rtn", 1)


# ---------------------------------------------------------------- shared-Σ model bed
from lipapers.quantease import (block_linears, collect_hessians, derived_rows, quantize_with,  # noqa: E402
                                status_or_not_run)


@pytest.mark.parametrize("make", [tiny_llama, tiny_lm])
def test_collect_hessians_matches_independent_capture_and_stops_early(make):
    m = make()
    Hs = collect_hessians(m, CALIB, batch_size=4)
    lins = block_linears(m)
    assert set(Hs) == set(lins) and len(lins) == 14
    for name in ("0.mlp.down_proj", "1.self_attn.q_proj") if make is tiny_llama else list(lins)[:3]:
        x = _inputs_of(m, lins[name]).double()
        torch.testing.assert_close(Hs[name], (x.T @ x / x.shape[0]).float(), rtol=1e-5, atol=1e-6)
    H1 = collect_hessians(m, CALIB, n_blocks=1, batch_size=4)
    assert set(H1) == {k for k in lins if k.startswith("0.")}
    assert all(torch.equal(H1[k], Hs[k]) for k in H1)
    with pytest.raises(ValueError, match="n_blocks"):
        block_linears(m, 3)


def test_quantize_with_uses_the_shared_sigma_and_leaves_the_model_alone():
    m = tiny_llama(2)
    Hs = collect_hessians(m, CALIB, n_blocks=1, batch_size=4)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    qm, rows = quantize_with(m, Hs, "gptq_act", 3)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    lq, l0 = block_linears(qm), block_linears(m)
    for r in rows:
        ref = gptq_quantize(l0[r["layer"]].weight.data, Hs[r["layer"]], 3, act_order=True)
        torch.testing.assert_close(lq[r["layer"]].weight.data, ref, rtol=0, atol=0)
    assert torch.equal(block_linears(qm)["1.mlp.up_proj"].weight, l0["1.mlp.up_proj"].weight)  # block 1 untouched


def test_derived_rows_and_status_helper():
    import polars as pl
    rows = []
    for sd in (0, 1):
        for lay, (a, b) in {"x": (1.0, 2.0), "y": (3.0, 2.0), "z": (1.0, 4.0)}.items():
            for m, v in (("quantease_30", a), ("gptq_act", b)):
                k = dict(bed="small", group=0, bits=3, seed=sd, layer=lay, method=m)
                rows += [dict(k, metric="layer_rel_error", value=v), dict(k, metric="layer_seconds", value=v)]
    out = {(r["seed"], r["metric"]): r["value"] for r in derived_rows(pl.DataFrame(rows))}
    assert out[(0, "frac_layers_below_gptq")] == pytest.approx(2 / 3)
    assert out[(1, "time_ratio_to_gptq")] == pytest.approx(5 / 8)
    from lipapers.core import Claim
    c1 = Claim("A", "s", "c", "layer_rel_error", "quantease_30", "gptq_act", direction="lower", agg="mean",
               where={"bed": "small"})
    c2 = Claim("B", "s", "c", "perplexity", "quantease_30", "gptq_act", where={"bed": "small"})
    t = status_or_not_run([c1, c2], pl.DataFrame(rows))
    assert t["claim"].to_list() == ["A", "B"] and t["verdict"][1] == "not run"
