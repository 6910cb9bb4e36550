"""Prefect plumbing the stages share: "skip if complete" (`stage`), GPU turns (a machine-local lock, plus an optional
cluster-wide Prefect limit), the run logger and progress artifacts. (The artifacts a round publishes are
`selfplay.reporting.artifacts`.)

Progress artifacts belong to a flow run: outside one (a stage's `.fn` called in a test, a script) they are no-ops,
since creating one there would start a temporary Prefect server; the logger falls back to a plain `logging` logger.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import Any
from uuid import UUID

from selfplay.runtime import hooks
from selfplay.runtime.devicelock import device_turn
from selfplay.runtime.rundir import STAGE_BEGAN, RunDir

GPU_LIMIT = "gpu"
# Holding a cluster-wide Prefect limit: the holder renews its lease while it lives; a crashed one (SIGKILL, a lost
# worker) frees its slot when the lease runs out (Prefect's default is 300 s).
GPU_LEASE_S = float(os.environ.get("SELFPLAY_GPU_LEASE_S") or 60.0)
log = logging.getLogger(__name__)


def ensure_gpu_limit(limit: int = 1, name: str = GPU_LIMIT) -> None:
    """Create the global concurrency limit `name` if the server lacks it (`selfplay setup` creates `gpu`)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=limit))


_cluster_limit: str | None = None


def use_cluster_limit(name: str | None) -> None:
    """Also hold the Prefect global concurrency limit `name` in every GPU stage of this process (None: don't)."""
    global _cluster_limit
    _cluster_limit = name


@contextlib.contextmanager
def gpu_slot(what: str) -> Iterator[None]:
    """A GPU stage's turn: at most one GPU stage (sample, local judge, train, evaluate) at a time on this machine's
    devices (`selfplay.runtime.devicelock`, released by the kernel when its holder dies), and, when a cluster limit is in
    use (`cluster_gpu_limit`), one of that Prefect limit's slots as well. `what` names the holder in waiters' logs."""
    with device_turn(what, log=run_logger()), _cluster_slot():
        hooks.reached("gpu-take", what)
        try:
            yield
        finally:
            hooks.reached("gpu-give", what)


@contextlib.contextmanager
def _cluster_slot() -> Iterator[None]:
    if _cluster_limit is None:
        yield
        return
    from prefect.concurrency.sync import concurrency

    with concurrency(_cluster_limit, occupy=1, strict=True, lease_duration=GPU_LEASE_S):
        yield


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """The Prefect run's logger inside a flow or task run, this module's logger outside one."""
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return log


def in_run() -> bool:
    """Whether this code runs inside a Prefect flow or task run (where artifacts have a run to belong to)."""
    from prefect.context import FlowRunContext, TaskRunContext

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def stage(name: str) -> Callable[[Callable[..., Any]], Callable[..., dict[str, Any]]]:
    """Make a stage body `body(cfg, k, ...)` skip itself when round k's `name` stage is complete.

    The decorated function returns the stage's manifest: the one on disk when the stage was done before (logged,
    the body not called), or the one the body published through `RunDir.stage_output`.
    """

    def decorate(body: Callable[..., Any]) -> Callable[..., dict[str, Any]]:
        @functools.wraps(body)
        def run_stage(cfg, k: int, *args: Any, **kwargs: Any) -> dict[str, Any]:
            run = RunDir(cfg.run_dir)
            if run.is_done(k, name):
                run_logger().info("round %d: %s already complete, reusing %s", k, name, run.stage_dir(k, name))
            else:
                token = STAGE_BEGAN.set(time.time())
                try:
                    body(cfg, k, *args, **kwargs)
                finally:
                    STAGE_BEGAN.reset(token)
            return run.manifest(k, name)

        return run_stage

    return decorate


class Progress:
    """A progress artifact for one stage, updated as work completes (a no-op outside a flow run)."""

    def __init__(self, description: str):
        from prefect.artifacts import create_progress_artifact

        self.id: UUID | None = None
        if not in_run():
            return
        try:
            self.id = create_progress_artifact(progress=0.0, description=description)
        except Exception as exc:  # never let reporting break the work
            log.debug("no progress artifact: %s", exc)

    def update(self, done: float, total: float) -> None:
        from prefect.artifacts import update_progress_artifact

        if self.id is not None and total:
            with contextlib.suppress(Exception):
                update_progress_artifact(self.id, progress=round(100.0 * done / total, 1))


