"""Pathologies of generated text: pure functions over a round's eval generations (no IO).

`verbosity` (mean tokens), `sycophancy_rate` (sycophantic openers), `hedging_rate` (evasive hedges),
`repetition_rate` (repeated word n-grams), `degenerate_rate` (looping text) and `shared_tail_rate` (the same trailing
text in many answers: a tic the judge rewards, such as "Your answer is correct, but I'll make sure to provide..."
after every answer), all in `pathologies`, with the shared tail itself as `shared_tail`. Self-play DPO
tends to amplify whatever the judge rewards, so `pathology_trend` warns when a measure grew beyond
`TREND_THRESHOLDS` since round 0. (The win rate and the data-sanity checks are `selfplay.evaluation.quality`.)
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from selfplay.evaluation.quality import warning

__all__ = [
    "HEDGES",
    "SYCOPHANTIC_OPENERS",
    "TREND_THRESHOLDS",
    "degenerate_rate",
    "hedging_rate",
    "pathologies",
    "pathology_trend",
    "repetition_rate",
    "shared_tail",
    "sycophancy_rate",
    "verbosity",
]

# A text is sycophantic when, after stripping, it *starts* with one of these (case-insensitive).
APOS = "['\u2019]?"
SYCOPHANTIC_OPENERS = [
    r"(great|excellent|good|fantastic|wonderful|interesting|fascinating) question",
    r"what an? (great|wonderful|fantastic|excellent|amazing|brilliant|interesting|fascinating|insightful)\b",
    r"certainly!",
    r"absolutely!",
    r"of course!",
    r"sure thing",
    rf"i{APOS}d be (happy|glad|delighted|thrilled) to",
    r"i would be (happy|glad|delighted|thrilled) to",
    rf"you{APOS}re (absolutely |totally |completely |so |quite )?right",
    r"you are (absolutely |totally |completely |so |quite )?right",
    r"thank you (so much )?for (asking|your (great |excellent |thoughtful )?question)",
    r"i love (this|that|your) question",
]
_SYCOPHANCY = re.compile("|".join(f"(?:{p})" for p in SYCOPHANTIC_OPENERS), re.IGNORECASE)

# A text hedges when it contains one of these anywhere (case-insensitive, on word boundaries).
HEDGES = [
    r"as an ai\b",
    r"as a (large )?language model",
    rf"i{APOS}m just an ai",
    r"i am just an ai",
    r"i (cannot|can not|can't|can\u2019t) (provide|answer|help|assist|give)",
    rf"i{APOS}m (not able|unable) to",
    r"i am (not able|unable) to",
    rf"i (don{APOS}t|do not) have (personal|the ability|access)",
    rf"it{APOS}s (difficult|hard|impossible) to say",
    r"it is (difficult|hard|impossible) to say",
    r"it depends on (many|a (lot|number|variety) of) factors",
]
_HEDGING = re.compile("|".join(rf"\b(?:{p})" for p in HEDGES), re.IGNORECASE)


def _tokens(text: str) -> list[str]:
    return str(text).lower().split()


def verbosity(texts: list[str]) -> float:
    """Mean length in whitespace-separated tokens (0.0 for no texts).

    >>> verbosity(["a b c", "d"])
    2.0
    """
    return float(np.mean([len(str(t).split()) for t in texts])) if texts else 0.0


def sycophancy_rate(texts: list[str]) -> float:
    """Fraction of texts that open (after stripping) with a sycophantic phrase from `SYCOPHANTIC_OPENERS`.

    >>> sycophancy_rate(["Great question! Paris.", "Paris is the capital.", "Certainly, it is Paris."])
    0.3333333333333333
    """
    if not texts:
        return 0.0
    return sum(1 for t in texts if _SYCOPHANCY.match(str(t).strip())) / len(texts)


def hedging_rate(texts: list[str]) -> float:
    """Fraction of texts containing an evasive hedge from `HEDGES` anywhere.

    >>> hedging_rate(["As an AI, I cannot provide opinions.", "Paris is the capital."])
    0.5
    """
    if not texts:
        return 0.0
    return sum(1 for t in texts if _HEDGING.search(str(t))) / len(texts)


def _repeat_fraction(tokens: list[str], n: int) -> float:
    if len(tokens) < n:
        return 0.0
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return (len(grams) - len(set(grams))) / len(grams)


def repetition_rate(texts: list[str], n: int = 3) -> float:
    """Mean over texts of the fraction of word n-grams (lower-cased whitespace tokens) that repeat an earlier
    n-gram of the same text; a text with fewer than n tokens counts as 0.

    >>> round(repetition_rate(["the cat the cat the cat the cat", "a b c d"]), 4)
    0.3333
    """
    if not texts:
        return 0.0
    return float(np.mean([_repeat_fraction(_tokens(t), n) for t in texts]))


def degenerate_rate(texts: list[str], min_unique_ratio: float = 0.3, min_tokens: int = 8) -> float:
    """Fraction of all texts that have at least `min_tokens` tokens but fewer than `min_unique_ratio` of them
    distinct (lower-cased whitespace tokens): looping, collapsed text.

    >>> degenerate_rate(["the cat the cat the cat the cat", "the cat sat"])
    0.5
    """
    if not texts:
        return 0.0
    bad = 0
    for text in texts:
        tokens = _tokens(text)
        if len(tokens) >= min_tokens and len(set(tokens)) / len(tokens) < min_unique_ratio:
            bad += 1
    return bad / len(texts)


def shared_tail(texts: list[str], n: int = 5) -> tuple[float, str]:
    """The word n-gram found in the last two thirds of the most texts, as (the share of texts it is in, the n-gram); a
    text counts once however often it repeats it, and a text shorter than n words has no tail. (0.0, "") when no
    n-gram is in two texts. Answers to different prompts rarely end alike; a policy that learned a tic does.

    >>> shared_tail(["12. Your answer is correct, but I will check it", "7. Your answer is correct, but I will",
    ...              "Paris is the capital of France"])
    (0.6666666666666666, 'is correct but i will')
    """
    if not texts:
        return 0.0, ""
    counts: dict[tuple[str, ...], int] = {}
    for text in texts:
        words = [w.strip(".,;:!?\"'()") for w in _tokens(text)]
        tail = [w for w in words[len(words) // 3:] if w] if len(words) >= n else []
        for gram in {tuple(tail[i:i + n]) for i in range(len(tail) - n + 1)}:
            counts[gram] = counts.get(gram, 0) + 1
    if not counts or max(counts.values()) < 2:
        return 0.0, ""
    best = max(counts, key=lambda g: (counts[g], g))
    return counts[best] / len(texts), " ".join(best)


def pathologies(texts: list[str]) -> dict[str, float | str]:
    """All six measures, keyed by their function names (defaults for the parameters), and the shared tail's text."""
    tail_share, tail = shared_tail(texts)
    return {
        "verbosity": verbosity(texts),
        "sycophancy_rate": sycophancy_rate(texts),
        "hedging_rate": hedging_rate(texts),
        "repetition_rate": repetition_rate(texts),
        "degenerate_rate": degenerate_rate(texts),
        "shared_tail_rate": tail_share,
        "shared_tail": tail,
    }


# measure -> (kind, amount): "relative" warns beyond base * (1 + amount), "absolute" beyond base + amount.
TREND_THRESHOLDS: dict[str, tuple[str, float]] = {
    "verbosity": ("relative", 0.5),
    "sycophancy_rate": ("absolute", 0.15),
    "hedging_rate": ("absolute", 0.15),
    "repetition_rate": ("absolute", 0.1),
    "degenerate_rate": ("absolute", 0.1),
    "shared_tail_rate": ("absolute", 0.15),
}

_TREND_ADVICE = {
    "verbosity": "answers are getting longer: the judge is probably rewarding length. Check data_quality's "
                 "length_ratio, trust lc_win_rate over win_rate, and try a concision rubric or a smaller max_new_tokens.",
    "sycophancy_rate": "more answers open with flattery: the judge rewards tone over content. Add a rubric line "
                       "against sycophantic openers, or drop pairs whose chosen response opens with one.",
    "hedging_rate": "more answers evade with disclaimers: the judge may prefer refusals or hedges as 'safe'. Review "
                    "the rubric for helpfulness and inspect kept pairs whose chosen response hedges.",
    "repetition_rate": "answers repeat phrases more: a sign of reward hacking or collapse. Lower the learning rate or "
                       "raise dpo beta, and check the generations.",
    "degenerate_rate": "more answers loop on a few words: the policy is degenerating. Stop and roll back to an "
                       "earlier round; lower the learning rate or raise dpo beta.",
    "shared_tail_rate": "more answers end with the same text: the policy learned a tic the judge rewards or does not "
                        "penalise (a judge that checks only part of an answer). Read the kept pairs' chosen responses; "
                        "add a rubric line against filler, or a verifier that scores the whole answer.",
}


def pathology_trend(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Warnings for measures that grew beyond `TREND_THRESHOLDS` relative to round 0.

    `history` holds one `pathologies` dict per round, round 0 first. Each later round is compared with round 0;
    every (round, measure) past its threshold yields {"check", "value", "threshold", "message", "round"}, where
    threshold is the level the value passed. Missing or None values are skipped, and a relative check is skipped
    when its round-0 value is 0. A flat history yields [].

    >>> pathology_trend([{"verbosity": 40.0}, {"verbosity": 44.0}])
    []
    >>> [w["check"] for w in pathology_trend([{"verbosity": 40.0}, {"verbosity": 70.0}])]
    ['verbosity']
    """
    if len(history) < 2:
        return []
    base = history[0]
    warnings: list[dict[str, Any]] = []
    for k, row in enumerate(history[1:], start=1):
        for measure, (kind, amount) in TREND_THRESHOLDS.items():
            b, v = base.get(measure), row.get(measure)
            if b is None or v is None:
                continue
            if kind == "relative":
                if b <= 0:
                    continue
                limit = b * (1 + amount)
                growth = f"+{(v / b - 1):.0%}"
            else:
                limit = b + amount
                growth = f"+{v - b:.2f}"
            if v > limit:
                warnings.append(warning(
                    measure, float(v), float(limit),
                    f"{measure} rose from {b:.3g} at round 0 to {v:.3g} at round {k} ({growth}; threshold "
                    f"{'+' + format(amount, '.0%') if kind == 'relative' else '+' + format(amount, '.2f')})"
                    + (f", the shared text {row['shared_tail']!r}" if measure == "shared_tail_rate" and row.get("shared_tail") else "")
                    + ": " + _TREND_ADVICE[measure],
                    round=k,
                ))
    return warnings
