"""End-to-end tier: the real bundled SmolLM2-135M-Instruct through the README's main command, `make run`,
with a small recipe (one round, eight prompts), the way a new user's first run goes: no PREFECT_API_URL (the run's
own temporary Prefect server), and an empty HOME and PREFECT_HOME (so that server creates its database first, and
the bundled model is converted first), so neither first-run cost can break the first run again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from selfplay.runtime.rundir import RunDir
from tests.conftest import REPO

pytestmark = pytest.mark.e2e


@pytest.mark.timeout(1800)  # the first run on an empty HOME also converts the model and creates the database
def test_make_run_on_bundled_model(tmp_path):
    venv = Path(sys.prefix)
    out_dir = tmp_path / "runs"
    env = {**os.environ, "HOME": str(tmp_path / "home"), "PREFECT_HOME": str(tmp_path / "home" / ".prefect")}
    for name in ("PREFECT_API_URL", "SELFPLAY_CACHE", "XDG_CACHE_HOME"):
        env.pop(name, None)
    proc = subprocess.Popen(
        ["make", "run", f"VENV={venv}", "RECIPE=tests/recipes/bundled-smoke.yaml", f"ARGS=--set output_dir={out_dir}"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=1500)
    finally:
        if proc.poll() is None:  # timed out (here or pytest's): stop make and the run under it, leave nothing running
            os.killpg(proc.pid, signal.SIGTERM)
            proc.communicate(timeout=60)
    assert proc.returncode == 0, (stdout + stderr)[-4000:]
    assert (tmp_path / "home" / ".prefect" / "prefect.db").is_file()  # it was this run that created the database
    run = RunDir(out_dir / "bundled-smoke")
    assert run.completed_rounds() == [1]
    # The summary table and the run's path end the output.
    assert "win rate vs prev" in stdout and str(run.root.resolve()) in stdout

    samples = pd.read_parquet(run.stage_dir(1, "sample") / "samples.parquet")
    assert len(samples) == 8 * 4
    # A real instruct model answers: mostly non-empty text with words (or numbers, for arithmetic), and diverse
    # samples per prompt.
    assert (samples["response"].str.len() > 0).mean() > 0.9
    assert samples["response"].str.contains(r"[A-Za-z]{3,}|\d").mean() > 0.9
    assert samples.groupby("prompt_id")["response"].nunique().mean() > 1.5

    judge = run.manifest(1, "judge")["metrics"]
    assert judge["judged"] > 0 and judge["error_rate"] == 0
    train = run.manifest(1, "train")["metrics"]
    assert train["steps"] >= 1 and abs(train["initial_loss"] - 0.6931) < 0.01
    assert train["lora_b_norm"] > 0
    assert 0 < train["shared_prompt"]["positions"] < train["shared_prompt"]["unshared_positions"]

    # The checkpoint is a loadable model that still speaks.
    from selfplay.generation.local import generate
    from selfplay.inputs.models import load_causal_lm, load_tokenizer

    ckpt = run.checkpoint(1)
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "tokenizer.json").is_file()
    rows = generate(load_causal_lm(ckpt), load_tokenizer(ckpt), ["What is the capital of France?"],
                    num_samples=2, temperature=0.0 + 0.7, top_p=1.0, max_new_tokens=24, batch_size=2, seed=0)
    assert any("Paris" in r["response"] for r in rows)

    ev = run.manifest(1, "evaluate")["metrics"]
    assert ev["n"] == 4 and 0 <= ev["win_rate"] <= 1
