"""Model-level checks: the transformers Llama patch, the lipapers.lm backend switch, and short-run convergence."""

import pytest
import torch

import lipapers.kernels as K

transformers = pytest.importorskip("transformers")


def tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, attn_implementation="eager")
    return LlamaForCausalLM(cfg).float()


def run(model, ids, labels):
    model.zero_grad()
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return out, logits, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_patch_llama_same_logits_loss_grads(monkeypatch):
    from transformers.models.llama import modeling_llama as ml

    model = tiny_llama()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 97, (2, 11), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100
    out0, logits0, grads0 = run(model, ids, labels)
    orig_rope = ml.apply_rotary_pos_emb

    calls = {}
    for name in ("rms_norm", "rope", "swiglu", "fused_linear_cross_entropy"):  # count that the kernels really run
        fn = getattr(K, name)
        monkeypatch.setattr(K, name, lambda *a, _fn=fn, _n=name, **k: calls.__setitem__(_n, calls.get(_n, 0) + 1) or _fn(*a, **k))
    K.patch_llama(model, backend="triton")
    out1, logits1, grads1 = run(model, ids, labels)
    assert out1.logits is None  # FLCE: no (B, T, V) logits when labels are given
    assert calls["rms_norm"] == 2 * (2 * 2 + 1) and calls["rope"] == 2 * 2 and calls["swiglu"] == 2 * 2
    assert calls["fused_linear_cross_entropy"] == 1
    torch.testing.assert_close(out1.loss, out0.loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(logits1, logits0, atol=1e-5, rtol=1e-5)
    for n in grads0:
        torch.testing.assert_close(grads1[n], grads0[n], atol=1e-5, rtol=1e-4, msg=n)

    K.unpatch_llama(model)
    assert ml.apply_rotary_pos_emb is orig_rope and "forward" not in vars(model)
    _, logits2, _ = run(model, ids, labels)
    assert torch.equal(logits2, logits0)  # reversed exactly
    with pytest.raises(RuntimeError, match="not patched"):
        K.unpatch_llama(model)


def lm_available():
    try:
        import lipapers.lm  # noqa: F401
    except Exception:
        return False
    return True


@pytest.mark.skipif(not lm_available(), reason="lipapers.lm not exported yet")
def test_lm_convergence_triton_vs_torch():
    """lipapers.lm tiny model, 20 AdamW steps: the Triton backend tracks the torch backend step by step."""
    from lipapers.lm import LM, LMConfig

    cfg = LMConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, max_seq_len=8)
    g = torch.Generator().manual_seed(0)
    base = torch.randint(0, 64, (4, 8), generator=g)
    batches = [base[torch.randint(0, 4, (2,), generator=g)] for _ in range(20)]

    def train(backend):
        torch.manual_seed(0)
        model = LM(cfg)
        if backend == "triton":
            K.patch_lm(model, "triton")
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses = []
        for b in batches:
            loss = model(b, labels=b, fused_loss=True).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        if backend == "triton":
            K.unpatch_lm(model)
            assert model.backend == "torch"
        return torch.tensor(losses), model.state_dict()

    l_torch, sd_torch = train("torch")
    l_triton, sd_triton = train("triton")
    assert l_torch[-1] < l_torch[0] - 0.3  # it does learn (memorises 4 sequences)
    # fp32: per-step losses within 1e-4 relative, final weights within 1e-4 (written-down tolerance)
    torch.testing.assert_close(l_triton, l_torch, atol=1e-5, rtol=1e-4)
    for n in sd_torch:
        torch.testing.assert_close(sd_triton[n], sd_torch[n], atol=1e-4, rtol=1e-4, msg=n)


def test_modules_drop_in():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    hf = LlamaRMSNorm(24, eps=1e-6)
    ours = K.RMSNorm(24, eps=1e-6, backend="triton")
    with torch.no_grad():
        hf.weight.normal_()
        ours.weight.copy_(hf.weight)
    x = torch.randn(3, 5, 24)
    torch.testing.assert_close(ours(x), hf(x), atol=1e-5, rtol=1e-5)
    mlp = K.SwiGLUMLP(16, 40, backend="torch")
    h = torch.randn(2, 3, 16)
    ref = mlp.down_proj(torch.nn.functional.silu(mlp.gate_proj(h)) * mlp.up_proj(h))
    torch.testing.assert_close(mlp(h), ref)
    loss_fn = K.FusedLinearCrossEntropyLoss(backend="torch")
    w, y = torch.randn(50, 16), torch.randint(0, 50, (6,))
    torch.testing.assert_close(loss_fn(h.reshape(6, 16), w, y), torch.nn.functional.cross_entropy(h.reshape(6, 16) @ w.t(), y))
    with pytest.raises(ValueError, match="backend"):
        K.RMSNorm(8, backend="gpu")
