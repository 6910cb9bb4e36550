"""The sampler's and the judge's backends: one small pydantic model per backend, one naming scheme for both.

    transformers   a model run in-process by transformers (the CPU default)
    vllm           a vLLM server selfplay starts for the stage and stops after (`server`: how)
    endpoint       an OpenAI-compatible server that is already running (`endpoint`: where)

`sample` and `judge` each hold one of them, chosen by its `backend` key (a pydantic discriminated union). The
section's common fields sit on a base class (`SampleConfig`, `JudgeConfig`) and each backend's subclass adds only
what that backend reads, so a recipe stays as flat as before (`judge: {backend: vllm, model: ..., server: {...}}`),
`cfg.judge.backend == "vllm"` reads as before, `cfg.judge.server` exists only on the vllm judge, and the Prefect form
shows only the chosen backend's fields. A nested `backend:` block would have moved every recipe's keys one level
down for nothing a reader gains.

Each field says whether it changes results: a field made with `operational(...)` (how and where work runs,
budgets, accounting) may change on resume; every other field is part of the results, and a change of backend is one
too (`config.resume.result_changes` reads this from the models).

Older spellings keep loading (`prepare_section`): the judge's `local` is now `transformers` and `openai` is
`endpoint` (a one-line deprecation warning names the new spelling); a setting of another backend that still has its
default value, as older runs recorded every backend's settings, is dropped; any other setting of another backend is
an error that names the backend that reads it.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError, PydanticUndefined

from selfplay.config.server import ServerSpec

log = logging.getLogger(__name__)

# The judge's names before the sampler's scheme was used for both sections.
OLD_NAMES = {"judge": {"local": "transformers", "openai": "endpoint"}}
DEFAULT_BACKEND = "transformers"
BackendName = Literal["transformers", "vllm", "endpoint"]


def operational(default: Any = PydanticUndefined, **kw: Any) -> Any:
    """A `Field` that changes no stage's output (how and where work runs, budgets, accounting): a resume may change it."""
    return Field(default, json_schema_extra={"affects_results": False}, **kw)


def affects_results(field: FieldInfo) -> bool:
    extra = field.json_schema_extra
    return not (isinstance(extra, dict) and extra.get("affects_results") is False)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class EndpointConfig(Section):
    """An OpenAI-compatible HTTP endpoint (OpenAI, `vllm serve`, SGLang, TGI, llama.cpp, ...)."""

    base_url: str = Field(..., description="API base URL, e.g. https://api.openai.com/v1 or http://localhost:8000/v1.")
    model: str = Field(..., description="Model name as the endpoint knows it.")
    api_key_env: str | None = operational(
        None, description="Environment variable holding the API key (the key itself is never configured); unset, OpenAI's own API uses OPENAI_API_KEY "
                          "and other hosts get no key.")
    api_key_secret: str | None = operational(None, description="Name of a Prefect Secret block holding the API key; wins over api_key_env.")
    timeout: float = operational(60.0, gt=0, description="Seconds per request before it counts as timed out (and is retried).")
    max_concurrency: int = operational(16, ge=1, description="Requests in flight at most.")
    max_retries: int = operational(6, ge=0, description="Retries of 429, 5xx, timeouts, connection errors and malformed replies.")
    price_input_per_mtok: float = operational(0.0, ge=0, description="Estimated cost per million prompt tokens (for accounting only).")
    price_output_per_mtok: float = operational(0.0, ge=0, description="Estimated cost per million completion tokens.")


# ---------------------------------------------------------------- sample

SCOPE_HELP = ("'run': one server kept for the whole run, each round's checkpoint loaded into it (an adapter at runtime, merged "
              "weights reloaded in place; asleep while training on a GPU); 'stage': a server started and stopped for each stage "
              "that needs it.")

class SampleConfig(Section):
    """What every sampler reads; `sample.backend` picks one of the subclasses below."""

    backend: BackendName = Field(DEFAULT_BACKEND, description="'transformers', 'vllm' or 'endpoint'.")  # first in the form

    num_samples: int = Field(4, ge=2, description="Completions per prompt (K).")
    temperature: float = Field(0.8, ge=1e-5, description="Sampling temperature (at least 1e-5: vLLM samples greedily below that, "
                               "and refuses greedy sampling with K > 1).")
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus sampling mass.")
    max_new_tokens: int = Field(96, ge=1, description="Generation budget; completions that hit it are marked truncated.")
    batch_size: int = Field(32, ge=1, description="Sequences per generate() call (the transformers sampler, and the evaluate stage's generations).")
    seed: int = Field(0, description="Base seed; each round adds its round number.")


class TransformersSampleConfig(SampleConfig):
    backend: Literal["transformers"] = Field("transformers", description="Sample in-process with transformers (the CPU default).")
    decoder: Literal["generate", "fast"] = Field(
        "generate", description="'generate': transformers' generate, each prompt prefilled once for its K samples (the same draws as "
        "without sharing). 'fast': selfplay's own loop: the shared prefill, tokens drawn among the top-k only (the same top-k/top-p "
        "distribution as generate, other draws), and rows that finish leave the batch. It falls back to generate, with a warning, for "
        "a model whose generation_config asks for other logits processors (a repetition penalty, say).")


class VllmSampleConfig(SampleConfig):
    backend: Literal["vllm"] = Field("vllm", description="Serve the policy with vLLM: a server selfplay starts, stops, and keeps "
                                     "across rounds (server_scope).")
    server: ServerSpec = Field(default_factory=ServerSpec, description="How to start and stop the server.")
    server_scope: Literal["run", "stage"] = operational("run", description=SCOPE_HELP)


class EndpointSampleConfig(SampleConfig):
    backend: Literal["endpoint"] = Field("endpoint", description="Sample from an already-running OpenAI-compatible server.")
    endpoint: EndpointConfig = Field(..., description="The running server (base_url, model).")


SampleBackend = Annotated[TransformersSampleConfig | VllmSampleConfig | EndpointSampleConfig, Field(discriminator="backend")]


# ---------------------------------------------------------------- judge

JudgeMode = Literal["auto", "logprobs", "choice", "text"]
MODE_HELP = ("How the verdict is read: label logprobs, a structured A/B/tie choice, or a [[A]]/[[B]]/[[tie]] marker in "
             "text. 'auto' uses the best of these that the endpoint honours (probed before the run starts).")
REASONING_HELP = ("Text mode's answer budget: 0 asks for the verdict marker alone (at most 8 tokens); more asks the judge to "
                  "reason first and end with the marker, in at most this many tokens.")


class VerifierConfig(Section):
    """Where a prompt has a reference answer, a verifier decides between two responses instead of the LLM judge
    (`selfplay.judging.verifiers`): the correct one beats the incorrect one, a closer score beats a farther one."""

    kind: Literal["auto", "none", "number", "exact", "regex", "python", "code"] = Field(
        "auto", description="'auto': per prompt, its own verifier column, else 'number' for a numeric reference, else 'exact'; "
        "'none': the LLM judges everything; or one verifier for every prompt with a reference.")
    tolerance: float = Field(1e-6, ge=0, description="number: relative tolerance of a correct answer.")
    partial_credit: bool = Field(
        True, description="A wrong answer's score says how close it came (number: 0.5 / (1 + relative error)), so two wrong answers "
        "are told apart; false: every score is 1 (correct) or 0, and two wrong answers tie.")
    function: str | None = Field(None, description="python: the scoring function, 'module:function(prompt, response, reference) -> float in [0, 1]'.")
    timeout_s: float = Field(5.0, gt=0, description="code: seconds a program with its tests may run.")
    memory_mb: int = Field(512, ge=64, description="code: address-space limit of a program, in MiB.")
    fallback: Literal["llm", "none"] = Field(
        "llm", description="Two responses the verifier scores the same: 'llm', the LLM judge decides in both orders; 'none', a tie (no LLM call).")

    @model_validator(mode="after")
    def _function_for_python(self) -> VerifierConfig:
        if self.kind == "python" and not self.function:
            raise ValueError("judge.verifier.kind 'python' needs judge.verifier.function: 'module:function'")
        return self


class AuditConfig(Section):
    """The judge audit: comparisons the verifier decides, put to the LLM judge as well (both orders, the reference
    shown as for any prompt that has one), to measure whether its verdicts are right. Its verdicts never change the
    verifier's labels."""

    size: float = Field(24, ge=0, description="How many verifier-decided comparisons to audit each round: a whole number (at most that "
                        "many), a fraction below 1 (that share of them), or 0 (off: no audit calls).")
    on_chance: Literal["warn", "drop", "fail"] = Field(
        "warn", description="When the judge's agreement with the verifier is not above chance (its 95% interval reaches 0.5): 'warn' in "
        "the round report; 'drop' the pairs the LLM decided from the training set; 'fail' the judge stage.")


class JudgeConfig(Section):
    """What every judge reads; `judge.backend` picks one of the subclasses below."""

    backend: BackendName = Field(DEFAULT_BACKEND, description="'transformers', 'vllm' or 'endpoint'.")  # first in the form

    pairing: Literal["all_pairs", "random_pair", "tournament", "knockout"] = Field(
        "all_pairs", description="Pairs judged among a prompt's K completions; 'tournament' judges all and trains on best vs worst; "
        "'knockout' finds best and worst with about 3K/2 pairs asked in phases (22 calls for K=8, not 56), then judges them against each other.")
    scoring: Literal["copeland", "bradley_terry"] = Field("copeland", description="Tournament scoring.")
    max_calls_per_prompt: int | None = Field(None, ge=2, description="Cap on judge calls per prompt (2 per pair); pairs beyond it are not judged.")

    @model_validator(mode="after")
    def _no_cap_on_a_knockout(self) -> JudgeConfig:
        if self.pairing == "knockout" and self.max_calls_per_prompt is not None:
            raise ValueError("judge.max_calls_per_prompt caps all_pairs and tournament; a knockout asks at most 3K/2 - 1 pairs of its "
                             "own choosing: leave the cap unset, or use another pairing")
        return self
    margin: float = Field(0.1, ge=0, le=1, description="Keep a pair only when |2p-1| >= margin, p the swap-averaged preference.")
    template: str | None = Field(None, description="Judge prompt template file ({prompt}, {response_a}, {response_b}, {rubric}, and {reference}: the prompt's "
                                 "reference answer, or '(none)'); the shipped default, reference-guided where a prompt has a reference, when unset.")
    rubric: str | None = Field(None, description="Rubric file filled into {rubric}; the shipped default when unset.")
    system_prompt: str = Field("You are a careful, impartial judge of AI assistant responses.", description="Judge system prompt.")
    verifier: VerifierConfig = Field(default_factory=VerifierConfig, description="Verifiers for prompts with a reference answer (the hybrid judge).")
    audit: AuditConfig = Field(default_factory=AuditConfig, description="Check the LLM judge against the verifier every round.")
    max_error_rate: float = operational(
        0.05, ge=0, le=1, description="The judge stage fails when more than this fraction of pairs get no verdict: judge_error (the endpoint failed) "
                                      "or invalid (its replies were unreadable).")


class TransformersJudgeConfig(JudgeConfig):
    backend: Literal["transformers"] = Field("transformers", description="Judge with a transformers model in-process (label logprobs).")
    model: str = Field("reference", description="'reference' (the round's reference: the model judges itself) or a model, as in policy.model.")
    batch_size: int = operational(8, ge=1, description="Judge prompts per forward pass.")
    max_length: int = Field(1024, ge=64, description="Judge prompt token limit.")


class VllmJudgeConfig(JudgeConfig):
    backend: Literal["vllm"] = Field("vllm", description="Serve judge.model with vLLM: a server selfplay starts, stops, and keeps "
                                     "across judging steps (server_scope); asleep while training on a GPU.")
    model: str = Field("reference", description="'reference' (the round's reference) or a directory or hub id vLLM loads.")
    mode: JudgeMode = Field("auto", description=MODE_HELP)
    reasoning_tokens: int = Field(0, ge=0, description=REASONING_HELP)
    server: ServerSpec = Field(default_factory=ServerSpec, description="How to start and stop the judge's server.")
    server_scope: Literal["run", "stage"] = operational("run", description=SCOPE_HELP)
    max_concurrency: int = operational(64, ge=1, description="Requests in flight to the started server.")
    request_timeout: float = operational(300.0, gt=0, description="Seconds one request to the started server may take.")


class EndpointJudgeConfig(JudgeConfig):
    backend: Literal["endpoint"] = Field("endpoint", description="Ask an OpenAI-compatible server that is already running (an API, a server elsewhere).")
    endpoint: EndpointConfig = Field(..., description="The endpoint to ask (base_url, model).")
    mode: JudgeMode = Field("auto", description=MODE_HELP)
    reasoning_tokens: int = Field(0, ge=0, description=REASONING_HELP)
    cache: bool = operational(True, description="Cache each call's judgment on disk ($SELFPLAY_CACHE/judge-cache.sqlite), so reruns pay nothing twice.")


JudgeBackend = Annotated[TransformersJudgeConfig | VllmJudgeConfig | EndpointJudgeConfig, Field(discriminator="backend")]

BACKENDS: dict[str, dict[str, type[Section]]] = {
    section: {get_args(model.model_fields["backend"].annotation)[0]: model for model in get_args(get_args(union)[0])}
    for section, union in (("sample", SampleBackend), ("judge", JudgeBackend))
}


# ---------------------------------------------------------------- older spellings

def _today(section: str, name: Any) -> Any:
    return OLD_NAMES.get(section, {}).get(name, name) if isinstance(name, str) else name


def backend_name(section: str, name: Any) -> Any:
    """Today's spelling of a backend's name, with a deprecation warning for an older one."""
    new = _today(section, name)
    if new != name:
        log.warning("%s.backend %r is now spelled %r: rename it in the recipe", section, name, new)
    return new


def _plain(value: Any) -> Any:
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else value


def _is_default(field: FieldInfo, value: Any) -> bool:
    return value is None or (not field.is_required() and _plain(value) == _plain(field.get_default(call_default_factory=True)))


def prepare_section(section: str, data: Any, recorded: bool = False) -> Any:
    """A `sample`/`judge` mapping in today's shape: the backend named in today's spelling (the default when unset),
    another backend's setting dropped when it carries nothing (its default, or anything in a `recorded` run.json
    written before the backends were split), and an error naming the backend that reads any other."""
    if not isinstance(data, dict):
        return data
    models = BACKENDS[section]
    data = {**data, "backend": backend_name(section, data.get("backend", DEFAULT_BACKEND))}
    chosen = models.get(data["backend"]) if isinstance(data["backend"], str) else None
    if chosen is None:
        raise _misplaced(f"{section}.backend: {data['backend']!r} is not a backend (choose one of {', '.join(models)})")
    for key in [k for k in data if k not in chosen.model_fields]:
        owners = [name for name, model in models.items() if key in model.model_fields]
        if not owners:
            continue  # an unknown key: pydantic's own error lists the valid ones
        if recorded or all(_is_default(models[name].model_fields[key], data[key]) for name in owners):
            del data[key]
            continue
        readers = " or ".join(f"{section}.backend: {name}" for name in owners)
        raise _misplaced(f"{section}.{key}: read only with {readers}, and this {section} has backend "
                         f"{data['backend']!r}. Remove {section}.{key}, or set {readers}.")
    return data


def _misplaced(message: str) -> PydanticCustomError:
    # type `backend_field`: config._describe prints the message as it is (it names the key itself)
    return PydanticCustomError("backend_field", "{message}", {"message": message})


def switch_backend(section: str, base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`base` as the start for layering `over` on it: when `over` names another backend than `base`, the settings
    of `base` the new backend does not read are left behind (a judge overlay over a recipe's own judge)."""
    old = _today(section, base.get("backend", DEFAULT_BACKEND))
    new = _today(section, over.get("backend", old))
    chosen = BACKENDS[section].get(new) if isinstance(new, str) else None
    if new == old or chosen is None:
        return base
    return {k: v for k, v in base.items() if k in chosen.model_fields}
