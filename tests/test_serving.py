"""A model server in a process of its own (selfplay.config.server, selfplay.serving.model_server), sampled over the
OpenAI-compatible API (selfplay.serving.openai_client), with adapters loaded through vLLM's LoRA API (selfplay.serving.lora).

vLLM cannot run here, so the server command is the FAKE `vllm serve` (`python -m tests.vllm_stub serve`, vLLM's
HTTP behaviour as its sources have it): real subprocesses, process groups, signals, sockets and HTTP; only the model
is fake. It takes vLLM's own arguments, so its spec is the default `ServerSpec` with only the command changed.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import textwrap
import time

import httpx
import psutil
import pytest

from selfplay.config.server import ServerSpec, build_command, redact
from selfplay.serving.lora import LoraAdapterError, load_lora_adapter, unload_lora_adapter
from selfplay.serving.model_server import ModelServer, PortInUseError, ServerStartError
from selfplay.serving.openai_client import SamplingError, sample_chat
from tests.conftest import REPO, free_port
from tests.openai_stub import Reply, ScriptedOpenAI, api_error, chat_completion
from tests.vllm_stub import Vllm, token_split

pytestmark = pytest.mark.unit

STUB = [sys.executable, "-m", "tests.vllm_stub", "serve"]


def stub_spec(*extra: str, **over) -> ServerSpec:
    """The default ServerSpec (vLLM's argv) with the FAKE vLLM as its command."""
    fields = dict(command=STUB, extra_args=list(extra), cwd=str(REPO), startup_timeout=30, stop_timeout=10)
    return ServerSpec(**{**fields, **over})


def stub_processes(port: int) -> list[psutil.Process]:
    """Live (non-zombie) processes running the stub on `port`."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            cmd = proc.info["cmdline"] or []
            if "tests.vllm_stub" in cmd and str(port) in cmd and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def can_bind(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen(1)
            return True
        except OSError:
            return False


def assert_gone(server: ModelServer) -> None:
    assert server.pid is not None
    assert not psutil.pid_exists(server.pid) or psutil.Process(server.pid).status() == psutil.STATUS_ZOMBIE
    assert stub_processes(server.port) == []
    assert can_bind(server.port), f"port {server.port} is still taken"


# --------------------------------------------------------------------------------------------------- commands


def test_build_command_vllm_style():
    spec = ServerSpec(command=["/opt/vllm-venv/bin/vllm", "serve"], max_model_len=4096, extra_args=["--enable-lora", "--max-lora-rank", "64"])
    assert build_command(spec, "/runs/x/model", 8123, "policy") == [
        "/opt/vllm-venv/bin/vllm", "serve", "/runs/x/model",
        "--host", "127.0.0.1", "--port", "8123", "--served-model-name", "policy",
        "--gpu-memory-utilization", "0.85", "--tensor-parallel-size", "1", "--max-model-len", "4096",
        "--enable-lora", "--max-lora-rank", "64",
    ]


def test_build_command_defaults_leave_max_model_len_out():
    argv = build_command(ServerSpec(), "m", 8000, "policy")
    assert argv[:3] == ["vllm", "serve", "m"]
    assert "--max-model-len" not in argv and "--model" not in argv


def test_build_command_docker_style():
    spec = ServerSpec(command=["docker", "run", "--rm", "--gpus", "all", "-p", "{port}:8000", "vllm/vllm-openai"],
                      model_arg_style="flag", container_port=8000, tensor_parallel_size=2, extra_args=["--max-num-seqs", "128"])
    assert build_command(spec, "/models/m", 9001, "policy") == [
        "docker", "run", "--rm", "--gpus", "all", "-p", "9001:8000", "vllm/vllm-openai", "--model", "/models/m",
        "--host", "0.0.0.0", "--port", "8000", "--served-model-name", "policy",
        "--gpu-memory-utilization", "0.85", "--tensor-parallel-size", "2", "--max-num-seqs", "128",
    ]


def test_build_command_none_leaves_flags_out():
    spec = stub_spec("--latency", "0.1", model_arg_style="flag", served_name_flag=None, gpu_memory_utilization=None, tensor_parallel_size=None)
    assert build_command(spec, "tiny", 7000, "policy") == [
        *STUB, "--model", "tiny", "--host", "127.0.0.1", "--port", "7000", "--latency", "0.1"]


def test_spec_is_strict():
    with pytest.raises(ValueError, match="gpu_memory"):
        ServerSpec(gpu_memory_utilization=1.5)
    with pytest.raises(ValueError, match="Extra inputs"):
        ServerSpec(modle="x")
    assert all(f.description for f in ServerSpec.model_fields.values())


def test_redact_hides_secret_values():
    argv = ["vllm", "serve", "m", "--api-key", "sk-123", "--hf-token=hf_abc", "--max-num-batched-tokens", "8192"]
    assert redact(argv) == ["vllm", "serve", "m", "--api-key", "REDACTED", "--hf-token=REDACTED", "--max-num-batched-tokens", "8192"]


# --------------------------------------------------------------------------------------------------- lifecycle


def test_lifecycle_health_sample_stop(tmp_path):
    log = tmp_path / "logs" / "server.log"
    server = ModelServer(stub_spec("--startup-delay", "1"), "tiny", log)
    t0 = time.monotonic()
    with server:
        assert time.monotonic() - t0 >= 1.0  # nothing listened for the first second (vLLM loading its model)
        assert server.running and server.base_url == f"http://127.0.0.1:{server.port}/v1"
        assert stub_processes(server.port), "the stub should be running"
        assert server.version == Vllm.version  # what GET /version reports, for the run's provenance
        prompts = ["one", "two", "three", "four"]
        out = sample_chat(server.base_url, "policy", prompts, n=3, temperature=0.9, top_p=0.95, max_tokens=32, seed=10)
        assert [len(choices) for choices in out] == [3, 3, 3, 3]
        seeds = []
        for i, (prompt, choices) in enumerate(zip(prompts, out)):
            # vLLM seeds choice j of a request seeded s with s + j: the requests' seeds leave no two choices the same stream
            assert [c["response"] for c in choices] == [f"answer {j} to: {prompt} [seed {10 + 3 * i + j}]" for j in range(3)]
            assert all(c["truncated"] is False and c["n_tokens"] > 0 for c in choices)
            seeds += [int(c["response"].rsplit(" ", 1)[1].rstrip("]")) for c in choices]
        assert sorted(seeds) == list(range(10, 22))
        # a rerun asks for the same seeds: the same answers
        assert sample_chat(server.base_url, "policy", prompts, n=3, temperature=0.9, top_p=0.95, max_tokens=32, seed=10) == out
    assert not server.running and server.returncode == -signal.SIGTERM
    assert_gone(server)
    server.stop()  # idempotent
    text = log.read_text()
    assert "[selfplay.serving.model_server " in text and "tests.vllm_stub serve tiny --host 127.0.0.1" in text
    assert f"vllm-stub: serving on http://127.0.0.1:{server.port}" in text
    assert "stopped, exit code -15" in text


def test_log_never_holds_the_api_key_and_the_server_demands_it(tmp_path):
    log = tmp_path / "server.log"
    spec = stub_spec("--api-key", "sk-very-secret", env={"VLLM_API_KEY": "sk-very-secret"})
    with ModelServer(spec, "tiny", log) as server:
        assert server.api_key == "sk-very-secret"
        out = sample_chat(server.base_url, server.api_model, ["q"], n=2, temperature=1, top_p=1, max_tokens=8, seed=0,
                          api_key=server.api_key)
        assert len(out[0]) == 2
        with pytest.raises(SamplingError, match="refused the request \\(401\\).*Unauthorized"):
            sample_chat(server.base_url, server.api_model, ["q"], n=2, temperature=1, top_p=1, max_tokens=8, seed=0, api_key="wrong")
    header = log.read_text().splitlines()[0]
    assert "--api-key REDACTED" in header and "sk-very-secret" not in log.read_text()


def test_failed_start_reports_the_log_tail_and_leaves_nothing(tmp_path):
    log = tmp_path / "server.log"
    log.write_text("an earlier run's line\n")
    server = ModelServer(stub_spec("--fail-start"), "tiny", log)
    with pytest.raises(ServerStartError) as info:
        with server:
            pytest.fail("the body must not run")
    message = str(info.value)
    assert "exited with code 1" in message and "Engine core initialization failed" in message
    assert "an earlier run's line" not in message  # the tail is this start's only
    assert not server.running
    assert_gone(server)
    assert log.read_text().startswith("an earlier run's line\n")  # appended, not overwritten


def test_never_healthy_times_out_stops_and_frees_the_port(tmp_path):
    # vLLM stuck loading its model never listens
    server = ModelServer(stub_spec("--startup-delay", "600", startup_timeout=3), "tiny", tmp_path / "server.log")
    t0 = time.monotonic()
    with pytest.raises(ServerStartError, match=r"did not become healthy within 3 s") as info:
        server.start()
    assert 3.0 <= time.monotonic() - t0 < 6.0
    assert "vllm-stub: FAKE vLLM server (tests only), model tiny" in str(info.value)
    assert_gone(server)
    assert server.returncode == -signal.SIGTERM


def test_busy_port_is_refused_before_starting(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        server = ModelServer(stub_spec(port=port), "tiny", tmp_path / "server.log")
        with pytest.raises(PortInUseError, match=f"port {port} .*already in use"):
            server.start()
        assert server.pid is None and stub_processes(port) == []
        assert not (tmp_path / "server.log").exists()


def test_stop_kills_what_ignores_sigterm(tmp_path):
    """A server whose group ignores SIGTERM is SIGKILLed after the timeout, and its whole group goes."""
    script = tmp_path / "stubborn.py"
    script.write_text(textwrap.dedent("""
        import signal, subprocess, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        # a worker in the same process group, also deaf to SIGTERM
        subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"])
        from tests.openai_stub import Reply, ScriptedOpenAI
        port = int(sys.argv[sys.argv.index("--port") + 1])
        ScriptedOpenAI(Reply(), port=port).start()  # serves from a thread: SIGTERM stays ignored
        time.sleep(60)
    """))
    spec = stub_spec(command=[sys.executable, str(script)], env={"PYTHONPATH": str(REPO)})
    server = ModelServer(spec, "tiny", tmp_path / "server.log").start()
    group = [p.pid for p in psutil.Process(server.pid).children(recursive=True)] + [server.pid]
    t0 = time.monotonic()
    server.stop(timeout=1.5)
    assert 1.5 <= time.monotonic() - t0 < 8
    assert server.returncode == -signal.SIGKILL
    time.sleep(0.2)
    alive = [pid for pid in group if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert alive == []
    assert can_bind(server.port)


def test_server_dies_with_its_owner(tmp_path):
    """The owning process killed by SIGKILL (no atexit, no stop()): the server still goes (Linux PDEATHSIG)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux only")
    port = free_port()
    owner = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time, threading
        from pathlib import Path
        from tests.test_serving import stub_spec
        from selfplay.serving.model_server import ModelServer
        def serve():  # from a short-lived thread, as a Prefect task would
            ModelServer(stub_spec(port={port}), "tiny", Path({str(tmp_path / "s.log")!r})).start()
        t = threading.Thread(target=serve); t.start(); t.join()
        print("up", flush=True)
        time.sleep(60)
    """)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout.readline().strip() == "up"
        assert len(stub_processes(port)) == 1  # the thread that started it has ended: still serving
        owner.kill()
        owner.wait()
        deadline = time.monotonic() + 10
        while stub_processes(port) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert stub_processes(port) == []
    finally:
        owner.kill()
        owner.wait()
        for proc in stub_processes(port):
            proc.kill()


# --------------------------------------------------------------------------------------------------- sampling


def test_sample_chat_requests_choices_and_concurrency():
    def handler(body, i):
        k = body["n"]
        resp = chat_completion("", contents=[f"  reply {j} to {body['messages'][-1]['content']}  " for j in range(k)],
                               completion_tokens=4)
        resp["choices"][1]["finish_reason"] = "length"
        return Reply(json=resp, delay=0.05)

    prompts = [f"p{i}" for i in range(12)]
    with ScriptedOpenAI(handler) as server:
        out = sample_chat(server.base_url, "policy", prompts, n=3, temperature=0.7, top_p=0.9, max_tokens=16, seed=5,
                          max_concurrency=3, system="be brief", api_key="sk-test")
        assert 1 <= server.max_in_flight <= 3
        bodies = sorted((r["json"] for r in server.chat_requests), key=lambda b: b["seed"])
        headers = server.chat_requests[0]["headers"]
    assert [b["seed"] for b in bodies] == list(range(5, 5 + 3 * 12, 3))  # seed + index * n
    for i, body in enumerate(bodies):
        assert body["messages"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": f"p{i}"}]
        assert (body["n"], body["temperature"], body["top_p"], body["max_tokens"], body["model"]) == (3, 0.7, 0.9, 16, "policy")
        assert "logprobs" not in body
    assert headers["authorization"] == "Bearer sk-test"
    for i, choices in enumerate(out):
        assert [c["response"] for c in choices] == [f"reply {j} to p{i}" for j in range(3)]  # stripped, in order
        assert [c["truncated"] for c in choices] == [False, True, False]
        assert sum(c["n_tokens"] for c in choices) == 12  # the reported total (4 per choice), split by words


def test_sample_chat_token_counts():
    def handler(body, i):
        resp = chat_completion("", contents=["one", "one two three", ""], completion_tokens=0)
        resp["usage"]["completion_tokens"] = 9
        if i == 1:
            resp.pop("usage")
        return Reply(json=resp)

    with ScriptedOpenAI(handler) as server:
        kw = dict(n=3, temperature=1.0, top_p=1.0, max_tokens=8, seed=None)
        split = sample_chat(server.base_url, "m", ["a"], **kw)[0]
        words = sample_chat(server.base_url, "m", ["a"], **kw)[0]
        assert "seed" not in server.chat_requests[0]["json"]
    assert [c["n_tokens"] for c in split] == [2, 7, 0]  # 9 split 1:3:0 by words
    assert [c["n_tokens"] for c in words] == [1, 3, 0]  # no usage reported: word counts


def test_sample_chat_exact_tokens_from_vllms_per_token_logprobs():
    """vLLM returns one logprobs entry per generated token: exact_tokens counts them, and a choice cut at max_tokens
    is truncated with exactly max_tokens tokens."""
    with ScriptedOpenAI(None, vllm=Vllm(model="m")) as server:
        long, short = (sample_chat(server.base_url, "m", ["a question"], n=2, temperature=1.0, top_p=1.0, max_tokens=budget,
                                   seed=3, exact_tokens=True)[0] for budget in (64, 4))
        assert server.chat_requests[0]["json"]["logprobs"] is True
    assert [c["n_tokens"] for c in long] == [len(token_split(c["response"])) for c in long] == [7, 7]
    assert [c["truncated"] for c in long] == [False, False]
    assert [(c["n_tokens"], c["truncated"], c["response"]) for c in short] == [(4, True, "answer 0 to: a"), (4, True, "answer 1 to: a")]


def test_sample_chat_greedy_with_several_choices_is_refused_as_vllm_refuses_it():
    with ScriptedOpenAI(None, vllm=Vllm(model="m")) as server:
        with pytest.raises(SamplingError, match="refused the request \\(400\\).*n must be 1 when using greedy sampling, got 2"):
            sample_chat(server.base_url, "m", ["a"], n=2, temperature=0.0, top_p=1.0, max_tokens=4, seed=0)
        with pytest.raises(SamplingError, match="\\(404\\).*The model `other` does not exist"):
            sample_chat(server.base_url, "other", ["a"], n=1, temperature=0.0, top_p=1.0, max_tokens=4, seed=0)


def test_sample_chat_retries_then_succeeds_and_fails_on_4xx():
    ok = Reply(json=chat_completion("", contents=["x", "y"]))
    with ScriptedOpenAI([api_error(503), api_error(429, headers={"Retry-After": "0"}), ok]) as server:
        out = sample_chat(server.base_url, "m", ["a"], n=2, temperature=1, top_p=1, max_tokens=4, seed=0)
        assert [c["response"] for c in out[0]] == ["x", "y"] and server.count == 3
    with ScriptedOpenAI(api_error(400, "bad request: n too large")) as server:
        with pytest.raises(SamplingError, match="refused the request \\(400\\).*n too large"):
            sample_chat(server.base_url, "m", ["a", "b"], n=2, temperature=1, top_p=1, max_tokens=4, seed=0)
    with ScriptedOpenAI(Reply(json=chat_completion("only one"))) as server:  # asked for 2 choices, got 1: retried
        with pytest.raises(SamplingError, match="asked for 2 choices, got 1"):
            sample_chat(server.base_url, "m", ["a"], n=2, temperature=1, top_p=1, max_tokens=4, seed=0, max_retries=1)
        assert server.count == 2


def test_sample_chat_from_a_running_event_loop():
    with ScriptedOpenAI(Reply(json=chat_completion("", contents=["a", "b"]))) as server:
        async def flow():
            return sample_chat(server.base_url, "m", ["p", "q"], n=2, temperature=1, top_p=1, max_tokens=4, seed=0)

        out = asyncio.run(flow())
    assert [[c["response"] for c in choices] for choices in out] == [["a", "b"], ["a", "b"]]
    assert sample_chat("http://127.0.0.1:1/v1", "m", [], n=2, temperature=1, top_p=1, max_tokens=4, seed=0) == []


# --------------------------------------------------------------------------------------------------- LoRA


def test_load_and_unload_lora_adapter_with_vllms_answers(tmp_path):
    adapter = tmp_path / "round_2" / "train" / "checkpoint"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text('{"r": 8}')
    with ScriptedOpenAI(None, vllm=Vllm(model="base", runtime_lora=True, api_keys=["sk-test"])) as server:
        load_lora_adapter(server.base_url, "round-2", adapter, api_key="sk-test")
        listed = {m["id"]: m for m in httpx.get(f"{server.base_url}/models", headers={"Authorization": "Bearer sk-test"}).json()["data"]}
        assert (listed["round-2"]["parent"], listed["round-2"]["root"], listed["base"]["parent"]) == ("base", str(adapter), None)
        with pytest.raises(LoraAdapterError, match="answered 400: The lora adapter 'round-2' has already been loaded") as twice:
            load_lora_adapter(server.base_url, "round-2", adapter, api_key="sk-test")
        unload_lora_adapter(server.url, "round-2", api_key="sk-test")  # base_url with or without /v1
        with pytest.raises(LoraAdapterError, match="answered 404: The lora adapter 'round-2' cannot be found") as gone:
            unload_lora_adapter(server.url, "round-2", api_key="sk-test")
        with pytest.raises(LoraAdapterError, match="answered 404: Loading lora x failed: No adapter found for /nowhere.*"
                           "the path must be one the server sees") as missing:
            load_lora_adapter(server.base_url, "x", "/nowhere", api_key="sk-test")
        with pytest.raises(LoraAdapterError, match="answered 401: Unauthorized"):
            load_lora_adapter(server.base_url, "round-2", adapter, api_key="wrong")
        requests = server.requests
    for info in (twice, gone, missing):  # vLLM's own 4xx: the runtime API is on, so no word of turning it on
        assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in str(info.value)
    assert [(r["path"], r["json"]) for r in requests][:1] == [
        ("/v1/load_lora_adapter", {"lora_name": "round-2", "lora_path": str(adapter)})]
    assert requests[0]["headers"]["authorization"] == "Bearer sk-test"
    # without VLLM_ALLOW_RUNTIME_LORA_UPDATING vLLM registers no LoRA route: FastAPI's 404, and the hint says so
    with ScriptedOpenAI(None, vllm=Vllm(model="base")) as server:
        with pytest.raises(LoraAdapterError, match="answered 404: Not Found; .*VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"):
            load_lora_adapter(server.base_url, "round-2", adapter)


# ---------------------------------------------------------------- GPU memory given back (a FAKE nvidia-smi)


@pytest.fixture
def fake_nvidia_smi(tmp_path, monkeypatch):
    """A FAKE `nvidia-smi` on PATH: `--query-gpu` prints what the test writes to its readings file (index, used,
    total), `--query-compute-apps` what it writes to readings.csv.apps (pid, name, MiB)."""
    readings = tmp_path / "readings.csv"
    apps = tmp_path / "readings.csv.apps"
    apps.write_text("")
    tool = tmp_path / "bin" / "nvidia-smi"
    tool.parent.mkdir()
    tool.write_text(f'#!/bin/sh\ncase "$1" in --query-compute-apps*) cat {apps} ;; *) cat {readings} ;; esac\n')
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tool.parent}:{__import__('os').environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return readings


def test_wait_gpu_free_waits_for_the_memory_used_before_the_server(fake_nvidia_smi, tmp_path):
    import threading

    from selfplay.serving.gpu import gpu_memory_mib

    # 20 GB already in use before the server (a resident judge, say): that is the level to come back to, not zero.
    fake_nvidia_smi.write_text("0, 20000, 81559\n")
    assert gpu_memory_mib() == {0: (20000, 81559)}
    server = ModelServer(stub_spec(gpu_free_timeout=1.0, gpu_memory_utilization=0.5), "/models/m", tmp_path / "server.log").start()
    fake_nvidia_smi.write_text("0, 70000, 81559\n")  # what the server took
    server.stop()
    started = time.monotonic()
    assert server.wait_gpu_free() is False  # still held: a False after the spec's timeout, not a hang
    assert 1.0 <= time.monotonic() - started < 5

    timer = threading.Timer(1.0, lambda: fake_nvidia_smi.write_text("0, 20500, 81559\n"))  # back, within 2 %
    timer.start()
    started = time.monotonic()
    assert server.wait_gpu_free(timeout=30.0) is True
    assert 0.9 <= time.monotonic() - started < 10
    timer.join()


def test_a_server_is_not_started_into_memory_that_has_not_come_back(fake_nvidia_smi, tmp_path):
    """vLLM refuses to start with less than gpu_memory_utilization x total free, naming no cause: the start waits
    for the memory (up to gpu_free_timeout) and then fails naming the processes that hold it."""
    import threading

    fake_nvidia_smi.write_text("0, 50000, 81559\n")  # 31.5 GB free; 0.85 x 81559 = 69325 MiB needed
    (fake_nvidia_smi.parent / "readings.csv.apps").write_text("4242, /opt/vllm/bin/python3, 49000\n")
    server = ModelServer(stub_spec(gpu_free_timeout=1.0), "/models/m", tmp_path / "server.log")
    t0 = time.monotonic()
    with pytest.raises(ServerStartError, match=r"GPU 0 has 31559 MiB free of 81559, and needs 0.85 x 81559 = 69325 MiB\. "
                                               r"Held by pid 4242 \(/opt/vllm/bin/python3, 49000 MiB\)"):
        server.start()
    assert 1.0 <= time.monotonic() - t0 < 5 and server.pid is None  # nothing was started
    # The FAKE vLLM itself refuses as vLLM does when started into that memory anyway:
    refused = subprocess.run([*STUB, "/models/m", "--port", str(free_port()), "--gpu-memory-utilization", "0.85"], cwd=REPO,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "Free memory on device cuda:0 (30.82/79.65 GiB) on startup is less than desired GPU " \
        "memory utilization (0.85, 67.70 GiB)" in refused.stdout
    # Memory that comes back within the wait: the server starts.
    timer = threading.Timer(0.5, lambda: fake_nvidia_smi.write_text("0, 1000, 81559\n"))
    timer.start()
    with ModelServer(stub_spec(gpu_free_timeout=30.0), "/models/m", tmp_path / "server.log") as started:
        assert started.running
    timer.join()


def test_gpu_memory_follows_cuda_visible_devices(fake_nvidia_smi, monkeypatch):
    from selfplay.serving.gpu import gpu_memory_mib

    fake_nvidia_smi.write_text("0, 100, 1000\n1, 900, 1000\n")
    assert gpu_memory_mib() == {0: (100, 1000), 1: (900, 1000)}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert gpu_memory_mib() == {1: (900, 1000)}
    fake_nvidia_smi.write_text("garbage\n")
    assert gpu_memory_mib() is None


def test_requests_name_the_model_as_the_started_server_knows_it(tmp_path, monkeypatch):
    named = ModelServer(ServerSpec(), "/models/m", tmp_path / "a.log", served_name="judge")
    unnamed = ModelServer(stub_spec(served_name_flag=None), "/models/m", tmp_path / "b.log", served_name="judge")  # no --served-model-name
    assert (named.api_model, unnamed.api_model) == ("judge", "/models/m")
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    assert named.api_key == "EMPTY"
    monkeypatch.setenv("VLLM_API_KEY", "sk-local")  # the server inherits it and will demand it
    assert named.api_key == "sk-local"
    own = ModelServer(ServerSpec(env={"VLLM_API_KEY": "sk-spec"}), "/models/m", tmp_path / "c.log")
    assert own.api_key == "sk-spec"


def test_the_models_generation_config_fills_only_what_a_request_leaves_out(tmp_path):
    """vLLM takes the model's generation_config.json as the defaults of every request (`--generation-config auto`):
    the sampler sets temperature, top_p and max_tokens itself, so the model's own values of those never apply,
    while those it leaves out (top_k, repetition_penalty here) do, as they do in transformers' generate()."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "generation_config.json").write_text(
        '{"temperature": 0.2, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05, "max_new_tokens": 3}')
    log = tmp_path / "server.log"
    with ModelServer(stub_spec(), model, log) as server:
        [choices] = sample_chat(server.base_url, server.api_model, ["q"], n=2, temperature=0.9, top_p=0.95, max_tokens=8, seed=1,
                                exact_tokens=True)
    text = log.read_text()
    assert "default sampling parameters from the model's generation config" in text
    [request] = [line for line in text.splitlines() if line.startswith("vllm-stub: request")]
    for expected in ("'temperature': 0.9", "'top_p': 0.95", "'max_tokens': 8", "'top_k': 20", "'repetition_penalty': 1.05"):
        assert expected in request, request
    assert [c["n_tokens"] for c in choices] == [6, 6]  # the request's 8 tokens, not the model's 3


def test_the_version_a_server_reports_is_read_and_a_server_without_the_route_has_none(tmp_path):
    for vllm, expected in ((Vllm(model="m"), Vllm.version), (None, None)):
        with ScriptedOpenAI(None, vllm=vllm) as stub:
            server = ModelServer(stub_spec(), "m", tmp_path / "server.log")
            server.port = int(stub.base_url.rsplit(":", 1)[1].split("/")[0])  # as start() sets it
            assert server._reported_version() == expected


# --------------------------------------------------------------------------------------------------- kept servers


def _fake_adapter(path, base) -> str:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base), "r": 8}))
    return str(path)


def test_kept_gpu_servers_take_turns_asleep_and_keep_the_two_newest_adapters(tmp_path, caplog):
    """FAKE vLLM: sleep mode frees GPU memory only on a GPU, which the real CPU build cannot show. A policy and a judge
    server kept on one GPU: serving one puts the other to sleep, training puts both to sleep, and the next request
    wakes the one it needs; a third adapter unloads the oldest; nothing is started twice."""
    from selfplay.serving.kept import KeptServer

    base = tmp_path / "base"
    base.mkdir()
    adapters = [_fake_adapter(tmp_path / f"round_{k}" / "train" / "checkpoint", base) for k in (1, 2, 3)]
    spec = stub_spec(gpu_memory_utilization=0.5)
    policy = KeptServer("policy", spec, tmp_path / "policy.log", "run", lora_rank=8)
    judge = KeptServer("judge", spec, tmp_path / "judge.log", "run", lora_rank=None)

    def ask(kept, model):
        return kept.run(model, lambda server, name: (name, sample_chat(server.base_url, name, ["q"], n=1, temperature=1.0, top_p=1.0,
                                                                       max_tokens=4, seed=0, watch=server.problem)), "a test")

    import selfplay.serving.kept as kept_module

    kept_module._registry = {"policy": policy, "judge": judge}
    try:
        assert ask(policy, adapters[0])[0] == "run-round_1"
        assert ask(judge, str(base))[0] == "judge" and policy.asleep and not judge.asleep
        assert ask(policy, adapters[1])[0] == "run-round_2" and judge.asleep and not policy.asleep
        kept_module.release_gpu()  # before training
        assert policy.asleep and judge.asleep
        with caplog.at_level("INFO"):
            assert ask(policy, adapters[2])[0] == "run-round_3"
        assert list(policy.loaded) == ["run-round_2", "run-round_3"]  # round 1's adapter unloaded
        assert (policy.starts, judge.starts) == (1, 1)
        log = (tmp_path / "policy.log").read_text()
        assert log.count("vllm-stub: POST /sleep?level=1") == 2 and log.count("vllm-stub: POST /wake_up") == 2
        assert "--enable-sleep-mode" in log and "--max-lora-rank 8" in log
    finally:
        kept_module._registry = None
        policy.close()
        judge.close()
