"""Stage 2, judge: every candidate pair asked in both orders, so position bias cancels.

For a pair (r1, r2) the judge is asked twice: order 1 puts r1 in position A, order 2 puts r2 there. With p1 and p2
the probabilities that position A wins in each order, the swap-averaged preference for r1 is

    p = (p1 + (1 - p2)) / 2

so a judge that always favours position A (p1 = p2 = 1) comes out at exactly 0.5: a tie. The pair's margin is
|2p - 1|; below `judge.margin` it is a tie, which the filter stage drops. Discrete verdicts (an endpoint's
structured choice or text marker) must name the same response in both orders, or the pair is inconsistent
(`combine_orders` holds both rules). Pairs the filter would drop whatever the verdict (empty, truncated,
near-duplicate, lopsided, over budget) are screened out before judging (`tasks.filter.screen`), so no judge call
is spent on them; they stay in the table, unjudged.

Output `round_<k>/judge/`: judgments.parquet (one row per pair, both orders' probabilities and the verdict) and
calls.parquet (one row per judge call: mode, label, tokens, latency, cost, cache hit).
"""

from __future__ import annotations

import itertools
import random
import re
import time
from collections.abc import Callable, Sequence
from importlib.resources import files
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pandas as pd
from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from selfplay import isolate
from selfplay.config import FilterConfig, JudgeConfig, RunConfig
from selfplay.errors import SelfplayError
from selfplay.isolate import isolated
from selfplay.judges import Judge, JudgeCall, JudgeResult, make_judge
from selfplay.models import release_memory
from selfplay.orchestration import Progress, gpu_slot
from selfplay.rundir import RunDir
from tasks.filter import screen, similarity

PAIR_COLUMNS = ["prompt_id", "prompt", "i", "j", "response_1", "response_2", "truncated_1", "truncated_2", "similarity", "screened"]
COLUMNS = PAIR_COLUMNS + ["p_a_order1", "p_a_order2", "p_first", "margin", "verdict", "consistent", "mode", "error"]
VERDICTS = ("first", "second", "tie", "inconsistent", "invalid", "judge_error", "not_judged")
QUOTED_REPLIES, QUOTE_CHARS = 3, 200  # how much of the judge's unreadable replies a failure quotes
PLACEHOLDERS = ("prompt", "response_a", "response_b", "rubric")
FENCE_TAGS = ("request", "response_A", "response_B")


# ---------------------------------------------------------------- pure logic

def default_template() -> str:
    return files("selfplay").joinpath("data/templates/judge.txt").read_text()


def load_rubric(path: str | None) -> str:
    if path is None:
        return files("selfplay").joinpath("data/templates/rubric.txt").read_text().strip()
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"judge.rubric: file not found: {p}")
    return p.read_text().strip()


def default_rubric() -> str:
    return load_rubric(None)


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


def combine_orders(order1: JudgeResult | float | None, order2: JudgeResult | float | None, margin: float) -> dict[str, Any]:
    """Combine the two orders of one pair into a verdict about (r1, r2): the one rule for every mode.

    order1 is the judge's answer with r1 in position A, order2 with r2 in position A (a bare float is a
    `logprobs` answer: P(A wins)).
      - probability modes (both orders `logprobs`): average, p = (p1 + 1 - p2) / 2, then the margin |2p - 1|
        decides between a winner and a tie; a judge that always says A lands on exactly 0.5, a tie;
      - discrete modes (`choice`, `text`, or mixed): the two verdicts must name the same response (or both say
        tie), otherwise the pair is `inconsistent` (the MT-Bench rule); an unreadable answer makes it `invalid`.
    `consistent` records whether each order on its own picked the same response (the position-consistency
    statistic); in probability modes it does not veto the averaged verdict.

    >>> combine_orders(1.0, 1.0, 0.1)["verdict"]      # always "A": pure position bias, cancelled to a tie
    'tie'
    >>> combine_orders(0.9, 0.2, 0.1)["verdict"]      # both orders prefer r1
    'first'
    >>> A = JudgeResult(1.0, "choice", label="A")
    >>> combine_orders(A, A, 0.1)["verdict"]          # discrete: "A" both times names r1, then r2
    'inconsistent'
    """
    r1, r2 = (JudgeResult(o, "logprobs") if not isinstance(o, JudgeResult) else o for o in (order1, order2))
    if r1.error or r2.error or r1.p_a is None or r2.p_a is None:
        return {"p_first": None, "margin": None, "verdict": "judge_error", "consistent": None}
    p = (r1.p_a + (1.0 - r2.p_a)) / 2.0
    m = abs(2.0 * p - 1.0)
    if r1.label is None and r2.label is None:
        verdict = "tie" if m < margin or p == 0.5 else ("first" if p > 0.5 else "second")
        return {"p_first": p, "margin": m, "verdict": verdict, "consistent": (r1.p_a > 0.5) == (r2.p_a < 0.5)}
    l1, l2 = (r.label or ("A" if r.p_a > 0.5 else "B" if r.p_a < 0.5 else "tie") for r in (r1, r2))
    if "invalid" in (l1, l2):
        return {"p_first": None, "margin": None, "verdict": "invalid", "consistent": None}
    v1 = {"A": "first", "B": "second", "tie": "tie"}[l1]
    v2 = {"A": "second", "B": "first", "tie": "tie"}[l2]
    return {"p_first": p, "margin": m, "verdict": v1 if v1 == v2 else "inconsistent", "consistent": v1 == v2}


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


def build_pairs(samples: pd.DataFrame, pairing: str, seed: int, filt: FilterConfig, max_calls_per_prompt: int | None = None) -> pd.DataFrame:
    """One row per candidate pair of completions of the same prompt, screened with the filter's pre-judge checks.

    `tournament` pairs like `all_pairs`. With `max_calls_per_prompt`, a seeded choice of the pairs beyond the cap
    (two calls per pair) is screened out as `over_budget`.
    """
    rng = random.Random(seed)
    rows = []
    for prompt_id, group in samples.groupby("prompt_id", sort=False):
        g = group.sort_values("sample_idx").to_dict("records")
        prompt_rows = []
        for a, b in candidate_pairs(len(g), "all_pairs" if pairing == "tournament" else pairing, rng):
            r1, r2 = g[a]["response"], g[b]["response"]
            t1, t2 = bool(g[a]["truncated"]), bool(g[b]["truncated"])
            prompt_rows.append({
                "prompt_id": prompt_id, "prompt": g[a]["prompt"], "i": g[a]["sample_idx"], "j": g[b]["sample_idx"],
                "response_1": r1, "response_2": r2, "truncated_1": t1, "truncated_2": t2,
                "similarity": similarity(r1, r2), "screened": screen(r1, r2, t1, t2, filt),
            })
        if max_calls_per_prompt is not None:
            open_rows = [r for r in prompt_rows if r["screened"] is None]
            for r in rng.sample(open_rows, max(0, len(open_rows) - max_calls_per_prompt // 2)):
                r["screened"] = "over_budget"
        rows.extend(prompt_rows)
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
        mode = r1.mode if r1.mode == r2.mode else f"{r1.mode}+{r2.mode}"
        rows.append({**pair, "p_a_order1": r1.p_a, "p_a_order2": r2.p_a, **combine_orders(r1, r2, margin), "mode": mode, "error": errors})
    return pd.DataFrame(rows, columns=COLUMNS)


CALL_COLUMNS = ["prompt_id", "i", "j", "order", "mode", "p_a", "label", "error", "tokens_in", "tokens_out", "latency_s", "cost", "cached"]


def calls_table(pairs: pd.DataFrame, results: list[JudgeResult]) -> pd.DataFrame:
    """One row per judge call (two per judged pair): what it cost and what it said."""
    judged = pairs[pairs["screened"].isna()].to_dict("records")
    rows = []
    for n, r in enumerate(results):
        pair = judged[n // 2]
        rows.append({"prompt_id": pair["prompt_id"], "i": pair["i"], "j": pair["j"], "order": 1 + n % 2, "mode": r.mode,
                     "p_a": r.p_a, "label": r.label, "error": r.error, "tokens_in": r.tokens_in, "tokens_out": r.tokens_out,
                     "latency_s": r.latency_s, "cost": r.cost, "cached": r.cached})
    return pd.DataFrame(rows, columns=CALL_COLUMNS)


def judge_stats(table: pd.DataFrame, results: list[JudgeResult]) -> dict[str, Any]:
    """Per-round judge statistics over the judged pairs: position consistency and bias, tie / invalid / error
    rates, modes, tokens, latency, cache hits and estimated cost, and the first few distinct replies read as
    `invalid` (cut short), which `check_error_rate` quotes."""
    judged = table[table["verdict"] != "not_judged"]
    n = len(judged)
    answered = judged[~judged["verdict"].isin(["judge_error", "invalid"])]
    firsts = [r.p_a > 0.5 if r.label is None else r.label == "A" for r in results if r.p_a is not None and r.label != "invalid"]
    counts = table["verdict"].value_counts().to_dict()
    live = [r for r in results if not r.cached and r.error is None]
    unreadable = dict.fromkeys(r.extra.get("reply", "")[:QUOTE_CHARS] for r in results if r.label == "invalid")
    return {
        "pairs": len(table),
        "judged": n,
        "calls": len(results),
        "position_consistency": float(answered["consistent"].astype(bool).mean()) if len(answered) else None,
        "first_position_win_rate": float(sum(firsts) / len(firsts)) if firsts else None,
        "mean_margin": float(answered["margin"].mean()) if len(answered) else None,
        "verdicts": {v: int(counts.get(v, 0)) for v in VERDICTS},
        "tie_rate": counts.get("tie", 0) / n if n else None,
        "invalid_rate": counts.get("invalid", 0) / n if n else None,
        "error_rate": counts.get("judge_error", 0) / n if n else None,
        "modes": {m: sum(r.mode == m for r in results) for m in sorted({r.mode for r in results})},
        "cache_hits": sum(r.cached for r in results),
        "tokens_in": int(sum(r.tokens_in for r in results)),
        "tokens_out": int(sum(r.tokens_out for r in results)),
        "mean_latency_s": float(sum(r.latency_s for r in live) / len(live)) if live else None,
        "cost": float(sum(r.cost for r in results)),
        "unreadable_replies": list(unreadable)[:QUOTED_REPLIES],
    }


class JudgeFailed(SelfplayError, RuntimeError):
    """Too many pairs got no verdict (judge_error or invalid): the stage fails, with a summary of what went wrong."""


def judge_source(cfg: JudgeConfig) -> str:
    """Which judge answered, for messages: the endpoint's model and URL (without any credentials in it)."""
    if cfg.backend == "openai":
        url = urlsplit(cfg.endpoint.base_url)
        bare = url._replace(netloc=url.netloc.rpartition("@")[2], query="", fragment="").geturl()
        return f"model {cfg.endpoint.model!r} at {bare}"
    return f"the {cfg.backend} judge on {cfg.model!r}"


def check_error_rate(table: pd.DataFrame, max_error_rate: float, k: int, judge: JudgeConfig | None = None,
                     replies: Sequence[str] = ()) -> None:
    """Fail when more than `max_error_rate` of the judged pairs got no verdict: `judge_error` (the endpoint failed)
    or `invalid` (it answered, but nothing could be read from its `replies`). Either is the judge's fault; let
    through, it would surface later as too few pairs to train on, with advice about pairs, not the judge."""
    judged = table[table["verdict"] != "not_judged"]
    failed = judged[judged["verdict"].isin(["judge_error", "invalid"])]
    if not len(judged) or len(failed) / len(judged) <= max_error_rate:
        return
    errors = failed[failed["verdict"] == "judge_error"]
    n_invalid = len(failed) - len(errors)
    what = ("judge_error" if not n_invalid else "invalid" if not len(errors)
            else f"invalid ({n_invalid}) or judge_error ({len(errors)})")
    message = (f"round {k}: {len(failed)} of {len(judged)} judged pairs ({len(failed) / len(judged):.0%}) ended in {what}, "
               f"above judge.max_error_rate={max_error_rate}.")
    if n_invalid:
        source = judge_source(judge) if judge is not None else "the judge"
        modes = ", ".join(sorted(set(failed.loc[failed["verdict"] == "invalid", "mode"].dropna()))) or "unknown"
        configured = f", judge.mode={judge.mode}" if judge is not None else ""
        model_field = "judge.model" if judge is not None and judge.backend != "openai" else "judge.endpoint.model"
        quoted = "; ".join(repr(r[:QUOTE_CHARS]) for r in list(replies)[:QUOTED_REPLIES])
        message += (
            f" The judge's replies were unreadable: {source} answered {n_invalid} pair(s), but no verdict could be read "
            f"from its replies (mode {modes}{configured}).{f' It replied: {quoted}.' if quoted else ''} Check that the "
            f"endpoint serves a model that can judge ({model_field}), that judge.template asks for the verdict "
            f"the mode reads, and judge.mode (text wants a final [[A]], [[B]] or [[tie]]; choice a JSON verdict; "
            f"logprobs a first token A or B; auto tries all three)."
        )
    if len(errors):
        kinds = errors["error"].fillna("unknown").str.split(":").str[0].value_counts().to_dict()
        message += f" Errors by kind: {kinds}. First: {errors['error'].iloc[0]}."
    raise JudgeFailed(message + " Fix the judge and rerun to resume (with judge.cache on, calls that succeeded are not asked again).")


def judge_pairs(
    judge: Judge, pairs: pd.DataFrame, cfg: JudgeConfig, progress: Callable[[int, int], None] | None = None, chunk: int = 64
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """Ask `judge` both orders of every unscreened pair; return the judgments table, the calls table and statistics.

    Calls go to the backend `chunk` at a time, with `progress(done, total)` after each chunk.
    """
    template, rubric = load_template(cfg.template), load_rubric(cfg.rubric)
    calls = swap_calls(pairs[pairs["screened"].isna()], template, rubric, cfg.system_prompt)
    results: list[JudgeResult] = []
    for start in range(0, len(calls), chunk):
        results.extend(judge.judge(calls[start : start + chunk]))
        if progress:
            progress(len(results), len(calls))
    table = judgments_table(pairs, results, cfg.margin)
    return table, calls_table(pairs, results), judge_stats(table, results)


def judge_tables(cfg: JudgeConfig, reference: str, tables: list[pd.DataFrame], *, log=None,
                 progress: Callable[[int, int], None] | None = None) -> list[tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]]:
    """Build the configured judge once and judge each table of pairs with it (`judge_pairs`), then close it."""
    backend = make_judge(cfg, reference)
    try:
        return [judge_pairs(backend, pairs, cfg, progress=progress) for pairs in tables]
    finally:
        backend.close()
        release_memory()


def run_judge(cfg: RunConfig, reference: str, tables: list[pd.DataFrame], scratch: Path, label: str, log,
              progress: Callable[[int, int], None] | None = None,
              server_log: Path | None = None) -> tuple[list[tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]], float | None]:
    """`judge_tables` where it belongs, and the peak GPU memory it took. A local judge is a model on the GPU: it
    holds the `gpu` limit (and, with process isolation, runs in its own process). A `vllm` judge is a server started
    here on the judge model for these tables and stopped after (holding the limit; its log is `server_log`). An
    endpoint judge runs here."""
    j = cfg.judge
    if j.backend == "openai":
        return judge_tables(j, reference, tables, log=log, progress=progress), None
    if j.backend == "vllm":
        return serve_and_judge(j, reference, tables, server_log or scratch / "judge-server.log", f"{cfg.name}-judge", log, progress), None
    with gpu_slot(f"{cfg.name} {label}"):
        return isolate.call("tasks.judge:judge_tables", j, reference, tables, isolated=isolated(cfg.isolation),
                            scratch=scratch, label=label, log=log, progress=progress)


def judge_server_model(cfg: JudgeConfig, reference: str) -> str:
    """What a `vllm` judge server loads: the reference, a local model as selfplay resolves it (a directory, a .gguf
    converted once, 'bundled'), or a hub id as given (vLLM downloads it)."""
    from selfplay.models import resolve_model

    if cfg.model == "reference":
        return reference
    path = Path(cfg.model).expanduser()
    if cfg.model == "bundled" or path.exists():
        return str(Path(resolve_model(str(path) if path.exists() else cfg.model)).resolve())
    return cfg.model


def serve_and_judge(cfg: JudgeConfig, reference: str, tables: list[pd.DataFrame], log_path: Path, lora_name: str, log,
                    progress: Callable[[int, int], None] | None = None) -> list[tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]]:
    """Start a vLLM server on the judge model, judge every table through it, stop it and wait for the GPU."""
    from selfplay.config import EndpointConfig
    from selfplay.judges.openai import OpenAIJudge
    from selfplay.lora_serving import serving_plan
    from selfplay.model_server import ModelServer

    spec, model, request_name = serving_plan(cfg.server, judge_server_model(cfg, reference), lora_name)
    with gpu_slot(f"{lora_name} server"):
        with ModelServer(spec, model, log_path, served_name="judge") as server:
            log.info("judge server on %s up at %s (log %s)", model, server.base_url, log_path)
            endpoint = EndpointConfig(base_url=server.base_url, model=request_name or server.api_model,
                                      max_concurrency=cfg.max_concurrency, timeout=cfg.request_timeout)
            # A new port each time: nothing to key a cache on.
            judge = OpenAIJudge(endpoint, mode=cfg.mode, cache=None, api_key=server.api_key)
            results = [judge_pairs(judge, pairs, cfg, progress=progress) for pairs in tables]
        if not server.wait_gpu_free():
            log.warning("GPU memory was not all given back %g s after the judge server stopped", spec.gpu_free_timeout)
    return results


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
    pairs = build_pairs(samples, cfg.judge.pairing, cfg.seed + k, cfg.filter, cfg.judge.max_calls_per_prompt)
    started = time.time()
    log.info(
        "round %d: judging %d of %d candidate pairs x 2 orders with the %s judge (screened out: %s)",
        k, int(pairs["screened"].isna().sum()), len(pairs), cfg.judge.backend, pairs["screened"].value_counts().to_dict(),
    )
    bar = Progress(f"{cfg.name} round {k}: judging {int(pairs['screened'].isna().sum())} pairs x 2 orders")

    def progress(done: int, total: int) -> None:
        bar.update(done, total)
        log.info("round %d: judge calls %d/%d (%.0f s)", k, done, total, time.time() - started)

    [(table, calls, stats)], peak = run_judge(cfg, reference, [pairs], run.round_dir(k), f"round {k} judge", log, progress,
                                              server_log=run.round_dir(k) / "judge-server.log")
    stats["peak_gpu_gb"] = peak
    stats["seconds"] = time.time() - started
    check_error_rate(table, cfg.judge.max_error_rate, k, cfg.judge, stats["unreadable_replies"])  # before anything is published
    judge_model = cfg.judge.endpoint.model if cfg.judge.backend == "openai" else cfg.judge.model
    with run.stage_output(k, "judge", {"judge": cfg.judge.backend, "judge_model": judge_model, "reference": reference}) as (out, manifest):
        calls.to_parquet(out / "calls.parquet", index=False)
        table.to_parquet(out / "judgments.parquet", index=False)
        manifest["metrics"] = stats
    log.info(
        "round %d: judged %d pairs in %.0f s; position consistency %.2f; verdicts %s",
        k, len(table), stats["seconds"], stats["position_consistency"] or 0.0, stats["verdicts"],
    )
    return run.manifest(k, "judge")
