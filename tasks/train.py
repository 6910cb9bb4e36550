"""Stage 4, train: DPO with TRL + a PEFT LoRA adapter on the round's policy, then merge and save.

The reference is the policy itself with the adapter disabled (TRL's behaviour for a `peft_config` and no
`ref_model`), so round k trains against round k-1's checkpoint. The adapter is merged and the full model saved
(safetensors + tokenizer) as `round_<k>/train/checkpoint`: round k+1's policy *and* reference. Merging each round,
rather than stacking adapters, is also what keeps TRL from failing on a second "ref" adapter.

Everything under `train.dpo` goes to `trl.DPOConfig` as is; selfplay only sets defaults a recipe can override
(`DPO_DEFAULTS`) and the output directory.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from selfplay.config import RunConfig, scheduled
from selfplay.orchestration import Progress, gpu_slot
from selfplay.quality import warning
from selfplay.rundir import RunDir

# Defaults for a short CPU-friendly round; any of them can be overridden by train.dpo.
DPO_DEFAULTS: dict[str, Any] = {
    "per_device_train_batch_size": 8,
    "num_train_epochs": 1,
    "learning_rate": 5e-5,
    "max_length": 256,
    "logging_steps": 1,
    "save_strategy": "no",
    "report_to": "none",
    "disable_tqdm": True,
}

# The log keys we summarise; TRL names them so in its DPOTrainer.
CURVE_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "grad_norm")


class NotEnoughPairs(RuntimeError):
    """Too few kept pairs to train on; says why and what to change."""


def check_enough_pairs(kept: int, min_pairs: int, drops: dict[str, int], k: int) -> None:
    """Raise NotEnoughPairs (with the drop counts and what to change) when kept < min_pairs."""
    if kept >= min_pairs:
        return
    reasons = ", ".join(f"{r}: {n}" for r, n in sorted(drops.items(), key=lambda x: -x[1]) if n) or "none"
    raise NotEnoughPairs(
        f"round {k} kept {kept} pairs, fewer than train.min_pairs={min_pairs} (dropped: {reasons}). "
        f"To get more: draw more prompts (prompts.per_round), sample more per prompt (sample.num_samples), "
        f"give answers room to finish (sample.max_new_tokens) if many were truncated, lower judge.margin if many "
        f"were ties, raise filter.max_similarity if many were too similar; or lower train.min_pairs. These change the "
        f"round's data, so start a new run (--set name=...) with them; only train.min_pairs can change on a resume."
    )


def dpo_records(pairs: pd.DataFrame) -> list[dict[str, Any]]:
    """Kept pairs as TRL's conversational preference format (TRL applies the chat template)."""
    kept = pairs[pairs["kept"]]
    return [
        {
            "prompt": [{"role": "user", "content": p}],
            "chosen": [{"role": "assistant", "content": c}],
            "rejected": [{"role": "assistant", "content": r}],
        }
        for p, c, r in zip(kept["prompt"], kept["chosen"], kept["rejected"])
    ]


def dpo_arguments(cfg: RunConfig, k: int, output_dir: str, device: str, dtype_name: str) -> dict[str, Any]:
    """DPOConfig keyword arguments: our defaults, device precision, the recipe's train.dpo, then round k's
    train.schedule values on top."""
    from trl import DPOConfig

    args = {**DPO_DEFAULTS, "seed": cfg.seed + k}
    if device == "cuda":
        args.update(bf16=dtype_name == "bfloat16", fp16=dtype_name == "float16")
    else:  # TRL defaults to bf16 and gradient checkpointing, which assume a GPU
        args.update(bf16=False, fp16=False, use_cpu=True, gradient_checkpointing=False)
    args.update(cfg.train.dpo)
    for key, value in cfg.train.schedule.items():
        v = scheduled(value, k)
        args[key] = int(v) if isinstance(getattr(DPOConfig, key, None), int) and float(v).is_integer() else v
    args["output_dir"] = output_dir
    return args


def summarize_history(history: list[dict[str, Any]]) -> dict[str, Any]:
    """Headline training metrics from the Trainer's log history (per-step entries with a 'loss')."""
    steps = [h for h in history if "loss" in h and "rewards/accuracies" in h]
    if not steps:
        return {"steps": 0}
    last = steps[-1]
    mean = lambda key: float(sum(h[key] for h in steps) / len(steps))  # noqa: E731
    return {
        "steps": len(steps),
        "initial_loss": float(steps[0]["loss"]),
        "final_loss": float(last["loss"]),
        "mean_loss": mean("loss"),
        "reward_accuracy": mean("rewards/accuracies"),
        "reward_margin": mean("rewards/margins"),
        "final_reward_accuracy": float(last["rewards/accuracies"]),
        "final_reward_margin": float(last["rewards/margins"]),
        "ln2": math.log(2),
    }


def _warning(check: str, value: float, threshold: str, message: str) -> dict[str, Any]:
    return warning(check, round(float(value), 4), threshold, message)


def training_diagnoses(history: list[dict[str, Any]], ln2_tolerance: float = 0.02, max_accuracy: float = 0.95, drift: float = 0.05) -> list[dict[str, Any]]:
    """Warnings from a round's per-step training log, each saying what it means and what to try.

    - the first loss must be close to ln 2: the policy starts equal to its reference, so every margin is 0;
    - reward accuracy above `max_accuracy` over the last quarter of steps suggests overfitting;
    - chosen and rejected rewards drifting the same way (both below -drift, or both above +drift) over the last
      quarter means the policy moves both answers' likelihood together rather than separating them.
    """
    steps = [h for h in history if "loss" in h and "rewards/chosen" in h]
    if not steps:
        return []
    tail = steps[-max(1, len(steps) // 4):]
    mean = lambda key: sum(h[key] for h in tail) / len(tail)  # noqa: E731
    out = []
    if abs(steps[0]["loss"] - math.log(2)) > ln2_tolerance:
        out.append(_warning("initial_loss", steps[0]["loss"], f"ln 2 ± {ln2_tolerance}",
                            "The first DPO loss should be ln 2 (0.693) because the policy starts equal to its reference; "
                            "another value means the reference is not the policy's starting checkpoint, or dropout is on."))
    if mean("rewards/accuracies") > max_accuracy:
        out.append(_warning("reward_accuracy", mean("rewards/accuracies"), f"<= {max_accuracy}",
                            "Reward accuracy near 1 on the training pairs suggests overfitting: try fewer epochs, a lower "
                            "learning rate, a larger beta, or more pairs per round."))
    chosen, rejected = mean("rewards/chosen"), mean("rewards/rejected")
    if chosen < -drift and rejected < -drift:
        out.append(_warning("rewards_both_falling", chosen, f"chosen and rejected both < -{drift}",
                            "Chosen and rejected rewards both fell: the policy lowers the likelihood of the chosen answers "
                            "too. Try a lower learning rate, a larger beta, or an SFT term (loss_type: [sigmoid, sft])."))
    elif chosen > drift and rejected > drift:
        out.append(_warning("rewards_both_rising", chosen, f"chosen and rejected both > {drift}",
                            "Chosen and rejected rewards both rose: the policy raises the rejected answers' likelihood too. "
                            "Check the pairs' quality (judge margin, length bias), or raise beta."))
    return out


def log_callback(log, k: int, progress=None):
    """A TrainerCallback that sends TRL's per-step logs to our logger instead of stdout."""
    from transformers import TrainerCallback

    class _LogToPrefect(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if progress is not None:
                progress.update(state.global_step, state.max_steps)
            if logs:
                shown = {key: round(v, 4) if isinstance(v, float) else v for key, v in logs.items() if key in CURVE_KEYS}
                log.info("round %d: train step %d/%d %s", k, state.global_step, state.max_steps, shown or logs)

    return _LogToPrefect()


def train_dpo(cfg: RunConfig, k: int, policy: str, pairs: pd.DataFrame, out: Path, log) -> dict[str, Any]:
    """Train a LoRA adapter with DPO on `pairs`, merge it and save the full model to out/checkpoint."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, PrinterCallback, ProgressCallback
    from trl import DPOConfig, DPOTrainer

    from selfplay.models import load_tokenizer, peak_memory_gb, pick_device, release_memory, reset_peak_memory, weights_digest
    from selfplay.report import plot_curves

    device, dtype = pick_device()
    reset_peak_memory()
    tokenizer = load_tokenizer(Path(policy), padding_side="right")
    model = AutoModelForCausalLM.from_pretrained(policy, dtype=dtype).to(device)
    # With a peft_config and no ref_model, TRL's reference is these very weights with the adapter disabled.
    reference_digest = weights_digest(model)
    with tempfile.TemporaryDirectory(dir=out) as scratch:
        args = DPOConfig(**dpo_arguments(cfg, k, scratch, device, str(dtype).removeprefix("torch.")))
        trainer = DPOTrainer(
            model=model,
            ref_model=None,
            args=args,
            train_dataset=Dataset.from_list(dpo_records(pairs)),
            processing_class=tokenizer,
            peft_config=LoraConfig(task_type="CAUSAL_LM", **cfg.train.lora),
        )
        for cb in (PrinterCallback, ProgressCallback):
            trainer.remove_callback(cb)
        trainer.add_callback(log_callback(log, k, Progress(f"{cfg.name} round {k}: DPO training")))
        started = time.perf_counter()
        trainer.train()
        train_seconds = time.perf_counter() - started
        history = trainer.state.log_history
        # Tokens the policy trained on (prompt + chosen + rejected, as TRL tokenized them), for throughput.
        columns = trainer.train_dataset.column_names
        tokens = sum(len(row[c]) for row in trainer.train_dataset for c in ("prompt_ids", "chosen_ids", "rejected_ids") if c in columns)
    lora_b_norm = float(sum(p.detach().float().norm() ** 2 for n, p in trainer.model.named_parameters() if "lora_B" in n) ** 0.5)
    merged = trainer.model.merge_and_unload()
    merged.to(torch.float32 if device == "cpu" else dtype)
    merged.save_pretrained(out / "checkpoint")
    load_tokenizer(Path(policy)).save_pretrained(out / "checkpoint")
    trainer.accelerator.free_memory()  # the accelerator keeps references to the model and optimizer otherwise
    del trainer, model, merged
    release_memory()
    (out / "log_history.json").write_text(json.dumps(history, indent=1))
    plot_curves(history, out / "plots")
    return {
        **summarize_history(history),
        "pairs": len(pairs[pairs["kept"]]),
        "lora_b_norm": lora_b_norm,
        "reference_digest": reference_digest,
        "device": device,
        "warnings": training_diagnoses(history),
        "train_tokens": tokens,
        "tokens_per_second": tokens * args.num_train_epochs / max(train_seconds, 1e-9),
        "peak_gpu_gb": peak_memory_gb(),
    }


@task(name="train", cache_policy=NONE)
def train(cfg: RunConfig, k: int, policy: str) -> dict[str, Any]:
    """DPO-train round k from `policy` on the filtered pairs; publish the merged checkpoint."""
    log = get_run_logger()
    run = RunDir(cfg.run_dir)
    if run.is_done(k, "train"):
        log.info("round %d: train already complete, reusing %s", k, run.checkpoint(k))
        return run.manifest(k, "train")
    filtered = run.manifest(k, "filter")["metrics"]
    check_enough_pairs(filtered["kept"], cfg.train.min_pairs, filtered["drops"], k)
    pairs = pd.read_parquet(run.stage_dir(k, "filter") / "pairs.parquet")
    started = time.time()
    log.info("round %d: DPO on %d pairs from %s", k, filtered["kept"], policy)
    with run.stage_output(k, "train", {"policy": policy, "reference": policy}) as (out, manifest), gpu_slot():
        metrics = train_dpo(cfg, k, policy, pairs, out, log)
        metrics["seconds"] = time.time() - started
        manifest["metrics"] = metrics
        manifest["checkpoint"] = str(run.checkpoint(k))
    log.info("round %d: trained %d steps in %.0f s, loss %.4f -> %.4f", k, metrics["steps"], metrics["seconds"], metrics.get("initial_loss", float("nan")), metrics.get("final_loss", float("nan")))
    return run.manifest(k, "train")
