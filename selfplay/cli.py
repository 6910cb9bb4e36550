"""The `selfplay` command.

    selfplay run --config deployments/recipes/cpu-demo.yaml [--set section.key=value ...]
    selfplay server                 # Prefect server + UI on http://127.0.0.1:4200, analytics off
    selfplay setup                  # work pool, `gpu` concurrency limit, deployments from prefect.yaml
    selfplay serve                  # the same deployments served from this process, no worker needed
    selfplay runs                   # lineages and runs: rounds, status, headline metrics
    selfplay show <run>             # one run's per-round metrics
    selfplay report <run>           # a standalone HTML report: rounds, curves, gate decisions, sample pairs

Without PREFECT_API_URL a run uses Prefect's temporary local server; with it, the run reports to that server.
Exit status: 0 done, 1 the run failed, 2 bad input (nothing expensive was started).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import warnings
from pathlib import Path


def _quiet_environment() -> None:
    # Should Prefect start its own temporary server (a flow called from Python), give it time to create its database.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def cmd_run(args: argparse.Namespace) -> int:
    """Bad input raises a SelfplayError before anything expensive starts (main prints it, exit 2)."""
    from selfplay.config.run import load_config
    from selfplay.orchestration.preflight import preflight
    from selfplay.runtime.rundir import locked, open_run

    if not args.config:
        print("selfplay: --config is required (e.g. deployments/recipes/cpu-demo.yaml)", file=sys.stderr)
        return 2
    cfg = load_config(args.config, args.set or [])
    # Taken once, before anything starts, and held to the end: a second process on this run stops here.
    with locked(cfg.run_dir):
        starting = None
        if not os.environ.get("PREFECT_API_URL"):  # the temporary server starts while preflight runs
            from selfplay.runtime.tempserver import spawn

            starting = spawn(cfg.run_dir / "prefect-server")
        try:
            base = preflight(cfg)
            open_run(cfg, str(base))  # a resume that would mix configurations fails now, not after the flow starts
        except BaseException:
            if starting is not None:
                starting.stop()
                if not (cfg.run_dir / "run.json").exists():  # nothing started: no run directory left (`locked` removes it once empty)
                    shutil.rmtree(cfg.run_dir / "prefect-server", ignore_errors=True)
            raise
        return _run_flow(args, cfg, starting)


def _run_flow(args: argparse.Namespace, cfg, starting=None) -> int:
    import contextlib
    import shlex

    import transformers
    from prefect.exceptions import TerminationSignal

    from selfplay.errors import SelfplayError
    from selfplay.reporting.report import accuracy_trend, format_table
    from selfplay.runtime import shutdown
    from selfplay.runtime.rundir import RunDir

    resume = (f"Finished work is kept in {cfg.run_dir.resolve()}; to resume, rerun: "
              f"{shlex.join(['selfplay', *sys.argv[1:]]) if sys.argv[1:2] == ['run'] else 'the same command'}")
    transformers.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    try:
        with shutdown.guard(resume), contextlib.ExitStack() as server:
            from flows.self_play import self_play  # imported while the temporary server is still starting

            if starting is not None or not os.environ.get("PREFECT_API_URL"):
                from selfplay.runtime.tempserver import temporary_server

                server.enter_context(temporary_server(cfg.run_dir / "prefect-server", starting))
            summaries = self_play(recipe=args.config[0], overlays=args.config[1:], overrides=args.set or [])
    except KeyboardInterrupt as exc:  # SIGINT, or SIGTERM outside a flow run (shutdown.Stopped)
        signum = getattr(exc, "signum", signal.SIGINT)
        print(f"\nselfplay: stopped by {signal.Signals(signum).name}. {resume}", file=sys.stderr)
        return shutdown.exit_code(signum)
    except TerminationSignal as exc:  # SIGTERM inside the flow run, which Prefect reported
        print(f"\nselfplay: stopped by {signal.Signals(exc.signal).name}. {resume}", file=sys.stderr)
        return shutdown.exit_code(exc.signal)
    except SelfplayError as exc:
        print(f"\nselfplay: {exc}\n{resume}", file=sys.stderr)
        return 1
    print("\n" + format_table(summaries))
    trend = accuracy_trend(RunDir(cfg.run_dir))
    if trend:
        print("\n" + trend)
    print(f"\nrun files: {cfg.run_dir.resolve()}")
    return 0


NIGHTLY_CRON, NIGHTLY_TIMEZONE = "0 2 * * *", "UTC"


def cmd_server(args: argparse.Namespace) -> int:
    """Start the Prefect server and UI (replaces this process)."""
    prefect = shutil.which("prefect") or str(Path(sys.executable).parent / "prefect")
    os.execv(prefect, [prefect, "server", "start", "--host", args.host, "--port", str(args.port)])
    return 0


def project_root(start: Path | None = None) -> Path:
    """The selfplay checkout at or above `start` (the working directory): the deployments in its prefect.yaml run
    flows/self_play.py with recipes relative to it, so `setup` and `serve` need one, whatever installed the package."""
    from selfplay.errors import SelfplayError

    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "prefect.yaml").is_file() and (folder / "flows" / "self_play.py").is_file():
            return folder
    raise SelfplayError(f"no selfplay checkout at or above {here} (a folder with prefect.yaml and flows/self_play.py): "
                        "run this command from the project's directory")


def cmd_setup(args: argparse.Namespace) -> int:
    """Create the work pool and the `gpu` limit, then deploy prefect.yaml; safe to run again."""
    import subprocess

    from selfplay.runtime.stages import ensure_gpu_limit

    root = project_root()
    prefect = shutil.which("prefect") or str(Path(sys.executable).parent / "prefect")
    pools = subprocess.run([prefect, "work-pool", "inspect", args.pool], capture_output=True, text=True)
    if pools.returncode != 0:
        subprocess.run([prefect, "work-pool", "create", args.pool, "--type", "process"], check=True)
    ensure_gpu_limit()
    env = {**os.environ, "SELFPLAY_NIGHTLY_CRON": args.cron, "SELFPLAY_NIGHTLY_TIMEZONE": args.timezone}
    deployed = subprocess.run([prefect, "--no-prompt", "deploy", "--all", "--prefect-file", str(root / "prefect.yaml")], cwd=root, env=env)
    if deployed.returncode == 0:
        print(f"\nDeployments self-play/manual and self-play/nightly ({args.cron}, {args.timezone}) are on pool "
              f"{args.pool!r}. Start a worker: prefect worker start --pool {args.pool}")
    return deployed.returncode


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve both deployments from this process (Prefect's `serve`): no work pool or worker needed."""
    from prefect import serve
    from prefect.schedules import Cron

    from flows.self_play import self_play
    from selfplay.runtime.stages import ensure_gpu_limit

    os.chdir(project_root())  # recipes are paths relative to the checkout
    ensure_gpu_limit()
    serve(
        self_play.to_deployment(name="manual"),
        self_play.to_deployment(name="nightly", parameters={"lineage": "nightly", "rounds": 1},
                                schedules=[Cron(args.cron, timezone=args.timezone)]),
    )
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from selfplay.reporting.history import flow_run_rows, run_rows

    rows = run_rows(Path(args.output_dir))
    if not rows:
        print(f"no runs under {Path(args.output_dir).resolve()}")
    for row in rows:
        print(f"{row['run']:<24} {row['status']:<10} rounds {row['rounds_done']}/{row['rounds_target']}  "
              f"last: kept {row['kept'] if row['kept'] is not None else '-'}, win rate {row['win_rate'] if row['win_rate'] is not None else '-'}, "
              f"held-out accuracy {row['accuracy'] if row['accuracy'] is not None else '-'}  "
              f"{row['updated']}")
    if os.environ.get("PREFECT_API_URL"):
        print("\nflow runs on " + os.environ["PREFECT_API_URL"] + ":")
        for fr in flow_run_rows(limit=args.limit):
            print(f"  {fr['name']:<24} {fr['state']:<10} {fr['start'] or '-':<20} {fr['parameters']}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    import time

    from selfplay.reporting.report import accuracy_trend, format_table
    from selfplay.runtime.provenance import describe
    from selfplay.runtime.rundir import RunDir, read_json

    run = RunDir(Path(args.output_dir) / args.run)
    if not (run.root / "run.json").is_file():
        print(f"selfplay: no run {args.run!r} under {Path(args.output_dir).resolve()} (see `selfplay runs`)", file=sys.stderr)
        return 2
    rounds = run.completed_rounds()
    record = read_json(run.root / "run.json")
    print(f"run {args.run}: {len(rounds)} round(s) complete in {run.root.resolve()}")
    if record.get("provenance"):
        print(f"started under: {describe(record['provenance'])}")
    for change in record.get("resumed_under", []):
        print(f"  {time.strftime('%Y-%m-%d %H:%M', time.localtime(change['at']))}: continued under {'; '.join(change['changes'])}")
    print()
    print(format_table([run.round_manifest(k) for k in rounds]) if rounds else "(no completed round yet)")
    trend = accuracy_trend(run)
    if trend:
        print("\n" + trend)
    for k in rounds:
        s = run.round_manifest(k)
        print(f"\nround {k}: {s.get('gate_reason', 'no gate decision recorded')}\n  drops {s['drops']}\n  checkpoint {s['checkpoint']}"
              + (f"\n  {s['judge_audit_line']}" if s.get("judge_audit_line") else ""))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from selfplay.reporting.html_report import write_report

    root = Path(args.output_dir) / args.run
    if not (root / "run.json").is_file():
        print(f"selfplay: no run {args.run!r} under {Path(args.output_dir).resolve()} (see `selfplay runs`)", file=sys.stderr)
        return 2
    path = write_report(root, Path(args.out) if args.out else None)
    print(f"wrote {path.resolve()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="selfplay", description="Workflow-orchestrated iterative (self-play) DPO.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run (or resume) self-play rounds from a recipe")
    run.add_argument("--config", "-c", action="append", help="YAML recipe (deployments/recipes/*.yaml); repeat to layer an overlay such as "
                                                             "deployments/recipes/judges/vllm.yaml over it")
    run.add_argument("--set", "-s", action="append", metavar="SECTION.KEY=VALUE", help="override a recipe field (repeatable)")
    run.set_defaults(func=cmd_run)
    server = sub.add_parser("server", help="start the Prefect server and UI (analytics off)")
    server.add_argument("--host", default="127.0.0.1")
    server.add_argument("--port", type=int, default=4200)
    server.set_defaults(func=cmd_server)
    for name, func, text in (("setup", cmd_setup, "create the work pool and the gpu limit, deploy prefect.yaml"),
                             ("serve", cmd_serve, "serve the manual and nightly deployments from this process")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--cron", default=NIGHTLY_CRON, help=f"nightly schedule (default {NIGHTLY_CRON!r})")
        p.add_argument("--timezone", default=NIGHTLY_TIMEZONE, help="timezone of the nightly schedule (default UTC)")
        p.add_argument("--pool", default="selfplay", help="process work pool (setup only)")
        p.set_defaults(func=func)
    runs = sub.add_parser("runs", help="list lineages and runs with their rounds, status and headline metrics")
    runs.add_argument("--output-dir", default="runs")
    runs.add_argument("--limit", type=int, default=20, help="flow runs to list from the Prefect API")
    runs.set_defaults(func=cmd_runs)
    show = sub.add_parser("show", help="print one run's per-round metrics")
    show.add_argument("run")
    show.add_argument("--output-dir", default="runs")
    show.set_defaults(func=cmd_show)
    report = sub.add_parser("report", help="write one run's standalone HTML report (default runs/<run>/report.html)")
    report.add_argument("run")
    report.add_argument("--output-dir", default="runs")
    report.add_argument("--out", help="where to write the HTML file (default <output-dir>/<run>/report.html)")
    report.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    _quiet_environment()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s | %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "httpcore", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # TRL sets gradient_checkpointing itself; transformers 5 warns about the old name on every config.
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*deprecated", category=FutureWarning)
    args = build_parser().parse_args(argv)
    from selfplay.errors import SelfplayError

    try:
        return args.func(args)
    except SelfplayError as exc:  # every command: one clear message, never a traceback
        print(f"selfplay: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
