"""Shared fixtures: a real Prefect server on loopback, and a tiny randomly initialised chat model built here; and the
test tiers.

The tiny model has a byte-level BPE tokenizer trained on the bundled prompts and a 2-layer Llama: real
transformers/TRL/PEFT code paths in seconds, no downloads.

Every test belongs to one tier, by its closest marker (its own, else its module's `pytestmark`); collection fails on
a test without one, docstring examples are `unit`, and `--tier unit` (repeatable) runs only the tiers named:
  unit   pure functions, and components in memory or over loopback HTTP to a test double: `make test-fast`
  stage  stages and flows on the tiny model, a real Prefect server, subprocess runs killed and resumed
  e2e    the real bundled model end to end: the README's main command, the benchmarks
`make test` runs all three.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
TIERS = ("unit", "stage", "e2e")
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def pytest_addoption(parser):
    parser.addoption("--tier", action="append", choices=TIERS, help="run only this tier's tests (repeatable; default: all)")


def tier_of(item) -> str | None:
    """The closest tier marker: the test's own, else its class's, else its module's `pytestmark`."""
    if isinstance(item, pytest.DoctestItem):
        return "unit"
    for node in reversed(item.listchain()):
        found = [m.name for m in node.own_markers if m.name in TIERS]
        if len(found) > 1:
            raise pytest.UsageError(f"{node.nodeid}: two tier markers {found}")
        if found:
            return found[0]
    return None


def pytest_collection_modifyitems(config, items):
    """Every test must have a tier; with --tier, only those tiers run."""
    tiers = {item.nodeid: tier_of(item) for item in items}
    missing = [nodeid for nodeid, tier in tiers.items() if tier is None]
    if missing:
        raise pytest.UsageError(f"every test needs a tier marker ({', '.join(TIERS)}); none on:\n  " + "\n  ".join(missing))
    wanted = config.getoption("tier")
    if wanted:
        deselected = [item for item in items if tiers[item.nodeid] not in wanted]
        if deselected:
            config.hook.pytest_deselected(items=deselected)
            items[:] = [item for item in items if tiers[item.nodeid] in wanted]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    """Terminate a process started by a fixture, killing it if it does not exit in time."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process for {url} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real `prefect server start` on a free port with its own database; yields its API URL."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5", "PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS": "2",
           "PREFECT_UI_API_URL": url}
    env.pop("PREFECT_API_URL", None)
    log = open(home / "server.log", "w")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        wait_http(f"{url}/health", timeout=120, proc=proc)
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield url
            from prefect.logging.handlers import APILogWorker

            APILogWorker.drain_all(timeout=10)  # send buffered logs before the server goes away
    finally:
        stop(proc)
        log.close()


def build_tiny_model(path: Path) -> Path:
    """Save a tiny random Llama chat model with a ChatML template to `path`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = [json.loads(line)["prompt"] for line in (REPO / "selfplay/data/prompts/train.jsonl").read_text().splitlines()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts * 2,
        trainers.BpeTrainer(vocab_size=600, special_tokens=["<|im_start|>", "<|im_end|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|im_end|>")
    tokenizer.chat_template = CHATML
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True,
        eos_token_id=eos, pad_token_id=eos, bos_token_id=None,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


def tiny_config(tiny: Path, output_dir: Path, **over) -> dict:
    """A run config for the tiny model: small, fast, and keeping enough pairs from a random model."""
    from selfplay.config.run import deep_merge

    base = {
        "name": "tiny",
        "output_dir": str(output_dir),
        "rounds": 2,
        "policy": {"model": str(tiny)},
        "prompts": {"per_round": 6, "eval_size": 4},
        "sample": {"num_samples": 3, "max_new_tokens": 12, "batch_size": 18, "temperature": 1.0},
        "judge": {"margin": 0.0, "max_length": 4096, "batch_size": 16},
        "filter": {"drop_truncated": False, "max_similarity": 0.99},
        "train": {
            "min_pairs": 4,
            "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
            "dpo": {"per_device_train_batch_size": 6, "max_length": 128, "learning_rate": 1e-2},
        },
        "evaluate": {"max_new_tokens": 12},
    }
    return deep_merge(base, over)


def run_self_play(cfg: dict, path: Path) -> list[dict]:
    """Write `cfg` as a recipe at `path` and run the `self-play` flow on it, as the CLI and the UI do."""
    import yaml

    from flows.self_play import self_play

    path.write_text(yaml.safe_dump(cfg))
    return self_play(recipe=str(path))


def assume_probed(base_url: str, model: str, **honours) -> None:
    """Take a test double at `base_url` as a server that honours what vLLM honours (or what `honours` says), without
    probing it. A FAKE scripts the sampler's or the judge's replies only, not the probe's; the probe itself is
    tested against real servers (tests/test_real_servers.py) and against doubles built for it."""
    from selfplay.serving.probe import Capabilities, remember

    flags = dict(choices=True, samples=True, seeds=True, logprobs=True, top_logprobs=True, structured=True, serial=False)
    remember(Capabilities(base_url, model, server="test double", asked=["sampling", "judging"], **{**flags, **honours}))


@pytest.fixture(autouse=True)
def _forget_probes():
    """No test sees another's remembered probe (a port reused, a double taken for a real server)."""
    yield
    from selfplay.serving import probe

    probe.forget()
