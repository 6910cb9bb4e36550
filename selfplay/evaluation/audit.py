"""The judge audit's statistics, pure (no IO): how often the LLM judge agrees with the verifier on comparisons the
verifier decides, with a 95% interval, and what its mistakes look like (position, ties, length).

On prompts with a reference answer the verifier knows which response is right; put the same comparisons to the LLM
judge in both orders and its verdicts can be scored. Each audited comparison scores 1 when the judge names the
verifier's winner, 0 when it names the other response, and 0.5 when it says tie or its two orders disagree
(`inconsistent`: position, not judgment); an unreadable or failed verdict is left out and counted. So a judge that
always answers "A" scores exactly 0.5, a judge that flips coins about 0.5, and a judge that checks the answer 1.
The judge is *informative* when the interval's lower end is above 0.5.

    pick_audit(12, 0.5, seed=3)            # which 6 of 12 verifier-decided comparisons to audit
    stats = audit_stats(truth, rows, len_first, len_second)
    audit_line(stats)    # "judge audit: agreement with the verifier 0.52 [0.35, 0.69] on 24 comparisons: not better than chance; ..."
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from selfplay.evaluation.quality import wilson_interval

SCORE = {"agree": 1.0, "tie": 0.5, "inconsistent": 0.5, "disagree": 0.0}
UNANSWERED = ("invalid", "judge_error", "not_judged")


def pick_audit(n: int, size: float, seed: int) -> list[int]:
    """Which of `n` verifier-decided comparisons to audit, in order: `size` of them when it is a whole number (all
    when fewer), that share when 0 < size < 1 (at least one), none when 0. Seeded: a rerun picks the same.

    >>> pick_audit(10, 3, seed=0), pick_audit(10, 0.5, seed=0) == pick_audit(10, 0.5, seed=0), pick_audit(10, 0, seed=0)
    ([0, 6, 9], True, [])
    >>> len(pick_audit(10, 0.25, seed=1)), pick_audit(2, 5, seed=1)
    (2, [0, 1])
    """
    if n <= 0 or size <= 0:
        return []
    k = min(n, int(size) if size >= 1 else max(1, round(size * n)))
    return sorted(random.Random(seed).sample(range(n), k))


def score(truth: str, verdict: str) -> float | None:
    """An audited verdict's score against the verifier's winner ('first' or 'second'); None when unanswered.

    >>> score("first", "first"), score("first", "second"), score("first", "tie"), score("second", "inconsistent"), score("first", "invalid")
    (1.0, 0.0, 0.5, 0.5, None)
    """
    if verdict in UNANSWERED:
        return None
    if verdict in ("tie", "inconsistent"):
        return SCORE[verdict]
    return SCORE["agree"] if verdict == truth else SCORE["disagree"]


def _agreement(scores: list[float]) -> dict[str, Any]:
    if not scores:
        return {"n": 0, "agreement": None, "ci": None}
    lo, hi = wilson_interval(sum(scores), len(scores))
    return {"n": len(scores), "agreement": sum(scores) / len(scores), "ci": [lo, hi]}


def audit_stats(truth: Sequence[str], rows: Sequence[dict[str, Any]], len_first: Sequence[int], len_second: Sequence[int]) -> dict[str, Any]:
    """The audit of one round: `truth[i]` the verifier's winner of comparison i ('first' or 'second'), `rows[i]` the
    LLM judge's verdict row on it (`verdict`, `consistent`), `len_first[i]`/`len_second[i]` the two responses'
    lengths. Agreement with its 95% Wilson interval, whether the judge is informative (the interval above 0.5), its
    position consistency (each order alone naming the same response), tie and inconsistency rates, the unanswered
    count, and the agreement split by whether the verifier's winner is the longer response (equal lengths in
    neither): a judge that prefers length agrees when the longer is right and disagrees when it is not."""
    scored = [(t, r, a, b, score(t, r["verdict"])) for t, r, a, b in zip(truth, rows, len_first, len_second)]
    answered = [x for x in scored if x[4] is not None]
    overall = _agreement([x[4] for x in answered])
    consistent = [bool(r["consistent"]) for _, r, *_ in answered if r.get("consistent") is not None]
    longer = [s for t, _, a, b, s in answered if (a > b) == (t == "first") and a != b]
    shorter = [s for t, _, a, b, s in answered if (a > b) != (t == "first") and a != b]
    ci = overall["ci"]
    return {
        "comparisons": len(scored),
        "answered": overall["n"],
        "unanswered": len(scored) - overall["n"],
        "agreement": overall["agreement"],
        "ci": ci,
        "informative": None if ci is None else ci[0] > 0.5,
        "position_consistency": sum(consistent) / len(consistent) if consistent else None,
        "tie_rate": sum(r["verdict"] == "tie" for _, r, *_ in answered) / len(answered) if answered else None,
        "inconsistent_rate": sum(r["verdict"] == "inconsistent" for _, r, *_ in answered) / len(answered) if answered else None,
        "longer_right": _agreement(longer),
        "shorter_right": _agreement(shorter),
    }


def audit_line(stats: dict[str, Any] | None) -> str:
    """The audit in one line, saying whether the judge was informative.

    >>> audit_line({"comparisons": 0, "answered": 0})
    'judge audit: no comparison this round had a verifier to check the judge against: no ground truth, no audit'
    """
    if not stats or not stats.get("answered"):
        if stats and stats.get("comparisons"):
            return f"judge audit: none of {stats['comparisons']} audited verdicts was readable: the judge could not be checked"
        return "judge audit: no comparison this round had a verifier to check the judge against: no ground truth, no audit"
    lo, hi = stats["ci"]
    said = ("informative (better than chance)" if stats["informative"]
            else "worse than chance" if hi < 0.5 else "not better than chance")
    parts = [f"judge audit: agreement with the verifier {stats['agreement']:.2f} [{lo:.2f}, {hi:.2f}] on {stats['answered']} comparisons: {said}"]
    if stats.get("position_consistency") is not None:
        parts.append(f"position consistency {stats['position_consistency']:.2f}")
    parts.append(f"ties {stats['tie_rate']:.2f}, inconsistent {stats['inconsistent_rate']:.2f}")
    for key, label in (("longer_right", "longer"), ("shorter_right", "shorter")):
        if stats[key]["n"]:
            parts.append(f"{stats[key]['agreement']:.2f} when the {label} response is right (n={stats[key]['n']})")
    if stats.get("unanswered"):
        parts.append(f"{stats['unanswered']} unreadable")
    if stats.get("truth", "verifier") != "verifier":
        parts.append("checked by the 'auto' verifier, which decides no label (judge.verifier.kind none)")
    return "; ".join(parts)
