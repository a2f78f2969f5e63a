"""Group-by aggregation: NumPy reference, partials combined, pandas = cuDF."""

from __future__ import annotations

import importlib.util

import numpy as np
import pandas as pd
import pytest
from gpunet.kernels import chunks, compare, frames

ROWS = 20_011


@pytest.fixture(scope="module")
def df() -> pd.DataFrame:
    return frames.make_frame(5, ROWS, 37)


def test_matches_numpy_reference_with_the_same_dtypes(df: pd.DataFrame) -> None:
    got = frames.aggregate(df)
    want = frames.reference(df)
    assert list(got.columns) == ["key", "count", "sum", "mean", "min", "max"]
    assert got.dtypes.to_dict() == want.dtypes.to_dict()
    assert got["key"].is_monotonic_increasing and len(got) == 37
    assert int(got["count"].sum()) == int(df["value"].notna().sum())  # NaN rows skipped
    assert compare(got, want, frames.tolerance) is None


@pytest.mark.parametrize("k", [1, 2, 3, 7, 64])
def test_split_equals_unsplit(df: pd.DataFrame, k: int) -> None:
    whole = frames.aggregate(df)
    parts = [frames.aggregate_chunk(df, c.start, c.count) for c in chunks(len(df), k)]
    got = frames.finish(frames.combine(parts[::-1]))
    assert compare(got, whole, frames.tolerance) is None
    assert got.dtypes.to_dict() == whole.dtypes.to_dict()
    assert np.array_equal(got["count"], whole["count"]) and np.array_equal(got["min"], whole["min"])


def test_chunks_missing_some_groups_and_empty_chunks_combine() -> None:
    df = pd.DataFrame({"key": [3, 1, 3, 2, 1, 3], "value": [1.0, 2.0, 3.0, np.nan, 5.0, 6.0]})
    parts = [frames.aggregate_chunk(df, a, b - a) for a, b in [(0, 0), (0, 2), (2, 3), (3, 6)]]
    got = frames.finish(frames.combine(parts))
    assert got["key"].tolist() == [1, 3]  # key 2 only has a NaN value
    assert got["count"].tolist() == [2, 3] and got["sum"].tolist() == [7.0, 10.0]
    assert got["min"].tolist() == [2.0, 1.0] and got["max"].tolist() == [5.0, 6.0]
    assert len(frames.combine([frames.aggregate_chunk(df, 0, 0)])) == 0


def test_string_keys_and_other_column_names() -> None:
    df = pd.DataFrame({"city": ["b", "a", "b", None, "c"], "t": [1, 2, 3, 4, 5]})
    got = frames.aggregate(df, key="city", value="t")
    assert got["city"].tolist() == ["a", "b", "c"]
    assert got["sum"].tolist() == [2.0, 4.0, 5.0] and got["mean"].tolist() == [2.0, 2.0, 5.0]
    assert compare(got, frames.reference(df, key="city", value="t"), frames.tolerance) is None


def test_backend_is_pandas_without_cudf() -> None:
    if importlib.util.find_spec("cudf") is None:
        assert frames.backend() == "pandas"
        with pytest.raises(RuntimeError, match="backend='cudf'"):
            frames.aggregate(pd.DataFrame({"key": [1], "value": [1.0]}), backend="cudf")
    else:
        assert frames.backend() in ("pandas", "cudf")


@pytest.mark.skipif(frames.backend() != "cudf", reason="needs cuDF and a GPU")
def test_cudf_and_pandas_give_identical_results(df: pd.DataFrame) -> None:
    gpu = frames.aggregate(df, backend="cudf")
    cpu = frames.aggregate(df, backend="pandas")
    assert gpu.dtypes.to_dict() == cpu.dtypes.to_dict()
    assert compare(gpu, cpu, frames.tolerance) is None


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda d: frames.aggregate(d, key="nope"), r"missing \['nope'\]"),
        (lambda d: frames.aggregate(d.assign(value="x")), "Expected a numeric value column"),
        (lambda d: frames.aggregate(d, backend="spark"), "got 'spark'"),
        (lambda d: frames.aggregate_chunk(d, ROWS, 1), f"got start={ROWS}, count=1"),
        (lambda d: frames.combine([]), "got none"),
        (lambda d: frames.make_frame(0, -1, 3), "n_rows=-1"),
    ],
)
def test_bad_inputs_name_the_value(df: pd.DataFrame, call, message: str) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match=message):
        call(df)


def test_cost_is_linear_in_rows() -> None:
    assert frames.cost(2000, 10).flops == pytest.approx(2 * frames.cost(1000, 10).flops)
    assert frames.cost(1000, 10).bytes > 16_000
