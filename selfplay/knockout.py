"""The knockout (`judge.pairing: knockout`): each prompt's best and worst completion found by a bracket instead of
all pairs, pure logic over the pairs tables of `selfplay.pairs`.

`knockout` is the bracket (the max-min algorithm, then best against worst); `KnockoutPhases` hands the judge one
phase at a time across every prompt (`selfplay.judging.judge_phases`); `knockout_table` makes the judge stage's
judgments table of what was asked; `select_knockout` is the filter's selection; `knockout_agreement` replays a
knockout on an all-pairs table, for `python -m selfplay.bench knockout`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pandas as pd

from selfplay.judging import Comparison, present
from selfplay.pairs import _comparison, _separated, drop_reason, judgments_table, pair_comparisons, select_pairs


Beats = Callable[[int, int], "bool | None"]


def max_matches(k: int) -> int:
    """The most pairs a knockout of k samples asks: ceil(3k/2) - 2 bracket matches and the final, at most all pairs.

    >>> [max_matches(k) for k in (1, 2, 3, 8)]
    [0, 1, 3, 11]
    """
    return 0 if k < 2 else min(k * (k - 1) // 2, (3 * k + 1) // 2 - 1)


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


def _prompt_knockout(rows: dict[tuple[int, int], dict[str, Any]], samples: list[int],
                     asked: set[tuple[int, int]] | None = None) -> tuple[list[tuple[int, int]], int | None, int | None]:
    """`knockout` over one prompt's pair rows, keyed (i, j) with i < j; `asked` collects the matches it looked at."""
    def beats(a: int, b: int) -> bool | None:
        if asked is not None:
            asked.add((min(a, b), max(a, b)))
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




def select_knockout(out: pd.DataFrame) -> pd.DataFrame:
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
        _prompt_knockout(rows, sorted({x for key in rows for x in key}), asked)
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
