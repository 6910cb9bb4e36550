"""Stage 4, train: DPO with TRL + a PEFT LoRA adapter on the round's policy, then merge and save (`selfplay.training.dpo`).

Reads `round_<k>/filter/pairs.parquet`; refuses to train on fewer than `train.min_pairs` kept pairs, saying why
and what to change. Training runs in this process, in a process of its own on a GPU (`isolation`), or under
`accelerate launch` on several (`train.launcher`).

Output `round_<k>/train/`: checkpoint/ (the merged model, or the adapter with `train.merge: false`: round k+1's
policy and reference), log_history.json (TRL's per-step log), plots/ (the training curves).
"""

from __future__ import annotations

import time

from prefect import task
from prefect.cache_policies import NONE

from selfplay.config.run import RunConfig
from selfplay.runtime import isolate
from selfplay.runtime.isolate import accelerate_command, isolated
from selfplay.runtime.rundir import RunDir
from selfplay.runtime.stages import Progress, gpu_slot, run_logger, stage
from selfplay.serving.kept import release_gpu
from selfplay.training.dpo import check_enough_pairs


@task(name="train", cache_policy=NONE)
@stage("train")
def train(cfg: RunConfig, k: int, policy: str) -> None:
    """DPO-train round k from `policy` on the filtered pairs; publish the merged checkpoint."""
    log = run_logger()
    run = RunDir(cfg.run_dir)
    filtered = run.manifest(k, "filter")["metrics"]
    check_enough_pairs(filtered["kept"], cfg.train.min_pairs, filtered["drops"], k)
    started = time.time()
    log.info("round %d: DPO on %d pairs from %s", k, filtered["kept"], policy)
    bar = Progress(f"{cfg.name} round {k}: DPO training")
    launcher = cfg.train.launcher
    command = accelerate_command(launcher.config_file, launcher.num_processes, launcher.args) if launcher.kind == "accelerate" else None
    release_gpu()  # the run's kept vLLM servers give their GPU memory back (sleep) before training takes it
    with run.stage_output(k, "train", {"policy": policy, "reference": policy}) as (out, manifest), gpu_slot(f"{cfg.name} round {k} train"):
        metrics, peak = isolate.call(
            "selfplay.training.dpo:train_dpo", cfg, k, policy, str(run.stage_dir(k, "filter") / "pairs.parquet"), str(out),
            isolated=command is not None or isolated(cfg.isolation), launcher=command, scratch=out, label=f"round {k} train",
            log=log, progress=bar.update)
        metrics.update(seconds=time.time() - started, peak_gpu_gb=peak)
        manifest["metrics"] = metrics
        manifest["checkpoint"] = str(run.checkpoint(k))
    log.info("round %d: trained %d steps in %.0f s, loss %.4f -> %.4f", k, metrics["steps"], metrics["seconds"],
             metrics.get("initial_loss", float("nan")), metrics.get("final_loss", float("nan")))
