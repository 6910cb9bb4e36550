"""Retrying calls to OpenAI-compatible servers (the judge's and the sampler's): which errors are transient, and
how long to wait before the next attempt."""

from __future__ import annotations

import email.utils
import json
import random
import time

BACKOFF_BASE_S, BACKOFF_CAP_S = 0.5, 30.0


def transient_errors(*extra: type[BaseException]) -> tuple[type[BaseException], ...]:
    """429, 5xx, timeouts, connection errors and malformed replies: worth another attempt."""
    import openai

    return (openai.RateLimitError, openai.InternalServerError, openai.APITimeoutError, openai.APIConnectionError,
            openai.APIResponseValidationError, json.JSONDecodeError, *extra)


def retry_after_seconds(exc: BaseException) -> float | None:
    """Seconds the server asked us to wait (retry-after-ms, or Retry-After in seconds or as an HTTP date)."""
    headers = getattr(getattr(exc, "response", None), "headers", None) or {}
    if headers.get("retry-after-ms"):
        try:
            return max(0.0, float(headers["retry-after-ms"]) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (ValueError, TypeError):
        return None  # neither seconds nor an HTTP date: ignore it, back off as usual
    return max(0.0, when.timestamp() - time.time()) if when else None


def backoff_seconds(attempt: int, retry_after: float | None, rng: random.Random) -> float:
    """Full-jitter exponential backoff, never shorter than the server's Retry-After."""
    delay = rng.uniform(0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**attempt))
    return max(delay, retry_after) if retry_after is not None else delay
