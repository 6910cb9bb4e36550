"""One self-play round: sample -> judge -> filter -> train -> evaluate -> publish.

Each stage skips itself when its manifest exists, so a rerun or a retried flow run resumes at the first
incomplete stage. The publish task decides the gate and writes the round's manifest last.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from selfplay.config.run import RunConfig
from selfplay.runtime import shutdown
from tasks.evaluate import evaluate
from tasks.filter import filter_pairs
from tasks.judge import judge
from tasks.publish import publish
from tasks.sample import sample
from tasks.train import train


@flow(name="dpo-round", flow_run_name="{config.name}-round-{k}")
def dpo_round(config: RunConfig, k: int, policy: str, base: str | None = None) -> dict[str, Any]:
    """Round k from `policy` (the current checkpoint: the last accepted round's, or the base model), which is also
    the reference; `base` is round 0, evaluated against too. The gate then accepts or rejects the new checkpoint."""
    shutdown.arm()  # in front of the SIGTERM handler Prefect installed for this flow run
    sample(config, k, policy)
    judge(config, k, policy)
    filter_pairs(config, k)
    train(config, k, policy)
    evaluate(config, k, policy, base)
    return publish(config, k)
