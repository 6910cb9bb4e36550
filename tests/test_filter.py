"""Fast tier: the filter stage's pure logic (selfplay/pairs/build.py) and the sampler's truncation flags (selfplay/generation/local.py).

similarity / screen decide which pairs are worth a judge call; select_pairs / drop_counts decide which judged pairs
are kept and why the rest were dropped. completion_lengths produces the `truncated` flag the screen reads.
"""

from __future__ import annotations

import io
import math
import random
import string

import pandas as pd
import pytest

from selfplay.config.run import FilterConfig
from selfplay.generation.decoding import completion_lengths
from selfplay.pairs.build import REASONS, drop_reason, screen, similarity
from selfplay.pairs.selection import drop_counts, select_pairs

pytestmark = pytest.mark.unit


def random_text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(string.ascii_letters + " .,") for _ in range(n))


# ---------------------------------------------------------------- similarity

def test_identical_texts_are_fully_similar():
    rng = random.Random(0)
    for _ in range(200):
        text = random_text(rng, rng.randint(1, 80))
        assert similarity(text, text) == 1.0


def test_similarity_is_symmetric_and_bounded():
    rng = random.Random(1)
    for _ in range(300):
        a, b = random_text(rng, rng.randint(0, 60)), random_text(rng, rng.randint(0, 60))
        s = similarity(a, b)
        assert 0.0 <= s <= 1.0
        assert s == similarity(b, a)
    assert similarity("", "xyz") == 0.0
    assert similarity("abc", "xyz") == 0.0


def test_pair_exactly_at_max_similarity_is_dropped_just_below_is_kept():
    a, b = "abcdefghij", "abcdefghiX"  # 18 of 20 characters match: ratio 0.9
    assert similarity(a, b) == 0.9
    assert screen(a, b, False, False, FilterConfig(max_similarity=0.9)) == "too_similar"
    assert screen(a, b, False, False, FilterConfig(max_similarity=math.nextafter(0.9, 1.0))) is None
    assert screen(a, b, False, False, FilterConfig(max_similarity=0.95)) is None
    assert screen(a, b, False, False, FilterConfig(max_similarity=0.85)) == "too_similar"


def test_similarity_threshold_boundary_property():
    rng = random.Random(2)
    for _ in range(300):
        a = random_text(rng, rng.randint(5, 40)) + "x"
        b = random_text(rng, rng.randint(5, 40)) + "y"
        s = similarity(a, b)
        assert screen(a, b, False, False, FilterConfig(max_similarity=s)) == "too_similar"
        if s < 1.0:
            assert screen(a, b, False, False, FilterConfig(max_similarity=math.nextafter(s, 2.0))) is None


def test_max_similarity_one_drops_only_identical_pairs():
    cfg = FilterConfig(max_similarity=1.0)
    assert screen("same text", "same text", False, False, cfg) == "too_similar"
    assert screen("same text", "same text!", False, False, cfg) is None


# ---------------------------------------------------------------- screen

def test_screen_reasons_are_checked_in_order_empty_truncated_too_similar():
    cfg = FilterConfig()
    assert screen("", "", True, True, cfg) == "empty"          # empty + truncated + identical
    assert screen("  \n ", "  \n ", True, False, cfg) == "empty"
    assert screen("same", "same", True, False, cfg) == "truncated"  # truncated + identical
    assert screen("same", "same", False, True, cfg) == "truncated"
    assert screen("same", "same", False, False, cfg) == "too_similar"
    assert screen("one answer", "a different reply", False, False, cfg) is None


def test_min_chars_counts_stripped_characters():
    cfg = FilterConfig(min_chars=5)
    assert screen("  abcd  ", "a long enough answer", False, False, cfg) == "empty"
    assert screen("abcde", "a long enough answer", False, False, cfg) is None
    assert screen("a long enough answer", "abc", False, False, cfg) == "empty"
    # min_chars=0 still treats an empty response as empty
    assert screen("", "a long enough answer", False, False, FilterConfig(min_chars=0)) == "empty"


def test_drop_truncated_false_keeps_truncated_pairs():
    cfg = FilterConfig(drop_truncated=False)
    for t1, t2 in [(True, False), (False, True), (True, True)]:
        assert screen("one answer", "a different reply", t1, t2, cfg) is None
        assert screen("one answer", "a different reply", t1, t2, FilterConfig()) == "truncated"
    assert screen("same", "same", True, True, cfg) == "too_similar"  # the other checks still apply


# ---------------------------------------------------------------- select_pairs / drop_counts

def judged(rows: list[tuple[str | None, str]]) -> pd.DataFrame:
    """A judgments-shaped table from (screened, verdict) rows; responses name their index."""
    return pd.DataFrame([
        {"prompt": f"q{n}", "response_1": f"r1-{n}", "response_2": f"r2-{n}", "screened": s, "verdict": v}
        for n, (s, v) in enumerate(rows)
    ])


def test_select_pairs_orients_chosen_and_rejected_by_the_verdict():
    out = select_pairs(judged([(None, "first"), (None, "second")]))
    assert out["kept"].tolist() == [True, True]
    assert out["drop_reason"].isna().all()
    assert out["chosen"].tolist() == ["r1-0", "r2-1"]
    assert out["rejected"].tolist() == ["r2-0", "r1-1"]


def test_select_pairs_drops_every_non_winner_with_its_reason():
    rows = [("empty", "not_judged"), ("truncated", "not_judged"), ("too_similar", "not_judged"),
            (None, "judge_error"), (None, "tie"), (None, "inconsistent"), (None, "first")]
    out = select_pairs(judged(rows))
    assert out["drop_reason"].tolist()[:6] == ["empty", "truncated", "too_similar", "judge_error", "tie", "inconsistent"]
    assert out["kept"].tolist() == [False] * 6 + [True]
    assert out["chosen"].iloc[:6].isna().all() and out["rejected"].iloc[:6].isna().all()
    assert (out["chosen"].iloc[6], out["rejected"].iloc[6]) == ("r1-6", "r2-6")


def test_a_pair_never_judged_is_never_kept():
    assert drop_reason(None, "not_judged") == "judge_error"
    assert drop_reason(None, "something_new") == "judge_error"


def test_drop_counts_covers_every_reason():
    rng = random.Random(3)
    rows = [rng.choice([("empty", "not_judged"), ("truncated", "not_judged"), ("too_similar", "not_judged"),
                        (None, "judge_error"), (None, "tie"), (None, "inconsistent"), (None, "first"), (None, "second")])
            for _ in range(200)]
    out = select_pairs(judged(rows))
    counts = drop_counts(out)
    assert tuple(counts) == REASONS
    assert sum(counts.values()) + int(out["kept"].sum()) == len(rows)
    for reason in REASONS:
        assert counts[reason] == sum(1 for s, v in rows if (s or v) == reason)
    assert drop_counts(select_pairs(judged([(None, "first")]))) == {r: 0 for r in REASONS}


def test_ties_stay_dropped_when_screen_reasons_read_back_as_nan():
    """pandas stores a str/None column as strings with NaN, and parquet reads it back so: NaN means 'not screened'."""
    table = judged([("empty", "not_judged"), (None, "tie"), (None, "first"), (None, "judge_error")])
    buf = io.BytesIO()
    table.to_parquet(buf, index=False)
    buf.seek(0)
    for frame in (table, pd.read_parquet(buf)):
        out = select_pairs(frame)
        assert out["drop_reason"].tolist()[:2] == ["empty", "tie"]
        assert pd.isna(out["drop_reason"].iloc[2]) and out["drop_reason"].iloc[3] == "judge_error"
        assert out["kept"].tolist() == [False, False, True, False]
    assert drop_reason(float("nan"), "tie") == "tie"
    assert drop_reason(float("nan"), "first") is None


# ---------------------------------------------------------------- completion_lengths (sample stage)

def test_completion_lengths_stop_at_the_first_stop_token():
    rows = [[5, 6, 2, 0, 0], [5, 6, 7], [2, 9, 9], [], [4, 3, 1, 3]]
    assert completion_lengths(rows, stop_ids={2, 3}) == [(2, False), (3, True), (0, False), (0, True), (1, False)]


def test_completion_lengths_property():
    rng = random.Random(4)
    stop = {0, 1}
    for _ in range(300):
        row = [rng.randint(0, 20) for _ in range(rng.randint(0, 30))]
        [(n, truncated)] = completion_lengths([row], stop)
        assert truncated == (not any(t in stop for t in row))
        assert 0 <= n <= len(row)
        assert not any(t in stop for t in row[:n])
        if not truncated:
            assert row[n] in stop
        else:
            assert n == len(row)
