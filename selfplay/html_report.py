"""A run's report as one standalone HTML file: header, per-round table, per-round details, gate decisions.

    write_report(Path("runs/my-run"))   # -> runs/my-run/report.html

The file has no external resources (inline CSS; training curves are base64 PNG data URIs), so it can be mailed,
attached to a ticket or opened from disk. Every text taken from the run (prompts, responses, reasons, names) is
HTML-escaped. Whatever a round lacks (a stage that did not run, a rejected or incomplete round, a run without
evaluate, optional manifest keys) is skipped or shown as "-"; nothing missing makes the report fail.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any

from selfplay.rundir import MANIFEST, STAGES, RunDir, read_json

SAMPLE_PAIRS = 3
SAMPLE_EVALS = 2
TEXT_LIMIT = 1500

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; color: #1f2328;
       background: #fff; margin: 0; line-height: 1.45; font-size: 15px; }
main { max-width: 1240px; margin: 0 auto; padding: 24px 28px 64px; }
h1 { font-size: 26px; margin: 0 0 6px; }
h2 { font-size: 20px; margin: 36px 0 10px; padding-bottom: 4px; border-bottom: 2px solid #d0d7de; }
h3 { font-size: 17px; margin: 22px 0 8px; }
h4 { font-size: 15px; margin: 16px 0 6px; color: #444c56; }
.meta { color: #57606a; margin: 2px 0; }
.meta b { color: #1f2328; }
table { border-collapse: collapse; margin: 8px 0 14px; font-size: 14px; }
th, td { border: 1px solid #d0d7de; padding: 5px 9px; text-align: left; vertical-align: top; }
th { background: #f3f5f7; font-weight: 600; }
table.rounds td:last-child { min-width: 220px; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr:nth-child(even) td { background: #fafbfc; }
.accepted { color: #1a7f37; font-weight: 600; }
.rejected { color: #cf222e; font-weight: 600; }
.incomplete, .muted { color: #6e7781; }
.round { border: 1px solid #d0d7de; border-radius: 6px; padding: 4px 18px 14px; margin: 18px 0; }
.round > h3 { margin-top: 14px; }
img.curves { max-width: 100%; border: 1px solid #d0d7de; border-radius: 4px; display: block; }
ul.warnings li { margin: 3px 0; }
.tag { display: inline-block; font-size: 12px; padding: 0 6px; border-radius: 10px; background: #fff1e5;
       color: #9a6700; border: 1px solid #f0d8b8; margin-right: 4px; }
.sample { border: 1px solid #d0d7de; border-radius: 4px; margin: 8px 0; }
.sample .label { font-size: 12px; font-weight: 600; text-transform: uppercase; color: #57606a; padding: 4px 10px 0; }
.text { white-space: pre-wrap; word-break: break-word; font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
        font-size: 13px; padding: 2px 10px 8px; margin: 0; }
.cols { display: grid; grid-template-columns: 1fr 1fr; gap: 0; border-top: 1px solid #d0d7de; }
.cols > div + div { border-left: 1px solid #d0d7de; }
.chosen .label { color: #1a7f37; }
.rejected-text .label { color: #cf222e; }
ol.gates li { margin: 4px 0; }
footer { margin-top: 40px; color: #6e7781; font-size: 13px; }
"""


# ---------------------------------------------------------------- small helpers

def esc(value: Any) -> str:
    """HTML-escape any value's text (quotes included)."""
    return html.escape("" if value is None else str(value), quote=True)


def _is_num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def num(value: Any, fmt: str = "{:.3f}") -> str:
    """A number formatted, '-' for None/NaN/missing, anything else escaped as text."""
    if value is None:
        return "-"
    if _is_num(value):
        if isinstance(value, float) and not math.isfinite(value):
            return "-"
        return esc(fmt.format(value) if isinstance(value, float) else str(value))
    return esc(value)


def _clip(text: Any, limit: int = TEXT_LIMIT) -> str:
    if text is None or (isinstance(text, float) and math.isnan(text)):
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
    if m["filter"] is not None:
        s["kept"] = m["filter"].get("kept")
        s["drops"] = m["filter"].get("drops")
    if m["train"] is not None:
        s.update(dpo_loss=m["train"].get("final_loss"), dpo_initial_loss=m["train"].get("initial_loss"),
                 reward_accuracy=m["train"].get("reward_accuracy"), reward_margin=m["train"].get("reward_margin"))
    if m["evaluate"] is not None:
        e = m["evaluate"]
        s["win_rate"] = e.get("win_rate")
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
        from selfplay.report import curves_png

        png = curves_png(steps)
    except Exception as exc:
        notes.append(f"could not draw the training curves: {type(exc).__name__}: {exc}")
        return None
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


# ---------------------------------------------------------------- rendering

TABLE_HEAD = ("round", "sampled", "judged", "kept", "position consistency", "DPO loss (initial → final)",
              "reward acc", "reward margin", "win rate vs previous", "LC win rate", "win rate vs base", "gate")


def _gate_cell(s: dict[str, Any], complete: bool) -> str:
    accepted, reason = s.get("accepted"), s.get("gate_reason")
    if reason and reason.split(":", 1)[0] in ("accepted", "rejected"):  # the label already says it
        reason = reason.split(":", 1)[1].strip()
    why = f": {esc(reason)}" if reason not in (None, "") else ""
    if accepted is True:
        return f'<span class="accepted">accepted</span>{why}'
    if accepted is False:
        return f'<span class="rejected">rejected</span>{why}'
    if not complete:
        return '<span class="incomplete">incomplete</span>'
    return "-" if accepted is None else esc(accepted) + why


def _win_rate_cell(s: dict[str, Any]) -> str:
    out = num(s.get("win_rate"))
    ci = s.get("win_rate_ci")
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(_is_num(x) for x in ci):
        out += f" [{num(ci[0], '{:.2f}')}, {num(ci[1], '{:.2f}')}]"
    if s.get("wins_ties_losses"):
        out += f' <span class="muted">({esc(s["wins_ties_losses"])})</span>'
    return out


def _loss_cell(s: dict[str, Any]) -> str:
    initial, final = s.get("dpo_initial_loss"), s.get("dpo_loss")
    if initial is None and final is None:
        return "-"
    return f"{num(initial, '{:.4f}')} → {num(final, '{:.4f}')}"


def _table(rounds: list[dict[str, Any]]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in TABLE_HEAD)
    rows = []
    for r in rounds:
        s = r["summary"]
        cells = [
            f'<td class="num"><a href="#round-{r["k"]}">{r["k"]}</a></td>',
            f'<td class="num">{num(s.get("completions"))}</td>',
            f'<td class="num">{num(s.get("judged"))}</td>',
            f'<td class="num">{num(s.get("kept"))}</td>',
            f'<td class="num">{num(s.get("position_consistency"), "{:.2f}")}</td>',
            f'<td class="num">{_loss_cell(s)}</td>',
            f'<td class="num">{num(s.get("reward_accuracy"), "{:.2f}")}</td>',
            f'<td class="num">{num(s.get("reward_margin"), "{:.4f}")}</td>',
            f'<td class="num">{_win_rate_cell(s)}</td>',
            f'<td class="num">{num(s.get("lc_win_rate"))}</td>',
            f'<td class="num">{num(s.get("win_rate_vs_base"))}</td>',
            f"<td>{_gate_cell(s, r['complete'])}</td>",
        ]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table class=\"rounds\"><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _warning_items(kind: str, warnings: Any) -> list[str]:
    if not isinstance(warnings, list):
        return []
    items = []
    for w in warnings:
        if isinstance(w, dict):
            check, message = w.get("check"), w.get("message")
            figures = []
            if w.get("value") is not None:
                figures.append(f"value {num(w.get('value'), '{:.4g}')}")
            if w.get("threshold") is not None:
                figures.append(f"threshold {num(w.get('threshold'), '{:.4g}')}")
            text = f"<b>{esc(check or 'warning')}</b>"
            if message:
                text += f": {esc(message)}"
            if figures:
                text += f' <span class="muted">({", ".join(figures)})</span>'
        else:
            text = esc(w)
        items.append(f'<li><span class="tag">{esc(kind)}</span>{text}</li>')
    return items


def _pathologies(p: Any) -> str:
    if isinstance(p, dict) and p:
        rows = "".join(f'<tr><td>{esc(name)}</td><td class="num">{num(v, "{:.4g}")}</td></tr>' for name, v in p.items())
        return f"<h4>Pathology figures</h4><table><thead><tr><th>figure</th><th>value</th></tr></thead><tbody>{rows}</tbody></table>"
    if p not in (None, {}, [], ""):
        return f'<h4>Pathology figures</h4><p class="text">{esc(_clip(json.dumps(p, default=str)))}</p>'
    return ""


def _text_block(label: str, text: Any, cls: str = "") -> str:
    return f'<div class="{cls}"><div class="label">{esc(label)}</div><div class="text">{esc(_clip(text))}</div></div>'


def _sample_pairs(pairs) -> str:
    if pairs is None or "kept" not in pairs.columns:
        return ""
    kept = pairs[pairs["kept"].fillna(False).astype(bool)].head(SAMPLE_PAIRS)
    if kept.empty:
        return '<h4>Sample kept pairs</h4><p class="muted">no kept pairs</p>'
    blocks = []
    for row in kept.to_dict("records"):
        blocks.append(
            '<div class="sample">' + _text_block("prompt", row.get("prompt"))
            + '<div class="cols">' + _text_block("chosen", row.get("chosen"), "chosen")
            + _text_block("rejected", row.get("rejected"), "rejected-text") + "</div></div>"
        )
    return f"<h4>Sample kept pairs ({len(kept)} of {int(pairs['kept'].fillna(False).astype(bool).sum())})</h4>" + "".join(blocks)


def _sample_evals(table) -> str:
    if table is None or table.empty:
        return ""
    blocks = []
    for row in table.head(SAMPLE_EVALS).to_dict("records"):
        outcome = row.get("outcome")
        cls = {"win": "accepted", "loss": "rejected"}.get(outcome if isinstance(outcome, str) else "", "muted")
        blocks.append(
            '<div class="sample">' + _text_block("prompt", row.get("prompt"))
            + f'<div class="label">outcome for the new model: <span class="{cls}">{esc(outcome if outcome is not None else "-")}</span></div>'
            + '<div class="cols">' + _text_block("new model", row.get("response_new"))
            + _text_block("previous model", row.get("response_other")) + "</div></div>"
        )
    return f"<h4>Sample evaluation prompts ({min(len(table), SAMPLE_EVALS)} of {len(table)})</h4>" + "".join(blocks)


def _round_section(r: dict[str, Any]) -> str:
    k, s = r["k"], r["summary"]
    gate = _gate_cell(s, r["complete"])
    gate = '<span class="muted">no gate decision recorded</span>' if gate == "-" else gate
    parts = [f'<section class="round" id="round-{k}"><h3>Round {k} — {gate}</h3>']
    if not r["complete"]:
        done = ", ".join(s.get("stages_done") or []) or "none"
        parts.append(f'<p class="incomplete">This round has not completed; stages done: {esc(done)}.</p>')
    facts = []
    if isinstance(s.get("drops"), dict):
        drops = ", ".join(f"{esc(reason)} {num(n)}" for reason, n in s["drops"].items() if n) or "none"
        facts.append(f"<b>drops</b>: {drops}")
    if s.get("checkpoint"):
        facts.append(f"<b>checkpoint</b>: <code>{esc(s['checkpoint'])}</code>")
    if _is_num(s.get("finished_at")):
        facts.append(f"<b>finished</b>: {_fmt_time(s['finished_at'])}")
    if facts:
        parts.append('<p class="meta">' + "<br>".join(facts) + "</p>")
    if r["curves"]:
        parts.append(f'<h4>Training curves</h4><img class="curves" alt="round {k} training curves" src="{r["curves"]}">')
    items = _warning_items("quality", s.get("quality_warnings")) + _warning_items("training", s.get("training_warnings"))
    if items:
        parts.append(f'<h4>Warnings ({len(items)})</h4><ul class="warnings">{"".join(items)}</ul>')
    parts.append(_pathologies(s.get("pathologies")))
    parts.append(_sample_pairs(r["pairs"]))
    parts.append(_sample_evals(r["eval"]))
    if r["notes"]:
        parts.append('<ul class="muted">' + "".join(f"<li>{esc(n)}</li>" for n in r["notes"]) + "</ul>")
    parts.append("</section>")
    return "".join(parts)


def _gates(rounds: list[dict[str, Any]]) -> str:
    items = []
    for r in rounds:
        s = r["summary"]
        if s.get("accepted") is None and not s.get("gate_reason"):
            decision = '<span class="incomplete">incomplete round</span>' if not r["complete"] else '<span class="muted">no gate decision recorded</span>'
        else:
            decision = _gate_cell(s, r["complete"])
            if not s.get("gate_reason"):
                decision += ' <span class="muted">(no reason recorded)</span>'
        items.append(f'<li><a href="#round-{r["k"]}">Round {r["k"]}</a>: {decision}</li>')
    return '<ol class="gates">' + "".join(items) + "</ol>" if items else '<p class="muted">no rounds</p>'


def _collect(run: RunDir) -> list[dict[str, Any]]:
    rounds = []
    for k in _round_numbers(run):
        notes: list[str] = []
        summary = _safe_read_json(run.round_dir(k) / MANIFEST)
        complete = isinstance(summary, dict)
        if not complete:
            summary = _partial_summary(run, k)
        rounds.append({
            "k": k,
            "complete": complete,
            "summary": summary,
            "curves": _curves_data_uri(run.stage_dir(k, "train") / "log_history.json", notes),
            "pairs": _read_parquet(run.stage_dir(k, "filter") / "pairs.parquet", notes),
            "eval": _read_parquet(run.stage_dir(k, "evaluate") / "eval.parquet", notes),
            "notes": notes,
        })
    return rounds


def render(run_root: Path) -> str:
    """The report's HTML text for the run at `run_root`."""
    run = RunDir(run_root)
    record = _safe_read_json(run.root / "run.json")
    record = record if isinstance(record, dict) else {}
    config = record.get("config") if isinstance(record.get("config"), dict) else {}
    name = config.get("name") or run.root.name
    rounds = _collect(run)
    completed = sum(r["complete"] for r in rounds)
    target = config.get("rounds")
    generated = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    header = [
        f"<h1>Self-play run {esc(name)}</h1>",
        f'<p class="meta"><b>{completed}</b> completed round(s)' + (f" of {esc(target)} planned" if target is not None else "")
        + (f", {len(rounds) - completed} incomplete" if len(rounds) > completed else "") + "</p>",
        f'<p class="meta">base model: <b>{esc(record.get("base_model") or "-")}</b></p>',
        f'<p class="meta">run started: {_fmt_time(record.get("created_at"))} · report generated: {generated}</p>',
        f'<p class="meta">directory: <code>{esc(run.root.resolve())}</code></p>',
    ]
    body = [
        "<h2>Rounds</h2>", _table(rounds) if rounds else '<p class="muted">no rounds yet</p>',
        "<h2>Round details</h2>", "".join(_round_section(r) for r in rounds) or '<p class="muted">no rounds yet</p>',
        "<h2>Gate decisions</h2>", _gates(rounds),
        f"<footer>selfplay report · {esc(name)} · generated {generated}</footer>",
    ]
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>selfplay report: {esc(name)}</title><style>{CSS}</style></head>"
        f"<body><main>{''.join(header)}{''.join(body)}</main></body></html>\n"
    )


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
