"""N-body: float64 reference, energy drift, split in time and over bodies."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from gpunet.kernels import chunks, compare, nbody

N = 203  # not a multiple of the force tile, odd


@pytest.fixture(scope="module")
def state() -> nbody.State:
    return nbody.init(jax.random.key(7), N)


def test_init_is_deterministic_and_centred(state: nbody.State) -> None:
    again = nbody.init(jax.random.key(7), N)
    assert all(np.array_equal(a, b) for a, b in zip(state, again))
    assert np.allclose(np.asarray(state.pos).mean(0), 0.0, atol=1e-6)
    assert float(np.sum(state.mass)) == pytest.approx(1.0, rel=1e-6)


def test_accelerations_match_reference(state: nbody.State) -> None:
    got = nbody.accelerations(state.pos, state.mass)
    want = nbody.reference_accelerations(state.pos, state.mass)
    assert compare(got, want, nbody.tolerance) is None


def test_simulation_matches_reference_and_conserves_energy(state: nbody.State) -> None:
    got = nbody.simulate(state, 0.005, 25)
    want = nbody.reference(state, 0.005, 25)
    assert compare(got.state, want.state, nbody.tolerance) is None
    assert compare(got.energy_end, want.energy_end, nbody.tolerance) is None
    assert abs(float(got.drift)) < 1e-3
    assert float(got.drift) == pytest.approx(float(want.drift), abs=1e-5)


@pytest.mark.parametrize("steps", [(25,), (1, 24), (7, 11, 7)])
def test_split_in_time_equals_one_run(state: nbody.State, steps: tuple[int, ...]) -> None:
    whole = nbody.simulate(state, 0.005, 25)
    s = state
    for n in steps:
        s = nbody.simulate(s, 0.005, n).state
    assert compare(s, whole.state, nbody.tolerance) is None
    assert np.array_equal(s.pos, whole.state.pos)  # same ops, same order, same device


@pytest.mark.parametrize("k", [2, 3, 5])
def test_split_over_bodies_equals_all_pairs(state: nbody.State, k: int) -> None:
    whole = nbody.accelerations(state.pos, state.mass)
    parts = [nbody.accelerations_chunk(state.pos, state.mass, c.start, c.count) for c in chunks(N, k)]
    assert compare(np.concatenate(parts), whole, nbody.tolerance) is None


def test_tiled_force_over_many_bodies_matches_reference() -> None:
    s = nbody.init(jax.random.key(8), nbody.TILE + 77)  # two tiles, the second padded
    got = nbody.accelerations(s.pos, s.mass)
    assert compare(got, nbody.reference_accelerations(s.pos, s.mass), nbody.tolerance) is None
    energy = nbody.energy(s)
    assert compare(energy, nbody.reference_energy(s.pos, s.vel, s.mass), nbody.tolerance) is None
    part = nbody.accelerations_chunk(s.pos, s.mass, 50, nbody.TILE + 1)
    assert compare(part, got[50 : 51 + nbody.TILE], nbody.tolerance) is None


def test_zero_steps_is_identity(state: nbody.State) -> None:
    r = nbody.simulate(state, 0.01, 0)
    assert np.array_equal(r.state.pos, state.pos) and float(r.drift) == 0.0


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda s: nbody.simulate(s, -0.1, 3), "Expected dt > 0, got -0.1"),
        (lambda s: nbody.simulate(s, 0.1, -2), "Expected n_steps >= 0, got -2"),
        (lambda s: nbody.simulate(s, 0.1, 1, eps=0.0), "softening length"),
        (lambda s: nbody.accelerations_chunk(s.pos, s.mass, 200, 10), "start=200, count=10"),
        (lambda s: nbody.init(jax.random.key(0), 0), "Expected n >= 1 bodies, got 0"),
        (lambda s: nbody.simulate(s._replace(vel=s.vel[:5]), 0.1, 1), r"\(5, 3\)"),
    ],
)
def test_bad_inputs_name_the_value(state: nbody.State, call, message: str) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match=message):
        call(state)


def test_cost_grows_quadratically() -> None:
    assert nbody.cost(200, 10).flops == pytest.approx(4 * nbody.cost(100, 10).flops)
