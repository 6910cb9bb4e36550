"""The evaluate stage's generation jobs: each a named (model, prompts, temperature, budget), run once however many
names share it, and the table of a job's answers (`generations*.parquet`). Names, not positions, carry a job's
answers back, so no reordering of the jobs can hand one model's answers to another.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import pandas as pd

GENERATION_COLUMNS = ["prompt_id", "prompt", "reference", "verifier", "response", "n_tokens", "truncated"]


class EvalJob(NamedTuple):
    """One answer per prompt from `model`, with the evaluate stage's seed."""

    model: str
    prompts: list[dict[str, str]]
    temperature: float
    max_new_tokens: int


def generation_table(prompts: list[dict[str, str]], answers: list[dict[str, Any]]) -> pd.DataFrame:
    """A job's answers, one row per prompt, in the prompts' order."""
    return pd.DataFrame([{"prompt_id": p["id"], "prompt": p["prompt"], "reference": p.get("reference"), "verifier": p.get("verifier"),
                          "response": a["response"], "n_tokens": a["n_tokens"], "truncated": a["truncated"]}
                         for p, a in zip(prompts, answers)], columns=GENERATION_COLUMNS)


def distinct_jobs(jobs: dict[str, EvalJob]) -> tuple[list[EvalJob], dict[str, int]]:
    """The jobs that differ, and for each name the index of its job among them: the same model, prompts and settings
    answer alike (every job has the stage's seed), so the evaluate stage's win-rate and accuracy answers are one job
    when its temperature is 0 and both budgets and prompt sets are the same.

    >>> p = [{"id": "a", "prompt": "2+2?"}]
    >>> distinct, index = distinct_jobs({"new": EvalJob("new", p, 0.0, 24), "previous": EvalJob("old", p, 0.0, 24),
    ...                                  "new_greedy": EvalJob("new", list(p), 0.0, 24), "hot": EvalJob("new", p, 0.7, 24)})
    >>> len(distinct), index
    (3, {'new': 0, 'previous': 1, 'new_greedy': 0, 'hot': 2})
    """
    keys = {name: (job.model, tuple((q["id"], q["prompt"]) for q in job.prompts), float(job.temperature), int(job.max_new_tokens))
            for name, job in jobs.items()}
    distinct = list(dict.fromkeys(keys.values()))
    first = {key: name for name, key in reversed(keys.items())}
    return [jobs[first[key]] for key in distinct], {name: distinct.index(key) for name, key in keys.items()}


def answers_by_name(tables: list[pd.DataFrame], index: dict[str, int]) -> dict[str, pd.DataFrame]:
    """Each name's answers, from the distinct jobs' `tables` (a copy each: two names may share one job).

    >>> answers_by_name([pd.DataFrame({"response": ["4"]})], {"new": 0, "new_greedy": 0})["new_greedy"]["response"].tolist()
    ['4']
    """
    return {name: tables[i].copy() for name, i in index.items()}
