"""The run directory: durable, explicit hand-offs between stages.

    runs/<run>/run.json                      the run's config and base model, written once
    runs/<run>/.lock                         held (flock) by the one process working on the run
    runs/<run>/round_<k>/<stage>/...         a stage's outputs (parquet tables, checkpoint, metrics.json)
    runs/<run>/round_<k>/<stage>/manifest.json   written last: its existence means the stage completed
    runs/<run>/round_<k>/manifest.json       written when the whole round completed

A stage writes into `<stage>.tmp-<pid>/`, writes its manifest there last, then renames the directory into place.
A completed stage is never recomputed or overwritten; a crash leaves at most a `.tmp-*` directory, which the next
attempt clears.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from selfplay.config.resume import Change, result_changes
from selfplay.config.run import RunConfig
from selfplay.errors import SelfplayError
from selfplay.runtime import hooks, provenance

STAGES = ("sample", "judge", "filter", "train", "evaluate")
MANIFEST = "manifest.json"


# Set by `selfplay.runtime.stages.stage` while a stage's body runs: the time it was entered.
STAGE_BEGAN: ContextVar[float | None] = ContextVar("selfplay_stage_began", default=None)

class RunDirError(SelfplayError, RuntimeError):
    """The run directory is in a state that refuses this run: in use, or configured differently."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=2, sort_keys=True, default=str)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


class RunDir:
    """One run's directory. Paths are explicit: nothing here guesses a 'latest' checkpoint."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()  # absolute: checkpoints are handed to other processes (vLLM, workers)

    def round_dir(self, k: int) -> Path:
        return self.root / f"round_{k}"

    def stage_dir(self, k: int, stage: str) -> Path:
        assert stage in STAGES, stage
        return self.round_dir(k) / stage

    def is_done(self, k: int, stage: str) -> bool:
        return (self.stage_dir(k, stage) / MANIFEST).is_file()

    def manifest(self, k: int, stage: str) -> dict[str, Any]:
        return read_json(self.stage_dir(k, stage) / MANIFEST)

    def round_done(self, k: int) -> bool:
        return (self.round_dir(k) / MANIFEST).is_file()

    def checkpoint(self, k: int) -> Path:
        """Round k's merged checkpoint: round k+1's policy and reference."""
        return self.stage_dir(k, "train") / "checkpoint"

    @contextlib.contextmanager
    def stage_output(self, k: int, stage: str, info: dict[str, Any] | None = None) -> Iterator[tuple[Path, dict]]:
        """Yield (temporary directory, manifest dict); on success write the manifest last and rename into place.

        The caller fills the directory and may add entries to the manifest dict. On error the temporary directory
        is removed and nothing is published.
        """
        final = self.stage_dir(k, stage)
        if (final / MANIFEST).exists():
            raise RunDirError(f"{final} is complete; refusing to overwrite it")
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists() and not final.is_dir():
            raise RunDirError(f"{final} is a file where the {stage} stage's output goes; move it away, then retry or rerun")
        for stale in final.parent.glob(f"{stage}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():  # a directory without a manifest cannot come from stage_output; clear it
            shutil.rmtree(final)
        tmp = final.parent / f"{stage}.tmp-{os.getpid()}"
        tmp.mkdir()
        hooks.reached("stage", f"round {k} {stage}")
        manifest: dict[str, Any] = {"stage": stage, "round": k, "started_at": time.time(), **(info or {})}
        if (began := STAGE_BEGAN.get()) is not None:
            manifest["began_at"] = began  # when the stage's body was entered: the span the speed benchmark counts as the stage's
        try:
            yield tmp, manifest
            if "metrics" in manifest:
                write_json_atomic(tmp / "metrics.json", manifest["metrics"])
            manifest["finished_at"] = time.time()
            manifest["files"] = {
                str(p.relative_to(tmp)): sha256_file(p)
                for p in sorted(tmp.rglob("*"))
                if p.is_file() and p.suffix in {".parquet", ".json"}
            }
            write_json_atomic(tmp / MANIFEST, manifest)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def finish_round(self, k: int, summary: dict[str, Any]) -> None:
        write_json_atomic(self.round_dir(k) / MANIFEST, {"round": k, "finished_at": time.time(), **summary})

    def round_manifest(self, k: int) -> dict[str, Any]:
        """The round's manifest (round_<k>/manifest.json): its summary and gate decision, written when it completed."""
        return read_json(self.round_dir(k) / MANIFEST)

    def completed_rounds(self) -> list[int]:
        ks = []
        for p in self.root.glob("round_*"):
            suffix = p.name.removeprefix("round_")
            if suffix.isdigit() and (p / MANIFEST).is_file():
                ks.append(int(suffix))
        return sorted(ks)


_held: dict[Path, int] = {}  # run directories this process holds, and how many `locked` blocks hold each


def unwritable(root: Path, exc: OSError) -> str:
    """Why the run directory `root` cannot be made or written, in one line that says what to change (output_dir)."""
    blocker = next((p for p in [root, *root.parents] if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        return f"cannot create the run directory {root}: {blocker} is a file, not a directory. Set output_dir to a directory (--set output_dir=...)"
    existing = next(p for p in [root, *root.parents] if p.exists())
    return (f"cannot create the run directory {root}: {existing} is not writable here ({exc.strerror or exc}). Set output_dir to a directory "
            f"this user can write (--set output_dir=...)")


@contextlib.contextmanager
def locked(root: Path) -> Iterator[None]:
    """Hold an exclusive lock on the run directory; a second process is refused at once, not queued.

    The lock is the kernel's (flock), so it dies with its holder however that ends. Nested `locked` blocks of one
    process share it: the CLI takes it before anything starts and holds it to the end, and the flow it runs takes
    it again (what a deployment's run, which has no CLI, relies on).
    """
    root = Path(root).resolve()
    created = not root.exists()
    if _held.get(root):
        _held[root] += 1
        try:
            yield
        finally:
            _held[root] -= 1
        return
    path = root / ".lock"
    try:
        root.mkdir(parents=True, exist_ok=True)
        fh = open(path, "a+")
    except OSError as exc:
        raise RunDirError(unwritable(root, exc)) from None
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "unknown"
        fh.close()
        raise RunDirError(
            f"{root} is in use by another process (pid {holder}). Wait for it to finish, or choose another run "
            f"name with --set name=<new-name>."
        ) from None
    _held[root] = 1
    try:
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        yield
    finally:
        del _held[root]
        fh.seek(0)
        fh.truncate()
        if not (root / "run.json").exists():  # nothing started (bad input): leave no lock or empty directory behind
            path.unlink(missing_ok=True)
            if created:
                with contextlib.suppress(OSError):
                    root.rmdir()
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


# Which stages read a setting: the first prefix that matches a dotted key names them ("round": the round's gate
# decision, made when the round completes). A setting no prefix matches is read by every stage.
READ_BY: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("prompts.eval", ("evaluate",)),
    ("prompts.accuracy_size", ("evaluate",)),
    ("prompts.", ("sample", "evaluate")),
    ("sample.", ("sample", "evaluate")),  # the evaluate stage generates with the sampler's backend
    ("judge.audit.on_chance", ("filter",)),
    ("judge.audit.", ("judge",)),
    ("judge.pairing", ("judge", "filter", "evaluate")),
    ("judge.scoring", ("judge", "filter", "evaluate")),
    ("judge.", ("judge", "evaluate")),  # the evaluate stage's win rate is judged too
    ("filter.", ("judge", "filter")),  # pairs the filter would drop are screened out before judging
    ("train.", ("train",)),
    ("evaluate.", ("evaluate",)),
    ("gate.", ("round",)),
)


def read_by(key: str) -> tuple[str, ...]:
    """The stages that read setting `key` (`READ_BY`); every stage for one not listed (seed, policy, the base model).

    >>> read_by("judge.max_length"), read_by("judge.audit.on_chance"), read_by("seed") == (*STAGES, "round")
    (('judge', 'evaluate'), ('filter',), True)
    """
    return next((stages for prefix, stages in READ_BY if key.startswith(prefix)), (*STAGES, "round"))


def pinned_by(run: RunDir, key: str) -> str | None:
    """The first completed stage that read `key`, as "round k's <stage> stage", or None while none has: a setting
    may change on a resume until then."""
    rounds = sorted(int(p.name.removeprefix("round_")) for p in run.root.glob("round_*") if p.name.removeprefix("round_").isdigit())
    for k in rounds:
        for stage in read_by(key):
            if stage == "round" and run.round_done(k):
                return f"round {k} (completed: its gate decision)"
            if stage != "round" and run.is_done(k, stage):
                return f"round {k}'s {stage} stage"
    return None


def open_run(cfg: RunConfig, base_model: str, log=None) -> RunDir:
    """Create the run's record, or check that a resume may go on. Call while holding `locked(cfg.run_dir)`.

    run.json records the config, the base model and the provenance (`selfplay.runtime.provenance`: commit, Python,
    library versions, device). What completed pins: a result-changing setting may change on a resume as long as no
    completed stage read it (`pinned_by`); the new values are recorded, and the change noted under `resumed_under`.
    A change a completed stage read is refused, naming that stage. A start that failed before any stage completed
    pins nothing. A resume under other library versions is not refused; with `log` (the flow passes its run logger;
    the CLI's early check passes none) it says so in one warning line, kept under `resumed_under` too.
    """
    run = RunDir(cfg.run_dir)
    record = run.root / "run.json"
    if record.is_file():
        saved = read_json(record)
        old = RunConfig.model_validate(saved["config"], context={"recorded": True})  # older runs recorded every backend
        changes = result_changes(old, cfg)
        if saved.get("base_model") != base_model:
            changes.append(Change("base model", saved.get("base_model"), base_model))
        refused = [(c, by) for c in changes if (by := pinned_by(run, c.key))]
        if refused:
            listing = "\n".join(f"  - {c}: {by} used {'it' if c.key == 'base model' else 'the old value'} (completed)" for c, by in refused)
            raise RunDirError(
                f"{run.root} has completed work that the new configuration would contradict:\n{listing}\n"
                f"Restore those values, or start a new run with --set name=<new-name>."
            )
        changed = saved["config"].get("rounds") != cfg.rounds
        saved["config"]["rounds"] = cfg.rounds
        if changes:  # none read by a completed stage: the run goes on with the new values
            saved["config"], saved["base_model"], changed = cfg.model_dump(mode="json"), base_model, True
            saved.setdefault("resumed_under", []).append({"at": time.time(), "changes": [f"{c} (no completed stage had used it)" for c in changes]})
            (log or logging.getLogger(__name__)).warning("%s: settings changed that no completed stage used, so the run goes on with them: %s",
                                                run.root.name, "; ".join(map(str, changes)))
        if log is not None:
            now = provenance.collect()
            if "provenance" not in saved:  # a run started before provenance was recorded
                saved["provenance"], changed = {**now, "recorded_at_resume": True}, True
            elif moved := provenance.differences(saved["provenance"], now):
                log.warning("resuming %s under other versions than it started with: %s", run.root.name, "; ".join(moved))
                saved.setdefault("resumed_under", []).append({"at": time.time(), "changes": moved})
                changed = True
        if changed:
            write_json_atomic(record, saved)
    else:
        write_json_atomic(record, {"config": cfg.model_dump(mode="json"), "base_model": base_model, "created_at": time.time(),
                                   "provenance": provenance.collect()})
    return run


def note_server_version(run_dir: Path, version: str | None, log=None) -> None:
    """Record the vLLM version a server started for this run reports (`ModelServer.version`) in run.json's
    provenance; a later server reporting another one is a warning, kept under `resumed_under`. No run.json (a
    stage called outside a run), no report (a server without GET /version): nothing to do."""
    record = Path(run_dir) / "run.json"
    if not version or not record.is_file():
        return
    saved = read_json(record)
    known = (saved.setdefault("provenance", {})).get("vllm")
    if known == version:
        return
    if known is not None:
        if log is not None:
            log.warning("the vLLM server for %s reports version %s; the run's earlier servers reported %s", Path(run_dir).name, version, known)
        saved.setdefault("resumed_under", []).append({"at": time.time(), "changes": [f"vLLM {known} -> {version}"]})
    saved["provenance"]["vllm"] = version
    write_json_atomic(record, saved)
