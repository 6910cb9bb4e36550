"""Fast tier: prompt sets (selfplay/inputs/prompts.py): the bundled sets, local files of every supported type, errors, draws.

Files are small and written with pandas under tmp_path; nothing is fetched from a hub.
"""

from __future__ import annotations

import json
import random
import re

import pandas as pd
import pytest

from selfplay.inputs.prompts import BUNDLED_DIR, PromptError, draw_prompts, load_prompts, rows_to_prompts, unreadable_reason

pytestmark = pytest.mark.unit

CATEGORIES = {"question", "howto", "writing", "arithmetic", "coding"}


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().casefold()


@pytest.fixture(scope="module")
def bundled() -> dict[str, list[dict[str, str]]]:
    return {name: load_prompts(f"bundled:{name}") for name in ("train", "eval")}


# ---------------------------------------------------------------- bundled sets

def test_bundled_sets_are_big_enough_and_disjoint(bundled):
    train, evals = bundled["train"], bundled["eval"]
    assert len(train) + len(evals) >= 300
    assert len(evals) >= 16  # the default prompts.eval_size
    overlap = {normalise(p["prompt"]) for p in train} & {normalise(p["prompt"]) for p in evals}
    assert overlap == set()


def test_bundled_prompts_are_non_empty_with_unique_ids(bundled):
    everything = bundled["train"] + bundled["eval"]
    assert all(sorted(p) in (["id", "prompt"], ["id", "prompt", "reference"], ["id", "prompt", "reference", "verifier"]) for p in everything)
    assert any("reference" in p for p in bundled["eval"])  # the arithmetic items carry their answers
    assert all(p["prompt"].strip() == p["prompt"] and p["prompt"] for p in everything)
    ids = [p["id"] for p in everything]
    assert len(ids) == len(set(ids))
    for name, rows in bundled.items():
        assert len({normalise(p["prompt"]) for p in rows}) == len(rows), f"duplicate prompt text in bundled:{name}"


@pytest.mark.parametrize("name", ["train", "eval"])
def test_bundled_categories_cover_every_kind(name):
    rows = [json.loads(line) for line in (BUNDLED_DIR / f"{name}.jsonl").read_text().splitlines() if line.strip()]
    assert {r["category"] for r in rows} == CATEGORIES
    assert all(r["id"].startswith(f"{name}-") for r in rows)


def test_unknown_bundled_set_lists_the_available_ones():
    with pytest.raises(PromptError, match=r"unknown bundled prompt set 'bundled:test' \(have: bundled:checkable_eval, bundled:checkable_train, "
                                          r"bundled:eval, bundled:train\)"):
        load_prompts("bundled:test")


# ---------------------------------------------------------------- local files

def test_load_jsonl_keeps_ids_and_strips_text(tmp_path):
    path = tmp_path / "p.jsonl"
    pd.DataFrame({"id": ["a", "b"], "prompt": ["  first?  ", "second\n"]}).to_json(path, orient="records", lines=True)
    assert load_prompts(str(path)) == [{"id": "a", "prompt": "first?"}, {"id": "b", "prompt": "second"}]


def test_load_csv_without_ids_numbers_rows(tmp_path):
    path = tmp_path / "p.csv"
    pd.DataFrame({"prompt": ["one", "two", "three"], "other": [1, 2, 3]}).to_csv(path, index=False)
    assert load_prompts(str(path)) == [{"id": "0", "prompt": "one"}, {"id": "1", "prompt": "two"}, {"id": "2", "prompt": "three"}]


def test_load_parquet_with_a_custom_column(tmp_path):
    path = tmp_path / "p.parquet"
    pd.DataFrame({"question": ["why?", "how?"], "prompt": ["ignored", "ignored"]}).to_parquet(path, index=False)
    assert [p["prompt"] for p in load_prompts(str(path), column="question")] == ["why?", "how?"]


def test_load_json_array(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps([{"prompt": "x"}, {"prompt": "y"}]))
    assert [p["prompt"] for p in load_prompts(str(path))] == ["x", "y"]


def test_messages_column_takes_the_last_user_turn(tmp_path):
    chats = [
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "first question"}],
        [{"role": "user", "content": "old"}, {"role": "assistant", "content": "answer"}, {"role": "user", "content": "follow-up"}],
    ]
    for path in (tmp_path / "c.jsonl", tmp_path / "c.parquet"):
        frame = pd.DataFrame({"messages": chats})
        if path.suffix == ".jsonl":
            frame.to_json(path, orient="records", lines=True)
        else:
            frame.to_parquet(path, index=False)
        prompts = load_prompts(str(path), messages_column="messages")
        assert [p["prompt"] for p in prompts] == ["first question", "follow-up"], path.suffix


def test_messages_without_a_user_turn_name_the_row():
    records = [{"messages": [{"role": "user", "content": "ok"}]}, {"messages": [{"role": "assistant", "content": "hi"}]}]
    with pytest.raises(PromptError, match="row 1: no user turn"):
        rows_to_prompts(records, "prompt", "messages", "chats.jsonl")
    with pytest.raises(PromptError, match="row 0: the messages column must hold a non-empty list"):
        rows_to_prompts([{"messages": []}], "prompt", "messages", "chats.jsonl")


# ---------------------------------------------------------------- errors

def test_missing_column_lists_columns_and_names_the_option(tmp_path):
    path = tmp_path / "p.csv"
    pd.DataFrame({"question": ["q"], "answer": ["a"]}).to_csv(path, index=False)
    with pytest.raises(PromptError) as err:
        load_prompts(str(path))
    msg = str(err.value)
    assert "no column 'prompt'" in msg and "question, answer" in msg and "prompts.column" in msg
    with pytest.raises(PromptError, match=r"no column 'chat'.*prompts\.messages_column"):
        load_prompts(str(path), messages_column="chat")


def test_empty_prompts_are_counted_with_their_rows(tmp_path):
    path = tmp_path / "p.jsonl"
    pd.DataFrame({"prompt": ["fine", "", "   ", "also fine", None]}).to_json(path, orient="records", lines=True)
    with pytest.raises(PromptError) as err:
        load_prompts(str(path))
    assert "3 row(s) have no prompt text in column 'prompt': 2 hold blank text at rows 1, 2; 1 hold no value (row 4 has nothing) at rows 4" in str(err.value)


def test_many_empty_prompts_show_the_first_rows():
    records = [{"prompt": ""} for _ in range(25)]
    with pytest.raises(PromptError, match=r"25 row\(s\) have no prompt text .* 25 hold blank text at rows 0, 1, 2, 3, 4 \.\.\."):
        rows_to_prompts(records, "prompt", None, "src")


def test_rows_holding_numbers_or_another_key_say_so_and_name_the_column_that_would_fix_it(tmp_path):
    """A jsonl whose rows hold a number as the prompt, or no `prompt` key (their text under `question`)."""
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [{"prompt": 12, "question": "What is 5 + 7?"}, {"question": "Name a colour."},
                                                          {"prompt": "Fine.", "question": "And this?"}]))
    with pytest.raises(PromptError) as err:
        load_prompts(str(path))
    msg = str(err.value)
    assert "2 row(s) have no prompt text in column 'prompt'" in msg
    assert "hold a number (row 0: 12) at rows 0" in msg or "hold no value" in msg  # datasets may read a mixed column as text
    assert "1 hold no value (row 1 has 'question') at rows 1" in msg
    assert "set prompts.column to the column that holds the prompt text ('question' has text in every row)" in msg


def test_no_rows_is_an_error():
    with pytest.raises(PromptError, match="src: no rows"):
        rows_to_prompts([], "prompt", None, "src")


def test_missing_file_is_an_error(tmp_path):
    for suffix in (".jsonl", ".csv", ".parquet", ".json"):
        with pytest.raises(PromptError, match="prompt file not found"):
            load_prompts(str(tmp_path / f"missing{suffix}"))


def test_unsupported_file_type_is_an_error(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("one prompt per line\n")
    with pytest.raises(PromptError, match=r"unsupported prompt file type \(use .jsonl, .json, .csv or .parquet\)"):
        load_prompts(str(path))


def test_unreadable_file_is_an_error(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"definitely not parquet")
    with pytest.raises(PromptError, match="cannot read .* as parquet"):
        load_prompts(str(path))


@pytest.mark.parametrize("name,content,reason", [
    ("empty.jsonl", "", "the file is empty"),
    ("empty.json", "", "the file is empty"),
    ("empty.csv", "", "the file is empty"),
    ("blank.jsonl", "\n  \n", "the file holds only blank lines"),
    ("bad.jsonl", '{"prompt": "a"}\n{"prompt": "b"}\nnot json\n', "line 3 is not valid JSON: Expecting value"),
    ("cut.jsonl", '{"prompt": "a"}\n{"prompt": "b"\n', "line 2 is not valid JSON"),
    ("cut.json", '[{"prompt": "a"}', "not valid JSON"),
    ("none.json", "[]", "it holds an empty list"),
    ("header.csv", "prompt\n", "it holds no rows"),
])
def test_an_unreadable_prompt_file_names_its_reason(tmp_path, name, content, reason):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(PromptError) as err:
        load_prompts(str(path))
    assert str(err.value).startswith(f"cannot read {path} as ")
    assert reason in str(err.value)


def test_an_unreadable_binary_file_names_the_error_type(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"definitely not parquet")
    with pytest.raises(PromptError, match=r"as parquet: ArrowInvalid: .*magic bytes"):
        load_prompts(str(path))
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'\xff{"prompt": "caf\xe9"}\n')
    with pytest.raises(PromptError, match=r"as json: it is not UTF-8 text"):
        load_prompts(str(latin))


def test_unreadable_reason_is_never_blank(tmp_path):
    path = tmp_path / "p.parquet"
    path.write_bytes(b"x")
    assert unreadable_reason(path, StopIteration()) == "StopIteration"


# ---------------------------------------------------------------- draws

def pool(n: int) -> list[dict[str, str]]:
    return [{"id": str(i), "prompt": f"prompt {i}"} for i in range(n)]


def test_draws_are_deterministic_per_seed_and_round():
    prompts = pool(300)
    for seed in range(5):
        for k in range(1, 6):
            assert draw_prompts(prompts, 24, seed, k) == draw_prompts(list(prompts), 24, seed, k)


def test_draws_differ_across_rounds_and_seeds():
    prompts = pool(300)
    by_round = [tuple(p["id"] for p in draw_prompts(prompts, 24, 0, k)) for k in range(1, 11)]
    assert len(set(by_round)) == 10
    assert draw_prompts(prompts, 24, 0, 1) != draw_prompts(prompts, 24, 1, 1)


def test_draws_never_exceed_the_pool_and_never_repeat():
    rng = random.Random(0)
    for _ in range(100):
        size, n = rng.randint(1, 40), rng.randint(1, 60)
        prompts = pool(size)
        drawn = draw_prompts(prompts, n, rng.randint(0, 9), rng.randint(1, 9))
        assert len(drawn) == min(n, size)
        assert len({p["id"] for p in drawn}) == len(drawn)
        assert all(p in prompts for p in drawn)


# ---------------------------------------------------------------- reference answers and pooled sources

def test_reference_and_verifier_columns_travel_with_the_prompt(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [{"id": "a", "prompt": "1+1?", "answer": 2, "verifier": "number"}, {"id": "b", "prompt": "hi", "answer": None},
            {"id": "c", "prompt": "capital?", "answer": "  Paris "}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_prompts(str(path)) == [{"id": "a", "prompt": "1+1?", "reference": "2", "verifier": "number"},
                                       {"id": "b", "prompt": "hi"}, {"id": "c", "prompt": "capital?", "reference": "Paris"}]
    assert [p.get("reference") for p in load_prompts(str(path), answer_column="nope")] == [None, None, None]


def test_a_list_of_sources_is_pooled_in_order_and_needs_distinct_ids(tmp_path):
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    one.write_text(json.dumps({"prompt": "x"}) + "\n")
    two.write_text(json.dumps({"prompt": "y"}) + "\n")
    pooled = load_prompts(["bundled:eval", "bundled:checkable_eval"])
    assert [p["id"] for p in pooled[:1]] == ["eval-0001"] and pooled[-1]["id"].startswith("chk-eval-")
    with pytest.raises(PromptError, match=r"prompt id '0' is in both .*one.jsonl and .*two.jsonl"):
        load_prompts([str(one), str(two)])
    with pytest.raises(PromptError, match="empty list"):
        load_prompts([])


def test_checkable_sets_are_disjoint_seeded_and_all_checkable():
    from selfplay.judging.verifiers import number_score
    from tools.checkable import generate_prompts

    train, held_out = load_prompts("bundled:checkable_train"), load_prompts("bundled:checkable_eval")
    assert len(train) >= 500 and len(held_out) >= 200
    assert {p["prompt"] for p in train}.isdisjoint(p["prompt"] for p in held_out)
    assert all(p["verifier"] == "number" and number_score(p["reference"], p["reference"]) == 1.0 for p in train + held_out)
    regenerated = generate_prompts(len(train), seed=0, prefix="chk-train")
    assert [(r["prompt"], r["answer"]) for r in regenerated] == [(p["prompt"], p["reference"]) for p in train]


SOLUTIONS = {
    "is_palindrome": "def is_palindrome(s):\n    return s == s[::-1]",
    "is_even": "def is_even(n):\n    return n % 2 == 0",
    "last": "def last(items):\n    return items[-1]",
    "is_leap": "def is_leap(y):\n    return y % 4 == 0 and (y % 100 != 0 or y % 400 == 0)",
    "count_vowels": "def count_vowels(s):\n    return sum(c in 'aeiou' for c in s.lower())",
    "smallest": "def smallest(items):\n    m = items[0]\n    for x in items:\n        m = x if x < m else m\n    return m",
    "greet": "def greet(name):\n    return f'Hello, {name}!'",
    "factorial": "def factorial(n):\n    return 1 if n == 0 else n * factorial(n - 1)",
    "first_char": "def first_char(s):\n    return s[:1]",
    "largest": "def largest(a, b, c):\n    return max(a, b, c)",
    "is_positive": "def is_positive(n): return n > 0",
    "word_count": "def word_count(s):\n    return len(s.split())",
    "square": "def square(x): return x * x",
    "double_all": "def double_all(xs): return [2 * x for x in xs]",
    "to_fahrenheit": "def to_fahrenheit(c):\n    return c * 9 / 5 + 32",
    "title_case": "def title_case(s):\n    return s.title()",
    "average": "def average(xs):\n    return sum(xs) / len(xs)",
    "abs_diff": "def abs_diff(a, b):\n    return abs(a - b)",
    "hours_minutes": "def hours_minutes(m):\n    return divmod(m, 60)",
    "second_largest": "def second_largest(xs):\n    return sorted(set(xs))[-2]",
    "is_prime": "def is_prime(n):\n    return n > 1 and all(n % d for d in range(2, int(n ** 0.5) + 1))",
    "odd_numbers": "def odd_numbers(xs):\n    return [x for x in xs if x % 2]",
}


def test_bundled_coding_prompts_carry_tests_a_correct_solution_passes_and_a_wrong_one_fails():
    from selfplay.judging.verifiers import code_score

    coding = [p for name in ("train", "eval") for p in load_prompts(f"bundled:{name}") if p.get("verifier") == "code"]
    assert len(coding) >= 20
    for p in coding:
        name = next(n for n in SOLUTIONS if f" {n}(" in p["prompt"])
        solution = f"Sure:\n```python\n{SOLUTIONS[name]}\n```"
        assert code_score(solution, p["reference"]) == 1.0, p["id"]
        assert code_score(f"```python\ndef {name}(*args):\n    return None\n```", p["reference"]) == 0.0, p["id"]
