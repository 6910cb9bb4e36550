"""Which rounds a run works through, and from which checkpoint: the round loop's state and a lineage's ledger.

Round k's policy (and DPO reference) is the current checkpoint: the last *accepted* round's, or the base model. A
round the gate rejects stays on disk, marked rejected, and the next round starts again from the checkpoint before
it; `gate.early_stop_after` rejected rounds in a row stop the loop (`Rounds`).

A *lineage* is a run directory that nightly runs keep extending: `lineage="nightly"` runs in runs/nightly/,
continues from its current checkpoint for `rounds` more rounds (round numbers continue), and first finishes
whatever the previous run of the lineage left unfinished (`continue_lineage`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selfplay.config.run import RunConfig, build_config
from selfplay.runtime.rundir import read_json, write_json_atomic

LEDGER = "lineage.json"


@dataclass
class Rounds:
    """The round loop's state: the current checkpoint and how many rounds in a row the gate rejected.

    >>> rounds = Rounds(policy="base", early_stop_after=2)
    >>> rounds.record({"accepted": False}, "round_1/ckpt", resumed=False), rounds.policy
    (None, 'base')
    >>> rounds.record({"accepted": True}, "round_2/ckpt", resumed=False), rounds.policy
    (None, 'round_2/ckpt')
    >>> [rounds.record({"accepted": False}, f"round_{k}/ckpt", resumed=False) for k in (3, 4)][-1]
    '2 rejected rounds in a row (gate.early_stop_after=2); current checkpoint round_2/ckpt'
    >>> Rounds("base", early_stop_after=1).record({"accepted": False}, "round_1/ckpt", resumed=True) is None  # an earlier run's
    True
    """

    policy: str
    early_stop_after: int | None = None
    rejected_in_a_row: int = 0

    def record(self, summary: dict[str, Any], checkpoint: str | Path, resumed: bool) -> str | None:
        """Take in a round's summary (`resumed`: it was complete before this invocation); why the loop stops now,
        or None. An accepted round's `checkpoint` becomes the current one. Only this invocation's rejections count
        towards the early stop, so tomorrow's run of a lineage tries again."""
        if summary.get("accepted", True):
            self.policy, self.rejected_in_a_row = str(checkpoint), 0
        elif not resumed:
            self.rejected_in_a_row += 1
        if self.early_stop_after and self.rejected_in_a_row >= self.early_stop_after:
            return (f"{self.rejected_in_a_row} rejected rounds in a row (gate.early_stop_after={self.early_stop_after}); "
                    f"current checkpoint {self.policy}")
        return None


def continue_lineage(cfg: RunConfig, lineage: str, more_rounds: int, invocation: str | None = None) -> RunConfig:
    """The lineage's run config: runs/<lineage>/, target = the previous run's target + `more_rounds`.

    The target is recorded per flow run (`invocation`) in runs/<lineage>/lineage.json, so retrying a flow run
    resumes it towards the same target instead of adding rounds again.
    """
    cfg = cfg.model_copy(update={"name": lineage})
    ledger_path = cfg.run_dir / LEDGER
    ledger = read_json(ledger_path) if ledger_path.is_file() else {"targets": {}}
    if invocation and invocation in ledger["targets"]:
        return with_rounds(cfg, ledger["targets"][invocation])
    record = cfg.run_dir / "run.json"
    target = (read_json(record)["config"]["rounds"] if record.is_file() else 0) + more_rounds
    if invocation:
        ledger["targets"][invocation] = target
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(ledger_path, ledger)
    return with_rounds(cfg, target)


def with_rounds(cfg: RunConfig, rounds: int) -> RunConfig:
    """`cfg` with another round count, validated again (a rule may depend on it: an endpoint sampler over several
    rounds needs adapter checkpoints)."""
    return build_config({**cfg.model_dump(), "rounds": rounds})
