"""Round quality: did a self-play round help, and is its data sane? Pure functions (numpy/pandas only, no IO).

Win rate with an interval (`wilson_interval`, `win_summary`)
    The evaluate stage pits the new checkpoint against the previous one. Its win rate counts a tie as half a win,
    win_rate = (wins + ties / 2) / n, where n counts only "win" / "tie" / "loss" outcomes (judge errors are left
    out). `ci_low` / `ci_high` are the 95% Wilson score interval of that rate, with the half-counted ties as
    fractional successes: with 16 eval prompts a 0.6 win rate has an interval of about (0.39, 0.78), so one round's
    rate alone rarely proves anything; an interval that excludes 0.5 does.

Length-controlled win rate (`lc_win_rate`)
    Judges prefer longer answers, and DPO on their verdicts teaches the policy to be longer, so a rising raw win
    rate can be nothing but length. The length-controlled rate asks: what would the win rate be if both models
    answered at the same length? Per pair, with diff = len_new - len_other (tokens or characters, whatever the
    caller passes), the normalised difference is

        d = tanh(diff / s),   s = the (population) standard deviation of the diffs, or 1 when that is 0,

    so d lies in (-1, 1) and an outlier pair cannot dominate. The verdict y (win = 1, tie = 0.5, loss = 0) is
    regressed on d by logistic regression with fractional targets,

        P(win | d) = sigmoid(a + b * d),

    fitted by Newton's method (IRLS) on the cross-entropy with a tiny L2 penalty (`LC_L2` / 2) * b**2 on the slope
    only, which keeps b finite when length separates the outcomes perfectly and pins b to 0 when every d is 0.
    lc_win_rate = sigmoid(a), the predicted win rate at zero length difference. With all differences zero the fit
    is the intercept alone and lc_win_rate equals the plain win rate; with no relation between length and verdict
    lc_win_rate is close to it; when the new model wins only by being longer it falls well below it. (This is the
    idea of AlpacaEval's length-controlled win rate, reduced to the one length term.) Limits: one smooth logistic
    term cannot follow a sharp step, so when outcomes flip abruptly at zero difference and most pairs lie on one
    side, the estimate leans a little toward the majority side; when every pair has the same difference the length
    effect is unidentifiable and the penalty returns the plain rate; with all verdicts equal it returns that rate.

Data sanity (`data_quality`, `QualityThresholds`)
    Over the filter stage's pairs table (`selfplay.pairs.selection.select_pairs`) and the round's drawn prompts:
    length_ratio and chosen_longer_fraction (is the judge just picking the longer answer?), duplicate_prompts
    (is the prompt sampler drawing the same prompt twice?), identical_pairs (is sampling collapsing to one answer?),
    the similarity histogram, short responses and drop counts. Each check passed beyond its threshold yields a
    warning {"check", "value", "threshold", "message"}, the message saying what it means and what to try;
    clean data yields none.

Pathologies of generated text (verbosity, sycophancy, hedging, repetition, degenerate text) are `selfplay.evaluation.pathologies`.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from selfplay.inputs.tables import present

__all__ = [
    "LC_L2",
    "QualityThresholds",
    "accuracy_change",
    "data_quality",
    "length_controlled_win_rate",
    "similarity_histogram",
    "wilson_interval",
    "win_summary",
]

Z95 = 1.959964
VERDICT_VALUE = {"win": 1.0, "tie": 0.5, "loss": 0.0}
LC_L2 = 1e-2  # L2 penalty on the length slope of the length-controlled fit (on a sum over pairs, not a mean)


def warning(check: str, value: Any, threshold: Any, message: str, **extra: Any) -> dict[str, Any]:
    """One warning as every report shows it: what was checked, its value, the threshold passed, what to try."""
    return {"check": check, "value": value, "threshold": threshold, "message": message, **extra}


# ---------------------------------------------------------------- win rate

def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval (95% for the default z) of a success rate successes / n.

    `successes` may be fractional (a tie counted as half a win); n = 0 gives the uninformative (0.0, 1.0).

    >>> [round(x, 4) for x in wilson_interval(8, 10)]
    [0.4902, 0.9433]
    >>> wilson_interval(0, 0)
    (0.0, 1.0)
    """
    if n <= 0:
        return (0.0, 1.0)
    if not 0 <= successes <= n:
        raise ValueError(f"successes must lie in [0, n]; got {successes} of {n}")
    p = successes / n
    z2 = z * z
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(max(p * (1 - p) / n + z2 / (4 * n * n), 0.0))
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return (low, high)


def length_controlled_win_rate(y: list[float] | np.ndarray, diffs: list[float] | np.ndarray, l2: float = LC_L2, iterations: int = 100) -> float | None:
    """The win rate at zero length difference: sigmoid(a) of the fit y ~ sigmoid(a + b * tanh(diff / s)).

    y holds fractional verdicts (1 win, 0.5 tie, 0 loss), diffs the length differences new - other; s is the
    standard deviation of the diffs (1 when that is 0). Newton/IRLS with an L2 penalty `l2` on b only (see the
    module docstring). None when there are no pairs.

    >>> length_controlled_win_rate([1, 1, 0.5, 0], [0, 0, 0, 0])     # no length difference: the plain rate
    0.625
    """
    y = np.asarray(y, dtype=float)
    diffs = np.asarray(diffs, dtype=float)
    if y.shape != diffs.shape:
        raise ValueError(f"y and diffs differ in length: {y.shape} vs {diffs.shape}")
    if y.size == 0:
        return None
    mean = float(y.mean())
    if mean <= 0.0 or mean >= 1.0:  # every verdict the same: nothing to attribute to length, and a is infinite
        return mean
    s = float(diffs.std())
    d = np.tanh(diffs / (s if s > 0 else 1.0))
    X = np.column_stack([np.ones_like(d), d])
    penalty = np.array([0.0, l2])

    def loss(beta: np.ndarray) -> float:
        eta = X @ beta
        # cross-entropy with fractional targets: log(1 + e^eta) - y * eta, computed stably
        return float(np.sum(np.logaddexp(0.0, eta) - y * eta) + 0.5 * l2 * beta[1] ** 2)

    beta = np.array([math.log(mean / (1 - mean)), 0.0])
    current = loss(beta)
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(X @ beta)))
        grad = X.T @ (p - y) + penalty * beta
        hess = (X * (p * (1 - p))[:, None]).T @ X + np.diag(penalty) + 1e-12 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        t = 1.0
        while t > 1e-8:  # backtracking: Newton with a guaranteed decrease
            candidate = beta - t * step
            new = loss(candidate)
            if new <= current:
                break
            t /= 2
        else:
            break
        beta, improvement, current = candidate, current - new, new
        if improvement < 1e-12 and float(np.max(np.abs(t * step))) < 1e-10:
            break
    return float(1.0 / (1.0 + math.exp(-beta[0])))


def win_summary(outcomes: list[str], len_new: list[int], len_other: list[int]) -> dict[str, Any]:
    """Counts, win rate, its Wilson interval and the length-controlled win rate of the new model.

    outcomes are the new model's results per eval prompt, "win" / "tie" / "loss"; anything else ("error") is
    left out of n, and its lengths out of the means and the length fit. len_new / len_other are the two models'
    response lengths on the same prompts. Rates and means are None when n is 0.

    >>> s = win_summary(["win", "win", "tie", "loss", "error"], [10, 10, 10, 10, 10], [10, 10, 10, 10, 99])
    >>> s["n"], s["win_rate"], s["lc_win_rate"], s["mean_len_other"]
    (4, 0.625, 0.625, 10.0)
    """
    if not len(outcomes) == len(len_new) == len(len_other):
        raise ValueError(f"outcomes, len_new and len_other differ in length: {len(outcomes)}, {len(len_new)}, {len(len_other)}")
    rows = [(VERDICT_VALUE[o], float(a), float(b)) for o, a, b in zip(outcomes, len_new, len_other) if o in VERDICT_VALUE]
    counted = [o for o in outcomes if o in VERDICT_VALUE]
    wins, ties, losses, n = counted.count("win"), counted.count("tie"), counted.count("loss"), len(counted)
    score = wins + ties / 2
    low, high = wilson_interval(score, n)
    y = np.array([r[0] for r in rows])
    new = np.array([r[1] for r in rows])
    other = np.array([r[2] for r in rows])
    return {
        "n": n,
        "wins": wins,
        "ties": ties,
        "losses": losses,
        "win_rate": score / n if n else None,
        "ci_low": low,
        "ci_high": high,
        "lc_win_rate": length_controlled_win_rate(y, new - other),
        "mean_len_new": float(new.mean()) if n else None,
        "mean_len_other": float(other.mean()) if n else None,
    }


# ---------------------------------------------------------------- data sanity

@dataclass(frozen=True)
class QualityThresholds:
    """Where `data_quality` starts warning; a warning needs the value to be strictly beyond its threshold.

    max_length_ratio            mean len(chosen) / len(rejected) over kept pairs
    max_chosen_longer_fraction  fraction of kept pairs whose chosen response is the longer one
    max_duplicate_prompts       distinct prompt texts drawn more than once in the round
    max_identical_pairs         pairs whose two responses are the same text (after strip)
    short_chars                 a response with fewer stripped characters than this is "short"
    max_short_fraction          fraction of distinct responses that are short
    """

    max_length_ratio: float = 1.5
    max_chosen_longer_fraction: float = 0.75
    max_duplicate_prompts: int = 0
    max_identical_pairs: int = 0
    short_chars: int = 5
    max_short_fraction: float = 0.2


def _norm_prompt(text: str) -> str:
    return " ".join(str(text).split()).casefold()


def _text(value: Any) -> str:
    return "" if present(value) is None else str(value)


def similarity_histogram(values: list[float] | pd.Series, bins: int = 10) -> dict[str, int]:
    """Counts of similarities in `bins` equal bins over [0, 1], keyed "0.0-0.1" ...; 1.0 falls in the last bin,
    values outside [0, 1] are clipped into it, missing values are skipped.

    >>> similarity_histogram([0.05, 0.95, 1.0], bins=2)
    {'0.0-0.5': 1, '0.5-1.0': 2}
    """
    arr = pd.to_numeric(pd.Series(values, dtype=object), errors="coerce").dropna().to_numpy(dtype=float)
    idx = np.minimum((np.clip(arr, 0.0, 1.0) * bins).astype(int), bins - 1)
    counts = np.bincount(idx, minlength=bins)
    return {f"{i / bins:.1f}-{(i + 1) / bins:.1f}": int(counts[i]) for i in range(bins)}


def data_quality(pairs: pd.DataFrame, prompts: list[str], thresholds: QualityThresholds | None = None) -> dict[str, Any]:
    """Sanity measures of one round's preference data, with a warning for each threshold passed.

    `pairs` is the filter stage's table (columns prompt, response_1, response_2, similarity, kept, drop_reason,
    chosen, rejected); `prompts` the round's drawn prompt texts. Returns

      pairs, kept                 row count and kept-pair count
      length_ratio                mean len(chosen) / max(1, len(rejected)) in characters over kept pairs (None if none)
      chosen_longer_fraction      fraction of kept pairs whose chosen response is strictly longer (None if none)
      duplicate_prompts           distinct prompt texts (case- and whitespace-normalised) appearing more than once
      identical_pairs             pairs (kept or not) whose two responses are equal after strip
      similarity_histogram        counts of `similarity` in 10 bins over [0, 1]
      short_responses             distinct responses with fewer than `short_chars` stripped characters; a response is
                                  identified by (prompt, stripped text), so one completion that appears in several
                                  pairs counts once
      responses, short_fraction   the number of distinct responses, and the short ones' share of them
      drops                       counts per drop_reason (only the reasons that occur)
      warnings                    [{"check", "value", "threshold", "message"}], empty on clean data
    """
    t = thresholds or QualityThresholds()
    kept_mask = pairs["kept"].fillna(False).astype(bool) if len(pairs) else pd.Series([], dtype=bool)
    kept = pairs[kept_mask.to_numpy()] if len(pairs) else pairs
    chosen_len = np.array([len(_text(c)) for c in kept["chosen"]], dtype=float) if len(kept) else np.array([])
    rejected_len = np.array([len(_text(r)) for r in kept["rejected"]], dtype=float) if len(kept) else np.array([])
    length_ratio = float(np.mean(chosen_len / np.maximum(1.0, rejected_len))) if len(kept) else None
    chosen_longer = float(np.mean(chosen_len > rejected_len)) if len(kept) else None

    prompt_counts = Counter(_norm_prompt(p) for p in prompts)
    duplicate_prompts = sum(1 for c in prompt_counts.values() if c > 1)

    r1 = [_text(x).strip() for x in pairs["response_1"]] if len(pairs) else []
    r2 = [_text(x).strip() for x in pairs["response_2"]] if len(pairs) else []
    identical = [a == b for a, b in zip(r1, r2)]
    identical_pairs = sum(identical)
    identical_kept = sum(1 for same, k in zip(identical, kept_mask) if same and k)

    pair_prompts = [_text(p) for p in pairs["prompt"]] if len(pairs) else []
    distinct = {(p, r) for p, r in zip(pair_prompts, r1)} | {(p, r) for p, r in zip(pair_prompts, r2)}
    short_responses = sum(1 for _, r in distinct if len(r) < t.short_chars)
    short_fraction = short_responses / len(distinct) if distinct else 0.0

    drops = {str(k): int(v) for k, v in pairs["drop_reason"].dropna().value_counts().items()} if len(pairs) else {}
    histogram = similarity_histogram(pairs["similarity"] if len(pairs) else [])

    warnings: list[dict[str, Any]] = []
    if length_ratio is not None and length_ratio > t.max_length_ratio:
        warnings.append(warning(
            "length_ratio", length_ratio, t.max_length_ratio,
            f"chosen responses are on average {length_ratio:.2f}x as long as rejected ones: the judge is likely "
            "rewarding length, and DPO will teach the policy to ramble. Try a rubric that asks for concision, a judge "
            "less prone to length bias, or a smaller sample.max_new_tokens; compare lc_win_rate with win_rate.",
        ))
    if chosen_longer is not None and chosen_longer > t.max_chosen_longer_fraction:
        warnings.append(warning(
            "chosen_longer_fraction", chosen_longer, t.max_chosen_longer_fraction,
            f"the chosen response is the longer one in {chosen_longer:.0%} of kept pairs: length may be deciding "
            "the verdicts rather than quality. Try a rubric that penalises padding, check the judge on "
            "equal-length pairs, and watch verbosity across rounds.",
        ))
    if duplicate_prompts > t.max_duplicate_prompts:
        warnings.append(warning(
            "duplicate_prompts", duplicate_prompts, t.max_duplicate_prompts,
            f"{duplicate_prompts} prompt text(s) were drawn more than once this round: the round overweights them "
            "and the prompt pool may be too small or contain near-duplicates. Deduplicate the prompt file, lower "
            "prompts.per_round, or check that the per-round draw samples without replacement.",
        ))
    if identical_pairs > t.max_identical_pairs:
        warnings.append(warning(
            "identical_pairs", identical_pairs, t.max_identical_pairs,
            f"{identical_pairs} pair(s) have identical responses ({identical_kept} of them kept): sampling is "
            "collapsing to one answer per prompt, so pairs carry no preference signal. Raise sample.temperature or "
            "top_p; if any were kept, lower filter.max_similarity (a kept identical pair is a filter bug).",
        ))
    if short_fraction > t.max_short_fraction:
        warnings.append(warning(
            "short_fraction", short_fraction, t.max_short_fraction,
            f"{short_responses} of {len(distinct)} distinct responses ({short_fraction:.0%}) have fewer than "
            f"{t.short_chars} characters: the policy may be emitting end-of-sequence early or the chat template may "
            "be wrong. Check the generations and the template, and raise filter.min_chars to keep them out of training.",
        ))

    return {
        "pairs": int(len(pairs)),
        "kept": int(len(kept)),
        "length_ratio": length_ratio,
        "chosen_longer_fraction": chosen_longer,
        "duplicate_prompts": int(duplicate_prompts),
        "identical_pairs": int(identical_pairs),
        "similarity_histogram": histogram,
        "short_responses": int(short_responses),
        "responses": len(distinct),
        "short_fraction": short_fraction,
        "drops": drops,
        "warnings": warnings,
    }


def accuracy_change(new: list[bool], previous: list[bool]) -> dict[str, Any]:
    """Did accuracy fall, paired prompt by prompt? The one-sided exact McNemar test: among the prompts exactly one
    of the two models gets right, the chance of at least this many being the previous model's under no change.

    >>> accuracy_change([False] * 10, [True] * 10)["p_value"] < 0.01
    True
    >>> accuracy_change([True, False], [False, True])["p_value"]
    0.75
    """
    from math import comb

    new_only = sum(a and not b for a, b in zip(new, previous))
    previous_only = sum(b and not a for a, b in zip(new, previous))
    m = new_only + previous_only
    p = sum(comb(m, i) for i in range(previous_only, m + 1)) / 2**m if m else 1.0
    n = len(new)
    return {"new": sum(new) / n if n else 0.0, "previous": sum(previous) / n if n else 0.0,
            "new_only": new_only, "previous_only": previous_only, "p_value": p}
