"""Round summaries, read from the stages' manifests, and their rendering as a table."""

from __future__ import annotations

import re
from typing import Any

from selfplay.rundir import RunDir

# (summary key, column title, format) for the end-of-run table.
TABLE_COLUMNS = (
    ("round", "round", "{}"),
    ("completions", "sampled", "{}"),
    ("judged", "judged", "{}"),
    ("kept", "kept", "{}"),
    ("position_consistency", "consistency", "{:.2f}"),
    ("dpo_loss", "DPO loss", "{:.4f}"),
    ("reward_accuracy", "reward acc", "{:.2f}"),
    ("reward_margin", "margin", "{:.4f}"),
    ("win_rate", "win rate vs prev", "{:.3f}"),
    ("wins_ties_losses", "W/T/L", "{}"),
)


def artifact_key(run_name: str, what: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", f"{run_name}-{what}".lower()).strip("-")


def round_summary(run: RunDir, k: int) -> dict[str, Any]:
    """One row of headline figures for round k, from its stages' manifests."""
    m = {stage: run.manifest(k, stage)["metrics"] for stage in ("sample", "judge", "filter", "train", "evaluate")}
    return {
        "round": k,
        "completions": m["sample"]["completions"],
        "truncated": m["sample"]["truncated"],
        "candidate_pairs": m["judge"]["pairs"],
        "judged": m["judge"]["judged"],
        "kept": m["filter"]["kept"],
        "drops": m["filter"]["drops"],
        "position_consistency": m["judge"]["position_consistency"],
        "first_position_win_rate": m["judge"]["first_position_win_rate"],
        "judge_tie_rate": m["judge"]["tie_rate"],
        "judge_invalid_rate": m["judge"].get("invalid_rate"),
        "judge_error_rate": m["judge"]["error_rate"],
        "judge_cache_hits": m["judge"].get("cache_hits", 0),
        "judge_cost": m["judge"].get("cost", 0.0),
        "dpo_loss": m["train"].get("final_loss"),
        "dpo_initial_loss": m["train"].get("initial_loss"),
        "reward_accuracy": m["train"].get("reward_accuracy"),
        "reward_margin": m["train"].get("reward_margin"),
        "win_rate": m["evaluate"]["win_rate"],
        "wins_ties_losses": f"{m['evaluate']['wins']}/{m['evaluate']['ties']}/{m['evaluate']['losses']}",
        "checkpoint": str(run.checkpoint(k)),
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    """Plain-text table of round summaries (no terminal features needed, so it reads the same in logs)."""
    cells = [[title for _, title, _ in TABLE_COLUMNS]]
    for row in rows:
        cells.append([("-" if row.get(key) is None else fmt.format(row[key])) for key, _, fmt in TABLE_COLUMNS])
    widths = [max(len(r[i]) for r in cells) for i in range(len(TABLE_COLUMNS))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
