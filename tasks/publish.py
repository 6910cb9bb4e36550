"""Stage 6, publish: the round's conclusion. The gate accepts or rejects the new checkpoint, the pathology trend is
checked over every round so far, and the round's summary, judged pairs, report and checkpoint link become Prefect
artifacts (`selfplay.reporting.conclusion`).

Output `round_<k>/manifest.json`: the round's summary, written last, so its existence means the round completed.
"""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NONE

from selfplay.config.run import RunConfig
from selfplay.reporting.artifacts import publish_round
from selfplay.reporting.conclusion import conclude_round
from selfplay.runtime.rundir import RunDir
from selfplay.runtime.stages import run_logger


@task(name="publish", cache_policy=NONE)
def publish(cfg: RunConfig, k: int) -> dict[str, Any]:
    """Decide round k's gate, publish its artifacts and write its manifest; return its summary."""
    run = RunDir(cfg.run_dir)
    if run.round_done(k):
        return run.round_manifest(k)
    summary, report, pairs = conclude_round(run, k, cfg.name, cfg.gate)
    publish_round(cfg.name, k, summary, pairs, report, run.checkpoint(k))
    run.finish_round(k, summary)
    log = run_logger()
    (log.info if summary["accepted"] else log.warning)("round %d %s", k, summary["gate_reason"])
    return summary
