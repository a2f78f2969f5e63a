"""What every kernel shares: tolerances, cost models, chunk ranges, result comparison.

This module imports neither JAX nor anything of gpunet, so the worker's capability
probe and the scheduler can use it without paying for a JAX import. NumPy is
imported inside the one function that needs it.

Shape of a kernel module (see :class:`KernelModule`):

- ``tolerance``: the :class:`Tolerance` that verification uses to compare two
  results of the kernel (two workers, or a split run against an unsplit one);
- ``cost(...) -> Cost``: FLOPs and bytes moved as a function of the size
  parameters, so a task can be priced before it runs;
- ``reference(...)``: a small NumPy implementation the tests compare against;
- the jitted kernel functions themselves, with a ``*_chunk`` form (or the
  equivalent) that computes one piece of a split run, and a way to combine pieces.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

logger = logging.getLogger(__name__)

__all__ = [
    "Chunk",
    "Cost",
    "KernelModule",
    "Mismatch",
    "Tolerance",
    "allclose",
    "check_positive",
    "chunks",
    "compare",
    "weighted_chunks",
]


class Tolerance(NamedTuple):
    """How far two results of a kernel may differ and still count as the same.

    Elementwise, ``|a - b| <= atol + rtol * |b|`` must hold for all but a fraction
    ``max_mismatch`` of the elements (0 for all but the rendering kernel, whose
    integer escape counts may differ on a few boundary pixels between devices
    that contract ``a*b+c`` into fused multiply-adds differently). Integer and
    boolean results are compared exactly, apart from ``max_mismatch``.
    """

    rtol: float
    atol: float
    max_mismatch: float = 0.0


class Cost(NamedTuple):
    """Work of one kernel call: floating-point operations and bytes moved.

    ``bytes`` counts traffic to and from device memory that the kernel cannot
    avoid (inputs read once, outputs written once, plus any state a loop must
    stream), not what a particular compiler happens to do. Estimates, for pricing.
    """

    flops: float
    bytes: float

    def __add__(self, other: object) -> Cost:  # type: ignore[override]
        if not isinstance(other, Cost):
            return NotImplemented
        return Cost(self.flops + other.flops, self.bytes + other.bytes)

    def scale(self, factor: float) -> Cost:
        """This cost ``factor`` times over (``factor`` steps, repeats, chunks)."""
        return Cost(self.flops * factor, self.bytes * factor)

    def seconds(self, flops_per_s: float, bytes_per_s: float) -> float:
        """Roofline estimate of the run time on a device with these rates."""
        check_positive("flops_per_s", flops_per_s)
        check_positive("bytes_per_s", bytes_per_s)
        return max(self.flops / flops_per_s, self.bytes / bytes_per_s)


class Chunk(NamedTuple):
    """One piece of a split run: items ``start`` to ``start + count - 1``."""

    start: int
    count: int  # type: ignore[assignment]  # shadows tuple.count, as the name a reader expects

    @property
    def stop(self) -> int:
        return self.start + self.count


class Mismatch(NamedTuple):
    """Evidence that two results differ beyond a tolerance."""

    path: str
    mismatched: int
    total: int
    max_abs_diff: float
    detail: str

    def __str__(self) -> str:
        return (
            f"{self.path}: {self.mismatched} of {self.total} elements differ beyond the "
            f"tolerance (max |a-b| = {self.max_abs_diff:.3g}); {self.detail}"
        )


@runtime_checkable
class KernelModule(Protocol):
    """What a module in ``gpunet.kernels`` provides (checked by the tests)."""

    tolerance: Tolerance
    cost: Callable[..., Cost]
    reference: Callable[..., Any]


def check_positive(name: str, value: float) -> None:
    """Raise ``ValueError`` naming the value unless ``value > 0``."""
    if not value > 0:
        raise ValueError(f"Expected {name} > 0, got {value!r}")


def _check_int(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            import operator

            value = operator.index(value)
        except TypeError:
            raise TypeError(f"Expected {name} to be an int, got {value!r}") from None
    if value < minimum:
        raise ValueError(f"Expected {name} >= {minimum}, got {value}")
    return value


def chunks(total: int, k: int, *, align: int = 1) -> list[Chunk]:
    """Split ``range(total)`` into ``k`` contiguous chunks, as even as ``align`` allows.

    Every chunk but possibly the last starts on a multiple of ``align``; sizes
    differ by at most ``align`` (by at most 1 with the default). Chunks may be
    empty when ``total < k * align``; they still cover ``range(total)`` exactly,
    in order. The kernels in this package give the same answer for any
    partition, so ``align`` only matters for speed (e.g. whole RNG blocks).

    >>> chunks(10, 3)
    [Chunk(start=0, count=4), Chunk(start=4, count=3), Chunk(start=7, count=3)]
    """
    total = _check_int("total", total, 0)
    k = _check_int("k (the number of chunks)", k, 1)
    align = _check_int("align", align, 1)
    units = total // align
    base, extra = divmod(units, k)
    out: list[Chunk] = []
    start = 0
    for i in range(k):
        count = (base + (1 if i < extra else 0)) * align
        if i == k - 1:
            count = total - start
        out.append(Chunk(start, count))
        start += count
    return out


def weighted_chunks(total: int, weights: Sequence[float], *, align: int = 1) -> list[Chunk]:
    """Split ``range(total)`` into one contiguous chunk per weight, sized in proportion.

    For capability-weighted splits (a worker twice as fast gets twice the
    items). Sizes are whole multiples of ``align`` (except the last chunk, which
    takes the remainder), rounded by largest remainder, so they add up to
    ``total`` exactly; a zero weight gets an empty chunk.

    >>> weighted_chunks(10, [1, 1, 3])
    [Chunk(start=0, count=2), Chunk(start=2, count=2), Chunk(start=4, count=6)]
    """
    total = _check_int("total", total, 0)
    align = _check_int("align", align, 1)
    weights = [float(w) for w in weights]
    if not weights:
        raise ValueError("Expected at least one weight, got none")
    if any(not w >= 0 or w == float("inf") for w in weights) or sum(weights) <= 0:
        raise ValueError(f"Expected finite weights >= 0 with a positive sum, got {weights}")
    units = total // align
    exact = [units * w / sum(weights) for w in weights]
    sizes = [int(e) for e in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (sizes[i] - exact[i], i))
    for i in by_remainder[: units - sum(sizes)]:
        sizes[i] += 1
    out: list[Chunk] = []
    start = 0
    for i, size in enumerate(sizes):
        count = size * align if i < len(sizes) - 1 else total - start
        out.append(Chunk(start, count))
        start += count
    return out


def compare(a: Any, b: Any, tol: Tolerance, *, path: str = "result") -> Mismatch | None:
    """Compare two results (arrays, scalars, data frames, or tuples/lists/dicts of them).

    Returns ``None`` when they agree within ``tol``, else a :class:`Mismatch`
    naming the first leaf that does not. Structures must match exactly: container
    types (tuple vs list), dict keys with their types (``1`` vs ``True``), pandas
    indexes and names, dtype kinds (bool vs int, str vs bytes); complex numbers
    compare as complex.
    """
    import numpy as np

    if _is_pandas(a) or _is_pandas(b):
        return _compare_pandas(a, b, tol, path)
    if isinstance(a, dict) or isinstance(b, dict):
        if not (isinstance(a, dict) and isinstance(b, dict)) or _exact_keys(a) != _exact_keys(b):
            return Mismatch(path, 1, 1, float("inf"), "the results have different keys")
        for key in sorted(a, key=str):
            found = compare(a[key], b[key], tol, path=f"{path}[{key!r}]")
            if found is not None:
                return found
        return None
    if isinstance(a, (tuple, list)) or isinstance(b, (tuple, list)):
        if not (isinstance(a, (tuple, list)) and isinstance(b, (tuple, list))) or len(a) != len(b) \
                or isinstance(a, tuple) != isinstance(b, tuple):
            return Mismatch(path, 1, 1, float("inf"), "the results have different structure")
        fields = getattr(a, "_fields", None)
        for i, (x, y) in enumerate(zip(a, b)):
            name = f"{path}.{fields[i]}" if fields else f"{path}[{i}]"
            found = compare(x, y, tol, path=name)
            if found is not None:
                return found
        return None
    if a is None or b is None:
        if a is None and b is None:
            return None
        return Mismatch(path, 1, 1, float("inf"), "one result is None")
    x = np.asarray(a)
    y = np.asarray(b)
    if x.shape != y.shape:
        return Mismatch(path, x.size or 1, x.size or 1, float("inf"),
                        f"shapes differ: {x.shape} vs {y.shape}")
    if x.dtype.kind != y.dtype.kind and {x.dtype.kind, y.dtype.kind} != {"i", "u"}:
        return Mismatch(path, x.size or 1, x.size or 1, float("inf"),
                        f"kinds differ: {x.dtype} vs {y.dtype}")
    if x.dtype.kind in "OUSMm" or y.dtype.kind in "OUSMm":
        bad = ~(x == y) if x.size else np.zeros(0, bool)
        diff = float("inf") if np.any(bad) else 0.0
    elif x.dtype.kind in "biu" and y.dtype.kind in "biu":
        bad = x != y
        diff = float(np.max(np.abs(x.astype(np.int64) - y.astype(np.int64)))) if x.size else 0.0
    else:  # floats, and complex numbers (real and imaginary parts both count)
        wide = np.complex128 if "c" in (x.dtype.kind, y.dtype.kind) else np.float64
        x64 = x.astype(wide)
        y64 = y.astype(wide)
        both_nan = np.isnan(x64) & np.isnan(y64)
        with np.errstate(invalid="ignore"):
            err = np.abs(x64 - y64)
            bad = ~(err <= tol.atol + tol.rtol * np.abs(y64)) & ~both_nan
            finite = err[np.isfinite(err)]
        diff = float(finite.max()) if finite.size else (float("inf") if bad.any() else 0.0)
    n_bad = int(np.count_nonzero(bad))
    allowed = int(tol.max_mismatch * x.size)
    if n_bad > allowed:
        return Mismatch(path, n_bad, int(x.size), diff,
                        f"allowed {allowed} (rtol={tol.rtol:g}, atol={tol.atol:g}, "
                        f"max_mismatch={tol.max_mismatch:g})")
    return None


def _is_frame(value: Any) -> bool:
    return hasattr(value, "columns") and hasattr(value, "to_numpy") and hasattr(value, "iloc")


def _is_pandas(value: Any) -> bool:
    """A DataFrame or a Series (anything with an index, values and positions)."""
    return hasattr(value, "index") and hasattr(value, "to_numpy") and hasattr(value, "iloc")


def _compare_pandas(a: Any, b: Any, tol: Tolerance, path: str) -> Mismatch | None:
    """Frames and Series agree when their kind, index, names and columns are exactly
    the same and their values agree within ``tol``."""
    if not (_is_pandas(a) and _is_pandas(b)) or _is_frame(a) != _is_frame(b):
        return Mismatch(path, 1, 1, float("inf"), "one result is a pandas object and the other is not the same kind")
    if not (a.index.equals(b.index) and a.index.dtype == b.index.dtype
            and _exact_key(a.index.name) == _exact_key(b.index.name)):
        return Mismatch(path, 1, 1, float("inf"), "the results have different indexes")
    if not _is_frame(a):
        if _exact_key(a.name) != _exact_key(b.name):
            return Mismatch(path, 1, 1, float("inf"), "the Series have different names")
        return compare(a.to_numpy(), b.to_numpy(), tol, path=path)
    if [_exact_key(column) for column in a.columns] != [_exact_key(column) for column in b.columns]:
        return Mismatch(path, 1, 1, float("inf"), "the frames have different columns")
    for position, column in enumerate(a.columns):
        found = compare(a.iloc[:, position].to_numpy(), b.iloc[:, position].to_numpy(), tol,
                        path=f"{path}[{column!r}]")
        if found is not None:
            return found
    return None


def _exact_key(key: Any) -> Any:
    """``key`` with its type, so ``1``, ``1.0`` and ``True`` (equal as dict keys) differ."""
    if isinstance(key, tuple):
        return (type(key).__name__, tuple(_exact_key(item) for item in key))
    return (type(key).__name__, key)


def _exact_keys(mapping: dict[Any, Any]) -> set[Any]:
    return {_exact_key(key) for key in mapping}


def allclose(a: Any, b: Any, tol: Tolerance) -> bool:
    """True when :func:`compare` finds no mismatch."""
    return compare(a, b, tol) is None

