"""The `selfplay` command.

    selfplay run --config deployments/recipes/cpu-demo.yaml [--set section.key=value ...]

Without PREFECT_API_URL the run uses Prefect's temporary local server; with it, the run reports to that server.
Exit status: 0 done, 1 the run failed, 2 bad input (nothing expensive was started).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings


def _quiet_environment() -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def cmd_run(args: argparse.Namespace) -> int:
    from selfplay.config import ConfigError, load_config
    from selfplay.models import ModelError
    from selfplay.preflight import preflight
    from selfplay.prompts import PromptError
    from selfplay.rundir import RunDirError, locked, open_run

    if not args.config:
        print("selfplay: --config is required (e.g. deployments/recipes/cpu-demo.yaml)", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, args.set or [])
        base = preflight(cfg)
        # Fail now, not after the server starts, if another process holds the run or a resume would mix configs.
        with locked(cfg.run_dir):
            open_run(cfg, str(base))
    except (ConfigError, ModelError, PromptError, RunDirError) as exc:
        print(f"selfplay: {exc}", file=sys.stderr)
        return 2

    import transformers

    from flows.self_play import self_play
    from selfplay.report import format_table
    from tasks.train import NotEnoughPairs

    transformers.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    try:
        summaries = self_play(recipe=args.config[0], overlays=args.config[1:], overrides=args.set or [])
    except (NotEnoughPairs, RunDirError, ConfigError, ModelError, PromptError) as exc:
        print(f"\nselfplay: {exc}\nFinished work is kept in {cfg.run_dir.resolve()}; rerun the same command to resume.", file=sys.stderr)
        return 1
    print("\n" + format_table(summaries))
    print(f"\nrun files: {cfg.run_dir.resolve()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="selfplay", description="Workflow-orchestrated iterative (self-play) DPO.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run (or resume) self-play rounds from a recipe")
    run.add_argument("--config", "-c", action="append", help="YAML recipe (deployments/recipes/*.yaml); repeat to layer an overlay such as deployments/recipes/judges/vllm.yaml over it")
    run.add_argument("--set", "-s", action="append", metavar="SECTION.KEY=VALUE", help="override a recipe field (repeatable)")
    run.set_defaults(func=cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    _quiet_environment()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s | %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "httpcore", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # TRL sets gradient_checkpointing itself; transformers 5 warns about the old name on every config.
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*deprecated", category=FutureWarning)
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
