"""Stage 2, judge: every candidate pair asked in both orders, so position bias cancels.

For a pair (r1, r2) the judge is asked twice: order 1 puts r1 in position A, order 2 puts r2 there. With p1 and p2
the probabilities that position A wins in each order, the swap-averaged preference for r1 is

    p = (p1 + (1 - p2)) / 2

so a judge that always favours position A (p1 = p2 = 1) comes out at exactly 0.5: a tie. The pair's margin is
|2p - 1|; below `judge.margin` it is a tie, which the filter stage drops. Both orders' probabilities are stored.
Pairs the filter would drop whatever the verdict (empty, truncated, near-duplicate responses) are screened out
before judging (`tasks.filter.screen`), so no judge call is spent on them; they are kept in the table, unjudged.

Output `round_<k>/judge/judgments.parquet`, one row per pair.
"""

from __future__ import annotations

import itertools
import random
import re
import time
from collections.abc import Callable
from importlib.resources import files
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from selfplay.config import FilterConfig, JudgeConfig, RunConfig
from selfplay.judges import Judge, JudgeCall, JudgeResult, make_judge
from selfplay.models import release_memory
from selfplay.rundir import RunDir
from tasks.filter import screen, similarity

PAIR_COLUMNS = ["prompt_id", "prompt", "i", "j", "response_1", "response_2", "truncated_1", "truncated_2", "similarity", "screened"]
COLUMNS = PAIR_COLUMNS + ["p_a_order1", "p_a_order2", "p_first", "margin", "verdict", "consistent", "mode", "error"]
VERDICTS = ("first", "second", "tie", "inconsistent", "judge_error", "not_judged")
PLACEHOLDERS = ("prompt", "response_a", "response_b", "rubric")
FENCE_TAGS = ("request", "response_A", "response_B")


# ---------------------------------------------------------------- pure logic

def default_template() -> str:
    return files("selfplay").joinpath("data/templates/judge.txt").read_text()


def default_rubric() -> str:
    return files("selfplay").joinpath("data/templates/rubric.txt").read_text().strip()


def load_template(path: str | None) -> str:
    if path is None:
        return default_template()
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"judge.template: file not found: {p}")
    template = p.read_text()
    missing = [name for name in ("prompt", "response_a", "response_b") if "{" + name + "}" not in template]
    if missing:
        raise ValueError(f"judge.template {p}: missing placeholder(s) {', '.join('{' + m + '}' for m in missing)}")
    return template


def fence(text: str) -> str:
    """Neutralise anything in judged text that could forge the prompt's structure (our tags and placeholders).

    >>> fence("</response_A> <response_B> {rubric}")
    '&lt;/response_A> &lt;response_B> {\u200brubric}'
    """
    text = re.sub(r"<(/?)(" + "|".join(FENCE_TAGS) + r")\b", lambda m: "&lt;" + m.group(1) + m.group(2), text, flags=re.I)
    return re.sub(r"\{(" + "|".join(PLACEHOLDERS) + r")\}", lambda m: "{\u200b" + m.group(1) + "}", text)


def render_judge_prompt(template: str, prompt: str, response_a: str, response_b: str, rubric: str) -> str:
    """Fill the template in one pass, so text inserted for one placeholder is never re-read as another."""
    values = {"prompt": fence(prompt), "response_a": fence(response_a), "response_b": fence(response_b), "rubric": rubric}
    return re.sub(r"\{(" + "|".join(PLACEHOLDERS) + r")\}", lambda m: values[m.group(1)], template)


def combine_orders(p1: float | None, p2: float | None, margin: float) -> dict[str, Any]:
    """Combine the two orders of one pair (probability modes) into a verdict about (r1, r2).

    p1 = P(position A wins) with r1 in A; p2 = the same with r2 in A. The orders are averaged and the margin
    |2p - 1| decides between a winner and a tie. `consistent` records whether each order on its own picked the
    same response (the position-consistency statistic); it does not veto an averaged verdict.

    >>> combine_orders(1.0, 1.0, 0.1)["verdict"]      # always "A": pure position bias, cancelled to a tie
    'tie'
    >>> combine_orders(0.9, 0.2, 0.1)["verdict"]      # both orders prefer r1
    'first'
    >>> r = combine_orders(0.9, 0.6, 0.1); r["verdict"], r["consistent"]   # biased towards A, still prefers r1
    ('first', False)
    """
    if p1 is None or p2 is None:
        return {"p_first": None, "margin": None, "verdict": "judge_error", "consistent": None}
    p = (p1 + (1.0 - p2)) / 2.0
    m = abs(2.0 * p - 1.0)
    verdict = "tie" if m < margin or p == 0.5 else ("first" if p > 0.5 else "second")
    return {"p_first": p, "margin": m, "verdict": verdict, "consistent": (p1 > 0.5) == (p2 < 0.5)}


def candidate_pairs(n_samples: int, pairing: str, rng: random.Random) -> list[tuple[int, int]]:
    """Index pairs (i, j), i < j, among one prompt's completions.

    >>> candidate_pairs(3, "all_pairs", random.Random(0))
    [(0, 1), (0, 2), (1, 2)]
    """
    if n_samples < 2:
        return []
    if pairing == "all_pairs":
        return list(itertools.combinations(range(n_samples), 2))
    if pairing == "random_pair":
        return [tuple(sorted(rng.sample(range(n_samples), 2)))]
    raise ValueError(f"unknown pairing {pairing!r}")


def build_pairs(samples: pd.DataFrame, pairing: str, seed: int, filt: FilterConfig) -> pd.DataFrame:
    """One row per candidate pair of completions of the same prompt, screened with the filter's pre-judge checks."""
    rng = random.Random(seed)
    rows = []
    for prompt_id, group in samples.groupby("prompt_id", sort=False):
        g = group.sort_values("sample_idx").to_dict("records")
        for a, b in candidate_pairs(len(g), pairing, rng):
            r1, r2 = g[a]["response"], g[b]["response"]
            t1, t2 = bool(g[a]["truncated"]), bool(g[b]["truncated"])
            rows.append({
                "prompt_id": prompt_id, "prompt": g[a]["prompt"], "i": g[a]["sample_idx"], "j": g[b]["sample_idx"],
                "response_1": r1, "response_2": r2, "truncated_1": t1, "truncated_2": t2,
                "similarity": similarity(r1, r2), "screened": screen(r1, r2, t1, t2, filt),
            })
    return pd.DataFrame(rows, columns=PAIR_COLUMNS)


def swap_calls(pairs: pd.DataFrame, template: str, rubric: str, system: str) -> list[JudgeCall]:
    """Two calls per pair, interleaved: [pair0 order1, pair0 order2, pair1 order1, ...]."""
    calls = []
    for prompt, r1, r2 in zip(pairs["prompt"], pairs["response_1"], pairs["response_2"]):
        calls.append(JudgeCall(system, render_judge_prompt(template, prompt, r1, r2, rubric)))
        calls.append(JudgeCall(system, render_judge_prompt(template, prompt, r2, r1, rubric)))
    return calls


def judgments_table(pairs: pd.DataFrame, results: list[JudgeResult], margin: float) -> pd.DataFrame:
    """Attach both orders' results to the unscreened pairs (in order) and combine them; screened pairs stay unjudged."""
    judged = pairs["screened"].isna().tolist()
    assert len(results) == 2 * sum(judged)
    rows, n = [], 0
    for pair, is_judged in zip(pairs.to_dict("records"), judged):
        if not is_judged:
            rows.append({**pair, "verdict": "not_judged"})
            continue
        r1, r2 = results[2 * n], results[2 * n + 1]
        n += 1
        errors = "; ".join(e for e in (r1.error, r2.error) if e) or None
        rows.append({**pair, "p_a_order1": r1.p_a, "p_a_order2": r2.p_a, **combine_orders(r1.p_a, r2.p_a, margin), "mode": r1.mode, "error": errors})
    return pd.DataFrame(rows, columns=COLUMNS)


def judge_stats(table: pd.DataFrame, results: list[JudgeResult]) -> dict[str, Any]:
    """Per-round judge statistics over the judged pairs: consistency, position bias, tie / error rates, tokens."""
    judged = table[table["verdict"] != "not_judged"]
    n = len(judged)
    ok = judged[judged["verdict"] != "judge_error"]
    p_as = [r.p_a for r in results if r.p_a is not None]
    counts = table["verdict"].value_counts().to_dict()
    return {
        "pairs": len(table),
        "judged": n,
        "calls": len(results),
        "position_consistency": float(ok["consistent"].astype(bool).mean()) if len(ok) else None,
        "first_position_win_rate": float(sum(p > 0.5 for p in p_as) / len(p_as)) if p_as else None,
        "mean_margin": float(ok["margin"].mean()) if len(ok) else None,
        "verdicts": {v: int(counts.get(v, 0)) for v in VERDICTS},
        "tie_rate": counts.get("tie", 0) / n if n else None,
        "error_rate": counts.get("judge_error", 0) / n if n else None,
        "tokens_in": int(sum(r.tokens_in for r in results)),
        "tokens_out": int(sum(r.tokens_out for r in results)),
    }


def judge_pairs(
    judge: Judge, pairs: pd.DataFrame, cfg: JudgeConfig, progress: Callable[[int, int], None] | None = None, chunk: int = 64
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Ask `judge` both orders of every unscreened pair; return the judgments table and its statistics.

    Calls go to the backend `chunk` at a time, with `progress(done, total)` after each chunk.
    """
    template, rubric = load_template(cfg.template), default_rubric()
    calls = swap_calls(pairs[pairs["screened"].isna()], template, rubric, cfg.system_prompt)
    results: list[JudgeResult] = []
    for start in range(0, len(calls), chunk):
        results.extend(judge.judge(calls[start : start + chunk]))
        if progress:
            progress(len(results), len(calls))
    table = judgments_table(pairs, results, cfg.margin)
    return table, judge_stats(table, results)


# ---------------------------------------------------------------- task

@task(name="judge", cache_policy=NONE)
def judge(cfg: RunConfig, k: int, reference: str) -> dict[str, Any]:
    """Judge the round's candidate pairs with the configured judge (default: the round's reference model)."""
    log = get_run_logger()
    run = RunDir(cfg.run_dir)
    if run.is_done(k, "judge"):
        log.info("round %d: judge already complete, reusing %s", k, run.stage_dir(k, "judge"))
        return run.manifest(k, "judge")
    samples = pd.read_parquet(run.stage_dir(k, "sample") / "samples.parquet")
    pairs = build_pairs(samples, cfg.judge.pairing, cfg.seed + k, cfg.filter)
    started = time.time()
    log.info(
        "round %d: judging %d of %d candidate pairs x 2 orders with the %s judge (screened out: %s)",
        k, int(pairs["screened"].isna().sum()), len(pairs), cfg.judge.backend, pairs["screened"].value_counts().to_dict(),
    )
    backend = make_judge(cfg.judge, reference)
    try:
        table, stats = judge_pairs(
            backend, pairs, cfg.judge,
            progress=lambda done, total: log.info("round %d: judge calls %d/%d (%.0f s)", k, done, total, time.time() - started),
        )
    finally:
        backend.close()
        release_memory()
    stats["seconds"] = time.time() - started
    with run.stage_output(k, "judge", {"judge": cfg.judge.backend, "judge_model": cfg.judge.model, "reference": reference}) as (out, manifest):
        table.to_parquet(out / "judgments.parquet", index=False)
        manifest["metrics"] = stats
    log.info(
        "round %d: judged %d pairs in %.0f s; position consistency %.2f; verdicts %s",
        k, len(table), stats["seconds"], stats["position_consistency"] or 0.0, stats["verdicts"],
    )
    return run.manifest(k, "judge")
