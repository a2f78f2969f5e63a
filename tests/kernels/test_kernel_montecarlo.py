"""Monte Carlo option pricing and integrals: reference, closed form, split against unsplit."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gpunet.kernels import allclose, compare
from gpunet.kernels import montecarlo as mc

SPEC = mc.EuropeanOption(s0=100.0, strike=105.0, rate=0.03, sigma=0.2, maturity=1.0)
PUT = SPEC._replace(call=False, strike=95.0)
N = 50_003  # not a multiple of the RNG block


@pytest.fixture(scope="module")
def key() -> jax.Array:
    return jax.random.key(20260)


@pytest.mark.parametrize("spec", [SPEC, PUT], ids=["call", "put"])
def test_matches_numpy_reference_on_the_same_normals(key: jax.Array, spec: mc.EuropeanOption) -> None:
    got = mc.price(key, spec, N)
    want = mc.reference(spec, mc.normals(key, 0, N))
    assert got.n_paths == want.n_paths == N
    assert compare(got, want, mc.tolerance) is None


@pytest.mark.parametrize("spec", [SPEC, PUT], ids=["call", "put"])
def test_converges_to_black_scholes(key: jax.Array, spec: mc.EuropeanOption) -> None:
    got = mc.price(key, spec, 400_000)
    assert abs(got.price - mc.black_scholes(spec)) < 4 * got.stderr


@pytest.mark.parametrize("k", [2, 3, 7])
def test_split_equals_unsplit(key: jax.Array, k: int) -> None:
    whole = mc.price(key, SPEC, N)
    assert allclose(mc.price(key, SPEC, N, n_chunks=k), whole, mc.tolerance)


def test_any_partition_sees_the_same_samples(key: jax.Array) -> None:
    # Uneven chunks whose edges fall inside RNG blocks, an empty one, out of order.
    edges = [0, 1, 4095, 4097, 4097, 20_000, N]
    parts = [mc.price_chunk(key, SPEC, a, b - a) for a, b in zip(edges, edges[1:])]
    whole = mc.price_chunk(key, SPEC, 0, N)
    assert compare(mc.estimate(mc.combine(parts[::-1]), SPEC), mc.estimate(mc.combine([whole]), SPEC),
                   mc.tolerance) is None
    z = mc.normals(key, 0, N)
    assert np.array_equal(np.concatenate([mc.normals(key, a, b - a) for a, b in zip(edges, edges[1:])]), z)


@pytest.mark.parametrize("per_step", [1, 3, 256])
def test_work_per_loop_step_does_not_change_the_answer(key: jax.Array, per_step: int) -> None:
    # A GPU runs more blocks per loop iteration than a CPU: same samples, same sums.
    spec = SPEC._replace(call=True)
    args = (key, spec, jnp.int32(5), jnp.int32(N))
    mine = mc._chunk_sums(*args, draw=mc._normal_block, value=mc._payoff, per_step=per_step)
    default = mc.price_chunk(key, SPEC, 5, N)
    assert compare(mc.estimate(mine, SPEC), mc.estimate(default, SPEC), mc.tolerance) is None


def test_deterministic_and_key_dependent(key: jax.Array) -> None:
    a = mc.price_chunk(key, SPEC, 10, 1000)
    b = mc.price_chunk(key, SPEC, 10, 1000)
    c = mc.price_chunk(jax.random.key(1), SPEC, 10, 1000)
    assert float(a.sum) == float(b.sum) and float(a.sum) != float(c.sum)
    assert int(mc.price_chunk(key, SPEC, 5, 0).count) == 0


def test_raw_uint32_keys_work_too() -> None:
    old = jax.random.PRNGKey(3)
    assert mc.price(old, SPEC, 1000).n_paths == 1000


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda k: mc.price(k, SPEC, -3), "Expected n_paths > 0, got -3"),
        (lambda k: mc.price_chunk(k, SPEC, -1, 5), "Expected start >= 0, got -1"),
        (lambda k: mc.price_chunk(k, SPEC._replace(sigma=0.0), 0, 5), "Expected sigma > 0, got 0.0"),
        (lambda k: mc.price_chunk(k, SPEC, 0, 2**31), "int32 path indices"),
        (lambda k: mc.estimate(mc.combine([mc.price_chunk(k, SPEC, 0, 0)]), SPEC), "n_paths > 0, got 0"),
        (lambda k: mc.combine([]), "at least one Partial"),
    ],
)
def test_bad_inputs_name_the_value(key: jax.Array, call, message: str) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match=message):
        call(key)


def test_cost_is_linear_in_paths() -> None:
    assert mc.cost(2000).flops == 2 * mc.cost(1000).flops > 0
    with pytest.raises(ValueError, match="got -1"):
        mc.cost(-1)


def _gauss(u: jax.Array) -> jax.Array:
    return jnp.exp(-jnp.sum(u * u, axis=1))


def test_integral_matches_reference_and_closed_form(key: jax.Array) -> None:
    got = mc.integrate(key, _gauss, 3, N)
    want = mc.reference_integral(lambda p: np.exp(-(p * p).sum(axis=1)), mc.uniforms(key, 3, 0, N))
    assert compare(got, want, mc.tolerance) is None
    exact = (math.sqrt(math.pi) / 2 * math.erf(1.0)) ** 3
    assert abs(got.price - exact) < 4 * got.stderr


@pytest.mark.parametrize("k", [2, 5])
def test_integral_split_equals_unsplit(key: jax.Array, k: int) -> None:
    assert compare(mc.integrate(key, _gauss, 3, N, n_chunks=k), mc.integrate(key, _gauss, 3, N), mc.tolerance) is None
    edges = [0, 4095, 4096, 9000, N]
    points = np.concatenate([mc.uniforms(key, 3, a, b - a) for a, b in zip(edges, edges[1:])])
    assert np.array_equal(points, mc.uniforms(key, 3, 0, N))


def test_integral_bad_inputs(key: jax.Array) -> None:
    with pytest.raises(ValueError, match="Expected dim >= 1, got 0"):
        mc.integrate_chunk(key, _gauss, 0, 0, 10)
    with pytest.raises(ValueError, match=r"to values \(\d+,\), got values of shape \(\d+, 2\)"):
        mc.integrate(key, lambda u: u, 2, 10)
    with pytest.raises(ValueError, match="Expected n_samples > 0, got 0"):
        mc.integrate(key, _gauss, 2, 0)
    assert mc.cost(100, dim=3, flops_per_sample=10).flops == 100 * (180 + 10)
