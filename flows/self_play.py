"""Self-play over rounds: round k's checkpoint is round k+1's policy and its reference.

    selfplay run --config deployments/recipes/cpu-demo.yaml          # the CLI calls this flow
    prefect deployment run self-play/manual -p rounds=3               # so do the deployments in prefect.yaml

`self_play` is what the Prefect UI's "Custom run" form shows: a recipe plus typed overrides of the settings people
change most, each with a default and a description. `run_rounds` does the work for a complete `RunConfig`: it holds
the run directory's lock, records (or checks, on resume) the run's config, and skips rounds whose manifest exists,
so retrying a failed flow run resumes it.

The current checkpoint is the last *accepted* round's: a round the gate rejects stays on disk, marked rejected,
and the next round starts again from the checkpoint before it.

A *lineage* is a run directory that nightly runs keep extending: `lineage="nightly"` runs in runs/nightly/,
continues from its current checkpoint for `rounds` more rounds (round numbers continue), and first finishes
whatever the previous run of the lineage left unfinished.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows.dpo_round import dpo_round
from selfplay import shutdown
from selfplay.config import RunConfig, build_config, load_config
from selfplay.orchestration import ensure_gpu_limit, publish_lineage, use_cluster_limit
from selfplay.preflight import preflight
from selfplay.rundir import locked, open_run, read_json, write_json_atomic

DEFAULT_RECIPE = "deployments/recipes/cpu-demo.yaml"


def typed_updates(
    *, name=None, rounds=None, model=None, judge_base_url=None, judge_model=None, judge_api_key_secret=None,
    num_samples=None, temperature=None, max_new_tokens=None, beta=None, learning_rate=None,
) -> dict[str, Any]:
    """The flow's typed parameters as a nested config update (only those that were given)."""
    updates: dict[str, Any] = {}

    def put(path: str, value: Any) -> None:
        if value is None:
            return
        node = updates
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value

    put("name", name)
    put("rounds", rounds)
    put("policy.model", model)
    if judge_base_url:
        put("judge.backend", "endpoint")
        put("judge.endpoint.base_url", judge_base_url)
    put("judge.endpoint.model", judge_model)
    put("judge.endpoint.api_key_secret", judge_api_key_secret)
    put("sample.num_samples", num_samples)
    put("sample.temperature", temperature)
    put("sample.max_new_tokens", max_new_tokens)
    put("train.dpo.beta", beta)
    put("train.dpo.learning_rate", learning_rate)
    return updates


def continue_lineage(cfg: RunConfig, lineage: str, more_rounds: int, invocation: str | None = None) -> RunConfig:
    """The lineage's run config: runs/<lineage>/, target = the previous run's target + `more_rounds`.

    The target is recorded per flow run (`invocation`) in runs/<lineage>/lineage.json, so retrying a flow run
    resumes it towards the same target instead of adding rounds again.
    """
    cfg = cfg.model_copy(update={"name": lineage})
    ledger_path = cfg.run_dir / "lineage.json"
    ledger = read_json(ledger_path) if ledger_path.is_file() else {"targets": {}}
    if invocation and invocation in ledger["targets"]:
        return with_rounds(cfg, ledger["targets"][invocation])
    record = cfg.run_dir / "run.json"
    target = (read_json(record)["config"]["rounds"] if record.is_file() else 0) + more_rounds
    if invocation:
        ledger["targets"][invocation] = target
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(ledger_path, ledger)
    return with_rounds(cfg, target)


def with_rounds(cfg: RunConfig, rounds: int) -> RunConfig:
    """`cfg` with another round count, validated again (a rule may depend on it: an endpoint sampler over several
    rounds needs adapter checkpoints)."""
    return build_config({**cfg.model_dump(), "rounds": rounds})


def run_rounds(cfg: RunConfig) -> list[dict[str, Any]]:
    """Run (or resume) every round of `cfg` inside the current flow run."""
    log = get_run_logger()
    shutdown.arm(f"Finished work is kept in {cfg.run_dir.resolve()}; run it again (or retry the flow run) to resume.")
    base = preflight(cfg)
    if cfg.cluster_gpu_limit:
        ensure_gpu_limit(name=cfg.cluster_gpu_limit)
    use_cluster_limit(cfg.cluster_gpu_limit)
    with locked(cfg.run_dir):
        run = open_run(cfg, str(base))
        policy, summaries, rejected_in_a_row = str(base), [], 0
        for k in range(1, cfg.rounds + 1):
            done_before = run.round_done(k)
            if done_before:
                log.info("round %d already complete, skipping", k)
                summary = run.round_summary(k)
            else:
                summary = dpo_round(cfg, k, policy, str(base))
            summaries.append(summary)
            if summary.get("accepted", True):
                policy, rejected_in_a_row = str(run.checkpoint(k)), 0
            elif not done_before:  # a rejected round stays on disk; the current checkpoint does not change
                rejected_in_a_row += 1  # early stop counts this invocation's rounds: tomorrow's run tries again
            if cfg.gate.early_stop_after and rejected_in_a_row >= cfg.gate.early_stop_after:
                log.warning("stopping early: %d rejected rounds in a row (gate.early_stop_after=%d); current checkpoint %s",
                            rejected_in_a_row, cfg.gate.early_stop_after, policy)
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
