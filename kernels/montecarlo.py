"""Monte Carlo price of a European option under geometric Brownian motion.

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

Cost model (per call of :func:`price_chunk` with ``n`` paths): about
``COST_FLOPS_PER_PATH = 120`` operations a path (threefry counter hashing ~60
integer ops, the normal's inverse error function ~40, exp and payoff ~20) and
``12`` bytes a path at most (normals and payoffs written and read back once if the
compiler does not fuse them; nothing else is streamed). It is compute-bound on
every device: see :func:`cost`.
"""

from __future__ import annotations

import logging
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ._base import Cost, Tolerance, check_positive, chunks

logger = logging.getLogger(__name__)

__all__ = [
    "BLOCK",
    "EuropeanOption",
    "Estimate",
    "Partial",
    "black_scholes",
    "combine",
    "cost",
    "estimate",
    "normals",
    "price",
    "price_chunk",
    "reference",
    "tolerance",
]

#: Paths per RNG block: block ``b`` draws ``BLOCK`` normals from ``fold_in(key, b)``.
#: Changing it changes every answer; it is part of the kernel's definition.
BLOCK = 4096
#: Blocks evaluated per loop iteration (speed only; any value gives the same samples).
BLOCKS_PER_STEP = 16
#: Largest supported path index + 1 (indices are int32 on a device without x64).
MAX_PATHS = 2**31 - 1 - BLOCK * BLOCKS_PER_STEP
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
    """Sums over one chunk of paths (undiscounted payoffs), combinable by addition."""

    sum: jax.Array
    sum_sq: jax.Array
    count: jax.Array


class Estimate(NamedTuple):
    """The discounted price, its Monte Carlo standard error, and the paths used."""

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


def _block_normals(key: jax.Array, blocks: jax.Array) -> jax.Array:
    return jax.vmap(lambda b: jax.random.normal(jax.random.fold_in(key, b), (BLOCK,)))(blocks)


@jax.jit
def _price_chunk(key: jax.Array, spec: EuropeanOption, start: jax.Array, count: jax.Array) -> Partial:
    first = start // BLOCK
    stop = start + count
    n_blocks = (stop + BLOCK - 1) // BLOCK - first
    n_steps = jnp.where(count > 0, (n_blocks + BLOCKS_PER_STEP - 1) // BLOCKS_PER_STEP, 0)
    lanes = jnp.arange(BLOCK, dtype=jnp.int32)
    offsets = jnp.arange(BLOCKS_PER_STEP, dtype=jnp.int32)

    def body(i: jax.Array, carry: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
        s, c, s2, c2 = carry
        blocks = first + i * BLOCKS_PER_STEP + offsets
        z = _block_normals(key, blocks.astype(jnp.uint32))
        index = blocks[:, None] * BLOCK + lanes[None, :]
        x = jnp.where((index >= start) & (index < stop), _payoff(spec, z), 0.0)
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
    return _price_chunk(key, spec, jnp.int32(start), jnp.int32(count))


def combine(parts: list[Partial] | tuple[Partial, ...]) -> Partial:
    """Add chunks' sums (in float64 on the host): the partial of their union."""
    if not parts:
        raise ValueError("Expected at least one Partial to combine, got none")
    total = sum(float(p.sum) for p in parts)
    total_sq = sum(float(p.sum_sq) for p in parts)
    count = sum(int(p.count) for p in parts)
    return Partial(np.float64(total), np.float64(total_sq), np.int64(count))


def estimate(part: Partial, spec: EuropeanOption) -> Estimate:
    """Discounted price and standard error from (combined) sums."""
    n = int(part.count)
    if n <= 0:
        raise ValueError(f"Expected a Partial over n_paths > 0, got {n}")
    mean = float(part.sum) / n
    var = max(float(part.sum_sq) / n - mean * mean, 0.0)
    disc = math.exp(-spec.rate * spec.maturity)
    stderr = disc * math.sqrt(var / n) if n > 1 else float("inf")
    return Estimate(disc * mean, stderr, n)


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
    z = _block_normals(key, jnp.arange(first, max(last, first + 1), dtype=jnp.uint32))
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


def cost(n_paths: int) -> Cost:
    """FLOPs and bytes of pricing ``n_paths`` paths (see the module docstring)."""
    if n_paths < 0:
        raise ValueError(f"Expected n_paths >= 0, got {n_paths}")
    return Cost(COST_FLOPS_PER_PATH * n_paths, COST_BYTES_PER_PATH * n_paths)

