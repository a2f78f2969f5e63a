"""Capability probe: what a worker's device can do, measured in about a second.

:func:`probe` times jitted matmuls (float32 at full precision, TF32 where the
device has it, bfloat16) and a streaming kernel for memory bandwidth on one JAX
device, and returns a :class:`Capability`. :func:`describe_device` returns what
the device says about itself (:class:`DeviceInfo`) without running anything.

How it measures: every kernel is compiled and run once first (never timed);
then a batch of back-to-back calls is timed with ``block_until_ready`` on the
last result, the batch size calibrated so that one batch takes about a tenth of
the budget, and the figure is the median over batches. Dispatch is asynchronous,
so per-call host overhead is hidden behind the device work.

What the figures mean:

- ``tflops_f32``: ``2 n^3`` FLOPs per ``n x n`` float32 matmul at
  ``Precision.HIGHEST`` (true float32, no TF32 shortcut), per second, / 1e12;
- ``tflops_tf32``: the same at ``Precision.DEFAULT`` on a GPU, where XLA may use
  TF32 tensor cores (``None`` elsewhere: on a CPU it is the float32 figure);
- ``tflops_bf16``: bfloat16 inputs, float32 accumulation. Always measured;
  ``bf16_native`` says whether the device has bfloat16 arithmetic units: GPUs of
  compute capability 8.0 and up, TPUs, and CPUs whose flags list ``avx512_bf16``
  or ``amx_bf16``. Elsewhere the bfloat16 figure is real but emulated (converted
  to float32), and no faster than float32. On this project's AMD EPYC (with
  ``avx512_bf16``) XLA ran bfloat16 about twice as fast as float32;
- ``bandwidth_gbs``: ``y = x * a + b`` over an array much larger than any cache,
  counting the bytes read and written (``8`` per float32 element), / 1e9.

Cost model (for pricing the probe itself): a matmul of size ``n`` is ``2 n^3``
FLOPs and ``12 n^2`` bytes; the bandwidth kernel ``2 m`` FLOPs and ``8 m`` bytes
for ``m`` elements. The probe runs about ``seconds`` of wall time in all,
compilation included (~1 s by default): see :func:`cost`.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ._base import Cost, Tolerance, check_positive

logger = logging.getLogger(__name__)

__all__ = [
    "Capability",
    "DeviceInfo",
    "check",
    "cost",
    "describe_device",
    "matmul_tflops",
    "probe",
    "reference",
    "stream_bandwidth",
    "tolerance",
]

#: Two probes of the same device agree within this. Throughput is noisy (clock
#: boost, a busy neighbour on a shared host), so verification should treat a
#: probe as an advertisement and check it against later work, not as exact.
tolerance = Tolerance(rtol=0.5, atol=0.0)

#: Matmul sizes and bandwidth array elements per platform: big enough to run near
#: peak, small enough to keep the probe around a second.
_SIZES = {
    "cpu": {"matmul": 1024, "stream": 32 * 2**20},  # 2.1 GFLOP; 128 MiB array
    "gpu": {"matmul": 8192, "stream": 256 * 2**20},  # 1.1 TFLOP; 1 GiB array
    "tpu": {"matmul": 8192, "stream": 256 * 2**20},
}


class DeviceInfo(NamedTuple):
    """What a JAX device says about itself.

    ``memory_bytes`` is the device's total memory: for a GPU from NVML where
    ``pynvml`` is installed, else JAX's allocator limit; for a CPU the host's
    physical memory. ``memory_limit_bytes`` is what JAX's allocator may use
    (``None`` on a CPU).
    """

    platform: str
    kind: str
    name: str
    id: int
    memory_bytes: int | None
    memory_limit_bytes: int | None
    compute_capability: str | None
    cores: int | None


class Capability(NamedTuple):
    """Measured throughput of one device (see the module docstring for the units)."""

    device: DeviceInfo
    tflops_f32: float
    tflops_tf32: float | None
    tflops_bf16: float | None
    bf16_native: bool
    bandwidth_gbs: float
    matmul_n: int
    stream_elements: int
    seconds: float
    jax_version: str

    def as_dict(self) -> dict[str, Any]:
        """A flat, JSON-ready dict (the device's fields prefixed ``device_``)."""
        out = {f"device_{k}": v for k, v in self.device._asdict().items()}
        out.update({k: v for k, v in self._asdict().items() if k != "device"})
        return out


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "cpu"


def _host_memory() -> int | None:
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def _nvml_memory(device: jax.Device) -> int | None:
    """Total memory of ``device`` from NVML, where the CUDA index maps to an NVML one."""
    try:
        import pynvml
    except ImportError:
        return None
    hardware_id = getattr(device, "local_hardware_id", None)
    index = int(hardware_id if hardware_id is not None else device.id)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        entries = [v.strip() for v in visible.split(",") if v.strip()]
        if index >= len(entries) or not entries[index].isdigit():
            return None  # UUIDs or MIG names: do not guess
        index = int(entries[index])
    try:
        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index)).total)
        finally:
            pynvml.nvmlShutdown()
    except Exception as exc:  # noqa: BLE001 - NVML missing or refusing: no figure
        logger.debug("NVML gave no memory figure for %s: %s", device, exc)
        return None


def describe_device(device: jax.Device | None = None) -> DeviceInfo:
    """Platform, kind, memory and compute capability of a JAX device (default: the first)."""
    if device is None:
        device = jax.devices()[0]
    platform = device.platform
    stats: dict[str, Any] = {}
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001 - not every backend implements memory_stats
        stats = {}
    limit = stats.get("bytes_limit")
    capability = getattr(device, "compute_capability", None)
    if platform == "cpu":
        memory = _host_memory()
        kind = _cpu_model()
        cores = os.cpu_count()
    else:
        memory = _nvml_memory(device) if platform == "gpu" else None
        memory = memory if memory is not None else (int(limit) if limit else None)
        kind = device.device_kind
        cores = getattr(device, "core_count", None)
    return DeviceInfo(
        platform=platform,
        kind=str(kind),
        name=str(device),
        id=int(device.id),
        memory_bytes=memory,
        memory_limit_bytes=int(limit) if limit else None,
        compute_capability=str(capability) if capability else None,
        cores=int(cores) if cores else None,
    )


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _bf16_native(info: DeviceInfo) -> bool:
    if info.platform == "cpu":
        return bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})
    if info.platform == "tpu":
        return True
    if info.platform == "gpu" and info.compute_capability:
        try:
            return float(info.compute_capability) >= 8.0
        except ValueError:
            return False
    return False


def _timed(
    fn: Callable[..., jax.Array], args: tuple[jax.Array, ...], budget_s: float, *, chain: bool = False
) -> float:
    """Median seconds per call of ``fn(*args)``, warm-up excluded (see module docstring).

    With ``chain`` the output feeds the next call (``fn`` donates its input), so a
    streaming kernel reuses one buffer instead of touching fresh memory each call.
    """
    state = args

    def call(state: tuple[jax.Array, ...]) -> tuple[tuple[jax.Array, ...], jax.Array]:
        out = fn(*state)
        return ((out,) if chain else state), out

    state, out = call(state)  # compile and warm up, not timed
    jax.block_until_ready(out)
    start = time.perf_counter()
    state, out = call(state)
    jax.block_until_ready(out)
    once = max(time.perf_counter() - start, 1e-7)
    reps = max(1, min(1000, int(budget_s / 5 / once)))
    samples: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(samples) < 3 or (len(samples) < 7 and time.perf_counter() < deadline):
        start = time.perf_counter()
        for _ in range(reps):
            state, out = call(state)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - start) / reps)
    return statistics.median(samples)


def _matmul(precision: jax.lax.Precision) -> Callable[[jax.Array, jax.Array], jax.Array]:
    return jax.jit(
        lambda a, b: jax.lax.dot(a, b, precision=precision, preferred_element_type=jnp.float32)
    )


def matmul_tflops(
    n: int, dtype: Any = jnp.float32, *, precision: str = "highest", device: jax.Device | None = None,
    budget_s: float = 0.2,
) -> float:
    """Measured TFLOP/s of an ``n x n`` matmul in ``dtype`` (float32 accumulation)."""
    if n < 1:
        raise ValueError(f"Expected n >= 1, got {n}")
    check_positive("budget_s", budget_s)
    device = device or jax.devices()[0]
    prec = {"highest": jax.lax.Precision.HIGHEST, "default": jax.lax.Precision.DEFAULT}.get(precision)
    if prec is None:
        raise ValueError(f"Expected precision 'highest' or 'default', got {precision!r}")
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.device_put(jax.random.normal(ka, (n, n), jnp.float32).astype(dtype), device)
    b = jax.device_put(jax.random.normal(kb, (n, n), jnp.float32).astype(dtype), device)
    seconds = _timed(_matmul(prec), (a, b), budget_s)
    return 2.0 * n**3 / seconds / 1e12


@partial(jax.jit, donate_argnums=0)
def _stream(x: jax.Array) -> jax.Array:
    return x * jnp.float32(1.000001) + jnp.float32(0.5)


def stream_bandwidth(elements: int, *, device: jax.Device | None = None, budget_s: float = 0.2) -> float:
    """Measured GB/s of ``y = x * a + b`` over ``elements`` float32 (read + write counted)."""
    if elements < 1:
        raise ValueError(f"Expected elements >= 1, got {elements}")
    check_positive("budget_s", budget_s)
    device = device or jax.devices()[0]
    x = jax.device_put(jnp.ones((elements,), jnp.float32), device)
    seconds = _timed(_stream, (x,), budget_s, chain=True)
    return 8.0 * elements / seconds / 1e9


def probe(device: jax.Device | None = None, *, seconds: float = 1.0) -> Capability:
    """Measure one device's matmul TFLOP/s and memory bandwidth in about ``seconds``."""
    check_positive("seconds", seconds)
    started = time.perf_counter()
    device = device or jax.devices()[0]
    info = describe_device(device)
    sizes = _SIZES.get(info.platform, _SIZES["cpu"])
    n, m = sizes["matmul"], sizes["stream"]
    if info.memory_limit_bytes:  # never ask for more than a quarter of the device
        while (3 * n * n * 4 > info.memory_limit_bytes // 4) and n > 256:
            n //= 2
        while 8 * m > info.memory_limit_bytes // 4 and m > 2**20:
            m //= 2
    share = seconds / (4 if info.platform == "gpu" else 3) / 2  # half of each share for compiles
    f32 = matmul_tflops(n, jnp.float32, precision="highest", device=device, budget_s=share)
    tf32 = (
        matmul_tflops(n, jnp.float32, precision="default", device=device, budget_s=share)
        if info.platform == "gpu"
        else None
    )
    bf16 = matmul_tflops(n, jnp.bfloat16, precision="default", device=device, budget_s=share)
    bandwidth = stream_bandwidth(m, device=device, budget_s=share)
    elapsed = time.perf_counter() - started
    logger.info("probe of %s took %.2f s", info.name, elapsed)
    return Capability(
        device=info,
        tflops_f32=f32,
        tflops_tf32=tf32,
        tflops_bf16=bf16,
        bf16_native=_bf16_native(info),
        bandwidth_gbs=bandwidth,
        matmul_n=n,
        stream_elements=m,
        seconds=elapsed,
        jax_version=jax.__version__,
    )


def reference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """NumPy (BLAS) matmul in float64: what the timed kernel computes, for checking it."""
    return np.asarray(a, np.float64) @ np.asarray(b, np.float64)


def check(n: int = 256, device: jax.Device | None = None) -> bool:
    """True when the probe's float32 and bfloat16 matmuls compute the right product."""
    device = device or jax.devices()[0]
    ka, kb = jax.random.split(jax.random.key(1))
    a = jax.random.normal(ka, (n, n), jnp.float32)
    b = jax.random.normal(kb, (n, n), jnp.float32)
    want = reference(np.asarray(a), np.asarray(b))
    got = np.asarray(_matmul(jax.lax.Precision.HIGHEST)(a, b))
    low = np.asarray(_matmul(jax.lax.Precision.DEFAULT)(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)))
    scale = np.sqrt(n)
    return bool(np.max(np.abs(got - want)) < 1e-4 * scale and np.max(np.abs(low - want)) < 5e-2 * scale)


def cost(matmul_n: int, stream_elements: int = 0, matmuls: int = 1) -> Cost:
    """FLOPs and bytes of ``matmuls`` size-``matmul_n`` matmuls plus one stream pass."""
    if matmul_n < 0 or stream_elements < 0 or matmuls < 0:
        raise ValueError(
            f"Expected sizes >= 0, got matmul_n={matmul_n}, stream_elements={stream_elements}, matmuls={matmuls}"
        )
    mm = Cost(2.0 * matmul_n**3, 12.0 * matmul_n**2).scale(matmuls)
    return mm + Cost(2.0 * stream_elements, 8.0 * stream_elements)
