"""The judge's verdict rules, pure (no IO): comparisons, the two orders combined, statistics, the error check.

A comparison is neutral: (prompt, response_a, response_b), with no notion of samples or models. Order 1 puts
response_a in position A, order 2 puts response_b there. With p1 and p2 the probabilities that position A wins in
each order, the swap-averaged preference for response_a is

    p = (p1 + (1 - p2)) / 2

so a judge that always favours position A (p1 = p2 = 1) comes out at exactly 0.5: a tie. The margin is |2p - 1|;
below `judge.margin` it is a tie. Discrete verdicts (an endpoint's structured choice or text marker) must name the
same response in both orders, or the comparison is inconsistent (`combine_orders` holds both rules). Verdicts are
about response_a ("first") versus response_b ("second").

The judge is hybrid. A comparison may carry the verifier's scores of its two responses (`selfplay.judging.verifiers`,
computed once per response by the caller): when they differ, the higher score wins and no LLM is asked
(`verifier_verdict`); when they are equal, the LLM judge decides in both orders, shown the prompt's reference
answer, unless the caller or `judge.verifier.fallback: none` makes it a tie. Each verdict records its `source`,
`verifier` or `llm`. The judge stage (pairs of one policy's samples, `selfplay.pairs`) and the evaluate stage (two
models' answers, `selfplay.evaluation`) both judge through `selfplay.judging.runner`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol
from urllib.parse import urlsplit

import pandas as pd

from selfplay.config.backends import JudgeConfig
from selfplay.errors import SelfplayError
from selfplay.judging.calls import JudgeCall, JudgeResult
from selfplay.judging.prompt import render_judge_prompt

VERDICT_COLUMNS = ["p_a_order1", "p_a_order2", "p_first", "margin", "verdict", "consistent", "mode", "error", "source"]


SOURCES = ("verifier", "llm")


VERDICTS = ("first", "second", "tie", "inconsistent", "invalid", "judge_error", "not_judged")


QUOTED_REPLIES, QUOTE_CHARS = 3, 200  # how much of the judge's unreadable replies a failure quotes


class Comparison(NamedTuple):
    """One judge question: is response_a or response_b the better answer to prompt? With the verifier's scores of
    both responses, they decide where they differ; `llm_on_tie` False makes equal scores a tie without the LLM."""

    prompt: str
    response_a: str
    response_b: str
    reference: str | None = None
    score_a: float | None = None
    score_b: float | None = None
    llm_on_tie: bool = True


def verifier_verdict(c: Comparison, fallback: str = "llm") -> dict[str, Any] | None:
    """The verdict row the verifier's scores give, or None when the LLM judge must decide.

    >>> verifier_verdict(Comparison("q", "7", "8", "7", 1.0, 0.45))["verdict"]
    'first'
    >>> verifier_verdict(Comparison("q", "7", "7.0", "7", 1.0, 1.0)) is None     # equal: the LLM decides
    True
    >>> verifier_verdict(Comparison("q", "7", "7.0", "7", 1.0, 1.0), fallback="none")["verdict"]
    'tie'
    """
    if c.score_a is None or c.score_b is None:
        return None
    if c.score_a == c.score_b and c.llm_on_tie and fallback == "llm":
        return None
    p = 1.0 if c.score_a > c.score_b else 0.0 if c.score_a < c.score_b else 0.5
    verdict = "first" if p == 1.0 else "second" if p == 0.0 else "tie"
    return {"p_a_order1": None, "p_a_order2": None, "p_first": p, "margin": abs(2 * p - 1), "verdict": verdict,
            "consistent": True, "mode": "verifier", "error": None, "source": "verifier"}


class Judged(NamedTuple):
    """A batch of comparisons judged: one verdict row (`VERDICT_COLUMNS`) per comparison, in order, and the judge's
    results, two per comparison (order 1, order 2). Phases (`judge_phases`) also give each comparison's key, in
    the order asked."""

    verdicts: list[dict[str, Any]]
    results: list[JudgeResult]
    keys: list[Any] | None = None


class Phases(Protocol):
    """Comparisons asked in phases, each chosen from the verdicts so far (a knockout: `selfplay.pairs.knockout.KnockoutPhases`).
    `next(decided)`: the next phase's comparisons by key, {} when done; `candidates`: every comparison it might ask."""

    candidates: list[Comparison]

    def next(self, decided: dict[Any, dict[str, Any]]) -> dict[Any, Comparison]: ...


Batch = Sequence[Comparison] | Phases


def combine_orders(order1: JudgeResult | float | None, order2: JudgeResult | float | None, margin: float) -> dict[str, Any]:
    """Combine the two orders of one comparison into a verdict about (r1, r2) = (response_a, response_b): the one rule for every mode.

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


def swap_calls(comparisons: Sequence[Comparison], template: str | tuple[str, str], rubric: str, system: str) -> list[JudgeCall]:
    """Two calls per comparison, interleaved: [c0 order1, c0 order2, c1 order1, ...]. `template` is one template, or
    (without a reference, with one)."""
    plain, guided = (template, template) if isinstance(template, str) else template
    calls = []
    for c in comparisons:
        t = plain if c.reference is None else guided
        calls.append(JudgeCall(system, render_judge_prompt(t, c.prompt, c.response_a, c.response_b, rubric, c.reference)))
        calls.append(JudgeCall(system, render_judge_prompt(t, c.prompt, c.response_b, c.response_a, rubric, c.reference)))
    return calls


def verdict_rows(results: list[JudgeResult], margin: float) -> list[dict[str, Any]]:
    """Pair up the results (order 1, order 2 of each comparison) and combine them: one `VERDICT_COLUMNS` row each."""
    rows = []
    for r1, r2 in zip(results[0::2], results[1::2]):
        errors = "; ".join(e for e in (r1.error, r2.error) if e) or None
        mode = r1.mode if r1.mode == r2.mode else f"{r1.mode}+{r2.mode}"
        rows.append({"p_a_order1": r1.p_a, "p_a_order2": r2.p_a, **combine_orders(r1, r2, margin), "mode": mode, "error": errors,
                     "source": "llm"})
    return rows


def judge_stats(table: pd.DataFrame, results: list[JudgeResult]) -> dict[str, Any]:
    """Per-round judge statistics over the judged pairs: position consistency and bias, tie / invalid / error
    rates, modes, tokens, latency, cache hits and estimated cost, and the first few distinct replies read as
    `invalid` (cut short), which `check_error_rate` quotes."""
    judged = table[table["verdict"] != "not_judged"]
    n = len(judged)
    sources = judged["source"].value_counts().to_dict()
    answered = judged[~judged["verdict"].isin(["judge_error", "invalid"]) & (judged["source"] == "llm")]
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
        "sources": {source: int(sources.get(source, 0)) for source in SOURCES},
        "tie_rate": counts.get("tie", 0) / n if n else None,
        "invalid_rate": counts.get("invalid", 0) / n if n else None,
        "error_rate": counts.get("judge_error", 0) / n if n else None,
        "modes": {m: sum(r.mode == m for r in results) for m in sorted({r.mode for r in results})},
        "per_mode": per_mode_costs(results),
        "tokens_per_verdict": (sum(r.tokens_in + r.tokens_out for r in live) / (len(live) / 2)) if live else None,
        "cache_hits": sum(r.cached for r in results),
        "tokens_in": int(sum(r.tokens_in for r in results)),
        "tokens_out": int(sum(r.tokens_out for r in results)),
        "mean_latency_s": float(sum(r.latency_s for r in live) / len(live)) if live else None,
        "cost": float(sum(r.cost for r in results)),
        "unreadable_replies": list(unreadable)[:QUOTED_REPLIES],
    }


def per_mode_costs(results: Sequence[JudgeResult]) -> dict[str, dict[str, float]]:
    """Per verdict mode, over the calls answered live (not from the cache, not failed): how many, and the mean prompt
    and completion tokens and seconds per call. A verdict is two calls, one per order."""
    out: dict[str, dict[str, float]] = {}
    for mode in sorted({r.mode for r in results}):
        live = [r for r in results if r.mode == mode and not r.cached and r.error is None]
        if live:
            out[mode] = {"calls": len(live), "tokens_in_per_call": sum(r.tokens_in for r in live) / len(live),
                         "tokens_out_per_call": sum(r.tokens_out for r in live) / len(live),
                         "seconds_per_call": sum(r.latency_s for r in live) / len(live)}
    return out


class JudgeFailed(SelfplayError, RuntimeError):
    """Too many pairs got no verdict (judge_error or invalid): the stage fails, with a summary of what went wrong."""


def judge_source(cfg: JudgeConfig) -> str:
    """Which judge answered, for messages: the endpoint's model and URL (without any credentials in it)."""
    if cfg.backend == "endpoint":
        url = urlsplit(cfg.endpoint.base_url)
        bare = url._replace(netloc=url.netloc.rpartition("@")[2], query="", fragment="").geturl()
        return f"model {cfg.endpoint.model!r} at {bare}"
    return f"the {cfg.backend} judge on {cfg.model!r}"


def check_error_rate(table: pd.DataFrame, max_error_rate: float, k: int, judge: JudgeConfig | None = None,
                     replies: Sequence[str] = (), pinned: str | None = None) -> None:
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
        model_field = "judge.model" if judge is not None and judge.backend != "endpoint" else "judge.endpoint.model"
        quoted = "; ".join(repr(r[:QUOTE_CHARS]) for r in list(replies)[:QUOTED_REPLIES])
        message += (
            f" The judge's replies were unreadable: {source} answered {n_invalid} pair(s), but no verdict could be read "
            f"from its replies (mode {modes}{configured}).{f' It replied: {quoted}.' if quoted else ''} Check that the "
            f"endpoint serves a model that can judge ({model_field}), that judge.template asks for the verdict "
            f"the mode reads, and judge.mode (text wants the marker [[A]], [[B]] or [[tie]], alone, or last after reasoning with "
            f"judge.reasoning_tokens; choice a JSON verdict; logprobs a first token A or B; auto uses the best the endpoint honours)."
        )
        if "text" in modes:
            message += (" A small model often does not follow the text format: a server that returns logprobs (vLLM, llama.cpp's "
                        "server) lets the same model judge from its label probabilities.")
    if len(errors):
        kinds = errors["error"].fillna("unknown").str.split(":").str[0].value_counts().to_dict()
        message += f" Errors by kind: {kinds}. First: {errors['error'].iloc[0]}."
    settings = (f" The judge's settings that change verdicts (judge.template, judge.mode, its model) stay as they are on a resume: {pinned} "
                f"used them. Fix the server, or start a new run (--set name=...) to judge otherwise." if pinned else
                " No completed stage has used the judge's settings yet, so they may change for the rerun.")
    raise JudgeFailed(message + " Fix the judge and rerun to resume (with judge.cache on, calls that succeeded are not asked again)." + settings)


def llm_count(comparisons: Batch, cfg: JudgeConfig) -> int:
    """How many of the comparisons the LLM judge must decide (the verifier decides the others); of phases, how
    many it might have to (of every candidate)."""
    if not isinstance(comparisons, Sequence):
        comparisons = comparisons.candidates
    return sum(verifier_verdict(c, cfg.verifier.fallback) is None for c in comparisons)
