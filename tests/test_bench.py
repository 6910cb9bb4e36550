"""The improvement benchmark's tiny version: the pipeline it measures runs end to end on the bundled model with the
verifier as the only judge. It asserts what the run produced, never an accuracy or a time."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from selfplay.runtime.rundir import RunDir
from tests.conftest import REPO

pytestmark = pytest.mark.e2e


@pytest.mark.timeout(1200)
def test_improvement_benchmark_tiny_runs_the_verifier_judged_pipeline(prefect_server, tmp_path):
    env = {**os.environ, "PREFECT_API_URL": prefect_server}
    proc = subprocess.run([sys.executable, "-m", "tools.bench", "improvement", "--tiny", "--output-dir", str(tmp_path),
                           "--json", str(tmp_path / "rows.json")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1100)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    run = RunDir(tmp_path / "bench-improvement")
    assert run.completed_rounds() == [1]
    lines = proc.stdout.splitlines()
    table = lines[next(i for i, line in enumerate(lines) if line.lstrip().startswith("round   held-out")):]
    assert [line.split()[0] for line in table[1:3]] == ["0", "1"]  # the starting model, then round 1
    assert "round 1 / round 0 held-out accuracy" in proc.stdout

    judge = run.manifest(1, "judge")["metrics"]
    assert judge["verifier_calls"] == 12 * 4  # K calls a prompt: each sample scored once
    assert judge["sources"]["llm"] == 0 and judge["calls"] == 0  # fallback none: no LLM call at all
    assert pd.read_parquet(run.stage_dir(1, "judge") / "calls.parquet").empty
    scores = pd.read_parquet(run.stage_dir(1, "judge") / "scores.parquet")
    assert scores["verifier"].eq("number").all() and scores["verify_score"].between(0, 1).all()

    accuracy = pd.read_parquet(run.stage_dir(1, "evaluate") / "accuracy.parquet")
    ev = run.manifest(1, "evaluate")["metrics"]
    assert len(accuracy) == 8 and ev["accuracy"]["correct"] == int(accuracy["correct_new"].sum())
    assert ev["accuracy_previous"]["correct"] == int(accuracy["correct_previous"].sum())
    row = run.round_manifest(1)
    assert row["accuracy"] == ev["accuracy"]["accuracy"] and row["accuracy_previous"] == ev["accuracy_previous"]["accuracy"]


@pytest.mark.timeout(1200)
def test_improvement_benchmark_with_the_checking_judge_in_the_loop_prints_its_audit(prefect_server, tmp_path):
    """`--judge checking`: the checking judge (real, over HTTP) decides every pair; the 'auto' verifier audits it and
    decides none. The audit column and each round's audit line come from the run's own judge metrics."""
    env = {**os.environ, "PREFECT_API_URL": prefect_server}
    proc = subprocess.run([sys.executable, "-m", "tools.bench", "improvement", "--tiny", "--judge", "checking", "--output-dir", str(tmp_path),
                           "--json", str(tmp_path / "rows.json")], cwd=REPO, env=env, capture_output=True, text=True, timeout=1100)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    judge = RunDir(tmp_path / "bench-improvement").manifest(1, "judge")["metrics"]
    assert judge["sources"]["verifier"] == 0 and judge["sources"]["llm"] > 0 and judge["verifier_calls"] == 0
    audit = judge["audit"]
    assert audit["truth"] == "auto verifier (audit only)" and audit["answered"] == audit["comparisons"] > 0
    assert audit["calls"] == 2 * audit["comparisons"] and audit["seconds"] > 0
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert rows[1]["audit"]["agreement"] == audit["agreement"]
    lo, hi = audit["ci"]
    assert f"{audit['agreement']:.2f} [{lo:.2f}, {hi:.2f}]" in proc.stdout.split("improvement benchmark (")[1]
    assert f"round 1: {judge['audit_line']}" in proc.stdout


@pytest.mark.timeout(1200)
def test_speed_benchmark_tiny_prints_its_figures_beside_the_plain_loop(prefect_server, tmp_path):
    """`python -m tools.bench speed --tiny`: one round judged over HTTP by the checking judge, then the plain
    loop on the same prompts; every figure the benchmark promises is printed and agrees with the run's files."""
    import json

    env = {**os.environ, "PREFECT_API_URL": prefect_server}
    proc = subprocess.run([sys.executable, "-m", "tools.bench", "speed", "--tiny", "--output-dir", str(tmp_path), "--name", "speed",
                           "--set", "judge.pairing=tournament", "--json", str(tmp_path / "speed.json")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1100)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    run = RunDir(tmp_path / "speed")
    figures = json.loads((tmp_path / "speed.json").read_text())
    ours, plain = figures["selfplay"], figures["plain"]
    judge = run.manifest(1, "judge")["metrics"]
    assert judge["calls"] == ours["judge_calls"] > 0 and judge["sources"]["verifier"] == 0  # every pair over HTTP
    calls = pd.read_parquet(run.stage_dir(1, "judge") / "calls.parquet")
    assert calls["error"].isna().all() and (calls["mode"] == "logprobs").all()
    assert ours["kept"] == run.round_manifest(1)["kept"] > 0 and plain["kept"] > 0 and plain["train_steps"] >= 1
    assert set(ours["stages"]) >= {"sample", "judge", "filter", "train", "evaluate"}
    # held-out accuracy is checked although the verifier judges nothing (kind none)
    accuracy = pd.read_parquet(run.stage_dir(1, "evaluate") / "accuracy.parquet")
    assert len(accuracy) == 4 and accuracy["score_new"].notna().all() and accuracy["score_previous"].notna().all()
    # greedy (evaluate.temperature 0) on the same 4 prompts: each checkpoint's win-rate answers are its accuracy answers
    evaluate = run.stage_dir(1, "evaluate")
    for suffix in ("", "_previous"):
        wins, right = (pd.read_parquet(evaluate / f"{kind}generations{suffix}.parquet") for kind in ("", "accuracy_"))
        assert wins[["prompt_id", "response"]].equals(right[["prompt_id", "response"]]), suffix
    assert 0 <= ours["overhead_s"] < ours["wall_s"]
    spans = dict(ours["overhead_spans"])  # where the overhead went: before, between and after the stages
    assert list(spans)[0] == "start -> sample" and list(spans)[-1].endswith("-> end") and "sample -> judge" in spans
    assert abs(sum(spans.values()) - ours["overhead_s"]) < 0.5
    knockout = ours["knockout"]  # the knockout replayed on this tournament's verdicts
    assert knockout["llm_calls_all_pairs"] == len(calls) and 0 < knockout["llm_calls_knockout"] <= len(calls)
    for text in ("seconds per kept pair (sample to trained checkpoint):", "selfplay / plain loop, per kept pair:",
                 "calls/s", "tokens/s", "orchestration overhead:", "peak RSS:", "knockout replayed on these",
                 "before both clocks, importing torch, transformers, peft and trl took"):
        assert text in proc.stdout


@pytest.mark.timeout(1200)
def test_speed_benchmark_tiny_with_a_knockout_asks_fewer_calls_and_trains_best_against_worst(prefect_server, tmp_path):
    """The same round with `judge.pairing: knockout`: the judge stage asks its phases over HTTP, the pairs it never
    needed are `not_matched`, and each prompt trains at most one pair."""
    import json

    env = {**os.environ, "PREFECT_API_URL": prefect_server}
    proc = subprocess.run([sys.executable, "-m", "tools.bench", "speed", "--tiny", "--no-plain", "--output-dir", str(tmp_path),
                           "--name", "ko", "--set", "judge.pairing=knockout", "--set", "sample.num_samples=6",
                           "--json", str(tmp_path / "ko.json")], cwd=REPO, env=env, capture_output=True, text=True, timeout=1100)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    run = RunDir(tmp_path / "ko")
    judgments = pd.read_parquet(run.stage_dir(1, "judge") / "judgments.parquet")
    calls = pd.read_parquet(run.stage_dir(1, "judge") / "calls.parquet")
    assert json.loads((tmp_path / "ko.json").read_text())["selfplay"]["judge_calls"] == len(calls) > 0
    per_prompt = calls.groupby("prompt_id").size()
    assert per_prompt.max() <= 2 * (3 * 6 // 2 - 1) < 2 * 15  # at most 8 pairs of 15, in both orders
    asked = judgments[judgments["source"] == "llm"]
    assert len(calls) == 2 * len(asked)
    assert set(judgments["screened"].dropna()) <= {"not_matched", "empty", "too_similar"} and (judgments["screened"] == "not_matched").any()
    pairs = pd.read_parquet(run.stage_dir(1, "filter") / "pairs.parquet")
    assert pairs.groupby("prompt_id")["kept"].sum().max() == 1 and pairs["kept"].sum() == run.round_manifest(1)["kept"]
    assert "a knockout over 8 prompts: at most 64 of 120 candidate pairs asked" in proc.stdout + proc.stderr  # 8 x (3*6//2 - 1) of 8 x 15


@pytest.mark.unit
def test_knockout_benchmark_prints_calls_and_how_often_each_pairing_finds_the_true_best_and_worst(tmp_path):
    """`python -m tools.bench knockout`: simulated judges of known strengths, then a recorded table replayed."""
    import json

    from tools.bench import main, simulated_judgments

    table, _ = simulated_judgments(10, 8, 0.5, seed=1)
    table.to_parquet(tmp_path / "judgments.parquet", index=False)
    assert main(["knockout", "--prompts", "40", "--noise", "0.05", "2.0", "--json", str(tmp_path / "ko.json"),
                 str(tmp_path / "judgments.parquet")]) == 0
    figures = json.loads((tmp_path / "ko.json").read_text())
    sharp, noisy, replayed = figures["noise=0.05"], figures["noise=2.0"], figures[str(tmp_path / "judgments.parquet")]
    for f in (sharp, noisy):
        assert f["llm_calls_all_pairs"] == 40 * 56 and f["llm_calls_knockout"] <= 40 * 22
    assert sharp["knockout_true_best"] >= 0.95 and sharp["knockout_true_worst"] >= 0.95 and sharp["same_pair"] >= 0.8
    assert noisy["knockout_true_best"] < sharp["knockout_true_best"]  # a noisier judge is harder to follow
    assert replayed["llm_calls_all_pairs"] == 10 * 56 and "tournament_true_best" not in replayed


@pytest.mark.timeout(1500)
def test_serving_benchmark_tiny_runs_the_round_three_ways_and_the_kept_server_starts_once(prefect_server, tmp_path):
    """The same round by transformers, by vLLM with a server per stage and by one kept vLLM (the real CPU build)."""
    from tests.vllm_real import require_vllm

    require_vllm()
    out_json = tmp_path / "serving.json"
    proc = subprocess.run([sys.executable, "-m", "tools.bench", "serving", "--rounds", "1", "--per-round", "6", "--samples", "3",
                           "--max-new-tokens", "16", "--eval-size", "4", "--accuracy-size", "6", "--output-dir", str(tmp_path / "runs"),
                           "--set", "train.min_pairs=1", "--json", str(out_json)], cwd=REPO, env={**os.environ, "PREFECT_API_URL": prefect_server},
                          capture_output=True, text=True, timeout=1400)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    rows = json.loads(out_json.read_text())
    starts = {label: row["starts"] for label, row in rows.items()}
    # per stage: one to sample, one for the evaluation (the base with the new adapter); kept: one for all
    assert starts == {"transformers (in-process)": 0, "vLLM, a server per stage": 2, "vLLM, one kept server": 1}
    for row in rows.values():
        assert row["rounds"] == 1 and row["kept"] > 0 and all(row["stages"][st] > 0 for st in ("sample", "judge", "train", "evaluate"))
    printed = proc.stdout
    assert "vLLM, one kept server" in printed and "kept server: 1 start(s) for 1 round(s), against 2" in printed
