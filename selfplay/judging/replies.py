"""Reading a verdict out of an endpoint's reply, one pure function per mode. No IO here.

  logprobs  the first token's top logprobs: probability summed over each label's variants ("A", " A", "**A", ...)
            and renormalised over A and B
  choice    structured output, a JSON object {"verdict": "A" | "B" | "tie"}
  text      free text ending with one marker: the LAST of [[A]], [[B]] or [[tie]] wins; no marker is `invalid`

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

# What each mode adds to the judge's user message.
MODE_INSTRUCTIONS = {
    "logprobs": "",
    "choice": '\n\nReply with a JSON object {"verdict": "A"}, {"verdict": "B"} or {"verdict": "tie"}.',
    "text": "\n\nExplain briefly if you need to, then end your reply with exactly one verdict marker: [[A]], [[B]] or [[tie]].",
}

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


def parse_text_verdict(content: str | None) -> str:
    """The last [[A]] / [[B]] / [[tie]] marker in free text; 'invalid' when there is none."""
    found = _MARKER.findall(content or "")
    if not found:
        return "invalid"
    last = found[-1]
    return "tie" if last.lower() == "tie" else last.upper()
