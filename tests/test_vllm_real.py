"""The `vllm` and `endpoint` backends against the real vLLM: its CPU build on the bundled model, started by the
project's own ModelServer with the CPU recipe's settings (tests/vllm_real.py). One server serves the module (about a
minute to start on 2 cores); the tests of failed starts and of a dead engine start servers of their own.
"""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest

from selfplay.config.backends import EndpointConfig
from selfplay.config.server import VLLM_VERSION
from selfplay.judging.calls import JudgeCall
from selfplay.judging.endpoint import OpenAIJudge
from selfplay.judging.prompt import default_template, load_rubric, render_judge_prompt
from selfplay.runtime.processes import port_is_free
from selfplay.serving.lora import LoraAdapterError, load_lora_adapter, unload_lora_adapter
from selfplay.serving.model_server import ModelServer, ServerStartError
from selfplay.serving.openai_client import EndpointError, SamplingError, ServerDied, check_endpoint, request_seed, sample_chat
from tests.test_vllm_replies import FIXTURES, _same_shape
from tests.vllm_real import API_KEY, alive, bundled_model, engine_of, make_adapter, make_merged, recipe_spec, require_vllm, tree

pytestmark = pytest.mark.stage

LORA = ["--enable-lora", "--max-lora-rank", "16", "--max-loras", "2"]
PROMPTS = ["What is 3 * 4? Reply with only the number.", "Name a colour.", "Write one word about the sea."]


class Served:
    def __init__(self, server: ModelServer, base: str, adapters: list, merged):
        self.server, self.base, self.adapters, self.merged = server, base, adapters, merged

    def sample(self, prompts, **kw):
        kw = {"n": 1, "temperature": 1.0, "top_p": 1.0, "max_tokens": 8, "seed": 0, "api_key": API_KEY, "max_retries": 0, **kw}
        return sample_chat(self.server.base_url, kw.pop("model", "policy"), prompts, **kw)


@pytest.fixture(scope="module")
def vllm(tmp_path_factory):
    require_vllm()
    base = bundled_model()
    tmp = tmp_path_factory.mktemp("real-vllm")
    adapters = [make_adapter(base, tmp / f"round_{i + 1}" / "train" / "checkpoint", seed=i) for i in range(2)]  # as a run lays them out
    merged = make_merged(base, adapters[0], tmp / "merged")
    spec = recipe_spec(extra_args=LORA, env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_API_KEY": API_KEY,
                                             "VLLM_SERVER_DEV_MODE": "1"})
    server = ModelServer(spec, base, tmp / "server.log").start()
    procs = tree(server.pid)
    try:
        yield Served(server, base, adapters, merged)
    finally:
        server.stop()
        assert alive(procs) == [] and port_is_free("127.0.0.1", server.port)


def test_the_server_reports_its_version_health_and_wants_its_key(vllm):
    s = vllm.server
    assert s.version == VLLM_VERSION  # the version the project names everywhere is the one the tests run
    assert httpx.get(f"{s.url}/health", timeout=10).status_code == 200
    assert s.problem() is None
    assert httpx.get(f"{s.base_url}/models", timeout=10).status_code == 401  # VLLM_API_KEY guards /v1
    check_endpoint(EndpointConfig(base_url=s.base_url, model="policy"), API_KEY)
    with pytest.raises(EndpointError, match=r"rejected the API key \(401\)"):
        check_endpoint(EndpointConfig(base_url=s.base_url, model="policy"), "wrong")
    with pytest.raises(EndpointError, match=r"does not serve model 'other' \(it serves: policy\)"):
        check_endpoint(EndpointConfig(base_url=s.base_url, model="other"), API_KEY)
    with pytest.raises(SamplingError, match=r"refused the request \(401\).*it wants another API key"):
        vllm.sample(PROMPTS[:1], api_key="wrong")


def test_n_seeded_choices_are_reproducible_and_choice_j_draws_seed_plus_j(vllm):
    first = vllm.sample(PROMPTS, n=3, seed=11, max_tokens=10, exact_tokens=True)
    again = vllm.sample(PROMPTS, n=3, seed=11, max_tokens=10, exact_tokens=True)
    assert [len(c) for c in first] == [3, 3, 3]
    assert first == again  # the same seeds, the same samples
    texts = [c["response"] for choices in first for c in choices]
    assert len(set(texts)) >= 7, texts  # distinct streams: no two choices share a seed
    for choices in first:
        for c in choices:
            assert 1 <= c["n_tokens"] <= 10 and c["truncated"] == (c["n_tokens"] == 10)  # exact counts from logprobs
    # request_seed's promise, from vLLM itself: choice j of a request seeded s is the request seeded s + j with n=1
    [[alone]] = vllm.sample([PROMPTS[1]], n=1, seed=request_seed(11, 1, 3) + 2, max_tokens=10)
    assert alone["response"] == first[1][2]["response"]


def test_the_probe_finds_what_vllm_honours(vllm):
    """The probe (selfplay.serving.probe) against the real server: everything the sampler and the judge use."""
    from selfplay.serving.probe import probe_endpoint

    caps = probe_endpoint(EndpointConfig(base_url=vllm.server.base_url, model="policy"), API_KEY, sampling=True, judging=True)
    assert (caps.choices, caps.samples, caps.sample_body, caps.seeds) == (True, True, {}, True)
    assert caps.logprobs and caps.top_logprobs and caps.structured and caps.server == "vllm"
    assert caps.serial is False  # it batches: four requests at once take about one's time
    assert caps.judge_modes("auto") == ["logprobs", "choice", "text"]


def test_greedy_answers_repeat_and_greedy_with_several_choices_is_refused(vllm):
    one = vllm.sample(PROMPTS, temperature=0.0, max_tokens=12)
    assert one == vllm.sample(PROMPTS, temperature=0.0, max_tokens=12, seed=99)  # greedy: the seed changes nothing
    with pytest.raises(SamplingError, match=r"refused the request \(400\).*n must be 1 when using greedy sampling"):
        vllm.sample(PROMPTS[:1], n=2, temperature=0.0)


def _calls() -> list[JudgeCall]:
    template, rubric = default_template(), load_rubric(None)
    system = "You are a careful, impartial judge of AI assistant responses."
    return [JudgeCall(system, render_judge_prompt(template, "What is 3 * 4?", a, b, rubric)) for a, b in
            (("12", "7"), ("7", "12"), ("The answer is 12.", "I do not know."))]


@pytest.mark.parametrize("mode", ["logprobs", "choice", "text"])
def test_the_judge_reads_the_real_servers_verdicts_in_each_mode(vllm, mode):
    judge = OpenAIJudge(EndpointConfig(base_url=vllm.server.base_url, model="policy", max_retries=0), mode=mode, api_key=API_KEY,
                        watch=vllm.server.problem)
    results = judge.judge(_calls())
    for r in results:
        assert r.error is None and r.mode == mode and r.tokens_in > 100, r
        if mode == "logprobs":  # the label masses from vLLM's top-20 logprobs
            assert 0.0 <= r.p_a <= 1.0 and r.label_mass > 0.0 and r.tokens_out == 1
        elif mode == "choice":  # vLLM's structured output holds the JSON schema: always a label
            assert r.label in ("A", "B", "tie") and r.p_a == {"A": 1.0, "B": 0.0, "tie": 0.5}[r.label]
        else:  # free text: a 135M model may not write the marker; what it wrote is read either way
            assert r.label in ("A", "B", "tie", "invalid") and r.tokens_out >= 1


def test_adapters_load_and_unload_at_runtime_with_vllms_own_errors(vllm):
    url, a, b = vllm.server.base_url, vllm.adapters[0], vllm.adapters[1]
    base = vllm.sample(PROMPTS[:2], temperature=0.0, max_tokens=12)
    load_lora_adapter(url, "run-round_1", a, api_key=API_KEY)
    load_lora_adapter(url, "run-round_2", b, api_key=API_KEY)
    try:
        models = {m["id"]: m for m in httpx.get(f"{url}/models", headers={"Authorization": f"Bearer {API_KEY}"}).json()["data"]}
        assert models["run-round_1"]["parent"] == "policy" and models["run-round_1"]["root"] == str(a)
        check_endpoint(EndpointConfig(base_url=url, model="run-round_2"), API_KEY)
        one = vllm.sample(PROMPTS[:2], model="run-round_1", temperature=0.0, max_tokens=12)
        two = vllm.sample(PROMPTS[:2], model="run-round_2", temperature=0.0, max_tokens=12)
        assert one != base and two != base and one != two  # each request is answered by the adapter it names
        with pytest.raises(LoraAdapterError, match="answered 400: The lora adapter 'run-round_1' has already been loaded"):
            load_lora_adapter(url, "run-round_1", a, api_key=API_KEY)
        with pytest.raises(LoraAdapterError, match="answered 404.*the path must be one the server sees"):
            load_lora_adapter(url, "run-round_3", a.parent / "no-such-adapter", api_key=API_KEY)
    finally:
        unload_lora_adapter(url, "run-round_1", api_key=API_KEY)
        unload_lora_adapter(url, "run-round_2", api_key=API_KEY)
    with pytest.raises(LoraAdapterError, match="answered 404"):
        unload_lora_adapter(url, "run-round_1", api_key=API_KEY)
    with pytest.raises(SamplingError, match=r"refused the request \(404\).*run-round_1"):
        vllm.sample(PROMPTS[:1], model="run-round_1")
    assert vllm.sample(PROMPTS[:2], temperature=0.0, max_tokens=12) == base  # unloading leaves the base as it was


def test_the_recorded_replies_are_what_the_server_answers_now(vllm, tmp_path):
    """tests/fixtures/vllm holds replies tools/record_vllm_replies.py recorded from this server: recorded again now,
    each has the same status, the same shape, and (for errors) the same message."""
    from tools.record_vllm_replies import record

    now = record(vllm.server.base_url, API_KEY, str(vllm.adapters[0]))
    for name, reply in now.items():
        kept = json.loads((FIXTURES / f"{name}.json").read_text())
        assert kept["source"].startswith(f"Recorded from vLLM {VLLM_VERSION}"), name
        assert (kept["status"], kept["request"]) == (reply["status"], reply["request"]), name
        _same_shape(reply["body"], kept["body"], name)
        _same_shape(kept["body"], reply["body"], name)
        if reply["status"] != 200:
            assert kept["body"] == reply["body"], name
        elif name == "models_with_lora":
            assert [(m["id"], m["parent"]) for m in kept["body"]["data"]] == [(m["id"], m["parent"]) for m in reply["body"]["data"]]
        elif name != "chat_n3_logprobs":  # greedy: the same words (seeded sampling is checked above)
            said = [[c["message"]["content"] for c in r["body"]["choices"]] for r in (kept, reply)]
            assert said[0] == said[1], name


def test_the_kept_server_loads_adapters_reloads_merged_weights_and_restarts_once(vllm, tmp_path, caplog):
    """One server for a run (selfplay.serving.kept): the base, each round's adapter loaded at runtime, a merged
    checkpoint's weights reloaded in place and back, all from one start; a dead engine restarted once, then not."""
    from selfplay.serving.kept import KeptServer
    from selfplay.serving.openai_client import sample_chat as chat

    spec = recipe_spec(env={"VLLM_API_KEY": API_KEY})
    kept = KeptServer("policy", spec, tmp_path / "policy-server.log", "run", lora_rank=8)

    def greedy(model: str) -> list[str]:
        out = kept.run(model, lambda server, name: chat(server.base_url, name, PROMPTS, n=1, temperature=0.0, top_p=1.0, max_tokens=12,
                                                        seed=0, api_key=server.api_key, watch=server.problem), "a test")
        return [c[0]["response"] for c in out]

    try:
        base = greedy(vllm.base)
        assert base == [c[0]["response"] for c in vllm.sample(PROMPTS, temperature=0.0, max_tokens=12)]  # the same engine settings
        one, two = greedy(str(vllm.adapters[0])), greedy(str(vllm.adapters[1]))
        assert list(kept.loaded) == ["run-round_1", "run-round_2"] and one != base and two != one
        assert greedy(str(vllm.adapters[0])) == one  # still loaded: served again as it was
        merged = greedy(str(vllm.merged))  # adapter 0 merged into the base: reloaded in place, adapters dropped
        assert merged != base and kept.weights == str(vllm.merged.resolve()) and kept.loaded == {}
        assert greedy(vllm.base) == base  # and back
        assert kept.starts == 1
        log = (tmp_path / "policy-server.log").read_text()
        assert log.count("starting on http://") == 1 and "/collective_rpc" in log

        pid = kept.server.pid
        engine_of(pid).send_signal(signal.SIGKILL)
        time.sleep(5)
        with caplog.at_level("WARNING"):
            assert greedy(vllm.base) == base  # found dead before the work, started again, asked again
        assert kept.starts == 2 and kept.server.pid != pid
        assert any("died during the wait before a test" in r.getMessage() and "(once per run)" in r.getMessage() for r in caplog.records)
        procs = tree(kept.server.pid)
        engine = engine_of(kept.server.pid)
        threading.Timer(2.0, lambda: engine.send_signal(signal.SIGKILL)).start()
        with pytest.raises(ServerDied, match="died again during a test, after its restart"):
            kept.run(vllm.base, lambda server, name: chat(server.base_url, name, PROMPTS * 30, n=4, temperature=1.0, top_p=1.0,
                                                          max_tokens=200, seed=0, api_key=server.api_key, watch=server.problem), "a test")
    finally:
        kept.close()
    assert kept.server is None and alive(procs) == []


def test_a_failed_start_and_a_start_that_times_out_leave_nothing_behind(tmp_path):
    require_vllm()
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    server = ModelServer(recipe_spec(), empty, tmp_path / "bad.log")
    with pytest.raises(ServerStartError, match=r"exited with code \d+ before it was healthy; last lines of .*bad.log") as info:
        server.start()
    assert "not-a-model" in str(info.value)  # the server's own last words name what it could not load
    assert port_is_free("127.0.0.1", server.port)

    slow = ModelServer(recipe_spec(startup_timeout=8.0), bundled_model(), tmp_path / "slow.log")
    seen: list = []
    watcher = threading.Thread(target=lambda: (time.sleep(5), seen.extend(tree(slow.pid) if slow.pid else [])))
    watcher.start()
    with pytest.raises(ServerStartError, match=r"did not become healthy within 8 s"):
        slow.start()
    watcher.join()
    assert seen and alive(seen) == [] and port_is_free("127.0.0.1", slow.port)


def test_a_dead_engine_fails_the_requests_at_once_with_its_cause(tmp_path):
    """The engine process dies mid-sampling (SIGKILL: fault injection on the real server): the requests in flight
    stop within seconds with the server's own last words, not "Connection error" after every retry. The server has
    no runtime LoRA API (it was not asked for): its answer to a load is recorded and read as such."""
    require_vllm()
    server = ModelServer(recipe_spec(), bundled_model(), tmp_path / "server.log").start()
    procs = tree(server.pid)
    try:
        with pytest.raises(LoraAdapterError, match="no runtime LoRA API.*VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"):
            load_lora_adapter(server.base_url, "run-round_1", "/runs/nightly/round_3/train/checkpoint")
        off = httpx.post(f"{server.url}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/y"})
        recorded = json.loads((FIXTURES / "lora_routes_off.json").read_text())
        assert (off.status_code, off.json()) == (recorded["status"], recorded["body"])
        engine = engine_of(server.pid)
        box: dict = {}

        def sample() -> None:
            try:
                sample_chat(server.base_url, "policy", PROMPTS * 20, n=4, temperature=1.0, top_p=1.0, max_tokens=200, seed=0,
                            max_retries=5, watch=server.problem)
            except Exception as exc:  # noqa: BLE001 - examined below
                box["error"], box["at"] = exc, time.monotonic()

        thread = threading.Thread(target=sample)
        thread.start()
        time.sleep(3)
        killed = time.monotonic()
        engine.send_signal(signal.SIGKILL)
        thread.join(120)
        assert not thread.is_alive()
        error = box["error"]
        assert isinstance(error, ServerDied), repr(error)
        assert box["at"] - killed < 20, box["at"] - killed
        assert "EngineDeadError" in str(error) or "EngineCore" in str(error), str(error)
        assert "nanobind" not in str(error)  # the leak report a dying interpreter prints is left out of the tail
    finally:
        server.stop()
    assert alive(procs) == [] and port_is_free("127.0.0.1", server.port)
