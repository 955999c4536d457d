"""Tests for lipapers.ffn_split: neuron statistics, Gini, budgets, SplitFFN, controls, model compression, bad inputs.

Tolerances: float32 modules compared with atol 1e-5 (rtol 1e-4) — splits re-associate sums over hidden units; float64
SVD is cast to float32. Grid membership via lipapers.quantease.on_grid (1e-5 of the step size)."""
import pytest
import torch
from torch import nn

from lipapers.ffn_split import (
    SplitFFN, compress_model, ffn_error, ffn_params, gini, heavy_hitters, hidden, mlp_stats, neuron_stats,
    planted_ffn, rank_for_budget, rotate_hidden, split_ffn, uniform_ffn, check_ids, gain_rows, check_params,
    rel_ffn_error,
)
from lipapers.lm import LM, LMConfig, MLP
from lipapers.quantease import on_grid

torch.set_num_threads(1)
close = lambda a, b: torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
CFG = LMConfig(vocab_size=50, d_model=24, n_layers=2, n_heads=2, max_seq_len=20, d_ff=40)


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    return LM(CFG).eval()


def llama_mlp():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP
    torch.manual_seed(1)
    return LlamaMLP(LlamaConfig(hidden_size=24, intermediate_size=40, hidden_act="silu", num_attention_heads=2, num_key_value_heads=2))


@pytest.mark.parametrize("kind", ["lm", "llama"])
def test_split_equals_original(lm, kind):
    mlp = lm.layers[0].mlp if kind == "lm" else llama_mlp()
    x = torch.randn(3, 7, 24)
    with torch.no_grad():
        y = mlp(x)
        for f in (split_ffn(mlp, [0, 3, 39]), split_ffn(mlp, [2, 5], rank=24), split_ffn(mlp, list(range(39))),
                  split_ffn(mlp, [7], part="down"), split_ffn(mlp, [7], rank=24, part="down"), uniform_ffn(mlp, rank=24)):
            close(f(x), y)


def test_params_match_module(lm):
    mlp = lm.layers[0].mlp
    for k, r, part in [(0, 5, "all"), (4, 7, "all"), (3, 2, "down"), (0, 1, "down")]:
        f = split_ffn(mlp, list(range(k)), rank=r, part=part)
        assert sum(p.numel() for p in f.parameters()) == ffn_params(24, 40, k, r, part)
    assert ffn_params(24, 40, 0, 0) == 0 and ffn_params(10, 20, 0, 3) == 3 * 3 * 30


def test_rank_for_budget_largest():
    for d, m, k, b in [(576, 1536, 0, 0.57), (576, 1536, 77, 0.4), (256, 704, 35, 0.75)]:
        r = rank_for_budget(d, m, k, b)
        assert ffn_params(d, m, k, r) <= b * 3 * d * m < ffn_params(d, m, k, r + 1)


def test_neuron_stats_loop(lm):
    ids = torch.randint(0, 50, (3, 9))
    st = neuron_stats(lm, ids, batch_size=2, top_frac=0.05)
    acts = []
    h = lm.layers[0].mlp.register_forward_hook(lambda m, a, o: acts.append(hidden(m, a[0]).detach()))
    with torch.no_grad(): lm(ids)
    h.remove()
    cn = lm.layers[0].mlp.down_proj.weight.detach().norm(dim=0)
    per = [acts[0][b, t].abs() * cn for b in range(3) for t in range(9)]
    close(st[0].mean_norm, torch.stack(per).mean(0))
    k = 2  # ceil(0.05 * 40)
    freq = torch.zeros(40)
    for n in per: freq[n.topk(k).indices] += 1
    close(st[0].top_freq, freq / len(per))


def test_gini():
    assert gini(torch.ones(5)) == 0.0
    assert abs(gini(torch.tensor([0.0, 0, 0, 0, 2])) - 4 / 5) < 1e-12
    v = torch.rand(30, dtype=torch.float64)
    assert abs(gini(v) - float((v[:, None] - v[None]).abs().mean() / (2 * v.mean()))) < 1e-10


def test_rotation_keeps_logits_and_uniform_down(lm):
    rot = rotate_hidden(lm, seed=3)
    ids = torch.randint(0, 50, (2, 11))
    with torch.no_grad():
        close(rot(ids).logits, lm(ids).logits)
        x = torch.randn(4, 24)
        close(uniform_ffn(rot.layers[1].mlp, rank=6, part="down")(x), uniform_ffn(lm.layers[1].mlp, rank=6, part="down")(x))


def test_planted_recall_and_gap():
    f, sample, heavy = planted_ffn(48, 160, 3, 3.0, seed=2)
    st = mlp_stats(f, sample(1024, 5))
    assert heavy_hitters(st, 3).tolist() == heavy.tolist()
    x = sample(1024, 6)
    s = rel_ffn_error(f, split_ffn(f, heavy_hitters(st, 5), rank=rank_for_budget(48, 160, 5, 0.4)), x)
    u = rel_ffn_error(f, uniform_ffn(f, rank=rank_for_budget(48, 160, 0, 0.4)), x)
    assert s < 0.2 * u


def test_quantized_parts_on_grid(lm):
    f = split_ffn(lm.layers[0].mlp, [1, 2, 3, 4], bits=3, heavy_bits=8)
    for lin in (f.gate_l, f.up_l, f.down_l, f.gate_h, f.up_h, f.down_h):
        assert on_grid(lin.weight.detach(), lin.grid).all()
    assert f.gate_l.bits == 3 and f.down_h.bits == 8


def test_compress_model_and_error(lm):
    cal = torch.randint(0, 50, (4, 12))
    cm, recs = compress_model(lm, cal, "split", budget=0.6, k_frac=0.1)
    assert [r["k"] for r in recs] == [4, 4] and all(r["rho"] <= 0.6 for r in recs)
    err = ffn_error(lm, cm, cal)
    assert len(err) == 2 and all(0 < e < 1 for e in err)
    cm2, _ = compress_model(lm, cal, "split", budget=0.6, k_frac=0.1)
    with torch.no_grad(): close(cm(cal).logits, cm2(cal).logits)   # same seed, same result


def test_bad_inputs(lm):
    mlp, cal = lm.layers[0].mlp, torch.randint(0, 50, (2, 8))
    with pytest.raises(ValueError, match="k < m = 40"): split_ffn(mlp, list(range(40)))
    with pytest.raises(ValueError, match=r"k must be an int in \[0, 39\]"): heavy_hitters(neuron_stats(lm, cal)[0], -1)
    with pytest.raises(ValueError, match="below the heavy part alone.*budget ≥"): rank_for_budget(24, 40, 20, 0.3)
    with pytest.raises(ValueError, match=r"budget must be in \(0, 1\]"): rank_for_budget(24, 40, 2, 1.5)
    with pytest.raises(ValueError, match=r"rank must be an int in \[1, 24\]"): split_ffn(mlp, [1], rank=25)
    with pytest.raises(ValueError, match=r"rank must be an int in \[1, 24\]"): split_ffn(mlp, [1], rank=0)
    with pytest.raises(ValueError, match="bits must be one of"): split_ffn(mlp, [1], bits=7)
    other = LM(CFG)
    with pytest.raises(ValueError, match="stats come from another model"):
        compress_model(lm, cal, stats=neuron_stats(other, cal))
    with pytest.raises(ValueError, match="stats have 1 layers, the model has 2"):
        compress_model(lm, cal, stats=neuron_stats(lm, cal)[:1])
    with pytest.raises(ValueError, match="not a gated FFN"): split_ffn(nn.Sequential(nn.Linear(2, 2)), [0])
    with pytest.raises(ValueError, match=r"valid \[0, 49\]"): check_ids(lm, torch.full((2, 3), 50))
    with pytest.raises(ValueError, match="context is 20"): check_ids(lm, torch.zeros(1, 21, dtype=torch.long))
    with pytest.raises(ValueError, match="mode must be one of"): compress_model(lm, cal, mode="best")
    with pytest.raises(ValueError, match="cannot split a rotated FFN"): split_ffn(rotate_hidden(lm).layers[0].mlp, [1])
    with pytest.raises(ValueError, match="model_name must be one of"):
        check_params("big", "all", [0.5], [0.1], ["all"], ["rtn"], 0, 1)


def test_gain_rows():
    import polars as pl
    f = pl.DataFrame([dict(bed="b", seed=0, budget=0.5, k_frac=0.1, ffn_part="down", rotated=r, method=m,
                           metric="ffn_error", value=v) for r, m, v in
                      [(False, "split", 0.5), (False, "uniform", 1.0), (True, "split", 1.0), (True, "uniform", 1.0)]])
    assert sorted((r["method"], r["value"]) for r in gain_rows(f)) == [("original", 50.0), ("rotated", 0.0)]


def test_gold_accuracy_equals_tasks_evaluate():
    "Greedy-only gold reward equals the mean of lipapers.tasks.evaluate's per-family gold reward (same prompts)."
    from lipapers.ffn_split import gold_accuracy
    from lipapers.lm import pretrained
    from lipapers.tasks import evaluate
    model, tok, _ = pretrained("tiny", progress=False)
    model.eval()
    for n, seed in ((3, 0), (2, 5)):
        ref = float(evaluate(model, tok, n=n, seed=seed, max_new_tokens=8)["gold_reward"].mean())
        assert abs(gold_accuracy(model, tok, n=n, seed=seed, max_new_tokens=8) - ref) < 1e-12
