"""Tests of lipapers.tasks: the gold reward of every family on hand-computed examples (perfect answer = maximum, each kind
of error lowers it, padding a wrong answer never raises it), Levenshtein against brute force, deterministic generators,
hash-disjoint train/test splits, and bad input."""
import itertools
import random

import pytest

import lipapers.tasks as T
from lipapers.tasks import answer, edit_reward, examples, exact_match, gold_reward, levenshtein, mixture, reference

STRING = ("sort", "copy", "reverse", "add", "recall")


def _brute(a, b):
    """Edit distance by breadth-first search over single edits (alphabet of both strings)."""
    alpha = sorted(set(a + b)) or ["x"]
    seen, frontier, d = {a}, {a}, 0
    while b not in frontier:
        nxt = set()
        for s in frontier:
            for i in range(len(s) + 1):
                nxt |= {s[:i] + c + s[i:] for c in alpha}
                if i < len(s):
                    nxt |= {s[:i] + s[i + 1:]} | {s[:i] + c + s[i + 1:] for c in alpha}
        frontier, d = nxt - seen, d + 1
        seen |= nxt
    return d


def test_levenshtein_matches_brute_force():
    rng = random.Random(0)
    words = ["".join(w) for n in range(4) for w in itertools.product("ab", repeat=n)]
    pairs = [(a, b) for a in words for b in words] + [("".join(rng.choice("abc") for _ in range(rng.randint(0, 4))),
                                                        "".join(rng.choice("abc") for _ in range(rng.randint(0, 4)))) for _ in range(40)]
    for a, b in pairs:
        assert levenshtein(a, b) == _brute(a, b) == levenshtein(b, a), (a, b)
    assert levenshtein("kitten", "sitting") == 3


HAND = {  # prompt -> (reference, [(response, reward)])
    "sort 72941 =": (" 12479", [(" 12479", 1.0), (" 12497", 0.6), (" 1249", 0.8), (" 124799", 0.8), (" 97421", 0.2), ("", 0.0)]),
    "copy 8302 =": (" 8302", [(" 8302", 1.0), (" 8312", 0.75), (" 830", 0.75), (" 83022", 0.75)]),
    "reverse 8302 =": (" 2038", [(" 2038", 1.0), (" 8302", 0.0), (" 2083", 0.5), (" 203", 0.75)]),
    "add 347+58 =": (" 405", [(" 405", 1.0), (" 406", 2 / 3), (" 45", 2 / 3), (" 4050", 2 / 3), (" 395", 1 / 3)]),
    "recall a:37 k:05 q:71 ? k =": (" 05", [(" 05", 1.0), (" 5", 0.5), (" 37", 0.0), (" 050", 0.5)]),
}


@pytest.mark.parametrize("prompt", list(HAND))
def test_gold_reward_hand_examples(prompt):
    ref, cases = HAND[prompt]
    assert reference(prompt) == ref
    for resp, want in cases:
        assert gold_reward(prompt, resp) == pytest.approx(want), resp
    assert gold_reward(prompt, ref) == 1.0 and exact_match(prompt, ref + "<|endoftext|>trailing")
    assert max(gold_reward(prompt, r) for r, _ in cases) == 1.0  # the perfect answer is the maximum


@pytest.mark.parametrize("family", STRING)
def test_padding_never_raises_a_wrong_answer(family):
    rng = random.Random(1)
    for e in examples(family, 30, seed=2):
        ref = e.reference.strip()
        wrong = "".join(rng.choice("0123456789") for _ in range(len(ref)))
        if wrong == ref:
            continue
        base = gold_reward(e.prompt, " " + wrong)
        assert base < 1.0
        for pad in ("x" * 3, "#" * 10, " zz"):  # characters that never occur in a reference
            assert gold_reward(e.prompt, " " + wrong + pad) <= base
        assert gold_reward(e.prompt, " " + ref + "xxx") < 1.0  # padding the right answer costs too


def test_answer_parsing():
    assert answer(" 123\nmore") == "123" and answer(" 12<|endoftext|>3") == "12" and answer("  ") == ""
    with pytest.raises(ValueError, match="reference is empty"):
        edit_reward(" ", "1")


@pytest.mark.parametrize("family", STRING)
def test_generators_deterministic_and_splits_disjoint(family):
    a, b = examples(family, 40, seed=3), examples(family, 40, seed=3)
    assert a == b and a != examples(family, 40, seed=4)
    assert len({e.prompt for e in a}) == 40
    test = examples(family, 40, seed=3, split="test")
    assert {T.prompt_split(e.prompt) for e in test} == {"test"} and {T.prompt_split(e.prompt) for e in a} == {"train"}
    assert not {e.prompt for e in test} & {e.prompt for s in range(5) for e in examples(family, 40, seed=s)}
    for e in a + test + examples(family, 20, seed=3, split="ood"):
        assert e.family == family and gold_reward(e.prompt, e.reference) == 1.0


def test_ood_is_harder():
    L = lambda f, s: max(len(e.reference) for e in examples(f, 100, seed=0, split=s))  # noqa: E731
    for f in ("sort", "copy", "reverse", "add"):
        assert min(len(e.reference) for e in examples(f, 100, seed=0, split="ood")) >= L(f, "train") - 1


def test_mixture_and_bad_input():
    m = mixture(60, seed=5, families=("sort", "add"), weights=(2, 1))
    assert m == mixture(60, seed=5, families=("sort", "add"), weights=(2, 1)) and len(m) == 60
    assert {e.family for e in m} == {"sort", "add"}
    assert sum(e.family == "sort" for e in m) > sum(e.family == "add" for e in m)
    with pytest.raises(ValueError, match="unknown task family 'translate'; valid: sort, copy"):
        examples("translate", 3)
    with pytest.raises(ValueError, match="unknown split 'dev'; valid: train, test, ood"):
        examples("sort", 3, split="dev")
    with pytest.raises(ValueError, match="n must be a positive int"):
        examples("sort", 0)
    with pytest.raises(ValueError, match="belongs to no task family"):
        gold_reward("translate 1 =", " 1")
    with pytest.raises(ValueError, match="one weight >= 0 per family"):
        mixture(5, families=("sort", "add"), weights=(1,))
    with pytest.raises(ValueError, match="families is empty"):
        mixture(5, families=())


# ---------------------------------------------------------------- preference pairs, evaluation

import numpy as np  # noqa: E402
import torch  # noqa: E402

import lipapers.lm as LMm  # noqa: E402


def test_bt_prob_limits():
    assert T.bt_prob(0.6, 0.5, 0.1) == pytest.approx(1 / (1 + np.exp(-1)))
    assert list(T.bt_prob([1, 0, 0.3], [0, 1, 0.3], 0)) == [1, 0, 0.5]
    assert T.bt_prob(1.0, 0.0, 1e9) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="bt_temperature must be >= 0"):
        T.bt_prob(1, 0, -1)


def _fake_generate(table):
    def gen(model, tok, prompts, max_new_tokens=16, temperature=1.0, *a, seed=0, return_logprobs=False, **kw):
        out = [table(p, i, seed) for i, p in enumerate(prompts)]
        if return_logprobs:
            n = torch.full((len(out),), 3)
            return out, LMm.SeqLogprobs(-0.3 * n, torch.full((len(out),), -0.3), n)
        return out
    return gen


def test_preference_pairs_bradley_terry_frequency(monkeypatch):
    # two responses per prompt with rewards 1.0 and 0.75: the better is chosen with probability sigma(0.25 / 0.1)
    monkeypatch.setattr(LMm, "generate", _fake_generate(lambda p, i, s: " 1234" if i % 2 == 0 else " 1235"))
    n = 2000
    df = T.preference_pairs(None, None, ["copy 1234 ="] * n, k=2, bt_temperature=0.1, seed=0)
    assert len(df) == n and set(df["family"]) == {"copy"}
    p = 1 / (1 + np.exp(-2.5))
    freq = float((df["r_chosen"] > df["r_rejected"]).mean())
    assert abs(freq - p) < 4 * np.sqrt(p * (1 - p) / n), (freq, p)
    assert df.equals(T.preference_pairs(None, None, ["copy 1234 ="] * n, k=2, seed=0))  # deterministic per seed
    # tau = 0: the better response always wins; identical responses are never paired
    df0 = T.preference_pairs(None, None, ["copy 1234 ="] * 50, k=2, bt_temperature=0)
    assert (df0["r_chosen"] > df0["r_rejected"]).all()
    monkeypatch.setattr(LMm, "generate", _fake_generate(lambda p, i, s: " 1234"))
    assert len(T.preference_pairs(None, None, ["copy 1234 ="] * 5, k=3)) == 0
    with pytest.raises(ValueError, match="k must be >= 2"):
        T.preference_pairs(None, None, ["copy 1 ="], k=1)
    with pytest.raises(ValueError, match="prompts is empty"):
        T.preference_pairs(None, None, [])


def test_preference_data_holds_families_out(monkeypatch):
    monkeypatch.setattr(LMm, "generate", _fake_generate(lambda p, i, s: [" 1", " 22", " 333"][i % 3]))
    d = T.preference_data(None, None, n_prompts=5, families=("sort", "add"), heldout_families=("reverse",), n_eval=4, k=3)
    assert set(d.pairs["family"]) <= {"sort", "add"} and len(d.pairs) == 10 * 3
    ev = d.eval_prompts
    assert set(zip(ev["family"], ev["split"])) == {("sort", "test"), ("sort", "ood"), ("add", "test"), ("add", "ood"),
                                                   ("reverse", "heldout_family")}
    assert not set(ev["prompt"]) & set(d.pairs["prompt"])
    with pytest.raises(ValueError, match="both trained and held out"):
        T.preference_data(None, None, families=("sort",), heldout_families=("sort",))


def test_evaluate_scores_answers(monkeypatch):
    monkeypatch.setattr(LMm, "generate", _fake_generate(lambda p, i, s: reference(p)))  # a perfect policy
    df = T.evaluate(None, None, families=("sort", "add"), n=8)
    assert df["exact_match"].to_list() == [1.0, 1.0] and df["gold_reward"].to_list() == [1.0, 1.0]
    assert df["own_logprob_mean"].to_list() == pytest.approx([-0.3, -0.3])


def test_evaluate_real_model_smoke():
    from tests.test_lm import _CharTok
    torch.manual_seed(0)
    m = LMm.LM(LMm.LMConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, max_seq_len=64))
    df = T.evaluate(m, _CharTok(), families=("copy",), n=3, max_new_tokens=5)
    assert df["n"][0] == 3 and 0 <= df["gold_reward"][0] <= 1 and df["own_logprob_mean"][0] < 0


# ---------------------------------------------------------------- verbalized recommendation


def test_recommend_reward_is_the_oracle_probability():
    exs = examples("recommend", 20, seed=1)
    assert exs == examples("recommend", 20, seed=1)
    w = T.reco_world()
    for e in exs:
        m, i = T._reco_ids(e.prompt)
        assert w.describe_member(m) in e.prompt and w.describe_post(i) in e.prompt
        p = float(1 / (1 + np.exp(-w.post_logit([m], [i])[0])))  # the oracle, recomputed from the world
        assert gold_reward(e.prompt, " Yes") == pytest.approx(p) and gold_reward(e.prompt, " No") == pytest.approx(1 - p)
        assert gold_reward(e.prompt, e.reference) == pytest.approx(max(p, 1 - p))  # the Bayes answer is the best one
        for bad in (" Yes Yes", " Yes, I think so", " maybe", ""):  # anything else, longer or not, earns nothing
            assert gold_reward(e.prompt, bad) == 0.0
        assert gold_reward(e.prompt, " Yes<|endoftext|>junk") == pytest.approx(p)
    ps = np.array([T._reco_p(e.prompt) for e in examples("recommend", 100, seed=2)])
    assert ps.min() < 0.2 and ps.max() > 0.6  # spread over (0, 1), not piled at the base rate


def test_recommend_splits_and_targets():
    cut = int(0.9 * T.reco_world().cfg.n_members)
    assert all(T._reco_ids(e.prompt)[0] >= cut for e in examples("recommend", 10, split="ood"))
    assert all(T._reco_ids(e.prompt)[0] < cut for e in examples("recommend", 10, split="test"))
    e = examples("recommend", 1, seed=3)[0]
    rng = np.random.default_rng(0)
    draws = [T.training_target(e, rng) for _ in range(2000)]
    p = T._reco_p(e.prompt)
    assert set(draws) <= {" Yes", " No"}
    assert abs(np.mean([d == " Yes" for d in draws]) - p) < 4 * np.sqrt(p * (1 - p) / 2000)
    s = examples("sort", 1)[0]
    assert T.training_target(s, rng) == s.reference
