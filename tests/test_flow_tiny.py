"""Stage and flow tier: a tiny random model through two full rounds under a real Prefect server.

Asserts the hand-offs (round 2 trains against round 1's merged checkpoint), that training changed the trainable
weights and nothing else, the shape of every parquet output, what the server recorded, and that a rerun resumes
without recomputing anything.
"""

from __future__ import annotations

import asyncio
import json
import math

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from selfplay.config.run import build_config
from selfplay.evaluation.outcomes import outcomes
from selfplay.inputs.models import weights_digest
from selfplay.pairs.build import COLUMNS as JUDGMENT_COLUMNS
from selfplay.runtime.rundir import RunDir
from tasks import sample as sample_stage
from tests.conftest import run_self_play, tiny_config

pytestmark = pytest.mark.stage


@pytest.fixture(scope="module")
def tiny_run(prefect_server, tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    raw = tiny_config(tiny_model, tmp)
    cfg = build_config(raw)
    summaries = run_self_play(raw, tmp / "tiny.yaml")
    return cfg, RunDir(cfg.run_dir), summaries


def state_dict(path):
    return load_file(str(path / "model.safetensors"))


def test_both_rounds_complete_with_summaries(tiny_run):
    cfg, run, summaries = tiny_run
    assert [s["round"] for s in summaries] == [1, 2]
    assert run.completed_rounds() == [1, 2]
    for s in summaries:
        assert s["kept"] >= cfg.train.min_pairs
        assert 0.0 <= s["win_rate"] <= 1.0
        assert s["completions"] == cfg.prompts.per_round * cfg.sample.num_samples


def test_round_2_policy_and_reference_are_round_1_checkpoint(tiny_run, tiny_model):
    cfg, run, _ = tiny_run
    ckpt1 = run.checkpoint(1)
    assert run.manifest(2, "sample")["policy"] == str(ckpt1)
    assert run.manifest(2, "train")["reference"] == str(ckpt1)
    assert run.manifest(1, "train")["reference"] == str(tiny_model.resolve())
    # The weights TRL used as round 2's reference are exactly round 1's merged checkpoint.
    from transformers import AutoModelForCausalLM

    round1 = AutoModelForCausalLM.from_pretrained(ckpt1, dtype=torch.float32)
    assert run.manifest(2, "train")["metrics"]["reference_digest"] == weights_digest(round1)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    assert run.manifest(1, "train")["metrics"]["reference_digest"] == weights_digest(base)


def test_training_changed_the_adapted_weights_and_only_those(tiny_run, tiny_model):
    cfg, run, _ = tiny_run
    targets = cfg.train.lora["target_modules"]
    for k, before_path in ((1, tiny_model), (2, run.checkpoint(1))):
        before, after = state_dict(before_path), state_dict(run.checkpoint(k))
        assert set(before) == set(after)
        changed = {name for name in before if not torch.equal(before[name], after[name])}
        adapted = {name for name in before if any(f"{t}.weight" in name for t in targets)}
        assert changed == adapted, f"round {k}: changed {sorted(changed - adapted)} / unchanged {sorted(adapted - changed)}"
        assert run.manifest(k, "train")["metrics"]["lora_b_norm"] > 0
        shared = run.manifest(k, "train")["metrics"]["shared_prompt"]  # each pair's prompt went through the model once
        assert 0 < shared["positions"] < shared["unshared_positions"], shared


def test_dpo_starts_at_ln2_because_policy_equals_reference(tiny_run):
    _, run, _ = tiny_run
    for k in (1, 2):
        metrics = run.manifest(k, "train")["metrics"]
        assert metrics["steps"] >= 1
        assert math.isclose(metrics["initial_loss"], math.log(2), abs_tol=1e-3)


def test_parquet_outputs_have_expected_columns_and_counts(tiny_run):
    cfg, run, _ = tiny_run
    n_prompts, k_samples = cfg.prompts.per_round, cfg.sample.num_samples
    pairs_per_prompt = k_samples * (k_samples - 1) // 2
    for k in (1, 2):
        samples = pd.read_parquet(run.stage_dir(k, "sample") / "samples.parquet")
        assert list(samples.columns) == sample_stage.COLUMNS
        assert len(samples) == n_prompts * k_samples
        assert all(sorted(idx) == list(range(k_samples)) for _, idx in samples.groupby("prompt_id")["sample_idx"])
        assert (samples["n_tokens"] <= cfg.sample.max_new_tokens).all()
        assert samples.loc[samples["truncated"], "n_tokens"].eq(cfg.sample.max_new_tokens).all()

        judgments = pd.read_parquet(run.stage_dir(k, "judge") / "judgments.parquet")
        assert list(judgments.columns) == JUDGMENT_COLUMNS
        assert len(judgments) == n_prompts * pairs_per_prompt
        judged = judgments[judgments["verdict"] != "not_judged"]
        assert set(judged["source"]) <= {"llm", "verifier"}
        by_llm, by_verifier = judged[judged["source"] == "llm"], judged[judged["source"] == "verifier"]
        assert by_llm["p_a_order1"].between(0, 1).all() and by_llm["p_a_order2"].between(0, 1).all()
        assert (by_llm["p_first"] - (by_llm["p_a_order1"] + 1 - by_llm["p_a_order2"]) / 2).abs().max() < 1e-9
        # the bundled arithmetic prompts carry answers: where the verifier's scores differ, the higher one won
        assert by_verifier["verify_1"].notna().all() and (by_verifier["verify_1"] != by_verifier["verify_2"]).all()
        assert ((by_verifier["verdict"] == "first") == (by_verifier["verify_1"] > by_verifier["verify_2"])).all()
        assert (judged.loc[judged["reference"].isna(), "source"] == "llm").all()

        pairs = pd.read_parquet(run.stage_dir(k, "filter") / "pairs.parquet")
        assert {"kept", "drop_reason", "chosen", "rejected"} <= set(pairs.columns)
        kept = pairs[pairs["kept"]]
        assert len(kept) == run.manifest(k, "filter")["metrics"]["kept"]
        assert kept["verdict"].isin(["first", "second"]).all()
        assert (kept["chosen"] != kept["rejected"]).all()

        evals = pd.read_parquet(run.stage_dir(k, "evaluate") / "eval.parquet")
        assert len(evals) == cfg.prompts.eval_size
        assert {"response_new", "response_other", "outcome"} <= set(evals.columns)
        m = run.manifest(k, "evaluate")["metrics"]
        assert m["wins"] + m["ties"] + m["losses"] == cfg.prompts.eval_size
        assert evals["outcome"].value_counts().get("win", 0) == m["wins"]


def test_prefect_server_recorded_the_runs_and_artifacts(tiny_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterName

    cfg, _, summaries = tiny_run

    async def query():
        async with get_client() as client:
            runs = await client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=["tiny", "tiny-round-1", "tiny-round-2"])))
            arts = await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["selfplay-round-summary"])),
                                               flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=["tiny-round-1", "tiny-round-2"])))
            return runs, arts

    runs, arts = asyncio.run(query())
    assert sorted(r.name for r in runs if r.state.is_completed()) == ["tiny", "tiny-round-1", "tiny-round-2"]
    assert len(arts) == 2 and all(a.type == "table" for a in arts)
    published = [a.data if isinstance(a.data, list) else json.loads(a.data) for a in arts]
    assert sorted((t[0]["round"], t[0]["kept"]) for t in published) == [(s["round"], s["kept"]) for s in summaries]


def test_rerun_resumes_without_recomputing(tiny_run):
    from flows.self_play import self_play

    cfg, run, summaries = tiny_run
    before = {(k, s): run.manifest(k, s)["finished_at"] for k in (1, 2) for s in ("sample", "judge", "filter", "train", "evaluate")}
    again = self_play(recipe=str(run.root.parent / "tiny.yaml"))
    assert [s["kept"] for s in again] == [s["kept"] for s in summaries]
    after = {(k, s): run.manifest(k, s)["finished_at"] for k in (1, 2) for s in ("sample", "judge", "filter", "train", "evaluate")}
    assert after == before


def test_evaluate_stage_judges_new_against_previous(tiny_run):
    cfg, run, _ = tiny_run
    m = run.manifest(2, "evaluate")
    assert m["checkpoint"] == str(run.checkpoint(2)) and m["previous"] == str(run.checkpoint(1))
    evals = pd.read_parquet(run.stage_dir(2, "evaluate") / "eval.parquet")
    assert evals["outcome"].tolist() == outcomes(evals["verdict"].tolist())
    assert m["metrics"]["n"] + m["metrics"]["errors"] == cfg.prompts.eval_size


def test_held_out_accuracy_is_measured_on_every_checkable_prompt_and_reused(tiny_run):
    cfg, run, summaries = tiny_run
    from selfplay.inputs.prompts import accuracy_prompts, prompt_set

    checkable = accuracy_prompts(cfg.prompts, prompt_set(cfg.prompts, "eval"))
    assert len(checkable) == 21  # the bundled eval set's 16 arithmetic items and 5 coding tasks with tests
    for k in (1, 2):
        table = pd.read_parquet(run.stage_dir(k, "evaluate") / "accuracy.parquet")
        assert table["prompt_id"].tolist() == [p["id"] for p in checkable]
        m = run.manifest(k, "evaluate")["metrics"]
        assert m["accuracy"]["n"] == len(checkable) and m["accuracy"]["correct"] == int(table["correct_new"].sum())
        assert m["accuracy"]["ci_low"] <= m["accuracy"]["accuracy"] <= m["accuracy"]["ci_high"]
        assert summaries[k - 1]["accuracy"] == m["accuracy"]["accuracy"]
    # round 2's current checkpoint is round 1's: its greedy answers are read back, not generated again
    one = pd.read_parquet(run.stage_dir(1, "evaluate") / "accuracy_generations.parquet")
    two = pd.read_parquet(run.stage_dir(2, "evaluate") / "accuracy_generations_previous.parquet")
    assert one["response"].tolist() == two["response"].tolist()
    assert run.manifest(2, "evaluate")["metrics"]["accuracy_previous"] == run.manifest(1, "evaluate")["metrics"]["accuracy"]
    from selfplay.reporting.report import format_table

    table = format_table(summaries)
    assert table.splitlines()[2].split()[0] == "0" and "held-out acc" in table  # the starting model's row first


def test_show_prints_the_rounds_and_what_produced_them(tiny_run, capsys):
    from selfplay.cli import main

    cfg, run, summaries = tiny_run
    recorded = json.loads((run.root / "run.json").read_text())["provenance"]
    assert recorded["libraries"]["trl"] and recorded["python"]
    assert main(["show", cfg.name, "--output-dir", str(cfg.output_dir)]) == 0
    out = capsys.readouterr().out
    assert f"run {cfg.name}: 2 round(s) complete" in out
    started = next(line for line in out.splitlines() if line.startswith("started under: "))
    assert f"trl {recorded['libraries']['trl']}" in started and f"Python {recorded['python']}" in started
    assert recorded["device"] in started
    for k in (1, 2):
        assert f"round {k}: " in out
