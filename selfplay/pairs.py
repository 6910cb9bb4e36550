"""A round's pairs, pure logic over tables (no IO): built from the samples, screened, joined to the judge's verdicts,
selected for training.

`build_pairs` makes one row per candidate pair of one prompt's completions (indices i < j, `PAIR_COLUMNS`) and
screens out the pairs the filter would drop whatever the verdict (`screen`: empty, truncated, near-duplicate,
lopsided; `over_budget` beyond `judge.max_calls_per_prompt`), so no judge call is spent on them.
`judgments_table` and `calls_table` attach the judge's verdicts (`selfplay.judging`) and calls to the unscreened
pairs: the judge stage's judgments.parquet and calls.parquet. `select_pairs` then decides, per the filter stage's
drop reasons (`REASONS`, documented in tasks/filter.py), which pairs train and which response is chosen; with
`judge.pairing: tournament` each prompt contributes its best completion against its worst (Copeland or
Bradley-Terry scores over all pairs); `knockout` finds them with fewer questions (`selfplay.knockout`: about 3K/2
pairs instead of K(K-1)/2, asked in phases).
"""

from __future__ import annotations

import itertools
import random
from typing import Any

import pandas as pd
from rapidfuzz import fuzz

from selfplay.config import FilterConfig
from selfplay.judges import JudgeResult
from selfplay.judging import VERDICT_COLUMNS, Comparison, Judged, judge_stats, present

REASONS = ("empty", "truncated", "too_similar", "length_ratio", "over_budget", "not_matched", "judge_error", "invalid", "tie", "inconsistent",
           "not_selected")
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
    value = row.get("verify_score")
    return None if value is None or pd.isna(value) else float(value)


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
                "prompt_id": prompt_id, "prompt": g[a]["prompt"], "reference": None if pd.isna(reference) else reference,
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
    separated = _separated(pairs) if pairing in ("tournament", "knockout") else set()
    return [_comparison(row, separated) for row in todo.to_dict("records")]


def _separated(pairs: pd.DataFrame) -> set[Any]:
    """The prompts whose samples the verifier scores, not all the same: their best and worst need no LLM call."""
    separated = set()
    for prompt_id, group in pairs.groupby("prompt_id", sort=False):
        scores = pd.concat([group["verify_1"], group["verify_2"]])
        if scores.notna().all() and scores.nunique() > 1:
            separated.add(prompt_id)
    return separated


def _comparison(row: dict[str, Any], separated: set[Any]) -> Comparison:
    return Comparison(row["prompt"], row["response_1"], row["response_2"], present(row["reference"]), present(row["verify_1"]),
                      present(row["verify_2"]), row["prompt_id"] not in separated)


def judged_tables(pairs: pd.DataFrame, judged: Judged) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """The judge stage's judgments table, calls table and statistics, from the verdicts on `pair_comparisons(pairs)`,
    or on the phases of `KnockoutPhases(pairs)` (`judged.keys`: the rows asked, in the order asked)."""
    if judged.keys is None:
        table = judgments_table(pairs, judged.verdicts)
        return table, calls_table(table, judged.results), judge_stats(table, judged.results)
    from selfplay.knockout import knockout_table

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


def select_pairs(
    judgments: pd.DataFrame, pairing: str = "all_pairs", scoring: str = "copeland", prefer_shorter_below_margin: float | None = None
) -> pd.DataFrame:
    """Pure: add kept / drop_reason / chosen / rejected to the judgments table (best vs worst for tournaments).

    With `prefer_shorter_below_margin`, a kept pair whose margin is below it trains on its shorter response as
    chosen (`length_swapped` marks where that overrode the verdict): a near-tie is no reason to reward length.
    """
    out = judgments.copy()
    out["drop_reason"] = [drop_reason(s, v) for s, v in zip(out["screened"], out["verdict"])]
    first = out["verdict"] == "first"
    out["chosen"], out["rejected"] = out["response_2"].where(~first, out["response_1"]), out["response_1"].where(~first, out["response_2"])
    if pairing == "tournament":
        out = _select_tournament(out, scoring)
    elif pairing == "knockout":
        from selfplay.knockout import select_knockout

        out = select_knockout(out)
    out["kept"] = out["drop_reason"].isna()
    out["length_swapped"] = False
    if prefer_shorter_below_margin is not None:
        swap = out["kept"] & (out["margin"] < prefer_shorter_below_margin) & (out["chosen"].str.len() > out["rejected"].str.len())
        out.loc[swap, ["chosen", "rejected"]] = out.loc[swap, ["rejected", "chosen"]].to_numpy()
        out["length_swapped"] = swap
    out["chosen"] = out["chosen"].where(out["kept"])
    out["rejected"] = out["rejected"].where(out["kept"])
    return out


SCORED = ("first", "second", "tie", "inconsistent")


def copeland_scores(pairs: list[tuple[int, int, str]]) -> dict[int, float]:
    """+1 per win, -1 per loss, over (i, j, verdict) with verdict about i ('first') versus j ('second').

    >>> copeland_scores([(0, 1, "first"), (0, 2, "first"), (1, 2, "tie")])
    {0: 2.0, 1: -1.0, 2: -1.0}
    """
    score: dict[int, float] = {}
    for i, j, verdict in pairs:
        score.setdefault(i, 0.0)
        score.setdefault(j, 0.0)
        if verdict == "first":
            score[i] += 1
            score[j] -= 1
        elif verdict == "second":
            score[i] -= 1
            score[j] += 1
    return score


def bradley_terry_scores(pairs: list[tuple[int, int, float]], iterations: int = 200, prior: float = 0.1) -> dict[int, float]:
    """Log-strengths fitted (minorise-maximise) to soft outcomes (i, j, P(i beats j)), with a small prior of
    `prior` pseudo-wins each way per pair so strengths stay finite.

    >>> s = bradley_terry_scores([(0, 1, 0.9), (1, 2, 0.9), (0, 2, 0.9)]); s[0] > s[1] > s[2]
    True
    """
    import math

    items = sorted({x for i, j, _ in pairs for x in (i, j)})
    wins = {x: 0.0 for x in items}
    games: dict[int, list[int]] = {x: [] for x in items}
    for i, j, p in pairs:
        wins[i] += p + prior
        wins[j] += 1 - p + prior
        games[i].append(j)
        games[j].append(i)
    theta = {x: 1.0 for x in items}
    for _ in range(iterations):
        theta = {x: wins[x] / sum((1 + 2 * prior) / (theta[x] + theta[y]) for y in games[x]) for x in items}
        norm = math.exp(sum(math.log(t) for t in theta.values()) / len(theta))
        theta = {x: t / norm for x, t in theta.items()}
    return {x: math.log(t) for x, t in theta.items()}


def _select_tournament(out: pd.DataFrame, scoring: str) -> pd.DataFrame:
    out["score_1"], out["score_2"] = float("nan"), float("nan")
    for _, group in out.groupby("prompt_id", sort=False):
        scored = group[group["verdict"].isin(SCORED)]
        if scoring == "bradley_terry":
            scores = bradley_terry_scores([(i, j, p) for i, j, p in zip(scored["i"], scored["j"], scored["p_first"])])
        else:
            scores = copeland_scores(list(zip(scored["i"], scored["j"], scored["verdict"])))
        out.loc[group.index, "score_1"] = group["i"].map(scores)
        out.loc[group.index, "score_2"] = group["j"].map(scores)
        best = max(scores, key=scores.get) if scores else None
        worst = min(scores, key=scores.get) if scores else None
        has_winner = best is not None and scores[best] > scores[worst]
        for idx, row in group.iterrows():
            if has_winner and {row["i"], row["j"]} == {best, worst} and row["verdict"] in SCORED:
                first_is_best = row["i"] == best
                out.at[idx, "drop_reason"] = None
                out.at[idx, "chosen"] = row["response_1"] if first_is_best else row["response_2"]
                out.at[idx, "rejected"] = row["response_2"] if first_is_best else row["response_1"]
            elif not isinstance(row["drop_reason"], str) or row["drop_reason"] in ("tie", "inconsistent"):
                out.at[idx, "drop_reason"] = "not_selected" if has_winner else "tie"
    return out


def drop_counts(pairs: pd.DataFrame) -> dict[str, int]:
    counts = pairs["drop_reason"].value_counts().to_dict()
    return {reason: int(counts.get(reason, 0)) for reason in REASONS}
