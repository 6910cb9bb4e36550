"""Fast tier: round-quality measures (selfplay/evaluation/quality.py, selfplay/evaluation/pathologies.py): Wilson intervals, the length-controlled win rate, the
data sanity checks of a round's pairs, and the pathology detectors on generated text and their trend."""

from __future__ import annotations

import doctest
import random

import numpy as np
import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

import selfplay.evaluation.pathologies as pathology_module
import selfplay.evaluation.quality as quality
from selfplay.evaluation.pathologies import (
    degenerate_rate,
    hedging_rate,
    pathologies,
    pathology_trend,
    repetition_rate,
    shared_tail,
    sycophancy_rate,
    verbosity,
)
from selfplay.evaluation.quality import QualityThresholds, data_quality, length_controlled_win_rate, similarity_histogram, wilson_interval, win_summary

pytestmark = pytest.mark.unit

WARNING_KEYS = {"check", "value", "threshold", "message"}


@pytest.mark.parametrize("module", [quality, pathology_module])
def test_doctests(module):
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0


# ---------------------------------------------------------------- Wilson interval

@pytest.mark.parametrize(
    "successes, n, low, high",
    [(8, 10, 0.4902, 0.9433), (0, 10, 0.0, 0.2775), (10, 10, 0.7225, 1.0), (50, 100, 0.4038, 0.5962)],
)
def test_wilson_known_values(successes, n, low, high):
    lo, hi = wilson_interval(successes, n)
    assert lo == pytest.approx(low, abs=5e-5)
    assert hi == pytest.approx(high, abs=5e-5)


def test_wilson_edges():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert wilson_interval(0, 10)[0] == 0.0
    assert wilson_interval(10, 10)[1] == 1.0
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def test_wilson_contains_estimate_and_narrows_with_n():
    for n in (1, 2, 5, 16, 100, 1000):
        for k in range(0, 2 * n + 1):
            successes = k / 2  # half-wins allowed
            lo, hi = wilson_interval(successes, n)
            assert 0.0 <= lo <= successes / n <= hi <= 1.0
    widths = [np.subtract(*wilson_interval(0.6 * n, n)[::-1]) for n in (10, 40, 160, 640)]
    assert all(a > b for a, b in zip(widths, widths[1:]))
    # symmetric about 0.5
    lo, hi = wilson_interval(3, 10)
    lo2, hi2 = wilson_interval(7, 10)
    assert lo == pytest.approx(1 - hi2) and hi == pytest.approx(1 - lo2)


def test_wilson_fractional_successes_between_neighbours():
    lo_a, hi_a = wilson_interval(5, 10)
    lo_b, hi_b = wilson_interval(5.5, 10)
    lo_c, hi_c = wilson_interval(6, 10)
    assert lo_a < lo_b < lo_c and hi_a < hi_b < hi_c


# ---------------------------------------------------------------- win summary and length control

def test_win_summary_counts():
    s = win_summary(["win", "win", "tie", "loss", "error", "win"], [5, 6, 7, 8, 100, 10], [5, 6, 7, 8, 1, 10])
    assert (s["n"], s["wins"], s["ties"], s["losses"]) == (5, 3, 1, 1)
    assert s["win_rate"] == pytest.approx(3.5 / 5)
    assert (s["ci_low"], s["ci_high"]) == pytest.approx(wilson_interval(3.5, 5))
    assert s["mean_len_new"] == pytest.approx(7.2) and s["mean_len_other"] == pytest.approx(7.2)  # error row left out
    assert s["lc_win_rate"] == pytest.approx(s["win_rate"], abs=1e-6)


def test_win_summary_empty_and_mismatched():
    s = win_summary(["error"], [1], [2])
    assert s["n"] == 0 and s["win_rate"] is None and s["lc_win_rate"] is None and s["mean_len_new"] is None
    assert (s["ci_low"], s["ci_high"]) == (0.0, 1.0)
    with pytest.raises(ValueError):
        win_summary(["win"], [1, 2], [1])


def test_lc_equals_raw_when_lengths_equal():
    rng = random.Random(0)
    outcomes = [rng.choice(["win", "win", "tie", "loss"]) for _ in range(37)]
    s = win_summary(outcomes, [50] * 37, [50] * 37)
    assert s["lc_win_rate"] == pytest.approx(s["win_rate"], abs=1e-9)
    # a constant offset leaves the length effect unidentifiable (the slope and the intercept are collinear); the
    # penalty on the slope settles it at 0, so the rate is again the plain one
    s = win_summary(outcomes, [80] * 37, [50] * 37)
    assert s["lc_win_rate"] == pytest.approx(s["win_rate"], abs=1e-6)
    # every verdict the same: returned as it is
    assert win_summary(["win"] * 5, [9] * 5, [3] * 5)["lc_win_rate"] == 1.0
    assert win_summary(["loss"] * 5, [3] * 5, [9] * 5)["lc_win_rate"] == 0.0


def planted_length_bias(n: int = 200, flip_every: int = 0):
    """Length differences spread evenly over [-60, 180] characters (the new model longer in 75% of pairs); the new
    model wins exactly when it is longer, except every `flip_every`-th pair, whose verdict is flipped (noise)."""
    diffs = np.linspace(-60, 180, n)
    wins = diffs > 0
    if flip_every:
        wins[::flip_every] = ~wins[::flip_every]
    other = np.random.default_rng(0).integers(50, 150, n)
    return ["win" if w else "loss" for w in wins], list(np.round(other + diffs).astype(int)), list(other)


@pytest.mark.parametrize("flip_every", [0, 10])
def test_lc_well_below_raw_under_length_bias(flip_every):
    s = win_summary(*planted_length_bias(flip_every=flip_every))
    assert s["win_rate"] >= 0.7
    assert s["lc_win_rate"] < s["win_rate"] - 0.15
    assert abs(s["lc_win_rate"] - 0.5) < 0.1


def test_lc_close_to_raw_without_length_relation():
    rng = np.random.default_rng(1)
    n = 300
    outcomes = list(rng.choice(["win", "tie", "loss"], size=n, p=[0.55, 0.1, 0.35]))
    new = list(rng.integers(20, 200, n))
    other = list(rng.integers(20, 200, n))
    s = win_summary(outcomes, new, other)
    assert s["lc_win_rate"] == pytest.approx(s["win_rate"], abs=0.04)


def test_lc_finite_under_perfect_separation():
    diffs = [-30, -20, -10, 10, 20, 30, 40, 50]
    y = [0, 0, 0, 1, 1, 1, 1, 1]
    lc = length_controlled_win_rate(y, diffs)
    assert 0.0 < lc < 1.0 and np.isfinite(lc)
    assert lc < np.mean(y)


# ---------------------------------------------------------------- data quality

def make_pairs(n_prompts: int = 20, seed: int = 0, *, long_chosen: bool = False, identical: int = 0) -> tuple[pd.DataFrame, list[str]]:
    """A clean round: each prompt one kept pair with comparable lengths (chosen longer half the time) and one
    dropped pair; `long_chosen` makes every chosen response three times the rejected one."""
    rng = random.Random(seed)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    rows, prompts = [], []

    def answer(n_words: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n_words))

    for i in range(n_prompts):
        prompt = f"Question number {i}: explain topic {i}."
        prompts.append(prompt)
        a, b = answer(rng.randint(8, 14)), answer(rng.randint(8, 14))
        if long_chosen:
            a = " ".join([b] * 3)
        chosen, rejected = (a, b) if (long_chosen or i % 2) else (b, a)
        if i < identical:
            a = b = chosen = rejected = answer(10)
        rows.append({"prompt": prompt, "response_1": a, "response_2": b, "similarity": rng.uniform(0.1, 0.6),
                     "kept": True, "drop_reason": None, "chosen": chosen, "rejected": rejected})
        rows.append({"prompt": prompt, "response_1": a, "response_2": answer(9), "similarity": rng.uniform(0.2, 0.7),
                     "kept": False, "drop_reason": "tie", "chosen": float("nan"), "rejected": float("nan")})
    return pd.DataFrame(rows), prompts


def test_clean_data_is_quiet():
    pairs, prompts = make_pairs()
    q = data_quality(pairs, prompts)
    assert q["warnings"] == []
    assert q["kept"] == 20 and q["pairs"] == 40
    assert q["duplicate_prompts"] == 0 and q["identical_pairs"] == 0 and q["short_responses"] == 0
    assert q["length_ratio"] <= 1.5 and q["chosen_longer_fraction"] <= 0.75
    assert q["drops"] == {"tie": 20}
    assert sum(q["similarity_histogram"].values()) == 40
    assert list(q["similarity_histogram"]) == [f"{i / 10:.1f}-{(i + 1) / 10:.1f}" for i in range(10)]


def test_planted_length_bias_is_flagged():
    pairs, prompts = make_pairs(long_chosen=True)
    q = data_quality(pairs, prompts)
    checks = {w["check"]: w for w in q["warnings"]}
    assert set(checks) == {"length_ratio", "chosen_longer_fraction"}
    assert checks["length_ratio"]["value"] > 2.5 and checks["length_ratio"]["threshold"] == 1.5
    assert checks["chosen_longer_fraction"]["value"] == 1.0
    for w in q["warnings"]:
        assert set(w) == WARNING_KEYS and "try" in w["message"].lower()


def test_planted_duplicate_prompts_are_flagged():
    pairs, prompts = make_pairs()
    prompts = prompts + ["  question NUMBER 3:   explain topic 3. ", prompts[5], prompts[5]]
    q = data_quality(pairs, prompts)
    assert q["duplicate_prompts"] == 2
    assert [w["check"] for w in q["warnings"]] == ["duplicate_prompts"]
    assert data_quality(pairs, prompts, QualityThresholds(max_duplicate_prompts=2))["warnings"] == []


def test_identical_pairs_are_flagged():
    pairs, prompts = make_pairs(identical=2)
    pairs.loc[0, "response_2"] = pairs.loc[0, "response_2"] + "  \n"  # equal after strip
    q = data_quality(pairs, prompts)
    assert q["identical_pairs"] == 2
    (w,) = [w for w in q["warnings"] if w["check"] == "identical_pairs"]
    assert w["value"] == 2 and "2 of them kept" in w["message"]


def test_short_responses_count_distinct_responses_once():
    pairs, prompts = make_pairs(n_prompts=4)
    # the same short completion of prompt 0 appears in both of its pairs: counted once
    pairs.loc[[0, 1], "response_1"] = "ok"
    pairs.loc[0, "chosen"] = "ok"
    q = data_quality(pairs, prompts)
    assert q["short_responses"] == 1
    assert q["short_fraction"] == pytest.approx(1 / q["responses"])
    assert not any(w["check"] == "short_fraction" for w in q["warnings"])
    pairs["response_2"] = "no"
    q = data_quality(pairs, prompts)
    assert any(w["check"] == "short_fraction" for w in q["warnings"])


def test_data_quality_with_nothing_kept():
    pairs, prompts = make_pairs(n_prompts=3)
    pairs["kept"] = False
    pairs["drop_reason"] = "judge_error"
    q = data_quality(pairs, prompts)
    assert q["kept"] == 0 and q["length_ratio"] is None and q["chosen_longer_fraction"] is None
    assert q["drops"] == {"judge_error": 6} and q["warnings"] == []


def test_similarity_histogram_bins():
    h = similarity_histogram([0.0, 0.05, 0.1, 0.55, 0.999, 1.0, float("nan")])
    assert h["0.0-0.1"] == 2 and h["0.1-0.2"] == 1 and h["0.5-0.6"] == 1 and h["0.9-1.0"] == 2
    assert sum(h.values()) == 6


# ---------------------------------------------------------------- pathologies

def test_verbosity():
    assert verbosity(["one two three", "four"]) == 2.0
    assert verbosity([]) == 0.0


def test_sycophancy():
    positive = [
        "Great question! Paris is the capital.",
        "  what a wonderful idea, let's go.",
        "Certainly! Here it is.",
        "Absolutely! Yes.",
        "Of course! The answer is 4.",
        "I'd be happy to help with that.",
        "I\u2019d be delighted to explain.",
        "Sure thing, here you go.",
        "Excellent question. Let me explain.",
        "You're absolutely right, it is 4.",
        "You're right.",
    ]
    negative = [
        "Paris is the capital of France.",
        "Certainly, the capital is Paris.",          # no exclamation: plain affirmation
        "The answer, of course! is Paris.",           # not at the start
        "That was a great question to ask, Paris.",   # not at the start
        "",
    ]
    assert sycophancy_rate(positive) == 1.0
    assert sycophancy_rate(negative) == 0.0
    assert sycophancy_rate(positive[:1] + negative[:3]) == 0.25
    assert sycophancy_rate([]) == 0.0


def test_hedging():
    positive = [
        "As an AI, I have no opinions.",
        "I cannot provide medical advice.",
        "I'm unable to browse the web.",
        "I'm not able to do that.",
        "Sadly I don't have personal experiences.",
        "It's difficult to say which is better.",
        "I'm just an AI language model.",
        "Well, it depends on many factors.",
    ]
    negative = ["Paris is the capital of France.", "The AI as an aid to doctors is useful.", "It's easy to say: 4."]
    assert hedging_rate(positive) == 1.0
    assert hedging_rate(negative) == 0.0
    assert hedging_rate([]) == 0.0


def test_repetition_and_degenerate():
    loop = "the cat the cat the cat the cat"
    plain = "Paris is the capital and largest city of France."
    assert repetition_rate([loop]) == pytest.approx(4 / 6)
    assert repetition_rate([plain]) == 0.0
    assert repetition_rate(["too short"]) == 0.0
    assert repetition_rate([loop, plain]) == pytest.approx(1 / 3)
    assert repetition_rate([loop], n=2) == pytest.approx(5 / 7)
    assert degenerate_rate([loop]) == 1.0
    assert degenerate_rate([plain]) == 0.0
    assert degenerate_rate(["the cat the cat"]) == 0.0  # under min_tokens
    assert degenerate_rate([loop, plain, plain, plain]) == 0.25
    assert degenerate_rate([loop], min_unique_ratio=0.2) == 0.0


def test_pathologies_keys():
    p = pathologies(["Great question! As an AI, the cat the cat the cat the cat.", "Paris."])
    assert set(p) == {"verbosity", "sycophancy_rate", "hedging_rate", "repetition_rate", "degenerate_rate", "shared_tail_rate", "shared_tail"}
    assert p["sycophancy_rate"] == 0.5 and p["hedging_rate"] == 0.5
    assert p["shared_tail_rate"] == 0.0 and p["shared_tail"] == ""
    assert all(0.0 <= v <= 1.0 for k, v in p.items() if k not in ("verbosity", "shared_tail"))


TIC = "Your answer is correct, but I'll make sure to provide a more detailed explanation of the steps"
ANSWERS = [f"The sum of {a} and {b} is {a + b}." for a, b in zip(range(3, 15), range(20, 32))] + [
    "Paris is the capital of France and its largest city.", "Water boils at one hundred degrees at sea level.",
    "A haiku has three lines of five, seven and five syllables.", "Photosynthesis turns light into chemical energy."]


def test_a_tail_that_a_quarter_of_the_answers_share_is_found_with_its_text():
    """The issue's case: a lenient judge taught the policy to follow a correct answer with the same filler."""
    assert shared_tail(ANSWERS) == (0.0, "")  # answers to different prompts: nothing shared beyond chance
    tics = [f"{a + b}. {TIC}"[: 60 + 7 * i] for i, (a, b) in enumerate(zip(range(3, 7), range(20, 24)))]  # cut where the budget ran out
    share, text = shared_tail(ANSWERS[:12] + tics)
    assert share == pytest.approx(4 / 16) and text in TIC.lower().replace(",", "").replace("'", "")
    assert shared_tail([TIC * 3]) == (0.0, "")  # one text repeating itself is repetition_rate's, not a shared tail
    assert shared_tail(["too short", "too short"]) == (0.0, "")  # under n words: no tail


@given(st.lists(st.text(alphabet="abc ", max_size=60), max_size=12))
def test_shared_tail_is_a_share_of_the_texts(texts):
    share, text = shared_tail(texts)
    assert 0.0 <= share <= 1.0 and (share == 0.0) == (text == "")
    assert share == 0.0 or share * len(texts) >= 2 - 1e-9
    assert shared_tail(texts + texts)[0] >= share  # doubling the texts never hides a tail


def test_the_trend_names_the_shared_tail():
    history = [flat(shared_tail_rate=0.0), flat(shared_tail_rate=0.25, shared_tail="is correct but i'll make")]
    (w,) = pathology_trend(history)
    assert w["check"] == "shared_tail_rate" and w["round"] == 1 and w["threshold"] == pytest.approx(0.15)
    assert "the shared text \"is correct but i'll make\"" in w["message"] and "judge" in w["message"]


def flat(**overrides):
    base = {"verbosity": 40.0, "sycophancy_rate": 0.05, "hedging_rate": 0.1, "repetition_rate": 0.02, "degenerate_rate": 0.0}
    return {**base, **overrides}


def test_trend_quiet_on_flat_history():
    assert pathology_trend([flat(), flat(verbosity=45.0), flat(sycophancy_rate=0.15, repetition_rate=0.1)]) == []
    assert pathology_trend([flat()]) == []
    assert pathology_trend([]) == []


def test_trend_warns_on_planted_growth():
    history = [flat(), flat(verbosity=70.0), flat(verbosity=90.0, sycophancy_rate=0.3, hedging_rate=0.3,
                                                 repetition_rate=0.2, degenerate_rate=0.15)]
    warnings = pathology_trend(history)
    assert {(w["round"], w["check"]) for w in warnings} == {
        (1, "verbosity"), (2, "verbosity"), (2, "sycophancy_rate"), (2, "hedging_rate"),
        (2, "repetition_rate"), (2, "degenerate_rate"),
    }
    for w in warnings:
        assert WARNING_KEYS <= set(w) and w["value"] > w["threshold"]
    (v1,) = [w for w in warnings if w["round"] == 1]
    assert v1["threshold"] == pytest.approx(60.0) and "verbosity" in v1["message"]


def test_trend_skips_missing_values():
    assert pathology_trend([{"verbosity": 0.0}, {"verbosity": 50.0, "hedging_rate": 0.9}]) == []
