"""A run's report as one standalone HTML file: header, per-round table, per-round details, gate decisions.

    write_report(Path("runs/my-run"))   # -> runs/my-run/report.html

The file has no external resources (inline CSS; training curves are base64 PNG data URIs), so it can be mailed,
attached to a ticket or opened from disk. The page is the template selfplay/templates/report.html.j2; this module
reads the run and computes what the page shows, as plain text and numbers, and the template lays it out. Jinja2's
autoescape HTML-escapes every text taken from the run (prompts, responses, reasons, names). Whatever a round lacks
(a stage that did not run, a rejected or incomplete round, a run without evaluate, optional manifest keys) is
skipped or shown as "-"; nothing missing makes the report fail.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any

from selfplay.inputs.tables import present
from selfplay.reporting.report import accuracy_cell, accuracy_curve, accuracy_fields, accuracy_png, audit_cell, templates
from selfplay.runtime.provenance import describe
from selfplay.runtime.rundir import MANIFEST, STAGES, RunDir, read_json

SAMPLE_PAIRS = 3
SAMPLE_EVALS = 2
TEXT_LIMIT = 1500


# ---------------------------------------------------------------- small helpers

def _is_num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def num(value: Any, fmt: str = "{:.3f}") -> str:
    """A number formatted, '-' for None/NaN/missing, anything else as its text.

    >>> num(0.625), num(3), num(float("nan")), num(None), num(0.12345, "{:.2f}")
    ('0.625', '3', '-', '-', '0.12')
    """
    if value is None:
        return "-"
    if _is_num(value):
        if isinstance(value, float) and not math.isfinite(value):
            return "-"
        return fmt.format(value) if isinstance(value, float) else str(value)
    return str(value)


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _clip(text: Any, limit: int = TEXT_LIMIT) -> str:
    if present(text) is None:
        return ""
    s = str(text)
    return s if len(s) <= limit else s[: limit - 1] + "…"


def _safe_read_json(path: Path) -> Any:
    try:
        return read_json(path) if path.is_file() else None
    except (OSError, ValueError):
        return None


def _fmt_time(ts: Any) -> str:
    if not _is_num(ts):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


# ---------------------------------------------------------------- reading the run

def _round_numbers(run: RunDir) -> list[int]:
    """Every round directory, complete or not, in order."""
    ks = []
    if run.root.is_dir():
        for p in run.root.iterdir():
            m = re.fullmatch(r"round_(\d+)", p.name)
            if m and p.is_dir():
                ks.append(int(m.group(1)))
    return sorted(ks)


def _stage_metrics(run: RunDir, k: int, stage: str) -> dict[str, Any] | None:
    manifest = _safe_read_json(run.stage_dir(k, stage) / MANIFEST)
    if not isinstance(manifest, dict):
        return None
    metrics = manifest.get("metrics")
    return metrics if isinstance(metrics, dict) else {}


def _partial_summary(run: RunDir, k: int) -> dict[str, Any]:
    """What an incomplete round's finished stages say, under the round summary's keys."""
    m = {stage: _stage_metrics(run, k, stage) for stage in STAGES}
    s: dict[str, Any] = {"round": k, "stages_done": [st for st in STAGES if m[st] is not None]}
    if m["sample"] is not None:
        s["completions"] = m["sample"].get("completions")
    if m["judge"] is not None:
        s["judged"] = m["judge"].get("judged")
        s["position_consistency"] = m["judge"].get("position_consistency")
        s["judge_audit_cell"] = audit_cell(m["judge"].get("audit"))
    if m["filter"] is not None:
        s["kept"] = m["filter"].get("kept")
        s["drops"] = m["filter"].get("drops")
    if m["train"] is not None:
        s.update(dpo_loss=m["train"].get("final_loss"), dpo_initial_loss=m["train"].get("initial_loss"),
                 reward_accuracy=m["train"].get("reward_accuracy"), reward_margin=m["train"].get("reward_margin"))
    if m["evaluate"] is not None:
        e = m["evaluate"]
        s["win_rate"] = e.get("win_rate")
        s.update(accuracy_fields(e))
        if all(key in e for key in ("wins", "ties", "losses")):
            s["wins_ties_losses"] = f"{e['wins']}/{e['ties']}/{e['losses']}"
    return s


def _read_parquet(path: Path, notes: list[str]):
    if not path.is_file():
        return None
    try:
        import pandas as pd

        return pd.read_parquet(path)
    except Exception as exc:  # a damaged file must not take the report down
        notes.append(f"could not read {path.name}: {type(exc).__name__}: {exc}")
        return None


def _curves_data_uri(path: Path, notes: list[str]) -> str | None:
    history = _safe_read_json(path)
    if not isinstance(history, list):
        if path.is_file():
            notes.append(f"could not read {path.name}")
        return None
    steps = [h for h in history if isinstance(h, dict) and "loss" in h and "rewards/chosen" in h]
    if not steps:
        return None
    try:
        from selfplay.reporting.report import curves_png

        png = curves_png(steps)
    except Exception as exc:
        notes.append(f"could not draw the training curves: {type(exc).__name__}: {exc}")
        return None
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


# ---------------------------------------------------------------- what the page shows

def gate_view(s: dict[str, Any], complete: bool) -> dict[str, Any]:
    """The gate decision as a CSS class, a label and a reason; label None means no decision was recorded ("-").

    >>> gate_view({"accepted": False, "gate_reason": "rejected: win rate 0.4 < 0.5"}, True)
    {'cls': 'rejected', 'label': 'rejected', 'reason': 'win rate 0.4 < 0.5'}
    """
    accepted, reason = s.get("accepted"), s.get("gate_reason")
    if isinstance(reason, str) and reason.split(":", 1)[0] in ("accepted", "rejected"):  # the label already says it
        reason = reason.split(":", 1)[1].strip()
    reason = None if reason in (None, "") else str(reason)
    if accepted is True:
        return {"cls": "accepted", "label": "accepted", "reason": reason}
    if accepted is False:
        return {"cls": "rejected", "label": "rejected", "reason": reason}
    if not complete:
        return {"cls": "incomplete", "label": "incomplete", "reason": None}
    if accepted is None:
        return {"cls": None, "label": None, "reason": None}
    return {"cls": None, "label": str(accepted), "reason": reason}


def table_cells(s: dict[str, Any]) -> dict[str, Any]:
    """A round's figures for the rounds table, formatted."""
    initial, final = s.get("dpo_initial_loss"), s.get("dpo_loss")
    ci = s.get("win_rate_ci")
    has_ci = isinstance(ci, (list, tuple)) and len(ci) == 2 and all(_is_num(x) for x in ci)
    return {
        "sampled": num(s.get("completions")), "judged": num(s.get("judged")), "kept": num(s.get("kept")),
        "consistency": num(s.get("position_consistency"), "{:.2f}"),
        "audit": _text(s.get("judge_audit_cell")) or "-",
        "loss": "-" if initial is None and final is None else f"{num(initial, '{:.4f}')} → {num(final, '{:.4f}')}",
        "reward_accuracy": num(s.get("reward_accuracy"), "{:.2f}"), "reward_margin": num(s.get("reward_margin"), "{:.4f}"),
        "win_rate": num(s.get("win_rate")), "ci": f"[{num(ci[0], '{:.2f}')}, {num(ci[1], '{:.2f}')}]" if has_ci else None,
        "wtl": _text(s.get("wins_ties_losses")) or None,
        "lc_win_rate": num(s.get("lc_win_rate")), "vs_base": num(s.get("win_rate_vs_base")),
        "accuracy": accuracy_cell(s.get("accuracy"), s.get("accuracy_ci")) if _is_num(s.get("accuracy")) else "-",
        "sources": "{} / {}".format(*(num((s.get("verdict_sources") or {}).get(x)) for x in ("verifier", "llm")))
                   if isinstance(s.get("verdict_sources"), dict) else "-",
    }


def warning_items(kind: str, warnings: Any) -> list[dict[str, Any]]:
    """Quality or training warnings as (kind, check, message, figures); a warning that is not a dict is just text."""
    if not isinstance(warnings, list):
        return []
    items = []
    for w in warnings:
        if not isinstance(w, dict):
            items.append({"kind": kind, "text": _text(w), "check": None, "message": None, "figures": None})
            continue
        figures = [f"{name} {num(w.get(name), '{:.4g}')}" for name in ("value", "threshold") if w.get(name) is not None]
        items.append({"kind": kind, "text": None, "check": _text(w.get("check") or "warning"),
                      "message": _text(w["message"]) if w.get("message") else None, "figures": ", ".join(figures) or None})
    return items


def pathology_view(p: Any) -> dict[str, Any]:
    """The pathology figures as table rows, or as clipped JSON text when they are not a dict, or neither."""
    if isinstance(p, dict) and p:
        return {"rows": [(_text(name), num(v, "{:.4g}")) for name, v in p.items()], "text": None}
    if p not in (None, {}, [], ""):
        return {"rows": [], "text": _clip(json.dumps(p, default=str))}
    return {"rows": [], "text": None}


def kept_pairs_view(pairs) -> dict[str, Any] | None:
    """The first few kept pairs, clipped, and how many were kept; None when there is no filter table."""
    if pairs is None or "kept" not in pairs.columns:
        return None
    kept = pairs[pairs["kept"].fillna(False).astype(bool)]
    shown = [{"prompt": _clip(row.get("prompt")), "chosen": _clip(row.get("chosen")), "rejected": _clip(row.get("rejected"))}
             for row in kept.head(SAMPLE_PAIRS).to_dict("records")]
    return {"shown": shown, "total": len(kept)}


def eval_samples_view(table) -> dict[str, Any] | None:
    """The first few evaluation prompts with both answers and the outcome; None when there is no eval table."""
    if table is None or table.empty:
        return None
    shown = []
    for row in table.head(SAMPLE_EVALS).to_dict("records"):
        outcome = row.get("outcome")
        shown.append({"prompt": _clip(row.get("prompt")), "new": _clip(row.get("response_new")),
                      "other": _clip(row.get("response_other")), "outcome": "-" if outcome is None else str(outcome),
                      "cls": {"win": "accepted", "loss": "rejected"}.get(outcome if isinstance(outcome, str) else "", "muted")})
    return {"shown": shown, "total": len(table)}


def round_facts(s: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(label, text, shown as code) for the round's drops, checkpoint and finishing time, those it has."""
    facts = []
    if isinstance(s.get("drops"), dict):
        facts.append(("drops", ", ".join(f"{reason} {num(n)}" for reason, n in s["drops"].items() if n) or "none", False))
    if s.get("checkpoint"):
        facts.append(("checkpoint", _text(s["checkpoint"]), True))
    if _is_num(s.get("finished_at")):
        facts.append(("finished", _fmt_time(s["finished_at"]), False))
    return facts


def round_view(run: RunDir, k: int) -> dict[str, Any]:
    """Everything the page shows about round k, complete or not."""
    notes: list[str] = []
    summary = _safe_read_json(run.round_dir(k) / MANIFEST)
    complete = isinstance(summary, dict)
    s = summary if complete else _partial_summary(run, k)
    return {
        "k": k, "complete": complete, "gate": gate_view(s, complete), "cells": table_cells(s), "summary": {"round": k, **s},
        "decided": not (s.get("accepted") is None and not s.get("gate_reason")),
        "gate_reason_recorded": bool(s.get("gate_reason")),
        "stages_done": ", ".join(s.get("stages_done") or []) or "none", "facts": round_facts(s),
        "curves": _curves_data_uri(run.stage_dir(k, "train") / "log_history.json", notes),
        "warnings": warning_items("quality", s.get("quality_warnings")) + warning_items("training", s.get("training_warnings")),
        "pathologies": pathology_view(s.get("pathologies")),
        "pairs": kept_pairs_view(_read_parquet(run.stage_dir(k, "filter") / "pairs.parquet", notes)),
        "evals": eval_samples_view(_read_parquet(run.stage_dir(k, "evaluate") / "eval.parquet", notes)),
        "notes": notes,
    }


def report_context(run_root: Path) -> dict[str, Any]:
    """The values report.html.j2 lays out, for the run at `run_root`."""
    run = RunDir(run_root)
    record = _safe_read_json(run.root / "run.json")
    record = record if isinstance(record, dict) else {}
    config = record.get("config") if isinstance(record.get("config"), dict) else {}
    rounds = [round_view(run, k) for k in _round_numbers(run)]
    completed = sum(r["complete"] for r in rounds)
    points = accuracy_curve([r["summary"] for r in rounds])
    start = next((p for p in points if p["round"] == 0), None)
    return {
        "name": _text(config.get("name") or run.root.name), "completed": completed, "incomplete": len(rounds) - completed,
        "target": config.get("rounds"), "base_model": _text(record.get("base_model") or "-"),
        "started": _fmt_time(record.get("created_at")), "generated": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "directory": str(run.root.resolve()), "rounds": rounds,
        "provenance": describe(record["provenance"]) if isinstance(record.get("provenance"), dict) else None,
        "resumed_under": [f"{_fmt_time(r.get('at'))}: {'; '.join(map(str, r.get('changes', [])))}" for r in record.get("resumed_under", [])
                          if isinstance(r, dict)],
        "start_accuracy": accuracy_cell(start["accuracy"], start["ci"]) if start else None,
        "accuracy_plot": "data:image/png;base64," + base64.b64encode(accuracy_png(points)).decode("ascii") if len(points) > 1 else None,
    }


def render(run_root: Path) -> str:
    """The report's HTML text for the run at `run_root`."""
    return templates().get_template("report.html.j2").render(report_context(run_root))


def write_report(run_root: Path, out: Path | None = None) -> Path:
    """Write the run's standalone HTML report (default `run_root/report.html`) atomically; return its path."""
    run_root = Path(run_root)
    out = Path(out) if out is not None else run_root / "report.html"
    text = render(run_root)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out
