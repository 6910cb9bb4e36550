"""Completions through an OpenAI-compatible server: the sample stage's K per prompt (`sample_from_server`) and
the evaluate stage's answers (`eval_generations_from_server`), from vLLM (`sample.backend: vllm`: the run's kept
server, `selfplay.serving.kept`, or with `sample.server_scope: stage` one started for the stage) or a running endpoint
(`endpoint`). A policy that is a LoRA adapter is served over its base model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from selfplay.config.run import RunConfig
from selfplay.generation.jobs import EvalJob, generation_table
from selfplay.inputs.models import is_adapter, load_tokenizer
from selfplay.runtime.rundir import note_server_version
from selfplay.runtime.stages import gpu_slot
from selfplay.serving import gpu
from selfplay.serving.kept import kept_server


def sample_from_server(cfg: RunConfig, k: int, policy: str, prompts: list[str], log_path: Path, log,
                       progress: Callable[[int, int], None] | None = None) -> list[dict[str, Any]]:
    """K completions per prompt from an OpenAI-compatible server: the run's kept vLLM server (`sample.server_scope:
    run`, `selfplay.serving.kept`: `policy` loaded into it), a vLLM server started on `policy` for this stage (and
    stopped, its port and GPU memory free, before training), or an already-running endpoint. A started server is
    watched while it answers: if it dies, the stage fails at once with its last words (a kept one is restarted once).
    An endpoint is asked as it was probed to answer (`selfplay.serving.probe`): one choice per request where it
    ignores `n`, the body it needs to sample, fewer requests in flight where it answers one at a time.
    `progress(prompts done, prompts)` every few seconds.

    A policy that is a LoRA adapter (`train.merge: false`) is served over its base model: the started server gets
    `--enable-lora --lora-modules {"name": <name>, "path": <adapter>}`; a running endpoint is asked to load it (vLLM's
    /v1/load_lora_adapter) and to unload it afterwards. Requests then name the adapter as their model.
    """
    from selfplay.serving.lora import adapter_name, serving_plan
    from selfplay.serving.model_server import ModelServer
    from selfplay.serving.openai_client import sample_chat

    s = cfg.sample
    params = dict(n=s.num_samples, temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_new_tokens, seed=s.seed + k, exact_tokens=True)
    adapter = Path(policy).resolve() if is_adapter(policy) else None
    name = adapter_name(cfg.name, adapter) if adapter else None
    if s.backend == "vllm" and (kept := kept_server(cfg, "policy", log)) is not None:
        with gpu_slot(f"{cfg.name} round {k} sample (vLLM server)"):
            out = kept.run(policy, lambda server, model: sample_chat(server.base_url, model, prompts, api_key=server.api_key,
                                                                     watch=server.problem, progress=progress, **params),
                           f"round {k} sampling")
    elif s.backend == "vllm":
        spec, model_path, _ = serving_plan(s.server, policy, name or "policy")
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with gpu_slot(f"{cfg.name} round {k} sample (vLLM server)"):
            with ModelServer(spec, model_path, log_path) as server:
                note_server_version(cfg.run_dir, server.version, log)
                out = sample_chat(server.base_url, name or server.api_model, prompts, api_key=server.api_key, watch=server.problem,
                                  progress=progress, **params)
            if not server.wait_gpu_free():
                log.warning("round %d: GPU memory was not all given back %g s after the sampling server stopped; held by %s", k,
                            spec.gpu_free_timeout, gpu.holders())
    else:
        from selfplay.serving.lora import LoraAdapterError, load_lora_adapter, unload_lora_adapter
        from selfplay.serving.openai_client import SamplingError, resolve_api_key
        from selfplay.serving.probe import capabilities

        e = s.endpoint
        key = resolve_api_key(e)
        if adapter:
            log.info("round %d: loading adapter %s into %s as %r", k, adapter, e.base_url, name)
            # A crash after an earlier load left it loaded, and vLLM refuses to load a name twice.
            with contextlib.suppress(LoraAdapterError):
                unload_lora_adapter(e.base_url, name, api_key=key)
            load_lora_adapter(e.base_url, name, adapter, api_key=key)
        caps, _ = capabilities(e, key, sampling=True, role="sampling", logger=log)  # probed by the run's preflight
        if caps.samples is False:  # it did then; probed again now (an hour later, or the server restarted)
            raise SamplingError(f"round {k}: {caps.base_url} no longer samples (the same text at any seed): start it so that it samples")
        if not caps.choices:
            log.info("round %d: the endpoint returns one choice per request: %d single-choice requests per prompt, choice j seeded "
                     "seed + i*%d + j", k, s.num_samples, s.num_samples)
        if not caps.seeds:
            log.warning("round %d: the endpoint ignores seeds: these samples are not reproducible", k)
        params.update(choices_per_request=bool(caps.choices), exact_tokens=bool(caps.logprobs),
                      extra_body=caps.sample_body or None)
        try:
            out = sample_chat(e.base_url, name or e.model, prompts, api_key=key, max_concurrency=caps.in_flight(e.max_concurrency),
                              timeout=e.timeout, progress=progress, **params)
        finally:
            if adapter:
                try:
                    unload_lora_adapter(e.base_url, name, api_key=key)
                except LoraAdapterError as exc:  # never hide the sampling error, nor fail finished sampling
                    log.warning("round %d: could not unload adapter %r: %s", k, name, exc)
    tokenizer = load_tokenizer(policy)
    rendered = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True) for p in prompts]
    prompt_tokens = [len(ids) for ids in tokenizer(rendered, add_special_tokens=False)["input_ids"]]
    return [{"prompt_index": i, "sample_idx": j, "response": c["response"], "prompt_tokens": prompt_tokens[i],
             "n_tokens": int(c["n_tokens"]), "truncated": bool(c["truncated"])}
            for i, choices in enumerate(out) for j, c in enumerate(choices)]


def eval_generations_from_server(cfg: RunConfig, k: int, jobs: list[EvalJob], base: str, log_dir: Path, log) -> list[pd.DataFrame] | None:
    """The evaluate stage's answers from the sampling backend's server, when `sample.backend` is `vllm` or
    `endpoint`: one answer per prompt and job, `n=1`, seeded with `evaluate.seed` (`seed + index` per prompt), greedy
    where the job's temperature is 0. None when the backend is `transformers` (the caller generates in-process).

    `vllm` with the run's kept server: each model loaded into it in turn (no start). Per stage: one server per full
    model (`sample.server`, the spec the round's samples came from), and one server for
    a base with all its adapters (`train.merge: false`: the new and the current checkpoint in one start), each
    stopped, its GPU memory given back, before the next. `endpoint`: the running server, each adapter loaded and
    unloaded around its jobs; where a job's model is neither the endpoint's own (round 0's policy) nor an adapter
    (a merged checkpoint, `rounds: 1`), every job is generated in-process instead, so that both sides of a
    comparison come from the same engine.
    """
    from selfplay.inputs.models import adapter_base
    from selfplay.serving.lora import LoraAdapterError, adapter_name, adapter_rank, load_lora_adapter, lora_modules_args, unload_lora_adapter
    from selfplay.serving.model_server import ModelServer
    from selfplay.serving.openai_client import resolve_api_key, sample_chat

    s, e = cfg.sample, cfg.evaluate
    if s.backend not in ("vllm", "endpoint"):
        return None
    tables: list[pd.DataFrame | None] = [None] * len(jobs)
    models = list(dict.fromkeys(job.model for job in jobs))
    names = {m: adapter_name(cfg.name, Path(m).resolve()) for m in models if is_adapter(m)}

    def answer(base_url: str, api_key: str, served: dict[str, str], **kw) -> None:
        for i, job in enumerate(jobs):
            if job.model in served:
                out = sample_chat(base_url, served[job.model], [p["prompt"] for p in job.prompts], n=1, temperature=job.temperature,
                                  top_p=1.0, max_tokens=job.max_new_tokens, seed=e.seed, api_key=api_key, **{"exact_tokens": True, **kw})
                tables[i] = generation_table(job.prompts, [choices[0] for choices in out])

    if s.backend == "vllm" and (kept := kept_server(cfg, "policy", log)) is not None:
        for m in models:
            kept.run(m, lambda server, model, m=m: answer(server.base_url, server.api_key, {m: model}, watch=server.problem),
                     f"round {k} evaluation answers")
        return tables
    if s.backend == "vllm":
        groups: dict[str, list[str]] = {}
        for m in models:
            groups.setdefault(adapter_base(m) if m in names else str(m), []).append(m)
        for n, (model_path, members) in enumerate(groups.items()):
            adapters = [m for m in members if m in names]
            spec = s.server
            if adapters:
                extra = lora_modules_args([(names[m], Path(m).resolve(), adapter_rank(m)) for m in adapters])
                spec = spec.model_copy(update={"extra_args": [*spec.extra_args, *extra]})
            log.info("round %d: evaluation answers from a vLLM server on %s%s", k, model_path,
                     f" with adapters {', '.join(names[m] for m in adapters)}" if adapters else "")
            with ModelServer(spec, model_path, log_dir / f"eval-server-{n + 1}.log") as server:
                note_server_version(cfg.run_dir, server.version, log)
                answer(server.base_url, server.api_key, {m: names.get(m, server.api_model) for m in members}, watch=server.problem)
            if not server.wait_gpu_free():
                log.warning("round %d: GPU memory was not all given back %g s after the evaluation server stopped; held by %s", k,
                            spec.gpu_free_timeout, gpu.holders())
        return tables
    endpoint = s.endpoint
    own = {m for m in models if m not in names and Path(m).resolve() == Path(base).resolve()}
    if len(own) + len(names) < len(models):
        log.info("round %d: the endpoint cannot serve a merged checkpoint: every evaluation answer is generated in-process", k)
        return None
    from selfplay.serving.probe import capabilities

    key = resolve_api_key(endpoint)
    caps, _ = capabilities(endpoint, key, sampling=True, role="sampling", logger=log)
    kw = dict(max_concurrency=caps.in_flight(endpoint.max_concurrency), timeout=endpoint.timeout, extra_body=caps.sample_body or None,
              exact_tokens=bool(caps.logprobs))
    answer(endpoint.base_url, key, {m: endpoint.model for m in own}, **kw)
    for m, name in names.items():
        with contextlib.suppress(LoraAdapterError):  # left loaded by a crash
            unload_lora_adapter(endpoint.base_url, name, api_key=key)
        load_lora_adapter(endpoint.base_url, name, Path(m).resolve(), api_key=key)
        try:
            answer(endpoint.base_url, key, {m: name}, **kw)
        finally:
            try:
                unload_lora_adapter(endpoint.base_url, name, api_key=key)
            except LoraAdapterError as exc:
                log.warning("round %d: could not unload adapter %r: %s", k, name, exc)
    return tables
