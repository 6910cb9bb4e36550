"""Prefect plumbing the stages share: the `gpu` concurrency limit, progress artifacts, and the artifacts a round
publishes. Artifact keys are fixed, so the UI's Artifacts page shows each key's history across runs."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

GPU_LIMIT = "gpu"
# A holder renews its lease while it lives; a crashed one (SIGKILL, a lost worker) frees the slot when the lease
# runs out. Prefect's default is 300 s: every other GPU stage would wait that long after a crash.
GPU_LEASE_S = 60.0
KEYS = {
    "summary": "selfplay-round-summary",
    "pairs": "selfplay-judged-pairs",
    "report": "selfplay-round-report",
    "checkpoint": "selfplay-checkpoint",
    "lineage": "selfplay-lineage",
}
log = logging.getLogger("selfplay.orchestration")


def ensure_gpu_limit(limit: int = 1) -> None:
    """Create the global concurrency limit `gpu` if the server lacks it (the setup commands create it too)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(GPU_LIMIT)
        except ObjectNotFound:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=GPU_LIMIT, limit=limit))


@contextlib.contextmanager
def gpu_slot() -> Iterator[None]:
    """Hold the strict `gpu` limit: at most one GPU stage (sample, local judge, train, evaluate) at a time."""
    from prefect.concurrency.sync import concurrency

    with concurrency(GPU_LIMIT, occupy=1, strict=True, lease_duration=GPU_LEASE_S):
        yield


class Progress:
    """A progress artifact for one stage, updated as work completes (a no-op outside a flow run)."""

    def __init__(self, description: str):
        from prefect.artifacts import create_progress_artifact

        self.id: UUID | None = None
        try:
            self.id = create_progress_artifact(progress=0.0, description=description)
        except Exception as exc:  # never let reporting break the work
            log.debug("no progress artifact: %s", exc)

    def update(self, done: float, total: float) -> None:
        from prefect.artifacts import update_progress_artifact

        if self.id is not None and total:
            with contextlib.suppress(Exception):
                update_progress_artifact(self.id, progress=round(100.0 * done / total, 1))


def publish_round(run_name: str, k: int, summary: dict[str, Any], pairs_rows: list[dict[str, Any]], report_md: str, checkpoint: Path) -> None:
    from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

    create_table_artifact(key=KEYS["summary"], table=[summary], description=f"{run_name} round {k}: headline figures")
    create_table_artifact(key=KEYS["pairs"], table=pairs_rows, description=f"{run_name} round {k}: judged pairs (first {len(pairs_rows)})")
    create_markdown_artifact(key=KEYS["report"], markdown=report_md, description=f"{run_name} round {k}: report")
    create_link_artifact(key=KEYS["checkpoint"], link=checkpoint.resolve().as_uri(), link_text=f"{run_name} round {k} checkpoint",
                         description=f"{run_name} round {k}: merged checkpoint (the next round's policy and reference)")


def publish_lineage(output_dir: Path) -> None:
    from prefect.artifacts import create_table_artifact

    from selfplay.report import lineage_rows

    rows = lineage_rows(output_dir)
    if rows:
        create_table_artifact(key=KEYS["lineage"], table=rows, description=f"Every completed round under {output_dir.resolve()}")
