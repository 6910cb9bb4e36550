"""Checks that run before any expensive work: bad input fails here, with a message that says what to fix."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from selfplay.config import ConfigError, RunConfig, check_passthrough
from selfplay.models import load_tokenizer, resolve_model
from selfplay.prompts import load_prompts


def preflight(cfg: RunConfig) -> Path:
    """Validate the pass-through settings, the prompts, the models and the judge template; return the base model."""
    from trl import DPOConfig

    from selfplay.models import pick_device
    from tasks.judge import load_rubric, load_template
    from tasks.train import dpo_arguments

    check_passthrough(cfg.train)
    device, dtype = pick_device()
    with tempfile.TemporaryDirectory() as scratch:
        for k in range(1, cfg.rounds + 1):  # schedules change settings per round
            try:
                DPOConfig(**dpo_arguments(cfg, k, scratch, device, str(dtype).removeprefix("torch.")))
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"train.dpo / train.schedule: trl.DPOConfig rejects round {k}'s settings: {exc}") from None
    p = cfg.prompts
    train = load_prompts(p.train, p.column, p.messages_column, p.split)
    if len(train) < 1:
        raise ConfigError(f"prompts.train {p.train!r} has no prompts")
    held_out = load_prompts(p.eval, p.column, p.messages_column, p.split)
    if len(held_out) < p.eval_size:
        raise ConfigError(f"prompts.eval {p.eval!r} has {len(held_out)} prompts, fewer than prompts.eval_size={p.eval_size}")
    try:
        load_template(cfg.judge.template)
        load_rubric(cfg.judge.rubric)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    base = resolve_model(cfg.policy.model)
    load_tokenizer(base)  # a chat template is required
    if cfg.sample.backend == "vllm" and shutil.which(cfg.sample.server.command[0]) is None:
        raise ConfigError(
            f"sample.server.command: {cfg.sample.server.command[0]!r} is not an executable on PATH. vLLM cannot share this "
            f"environment (it pins other torch/transformers/fastapi versions): install it in its own virtualenv and set "
            f"sample.server.command to [/path/to/vllm-venv/bin/vllm, serve], or use a docker run of vllm/vllm-openai."
        )
    if cfg.sample.backend == "endpoint":
        from selfplay.judges.openai import EndpointError, check_endpoint, resolve_api_key

        try:
            check_endpoint(cfg.sample.endpoint, resolve_api_key(cfg.sample.endpoint))
        except EndpointError as exc:
            raise ConfigError(str(exc).replace("judge.endpoint", "sample.endpoint")) from None
    if cfg.judge.backend == "openai":
        from selfplay.judges.openai import EndpointError, check_endpoint, resolve_api_key

        try:
            check_endpoint(cfg.judge.endpoint, resolve_api_key(cfg.judge.endpoint))
        except EndpointError as exc:
            raise ConfigError(str(exc)) from None
    else:
        judge_model = base if cfg.judge.model == "reference" else resolve_model(cfg.judge.model)
        from selfplay.judges.local import label_token_ids

        label_token_ids(load_tokenizer(judge_model))
    return base
