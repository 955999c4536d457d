"""Tests for lipapers.bsr: BT / BSR / centering / margin losses, the reward model, τ, best-of-n, RLOO advantages.

Tolerances: float64 comparisons use assert_close's float64 defaults (rtol 1e-7, atol 1e-7) unless stated; float32 ones
its float32 defaults (rtol 1.3e-6, atol 1e-5). λ = 0 is checked bitwise (torch.equal), forward and gradients.
"""
import itertools, math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import kendalltau

from lipapers.bsr import (Arm, MLPEncoder, PairSet, RMConfig, RewardModel, best_of_n_curve, bsr_loss, bt_loss,
                          centering_loss, grouped_kendall_tau, margin_bt_loss, norm_dispersion, pairwise_accuracy,
                          rloo_advantages, rm_reward_fn, run_arms, score, synthetic_prefs, train_reward_model, _lm_hidden,
                          rm_optimizer, track)
from lipapers.lm import LM, LMConfig

DTYPES = [(torch.float32, {}), (torch.float64, {})]


def _r(B, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, generator=g, dtype=dtype) * 3).requires_grad_(), (torch.randn(B, generator=g, dtype=dtype) * 3).requires_grad_()


@pytest.mark.parametrize("B", [1, 2, 7, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bsr_lambda0_is_bt_bitwise(B, dtype):
    a, b = _r(B, dtype)
    l1 = bsr_loss(a, b, lam=0.0); g1 = torch.autograd.grad(l1, (a, b))
    l2 = bt_loss(a, b); g2 = torch.autograd.grad(l2, (a, b))
    assert torch.equal(l1, l2) and all(torch.equal(x, y) for x, y in zip(g1, g2))


@pytest.mark.parametrize("B", [1, 5, 64])
@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_bt_equals_bce_with_logits(B, dtype, tol):
    a, b = _r(B, dtype, 1)
    ref = F.binary_cross_entropy_with_logits(a - b, torch.ones(B, dtype=dtype))
    torch.testing.assert_close(bt_loss(a, b), ref, **tol)
    torch.testing.assert_close(torch.autograd.grad(bt_loss(a, b), a)[0], torch.autograd.grad(ref, a)[0], **tol)


def test_hand_example_B2():
    rw, rl = torch.tensor([2.0, 0.0], dtype=torch.float64), torch.tensor([1.0, -1.0], dtype=torch.float64)
    bt = math.log1p(math.exp(-1))                      # both pairs have Δ = 1
    assert bt_loss(rw, rl).item() == pytest.approx(bt, rel=1e-14)
    # λ_eff = λ·B = 0.2, batch mean of (2, 0, 1, −1) = 0.5 → 0.2 · 0.25 = 0.05
    assert bsr_loss(rw, rl, lam=0.1).item() == pytest.approx(bt + 0.05, rel=1e-14)
    assert bsr_loss(rw, rl, lam=0.1, scale_by_batch=False).item() == pytest.approx(bt + 0.025, rel=1e-14)
    # centering: pair sums 3 and −1 → mean of squares 5 → 0.01 · 5
    assert centering_loss(rw, rl, 0.01).item() == pytest.approx(bt + 0.05, rel=1e-14)
    assert margin_bt_loss(rw, rl, 1.0).item() == pytest.approx(math.log(2), rel=1e-14)


@pytest.mark.parametrize("B", [1, 3, 16])
def test_two_forms_of_the_penalty(B):
    a, b = _r(B, torch.float64, 2); lam = 0.37
    pen = bsr_loss(a, b, lam) - bt_loss(a, b)
    mean_form = lam * B * torch.cat([a, b]).mean() ** 2
    sum_form = lam / (4 * B) * (a + b).sum() ** 2
    torch.testing.assert_close(pen, mean_form); torch.testing.assert_close(pen, sum_form)
    torch.testing.assert_close(torch.autograd.grad(pen, a)[0], torch.full((B,), lam / (2 * B) * (a + b).sum().item(),
                                                                         dtype=torch.float64))


def test_symmetric_rewards_cost_nothing_under_bsr_but_pay_centering():
    a = torch.tensor([1.5, 4.0, 0.3], dtype=torch.float64)
    assert torch.equal(bsr_loss(a, -a, lam=1.0), bt_loss(a, -a))
    w, l = torch.tensor([6.0, -4.0], dtype=torch.float64), torch.tensor([4.0, -6.0], dtype=torch.float64)  # pair sums ±10
    assert torch.equal(bsr_loss(w, l, lam=1.0), bt_loss(w, l))
    assert centering_loss(w, l, 0.01).item() > bt_loss(w, l).item()


def test_shift_invariance():
    a, b = _r(6, torch.float64, 3)
    torch.testing.assert_close(bt_loss(a + 5, b + 5), bt_loss(a, b))
    assert abs(bsr_loss(a + 5, b + 5, 1e-2).item() - bsr_loss(a, b, 1e-2).item()) > 1e-3   # BSR pins the shift


@pytest.mark.parametrize("bad", [
    lambda r: bsr_loss(r, r, lam=-1e-3), lambda r: bsr_loss(r, r, lam=float("nan")), lambda r: bsr_loss(r, r, lam=float("inf")),
    lambda r: centering_loss(r, r, coef=-0.1), lambda r: margin_bt_loss(r, r, margin=-1.0),
    lambda r: margin_bt_loss(r, r, margin=torch.tensor([1.0])), lambda r: bt_loss(r, r[:2]),
    lambda r: bt_loss(r[:0], r[:0]), lambda r: bt_loss(r * float("nan"), r), lambda r: bt_loss(r[:, None], r[:, None])])
def test_bad_inputs(bad):
    with pytest.raises((ValueError, TypeError)): bad(torch.ones(3))


def test_unknown_loss_names_the_valid_ones():
    with pytest.raises(ValueError, match="valid: bt, bsr, center, margin"): RMConfig(loss="hinge")
    for k in ("lam", "coef", "margin"):
        with pytest.raises(ValueError): RMConfig(**{k: -1.0})


def test_grouped_tau_equals_scipy_with_ties():
    rng = np.random.default_rng(0)
    s, g = rng.integers(0, 3, 200).astype(float), rng.integers(0, 3, 200).astype(float)
    q = np.repeat(np.arange(50), 4); perm = rng.permutation(200)       # groups need not be contiguous
    ref = np.nanmean([kendalltau(s[q == i], g[q == i]).statistic for i in range(50)])
    assert grouped_kendall_tau(s[perm], g[perm], q[perm]) == pytest.approx(ref, abs=1e-12)
    with pytest.raises(ValueError, match="≥ 2 responses"): grouped_kendall_tau(s[:5], g[:5], np.arange(5))


def test_pairwise_accuracy_brute_force():
    rng = np.random.default_rng(1)
    s, g, q = rng.normal(size=30), rng.normal(size=30), np.repeat(np.arange(6), 5)
    hits = [(s[i] - s[j]) * (g[i] - g[j]) > 0 for i, j in itertools.combinations(range(30), 2) if q[i] == q[j]]
    assert pairwise_accuracy(s, g, q) == pytest.approx(np.mean(hits))


def _brute_bon(s, g, n):
    vals = []
    for sub in itertools.combinations(range(len(s)), n):
        m = max(s[i] for i in sub); vals.append(np.mean([g[i] for i in sub if s[i] == m]))
    return np.mean(vals)


@pytest.mark.parametrize("ties", [False, True])
def test_best_of_n_equals_brute_force(ties):
    rng = np.random.default_rng(2)
    s = rng.integers(0, 3, 16).astype(float) if ties else rng.normal(size=16)
    g, q = rng.normal(size=16), np.repeat([0, 1], 8)
    got = best_of_n_curve(s, g, q, range(1, 9))
    want = [np.mean([_brute_bon(s[q == k], g[q == k], n) for k in (0, 1)]) for n in range(1, 9)]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert got[0] == pytest.approx(g.mean())
    with pytest.raises(ValueError, match=r"\[1, 8\]"): best_of_n_curve(s, g, q, [9])


def test_rloo_advantages():
    r = torch.randn(24, dtype=torch.float64)
    a = rloo_advantages(r, 4)
    torch.testing.assert_close(a.view(6, 4).sum(1), torch.zeros(6, dtype=torch.float64))
    v = r.view(6, 4); torch.testing.assert_close(a.view(6, 4)[:, 0], v[:, 0] - v[:, 1:].mean(1))
    for k in (1, 0):
        with pytest.raises(ValueError, match="k ≥ 2"): rloo_advantages(r, k)
    with pytest.raises(ValueError): rloo_advantages(r[:5], 4)


def test_norm_dispersion():
    assert norm_dispersion(torch.tensor([[3.0, 4.0], [5.0, 0.0]])) == pytest.approx(0.0)
    assert norm_dispersion(torch.tensor([[1.0], [3.0]])) == pytest.approx(math.sqrt(2) / 2)


def _tiny_lm():
    torch.manual_seed(0)
    return LM(LMConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=2, max_seq_len=32))


@pytest.mark.parametrize("pre_norm", [False, True])
def test_right_padding_changes_no_reward(pre_norm):
    rm = RewardModel(_tiny_lm(), pre_norm=pre_norm).eval()
    ids = torch.randint(1, 50, (3, 9), generator=torch.Generator().manual_seed(0))
    attn = torch.tensor([[1] * 9, [1] * 5 + [0] * 4, [1] * 2 + [0] * 7])
    with torch.no_grad():
        r = rm(ids=ids, attn=attn).reward
        for i, n in enumerate(attn.sum(1).tolist()):   # each row alone, without any padding
            torch.testing.assert_close(rm(ids=ids[i:i + 1, :n], attn=attn[i:i + 1, :n]).reward, r[i:i + 1])
        padded = torch.cat([ids, torch.zeros(3, 6, dtype=torch.long)], 1)
        torch.testing.assert_close(rm(ids=padded, attn=torch.cat([attn, torch.zeros(3, 6, dtype=torch.long)], 1)).reward, r)


def test_pre_norm_reads_the_unnormed_state():
    lm = _tiny_lm(); ids = torch.randint(1, 50, (2, 5)); attn = torch.ones_like(ids)
    with torch.no_grad():
        pre, post = _lm_hidden(lm, ids, attn, True), _lm_hidden(lm, ids, attn, False)
        torch.testing.assert_close(post, lm.norm(pre))


def test_freeze_backbone_keeps_hidden_states_and_same_seed_same_result():
    d = synthetic_prefs(64, 0, n_val=8, n_bon=4, bon_pool=4)
    cfg = RMConfig("bsr", epochs=2, batch_size=16)
    torch.manual_seed(0); rm = RewardModel(MLPEncoder(32), freeze_backbone=True)
    h0 = score(rm, d.val["val1"].inputs).hidden.clone()
    train_reward_model(rm, d.train, cfg, seed=0)
    assert torch.equal(score(rm, d.val["val1"].inputs).hidden, h0)
    arms = [Arm("bt", RMConfig("bt", epochs=2, batch_size=16)), Arm("bsr", cfg)]
    a = run_arms(lambda: MLPEncoder(32), d.train, arms, 3, d.val, d.bon, (1, 2, 4))
    b = run_arms(lambda: MLPEncoder(32), d.train, arms, 3, d.val, d.bon, (1, 2, 4))
    for k in ("bt", "bsr"):
        assert a[k]["metrics"] == b[k]["metrics"] and np.array_equal(a[k]["bon"], b[k]["bon"])


def test_synthetic_prefs_is_seeded_and_split():
    a, b, c = synthetic_prefs(50, 0, n_val=5), synthetic_prefs(50, 0, n_val=5), synthetic_prefs(50, 1, n_val=5)
    assert torch.equal(a.train.chosen["x"], b.train.chosen["x"]) and not torch.equal(a.train.chosen["x"], c.train.chosen["x"])
    assert set(a.val) == {"val1", "val2", "val3", "val4"} and a.bon.inputs["x"].shape == (200 * 32, 32)
    with pytest.raises(ValueError): synthetic_prefs(0, 0)


class _Tok:
    def __init__(self, vocab): self.vocab, self.eos_token_id = vocab, 0
    def get_vocab(self): return self.vocab


def test_rm_and_policy_tokenizers_must_match():
    rm = RewardModel(_tiny_lm())
    with pytest.raises(ValueError, match="different tokenizers"): rm_reward_fn(rm, _Tok({"a": 1}), _Tok({"b": 1}))
    rm_reward_fn(rm, _Tok({"a": 1}), _Tok({"a": 1}))


def test_optimizer_decays_the_backbone_only_and_tracking_matches_a_direct_score():
    d = synthetic_prefs(64, 0, n_val=8, n_bon=4, bon_pool=4)
    torch.manual_seed(0); rm = RewardModel(MLPEncoder(32))
    groups = rm_optimizer(rm, RMConfig("bt", weight_decay=0.1)).param_groups
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0] and groups[1]["params"][0] is rm.head.weight
    hist = train_reward_model(rm, d.train, RMConfig("bsr", epochs=2, batch_size=16), seed=0, eval_sets=d.val,
                              eval_every=3)
    assert [h["step"] for h in hist if "val4_dispersion" in h] == [0, 3, 6, 7]     # every 3 steps and the last
    o, row = score(rm, d.val["val4"].inputs), track(rm, {"val4": d.val["val4"]})
    assert row["val4_dispersion"] == hist[-1]["val4_dispersion"] == norm_dispersion(o.hidden)
    assert row["val4_max_abs_reward"] == o.reward.abs().max().item()
