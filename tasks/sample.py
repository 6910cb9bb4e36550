"""Stage 1, sample: K completions per prompt from the round's policy, batched, seeded (`selfplay.generation.local`).

Output `round_<k>/sample/samples.parquet`, one row per completion: prompt_id, prompt, reference and verifier (the
prompt's reference answer and the verifier its row names, null where it has none), sample_idx, response,
prompt_tokens, n_tokens, truncated (the completion hit max_new_tokens before its end-of-sequence token).
The policy is always loaded from its saved checkpoint, never reused from the trainer's in-memory model.
"""

from __future__ import annotations

import time

import pandas as pd
from prefect import task
from prefect.cache_policies import NONE

from selfplay.config.run import RunConfig
from selfplay.generation.served import sample_from_server
from selfplay.inputs.prompts import draw_prompts
from selfplay.orchestration.lengths import usable_prompts
from selfplay.runtime import isolate
from selfplay.runtime.isolate import isolated
from selfplay.runtime.rundir import RunDir
from selfplay.runtime.stages import Progress, gpu_slot, run_logger, stage
from selfplay.serving.kept import release_gpu

COLUMNS = ["prompt_id", "prompt", "reference", "verifier", "sample_idx", "response", "prompt_tokens", "n_tokens", "truncated"]


def round_prompts(cfg: RunConfig, k: int) -> list[dict[str, str]]:
    pool = usable_prompts(cfg, "train")  # those that fit their token budgets (preflight said which did not)
    return draw_prompts(pool, cfg.prompts.per_round, cfg.seed, k)


@task(name="sample", cache_policy=NONE)
@stage("sample")
def sample(cfg: RunConfig, k: int, policy: str) -> None:
    """Sample K completions per drawn prompt from `policy`."""
    log = run_logger()
    run = RunDir(cfg.run_dir)
    prompts = round_prompts(cfg, k)
    s = cfg.sample
    started = time.time()
    bar = Progress(f"{cfg.name} round {k}: sampling {len(prompts)} prompts x {s.num_samples}")

    def progress(done: int, total: int) -> None:
        bar.update(done, total)
        elapsed = time.time() - started
        log.info("round %d: sampled %d/%d prompts x %d (%.2f prompts/s, %.0f s)", k, done, total, s.num_samples, done / max(elapsed, 1e-9),
                 elapsed)

    peak = None
    if s.backend == "transformers":
        release_gpu()  # a kept vLLM judge server on the GPU sleeps while the policy samples here
        with gpu_slot(f"{cfg.name} round {k} sample"):
            rows, peak = isolate.call("selfplay.generation.local:sample_local", policy, [p["prompt"] for p in prompts], s, s.seed + k,
                                      isolated=isolated(cfg.isolation), scratch=run.round_dir(k), label=f"round {k} sample",
                                      log=log, progress=progress, cpu_dtype=cfg.policy.cpu_dtype)
    else:
        rows = sample_from_server(cfg, k, policy, [p["prompt"] for p in prompts], run.round_dir(k) / "sample-server.log", log,
                                  progress=progress)
    for row in rows:
        p = prompts[row.pop("prompt_index")]
        row.update(prompt_id=p["id"], prompt=p["prompt"], reference=p.get("reference"), verifier=p.get("verifier"))
    table = pd.DataFrame(rows, columns=COLUMNS)
    with run.stage_output(k, "sample", {"policy": policy}) as (out, manifest):
        table.to_parquet(out / "samples.parquet", index=False)
        manifest["metrics"] = {
            "prompts": len(prompts),
            "completions": len(table),
            "truncated": int(table["truncated"].sum()),
            "mean_tokens": float(table["n_tokens"].mean()),
            "tokens_per_second": float(table["n_tokens"].sum() / max(time.time() - started, 1e-9)),
            "seconds": time.time() - started,
            "peak_gpu_gb": peak,
        }
        if s.backend == "endpoint":
            from selfplay.serving.probe import remembered

            manifest["metrics"]["endpoint"] = remembered(s.endpoint)  # what the endpoint was probed to honour
    log.info("round %d: %d completions, %d truncated", k, len(table), manifest["metrics"]["truncated"])
