"""Tests of lipapers.lm: the decoder against transformers' LlamaForCausalLM (forward and backward), the cache of
pretrained_tiny (bit-identical reload, corruption detected and rebuilt), training determinism, bad inputs, log-prob
masking, sampling and perplexity limiting cases.

Tolerances (fp32, CPU): logits/loss vs transformers rtol=atol=1e-5 (same ops in the same order, observed max diff 0 to
1e-6); gradients rtol=atol=1e-5; batched vs per-row log-probs atol=1e-4 (different matmul shapes, sums of ~10 terms)."""

import math
from dataclasses import replace
import os
import time
import warnings

import pytest
import torch

import lipapers.lm as L
from lipapers.lm import (LM, LMConfig, TrainConfig, from_llama, lm_loss, lr_factor, perplexity, sample, sequence_logprobs,
                         target_mask, to_llama, token_logprobs, train_lm, unigram_perplexity)

TOL = dict(rtol=1e-5, atol=1e-5)
CONFIGS = {
    "mha-tied": LMConfig(vocab_size=101, d_model=32, n_layers=2, n_heads=4, max_seq_len=24),
    "gqa-untied": LMConfig(vocab_size=97, d_model=48, n_layers=2, n_heads=6, n_kv_heads=2, max_seq_len=24,
                           tie_embeddings=False, rope_theta=500.0, norm_eps=1e-5, d_ff=70),
    "mqa": LMConfig(vocab_size=64, d_model=24, n_layers=1, n_heads=3, n_kv_heads=1, max_seq_len=24),
}


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def _hf_grads(hf):
    return {(k[6:] if k.startswith("model.") else k): p.grad for k, p in hf.named_parameters()}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("T", [1, 13, 24])
def test_matches_llama_forward_backward(name, T):
    cfg = CONFIGS[name]
    torch.manual_seed(0)
    ours = LM(cfg)
    hf = to_llama(ours).train()
    ids = torch.randint(0, cfg.vocab_size, (3, T))
    labels = ids.clone()
    if T > 2:
        labels[0, :3] = -100  # ignored targets take the same path in both
    a, b = ours(ids, labels=labels), hf(input_ids=ids, labels=labels)
    torch.testing.assert_close(a.logits, b.logits, **TOL)
    if T > 1:
        torch.testing.assert_close(a.loss, b.loss, **TOL)
        a.loss.backward(), b.loss.backward()
        hg = _hf_grads(hf)
        for k, p in ours.named_parameters():
            torch.testing.assert_close(p.grad, hg[k], **TOL, msg=lambda m: f"{name} grad {k}: {m}")


def test_attention_mask_matches_llama():
    cfg = CONFIGS["gqa-untied"]
    torch.manual_seed(1)
    ours = LM(cfg).eval()
    hf = to_llama(ours)
    ids = torch.randint(0, cfg.vocab_size, (3, 20))
    am = torch.ones(3, 20, dtype=torch.long)
    am[0, 11:] = 0
    am[2, 17:] = 0  # right padding
    with torch.no_grad():
        a, b = ours(ids, attention_mask=am).logits, hf(input_ids=ids, attention_mask=am).logits
    keep = am.bool()
    torch.testing.assert_close(a[keep], b[keep], **TOL)
    # real tokens are unaffected by what the padding holds
    ids2 = ids.masked_fill(~keep, 5)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids2, attention_mask=am).logits[keep], a[keep], **TOL)


def test_from_llama_roundtrip_exact():
    torch.manual_seed(2)
    for cfg in CONFIGS.values():
        ours = LM(cfg).eval()
        back = from_llama(to_llama(ours))
        ids = torch.randint(0, cfg.vocab_size, (2, 9))
        with torch.no_grad():
            torch.testing.assert_close(back(ids).logits, ours(ids).logits, rtol=0, atol=0)
        assert back.cfg == cfg


def test_lm_loss_is_shifted_cross_entropy():
    torch.manual_seed(3)
    logits, labels = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    labels[1, 2] = -100
    nll = [-torch.log_softmax(logits[b, t], -1)[labels[b, t + 1]] for b in range(2) for t in range(4) if labels[b, t + 1] != -100]
    torch.testing.assert_close(lm_loss(logits, labels), torch.stack(nll).mean())
    m = LM(CONFIGS["mqa"])  # the fused path of the torch backend gives the same loss and no logits
    ids = torch.randint(0, 64, (2, 9))
    fused = m(ids, labels=ids, fused_loss=True)
    assert fused.logits is None
    torch.testing.assert_close(fused.loss, m(ids, labels=ids).loss, rtol=0, atol=0)


def test_bad_configs_and_backend_errors():
    with pytest.raises(ValueError, match=r"n_heads=5 does not divide d_model=64; valid n_heads"):
        LMConfig(d_model=64, n_heads=5)
    with pytest.raises(ValueError, match=r"n_kv_heads=3 must divide n_heads=4"):
        LMConfig(d_model=64, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match=r"must be even for RoPE"):
        LMConfig(d_model=12, n_heads=4)
    with pytest.raises(ValueError, match=r"vocab_size must be a positive int"):
        LMConfig(vocab_size=0)
    with pytest.raises(ValueError, match=r"unknown backend 'cuda'; valid: torch, triton"):
        LM(CONFIGS["mqa"], backend="cuda")
    m = LM(CONFIGS["mqa"])
    with pytest.raises(ValueError, match=r"unknown backend"):
        m.backend = "tritonn"
    assert m.backend == "torch"
    with pytest.raises(ValueError, match=r"exceeds max_seq_len=24"):
        m(torch.zeros(1, 25, dtype=torch.long))
    with pytest.raises(ValueError, match=r"unknown backend"):
        L.pretrained_tiny(backend="jax")
    with pytest.raises(ValueError, match=r"need n_steps>=1"):
        TrainConfig(n_steps=0)
    with pytest.raises(ValueError, match=r"vocab_size must be >= 258"):
        L.train_bpe_tokenizer(["abc"], vocab_size=100)


def test_triton_backend_matches_torch():
    K = pytest.importorskip("lipapers.kernels")
    if not all(hasattr(K, n) for n in ("rms_norm", "rope", "swiglu", "cross_entropy", "fused_linear_cross_entropy")):
        pytest.skip("lipapers.kernels functional API not complete yet")
    torch.manual_seed(4)
    cfg = LMConfig(vocab_size=40, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=8)
    m = LM(cfg)
    ids = torch.randint(0, 40, (2, 7))
    ref = m(ids, labels=ids)
    ref.loss.backward()
    g_ref = {k: p.grad.clone() for k, p in m.named_parameters()}
    m.zero_grad()
    m.backend = "triton"
    out = m(ids, labels=ids)
    out.loss.backward()
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-5)
    for k, p in m.named_parameters():
        torch.testing.assert_close(p.grad, g_ref[k], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(m(ids, labels=ids, fused_loss=True).loss, ref.loss, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- training, tokenizer, cache

SMALL = LMConfig(vocab_size=300, d_model=16, n_layers=1, n_heads=2, max_seq_len=16)
SMALL_TRAIN = TrainConfig(n_steps=6, batch_size=4, seq_len=16, lr=3e-3, warmup=2, eval_every=3, eval_tokens=512)


@pytest.fixture
def small_corpus(monkeypatch):
    texts = L._shakespeare_texts()
    few = {k: texts[k][:6000] for k in sorted(texts)[:10]}  # 10 works x 6k chars keep the test fast
    monkeypatch.setattr(L, "_shakespeare_texts", lambda: few)
    return few


def test_tokenizer_roundtrip_and_specials(small_corpus):
    tr, va = L.shakespeare_splits()
    assert len(tr) == 9 and len(va) == 1
    tok = L.train_bpe_tokenizer(tr, 300)
    assert len(tok) == 300 and tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"
    s = "Ünïcödé & Shakespeare: 'Tis\tnow\n"
    assert tok.decode(tok(s)["input_ids"]) == s
    ids = L.encode_texts(tok, ["ab", "cd"])
    assert ids[0] == tok.eos_token_id and (ids == tok.eos_token_id).sum() == 2
    tok2 = L.train_bpe_tokenizer(tr, 300)
    assert tok2.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()


def _train_once(seed):
    torch.manual_seed(seed)
    ids = torch.randint(0, SMALL.vocab_size, (2000,), generator=torch.Generator().manual_seed(9))
    m = LM(SMALL)
    h = train_lm(m, ids[:1500], ids[1500:], SMALL_TRAIN, seed=seed, device="cpu", progress=False)
    return m, h


def test_training_deterministic_for_a_seed():
    (m1, h1), (m2, h2), (m3, h3) = _train_once(0), _train_once(0), _train_once(1)
    assert h1["loss"] == h2["loss"] and h1["valid_ppl"] == h2["valid_ppl"]
    for (k, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), k
    assert h1["loss"] != h3["loss"]
    assert h1["eval_step"] == [3, 6]


def test_train_lm_callback_after_each_evaluation():
    ids = torch.randint(0, SMALL.vocab_size, (2000,), generator=torch.Generator().manual_seed(9))
    seen, m = [], LM(SMALL)
    def cb(model, step): seen.append(step); model.eval()  # a callback may leave the model in eval mode
    h = train_lm(m, ids[:1500], ids[1500:], SMALL_TRAIN, device="cpu", progress=False, callback=cb)
    assert seen == h["eval_step"] == [3, 6] and m.training  # training resumes (and ends) in train mode


def test_lr_schedule():
    f = [lr_factor(s, 100, 10, 0.1) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0) and f[10] == pytest.approx(1.0)
    assert f[-1] == pytest.approx(0.1, abs=1e-3) and all(a >= b for a, b in zip(f[10:], f[11:]))


def _same_model(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_pretrained_tiny_cache_reload_corruption(small_corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("LIPAPERS_CACHE", str(tmp_path))
    r1 = L.pretrained_tiny(SMALL, SMALL_TRAIN, seed=0, progress=False)
    assert not r1.info["cache_hit"] and r1.info["valid_ppl"] > 1
    r2 = L.pretrained_tiny(SMALL, SMALL_TRAIN, seed=0, progress=False)
    assert r2.info["cache_hit"] and r2.info["cache"] == r1.info["cache"]
    _same_model(r1.model, r2.model)
    ids = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        assert torch.equal(r1.model(ids).logits, r2.model(ids).logits)
    assert r2.tokenizer.backend_tokenizer.to_str() == r1.tokenizer.backend_tokenizer.to_str()
    assert r2.model.lm_head.weight is r2.model.embed_tokens.weight  # tying survives the reload

    d = L.Path(r1.info["cache"])
    # corrupt one byte of the weights: detected (warning), rebuilt, and the rebuild equals the original
    raw = bytearray((d / "model.safetensors").read_bytes())
    raw[-3] ^= 0xFF
    (d / "model.safetensors").write_bytes(bytes(raw))
    assert not L.verify_manifest(d)
    with pytest.warns(UserWarning, match="rebuilding"):
        r3 = L.pretrained_tiny(SMALL, SMALL_TRAIN, seed=0, progress=False)
    assert not r3.info["cache_hit"] and L.verify_manifest(d)
    _same_model(r1.model, r3.model)
    # a partial cache (no manifest: the build stopped before its last write) is rebuilt too
    (d / "MANIFEST.json").unlink()
    with pytest.warns(UserWarning, match="rebuilding"):
        r4 = L.pretrained_tiny(SMALL, SMALL_TRAIN, seed=0, progress=False)
    assert not r4.info["cache_hit"]
    # a different seed is a different cache entry
    r5 = L.pretrained_tiny(SMALL, SMALL_TRAIN, seed=1, progress=False)
    assert r5.info["cache"] != r1.info["cache"]
    with pytest.raises(ValueError, match="corrupted"):
        (d / "info.json").write_text("{}")
        L.load_lm(d)


# ---------------------------------------------------------------- utilities


def test_token_logprobs_hand_example():
    logits = torch.tensor([[[0.0, math.log(3.0)], [math.log(2.0), 0.0], [0.0, 0.0]]])  # (1, 3, 2)
    ids = torch.tensor([[0, 1, 0]])
    want = torch.tensor([[math.log(3 / 4), math.log(2 / 3)]])
    torch.testing.assert_close(token_logprobs(logits, ids), want)


def test_sequence_logprobs_masks_prompt_and_padding():
    torch.manual_seed(5)
    cfg = CONFIGS["gqa-untied"]
    m = LM(cfg).eval()
    rows = [torch.randint(0, cfg.vocab_size, (n,)) for n in (9, 14, 5)]
    plens = [3, 6, 1]
    T = 16
    ids = torch.full((3, T), 7)
    am = torch.zeros(3, T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)], am[i, :len(r)] = r, 1
    mask = target_mask(ids, am, plens)
    assert mask.sum(-1).tolist() == [6, 8, 4]
    for model in (m, to_llama(m)):
        with torch.no_grad():
            out = sequence_logprobs(model, ids, am, plens)
        for i, (r, p) in enumerate(zip(rows, plens)):  # reference: each row alone, response tokens summed by hand
            with torch.no_grad():
                lp = torch.log_softmax(m(r[None]).logits[0].double(), -1)
            want = sum(lp[t - 1, r[t]] for t in range(p, len(r)))
            torch.testing.assert_close(out.sum[i].double(), want, rtol=1e-5, atol=1e-4)
            torch.testing.assert_close(out.mean[i], out.sum[i] / (len(r) - p))
        assert out.n_tokens.tolist() == [6, 8, 4]
    # an explicit loss_mask overrides prompt/padding; it is differentiable
    lm = torch.zeros(3, T - 1, dtype=torch.bool)
    lm[:, 0] = True
    out = sequence_logprobs(m, ids, loss_mask=lm)
    torch.testing.assert_close(out.sum, token_logprobs(m(ids).logits, ids)[:, 0])
    out.sum.sum().backward()
    assert m.embed_tokens.weight.grad is not None


def test_perplexity_limits():
    cfg = LMConfig(vocab_size=50, d_model=16, n_layers=1, n_heads=2, max_seq_len=32)
    m = LM(cfg)
    torch.nn.init.zeros_(m.embed_tokens.weight)  # tied head = 0: every logit is 0, so perplexity is exactly V
    ids = torch.randint(0, 50, (200,))
    assert perplexity(m, ids, seq_len=32) == pytest.approx(50.0, rel=1e-6)
    with pytest.raises(ValueError, match="need at least seq_len"):
        perplexity(m, ids[:10], seq_len=32)
    # unigram: add-one counts, hand-computed
    tr, va = torch.tensor([0, 0, 1]), torch.tensor([0, 2])
    p0, p2 = 3 / 6, 1 / 6
    assert unigram_perplexity(tr, va, 3) == pytest.approx(math.exp(-(math.log(p0) + math.log(p2)) / 2))


def test_sample_greedy_topk_and_seed():
    torch.manual_seed(6)
    cfg = LMConfig(vocab_size=30, d_model=16, n_layers=1, n_heads=2, max_seq_len=12)
    m = LM(cfg)
    p = torch.randint(0, 30, (2, 3))
    g = sample(m, p, 15, temperature=0)  # longer than max_seq_len: the context is cropped
    assert g.shape == (2, 18) and torch.equal(g[:, :3], p)
    x = p.clone()
    for _ in range(15):  # greedy by hand
        with torch.no_grad():
            x = torch.cat([x, m(x[:, -12:]).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(g, x)
    assert torch.equal(sample(m, p, 6, top_k=1, generator=torch.Generator().manual_seed(0)), g[:, :9])
    a = sample(m, p, 6, temperature=1.5, generator=torch.Generator().manual_seed(3))
    b = sample(m, p, 6, temperature=1.5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="top_k must be"):
        sample(m, p, 1, top_k=0)
    # eos: a row that emits it keeps emitting it, and generation stops once every row has
    eos = int(g[0, 5])
    e = sample(m, p, 15, temperature=0, eos_token_id=eos)
    assert torch.equal(e[0, :6], g[0, :6]) and (e[0, 6:] == eos).all()
    k = [t for t in range(3, 18) if g[1, t] == eos]
    if k:  # the second row also hits eos: stop right after the later of the two
        assert e.shape[1] == max(6, k[0] + 1)
    else:
        assert torch.equal(e[1], g[1])


# ---------------------------------------------------------------- SmolLM2 (slow: ~1 min cold, run with -m slow)


@pytest.mark.slow
def test_load_smollm2_offline(request, monkeypatch):
    mx = request.config.getoption("markexpr") or ""
    if not os.environ.get("LIPAPERS_SLOW") and ("slow" not in mx or "not slow" in mx):
        pytest.skip("slow (~1 min): run with `-m slow` or LIPAPERS_SLOW=1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    model, tok = L.load_smollm2()
    t_load = time.perf_counter() - t0
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    out = sample(model, ids, 8, temperature=0)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])
    # our decoder with SmolLM2's weights (GQA 9/3, theta 1e5) gives the same logits
    ours = from_llama(model, max_seq_len=64)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    # the cached copy and a fresh GGUF conversion agree exactly
    model2, _ = L.load_smollm2(cache=False)
    with torch.no_grad():
        torch.testing.assert_close(model2(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    print(f"load_smollm2: {t_load:.1f} s")


# ---------------------------------------------------------------- v2: d_head, KV cache, scoring, named models

SHARP = dict(init_std=0.3)  # well-separated logits: greedy argmax has no near-ties, so fp32 path differences cannot flip it


def test_d_head_decouples_heads_from_width():
    cfg = LMConfig(vocab_size=50, d_model=24, n_layers=1, n_heads=3, d_head=6, max_seq_len=16)  # 3 x 6 = 18 != 24
    assert cfg.head_dim == 6 and LMConfig(d_model=64, n_heads=4).head_dim == 16
    torch.manual_seed(7)
    m = LM(cfg).eval()
    assert m.layers[0].self_attn.q_proj.weight.shape == (18, 24)
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(m(ids).logits, to_llama(m)(input_ids=ids).logits, **TOL)
        back = from_llama(to_llama(m))
        assert back.cfg == cfg
        torch.testing.assert_close(back(ids).logits, m(ids).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="d_head must be a positive even int"):
        LMConfig(d_head=0)
    with pytest.raises(ValueError, match="must be even for RoPE"):
        LMConfig(d_model=24, n_heads=3, d_head=5)


def _padded_prompts(V, seed=8):
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(0, V, (n,), generator=g).tolist() for n in (5, 9, 2)]
    return L.left_pad(rows, 0)


@pytest.mark.parametrize("name", ["mha-tied", "gqa-untied"])
def test_kv_cache_greedy_equals_no_cache(name):
    cfg = replace(CONFIGS[name], max_seq_len=40, **SHARP)
    torch.manual_seed(9)
    m = LM(cfg)
    ids, am = _padded_prompts(cfg.vocab_size)
    a = sample(m, ids, 20, temperature=0, attention_mask=am, use_cache=True)
    b = sample(m, ids, 20, temperature=0, attention_mask=am, use_cache=False)
    assert torch.equal(a, b)
    # left padding does not change a row's continuation: row 1 (no padding) alone gives the same tokens
    c = sample(m, ids[1:2], 20, temperature=0, use_cache=True)
    assert torch.equal(c, a[1:2])
    # the cached logits equal the full forward's logits at every generated position
    full = m(a, attention_mask=torch.cat([am, torch.ones(3, 20, dtype=am.dtype)], 1),
             position_ids=L._positions(torch.cat([am, torch.ones(3, 20, dtype=am.dtype)], 1))).logits
    cache = L.KVCache(cfg, 3, 29)
    pre = m(a[:, :9], attention_mask=am, position_ids=L._positions(am), cache=cache).logits
    torch.testing.assert_close(pre[am.bool()], full[:, :9][am.bool()], rtol=1e-5, atol=1e-5)
    # sampling with the same generator seed draws the same tokens with and without the cache
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    assert torch.equal(sample(m, ids, 10, attention_mask=am, generator=g1),
                       sample(m, ids, 10, attention_mask=am, generator=g2, use_cache=False))


def test_kv_cache_transformers_model():
    cfg = replace(CONFIGS["gqa-untied"], max_seq_len=40, **SHARP)
    torch.manual_seed(10)
    hf = to_llama(LM(cfg))
    ids, am = _padded_prompts(cfg.vocab_size)
    a = sample(hf, ids, 12, temperature=0, attention_mask=am, use_cache=True)
    b = sample(hf, ids, 12, temperature=0, attention_mask=am, use_cache=False)
    assert torch.equal(a, b)
    assert torch.equal(sample(from_llama(hf), ids, 12, temperature=0, attention_mask=am), a)


class _CharTok:
    """A minimal tokenizer with the interface the text utilities use (one id per character)."""
    eos_token_id, pad_token_id = 1, 0

    def __call__(self, s):
        return {"input_ids": [2 + (ord(c) % 60) for c in s]}

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def test_sequence_logprobs_text_form_and_bad_input():
    cfg = replace(CONFIGS["mha-tied"], vocab_size=64, max_seq_len=24)
    torch.manual_seed(11)
    m, tok = LM(cfg).eval(), _CharTok()
    prompts, responses = ["abc", "hello", "x"], ["de", "w", "yzzz"]
    with torch.no_grad():
        out = sequence_logprobs(m, prompts, responses, tok=tok)
        for i, (p, r) in enumerate(zip(prompts, responses)):
            ids = torch.tensor([tok(p)["input_ids"] + tok(r)["input_ids"]])
            lp = torch.log_softmax(m(ids).logits[0].double(), -1)
            want = sum(lp[t - 1, ids[0, t]] for t in range(len(p), ids.shape[1]))
            torch.testing.assert_close(out.sum[i].double(), want, rtol=1e-5, atol=1e-5)
    assert out.n_tokens.tolist() == [2, 1, 4]
    with pytest.raises(ValueError, match="prompts is empty"):
        sequence_logprobs(m, [], [], tok=tok)
    with pytest.raises(ValueError, match="one response per prompt"):
        sequence_logprobs(m, ["a", "b"], ["c"], tok=tok)
    with pytest.raises(ValueError, match="more than the model's context 24"):
        sequence_logprobs(m, ["a"], ["b" * 30], tok=tok)
    with pytest.raises(ValueError, match="needs tok="):
        sequence_logprobs(m, ["a"], ["b"])


def test_yes_prob_is_the_two_token_softmax():
    cfg = replace(CONFIGS["mha-tied"], vocab_size=64, max_seq_len=24)
    torch.manual_seed(12)
    m, tok = LM(cfg).eval(), _CharTok()
    prompts = ["is it?", "no way", "q"]
    r = L.yes_prob(m, tok, prompts, yes="Y", no="N")
    y, n = tok("Y")["input_ids"][0], tok("N")["input_ids"][0]
    for i, p in enumerate(prompts):
        with torch.no_grad():
            lg = m(torch.tensor([tok(p)["input_ids"]])).logits[0, -1]
        pr = torch.softmax(lg, -1)
        torch.testing.assert_close(r.yes[i], pr[y], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r.no[i], pr[n], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r.p[i], torch.softmax(lg[[y, n]], -1)[0], rtol=1e-5, atol=1e-6)
    assert ((r.yes + r.no) <= 1).all()
    # multi-token answers: P(" Yes") is the product of its token probabilities, still summing with P(" No") to <= 1
    r2 = L.yes_prob(m, tok, prompts, yes="Yes", no="Nope")
    with torch.no_grad():
        want = sequence_logprobs(m, prompts, ["Yes"] * 3, tok=tok).sum.exp()
    torch.testing.assert_close(r2.yes, want, rtol=1e-4, atol=1e-6)
    assert ((r2.yes + r2.no) <= 1).all()
    with pytest.raises(ValueError, match="neither a prefix"):
        L.yes_prob(m, tok, prompts, yes="No", no="Nope")
    with pytest.raises(ValueError, match="prompts is empty"):
        L.yes_prob(m, tok, [], yes="Y", no="N")


@pytest.mark.parametrize("name", ["mha-tied", "gqa-untied"])
def test_multi_item_equals_scoring_each_candidate_alone(name):
    cfg = replace(CONFIGS[name], max_seq_len=64)
    torch.manual_seed(13)
    m = LM(cfg).eval()
    g = torch.Generator().manual_seed(3)
    rnd = lambda n: torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist()  # noqa: E731
    prefixes = [rnd(7), rnd(3)]
    cands = [[rnd(3), rnd(1), rnd(5), rnd(2)], [rnd(2), rnd(4), rnd(4), rnd(1)]]
    with torch.no_grad():
        got = L.multi_item_logprobs(m, prefixes, cands)
    assert got.sum.shape == (2, 4)
    for b in range(2):
        for j, c in enumerate(cands[b]):
            ids = torch.tensor([prefixes[b] + c])
            with torch.no_grad():
                alone = sequence_logprobs(m, ids, prompt_lengths=[len(prefixes[b])])
            torch.testing.assert_close(got.sum[b, j], alone.sum[0], rtol=1e-5, atol=1e-5)
            assert int(got.n_tokens[b, j]) == len(c)
    with pytest.raises(ValueError, match="same number m > 0 of candidates"):
        L.multi_item_logprobs(m, prefixes, [cands[0], cands[1][:3]])
    with pytest.raises(ValueError, match="one candidate list per prefix"):
        L.multi_item_logprobs(m, prefixes, cands[:1])
    with pytest.raises(ValueError, match="exceed max_seq_len"):
        L.multi_item_logprobs(m, prefixes, [[rnd(30)] * 3] * 2)
    with pytest.raises(TypeError, match="from_llama"):
        L.multi_item_logprobs(to_llama(m), prefixes, cands)


def test_generate_text_and_bad_input():
    cfg = replace(CONFIGS["mha-tied"], vocab_size=64, max_seq_len=24, **SHARP)
    torch.manual_seed(14)
    m, tok = LM(cfg), _CharTok()
    a = L.generate(m, tok, ["ab", "hello"], max_new_tokens=6, temperature=0)
    assert a == L.generate(m, tok, ["ab", "hello"], max_new_tokens=6, temperature=0, use_cache=False)
    assert a[1] == L.generate(m, tok, ["hello"], max_new_tokens=6, temperature=0)[0]
    for p, got in zip(["ab", "hello"], a):  # brute force: one unpadded prompt, full forward, argmax, stop at EOS
        ids = tok(p)["input_ids"]
        for _ in range(6):
            nxt = int(m(torch.tensor([ids])).logits[0, -1].argmax())
            if nxt == tok.eos_token_id: break
            ids.append(nxt)
        assert got == tok.decode(ids[len(tok(p)["input_ids"]):])
    assert L.generate(m, tok, ["ab"], 6, seed=1) == L.generate(m, tok, ["ab"], 6, seed=1)
    with pytest.raises(ValueError, match="prompts is empty"):
        L.generate(m, tok, [])
    with pytest.raises(ValueError, match="exceeds the context 24"):
        L.generate(m, tok, ["a" * 20], max_new_tokens=8)


def test_pretrained_names(small_corpus, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"unknown pretrained model 'big'; valid: tiny, small, small-sft"):
        L.pretrained("big")
    monkeypatch.setenv("LIPAPERS_CACHE", str(tmp_path))
    tiny_tr = replace(SMALL_TRAIN, n_steps=4)
    monkeypatch.setitem(L.PRETRAINED, "tiny", L.PretrainedSpec(SMALL, tiny_tr))
    monkeypatch.setitem(L.PRETRAINED, "small", L.PretrainedSpec(replace(SMALL, max_seq_len=64), replace(tiny_tr, seq_len=64, bf16=True),
                                                               task_frac=0.5, n_task_examples=200, families=("sort", "copy")))
    monkeypatch.setitem(L.PRETRAINED, "small-sft", L.PretrainedSpec(None, replace(tiny_tr, batch_size=8), parent="small", sft=True,
                                                                   n_task_examples=100, families=("sort", "copy")))
    t = L.pretrained("tiny", progress=False)
    assert t.info["cache"] == L.pretrained_tiny(SMALL, tiny_tr, progress=False).info["cache"]
    sft = L.pretrained("small-sft", progress=False)  # builds its parent first
    assert not sft.info["cache_hit"] and sft.info["parent"] == "small"
    small = L.pretrained("small", progress=False)
    assert small.info["cache_hit"] and small.tokenizer.backend_tokenizer.to_str() == sft.tokenizer.backend_tokenizer.to_str()
    assert not all(torch.equal(a, b) for a, b in zip(small.model.state_dict().values(), sft.model.state_dict().values()))
    again = L.pretrained("small-sft", progress=False)
    assert again.info["cache_hit"]
    _same_model(again.model, sft.model)
    d = L.Path(again.info["cache"])
    (d / "config.json").write_text("{}")
    with pytest.warns(UserWarning, match="rebuilding"):
        rebuilt = L.pretrained("small-sft", progress=False)
    _same_model(rebuilt.model, sft.model)  # the same bits again


def test_rtn_matches_quantease_reference_and_hurts_less_with_more_bits():
    from lipapers.quantease import rtn_quantize  # independent implementation (QuantEase chapter)
    torch.manual_seed(15)
    for shape in [(7, 33), (1, 5), (16, 64)]:
        W = torch.randn(shape) * torch.rand(shape[0], 1) * 3
        for b in (2, 3, 4, 8):
            torch.testing.assert_close(L.rtn_weight(W, b), rtn_quantize(W, b), rtol=0, atol=1e-6)
    W = torch.randn(8, 32)
    errs = [(L.rtn_weight(W, b) - W).pow(2).mean().item() for b in (2, 3, 4, 8)]
    assert errs == sorted(errs, reverse=True) and errs[-1] < 1e-4
    m = LM(CONFIGS["mha-tied"])
    q = L.rtn_model(m, 3)
    assert torch.equal(q.embed_tokens.weight, m.embed_tokens.weight) and q.lm_head.weight is q.embed_tokens.weight
    assert not torch.equal(q.layers[0].mlp.up_proj.weight, m.layers[0].mlp.up_proj.weight)
    assert len(q.layers[0].self_attn.q_proj.weight.unique(dim=None)) <= 32 * 8  # <= 2^3 levels per row
    with pytest.raises(ValueError, match="bits must be an int"):
        L.rtn_weight(W, 0)


def test_speedup_helpers_report_equal_outputs():
    torch.manual_seed(16)
    m = LM(replace(CONFIGS["mha-tied"], max_seq_len=64, **SHARP))
    r = L.kv_speedup(m, torch.randint(0, 101, (2, 5)), n_new=8, repeats=1)
    assert r["same_tokens"] and r["ratio"] > 0 and r["n_new"] == 8 and len(r["ratios"]) == 1
    s = L.multi_item_speedup(m, list(range(10)), [[1, 2], [3], [4, 5, 6]], repeats=1)
    assert s["max_abs_diff"] < 1e-4 and s["m"] == 3
