"""Self-play over rounds: round k's merged checkpoint is round k+1's policy and its reference.

    selfplay run --config deployments/recipes/cpu-demo.yaml

The flow holds the run directory's lock for its whole life, records (or checks, on resume) the run's config, and
skips rounds whose manifest exists.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from selfplay.config import RunConfig
from selfplay.preflight import preflight
from selfplay.rundir import locked, open_run
from flows.dpo_round import dpo_round


@flow(name="self-play", flow_run_name="{config.name}")
def self_play(config: RunConfig) -> list[dict[str, Any]]:
    """Run `config.rounds` rounds of self-play DPO in runs/<name>/, resuming whatever is already complete."""
    log = get_run_logger()
    base = preflight(config)
    with locked(config.run_dir):
        run = open_run(config, str(base))
        policy, summaries = str(base), []
        for k in range(1, config.rounds + 1):
            if run.round_done(k):
                log.info("round %d already complete, skipping", k)
                summaries.append(run.round_summary(k))
            else:
                summaries.append(dpo_round(config, k, policy))
            policy = str(run.checkpoint(k))
        log.info("run %s: %d rounds complete; files in %s", config.name, len(summaries), run.root)
        return summaries
