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
