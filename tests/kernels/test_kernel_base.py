"""The shared pieces: chunk ranges, tolerances, comparison, the light package import."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from gpunet.kernels import Chunk, Cost, Tolerance, allclose, chunks, compare, weighted_chunks


@pytest.mark.parametrize("total", [0, 1, 2, 7, 10, 97, 1000])
@pytest.mark.parametrize("k", [1, 2, 3, 5, 8])
def test_chunks_cover_the_range_in_order(total: int, k: int) -> None:
    parts = chunks(total, k)
    assert len(parts) == k
    assert [i for c in parts for i in range(c.start, c.stop)] == list(range(total))
    sizes = [c.count for c in parts]
    assert max(sizes) - min(sizes) <= 1
    assert all(c == Chunk(c.start, c.count) for c in parts)


def test_chunks_aligned_start_on_multiples() -> None:
    parts = chunks(10_000, 3, align=4096)
    assert [c.start % 4096 for c in parts] == [0, 0, 0]
    assert sum(c.count for c in parts) == 10_000


@pytest.mark.parametrize(
    ("args", "message"),
    [((-3, 2), "Expected total >= 0, got -3"), ((5, 0), "got 0"), ((5, 2, 0), "Expected align >= 1")],
)
def test_chunks_bad_values_are_named(args: tuple[int, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        chunks(*args[:2], align=args[2] if len(args) > 2 else 1)


def test_chunks_rejects_non_integers() -> None:
    with pytest.raises(TypeError, match="2.5"):
        chunks(2.5, 2)  # type: ignore[arg-type]


def test_compare_reports_the_first_bad_leaf() -> None:
    tol = Tolerance(rtol=1e-6, atol=0.0)
    a = {"x": np.arange(4.0), "y": (np.float32(1.0), np.array([1, 2]))}
    b = {"x": np.arange(4.0), "y": (np.float32(1.0), np.array([1, 3]))}
    found = compare(a, b, tol)
    assert found is not None and found.path == "result['y'][1]" and found.mismatched == 1
    assert "1 of 2 elements" in str(found)
    assert allclose(a, a, tol)
    assert not allclose(np.zeros(3), np.zeros(4), tol)
    assert allclose(np.array([np.nan, 1.0]), np.array([np.nan, 1.0 + 1e-9]), tol)


def test_compare_allows_a_fraction_of_mismatches() -> None:
    a = np.zeros(1000, np.int32)
    b = a.copy()
    b[:5] = 1
    assert allclose(a, b, Tolerance(0.0, 0.0, max_mismatch=0.01))
    assert not allclose(a, b, Tolerance(0.0, 0.0, max_mismatch=0.001))


def test_cost_adds_and_estimates_seconds() -> None:
    c = Cost(2e12, 1e9) + Cost(1e12, 1e9)
    assert c == Cost(3e12, 2e9)
    assert c.scale(2) == Cost(6e12, 4e9)
    assert c.seconds(1e12, 1e12) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="Expected flops_per_s > 0, got 0"):
        c.seconds(0, 1)


def test_package_import_is_light() -> None:
    code = (
        "import sys, gpunet.kernels as k; "
        "assert 'jax' not in sys.modules, 'jax imported'; "
        "print(k.chunks(5, 2), k.KERNELS)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert "Chunk(start=0, count=3)" in out.stdout


def test_compare_data_frames_by_column() -> None:
    import pandas as pd

    a = pd.DataFrame({"k": ["x", "y"], "v": [1.0, 2.0]})
    assert compare(a, a.copy(), Tolerance(0.0, 0.0)) is None
    found = compare(a, a.assign(k=["x", "z"]), Tolerance(1.0, 1.0))
    assert found is not None and found.path == "result['k']"
    assert compare(a, a[["v", "k"]], Tolerance(1.0, 1.0)) is not None


@pytest.mark.parametrize("a, b", [
    (np.array([1 + 1j, 2 + 2j]), np.array([1 - 5j, 2 + 9j])),  # the imaginary parts count
    (np.array([True, False]), np.array([1, 0])),
    ({1: "a"}, {True: "a"}),
    ({(1, 2): "a"}, {(1.0, 2): "a"}),
    ((1, 2), [1, 2]),
    ("abc", b"abc"),
])
def test_compare_tells_apart_what_only_looks_equal(a, b) -> None:
    assert compare(a, b, Tolerance(1e-3, 1e-3)) is not None


def test_compare_series_and_frames_by_index_and_kind() -> None:
    import pandas as pd

    loose = Tolerance(1.0, 1.0)
    a = pd.Series([1.0, 2.0], index=["alice", "bob"], name="score")
    assert compare(a, a.copy(), loose) is None
    assert compare(a, pd.Series([1.0, 2.0], index=["bob", "alice"], name="score"), loose) is not None
    assert compare(a, a.rename("other"), loose) is not None
    assert compare(a, a.to_frame(), loose) is not None
    assert compare(np.array([1.0, 2.0]), a, loose) is not None
    frame = pd.DataFrame({"x": [1, 2]}, index=["a", "b"])
    assert compare(frame, pd.DataFrame({"x": [1, 2]}, index=["evil", "b"]), loose) is not None
    assert compare(pd.DataFrame({1: [1]}), pd.DataFrame({True: [1]}), loose) is not None
    assert compare(np.array([1 + 1j]), np.array([1 + 1.000001j]), Tolerance(1e-3, 0.0)) is None


@pytest.mark.parametrize("weights", [[1.0], [1, 1, 3], [0.5, 2.0, 0.0, 1.5], [3, 1, 1, 1, 1, 1, 1]])
@pytest.mark.parametrize("total", [0, 7, 1001])
def test_weighted_chunks_are_proportional_and_cover(weights: list[float], total: int) -> None:
    parts = weighted_chunks(total, weights)
    assert len(parts) == len(weights)
    assert [i for c in parts for i in range(c.start, c.stop)] == list(range(total))
    for c, w in zip(parts, weights):
        assert abs(c.count - total * w / sum(weights)) < 1.0 + 1e-9


def test_weighted_chunks_bad_weights_are_named() -> None:
    with pytest.raises(ValueError, match=r"got \[0.0, 0.0\]"):
        weighted_chunks(10, [0, 0])
    with pytest.raises(ValueError, match="got none"):
        weighted_chunks(10, [])
    with pytest.raises(ValueError, match=r"got \[1.0, -1.0\]"):
        weighted_chunks(10, [1, -1])
