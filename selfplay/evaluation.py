"""Evaluation's pure logic: held-out answers of two models as judge comparisons, the table of their verdicts, the
new model's outcomes and win summary, and the gate that accepts or rejects a round. No IO here.

The new model always sits in position "first" (response_a of each `Comparison`), so its outcome per prompt is
read straight from the verdict: first = win, second = loss, tie or inconsistent = tie, judge_error or invalid =
error (not counted). By default the gate rejects a round when even the upper end of the 95% interval of its win
rate against the current checkpoint is below 0.5.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from selfplay.config import GateConfig
from selfplay.judging import VERDICT_COLUMNS, Comparison
from selfplay.quality import win_summary

OUTCOME = {"first": "win", "second": "loss", "judge_error": "error", "invalid": "error"}
# eval.parquet's columns. i, j, similarity and screened are kept from when evaluation reused the judge stage's
# pair table: they carry nothing here (always 0, 0, null, null), and stay so the file's format does not change.
EVAL_COLUMNS = ["prompt_id", "prompt", "i", "j", "response_new", "response_other", "truncated_1", "truncated_2", "similarity",
                "screened", *VERDICT_COLUMNS, "outcome"]


def outcomes(verdicts: list[str]) -> list[str]:
    """The new model's outcome per pair (it sits in position 'first'): win, tie, loss, or error (not counted).

    >>> outcomes(["first", "tie", "second", "inconsistent", "judge_error"])
    ['win', 'tie', 'loss', 'tie', 'error']
    """
    return [OUTCOME.get(v, "tie") for v in verdicts]


def gate_decision(vs_current: dict[str, Any], gate: GateConfig) -> tuple[bool, str]:
    """Accept or reject a round from its win summary against the current checkpoint; say why either way."""
    if not gate.enabled:
        return True, "accepted: the gate is disabled"
    if not vs_current.get("n"):
        return False, "rejected: no held-out comparison produced a verdict"
    wr, lo, hi = vs_current["win_rate"], vs_current["ci_low"], vs_current["ci_high"]
    where = f"win rate {wr:.3f} against the current checkpoint, 95% CI [{lo:.3f}, {hi:.3f}]"
    if hi < gate.min_upper_bound:
        return False, f"rejected: {where} lies wholly below {gate.min_upper_bound}; the current checkpoint stays"
    return True, f"accepted: {where} reaches {gate.min_upper_bound}"


def comparisons(new: pd.DataFrame, other: pd.DataFrame) -> list[Comparison]:
    """The judge's questions: the new model's answer (position first) against the other's, prompt by prompt."""
    return [Comparison(a.prompt, a.response, b.response) for a, b in zip(new.itertuples(), other.itertuples())]


def evaluation_table(new: pd.DataFrame, other: pd.DataFrame, verdicts: list[dict[str, Any]]) -> pd.DataFrame:
    """eval.parquet: per held-out prompt both answers, the judge's verdict about them, and the new model's outcome."""
    rows = [{"prompt_id": a.prompt_id, "prompt": a.prompt, "i": 0, "j": 0, "response_new": a.response, "response_other": b.response,
             "truncated_1": a.truncated, "truncated_2": b.truncated, "similarity": None, "screened": None, **verdict}
            for a, b, verdict in zip(new.itertuples(), other.itertuples(), verdicts)]
    table = pd.DataFrame(rows, columns=EVAL_COLUMNS[:-1])
    table["outcome"] = outcomes(table["verdict"].tolist())
    return table


def win_rates(table: pd.DataFrame, new: pd.DataFrame, other: pd.DataFrame) -> dict[str, Any]:
    """The new model's win summary over an `evaluation_table` (`selfplay.quality.win_summary`, lengths in tokens)."""
    return win_summary(table["outcome"].tolist(), new["n_tokens"].tolist(), other["n_tokens"].tolist())
