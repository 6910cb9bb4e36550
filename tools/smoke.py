"""GPU smoke: one real round of the bundled model (transformers sampler, local judge), then its figures: seconds
per stage, tokens per second for sampling and training, peak GPU memory per stage, and the device. Where a vLLM
executable is found and a GPU is there, a second round samples (and answers the evaluation) with
`sample.backend: vllm` on the same recipe, and its figures follow.

    make gpu-smoke                         # or: .venv/bin/python -m tools.smoke [--recipe ...] [--vllm PATH]

vLLM runs from its own virtualenv (it cannot share selfplay's): `--vllm /opt/vllm/bin/vllm`, or $SELFPLAY_VLLM,
or a `vllm` on PATH, or /opt/vllm/bin/vllm; install one with
`python -m venv /opt/vllm && /opt/vllm/bin/pip install vllm==0.32.0`. Without one (or without a GPU) the vLLM
round is skipped with the reason.

It runs on a CPU too (the device then reads cpu and peak GPU memory "-"), which is how it is checked where no GPU
is available.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

STAGES = ("sample", "judge", "filter", "train", "evaluate")


def find_vllm(given: str | None) -> str | None:
    """The vLLM executable to use: the argument, $SELFPLAY_VLLM, `vllm` on PATH, or /opt/vllm/bin/vllm."""
    for candidate in (given, os.environ.get("SELFPLAY_VLLM"), shutil.which("vllm"), "/opt/vllm/bin/vllm"):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def stage_table(run, k: int = 1) -> str:
    lines = [f"{'stage':<9} {'seconds':>8} {'tokens/s':>9} {'peak GPU GiB':>12}"]
    for stage in STAGES:
        m = run.manifest(k, stage)
        metrics = m["metrics"]
        tps, peak = metrics.get("tokens_per_second"), metrics.get("peak_gpu_gb")
        seconds = metrics.get("seconds", m["finished_at"] - m["started_at"])  # the stage's own timing when it keeps one
        lines.append(f"{stage:<9} {seconds:>8.1f} {'-' if tps is None else f'{tps:.0f}':>9} "
                     f"{'-' if peak is None else f'{peak:.2f}':>12}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="deployments/recipes/gpu-smoke.yaml")
    parser.add_argument("--name", default=f"gpu-smoke-{time.strftime('%Y%m%d-%H%M%S')}")
    parser.add_argument("--vllm", help="the vLLM executable for the second round (default: found as the docstring says)")
    parser.add_argument("--no-vllm", action="store_true", help="skip the vLLM round")
    args = parser.parse_args(argv)

    import torch

    from flows.self_play import self_play
    from selfplay.config.run import load_config
    from selfplay.runtime.rundir import RunDir

    started = time.time()
    self_play(recipe=args.recipe, name=args.name)
    run = RunDir(load_config(args.recipe, [f"name={args.name}"]).run_dir)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    print(f"\nsmoke round on {device} (torch {torch.__version__}), {time.time() - started:.0f} s in all; files in {run.root.resolve()}")
    print(stage_table(run))

    vllm = None if args.no_vllm else find_vllm(args.vllm)
    if args.no_vllm:
        print("\nvLLM round: skipped (--no-vllm)")
    elif not torch.cuda.is_available():
        print("\nvLLM round: skipped, no GPU (vLLM is CUDA-only)")
    elif vllm is None:
        print("\nvLLM round: skipped, no vLLM executable (pass --vllm PATH or set SELFPLAY_VLLM; install it in its own "
              "virtualenv: python -m venv /opt/vllm && /opt/vllm/bin/pip install vllm==0.32.0)")
    else:
        name = f"{args.name}-vllm"
        overrides = ["sample.backend=vllm", f"sample.server.command=[{vllm}, serve]", "sample.server.gpu_memory_utilization=0.5",
                     "sample.server.max_model_len=2048", "sample.server.startup_timeout=900"]
        started = time.time()
        self_play(recipe=args.recipe, name=name, overrides=overrides)
        run = RunDir(load_config(args.recipe, [f"name={name}", *overrides]).run_dir)
        print(f"\nvLLM round ({vllm}) on {device}, {time.time() - started:.0f} s in all, server start included; files in {run.root.resolve()}")
        print(stage_table(run))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
