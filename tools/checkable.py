"""A seeded generator of prompts whose answers can be checked: arithmetic of several kinds, short word problems, and
"what does this Python code print". Pure: the same seed gives the same prompts, in any process.

Each row is {"id", "category", "prompt", "answer", "verifier"}: `answer` is the reference as text and `verifier`
names the verifier that checks it (`number` for every numeric answer, `exact` for a printed string). The shipped
files `selfplay/data/prompts/checkable_{train,eval}.jsonl` were written by

    python -m tools.checkable          # --out selfplay/data/prompts, the default

(train seed 0, held-out seed 1; a held-out prompt never repeats a train prompt's text).

    >>> rows = generate_prompts(3, seed=0)
    >>> [sorted(r) for r in rows][0]
    ['answer', 'category', 'id', 'prompt', 'verifier']
    >>> generate_prompts(3, seed=0) == rows
    True
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from selfplay.inputs.prompts import BUNDLED_DIR

NAMES = ("Tom", "Ana", "Sam", "Mia", "Leo", "Zoe", "Max", "Ivy", "Ben", "Eva")
ITEMS = ("apples", "books", "coins", "stickers", "marbles", "pencils", "cards", "stamps")
ONLY_NUMBER = " Reply with only the number."


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(2, 60), rng.randint(2, 40)
    return f"What is {a} + {b}?{ONLY_NUMBER}", str(a + b)


def _subtract(rng: random.Random) -> tuple[str, str]:
    a = rng.randint(10, 90)
    b = rng.randint(1, a - 1)
    return f"What is {a} - {b}?{ONLY_NUMBER}", str(a - b)


def _multiply(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(2, 12), rng.randint(2, 25)
    return f"What is {a} times {b}?{ONLY_NUMBER}", str(a * b)


def _word(rng: random.Random) -> tuple[str, str]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(3, 30), rng.randint(2, 20)
    kind = rng.randrange(3)
    if kind == 0:
        return f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?{ONLY_NUMBER}", str(a + b)
    if kind == 1:
        a = a + b
        return f"{name} has {a} {item} and gives away {b}. How many {item} are left?{ONLY_NUMBER}", str(a - b)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    return f"There are {a} boxes with {b} {item} in each box. How many {item} are there in all?{ONLY_NUMBER}", str(a * b)


def _code(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(4)
    if kind == 0:
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        code, out = f"x = {a}\ny = {b}\nprint(x + y)", str(a + b)
    elif kind == 1:
        word = rng.choice(("cat", "house", "python", "river", "sun", "garden", "blue", "table"))
        code, out = f'print(len("{word}"))', str(len(word))
    elif kind == 2:
        values = rng.sample(range(1, 50), 4)
        code, out = f"print(max({values}))", str(max(values))
    else:
        a, b = rng.randint(2, 9), rng.randint(2, 6)
        code, out = f"total = 0\nfor i in range({b}):\n    total += {a}\nprint(total)", str(a * b)
    return f"What does this Python code print?\n\n{code}\n{ONLY_NUMBER.strip()}", out


KINDS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "add": _add, "subtract": _subtract, "multiply": _multiply, "word_problem": _word, "code_output": _code,
}


def generate_prompts(n: int, seed: int, prefix: str = "chk", exclude: set[str] = frozenset()) -> list[dict[str, Any]]:
    """`n` distinct checkable prompts, the kinds in turn, none whose text is in `exclude`."""
    rng = random.Random(f"checkable:{seed}")
    kinds = list(KINDS)
    rows: list[dict[str, Any]] = []
    seen = set(exclude)
    misses = 0
    while len(rows) < n:
        kind = kinds[len(rows) % len(kinds)]
        prompt, answer = KINDS[kind](rng)
        if prompt in seen:
            misses += 1
            if misses > 10_000:
                raise ValueError(f"cannot draw {n} distinct prompts: the {kind!r} kind ran out of new ones after {len(rows)}")
            continue
        misses = 0
        seen.add(prompt)
        rows.append({"id": f"{prefix}-{len(rows):04d}", "category": kind, "prompt": prompt, "answer": answer, "verifier": "number"})
    return rows


def write_files(out: Path, n_train: int = 600, n_eval: int = 200) -> dict[str, Path]:
    train = generate_prompts(n_train, seed=0, prefix="chk-train")
    held_out = generate_prompts(n_eval, seed=1, prefix="chk-eval", exclude={r["prompt"] for r in train})
    paths = {}
    for name, rows in (("checkable_train", train), ("checkable_eval", held_out)):
        paths[name] = out / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=BUNDLED_DIR)
    parser.add_argument("--train", type=int, default=600)
    parser.add_argument("--eval", type=int, default=200)
    args = parser.parse_args(argv)
    for path in write_files(args.out, args.train, args.eval).values():
        print(path)


if __name__ == "__main__":
    main()
