"""Judge backends: given rendered judge conversations, say how likely the response in position A is the better one.

A backend sees one *call* at a time (one order of one pair); asking both orders and combining them is the judge
judge runtime's job (`selfplay/judging.py`), so every backend gets position-bias cancellation for free.

    judge = make_judge(cfg.judge, reference="/path/to/checkpoint")
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


def make_judge(cfg, reference: str) -> Judge:
    """Build the configured judge. `judge.model == "reference"` judges with the round's reference checkpoint."""
    from selfplay.models import cache_root, resolve_model

    if cfg.backend == "endpoint":
        from selfplay.judges.cache import JudgeCache
        from selfplay.judges.openai import OpenAIJudge

        cache = JudgeCache(cache_root() / "judge-cache.sqlite") if cfg.cache else None
        return OpenAIJudge(cfg.endpoint, mode=cfg.mode, cache=cache)
    if cfg.backend == "transformers":
        from selfplay.judges.local import LocalJudge

        path = reference if cfg.model == "reference" else str(resolve_model(cfg.model))
        return LocalJudge(path, batch_size=cfg.batch_size, max_length=cfg.max_length)
    raise ValueError(f"unknown judge backend {cfg.backend!r}")
