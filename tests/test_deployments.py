"""Operating it from Prefect: `selfplay setup` deploys prefect.yaml to a real server, a real process worker runs
the runs, the nightly deployment has scheduled runs at its cron's times, lineages continue, and a retried flow
run resumes from its completed stages.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from zoneinfo import ZoneInfo

import pandas as pd
import pytest
import yaml

from selfplay.runtime.rundir import RunDir, read_json
from tests.conftest import REPO, stop, tiny_config

pytestmark = pytest.mark.stage

BIN = Path(sys.executable).parent
TZ = "Europe/Paris"


def client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


@pytest.fixture(scope="module")
def deployed(prefect_server, tmp_path_factory):
    """`selfplay setup` against the test server, then a process worker polling the pool."""
    env = {**os.environ, "PREFECT_API_URL": prefect_server}
    setup = subprocess.run([str(BIN / "selfplay"), "setup", "--timezone", TZ], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert setup.returncode == 0, setup.stdout[-2000:] + setup.stderr[-2000:]
    log = open(tmp_path_factory.mktemp("worker") / "worker.log", "w")
    worker = subprocess.Popen(
        [str(BIN / "prefect"), "worker", "start", "--pool", "selfplay", "--type", "process"],
        env={**env, "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "1", "PYTHONUNBUFFERED": "1"},
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    yield prefect_server
    stop(worker)
    log.close()


def tiny_recipe(tiny_model, tmp_path, **over) -> tuple[Path, dict]:
    cfg = tiny_config(tiny_model, tmp_path / "runs", **over)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, cfg


def trigger(parameters: dict):
    from prefect.deployments import run_deployment

    return run_deployment("self-play/manual", parameters=parameters, timeout=0)


def wait_final(flow_run_id, timeout: float = 600):
    deadline = time.time() + timeout
    with client() as c:
        while time.time() < deadline:
            fr = c.read_flow_run(flow_run_id)
            if fr.state and fr.state.is_final():
                return fr
            time.sleep(2)
    raise TimeoutError(f"flow run {flow_run_id} did not finish in {timeout} s")


def subflow(parent_id, name: str):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    with client() as c:
        runs = c.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])))
    return max(runs, key=lambda r: r.created)


def test_manual_run_with_custom_parameters_through_a_worker(deployed, tiny_model, tmp_path):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    recipe, cfg = tiny_recipe(tiny_model, tmp_path, name="from-the-ui", rounds=1)
    params = {"recipe": str(recipe), "rounds": 1, "temperature": 0.7, "beta": 0.25, "learning_rate": 0.02,
              "num_samples": 3, "overrides": ["judge.margin=0.0", "prompts.per_round=5"]}
    fr = wait_final(trigger(params).id)
    assert fr.state.is_completed(), fr.state.message
    assert {k: fr.parameters[k] for k in params} == params  # the parameters arrived as sent

    run = RunDir(Path(cfg["output_dir"]) / "from-the-ui")
    saved = read_json(run.root / "run.json")["config"]
    assert saved["sample"]["temperature"] == 0.7 and saved["train"]["dpo"]["beta"] == 0.25
    assert saved["train"]["dpo"]["learning_rate"] == 0.02 and saved["prompts"]["per_round"] == 5
    assert run.completed_rounds() == [1]

    round_run = subflow(fr.id, "from-the-ui-round-1")
    with client() as c:
        arts = c.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[round_run.id])))
    by_key = {a.key: a for a in arts if a.key}
    assert set(by_key) >= {"selfplay-round-summary", "selfplay-judged-pairs", "selfplay-round-report", "selfplay-checkpoint"}
    data = lambda a: a.data if isinstance(a.data, (list, dict)) else json.loads(a.data)  # noqa: E731
    summary = data(by_key["selfplay-round-summary"])[0]
    assert summary["kept"] == run.round_manifest(1)["kept"] and summary["win_rate"] == run.round_manifest(1)["win_rate"]
    pairs = pd.read_parquet(run.stage_dir(1, "filter") / "pairs.parquet")
    rows = data(by_key["selfplay-judged-pairs"])
    assert len(rows) == min(100, len(pairs)) and sum(r["kept"] for r in rows) == int(pairs["kept"].sum())
    assert by_key["selfplay-checkpoint"].data.endswith(f"({run.checkpoint(1).resolve().as_uri()})")
    report = by_key["selfplay-round-report"].data
    assert "data:image/png;base64," in report and f"**{summary['kept']}**" in report
    assert any(a.type == "progress" for a in arts)


def test_nightly_deployment_has_runs_scheduled_at_the_cron_times(deployed):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName, FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType

    with client() as c:
        dep = c.read_deployment_by_name("self-play/nightly")
        assert [(s.schedule.cron, s.schedule.timezone) for s in dep.schedules] == [("0 2 * * *", TZ)]
        assert dep.parameters == {"lineage": "nightly", "rounds": 1}
        deadline, scheduled = time.time() + 60, []
        while time.time() < deadline and not scheduled:
            scheduled = c.read_flow_runs(
                deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["nightly"])),
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))),
            )
            time.sleep(2)
    assert scheduled, "the scheduler created no runs for self-play/nightly"
    for fr in scheduled:
        local = fr.expected_start_time.astimezone(ZoneInfo(TZ))
        assert (local.hour, local.minute) == (2, 0), local


def test_two_nightly_runs_continue_one_lineage(prefect_server, tiny_model, tmp_path):
    from flows.self_play import self_play

    recipe, cfg = tiny_recipe(tiny_model, tmp_path, rounds=1)
    first = self_play(recipe=str(recipe), lineage="night", rounds=1)
    second = self_play(recipe=str(recipe), lineage="night", rounds=1)
    assert [s["round"] for s in first] == [1]
    assert [s["round"] for s in second] == [1, 2]  # the second run continues the round numbers
    run = RunDir(Path(cfg["output_dir"]) / "night")
    assert run.manifest(2, "sample")["policy"] == str(run.checkpoint(1))  # and starts from the first's checkpoint
    assert read_json(run.root / "run.json")["config"]["rounds"] == 2


def test_a_crashed_lineage_run_is_finished_first(prefect_server, tiny_model, tmp_path):
    from selfplay.config.run import build_config
    from selfplay.orchestration.lineage import continue_lineage

    recipe, cfg = tiny_recipe(tiny_model, tmp_path, rounds=1)
    night = RunDir(Path(cfg["output_dir"]) / "night")
    night.root.mkdir(parents=True)
    # Last night aimed at 3 rounds and crashed after completing only round 1.
    (night.root / "run.json").write_text(json.dumps({"config": {**build_config(cfg).model_dump(mode="json"), "name": "night", "rounds": 3}}))
    tonight = continue_lineage(build_config(cfg), "night", 2)
    assert tonight.name == "night" and tonight.rounds == 5  # rounds 2-3 left from last night, then 2 more


def test_retrying_a_failed_run_resumes_from_its_completed_stages(deployed, tiny_model, tmp_path):
    recipe, cfg = tiny_recipe(tiny_model, tmp_path, name="retry-me", rounds=1)
    run = RunDir(Path(cfg["output_dir"]) / "retry-me")
    # A file where the train stage's output goes: the run fails in its training stage.
    run.round_dir(1).mkdir(parents=True)
    blocker = run.stage_dir(1, "train")
    blocker.write_text("in the way")

    fr = wait_final(trigger({"recipe": str(recipe)}).id)
    assert fr.state.is_failed()
    assert run.is_done(1, "sample") and run.is_done(1, "judge") and not run.is_done(1, "train")
    before = {stage: (run.manifest(1, stage)["finished_at"], (run.stage_dir(1, stage)).stat().st_ino) for stage in ("sample", "judge", "filter")}

    blocker.unlink()
    env = {**os.environ, "PREFECT_API_URL": deployed}
    retry = subprocess.run([str(BIN / "prefect"), "flow-run", "retry", str(fr.id)], env=env, capture_output=True, text=True, timeout=120)
    assert retry.returncode == 0, retry.stdout + retry.stderr
    fr = wait_final(fr.id)
    assert fr.state.is_completed(), fr.state.message
    after = {stage: (run.manifest(1, stage)["finished_at"], (run.stage_dir(1, stage)).stat().st_ino) for stage in ("sample", "judge", "filter")}
    assert after == before  # sampling, judging and filtering were not redone
    assert run.round_done(1) and run.is_done(1, "train")


def test_retrying_a_lineage_run_does_not_add_rounds(tiny_model, tmp_path):
    from selfplay.config.run import build_config
    from selfplay.orchestration.lineage import continue_lineage

    cfg = build_config(tiny_config(tiny_model, tmp_path / "runs", rounds=1))
    tonight = continue_lineage(cfg, "night", 1, invocation="flow-run-a")
    run = RunDir(Path(cfg.output_dir) / "night")
    # open_run records the target; the run then fails, and the UI retries the same flow run.
    (run.root / "run.json").write_text(json.dumps({"config": tonight.model_dump(mode="json")}))
    retried = continue_lineage(cfg, "night", 1, invocation="flow-run-a")
    tomorrow = continue_lineage(cfg, "night", 1, invocation="flow-run-b")
    assert (tonight.rounds, retried.rounds, tomorrow.rounds) == (1, 1, 2)
