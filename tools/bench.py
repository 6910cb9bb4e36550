"""Benchmarks that print figures (no timed tests anywhere: a speed or quality claim is a figure printed here).

    python -m tools.bench improvement            # 3 rounds, 128 prompts a round, K=8, verifier-judged
    python -m tools.bench improvement --tiny     # the pipeline end to end in a minute or two (CI runs this)
    python -m tools.bench improvement --judge checking   # an outside judge decides every pair, audited each round
    python -m tools.bench speed                  # one round's cost by stage and per kept pair, beside a plain loop
    python -m tools.bench speed --tiny           # (make bench runs the full one; CI the tiny one)
    python -m tools.bench knockout [JUDGMENTS ...]   # a knockout's best-vs-worst against all pairs' (seconds)
    python -m tools.bench serving                # the same rounds sampled by transformers, vLLM per stage, vLLM kept

`improvement` runs real self-play rounds through `selfplay run` (the same flow, a temporary Prefect server when
PREFECT_API_URL is unset) on the generated checkable workload (`tools.checkable`: bundled:checkable_train and
bundled:checkable_eval) with the verifier as the judge (`judge.verifier.fallback: none`, so no LLM call at all), a
tournament over K samples (K verifier calls a prompt, best against worst), and prints, per round: held-out greedy
accuracy with its 95% Wilson interval, the samples' accuracy, the pairs kept, the verdicts' sources and the
seconds the round took, by stage. The gate is off, so each round builds on the last; the target on the full
workload is round 3's accuracy at least 2.5 times round 0's.

`knockout` measures `judge.pairing: knockout` (about 3K/2 pairs asked) against the all-pairs tournament (K(K-1)/2):
on simulated judges of several noise levels over known sample strengths (the share of prompts where each finds the
true best and worst, and where they agree), and replayed on the all-pairs judgments.parquet files given (a run's
`round_<k>/judge/`), where only agreement can be measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

from selfplay.evaluation.audit import audit_line
from selfplay.runtime.rundir import STAGES, RunDir

RECIPE = Path(__file__).resolve().parents[1] / "deployments" / "recipes" / "bench-improvement.yaml"
# `--judge checking`: an outside judge in the loop. The checking judge (tools.checking_judge, over the endpoint path)
# decides every pair (the verifier decides none: kind none); it reads the final number and nothing else, so, unlike
# the verifier, it credits a cut-off answer whose last number is right. The judge audit checks it against the 'auto'
# verifier every round.
CHECKING = ["judge.backend=endpoint", "judge.endpoint.model=checker", "judge.mode=logprobs", "judge.verifier.kind=none",
            "judge.audit.size=24"]
TINY = ["rounds=1", "prompts.per_round=12", "sample.num_samples=4", "prompts.accuracy_size=8", "prompts.eval_size=2",
        "sample.max_new_tokens=24", "evaluate.max_new_tokens=24", "train.min_pairs=1"]


def _stage_seconds(run: RunDir, k: int) -> dict[str, float]:
    out = {}
    for stage in STAGES:
        if run.is_done(k, stage):
            m = run.manifest(k, stage)  # from entering the stage to its manifest, where recorded (began_at)
            out[stage] = (m["finished_at"] - m["began_at"]) if "began_at" in m else (
                m.get("metrics", {}).get("seconds") or m["finished_at"] - m["started_at"])
    return out


def improvement_rows(run: RunDir) -> list[dict[str, Any]]:
    """Round 0 and each completed round: accuracy [interval], sample accuracy, kept pairs, sources, seconds."""
    from selfplay.reporting.report import accuracy_curve

    summaries = [run.round_manifest(k) for k in run.completed_rounds()]
    rows: list[dict[str, Any]] = [p for p in accuracy_curve(summaries) if p["round"] == 0]
    for s in summaries:
        k = s["round"]
        sample = run.manifest(k, "sample")
        started = sample["started_at"] - sample["metrics"]["seconds"]  # the manifest is opened as the stage writes its output
        rows.append({"round": k, "accuracy": s.get("accuracy"), "ci": s.get("accuracy_ci"), "n": s.get("accuracy_n"),
                     "sample_accuracy": s.get("sample_accuracy"), "kept": s.get("kept"), "sources": s.get("verdict_sources"),
                     "seconds": s["finished_at"] - started if s.get("finished_at") else None,
                     "stages": _stage_seconds(run, k), "audit": s.get("judge_audit")})
    return rows


def format_improvement(rows: list[dict[str, Any]]) -> str:
    """The rounds as a table; with a judge audit in any round, its agreement with the verifier [interval] too."""
    from selfplay.reporting.report import audit_cell

    audited = any((r.get("audit") or {}).get("comparisons") for r in rows)
    lines = [f"{'round':>5}  {'held-out accuracy [95% CI]':>27}  {'samples correct':>15}  {'kept':>5}  {'verifier/llm':>12}  "
             + (f"{'judge vs verifier':>24}  " if audited else "") + f"{'seconds':>7}  by stage (s)"]
    for r in rows:
        acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]"
        src = "-" if not r.get("sources") else f"{r['sources'].get('verifier', 0)}/{r['sources'].get('llm', 0)}"
        sa = "-" if r.get("sample_accuracy") is None else f"{r['sample_accuracy']:.3f}"
        secs = "-" if r.get("seconds") is None else f"{r['seconds']:.0f}"
        stages = " ".join(f"{st} {v:.0f}" for st, v in (r.get("stages") or {}).items())
        judge = f"{(audit_cell(r.get('audit')) or '-'):>24}  " if audited else ""
        lines.append(f"{r['round']:>5}  {acc:>27}  {sa:>15}  {str(r.get('kept', '-')):>5}  {src:>12}  {judge}{secs:>7}  {stages}")
    if audited:
        lines += ["", *(f"round {r['round']}: {audit_line(r['audit'])}" for r in rows if r.get("audit"))]
    return "\n".join(lines)


def improvement(args: argparse.Namespace) -> int:
    from selfplay.cli import main as selfplay_main

    overrides = [f"name={args.name}", f"output_dir={args.output_dir}", f"rounds={args.rounds}", f"prompts.per_round={args.per_round}",
                 f"sample.num_samples={args.samples}"] + (TINY if args.tiny else [])
    started = time.time()
    with contextlib.ExitStack() as stack:
        if args.judge == "checking":
            from tools.checking_judge import CheckingJudge

            checker = stack.enter_context(CheckingJudge())
            overrides += CHECKING + [f"judge.endpoint.base_url={checker.base_url}"]
        overrides += args.set or []
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
    from selfplay.reporting.report import accuracy_trend

    trend = accuracy_trend(run)
    if trend:
        print(trend)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return code


SPEED_RECIPE = Path(__file__).resolve().parents[1] / "deployments" / "recipes" / "bench-speed.yaml"
SPEED_TINY = ["prompts.per_round=8", "sample.num_samples=4", "prompts.eval_size=4", "prompts.accuracy_size=4", "train.min_pairs=1"]


def _peak_rss_gb() -> float:
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 2**20  # KiB on Linux


def overhead_spans(run: RunDir, k: int, began: float, ended: float) -> list[tuple[str, float]]:
    """Where the time outside round k's stages went: (gap, seconds) before the first stage (the temporary server's
    start, preflight, the flow's start), between each two stages (model loads and hand-over that no stage
    counts, task starts), and after the last (the round's summary, artifacts, the server's stop). A stage's span
    is from entering its body (`began_at`) to its manifest (`finished_at`); its own `seconds` may be shorter."""
    spans = [(st, run.manifest(k, st).get("began_at"), run.manifest(k, st)["finished_at"]) for st in STAGES if run.is_done(k, st)]
    out, last, previous = [], began, "start"
    for st, start, finish in spans:
        start = start if start is not None else finish - (run.manifest(k, st).get("metrics", {}).get("seconds") or 0)
        out.append((f"{previous} -> {st}", max(0.0, start - last)))
        last, previous = finish, st
    out.append((f"{previous} -> end", max(0.0, ended - last)))
    return out


def speed_figures(run: RunDir, wall_s: float, began: float | None = None) -> dict[str, Any]:
    """What a round of `selfplay run` cost: seconds per stage, per kept pair, throughputs, and the orchestration
    overhead (the run's wall time minus its stages' own time: server start, preflight, flow and artifacts), with
    where it went (`overhead_spans`) when the run's start time `began` is given."""
    stages = _stage_seconds(run, 1)
    sample, judge, train = (run.manifest(1, st)["metrics"] for st in ("sample", "judge", "train"))
    kept = run.round_manifest(1).get("kept") or 0
    loop = sum(stages[st] for st in ("sample", "judge", "filter", "train"))
    return {"stages": stages, "kept": kept, "wall_s": wall_s,
            "per_kept_pair_s": (loop / kept) if kept else None,
            "per_kept_pair_with_eval_s": (wall_s / kept) if kept else None,
            "sample_tokens_per_s": sample.get("tokens_per_second"), "train_tokens_per_s": train.get("tokens_per_second"),
            "judge_calls": judge.get("calls"), "judge_calls_per_s": judge.get("calls", 0) / max(stages.get("judge", 0), 1e-9),
            "overhead_s": wall_s - sum(stages.values()), "overhead_share": (wall_s - sum(stages.values())) / wall_s,
            "overhead_spans": overhead_spans(run, 1, began, began + wall_s) if began is not None else None}


def plain_loop(prompts: list[dict[str, str]], cfg, workdir: Path) -> dict[str, Any]:
    """The reference: the same prompts through a plain in-process loop: batched `model.generate` (K return sequences
    per prompt), the number verifier in-process (best against worst), a bare TRL DPOTrainer with the same LoRA and
    DPO settings (gradient checkpointing off, as selfplay runs on CPU), merged and saved."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from selfplay.inputs.models import resolve_model
    from selfplay.judging.verifiers import number_score, parse_number

    s, t = cfg.sample, cfg.train
    path = str(resolve_model(cfg.policy.model))
    out: dict[str, Any] = {}
    started = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    out["load_s"] = time.perf_counter() - started
    torch.manual_seed(s.seed + 1)
    texts = [tok.apply_chat_template([{"role": "user", "content": p["prompt"]}], tokenize=False, add_generation_prompt=True) for p in prompts]
    per_call = max(1, s.batch_size // s.num_samples)
    started, completions, new_tokens = time.perf_counter(), [], 0
    for i in range(0, len(texts), per_call):
        enc = tok(texts[i:i + per_call], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            gen = model.generate(**enc, do_sample=True, temperature=s.temperature, top_p=s.top_p, max_new_tokens=s.max_new_tokens,
                                 num_return_sequences=s.num_samples, pad_token_id=tok.pad_token_id)
        rows = gen[:, enc["input_ids"].shape[1]:]
        new_tokens += int((rows != tok.pad_token_id).sum())
        completions += tok.batch_decode(rows, skip_special_tokens=True)
    out["sample_s"] = time.perf_counter() - started
    out["sample_tokens_per_s"] = new_tokens / out["sample_s"]
    started, records = time.perf_counter(), []
    for i, p in enumerate(prompts):
        answers = completions[i * s.num_samples:(i + 1) * s.num_samples]
        if parse_number(str(p.get("reference"))) is None:
            continue
        scores = [number_score(a, str(p["reference"])) for a in answers]
        best, worst = max(range(len(scores)), key=scores.__getitem__), min(range(len(scores)), key=scores.__getitem__)
        if scores[best] > scores[worst]:
            records.append({"prompt": [{"role": "user", "content": p["prompt"]}],
                            "chosen": [{"role": "assistant", "content": answers[best].strip()}],
                            "rejected": [{"role": "assistant", "content": answers[worst].strip()}]})
    out["score_s"] = time.perf_counter() - started
    out["kept"] = len(records)
    tok.padding_side = "right"
    started = time.perf_counter()
    dpo = dict(t.dpo)
    args = DPOConfig(output_dir=str(workdir / "plain-dpo"), per_device_train_batch_size=dpo["per_device_train_batch_size"],
                     learning_rate=dpo["learning_rate"], beta=dpo["beta"], max_length=dpo["max_length"], num_train_epochs=1,
                     gradient_checkpointing=False, use_cpu=not torch.cuda.is_available(), report_to=[], save_strategy="no",
                     logging_steps=1, disable_tqdm=True, seed=cfg.seed)
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(records), processing_class=tok,
                         peft_config=LoraConfig(task_type="CAUSAL_LM", **t.lora))
    trainer.train()
    out["train_steps"] = trainer.state.global_step
    out["train_s"] = time.perf_counter() - started
    started = time.perf_counter()
    merged = trainer.model.merge_and_unload()
    merged.save_pretrained(workdir / "plain-checkpoint")
    out["merge_save_s"] = time.perf_counter() - started
    out["total_s"] = out["sample_s"] + out["score_s"] + out["train_s"] + out["merge_save_s"]
    out["per_kept_pair_s"] = out["total_s"] / out["kept"] if out["kept"] else None
    return out


def format_speed(ours: dict[str, Any], plain: dict[str, Any] | None) -> str:
    st = ours["stages"]
    lines = ["stage                  selfplay (s)   plain loop (s)"]
    pairs = [("sample", st.get("sample"), plain and plain["sample_s"]), ("judge / score", st.get("judge"), plain and plain["score_s"]),
             ("filter", st.get("filter"), None), ("train (+ merge, save)", st.get("train"), plain and plain["train_s"] + plain["merge_save_s"]),
             ("evaluate", st.get("evaluate"), None), ("publish", st.get("publish"), None)]
    for name, a, b in pairs:
        if a is None and b is None:
            continue
        lines.append(f"{name:<22} {'-' if a is None else f'{a:.1f}':>12}   {'-' if b is None else f'{b:.1f}':>14}")
    lines.append(f"{'kept pairs':<22} {ours['kept']:>12}   {'-' if plain is None else plain['kept']:>14}")
    lines.append("")
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    lines.append(f"seconds per kept pair (sample to trained checkpoint): {fmt(ours['per_kept_pair_s'], '.2f')}"
                 + (f"   plain loop: {fmt(plain['per_kept_pair_s'], '.2f')}" if plain else ""))
    if plain and ours["per_kept_pair_s"] and plain["per_kept_pair_s"]:
        lines.append(f"selfplay / plain loop, per kept pair: {ours['per_kept_pair_s'] / plain['per_kept_pair_s']:.2f}")
    lines.append(f"seconds per kept pair, the whole run (evaluation, server start, preflight included): {fmt(ours['per_kept_pair_with_eval_s'], '.2f')}")
    lines.append(f"sampling: {fmt(ours['sample_tokens_per_s'], '.0f')} tokens/s" + (f" (plain loop {plain['sample_tokens_per_s']:.0f})" if plain else "")
                 + f"; training: {fmt(ours['train_tokens_per_s'], '.0f')} tokens/s; judge: {ours['judge_calls']} calls, "
                 f"{fmt(ours['judge_calls_per_s'], '.0f')} calls/s")
    lines.append(f"orchestration overhead: {ours['overhead_s']:.1f} s of {ours['wall_s']:.1f} s ({100 * ours['overhead_share']:.1f} %)"
                 + (f"; before both clocks, importing torch, transformers, peft and trl took {ours['import_s']:.1f} s" if ours.get("import_s") else ""))
    if ours.get("overhead_spans"):
        lines.append("  outside the stages: " + ", ".join(f"{gap} {sec:.1f} s" for gap, sec in ours["overhead_spans"]))
    lines.append(f"peak RSS: {_peak_rss_gb():.2f} GB")
    return "\n".join(lines)


def speed(args: argparse.Namespace) -> int:
    import tempfile

    import pandas as pd

    from selfplay.cli import main as selfplay_main
    from selfplay.config.run import load_config
    from tools.checking_judge import CheckingJudge

    overrides = [f"name={args.name}", f"output_dir={args.output_dir}"] + (SPEED_TINY if args.tiny else []) + (args.set or [])
    # The libraries every round needs are imported before either clock starts, as the plain loop has them: their
    # import (several seconds on 2 cores) is Python's cost, not orchestration's. It is printed on its own.
    began = time.time()
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import trl  # noqa: F401

    import_s = time.time() - began
    with CheckingJudge() as checker:
        overrides.append(f"judge.endpoint.base_url={checker.base_url}")
        started = time.time()
        code = selfplay_main(["run", "--config", str(args.recipe), *sum((["--set", o] for o in overrides), [])])
        wall = time.time() - started
    if code != 0:
        return code
    run = RunDir(Path(args.output_dir) / args.name)
    ours = speed_figures(run, wall, started)
    ours["import_s"] = import_s
    plain = None
    if not args.no_plain:
        cfg = load_config(str(args.recipe), overrides)
        samples = pd.read_parquet(run.stage_dir(1, "sample") / "samples.parquet").drop_duplicates("prompt_id")
        prompts = [{"id": r.prompt_id, "prompt": r.prompt, "reference": r.reference} for r in samples.itertuples()]
        with tempfile.TemporaryDirectory() as tmp:
            plain = plain_loop(prompts, cfg, Path(tmp))
    print(f"\nspeed benchmark ({run.root}): 1 round, {len(pd.read_parquet(run.stage_dir(1, 'sample') / 'samples.parquet'))} "
          f"completions, checking judge at ~1 ms a call\n")
    print(format_speed(ours, plain))
    if load_config(str(args.recipe), overrides).judge.pairing == "tournament":
        judgments = pd.read_parquet(run.stage_dir(1, "judge") / "judgments.parquet")
        print(format_knockout("knockout replayed on these", ours.setdefault("knockout", knockout_figures(judgments))))
    if args.json:
        Path(args.json).write_text(json.dumps({"selfplay": ours, "plain": plain}, indent=1, default=str))
    return 0


def simulated_judgments(n_prompts: int, k: int, noise: float, seed: int, position_bias: float = 0.5, margin: float = 0.1):
    """An all-pairs judgments table from a simulated judge, and each prompt's true (best, worst): sample strengths
    are N(0, 1); each order's P(A wins) = sigmoid((s_A - s_B) / noise + position_bias + N(0, noise)), and the two
    orders combine as every judge's do (`combine_orders`)."""
    import math
    import random

    import pandas as pd

    from selfplay.judging.verdicts import combine_orders
    from selfplay.pairs.build import PAIR_COLUMNS, judgments_table

    rng = random.Random(seed)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    rows, verdicts, truth = [], [], {}
    for n in range(n_prompts):
        strength = [rng.gauss(0, 1) for _ in range(k)]
        truth[f"p{n}"] = (max(range(k), key=strength.__getitem__), min(range(k), key=strength.__getitem__))
        for i in range(k):
            for j in range(i + 1, k):
                d = (strength[i] - strength[j]) / noise
                p1, p2 = sig(d + position_bias + rng.gauss(0, noise)), sig(-d + position_bias + rng.gauss(0, noise))
                rows.append({"prompt_id": f"p{n}", "prompt": f"prompt {n}", "reference": None, "i": i, "j": j,
                             "response_1": f"p{n} sample {i}", "response_2": f"p{n} sample {j}", "truncated_1": False, "truncated_2": False,
                             "similarity": 0.0, "verify_1": None, "verify_2": None, "screened": None})
                verdicts.append({"p_a_order1": p1, "p_a_order2": p2, **combine_orders(p1, p2, margin), "mode": "logprobs", "error": None,
                                 "source": "llm"})
    return judgments_table(pd.DataFrame(rows, columns=PAIR_COLUMNS), verdicts), truth


def knockout_figures(judgments, truth: dict[str, tuple[int, int]] | None = None) -> dict[str, Any]:
    """`knockout_agreement`, and with the true (best, worst) per prompt, how often each pairing finds them."""
    from selfplay.pairs.selection import kept_pairs, knockout_agreement, select_pairs

    out = knockout_agreement(judgments)
    if truth:
        for name in ("tournament", "knockout"):
            picks = kept_pairs(select_pairs(judgments, name))
            out[f"{name}_kept"] = len(picks) / len(truth)
            out[f"{name}_true_best"] = sum(truth[p][0] == c for p, (c, _) in picks.items()) / len(truth)
            out[f"{name}_true_worst"] = sum(truth[p][1] == r for p, (_, r) in picks.items()) / len(truth)
    return out


def format_knockout(label: str, f: dict[str, Any]) -> str:
    pct = lambda v: "-" if v is None else f"{100 * v:.0f}%"  # noqa: E731
    line = (f"{label:<28} LLM calls {f['llm_calls_knockout']:>6} vs {f['llm_calls_all_pairs']:>6} all pairs; of {f['prompts']} tournament "
            f"pairs the knockout keeps {pct(f['pair_kept'])}, chosen among the best {pct(f['chosen_is_best'])}, rejected among the worst "
            f"{pct(f['rejected_is_worst'])}, the same pair {pct(f['same_pair'])}")
    if "tournament_true_best" in f:
        line += (f"\n{'':<28} true best / worst found: tournament {pct(f['tournament_true_best'])} / {pct(f['tournament_true_worst'])}, "
                 f"knockout {pct(f['knockout_true_best'])} / {pct(f['knockout_true_worst'])} (prompts with a pair: "
                 f"{pct(f['tournament_kept'])}, {pct(f['knockout_kept'])})")
    return line


def knockout_bench(args: argparse.Namespace) -> int:
    import pandas as pd

    print(f"knockout against all pairs, K={args.samples}: simulated judges over {args.prompts} prompts (noise: the judge's "
          "temperature and the spread of its own error; position bias 0.5 in logit)\n")
    results: dict[str, Any] = {}
    for noise in args.noise:
        table, truth = simulated_judgments(args.prompts, args.samples, noise, seed=args.seed)
        results[f"noise={noise}"] = f = knockout_figures(table, truth)
        print(format_knockout(f"simulated, noise {noise}", f))
    for path in args.judgments:
        table = pd.read_parquet(path)
        results[str(path)] = f = knockout_figures(table)
        print(format_knockout(Path(path).parent.parent.name + "/" + Path(path).name, f))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


CPU_VLLM_RECIPE = Path(__file__).resolve().parents[1] / "deployments" / "recipes" / "cpu-vllm.yaml"
SERVING_VARIANTS = {  # label -> overrides over the CPU vLLM recipe
    "transformers (in-process)": ["sample.backend=transformers"],
    "vLLM, a server per stage": ["sample.server_scope=stage"],
    "vLLM, one kept server": ["sample.server_scope=run"],
}


def server_starts(run: RunDir) -> list[float]:
    """The seconds each vLLM start of the run took to turn healthy (every server log under the run directory)."""
    import re

    out = []
    for log in sorted(run.root.rglob("*server*.log")):
        out += [float(x) for x in re.findall(r"\] healthy after ([\d.]+) s$", log.read_text(errors="replace"), re.M)]
    return out


def serving_figures(run: RunDir, rounds: int, wall_s: float) -> dict[str, Any]:
    """Per round: seconds by stage; for the run: vLLM starts and their seconds, kept pairs, seconds per kept pair."""
    per_round = [_stage_seconds(run, k) for k in range(1, rounds + 1) if run.round_done(k)]
    kept = sum(run.round_manifest(k).get("kept") or 0 for k in range(1, rounds + 1) if run.round_done(k))
    starts = server_starts(run)
    return {"rounds": len(per_round), "stages": {st: sum(r.get(st, 0.0) for r in per_round) for st in STAGES},
            "starts": len(starts), "start_s": sum(starts), "kept": kept, "wall_s": wall_s,
            "per_kept_pair_s": wall_s / kept if kept else None}


def format_serving(rows: dict[str, dict[str, Any]]) -> str:
    head = f"{'sampler':<26} {'rounds':>6} {'starts':>6} {'start s':>7} " + " ".join(f"{st + ' s':>10}" for st in STAGES) + \
           f" {'wall s':>7} {'kept':>5} {'s/kept pair':>11}"
    lines = [head]
    for label, f in rows.items():
        per_pair = f"{f['per_kept_pair_s']:.1f}" if f["per_kept_pair_s"] else "-"
        lines.append(f"{label:<26} {f['rounds']:>6} {f['starts']:>6} {f['start_s']:>7.0f} "
                     + " ".join(f"{f['stages'][st]:>10.1f}" for st in STAGES) + f" {f['wall_s']:>7.0f} {f['kept']:>5} {per_pair:>11}")
    stage, kept = rows.get("vLLM, a server per stage"), rows.get("vLLM, one kept server")
    if stage and kept and stage["starts"]:
        saved = (stage["starts"] - kept["starts"]) * stage["start_s"] / stage["starts"]
        lines.append(f"\nkept server: {kept['starts']} start(s) for {kept['rounds']} round(s), against {stage['starts']}; its run took "
                     f"{kept['wall_s']:.0f} s, the per-stage run {stage['wall_s']:.0f} s less its extra start-ups "
                     f"({saved:.0f} s) = {stage['wall_s'] - saved:.0f} s: target {'met' if kept['wall_s'] <= stage['wall_s'] - saved + 1e-9 else 'missed'} "
                     f"(no more than that)")
    return "\n".join(lines)


def serving(args: argparse.Namespace) -> int:
    """The same rounds (same seeds and prompts) three ways: transformers in-process, vLLM per stage, vLLM kept."""
    from selfplay.cli import main as selfplay_main

    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = [f"output_dir={args.output_dir}", f"rounds={args.rounds}", f"prompts.per_round={args.per_round}",
            f"sample.num_samples={args.samples}", f"sample.max_new_tokens={args.max_new_tokens}",
            f"evaluate.max_new_tokens={args.max_new_tokens}", f"prompts.eval_size={args.eval_size}",
            f"prompts.accuracy_size={args.accuracy_size}", "gate.enabled=false", "train.min_pairs=4", "filter.drop_truncated=false",
            *(args.set or [])]
    rows = {}
    for label, over in SERVING_VARIANTS.items():
        name = f"bench-serving-{stamp}-{over[0].split('=')[1]}"
        started = time.time()
        code = selfplay_main(["run", "--config", str(args.recipe), *sum((["--set", o] for o in [f"name={name}", *base, *over]), [])])
        if code != 0:
            return code
        rows[label] = serving_figures(RunDir(Path(args.output_dir) / name), args.rounds, time.time() - started)
    print(f"\nserving benchmark: {args.rounds} round(s) of {args.recipe} ({args.per_round} prompts x {args.samples}, "
          f"{args.max_new_tokens} tokens), the same seeds each way; seconds per stage summed over the rounds\n")
    print(format_serving(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="bench", required=True)
    p = sub.add_parser("improvement", help="held-out accuracy per round on the checkable workload, with the verifier")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--per-round", type=int, default=128)
    p.add_argument("--samples", type=int, default=8, help="K, samples per prompt")
    p.add_argument("--recipe", default=str(RECIPE))
    p.add_argument("--name", default="bench-improvement")
    p.add_argument("--output-dir", default="runs")
    p.add_argument("--tiny", action="store_true", help="a minute-long version that checks the pipeline runs (CI)")
    p.add_argument("--judge", choices=["verifier", "checking"], default="verifier",
                   help="who decides the pairs: the verifier (the recipe), or the checking judge over the endpoint path, audited")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="more config overrides")
    p.add_argument("--json", help="also write the rows as JSON here")
    q = sub.add_parser("speed", help="one round's cost by stage and per kept pair, beside a plain in-process loop")
    q.add_argument("--recipe", default=str(SPEED_RECIPE))
    q.add_argument("--name", default=f"bench-speed-{time.strftime('%Y%m%d-%H%M%S')}")
    q.add_argument("--output-dir", default="runs")
    q.add_argument("--tiny", action="store_true", help="a small version that checks the benchmark runs (CI)")
    q.add_argument("--no-plain", action="store_true", help="skip the plain reference loop")
    q.add_argument("--set", action="append", metavar="KEY=VALUE", help="more config overrides")
    q.add_argument("--json", help="also write the figures as JSON here")
    r = sub.add_parser("knockout", help="judge.pairing knockout against the all-pairs tournament: simulated judges, recorded judgments")
    r.add_argument("judgments", nargs="*", help="all-pairs judgments.parquet files to replay (a tournament run's round_<k>/judge/)")
    r.add_argument("--prompts", type=int, default=500)
    r.add_argument("--samples", type=int, default=8, help="K, samples per prompt")
    r.add_argument("--noise", type=float, nargs="+", default=[0.1, 0.5, 1.0, 2.0])
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--json", help="also write the figures as JSON here")
    v = sub.add_parser("serving", help="the same rounds sampled by transformers, by vLLM with a server per stage, and by one kept vLLM")
    v.add_argument("--recipe", default=str(CPU_VLLM_RECIPE))
    v.add_argument("--rounds", type=int, default=2)
    v.add_argument("--per-round", type=int, default=24)
    v.add_argument("--samples", type=int, default=4, help="K, samples per prompt")
    v.add_argument("--max-new-tokens", type=int, default=32)
    v.add_argument("--eval-size", type=int, default=8)
    v.add_argument("--accuracy-size", type=int, default=24)
    v.add_argument("--output-dir", default="runs")
    v.add_argument("--set", action="append", metavar="KEY=VALUE", help="more config overrides")
    v.add_argument("--json", help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    return {"improvement": improvement, "speed": speed, "knockout": knockout_bench, "serving": serving}[args.bench](args)


if __name__ == "__main__":
    sys.exit(main())
