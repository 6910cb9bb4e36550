"""Reading a verdict out of an endpoint's reply, one pure function per mode. No IO here.

  logprobs  the first token's top logprobs: probability summed over each label's variants ("A", " A", "**A", ...)
            and renormalised over A and B
  choice    structured output, a JSON object {"verdict": "A" | "B" | "tie"}
  text      the marker alone (the default: a budget of `MARKER_TOKENS`): [[A]], [[B]] or [[tie]], or a reply whose
            first line is a bare label ("A", "**B**", "A."); with
            reasoning asked for (`judge.reasoning_tokens`), free text ending with one marker: the LAST marker wins.
            No verdict is `invalid`

    >>> label_probabilities([("A", -0.1), (" B", -2.4), ("The", -3.0)])
    (0.9048..., 0.0907...)
    >>> parse_text_verdict("B is terse. Final: [[A]]")
    'A'
"""

from __future__ import annotations

import json
import math
import re

MODES = ("logprobs", "choice", "text")
LABELS = ("A", "B", "tie")
P_OF_LABEL = {"A": 1.0, "B": 0.0, "tie": 0.5}

# What each mode adds to the judge's user message ("reasoning": text mode when the recipe asks for reasoning).
MODE_INSTRUCTIONS = {
    "logprobs": "",
    "choice": '\n\nReply with a JSON object {"verdict": "A"}, {"verdict": "B"} or {"verdict": "tie"}.',
    "text": "\n\nReply with the verdict marker only: [[A]], [[B]] or [[tie]].",
    "reasoning": "\n\nExplain briefly if you need to, then end your reply with exactly one verdict marker: [[A]], [[B]] or [[tie]].",
}
# The answer budget of the text mode without reasoning: " [[tie]]" is 5 tokens in common tokenizers, a margin for a
# leading space or newline.
MARKER_TOKENS = 8

CHOICE_SCHEMA = {
    "type": "json_schema",
    "json_schema": {
        "name": "verdict",
        "strict": True,
        "schema": {
            "type": "object",
            "properties": {"verdict": {"type": "string", "enum": list(LABELS)}},
            "required": ["verdict"],
            "additionalProperties": False,
        },
    },
}

_MARKER = re.compile(r"\[\[\s*(A|B|tie)\s*\]\]", re.IGNORECASE)


def token_label(token: str) -> str | None:
    """'A' or 'B' if the token is a variant of that label (whitespace, quotes, brackets, markdown around it)."""
    core = token.strip().strip("*_`\"'([{<>)]}:.").strip()
    return core if core in ("A", "B") else None


def label_probabilities(top_logprobs: list[tuple[str, float]]) -> tuple[float, float]:
    """Probability mass on label A and on label B among the first token's top alternatives."""
    mass = {"A": 0.0, "B": 0.0}
    for token, logprob in top_logprobs:
        label = token_label(token)
        if label:
            mass[label] += math.exp(logprob)
    return mass["A"], mass["B"]


def parse_choice(content: str | None) -> str | None:
    """The verdict of a structured reply, or None when the reply is not the promised JSON."""
    try:
        verdict = json.loads(content or "")["verdict"]
    except (ValueError, TypeError, KeyError):
        return None
    if isinstance(verdict, str) and verdict.strip().lower() in ("a", "b", "tie"):
        v = verdict.strip()
        return "tie" if v.lower() == "tie" else v.upper()
    return None


def parse_text_verdict(content: str | None, bare: bool = False) -> str:
    """The last [[A]] / [[B]] / [[tie]] marker in the reply; with `bare` (a marker-only reply was asked for), else a
    first line that is a label alone ("A", "**B**", "A.", "tie"; not "A good answer", whose "A" is an article);
    'invalid' when there is none.

    >>> parse_text_verdict("A\\n\\nA is better.", bare=True), parse_text_verdict("A is better."), parse_text_verdict("The answer is A", bare=True)
    ('A', 'invalid', 'invalid')
    """
    found = _MARKER.findall(content or "")
    if found:
        last = found[-1]
        return "tie" if last.lower() == "tie" else last.upper()
    first_line = (content or "").strip().split("\n", 1)[0]
    if bare and first_line:
        if label := token_label(first_line):
            return label
        if first_line.strip().strip("*_`\"'([{<>)]}:.").lower() == "tie":
            return "tie"
    return "invalid"
