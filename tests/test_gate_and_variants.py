"""Knowing whether a round helped: the gate's decision rule, a rejected round's fate in a real run, every training
variant reaching TRL's arguments, length control, and the training plots and diagnoses."""

from __future__ import annotations

import math
import re
import struct
from pathlib import Path

import pandas as pd
import pytest

from selfplay.config.run import FilterConfig, GateConfig, build_config
from selfplay.evaluation.outcomes import gate_decision
from selfplay.evaluation.quality import win_summary
from selfplay.inputs.prompts import load_prompts
from selfplay.pairs.build import screen
from selfplay.pairs.selection import select_pairs
from selfplay.reporting.report import plot_curves
from selfplay.runtime.rundir import RunDir
from selfplay.training.dpo import dpo_arguments, training_diagnoses
from tests.conftest import assume_probed, run_self_play, tiny_config
from tests.openai_stub import Reply, ScriptedOpenAI, chat_completion

pytestmark = pytest.mark.unit


def summary(wins: int, ties: int, losses: int) -> dict:
    outcomes = ["win"] * wins + ["tie"] * ties + ["loss"] * losses
    return win_summary(outcomes, [10] * len(outcomes), [10] * len(outcomes))


def test_a_clearly_worse_checkpoint_is_rejected_and_a_close_one_accepted():
    worse, ok = summary(2, 2, 12), summary(6, 4, 6)
    assert worse["ci_high"] < 0.5
    accepted, reason = gate_decision(worse, GateConfig())
    assert not accepted and "rejected" in reason and "current checkpoint stays" in reason
    accepted, reason = gate_decision(ok, GateConfig())
    assert accepted and reason.startswith("accepted")


def test_gate_disabled_or_without_evidence():
    assert gate_decision(summary(0, 0, 16), GateConfig(enabled=False))[0]
    accepted, reason = gate_decision(summary(0, 0, 0), GateConfig())
    assert not accepted and "no held-out comparison" in reason


@pytest.mark.stage
def test_rejected_rounds_stay_on_disk_and_the_lineage_keeps_the_previous_checkpoint(prefect_server, tiny_model, tmp_path):
    eval_prompts = {p["prompt"] for p in load_prompts("bundled:eval")}

    def judge(body: dict, n: int) -> Reply:
        """Held-out comparisons are all ties (win rate 0.5, Wilson upper bound 0.85 over 4); training pairs: shorter wins."""
        user = body["messages"][-1]["content"]
        if re.search(r"<request>\n(.*?)\n</request>", user, re.S).group(1) in eval_prompts:
            return Reply(json=chat_completion("A", logprobs={"A": -0.7, "B": -0.7}))
        a, b = (re.search(rf"<{t}>\n(.*?)\n</{t}>", user, re.S).group(1) for t in ("response_A", "response_B"))
        win = "A" if len(a) <= len(b) else "B"
        return Reply(json=chat_completion(win, logprobs={win: -0.05, "B" if win == "A" else "A": -3.0}))

    with ScriptedOpenAI(judge) as server:
        assume_probed(server.base_url, "judge")
        cfg = tiny_config(tiny_model, tmp_path / "runs", name="gated", rounds=3,
                          judge={"backend": "endpoint", "cache": False, "margin": 0.0,
                                 "endpoint": {"base_url": server.base_url, "model": "judge", "api_key_env": None}},
                          gate={"min_upper_bound": 0.9, "early_stop_after": 2})
        summaries = run_self_play(cfg, tmp_path / "gated.yaml")
    run = RunDir(Path(cfg["output_dir"]) / "gated")
    assert [s["round"] for s in summaries] == [1, 2]  # stopped early after two rejections in a row
    assert all(s["accepted"] is False and s["gate"] == "rejected" for s in summaries)
    assert run.checkpoint(1).is_dir() and run.round_done(1)  # kept for inspection
    assert run.round_manifest(1)["accepted"] is False and "lies wholly below 0.9" in run.round_manifest(1)["gate_reason"]
    assert run.manifest(1, "evaluate")["metrics"]["ties"] == cfg["prompts"]["eval_size"]
    # Round 2 started again from the base model, not from the rejected round 1.
    base = str(Path(tiny_model).resolve())
    assert run.manifest(2, "sample")["policy"] == base and run.manifest(2, "train")["reference"] == base
    assert run.manifest(2, "evaluate")["previous"] == base
    assert not run.round_dir(3).exists()


def test_every_training_variant_reaches_trls_arguments(tmp_path):
    from trl import DPOConfig

    cfg = build_config({"train": {
        "dpo": {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.2], "label_smoothing": 0.1},
        "schedule": {"beta": [0.1, 0.3], "learning_rate": {"start": 1e-4, "factor": 0.5}},
    }})
    for k, (beta, lr) in {1: (0.1, 1e-4), 2: (0.3, 5e-5), 3: (0.3, 2.5e-5)}.items():
        args = DPOConfig(**dpo_arguments(cfg, k, str(tmp_path), "cpu", "float32"))
        assert args.loss_type == ["sigmoid", "sft"] and args.loss_weights == [1.0, 0.2]
        assert args.label_smoothing == 0.1
        assert args.beta == beta and math.isclose(args.learning_rate, lr)
        assert args.bf16 is False and args.output_dir == str(tmp_path)


def test_length_control_drops_lopsided_pairs_and_prefers_the_shorter_near_a_tie():
    filt = FilterConfig(max_length_ratio=2.0)
    assert screen("short answer", "a much, much longer answer with lots of padding", False, False, filt) == "length_ratio"
    assert screen("an answer", "another one", False, False, filt) is None
    judged = pd.DataFrame({
        "prompt_id": ["p", "q"], "prompt": ["P", "Q"], "i": [0, 0], "j": [1, 1],
        "response_1": ["a long winning answer", "a long winning answer"], "response_2": ["short", "short"],
        "screened": [None, None], "verdict": ["first", "first"], "margin": [0.05, 0.6], "p_first": [0.525, 0.8],
    })
    out = select_pairs(judged, prefer_shorter_below_margin=0.1)
    assert out["chosen"].tolist() == ["short", "a long winning answer"]  # near tie: shorter; clear win: the verdict
    assert out["length_swapped"].tolist() == [True, False]


def test_training_plots_are_pngs_of_the_expected_size(tmp_path):
    history = [{"step": i, "loss": 0.69 - 0.02 * i, "rewards/chosen": 0.01 * i, "rewards/rejected": -0.02 * i,
                "rewards/margins": 0.03 * i, "rewards/accuracies": 0.5 + 0.05 * i, "grad_norm": 1.0 / i} for i in range(1, 9)]
    paths = plot_curves(history, tmp_path)
    assert set(paths) == {"loss", "rewards", "margins", "accuracy", "grad_norm"}
    for path in paths.values():
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        assert struct.unpack(">II", data[16:24]) == (480, 320)


@pytest.mark.parametrize(("history", "check"), [
    ([{"step": 1, "loss": 0.9, "rewards/chosen": 0, "rewards/rejected": 0, "rewards/accuracies": 0.5}], "initial_loss"),
    ([{"step": i, "loss": 0.69, "rewards/chosen": 0.3, "rewards/rejected": -0.3, "rewards/accuracies": 1.0} for i in range(4)], "reward_accuracy"),
    ([{"step": i, "loss": 0.69, "rewards/chosen": -0.2, "rewards/rejected": -0.4, "rewards/accuracies": 0.6} for i in range(4)], "rewards_both_falling"),
])
def test_training_diagnoses_flag_each_problem(history, check):
    assert [w["check"] for w in training_diagnoses(history)] == [check]


def test_training_diagnoses_quiet_on_a_healthy_run():
    history = [{"step": i, "loss": math.log(2) - 0.01 * i, "rewards/chosen": 0.02 * i, "rewards/rejected": -0.02 * i,
                "rewards/accuracies": 0.6} for i in range(8)]
    assert training_diagnoses(history) == []
