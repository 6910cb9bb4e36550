"""Fast tier: model spec resolution (selfplay/inputs/models.py) without loading, converting or downloading any model.

Only the error paths and the local-directory path are exercised; the hub is forced offline with HF_HUB_OFFLINE.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
import time

import pytest

from selfplay.inputs.models import ModelError, cache_root, exclusive, hub_reachable, is_hf_dir, resolve_model

pytestmark = pytest.mark.unit


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize("spec", ["", "   ", "\n"])
def test_empty_spec_is_an_error(spec):
    with pytest.raises(ModelError, match="model spec is empty"):
        resolve_model(spec)


def test_nonexistent_path_that_is_not_hub_like_is_an_error(tmp_path, offline):
    for spec in (str(tmp_path / "no" / "such" / "model"), "./nope", "a/b/c", "just-a-name"):
        with pytest.raises(ModelError, match=r"unknown model .*not 'bundled', an existing directory, a \.gguf file, or a hub id"):
            resolve_model(spec)


def test_directory_without_config_json_is_an_error(tmp_path):
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match="is not a Hugging Face model directory \\(no config.json in it\\)"):
        resolve_model(str(tmp_path))


def test_a_file_that_is_not_a_model_is_an_error(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"x")
    with pytest.raises(ModelError, match="not a Hugging Face model directory"):
        resolve_model(str(path))


def test_missing_gguf_is_an_error(tmp_path):
    with pytest.raises(ModelError, match=r"GGUF file not found: .*missing\.gguf"):
        resolve_model(str(tmp_path / "missing.gguf"))


def test_directory_with_config_json_resolves_to_itself(tmp_path):
    model = tmp_path / "my-model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert is_hf_dir(model)
    (model / "model.safetensors").write_bytes(b"")  # only their presence is checked here
    (model / "tokenizer.json").write_text("{}")
    assert resolve_model(str(model)) == model.resolve()
    assert resolve_model(f"  {model}  ") == model.resolve()


def test_hub_id_offline_fails_fast_naming_the_hub_and_the_alternatives(offline):
    started = time.monotonic()
    with pytest.raises(ModelError) as err:
        resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    elapsed = time.monotonic() - started
    msg = str(err.value)
    assert elapsed < 5.0
    assert "'HuggingFaceTB/SmolLM2-135M-Instruct' looks like a hub id" in msg
    assert "hub cannot be reached" in msg and "HF_HUB_OFFLINE" in msg
    assert "policy.model=bundled" in msg and "local Hugging Face directory" in msg and ".gguf" in msg


@pytest.mark.parametrize("value", ["1", "true", "YES"])
def test_offline_switch_values_are_honoured(monkeypatch, value):
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert hub_reachable() == (False, "HF_HUB_OFFLINE is set")


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SELFPLAY_CACHE", str(tmp_path / "cache"))
    assert cache_root() == tmp_path / "cache"


# ---------------------------------------------------------------- .gguf files that are not GGUF, and the conversion lock

@pytest.fixture
def cache(monkeypatch, tmp_path):
    monkeypatch.setenv("SELFPLAY_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.parametrize("content,what", [
    (os.urandom(4096), "it starts with b'"),
    (b"hello, I am a text file\n", "it starts with b'hell', not b'GGUF'"),
    (b"", "the file is empty"),
])
def test_a_gguf_that_is_not_gguf_fails_in_one_line_and_leaves_no_lock(tmp_path, cache, content, what):
    path = tmp_path / "model.gguf"
    path.write_bytes(content.replace(b"GGUF", b"gguf"))
    with pytest.raises(ModelError) as err:
        resolve_model(str(path))
    msg = str(err.value)
    assert msg.startswith(f"not a GGUF file: {path} (") and what in msg and "\n" not in msg
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".lock")]


def test_the_conversion_lock_file_is_removed_even_when_the_holder_fails(tmp_path):
    path = tmp_path / ".model.lock"
    with exclusive(path):
        assert path.exists()
    assert not path.exists()
    with pytest.raises(RuntimeError), exclusive(path):
        raise RuntimeError("conversion failed")
    assert not path.exists()


def test_the_conversion_lock_excludes_across_the_removal_of_its_file(tmp_path):
    """A process that waited on the file the first holder removed must lock the file now at the path, so a third
    process is refused while it holds it (flock locks conflict between open() calls of one process too)."""
    path = tmp_path / ".model.lock"
    first = exclusive(path)
    first.__enter__()
    entered, release = threading.Event(), threading.Event()

    def second():
        with exclusive(path):
            entered.set()
            release.wait(10)

    waiter = threading.Thread(target=second)
    waiter.start()
    try:
        time.sleep(0.2)
        assert not entered.is_set()  # waits while the first holds it
        first.__exit__(None, None, None)
        assert entered.wait(10)
        with open(path, "a") as third, pytest.raises(BlockingIOError):
            fcntl.flock(third, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        release.set()
        waiter.join(10)
    assert not path.exists()


def test_cpu_dtype_bfloat16_generates_in_bf16_and_leaves_the_checkpoint_float32(tiny_model):
    """policy.cpu_dtype: the model is cast after loading, for generation only; the file on disk is untouched, and
    float32 (the default) generates the same as before."""
    import torch

    from selfplay.config.backends import TransformersSampleConfig
    from selfplay.generation.local import sample_local
    from selfplay.inputs.models import load_causal_lm

    assert next(load_causal_lm(tiny_model).parameters()).dtype == torch.float32
    assert next(load_causal_lm(tiny_model, cpu_dtype="bfloat16").parameters()).dtype == torch.bfloat16
    s = TransformersSampleConfig(num_samples=2, max_new_tokens=6, temperature=1.0)
    log = __import__("logging").getLogger("test")
    default = sample_local(str(tiny_model), ["Hi", "Name a colour."], s, 3, log=log)
    assert sample_local(str(tiny_model), ["Hi", "Name a colour."], s, 3, log=log, cpu_dtype="float32") == default
    bf16 = sample_local(str(tiny_model), ["Hi", "Name a colour."], s, 3, log=log, cpu_dtype="bfloat16")
    assert len(bf16) == 4 and all(r["n_tokens"] <= 6 for r in bf16)
    assert next(load_causal_lm(tiny_model).parameters()).dtype == torch.float32  # the checkpoint stays float32
