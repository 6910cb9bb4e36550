"""Fast tier: the train stage's pure helpers (selfplay/training/dpo.py): the min-pairs gate, DPO records and arguments, and
the summary of a Trainer log history. No model, no trainer: synthetic tables and histories only.
"""

from __future__ import annotations

import random

import pandas as pd
import pytest

from selfplay.config.run import load_config
from selfplay.pairs.build import REASONS
from selfplay.pairs.selection import select_pairs
from selfplay.training.dpo import DPO_DEFAULTS, NotEnoughPairs, check_enough_pairs, dpo_arguments, dpo_records, summarize_history

pytestmark = pytest.mark.unit

# ---------------------------------------------------------------- check_enough_pairs


def test_not_enough_pairs_names_kept_min_pairs_and_the_biggest_drops():
    drops = {"empty": 1, "truncated": 9, "too_similar": 0, "judge_error": 0, "tie": 30, "inconsistent": 2}
    with pytest.raises(NotEnoughPairs) as err:
        check_enough_pairs(5, 16, drops, k=2)
    msg = str(err.value)
    assert "round 2 kept 5 pairs" in msg and "train.min_pairs=16" in msg
    assert "(dropped: tie: 30, truncated: 9, inconsistent: 2, empty: 1)" in msg  # biggest first, zeros left out
    assert "too_similar" not in msg.split("(dropped:")[1].split(")")[0]
    assert "judge.margin" in msg and "lower train.min_pairs" in msg


def test_enough_pairs_passes_at_the_boundary():
    for min_pairs in range(1, 40):
        check_enough_pairs(min_pairs, min_pairs, {}, k=1)  # kept == min_pairs: enough
        check_enough_pairs(min_pairs + 3, min_pairs, {"tie": 100}, k=1)
        with pytest.raises(NotEnoughPairs):
            check_enough_pairs(min_pairs - 1, min_pairs, {"tie": 1}, k=1)


def test_no_drops_at_all_says_none():
    with pytest.raises(NotEnoughPairs, match=r"\(dropped: none\)"):
        check_enough_pairs(0, 1, {r: 0 for r in REASONS}, k=1)


# ---------------------------------------------------------------- dpo_records

def filtered_pairs() -> pd.DataFrame:
    judgments = pd.DataFrame([
        {"prompt": "q0", "response_1": "good0", "response_2": "bad0", "screened": None, "verdict": "first"},
        {"prompt": "q1", "response_1": "bad1", "response_2": "good1", "screened": None, "verdict": "second"},
        {"prompt": "q2", "response_1": "x", "response_2": "y", "screened": None, "verdict": "tie"},
        {"prompt": "q3", "response_1": "", "response_2": "y", "screened": "empty", "verdict": "not_judged"},
        {"prompt": "q4", "response_1": "x", "response_2": "z", "screened": None, "verdict": "judge_error"},
    ])
    return select_pairs(judgments)


def test_dpo_records_are_kept_pairs_in_conversational_format():
    records = dpo_records(filtered_pairs())
    assert records == [
        {"prompt": [{"role": "user", "content": "q0"}],
         "chosen": [{"role": "assistant", "content": "good0"}],
         "rejected": [{"role": "assistant", "content": "bad0"}]},
        {"prompt": [{"role": "user", "content": "q1"}],
         "chosen": [{"role": "assistant", "content": "good1"}],
         "rejected": [{"role": "assistant", "content": "bad1"}]},
    ]


def test_dpo_records_of_nothing_kept_is_empty():
    pairs = filtered_pairs()
    assert dpo_records(pairs[~pairs["kept"]]) == []


# ---------------------------------------------------------------- dpo_arguments

def test_recipe_values_override_defaults_and_output_dir_is_ours():
    cfg = load_config(None, ["seed=7", "train.dpo.learning_rate=0.001", "train.dpo.beta=0.3", "train.dpo.num_train_epochs=2"])
    args = dpo_arguments(cfg, 3, "/scratch/out", "cpu", "float32")
    assert args["learning_rate"] == 0.001 and args["num_train_epochs"] == 2 and args["beta"] == 0.3
    assert args["seed"] == 10  # run seed + round
    assert args["output_dir"] == "/scratch/out"
    for key, value in DPO_DEFAULTS.items():
        if key not in cfg.train.dpo:
            assert args[key] == value, key


def test_output_dir_is_always_ours_even_if_a_recipe_sets_it():
    cfg = load_config(None)
    cfg.train.dpo = {"output_dir": "/elsewhere"}  # check_passthrough rejects this; dpo_arguments still wins
    assert dpo_arguments(cfg, 1, "/ours", "cpu", "float32")["output_dir"] == "/ours"


def test_cpu_training_turns_off_gpu_precision():
    args = dpo_arguments(load_config(None), 1, "/o", "cpu", "float32")
    assert (args["bf16"], args["fp16"], args["use_cpu"], args["gradient_checkpointing"]) == (False, False, True, False)


@pytest.mark.parametrize("dtype,bf16,fp16", [("bfloat16", True, False), ("float16", False, True), ("float32", False, False)])
def test_cuda_precision_follows_the_dtype(dtype, bf16, fp16):
    args = dpo_arguments(load_config(None), 1, "/o", "cuda", dtype)
    assert (args["bf16"], args["fp16"]) == (bf16, fp16)
    assert "use_cpu" not in args


# ---------------------------------------------------------------- summarize_history

def synthetic_history(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    steps = [
        {"loss": 0.7 - 0.01 * i + rng.random() * 0.001, "rewards/accuracies": rng.random(), "rewards/margins": rng.random() - 0.2,
         "rewards/chosen": 0.1, "grad_norm": 1.0, "step": i + 1}
        for i in range(n)
    ]
    # the Trainer also logs an end-of-training summary without per-step keys; it must not count as a step
    return steps + [{"train_loss": 0.5, "train_runtime": 12.0, "step": n}]


def test_summarize_history_of_a_synthetic_run():
    history = synthetic_history(10)
    steps = history[:-1]
    summary = summarize_history(history)
    assert summary["steps"] == 10
    assert summary["initial_loss"] == steps[0]["loss"] and summary["final_loss"] == steps[-1]["loss"]
    assert summary["mean_loss"] == pytest.approx(sum(h["loss"] for h in steps) / 10)
    assert summary["reward_accuracy"] == pytest.approx(sum(h["rewards/accuracies"] for h in steps) / 10)
    assert summary["reward_margin"] == pytest.approx(sum(h["rewards/margins"] for h in steps) / 10)
    assert summary["final_reward_accuracy"] == steps[-1]["rewards/accuracies"]
    assert summary["final_reward_margin"] == steps[-1]["rewards/margins"]
    assert "ln2" not in summary  # a constant is no metric: readers compute ln 2 themselves


def test_summarize_history_skips_entries_without_step_metrics():
    history = [{"loss": 9.0}, *synthetic_history(3), {"eval_loss": 0.1}]
    assert summarize_history(history)["steps"] == 3
    assert summarize_history([]) == {"steps": 0}
    assert summarize_history([{"train_loss": 0.6}]) == {"steps": 0}


def test_more_than_one_epoch_precomputes_the_reference_once_unless_the_recipe_says_otherwise(tmp_path):
    one = dpo_arguments(load_config(None, [f"output_dir={tmp_path}"]), 1, "o", "cpu", "float32")
    assert "precompute_ref_log_probs" not in one
    two = dpo_arguments(load_config(None, [f"output_dir={tmp_path}", "train.dpo.num_train_epochs=2"]), 1, "o", "cpu", "float32")
    assert two["precompute_ref_log_probs"] is True
    off = dpo_arguments(load_config(None, [f"output_dir={tmp_path}", "train.dpo.num_train_epochs=2", "train.dpo.precompute_ref_log_probs=false"]),
                        1, "o", "cpu", "float32")
    assert off["precompute_ref_log_probs"] is False


def test_completion_tokens_only_projects_the_labelled_positions_with_the_same_log_probs_and_gradients(tiny_model):
    """TRL's fused LM head, with and without `completion_tokens_only`: the rows it projects, the per-token
    log-probabilities and the gradients they give."""
    import torch
    import trl.trainer.utils as trl_utils
    from transformers import AutoModelForCausalLM

    from selfplay.training.dpo import completion_tokens_only

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    trl_utils.add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    torch.manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (4, 20))
    mask = torch.ones_like(ids)
    mask[2:, 15:] = 0  # right padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :9] = -100  # the prompt
    rows_seen: list[int] = []
    apply = trl_utils._ChunkedLogProbFunction.apply

    def spy(hidden, *rest):
        rows_seen.append(hidden.shape[0])
        return apply(hidden, *rest)

    def run():
        model.zero_grad()
        out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
        out.log_probs.sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out, grads

    trl_utils._ChunkedLogProbFunction.apply = spy
    try:
        every, every_grads = run()
        with completion_tokens_only() as compact:
            assert compact
            only, only_grads = run()
        assert trl_utils._use_triton(torch.device("cpu")) is False  # put back
    finally:
        trl_utils._ChunkedLogProbFunction.apply = apply
    labelled = int((labels[:, 1:] != -100).sum())
    assert rows_seen == [4 * 19, labelled] and labelled < 4 * 19 / 2
    for name in ("log_probs", "entropy", "mean_logits"):
        assert torch.allclose(getattr(every, name), getattr(only, name), atol=1e-5), name
    assert (every.log_probs[labels[:, 1:] == -100] == 0).all() and (only.log_probs[labels[:, 1:] == -100] == 0).all()
    assert every_grads.keys() == only_grads.keys() and len(every_grads) > 0
    for n in every_grads:
        assert torch.allclose(every_grads[n], only_grads[n], atol=1e-5, rtol=1e-4), n
