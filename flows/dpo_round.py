"""One self-play round: sample -> judge -> filter -> train -> evaluate, then a summary artifact.

Each stage skips itself when its manifest exists, so a rerun resumes at the first incomplete stage.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from selfplay.config import RunConfig
from selfplay.report import artifact_key, round_summary
from selfplay.rundir import RunDir
from tasks.evaluate import evaluate
from tasks.filter import filter_pairs
from tasks.judge import judge
from tasks.sample import sample
from tasks.train import train


@flow(name="dpo-round", flow_run_name="{config.name}-round-{k}")
def dpo_round(config: RunConfig, k: int, policy: str) -> dict[str, Any]:
    """Round k from `policy` (round k-1's checkpoint, or the base model for round 1), which is also the reference."""
    run = RunDir(config.run_dir)
    sample(config, k, policy)
    judge(config, k, policy)
    filter_pairs(config, k)
    train(config, k, policy)
    evaluate(config, k, policy)
    summary = round_summary(run, k)
    create_table_artifact(
        key=artifact_key(config.name, "round-summary"),
        table=[summary],
        description=f"Round {k} of run {config.name}: pairs, judge consistency, DPO metrics, win rate vs previous.",
    )
    run.finish_round(k, summary)
    get_run_logger().info("round %d complete: %s", k, summary)
    return summary
