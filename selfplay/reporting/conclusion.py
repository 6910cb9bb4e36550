"""A round's conclusion, from its stages' manifests: the summary row, the gate's decision, the pathology trend over
every round so far, and the markdown report and judged-pairs rows the round publishes as artifacts.

Reads the run directory, writes nothing: the publish task (`tasks/publish.py`) writes the round's manifest and
publishes the artifacts.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

import pandas as pd

from selfplay.config.run import GateConfig
from selfplay.evaluation.outcomes import gate_decision
from selfplay.evaluation.pathologies import pathology_trend
from selfplay.reporting.report import curves_png, pairs_rows, round_report, summarize_round
from selfplay.runtime.rundir import RunDir


class Conclusion(NamedTuple):
    summary: dict[str, Any]  # the round manifest's content: headline figures, the gate's decision, all warnings
    report: str  # markdown
    pairs: list[dict[str, Any]]  # the judged-pairs table artifact's rows


def pathology_history(run: RunDir, k: int) -> list[dict[str, float]]:
    """Pathologies of each round's eval answers up to round k, round 0 (the base model's answers in round 1) first."""
    history = [run.manifest(1, "evaluate")["metrics"]["pathologies_previous"]]
    return history + [run.manifest(j, "evaluate")["metrics"]["pathologies"] for j in range(1, k + 1) if run.is_done(j, "evaluate")]


def conclude_round(run: RunDir, k: int, run_name: str, gate: GateConfig) -> Conclusion:
    """Round k's summary with the gate's decision and the pathology warnings, its report, and its pairs' rows."""
    summary = summarize_round(run, k)
    metrics = {stage: run.manifest(k, stage)["metrics"] for stage in ("judge", "train", "evaluate")}
    accepted, reason = gate_decision(metrics["evaluate"], gate)
    summary.update(accepted=accepted, gate="accepted" if accepted else "rejected", gate_reason=reason)
    summary["pathology_warnings"] = pathology_trend(pathology_history(run, k))
    log_history = json.loads((run.stage_dir(k, "train") / "log_history.json").read_text())
    report = round_report(run_name, summary, metrics["judge"], metrics["train"], metrics["evaluate"], curves_png(log_history))
    pairs = pd.read_parquet(run.stage_dir(k, "filter") / "pairs.parquet")
    return Conclusion(summary, report, pairs_rows(pairs))
