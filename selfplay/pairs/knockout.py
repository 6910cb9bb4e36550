"""The knockout (`judge.pairing: knockout`): each prompt's best and worst completion found by a bracket instead of
all pairs, pure logic over the pairs tables of `selfplay.pairs.build`.

`knockout` is the bracket (the max-min algorithm, then best against worst); `KnockoutPhases` hands the judge one
phase at a time across every prompt (`selfplay.judging.runner.judge_phases`); `select_knockout` is the filter's
selection. (`selfplay.pairs.build.knockout_table` is the judge stage's table of what was asked, and
`selfplay.pairs.selection.knockout_agreement` replays a knockout on an all-pairs table.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pandas as pd

from selfplay.inputs.tables import present
from selfplay.judging.verdicts import Comparison
from selfplay.pairs.build import comparison_of, pair_comparisons, separated_prompts

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


def prompt_knockout(rows: dict[tuple[int, int], dict[str, Any]], samples: list[int],
                     asked: set[tuple[int, int]] | None = None) -> tuple[list[tuple[int, int]], int | None, int | None]:
    """`knockout` over one prompt's pair rows, keyed (i, j) with i < j; `asked` collects the matches it looked at."""
    def beats(a: int, b: int) -> bool | None:
        if asked is not None:
            asked.add((min(a, b), max(a, b)))
        outcome = match_outcome(rows.get((min(a, b), max(a, b))))
        return outcome if outcome is None or a < b else not outcome
    return knockout(samples, beats)


class KnockoutPhases:
    """A round's knockouts as the judge's phases (`selfplay.judging.runner.judge_phases`): `next(decided)` gives the next
    phase's comparisons, keyed by their row in `pairs`, from the verdicts so far; {} when every prompt's best and
    worst are known. Pure (a function of `pairs` and `decided`), so a judge in another process replays it.
    `candidates` are every comparison a knockout could ask (for `llm_count`: whether a judge is needed at all)."""

    def __init__(self, pairs: pd.DataFrame):
        self.pairs = pairs
        self.separated = separated_prompts(pairs)
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
            needed, _, _ = prompt_knockout(rows, samples)
            for key in needed:
                idx = index[key]
                out[idx] = comparison_of(self.pairs.loc[idx].to_dict(), self.separated)
        return out


def select_knockout(out: pd.DataFrame) -> pd.DataFrame:
    """Each prompt's best-against-worst match trains, if its verdict has a winner (chosen as the verdict says: two
    orders on the pair itself outweigh the bracket); every other match is `not_selected`."""
    for _, group in out.groupby("prompt_id", sort=False):
        records = dict(zip(group.index, group.to_dict("records")))
        rows = {(int(r["i"]), int(r["j"])): r for r in records.values()}
        samples = sorted({int(x) for x in group["i"]} | {int(x) for x in group["j"]})
        _, best, worst = prompt_knockout(rows, samples)
        final = None if best is None or best == worst else (min(best, worst), max(best, worst))
        for idx, row in records.items():
            if (int(row["i"]), int(row["j"])) == final:
                continue  # its verdict and the screen decide, as for any pair
            if not isinstance(row["drop_reason"], str) or row["drop_reason"] in ("tie", "inconsistent"):
                out.at[idx, "drop_reason"] = "not_selected"
    return out


