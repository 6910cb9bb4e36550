"""Fast tier: model spec resolution (selfplay/models.py) without loading, converting or downloading any model.

Only the error paths and the local-directory path are exercised; the hub is forced offline with HF_HUB_OFFLINE.
"""

from __future__ import annotations

import json
import time

import pytest

from selfplay.models import ModelError, cache_root, hub_reachable, is_hf_dir, resolve_model


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
