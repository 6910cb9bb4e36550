"""Benchmarks that print figures (no timed tests anywhere: a speed or quality claim is a figure printed here).

    python -m selfplay.bench improvement            # 3 rounds, 128 prompts a round, K=8, verifier-judged
    python -m selfplay.bench improvement --tiny     # the pipeline end to end in a minute or two (CI runs this)

`improvement` runs real self-play rounds through `selfplay run` (the same flow, a temporary Prefect server when
PREFECT_API_URL is unset) on the generated checkable workload (`selfplay.checkable`: bundled:checkable_train and
bundled:checkable_eval) with the verifier as the judge (`judge.verifier.fallback: none`, so no LLM call at all), a
tournament over K samples (K verifier calls a prompt, best against worst), and prints, per round: held-out greedy
accuracy with its 95% Wilson interval, the samples' accuracy, the pairs kept, the verdicts' sources and the
seconds the round took, by stage. The gate is off, so each round builds on the last; the target on the full
workload is round 3's accuracy at least 2.5 times round 0's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from selfplay.rundir import STAGES, RunDir

RECIPE = Path(__file__).resolve().parents[1] / "deployments" / "recipes" / "bench-improvement.yaml"
TINY = ["rounds=1", "prompts.per_round=12", "sample.num_samples=4", "prompts.accuracy_size=8", "prompts.eval_size=2",
        "sample.max_new_tokens=24", "evaluate.max_new_tokens=24", "train.min_pairs=1"]


def _stage_seconds(run: RunDir, k: int) -> dict[str, float]:
    out = {}
    for stage in STAGES:
        if run.is_done(k, stage):
            m = run.manifest(k, stage)
            out[stage] = m.get("metrics", {}).get("seconds") or m["finished_at"] - m["started_at"]
    return out


def improvement_rows(run: RunDir) -> list[dict[str, Any]]:
    """Round 0 and each completed round: accuracy [interval], sample accuracy, kept pairs, sources, seconds."""
    from selfplay.report import accuracy_curve

    summaries = [run.round_summary(k) for k in run.completed_rounds()]
    rows: list[dict[str, Any]] = [p for p in accuracy_curve(summaries) if p["round"] == 0]
    for s in summaries:
        k = s["round"]
        sample = run.manifest(k, "sample")
        started = sample["started_at"] - sample["metrics"]["seconds"]  # the manifest is opened as the stage writes its output
        rows.append({"round": k, "accuracy": s.get("accuracy"), "ci": s.get("accuracy_ci"), "n": s.get("accuracy_n"),
                     "sample_accuracy": s.get("sample_accuracy"), "kept": s.get("kept"), "sources": s.get("verdict_sources"),
                     "seconds": s["finished_at"] - started if s.get("finished_at") else None,
                     "stages": _stage_seconds(run, k)})
    return rows


def format_improvement(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'round':>5}  {'held-out accuracy [95% CI]':>27}  {'samples correct':>15}  {'kept':>5}  {'verifier/llm':>12}  "
             f"{'seconds':>7}  by stage (s)"]
    for r in rows:
        acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]"
        src = "-" if not r.get("sources") else f"{r['sources'].get('verifier', 0)}/{r['sources'].get('llm', 0)}"
        sa = "-" if r.get("sample_accuracy") is None else f"{r['sample_accuracy']:.3f}"
        secs = "-" if r.get("seconds") is None else f"{r['seconds']:.0f}"
        stages = " ".join(f"{st} {v:.0f}" for st, v in (r.get("stages") or {}).items())
        lines.append(f"{r['round']:>5}  {acc:>27}  {sa:>15}  {str(r.get('kept', '-')):>5}  {src:>12}  {secs:>7}  {stages}")
    return "\n".join(lines)


def improvement(args: argparse.Namespace) -> int:
    from selfplay.cli import main as selfplay_main

    overrides = [f"name={args.name}", f"output_dir={args.output_dir}", f"rounds={args.rounds}", f"prompts.per_round={args.per_round}",
                 f"sample.num_samples={args.samples}"] + (TINY if args.tiny else []) + (args.set or [])
    started = time.time()
    code = selfplay_main(["run", "--config", str(args.recipe), *sum((["--set", o] for o in overrides), [])])
    run = RunDir(Path(args.output_dir) / args.name)
    rows = improvement_rows(run)
    cfg = json.loads((run.root / "run.json").read_text())["config"] if (run.root / "run.json").is_file() else {}
    shape = (f"{cfg['rounds']} round(s), {cfg['prompts']['per_round']} prompts a round, K={cfg['sample']['num_samples']}"
             if cfg else "no run recorded")
    print(f"\nimprovement benchmark ({run.root}): {shape}, {time.time() - started:.0f} s in all\n")
    print(format_improvement(rows))
    accuracies = {r["round"]: r["accuracy"] for r in rows}
    if 0 in accuracies and len(accuracies) > 1:
        last = max(accuracies)
        ratio = accuracies[last] / accuracies[0] if accuracies[0] else float("inf")
        print(f"\nround {last} / round 0 held-out accuracy: {ratio:.2f}x")
    from selfplay.report import accuracy_trend

    trend = accuracy_trend(run)
    if trend:
        print(trend)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m selfplay.bench", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="bench", required=True)
    p = sub.add_parser("improvement", help="held-out accuracy per round on the checkable workload, with the verifier")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--per-round", type=int, default=128)
    p.add_argument("--samples", type=int, default=8, help="K, samples per prompt")
    p.add_argument("--recipe", default=str(RECIPE))
    p.add_argument("--name", default="bench-improvement")
    p.add_argument("--output-dir", default="runs")
    p.add_argument("--tiny", action="store_true", help="a minute-long version that checks the pipeline runs (CI)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="more config overrides")
    p.add_argument("--json", help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    return improvement(args)


if __name__ == "__main__":
    sys.exit(main())
