"""A round's pairs, pure logic over tables (no IO): built from the samples, screened, joined to the judge's verdicts,
selected for training.

`build_pairs` makes one row per candidate pair of one prompt's completions (indices i < j, `PAIR_COLUMNS`) and
screens out the pairs the filter would drop whatever the verdict (`screen`: empty, truncated, near-duplicate,
lopsided; `over_budget` beyond `judge.max_calls_per_prompt`), so no judge call is spent on them.
`judgments_table` and `calls_table` attach the judge's verdicts (`selfplay.judging`) and calls to the unscreened
pairs: the judge stage's judgments.parquet and calls.parquet. `select_pairs` then decides, per the filter stage's
drop reasons (`REASONS`, documented in tasks/filter.py), which pairs train and which response is chosen; with
`judge.pairing: tournament` each prompt contributes its best completion against its worst (Copeland or
Bradley-Terry scores over all pairs); `knockout` finds them with fewer questions (`knockout`: about 3K/2 pairs
instead of K(K-1)/2, asked in phases, `KnockoutPhases`).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
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


Beats = Callable[[int, int], "bool | None"]


def knockout(samples: list[int], beats: Beats) -> tuple[list[tuple[int, int]], int | None, int | None]:
    """Pure: the best and the worst of `samples` by a knockout, from `beats(a, b)` (True: a beats b; False: b beats
    a; None: not asked yet). Returns (the matches to ask next, [] once decided; best; worst).

    Samples are paired in order; winners play on to find the best, losers to find the worst, both brackets a phase at
    a time (the max-min algorithm: ceil(3K/2) - 2 matches); then the best meets the worst, unless they have met, so the
    pair that trains has a verdict of its own. Matches a phase needs are returned together, so a judge asks a whole
    phase (across prompts) at once: 4 phases and at most 3K/2 - 1 matches for K = 8, against K(K-1)/2 = 28 for all
    pairs.

    >>> order = {3: 0, 1: 1, 0: 2, 2: 3}                  # 3 is best, 2 is worst
    >>> asked = []
    >>> def beats(a, b):
    ...     asked.append((a, b)); return order[a] < order[b]
    >>> knockout([0, 1, 2, 3], beats)[1:]
    (3, 2)
    >>> knockout([0, 1, 2, 3], lambda a, b: None)        # nothing known: the first phase
    ([(0, 1), (2, 3)], None, None)
    """
    if len(samples) < 2:
        return [], None, None
    known: dict[tuple[int, int], bool] = {}

    def ask(matches: list[tuple[int, int]]) -> list[tuple[int, int]]:
        needed = []
        for a, b in matches:
            if (a, b) not in known:
                outcome = beats(a, b)
                if outcome is None:
                    needed.append((a, b))
                else:
                    known[(a, b)] = outcome
        return needed

    def split(players: list[int]) -> list[tuple[int, int]]:
        return [(players[t], players[t + 1]) for t in range(0, len(players) - 1, 2)]

    first = split(samples)
    if needed := ask(first):
        return needed, None, None
    odd = [samples[-1]] if len(samples) % 2 else []
    winners = [a if known[(a, b)] else b for a, b in first] + odd
    losers = first_losers = [b if known[(a, b)] else a for a, b in first] + odd
    while len(winners) > 1 or len(losers) > 1:
        top, bottom = split(winners), split(losers)
        if needed := ask(list(dict.fromkeys(top + bottom))):
            return needed, None, None
        winners = [a if known[(a, b)] else b for a, b in top] + ([winners[-1]] if len(winners) % 2 else [])
        losers = [b if known[(a, b)] else a for a, b in bottom] + ([losers[-1]] if len(losers) % 2 else [])
    best, worst = winners[0], losers[0]
    if best == worst:  # the odd sample won one bracket and lost the other: only a judge with cycles does that
        losers = [x for x in first_losers if x != best]
        while len(losers) > 1:
            if needed := ask(bottom := split(losers)):
                return needed, None, None
            losers = [b if known[(a, b)] else a for a, b in bottom] + ([losers[-1]] if len(losers) % 2 else [])
        worst = losers[0]
    if best != worst and (needed := ask([(min(best, worst), max(best, worst))])):
        return needed, None, None
    return [], best, worst


def match_outcome(row: dict[str, Any] | None) -> bool | None:
    """Whether pair row's response_1 (sample i) beats response_2 (sample j) in a knockout match, None while unjudged.

    The verdict where there is one; a tie or a split verdict by the swap-averaged preference; where that is even
    (or the pair was screened out: near-duplicates, say), the verifier's scores, then the emptier or cut-off
    response loses, then sample i goes on: any order is as good as another between two the judge cannot tell apart.
    """
    if row is None:
        return None
    verdict = row.get("verdict")
    if verdict == "first":
        return True
    if verdict == "second":
        return False
    if not isinstance(row.get("screened"), str) and verdict in (None, "not_judged"):
        return None
    p = present(row.get("p_first"))
    if p is not None and p != 0.5:
        return p > 0.5
    s1, s2 = present(row.get("verify_1")), present(row.get("verify_2"))
    if s1 is not None and s2 is not None and s1 != s2:
        return s1 > s2
    key = [(not bool(row[f"truncated_{n}"]), len(str(row[f"response_{n}"]).strip())) for n in (1, 2)]
    return key[0] >= key[1]


def _prompt_knockout(rows: dict[tuple[int, int], dict[str, Any]], samples: list[int]) -> tuple[list[tuple[int, int]], int | None, int | None]:
    def beats(a: int, b: int) -> bool | None:
        outcome = match_outcome(rows.get((min(a, b), max(a, b))))
        return outcome if outcome is None or a < b else not outcome
    return knockout(samples, beats)


class KnockoutPhases:
    """A round's knockouts as the judge's phases (`selfplay.judging.judge_phases`): `next(decided)` gives the next
    phase's comparisons, keyed by their row in `pairs`, from the verdicts so far; {} when every prompt's best and
    worst are known. Pure (a function of `pairs` and `decided`), so a judge in another process replays it.
    `candidates` are every comparison a knockout could ask (for `llm_count`: whether a judge is needed at all)."""

    def __init__(self, pairs: pd.DataFrame):
        self.pairs = pairs
        self.separated = _separated(pairs)
        self.candidates = pair_comparisons(pairs, "knockout")

    def next(self, decided: dict[int, dict[str, Any]]) -> dict[int, Comparison]:
        out: dict[int, Comparison] = {}
        for _, group in self.pairs.groupby("prompt_id", sort=False):
            rows, index = {}, {}
            for idx, row in zip(group.index, group.to_dict("records")):
                key = (int(row["i"]), int(row["j"]))
                index[key] = idx
                screened = isinstance(row["screened"], str)
                if screened or idx in decided:
                    rows[key] = {**row, **decided.get(idx, {"verdict": "not_judged"})}
            samples = sorted({int(x) for x in group["i"]} | {int(x) for x in group["j"]})
            needed, _, _ = _prompt_knockout(rows, samples)
            for key in needed:
                idx = index[key]
                out[idx] = _comparison(self.pairs.loc[idx].to_dict(), self.separated)
        return out


def knockout_table(pairs: pd.DataFrame, asked: list[int], verdicts: list[dict[str, Any]]) -> pd.DataFrame:
    """The judgments table of a knockout: the asked pairs with their verdicts, the rest screened as `not_matched`."""
    screened = pairs.copy()
    asked_set = set(asked)
    unasked = screened["screened"].isna() & ~screened.index.isin(asked_set)
    screened.loc[unasked, "screened"] = "not_matched"
    by_index = dict(zip(asked, verdicts))
    ordered = [by_index[idx] for idx in screened.index if idx in asked_set]
    return judgments_table(screened, ordered)


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
        out = _select_knockout(out)
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


def _select_knockout(out: pd.DataFrame) -> pd.DataFrame:
    """Each prompt's best-against-worst match trains, if its verdict has a winner (chosen as the verdict says: two
    orders on the pair itself outweigh the bracket); every other match is `not_selected`."""
    for _, group in out.groupby("prompt_id", sort=False):
        records = dict(zip(group.index, group.to_dict("records")))
        rows = {(int(r["i"]), int(r["j"])): r for r in records.values()}
        samples = sorted({int(x) for x in group["i"]} | {int(x) for x in group["j"]})
        _, best, worst = _prompt_knockout(rows, samples)
        final = None if best is None or best == worst else (min(best, worst), max(best, worst))
        for idx, row in records.items():
            if (int(row["i"]), int(row["j"])) == final:
                continue  # its verdict and the screen decide, as for any pair
            if not isinstance(row["drop_reason"], str) or row["drop_reason"] in ("tie", "inconsistent"):
                out.at[idx, "drop_reason"] = "not_selected"
    return out


def kept_pairs(selected: pd.DataFrame) -> dict[Any, tuple[int, int]]:
    """Pure: each prompt's kept pair as (chosen sample, rejected sample), from a `select_pairs` table."""
    out = {}
    for r in selected[selected["kept"]].to_dict("records"):
        first = r["chosen"] == r["response_1"]
        out[r["prompt_id"]] = (int(r["i"]), int(r["j"])) if first else (int(r["j"]), int(r["i"]))
    return out


def knockout_agreement(judgments: pd.DataFrame) -> dict[str, Any]:
    """How a knockout's pick compares with the all-pairs tournament (Copeland), replayed on an all-pairs judgments
    table (every pair of a prompt asked in both orders): the knockout reads only the verdicts its bracket asks for.
    Over the prompts where the tournament keeps a pair: the share where the knockout keeps one too, where its
    chosen is one of the tournament's best-scored samples and its rejected one of the worst-scored, and where the
    pair is the same; with the LLM calls each would have made."""
    tour, ko = select_pairs(judgments, "tournament"), select_pairs(judgments, "knockout")
    t_pairs, k_pairs = kept_pairs(tour), kept_pairs(ko)
    calls_all = calls_ko = both = top = bottom = same = 0
    for pid, group in tour.groupby("prompt_id", sort=False):
        records = group.to_dict("records")
        rows = {(int(r["i"]), int(r["j"])): r for r in records}
        asked: set[tuple[int, int]] = set()

        def beats(a: int, b: int) -> bool | None:
            asked.add((min(a, b), max(a, b)))
            outcome = match_outcome(rows.get((min(a, b), max(a, b))))
            return outcome if a < b else not outcome

        knockout(sorted({x for key in rows for x in key}), beats)
        judged = {key for key, r in rows.items() if r["source"] == "llm"}
        calls_all += 2 * len(judged)
        calls_ko += 2 * len(asked & judged)
        if pid not in t_pairs or pid not in k_pairs:
            continue
        scores = {**dict(zip(group["i"], group["score_1"])), **dict(zip(group["j"], group["score_2"]))}
        chosen, rejected = k_pairs[pid]
        both += 1
        top += scores[chosen] == max(scores.values())
        bottom += scores[rejected] == min(scores.values())
        same += k_pairs[pid] == t_pairs[pid]
    n = len(t_pairs)
    share = (lambda x: x / n) if n else (lambda x: None)
    return {"prompts": n, "llm_calls_all_pairs": calls_all, "llm_calls_knockout": calls_ko, "pair_kept": share(both),
            "chosen_is_best": share(top), "rejected_is_worst": share(bottom), "same_pair": share(same),
            "knockout_only": len(set(k_pairs) - set(t_pairs))}


def drop_counts(pairs: pd.DataFrame) -> dict[str, int]:
    counts = pairs["drop_reason"].value_counts().to_dict()
    return {reason: int(counts.get(reason, 0)) for reason in REASONS}
