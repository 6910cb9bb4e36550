"""GPU stages in their own processes, multi-process training under `accelerate launch`, adapter checkpoints.

Unit tier: `selfplay.runtime.isolate.call` runs a target in a child process, relays its logs and progress, returns its value,
and turns a failure or a kill into an error with the child's last lines; an interrupted parent leaves no process
behind. Flow tier (tiny model, real Prefect server, real TRL): a round with every GPU stage in its own process
computes the same samples and verdicts as one in-process; training under `accelerate launch` with two data-parallel
CPU processes (gloo) takes half the steps; `train.merge: false` carries one adapter over the base model from round
to round. What needs CUDA (bf16 training, QLoRA, GPU memory given back) skips itself without a GPU.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from selfplay.config.run import build_config
from selfplay.inputs.models import adapter_base, is_adapter, load_merged, weights_digest
from selfplay.runtime import isolate
from selfplay.runtime.isolate import StageProcessError
from selfplay.runtime.rundir import RunDir
from tests.conftest import free_port, run_self_play, tiny_config

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]


class Captured(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list[tuple[int, str]] = []

    def emit(self, record):
        self.records.append((record.levelno, record.getMessage()))


@pytest.fixture
def log():
    logger = logging.getLogger(f"test-isolate-{time.monotonic_ns()}")
    logger.setLevel(logging.DEBUG)
    handler = Captured()
    logger.addHandler(handler)
    logger.captured = handler.records
    return logger


# ---------------------------------------------------------------- unit tier: isolate.call


def test_call_in_a_child_returns_value_and_relays_logs_and_progress(log, tmp_path):
    table = pd.DataFrame({"a": [1, 2, 3], "b": ["x", "y", "z"]})
    seen = []
    value, peak = isolate.call("tests.isolate_targets:echo", table, isolated=True, log=log,
                               progress=lambda d, t: seen.append((d, t)), scratch=tmp_path, label="echo")
    assert value["pid"] != os.getpid()
    pd.testing.assert_frame_equal(value["value"], table)
    assert seen == [(1, 2), (2, 2)]
    assert (logging.INFO, "echo got 3 rows") in log.captured
    assert (logging.WARNING, "a warning from the child") in log.captured
    assert (logging.INFO, "[echo] plain stdout line") in log.captured
    assert peak is None or peak >= 0
    assert list(tmp_path.iterdir()) == []  # the spec and result files are gone
    assert isolate_children() == []


def test_call_inline_runs_here(log):
    value, _ = isolate.call("tests.isolate_targets:echo", [1], isolated=False, log=log)
    assert value["pid"] == os.getpid()


def test_a_failing_child_raises_with_its_traceback_tail(log, tmp_path):
    with pytest.raises(StageProcessError) as info:
        isolate.call("tests.isolate_targets:fail", isolated=True, log=log, scratch=tmp_path, label="round 3 train")
    message = str(info.value)
    # The child's own error leads (what to fix), then how the process ended, then its last lines with the traceback.
    assert message.startswith("round 3 train: ValueError: boom: the target failed. The process exited with status 1")
    assert "about to fail" in message and "Traceback" in message


def test_a_killed_child_says_so_and_points_at_memory(log, tmp_path):
    with pytest.raises(StageProcessError, match=r"killed by SIGKILL .*out-of-memory killer") as info:
        isolate.call("tests.isolate_targets:die", isolated=True, log=log, scratch=tmp_path)
    assert "about to be killed" in str(info.value)
    assert isolate_children() == []


def test_an_interrupted_parent_leaves_no_process_behind(log, tmp_path):
    """A cancelled flow run interrupts the parent; the child and the grandchild it started must both go."""
    pid_file = tmp_path / "grandchild.pid"

    def cancel(done, total):
        raise KeyboardInterrupt  # what a cancellation looks like to the code waiting on the child

    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        isolate.call("tests.isolate_targets:hang_with_grandchild", str(pid_file), isolated=True, log=log,
                     progress=cancel, scratch=tmp_path)
    assert time.monotonic() - started < 60
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and alive(grandchild):
        time.sleep(0.1)
    assert not alive(grandchild), f"grandchild {grandchild} outlived the cancelled stage"
    assert isolate_children() == []


def test_a_parent_killed_outright_takes_its_stage_process_with_it(tmp_path):
    """SIGKILL gives the parent no chance to clean up; the kernel then sends the child SIGTERM (PR_SET_PDEATHSIG)."""
    import subprocess
    import sys

    pid_file = tmp_path / "child.pid"
    script = ("import logging; from selfplay.runtime import isolate; "
              f"isolate.call('tests.isolate_targets:hang', {str(pid_file)!r}, isolated=True, log=logging.getLogger('x'))")
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT)
    deadline = time.monotonic() + 60
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    child = int(pid_file.read_text())
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and alive(child):
        time.sleep(0.1)
    assert not alive(child), f"stage process {child} outlived its killed parent"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(") ")[-1][0] != "Z"


def test_isolation_modes():
    assert isolate.isolated("process") and not isolate.isolated("inline")
    assert isolate.isolated("auto") == torch.cuda.is_available()


def test_accelerate_command_uses_this_environment_and_every_gpu_by_default():
    command = isolate.accelerate_command("deployments/accelerate/zero3.yaml", 8, ["--main_process_port", "29511"])
    assert command[:3] == [os.sys.executable, "-m", "accelerate.commands.launch"]
    assert command[3:] == ["--config_file", "deployments/accelerate/zero3.yaml", "--num_processes", "8", "--main_process_port", "29511"]
    default = isolate.accelerate_command(None, None)
    assert default[-2:] == ["--num_processes", str(max(1, torch.cuda.device_count()))]


@pytest.mark.parametrize("name, kind, stage", [("ddp", "MULTI_GPU", None), ("zero2", "DEEPSPEED", 2), ("zero3", "DEEPSPEED", 3), ("cpu", "MULTI_GPU", None)])
def test_accelerate_configs_parse_as_accelerate_reads_them(name, kind, stage):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ROOT / "deployments" / "accelerate" / f"{name}.yaml"))
    assert config.distributed_type.value == kind
    if stage is not None:
        assert config.deepspeed_config["zero_stage"] == stage
        assert str(config.mixed_precision) in ("bf16", "PrecisionType.BF16")


# ---------------------------------------------------------------- preflight of the training hardware


def test_preflight_refuses_training_setups_this_machine_cannot_run(tmp_path):
    import importlib.util

    from selfplay.config.run import ConfigError, load_config
    from selfplay.orchestration.preflight import check_training_hardware

    with pytest.raises(ConfigError, match=r"'4bit' \(QLoRA\) needs a CUDA GPU"):
        check_training_hardware(load_config(None, ["train.quantization=4bit"]), "cpu")
    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(ConfigError, match=r"pip install -e '\.\[qlora\]'"):
            check_training_hardware(load_config(None, ["train.quantization=4bit"]), "cuda")
    missing = load_config(None, ["train.launcher.kind=accelerate", f"train.launcher.config_file={tmp_path / 'nope.yaml'}"])
    with pytest.raises(ConfigError, match="nope.yaml not found"):
        check_training_hardware(missing, "cpu")
    zero3 = load_config(None, ["train.launcher.kind=accelerate", f"train.launcher.config_file={ROOT / 'deployments/accelerate/zero3.yaml'}"])
    if importlib.util.find_spec("deepspeed") is None:
        with pytest.raises(ConfigError, match=r"uses DeepSpeed, which is not installed: pip install -e '\.\[deepspeed\]'"):
            check_training_hardware(zero3, "cpu")
    ddp = ROOT / "deployments/accelerate/ddp.yaml"
    check_training_hardware(load_config(None, ["train.launcher.kind=accelerate", f"train.launcher.config_file={ddp}"]), "cpu")


@pytest.mark.stage
@pytest.mark.parametrize("isolation", ["inline", "process"])
def test_preflight_reports_what_trl_rejects_wherever_it_checks(isolation, tiny_model, tmp_path):
    """On a GPU the settings are checked in a process of their own (building TRL's arguments creates a CUDA
    context); the error reaching the user is the same ConfigError either way, naming the round and the setting."""
    from selfplay.config.run import ConfigError
    from selfplay.orchestration.preflight import preflight

    cfg = build_config(tiny_config(tiny_model, tmp_path, isolation=isolation, rounds=3,
                                   train={"schedule": {"warmup_steps": [0, 0, -1]}}))
    with pytest.raises(ConfigError, match=r"trl.DPOConfig rejects round 3's settings: .*warmup_steps >= 0"):
        preflight(cfg)


# ---------------------------------------------------------------- flow tier


@pytest.fixture(scope="module")
def inline_and_isolated(prefect_server, tiny_model, tmp_path_factory):
    """One round in-process, and the same round with every GPU stage in its own process and training under
    `accelerate launch` with two CPU processes."""
    tmp = tmp_path_factory.mktemp("isolation")
    inline = tiny_config(tiny_model, tmp, name="inline", rounds=1, isolation="inline")
    split = tiny_config(tiny_model, tmp, name="isolated", rounds=1, isolation="process", train={"launcher": {
        "kind": "accelerate", "config_file": str(ROOT / "deployments/accelerate/cpu.yaml"), "num_processes": 2,
        "args": ["--main_process_port", str(free_port())]}})
    run_self_play(inline, tmp / "inline.yaml")
    run_self_play(split, tmp / "isolated.yaml")
    return RunDir(build_config(inline).run_dir), RunDir(build_config(split).run_dir)


@pytest.mark.stage
def test_stages_in_their_own_processes_compute_the_same_samples_and_verdicts(inline_and_isolated):
    inline, isolated = inline_and_isolated
    pd.testing.assert_frame_equal(pd.read_parquet(inline.stage_dir(1, "sample") / "samples.parquet"),
                                  pd.read_parquet(isolated.stage_dir(1, "sample") / "samples.parquet"))
    a = pd.read_parquet(inline.stage_dir(1, "judge") / "judgments.parquet")
    b = pd.read_parquet(isolated.stage_dir(1, "judge") / "judgments.parquet")
    assert a["verdict"].tolist() == b["verdict"].tolist()
    assert (a["p_first"] - b["p_first"]).abs().max() < 1e-5
    # Evaluation generated and judged in child processes as well, and found the same answers for the base model.
    pd.testing.assert_frame_equal(pd.read_parquet(inline.stage_dir(1, "evaluate") / "generations_previous.parquet"),
                                  pd.read_parquet(isolated.stage_dir(1, "evaluate") / "generations_previous.parquet"))


@pytest.mark.stage
def test_accelerate_launch_trains_data_parallel_on_two_processes(inline_and_isolated, tiny_model):
    inline, isolated = inline_and_isolated
    kept = isolated.manifest(1, "filter")["metrics"]["kept"]
    one, two = inline.manifest(1, "train")["metrics"], isolated.manifest(1, "train")["metrics"]
    assert (one["processes"], two["processes"]) == (1, 2)
    batch = 6  # tiny_config's per_device_train_batch_size
    assert one["steps"] == math.ceil(kept / batch)
    assert two["steps"] == math.ceil(math.ceil(kept / 2) / batch)  # each rank sees half the pairs
    assert math.isclose(two["initial_loss"], math.log(2), abs_tol=1e-3)
    assert two["lora_b_norm"] > 0
    assert two["reference_digest"] == weights_digest(load_merged(tiny_model, torch.float32))
    merged = load_merged(isolated.checkpoint(1), torch.float32)
    assert weights_digest(merged) != two["reference_digest"]
    assert not is_adapter(isolated.checkpoint(1)) and (isolated.stage_dir(1, "train") / "adapter" / "adapter_config.json").is_file()


@pytest.fixture(scope="module")
def adapter_run(prefect_server, tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("adapter")
    raw = tiny_config(tiny_model, tmp, name="adapters", train={"merge": False})
    run_self_play(raw, tmp / "adapters.yaml")
    return RunDir(build_config(raw).run_dir)


@pytest.mark.stage
def test_unmerged_checkpoints_are_one_adapter_over_the_base_carried_across_rounds(adapter_run, tiny_model):
    run = adapter_run
    from safetensors.torch import load_file

    for k in (1, 2):
        ckpt = run.checkpoint(k)
        assert is_adapter(ckpt) and not (ckpt / "model.safetensors").exists() and not (ckpt / "ref").exists()
        assert Path(adapter_base(ckpt)).resolve() == tiny_model.resolve()  # over the base, not over round k-1
        assert (ckpt / "tokenizer_config.json").is_file()
    # Round 2 started from round 1's adapter: its reference is base + adapter 1, and it moved the adapter further.
    assert run.manifest(2, "train")["metrics"]["reference_digest"] == weights_digest(load_merged(run.checkpoint(1), torch.float32))
    assert math.isclose(run.manifest(2, "train")["metrics"]["initial_loss"], math.log(2), abs_tol=1e-3)
    one, two = (load_file(str(run.checkpoint(k) / "adapter_model.safetensors")) for k in (1, 2))
    assert set(one) == set(two) and any(not torch.equal(one[n], two[n]) for n in one)
    assert run.manifest(2, "sample")["policy"] == str(run.checkpoint(1))


# ---------------------------------------------------------------- CUDA only

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here: CI and dev machines are CPU-only)")


@pytest.mark.stage
@needs_cuda
def test_a_stage_process_gives_all_gpu_memory_back(log, tiny_model, tmp_path):
    import subprocess

    def used_mib() -> int:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, check=True).stdout
        return int(out.split()[0])

    from selfplay.config.backends import SampleConfig

    before = used_mib()
    rows, peak = isolate.call("selfplay.generation.local:sample_local", str(tiny_model), ["Hi", "Name a colour."],
                              SampleConfig(num_samples=2, max_new_tokens=8), 0, isolated=True, log=log, scratch=tmp_path)
    assert len(rows) == 4 and peak > 0
    assert used_mib() - before < 64  # the child's CUDA context and cache went with it


@pytest.mark.stage
@needs_cuda
def test_preflight_leaves_the_flow_process_without_a_cuda_context(tiny_model, tmp_path):
    """A context in the flow's process would hold GPU memory through every stage; preflight must not create one."""
    import json
    import subprocess
    import sys

    raw = tiny_config(tiny_model, tmp_path)
    code = ("import json, sys, torch; from selfplay.config.run import build_config; from selfplay.orchestration.preflight import preflight; "
            "preflight(build_config(json.loads(sys.argv[1]))); print('initialized', torch.cuda.is_initialized())")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(raw)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "initialized False" in out.stdout


@pytest.mark.stage
@needs_cuda
def test_qlora_round_trains_in_4bit_and_merges_into_full_precision(prefect_server, tiny_model, tmp_path):
    pytest.importorskip("bitsandbytes", reason="the qlora extra is not installed: pip install -e '.[qlora]'")
    raw = tiny_config(tiny_model, tmp_path, name="qlora", rounds=1, train={"quantization": "4bit"})
    run_self_play(raw, tmp_path / "qlora.yaml")
    run = RunDir(build_config(raw).run_dir)
    metrics = run.manifest(1, "train")["metrics"]
    assert metrics["quantization"] == "4bit" and metrics["reference_digest"] is None and metrics["lora_b_norm"] > 0
    merged = load_merged(run.checkpoint(1))
    assert all(p.dtype in (torch.bfloat16, torch.float16) for p in merged.parameters())


def isolate_children() -> list[str]:
    """Processes this test process started that still run `selfplay.runtime.isolate` (zombies excluded)."""
    me = os.getpid()
    return [p.name for p in Path("/proc").iterdir()
            if p.name.isdigit() and _ppid(p) == me and "selfplay.runtime.isolate" in _cmdline(p) and alive(int(p.name))]


def _ppid(proc: Path) -> int:
    try:
        return int((proc / "stat").read_text().split(") ")[-1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""
