"""The in-process sampler's decoders: the shared prefill gives `num_return_sequences`' own draws, and the fast
decoder decodes as transformers does (greedy: the same tokens; sampling: the same distribution) while finished rows
leave the batch. Real models: the tiny random Llama and the bundled SmolLM2."""

from __future__ import annotations

import logging

import pytest
import torch

from selfplay.generation.decoding import fast_decoder_refusal, sample_top, stop_token_ids
from selfplay.generation.local import generate
from selfplay.inputs.models import load_causal_lm, load_tokenizer

pytestmark = pytest.mark.stage

PROMPTS = ["Hi", "Name a colour.", "What is 12 + 30? Answer with the number.", "Write one word about the sea."]


def plain_generate(model, tok, prompts, k, seed, **sampling):
    """transformers' generate with num_return_sequences, nothing shared: what the sampler did before."""
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True) for p in prompts]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(**enc, num_return_sequences=k, pad_token_id=tok.pad_token_id, eos_token_id=sorted(stop_token_ids(tok, model)),
                             **sampling)
    return out[:, enc["input_ids"].shape[1]:].tolist()


@pytest.fixture(scope="module")
def bundled():
    from selfplay.inputs.models import resolve_model

    path = resolve_model("bundled")
    return load_causal_lm(path), load_tokenizer(path)


def test_the_shared_prefill_draws_what_num_return_sequences_draws(tiny_model, bundled):
    for model, tok in ((load_causal_lm(tiny_model), load_tokenizer(tiny_model)), bundled):
        rows = generate(model, tok, PROMPTS, num_samples=4, temperature=0.9, top_p=0.95, max_new_tokens=10, batch_size=16, seed=5)
        plain = plain_generate(model, tok, PROMPTS, 4, 5, do_sample=True, temperature=0.9, top_p=0.95, max_new_tokens=10)
        expected = [tok.decode(t[:r["n_tokens"]], skip_special_tokens=True).strip() for t, r in zip(plain, rows)]
        assert [r["response"] for r in rows] == expected
        assert [(r["prompt_index"], r["sample_idx"]) for r in rows] == [(i, j) for i in range(4) for j in range(4)]


def test_the_fast_decoder_decodes_greedily_token_for_token_as_generate(tiny_model, bundled):
    for model, tok in ((load_causal_lm(tiny_model), load_tokenizer(tiny_model)), bundled):
        for k in (1, 2):  # 1: the evaluate stage's greedy answers
            kw = dict(num_samples=k, temperature=0.0, top_p=1.0, max_new_tokens=16, batch_size=4, seed=0)
            fast, slow = generate(model, tok, PROMPTS, decoder="fast", **kw), generate(model, tok, PROMPTS, decoder="generate", **kw)
            assert fast == slow  # texts, token counts and truncation, across several batches with left padding
    assert any(not r["truncated"] for r in fast) and any(r["n_tokens"] > 0 for r in fast)  # rows stopped early and left the batch


def test_the_fast_decoder_samples_from_transformers_top_k_top_p_distribution():
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(1, 400) * 3
    for temperature, top_p, top_k in ((0.9, 0.95, 50), (1.3, 0.6, 50), (0.7, 1.0, 8), (1.0, 0.9, None)):
        warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature), *([TopKLogitsWarper(top_k)] if top_k else []),
                                       TopPLogitsWarper(top_p)])
        expected = warpers(torch.zeros(1, 1, dtype=torch.long), logits.clone()).softmax(-1)[0]
        n = 40_000
        draws = sample_top(logits.expand(n, -1), temperature, top_p, top_k)
        freq = torch.bincount(draws, minlength=logits.shape[-1]).float() / n
        assert set(draws.tolist()) <= set(expected.nonzero().squeeze(1).tolist())  # never a token transformers would cut
        assert (freq - expected).abs().max() < 0.01, (temperature, top_p, top_k)


def test_the_fast_decoder_is_seeded_stops_rows_and_counts_tokens_as_generate(bundled):
    model, tok = bundled
    kw = dict(num_samples=4, temperature=1.0, top_p=0.95, max_new_tokens=12, batch_size=8, seed=3, decoder="fast")
    rows = generate(model, tok, PROMPTS, **kw)
    assert rows == generate(model, tok, PROMPTS, **kw)
    assert rows != generate(model, tok, PROMPTS, **{**kw, "seed": 4})
    for r in rows:
        ids = tok(r["response"], add_special_tokens=False)["input_ids"]
        assert r["n_tokens"] <= 12 and r["truncated"] == (r["n_tokens"] == 12)  # cut off exactly where no stop token came
        assert abs(len(ids) - r["n_tokens"]) <= 2  # the decoded text is what was counted (retokenising may merge a token or two)


def test_a_model_that_asks_for_another_logits_processor_is_decoded_by_generate_with_a_warning(tiny_model, caplog):
    model, tok = load_causal_lm(tiny_model), load_tokenizer(tiny_model)
    assert fast_decoder_refusal(model) is None
    model.generation_config.repetition_penalty = 1.3
    assert "repetition_penalty=1.3" in fast_decoder_refusal(model)
    kw = dict(num_samples=2, temperature=0.8, top_p=0.9, max_new_tokens=8, batch_size=4, seed=1)
    log = logging.getLogger("test-decoder")
    with caplog.at_level(logging.WARNING, logger="test-decoder"):
        fast = generate(model, tok, PROMPTS[:2], decoder="fast", log=log, **kw)
    assert fast == generate(model, tok, PROMPTS[:2], decoder="generate", **kw)
    assert "decoding with transformers' generate instead" in caplog.text
    with pytest.raises(ValueError, match="unknown decoder"):
        generate(model, tok, PROMPTS[:1], decoder="beam", **kw)
