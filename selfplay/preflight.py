"""Checks that run before any expensive work: bad input fails here, with a message that says what to fix."""

from __future__ import annotations

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
        try:
            DPOConfig(**dpo_arguments(cfg, 1, scratch, device, str(dtype).removeprefix("torch.")))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"train.dpo: trl.DPOConfig rejects these settings: {exc}") from None
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
