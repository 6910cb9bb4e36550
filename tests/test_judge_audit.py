"""The judge audit in the judge stage (tasks/judge.py) and what acts on it (tasks/filter.py): judges of known quality,
asked about comparisons the verifier decides. On the endpoint path, the checking judge (tools/checking_judge.py) is a
real judge for numeric questions; the others are FAKE judges (tests/openai_stub.py) scripted to a known bias, since no
real model is reliably biased one way. On the local path, the real bundled 135M model judges through transformers."""

from __future__ import annotations

import random
import re

import pandas as pd
import pytest

import tasks.filter
import tasks.judge
from selfplay.config.run import build_config
from selfplay.judging.verdicts import JudgeFailed
from selfplay.runtime.rundir import RunDir
from tests.conftest import assume_probed
from tests.openai_stub import Reply, ScriptedOpenAI, chat_completion
from tools.checking_judge import CheckingJudge

pytestmark = pytest.mark.stage

# Sums with a numeric reference: the right answer is short, the wrong ones long, so a judge that prefers length is
# wrong wherever the verifier decides; and open prompts (no reference) the LLM judge decides.
SUMS = [(a, b) for a, b in zip(range(3, 15), range(20, 32))]
OPEN = ["Name a colour.", "Write one word about the sea."]


def samples() -> pd.DataFrame:
    rows = []
    for n, (a, b) in enumerate(SUMS):
        answers = [f"{a + b}", f"I think that the sum of these two numbers is {a + b + 7}, after adding", f"Well, it is {a + b + 30}, surely."]
        rows += [{"prompt_id": f"s{n}", "prompt": f"What is {a} + {b}?", "reference": str(a + b), "verifier": None, "sample_idx": i,
                  "response": r, "prompt_tokens": 10, "n_tokens": len(r.split()), "truncated": False} for i, r in enumerate(answers)]
    for n, prompt in enumerate(OPEN):
        answers = ["Blue.", "A deep and endless blue, like the sea on a bright summer morning."]
        rows += [{"prompt_id": f"o{n}", "prompt": prompt, "reference": None, "verifier": None, "sample_idx": i, "response": r,
                  "prompt_tokens": 10, "n_tokens": len(r.split()), "truncated": False} for i, r in enumerate(answers)]
    return pd.DataFrame(rows)


def judge_round(tmp_path, base_url: str, model: str, verifier: str = "auto", **audit):
    judge = {"backend": "endpoint", "cache": False, "endpoint": {"base_url": base_url, "model": model, "max_concurrency": 4}}
    return judge_with(tmp_path, {**judge, "verifier": {"kind": verifier}}, audit)


def judge_with(tmp_path, judge: dict, audit: dict, **top):
    cfg = build_config({"name": "audit", "output_dir": str(tmp_path), "rounds": 1, **top,
                        "judge": {"margin": 0.0, "audit": {"size": 24, **audit}, **judge},
                        "filter": {"drop_truncated": False, "max_similarity": 0.99}})
    run = RunDir(cfg.run_dir)
    run.stage_dir(1, "sample").mkdir(parents=True, exist_ok=True)
    samples().to_parquet(run.stage_dir(1, "sample") / "samples.parquet", index=False)
    tasks.judge.judge.fn(cfg, 1, reference="unused")
    return cfg, run, run.manifest(1, "judge")["metrics"]


def fenced(user: str, tag: str) -> str:
    return re.search(rf"<{tag}>\n(.*?)\n</{tag}>", user, re.S).group(1)


def always_a(body: dict, n: int) -> Reply:
    return Reply(json=chat_completion("A", logprobs={"A": -0.05, "B": -3.0}))


def prefers_longer(body: dict, n: int) -> Reply:
    user = body["messages"][-1]["content"]
    win = "A" if len(fenced(user, "response_A")) >= len(fenced(user, "response_B")) else "B"
    return Reply(json=chat_completion(win, logprobs={win: -0.05, "B" if win == "A" else "A": -3.0}))


def coin(seed: int):
    rng = random.Random(seed)

    def reply(body: dict, n: int) -> Reply:
        win = rng.choice("AB")
        return Reply(json=chat_completion(win, logprobs={win: -0.05, "B" if win == "A" else "A": -3.0}))
    return reply


def test_the_checking_judge_agrees_with_the_verifier(tmp_path):
    with CheckingJudge(process=False) as judge:
        assume_probed(judge.base_url, judge.model)  # the checking judge answers judge prompts only
        _, run, metrics = judge_round(tmp_path, judge.base_url, judge.model)
    audit = metrics["audit"]
    assert audit["answered"] == 24 and audit["agreement"] == 1.0 and audit["informative"] is True and audit["ci"][0] > 0.85
    assert "informative (better than chance)" in metrics["audit_line"]
    table = pd.read_parquet(run.stage_dir(1, "judge") / "audit.parquet")
    assert len(table) == 24 and (table["verdict"] == table["truth"]).all()
    judgments = pd.read_parquet(run.stage_dir(1, "judge") / "judgments.parquet")
    assert (judgments.loc[judgments["reference"].notna(), "source"] == "verifier").all()  # the audit changed no label


def test_a_judge_that_always_answers_a_is_at_chance_and_on_chance_fail_stops_the_stage(tmp_path):
    with ScriptedOpenAI(always_a) as server:
        assume_probed(server.base_url, "judge")
        _, _, metrics = judge_round(tmp_path / "warn", server.base_url, "judge")
        assert metrics["audit"]["agreement"] == 0.5 and metrics["audit"]["informative"] is False
        assert metrics["audit"]["tie_rate"] == 1.0 and "not better than chance" in metrics["audit_line"]
        with pytest.raises(JudgeFailed, match=r"not better than chance.*judge.audit.on_chance=fail"):
            judge_round(tmp_path / "fail", server.base_url, "judge", on_chance="fail")
    assert not RunDir(tmp_path / "fail" / "audit").is_done(1, "judge")


def test_a_length_biased_judge_is_caught_by_the_split_and_on_chance_drop_trains_on_the_verifier_only(tmp_path):
    with ScriptedOpenAI(prefers_longer) as server:
        assume_probed(server.base_url, "judge")
        cfg, run, metrics = judge_round(tmp_path, server.base_url, "judge", on_chance="drop")
    audit = metrics["audit"]
    assert audit["agreement"] < 0.5 and audit["informative"] is False
    assert audit["longer_right"]["agreement"] == 1.0 and audit["shorter_right"]["agreement"] == 0.0  # the split shows the bias
    assert audit["longer_right"]["n"] + audit["shorter_right"]["n"] == 24
    assert "than chance" in metrics["audit_line"] and "0.00 when the shorter response is right" in metrics["audit_line"]
    tasks.filter.filter_pairs.fn(cfg, 1)
    pairs = pd.read_parquet(run.stage_dir(1, "filter") / "pairs.parquet")
    assert set(pairs.loc[pairs["kept"], "source"]) == {"verifier"}
    assert (pairs.loc[pairs["source"] == "llm", "drop_reason"] == "judge_at_chance").sum() == len(OPEN)


def test_an_audit_of_size_0_asks_nothing(tmp_path):
    with ScriptedOpenAI(always_a) as server:
        assume_probed(server.base_url, "judge")
        _, _, metrics = judge_round(tmp_path, server.base_url, "judge", size=0)
        assert server.count == 2 * len(OPEN)  # the open prompts' comparisons only
    assert metrics["audit"]["comparisons"] == 0 and "no ground truth" in metrics["audit_line"]


def test_a_judge_that_flips_coins_is_at_chance(tmp_path):
    with ScriptedOpenAI(coin(7)) as server:
        assume_probed(server.base_url, "judge")
        _, _, metrics = judge_round(tmp_path, server.base_url, "judge", on_chance="drop")
    audit = metrics["audit"]
    assert audit["answered"] == 24 and audit["informative"] is False and audit["ci"][0] < 0.5 < audit["ci"][1]
    assert 0 < audit["tie_rate"] < 1 and 0 < audit["position_consistency"] < 1  # it answers both ways, at random


def test_with_no_verifier_deciding_the_auto_verifier_still_checks_the_judge(tmp_path):
    """judge.verifier.kind none: the LLM judges every prompt, those with a reference too; the audit's truth is then the
    'auto' verifier, which decides no label."""
    with CheckingJudge(process=False) as judge:
        assume_probed(judge.base_url, judge.model)
        _, run, metrics = judge_round(tmp_path, judge.base_url, judge.model, verifier="none")
    assert metrics["sources"]["verifier"] == 0 and metrics["audit"]["truth"] == "auto verifier (audit only)"
    assert metrics["audit"]["answered"] == 24 and metrics["audit"]["agreement"] == 1.0
    assert "checked by the 'auto' verifier" in metrics["audit_line"]
    judgments = pd.read_parquet(run.stage_dir(1, "judge") / "judgments.parquet")
    assert set(judgments["source"].dropna()) == {"llm"}


def test_the_bundled_model_judging_locally_is_audited(tmp_path):
    """The local path: the real bundled 135M model judges through transformers, in this process. Its verdicts on
    these sums are read from its label probabilities; it names one position whatever the order, so each comparison
    is a near-tie, and the audit says it is not better than chance."""
    _, run, metrics = judge_with(tmp_path, {"backend": "transformers", "model": "bundled"}, {}, isolation="inline")
    audit = metrics["audit"]
    table = pd.read_parquet(run.stage_dir(1, "judge") / "audit.parquet")
    assert len(table) == audit["comparisons"] == 24 and set(table["mode"]) == {"logprobs"}
    assert audit["answered"] == 24 and audit["informative"] is False and audit["ci"][0] < 0.5
    assert audit["longer_right"]["n"] + audit["shorter_right"]["n"] == 24
    assert "not better than chance" in metrics["audit_line"] or "worse than chance" in metrics["audit_line"]
