"""Stage tier without Prefect's engine: each stage's `.fn` called directly, in order, on a tiny model built here.

No flow run, no server: progress and round artifacts are no-ops outside a run (creating one there would start a
temporary Prefect server), which the test checks by failing any artifact call. What each stage wrote is checked,
and that a stage whose manifest exists returns it without running again.
"""

from __future__ import annotations

import logging

import pandas as pd
import pytest

from selfplay.config.run import build_config
from selfplay.evaluation.outcomes import EVAL_COLUMNS
from selfplay.pairs.build import CALL_COLUMNS, COLUMNS
from selfplay.runtime.rundir import RunDir
from tasks.evaluate import evaluate
from tasks.filter import filter_pairs
from tasks.judge import judge
from tasks.publish import publish
from tasks.sample import COLUMNS as SAMPLE_COLUMNS
from tasks.sample import sample
from tasks.train import train
from tests.conftest import tiny_config

pytestmark = pytest.mark.stage

ARTIFACTS = ("create_progress_artifact", "create_table_artifact", "create_markdown_artifact", "create_link_artifact")


def refuse_artifacts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any artifact call outside a run would reach for a Prefect API: fail loudly instead."""
    import prefect.artifacts

    def refuse(*args, **kwargs):
        raise AssertionError("an artifact was created outside a flow run")

    for name in ARTIFACTS:
        monkeypatch.setattr(prefect.artifacts, name, refuse)


@pytest.fixture(autouse=True)
def no_artifacts(monkeypatch):
    refuse_artifacts(monkeypatch)


@pytest.fixture(scope="module")
def stages(tiny_model, tmp_path_factory):
    """One round, stage by stage through `.fn`; returns (cfg, run dir, the manifest or summary each returned)."""
    cfg = build_config(tiny_config(tiny_model, tmp_path_factory.mktemp("runs"), name="stages", rounds=1))
    policy = str(tiny_model.resolve())
    with pytest.MonkeyPatch.context() as monkeypatch:
        refuse_artifacts(monkeypatch)
        out = {
            "sample": sample.fn(cfg, 1, policy),
            "judge": judge.fn(cfg, 1, policy),
            "filter": filter_pairs.fn(cfg, 1),
            "train": train.fn(cfg, 1, policy),
            "evaluate": evaluate.fn(cfg, 1, policy, policy),
            "publish": publish.fn(cfg, 1),
        }
    return cfg, RunDir(cfg.run_dir), out


def test_each_stage_returns_the_manifest_it_published(stages):
    cfg, run, out = stages
    for stage in ("sample", "judge", "filter", "train", "evaluate"):
        assert out[stage] == run.manifest(1, stage)
        assert out[stage]["stage"] == stage and out[stage]["round"] == 1


def test_sample_and_judge_tables(stages):
    cfg, run, out = stages
    samples = pd.read_parquet(run.stage_dir(1, "sample") / "samples.parquet")
    assert list(samples.columns) == SAMPLE_COLUMNS
    assert len(samples) == cfg.prompts.per_round * cfg.sample.num_samples == out["sample"]["metrics"]["completions"]
    judgments = pd.read_parquet(run.stage_dir(1, "judge") / "judgments.parquet")
    calls = pd.read_parquet(run.stage_dir(1, "judge") / "calls.parquet")
    assert list(judgments.columns) == COLUMNS and list(calls.columns) == CALL_COLUMNS
    judged = judgments[judgments["verdict"] != "not_judged"]
    assert len(calls) == 2 * int((judged["source"] == "llm").sum()) == out["judge"]["metrics"]["calls"]
    assert judged["p_first"].between(0, 1).all()
    scores = pd.read_parquet(run.stage_dir(1, "judge") / "scores.parquet")
    assert len(scores) == len(samples) and out["judge"]["metrics"]["verifier_calls"] == int(scores["verifier"].notna().sum())
    assert (scores["verifier"].notna() == samples["reference"].notna()).all()  # every sample with a reference was scored


def test_filter_train_evaluate_outputs(stages):
    cfg, run, out = stages
    pairs = pd.read_parquet(run.stage_dir(1, "filter") / "pairs.parquet")
    assert int(pairs["kept"].sum()) == out["filter"]["metrics"]["kept"] >= cfg.train.min_pairs
    metrics = out["train"]["metrics"]
    assert metrics["steps"] > 0 and metrics["lora_b_norm"] > 0 and "ln2" not in metrics
    assert (run.checkpoint(1) / "model.safetensors").is_file()
    evals = pd.read_parquet(run.stage_dir(1, "evaluate") / "eval.parquet")
    assert list(evals.columns) == EVAL_COLUMNS and len(evals) == cfg.prompts.eval_size
    assert out["evaluate"]["metrics"]["n"] + out["evaluate"]["metrics"]["errors"] == len(evals)


def test_publish_concludes_the_round(stages):
    cfg, run, out = stages
    summary = out["publish"]
    assert run.round_done(1) and run.round_manifest(1)["gate"] == summary["gate"] in ("accepted", "rejected")
    assert summary["accepted"] == (summary["gate"] == "accepted") and summary["gate_reason"].startswith(summary["gate"])
    assert summary["kept"] == out["filter"]["metrics"]["kept"] and isinstance(summary["pathology_warnings"], list)
    assert publish.fn(cfg, 1) == run.round_manifest(1)  # a concluded round is not concluded again


def test_a_complete_stage_is_skipped(stages, caplog):
    cfg, run, out = stages
    samples = run.stage_dir(1, "sample") / "samples.parquet"
    before = samples.stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="selfplay.runtime.stages"):
        again = sample.fn(cfg, 1, "/no/such/policy")  # would fail if it ran
    assert again == out["sample"] and samples.stat().st_mtime_ns == before
    assert "round 1: sample already complete" in caplog.text
