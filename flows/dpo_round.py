"""One self-play round: sample -> judge -> filter -> train -> evaluate, then the round's artifacts.

Each stage skips itself when its manifest exists, so a rerun or a retried flow run resumes at the first
incomplete stage.
"""

from __future__ import annotations

import json
from typing import Any

import pandas as pd
from prefect import flow, get_run_logger

from selfplay import shutdown
from selfplay.config import RunConfig
from selfplay.orchestration import publish_round
from selfplay.quality import pathology_trend
from selfplay.report import curves_png, pairs_rows, round_report, round_summary
from selfplay.rundir import RunDir
from tasks.evaluate import evaluate, gate_decision
from tasks.filter import filter_pairs
from tasks.judge import judge
from tasks.sample import sample
from tasks.train import train


@flow(name="dpo-round", flow_run_name="{config.name}-round-{k}")
def dpo_round(config: RunConfig, k: int, policy: str, base: str | None = None) -> dict[str, Any]:
    """Round k from `policy` (the current checkpoint: the last accepted round's, or the base model), which is also
    the reference; `base` is round 0, evaluated against too. The gate then accepts or rejects the new checkpoint."""
    shutdown.arm()  # in front of the SIGTERM handler Prefect installed for this flow run
    run = RunDir(config.run_dir)
    sample(config, k, policy)
    judge(config, k, policy)
    filter_pairs(config, k)
    train(config, k, policy)
    evaluate(config, k, policy, base)

    summary = round_summary(run, k)
    metrics = {stage: run.manifest(k, stage)["metrics"] for stage in ("judge", "train", "evaluate")}
    accepted, reason = gate_decision(metrics["evaluate"], config.gate)
    summary.update(accepted=accepted, gate="accepted" if accepted else "rejected", gate_reason=reason)
    # Pathologies of each round's eval answers, round 0 (the base model's answers in round 1) first.
    history = [run.manifest(1, "evaluate")["metrics"]["pathologies_previous"]]
    history += [run.manifest(j, "evaluate")["metrics"]["pathologies"] for j in range(1, k + 1) if run.is_done(j, "evaluate")]
    summary["pathology_warnings"] = pathology_trend(history)
    log_history = json.loads((run.stage_dir(k, "train") / "log_history.json").read_text())
    report = round_report(config.name, summary, metrics["judge"], metrics["train"], metrics["evaluate"], curves_png(log_history))
    pairs = pd.read_parquet(run.stage_dir(k, "filter") / "pairs.parquet")
    publish_round(config.name, k, summary, pairs_rows(pairs), report, run.checkpoint(k))
    run.finish_round(k, summary)
    log = get_run_logger()
    (log.info if accepted else log.warning)("round %d %s", k, reason)
    return summary
