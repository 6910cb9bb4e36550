"""Which judged pairs train, pure logic over the judgments table: drop reasons, chosen and rejected, and for a
tournament or a knockout each prompt's best against its worst (`select_pairs`, the filter stage's). Also how a
knockout's pick compares with the all-pairs tournament (`knockout_agreement`, for `python -m tools.bench knockout`).
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from selfplay.pairs.build import REASONS, drop_reason
from selfplay.pairs.knockout import prompt_knockout, select_knockout


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


def drop_llm_pairs(selected: pd.DataFrame) -> pd.DataFrame:
    """Pure: the kept pairs the LLM judge decided leave the training set (`judge_at_chance`), the verifier's stay; for
    `judge.audit.on_chance: drop`, when the audit found the judge no better than chance."""
    out = selected.copy()
    drop = out["kept"] & (out["source"] == "llm")
    out.loc[drop, "drop_reason"] = "judge_at_chance"
    out.loc[drop, ["chosen", "rejected"]] = None
    out["kept"] = out["kept"] & ~drop
    return out


def drop_counts(pairs: pd.DataFrame) -> dict[str, int]:
    counts = pairs["drop_reason"].value_counts().to_dict()
    return {reason: int(counts.get(reason, 0)) for reason in REASONS}


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
        prompt_knockout(rows, sorted({x for key in rows for x in key}), asked)
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
