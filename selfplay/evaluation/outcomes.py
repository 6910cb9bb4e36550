"""Evaluation's pure logic: held-out answers of two models as judge comparisons, the table of their verdicts, the
new model's outcomes and win summary, and the gate that accepts or rejects a round. No IO here.

The new model always sits in position "first" (response_a of each `Comparison`), so its outcome per prompt is
read straight from the verdict: first = win, second = loss, tie or inconsistent = tie, judge_error or invalid =
error (not counted). By default the gate rejects a round when even the upper end of the 95% interval of its win
rate against the current checkpoint is below 0.5.

Held-out accuracy: on the held-out prompts with a reference answer, each checkpoint answers greedily and the
verifier scores the answer; accuracy is the fraction correct, with its 95% Wilson interval (`accuracy_summary`).
The gate also rejects a round whose accuracy is significantly below the current checkpoint's on the same prompts:
a one-sided exact McNemar test over the prompts where exactly one of the two is right (`accuracy_change`).
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from selfplay.config.run import GateConfig
from selfplay.evaluation.quality import wilson_interval, win_summary
from selfplay.inputs.tables import present
from selfplay.judging.verdicts import VERDICT_COLUMNS, Comparison
from selfplay.judging.verifiers import is_correct

OUTCOME = {"first": "win", "second": "loss", "judge_error": "error", "invalid": "error"}
# eval.parquet's columns. i, j, similarity and screened are kept from when evaluation reused the judge stage's
# pair table: they carry nothing here (always 0, 0, null, null), and stay so the file's format does not change.
EVAL_COLUMNS = ["prompt_id", "prompt", "i", "j", "response_new", "response_other", "truncated_1", "truncated_2", "similarity",
                "screened", "reference", "verify_new", "verify_other", *VERDICT_COLUMNS, "outcome"]


def outcomes(verdicts: list[str]) -> list[str]:
    """The new model's outcome per pair (it sits in position 'first'): win, tie, loss, or error (not counted).

    >>> outcomes(["first", "tie", "second", "inconsistent", "judge_error"])
    ['win', 'tie', 'loss', 'tie', 'error']
    """
    return [OUTCOME.get(v, "tie") for v in verdicts]


def gate_decision(vs_current: dict[str, Any], gate: GateConfig) -> tuple[bool, str]:
    """Accept or reject a round from its win summary against the current checkpoint, and its held-out accuracy
    change where it has one (`vs_current["accuracy_change"]`); say why either way."""
    if not gate.enabled:
        return True, "accepted: the gate is disabled"
    if not vs_current.get("n"):
        return False, "rejected: no held-out comparison produced a verdict"
    wr, lo, hi = vs_current["win_rate"], vs_current["ci_low"], vs_current["ci_high"]
    where = f"win rate {wr:.3f} against the current checkpoint, 95% CI [{lo:.3f}, {hi:.3f}]"
    if hi < gate.min_upper_bound:
        return False, f"rejected: {where} lies wholly below {gate.min_upper_bound}; the current checkpoint stays"
    change = vs_current.get("accuracy_change")
    if gate.accuracy and change and change["p_value"] < gate.accuracy_alpha:
        return False, (f"rejected: held-out accuracy fell from {change['previous']:.3f} to {change['new']:.3f} "
                       f"({change['previous_only']} prompts right only before, {change['new_only']} only now; one-sided "
                       f"McNemar p = {change['p_value']:.3g} < {gate.accuracy_alpha}); the current checkpoint stays")
    accuracy = f"; held-out accuracy {change['previous']:.3f} -> {change['new']:.3f}" if change else ""
    return True, f"accepted: {where} reaches {gate.min_upper_bound}{accuracy}"


def accuracy_summary(scores: list[float | None]) -> dict[str, Any]:
    """Accuracy over verifier scores (1.0 = correct) with its 95% Wilson interval.

    >>> accuracy_summary([1.0, 0.0, 1.0, 0.2])["accuracy"]
    0.5
    """
    n, correct = len(scores), sum(map(is_correct, scores))
    lo, hi = wilson_interval(correct, n)
    return {"n": n, "correct": correct, "accuracy": correct / n if n else None, "ci_low": lo, "ci_high": hi}


def comparisons(new: pd.DataFrame, other: pd.DataFrame) -> list[Comparison]:
    """The judge's questions: the new model's answer (position first) against the other's, prompt by prompt, with
    the prompt's reference and the verifier's scores of both answers where the answers were scored."""
    return [Comparison(a.prompt, a.response, b.response, *(present(getattr(row, name, None)) for row, name in
                                                         ((a, "reference"), (a, "verify_score"), (b, "verify_score"))))
            for a, b in zip(new.itertuples(), other.itertuples())]


def evaluation_table(new: pd.DataFrame, other: pd.DataFrame, verdicts: list[dict[str, Any]]) -> pd.DataFrame:
    """eval.parquet: per held-out prompt both answers, the verifier's scores, the judge's verdict about them, and the
    new model's outcome."""
    rows = [{"prompt_id": a.prompt_id, "prompt": a.prompt, "i": 0, "j": 0, "response_new": a.response, "response_other": b.response,
             "truncated_1": a.truncated, "truncated_2": b.truncated, "similarity": None, "screened": None,
             "reference": getattr(a, "reference", None), "verify_new": getattr(a, "verify_score", None),
             "verify_other": getattr(b, "verify_score", None), **verdict}
            for a, b, verdict in zip(new.itertuples(), other.itertuples(), verdicts)]
    table = pd.DataFrame(rows, columns=EVAL_COLUMNS[:-1])
    table["outcome"] = outcomes(table["verdict"].tolist())
    return table


def win_rates(table: pd.DataFrame, new: pd.DataFrame, other: pd.DataFrame) -> dict[str, Any]:
    """The new model's win summary over an `evaluation_table` (`selfplay.evaluation.quality.win_summary`, lengths in tokens)."""
    return win_summary(table["outcome"].tolist(), new["n_tokens"].tolist(), other["n_tokens"].tolist())


def accuracy_table(new: pd.DataFrame, previous: pd.DataFrame) -> pd.DataFrame:
    """accuracy.parquet: per checkable held-out prompt, both checkpoints' greedy answers, scores and correctness."""
    table = pd.DataFrame({
        "prompt_id": new["prompt_id"], "prompt": new["prompt"], "reference": new["reference"], "verifier": new["verifier"],
        "response_new": new["response"], "score_new": new["verify_score"], "response_previous": previous["response"].to_numpy(),
        "score_previous": previous["verify_score"].to_numpy(),
    })
    table["correct_new"] = table["score_new"].map(is_correct)
    table["correct_previous"] = table["score_previous"].map(is_correct)
    return table
