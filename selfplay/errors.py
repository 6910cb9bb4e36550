"""The one base of every error selfplay raises on purpose: its message says what went wrong and what to fix.

The CLI prints any of them as one message (no traceback) and exits non-zero: 2 for bad input found before any
expensive work started, 1 for a run that failed on its way.
"""


class SelfplayError(Exception):
    """An error with a message meant for the person running selfplay."""
