"""The report templates (selfplay/reporting/templates/*.j2): shipped in the wheel and found from an installed copy, the
markdown round report's layout (verbatim text, no HTML escaping), and strict rendering (a value the template names
but the caller left out is an error, never an empty string)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import jinja2
import pytest

from selfplay.reporting.report import round_report, round_report_context, templates

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]

SUMMARY = {"round": 2, "kept": 4, "candidate_pairs": 6, "gate_reason": "rejected: win rate <b>0.375</b> < 0.5 & falling",
           "checkpoint": "/runs/demo/round_2/train/checkpoint",
           "quality_warnings": [{"check": "length_bias", "value": 0.71, "threshold": 0.65, "message": "chosen is longer <b>"}],
           "training_warnings": [], "pathology_warnings": [{"check": "repetition", "value": 0.2, "threshold": 0.1, "message": "rising"}]}
JUDGE = {"judged": 5, "sources": {"verifier": 4, "llm": 1}, "sample_accuracy": 0.25, "position_consistency": 0.8,
         "first_position_win_rate": 0.55, "tie_rate": 0.2, "error_rate": 0.0, "cache_hits": 3}
TRAIN = {"steps": 5, "initial_loss": 0.6931, "final_loss": 0.5123456}
EVALUATE = {"win_rate": 0.375, "wins": 3, "ties": 0, "losses": 5, "ci_low": 0.1, "ci_high": 0.7, "vs_base": {"win_rate": 0.5},
            "mean_tokens_new": 31.0}


def test_round_report_lays_out_every_section_verbatim():
    text = round_report("demo", SUMMARY, JUDGE, TRAIN, EVALUATE, b"\x89PNG fake")
    blocks = text.rstrip("\n").split("\n\n")
    assert blocks[0] == "# demo: round 2"
    # markdown is not HTML: the user's text goes through unescaped
    assert blocks[1] == "**Gate:** rejected: win rate <b>0.375</b> < 0.5 & falling"
    assert blocks[2] == ("Kept **4** of 6 candidate pairs; win rate against the previous checkpoint **0.375** "
                         "(3 wins, 0 ties, 5 losses).")
    assert [b for b in blocks if b.startswith("## ")] == ["## Judge", "## Training", "## Evaluation", "## Warnings"]
    judge_table = blocks[blocks.index("## Judge") + 1].splitlines()
    assert judge_table[:2] == ["| | |", "|---|---|"] and len(judge_table) == 2 + 12  # the judge audit line among them
    assert "| decided by the verifier / by the LLM | 4 / 1 |" in judge_table and "| samples correct | 0.25 |" in judge_table
    assert "| invalid rate | - |" in judge_table and "| cache hits | 3 |" in judge_table
    assert "| final loss | 0.5123 |" in text and "| 95% Wilson interval | [0.1, 0.7] |" in text
    assert "| mean answer tokens (new / current) | 31 / - |" in text
    assert "![training curves](data:image/png;base64,iVBORyBmYWtl)" in blocks
    warnings = blocks[blocks.index("## Warnings") + 1].splitlines()
    assert warnings == ["- **length_bias** (0.71, threshold 0.65): chosen is longer <b>",
                        "- **repetition** (0.2, threshold 0.1): rising"]
    assert blocks[-1] == "Checkpoint: `/runs/demo/round_2/train/checkpoint`"


def test_round_report_without_warnings_says_none():
    text = round_report("demo", {**SUMMARY, "quality_warnings": [], "pathology_warnings": []}, JUDGE, TRAIN, EVALUATE, b"")
    assert "## Warnings\n\nnone\n\nCheckpoint:" in text


def test_a_missing_value_fails_the_render():
    context = round_report_context("demo", SUMMARY, JUDGE, TRAIN, EVALUATE, b"")
    del context["checkpoint"]
    with pytest.raises(jinja2.UndefinedError, match="checkpoint"):
        templates().get_template("round_report.md.j2").render(context)


def test_autoescape_is_on_for_html_and_off_for_markdown():
    assert templates().autoescape("report.html.j2") is True
    assert templates().autoescape("round_report.md.j2") is False


@pytest.mark.stage
def test_templates_are_found_from_an_installed_wheel(tmp_path):
    """Build the wheel from a copy of the source, unpack it as site-packages would hold it, and render both reports
    there in a fresh interpreter: the templates come from the installed copy, not from this checkout."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for package in ("selfplay", "flows", "tasks", "tools"):
        shutil.copytree(REPO / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(tmp_path / "dist"), str(src)], check=False, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = (tmp_path / "dist").glob("selfplay-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "selfplay/reporting/templates/report.html.j2" in names and "selfplay/reporting/templates/round_report.md.j2" in names
    assert "selfplay/data/prompts/train.jsonl" in names and "selfplay/runtime/hooks.py" in names
    assert not [n for n in names if n.startswith(("tools/", "tests/"))]  # developer tools stay in the checkout
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)

    empty_run = tmp_path / "runs" / "empty-run"
    empty_run.mkdir(parents=True)
    probe = textwrap.dedent(f"""
        from pathlib import Path
        import selfplay, selfplay.reporting.report as report
        from selfplay.reporting.html_report import render
        assert Path(selfplay.__file__).is_relative_to({str(site)!r}), selfplay.__file__
        from selfplay.inputs.prompts import BUNDLED_DIR
        assert BUNDLED_DIR.is_relative_to({str(site)!r}) and (BUNDLED_DIR / "train.jsonl").is_file(), BUNDLED_DIR
        md = report.round_report("installed", {SUMMARY!r}, {JUDGE!r}, {TRAIN!r}, {EVALUATE!r}, b"")
        page = render(Path({str(empty_run)!r}))
        print(md.splitlines()[0])
        print([line for line in page.splitlines() if line.startswith("<h1>")][0])
    """)
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site), "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", probe], check=False, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines() == ["# installed: round 2", "<h1>Self-play run empty-run</h1>"]


def test_round_report_states_held_out_accuracy_beside_the_win_rate():
    summary = {**SUMMARY, "accuracy": 0.35, "accuracy_ci": [0.29, 0.42], "accuracy_n": 200, "accuracy_previous": 0.3,
               "accuracy_previous_ci": [0.24, 0.37]}
    text = round_report("demo", summary, JUDGE, TRAIN, EVALUATE, b"")
    assert ("(3 wins, 0 ties, 5 losses). Held-out accuracy **0.350 [0.29, 0.42]** on 200 checkable prompts (current "
            "checkpoint 0.300 [0.24, 0.37]).") in text
    assert "| held-out accuracy, new [95% CI] | 0.350 [0.29, 0.42] |" in text
