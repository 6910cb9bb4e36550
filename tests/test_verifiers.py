"""Verifiers, the sandbox the code verifier runs programs in, and the hybrid judge built on them: pure functions and
real subprocesses, no model."""

from __future__ import annotations

import json
import math
import textwrap

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from selfplay.config.backends import VerifierConfig
from selfplay.config.run import FilterConfig, GateConfig, load_config
from selfplay.evaluation.outcomes import accuracy_summary, gate_decision
from selfplay.evaluation.quality import accuracy_change
from selfplay.judging.calls import JudgeResult
from selfplay.judging.runner import judge_comparisons
from selfplay.judging.sandbox import run_python
from selfplay.judging.verdicts import Comparison, llm_count, verifier_verdict
from selfplay.judging.verifiers import (
    Verifier,
    VerifierError,
    choose_kind,
    code_score,
    exact_score,
    final_number,
    is_correct,
    number_score,
    regex_score,
    score_table,
    verifier_stats,
)
from selfplay.pairs.build import build_pairs, pair_comparisons
from selfplay.pairs.selection import select_pairs

pytestmark = pytest.mark.unit

numbers = st.integers(min_value=-10**7, max_value=10**7)


# ---------------------------------------------------------------- number

@given(numbers, st.sampled_from(["{}", "The answer is {}.", "{} apples", "So, 2 + 3 = {}", "**{}**", "x = 1; y = {}", "= {}!"]))
def test_number_the_final_number_written_any_way_is_correct(n, template):
    assert number_score(template.format(n), str(n)) == 1.0
    assert number_score(template.format(f"{n:,}"), str(n)) == 1.0  # thousands separators


@given(numbers, numbers, numbers)
def test_number_a_closer_wrong_answer_scores_higher_and_never_correct(ref, a, b):
    sa, sb = number_score(f"It is {a}", str(ref)), number_score(f"It is {b}", str(ref))
    if a != ref:
        assert 0 < sa < 0.5 and not is_correct(sa)
    if abs(a - ref) < abs(b - ref):
        assert sa >= sb


@given(numbers, numbers, st.sampled_from(["number", "exact"]))
def test_without_partial_credit_scores_are_right_or_wrong_and_agree_with_partial_credit(ref, got, kind):
    partial, binary = Verifier(VerifierConfig()), Verifier(VerifierConfig(partial_credit=False))
    response = f"The answer is {got}."
    full, flat = partial.score(kind, "q", response, str(ref)), binary.score(kind, "q", response, str(ref))
    assert flat in (0.0, 1.0)
    assert (flat == 1.0) == is_correct(full) == (got == ref)


@given(st.text(alphabet=st.characters(blacklist_categories=("Nd",)), max_size=40), numbers)
def test_number_no_number_scores_zero(text, ref):
    assert number_score(text, str(ref)) == 0.0


@given(st.floats(min_value=-1e6, max_value=1e6, allow_nan=False).map(lambda x: round(x, 3)))
def test_number_decimals_within_tolerance(x):
    assert number_score(f"about {x:.3f}", str(x), rel_tol=1e-6) == 1.0
    assert number_score(f"{x + 1:.3f}", str(x)) < 1.0


def test_number_forms_and_last_one_wins():
    assert final_number("3/4 of it") == 0.75 and final_number("50% off") == 50.0 and final_number("−7") == -7.0
    assert number_score("First 3, then 5, finally 8.", "8") == 1.0
    assert number_score("8, or rather 9", "8") < 1.0
    with pytest.raises(VerifierError, match="not a number"):
        number_score("8", "eight")


# ---------------------------------------------------------------- exact and regex

@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=1, max_size=12),
       st.sampled_from(["{}", "  {}  ", "**{}**.", "The answer is: {}", "Let me think.\n{}", "It prints `{}`", "{}!"]))
def test_exact_normalised_text_matches(word, template):
    assert exact_score(template.format(word), word.upper()) == 1.0


@given(st.text(alphabet="abc", min_size=1, max_size=6), st.text(alphabet="xyz", min_size=1, max_size=6))
def test_exact_other_text_does_not(word, other):
    assert exact_score(other, word) == 0.0


@given(st.text(max_size=20), st.text(max_size=20), st.text(max_size=20))
def test_regex_an_escaped_reference_matches_wherever_it_appears(before, needle, after):
    import re

    assert regex_score(before + needle + after, re.escape(needle)) == 1.0


def test_regex_bad_pattern_says_so():
    with pytest.raises(VerifierError, match="not a regular expression"):
        regex_score("x", "(")


# ---------------------------------------------------------------- choosing, python functions

def test_choose_kind_auto_number_exact_row_and_none():
    assert choose_kind("auto", "42") == "number" and choose_kind("auto", "Paris") == "exact"
    assert choose_kind("auto", "^a", "regex") == "regex" and choose_kind("exact", "42", "regex") == "exact"
    assert choose_kind("auto", None) is None and choose_kind("none", "42") is None and choose_kind("auto", float("nan")) is None
    with pytest.raises(VerifierError, match="not one of"):
        choose_kind("auto", "x", "fuzzy")


def test_python_verifier_calls_the_users_function_and_names_it_on_failure(tmp_path, monkeypatch):
    (tmp_path / "my_checks.py").write_text(textwrap.dedent("""
        def score(prompt, response, reference):
            return 1.0 if reference in response else 0.25
        def broken(prompt, response, reference):
            raise KeyError("oops")
        def too_big(prompt, response, reference):
            return 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    v = Verifier(VerifierConfig(kind="python", function="my_checks:score"))
    assert v.score("python", "q", "it is cat", "cat") == 1.0 and v.score("python", "q", "dog", "cat") == 0.25
    with pytest.raises(VerifierError, match=r"my_checks:broken' failed: KeyError"):
        Verifier(VerifierConfig(kind="python", function="my_checks:broken")).score("python", "q", "r", "x")
    with pytest.raises(VerifierError, match="not a score in"):
        Verifier(VerifierConfig(kind="python", function="my_checks:too_big")).score("python", "q", "r", "x")
    with pytest.raises(VerifierError, match="cannot import 'no_such_module'"):
        Verifier(VerifierConfig(kind="python", function="no_such_module:f"))
    with pytest.raises(ValueError, match="needs judge.verifier.function"):
        VerifierConfig(kind="python")


# ---------------------------------------------------------------- code, and the sandbox

GOOD = "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```\nHope it helps."
TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0"


def test_code_verifier_runs_the_program_against_the_tests():
    assert code_score(GOOD, TESTS) == 1.0
    assert code_score(GOOD.replace("a + b", "a - b"), TESTS) == 0.0
    assert code_score("def add(a, b): return a + b", TESTS) == 1.0  # no fence: the whole reply is the program
    assert code_score("I cannot write code.", TESTS) == 0.0


def test_sandbox_stops_an_infinite_loop_at_its_time_limit():
    result = run_python("while True:\n    pass", timeout_s=1.0)
    assert result.status == "timeout" and result.seconds < 5


def test_sandbox_stops_a_memory_blowup():
    result = run_python("x = bytearray(4 * 1024 ** 3)\nprint('allocated')", memory_mb=256)
    assert result.status != "ok" and "allocated" not in result.stdout


def test_sandbox_harms_no_file_outside_its_directory(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    for program in (f"import shutil; shutil.rmtree({str(victim)!r})", f"import os; os.remove({str(victim / 'keep.txt')!r})",
                    f"open({str(victim / 'keep.txt')!r}, 'w').write('gone')", f"import os; os.system('rm -rf {victim}')",
                    f"import subprocess; subprocess.run(['rm', '-rf', {str(victim)!r}])"):
        assert run_python(program).status == "error", program
    assert (victim / "keep.txt").read_text() == "precious"
    assert run_python("open('scratch.txt', 'w').write('ok')\nprint(open('scratch.txt').read())").stdout == "ok\n"


def test_sandbox_has_no_network_and_no_secrets(monkeypatch):
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-value")
    try:
        result = run_python(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')")
        assert result.status == "error" and "connected" not in result.stdout
        env = run_python("import os, json\nprint(json.dumps(dict(os.environ)))")
        assert env.status == "ok" and "sk-secret-value" not in env.stdout and "OPENAI_API_KEY" not in json.loads(env.stdout)
    finally:
        server.close()


def test_sandbox_refuses_forks_and_native_code():
    assert run_python("import os\nos.fork()").status == "error"
    assert run_python("import ctypes\nctypes.CDLL(None)").status == "error"


# ---------------------------------------------------------------- the hybrid judge

class CountingJudge:
    """A stand-in LLM judge (no model): always prefers position A, and records the prompts it was shown."""

    def __init__(self):
        self.prompts = []

    def judge(self, calls):
        self.prompts += [c.user for c in calls]
        return [JudgeResult(1.0, "logprobs") for _ in calls]


def judge_cfg(**verifier):
    return load_config(None, [f"judge.verifier.{k}={v}" for k, v in verifier.items()]).judge


def test_verifier_decides_where_scores_differ_and_the_llm_breaks_ties_with_the_reference():
    comps = [Comparison("2+2?", "4", "5", "4", 1.0, 0.4), Comparison("2+2?", "4", "four is 4", "4", 1.0, 1.0),
             Comparison("hi?", "hello", "hey")]
    judge = CountingJudge()
    judged = judge_comparisons(judge, comps, judge_cfg())
    assert [v["source"] for v in judged.verdicts] == ["verifier", "llm", "llm"]
    assert judged.verdicts[0]["verdict"] == "first" and judged.verdicts[0]["p_first"] == 1.0
    assert judged.verdicts[1]["verdict"] == "tie" and judged.verdicts[2]["verdict"] == "tie"  # always-A cancels
    assert len(judge.prompts) == len(judged.results) == 4  # two orders of each LLM comparison, none for the verifier's
    assert "<reference_answer>\n4\n</reference_answer>" in judge.prompts[0]
    assert "reference_answer" not in judge.prompts[2]


def test_fallback_none_makes_equal_scores_a_tie_without_calls():
    comps = [Comparison("q", "4", "4.0", "4", 1.0, 1.0)]
    assert llm_count(comps, judge_cfg(fallback="none")) == 0
    assert verifier_verdict(comps[0], "none")["verdict"] == "tie"
    judged = judge_comparisons(None, comps, judge_cfg(fallback="none"))  # no judge at all is needed
    assert judged.verdicts[0]["source"] == "verifier" and judged.results == []


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=20), min_size=3, max_size=8))
def test_tournament_with_a_verifier_needs_k_calls_and_trains_on_right_against_wrong(answers):
    k, reference = len(answers), "7"
    samples = pd.DataFrame({"prompt_id": "p", "prompt": "What is 3 + 4?", "reference": reference, "verifier": "number",
                            "sample_idx": range(k), "response": [f"The answer is {a}" + "." * i for i, a in enumerate(answers)],
                            "truncated": False})
    scored = score_table(Verifier(VerifierConfig()), samples)
    assert verifier_stats(scored)["verifier_calls"] == k
    pairs = build_pairs(scored, "tournament", 0, FilterConfig(max_similarity=1.0))
    comps = pair_comparisons(pairs, "tournament")
    judge = CountingJudge()
    cfg = judge_cfg()
    judged = judge_comparisons(judge, comps, cfg)
    scores = scored["verify_score"].tolist()
    if len(set(scores)) > 1:
        assert judge.prompts == []  # the verifier's K scores decide the whole tournament
        from selfplay.pairs.build import judgments_table

        out = select_pairs(judgments_table(pairs, judged.verdicts), "tournament")
        kept = out[out["kept"]]
        assert len(kept) == 1
        best, worst = max(scores), min(scores)
        chosen_score = number_score(kept["chosen"].iloc[0], reference)
        assert chosen_score == best and number_score(kept["rejected"].iloc[0], reference) == worst
    else:
        assert len(judge.prompts) == 2 * len(comps)  # all equal: the LLM judges, both orders


def test_all_pairs_with_a_verifier_asks_the_llm_only_for_equal_scores():
    samples = pd.DataFrame({"prompt_id": "p", "prompt": "3+4?", "reference": "7", "verifier": None, "sample_idx": range(4),
                            "response": ["7", "It is 7", "8", "6 maybe"], "truncated": False})
    pairs = build_pairs(score_table(Verifier(VerifierConfig()), samples), "all_pairs", 0, FilterConfig(max_similarity=1.0))
    comps = pair_comparisons(pairs, "all_pairs")
    assert len(comps) == 6 and llm_count(comps, judge_cfg()) == 2  # (7, It is 7), and (8, 6 maybe): as far off either side


# ---------------------------------------------------------------- accuracy and the gate

@given(st.lists(st.booleans(), min_size=1, max_size=200))
def test_accuracy_interval_contains_the_accuracy(correct):
    s = accuracy_summary([1.0 if c else 0.0 for c in correct])
    assert s["n"] == len(correct) and s["ci_low"] <= s["accuracy"] <= s["ci_high"]


@given(st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=100))
def test_mcnemar_p_value_is_a_probability_and_swapping_never_helps_the_loser(pairs):
    new, old = [a for a, _ in pairs], [b for _, b in pairs]
    change = accuracy_change(new, old)
    assert 0 < change["p_value"] <= 1
    mirrored = accuracy_change(old, new)
    if change["previous_only"] > change["new_only"]:
        assert change["p_value"] <= mirrored["p_value"]


def test_gate_rejects_a_significant_accuracy_drop_and_only_that():
    vs = {"n": 16, "win_rate": 0.5, "ci_low": 0.3, "ci_high": 0.7}
    drop = accuracy_change([False] * 20 + [True] * 30, [True] * 50)
    accepted, reason = gate_decision({**vs, "accuracy_change": drop}, GateConfig())
    assert not accepted and "held-out accuracy fell from 1.000 to 0.600" in reason
    assert gate_decision({**vs, "accuracy_change": drop}, GateConfig(accuracy=False))[0]
    small = accuracy_change([False] + [True] * 49, [True] * 50)
    accepted, reason = gate_decision({**vs, "accuracy_change": small}, GateConfig())
    assert accepted and "0.980" in reason
    assert math.isclose(small["p_value"], 0.5)


def test_score_table_reads_old_samples_without_reference_columns():
    old = pd.DataFrame({"prompt": ["q"], "response": ["r"]})
    scored = score_table(Verifier(VerifierConfig()), old)
    assert scored["verifier"].tolist() == [None] and scored["verify_score"].isna().all()
    assert verifier_stats(scored)["sample_accuracy"] is None


def test_a_truncated_response_has_no_final_answer():
    samples = pd.DataFrame({"prompt_id": "p", "prompt": "3+4?", "reference": "7", "sample_idx": [0, 1, 2],
                            "response": ["7", "7 is the answer, and also", "7, or"], "truncated": [False, True, True]})
    scored = score_table(Verifier(VerifierConfig()), samples)
    assert scored["verify_score"].tolist() == [1.0, 0.0, 0.0]
    pairs = build_pairs(scored, "all_pairs", 0, FilterConfig(max_similarity=1.0, drop_truncated=True))
    # the verifier decides (finished beats cut off); two cut-off answers would need the LLM, so they are screened
    assert pairs["screened"].fillna("").tolist() == ["", "", "truncated"]
