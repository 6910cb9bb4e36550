"""Prompt sets: the bundled ones, or any source `datasets` loads (jsonl/json/csv/parquet path, or a hub name), or a
list of them pooled in order.

A prompt is {"id", "prompt"}, with "reference" where its row has a reference answer (`prompts.answer_column`) and
"verifier" where its row names the verifier that checks it (`prompts.verifier_column`).

    >>> rows = load_prompts("bundled:eval")
    >>> sorted({tuple(sorted(r)) for r in rows})   # open questions; arithmetic with answers; coding with tests
    [('id', 'prompt'), ('id', 'prompt', 'reference'), ('id', 'prompt', 'reference', 'verifier')]
    >>> len(load_prompts(["bundled:eval", "bundled:checkable_eval"])) == len(rows) + 200
    True
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from selfplay.errors import SelfplayError
from selfplay.inputs.tables import present

BUNDLED_DIR = Path(__file__).resolve().parents[1] / "data" / "prompts"
LOADERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


class PromptError(SelfplayError, ValueError):
    """A prompt source that cannot be used, phrased as what to fix."""


def _prompt_from_messages(messages: Any, row: int) -> str:
    if not isinstance(messages, list) or not messages:
        raise PromptError(f"row {row}: the messages column must hold a non-empty list of {{role, content}} dicts")
    users = [m.get("content", "") for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise PromptError(f"row {row}: no user turn in messages")
    return users[-1]


def _text(value: Any) -> str | None:
    """A reference or verifier cell as text; None when it is empty (null, NaN, blank)."""
    if present(value) is None:
        return None
    text = str(value).strip()
    return text or None


def _what_it_holds(value: Any) -> str:
    """What a prompt cell that is not usable text holds, in words."""
    if present(value) is None:
        return "no value"
    if isinstance(value, str):
        return "blank text"
    if isinstance(value, bool | int | float):
        return "a number" if not isinstance(value, bool) else "a boolean"
    return f"a {type(value).__name__}, not text"


def _bad_rows_message(records: list[dict[str, Any]], bad: dict[str, list[int]], key: str, source: str, messages_column: str | None) -> str:
    """Which rows hold no usable prompt and what they hold instead, and the setting that would read the right column."""
    total = sum(map(len, bad.values()))
    parts = []
    for what, rows in bad.items():
        shown = ", ".join(map(str, rows[:5])) + (" ..." if len(rows) > 5 else "")
        example = records[rows[0]][key]
        detail = f" (row {rows[0]}: {example!r})" if what in ("a number", "a boolean") or what.endswith("not text") else ""
        if what == "no value":
            others = [k for k, v in records[rows[0]].items() if k != key and present(v) is not None]
            detail = f" (row {rows[0]} has {', '.join(repr(k) for k in others) or 'nothing'})"
        parts.append(f"{len(rows)} hold {what}{detail} at rows {shown}")
    texts = [k for k in records[0] if k != key and all(isinstance(r.get(k), str) and r[k].strip() for r in records)]
    option = "prompts.messages_column" if messages_column else "prompts.column"
    hint = (f"; or set {option} to the column that holds the prompt text ({', '.join(repr(t) for t in texts)} has text in every row)"
            if texts else "")
    return f"{source}: {total} row(s) have no prompt text in column {key!r}: {'; '.join(parts)}. Fix or remove those rows{hint}"


def rows_to_prompts(records: list[dict[str, Any]], column: str, messages_column: str | None, source: str,
                    answer_column: str = "answer", verifier_column: str = "verifier") -> list[dict[str, str]]:
    """Pure: pick the prompt text (and any reference answer and verifier) from each record, check it, and give each
    prompt a stable id."""
    if not records:
        raise PromptError(f"{source}: no rows")
    key = messages_column or column
    if key not in records[0]:
        option = "prompts.messages_column" if messages_column else "prompts.column"
        raise PromptError(f"{source}: no column {key!r} (columns: {', '.join(records[0])}); set {option}")
    out, bad = [], {}
    for i, record in enumerate(records):
        text = _prompt_from_messages(record[key], i) if messages_column else record[key]
        if not isinstance(text, str) or not text.strip():
            bad.setdefault(_what_it_holds(text), []).append(i)
            continue
        rid = record.get("id")
        prompt = {"id": str(i if rid is None else rid), "prompt": text.strip()}
        for field, col in (("reference", answer_column), ("verifier", verifier_column)):
            if _text(record.get(col)) is not None:
                prompt[field] = _text(record[col])
        out.append(prompt)
    if bad:
        raise PromptError(_bad_rows_message(records, bad, key, source, messages_column))
    seen: dict[str, int] = {}
    for row, p in enumerate(out):
        if p["id"] in seen:
            raise PromptError(f"{source}: prompt id {p['id']!r} appears twice (rows {seen[p['id']]} and {row}); ids must be unique")
        seen[p["id"]] = row
    return out


def unreadable_reason(path: Path, exc: BaseException) -> str:
    """Why `datasets` could not read a prompt file, said specifically: its own errors are often generic ("An error
    occurred while generating the dataset") or blank (an empty file raises a bare StopIteration)."""
    if path.stat().st_size == 0:
        return "the file is empty"
    if path.suffix in (".jsonl", ".json"):
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            return f"it is not UTF-8 text ({err.reason} at byte {err.start})"
        reason = _jsonl_problem(text) if path.suffix == ".jsonl" else _json_problem(text)
        if reason:
            return reason
    if "corresponds to no data" in str(exc):
        return "it holds no rows (only blank lines or a header)"
    for _ in range(10):  # the innermost error is the specific one
        exc = exc.__cause__ or exc.__context__ or exc
    message = " ".join(str(exc).split())[:300]
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _jsonl_problem(text: str) -> str | None:
    """Pure: what makes `text` unusable as JSON lines (one object a line), or None."""
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        return "the file holds only blank lines"
    for n, line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            return f"line {n} is not valid JSON: {err.msg} (column {err.colno})"
        if not isinstance(record, dict):
            return f"line {n} is a JSON {type(record).__name__}, not an object such as {{\"prompt\": \"...\"}}"
    return None


def _json_problem(text: str) -> str | None:
    """Pure: what makes `text` unusable as a JSON array of objects, or None."""
    if not text.strip():
        return "the file holds only whitespace"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # more than one value: JSON lines, which datasets reads from a .json file too
            return _jsonl_problem(text)
        return f"not valid JSON: {err.msg} (line {err.lineno}, column {err.colno})"
    if isinstance(data, list) and not data:
        return "it holds an empty list"
    return None


def load_prompts(source: str | list[str], column: str = "prompt", messages_column: str | None = None, split: str = "train",
                 answer_column: str = "answer", verifier_column: str = "verifier") -> list[dict[str, str]]:
    """Load prompts as [{"id", "prompt", ("reference", "verifier")}]; a list of sources is pooled in order, and
    its prompts' ids must be unique across it. Errors say what to fix."""
    if not isinstance(source, str):
        if not source:
            raise PromptError("an empty list of prompt sources: name at least one")
        pooled, origin = [], {}
        for one in source:
            for p in load_prompts(one, column, messages_column, split, answer_column, verifier_column):
                if p["id"] in origin:
                    raise PromptError(f"prompt id {p['id']!r} is in both {origin[p['id']]} and {one}: pooled sources need distinct ids (an id column)")
                origin[p["id"]] = one
                pooled.append(p)
        return pooled
    if source.startswith("bundled:"):
        path = BUNDLED_DIR / f"{source.split(':', 1)[1]}.jsonl"
        if not path.is_file():
            names = ", ".join(f"bundled:{p.stem}" for p in sorted(BUNDLED_DIR.glob("*.jsonl")))
            raise PromptError(f"unknown bundled prompt set {source!r} (have: {names})")
        source, column, messages_column = str(path), "prompt", None

    import datasets

    datasets.disable_progress_bars()
    path = Path(source).expanduser()
    if path.suffix in LOADERS:
        if not path.is_file():
            raise PromptError(f"prompt file not found: {path}")
        try:
            ds = datasets.load_dataset(LOADERS[path.suffix], data_files=str(path), split="train")
        except Exception as exc:  # datasets raises many types for unreadable files
            raise PromptError(f"cannot read {path} as {LOADERS[path.suffix]}: {unreadable_reason(path, exc)}") from None
    elif path.exists():
        raise PromptError(f"{path}: unsupported prompt file type (use .jsonl, .json, .csv or .parquet)")
    else:
        try:
            ds = datasets.load_dataset(source, split=split)
        except Exception as exc:
            raise PromptError(
                f"{source!r} is not a local file, and loading it as a hub dataset failed ({exc.__class__.__name__}: "
                f"{str(exc)[:200]}). Offline, use a local jsonl/json/csv/parquet file."
            ) from None
    return rows_to_prompts(ds.to_list(), column, messages_column, source, answer_column, verifier_column)


def prompt_set(p, which: str) -> list[dict[str, str]]:
    """The train or eval prompts a `PromptsConfig` names."""
    return load_prompts(getattr(p, which), p.column, p.messages_column, p.split, p.answer_column, p.verifier_column)


def accuracy_prompts(p, held_out: list[dict[str, str]]) -> list[dict[str, str]]:
    """The held-out prompts accuracy is measured on: those with a reference, the first `prompts.accuracy_size`."""
    checkable = [q for q in held_out if q.get("reference") is not None]
    return checkable[: p.accuracy_size] if p.accuracy_size else checkable


def draw_prompts(prompts: list[dict[str, str]], n: int, seed: int, round_k: int) -> list[dict[str, str]]:
    """A fresh, seeded draw per round: the same (seed, round) always gives the same prompts."""
    rng = random.Random(f"{seed}:{round_k}")
    return rng.sample(prompts, min(n, len(prompts)))
