"""DPO's chosen and rejected rows packed into one (selfplay.training.shared_prompt): the same log-probabilities, gradients and
training as TRL's own layout, on a real (tiny) Llama under PEFT and TRL's fused LM head."""

from __future__ import annotations

import contextlib
import logging

import pytest

pytestmark = pytest.mark.unit


def dpo_batch(vocab: int, seed: int = 0):
    """A batch in TRL's layout: [chosen_1..n, rejected_1..n], each prompt + completion, right-padded. The pairs share
    prompts of several lengths; one rejected completion begins as its chosen does, one is a prefix of it."""
    import torch

    g = torch.Generator().manual_seed(seed)
    draw = lambda n: torch.randint(3, vocab, (n,), generator=g).tolist()  # noqa: E731
    pairs = []
    for prompt_len, c_len, r_len in ((9, 6, 4), (14, 3, 8), (5, 7, 7), (11, 1, 2)):
        prompt, chosen, rejected = draw(prompt_len), draw(c_len), draw(r_len)
        pairs.append((prompt, chosen, rejected))
    prompt, chosen, _ = pairs[2]
    pairs[2] = (prompt, chosen, chosen[:3] + draw(4))  # the completions begin alike
    prompt, chosen, _ = pairs[1]
    pairs[1] = (prompt, chosen, chosen[:2])  # rejected is a prefix of chosen
    rows = [p + c for p, c, _ in pairs] + [p + r for p, _, r in pairs]
    prompt_lens = [len(p) for p, _, _ in pairs] * 2
    width = max(map(len, rows))
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (row, plen) in enumerate(zip(rows, prompt_lens)):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        labels[i, plen : len(row)] = ids[i, plen : len(row)]
    return ids, mask, labels


def peft_model(tiny_model, attn="sdpa", dropout=0.0):
    import torch
    import trl.trainer.utils as trl_utils
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation=attn)
    trl_utils.add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    torch.manual_seed(1)
    lora = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear",
                      init_lora_weights=False)  # random B as well: a LoRA that is not the identity yet
    return get_peft_model(model, lora)


def forward_and_grads(model, ids, mask, labels):
    model.zero_grad()
    out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    out.log_probs.sum().backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_pack_lays_each_pair_out_as_one_row_and_unpack_puts_every_position_back():
    import torch

    from selfplay.training.shared_prompt import pack, unpack

    ids, mask, _ = dpo_batch(50)
    p = pack(ids, mask)
    n = ids.shape[0] // 2
    lengths = mask.sum(1)
    assert p.input_ids.shape[0] == n and p.positions < ids.numel()
    # unpacking the packed token ids (as a 1-wide "hidden state") gives the original ids at every real position
    back = unpack(p.input_ids.unsqueeze(-1).float(), p)[..., 0].long()
    assert torch.equal(back[mask.bool()], ids[mask.bool()]) and (back[~mask.bool()] == 0).all()
    positions = unpack(p.position_ids.unsqueeze(-1).float(), p)[..., 0].long()
    assert torch.equal(positions[mask.bool()], (torch.arange(ids.shape[1]).expand_as(ids))[mask.bool()])
    for i in range(n):
        a, b = int(lengths[i]), int(lengths[n + i])
        shared = int((ids[i, : min(a, b)] == ids[n + i, : min(a, b)]).long().cumprod(0).sum())
        m = p.mask[i, 0]
        assert not m[a:a + b - shared, shared:a].any()  # the rejected tail never sees the chosen tail
        assert m[a:a + b - shared, :shared].all()
        assert m.any(dim=1).all()  # every query sees something (padding: itself)
    # rows that share nothing and are not padded gain nothing: no packing
    assert pack(torch.arange(8).view(2, 4) + 1, torch.ones(2, 4, dtype=torch.long)) is None
    assert pack(ids[:3], mask[:3]) is None  # an odd batch is not TRL's pairs
    left = torch.ones_like(mask)
    left[0, 0] = 0  # left padding: the positions would not be 0..len-1
    assert pack(ids, left) is None


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_prompts_give_the_plain_log_probs_entropy_and_gradients(tiny_model, attn):
    import torch

    from selfplay.training.shared_prompt import shared_prompts

    model = peft_model(tiny_model, attn)
    ids, mask, labels = dpo_batch(model.config.vocab_size)
    plain, plain_grads = forward_and_grads(model, ids, mask, labels)
    with shared_prompts(model) as shared:
        assert not isinstance(shared, str), shared
        packed, packed_grads = forward_and_grads(model, ids, mask, labels)
        again, _ = forward_and_grads(model, ids, mask, labels)  # after the first batch's check
    assert shared.enabled and shared.checked and 0 < shared.computed < shared.unpacked == 2 * ids.numel()
    assert "forward" not in model.get_base_model().model.__dict__  # put back
    for name in ("log_probs", "entropy", "mean_logits"):
        assert torch.allclose(getattr(plain, name), getattr(packed, name), atol=1e-5), name
        assert torch.allclose(getattr(plain, name), getattr(again, name), atol=1e-5), name
    assert torch.equal(plain.is_top1, packed.is_top1)
    assert plain_grads.keys() == packed_grads.keys() and len(plain_grads) > 0
    for n in plain_grads:
        assert torch.allclose(plain_grads[n], packed_grads[n], atol=1e-5, rtol=1e-4), n


def test_dropout_keeps_the_prompts_apart(tiny_model):
    from selfplay.training.shared_prompt import shared_prompts

    model = peft_model(tiny_model, dropout=0.1)
    with shared_prompts(model) as shared:
        assert isinstance(shared, str) and "dropout" in shared
    assert "forward" not in model.get_base_model().model.__dict__


def test_a_model_the_mask_does_not_describe_is_caught_on_the_first_batch(tmp_path, caplog):
    """A sliding window shorter than the rows: the plain forward restricts attention to it, a custom 4-D mask does
    not. The first batch's check sees the difference, turns the sharing off and returns the plain forward's result."""
    import torch
    import trl.trainer.utils as trl_utils
    from transformers import MistralConfig, MistralForCausalLM

    from selfplay.training.shared_prompt import shared_prompts

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(
        vocab_size=60, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=4, attn_implementation="sdpa"))
    trl_utils.add_fused_lm_head(model)
    ids, mask, labels = dpo_batch(60)
    plain = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True).log_probs
    with caplog.at_level(logging.WARNING, logger="selfplay.training.shared_prompt"), shared_prompts(model) as shared:
        assert not isinstance(shared, str)
        checked = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True).log_probs
        later = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True).log_probs
    assert shared.checked and not shared.enabled and shared.computed == 0
    assert "differs from the plain one" in caplog.text and "train.share_prompt: false" in caplog.text
    assert torch.equal(plain, checked) and torch.equal(plain, later)


@pytest.mark.stage
def test_dpo_training_with_shared_prompts_is_trls_own(tiny_model, tmp_path):
    """Two DPOTrainer runs on the same pairs and seed, one with the prompts shared: the same losses, rewards and
    trained adapter."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from selfplay.inputs.models import load_tokenizer
    from selfplay.training.dpo import completion_tokens_only
    from selfplay.training.shared_prompt import shared_prompts

    questions = ["What is 7 plus 5?", "Name a prime above 10.", "Spell cat backwards.", "What colour is the sky?"] * 3
    records = [{"prompt": [{"role": "user", "content": q}],
                "chosen": [{"role": "assistant", "content": f"The answer to {i} is good {i * 7}."}],
                "rejected": [{"role": "assistant", "content": f"The answer is bad{' and long' * (i % 3)}."}]}
               for i, q in enumerate(questions)]

    def train(share: bool):
        model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
        args = DPOConfig(output_dir=str(tmp_path / str(share)), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-2,
                         logging_steps=1, report_to="none", use_cpu=True, bf16=False, seed=3, save_strategy="no", disable_tqdm=True)
        trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(records),
                             processing_class=load_tokenizer(tiny_model, padding_side="right"),
                             peft_config=LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules="all-linear"))
        with completion_tokens_only(), (shared_prompts(trainer.model) if share else contextlib.nullcontext()) as shared:
            trainer.train()
        lora = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
        return [h for h in trainer.state.log_history if "loss" in h], lora, shared

    plain_log, plain_lora, _ = train(False)
    shared_log, shared_lora, shared = train(True)
    assert not isinstance(shared, str) and shared.enabled and 0 < shared.computed < shared.unpacked
    assert len(plain_log) == len(shared_log) == 3
    for a, b in zip(plain_log, shared_log):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "entropy"):
            assert a[key] == pytest.approx(b[key], abs=1e-4), key
    assert plain_log[-1]["loss"] != plain_log[0]["loss"]  # it trained
    for n in plain_lora:  # Adam divides by the gradients' own scale, so rounding in them moves weights by ~1e-5
        assert torch.allclose(plain_lora[n], shared_lora[n], atol=1e-4), n
    assert max(float(t.abs().max()) for n, t in shared_lora.items() if "lora_B" in n) > 1e-3  # B starts at 0: it moved



@pytest.mark.stage
def test_the_train_stage_shares_prompts_unless_told_not_to_and_saves_the_same_checkpoint(tiny_model, tmp_path):
    """selfplay's own training (train_dpo) with train.share_prompt on and off: the same losses and merged weights;
    the manifest's metrics say what the model computed, or why the prompts were not shared."""
    import logging

    import pandas as pd
    import torch
    from safetensors.torch import load_file

    from selfplay.config.run import load_config
    from selfplay.training.dpo import train_dpo

    questions = ["What is 7 plus 5?", "Name a prime above 10.", "Spell cat backwards.", "What colour is the sky?"] * 2
    pairs = pd.DataFrame({"prompt": questions, "chosen": [f"It is {i * 7}, surely." for i in range(8)],
                          "rejected": [f"No idea{' at all' * (i % 3)}." for i in range(8)], "kept": True})
    pairs.to_parquet(tmp_path / "pairs.parquet")
    runs = {}
    for share in (True, False):
        cfg = load_config(None, [f"output_dir={tmp_path}", f"train.share_prompt={str(share).lower()}", "train.min_pairs=1",
                                 "train.dpo.per_device_train_batch_size=4", "train.dpo.learning_rate=1e-2",
                                 "train.lora.r=4", "train.lora.lora_alpha=8"])
        out = tmp_path / f"train-{share}"
        out.mkdir()
        metrics = train_dpo(cfg, 1, str(tiny_model), str(tmp_path / "pairs.parquet"), str(out), log=logging.getLogger("test"))
        runs[share] = metrics, load_file(str(out / "checkpoint" / "model.safetensors"))
    (on, on_weights), (off, off_weights) = runs[True], runs[False]
    assert 0 < on["shared_prompt"]["positions"] < on["shared_prompt"]["unshared_positions"]
    assert off["shared_prompt"] == "train.share_prompt is false"
    assert on["steps"] == off["steps"] == 2
    assert on["final_loss"] == pytest.approx(off["final_loss"], abs=1e-4) and on["final_loss"] != on["initial_loss"]
    assert on_weights.keys() == off_weights.keys()
    for n in on_weights:
        assert torch.allclose(on_weights[n], off_weights[n], atol=1e-4), n
