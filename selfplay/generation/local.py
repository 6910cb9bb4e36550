"""Generation: completions from a policy, batched and seeded, with transformers in this process (or a process of its
own) or through an OpenAI-compatible server (a vLLM server started for the round, or a running endpoint).

Each completion is a dict: prompt index, sample index, text, prompt tokens, tokens generated, and `truncated` (it
hit the token budget before its end-of-sequence token). The sample stage draws K per prompt from the round's
policy (`sample_local`, `sample_from_server`); the evaluate stage one per held-out prompt from each model it
compares, from the sampling backend's server (`eval_generations_from_server`) or in-process (`eval_generations`).
A policy is always loaded from its saved checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pandas as pd

from selfplay.config.run import RunConfig
from selfplay.generation.decoding import DECODERS, completion_lengths, fast_decode, fast_decoder_refusal, shared_prefill, stop_token_ids
from selfplay.generation.jobs import EvalJob, generation_table
from selfplay.inputs.models import load_causal_lm, load_tokenizer, release_memory


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


def sample_local(policy: str, prompts: list[str], s, seed: int, *, log, progress=None, cpu_dtype: str = "float32") -> list[dict[str, Any]]:
    """The transformers backend: load `policy` from disk (on the CPU in `cpu_dtype`), generate, give the memory back."""
    model, tokenizer = load_causal_lm(policy, cpu_dtype=cpu_dtype), load_tokenizer(policy)
    rows = generate(model, tokenizer, prompts, num_samples=s.num_samples, temperature=s.temperature, top_p=s.top_p,
                    max_new_tokens=s.max_new_tokens, batch_size=s.batch_size, seed=seed, progress=progress,
                    decoder=s.decoder, log=log)
    del model
    release_memory()
    return rows


def eval_generations(cfg: RunConfig, jobs: list[EvalJob], *, log=None,
                     progress=None) -> list[pd.DataFrame]:
    """One answer per prompt for each job (model, prompts, temperature, max_new_tokens), with the evaluate stage's
    seed for all; each model is loaded once, whatever the number of its jobs."""
    e = cfg.evaluate
    tables: list[pd.DataFrame | None] = [None] * len(jobs)
    models = list(dict.fromkeys(job.model for job in jobs))
    for n, model_path in enumerate(models):
        model, tokenizer = load_causal_lm(model_path, cpu_dtype=cfg.policy.cpu_dtype), load_tokenizer(model_path)
        for i, job in enumerate(jobs):
            if job.model != model_path:
                continue
            rows = generate(model, tokenizer, [p["prompt"] for p in job.prompts], num_samples=1, temperature=job.temperature, top_p=1.0,
                            max_new_tokens=job.max_new_tokens, batch_size=cfg.sample.batch_size, seed=e.seed,
                            decoder=getattr(cfg.sample, "decoder", "generate"), log=log)  # only the transformers sampler has one
            tables[i] = generation_table(job.prompts, rows)
        del model
        release_memory()
        if progress:
            progress(n + 1, len(models))
    return tables
