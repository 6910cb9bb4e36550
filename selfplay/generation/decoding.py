"""Decoding with transformers, token by token: where a completion stops (and whether it was cut off), and
`sample.decoder: fast`, selfplay's own loop: one shared prefill per prompt for its K samples, tokens drawn among the
top-k with transformers' distribution, finished rows leaving the batch. `selfplay.generation.local.generate` runs it.
"""

from __future__ import annotations


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
