"""A model server in a process of its own (selfplay.server_spec, selfplay.model_server), sampled over the
OpenAI-compatible API (selfplay.openai_client), with adapters loaded through vLLM's LoRA API (selfplay.lora_serving).

vLLM cannot run here, so the server command is the scripted stub's CLI (`python -m tests.openai_stub`): real
subprocesses, process groups, signals, sockets and HTTP; only the model is fake. The stub takes `--model`,
`--host` and `--port` only, so its spec passes the model as a flag and leaves the vLLM options out (None).
"""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from selfplay.lora_serving import LoraAdapterError, load_lora_adapter, unload_lora_adapter
from selfplay.model_server import ModelServer, PortInUseError, ServerStartError
from selfplay.openai_client import SamplingError, sample_chat
from selfplay.server_spec import ServerSpec, build_command, redact
from tests.conftest import REPO, free_port
from tests.openai_stub import Reply, ScriptedOpenAI, api_error, chat_completion

STUB = [sys.executable, "-m", "tests.openai_stub"]


def stub_spec(*extra: str, **over) -> ServerSpec:
    fields = dict(command=STUB, model_arg_style="flag", served_name_flag=None, gpu_memory_utilization=None,
                  tensor_parallel_size=None, extra_args=list(extra), cwd=str(REPO), startup_timeout=30, stop_timeout=10)
    return ServerSpec(**{**fields, **over})


def stub_processes(port: int) -> list[psutil.Process]:
    """Live (non-zombie) processes running the stub on `port`."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            cmd = proc.info["cmdline"] or []
            if "tests.openai_stub" in cmd and str(port) in cmd and proc.info["status"] != psutil.STATUS_ZOMBIE:
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
    assert build_command(stub_spec("--latency", "0.1"), "tiny", 7000, "policy") == [
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
        assert time.monotonic() - t0 >= 1.0  # /health said 503 for the first second
        assert server.running and server.base_url == f"http://127.0.0.1:{server.port}/v1"
        assert stub_processes(server.port), "the stub should be running"
        prompts = ["one", "two", "three", "four"]
        out = sample_chat(server.base_url, "policy", prompts, n=3, temperature=0.9, top_p=0.95, max_tokens=32, seed=10)
        assert [len(choices) for choices in out] == [3, 3, 3, 3]
        for i, (prompt, choices) in enumerate(zip(prompts, out)):
            assert [c["response"] for c in choices] == [f"answer {j} to: {prompt} [seed {10 + 3 * i}]" for j in range(3)]
            assert all(c["truncated"] is False and c["n_tokens"] > 0 for c in choices)
        # a rerun asks for the same seeds: the same answers
        assert sample_chat(server.base_url, "policy", prompts, n=3, temperature=0.9, top_p=0.95, max_tokens=32, seed=10) == out
    assert not server.running and server.returncode == -signal.SIGTERM
    assert_gone(server)
    server.stop()  # idempotent
    text = log.read_text()
    assert "[selfplay.serving" in text and "tests.openai_stub --model tiny --host 127.0.0.1" in text
    assert f"stub: serving tiny on http://127.0.0.1:{server.port}" in text
    assert "stopped, exit code -15" in text


def test_log_never_holds_the_api_key(tmp_path):
    log = tmp_path / "server.log"
    spec = stub_spec("--api-key", "sk-very-secret")  # the stub does not know --api-key: it exits at once
    with pytest.raises(ServerStartError, match="exited with code 2"):
        ModelServer(spec, "tiny", log).start()
    header = log.read_text().splitlines()[0]
    assert "--api-key REDACTED" in header and "sk-very-secret" not in header


def test_failed_start_reports_the_log_tail_and_leaves_nothing(tmp_path):
    log = tmp_path / "server.log"
    log.write_text("an earlier run's line\n")
    server = ModelServer(stub_spec("--fail-start"), "tiny", log)
    with pytest.raises(ServerStartError) as info:
        with server:
            pytest.fail("the body must not run")
    message = str(info.value)
    assert "exited with code 1" in message and "ERROR: simulated startup failure" in message
    assert "an earlier run's line" not in message  # the tail is this start's only
    assert not server.running
    assert_gone(server)
    assert log.read_text().startswith("an earlier run's line\n")  # appended, not overwritten


def test_never_healthy_times_out_stops_and_frees_the_port(tmp_path):
    server = ModelServer(stub_spec("--never-healthy", startup_timeout=3), "tiny", tmp_path / "server.log")
    t0 = time.monotonic()
    with pytest.raises(ServerStartError, match=r"did not become healthy within 3 s") as info:
        server.start()
    assert 3.0 <= time.monotonic() - t0 < 6.0
    assert "stub: serving tiny" in str(info.value)
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
        from selfplay.model_server import ModelServer
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
    assert [b["seed"] for b in bodies] == list(range(5, 17))
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
        logprobs = {"A": -0.1} if body.get("logprobs") else None
        resp = chat_completion("", contents=["one", "one two three", ""], completion_tokens=0, logprobs=logprobs)
        resp["usage"]["completion_tokens"] = 9
        if i == 1:
            resp.pop("usage")
        return Reply(json=resp)

    with ScriptedOpenAI(handler) as server:
        kw = dict(n=3, temperature=1.0, top_p=1.0, max_tokens=8, seed=None)
        split = sample_chat(server.base_url, "m", ["a"], **kw)[0]
        words = sample_chat(server.base_url, "m", ["a"], **kw)[0]
        exact = sample_chat(server.base_url, "m", ["a"], exact_tokens=True, **kw)[0]
        assert server.chat_requests[2]["json"]["logprobs"] is True and "seed" not in server.chat_requests[0]["json"]
    assert [c["n_tokens"] for c in split] == [2, 7, 0]  # 9 split 1:3:0 by words
    assert [c["n_tokens"] for c in words] == [1, 3, 0]  # no usage reported: word counts
    assert [c["n_tokens"] for c in exact] == [1, 1, 1]  # the stub's logprobs carry one token per choice


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


def test_load_and_unload_lora_adapter():
    with ScriptedOpenAI(Reply(json=chat_completion("x"))) as server:
        load_lora_adapter(server.base_url, "round-2", Path("/runs/x/round-2/adapter"), api_key="sk-test")
        unload_lora_adapter(server.url, "round-2")  # base_url with or without /v1
        requests = server.requests
        with pytest.raises(LoraAdapterError, match="answered 404.*VLLM_ALLOW_RUNTIME_LORA_UPDATING"):
            load_lora_adapter(f"{server.url}/elsewhere/v1", "a", "/p")
    assert [(r["path"], r["json"]) for r in requests] == [
        ("/v1/load_lora_adapter", {"lora_name": "round-2", "lora_path": "/runs/x/round-2/adapter"}),
        ("/v1/unload_lora_adapter", {"lora_name": "round-2"}),
    ]
    assert requests[0]["headers"]["authorization"] == "Bearer sk-test"


# ---------------------------------------------------------------- GPU memory given back (a FAKE nvidia-smi)


@pytest.fixture
def fake_nvidia_smi(tmp_path, monkeypatch):
    """A FAKE `nvidia-smi` on PATH that prints whatever the test writes to its readings file (index, used, total)."""
    readings = tmp_path / "readings.csv"
    tool = tmp_path / "bin" / "nvidia-smi"
    tool.parent.mkdir()
    tool.write_text(f"#!/bin/sh\ncat {readings}\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tool.parent}:{__import__('os').environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return readings


def test_wait_gpu_free_waits_for_the_memory_used_before_the_server(fake_nvidia_smi, tmp_path):
    import threading

    from selfplay.gpu import gpu_memory_mib

    # 20 GB already in use before the server (a resident judge, say): that is the level to come back to, not zero.
    fake_nvidia_smi.write_text("0, 20000, 81559\n")
    assert gpu_memory_mib() == {0: (20000, 81559)}
    server = ModelServer(stub_spec(gpu_free_timeout=1.0), "/models/m", tmp_path / "server.log").start()
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


def test_gpu_memory_follows_cuda_visible_devices(fake_nvidia_smi, monkeypatch):
    from selfplay.gpu import gpu_memory_mib

    fake_nvidia_smi.write_text("0, 100, 1000\n1, 900, 1000\n")
    assert gpu_memory_mib() == {0: (100, 1000), 1: (900, 1000)}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert gpu_memory_mib() == {1: (900, 1000)}
    fake_nvidia_smi.write_text("garbage\n")
    assert gpu_memory_mib() is None


def test_requests_name_the_model_as_the_started_server_knows_it(tmp_path, monkeypatch):
    named = ModelServer(ServerSpec(), "/models/m", tmp_path / "a.log", served_name="judge")
    unnamed = ModelServer(stub_spec(), "/models/m", tmp_path / "b.log", served_name="judge")  # no --served-model-name
    assert (named.api_model, unnamed.api_model) == ("judge", "/models/m")
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    assert named.api_key == "EMPTY"
    monkeypatch.setenv("VLLM_API_KEY", "sk-local")  # the server inherits it and will demand it
    assert named.api_key == "sk-local"
    own = ModelServer(ServerSpec(env={"VLLM_API_KEY": "sk-spec"}), "/models/m", tmp_path / "c.log")
    assert own.api_key == "sk-spec"
