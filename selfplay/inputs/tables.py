"""Table cells as Python values: the one rule for what a missing cell is (None, NaN, NaT, pandas' NA: what parquet
reads a null back as). Every reader of a stage's tables goes through `present`."""

from __future__ import annotations

from typing import Any

import pandas as pd


def present(value: Any) -> Any:
    """A table cell as a Python value: None where it is missing, the value itself otherwise (lists and dicts too).

    >>> present(float("nan")), present(None), present(pd.NA), present("7"), present(0.5), present([1, None])
    (None, None, None, '7', 0.5, [1, None])
    """
    return None if value is None or (pd.api.types.is_scalar(value) and pd.isna(value)) else value
