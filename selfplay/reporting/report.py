"""Round summaries, read from the stages' manifests, and their renderings: the end-of-run table, the round's
markdown report with its training curves, the judged-pairs table, and the lineage table.

The markdown report and the HTML run report (selfplay/reporting/html_report.py) are Jinja2 templates shipped in
selfplay/templates/; the functions here compute the values and the templates only lay them out.
"""

from __future__ import annotations

import base64
import functools
import io
from pathlib import Path
from typing import Any

import jinja2
import pandas as pd

from selfplay.evaluation.quality import accuracy_change
from selfplay.inputs.tables import present
from selfplay.runtime.rundir import MANIFEST, RunDir, read_json

PAIR_FIELDS = ("prompt", "response_1", "response_2", "p_a_order1", "p_a_order2", "verdict", "similarity", "kept", "drop_reason", "chosen", "rejected")

# (summary key, column title, format) for the end-of-run table.
TABLE_COLUMNS = (
    ("round", "round", "{}"),
    ("completions", "sampled", "{}"),
    ("judged", "judged", "{}"),
    ("kept", "kept", "{}"),
    ("position_consistency", "consistency", "{:.2f}"),
    ("judge_audit_cell", "judge vs verifier [95% CI]", "{}"),
    ("dpo_loss", "DPO loss", "{:.4f}"),
    ("reward_accuracy", "reward acc", "{:.2f}"),
    ("reward_margin", "margin", "{:.4f}"),
    ("win_rate", "win rate vs prev", "{:.3f}"),
    ("wins_ties_losses", "W/T/L", "{}"),
    ("win_rate_vs_base", "vs round 0", "{:.3f}"),
    ("accuracy_cell", "held-out acc [95% CI]", "{}"),
    ("gate", "gate", "{}"),
)


@functools.cache
def templates() -> jinja2.Environment:
    """The package's templates (selfplay/reporting/templates/*.j2): `.html.j2` autoescaped, markdown verbatim, and a value
    the template names but the caller did not pass is an error rather than an empty string."""
    return jinja2.Environment(
        loader=jinja2.PackageLoader("selfplay.reporting", "templates"),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2",), default_for_string=False, default=False),
        undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
    )


def accuracy_fields(evaluate: dict[str, Any]) -> dict[str, Any]:
    """Held-out accuracy of round k's checkpoint and of the checkpoint before it, from its evaluate metrics."""
    new, before = evaluate.get("accuracy") or {}, evaluate.get("accuracy_previous") or {}
    return {"accuracy": new.get("accuracy"), "accuracy_ci": [new.get("ci_low"), new.get("ci_high")], "accuracy_n": new.get("n"),
            "accuracy_previous": before.get("accuracy"), "accuracy_previous_ci": [before.get("ci_low"), before.get("ci_high")]}


def accuracy_cell(accuracy: float | None, ci: list[float | None] | None) -> str | None:
    """'0.312 [0.25, 0.38]', or None without an accuracy.

    >>> accuracy_cell(0.3125, [0.25, 0.38])
    '0.312 [0.25, 0.38]'
    """
    if accuracy is None:
        return None
    return f"{accuracy:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci and None not in ci else f"{accuracy:.3f}"


def accuracy_curve(summaries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """(round, accuracy, interval) per checkpoint: the start (round 0, from round 1's evaluation) and every round."""
    points = []
    if summaries and summaries[0]["round"] == 1 and summaries[0].get("accuracy_previous") is not None:
        points.append({"round": 0, "accuracy": summaries[0]["accuracy_previous"], "ci": summaries[0]["accuracy_previous_ci"]})
    points += [{"round": s["round"], "accuracy": s["accuracy"], "ci": s["accuracy_ci"]} for s in summaries if s.get("accuracy") is not None]
    return points


def summarize_round(run: RunDir, k: int) -> dict[str, Any]:
    """One row of headline figures for round k, from its stages' manifests."""
    m = {stage: run.manifest(k, stage)["metrics"] for stage in ("sample", "judge", "filter", "train", "evaluate")}
    return {
        **accuracy_fields(m["evaluate"]),
        "verdict_sources": m["judge"].get("sources"),
        "sample_accuracy": m["judge"].get("sample_accuracy"),
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
        "judge_audit": m["judge"].get("audit"),
        "judge_audit_cell": audit_cell(m["judge"].get("audit")),
        "judge_audit_line": m["judge"].get("audit_line"),
        "dpo_loss": m["train"].get("final_loss"),
        "dpo_initial_loss": m["train"].get("initial_loss"),
        "reward_accuracy": m["train"].get("reward_accuracy"),
        "reward_margin": m["train"].get("reward_margin"),
        "win_rate": m["evaluate"]["win_rate"],
        "win_rate_ci": [m["evaluate"].get("ci_low"), m["evaluate"].get("ci_high")],
        "lc_win_rate": m["evaluate"].get("lc_win_rate"),
        "win_rate_vs_base": (m["evaluate"].get("vs_base") or {}).get("win_rate"),
        "wins_ties_losses": f"{m['evaluate']['wins']}/{m['evaluate']['ties']}/{m['evaluate']['losses']}",
        "mean_tokens": m["evaluate"].get("mean_tokens_new"),
        "pathologies": m["evaluate"].get("pathologies"),
        "quality_warnings": m["filter"].get("quality", {}).get("warnings", []),
        "training_warnings": m["train"].get("warnings", []),
        "checkpoint": str(run.checkpoint(k)),
    }


def audit_cell(audit: dict[str, Any] | None) -> str | None:
    """The judge audit in a table cell: agreement [interval], and 'chance' where the interval reaches 0.5.

    >>> audit_cell({"agreement": 0.5, "ci": [0.33, 0.67], "informative": False}), audit_cell({"answered": 0}), audit_cell(None)
    ('0.50 [0.33, 0.67] chance', 'no truth', None)
    """
    if not audit:
        return None
    if audit.get("agreement") is None:
        return "no truth"
    lo, hi = audit["ci"]
    return f"{audit['agreement']:.2f} [{lo:.2f}, {hi:.2f}]" + ("" if audit["informative"] else " chance")


def format_table(rows: list[dict[str, Any]]) -> str:
    """Plain-text table of round summaries (no terminal features needed, so it reads the same in logs). With round 1
    among them and a held-out accuracy, a row for round 0 (the starting model) comes first."""
    start = [p for p in accuracy_curve(rows) if p["round"] == 0]
    rows = [{"round": 0, "accuracy_cell": accuracy_cell(p["accuracy"], p["ci"])} for p in start] + [
        {**row, "accuracy_cell": accuracy_cell(row.get("accuracy"), row.get("accuracy_ci"))} for row in rows]
    cells = [[title for _, title, _ in TABLE_COLUMNS]]
    for row in rows:
        cells.append([("-" if row.get(key) is None else fmt.format(row[key])) for key, _, fmt in TABLE_COLUMNS])
    widths = [max(len(r[i]) for r in cells) for i in range(len(TABLE_COLUMNS))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(value: Any, width: int = 300) -> Any:
    if isinstance(value, str):
        return value if len(value) <= width else value[: width - 1] + "…"
    value = present(value)
    return round(value, 4) if isinstance(value, float) else value


def pairs_rows(pairs: pd.DataFrame, cap: int = 100) -> list[dict[str, Any]]:
    """The judged pairs (judged ones first, kept ones first among them), capped, long texts shortened."""
    order = pairs.assign(_judged=pairs["verdict"] != "not_judged").sort_values(["_judged", "kept"], ascending=False, kind="stable")
    return [{f: _cell(row.get(f)) for f in PAIR_FIELDS} for row in order.head(cap).to_dict("records")]


CURVE_PANELS = (("loss", ["loss"]), ("rewards", ["rewards/chosen", "rewards/rejected"]), ("margins", ["rewards/margins"]),
                ("accuracy", ["rewards/accuracies"]), ("grad_norm", ["grad_norm"]))


def _plot(history: list[dict[str, Any]], panels, size: tuple[float, float]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h for h in history if "loss" in h and "rewards/chosen" in h]
    x = [h["step"] for h in steps]
    fig, axes = plt.subplots(1, len(panels), figsize=size, dpi=80, squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels):
        for key in keys:
            ax.plot(x, [h.get(key, float("nan")) for h in steps], marker="o", label=key.split("/")[-1])
        ax.set_title(title.replace("_", " "))
        ax.set_xlabel("step")
        if len(keys) > 1:
            ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def accuracy_png(points: list[dict[str, Any]]) -> bytes:
    """Held-out accuracy per round (an `accuracy_curve`) with its 95% intervals, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [p["round"] for p in points]
    y = [p["accuracy"] for p in points]
    lo = [p["accuracy"] - (p["ci"][0] if p["ci"] and p["ci"][0] is not None else p["accuracy"]) for p in points]
    hi = [(p["ci"][1] if p["ci"] and p["ci"][1] is not None else p["accuracy"]) - p["accuracy"] for p in points]
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=80)
    ax.errorbar(x, y, yerr=[lo, hi], marker="o", capsize=4)
    ax.set_xlabel("round")
    ax.set_ylabel("held-out accuracy")
    ax.set_xticks(x)
    ax.set_ylim(0, 1)
    ax.set_title("held-out accuracy (greedy), 95% Wilson intervals")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def curves_png(history: list[dict[str, Any]]) -> bytes:
    """All training curves per step (loss, chosen/rejected rewards, margins, accuracy, grad norm) in one PNG."""
    return _plot(history, CURVE_PANELS, (15, 2.8))


def plot_curves(history: list[dict[str, Any]], out_dir: Path) -> dict[str, Path]:
    """One 480x320 PNG per curve (loss.png, rewards.png, margins.png, accuracy.png, grad_norm.png) in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, keys in CURVE_PANELS:
        paths[name] = out_dir / f"{name}.png"
        paths[name].write_bytes(_plot(history, [(name, keys)], (6, 4)))
    return paths


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def round_report_context(run_name: str, summary: dict[str, Any], judge: dict[str, Any], train: dict[str, Any],
                         evaluate: dict[str, Any], png: bytes) -> dict[str, Any]:
    """The values round_report.md.j2 lays out, each already formatted."""
    wins, ties, losses = evaluate["wins"], evaluate["ties"], evaluate["losses"]
    warnings = summary.get("quality_warnings", []) + summary.get("training_warnings", []) + summary.get("pathology_warnings", [])
    return {
        "run_name": run_name, "k": summary["round"], "gate": summary.get("gate_reason", "no decision recorded"),
        "kept": summary["kept"], "candidate_pairs": summary["candidate_pairs"], "win_rate": _fmt(evaluate["win_rate"]),
        "accuracy_line": (f"Held-out accuracy **{accuracy_cell(summary['accuracy'], summary.get('accuracy_ci'))}** on "
                          f"{summary.get('accuracy_n')} checkable prompts (current checkpoint "
                          f"{accuracy_cell(summary.get('accuracy_previous'), summary.get('accuracy_previous_ci'))}).")
                         if summary.get("accuracy") is not None else None,
        "wins": wins, "ties": ties, "losses": losses,
        "judge_rows": [(label, _fmt(value)) for label, value in [
            ("pairs judged", judge["judged"]),
            ("decided by the verifier / by the LLM", "{} / {}".format(*((judge.get("sources") or {}).get(x, 0) for x in ("verifier", "llm")))),
            ("verifier calls (samples scored)", judge.get("verifier_calls")), ("samples correct", judge.get("sample_accuracy")),
            ("judge audit", judge.get("audit_line")),
            ("position consistency (LLM)", judge["position_consistency"]),
            ("first-position win rate (bias)", judge["first_position_win_rate"]), ("tie rate", judge["tie_rate"]),
            ("invalid rate", judge.get("invalid_rate")), ("error rate", judge["error_rate"]),
            ("cache hits", judge.get("cache_hits")), ("cost", judge.get("cost"))]],
        "train_rows": [(label, _fmt(value)) for label, value in [
            ("steps", train.get("steps")), ("initial loss (ln 2 = 0.6931)", train.get("initial_loss")),
            ("final loss", train.get("final_loss")), ("reward accuracy", train.get("reward_accuracy")),
            ("reward margin", train.get("reward_margin"))]],
        "curves": f"data:image/png;base64,{base64.b64encode(png).decode()}",
        "evaluate_rows": [(label, _fmt(value)) for label, value in [
            ("wins / ties / losses", f"{wins} / {ties} / {losses}"),
            ("win rate (ties count half)", evaluate["win_rate"]),
            ("95% Wilson interval", f"[{_fmt(evaluate.get('ci_low'))}, {_fmt(evaluate.get('ci_high'))}]"),
            ("length-controlled win rate", evaluate.get("lc_win_rate")),
            ("win rate vs round 0", (evaluate.get("vs_base") or {}).get("win_rate")),
            ("held-out accuracy, new [95% CI]", accuracy_cell(summary.get("accuracy"), summary.get("accuracy_ci"))),
            ("held-out accuracy, current checkpoint [95% CI]", accuracy_cell(summary.get("accuracy_previous"), summary.get("accuracy_previous_ci"))),
            ("checkable held-out prompts", summary.get("accuracy_n")),
            ("mean answer tokens (new / current)",
             f"{_fmt(evaluate.get('mean_tokens_new'))} / {_fmt(evaluate.get('mean_tokens_previous'))}")]],
        "warnings": [{"check": w["check"], "value": _fmt(w["value"]), "threshold": w["threshold"], "message": w["message"]}
                     for w in warnings],
        "checkpoint": summary["checkpoint"],
    }


def round_report(run_name: str, summary: dict[str, Any], judge: dict[str, Any], train: dict[str, Any], evaluate: dict[str, Any], png: bytes) -> str:
    """The round's markdown report; the curves are an inline data-URI PNG, so it renders wherever the text goes."""
    context = round_report_context(run_name, summary, judge, train, evaluate, png)
    return templates().get_template("round_report.md.j2").render(context)


def lineage_rows(output_dir: Path) -> list[dict[str, Any]]:
    """One row per completed round of every run under `output_dir`, in time order."""
    rows = []
    for manifest in Path(output_dir).glob(f"*/round_*/{MANIFEST}"):
        s = read_json(manifest)
        rows.append({"run": manifest.parent.parent.name, "round": s.get("round"), "kept": s.get("kept"),
                     "dpo_loss": _cell(s.get("dpo_loss")), "win_rate": _cell(s.get("win_rate")),
                     "accuracy": _cell(s.get("accuracy")), "accuracy_ci": accuracy_cell(s.get("accuracy"), s.get("accuracy_ci")),
                     "wins_ties_losses": s.get("wins_ties_losses"), "judge_vs_verifier": s.get("judge_audit_cell"),
                     "finished_at": s.get("finished_at")})
    return sorted(rows, key=lambda r: r["finished_at"] or 0)


def accuracy_trend(run: RunDir) -> str | None:
    """From round 0 to the last completed round: held-out accuracy on the same prompts, and how likely a rise this
    large is by chance (one-sided exact McNemar over the prompts exactly one of the two gets right); None without
    the answers to compare."""
    rounds = run.completed_rounds()
    if not rounds or rounds[0] != 1 or len(rounds) < 2:
        return None
    first_path, last_path = (run.stage_dir(k, "evaluate") / "accuracy.parquet" for k in (1, rounds[-1]))
    if not first_path.is_file() or not last_path.is_file():
        return None
    first, last = pd.read_parquet(first_path), pd.read_parquet(last_path)
    if first["prompt_id"].tolist() != last["prompt_id"].tolist():
        return None
    rise = accuracy_change(first["correct_previous"].tolist(), last["correct_new"].tolist())  # "previous" = the later model
    return (f"held-out accuracy from round 0 to round {rounds[-1]}: {rise['new']:.3f} -> {rise['previous']:.3f} on {len(first)} "
            f"prompts ({rise['previous_only']} right only after, {rise['new_only']} only before; one-sided exact McNemar "
            f"p = {rise['p_value']:.2g})")
