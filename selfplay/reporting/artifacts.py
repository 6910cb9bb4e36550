"""The artifacts a round and a run publish to Prefect: the round's headline figures, judged pairs, report and
checkpoint link, and the lineage table of every completed round. Artifact keys are fixed, so the UI's Artifacts
page shows each key's history across runs. Outside a flow run (a stage's `.fn` called in a test, a script) they
are no-ops: creating one there would start a temporary Prefect server.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from selfplay.reporting.report import lineage_rows
from selfplay.runtime.stages import in_run

KEYS = {
    "summary": "selfplay-round-summary",
    "pairs": "selfplay-judged-pairs",
    "report": "selfplay-round-report",
    "checkpoint": "selfplay-checkpoint",
    "lineage": "selfplay-lineage",
}


def publish_round(run_name: str, k: int, summary: dict[str, Any], pairs_rows: list[dict[str, Any]], report_md: str, checkpoint: Path) -> None:
    from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

    if not in_run():
        return
    create_table_artifact(key=KEYS["summary"], table=[summary], description=f"{run_name} round {k}: headline figures")
    create_table_artifact(key=KEYS["pairs"], table=pairs_rows, description=f"{run_name} round {k}: judged pairs (first {len(pairs_rows)})")
    create_markdown_artifact(key=KEYS["report"], markdown=report_md, description=f"{run_name} round {k}: report")
    create_link_artifact(key=KEYS["checkpoint"], link=checkpoint.resolve().as_uri(), link_text=f"{run_name} round {k} checkpoint",
                         description=f"{run_name} round {k}: merged checkpoint (the next round's policy and reference)")


def publish_lineage(output_dir: Path) -> None:
    from prefect.artifacts import create_table_artifact

    if not in_run():
        return
    rows = lineage_rows(output_dir)
    if rows:
        create_table_artifact(key=KEYS["lineage"], table=rows, description=f"Every completed round under {output_dir.resolve()}")
