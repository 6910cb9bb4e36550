"""The judge audit's statistics (selfplay/evaluation/audit.py) on judges of known quality, simulated at the level of
their answers per order (combined by the project's own rule, `combine_orders`), and their properties."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from selfplay.evaluation.audit import audit_line, audit_stats, pick_audit, score
from selfplay.judging.calls import JudgeResult
from selfplay.judging.verdicts import combine_orders

pytestmark = pytest.mark.unit


def comparisons(n: int, seed: int = 0) -> list[tuple[str, int, int]]:
    """(the verifier's winner, len of response_a, len of response_b); the winner is the longer one half the time."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        truth = rng.choice(["first", "second"])
        short, long_ = rng.randint(5, 40), rng.randint(41, 120)
        winner_long = rng.random() < 0.5
        a_len, b_len = (long_, short) if (truth == "first") == winner_long else (short, long_)
        out.append((truth, a_len, b_len))
    return out


def label(a_wins: bool) -> JudgeResult:
    return JudgeResult(1.0 if a_wins else 0.0, "text", label="A" if a_wins else "B")


def audit(judge, n: int = 200, seed: int = 0) -> dict:
    """`judge(first_is_right, len_in_position_a, len_in_position_b, rng)` -> the JudgeResult of one order."""
    rng = random.Random(seed + 1)
    cases = comparisons(n, seed)
    rows = []
    for truth, a, b in cases:
        order1 = judge(truth == "first", a, b, rng)  # response_a in position A
        order2 = judge(truth == "second", b, a, rng)  # response_b in position A
        rows.append(combine_orders(order1, order2, margin=0.0))
    return audit_stats([c[0] for c in cases], rows, [c[1] for c in cases], [c[2] for c in cases])


def test_a_checking_judge_agrees_and_is_informative():
    stats = audit(lambda a_right, la, lb, rng: label(a_right))
    assert stats["agreement"] == 1.0 and stats["informative"] and stats["ci"][0] > 0.95
    assert stats["position_consistency"] == 1.0 and stats["tie_rate"] == 0.0
    assert "informative (better than chance)" in audit_line(stats)


def test_a_judge_that_always_answers_a_is_at_chance_and_inconsistent():
    stats = audit(lambda a_right, la, lb, rng: label(True))
    assert stats["agreement"] == 0.5 and not stats["informative"] and stats["ci"][0] < 0.5 < stats["ci"][1]
    assert stats["position_consistency"] == 0.0 and stats["inconsistent_rate"] == 1.0
    assert "not better than chance" in audit_line(stats) and "position consistency 0.00" in audit_line(stats)
    # the same bias through label probabilities: cancelled to ties
    probs = audit(lambda a_right, la, lb, rng: JudgeResult(0.9, "logprobs"))
    assert probs["agreement"] == 0.5 and probs["tie_rate"] == 1.0 and not probs["informative"]


def test_a_random_judge_is_at_chance():
    stats = audit(lambda a_right, la, lb, rng: label(rng.random() < 0.5), n=400)
    assert abs(stats["agreement"] - 0.5) < 0.08 and not stats["informative"]


def test_a_judge_that_prefers_the_longer_response_is_caught_by_the_split():
    stats = audit(lambda a_right, la, lb, rng: label(la > lb))
    assert stats["longer_right"]["agreement"] == 1.0 and stats["shorter_right"]["agreement"] == 0.0
    assert stats["longer_right"]["n"] + stats["shorter_right"]["n"] == stats["answered"] == 200
    assert abs(stats["agreement"] - 0.5) < 0.1  # overall it looks like chance: the split is what shows it
    line = audit_line(stats)
    assert "1.00 when the longer response is right" in line and "0.00 when the shorter response is right" in line


def test_unreadable_verdicts_are_left_out_and_counted():
    rows = [{"verdict": "invalid", "consistent": None}, {"verdict": "first", "consistent": True}]
    stats = audit_stats(["first", "first"], rows, [3, 3], [1, 1])
    assert (stats["comparisons"], stats["answered"], stats["unanswered"], stats["agreement"]) == (2, 1, 1, 1.0)
    none = audit_stats(["first"], [{"verdict": "judge_error", "consistent": None}], [1], [2])
    assert none["agreement"] is None and none["informative"] is None and "could not be checked" in audit_line(none)
    assert "no ground truth" in audit_line(audit_stats([], [], [], []))


VERDICTS = st.sampled_from(["first", "second", "tie", "inconsistent", "invalid", "judge_error"])


@given(st.lists(st.tuples(st.sampled_from(["first", "second"]), VERDICTS, st.integers(0, 50), st.integers(0, 50)), max_size=60),
       st.randoms(use_true_random=False))
def test_audit_properties(cases, rng):
    truth, verdicts, la, lb = (list(x) for x in zip(*cases)) if cases else ([], [], [], [])
    rows = [{"verdict": v, "consistent": None if v in ("invalid", "judge_error") else v != "inconsistent"} for v in verdicts]
    stats = audit_stats(truth, rows, la, lb)
    assert stats["answered"] + stats["unanswered"] == stats["comparisons"] == len(cases)
    assert stats["longer_right"]["n"] + stats["shorter_right"]["n"] <= stats["answered"]
    if stats["answered"]:
        lo, hi = stats["ci"]
        assert 0.0 <= lo <= stats["agreement"] <= hi <= 1.0
        assert stats["informative"] == (lo > 0.5)
    order = list(range(len(cases)))
    rng.shuffle(order)
    shuffled = audit_stats([truth[i] for i in order], [rows[i] for i in order], [la[i] for i in order], [lb[i] for i in order])
    assert shuffled["agreement"] == pytest.approx(stats["agreement"]) if stats["agreement"] is not None else shuffled["agreement"] is None
    swapped = audit_stats(["second" if t == "first" else "first" for t in truth],
                          [{**r, "verdict": {"first": "second", "second": "first"}.get(r["verdict"], r["verdict"])} for r in rows], lb, la)
    assert swapped["agreement"] == pytest.approx(stats["agreement"]) if stats["agreement"] is not None else True  # names, not positions


@given(st.integers(0, 50), st.floats(0, 60, allow_nan=False), st.integers(0, 9))
def test_pick_audit_properties(n, size, seed):
    picked = pick_audit(n, size, seed)
    assert picked == sorted(set(picked)) and all(0 <= i < n for i in picked)
    assert picked == pick_audit(n, size, seed)
    if n and size >= 1:
        assert len(picked) == min(n, int(size))
    elif n and size > 0:
        assert len(picked) == max(1, round(size * n))
    else:
        assert picked == []


def test_scores():
    assert [score("second", v) for v in ("second", "first", "tie", "inconsistent", "judge_error")] == [1.0, 0.0, 0.5, 0.5, None]
