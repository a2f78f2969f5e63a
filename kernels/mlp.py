"""A small MLP classifier, its training step, and data-parallel training.

Parameters are a pytree: a tuple of :class:`Layer` (``w (d_in, d_out)``, ``b (d_out,)``),
ReLU between layers, softmax cross-entropy on the logits of the last. Optimisers
are written here in plain JAX, shaped like optax's: an :class:`Optimizer` is a
NamedTuple of two pure functions, ``init(params) -> state`` and
``update(grads, state, params) -> (updates, state)``; :func:`sgd` and :func:`adam`.

Data parallelism: a worker holding a shard computes :func:`shard_grads`, the
gradient of the *summed* loss over its examples and the example count. Adding
those sums over shards and dividing by the total count (:func:`combine_grads`)
is the gradient of the mean loss over the whole batch, whatever the shard sizes,
so :func:`data_parallel_step` gives the parameters of :func:`train_step` on the
whole batch, to float32 summation order (:data:`tolerance`).

Cost model, batch ``B`` and layer sizes ``d_0 .. d_L`` with ``P = sum d_i d_(i+1)``
weights: forward ``2 B P`` FLOPs, backward ``4 B P`` (gradients of weights and of
activations), so a train step is ``6 B P`` plus ``O(P)`` for the optimiser
(``4 P`` SGD, ``12 P`` Adam). Bytes: the inputs ``4 B d_0`` and labels ``4 B``
read once, parameters read and written ``3 x 4 P`` (``7 x 4 P`` with Adam's two
moments), activations of ``4 B sum d_i`` written and read back for the backward
pass. See :func:`cost`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ._base import Cost, Tolerance, chunks

logger = logging.getLogger(__name__)

#: The kernels' parameters are JAX arrays; the reference's are NumPy arrays.
Array = jax.Array | np.ndarray

__all__ = [
    "AdamState",
    "Layer",
    "Optimizer",
    "Params",
    "accuracy",
    "adam",
    "combine_grads",
    "cost",
    "data_parallel_step",
    "init",
    "loss",
    "make_data",
    "predict",
    "reference",
    "reference_grads",
    "reference_loss",
    "sgd",
    "shard_grads",
    "split_batch",
    "tolerance",
    "train_step",
]

#: Parameters, losses and gradients of two runs (one worker or data-parallel
#: shards; this kernel or the float64 reference) agree to this over a few steps.
tolerance = Tolerance(rtol=1e-4, atol=1e-5)


class Layer(NamedTuple):
    """One dense layer: ``x @ w + b``."""

    w: Array
    b: Array


Params = tuple[Layer, ...]
OptState = Any  # a pytree; each optimiser documents its own
GradientTransform = Callable[[Params, OptState, Params], tuple[Params, OptState]]


class Optimizer(NamedTuple):
    """Two pure functions, as in optax: ``init(params)`` and ``update(grads, state, params)``."""

    init: Callable[[Params], OptState]
    update: GradientTransform


class AdamState(NamedTuple):
    """Adam's step count and first and second moment estimates."""

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
    mu: Params
    nu: Params


def _check_sizes(sizes: Sequence[int]) -> None:
    if len(sizes) < 2 or any(not isinstance(s, (int, np.integer)) or s < 1 for s in sizes):
        raise ValueError(f"Expected at least two layer sizes, each an int >= 1, got {list(sizes)!r}")


def init(key: jax.Array, sizes: Sequence[int]) -> Params:
    """He-initialised weights and zero biases for layers ``sizes[0] -> ... -> sizes[-1]``."""
    _check_sizes(sizes)
    keys = jax.random.split(key, len(sizes) - 1)
    return tuple(
        Layer(
            jax.random.normal(k, (d_in, d_out), jnp.float32) * jnp.sqrt(2.0 / d_in),
            jnp.zeros((d_out,), jnp.float32),
        )
        for k, d_in, d_out in zip(keys, sizes[:-1], sizes[1:])
    )


def make_data(key: jax.Array, n: int, dim: int, classes: int) -> tuple[jax.Array, jax.Array]:
    """A synthetic classification set: ``classes`` Gaussian blobs in ``dim`` dimensions.

    Returns ``x float32 (n, dim)`` and ``y int32 (n,)``; deterministic given ``key``.
    """
    if n < 1 or dim < 1 or classes < 2:
        raise ValueError(f"Expected n >= 1, dim >= 1, classes >= 2, got n={n}, dim={dim}, classes={classes}")
    kc, ky, kx = jax.random.split(key, 3)
    centres = 2.0 * jax.random.normal(kc, (classes, dim))
    y = jax.random.randint(ky, (n,), 0, classes)
    x = centres[y] + jax.random.normal(kx, (n, dim))
    return x.astype(jnp.float32), y.astype(jnp.int32)


def predict(params: Params, x: jax.Array) -> jax.Array:
    """Logits ``(B, classes)``."""
    h = x
    for layer in params[:-1]:
        h = jax.nn.relu(h @ layer.w + layer.b)
    last = params[-1]
    return h @ last.w + last.b


def _loss_sum(params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
    logits = predict(params, x)
    logp = jax.nn.log_softmax(logits)
    return -jnp.sum(jnp.take_along_axis(logp, y[:, None], axis=1))


@jax.jit
def loss(params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy over the batch."""
    return _loss_sum(params, x, y) / x.shape[0]


@jax.jit
def accuracy(params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
    """Fraction of examples whose largest logit is their label."""
    return jnp.mean(jnp.argmax(predict(params, x), axis=1) == y)


def sgd(learning_rate: float) -> Optimizer:
    """Plain stochastic gradient descent; the state is ``()``."""
    if not learning_rate > 0:
        raise ValueError(f"Expected learning_rate > 0, got {learning_rate!r}")

    def update(grads: Params, state: OptState, params: Params) -> tuple[Params, OptState]:
        del params
        return jax.tree.map(lambda g: -learning_rate * g, grads), state

    return Optimizer(lambda params: (), update)


def adam(learning_rate: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> Optimizer:
    """Adam (Kingma and Ba) with bias correction; the state is an :class:`AdamState`."""
    if not learning_rate > 0:
        raise ValueError(f"Expected learning_rate > 0, got {learning_rate!r}")
    if not (0 <= b1 < 1 and 0 <= b2 < 1):
        raise ValueError(f"Expected 0 <= b1, b2 < 1, got b1={b1!r}, b2={b2!r}")

    def init_state(params: Params) -> AdamState:
        zeros = jax.tree.map(jnp.zeros_like, params)
        return AdamState(jnp.zeros((), jnp.int32), zeros, zeros)

    def update(grads: Params, state: AdamState, params: Params) -> tuple[Params, AdamState]:
        del params
        count = state.count + 1
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, grads)
        nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state.nu, grads)
        c1 = 1 - b1 ** count.astype(jnp.float32)
        c2 = 1 - b2 ** count.astype(jnp.float32)
        updates = jax.tree.map(lambda m, v: -learning_rate * (m / c1) / (jnp.sqrt(v / c2) + eps), mu, nu)
        return updates, AdamState(count, mu, nu)

    return Optimizer(init_state, update)


def _apply(params: Params, updates: Params) -> Params:
    return jax.tree.map(lambda p, u: p + u, params, updates)


def train_step(
    params: Params, opt_state: OptState, x: jax.Array, y: jax.Array, optimizer: Optimizer
) -> tuple[Params, OptState, jax.Array]:
    """One step on the batch ``(x, y)``: returns new params, new state, and the loss before it.

    Pure; jitted per optimizer (the optimizer is a static argument, so build it
    once and reuse it). Cost: ``cost(B, sizes, optimizer)``.
    """
    _check_batch(params, x, y)
    return _train_step(params, opt_state, x, y, optimizer)


@partial(jax.jit, static_argnames="optimizer")
def _train_step(
    params: Params, opt_state: OptState, x: jax.Array, y: jax.Array, optimizer: Optimizer
) -> tuple[Params, OptState, jax.Array]:
    n = x.shape[0]
    value, grads = jax.value_and_grad(_loss_sum)(params, x, y)
    grads = jax.tree.map(lambda g: g / n, grads)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return _apply(params, updates), opt_state, value / n


@jax.jit
def _shard_grads(params: Params, x: jax.Array, y: jax.Array) -> tuple[Params, jax.Array]:
    return jax.value_and_grad(_loss_sum)(params, x, y)[::-1]


def shard_grads(params: Params, x: jax.Array, y: jax.Array) -> tuple[Params, jax.Array, int]:
    """What one data-parallel worker returns for its shard: the gradient of the
    summed loss, the summed loss, and the number of examples."""
    _check_batch(params, x, y)
    grads, total = _shard_grads(params, x, y)
    return grads, total, int(x.shape[0])


def combine_grads(parts: Sequence[tuple[Params, jax.Array, int]]) -> tuple[Params, jax.Array]:
    """Mean gradient and mean loss over the union of the shards (weighted by size)."""
    if not parts:
        raise ValueError("Expected at least one shard's gradients, got none")
    n = sum(count for _, _, count in parts)
    if n <= 0:
        raise ValueError(f"Expected shards with examples in total > 0, got {n}")
    grads = jax.tree.map(lambda *gs: sum(gs[1:], gs[0]) / n, *[g for g, _, _ in parts])
    value = sum((v for _, v, _ in parts[1:]), parts[0][1]) / n
    return grads, value


@partial(jax.jit, static_argnames="optimizer")
def _apply_grads(params: Params, opt_state: OptState, grads: Params, optimizer: Optimizer) -> tuple[Params, OptState]:
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return _apply(params, updates), opt_state


def data_parallel_step(
    params: Params, opt_state: OptState, shards: Sequence[tuple[jax.Array, jax.Array]], optimizer: Optimizer
) -> tuple[Params, OptState, jax.Array]:
    """One step over shards as K workers would do it: gradients per shard, averaged
    by size, applied once. Same result as :func:`train_step` on the concatenated batch."""
    parts = [shard_grads(params, x, y) for x, y in shards if x.shape[0] > 0]
    grads, value = combine_grads(parts)
    params, opt_state = _apply_grads(params, opt_state, grads, optimizer)
    return params, opt_state, value


def split_batch(x: jax.Array, y: jax.Array, k: int) -> list[tuple[jax.Array, jax.Array]]:
    """The batch cut into ``k`` contiguous shards (uneven sizes allowed)."""
    return [(x[c.start : c.stop], y[c.start : c.stop]) for c in chunks(int(x.shape[0]), k)]


def _check_batch(params: Params, x: jax.Array, y: jax.Array) -> None:
    if not params or not all(isinstance(layer, Layer) for layer in params):
        raise TypeError(f"Expected params as a tuple of mlp.Layer, got {type(params).__name__}")
    d_in = params[0].w.shape[0]
    if x.ndim != 2 or x.shape[1] != d_in:
        raise ValueError(f"Expected x of shape (B, {d_in}), got {tuple(x.shape)}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"Expected y of shape ({x.shape[0]},) to match x, got {tuple(y.shape)}")
    if x.shape[0] < 1:
        raise ValueError(f"Expected a batch of B >= 1 examples, got {x.shape[0]}")


# --- NumPy reference -------------------------------------------------------------


def _np_params(params: Params) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(np.asarray(layer.w, np.float64), np.asarray(layer.b, np.float64)) for layer in params]


def reference_loss(params: Params, x: np.ndarray, y: np.ndarray) -> float:
    """NumPy float64 mean cross-entropy."""
    return reference_grads(params, x, y)[1]


def reference_grads(params: Params, x: np.ndarray, y: np.ndarray) -> tuple[Params, float]:
    """NumPy float64 gradient of the mean loss (hand-written backprop) and the loss."""
    layers = _np_params(params)
    x = np.asarray(x, np.float64)
    y = np.asarray(y)
    acts = [x]
    pre = []
    h = x
    for i, (w, b) in enumerate(layers):
        z = h @ w + b
        pre.append(z)
        h = np.maximum(z, 0.0) if i < len(layers) - 1 else z
        acts.append(h)
    logits = acts[-1]
    shifted = logits - logits.max(axis=1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    n = x.shape[0]
    value = float(-logp[np.arange(n), y].mean())
    delta = np.exp(logp)
    delta[np.arange(n), y] -= 1.0
    delta /= n
    grads: list[Layer] = []
    for i in range(len(layers) - 1, -1, -1):
        w, _ = layers[i]
        grads.append(Layer(acts[i].T @ delta, delta.sum(axis=0)))
        if i > 0:
            delta = (delta @ w.T) * (pre[i - 1] > 0)
    return tuple(grads[::-1]), value


def reference(
    params: Params, x: np.ndarray, y: np.ndarray, learning_rate: float, steps: int = 1
) -> tuple[Params, float]:
    """NumPy float64 full-batch SGD for ``steps`` steps: new params and the last loss."""
    current: Params = tuple(Layer(*layer) for layer in _np_params(params))
    value = float("nan")
    for _ in range(steps):
        grads, value = reference_grads(current, x, y)
        current = tuple(Layer(p.w - learning_rate * g.w, p.b - learning_rate * g.b) for p, g in zip(current, grads))
    return current, value


def cost(batch: int, sizes: Sequence[int], optimizer: str = "sgd") -> Cost:
    """FLOPs and bytes of one train step (module docstring); ``optimizer`` is "sgd" or "adam"."""
    _check_sizes(sizes)
    if batch < 0:
        raise ValueError(f"Expected batch >= 0, got {batch}")
    if optimizer not in ("sgd", "adam"):
        raise ValueError(f"Expected optimizer 'sgd' or 'adam', got {optimizer!r}")
    p = float(sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:])))
    opt_flops, opt_copies = (4.0, 3.0) if optimizer == "sgd" else (12.0, 7.0)
    flops = 6.0 * batch * p + opt_flops * p
    data = 4.0 * batch * (sizes[0] + 1)
    activations = 2 * 4.0 * batch * sum(sizes[1:])
    return Cost(flops, data + activations + opt_copies * 4.0 * p)
