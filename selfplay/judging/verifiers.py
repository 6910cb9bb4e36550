"""Verifiers: score one response against its prompt's reference answer. Pure functions (the `code` verifier runs
the program in `selfplay.judging.sandbox`, and `python` calls the user's function); no model, no judge.

A score is a float in [0, 1]: 1.0 means correct (`is_correct`), lower means less correct, and a closer answer
scores higher than a farther one, so two wrong answers can still be told apart.

    number   the response's final number equals the reference number (whole numbers exactly, decimals within a
             relative tolerance); a wrong number
             scores 0.5 / (1 + relative error), no number at all 0. Applies when the reference is a number.
    exact    normalised text: the whole response, its last line, what follows its last "answer is"/"answer:",
             or its last `code` or **bold** span equals the reference (case, spaces, markdown and end
             punctuation ignored).
    regex    the reference is a regular expression the response matches (re.search).
    python   a user's function, `module:function(prompt, response, reference) -> float`.
    code     the response's program (its last ```python block, else its last fenced block, else all of it) runs,
             followed by the reference (the prompt's tests, e.g. `assert add(2, 3) == 5`), in the sandbox: 1.0 if
             it exits cleanly within the time and memory limits, else 0.

A response cut off by the token budget (`truncated`) has no final answer: every verifier scores it 0, so a
finished correct answer beats it, and an unfinished one is never counted as correct.

`auto` picks per prompt: the prompt's own `verifier` column where it names one, else `number` for a numeric
reference, else `exact`.

    >>> number_score("3 + 4 = 7", "7"), number_score("It is 8.", "7") < 0.5, number_score("no idea", "7")
    (1.0, True, 0.0)
    >>> exact_score("The answer is: **Paris**.", "paris")
    1.0
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable
from typing import Any

from selfplay.errors import SelfplayError
from selfplay.inputs.tables import present

KINDS = ("number", "exact", "regex", "python", "code")
CORRECT = 1.0 - 1e-9

_NUMBER = re.compile(r"(?<![\w.])[-−]?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?%?|(?<![\w.])[-−]?\.\d+")


class VerifierError(SelfplayError, ValueError):
    """A verifier that cannot run (an unknown kind, a user function that cannot be imported or fails)."""


def is_correct(score: float | None) -> bool:
    return score is not None and score >= CORRECT


def parse_number(text: str) -> float | None:
    """A number as people write one: 1,234.5, -3, 3/4, 50%, $12, or None.

    >>> parse_number("1,234.5"), parse_number("3/4"), parse_number("50%"), parse_number("x")
    (1234.5, 0.75, 50.0, None)
    """
    t = text.strip().replace("−", "-").replace("$", "").replace(",", "").rstrip("%").strip()
    try:
        if "/" in t:
            num, den = t.split("/", 1)
            return float(num) / float(den)
        value = float(t)
    except (ValueError, ZeroDivisionError):
        return None
    return value if math.isfinite(value) else None


def final_number(response: str) -> float | None:
    """The last number written in the response, or None.

    >>> final_number("3 + 4 = 7. So 7 apples."), final_number("about 1,000 or -2.5")
    (7.0, -2.5)
    """
    found = _NUMBER.findall(response)
    for token in reversed(found):
        value = parse_number(token)
        if value is not None:
            return value
    return None


def number_score(response: str, reference: str, rel_tol: float = 1e-6) -> float:
    """1.0 when the final number equals the reference: exactly for whole numbers, else within `rel_tol` (relative,
    with an absolute floor of `rel_tol` for a reference of 0); a wrong number 0.5 / (1 + relative error); no number 0."""
    want = parse_number(reference)
    if want is None:
        raise VerifierError(f"number verifier: the reference {reference!r} is not a number")
    got = final_number(response)
    if got is None:
        return 0.0
    both_whole = got.is_integer() and want.is_integer()  # whole numbers compare exactly, however large
    if got == want or (not both_whole and math.isclose(got, want, rel_tol=rel_tol, abs_tol=rel_tol)):
        return 1.0
    return 0.5 / (1.0 + abs(got - want) / max(abs(want), 1.0))


def normalise(text: str) -> str:
    """Case-folded, markdown and quotes stripped, spaces collapsed, end punctuation dropped.

    >>> normalise("  **The   Nile.** ")
    'the nile'
    """
    t = re.sub(r"[*_`\"“”‘’]", "", text).casefold()
    t = " ".join(t.split())
    return t.strip(" .!?;:,'")


def answer_candidates(response: str) -> list[str]:
    """The parts of a response that may be its final answer."""
    lines = [line for line in response.splitlines() if line.strip()]
    out = [response]
    if lines:
        out.append(lines[-1])
    tail = re.split(r"(?i)answer(?:\s+is)?\s*[:=]?", response)
    if len(tail) > 1:
        out.append(tail[-1])
    out += re.findall(r"`([^`\n]+)`", response)[-1:] + re.findall(r"\*\*([^*\n]+)\*\*", response)[-1:]
    return out


def exact_score(response: str, reference: str) -> float:
    want = normalise(reference)
    return 1.0 if any(normalise(c) == want for c in answer_candidates(response)) else 0.0


def regex_score(response: str, reference: str) -> float:
    try:
        return 1.0 if re.search(reference, response) else 0.0
    except re.error as exc:
        raise VerifierError(f"regex verifier: the reference {reference!r} is not a regular expression ({exc})") from None


def program_of(response: str) -> str:
    """The program in a response: its last ```python block, else its last fenced block, else the whole text.

    >>> program_of("Here:\\n```python\\ndef f():\\n    return 1\\n```\\nDone.")
    'def f():\\n    return 1'
    """
    blocks = re.findall(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)```", response, flags=re.S)
    python = [body for lang, body in blocks if lang.lower() in ("python", "py", "python3")]
    chosen = python or [body for _, body in blocks]
    return (chosen[-1] if chosen else response).strip()


def code_score(response: str, reference: str, timeout_s: float = 5.0, memory_mb: int = 512) -> float:
    from selfplay.judging.sandbox import run_python

    result = run_python(program_of(response) + "\n\n" + reference + "\n", timeout_s=timeout_s, memory_mb=memory_mb)
    return 1.0 if result.status == "ok" else 0.0


def load_function(spec: str) -> Callable[[str, str, str], float]:
    """`module:function`, imported; errors say what to fix."""
    module_name, sep, name = spec.partition(":")
    if not sep or not module_name or not name:
        raise VerifierError(f"judge.verifier.function {spec!r}: expected 'module:function', e.g. 'my_checks:score'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise VerifierError(f"judge.verifier.function {spec!r}: cannot import {module_name!r} ({exc}); is it on PYTHONPATH?") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise VerifierError(f"judge.verifier.function {spec!r}: {module_name} has no function {name!r}")
    return fn


def choose_kind(kind: str, reference: Any, row_kind: Any = None) -> str | None:
    """The verifier that checks a prompt with this reference, or None when none applies (no reference, `none`).

    >>> choose_kind("auto", "42"), choose_kind("auto", "Paris"), choose_kind("auto", "x", "regex"), choose_kind("auto", None)
    ('number', 'exact', 'regex', None)
    """
    if present(reference) is None or kind == "none":
        return None
    if kind != "auto":
        return kind
    if isinstance(row_kind, str) and row_kind.strip():
        if row_kind not in KINDS:
            raise VerifierError(f"a prompt's verifier {row_kind!r} is not one of {', '.join(KINDS)}")
        return row_kind
    return "number" if parse_number(str(reference)) is not None else "exact"


class Verifier:
    """The configured verifiers (`judge.verifier`), scoring (prompt, response, reference, kind) to a float."""

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self._function = load_function(cfg.function) if cfg.function else None

    def kind(self, reference: Any, row_kind: Any = None) -> str | None:
        return choose_kind(self.cfg.kind, reference, row_kind)

    def score(self, kind: str, prompt: str, response: str, reference: str) -> float:
        """The score in [0, 1]; with `partial_credit` off, 1.0 for a correct response and 0.0 for any other."""
        value = self._score(kind, prompt, response, str(reference))
        if getattr(self.cfg, "partial_credit", True):
            return value
        return 1.0 if is_correct(value) else 0.0

    def _score(self, kind: str, prompt: str, response: str, reference: str) -> float:
        if kind == "number":
            return number_score(response, reference, self.cfg.tolerance)
        if kind == "exact":
            return exact_score(response, reference)
        if kind == "regex":
            return regex_score(response, reference)
        if kind == "code":
            return code_score(response, reference, self.cfg.timeout_s, self.cfg.memory_mb)
        if kind == "python":
            if self._function is None:
                raise VerifierError("the python verifier needs judge.verifier.function: 'module:function'")
            try:
                value = float(self._function(prompt, response, reference))
            except Exception as exc:  # the user's code: say whose it is
                raise VerifierError(f"judge.verifier.function {self.cfg.function!r} failed: {type(exc).__name__}: {exc}") from None
            if not 0.0 <= value <= 1.0:
                raise VerifierError(f"judge.verifier.function {self.cfg.function!r} returned {value}, not a score in [0, 1]")
            return value
        raise VerifierError(f"unknown verifier {kind!r} (one of {', '.join(KINDS)})")


def score_table(verifier: Verifier, table, response: str = "response"):
    """`table` (rows with prompt, `response`, and reference, verifier and truncated columns where it has them) with
    the verifier each row's prompt gets (`verifier`, None where none applies) and its score (`verify_score`; 0 for
    a truncated response). Each response is scored once."""
    out = table.copy()
    references = out["reference"] if "reference" in out else [None] * len(out)
    row_kinds = out["verifier"] if "verifier" in out else [None] * len(out)
    cut = out["truncated"].astype(bool) if "truncated" in out else [False] * len(out)
    kinds = [verifier.kind(ref, row_kind) for ref, row_kind in zip(references, row_kinds)]
    out["verifier"] = kinds
    out["verify_score"] = [None if kind is None else 0.0 if truncated else verifier.score(kind, p, r, ref)
                           for kind, p, r, ref, truncated in zip(kinds, out["prompt"], out[response], references, cut)]
    out["verify_score"] = out["verify_score"].astype("float64")
    return out


def verifier_stats(scored) -> dict[str, Any]:
    """What the verifier did over a `score_table`: calls (responses scored), by verifier, and the fraction correct."""
    checked = scored[scored["verifier"].notna()]
    return {
        "verifier_calls": len(checked),
        "verifiers": {str(k): int(v) for k, v in checked["verifier"].value_counts().items()},
        "sample_accuracy": float(checked["verify_score"].map(is_correct).mean()) if len(checked) else None,
    }
