"""What a judge backend sees and says: one call is one order of one comparison (`JudgeCall`), one result is how
likely position A is the better response (`JudgeResult`), and a backend (`Judge`) answers a list of calls.

A backend sees one *call* at a time; asking both orders and combining them is the judge runtime's job
(`selfplay.judging.runner`), so every backend gets position-bias cancellation for free.

    judge = make_judge(cfg.judge, reference="/path/to/checkpoint")      # selfplay.judging.runner
    results = judge.judge([JudgeCall(system="...", user="...")])
    results[0].p_a   # P(A is better), renormalised over the labels A and B; None when the call failed
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class JudgeCall:
    system: str
    user: str


@dataclass
class JudgeResult:
    p_a: float | None  # probability that position A is better (1 / 0 / 0.5 for discrete labels); None on error
    mode: str  # how the verdict was read: "logprobs" (label probabilities), "choice" or "text" (discrete labels)
    label: str | None = None  # discrete modes: "A", "B", "tie" or "invalid"; None for logprobs
    error: str | None = None
    label_mass: float | None = None  # logprobs: probability mass on the A/B labels before renormalising
    tokens_in: int = 0
    tokens_out: int = 0
    latency_s: float = 0.0
    cost: float = 0.0
    cached: bool = False
    extra: dict = field(default_factory=dict)


class Judge(Protocol):
    def judge(self, calls: list[JudgeCall]) -> list[JudgeResult]:
        """One result per call, in order. Errors are results with `error` set, never exceptions per call."""
        ...

    def close(self) -> None: ...


