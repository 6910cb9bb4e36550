"""The judge's prompt: the template and rubric (bundled, or files a recipe names) and one-pass, fenced rendering.

The template (`selfplay/data/templates/judge.txt`, or `judge.template`) has `{prompt}`, `{response_a}`,
`{response_b}`, `{rubric}` and `{reference}`. Where a prompt has a reference answer, the default is the
reference-guided `judge_reference.txt` (MT-Bench's rule for maths and code: the judge sees the reference); a
recipe's own template gets the reference, or "(none)", wherever it writes `{reference}`. Judged text is fenced
first: our tags and placeholders inside a response are escaped, so "Response B:", a closing tag or `{rubric}` in a
response cannot forge the prompt's structure.
"""

from __future__ import annotations

import re
from importlib.resources import files
from pathlib import Path

PLACEHOLDERS = ("prompt", "response_a", "response_b", "rubric", "reference")
FENCE_TAGS = ("request", "response_A", "response_B", "reference_answer")
NO_REFERENCE = "(none)"


def default_template(reference: bool = False) -> str:
    name = "judge_reference.txt" if reference else "judge.txt"
    return files("selfplay").joinpath(f"data/templates/{name}").read_text()


def templates_for(path: str | None) -> tuple[str, str]:
    """(template without a reference, template with one): the shipped pair, or the recipe's one template for both."""
    if path is None:
        return default_template(), default_template(reference=True)
    template = load_template(path)
    return template, template


def load_rubric(path: str | None) -> str:
    if path is None:
        return files("selfplay").joinpath("data/templates/rubric.txt").read_text().strip()
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"judge.rubric: file not found: {p}")
    return p.read_text().strip()


def load_template(path: str | None) -> str:
    if path is None:
        return default_template()
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"judge.template: file not found: {p}")
    template = p.read_text()
    missing = [name for name in ("prompt", "response_a", "response_b") if "{" + name + "}" not in template]
    if missing:
        raise ValueError(f"judge.template {p}: missing placeholder(s) {', '.join('{' + m + '}' for m in missing)}")
    return template


def fence(text: str) -> str:
    """Neutralise anything in judged text that could forge the prompt's structure (our tags and placeholders).

    >>> fence("</response_A> <response_B> {rubric}")
    '&lt;/response_A> &lt;response_B> {\u200brubric}'
    """
    text = re.sub(r"<(/?)(" + "|".join(FENCE_TAGS) + r")\b", lambda m: "&lt;" + m.group(1) + m.group(2), text, flags=re.I)
    return re.sub(r"\{(" + "|".join(PLACEHOLDERS) + r")\}", lambda m: "{\u200b" + m.group(1) + "}", text)


def render_judge_prompt(template: str, prompt: str, response_a: str, response_b: str, rubric: str, reference: str | None = None) -> str:
    """Fill the template in one pass, so text inserted for one placeholder is never re-read as another."""
    values = {"prompt": fence(prompt), "response_a": fence(response_a), "response_b": fence(response_b), "rubric": rubric,
              "reference": NO_REFERENCE if reference is None else fence(reference)}
    return re.sub(r"\{(" + "|".join(PLACEHOLDERS) + r")\}", lambda m: values[m.group(1)], template)
