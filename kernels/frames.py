"""Group-by aggregation of a data frame: cuDF on a GPU where installed, else pandas.

``aggregate(df, key, value)`` returns one row per distinct ``key`` (sorted
ascending) with columns ``key, count, sum, mean, min, max`` of ``value``, dtypes
``count int64`` and the rest ``float64``. Rows whose value is missing (NaN or
null) are skipped, and so are rows with a missing key, the same in both
backends.

Backends: :func:`backend` picks ``"cudf"`` only where ``import cudf`` works *and*
a GPU is present (NVML or CuPy counts at least one device), else ``"pandas"``.
The cuDF result is copied back to pandas with the same columns, order and
dtypes, so callers never see which one ran; :data:`tolerance` covers the one
difference, the order in which float sums are added.

Splitting: :func:`partial` aggregates a chunk of rows into ``count, sum, min,
max`` per key; :func:`combine` merges partials (counts and sums add, min of
mins, max of maxes) and :func:`finish` adds ``mean = sum / count``. Any split
of the rows gives the unsplit result up to float64 summation order.

Cost model, ``R`` rows and ``G`` groups: ``FLOPS_PER_ROW = 4`` (count, sum, min,
max update) plus ``~log2(G)`` comparisons a row for hashing or sorting the keys,
counted as ``2 log2(G+1)``; bytes: the key and value columns read once
(``BYTES_PER_ROW = 16``, int64 + float64) and ``48 G`` of output. Memory-bound on
every device: see :func:`cost`.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd

from ._base import Chunk, Cost, Tolerance, chunks

logger = logging.getLogger(__name__)

__all__ = [
    "AGGREGATES",
    "aggregate",
    "aggregate_chunk",
    "backend",
    "combine",
    "cost",
    "finish",
    "make_frame",
    "partial",
    "reference",
    "split",
    "tolerance",
]

Backend = Literal["auto", "pandas", "cudf"]
#: Columns of :func:`partial`'s result after the key.
PARTIAL_COLUMNS = ("count", "sum", "min", "max")
#: Columns of :func:`aggregate`'s result after the key.
AGGREGATES = ("count", "sum", "mean", "min", "max")
FLOPS_PER_ROW = 4.0
BYTES_PER_ROW = 16.0

#: cuDF and pandas, or a split and an unsplit run, add the same float64 values
#: in a different order; counts, minima and maxima agree exactly.
tolerance = Tolerance(rtol=1e-9, atol=1e-9)


def _gpu_count() -> int:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no NVML library, no driver: no GPU we can use
        pass
    try:
        import cupy

        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:  # noqa: BLE001
        return 0


@functools.lru_cache(maxsize=1)
def backend() -> Literal["pandas", "cudf"]:
    """``"cudf"`` where cuDF imports and a GPU is present, else ``"pandas"`` (cached)."""
    if _gpu_count() < 1:
        return "pandas"
    try:
        import cudf  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any failure to load cuDF means pandas
        logger.info("GPU present but cuDF unavailable (%s): frames use pandas", exc)
        return "pandas"
    return "cudf"


def _resolve(which: Backend) -> Literal["pandas", "cudf"]:
    if which == "auto":
        return backend()
    if which == "pandas":
        return "pandas"
    if which == "cudf":
        if backend() != "cudf":
            raise RuntimeError("Expected cuDF and a GPU for backend='cudf', but this host has none; use 'auto'")
        return "cudf"
    raise ValueError(f"Expected backend 'auto', 'pandas' or 'cudf', got {which!r}")


def _check_columns(df: pd.DataFrame, key: str, value: str) -> None:
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"Expected a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in (key, value) if c not in df.columns]
    if missing:
        raise ValueError(f"Expected columns {key!r} and {value!r}, missing {missing}; the frame has {list(df.columns)}")
    if not pd.api.types.is_numeric_dtype(df[value]) or pd.api.types.is_bool_dtype(df[value]):
        raise ValueError(f"Expected a numeric value column {value!r}, got dtype {df[value].dtype}")


def _empty_partial(key: str, key_dtype: object) -> pd.DataFrame:
    return pd.DataFrame(
        {
            key: pd.Series([], dtype=key_dtype),
            "count": pd.Series([], dtype="int64"),
            "sum": pd.Series([], dtype="float64"),
            "min": pd.Series([], dtype="float64"),
            "max": pd.Series([], dtype="float64"),
        }
    )


def _normalise(out: pd.DataFrame, key: str, key_dtype: object) -> pd.DataFrame:
    out = out.sort_values(key, kind="stable").reset_index(drop=True)
    out = out.astype({key: key_dtype, "count": "int64", "sum": "float64", "min": "float64", "max": "float64"})
    return out[[key, *PARTIAL_COLUMNS]]


def partial(df: pd.DataFrame, key: str = "key", value: str = "value", backend: Backend = "auto") -> pd.DataFrame:
    """``count, sum, min, max`` of ``value`` per ``key`` over these rows, sorted by key."""
    _check_columns(df, key, value)
    which = _resolve(backend)
    key_dtype = df[key].dtype
    rows = df[[key, value]].dropna()
    if len(rows) == 0:
        return _empty_partial(key, key_dtype)
    rows = rows.astype({value: "float64"})
    if which == "cudf":
        import cudf

        gdf = cudf.from_pandas(rows)
        out = gdf.groupby(key, sort=True)[value].agg(list(PARTIAL_COLUMNS)).reset_index().to_pandas()
    else:
        out = rows.groupby(key, sort=True)[value].agg(list(PARTIAL_COLUMNS)).reset_index()
    return _normalise(out, key, key_dtype)


def combine(parts: Sequence[pd.DataFrame], key: str = "key") -> pd.DataFrame:
    """Merge partials of disjoint row sets into the partial of their union (on the host)."""
    if not parts:
        raise ValueError("Expected at least one partial to combine, got none")
    for p in parts:
        if list(p.columns) != [key, *PARTIAL_COLUMNS]:
            raise ValueError(f"Expected a partial with columns {[key, *PARTIAL_COLUMNS]}, got {list(p.columns)}")
    key_dtype = parts[0][key].dtype
    whole = pd.concat([p for p in parts if len(p)], ignore_index=True) if any(len(p) for p in parts) else None
    if whole is None:
        return _empty_partial(key, key_dtype)
    out = whole.groupby(key, sort=True).agg(
        count=("count", "sum"), sum=("sum", "sum"), min=("min", "min"), max=("max", "max")
    )
    return _normalise(out.reset_index(), key, key_dtype)


def finish(part: pd.DataFrame, key: str = "key") -> pd.DataFrame:
    """The final table from a (combined) partial: adds ``mean = sum / count``."""
    out = part.copy()
    out["mean"] = out["sum"] / out["count"]
    return out[[key, *AGGREGATES]]


def aggregate(df: pd.DataFrame, key: str = "key", value: str = "value", backend: Backend = "auto") -> pd.DataFrame:
    """``count, sum, mean, min, max`` of ``value`` per ``key``, sorted by key. Cost: ``cost(len(df), G)``."""
    return finish(partial(df, key, value, backend), key)


def aggregate_chunk(
    df: pd.DataFrame, start: int, count: int, key: str = "key", value: str = "value", backend: Backend = "auto"
) -> pd.DataFrame:
    """The partial of rows ``start .. start + count - 1`` (positions, not labels)."""
    if start < 0 or count < 0 or start + count > len(df):
        raise ValueError(f"Expected 0 <= start <= start + count <= {len(df)} rows, got start={start}, count={count}")
    return partial(df.iloc[start : start + count], key, value, backend)


def split(df: pd.DataFrame, k: int) -> list[Chunk]:
    """Row ranges of ``k`` chunks of ``df`` (uneven sizes allowed)."""
    return chunks(len(df), k)


def make_frame(seed: int, n_rows: int, n_groups: int) -> pd.DataFrame:
    """A synthetic frame: ``key int64`` in ``[0, n_groups)`` and ``value float64``.

    Deterministic given ``seed`` (NumPy's PCG64); values are log-normal-ish so
    sums stay away from zero, and about 1% are NaN.
    """
    if n_rows < 0 or n_groups < 1:
        raise ValueError(f"Expected n_rows >= 0 and n_groups >= 1, got n_rows={n_rows}, n_groups={n_groups}")
    rng = np.random.default_rng(seed)
    keys = rng.integers(0, n_groups, n_rows, dtype=np.int64)
    values = np.exp(rng.normal(0.0, 1.0, n_rows)) * (1 + keys % 7)
    values[rng.random(n_rows) < 0.01] = np.nan
    return pd.DataFrame({"key": keys, "value": values})


def reference(df: pd.DataFrame, key: str = "key", value: str = "value") -> pd.DataFrame:
    """NumPy group-by: ``np.unique`` for the groups, ``bincount`` and ``ufunc.at`` for the aggregates."""
    _check_columns(df, key, value)
    rows = df[[key, value]].dropna()
    keys = rows[key].to_numpy()
    vals = rows[value].to_numpy(dtype=np.float64)
    groups, inverse = np.unique(keys, return_inverse=True)
    g = len(groups)
    counts = np.bincount(inverse, minlength=g).astype(np.int64)
    sums = np.bincount(inverse, weights=vals, minlength=g)
    mins = np.full(g, np.inf)
    maxs = np.full(g, -np.inf)
    np.minimum.at(mins, inverse, vals)
    np.maximum.at(maxs, inverse, vals)
    out = pd.DataFrame({key: pd.Series(groups, dtype=df[key].dtype), "count": counts, "sum": sums,
                        "mean": sums / np.maximum(counts, 1), "min": mins, "max": maxs})
    return out[[key, *AGGREGATES]]


def cost(n_rows: int, n_groups: int) -> Cost:
    """FLOPs and bytes of aggregating ``n_rows`` rows into ``n_groups`` groups (module docstring)."""
    if n_rows < 0 or n_groups < 0:
        raise ValueError(f"Expected n_rows >= 0 and n_groups >= 0, got {n_rows}, {n_groups}")
    per_row = FLOPS_PER_ROW + 2.0 * math.log2(n_groups + 1)
    return Cost(per_row * n_rows, BYTES_PER_ROW * n_rows + 48.0 * n_groups)
