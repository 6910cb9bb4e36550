"""The standalone HTML report (selfplay/reporting/html_report.py) on a synthetic run directory laid out by RunDir.stage_output.

The run has four rounds: 1 accepted with everything; 2 rejected by the gate, with warnings, pathology figures, a CI
and a response carrying <script>; 3 complete but without evaluate and without a training log; 4 incomplete (sample
only). Unit tier, except a last test (stage tier) that renders the page in headless Chromium and checks the
screenshot: Chromium is installed on first use (tests/browser.py), so the check runs whatever order the tests run in.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import time
from pathlib import Path

import markupsafe
import pandas as pd
import pytest

from selfplay.reporting.html_report import write_report
from selfplay.reporting.report import summarize_round
from selfplay.runtime.rundir import RunDir, write_json_atomic
from tests.browser import CHROMIUM, ensure_chromium

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SCRIPT = "<script>alert(1)</script>"
GATE_REASON = "win rate 0.375 vs previous is below the gate's 0.5 (CI [0.21, 0.56] includes 0.5)"


def log_history(steps: int = 5, seed: float = 0.0) -> list[dict]:
    """A small TRL-like DPO log history: per-step entries, then the Trainer's closing summary."""
    history = []
    for s in range(1, steps + 1):
        margin = 0.05 * s + seed
        history.append({
            "loss": 0.6931 - 0.04 * s - seed, "grad_norm": 1.5 / s + 0.1, "learning_rate": 5e-5 * (1 - s / (steps + 1)),
            "rewards/chosen": 0.02 * s, "rewards/rejected": 0.02 * s - margin, "rewards/margins": margin,
            "rewards/accuracies": min(1.0, 0.5 + 0.1 * s), "logps/chosen": -40.0 + s, "logps/rejected": -42.0 - s,
            "epoch": s / steps, "step": s,
        })
    history.append({"train_runtime": 3.2, "train_loss": 0.6, "epoch": 1.0, "step": steps})
    return history


def pairs_table(k: int, special: str | None = None) -> pd.DataFrame:
    rows = []
    for n in range(5):
        kept = n < 4
        r1, r2 = f"Round {k} answer A{n}: a careful, complete reply.", f"Round {k} answer B{n}: short."
        if special and n == 0:
            r1 = f"Here is some code {special} and a <b>bold</b> claim & more."
        rows.append({
            "prompt_id": f"p{n}", "prompt": f"Prompt {n} of round {k}: explain <tags> & things.", "i": 0, "j": 1,
            "response_1": r1, "response_2": r2, "truncated_1": False, "truncated_2": False, "similarity": 0.3,
            "screened": None, "p_a_order1": 0.8, "p_a_order2": 0.3, "p_first": 0.75, "margin": 0.5,
            "verdict": "first" if kept else "tie", "consistent": kept, "mode": "logprob", "error": None,
            "drop_reason": None if kept else "tie", "chosen": r1 if kept else None, "rejected": r2 if kept else None,
            "kept": kept,
        })
    return pd.DataFrame(rows)


def eval_table(k: int, special: str | None = None) -> pd.DataFrame:
    rows = []
    for n, outcome in enumerate(["win", "loss", "tie"]):
        new = f"New model (round {k}) on eval prompt {n}."
        if special and n == 0:
            new = f"I will now run {special} in your browser"
        rows.append({"prompt_id": f"e{n}", "prompt": f"Eval prompt {n}", "response_new": new,
                     "response_other": f"Previous model on eval prompt {n}.", "verdict": {"win": "first", "loss": "second"}.get(outcome, "tie"),
                     "outcome": outcome})
    return pd.DataFrame(rows)


def write_stages(run: RunDir, k: int, *, evaluate: bool = True, history: bool = True, special: str | None = None,
                 win_rate: float = 0.625, upto: str = "evaluate") -> None:
    """Write round k's stage outputs as the stages do (parquet + metrics in the manifest via stage_output)."""
    with run.stage_output(k, "sample", {"policy": "base"}) as (out, manifest):
        pd.DataFrame({"prompt": ["p"] * 12, "response": ["r"] * 12, "truncated": [False] * 12}).to_parquet(out / "samples.parquet")
        manifest["metrics"] = {"prompts": 4, "completions": 12, "truncated": 1, "mean_tokens": 30.0, "tokens_per_second": 100.0, "seconds": 1.0}
    if upto == "sample":
        return
    with run.stage_output(k, "judge", {"judge": "local"}) as (out, manifest):
        judged = pairs_table(k, special).drop(columns=["drop_reason", "chosen", "rejected", "kept"])
        judged.to_parquet(out / "judgments.parquet", index=False)
        manifest["metrics"] = {"pairs": 6, "judged": 5, "position_consistency": 0.8, "first_position_win_rate": 0.55,
                               "tie_rate": 0.2, "invalid_rate": 0.0, "error_rate": 0.0, "verdicts": {"first": 4, "tie": 1}}
    with run.stage_output(k, "filter") as (out, manifest):
        pairs = pairs_table(k, special)
        pairs.to_parquet(out / "pairs.parquet", index=False)
        manifest["metrics"] = {"pairs": 5, "kept": 4, "drops": {"empty": 0, "tie": 1, "too_similar": 0}}
    with run.stage_output(k, "train", {"policy": "base"}) as (out, manifest):
        metrics = {"steps": 0, "pairs": 4}
        if history:
            h = log_history(seed=0.01 * k)
            (out / "log_history.json").write_text(json.dumps(h, indent=1))
            steps = [x for x in h if "loss" in x]
            metrics.update(steps=len(steps), initial_loss=steps[0]["loss"], final_loss=steps[-1]["loss"],
                           reward_accuracy=0.75, reward_margin=0.15)
        manifest["metrics"] = metrics
    if evaluate:
        with run.stage_output(k, "evaluate", {"previous": "base"}) as (out, manifest):
            eval_table(k, special).to_parquet(out / "eval.parquet", index=False)
            manifest["metrics"] = {"n": 8, "wins": 4, "ties": 2, "losses": 2, "errors": 0, "win_rate": win_rate,
                                   "mean_tokens_new": 31.0, "mean_tokens_previous": 29.0}


@pytest.fixture()
def run_root(tmp_path) -> Path:
    root = tmp_path / "runs" / "html-demo"
    run = RunDir(root)
    root.mkdir(parents=True)
    write_json_atomic(root / "run.json", {"config": {"name": "html-demo", "rounds": 4}, "base_model": "Qwen/Qwen2.5-0.5B-Instruct",
                                          "created_at": time.time() - 3600, "provenance": PROVENANCE,
                                          "resumed_under": [{"at": time.time(), "changes": ["torch 2.13.0 -> 2.14.1"]}]})
    # round 1: everything, accepted
    write_stages(run, 1)
    run.finish_round(1, {**summarize_round(run, 1), "accepted": True, "gate_reason": "win rate 0.625 >= 0.5",
                         "win_rate_ci": [0.41, 0.81], "lc_win_rate": 0.6, "win_rate_vs_base": 0.625})
    # round 2: rejected by the gate, with warnings, pathologies and a hostile response
    write_stages(run, 2, special=SCRIPT, win_rate=0.375)
    run.finish_round(2, {
        **summarize_round(run, 2), "accepted": False, "gate_reason": GATE_REASON, "win_rate_ci": [0.21, 0.56],
        "lc_win_rate": 0.4, "win_rate_vs_base": 0.52,
        "quality_warnings": [{"check": "length_bias", "value": 0.71, "threshold": 0.65,
                              "message": "chosen responses are longer in 71% of kept pairs <b>"}],
        "training_warnings": [{"check": "loss_not_decreasing", "value": 0.69, "threshold": 0.68,
                               "message": "final loss is still near ln 2"}],
        "pathologies": {"repetition_rate": 0.12, "refusal_rate": 0.03, "mean_length_ratio": 1.4},
    })
    # round 3: complete, but no evaluate stage and no training log (a run without evaluate)
    write_stages(run, 3, evaluate=False, history=False)
    partial = {"round": 3, "completions": 12, "judged": 5, "kept": 4, "position_consistency": 0.8, "dpo_loss": None,
               "reward_accuracy": None, "win_rate": None, "drops": {"tie": 1}}
    run.finish_round(3, partial)
    # round 4: incomplete (sample only, a crashed attempt's leftovers)
    write_stages(run, 4, upto="sample")
    (run.round_dir(4) / "judge.tmp-99999").mkdir()
    return root


def data_uri_pngs(text: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)]


PROVENANCE = {"commit": "0123456789abcdef", "dirty": False, "python": "3.11.7", "libraries": {"torch": "2.13.0", "trl": "1.16.0"},
              "device": "CPU: test, 2 cores"}


def test_report_contents(run_root):
    out = write_report(run_root)
    assert out == run_root / "report.html" and out.is_file()
    assert not list(run_root.glob(".report.html.tmp-*"))
    text = out.read_text(encoding="utf-8")

    assert "html-demo" in text and "Qwen/Qwen2.5-0.5B-Instruct" in text
    # what produced the run, and what it was continued under
    assert "produced by: commit 0123456789ab, Python 3.11.7, torch 2.13.0, trl 1.16.0; device CPU: test, 2 cores" in text
    assert re.search(r"continued under: \d{4}-\d\d-\d\d [\d:]+ UTC: torch 2\.13\.0 -&gt; 2\.14\.1", text)
    assert "<b>3</b> completed round(s)" in text
    for k in (1, 2, 3, 4):
        assert f'id="round-{k}"' in text and f"Round {k}" in text
    # the gate reason, escaped (its apostrophe too, as Jinja2 writes it), in the table, the round section and the gate-decisions section
    assert text.count(str(markupsafe.escape(GATE_REASON))) >= 3 and "gate&#39;s" in text
    assert "no gate decision recorded" in text  # round 3
    assert "incomplete" in text  # round 4
    assert "[0.21, 0.56]" in text and "0.400" in text  # CI, LC win rate
    assert "length_bias" in text and "loss_not_decreasing" in text and "repetition_rate" in text

    # one PNG per round with a training log (rounds 1 and 2), each a real PNG
    pngs = data_uri_pngs(text)
    assert len(pngs) == 2
    assert all(p.startswith(PNG_SIGNATURE) and len(p) > 2000 for p in pngs)

    # no raw markup from the data; the escaped text is there instead
    assert "<script>alert" not in text and "<script" not in text.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "<b>bold</b>" not in text and "&lt;b&gt;bold&lt;/b&gt;" in text
    assert "kept pairs <b>" not in text
    # standalone: nothing fetched from elsewhere
    assert not re.search(r'(src|href)="(https?:)?//', text)
    assert "<link" not in text


def test_report_custom_path_and_empty_run(tmp_path, run_root):
    out = write_report(run_root, tmp_path / "elsewhere" / "r.html")
    assert out.is_file() and "html-demo" in out.read_text()
    empty = tmp_path / "runs" / "empty"
    empty.mkdir(parents=True)
    text = write_report(empty).read_text()
    assert "<b>0</b> completed round(s)" in text and "no rounds yet" in text


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_SIGNATURE and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


@pytest.mark.stage  # a real browser, installed on first use
def test_report_renders_in_chromium(run_root, tmp_path):
    ensure_chromium()  # apt-get installs it where it is missing and we are root; elsewhere the test says why it skips
    html_path = write_report(run_root)
    shot = tmp_path / "report.png"
    cmd = [str(CHROMIUM), "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1400,2000", f"--screenshot={shot}",
           f"file://{html_path.resolve()}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # this test's own Chromium and its children
        proc.communicate()
        pytest.fail("headless Chromium did not finish the screenshot within 60 s")
    log = output.decode(errors="replace")[-2000:]
    assert shot.is_file(), f"no screenshot (rc {proc.returncode}):\n{log}"
    assert shot.stat().st_size > 20_000, f"screenshot is {shot.stat().st_size} bytes: a blank page?\n{log}"
    width, height = png_size(shot)
    assert width == 1400 and height > 0
    saved = REPO / "test-output" / "report-screenshot.png"
    saved.parent.mkdir(exist_ok=True)
    shutil.copyfile(shot, saved)


def test_untrusted_text_is_escaped_wherever_it_appears(tmp_path):
    """Every text the run supplies (name, model, gate reason, warning, checkpoint, prompt, responses) carries a
    <script>; none reaches the page as markup, and each shows up escaped."""
    root = tmp_path / "runs" / "hostile"
    run = RunDir(root)
    root.mkdir(parents=True)
    write_json_atomic(root / "run.json", {"config": {"name": f"n{SCRIPT}", "rounds": 1}, "base_model": f"m{SCRIPT}",
                                          "provenance": {**PROVENANCE, "device": f"d{SCRIPT}"},
                                          "resumed_under": [{"at": 0, "changes": [f"r{SCRIPT}"]}]})
    write_stages(run, 1, special=SCRIPT)
    pairs = pairs_table(1, SCRIPT).assign(prompt=f"prompt {SCRIPT}")
    pairs.to_parquet(run.stage_dir(1, "filter") / "pairs.parquet", index=False)
    run.finish_round(1, {**summarize_round(run, 1), "accepted": False, "gate_reason": f"rejected: {SCRIPT}", "checkpoint": f"c{SCRIPT}",
                         "quality_warnings": [{"check": f"k{SCRIPT}", "message": f"w{SCRIPT}"}, f"plain {SCRIPT}"]})
    text = write_report(root).read_text(encoding="utf-8")
    assert "<script" not in text.lower()
    escaped = re.escape(str(markupsafe.escape(SCRIPT)))
    # title, h1, footer (name); model; provenance and resume; reason in table, section and gate list; checkpoint;
    # 2 warnings' 3 texts; the 3 shown pairs' prompts and the first one's chosen answer; the first shown eval prompt's new answer
    found = len(re.findall(escaped, text))
    assert found == 3 + 1 + 2 + 3 + 1 + 3 + 3 + 1 + 1, found


def test_report_shows_held_out_accuracy_from_round_0_with_a_plot(tmp_path):
    root = tmp_path / "runs" / "acc"
    run = RunDir(root)
    root.mkdir(parents=True)
    write_json_atomic(root / "run.json", {"config": {"name": "acc", "rounds": 2}, "base_model": "bundled", "created_at": time.time()})
    for k, (before, after) in ((1, (0.25, 0.31)), (2, (0.31, 0.36))):
        write_stages(run, k)
        accuracy = {"accuracy": after, "ci_low": after - 0.06, "ci_high": after + 0.07, "n": 150}
        previous = {"accuracy": before, "ci_low": before - 0.06, "ci_high": before + 0.07, "n": 150}
        run.finish_round(k, {**summarize_round(run, k), "accepted": True, "gate_reason": "ok", "accuracy": after,
                             "accuracy_ci": [accuracy["ci_low"], accuracy["ci_high"]], "accuracy_previous": before,
                             "accuracy_previous_ci": [previous["ci_low"], previous["ci_high"]],
                             "verdict_sources": {"verifier": 20 + k, "llm": 3}})
    text = write_report(root).read_text(encoding="utf-8")
    assert "held-out accuracy [95% CI]" in text and "starting model" in text
    assert "0.250 [0.19, 0.32]" in text and "0.310 [0.25, 0.38]" in text and "0.360 [0.30, 0.43]" in text
    assert "21 / 3" in text and "22 / 3" in text  # decided by the verifier / by the LLM
    assert 'alt="held-out accuracy per round, with 95% intervals"' in text
    assert len(data_uri_pngs(text)) == 3  # two rounds' training curves and the accuracy plot
    from selfplay.reporting.report import lineage_rows

    rows = lineage_rows(root.parent)  # the lineage table artifact's rows
    assert [(r["round"], r["accuracy"], r["accuracy_ci"]) for r in rows] == [(1, 0.31, "0.310 [0.25, 0.38]"), (2, 0.36, "0.360 [0.30, 0.43]")]
