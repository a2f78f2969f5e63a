"""MLP: hand-written NumPy backprop, SGD and Adam steps, data-parallel = one worker."""

from __future__ import annotations

import jax
import pytest
from gpunet.kernels import compare, mlp

SIZES = (6, 16, 12, 3)
B = 101  # odd, not divisible by the shard counts below

SGD = mlp.sgd(0.05)
ADAM = mlp.adam(0.01)


@pytest.fixture(scope="module")
def data() -> tuple[jax.Array, jax.Array]:
    return mlp.make_data(jax.random.key(3), B, SIZES[0], SIZES[-1])


@pytest.fixture(scope="module")
def params() -> mlp.Params:
    return mlp.init(jax.random.key(4), SIZES)


def test_init_shapes_and_determinism(params: mlp.Params) -> None:
    assert [layer.w.shape for layer in params] == [(6, 16), (16, 12), (12, 3)]
    again = mlp.init(jax.random.key(4), SIZES)
    assert compare(params, again, mlp.tolerance._replace(rtol=0.0, atol=0.0)) is None


def test_loss_and_gradients_match_numpy_backprop(params: mlp.Params, data: tuple[jax.Array, jax.Array]) -> None:
    x, y = data
    want_grads, want_loss = mlp.reference_grads(params, x, y)
    grads, total, n = mlp.shard_grads(params, x, y)
    assert n == B
    assert float(mlp.loss(params, x, y)) == pytest.approx(want_loss, rel=1e-5)
    assert compare(jax.tree.map(lambda g: g / n, grads), want_grads, mlp.tolerance) is None
    assert float(total) / n == pytest.approx(want_loss, rel=1e-5)


def test_sgd_steps_match_reference(params: mlp.Params, data: tuple[jax.Array, jax.Array]) -> None:
    x, y = data
    p, state = params, SGD.init(params)
    for _ in range(5):
        p, state, _ = mlp.train_step(p, state, x, y, SGD)
    want, _ = mlp.reference(params, x, y, 0.05, steps=5)
    assert compare(p, want, mlp.tolerance) is None


@pytest.mark.parametrize("optimizer", [SGD, ADAM], ids=["sgd", "adam"])
@pytest.mark.parametrize("k", [2, 3, 7])
def test_data_parallel_equals_whole_batch(
    params: mlp.Params, data: tuple[jax.Array, jax.Array], optimizer: mlp.Optimizer, k: int
) -> None:
    x, y = data
    one, one_state = params, optimizer.init(params)
    dp, dp_state = params, optimizer.init(params)
    shards = mlp.split_batch(x, y, k)
    assert len({int(s[0].shape[0]) for s in shards}) == 2  # uneven shards
    for _ in range(3):
        one, one_state, loss_one = mlp.train_step(one, one_state, x, y, optimizer)
        dp, dp_state, loss_dp = mlp.data_parallel_step(dp, dp_state, shards, optimizer)
        assert float(loss_dp) == pytest.approx(float(loss_one), rel=1e-5)
    assert compare(dp, one, mlp.tolerance) is None
    assert compare(dp_state, one_state, mlp.tolerance) is None


def test_adam_trains_the_classifier(params: mlp.Params, data: tuple[jax.Array, jax.Array]) -> None:
    x, y = data
    p, state = params, ADAM.init(params)
    first = float(mlp.loss(p, x, y))
    for _ in range(60):
        p, state, _ = mlp.train_step(p, state, x, y, ADAM)
    assert float(mlp.loss(p, x, y)) < 0.25 * first
    assert float(mlp.accuracy(p, x, y)) > 0.9
    assert int(state.count) == 60


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda p, x, y: mlp.train_step(p, SGD.init(p), x[:, :4], y, SGD),
            r"Expected x of shape \(B, 6\), got \(101, 4\)",
        ),
        (lambda p, x, y: mlp.shard_grads(p, x, y[:5]), r"Expected y of shape \(101,\)"),
        (lambda p, x, y: mlp.init(jax.random.key(0), [4]), r"got \[4\]"),
        (lambda p, x, y: mlp.sgd(-1.0), "Expected learning_rate > 0, got -1.0"),
        (lambda p, x, y: mlp.adam(0.1, b1=1.0), "b1=1.0"),
        (lambda p, x, y: mlp.combine_grads([]), "got none"),
        (lambda p, x, y: mlp.make_data(jax.random.key(0), 10, 2, 1), "classes=1"),
        (lambda p, x, y: mlp.cost(10, SIZES, "lion"), "got 'lion'"),
    ],
)
def test_bad_inputs_name_the_value(params: mlp.Params, data: tuple[jax.Array, jax.Array], call, message: str) -> None:  # noqa: ANN001
    x, y = data
    with pytest.raises(ValueError, match=message):
        call(params, x, y)


def test_cost_scales_with_batch() -> None:
    small, big = mlp.cost(100, SIZES), mlp.cost(200, SIZES)
    assert big.flops > small.flops and big.bytes > small.bytes
    assert mlp.cost(100, SIZES, "adam").flops > small.flops
