"""Fast tier: the run directory (selfplay/runtime/rundir.py): atomic stage publishing, the run lock, resume checks.

All files live under tmp_path. The lock test starts one tiny subprocess (plain Python, no model) to play the second
process, since the lock is meant to refuse *another* process.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from selfplay.config.run import load_config
from selfplay.runtime.rundir import MANIFEST, RunDir, RunDirError, locked, open_run, read_json, sha256_file, write_json_atomic

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]


def leftovers(root) -> list[str]:
    return sorted(p.name for p in root.rglob("*") if ".tmp-" in p.name)


def tree(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- stage_output

def test_stage_output_publishes_files_and_a_manifest_last(tmp_path):
    run = RunDir(tmp_path / "run")
    with run.stage_output(1, "sample", {"policy": "p0"}) as (out, manifest):
        assert out.name.startswith("sample.tmp-") and out.is_dir()
        pd.DataFrame({"x": [1, 2, 3]}).to_parquet(out / "samples.parquet")
        (out / "stats.json").write_text(json.dumps({"a": 1}))
        (out / "notes.txt").write_text("not hashed")
        (out / "sub").mkdir()
        (out / "sub" / "inner.json").write_text("{}")
        manifest["metrics"] = {"completions": 3}
        assert not (out / MANIFEST).exists()
        assert not run.is_done(1, "sample") and not run.stage_dir(1, "sample").exists()
    final = run.stage_dir(1, "sample")
    assert run.is_done(1, "sample")
    assert sorted(p.name for p in final.iterdir()) == sorted([MANIFEST, "metrics.json", "notes.txt", "samples.parquet", "stats.json", "sub"])
    assert json.loads((final / "metrics.json").read_text()) == {"completions": 3}
    m = run.manifest(1, "sample")
    assert (m["stage"], m["round"], m["policy"], m["metrics"]) == ("sample", 1, "p0", {"completions": 3})
    assert m["finished_at"] >= m["started_at"]
    assert set(m["files"]) == {"metrics.json", "samples.parquet", "stats.json", "sub/inner.json"}
    for name, digest in m["files"].items():
        assert digest == hashlib.sha256((final / name).read_bytes()).hexdigest() == sha256_file(final / name)
    assert leftovers(tmp_path) == []


def test_an_error_inside_the_block_publishes_nothing(tmp_path):
    run = RunDir(tmp_path / "run")
    with pytest.raises(KeyError, match="boom"):
        with run.stage_output(2, "judge") as (out, manifest):
            (out / "judgments.parquet").write_bytes(b"partial")
            raise KeyError("boom")
    assert not run.is_done(2, "judge")
    assert not run.stage_dir(2, "judge").exists()
    assert leftovers(tmp_path) == []
    with run.stage_output(2, "judge") as (out, _):  # and the stage can be attempted again
        (out / "judgments.parquet").write_bytes(b"complete")
    assert (run.stage_dir(2, "judge") / "judgments.parquet").read_bytes() == b"complete"


def test_a_completed_stage_refuses_to_be_overwritten(tmp_path):
    run = RunDir(tmp_path / "run")
    with run.stage_output(1, "filter") as (out, manifest):
        (out / "pairs.json").write_text('{"kept": 3}')
    before = tree(run.stage_dir(1, "filter"))
    with pytest.raises(RunDirError, match="complete; refusing to overwrite"):
        with run.stage_output(1, "filter") as (out, manifest):
            (out / "pairs.json").write_text('{"kept": 0}')
    assert tree(run.stage_dir(1, "filter")) == before
    assert leftovers(tmp_path) == []


def test_a_stale_tmp_dir_is_cleared_by_the_next_attempt(tmp_path):
    run = RunDir(tmp_path / "run")
    stale = run.round_dir(1) / "train.tmp-999999"
    stale.mkdir(parents=True)
    (stale / "half-written.safetensors").write_bytes(b"x" * 100)
    other = run.round_dir(1) / "sample.tmp-999999"  # another stage's leftovers are not this attempt's business
    other.mkdir()
    with run.stage_output(1, "train") as (out, _):
        assert not stale.exists()
        (out / "metrics.json").write_text("{}")
    assert not stale.exists() and other.exists()
    assert run.is_done(1, "train")
    assert sorted(p.name for p in run.stage_dir(1, "train").iterdir()) == sorted([MANIFEST, "metrics.json"])


def test_a_stage_dir_without_manifest_is_replaced(tmp_path):
    run = RunDir(tmp_path / "run")
    partial = run.stage_dir(3, "evaluate")
    partial.mkdir(parents=True)
    (partial / "eval.parquet").write_bytes(b"garbage")
    with run.stage_output(3, "evaluate") as (out, _):
        (out / "eval.json").write_text("[]")
    assert sorted(p.name for p in partial.iterdir()) == sorted([MANIFEST, "eval.json"])


def test_unknown_stage_is_rejected(tmp_path):
    with pytest.raises(AssertionError):
        RunDir(tmp_path).stage_dir(1, "preprocess")


def test_checkpoint_is_the_train_stage_checkpoint(tmp_path):
    run = RunDir(tmp_path)
    assert run.checkpoint(4) == tmp_path / "round_4" / "train" / "checkpoint"


# ---------------------------------------------------------------- rounds

def test_completed_rounds_are_those_with_a_round_manifest(tmp_path):
    run = RunDir(tmp_path / "run")
    assert run.completed_rounds() == []
    run.round_dir(1).mkdir(parents=True)
    run.finish_round(1, {"kept": 5})
    run.round_dir(10).mkdir()
    run.finish_round(10, {"kept": 7})
    run.round_dir(2).mkdir()  # started, not finished
    with run.stage_output(2, "sample") as (out, _):
        (out / "s.json").write_text("{}")
    (run.root / "round_x").mkdir()
    (run.root / "round_x" / MANIFEST).write_text("{}")
    assert run.completed_rounds() == [1, 10]
    assert run.round_done(1) and not run.round_done(2)
    assert run.round_manifest(10)["kept"] == 7 and run.round_manifest(10)["round"] == 10


def test_write_json_atomic_round_trips_and_leaves_no_temp(tmp_path):
    data = {"b": [1, 2], "a": {"nested": True}, "path": tmp_path}
    write_json_atomic(tmp_path / "x.json", data)
    assert read_json(tmp_path / "x.json") == {"a": {"nested": True}, "b": [1, 2], "path": str(tmp_path)}
    assert os.listdir(tmp_path) == ["x.json"]


# ---------------------------------------------------------------- the lock

LOCK_SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    from selfplay.runtime.rundir import RunDirError, locked
    try:
        with locked(Path(sys.argv[1])):
            print("ACQUIRED")
    except RunDirError as exc:
        print(exc)
        sys.exit(3)
""")


def try_lock_in_subprocess(root) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", LOCK_SCRIPT, str(root)], capture_output=True, text=True, timeout=60)


def test_a_second_process_is_refused_the_lock_naming_the_holder(tmp_path):
    root = tmp_path / "run"
    with locked(root):
        assert (root / ".lock").read_text() == str(os.getpid())
        refused = try_lock_in_subprocess(root)
        assert refused.returncode == 3, refused.stderr
        assert f"pid {os.getpid()}" in refused.stdout
        assert "in use by another process" in refused.stdout and "--set name=" in refused.stdout
    released = try_lock_in_subprocess(root)
    assert released.returncode == 0, released.stderr
    assert released.stdout.strip() == "ACQUIRED"


def test_the_lock_is_released_when_the_block_raises(tmp_path):
    root = tmp_path / "run"
    with pytest.raises(RuntimeError):
        with locked(root):
            raise RuntimeError("stage failed")
    with locked(root):  # re-acquirable at once
        pass


# ---------------------------------------------------------------- open_run

def config(tmp_path, *overrides: str):
    return load_config(None, [f"output_dir={tmp_path}", "name=r1", *overrides])


def open_locked(cfg, base_model: str) -> RunDir:
    """open_run as the flow calls it: while holding the run's lock (which also creates the directory)."""
    with locked(cfg.run_dir):
        return open_run(cfg, base_model)


def test_open_run_writes_run_json_once(tmp_path):
    cfg = config(tmp_path)
    run = open_locked(cfg, "/models/base")
    record = run.root / "run.json"
    saved = read_json(record)
    assert run.root == tmp_path / "r1"
    assert saved["base_model"] == "/models/base"
    assert saved["config"] == cfg.model_dump(mode="json")
    first = record.read_bytes()
    open_locked(config(tmp_path), "/models/base")  # an identical resume leaves the record as it was
    assert record.read_bytes() == first


def complete(cfg, k: int, *stages: str, round_done: bool = False) -> None:
    """Mark stages of round k complete as the stages do: their manifest written last."""
    run = RunDir(cfg.run_dir)
    for stage in stages:
        run.stage_dir(k, stage).mkdir(parents=True)
        write_json_atomic(run.stage_dir(k, stage) / MANIFEST, {"stage": stage})
    if round_done:
        write_json_atomic(run.round_dir(k) / MANIFEST, {"round": k})


def test_a_start_that_completed_nothing_pins_nothing(tmp_path, caplog):
    """A failed start with nothing completed: any setting, the model too, may change; the run goes on with the new
    values, says so once, and run.json records them and the change."""
    open_locked(config(tmp_path), "/models/broken")
    with locked(config(tmp_path).run_dir):
        open_run(config(tmp_path, "judge.max_length=8192", "sample.temperature=0.5"), "/models/fixed", log=LOG)
    saved = read_json(tmp_path / "r1" / "run.json")
    assert saved["config"]["judge"]["max_length"] == 8192 and saved["config"]["sample"]["temperature"] == 0.5
    assert saved["base_model"] == "/models/fixed"
    assert saved["resumed_under"][-1]["changes"] == [
        "judge.max_length: 1024 -> 8192 (no completed stage had used it)", "sample.temperature: 0.8 -> 0.5 (no completed stage had used it)",
        "base model: '/models/broken' -> '/models/fixed' (no completed stage had used it)"]
    assert any("no completed stage used" in w and "judge.max_length: 1024 -> 8192" in w for w in warnings_of(caplog))
    open_locked(config(tmp_path, "judge.max_length=8192", "sample.temperature=0.5"), "/models/fixed")  # now the record


def test_after_sampling_completed_the_judge_settings_may_change_and_the_sampling_ones_may_not(tmp_path):
    cfg = config(tmp_path)
    open_locked(cfg, "/models/base")
    complete(cfg, 1, "sample")
    open_locked(config(tmp_path, "judge.max_length=8192", "judge.margin=0.2", "train.dpo.max_length=512"), "/models/base")
    assert read_json(cfg.run_dir / "run.json")["config"]["judge"]["max_length"] == 8192
    with pytest.raises(RunDirError) as err:
        open_locked(config(tmp_path, "judge.max_length=8192", "judge.margin=0.2", "train.dpo.max_length=512", "sample.temperature=0.5"),
                    "/models/base")
    assert "sample.temperature: 0.8 -> 0.5: round 1's sample stage used the old value (completed)" in str(err.value)
    assert "judge.max_length" not in str(err.value) and "--set name=" in str(err.value)
    with pytest.raises(RunDirError, match=r"base model: '/models/base' -> '/models/other': round 1's sample stage used it"):
        open_locked(config(tmp_path, "judge.max_length=8192", "judge.margin=0.2", "train.dpo.max_length=512"), "/models/other")


def test_after_a_round_completed_its_settings_are_fixed_and_rounds_may_grow(tmp_path):
    cfg = config(tmp_path, "rounds=1")
    open_locked(cfg, "/models/base")
    complete(cfg, 1, "sample", "judge", "filter", "train", "evaluate", round_done=True)
    for setting, stage in (("judge.max_length=8192", "round 1's judge stage"), ("filter.max_similarity=0.5", "round 1's judge stage"),
                           ("judge.audit.on_chance=drop", "round 1's filter stage"), ("train.dpo.beta=0.3", "round 1's train stage"),
                           ("evaluate.temperature=0.1", "round 1's evaluate stage"), ("gate.min_upper_bound=0.4", "round 1 (completed: its gate decision)"),
                           ("seed=7", "round 1's sample stage")):
        with pytest.raises(RunDirError, match=re.escape(stage)):
            open_locked(config(tmp_path, "rounds=1", setting), "/models/base")
    open_locked(config(tmp_path, "rounds=3"), "/models/base")
    assert read_json(cfg.run_dir / "run.json")["config"]["rounds"] == 3


def test_a_resume_compares_effective_values_not_what_was_written(tmp_path):
    """train.dpo.beta=0.1 is TRL's default, learning_rate=5e-5 selfplay's: writing them out changes nothing."""
    cfg = config(tmp_path)
    open_locked(cfg, "/models/base")
    complete(cfg, 1, "sample", "judge", "filter", "train", "evaluate", round_done=True)
    open_locked(config(tmp_path, "train.dpo.beta=0.1", "train.dpo.learning_rate=5e-5"), "/models/base")
    with pytest.raises(RunDirError, match=r"train.dpo.beta: '<unset>' -> 0.2: round 1's train stage"):
        open_locked(config(tmp_path, "train.dpo.beta=0.2"), "/models/base")


def test_resume_changing_only_rounds_is_accepted_and_recorded(tmp_path):
    run = open_locked(config(tmp_path, "rounds=2"), "/models/base")
    open_locked(config(tmp_path, "rounds=5", "train.min_pairs=1"), "/models/base")
    saved = read_json(run.root / "run.json")
    assert saved["config"]["rounds"] == 5
    assert saved["config"]["sample"] == config(tmp_path).sample.model_dump(mode="json")


def failed_judging(k: int, pinned: str | None) -> str:
    """The judge stage's error-rate failure, as round k's judge stage raises it."""
    from selfplay.judging.verdicts import JudgeFailed, check_error_rate

    table = pd.DataFrame({"verdict": ["judge_error"] * 4, "error": ["APIConnectionError: down"] * 4, "mode": [None] * 4})
    with pytest.raises(JudgeFailed) as err:
        check_error_rate(table, 0.05, k, None, (), pinned)
    return str(err.value)


def test_the_judge_failure_says_what_a_rerun_may_change_and_it_is_true(tmp_path):
    """Round 1's judge failed after sampling: its settings may change, and a rerun with a new margin is accepted.
    Round 2's judge failed: round 1's judge stage used them, and the same change is refused naming it."""
    from selfplay.runtime.rundir import pinned_by

    cfg = config(tmp_path)
    open_locked(cfg, "/models/base")
    complete(cfg, 1, "sample")
    message = failed_judging(1, pinned_by(RunDir(cfg.run_dir), "judge.template"))
    assert message.endswith("Fix the judge and rerun to resume (with judge.cache on, calls that succeeded are not asked again). No completed "
                            "stage has used the judge's settings yet, so they may change for the rerun.")
    open_locked(config(tmp_path, "judge.margin=0.3"), "/models/base")
    complete(cfg, 1, "judge", "filter", "train", "evaluate", round_done=True)
    complete(cfg, 2, "sample")
    message = failed_judging(2, pinned_by(RunDir(cfg.run_dir), "judge.template"))
    assert "stay as they are on a resume: round 1's judge stage used them. Fix the server, or start a new run" in message
    with pytest.raises(RunDirError, match=r"judge.margin: 0.3 -> 0.5: round 1's judge stage used the old value"):
        open_locked(config(tmp_path, "judge.margin=0.5"), "/models/base")


def test_too_few_pairs_says_only_min_pairs_can_change_on_a_resume_and_it_is_true(tmp_path):
    from selfplay.training.dpo import NotEnoughPairs, check_enough_pairs

    cfg = config(tmp_path)
    open_locked(cfg, "/models/base")
    complete(cfg, 1, "sample", "judge", "filter")  # the train stage found too few pairs
    with pytest.raises(NotEnoughPairs, match="of these, only train.min_pairs can change on a resume"):
        check_enough_pairs(3, 16, {"tie": 9}, 1)
    for setting in ("prompts.per_round=48", "sample.num_samples=8", "sample.max_new_tokens=256", "judge.margin=0.0", "filter.max_similarity=0.99"):
        with pytest.raises(RunDirError, match="used the old value"):
            open_locked(config(tmp_path, setting), "/models/base")
    open_locked(config(tmp_path, "train.min_pairs=2"), "/models/base")


# ---------------------------------------------------------------- provenance: what produced a run

def test_run_json_records_what_produced_the_run(tmp_path):
    import importlib.metadata
    import platform

    from selfplay.runtime import provenance

    run = open_locked(config(tmp_path), "/models/base")
    recorded = read_json(run.root / "run.json")["provenance"]
    assert recorded["python"] == platform.python_version()
    assert recorded["libraries"]["torch"] == importlib.metadata.version("torch")
    assert set(recorded["libraries"]) == set(provenance.LIBRARIES)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    if head.returncode == 0:  # a checkout (CI's clean clone is one)
        assert recorded["commit"] == head.stdout.strip() and isinstance(recorded["dirty"], bool)
    assert recorded["device"].startswith("CPU: ") or "CUDA" in recorded["device"]


LOG = logging.getLogger("tests.rundir")


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOG.name and r.levelno == logging.WARNING]


def test_a_resume_under_other_versions_warns_once_and_is_recorded(tmp_path, monkeypatch, caplog):
    from selfplay.runtime import provenance

    then = {"commit": "a" * 40, "dirty": False, "python": "3.11.7", "libraries": {"torch": "2.13.0", "trl": "1.16.0"},
            "device": "CPU: x, 2 cores"}
    monkeypatch.setattr(provenance, "collect", lambda: then)
    cfg = config(tmp_path)
    open_locked(cfg, "/models/base")
    now = {**then, "commit": "b" * 40, "dirty": True, "libraries": {"torch": "2.14.1", "trl": "1.16.0"}}
    monkeypatch.setattr(provenance, "collect", lambda: now)
    assert open_locked(cfg, "/models/base").root.is_dir()  # the CLI's early check: no log, no warning, not refused
    with locked(cfg.run_dir):
        open_run(cfg, "/models/base", log=LOG)  # the flow's
    assert warnings_of(caplog) == ["resuming r1 under other versions than it started with: commit aaaaaaaaaaaa -> bbbbbbbbbbbb+changes; "
                            "torch 2.13.0 -> 2.14.1"]
    saved = read_json(cfg.run_dir / "run.json")
    assert saved["provenance"] == then  # what it started under stays
    assert saved["resumed_under"][0]["changes"] == ["commit aaaaaaaaaaaa -> bbbbbbbbbbbb+changes", "torch 2.13.0 -> 2.14.1"]


def test_a_run_recorded_before_provenance_gets_it_at_its_next_resume_without_a_warning(tmp_path, caplog):
    cfg = config(tmp_path)
    open_locked(cfg, "/models/base")
    record = cfg.run_dir / "run.json"
    old = read_json(record)
    del old["provenance"]
    write_json_atomic(record, old)
    with locked(cfg.run_dir):
        open_run(cfg, "/models/base", log=LOG)
    assert not warnings_of(caplog) and read_json(record)["provenance"]["recorded_at_resume"] is True


def test_the_vllm_a_server_reports_is_recorded_and_a_different_one_warned_about(tmp_path, caplog):
    from selfplay.runtime.rundir import note_server_version

    cfg = config(tmp_path)
    open_locked(cfg, "/models/base")
    log = LOG
    note_server_version(cfg.run_dir, None, log)  # a server without GET /version: nothing to record
    assert "vllm" not in read_json(cfg.run_dir / "run.json")["provenance"]
    note_server_version(cfg.run_dir, "0.32.0", log)
    note_server_version(cfg.run_dir, "0.32.0", log)
    assert read_json(cfg.run_dir / "run.json")["provenance"]["vllm"] == "0.32.0" and not warnings_of(caplog)
    note_server_version(cfg.run_dir, "0.33.0", log)
    saved = read_json(cfg.run_dir / "run.json")
    assert saved["provenance"]["vllm"] == "0.33.0" and saved["resumed_under"][-1]["changes"] == ["vLLM 0.32.0 -> 0.33.0"]
    assert warnings_of(caplog) == ["the vLLM server for r1 reports version 0.33.0; the run's earlier servers reported 0.32.0"]
    note_server_version(tmp_path / "no-such-run", "0.33.0", log)  # a stage called outside a run: nothing to do


def test_provenance_outside_a_checkout_has_no_commit(tmp_path):
    from selfplay.runtime.provenance import code_version

    assert code_version(tmp_path) == {"commit": None, "dirty": None}
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "sub").mkdir()
    assert code_version(tmp_path / "sub") == {"commit": None, "dirty": None}  # inside a checkout, but not its top


# ---------------------------------------------------------------- hook points for developer tools

def test_hook_points_call_the_file_selfplay_hooks_names_and_nothing_without_it(tmp_path, monkeypatch):
    from selfplay.runtime import hooks

    seen = tmp_path / "seen.txt"
    hook_file = tmp_path / "hook.py"
    hook_file.write_text(f"def reached(point, what):\n    open({str(seen)!r}, 'a').write(point + '|' + what + '\\n')\n")
    monkeypatch.delenv("SELFPLAY_HOOKS", raising=False)
    hooks.reached("stage", "round 1 sample")
    assert not seen.exists()
    monkeypatch.setenv("SELFPLAY_HOOKS", str(hook_file))
    run = RunDir(tmp_path / "run")
    with run.stage_output(1, "sample") as (out, manifest):
        (out / "x.json").write_text("{}")
    assert seen.read_text() == "stage|round 1 sample\n"
    with pytest.raises(AssertionError):
        hooks.reached("nowhere", "x")
