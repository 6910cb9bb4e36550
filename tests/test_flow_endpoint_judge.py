"""Flow tier: a whole round judged over HTTP by an OpenAI-compatible endpoint (the scripted test server, a fake
for a paid API), with the API key in a Prefect Secret block on the real server.

Asserts the verdicts follow the endpoint's answers, every call is accounted for, and the key reaches the endpoint
but no file, log or artifact.
"""

from __future__ import annotations

import asyncio
import re

import pandas as pd
import pytest

from selfplay.config.run import build_config
from selfplay.runtime.rundir import RunDir
from tests.conftest import assume_probed, run_self_play, tiny_config
from tests.openai_stub import Reply, ScriptedOpenAI, chat_completion

pytestmark = pytest.mark.stage

KEY = "sk-test-0123456789abcdefSECRET"


def fenced(content: str, tag: str) -> str:
    return re.search(rf"<{tag}>\n(.*?)\n</{tag}>", content, re.S).group(1)


def prefer_shorter(body: dict, n: int) -> Reply:
    """The scripted judge: the shorter response wins, with label logprobs."""
    user = body["messages"][-1]["content"]
    a, b = fenced(user, "response_A"), fenced(user, "response_B")
    if not body.get("logprobs"):
        return Reply(json=chat_completion("[[A]]" if len(a) <= len(b) else "[[B]]"))
    win, lose = ("A", "B") if len(a) < len(b) else ("B", "A")
    return Reply(json=chat_completion(win, logprobs={win: -0.05, f" {win}": -4.0, lose: -3.0}, prompt_tokens=len(user) // 4))


@pytest.fixture(scope="module")
def endpoint_run(prefect_server, tiny_model, tmp_path_factory):
    from prefect.blocks.system import Secret

    Secret(value=KEY).save("judge-api-key", overwrite=True)
    tmp = tmp_path_factory.mktemp("runs")
    with ScriptedOpenAI(prefer_shorter, latency=0.01) as server:
        assume_probed(server.base_url, "judge")
        raw = tiny_config(
            tiny_model, tmp, name="endpoint-judge", rounds=1,
            # the LLM judges every pair here, also the bundled arithmetic ones a verifier would decide
            judge={"backend": "endpoint", "mode": "auto", "margin": 0.5, "cache": False, "verifier": {"kind": "none"},
                   "endpoint": {"base_url": server.base_url, "model": "judge", "api_key_secret": "judge-api-key",
                                "api_key_env": None, "max_concurrency": 4,
                                "price_input_per_mtok": 1.0, "price_output_per_mtok": 2.0}},
            filter={"drop_truncated": False, "max_similarity": 0.99},
        )
        cfg = build_config(raw)
        summaries = run_self_play(raw, tmp / "endpoint-judge.yaml")
        yield cfg, RunDir(cfg.run_dir), summaries, server


def test_round_completes_with_verdicts_from_the_endpoint(endpoint_run):
    cfg, run, summaries, server = endpoint_run
    assert run.completed_rounds() == [1]
    table = pd.read_parquet(run.stage_dir(1, "judge") / "judgments.parquet")
    judged = table[table["verdict"] != "not_judged"]
    assert len(judged) > 0 and (judged["mode"] == "logprobs").all()
    for row in judged.itertuples():
        l1, l2 = len(row.response_1), len(row.response_2)
        expected = "tie" if l1 == l2 else ("first" if l1 < l2 else "second")
        assert row.verdict == expected, row
    # Both orders of every judged pair went to the endpoint (preflight adds GET /models only).
    assert server.count == 2 * len(judged) + 2 * cfg.prompts.eval_size
    pairs = pd.read_parquet(run.stage_dir(1, "filter") / "pairs.parquet")
    kept = pairs[pairs["kept"]]
    assert (kept["chosen"].str.len() < kept["rejected"].str.len()).all()
    assert summaries[0]["kept"] == len(kept) >= cfg.train.min_pairs


def test_every_call_is_accounted(endpoint_run):
    _, run, _, _ = endpoint_run
    calls = pd.read_parquet(run.stage_dir(1, "judge") / "calls.parquet")
    metrics = run.manifest(1, "judge")["metrics"]
    assert len(calls) == metrics["calls"] == 2 * metrics["judged"]
    assert (calls["tokens_in"] > 0).all() and (calls["tokens_out"] == 1).all()
    expected_cost = (calls["tokens_in"].sum() * 1.0 + calls["tokens_out"].sum() * 2.0) / 1e6
    assert metrics["cost"] == pytest.approx(expected_cost)
    assert metrics["error_rate"] == 0 and metrics["cache_hits"] == 0
    assert metrics["modes"] == {"logprobs": len(calls)}


def test_api_key_reaches_the_endpoint_and_nothing_else(endpoint_run, prefect_server):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter

    cfg, run, _, server = endpoint_run
    chat = [r for r in server.requests if r["path"].endswith("/chat/completions")]
    assert chat and all(r["headers"]["authorization"] == f"Bearer {KEY}" for r in chat)
    for path in run.root.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path

    async def logs_and_artifacts():
        async with get_client() as client:
            logs = await client.read_logs(log_filter=LogFilter())
            artifacts = await client.read_artifacts()
            runs = await client.read_flow_runs()
            return logs, artifacts, runs

    logs, artifacts, runs = asyncio.run(logs_and_artifacts())
    assert logs, "the flow's logs should have reached the server"
    assert not [entry.message for entry in logs if KEY in entry.message]
    assert not [a.key for a in artifacts if KEY in str(a.data)]
    assert not [r.name for r in runs if KEY in str(r.parameters)]
