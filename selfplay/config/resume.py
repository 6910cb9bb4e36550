"""What a resume compares: the settings that change results (every field not made with `operational(...)`), by the
values they take effect with. `selfplay.runtime.rundir.open_run` refuses a change that a completed stage read."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, NamedTuple

from pydantic import BaseModel

from selfplay.config.backends import BACKENDS, affects_results

if TYPE_CHECKING:
    from selfplay.config.run import RunConfig

# selfplay's own defaults for trl.DPOConfig (`train.dpo` overrides each; selfplay.training.dpo.dpo_arguments).
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


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def result_fields(model: BaseModel, prefix: str = "") -> dict[str, Any]:
    """The settings of `model` that change results, as dotted keys: every field not made with `operational(...)`,
    nested sections walked into, dicts (train.dpo, train.lora) flattened."""
    dumped = model.model_dump(mode="json")
    out: dict[str, Any] = {}
    for name, field in type(model).model_fields.items():
        if not affects_results(field):
            continue
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            out.update(result_fields(value, f"{prefix}{name}."))
        else:
            out.update(flatten({name: dumped[name]}, prefix))
    return out


UNSET = "<unset>"


def effective_default(key: str) -> Any:
    """What leaving a pass-through key unset means: `train.dpo.X` selfplay's default for it, else trl.DPOConfig's;
    `train.lora.X` peft.LoraConfig's. UNSET for any other key, or one neither library has.

    >>> effective_default("train.dpo.learning_rate"), effective_default("train.dpo.beta"), effective_default("seed")
    (5e-05, 0.1, '<unset>')
    """
    section, _, name = key.removeprefix("train.").partition(".")
    if not key.startswith("train.") or section not in ("dpo", "lora") or not name or "." in name:
        return UNSET
    if section == "dpo":
        if name in DPO_DEFAULTS:
            return DPO_DEFAULTS[name]
        import trl

        fields = {f.name: f for f in dataclasses.fields(trl.DPOConfig)}
    else:
        import peft

        fields = {f.name: f for f in dataclasses.fields(peft.LoraConfig)}
    field = fields.get(name)
    if field is None or field.default is dataclasses.MISSING:
        return UNSET
    return field.default


class Change(NamedTuple):
    """A result-changing setting that differs between two configurations (`key` dotted, 'base model' for the model)."""

    key: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.key}: {self.old!r} -> {self.new!r}"


def result_changes(old: RunConfig, new: RunConfig) -> list[Change]:
    """The settings whose change would change results, compared by their effective values: a pass-through key left
    unset counts as its default (`effective_default`), an empty `train.dpo` as no keys. A section whose backend
    changed shows that change, and its settings that both backends have; the others have nothing to compare with."""
    a, b = ({k: v for k, v in result_fields(c).items() if v != {}} for c in (old, new))
    switched = tuple(f"{s}." for s in BACKENDS if getattr(old, s).backend != getattr(new, s).backend)
    changes = []
    for key in sorted(set(a) | set(b)):
        if key.startswith(switched) and (key not in a or key not in b):
            continue
        before, after = a.get(key, UNSET), b.get(key, UNSET)
        if UNSET in (before, after) and before != after:
            default = effective_default(key)
            before, after = (default if v == UNSET else v for v in (before, after))
        if before != after:
            changes.append(Change(key, a.get(key, UNSET), b.get(key, UNSET)))
    return changes


def result_differences(old: RunConfig, new: RunConfig) -> list[str]:
    """`result_changes` as 'key: old -> new' lines."""
    return [str(c) for c in result_changes(old, new)]
