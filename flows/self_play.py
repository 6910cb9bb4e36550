"""Self-play over rounds: round k's checkpoint is round k+1's policy and its reference.

    selfplay run --config deployments/recipes/cpu-demo.yaml          # the CLI calls this flow
    prefect deployment run self-play/manual -p rounds=3               # so do the deployments in prefect.yaml

`self_play` is what the Prefect UI's "Custom run" form shows: a recipe plus typed overrides of the settings people
change most, each with a default and a description. `run_rounds` does the work for a complete `RunConfig`: it holds
the run directory's lock, records (or checks, on resume) the run's config, and skips rounds whose manifest exists,
so retrying a failed flow run resumes it.

The current checkpoint is the last *accepted* round's, and a *lineage* (`lineage="nightly"`) is a run directory
that nightly runs keep extending: both rules are `selfplay.orchestration.lineage`'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows.dpo_round import dpo_round
from selfplay.config.run import RunConfig, load_config, nest
from selfplay.orchestration.lineage import Rounds, continue_lineage
from selfplay.orchestration.preflight import preflight
from selfplay.reporting.artifacts import publish_lineage
from selfplay.runtime import shutdown
from selfplay.runtime.rundir import locked, open_run
from selfplay.runtime.stages import ensure_gpu_limit, use_cluster_limit
from selfplay.serving.kept import kept_servers

DEFAULT_RECIPE = "deployments/recipes/cpu-demo.yaml"


def typed_updates(
    *, name=None, rounds=None, model=None, judge_base_url=None, judge_model=None, judge_api_key_secret=None,
    num_samples=None, temperature=None, max_new_tokens=None, beta=None, learning_rate=None,
) -> dict[str, Any]:
    """The flow's typed parameters as a nested config update (only those that were given)."""
    judge = {"judge.backend": "endpoint", "judge.endpoint.base_url": judge_base_url} if judge_base_url else {}
    dotted = {
        "name": name, "rounds": rounds, "policy.model": model, **judge, "judge.endpoint.model": judge_model,
        "judge.endpoint.api_key_secret": judge_api_key_secret, "sample.num_samples": num_samples,
        "sample.temperature": temperature, "sample.max_new_tokens": max_new_tokens, "train.dpo.beta": beta,
        "train.dpo.learning_rate": learning_rate,
    }
    return nest({key: value for key, value in dotted.items() if value is not None})


def run_rounds(cfg: RunConfig) -> list[dict[str, Any]]:
    """Run (or resume) every round of `cfg` inside the current flow run."""
    log = get_run_logger()
    shutdown.arm(f"Finished work is kept in {cfg.run_dir.resolve()}; run it again (or retry the flow run) to resume.")
    base = preflight(cfg)
    if cfg.cluster_gpu_limit:
        ensure_gpu_limit(name=cfg.cluster_gpu_limit)
    use_cluster_limit(cfg.cluster_gpu_limit)
    with locked(cfg.run_dir), kept_servers(cfg):  # vLLM servers kept across rounds (sample/judge server_scope: run)
        run = open_run(cfg, str(base), log=log)
        rounds, summaries = Rounds(str(base), cfg.gate.early_stop_after), []
        for k in range(1, cfg.rounds + 1):
            resumed = run.round_done(k)
            if resumed:
                log.info("round %d already complete, skipping", k)
            summary = run.round_manifest(k) if resumed else dpo_round(cfg, k, rounds.policy, str(base))
            summaries.append(summary)
            if stop := rounds.record(summary, run.checkpoint(k), resumed):
                log.warning("stopping early: %s", stop)
                break
        publish_lineage(Path(cfg.output_dir))
        log.info("run %s: %d rounds complete; files in %s", cfg.name, len(summaries), run.root)
        return summaries


def _run_name() -> str:
    params = flow_run.parameters
    return params.get("lineage") or params.get("name") or Path(params.get("recipe") or DEFAULT_RECIPE).stem


@flow(name="self-play", flow_run_name=_run_name)
def self_play(
    recipe: str = DEFAULT_RECIPE,
    overlays: list[str] | None = None,
    name: str | None = None,
    lineage: str | None = None,
    rounds: int | None = None,
    model: str | None = None,
    judge_base_url: str | None = None,
    judge_model: str | None = None,
    judge_api_key_secret: str | None = None,
    num_samples: int | None = None,
    temperature: float | None = None,
    max_new_tokens: int | None = None,
    beta: float | None = None,
    learning_rate: float | None = None,
    overrides: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Run rounds of self-play DPO from a recipe, with the most used settings as typed overrides.

    Every field left empty keeps the recipe's value.

    Args:
        recipe: YAML recipe, relative to the repository (deployments/recipes/*.yaml).
        overlays: More recipe files layered over it, e.g. deployments/recipes/judges/vllm.yaml.
        name: Run name (runs/<name>/); the recipe's name when empty. The same name resumes that run.
        lineage: Continue this lineage (runs/<lineage>/) for `rounds` more rounds; used by the nightly schedule.
        rounds: Rounds to run (with a lineage: rounds to add).
        model: Starting policy: 'bundled', a local Hugging Face directory, a .gguf file, or a hub id.
        judge_base_url: Judge with this OpenAI-compatible endpoint (e.g. http://localhost:8000/v1) instead of the local model.
        judge_model: The endpoint's judge model name.
        judge_api_key_secret: Name of the Prefect Secret block holding the judge's API key.
        num_samples: Completions sampled per prompt (K).
        temperature: Sampling temperature.
        max_new_tokens: Sampling budget per completion.
        beta: DPO beta (train.dpo.beta).
        learning_rate: DPO learning rate (train.dpo.learning_rate).
        overrides: Any other setting as section.key=value lines, e.g. judge.margin=0.1.
    """
    updates = typed_updates(
        name=name, rounds=rounds, model=model, judge_base_url=judge_base_url, judge_model=judge_model,
        judge_api_key_secret=judge_api_key_secret, num_samples=num_samples, temperature=temperature,
        max_new_tokens=max_new_tokens, beta=beta, learning_rate=learning_rate,
    )
    cfg = load_config([recipe, *(overlays or [])], overrides or [], updates)
    if lineage:
        cfg = continue_lineage(cfg, lineage, rounds if rounds is not None else cfg.rounds, invocation=str(flow_run.id))
    return run_rounds(cfg)
