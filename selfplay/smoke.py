"""GPU smoke: one real round of the bundled model (transformers sampler, local judge), then its figures: seconds
per stage, tokens per second for sampling and training, peak GPU memory per stage, and the device.

    make gpu-smoke                         # or: .venv/bin/python -m selfplay.smoke [--recipe ...]

It runs on a CPU too (the device then reads cpu and peak GPU memory "-"), which is how it is checked where no GPU
is available.
"""

from __future__ import annotations

import argparse
import time

STAGES = ("sample", "judge", "filter", "train", "evaluate")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="deployments/recipes/gpu-smoke.yaml")
    parser.add_argument("--name", default=f"gpu-smoke-{time.strftime('%Y%m%d-%H%M%S')}")
    args = parser.parse_args(argv)

    import torch

    from flows.self_play import self_play
    from selfplay.config import load_config
    from selfplay.rundir import RunDir

    started = time.time()
    self_play(recipe=args.recipe, name=args.name)
    run = RunDir(load_config(args.recipe, [f"name={args.name}"]).run_dir)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    print(f"\nsmoke round on {device} (torch {torch.__version__}), {time.time() - started:.0f} s in all; files in {run.root.resolve()}")
    print(f"{'stage':<9} {'seconds':>8} {'tokens/s':>9} {'peak GPU GiB':>12}")
    for stage in STAGES:
        m = run.manifest(1, stage)
        metrics = m["metrics"]
        tps, peak = metrics.get("tokens_per_second"), metrics.get("peak_gpu_gb")
        seconds = metrics.get("seconds", m["finished_at"] - m["started_at"])  # the stage's own timing when it keeps one
        print(f"{stage:<9} {seconds:>8.1f} {'-' if tps is None else f'{tps:.0f}':>9} "
              f"{'-' if peak is None else f'{peak:.2f}':>12}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
