"""Capability probe: honest device description, positive figures, correct products."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gpunet.kernels import probe


def test_describe_device_tells_the_platform_honestly() -> None:
    info = probe.describe_device()
    device = jax.devices()[0]
    assert info.platform == device.platform
    assert info.id == device.id and info.name == str(device)
    if info.platform == "cpu":
        assert info.compute_capability is None and info.memory_limit_bytes is None
        assert info.memory_bytes is None or info.memory_bytes > 2**28
        assert info.cores is not None and info.cores >= 1


def test_probe_measures_every_figure_quickly() -> None:
    cap = probe.probe(seconds=0.3)
    assert cap.tflops_f32 > 0 and cap.bandwidth_gbs > 0
    assert cap.tflops_bf16 is not None and cap.tflops_bf16 > 0
    if cap.device.platform == "cpu":
        assert cap.tflops_tf32 is None
        assert cap.tflops_f32 < 100  # no CPU does 100 TFLOP/s in float32
    assert cap.seconds < 30  # a loose bound: the figure itself goes in the benchmark
    assert cap.jax_version == jax.__version__
    flat = cap.as_dict()
    assert flat["device_platform"] == cap.device.platform
    json.dumps(flat)  # ready for a worker's metadata


def test_timed_kernels_compute_the_right_product() -> None:
    assert probe.check(128)


def test_reference_matches_a_float32_matmul() -> None:
    a = np.arange(12.0).reshape(3, 4)
    b = np.ones((4, 2))
    got = jnp.asarray(a, jnp.float32) @ jnp.asarray(b, jnp.float32)
    assert np.allclose(got, probe.reference(a, b))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: probe.probe(seconds=0), "Expected seconds > 0, got 0"),
        (lambda: probe.matmul_tflops(0), "Expected n >= 1, got 0"),
        (lambda: probe.matmul_tflops(8, precision="tf64"), "got 'tf64'"),
        (lambda: probe.stream_bandwidth(-5), "Expected elements >= 1, got -5"),
        (lambda: probe.cost(-1), "matmul_n=-1"),
    ],
)
def test_bad_inputs_name_the_value(call, message: str) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match=message):
        call()


def test_cost_of_a_matmul() -> None:
    assert probe.cost(1024).flops == 2 * 1024**3
    assert probe.cost(0, 1000).bytes == 8000
