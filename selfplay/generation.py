"""Generation: completions from a policy, batched and seeded, with transformers in this process (or a process of its
own) or through an OpenAI-compatible server (a vLLM server started for the round, or a running endpoint).

Each completion is a dict: prompt index, sample index, text, prompt tokens, tokens generated, and `truncated` (it
hit the token budget before its end-of-sequence token). The sample stage draws K per prompt from the round's
policy (`sample_local`, `sample_from_server`); the evaluate stage one per held-out prompt from each model it
compares, from the sampling backend's server (`eval_generations_from_server`) or in-process (`eval_generations`). A policy is always loaded from its saved checkpoint.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from selfplay import gpu
from selfplay.config import RunConfig
from selfplay.models import is_adapter, load_causal_lm, load_tokenizer, release_memory
from selfplay.orchestration import gpu_slot

GENERATION_COLUMNS = ["prompt_id", "prompt", "reference", "verifier", "response", "n_tokens", "truncated"]


def completion_lengths(token_rows: list[list[int]], stop_ids: set[int]) -> list[tuple[int, bool]]:
    """Pure: for each generated row (prompt stripped), (tokens before the stop token, truncated?).

    A row is truncated when no stop token appears in it: generation ran out of budget mid-answer (and such a row
    was never padded, since padding only follows a stop).

    >>> completion_lengths([[5, 6, 2, 0], [5, 6, 7]], stop_ids={2})
    [(2, False), (3, True)]
    """
    out = []
    for row in token_rows:
        stop = next((i for i, t in enumerate(row) if t in stop_ids), None)
        out.append((stop, False) if stop is not None else (len(row), True))
    return out


def stop_token_ids(tokenizer, model) -> set[int]:
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(model.generation_config, "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    return {i for i in ids if i is not None}


DECODERS = ("generate", "fast")
HF_TOP_K = 50  # transformers' top_k where neither the call nor the model's generation_config sets one


def shared_prefill(model, enc, k: int):
    """Every prompt token but the last through the model once, and the cache repeated for the prompt's `k` samples:
    the K copies `num_return_sequences` would prefill separately share one prefill. Position ids follow the
    attention mask (left padding), as `generate` computes them. Returns the cache (`generate(cache=...)` then feeds
    only the last prompt token)."""
    ids, mask = enc["input_ids"], enc["attention_mask"]
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1], use_cache=True, logits_to_keep=1)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    cache.batch_repeat_interleave(k)
    return cache


def fast_decoder_refusal(model) -> str | None:
    """Why the fast decoder cannot stand in for `generate` with this model (its generation_config asks for a logits
    processor the fast loop does not apply), or None."""
    gc = model.generation_config
    for name, neutral in (("repetition_penalty", 1.0), ("typical_p", 1.0), ("min_p", None), ("no_repeat_ngram_size", 0),
                          ("epsilon_cutoff", 0.0), ("eta_cutoff", 0.0), ("bad_words_ids", None), ("suppress_tokens", None),
                          ("begin_suppress_tokens", None)):
        value = getattr(gc, name, None)
        if value not in (None, neutral):
            return f"its generation_config sets {name}={value!r}"
    return None


def sample_top(logits, temperature: float, top_p: float, top_k: int | None):
    """One token per row, as transformers samples (temperature, then top-k, then top-p, at least one token kept),
    drawn among the top-k only: the same distribution, far less work than sorting and drawing over the vocabulary.

    >>> import torch
    >>> sample_top(torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 2.0]]), 0.0, 1.0, 50).tolist()     # greedy
    [1, 0]
    >>> _ = torch.manual_seed(0); sample_top(torch.tensor([[0.0, 9.0, 1.0]] * 4), 1.0, 0.5, 2).tolist()  # the nucleus is one token
    [1, 1, 1, 1]
    """
    import torch

    if temperature == 0:
        return logits.argmax(-1)
    k = logits.shape[-1] if not top_k else min(top_k, logits.shape[-1])
    values, index = (logits / temperature).topk(k, dim=-1)
    probs = values.softmax(-1)
    if top_p < 1.0:
        outside = (probs.cumsum(-1) - probs) >= top_p  # the mass before a token already reaches top_p
        outside[:, 0] = False
        probs = probs.masked_fill(outside, 0.0)
    return index.gather(-1, torch.multinomial(probs, 1)).squeeze(-1)


def fast_decode(model, enc, k: int, *, temperature: float, top_p: float, max_new_tokens: int, stop_ids: set[int], pad_id: int):
    """selfplay's own decoding loop for `sample.decoder: fast`: one shared prefill per prompt (`shared_prefill`),
    tokens drawn by `sample_top` among the top-k, and every row that reaches a stop token leaves the batch (and the
    cache), so the steps after it cost nothing. Returns the generated tokens, (rows x max_new_tokens), padded after
    the stop token as `generate` pads."""
    import torch

    top_k = model.generation_config.top_k or HF_TOP_K
    rows = enc["input_ids"].shape[0] * k
    cache = shared_prefill(model, enc, k)
    mask = enc["attention_mask"].repeat_interleave(k, 0)
    last = enc["input_ids"][:, -1:].repeat_interleave(k, 0)
    positions = mask.long().sum(-1, keepdim=True) - 1
    out = torch.full((rows, max_new_tokens), pad_id, dtype=torch.long)
    alive = torch.arange(rows)
    stops = torch.tensor(sorted(stop_ids), dtype=torch.long)
    for step in range(max_new_tokens):
        logits = model(input_ids=last, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1).logits
        token = sample_top(logits[:, -1, :].float(), temperature, top_p, top_k)
        out[alive, step] = token
        done = torch.isin(token, stops)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        if bool(done.any()):
            keep = (~done).nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            alive, mask, positions, token = alive[keep], mask[keep], positions[keep], token[keep]
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
        positions = positions + 1
        last = token[:, None]
    return out


def generate(
    model,
    tokenizer,
    prompts: list[str],
    *,
    num_samples: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    batch_size: int,
    seed: int,
    progress: Callable[[int, int], None] | None = None,
    decoder: str = "generate",
    log=None,
) -> list[dict[str, Any]]:
    """Batched generation: `num_samples` completions for each prompt, `batch_size` sequences per call.

    `decoder`: "generate", transformers' `generate`, with each prompt prefilled once for its K samples
    (`shared_prefill`: the same draws as `num_return_sequences` alone, within float tolerance); "fast",
    `fast_decode` (the same distribution, other draws). Returns one dict per completion (prompt index, sample
    index, text, token counts, truncated), in prompt order.
    """
    import torch

    if decoder not in DECODERS:
        raise ValueError(f"unknown decoder {decoder!r}: one of {', '.join(DECODERS)}")
    if decoder == "fast" and (why := fast_decoder_refusal(model)):
        if log:
            log.warning("sample.decoder fast cannot decode this model (%s): decoding with transformers' generate instead", why)
        decoder = "generate"
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True) for p in prompts]
    per_call = max(1, batch_size // num_samples)
    stop_ids = stop_token_ids(tokenizer, model)
    torch.manual_seed(seed)
    rows: list[dict[str, Any]] = []
    for start in range(0, len(texts), per_call):
        chunk = texts[start : start + per_call]
        enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
        share = num_samples > 1 and enc["input_ids"].shape[1] > 1
        with torch.no_grad():
            if decoder == "fast":
                gen = fast_decode(model, enc, num_samples, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                                  stop_ids=stop_ids, pad_id=tokenizer.pad_token_id).tolist()
            else:
                inputs = dict(enc) if not share else dict(
                    input_ids=enc["input_ids"].repeat_interleave(num_samples, 0),
                    attention_mask=enc["attention_mask"].repeat_interleave(num_samples, 0),
                    cache=shared_prefill(model, enc, num_samples))
                out = model.generate(
                    **inputs,
                    max_new_tokens=max_new_tokens,
                    num_return_sequences=1 if share else num_samples,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=sorted(stop_ids),
                    **sampling,
                )
                gen = out[:, enc["input_ids"].shape[1] :].tolist()
        lengths = completion_lengths(gen, stop_ids)
        prompt_tokens = enc["attention_mask"].sum(dim=1).tolist()
        for row_idx, (tokens, (n, truncated)) in enumerate(zip(gen, lengths)):
            p_local, s = divmod(row_idx, num_samples)
            rows.append(
                {
                    "prompt_index": start + p_local,
                    "sample_idx": s,
                    "response": tokenizer.decode(tokens[:n], skip_special_tokens=True).strip(),
                    "prompt_tokens": int(prompt_tokens[p_local]),
                    "n_tokens": int(n),
                    "truncated": bool(truncated),
                }
            )
        if progress:
            progress(min(start + per_call, len(texts)), len(texts))
    return rows


def sample_from_server(cfg: RunConfig, k: int, policy: str, prompts: list[str], log_path: Path, log) -> list[dict[str, Any]]:
    """K completions per prompt from an OpenAI-compatible server: a vLLM server started on `policy` for this round
    (and stopped, its port and GPU memory free, before training), or an already-running endpoint.

    A policy that is a LoRA adapter (`train.merge: false`) is served over its base model: the started server gets
    `--enable-lora --lora-modules {"name": <name>, "path": <adapter>}`; a running endpoint is asked to load it (vLLM's
    /v1/load_lora_adapter) and to unload it afterwards. Requests then name the adapter as their model.
    """
    from selfplay.lora_serving import adapter_name, serving_plan
    from selfplay.model_server import ModelServer
    from selfplay.openai_client import sample_chat

    s = cfg.sample
    params = dict(n=s.num_samples, temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_new_tokens, seed=s.seed + k, exact_tokens=True)
    adapter = Path(policy).resolve() if is_adapter(policy) else None
    name = adapter_name(cfg.name, adapter) if adapter else None
    if s.backend == "vllm":
        spec, model_path, _ = serving_plan(s.server, policy, name or "policy")
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with gpu_slot(f"{cfg.name} round {k} sample (vLLM server)"):
            with ModelServer(spec, model_path, log_path) as server:
                out = sample_chat(server.base_url, name or server.api_model, prompts, api_key=server.api_key, **params)
            if not server.wait_gpu_free():
                log.warning("round %d: GPU memory was not all given back %g s after the sampling server stopped; held by %s", k,
                            spec.gpu_free_timeout, gpu.holders())
    else:
        from selfplay.lora_serving import LoraAdapterError, load_lora_adapter, unload_lora_adapter
        from selfplay.openai_client import resolve_api_key

        e = s.endpoint
        key = resolve_api_key(e)
        if adapter:
            log.info("round %d: loading adapter %s into %s as %r", k, adapter, e.base_url, name)
            # A crash after an earlier load left it loaded, and vLLM refuses to load a name twice.
            with contextlib.suppress(LoraAdapterError):
                unload_lora_adapter(e.base_url, name, api_key=key)
            load_lora_adapter(e.base_url, name, adapter, api_key=key)
        try:
            out = sample_chat(e.base_url, name or e.model, prompts, api_key=key, max_concurrency=e.max_concurrency,
                              timeout=e.timeout, **params)
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


def sample_local(policy: str, prompts: list[str], s, seed: int, *, log, progress=None, cpu_dtype: str = "float32") -> list[dict[str, Any]]:
    """The transformers backend: load `policy` from disk (on the CPU in `cpu_dtype`), generate, give the memory back."""
    model, tokenizer = load_causal_lm(policy, cpu_dtype=cpu_dtype), load_tokenizer(policy)
    rows = generate(model, tokenizer, prompts, num_samples=s.num_samples, temperature=s.temperature, top_p=s.top_p,
                    max_new_tokens=s.max_new_tokens, batch_size=s.batch_size, seed=seed, progress=progress,
                    decoder=s.decoder, log=log)
    del model
    release_memory()
    return rows


def _generation_table(prompts: list[dict[str, str]], answers: list[dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame([{"prompt_id": p["id"], "prompt": p["prompt"], "reference": p.get("reference"), "verifier": p.get("verifier"),
                          "response": a["response"], "n_tokens": a["n_tokens"], "truncated": a["truncated"]}
                         for p, a in zip(prompts, answers)], columns=GENERATION_COLUMNS)


EvalJob = tuple[str, list[dict[str, str]], float, int]  # (model, prompts, temperature, max_new_tokens)


def distinct_jobs(jobs: list[EvalJob]) -> tuple[list[EvalJob], list[int]]:
    """The jobs that differ, and for each job the index of its twin among them: the same model, prompts and settings
    answer alike (every job has the stage's seed), so the evaluate stage's win-rate and accuracy answers are one job
    when its temperature is 0 and both budgets and prompt sets are the same.

    >>> p = [{"id": "a", "prompt": "2+2?"}]
    >>> distinct_jobs([("new", p, 0.0, 24), ("old", p, 0.0, 24), ("new", list(p), 0.0, 24), ("new", p, 0.7, 24)])[1]
    [0, 1, 0, 2]
    """
    keys = [(model, tuple((q["id"], q["prompt"]) for q in prompts), float(t), int(n)) for model, prompts, t, n in jobs]
    distinct = list(dict.fromkeys(keys))
    return [jobs[keys.index(key)] for key in distinct], [distinct.index(key) for key in keys]


def eval_generations_from_server(cfg: RunConfig, k: int, jobs: list[EvalJob], base: str, log_dir: Path, log) -> list[pd.DataFrame] | None:
    """The evaluate stage's answers from the sampling backend's server, when `sample.backend` is `vllm` or
    `endpoint`: one answer per prompt and job, `n=1`, seeded with `evaluate.seed` (`seed + index` per prompt), greedy
    where the job's temperature is 0. None when the backend is `transformers` (the caller generates in-process).

    `vllm`: one server per full model (`sample.server`, the spec the round's samples came from), and one server for
    a base with all its adapters (`train.merge: false`: the new and the current checkpoint in one start), each
    stopped, its GPU memory given back, before the next. `endpoint`: the running server, each adapter loaded and
    unloaded around its jobs; where a job's model is neither the endpoint's own (round 0's policy) nor an adapter
    (a merged checkpoint, `rounds: 1`), every job is generated in-process instead, so that both sides of a
    comparison come from the same engine.
    """
    from selfplay.lora_serving import (LoraAdapterError, adapter_name, adapter_rank, load_lora_adapter, lora_modules_args,
                                       unload_lora_adapter)
    from selfplay.model_server import ModelServer
    from selfplay.models import adapter_base
    from selfplay.openai_client import resolve_api_key, sample_chat

    s, e = cfg.sample, cfg.evaluate
    if s.backend not in ("vllm", "endpoint"):
        return None
    tables: list[pd.DataFrame | None] = [None] * len(jobs)
    models = list(dict.fromkeys(job[0] for job in jobs))
    names = {m: adapter_name(cfg.name, Path(m).resolve()) for m in models if is_adapter(m)}

    def answer(base_url: str, api_key: str, served: dict[str, str], **kw) -> None:
        for i, (path, prompts, temperature, max_new_tokens) in enumerate(jobs):
            if path in served:
                out = sample_chat(base_url, served[path], [p["prompt"] for p in prompts], n=1, temperature=temperature, top_p=1.0,
                                  max_tokens=max_new_tokens, seed=e.seed, exact_tokens=True, api_key=api_key, **kw)
                tables[i] = _generation_table(prompts, [choices[0] for choices in out])

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
                answer(server.base_url, server.api_key, {m: names.get(m, server.api_model) for m in members})
            if not server.wait_gpu_free():
                log.warning("round %d: GPU memory was not all given back %g s after the evaluation server stopped; held by %s", k,
                            spec.gpu_free_timeout, gpu.holders())
        return tables
    endpoint = s.endpoint
    own = {m for m in models if m not in names and Path(m).resolve() == Path(base).resolve()}
    if len(own) + len(names) < len(models):
        log.info("round %d: the endpoint cannot serve a merged checkpoint: every evaluation answer is generated in-process", k)
        return None
    key = resolve_api_key(endpoint)
    kw = dict(max_concurrency=endpoint.max_concurrency, timeout=endpoint.timeout)
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


def eval_generations(cfg: RunConfig, jobs: list[EvalJob], *, log=None,
                     progress=None) -> list[pd.DataFrame]:
    """One answer per prompt for each job (model, prompts, temperature, max_new_tokens), with the evaluate stage's
    seed for all; each model is loaded once, whatever the number of its jobs."""
    e = cfg.evaluate
    tables: list[pd.DataFrame | None] = [None] * len(jobs)
    for n, model_path in enumerate(dict.fromkeys(job[0] for job in jobs)):
        model, tokenizer = load_causal_lm(model_path, cpu_dtype=cfg.policy.cpu_dtype), load_tokenizer(model_path)
        for i, (path, prompts, temperature, max_new_tokens) in enumerate(jobs):
            if path != model_path:
                continue
            rows = generate(model, tokenizer, [p["prompt"] for p in prompts], num_samples=1, temperature=temperature, top_p=1.0,
                            max_new_tokens=max_new_tokens, batch_size=cfg.sample.batch_size, seed=e.seed,
                            decoder=getattr(cfg.sample, "decoder", "generate"), log=log)  # only the transformers sampler has one
            tables[i] = _generation_table(prompts, rows)
        del model
        release_memory()
        if progress:
            progress(n + 1, len({job[0] for job in jobs}))
    return tables
