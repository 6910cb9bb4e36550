"""A round's candidate pairs, pure logic over tables (no IO): built from the samples, screened, joined to the judge's
verdicts.

`build_pairs` makes one row per candidate pair of one prompt's completions (indices i < j, `PAIR_COLUMNS`) and
screens out the pairs the filter would drop whatever the verdict (`screen`: empty, truncated, near-duplicate,
lopsided; `over_budget` beyond `judge.max_calls_per_prompt`), so no judge call is spent on them.
`judgments_table` and `calls_table` attach the judge's verdicts (`selfplay.judging.verdicts`) and calls to the unscreened
pairs: the judge stage's judgments.parquet and calls.parquet (`knockout_table` for a knockout's, whose unasked pairs
are `not_matched`). `drop_reason` is the filter's rule per pair (`REASONS`, documented in tasks/filter.py);
`selfplay.pairs.selection` then decides which pairs train, and `selfplay.pairs.knockout` finds each prompt's best
and worst with fewer questions than all pairs.
"""

from __future__ import annotations

import itertools
import random
from typing import Any

import pandas as pd
from rapidfuzz import fuzz

from selfplay.config.run import FilterConfig
from selfplay.inputs.tables import present
from selfplay.judging.calls import JudgeResult
from selfplay.judging.verdicts import VERDICT_COLUMNS, Comparison, Judged, judge_stats

REASONS = ("empty", "truncated", "too_similar", "length_ratio", "over_budget", "not_matched", "judge_error", "invalid", "tie", "inconsistent",
           "not_selected", "judge_at_chance")
PAIR_COLUMNS = ["prompt_id", "prompt", "reference", "i", "j", "response_1", "response_2", "truncated_1", "truncated_2", "similarity",
                "verify_1", "verify_2", "screened"]
COLUMNS = PAIR_COLUMNS + VERDICT_COLUMNS
CALL_COLUMNS = ["prompt_id", "i", "j", "order", "mode", "p_a", "label", "error", "tokens_in", "tokens_out", "latency_s", "cost", "cached"]


def similarity(a: str, b: str) -> float:
    """Normalised edit similarity in [0, 1] (rapidfuzz's Indel ratio); 1.0 for identical texts.

    >>> similarity("abc", "abc"), similarity("", "xyz")
    (1.0, 0.0)
    """
    return fuzz.ratio(a, b) / 100.0


def screen(r1: str, r2: str, truncated_1: bool, truncated_2: bool, cfg: FilterConfig) -> str | None:
    """The reason to drop a pair before judging it, or None if it is worth a judge call."""
    if min(len(r1.strip()), len(r2.strip())) < max(cfg.min_chars, 1):
        return "empty"
    if cfg.drop_truncated and (truncated_1 or truncated_2):
        return "truncated"
    if similarity(r1, r2) >= cfg.max_similarity:
        return "too_similar"
    if cfg.max_length_ratio is not None:
        lengths = sorted((len(r1.strip()), len(r2.strip())))
        if lengths[1] > cfg.max_length_ratio * max(lengths[0], 1):
            return "length_ratio"
    return None


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


def _score(row: dict[str, Any]) -> float | None:
    value = present(row.get("verify_score"))
    return None if value is None else float(value)


def build_pairs(samples: pd.DataFrame, pairing: str, seed: int, filt: FilterConfig, max_calls_per_prompt: int | None = None) -> pd.DataFrame:
    """One row per candidate pair of completions of the same prompt, screened with the filter's pre-judge checks.

    `tournament` pairs like `all_pairs`. With `max_calls_per_prompt`, a seeded choice of the pairs beyond the cap
    (two calls per pair) is screened out as `over_budget`. Samples the verifier scored (`verify_score`) carry
    their scores into the pair (`verify_1`, `verify_2`), and their prompt's reference into `reference`.
    """
    rng = random.Random(seed)
    rows = []
    for prompt_id, group in samples.groupby("prompt_id", sort=False):
        g = group.sort_values("sample_idx").to_dict("records")
        prompt_rows = []
        for a, b in candidate_pairs(len(g), "all_pairs" if pairing in ("tournament", "knockout") else pairing, rng):
            r1, r2 = g[a]["response"], g[b]["response"]
            t1, t2 = bool(g[a]["truncated"]), bool(g[b]["truncated"])
            reference = g[a].get("reference")
            s1, s2 = _score(g[a]), _score(g[b])
            # A cut-off response scores 0 with the verifier, which then decides the pair: only the LLM needs it screened.
            decided = s1 is not None and s2 is not None and s1 != s2
            prompt_rows.append({
                "prompt_id": prompt_id, "prompt": g[a]["prompt"], "reference": present(reference),
                "i": g[a]["sample_idx"], "j": g[b]["sample_idx"], "response_1": r1, "response_2": r2,
                "truncated_1": t1, "truncated_2": t2, "similarity": similarity(r1, r2),
                "verify_1": s1, "verify_2": s2, "screened": screen(r1, r2, t1 and not decided, t2 and not decided, filt),
            })
        if max_calls_per_prompt is not None:
            open_rows = [r for r in prompt_rows if r["screened"] is None]
            for r in rng.sample(open_rows, max(0, len(open_rows) - max_calls_per_prompt // 2)):
                r["screened"] = "over_budget"
        rows.extend(prompt_rows)
    return pd.DataFrame(rows, columns=PAIR_COLUMNS)


def pair_comparisons(pairs: pd.DataFrame, pairing: str = "all_pairs") -> list[Comparison]:
    """The unscreened pairs as the judge's comparisons, in order: response_1 as response_a, so "first" prefers it.

    In a tournament, a prompt whose samples the verifier tells apart needs no LLM call at all: its equal-scored
    pairs are ties (`llm_on_tie` False), so best against worst comes from K verifier calls alone.
    """
    todo = pairs[pairs["screened"].isna()]
    separated = separated_prompts(pairs) if pairing in ("tournament", "knockout") else set()
    return [comparison_of(row, separated) for row in todo.to_dict("records")]


def separated_prompts(pairs: pd.DataFrame) -> set[Any]:
    """The prompts whose samples the verifier scores, not all the same: their best and worst need no LLM call."""
    separated = set()
    for prompt_id, group in pairs.groupby("prompt_id", sort=False):
        scores = pd.concat([group["verify_1"], group["verify_2"]])
        if scores.notna().all() and scores.nunique() > 1:
            separated.add(prompt_id)
    return separated


def comparison_of(row: dict[str, Any], separated: set[Any]) -> Comparison:
    return Comparison(row["prompt"], row["response_1"], row["response_2"], present(row["reference"]), present(row["verify_1"]),
                      present(row["verify_2"]), row["prompt_id"] not in separated)


def judged_tables(pairs: pd.DataFrame, judged: Judged) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """The judge stage's judgments table, calls table and statistics, from the verdicts on `pair_comparisons(pairs)`,
    or on the phases of `KnockoutPhases(pairs)` (`judged.keys`: the rows asked, in the order asked)."""
    if judged.keys is None:
        table = judgments_table(pairs, judged.verdicts)
        return table, calls_table(table, judged.results), judge_stats(table, judged.results)
    llm = iter(judged.results)
    calls = {key: (next(llm), next(llm)) for key, v in zip(judged.keys, judged.verdicts) if v["source"] == "llm"}
    table = knockout_table(pairs, judged.keys, judged.verdicts)
    results = [r for key in pairs.index if key in calls for r in calls[key]]
    return table, calls_table(table, results), judge_stats(table, results)


def judgments_table(pairs: pd.DataFrame, verdicts: list[dict[str, Any]]) -> pd.DataFrame:
    """Attach the verdicts of the unscreened pairs (one each, in order) to the pairs; screened pairs stay unjudged."""
    judged = pairs["screened"].isna().tolist()
    assert len(verdicts) == sum(judged)
    found = iter(verdicts)
    rows = [{**pair, **next(found)} if is_judged else {**pair, "verdict": "not_judged"}
            for pair, is_judged in zip(pairs.to_dict("records"), judged)]
    return pd.DataFrame(rows, columns=COLUMNS)


def calls_table(table: pd.DataFrame, results: list[JudgeResult]) -> pd.DataFrame:
    """One row per LLM judge call (two per pair the LLM judged, in the `judgments_table`): what it cost and what it said."""
    judged = table[table["source"] == "llm"].to_dict("records")
    rows = []
    for n, r in enumerate(results):
        pair = judged[n // 2]
        rows.append({"prompt_id": pair["prompt_id"], "i": pair["i"], "j": pair["j"], "order": 1 + n % 2, "mode": r.mode,
                     "p_a": r.p_a, "label": r.label, "error": r.error, "tokens_in": r.tokens_in, "tokens_out": r.tokens_out,
                     "latency_s": r.latency_s, "cost": r.cost, "cached": r.cached})
    return pd.DataFrame(rows, columns=CALL_COLUMNS)


def drop_reason(screened: str | None, verdict: str) -> str | None:
    """The pair's drop reason given its screen result and its judge verdict; None means keep.

    >>> drop_reason(float("nan"), "first") is None    # a missing screen reason, as parquet reads it back
    True
    """
    if isinstance(screened, str) and screened:
        return screened
    if verdict in ("first", "second"):
        return None
    return verdict if verdict in REASONS else "judge_error"


def knockout_table(pairs: pd.DataFrame, asked: list[int], verdicts: list[dict[str, Any]]) -> pd.DataFrame:
    """The judgments table of a knockout: the asked pairs with their verdicts, the rest screened as `not_matched`."""
    screened = pairs.copy()
    asked_set = set(asked)
    unasked = screened["screened"].isna() & ~screened.index.isin(asked_set)
    screened.loc[unasked, "screened"] = "not_matched"
    by_index = dict(zip(asked, verdicts))
    ordered = [by_index[idx] for idx in screened.index if idx in asked_set]
    return judgments_table(screened, ordered)
