"""The judge's runtime: ask a judge both orders of each comparison and combine the two verdicts
(`selfplay.judging.verdicts` holds the rules), with the judge where it belongs: in this process, in a process of its
own, or behind a vLLM server started for it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from selfplay.config.backends import JudgeConfig
from selfplay.config.run import RunConfig
from selfplay.inputs.models import release_memory
from selfplay.judging.calls import Judge, JudgeResult
from selfplay.judging.prompt import load_rubric, templates_for
from selfplay.judging.verdicts import Batch, Comparison, Judged, Phases, llm_count, swap_calls, verdict_rows, verifier_verdict
from selfplay.runtime import isolate
from selfplay.runtime.isolate import isolated
from selfplay.runtime.rundir import note_server_version
from selfplay.runtime.stages import gpu_slot
from selfplay.serving import gpu
from selfplay.serving.kept import kept_server, release_gpu


def judge_phases(judge: Judge, phases: Phases, cfg: JudgeConfig, progress: Callable[[int, int], None] | None = None) -> Judged:
    """Judge phase after phase until `phases` asks nothing more; one `Judged` for all, with the keys in the order asked.
    Each phase goes to the judge whole (a streaming judge keeps its pool full across the phase's prompts)."""
    decided: dict[Any, dict[str, Any]] = {}
    keys: list[Any] = []
    results: list[JudgeResult] = []
    while todo := phases.next(decided):
        done = len(results)
        step = (lambda d, t, done=done: progress(done + d, done + t)) if progress else None
        judged = judge_comparisons(judge, list(todo.values()), cfg, progress=step)
        decided.update(zip(todo, judged.verdicts))
        keys.extend(todo)
        results.extend(judged.results)
    return Judged([decided[k] for k in keys], results, keys)


def judge_batch(judge: Judge, batch: Batch, cfg: JudgeConfig, progress: Callable[[int, int], None] | None = None) -> Judged:
    """`judge_comparisons` for a list of comparisons, `judge_phases` for phases."""
    if isinstance(batch, Sequence):
        return judge_comparisons(judge, batch, cfg, progress=progress)
    return judge_phases(judge, batch, cfg, progress=progress)


def judge_comparisons(judge: Judge, comparisons: Sequence[Comparison], cfg: JudgeConfig,
                      progress: Callable[[int, int], None] | None = None, chunk: int = 64) -> Judged:
    """Decide each comparison: by the verifier's scores where they decide, else by asking `judge` both orders and
    combining them. `Judged.results` holds the LLM's answers only, two per comparison it judged, in order.

    A backend that streams (`judge.streams`: the OpenAI-compatible one) gets every call at once and keeps a fixed
    number in flight, refilling each slot as a call ends, with `progress(done, total)` every few seconds; a batching
    one (the local model) gets them `chunk` at a time, with `progress` after each chunk.
    """
    decided = [verifier_verdict(c, cfg.verifier.fallback) for c in comparisons]
    asked = [c for c, d in zip(comparisons, decided) if d is None]
    rubric = load_rubric(cfg.rubric)
    calls = swap_calls(asked, templates_for(cfg.template), rubric, cfg.system_prompt) if asked else []
    results: list[JudgeResult] = []
    if calls and getattr(judge, "streams", False):
        results = judge.judge(calls, progress=progress)
    else:
        for start in range(0, len(calls), chunk):
            results.extend(judge.judge(calls[start : start + chunk]))
            if progress:
                progress(len(results), len(calls))
    llm = iter(verdict_rows(results, cfg.margin))
    return Judged([d if d is not None else next(llm) for d in decided], results)


def judge_batches(cfg: JudgeConfig, reference: str, batches: list[Batch], *, log=None,
                  progress: Callable[[int, int], None] | None = None) -> list[Judged]:
    """Build the configured judge once and judge each batch of comparisons with it, then close it (an `isolate.call`
    target)."""
    backend = make_judge(cfg, reference)
    try:
        return [judge_batch(backend, batch, cfg, progress=progress) for batch in batches]
    finally:
        backend.close()
        release_memory()


def run_judge(cfg: RunConfig, reference: str, batches: list[Batch], scratch: Path, label: str, log,
              progress: Callable[[int, int], None] | None = None,
              server_log: Path | None = None) -> tuple[list[Judged], float | None]:
    """`judge_batches` where it belongs, and the peak GPU memory it took. A local judge is a model on the GPU: it
    holds the `gpu` limit (and, with process isolation, runs in its own process). A `vllm` judge is a server started
    here on the judge model for these batches and stopped after (holding the limit; its log is `server_log`). An
    endpoint judge runs here."""
    j = cfg.judge
    if not any(llm_count(batch, j) for batch in batches):  # the verifier decides everything: no judge to load or start
        return [judge_batch(None, batch, j) for batch in batches], None
    if j.backend == "endpoint":
        return judge_batches(j, reference, batches, log=log, progress=progress), None
    if j.backend == "vllm" and (kept := kept_server(cfg, "judge", log)) is not None:
        with gpu_slot(f"{cfg.name} {label} (kept judge server)"):
            return kept.run(judge_server_model(j, reference),
                            lambda server, model: judge_with_server(j, server, model, batches, progress), label), None
    if j.backend == "vllm":
        return serve_and_judge(j, reference, batches, server_log or scratch / "judge-server.log", f"{cfg.name}-judge", log, progress,
                               run_dir=cfg.run_dir), None
    release_gpu()  # a kept vLLM server on the GPU sleeps while the local judge uses it
    with gpu_slot(f"{cfg.name} {label}"):
        return isolate.call("selfplay.judging.runner:judge_batches", j, reference, batches, isolated=isolated(cfg.isolation),
                            scratch=scratch, label=label, log=log, progress=progress)


def judge_server_model(cfg: JudgeConfig, reference: str) -> str:
    """What a `vllm` judge server loads: the reference, a local model as selfplay resolves it (a directory, a .gguf
    converted once, 'bundled'), or a hub id as given (vLLM downloads it)."""
    from selfplay.inputs.models import resolve_model

    if cfg.model == "reference":
        return reference
    path = Path(cfg.model).expanduser()
    if cfg.model == "bundled" or path.exists():
        return str(Path(resolve_model(str(path) if path.exists() else cfg.model)).resolve())
    return cfg.model


def serve_and_judge(cfg: JudgeConfig, reference: str, batches: list[Batch], log_path: Path, lora_name: str, log,
                    progress: Callable[[int, int], None] | None = None, run_dir: Path | None = None) -> list[Judged]:
    """Start a vLLM server on the judge model, judge every batch through it, stop it and wait for the GPU. The
    version the server reports goes into `run_dir`'s run.json."""
    from selfplay.serving.lora import serving_plan
    from selfplay.serving.model_server import ModelServer

    spec, model, request_name = serving_plan(cfg.server, judge_server_model(cfg, reference), lora_name)
    with gpu_slot(f"{lora_name} server"):
        with ModelServer(spec, model, log_path, served_name="judge") as server:
            log.info("judge server on %s up at %s (log %s)", model, server.base_url, log_path)
            if run_dir is not None:
                note_server_version(run_dir, server.version, log)
            results = judge_with_server(cfg, server, request_name or server.api_model, batches, progress)
        if not server.wait_gpu_free():
            log.warning("GPU memory was not all given back %g s after the judge server stopped; held by %s", spec.gpu_free_timeout,
                        gpu.holders())
    return results


def judge_with_server(cfg: JudgeConfig, server, model: str, batches: list[Batch],
                      progress: Callable[[int, int], None] | None = None) -> list[Judged]:
    """Every batch judged by `model` on a started `server`, which is watched: if it dies, judging stops at once with
    its last words (`ServerDied`)."""
    from selfplay.config.backends import EndpointConfig
    from selfplay.judging.endpoint import OpenAIJudge

    endpoint = EndpointConfig(base_url=server.base_url, model=model, max_concurrency=cfg.max_concurrency, timeout=cfg.request_timeout)
    # A new port each time: nothing to key a cache on.
    judge = OpenAIJudge(endpoint, mode=cfg.mode, cache=None, api_key=server.api_key, watch=server.problem, reasoning_tokens=cfg.reasoning_tokens)
    return [judge_batch(judge, batch, cfg, progress=progress) for batch in batches]


def make_judge(cfg, reference: str) -> Judge:
    """Build the configured judge. `judge.model == "reference"` judges with the round's reference checkpoint."""
    from selfplay.inputs.models import cache_root, resolve_model

    if cfg.backend == "endpoint":
        from selfplay.judging.cache import JudgeCache
        from selfplay.judging.endpoint import OpenAIJudge
        from selfplay.serving.openai_client import resolve_api_key
        from selfplay.serving.probe import capabilities

        key = resolve_api_key(cfg.endpoint)
        caps, _ = capabilities(cfg.endpoint, key, judging=True, role="judge", mode=cfg.mode)  # probed by the run's preflight
        cache = JudgeCache(cache_root() / "judge-cache.sqlite") if cfg.cache else None
        return OpenAIJudge(cfg.endpoint, mode=cfg.mode, cache=cache, api_key=key, caps=caps, reasoning_tokens=cfg.reasoning_tokens)
    if cfg.backend == "transformers":
        from selfplay.judging.local import LocalJudge

        path = reference if cfg.model == "reference" else str(resolve_model(cfg.model))
        return LocalJudge(path, batch_size=cfg.batch_size, max_length=cfg.max_length)
    raise ValueError(f"unknown judge backend {cfg.backend!r}")
