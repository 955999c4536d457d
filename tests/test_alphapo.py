"""Tests for lipapers.alphapo: AlphaPO / SimPO / DPO losses, the sequence log-prob masking, the gold reward.

Tolerances: float64 comparisons use assert_close defaults for float64 (rtol 1e-7, atol 1e-7) unless stated;
float32 ones use the float32 defaults (rtol 1.3e-6, atol 1e-5). The losses compute the (B,)-sized reward arithmetic
in float64 internally, so float32 outputs are the float64 result rounded once.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lipapers.alphapo import alpha_reward, alphapo_loss, dpo_loss, simpo_loss

ALPHAS = [-1.0, -0.5, 0.0, 0.25, 0.5, 1.0]


def _naive_reward64(logps, alpha):
    """TRL's form (1 - exp(l)^(-alpha)) / alpha, evaluated in float64: an independent reference for moderate values."""
    x = logps.double()
    return x if alpha == 0 else (1 - x.exp().pow(-alpha)) / alpha


def _ref_loss64(lw, ll, alpha, beta, gamma, eps=0.0):
    z = beta * (_naive_reward64(lw, alpha) - _naive_reward64(ll, alpha)) - gamma
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


# ---------------------------------------------------------------- hand-computed examples
def test_hand_computed_example():
    # l_w=-1, l_l=-2, alpha=1, beta=2, gamma=0.5: r_w = 1-e, r_l = 1-e^2, z = 2(e^2 - e) - 0.5
    z = 2 * (math.e**2 - math.e) - 0.5
    loss, rw, rl = alphapo_loss(torch.tensor([-1.0], dtype=torch.float64), torch.tensor([-2.0], dtype=torch.float64), 1.0, 2.0, 0.5)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-z)), rel=1e-12)
    assert rw.item() == pytest.approx(2 * (1 - math.e), rel=1e-12)
    assert rl.item() == pytest.approx(2 * (1 - math.e**2), rel=1e-12)
    # alpha=-0.5, l_w=-0.4, l_l=-0.2 (chosen is LESS likely: negative margin), beta=3, gamma=0.1, eps=0.2
    r = lambda l: (1 - math.exp(0.5 * l)) / -0.5  # (1 - e^{-alpha l}) / alpha at alpha=-0.5
    z = 3 * (r(-0.4) - r(-0.2)) - 0.1
    want = -(0.8) * math.log(1 / (1 + math.exp(-z))) - 0.2 * math.log(1 / (1 + math.exp(z)))
    got = alphapo_loss(torch.tensor([-0.4], dtype=torch.float64), torch.tensor([-0.2], dtype=torch.float64), -0.5, 3.0, 0.1, 0.2)[0]
    assert got.item() == pytest.approx(want, rel=1e-12)
    assert z < 0 and got.item() > math.log(2)


def test_equal_rewards_zero_gamma_is_log2():
    x = torch.tensor([-0.3, -2.0, -7.5])
    for a in ALPHAS:
        torch.testing.assert_close(alphapo_loss(x, x.clone(), a, 2.5, 0.0)[0], torch.full((3,), math.log(2)))


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("B", [1, 7, 33])
def test_matches_naive_float64_reference(alpha, B):
    g = torch.Generator().manual_seed(B)
    lw, ll = -torch.rand(B, generator=g, dtype=torch.float64) * 5, -torch.rand(B, generator=g, dtype=torch.float64) * 5
    torch.testing.assert_close(alphapo_loss(lw, ll, alpha, 2.5, 0.3, 0.1)[0], _ref_loss64(lw, ll, alpha, 2.5, 0.3, 0.1))
    # float32 input: the float64 result rounded once
    out32 = alphapo_loss(lw.float(), ll.float(), alpha, 2.5, 0.3, 0.1)[0]
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32, _ref_loss64(lw.float().double(), ll.float().double(), alpha, 2.5, 0.3, 0.1).float())


# ---------------------------------------------------------------- limits
def test_alpha_zero_equals_simpo_and_limit_is_continuous():
    g = torch.Generator().manual_seed(0)
    lw, ll = -torch.rand(64, generator=g) * 4, -torch.rand(64, generator=g) * 4
    simpo = -F.logsigmoid(2.5 * (lw.double() - ll.double()) - 0.1).float()  # SimPO written out independently
    torch.testing.assert_close(alphapo_loss(lw, ll, 0.0, 2.5, 0.1)[0], simpo, rtol=0, atol=0)
    torch.testing.assert_close(simpo_loss(lw, ll, 2.5, 0.1)[0], simpo, rtol=0, atol=0)
    # alpha -> 0 reaches SimPO to float32 precision (TRL's exp().pow() form does not: 1 - p^-a cancels)
    for a in (1e-8, -1e-8):
        torch.testing.assert_close(alphapo_loss(lw, ll, a, 2.5, 0.1)[0], simpo)
    # continuity: r_a = l - a l^2/2 + O(a^2), so |loss_a - loss_0| <= beta*|a|*max(l^2) (sigmoid is 1-Lipschitz)
    for a in (1e-6, -1e-4, 1e-3, -1e-2):
        gap = (alphapo_loss(lw.double(), ll.double(), a, 2.5, 0.1)[0] - simpo.double()).abs().max().item()
        assert gap <= 2.5 * abs(a) * 16 + 1e-6, (a, gap)
        assert gap > 0 or abs(a) < 1e-5
    # and the rewards themselves: |r_a - l| <= |a| l^2 / 2 * (1 + o(1))
    r = alpha_reward(lw.double(), 1e-3)
    assert ((r - lw.double()).abs() <= 1e-3 * lw.double() ** 2 / 2 * 1.01).all()


def test_dpo_policy_equals_reference_is_exactly_log2():
    g = torch.Generator().manual_seed(1)
    for dt in (torch.float32, torch.float64):
        pc, pr = (-torch.rand(9, generator=g) * 80).to(dt), (-torch.rand(9, generator=g) * 80).to(dt)
        loss, rw, rl = dpo_loss(pc, pr, pc.clone(), pr.clone(), beta=0.1)
        assert torch.equal(loss, torch.full((9,), math.log(2), dtype=dt))
        assert torch.equal(rw, torch.zeros(9, dtype=dt)) and torch.equal(rl, torch.zeros(9, dtype=dt))


def test_dpo_hand_computed_and_label_smoothing():
    # h_w = -10 - (-12) = 2, h_l = -20 - (-19) = -1, beta 0.5: z = 1.5
    t = lambda v: torch.tensor([v], dtype=torch.float64)
    loss = dpo_loss(t(-10.0), t(-20.0), t(-12.0), t(-19.0), 0.5)[0]
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1.5)), rel=1e-12)
    loss = dpo_loss(t(-10.0), t(-20.0), t(-12.0), t(-19.0), 0.5, label_smoothing=0.25)[0]
    assert loss.item() == pytest.approx(0.75 * math.log1p(math.exp(-1.5)) + 0.25 * math.log1p(math.exp(1.5)), rel=1e-12)


def test_simpo_nll_term():
    lw, ll = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0])
    base = simpo_loss(lw, ll, 2.0, 0.5)[0]
    torch.testing.assert_close(simpo_loss(lw, ll, 2.0, 0.5, nll_weight=0.3)[0], base + 0.3 * torch.tensor([1.0, 2.0]))


# ---------------------------------------------------------------- gradients
@pytest.mark.parametrize("alpha", ALPHAS + [3.0, -3.0])
def test_gradcheck_alphapo(alpha):
    g = torch.Generator().manual_seed(2)
    lw = (-torch.rand(5, generator=g, dtype=torch.float64) * 3).requires_grad_()
    ll = (-torch.rand(5, generator=g, dtype=torch.float64) * 3).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: alphapo_loss(a, b, alpha, 2.5, 0.2, 0.1)[0], (lw, ll))
    assert torch.autograd.gradgradcheck(lambda a, b: alphapo_loss(a, b, alpha, 2.5, 0.2)[0], (lw, ll))


def test_gradcheck_simpo_dpo():
    g = torch.Generator().manual_seed(3)
    xs = [(-torch.rand(4, generator=g, dtype=torch.float64) * 30).requires_grad_() for _ in range(4)]
    assert torch.autograd.gradcheck(lambda a, b, c, d: dpo_loss(a, b, c, d, 0.1, 0.1)[0], tuple(xs))
    assert torch.autograd.gradcheck(lambda a, b: simpo_loss(a / 10, b / 10, 2.0, 0.3, 0.0, 0.5)[0], tuple(xs[:2]))


@pytest.mark.parametrize("alpha", ALPHAS + [2.0])
def test_reward_derivative_identity(alpha):
    # dr_a/dl = e^{-a l}: AlphaPO re-weights SimPO's per-response gradient by e^{a|l|}
    lv = torch.linspace(-6, -0.01, 50, dtype=torch.float64).requires_grad_()
    (grad,) = torch.autograd.grad(alpha_reward(lv, alpha).sum(), lv)
    torch.testing.assert_close(grad, torch.exp(-alpha * lv.detach()))


def test_loss_gradient_is_reweighted_simpo_gradient():
    lw = torch.tensor([-0.5, -2.0, -4.0], dtype=torch.float64, requires_grad=True)
    ll = torch.tensor([-1.0, -1.0, -5.0], dtype=torch.float64, requires_grad=True)
    a, beta, gamma = 0.5, 2.0, 0.1
    alphapo_loss(lw, ll, a, beta, gamma)[0].sum().backward()
    rw, rl = alpha_reward(lw.detach(), a), alpha_reward(ll.detach(), a)
    s = torch.sigmoid(-(beta * (rw - rl) - gamma))  # -dL/dz
    torch.testing.assert_close(lw.grad, -beta * s * torch.exp(-a * lw.detach()))
    torch.testing.assert_close(ll.grad, beta * s * torch.exp(-a * ll.detach()))


# ---------------------------------------------------------------- numerics at the edges
def test_no_overflow_for_large_alpha_l():
    # -alpha*l = 240: exp overflows float32 (TRL's exp(l).pow(-alpha) form gives inf - inf = nan here)
    lw, ll = torch.tensor([-120.0, -60.0]), torch.tensor([-120.0, -60.5])
    naive = (1 - lw.exp().pow(-2.0)) / 2 - (1 - ll.exp().pow(-2.0)) / 2
    assert not torch.isfinite(naive).all()
    lw.requires_grad_()
    loss = alphapo_loss(lw, ll, 2.0, 1e-60, 0.0)[0]
    assert torch.isfinite(loss).all()
    assert loss[0].item() == pytest.approx(math.log(2), rel=1e-6)  # equal rewards → log 2, not nan
    # alpha < 0: bounded reward, fine for any finite l
    out = alphapo_loss(torch.tensor([-1e4, -3.0]), torch.tensor([-2e4, -1e5]), -1.0, 2.5, 0.1)
    assert all(torch.isfinite(t).all() for t in out)
    torch.testing.assert_close(alpha_reward(torch.tensor([-1e4]), -1.0), torch.tensor([-1.0]))
    with pytest.raises(ValueError, match="overflow"):
        alphapo_loss(torch.tensor([-800.0]), torch.tensor([-1.0]), 1.0, 1.0, 0.0)


def test_small_alpha_precision_vs_trl_form():
    # TRL's (1 - p^-a)/a loses precision as a → 0 in float32; the expm1 form keeps it
    lw = torch.tensor([-1.3])
    exact = alpha_reward(lw.double(), 1e-6)
    ours = alpha_reward(lw, 1e-6)
    trl = (1 - lw.exp().pow(-1e-6)) / 1e-6
    assert abs(ours.item() - exact.item()) < 1e-6 < abs(trl.item() - exact.item())


# ---------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    "args, err, match",
    [
        ((torch.zeros(3), torch.zeros(2), 0.5, 1.0, 0.0), ValueError, "shape mismatch"),
        ((torch.zeros(3, 1), torch.zeros(3, 1), 0.5, 1.0, 0.0), ValueError, r"shape \(B,\)"),
        ((torch.zeros(0), torch.zeros(0), 0.5, 1.0, 0.0), ValueError, "B >= 1"),
        ((torch.zeros(3), torch.zeros(3), 0.5, 0.0, 0.0), ValueError, "beta must be > 0"),
        ((torch.zeros(3), torch.zeros(3), 0.5, -2.0, 0.0), ValueError, "beta must be > 0"),
        ((torch.tensor([0.0, float("nan")]), torch.zeros(2), 0.5, 1.0, 0.0), ValueError, "non-finite"),
        ((torch.zeros(2), torch.tensor([-float("inf"), 0.0]), 0.5, 1.0, 0.0), ValueError, "non-finite"),
        ((torch.zeros(2), torch.zeros(2), float("nan"), 1.0, 0.0), ValueError, "alpha must be finite"),
        ((torch.zeros(2), torch.zeros(2), 0.5, 1.0, 0.0, 0.5), ValueError, "label_smoothing"),
        ((torch.zeros(2, dtype=torch.long), torch.zeros(2), 0.5, 1.0, 0.0), TypeError, "floating"),
        (([0.0, 1.0], torch.zeros(2), 0.5, 1.0, 0.0), TypeError, "torch.Tensor"),
        ((torch.zeros(2), torch.zeros(2), "0.5", 1.0, 0.0), TypeError, "alpha must be a real number"),
    ],
)
def test_bad_inputs_alphapo(args, err, match):
    with pytest.raises(err, match=match):
        alphapo_loss(*args)


def test_bad_inputs_dpo_simpo():
    z = torch.zeros(3)
    with pytest.raises(ValueError, match="beta must be > 0"):
        dpo_loss(z, z, z, z, beta=0.0)
    with pytest.raises(ValueError, match="shape mismatch"):
        dpo_loss(z, z, z, torch.zeros(4), beta=0.1)
    with pytest.raises(ValueError, match="non-finite"):
        dpo_loss(z, z, torch.tensor([0.0, float("inf"), 0.0]), z, beta=0.1)
    with pytest.raises(ValueError, match="nll_weight"):
        simpo_loss(z, z, 1.0, 0.0, nll_weight=-1.0)


# ---------------------------------------------------------------- masking of prompt and padding (the trainer's path)
from lipapers.alphapo import (  # noqa: E402
    PrefConfig,
    PrefPairs,
    bt_label,
    gold_reward,
    pair_logps,
    response_mask,
    train_preference,
)
from lipapers.lm import LM, LMConfig  # noqa: E402


def _tiny_lm(V=50, seed=0):
    torch.manual_seed(seed)
    return LM(LMConfig(vocab_size=V, d_model=16, n_layers=1, n_heads=2, max_seq_len=32)).eval()


def _pairs(V=50, N=6, P=4, R=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (2 * N, P + R), generator=g)
    lens = torch.randint(1, R + 1, (2 * N,), generator=g)  # response lengths, the rest is padding
    attn = (torch.arange(P + R)[None] < (P + lens)[:, None]).long()
    return PrefPairs(ids[:N], ids[N:], attn[:N], attn[N:], P, torch.zeros(N), torch.zeros(N))


def test_pair_logps_masks_prompt_and_padding():
    m, pairs = _tiny_lm(), _pairs()
    with torch.no_grad():
        w, lo = pair_logps(m, pairs, torch.arange(pairs.n))
        # brute force: each row alone, unpadded, summing log p over response tokens only
        for ids, attn, out in ((pairs.chosen, pairs.chosen_attn, w), (pairs.rejected, pairs.rejected_attn, lo)):
            for i in range(len(ids)):
                n = int(attn[i].sum())
                x = ids[i, :n][None]
                lp = torch.log_softmax(m(x).logits[0, :-1].double(), -1).gather(-1, x[0, 1:, None])[:, 0]
                resp = lp[pairs.prompt_len - 1:]  # targets at positions P..n-1
                assert int(out.n_tokens[i]) == n - pairs.prompt_len
                torch.testing.assert_close(out.sum[i].double(), resp.sum(), rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(out.mean[i].double(), resp.mean(), rtol=1e-5, atol=1e-5)
        # changing padded tokens changes nothing; changing a prompt token changes only the context (not the count)
        ch = pairs.chosen.clone()
        ch[pairs.chosen_attn == 0] = (ch[pairs.chosen_attn == 0] + 1) % 50
        w2, _ = pair_logps(m, pairs._replace(chosen=ch), torch.arange(pairs.n))
        torch.testing.assert_close(w2.sum, w.sum, rtol=0, atol=1e-6)
        assert torch.equal(w2.n_tokens, w.n_tokens)


class _FakeTok:
    "Token i decodes to VOCAB[i]."

    VOCAB = ["a", " b", "\n", "\n\n", "c\n", "\nd", ""]

    def __len__(self):
        return len(self.VOCAB)

    def decode(self, ids):
        return "".join(self.VOCAB[i] for i in ids)


def test_response_mask_ends_at_blank_line():
    tok, P = _FakeTok(), 2
    rows = torch.tensor(
        [
            [0, 0, 0, 1, 3, 0, 0],  # "\n\n" token at response position 2 → keep P+3 tokens
            [0, 0, 4, 5, 0, 0, 0],  # "c\n" then "\nd" completes a blank line → keep P+2
            [0, 0, 2, 6, 2, 0, 0],  # "\n", empty token, "\n" → blank line across an empty token → keep P+3
            [0, 0, 0, 1, 2, 0, 1],  # never a blank line → keep all
            [2, 2, 2, 0, 0, 0, 0],  # newlines in the prompt do not count; "\n" as the first response token is fine
        ]
    )
    m = response_mask(tok, rows, P)
    assert m.sum(1).tolist() == [P + 3, P + 2, P + 3, 7, 7]
    assert (m[:, :P] == 1).all()


def test_gold_reward_and_bt_labels():
    assert gold_reward("O sweet love, thou art my joy!", 0.02) == pytest.approx(3 - 0.02 * 7)
    assert gold_reward("Villain! Death and blood.", 0.0) == -3
    assert gold_reward("LOVE'S fair 'love'", 0.0) == 2  # case-insensitive; quotes stripped; "love's" is not in the lexicon
    with pytest.raises(TypeError, match="str"):
        gold_reward(3)
    g = torch.Generator().manual_seed(0)
    lab = bt_label(torch.full((40000,), 0.3), torch.zeros(40000), 0.2, g).double().mean().item()
    assert lab == pytest.approx(1 / (1 + math.exp(-1.5)), abs=0.01)  # sigma(0.3 / 0.2)
    # tau -> 0 is a noiseless annotator
    assert bt_label(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), 1e-6, g).tolist() == [True, False]
    with pytest.raises(ValueError, match="tau must be > 0"):
        bt_label(torch.zeros(2), torch.zeros(2), 0.0)


def test_trainer_is_deterministic_and_learns():
    pairs = _pairs(N=8, seed=1)
    logs = []
    for _ in range(2):
        m = _tiny_lm(seed=3)
        cfg = PrefConfig("alphapo", 0.5, 2.0, 0.0, 0.0, lr=3e-2, n_steps=8, batch_size=8)
        logs.append(train_preference(m, pairs, cfg, probe=torch.arange(8), eval_every=4, seed=0))
    assert logs[0] == logs[1]  # same seed, same result
    assert logs[0][-1]["probe_chosen_logp"] - logs[0][-1]["probe_rejected_logp"] > logs[0][0]["probe_chosen_logp"] - logs[0][0]["probe_rejected_logp"]
    assert logs[0][-2]["loss"] < logs[0][0]["loss"]


def test_trainer_bad_inputs():
    with pytest.raises(ValueError, match="method must be one of"):
        PrefConfig("ipo")
    with pytest.raises(ValueError, match="beta must be > 0"):
        PrefConfig("simpo", beta=0.0)
    with pytest.raises(ValueError, match="needs a frozen reference"):
        train_preference(_tiny_lm(), _pairs(), PrefConfig("dpo", beta=0.1, n_steps=1))


class _WordTok:
    "50 tokens: words from both lexicons, neutral words and newlines."

    WORDS = ["love ", "death ", "the ", "\n", "sweet ", "villain ", "and ", "of ", "joy ", "blood "] * 5

    def __len__(self):
        return len(self.WORDS)

    def decode(self, ids):
        return "".join(self.WORDS[i] for i in ids)


def test_evaluate_policy_against_itself():
    from lipapers.alphapo import decode_responses, evaluate_policy, sample_responses

    m, tok, P = _tiny_lm(), _WordTok(), 3
    prompts = torch.randint(0, 50, (5, P), generator=torch.Generator().manual_seed(0))
    ids0, attn0 = sample_responses(m, tok, prompts, 2, 6, torch.Generator().manual_seed(7))
    texts = decode_responses(tok, ids0, attn0, P)
    g0 = torch.tensor([gold_reward(s, 0.02) for s in texts])
    s0 = torch.tensor([gold_reward(s, 0.0) for s in texts])
    ev = evaluate_policy(m, m, tok, prompts, g0, 2, 6, 0.02, torch.Generator().manual_seed(7), s_init=s0)
    # the same model with the same random stream draws the same responses: all ties, zero KL
    assert ev["win_rate"] == 0.5 and ev["win_rate_lc"] == 0.5 and ev["kl"] == 0.0
    assert ev["gold"] == pytest.approx(g0.mean().item()) and ev["sentiment"] == pytest.approx(s0.mean().item())
    with pytest.raises(ValueError, match="g_init must have shape"):
        evaluate_policy(m, m, tok, prompts, g0[:3], 2, 6, 0.02)


# ---------------------------------------------------------------- the experiment: arms, rows, summaries, claims
from lipapers.alphapo import (  # noqa: E402
    arm_rows,
    arm_table,
    baseline_samples,
    displacement_rank,
    evaluate_policy,
    make_arms,
    probe_deltas,
    run_arm,
)


def test_make_arms_names_and_settings():
    arms = make_arms(["dpo", "simpo", "alphapo"], [-1.0, 0.25], 2.5, 0.1, 0.1, 3e-4, 7, 5)
    assert list(arms) == ["DPO", "SimPO", "AlphaPO α=-1", "AlphaPO α=0.25"]
    assert arms["DPO"].beta == 0.1 and arms["DPO"].gamma == 0.0 and arms["SimPO"].alpha == 0.0
    assert arms["AlphaPO α=0.25"].alpha == 0.25 and arms["AlphaPO α=0.25"].gamma == 0.1
    assert {(c.lr, c.n_steps, c.batch_size) for c in arms.values()} == {(3e-4, 7, 5)}
    assert list(make_arms(["simpo"], [0.5], 2.5, 0.1, 0.1, 1e-3, 1, 1)) == ["SimPO"]  # α ignored without alphapo
    for bad in ([], ["ipo"], ["dpo", "orpo"]):
        with pytest.raises(ValueError, match="non-empty subset"):
            make_arms(bad, [], 1.0, 0.0, 0.1, 1e-3, 1, 1)
    with pytest.raises(ValueError, match="beta must be > 0"):
        make_arms(["alphapo"], [0.5], 0.0, 0.0, 0.1, 1e-3, 1, 1)


def test_probe_deltas_and_arm_rows():
    log = [dict(step=0, probe_chosen_logp=-3.0, probe_rejected_logp=-3.5, loss=0.7, accuracy=0.5),
           dict(step=1, loss=0.6, accuracy=0.75), dict(step=2, probe_chosen_logp=-3.25, probe_rejected_logp=-4.5)]
    assert probe_deltas(log) == (-0.25, -1.0)
    with pytest.raises(ValueError, match="need 2"):
        probe_deltas(log[1:2])
    ev = dict(win_rate=0.6, kl=1.5, train_seconds=2.0)
    rows = arm_rows("DPO", PrefConfig("dpo", beta=0.1), log, ev)
    assert len(rows) == 4 + 2 + 2 + len(ev) + 2  # per-step values, final metrics, the two deltas
    assert all(math.isnan(r["alpha"]) and r["method"] == "dpo" and r["arm"] == "DPO" for r in rows)
    by = {(r["metric"], r["step"]): r for r in rows}
    assert by[("loss", 1)]["value"] == 0.6 and by[("train_seconds", None)]["unit"] == "s"
    assert by[("delta_rejected_logp", None)]["value"] == -1.0
    rows = arm_rows("AlphaPO α=0.5", PrefConfig("alphapo", 0.5), log, ev)
    assert {r["alpha"] for r in rows} == {0.5}


def _ranks(x):
    return np.argsort(np.argsort(x)).astype(float)


def test_displacement_rank_against_rank_correlation():
    rng = np.random.default_rng(0)
    alphas, d = rng.normal(size=7), rng.normal(size=7)
    rows = [dict(method="alphapo", metric="delta_chosen_logp", alpha=a, value=v) for a, v in zip(alphas, d)]
    rows += [dict(method="dpo", metric="delta_chosen_logp", alpha=float("nan"), value=100.0),   # DPO has no α
             dict(method="alphapo", metric="kl", alpha=0.3, value=-100.0)]                      # another metric
    ref = np.corrcoef(_ranks(alphas), _ranks(d))[0, 1]  # Pearson of ranks, no ties
    assert displacement_rank(rows) == pytest.approx(ref, abs=1e-12)
    assert displacement_rank([dict(r, value=-r["value"]) for r in rows]) == pytest.approx(-ref, abs=1e-12)
    assert math.isnan(displacement_rank(rows[:2]))


def test_arm_table_against_t_interval():
    from scipy import stats
    import polars as pl
    vals = {"SimPO": [0.4, 0.5, 0.7, 0.2], "DPO": [0.6, 0.65, 0.5, 0.7], "AlphaPO α=-1": [0.9, 0.8, 0.85, 0.6]}
    alpha = {"SimPO": 0.0, "DPO": float("nan"), "AlphaPO α=-1": -1.0}
    rows = [dict(arm=a, alpha=alpha[a], metric="win_rate", value=v, step=None) for a, vs in vals.items() for v in vs]
    rows += [dict(arm="SimPO", alpha=0.0, metric="win_rate", value=99.0, step=3),   # a per-step row: not final
             dict(arm=None, alpha=None, metric="win_rate", value=99.0, step=None)]  # not an arm (e.g. data rows)
    t = arm_table(pl.DataFrame(rows), ["win_rate"])
    assert t["arm"].to_list() == ["DPO", "AlphaPO α=-1", "SimPO"]  # DPO (α nan) first, then by α
    for r in t.iter_rows(named=True):
        x = np.array(vals[r["arm"]])
        half = stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x))
        assert r["n"] == 4 and r["mean"] == pytest.approx(x.mean())
        assert (r["lo"], r["hi"]) == pytest.approx((x.mean() - half, x.mean() + half))
    with pytest.raises(ValueError, match="no final rows"):
        arm_table(pl.DataFrame(rows), ["kl"])


def test_run_arm_is_deterministic_and_zero_steps_of_drift_ties():
    m, tok, P = _tiny_lm(), _WordTok(), 3
    pairs = _pairs(V=50, N=8, P=P, R=5, seed=2)
    prompts = torch.randint(0, 50, (4, P), generator=torch.Generator().manual_seed(1))
    base = baseline_samples(m, tok, prompts, 2, 5, 0.02, seed=0)
    assert base.gold.shape == (8,) and base.sentiment.shape == (8,)
    # π_0 against itself with the same stream draws the same samples: every comparison ties
    ev0 = evaluate_policy(m, m, tok, prompts, base.gold, 2, 5, 0.02, torch.Generator().manual_seed(1),
                          s_init=base.sentiment)
    assert ev0["win_rate"] == 0.5 and ev0["win_rate_lc"] == 0.5 and ev0["kl"] == 0.0
    out = []
    for cfg in (PrefConfig("alphapo", 0.5, 2.0, 0.0, lr=3e-2, n_steps=4, batch_size=4),) * 2 + (
            PrefConfig("dpo", 0.0, 0.1, lr=3e-2, n_steps=4, batch_size=4),):
        log, ev = run_arm(m, tok, pairs, cfg, prompts, base, torch.arange(8), 2, 5, 0.02, seed=0)
        out.append((log, {k: v for k, v in ev.items() if k != "train_seconds"}))
    assert out[0] == out[1]                     # same seed, same arm: identical logs and metrics
    assert out[0][1]["kl"] != 0.0               # training moved the policy
    assert len([r for r in out[2][0] if "probe_chosen_logp" in r]) == 3  # steps 0, 2 and after the last
    with pytest.raises(ValueError, match="g_init must have shape"):
        run_arm(m, tok, pairs, PrefConfig("simpo", 0.0, n_steps=1), prompts, base._replace(gold=base.gold[:3]),
                torch.arange(2), 1, 5, 0.02, seed=0)


def test_claims_read_the_committed_results():
    from lipapers.core import VERDICTS, committed_results, load_claims, status_table

    claims = load_claims("alphapo")
    t = status_table(claims, committed_results("alphapo"), "alphapo")
    v = dict(zip(t["claim"], t["verdict"]))
    assert set(v.values()) <= set(VERDICTS) and len(v) == len(claims)
    assert v["P1"] == "not run"                                     # SmolLM2 runs are not made here
    run = t.filter(t["verdict"] != "not run")
    assert (run["n"] >= 2).all()                                    # every measured claim pairs ≥ 2 seeds
    lm = run.filter(~run["claim"].str.starts_with("B"))
    assert all(len(r.split(", ")) == n for r, n in zip(lm["runs"], lm["n"]))  # LM sweep: one run per seed
    bandit = run.filter(run["claim"].str.starts_with("B"))
    assert len(bandit) == 7 and (bandit["n"] == 30).all() and bandit["runs"].n_unique() == 1  # 30 seeds in one run


# ---- the exact bandit ----
from lipapers.alphapo import (BanditConfig, make_bandit, token_logp, policy_logp, bandit_metrics, bandit_loss,
                              train_bandit, at_kl, bandit_rows)

SMALL_BANDIT = BanditConfig(n_prompts=7, n_responses=13, n_features=3, min_len=2, max_len=9, n_pairs=60)


@pytest.mark.parametrize("cfg", [PrefConfig("dpo", 0.0, 0.1, 0.0), PrefConfig("simpo", 0.0, 2.5, 0.1),
                                 PrefConfig("alphapo", 0.25, 2.5, 0.1), PrefConfig("alphapo", -1.0, 2.5, 0.1)],
                         ids=["dpo", "simpo", "alpha0.25", "alpha-1"])
def test_bandit_loss_gradient_matches_finite_differences(cfg):
    b = make_bandit(SMALL_BANDIT, 3)
    th = (b.theta0 + 0.3 * torch.randn(len(b.theta0), generator=torch.Generator().manual_seed(0),
                                        dtype=torch.float64)).requires_grad_(True)
    bandit_loss(th, b, cfg).backward()
    eps, fd = 1e-6, torch.zeros_like(th)
    for i in range(len(th)):
        e = torch.zeros_like(th); e[i] = eps
        fd[i] = (bandit_loss(th.detach() + e, b, cfg) - bandit_loss(th.detach() - e, b, cfg)) / (2 * eps)
    torch.testing.assert_close(th.grad, fd, rtol=1e-6, atol=1e-8)  # float64 central differences


def test_bandit_alpha_to_zero_is_simpo():
    b = make_bandit(SMALL_BANDIT, 1)
    a = train_bandit(b, PrefConfig("alphapo", 1e-9, 2.5, 0.1), n_steps=20, every=5)
    s = train_bandit(b, PrefConfig("simpo", 0.0, 2.5, 0.1), n_steps=20, every=5)
    for ra, rs in zip(a, s):
        for k in ("gold", "kl", "chosen", "rejected"): assert ra[k] == pytest.approx(rs[k], rel=1e-7, abs=1e-10)


def test_bandit_exact_kl_and_win_match_monte_carlo():
    b = make_bandit(SMALL_BANDIT, 2)
    th = b.theta0 + torch.tensor([0.8, -0.5, 0.3, 0.4], dtype=torch.float64)
    m = bandit_metrics(th, b)
    lq, lr = policy_logp(th, b), policy_logp(b.theta0, b)
    g = torch.Generator().manual_seed(0); n = 20000
    y = torch.multinomial(lq.exp(), n, replacement=True, generator=g)       # (P, n) draws from π̃_θ
    y0 = torch.multinomial(lr.exp(), n, replacement=True, generator=g)      # (P, n) draws from π̃_ref
    kl_s = (lq.gather(1, y) - lr.gather(1, y)).mean(0)                       # per draw, averaged over prompts
    gy, g0 = b.gold.gather(1, y), b.gold.gather(1, y0)
    win_s = ((gy > g0).double() + 0.5 * (gy == g0).double()).mean(0)
    for exact, s in ((m["kl"], kl_s), (m["win"], win_s)):
        assert abs(s.mean().item() - exact) < 3 * s.std().item() / math.sqrt(n), (exact, s.mean().item())
    assert m["kl"] > 0.05  # the check is not trivially at θ_ref


def test_bandit_is_seeded_and_the_reference_sits_near_minus_one():
    a, b = make_bandit(BanditConfig(), 5), make_bandit(BanditConfig(), 5)
    assert torch.equal(a.pairs, b.pairs) and torch.equal(a.gold, b.gold)
    assert not torch.equal(a.pairs, make_bandit(BanditConfig(), 6).pairs)
    x, c, _ = a.pairs.T
    assert -1.3 < token_logp(a.theta0, a.phi[x, c]).mean().item() < -0.5


def test_bandit_rows_pair_arms_by_seed_and_include_controls():
    arms = {"SimPO": PrefConfig("simpo", 0.0, 2.5, 0.1), "AlphaPO α=0.25": PrefConfig("alphapo", 0.25, 2.5, 0.1)}
    rows = bandit_rows(SMALL_BANDIT, 0, arms, kl=0.05, lr=0.05, n_steps=30, every=3)
    methods = {r["method"] for r in rows}
    assert methods == {"oracle", "SimPO", "AlphaPO α=0.25", "SimPO coin-flip labels"}
    gain = {r["method"]: r["value"] for r in rows if r["metric"] == "gold_gain_at_kl"}
    assert gain["SimPO"] > 0 and all(math.isfinite(v) for v in gain.values())


def test_bandit_bad_input():
    with pytest.raises(ValueError, match="n_responses >= 2"): BanditConfig(n_responses=1)
    with pytest.raises(ValueError, match="token_logp < 0"): BanditConfig(token_logp=0.5)
    with pytest.raises(ValueError, match="kl must be > 0"): at_kl([dict(kl=0.0, gold=0.0)], 0.0)
