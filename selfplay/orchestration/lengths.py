"""Prompt lengths against the token budgets every prompt must fit, measured before any stage runs.

A prompt is sampled with its chat template, judged inside the judge's template with two responses, and trained on
with its completion; each of these has a budget in tokens:

- the policy's context (`max_position_embeddings`): the templated prompt and the longest answer asked for
  (`sample.max_new_tokens`, `evaluate.max_new_tokens`);
- `train.dpo.max_length` (selfplay's default where unset): the templated prompt and at least one completion token;
- `judge.max_length`, for a local judge (`judge.backend: transformers`, the only one that reads it): the judge's
  rendered prompt (system prompt, template, rubric, the prompt and its reference) and two responses of the longest
  length asked for.

`fitting` measures a prompt set once per process and splits it into the prompts that fit every budget and the
over-long ones, each with the first budget it exceeds. Preflight drops the over-long ones with a warning naming the
first few, or refuses them (`prompts.too_long: error`), and refuses a budget that leaves fewer prompts than a round
draws; the sample and evaluate stages draw from the same split, so a dropped prompt is never sampled.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, NamedTuple

# (config fields that decide the split, the set, the models) -> the split; one measurement per process.
_MEASURED: dict[str, tuple[list[dict[str, Any]], list[OverLong]]] = {}


class Budget(NamedTuple):
    """One budget: the setting that sets it (as 'key=value'), the most prompt tokens it allows, how it follows, and
    the key a user raises to widen it (None for the model's context)."""

    setting: str
    limit: int
    why: str
    key: str | None = None


class OverLong(NamedTuple):
    """A prompt over a budget: its id, its length in that budget's tokens, and the budget."""

    id: str
    tokens: int
    budget: Budget


def answer_tokens(cfg) -> int:
    """The longest answer a run asks the policy for: sampling's, or the evaluate stage's."""
    e = cfg.evaluate
    return max(cfg.sample.max_new_tokens, e.max_new_tokens, e.accuracy_max_new_tokens or 0)


def train_max_length(cfg) -> int:
    from selfplay.config.resume import effective_default

    value = cfg.train.dpo.get("max_length", effective_default("train.dpo.max_length"))
    return int(value)


def budgets(cfg, context: int | None) -> dict[str, Budget]:
    """The budgets on the templated prompt ('policy') and on the judge's rendered prompt ('judge')."""
    answer = answer_tokens(cfg)
    out = {}
    if context:
        out["context"] = Budget(f"the model's context of {context} tokens", context - answer, f"less the longest answer asked for ({answer} tokens)")
    max_length = train_max_length(cfg)
    out["train"] = Budget(f"train.dpo.max_length={max_length}", max_length - 1, "a prompt must leave room for its completion", "train.dpo.max_length")
    if cfg.judge.backend == "transformers":
        out["judge"] = Budget(f"judge.max_length={cfg.judge.max_length}", cfg.judge.max_length - 2 * answer,
                              f"the judge's prompt holds two responses of up to {answer} tokens", "judge.max_length")
    return out


def policy_lengths(tokenizer, prompts: list[dict[str, Any]]) -> list[int]:
    """Each prompt's length as the policy reads it: one user turn in its chat template, the generation prompt added."""
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p["prompt"]}], tokenize=False, add_generation_prompt=True)
             for p in prompts]
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []


def judge_lengths(tokenizer, prompts: list[dict[str, Any]], judge) -> list[int]:
    """Each prompt's judge call with empty responses, as the local judge renders it (system prompt, template, rubric,
    the prompt and its reference): what the prompt costs the judge before the two responses."""
    from selfplay.judging.prompt import load_rubric, templates_for
    from selfplay.judging.verdicts import Comparison, swap_calls

    comparisons = [Comparison(p["prompt"], "", "", p.get("reference")) for p in prompts]
    calls = swap_calls(comparisons, templates_for(judge.template), load_rubric(judge.rubric), judge.system_prompt)[::2]
    texts = [tokenizer.apply_chat_template([{"role": "system", "content": c.system}, {"role": "user", "content": c.user}],
                                           tokenize=False, add_generation_prompt=True) for c in calls]
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []


def context_length(model: Path) -> int | None:
    from transformers import AutoConfig

    return getattr(AutoConfig.from_pretrained(model), "max_position_embeddings", None)


def judge_model(cfg, base: Path) -> Path:
    from selfplay.inputs.models import resolve_model

    return base if cfg.judge.model == "reference" else resolve_model(cfg.judge.model)


def fitting(cfg, which: str, base: Path, prompts: list[dict[str, Any]] | None = None) -> tuple[list[dict[str, Any]], list[OverLong]]:
    """The prompts of set `which` ('train' or 'eval') that fit every budget, in order, and the over-long ones."""
    from selfplay.inputs.models import load_tokenizer
    from selfplay.inputs.prompts import prompt_set

    key = repr((cfg.prompts.model_dump_json(), cfg.sample.max_new_tokens, cfg.evaluate.model_dump_json(), cfg.train.dpo.get("max_length"),
                cfg.judge.model_dump_json(), which, str(base)))
    if key in _MEASURED:
        return _MEASURED[key]
    prompts = prompt_set(cfg.prompts, which) if prompts is None else prompts
    limits = budgets(cfg, context_length(base))
    tokenizer = load_tokenizer(base)
    measured = {"context": policy_lengths(tokenizer, prompts)}
    measured["train"] = measured["context"]
    if "judge" in limits:
        measured["judge"] = judge_lengths(load_tokenizer(judge_model(cfg, base)), prompts, cfg.judge)
    kept, over = [], []
    for i, p in enumerate(prompts):
        worst = next((OverLong(str(p["id"]), measured[name][i], b) for name, b in limits.items() if measured[name][i] > b.limit), None)
        (kept if worst is None else over).append(p if worst is None else worst)
    _MEASURED[key] = kept, over
    return kept, over


def usable_prompts(cfg, which: str) -> list[dict[str, Any]]:
    """The prompts of set `which` a stage may use: those that fit every budget (preflight has said which did not)."""
    from selfplay.inputs.models import resolve_model

    return fitting(cfg, which, resolve_model(cfg.policy.model))[0]


def describe(over: list[OverLong], total: int, which: str, shown: int = 3) -> str:
    """'N of M train prompts are too long: id (n tokens > limit, setting: why), ...'."""
    first = "; ".join(f"{o.id} ({o.tokens} tokens > {o.budget.limit}: {o.budget.setting}, {o.budget.why})" for o in over[:shown])
    more = f"; and {len(over) - shown} more" if len(over) > shown else ""
    return f"{len(over)} of {total} {which} prompt(s) are too long for their token budgets: {first}{more}"


def spread(over: list[OverLong]) -> str:
    """The lengths of the over-long prompts, for a budget that none fits: 'shortest 25, median 38 tokens'."""
    n = sorted(o.tokens for o in over)
    return f"shortest {n[0]}, median {statistics.median(n):.0f} tokens"
