"""Stage 3, filter: keep only pairs worth training on, and count every drop by its reason.

Reasons, in the order they are checked:
  empty         a response shorter than `filter.min_chars` (after stripping)
  truncated     a response cut off by the sampling budget (`filter.drop_truncated`)
  too_similar   the responses' similarity (rapidfuzz ratio, 0-1) is at least `filter.max_similarity`
  length_ratio  the longer response is more than `filter.max_length_ratio` times the shorter (length control)
  over_budget   beyond `judge.max_calls_per_prompt`, so not judged
  judge_error   the judge failed on either order (after retries)
  invalid       the judge answered, but not with a verdict (discrete modes)
  tie           the swap-averaged margin is under `judge.margin`, or a discrete judge said tie both times
  inconsistent  the two orders disagree (discrete verdict modes)
  not_selected  a tournament pair other than the prompt's best versus worst
The first five need no judge and are screened before judging (`screen`), so no judge call is spent on them.

With `judge.pairing: tournament` every judged pair scores its two completions (Copeland: +1 a win, -1 a loss;
or a Bradley-Terry fit to the swap-averaged preferences), and each prompt contributes one pair: its best
completion against its worst.

Output `round_<k>/filter/pairs.parquet`: every judged pair with `kept`, `drop_reason`, `chosen`, `rejected`.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
from prefect import get_run_logger, task
from prefect.cache_policies import NONE
from rapidfuzz import fuzz

from selfplay.config import FilterConfig, RunConfig
from selfplay.quality import data_quality
from selfplay.rundir import RunDir

REASONS = ("empty", "truncated", "too_similar", "length_ratio", "over_budget", "judge_error", "invalid", "tie", "inconsistent", "not_selected")


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


@task(name="filter", cache_policy=NONE)
def filter_pairs(cfg: RunConfig, k: int) -> dict[str, Any]:
    """Decide which judged pairs to keep for training."""
    log = get_run_logger()
    run = RunDir(cfg.run_dir)
    if run.is_done(k, "filter"):
        log.info("round %d: filter already complete, reusing %s", k, run.stage_dir(k, "filter"))
        return run.manifest(k, "filter")
    pairs = select_pairs(pd.read_parquet(run.stage_dir(k, "judge") / "judgments.parquet"), cfg.judge.pairing, cfg.judge.scoring,
                         cfg.filter.prefer_shorter_below_margin)
    prompts = pd.read_parquet(run.stage_dir(k, "sample") / "samples.parquet").drop_duplicates("prompt_id")["prompt"].tolist()
    quality = data_quality(pairs, prompts)
    with run.stage_output(k, "filter") as (out, manifest):
        pairs.to_parquet(out / "pairs.parquet", index=False)
        manifest["metrics"] = {"pairs": len(pairs), "kept": int(pairs["kept"].sum()), "drops": drop_counts(pairs), "quality": quality}
    log.info("round %d: kept %d of %d pairs; drops %s", k, manifest["metrics"]["kept"], len(pairs), manifest["metrics"]["drops"])
    for warning in quality["warnings"]:
        log.warning("round %d data quality: %s", k, warning["message"])
    return run.manifest(k, "filter")
