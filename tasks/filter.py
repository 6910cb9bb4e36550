"""Stage 3, filter: keep only pairs worth training on, and count every drop by its reason.

Reasons, in the order they are checked:
  empty         a response shorter than `filter.min_chars` (after stripping)
  truncated     a response cut off by the sampling budget (`filter.drop_truncated`)
  too_similar   the responses' similarity (rapidfuzz ratio, 0-1) is at least `filter.max_similarity`
  judge_error   the judge failed on either order
  tie           the swap-averaged margin is under `judge.margin`
  inconsistent  the two orders disagree (discrete verdict modes)
The first three need no judge and are screened before judging (`screen`), so no judge call is spent on them.

Output `round_<k>/filter/pairs.parquet`: every judged pair with `kept`, `drop_reason`, `chosen`, `rejected`.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
from prefect import get_run_logger, task
from prefect.cache_policies import NONE
from rapidfuzz import fuzz

from selfplay.config import FilterConfig, RunConfig
from selfplay.rundir import RunDir

REASONS = ("empty", "truncated", "too_similar", "judge_error", "tie", "inconsistent")


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


def select_pairs(judgments: pd.DataFrame) -> pd.DataFrame:
    """Pure: add kept / drop_reason / chosen / rejected to the judgments table."""
    out = judgments.copy()
    out["drop_reason"] = [drop_reason(s, v) for s, v in zip(out["screened"], out["verdict"])]
    out["kept"] = out["drop_reason"].isna()
    first = out["verdict"] == "first"
    out["chosen"] = out["response_1"].where(first, out["response_2"]).where(out["kept"])
    out["rejected"] = out["response_2"].where(first, out["response_1"]).where(out["kept"])
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
    pairs = select_pairs(pd.read_parquet(run.stage_dir(k, "judge") / "judgments.parquet"))
    with run.stage_output(k, "filter") as (out, manifest):
        pairs.to_parquet(out / "pairs.parquet", index=False)
        manifest["metrics"] = {"pairs": len(pairs), "kept": int(pairs["kept"].sum()), "drops": drop_counts(pairs)}
    log.info("round %d: kept %d of %d pairs; drops %s", k, manifest["metrics"]["kept"], len(pairs), manifest["metrics"]["drops"])
    return run.manifest(k, "filter")
