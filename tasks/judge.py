"""Stage 2, judge: every candidate pair asked in both orders, so position bias cancels (`selfplay.judging.runner`).

The judge is hybrid: where a prompt has a reference answer, the verifier scores each of its samples once
(`selfplay.judging.verifiers`) and decides between two that score differently; the LLM judge decides the rest.

The round's samples become candidate pairs of one prompt's completions (`selfplay.pairs.build.build_pairs`). Pairs the
filter would drop whatever the verdict (empty, truncated, near-duplicate, lopsided, over budget) are screened out
before judging, so no judge call is spent on them; they stay in the table, unjudged. Each remaining pair (r1, r2)
is one comparison for the judge, r1 as response_a; a verdict "first" prefers r1.

Output `round_<k>/judge/`: judgments.parquet (one row per pair: both orders' probabilities, the verifier's scores,
the verdict and its source), calls.parquet (one row per LLM judge call: mode, label, tokens, latency, cost, cache
hit) and scores.parquet (one row per sample: its verifier and score, null where none applies).
"""

from __future__ import annotations

import time

import pandas as pd
from prefect import task
from prefect.cache_policies import NONE

from selfplay.config.run import RunConfig
from selfplay.evaluation.audit import audit_line, audit_stats, pick_audit
from selfplay.judging.runner import run_judge
from selfplay.judging.verdicts import JudgeFailed, check_error_rate, llm_count, verifier_verdict
from selfplay.judging.verifiers import Verifier, score_table, verifier_stats
from selfplay.pairs.build import build_pairs, judged_tables, pair_comparisons
from selfplay.pairs.knockout import KnockoutPhases, max_matches
from selfplay.runtime.rundir import RunDir, pinned_by
from selfplay.runtime.stages import Progress, run_logger, stage


def audit_sample(pairs: pd.DataFrame, size: float, seed: int) -> tuple[pd.DataFrame, list]:
    """The comparisons of the judge audit: of the unscreened pairs the verifier decides (one response scores higher),
    `size` picked (`pick_audit`), as comparisons the LLM judge must answer (the verifier's scores taken away, the
    reference kept, as any judge prompt on a prompt with one shows it). Returns their rows (prompt_id, i, j, the
    verifier's winner `truth`, the two responses' lengths in characters) and the comparisons, in the same order."""
    columns = ["prompt_id", "i", "j", "truth", "len_1", "len_2"]
    decided = []
    for row, c in zip(pairs[pairs["screened"].isna()].to_dict("records"), pair_comparisons(pairs, "all_pairs")):
        verdict = verifier_verdict(c._replace(llm_on_tie=False))
        if verdict is not None and verdict["verdict"] in ("first", "second"):
            decided.append(({"prompt_id": row["prompt_id"], "i": row["i"], "j": row["j"], "truth": verdict["verdict"],
                             "len_1": len(c.response_a), "len_2": len(c.response_b)}, c._replace(score_a=None, score_b=None)))
    picked = [decided[i] for i in pick_audit(len(decided), size, seed)]
    return pd.DataFrame([r for r, _ in picked], columns=columns), [c for _, c in picked]


def audit_pairs(cfg: RunConfig, k: int, pairs: pd.DataFrame, raw: pd.DataFrame) -> pd.DataFrame:
    """The candidate pairs the audit picks from: the round's own, or, where `judge.verifier.kind` is 'none' (the LLM
    judges every prompt, those with a reference too), the same pairs scored by the 'auto' verifier, which then only
    checks the judge and decides no label."""
    if cfg.judge.audit.size == 0 or cfg.judge.verifier.kind != "none":
        return pairs
    truth = Verifier(cfg.judge.verifier.model_copy(update={"kind": "auto"}))
    return build_pairs(score_table(truth, raw), cfg.judge.pairing, cfg.seed + k, cfg.filter, cfg.judge.max_calls_per_prompt)


@task(name="judge", cache_policy=NONE)
@stage("judge")
def judge(cfg: RunConfig, k: int, reference: str) -> None:
    """Judge the round's candidate pairs with the configured judge (default: the round's reference model)."""
    log = run_logger()
    run = RunDir(cfg.run_dir)
    started = time.time()
    raw = pd.read_parquet(run.stage_dir(k, "sample") / "samples.parquet")
    samples = score_table(Verifier(cfg.judge.verifier), raw)
    pairs = build_pairs(samples, cfg.judge.pairing, cfg.seed + k, cfg.filter, cfg.judge.max_calls_per_prompt)
    knockout = cfg.judge.pairing == "knockout"
    comparisons = KnockoutPhases(pairs) if knockout else pair_comparisons(pairs, cfg.judge.pairing)
    if knockout:
        n = samples.groupby("prompt_id").size()
        bound = sum(max_matches(int(m)) for m in n)
        log.info("round %d: a knockout over %d prompts: at most %d of %d candidate pairs asked, in phases, x 2 orders by the %s judge "
                 "where the verifier does not decide (screened out: %s)", k, len(n), bound, len(pairs), cfg.judge.backend,
                 pairs["screened"].value_counts().to_dict())
    else:
        todo, asked = len(comparisons), llm_count(comparisons, cfg.judge)
        log.info(
            "round %d: judging %d of %d candidate pairs: %d by the verifier, %d x 2 orders by the %s judge (screened out: %s)",
            k, todo, len(pairs), todo - asked, asked, cfg.judge.backend, pairs["screened"].value_counts().to_dict(),
        )
    bar = Progress(f"{cfg.name} round {k}: judging pairs x 2 orders" if knockout else f"{cfg.name} round {k}: judging {asked} pairs x 2 orders")

    def progress(done: int, total: int) -> None:
        bar.update(done, total)
        elapsed = time.time() - started
        log.info("round %d: judge calls %d/%d (%.2f calls/s, %.0f s)", k, done, total, done / max(elapsed, 1e-9), elapsed)

    audit_rows, audited = audit_sample(audit_pairs(cfg, k, pairs, raw), cfg.judge.audit.size, cfg.seed + k)
    [judged, *audit], peak = run_judge(cfg, reference, [comparisons, audited] if audited else [comparisons], run.round_dir(k),
                                       f"round {k} judge", log, progress, server_log=run.round_dir(k) / "judge-server.log")
    table, calls, stats = judged_tables(pairs, judged)
    stats.update(verifier_stats(samples))
    verdicts = audit[0].verdicts if audit else []
    audit_table = audit_rows.assign(**{c: [v[c] for v in verdicts] for c in ("verdict", "p_first", "consistent", "mode")})
    stats["audit"] = audit_stats(audit_rows["truth"].tolist(), verdicts, audit_rows["len_1"].tolist(), audit_rows["len_2"].tolist())
    stats["audit"]["on_chance"] = cfg.judge.audit.on_chance
    spent = audit[0].results if audit else []  # the audit's own cost, apart from the round's calls
    stats["audit"].update(calls=len(spent), tokens=sum((r.tokens_in or 0) + (r.tokens_out or 0) for r in spent),
                          seconds=sum(r.latency_s or 0.0 for r in spent))
    stats["audit"]["truth"] = "auto verifier (audit only)" if cfg.judge.verifier.kind == "none" else "verifier"
    stats["audit_line"] = audit_line(stats["audit"])
    log.info("round %d: %s", k, stats["audit_line"])
    if stats["audit"]["informative"] is False and cfg.judge.audit.on_chance == "fail":
        raise JudgeFailed(f"round {k}: {stats['audit_line']}. judge.audit.on_chance=fail: the LLM judge's verdicts are no better than chance "
                          f"on comparisons the verifier decides. Use a stronger judge (judge.backend endpoint or vllm, judge.model), or set "
                          f"judge.audit.on_chance to drop (train on the verifier's pairs only) or warn"
                          + (f"; {by} used the judge's settings, so that means a new run (--set name=...)." if (by := pinned_by(run, "judge.template"))
                             else "; no completed stage has used these settings yet, so they may change for a rerun."))
    stats["peak_gpu_gb"] = peak
    stats["seconds"] = time.time() - started
    if cfg.judge.backend == "endpoint":
        from selfplay.serving.probe import remembered

        stats["endpoint"] = remembered(cfg.judge.endpoint)  # what the endpoint was probed to honour
    check_error_rate(table, cfg.judge.max_error_rate, k, cfg.judge, stats["unreadable_replies"],  # before anything is published
                     pinned_by(run, "judge.template"))
    judge_model = cfg.judge.endpoint.model if cfg.judge.backend == "endpoint" else cfg.judge.model
    with run.stage_output(k, "judge", {"judge": cfg.judge.backend, "judge_model": judge_model, "reference": reference}) as (out, manifest):
        calls.to_parquet(out / "calls.parquet", index=False)
        samples[["prompt_id", "sample_idx", "verifier", "verify_score"]].to_parquet(out / "scores.parquet", index=False)
        table.to_parquet(out / "judgments.parquet", index=False)
        audit_table.to_parquet(out / "audit.parquet", index=False)
        manifest["metrics"] = stats
    costs = "; ".join(f"{m}: {c['calls']} calls, {c['tokens_in_per_call'] + c['tokens_out_per_call']:.0f} tokens "
                      f"({c['tokens_out_per_call']:.0f} out) and {c['seconds_per_call']:.2f} s per call" for m, c in stats["per_mode"].items())
    log.info(
        "round %d: judged %d pairs in %.0f s (decided by the verifier %d, by the LLM %d); position consistency %.2f; verdicts %s%s",
        k, len(table), stats["seconds"], stats["sources"]["verifier"], stats["sources"]["llm"], stats["position_consistency"] or 0.0,
        stats["verdicts"], f"; {costs}" if costs else "",
    )
