"""Stage 5, evaluate: the new checkpoint against the previous one on held-out prompts, judged in both orders.

Both models answer the same held-out prompts (the first `prompts.eval_size`, the same every round) with the same
seed; each pair (new, previous) is judged with the swap rule of the judge stage. The win rate counts a tie as half
a win: win_rate = (wins + ties / 2) / n. Both checkpoints are loaded from disk.

Output `round_<k>/evaluate/eval.parquet` (one row per prompt) and the counts in the manifest's metrics.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import pandas as pd
from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from selfplay.config import RunConfig
from selfplay.judges import make_judge
from selfplay.models import load_causal_lm, load_tokenizer, release_memory
from selfplay.orchestration import gpu_slot
from selfplay.prompts import load_prompts
from selfplay.rundir import RunDir
from tasks.judge import PAIR_COLUMNS, judge_pairs
from tasks.sample import generate

OUTCOME = {"first": "win", "second": "loss"}


def tally(verdicts: list[str]) -> dict[str, Any]:
    """Win / tie / loss counts of the new model (position 'first') and its win rate, ties counted as half.

    >>> tally(["first", "first", "tie", "second"])["win_rate"]
    0.625
    """
    outcomes = [OUTCOME.get(v, "tie") for v in verdicts if v != "judge_error"]
    wins, losses = outcomes.count("win"), outcomes.count("loss")
    ties, n = outcomes.count("tie"), len(outcomes)
    return {"n": n, "wins": wins, "ties": ties, "losses": losses, "errors": len(verdicts) - n, "win_rate": (wins + ties / 2) / n if n else None}


def eval_responses(cfg: RunConfig, model_path: str, prompts: list[str]) -> list[dict[str, Any]]:
    e = cfg.evaluate
    model, tokenizer = load_causal_lm(model_path), load_tokenizer(model_path)
    rows = generate(model, tokenizer, prompts, num_samples=1, temperature=e.temperature, top_p=1.0,
                    max_new_tokens=e.max_new_tokens, batch_size=cfg.sample.batch_size, seed=e.seed)
    del model
    release_memory()
    return rows


@task(name="evaluate", cache_policy=NONE)
def evaluate(cfg: RunConfig, k: int, previous: str) -> dict[str, Any]:
    """Judge round k's checkpoint against `previous` on the held-out prompts."""
    log = get_run_logger()
    run = RunDir(cfg.run_dir)
    if run.is_done(k, "evaluate"):
        log.info("round %d: evaluate already complete, reusing %s", k, run.stage_dir(k, "evaluate"))
        return run.manifest(k, "evaluate")
    started = time.time()
    held_out = load_prompts(cfg.prompts.eval, cfg.prompts.column, cfg.prompts.messages_column, cfg.prompts.split)[: cfg.prompts.eval_size]
    texts = [p["prompt"] for p in held_out]
    with gpu_slot():
        new = eval_responses(cfg, str(run.checkpoint(k)), texts)
        old = eval_responses(cfg, previous, texts)
    pairs = pd.DataFrame(
        [
            {"prompt_id": p["id"], "prompt": p["prompt"], "i": 0, "j": 0, "response_1": a["response"], "response_2": b["response"],
             "truncated_1": a["truncated"], "truncated_2": b["truncated"], "similarity": None, "screened": None}
            for p, a, b in zip(held_out, new, old)
        ],
        columns=PAIR_COLUMNS,
    )
    with gpu_slot() if cfg.judge.backend == "local" else contextlib.nullcontext():
        backend = make_judge(cfg.judge, previous)
        try:
            table, _, stats = judge_pairs(backend, pairs, cfg.judge)
        finally:
            backend.close()
            release_memory()
    table = table.rename(columns={"response_1": "response_new", "response_2": "response_previous"})
    table["outcome"] = [OUTCOME.get(v, "tie") for v in table["verdict"]]
    metrics = {
        **tally(table["verdict"].tolist()),
        "judge": stats,
        "mean_tokens_new": sum(r["n_tokens"] for r in new) / len(new),
        "mean_tokens_previous": sum(r["n_tokens"] for r in old) / len(old),
        "seconds": time.time() - started,
    }
    with run.stage_output(k, "evaluate", {"checkpoint": str(run.checkpoint(k)), "previous": previous}) as (out, manifest):
        table.to_parquet(out / "eval.parquet", index=False)
        manifest["metrics"] = metrics
    log.info("round %d: vs previous %d wins, %d ties, %d losses; win rate %.3f", k, metrics["wins"], metrics["ties"], metrics["losses"], metrics["win_rate"] or 0)
    return run.manifest(k, "evaluate")
