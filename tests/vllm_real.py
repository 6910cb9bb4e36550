"""The real vLLM for the tests: vLLM's CPU build (`make vllm-setup` installs it in .vllm-venv), started through the
project's own `ModelServer` with the CPU recipe's server settings (deployments/recipes/cpu-vllm.yaml), on the bundled
SmolLM2-135M-Instruct; and LoRA adapters and a merged checkpoint of that model to load into it.

No fake here: what a CPU server cannot show (GPU memory, tensor parallelism, CUDA-only flags) stays with the FAKE
in tests/vllm_stub.py.
"""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

from selfplay.config.server import ServerSpec
from tests.conftest import REPO

VLLM_PYTHON = REPO / ".vllm-venv" / "bin" / "python"
CPU_RECIPE = REPO / "deployments" / "recipes" / "cpu-vllm.yaml"
API_KEY = "test-key-for-the-real-vllm"


def require_vllm() -> None:
    """Fail (not skip) where vLLM's CPU build is missing: `make test` installs it, and a skipped server test hides it."""
    if not VLLM_PYTHON.exists():
        pytest.fail(f"vLLM's CPU build is not installed ({VLLM_PYTHON} is missing): run `make vllm-setup` (make test does)")


def bundled_model() -> str:
    from selfplay.inputs.models import resolve_model

    return str(resolve_model("bundled"))


def recipe_spec(**over) -> ServerSpec:
    """The CPU recipe's sample.server, its command made absolute (the tests run from any directory), then `over`;
    `extra_args` and `env` in `over` are added to the recipe's."""
    from selfplay.config.run import load_config

    spec = load_config(CPU_RECIPE).sample.server
    command = [str(REPO / spec.command[0]), *spec.command[1:]]
    extra = [*spec.extra_args, *over.pop("extra_args", [])]
    env = {**spec.env, **over.pop("env", {})}
    return spec.model_copy(update={"command": command, "extra_args": extra, "env": env, "startup_timeout": 600.0, "stop_timeout": 30.0, **over})


def make_adapter(base: str, out: Path, seed: int, r: int = 8) -> Path:
    """A LoRA adapter of `base` with random (non-zero) weights: it changes what the model says."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", init_lora_weights=False)).save_pretrained(out)
    return out


def make_merged(base: str, adapter: Path, out: Path) -> Path:
    """`adapter` merged into `base`, saved as a full checkpoint with the base's tokenizer."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).merge_and_unload()
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


def tree(pid: int) -> list[psutil.Process]:
    """The process and all its descendants (vLLM: the API server, its EngineCore, the engine's worker)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc)
        except psutil.NoSuchProcess:
            pass
    return out


def engine_of(pid: int) -> psutil.Process:
    """The EngineCore process under vLLM's API server `pid` (it names itself VLLM::EngineCore)."""
    return next(p for p in tree(pid) if p.name().startswith("VLLM::EngineCore") or "EngineCore" in " ".join(p.cmdline()))
