"""Bad input found up front (issue 26's rows): `selfplay run` as a user runs it, on the tiny model built here, stops in
preflight with one line and exit 2, and no stage runs; or, where the input is usable, says what it did with it.
The resume rule ("what completed pins") is tested in tests/test_rundir.py."""

from __future__ import annotations

import http.server
import json
import logging
import shutil
import threading
from pathlib import Path

import pytest

from selfplay.config.run import build_config
from selfplay.orchestration.lengths import fitting
from selfplay.orchestration.preflight import check_prompts, preflight
from tests.conftest import tiny_config
from tests.test_preflight_inputs import run_cli

pytestmark = pytest.mark.stage


def one_line(done) -> str:
    """The run's one line on stderr, after checking it exited 2 with no traceback."""
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert "Traceback" not in done.stderr and len(lines) == 1, done.stderr
    return lines[0]


def no_stage_ran(tmp_path: Path, cfg: dict) -> None:
    run = Path(cfg["output_dir"]) / cfg["name"]
    assert not list(run.glob("round_*")) and not (run / "run.json").exists()


def prompts_file(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------- lengths against budgets

def test_an_over_long_prompt_is_dropped_before_any_stage_with_a_warning_naming_it(tiny_model, tmp_path, caplog):
    rows = [{"id": f"p{i}", "prompt": f"Say something about {i}."} for i in range(8)] + [{"id": "huge", "prompt": "word " * 1500}]
    cfg = build_config(tiny_config(tiny_model, tmp_path / "runs", prompts={"train": str(prompts_file(tmp_path / "p.jsonl", rows))},
                                   judge={"max_length": 1024}, train={"dpo": {"max_length": 4000}}))
    with caplog.at_level(logging.WARNING):
        preflight(cfg)
    warned = [r.getMessage() for r in caplog.records if "too long" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("prompts.train: 1 of 9 train prompt(s) are too long for their token budgets: huge (")
    assert "judge.max_length=1024" in warned[0] and "dropped, the run goes on without them" in warned[0]
    kept, over = fitting(cfg, "train", tiny_model)
    assert [p["id"] for p in kept] == [f"p{i}" for i in range(8)] and [o.id for o in over] == ["huge"]


def test_an_over_long_prompt_with_too_long_error_stops_the_run_before_any_stage(tiny_model, tmp_path):
    rows = [{"id": f"p{i}", "prompt": f"Say something about {i}."} for i in range(8)] + [{"id": "huge", "prompt": "word " * 1500}]
    cfg = tiny_config(tiny_model, tmp_path / "runs", prompts={"train": str(prompts_file(tmp_path / "p.jsonl", rows)), "too_long": "error"},
                      judge={"max_length": 1024}, train={"dpo": {"max_length": 4000}})
    line = one_line(run_cli(tmp_path, cfg))
    assert line.startswith("selfplay: prompts.train: 1 of 9 train prompt(s) are too long for their token budgets: huge (")
    assert line.endswith("Shorten or remove them, raise the budget named, or set prompts.too_long: drop to run without them.")
    no_stage_ran(tmp_path, cfg)


def test_a_training_length_shorter_than_the_prompts_is_refused_with_both_numbers(tiny_model, tmp_path):
    cfg = tiny_config(tiny_model, tmp_path / "runs")
    line = one_line(run_cli(tmp_path, cfg, "train.dpo.max_length=8"))
    assert line.startswith("selfplay: prompts.train: only 0 of 320 prompt(s) fit their token budgets, fewer than prompts.per_round=6: "
                           "train.dpo.max_length=8 allows at most 7 prompt tokens (a prompt must leave room for its completion), and the "
                           "prompts over it take shortest ")
    assert line.endswith("Raise train.dpo.max_length, or use shorter prompts.")
    no_stage_ran(tmp_path, cfg)


# ---------------------------------------------------------------- models, prompts, files, endpoints

def test_a_model_directory_without_weights_names_what_it_lacks(tiny_model, tmp_path):
    broken = tmp_path / "no-weights"
    shutil.copytree(tiny_model, broken, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    cfg = tiny_config(broken, tmp_path / "runs")
    line = one_line(run_cli(tmp_path, cfg))
    assert line == (f"selfplay: {broken} has a config.json but no weights: none of model.safetensors, model.safetensors.index.json, "
                    f"pytorch_model.bin, pytorch_model.bin.index.json, nor any *.safetensors. Point at the directory a model was saved to "
                    f"with save_pretrained, or copy its weight files in")
    no_stage_ran(tmp_path, cfg)


def test_a_model_directory_without_a_tokenizer_names_the_files_looked_for(tiny_model, tmp_path):
    broken = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_model, broken, ignore=shutil.ignore_patterns("tokenizer*", "vocab*", "merges*", "special_tokens*", "chat_template*"))
    cfg = tiny_config(broken, tmp_path / "runs")
    line = one_line(run_cli(tmp_path, cfg))
    assert line == (f"selfplay: {broken} has no tokenizer files: none of tokenizer.json, tokenizer.model, vocab.json. Save the model's "
                    f"tokenizer into it (tokenizer.save_pretrained), or copy them from the model it came from")


def test_rows_holding_a_number_or_another_key_say_what_they_hold(tiny_model, tmp_path):
    rows = [{"id": "a", "prompt": 12, "question": "What is 5 + 7?"}, {"id": "b", "question": "Name a colour."}]
    rows += [{"id": f"p{i}", "prompt": 40 + i, "question": f"What is {i} + 40?"} for i in range(8)]
    cfg = tiny_config(tiny_model, tmp_path / "runs", prompts={"train": str(prompts_file(tmp_path / "p.jsonl", rows))})
    line = one_line(run_cli(tmp_path, cfg))
    assert line.startswith(f"selfplay: {tmp_path / 'p.jsonl'}: 10 row(s) have no prompt text in column 'prompt': 9 hold a number (row 0: 12) "
                           f"at rows 0, 2, 3, 4, 5 ...; 1 hold no value (row 1 has 'id', 'question') at rows 1.")
    assert line.endswith("set prompts.column to the column that holds the prompt text ('id', 'question' has text in every row)")


@pytest.mark.parametrize("where", ["under-a-file", "not-writable"])
def test_an_output_dir_that_cannot_be_written_is_one_line_before_the_server_starts(tiny_model, tmp_path, where):
    if where == "under-a-file":
        (tmp_path / "afile").write_text("x")
        output, blocker = tmp_path / "afile" / "runs", tmp_path / "afile"
        expected = f"selfplay: cannot create the run directory {output / 'tiny'}: {blocker} is a file, not a directory. Set output_dir to a directory"
    else:
        output = Path("/sys/selfplay-test-runs")  # sysfs refuses a new directory, to root too
        expected = f"selfplay: cannot create the run directory {output / 'tiny'}: /sys is not writable here ("
    cfg = tiny_config(tiny_model, output)
    line = one_line(run_cli(tmp_path, cfg))
    assert line.startswith(expected), line
    assert not (tmp_path / "runs").exists() and not list(tmp_path.glob("**/prefect-server"))


def test_an_empty_recipe_is_refused(tmp_path):
    import subprocess

    from tests.test_preflight_inputs import SELFPLAY

    recipe = tmp_path / "empty.yaml"
    recipe.write_text("\n# nothing here\n")
    done = subprocess.run([str(SELFPLAY), "run", "--config", str(recipe)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    line = one_line(done)
    assert line.startswith(f"selfplay: recipe {recipe} is empty: it sets nothing, so every setting would be its default")
    assert not (tmp_path / "runs").exists()


class NotOpenAI(http.server.SimpleHTTPRequestHandler):
    """Python's own file server: GET /v1/models is 404, POST is 501."""

    def log_message(self, *args):
        pass


def test_a_judge_base_url_that_is_not_an_openai_server_is_refused_in_preflight(tiny_model, tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotOpenAI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        cfg = tiny_config(tiny_model, tmp_path / "runs", judge={"backend": "endpoint", "endpoint": {"base_url": url, "model": "judge"}})
        line = one_line(run_cli(tmp_path, cfg))
    finally:
        server.shutdown()
    assert line.startswith("selfplay: ") and url in line and "OpenAI-compatible" in line, line
    no_stage_ran(tmp_path, cfg)


def test_a_column_setting_with_a_bundled_prompt_set_is_warned_as_not_applying(caplog):
    from selfplay.config.run import PromptsConfig

    with caplog.at_level(logging.WARNING):
        sets = check_prompts(PromptsConfig(train="bundled:train", eval="bundled:eval", column="text", per_round=4, eval_size=4))
    assert len(sets["train"]) == 320  # read by its own column
    assert [r.getMessage() for r in caplog.records if "does not apply" in r.getMessage()] == [
        "prompts.column='text' does not apply to bundled:train, bundled:eval: a bundled prompt set is read by its own columns, so the "
        "setting is ignored there"]


# ---------------------------------------------------------------- fixing it resumes (the CLI; the rule itself: tests/test_rundir.py)

def test_a_start_that_recorded_a_broken_model_resumes_with_the_fixed_one_and_a_finished_round_pins_its_settings(prefect_server, tiny_model,
                                                                                                                tmp_path):
    """A start that recorded its configuration and then failed before any stage completed (here: run.json as it leaves
    it, naming another model) pins nothing: the same command with the model fixed, and `train.dpo.beta=0.1` written
    out (TRL's default, no change), runs the round. Once the round completed, a sampling change is refused naming it."""
    import os
    import subprocess

    from selfplay.runtime.rundir import locked, open_run, read_json
    from tests.test_preflight_inputs import SELFPLAY

    cfg = tiny_config(tiny_model, tmp_path / "runs", name="fixed", rounds=1)
    broken = build_config({**cfg, "policy": {"model": str(tmp_path / "broken")}})
    with locked(broken.run_dir):
        open_run(broken, str(tmp_path / "broken"))
    recipe = tmp_path / "fixed.yaml"
    recipe.write_text(json.dumps(cfg))
    env = {**os.environ, "PREFECT_API_URL": prefect_server}

    def selfplay(*overrides: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(SELFPLAY), "run", "--config", str(recipe), *(a for o in overrides for a in ("--set", o))],
                              capture_output=True, text=True, env=env, timeout=600)

    done = selfplay("train.dpo.beta=0.1")
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "settings changed that no completed stage used, so the run goes on with them: policy.model: " in done.stdout + done.stderr
    saved = read_json(broken.run_dir / "run.json")
    assert saved["base_model"] == str(tiny_model.resolve()) and saved["config"]["policy"]["model"] == str(tiny_model)
    assert selfplay("train.dpo.beta=0.1").returncode == 0  # the finished run, again: nothing changed, nothing to do
    refused = selfplay("sample.temperature=0.5")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "sample.temperature: 1.0 -> 0.5: round 1's sample stage used the old value (completed)" in refused.stderr
