"""Stage 2, judge: every candidate pair asked in both orders, so position bias cancels (`selfplay.judging`).

The round's samples become candidate pairs of one prompt's completions (`selfplay.pairs.build_pairs`). Pairs the
filter would drop whatever the verdict (empty, truncated, near-duplicate, lopsided, over budget) are screened out
before judging, so no judge call is spent on them; they stay in the table, unjudged. Each remaining pair (r1, r2)
is one comparison for the judge, r1 as response_a; a verdict "first" prefers r1.

Output `round_<k>/judge/`: judgments.parquet (one row per pair, both orders' probabilities and the verdict) and
calls.parquet (one row per judge call: mode, label, tokens, latency, cost, cache hit).
"""

from __future__ import annotations

import time

import pandas as pd
from prefect import task
from prefect.cache_policies import NONE

from selfplay.config import RunConfig
from selfplay.judging import check_error_rate, run_judge
from selfplay.orchestration import Progress, run_logger, stage
from selfplay.pairs import build_pairs, judged_tables, pair_comparisons
from selfplay.rundir import RunDir


@task(name="judge", cache_policy=NONE)
@stage("judge")
def judge(cfg: RunConfig, k: int, reference: str) -> None:
    """Judge the round's candidate pairs with the configured judge (default: the round's reference model)."""
    log = run_logger()
    run = RunDir(cfg.run_dir)
    samples = pd.read_parquet(run.stage_dir(k, "sample") / "samples.parquet")
    pairs = build_pairs(samples, cfg.judge.pairing, cfg.seed + k, cfg.filter, cfg.judge.max_calls_per_prompt)
    todo = int(pairs["screened"].isna().sum())
    started = time.time()
    log.info(
        "round %d: judging %d of %d candidate pairs x 2 orders with the %s judge (screened out: %s)",
        k, todo, len(pairs), cfg.judge.backend, pairs["screened"].value_counts().to_dict(),
    )
    bar = Progress(f"{cfg.name} round {k}: judging {todo} pairs x 2 orders")

    def progress(done: int, total: int) -> None:
        bar.update(done, total)
        log.info("round %d: judge calls %d/%d (%.0f s)", k, done, total, time.time() - started)

    [judged], peak = run_judge(cfg, reference, [pair_comparisons(pairs)], run.round_dir(k), f"round {k} judge", log, progress,
                               server_log=run.round_dir(k) / "judge-server.log")
    table, calls, stats = judged_tables(pairs, judged)
    stats["peak_gpu_gb"] = peak
    stats["seconds"] = time.time() - started
    check_error_rate(table, cfg.judge.max_error_rate, k, cfg.judge, stats["unreadable_replies"])  # before anything is published
    judge_model = cfg.judge.endpoint.model if cfg.judge.backend == "endpoint" else cfg.judge.model
    with run.stage_output(k, "judge", {"judge": cfg.judge.backend, "judge_model": judge_model, "reference": reference}) as (out, manifest):
        calls.to_parquet(out / "calls.parquet", index=False)
        table.to_parquet(out / "judgments.parquet", index=False)
        manifest["metrics"] = stats
    log.info(
        "round %d: judged %d pairs in %.0f s; position consistency %.2f; verdicts %s",
        k, len(table), stats["seconds"], stats["position_consistency"] or 0.0, stats["verdicts"],
    )
