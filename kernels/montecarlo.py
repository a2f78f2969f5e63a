"""Monte Carlo price of a European option under geometric Brownian motion,
and Monte Carlo integrals over the unit hypercube.

A path ``p`` (global index, 0-based) draws one standard normal ``z_p`` and ends at
``S_T = s0 * exp((r - sigma^2/2) T + sigma sqrt(T) z_p)``; its payoff is
``max(S_T - K, 0)`` for a call, ``max(K - S_T, 0)`` for a put, and the price is
``exp(-r T)`` times the mean payoff.

Randomness is a function of the global path index only: paths come in blocks of
:data:`BLOCK`, and block ``b`` draws its normals from ``jax.random.fold_in(key, b)``.
So any partition of ``range(n_paths)`` into chunks sees the same samples, and
:func:`combine` adds the chunks' sums (never means of means): split and unsplit
runs differ only by float32 summation order, well inside :data:`tolerance`.

Usage::

    key = jax.random.key(0)
    spec = EuropeanOption(s0=100.0, strike=105.0, rate=0.03, sigma=0.2, maturity=1.0)
    parts = [price_chunk(key, spec, c.start, c.count) for c in chunks(10**7, 3)]
    est = estimate(combine(parts), spec)     # Estimate(price, stderr, n_paths)

:func:`integrate` estimates the integral of a jax.numpy function over
``[0, 1)^dim`` with the same block scheme (block ``b`` draws
``uniform(fold_in(key, b), (BLOCK, dim))``), chunked by :func:`integrate_chunk`.

Cost model (per call of :func:`price_chunk` with ``n`` paths): about
``COST_FLOPS_PER_PATH = 120`` operations a path (threefry counter hashing ~60
integer ops, the normal's inverse error function ~40, exp and payoff ~20) and
``12`` bytes a path at most (normals and payoffs written and read back once if the
compiler does not fuse them; nothing else is streamed). It is compute-bound on
every device: see :func:`cost`.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ._base import Cost, Tolerance, check_positive, chunks

logger = logging.getLogger(__name__)

#: A result held on a device (JAX) or on the host (NumPy, Python scalars).
Array = jax.Array | np.ndarray | np.number | float | int

__all__ = [
    "BLOCK",
    "EuropeanOption",
    "Estimate",
    "Partial",
    "black_scholes",
    "combine",
    "cost",
    "estimate",
    "integrate",
    "integrate_chunk",
    "normals",
    "price",
    "price_chunk",
    "reference",
    "reference_integral",
    "tolerance",
    "uniforms",
]

#: Paths per RNG block: block ``b`` draws ``BLOCK`` normals from ``fold_in(key, b)``.
#: Changing it changes every answer; it is part of the kernel's definition.
BLOCK = 4096
#: Blocks evaluated per loop iteration, by platform (speed only: any value gives the
#: same samples, and sums that differ only in float32 summation order). A GPU gets
#: more work per iteration, since each iteration of a dynamic loop costs it a
#: few microseconds of launch and predicate overhead.
BLOCKS_PER_STEP = {"cpu": 16, "gpu": 256, "tpu": 256}
#: Largest supported path index + 1 (indices are int32 on a device without x64).
MAX_PATHS = 2**31 - 1 - BLOCK * max(BLOCKS_PER_STEP.values())
COST_FLOPS_PER_PATH = 120.0
COST_BYTES_PER_PATH = 12.0

#: Two runs (any partition, any device) agree on the price and its standard error
#: to this: float32 sums of the same samples in a different order.
tolerance = Tolerance(rtol=2e-5, atol=1e-6)


class EuropeanOption(NamedTuple):
    """A European option on a stock following GBM (annualised rates, years)."""

    s0: float
    strike: float
    rate: float
    sigma: float
    maturity: float
    call: bool = True


class Partial(NamedTuple):
    """Sums over one chunk of paths (undiscounted payoffs), combinable by addition.

    Device scalars from a kernel; host (NumPy) scalars from :func:`combine`."""

    sum: Array
    sum_sq: Array
    count: Array  # type: ignore[assignment]  # shadows tuple.count


class Estimate(NamedTuple):
    """The discounted price (or, from :func:`integrate`, the integral), its Monte Carlo
    standard error, and the paths (samples) used."""

    price: float
    stderr: float
    n_paths: int


def _check_spec(spec: EuropeanOption) -> None:
    if not isinstance(spec, EuropeanOption):
        raise TypeError(f"Expected an EuropeanOption, got {type(spec).__name__}: {spec!r}")
    for name in ("s0", "strike", "sigma", "maturity"):
        check_positive(name, getattr(spec, name))
    if not math.isfinite(spec.rate):
        raise ValueError(f"Expected a finite rate, got {spec.rate!r}")


def _check_range(start: int, count: int) -> None:
    if start < 0:
        raise ValueError(f"Expected start >= 0, got {start}")
    if count < 0:
        raise ValueError(f"Expected count >= 0, got {count}")
    if start + count > MAX_PATHS:
        raise ValueError(
            f"Expected start + count <= {MAX_PATHS} (int32 path indices), got {start + count}"
        )


def _payoff(spec: EuropeanOption, z: jax.Array) -> jax.Array:
    s0, strike, rate, sigma, t = (jnp.float32(v) for v in spec[:5])
    s_t = s0 * jnp.exp((rate - 0.5 * sigma * sigma) * t + sigma * jnp.sqrt(t) * z)
    return jnp.where(spec.call, jnp.maximum(s_t - strike, 0.0), jnp.maximum(strike - s_t, 0.0))


def _normal_block(key: jax.Array) -> jax.Array:
    return jax.random.normal(key, (BLOCK,))


@functools.lru_cache(maxsize=64)
def _uniform_block(dim: int) -> Callable[[jax.Array], jax.Array]:
    # Cached: the jitted loop takes it as a static argument, compared by identity.
    return lambda key: jax.random.uniform(key, (BLOCK, dim))


def _blocks(key: jax.Array, blocks: jax.Array, draw: Callable[[jax.Array], jax.Array]) -> jax.Array:
    return jax.vmap(lambda b: draw(jax.random.fold_in(key, b)))(blocks)


def _per_step() -> int:
    return BLOCKS_PER_STEP.get(jax.default_backend(), 16)


@functools.partial(jax.jit, static_argnames=("draw", "value", "per_step"))
def _chunk_sums(
    key: jax.Array,
    params: Any,
    start: jax.Array,
    count: jax.Array,
    *,
    draw: Callable[[jax.Array], jax.Array],
    value: Callable[[Any, jax.Array], jax.Array],
    per_step: int,
) -> Partial:
    """Sums of ``value(params, sample)`` and its square over samples ``start .. start+count-1``,
    sample ``p`` being row ``p % BLOCK`` of ``draw(fold_in(key, p // BLOCK))``."""
    first = start // BLOCK
    stop = start + count
    n_blocks = (stop + BLOCK - 1) // BLOCK - first
    n_steps = jnp.where(count > 0, (n_blocks + per_step - 1) // per_step, 0)
    lanes = jnp.arange(BLOCK, dtype=jnp.int32)
    offsets = jnp.arange(per_step, dtype=jnp.int32)

    def body(i: jax.Array, carry: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
        s, c, s2, c2 = carry
        blocks = first + i * per_step + offsets
        samples = _blocks(key, blocks.astype(jnp.uint32), draw)  # (per_step, BLOCK, ...)
        values = value(params, samples.reshape(per_step * BLOCK, *samples.shape[2:]))
        index = (blocks[:, None] * BLOCK + lanes[None, :]).reshape(-1)
        x = jnp.where((index >= start) & (index < stop), values.astype(jnp.float32), 0.0)
        # Kahan-compensated running sums: the loop may run for thousands of steps.
        y = jnp.sum(x) - c
        t = s + y
        c = (t - s) - y
        y2 = jnp.sum(x * x) - c2
        t2 = s2 + y2
        c2 = (t2 - s2) - y2
        return t, c, t2, c2

    zero = jnp.float32(0.0)
    s, _, s2, _ = jax.lax.fori_loop(0, n_steps, body, (zero, zero, zero, zero))
    return Partial(s, s2, count)


def price_chunk(key: jax.Array, spec: EuropeanOption, start: int, count: int) -> Partial:
    """Sums of the payoffs of paths ``start .. start + count - 1``.

    One compilation serves every ``start`` and ``count`` (both are traced), so a
    worker can run any chunk of a split without recompiling. Cost:
    ``cost(count)``.
    """
    _check_spec(spec)
    _check_range(start, count)
    spec = spec._replace(call=bool(spec.call))
    return _chunk_sums(key, spec, jnp.int32(start), jnp.int32(count), draw=_normal_block, value=_payoff,
                       per_step=_per_step())


def combine(parts: list[Partial] | tuple[Partial, ...]) -> Partial:
    """Add chunks' sums (in float64 on the host): the partial of their union."""
    if not parts:
        raise ValueError("Expected at least one Partial to combine, got none")
    total = sum(float(p.sum) for p in parts)
    total_sq = sum(float(p.sum_sq) for p in parts)
    count = sum(int(p.count) for p in parts)
    return Partial(np.float64(total), np.float64(total_sq), np.int64(count))


def _mean_estimate(part: Partial, scale: float) -> Estimate:
    n = int(part.count)
    if n <= 0:
        raise ValueError(f"Expected a Partial over n_paths > 0, got {n}")
    mean = float(part.sum) / n
    var = max(float(part.sum_sq) / n - mean * mean, 0.0)
    stderr = scale * math.sqrt(var / n) if n > 1 else float("inf")
    return Estimate(scale * mean, stderr, n)


def estimate(part: Partial, spec: EuropeanOption) -> Estimate:
    """Discounted price and standard error from (combined) sums."""
    return _mean_estimate(part, math.exp(-spec.rate * spec.maturity))


def price(key: jax.Array, spec: EuropeanOption, n_paths: int, n_chunks: int = 1) -> Estimate:
    """Price from ``n_paths`` paths, run here as ``n_chunks`` chunks (same answer for any)."""
    if n_paths <= 0:
        raise ValueError(f"Expected n_paths > 0, got {n_paths}")
    parts = [price_chunk(key, spec, c.start, c.count) for c in chunks(n_paths, n_chunks)]
    return estimate(combine(parts), spec)


def normals(key: jax.Array, start: int, count: int) -> np.ndarray:
    """The standard normals of paths ``start .. start + count - 1`` (for tests, references)."""
    _check_range(start, count)
    first = start // BLOCK
    last = (start + count + BLOCK - 1) // BLOCK
    z = _blocks(key, jnp.arange(first, max(last, first + 1), dtype=jnp.uint32), _normal_block)
    return np.asarray(z).reshape(-1)[start - first * BLOCK : start - first * BLOCK + count]


def reference(spec: EuropeanOption, z: np.ndarray) -> Estimate:
    """NumPy (float64) price and standard error from the given standard normals."""
    _check_spec(spec)
    z = np.asarray(z, dtype=np.float64)
    if z.ndim != 1 or z.size == 0:
        raise ValueError(f"Expected a non-empty 1-d array of normals, got shape {z.shape}")
    s_t = spec.s0 * np.exp(
        (spec.rate - 0.5 * spec.sigma**2) * spec.maturity + spec.sigma * math.sqrt(spec.maturity) * z
    )
    pay = np.maximum(s_t - spec.strike, 0.0) if spec.call else np.maximum(spec.strike - s_t, 0.0)
    part = Partial(pay.sum(), (pay * pay).sum(), z.size)
    return estimate(part, spec)


def black_scholes(spec: EuropeanOption) -> float:
    """The closed-form price the Monte Carlo estimate converges to."""
    _check_spec(spec)
    s, k, r, v, t = spec[:5]
    d1 = (math.log(s / k) + (r + 0.5 * v * v) * t) / (v * math.sqrt(t))
    d2 = d1 - v * math.sqrt(t)
    cdf = lambda x: 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))  # noqa: E731
    if spec.call:
        return s * cdf(d1) - k * math.exp(-r * t) * cdf(d2)
    return k * math.exp(-r * t) * cdf(-d2) - s * cdf(-d1)


# --- Integrals over the unit hypercube ---------------------------------------------

#: An integrand: float32 points ``(n, dim)`` in ``[0, 1)^dim`` -> values ``(n,)``,
#: written with jax.numpy (it is traced and jitted).
Integrand = Callable[[jax.Array], jax.Array]


def integrate_chunk(key: jax.Array, f: Integrand, dim: int, start: int, count: int) -> Partial:
    """Sums of ``f`` over samples ``start .. start + count - 1`` of the unit cube in ``dim`` dimensions.

    The same block scheme as the option (block ``b`` draws ``uniform(fold_in(key, b),
    (BLOCK, dim))``), so any partition sees the same points. ``f`` and ``dim`` are
    static: one compilation per integrand (pass the same function object to reuse it).
    Cost: ``cost(count, flops_per_sample=...)``.
    """
    if dim < 1:
        raise ValueError(f"Expected dim >= 1, got {dim}")
    if not callable(f):
        raise TypeError(f"Expected a callable integrand, got {type(f).__name__}")
    _check_range(start, count)
    return _chunk_sums(
        key, None, jnp.int32(start), jnp.int32(count), draw=_uniform_block(dim), value=_integrand_value(f),
        per_step=_per_step(),
    )


@functools.lru_cache(maxsize=64)
def _integrand_value(f: Integrand) -> Callable[[Any, jax.Array], jax.Array]:
    # Cached per integrand, so that the same f reuses one compilation.
    def value(_: Any, u: jax.Array) -> jax.Array:
        values = f(u)
        if values.shape != u.shape[:1]:
            raise ValueError(
                f"Expected the integrand to map points {u.shape} to values ({u.shape[0]},), "
                f"got values of shape {values.shape}"
            )
        return values

    return value


def integrate(key: jax.Array, f: Integrand, dim: int, n_samples: int, n_chunks: int = 1) -> Estimate:
    """Monte Carlo estimate of the integral of ``f`` over ``[0, 1)^dim`` (``price`` is the
    estimate, ``n_paths`` the samples); same answer for any ``n_chunks``."""
    if n_samples <= 0:
        raise ValueError(f"Expected n_samples > 0, got {n_samples}")
    parts = [integrate_chunk(key, f, dim, c.start, c.count) for c in chunks(n_samples, n_chunks)]
    return _mean_estimate(combine(parts), 1.0)


def uniforms(key: jax.Array, dim: int, start: int, count: int) -> np.ndarray:
    """The points ``(count, dim)`` of samples ``start .. start + count - 1`` (for references)."""
    _check_range(start, count)
    first = start // BLOCK
    last = max((start + count + BLOCK - 1) // BLOCK, first + 1)
    u = _blocks(key, jnp.arange(first, last, dtype=jnp.uint32), _uniform_block(dim))
    offset = start - first * BLOCK
    return np.asarray(u).reshape(-1, dim)[offset : offset + count]


def reference_integral(f: Callable[[np.ndarray], np.ndarray], points: np.ndarray) -> Estimate:
    """NumPy (float64) mean and standard error of ``f`` over the given points."""
    points = np.asarray(points, np.float64)
    if points.ndim != 2 or points.shape[0] == 0:
        raise ValueError(f"Expected a non-empty (n, dim) array of points, got shape {points.shape}")
    values = np.asarray(f(points), np.float64)
    return _mean_estimate(Partial(values.sum(), (values * values).sum(), values.size), 1.0)


def cost(n_paths: int, *, dim: int = 1, flops_per_sample: float = 0.0) -> Cost:
    """FLOPs and bytes of pricing ``n_paths`` paths (see the module docstring).

    For :func:`integrate`, pass ``dim`` and the integrand's ``flops_per_sample``:
    each sample costs ``60 * dim`` for its uniforms plus the integrand.
    """
    if n_paths < 0 or dim < 1 or flops_per_sample < 0:
        raise ValueError(
            f"Expected n_paths >= 0, dim >= 1, flops_per_sample >= 0, got {n_paths}, {dim}, {flops_per_sample}"
        )
    if dim == 1 and flops_per_sample == 0.0:
        return Cost(COST_FLOPS_PER_PATH * n_paths, COST_BYTES_PER_PATH * n_paths)
    return Cost((60.0 * dim + flops_per_sample) * n_paths, (4.0 * dim + 8.0) * n_paths)

