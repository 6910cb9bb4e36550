"""Stage 3, filter: keep only pairs worth training on, and count every drop by its reason.

Reasons, in the order they are checked:
  empty         a response shorter than `filter.min_chars` (after stripping)
  truncated     a response cut off by the sampling budget (`filter.drop_truncated`)
  too_similar   the responses' similarity (rapidfuzz ratio, 0-1) is at least `filter.max_similarity`
  length_ratio  the longer response is more than `filter.max_length_ratio` times the shorter (length control)
  over_budget   beyond `judge.max_calls_per_prompt`, so not judged
  not_matched   a pair a knockout (`judge.pairing: knockout`) never needed to ask
  judge_error   the judge failed on either order (after retries)
  invalid       the judge answered, but not with a verdict (discrete modes)
  tie           the swap-averaged margin is under `judge.margin`, or a discrete judge said tie both times
  inconsistent  the two orders disagree (discrete verdict modes)
  not_selected  a tournament or knockout pair other than the prompt's best versus worst
The first six need no judge and are screened before judging (`selfplay.pairs.build.screen`), so no judge call is spent on
them. The selection itself is `selfplay.pairs.selection.select_pairs`.

With `judge.pairing: tournament` every judged pair scores its two completions (Copeland: +1 a win, -1 a loss;
or a Bradley-Terry fit to the swap-averaged preferences), and each prompt contributes one pair: its best
completion against its worst. A knockout (`judge.pairing: knockout`) finds them with a bracket instead
(`selfplay.pairs.knockout.knockout`), and trains on their own match where its verdict has a winner.

Output `round_<k>/filter/pairs.parquet`: every judged pair with `kept`, `drop_reason`, `chosen`, `rejected`.
"""

from __future__ import annotations

import pandas as pd
from prefect import task
from prefect.cache_policies import NONE

from selfplay.config.run import RunConfig
from selfplay.evaluation.quality import data_quality
from selfplay.pairs.selection import drop_counts, drop_llm_pairs, select_pairs
from selfplay.runtime.rundir import RunDir
from selfplay.runtime.stages import run_logger, stage


@task(name="filter", cache_policy=NONE)
@stage("filter")
def filter_pairs(cfg: RunConfig, k: int) -> None:
    """Decide which judged pairs to keep for training."""
    log = run_logger()
    run = RunDir(cfg.run_dir)
    pairs = select_pairs(pd.read_parquet(run.stage_dir(k, "judge") / "judgments.parquet"), cfg.judge.pairing, cfg.judge.scoring,
                         cfg.filter.prefer_shorter_below_margin)
    audit = run.manifest(k, "judge")["metrics"].get("audit") or {}
    if audit.get("informative") is False and cfg.judge.audit.on_chance == "drop":
        pairs = drop_llm_pairs(pairs)
        log.warning("round %d: the judge audit found the LLM judge no better than chance (judge.audit.on_chance=drop): the %d pairs it "
                    "decided leave the training set", k, int((pairs["drop_reason"] == "judge_at_chance").sum()))
    prompts = pd.read_parquet(run.stage_dir(k, "sample") / "samples.parquet").drop_duplicates("prompt_id")["prompt"].tolist()
    quality = data_quality(pairs, prompts)
    with run.stage_output(k, "filter") as (out, manifest):
        pairs.to_parquet(out / "pairs.parquet", index=False)
        manifest["metrics"] = {"pairs": len(pairs), "kept": int(pairs["kept"].sum()), "drops": drop_counts(pairs), "quality": quality}
    log.info("round %d: kept %d of %d pairs; drops %s", k, manifest["metrics"]["kept"], len(pairs), manifest["metrics"]["drops"])
    for warning in quality["warnings"]:
        log.warning("round %d data quality: %s", k, warning["message"])
