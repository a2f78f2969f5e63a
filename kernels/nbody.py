"""All-pairs N-body gravity, integrated with leapfrog (kick-drift-kick).

Units have ``G = 1``. Forces are softened, ``a_i = sum_j m_j (r_j - r_i) /
(|r_j - r_i|^2 + eps^2)^(3/2)``, so close encounters stay finite. :func:`simulate`
runs ``n_steps`` steps in one ``lax.fori_loop`` on the device and reports the
relative energy drift ``(E_end - E_start) / |E_start|``.

Two ways to split a run:

- in time: ``simulate(simulate(s, dt, 7).state, dt, 5)`` equals ``simulate(s, dt, 12)``
  (the same operations in the same order, so bit for bit on one device);
- over bodies: :func:`accelerations_chunk` computes the accelerations of bodies
  ``start .. start + count - 1`` against all bodies; chunks concatenate to
  :func:`accelerations` (per-body sums do not depend on the partition).

Cost model, ``N`` bodies and ``S`` steps: one force evaluation is ``N^2``
interactions of ``INTERACTION_FLOPS = 20`` FLOPs (3 subtractions, 3 multiply-adds
for ``r^2 + eps^2``, an inverse square root counted as 4, 3 multiplies for
``m / r^3``, 3 multiply-adds into the sum, plus the cube), and the potential
energy another ``N^2 * 10`` at the start and the end. Device-memory traffic is
``O(N)`` per step when the compiler keeps a tile of sources on chip: positions,
velocities and masses (``7 * 4`` bytes a body) read and written once per kick and
drift, about ``100 * N`` bytes a step. It is compute-bound for ``N`` above a few
hundred: ``cost(N, S) = Cost(20 N^2 S + 20 N^2, 100 N S)``.
"""

from __future__ import annotations

import logging
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ._base import Cost, Tolerance, check_positive

logger = logging.getLogger(__name__)

#: A kernel's results are JAX arrays; the reference's are NumPy arrays.
Array = jax.Array | np.ndarray | np.floating

__all__ = [
    "Result",
    "State",
    "accelerations",
    "accelerations_chunk",
    "cost",
    "energy",
    "init",
    "reference",
    "reference_accelerations",
    "simulate",
    "tolerance",
]

#: Targets per tile in the force evaluation (bounds memory to TILE x N pairs).
TILE = 512
INTERACTION_FLOPS = 20.0

#: Two float32 runs (devices, partitions, or this kernel against the float64
#: reference) over a few hundred steps of a softened cluster agree to this on
#: positions, velocities and energies.
tolerance = Tolerance(rtol=1e-4, atol=1e-4)


class State(NamedTuple):
    """Positions ``(N, 3)``, velocities ``(N, 3)`` and masses ``(N,)``."""

    pos: Array
    vel: Array
    mass: Array


class Result(NamedTuple):
    """The state after the steps, energies before and after, and their relative drift."""

    state: State
    energy_start: Array
    energy_end: Array
    drift: Array


def _check_eps(eps: float) -> None:
    check_positive("eps (the softening length)", eps)


def _check_state(state: State) -> int:
    if not isinstance(state, State):
        raise TypeError(f"Expected a nbody.State, got {type(state).__name__}")
    n = state.mass.shape[0] if state.mass.ndim == 1 else -1
    if n < 1 or state.pos.shape != (n, 3) or state.vel.shape != (n, 3):
        raise ValueError(
            "Expected pos (N, 3), vel (N, 3), mass (N,) with N >= 1, got "
            f"{state.pos.shape}, {state.vel.shape}, {state.mass.shape}"
        )
    return n


def init(key: jax.Array, n: int, *, radius: float = 1.0) -> State:
    """A cold, roughly virialised cluster of ``n`` equal masses (total mass 1).

    Positions are uniform in a ball of ``radius``; velocities small and random
    with the centre-of-mass motion removed. Deterministic given ``key``.
    """
    if n < 1:
        raise ValueError(f"Expected n >= 1 bodies, got {n}")
    check_positive("radius", radius)
    kd, kr, kv = jax.random.split(key, 3)
    d = jax.random.normal(kd, (n, 3))
    d = d / jnp.linalg.norm(d, axis=1, keepdims=True)
    r = radius * jax.random.uniform(kr, (n, 1)) ** (1.0 / 3.0)
    pos = d * r
    sigma = math.sqrt(0.3 / radius)  # ~ virial speed of a uniform sphere of mass 1
    vel = sigma * jax.random.normal(kv, (n, 3)) / math.sqrt(3.0)
    vel = vel - jnp.mean(vel, axis=0)
    pos = pos - jnp.mean(pos, axis=0)
    mass = jnp.full((n,), 1.0 / n, dtype=jnp.float32)
    return State(pos.astype(jnp.float32), vel.astype(jnp.float32), mass)


def _accel_targets(targets: jax.Array, pos: jax.Array, mass: jax.Array, eps: jax.Array) -> jax.Array:
    # Component by component (structure of arrays): plain elementwise work and
    # row sums, which vectorise on a CPU and fuse into one pass on a GPU.
    d = [pos[None, :, c] - targets[:, c, None] for c in range(3)]  # 3 x (T, N)
    r2 = d[0] * d[0] + d[1] * d[1] + d[2] * d[2] + eps * eps
    inv = jax.lax.rsqrt(r2)
    w = mass[None, :] * (inv * inv * inv)  # m_j / r^3
    return jnp.stack([jnp.sum(w * dc, axis=1) for dc in d], axis=1)


def _over_tiles(fn, pos: jax.Array, start: jax.Array, count: int) -> jax.Array:  # noqa: ANN001
    """``fn(targets, target_index)`` for targets ``start .. start + count - 1``, in tiles of
    :data:`TILE` so that at most ``TILE x N`` pairs are live at once."""
    n_tiles = -(-count // TILE)
    index = start + jnp.arange(n_tiles * TILE if n_tiles > 1 else count, dtype=jnp.int32)
    if n_tiles <= 1:
        return fn(jax.lax.dynamic_slice_in_dim(pos, start, count), index)
    padded = jnp.concatenate([pos, jnp.zeros((n_tiles * TILE, 3), pos.dtype)])
    targets = jax.lax.dynamic_slice_in_dim(padded, start, n_tiles * TILE).reshape(n_tiles, TILE, 3)
    out = jax.lax.map(lambda ti: fn(*ti), (targets, index.reshape(n_tiles, TILE)))
    return out.reshape(-1, *out.shape[2:])[:count]


def _accel_range(pos: jax.Array, mass: jax.Array, eps: jax.Array, start: jax.Array, count: int) -> jax.Array:
    return _over_tiles(lambda t, _: _accel_targets(t, pos, mass, eps), pos, start, count)


@jax.jit
def accelerations(pos: jax.Array, mass: jax.Array, eps: float = 0.05) -> jax.Array:
    """Softened gravitational accelerations of all bodies, ``(N, 3)``. Cost ``20 N^2``."""
    return _accel_range(pos, mass, jnp.float32(eps), jnp.int32(0), pos.shape[0])


_accel_chunk_jit = jax.jit(_accel_range, static_argnums=(4,))


def accelerations_chunk(pos: jax.Array, mass: jax.Array, start: int, count: int, eps: float = 0.05) -> jax.Array:
    """Accelerations of bodies ``start .. start + count - 1`` against all bodies.

    ``count`` is static (one compilation per chunk size; :func:`gpunet.kernels.chunks`
    gives at most two sizes), ``start`` is traced. Cost ``20 * count * N``.
    """
    n = pos.shape[0]
    if not 0 <= start <= n or count < 0 or start + count > n:
        raise ValueError(f"Expected 0 <= start <= start + count <= N = {n}, got start={start}, count={count}")
    _check_eps(eps)
    if count == 0:
        return jnp.zeros((0, 3), pos.dtype)
    return _accel_chunk_jit(pos, mass, jnp.float32(eps), jnp.int32(start), count)


def _potential_targets(
    targets: jax.Array, index: jax.Array, pos: jax.Array, mass: jax.Array, eps: jax.Array
) -> jax.Array:
    d = [pos[None, :, c] - targets[:, c, None] for c in range(3)]
    inv = jax.lax.rsqrt(d[0] * d[0] + d[1] * d[1] + d[2] * d[2] + eps * eps)
    self_pair = index[:, None] == jnp.arange(pos.shape[0], dtype=jnp.int32)[None, :]
    return jnp.sum(jnp.where(self_pair, 0.0, mass[None, :] * inv), axis=1)  # sum_j m_j / r_ij


def _energy(state: State, eps: jax.Array) -> jax.Array:
    pos, vel, mass = (jnp.asarray(a) for a in state)
    kinetic = 0.5 * jnp.sum(mass * jnp.sum(vel * vel, axis=1))
    phi = _over_tiles(lambda t, i: _potential_targets(t, i, pos, mass, eps), pos, jnp.int32(0), mass.shape[0])
    return kinetic - 0.5 * jnp.sum(mass * phi)


@jax.jit
def energy(state: State, eps: float = 0.05) -> jax.Array:
    """Total energy, kinetic plus softened potential (self-pairs excluded), in tiles. Cost ``10 N^2``."""
    return _energy(state, jnp.float32(eps))


@jax.jit
def _simulate(state: State, dt: jax.Array, n_steps: jax.Array, eps: jax.Array) -> Result:
    pos0, vel0, mass = (jnp.asarray(a) for a in state)
    n = mass.shape[0]
    e0 = _energy(state, eps)

    def step(_: jax.Array, s: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
        pos, vel, acc = s
        vel = vel + 0.5 * dt * acc
        pos = pos + dt * vel
        acc = _accel_range(pos, mass, eps, jnp.int32(0), n)
        vel = vel + 0.5 * dt * acc
        return pos, vel, acc

    acc0 = _accel_range(pos0, mass, eps, jnp.int32(0), n)
    pos, vel, _ = jax.lax.fori_loop(0, n_steps, step, (pos0, vel0, acc0))
    end = State(pos, vel, mass)
    e1 = _energy(end, eps)
    return Result(end, e0, e1, (e1 - e0) / jnp.abs(e0))


def simulate(state: State, dt: float, n_steps: int, eps: float = 0.05) -> Result:
    """Advance ``n_steps`` leapfrog steps of size ``dt``; report the energy drift.

    ``n_steps`` is traced: one compilation per ``N`` serves every step count.
    Cost: ``cost(N, n_steps)``.
    """
    _check_state(state)
    check_positive("dt", dt)
    if n_steps < 0:
        raise ValueError(f"Expected n_steps >= 0, got {n_steps}")
    _check_eps(eps)
    return _simulate(state, jnp.float32(dt), jnp.int32(n_steps), jnp.float32(eps))


def reference_accelerations(pos: np.ndarray, mass: np.ndarray, eps: float = 0.05) -> np.ndarray:
    """NumPy float64 all-pairs accelerations."""
    pos = np.asarray(pos, np.float64)
    mass = np.asarray(mass, np.float64)
    d = pos[None, :, :] - pos[:, None, :]
    r2 = np.sum(d * d, axis=-1) + eps * eps
    return np.einsum("tn,tnc->tc", mass[None, :] / (r2 * np.sqrt(r2)), d)


def reference_energy(pos: np.ndarray, vel: np.ndarray, mass: np.ndarray, eps: float = 0.05) -> float:
    """NumPy float64 total energy."""
    pos, vel, mass = (np.asarray(a, np.float64) for a in (pos, vel, mass))
    d = pos[None, :, :] - pos[:, None, :]
    r = np.sqrt(np.sum(d * d, axis=-1) + eps * eps)
    pair = mass[:, None] * mass[None, :] / r
    np.fill_diagonal(pair, 0.0)
    return float(0.5 * np.sum(mass * np.sum(vel * vel, axis=1)) - 0.5 * np.sum(pair))


def reference(state: State, dt: float, n_steps: int, eps: float = 0.05) -> Result:
    """NumPy float64 leapfrog, step for step the same scheme as :func:`simulate`."""
    pos, vel, mass = (np.asarray(a, np.float64) for a in state)
    e0 = reference_energy(pos, vel, mass, eps)
    acc = reference_accelerations(pos, mass, eps)
    for _ in range(n_steps):
        vel = vel + 0.5 * dt * acc
        pos = pos + dt * vel
        acc = reference_accelerations(pos, mass, eps)
        vel = vel + 0.5 * dt * acc
    e1 = reference_energy(pos, vel, mass, eps)
    return Result(State(pos, vel, mass), np.float64(e0), np.float64(e1), np.float64((e1 - e0) / abs(e0)))


def cost(n_bodies: int, n_steps: int = 1) -> Cost:
    """FLOPs and bytes of ``n_steps`` steps of ``n_bodies`` bodies (module docstring)."""
    if n_bodies < 0 or n_steps < 0:
        raise ValueError(f"Expected n_bodies >= 0 and n_steps >= 0, got {n_bodies}, {n_steps}")
    n2 = float(n_bodies) ** 2
    return Cost(INTERACTION_FLOPS * n2 * n_steps + 20.0 * n2, 100.0 * n_bodies * n_steps + 28.0 * n_bodies)
