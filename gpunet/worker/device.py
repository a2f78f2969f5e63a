"""What device a worker offers, found with the real APIs.

GPUs are counted with NVML (``pynvml``, present with the ``cuda`` extra) and named
by NVML and JAX; where there is no NVIDIA GPU, or no NVML, a worker says honestly
that its device is the CPU, with the processor's name and the worker's memory.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import platform
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gpunet.wire import DEVICE_RESOURCE, GPU_MEMORY_RESOURCE, GPU_RESOURCE

if TYPE_CHECKING:  # pragma: no cover
    from distributed import Worker

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Gpu:
    """One NVIDIA GPU as NVML reports it."""

    index: int
    name: str
    memory_bytes: int


def local_gpus() -> list[Gpu]:
    """The NVIDIA GPUs of this host, by NVML; an empty list where there are none.

    A missing ``pynvml`` or an NVML error (no driver, no device) means no GPUs: that
    is the normal case on a CPU host, so it is logged at DEBUG level only.
    """
    try:
        import pynvml
    except ImportError:
        logger.debug("pynvml is not installed: no GPUs are looked for")
        return []
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # noqa: BLE001 - pynvml raises NVMLError subclasses
        logger.debug("NVML is not available (%s): no GPUs", exc)
        return []
    try:
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(handle)
            if isinstance(name, bytes):
                name = name.decode()
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle).total
            gpus.append(Gpu(index, name, int(memory)))
        return gpus
    finally:
        pynvml.nvmlShutdown()


def gpu_resources(gpus: list[Gpu]) -> dict[str, float]:
    """The Dask resources a dask-cuda worker on one of ``gpus`` offers: a device slot,
    one GPU, and the smallest of their memories."""
    return {DEVICE_RESOURCE: 1, GPU_RESOURCE: 1, GPU_MEMORY_RESOURCE: min(gpu.memory_bytes for gpu in gpus)}


def dask_cuda_or_none() -> Any:
    """The ``dask_cuda`` module, or None where it is not installed (the ``cuda`` extra)."""
    try:
        import dask_cuda
    except ImportError:
        return None
    return dask_cuda


@functools.lru_cache(maxsize=1)
def cpu_name() -> str:
    """The processor's model name (from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _visible_gpu_index() -> int | None:
    """The GPU a dask-cuda worker is pinned to: the first of CUDA_VISIBLE_DEVICES."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    return int(visible) if visible.isdigit() else None


def _jax_platform() -> str | None:
    try:
        import jax

        return jax.devices()[0].platform
    except Exception as exc:  # noqa: BLE001 - a broken accelerator plugin must not kill the worker
        logger.warning("JAX could not list its devices: %s", exc)
        return None


def describe_this_device(memory_limit: int | None = None, *, gpu: bool = True) -> dict[str, Any]:
    """Describe the device a worker in this process offers.

    ``gpu=False`` describes the CPU even on a host with GPUs: a worker without a
    ``GPU`` resource (a CPU worker started where dask-cuda is missing) offers none.

    Returns a msgpack-friendly dict: ``kind`` ("gpu" or "cpu"), ``name``,
    ``memory_bytes``, ``count``, ``jax_platform`` (what JAX runs on here),
    ``software`` (:func:`software_versions`) and ``label`` (e.g. "cpu: AMD EPYC 7B13, 11.2 GiB").
    """
    gpus = local_gpus() if gpu else []
    jax_platform = _jax_platform()
    if gpus:
        index = _visible_gpu_index()
        chosen = [g for g in gpus if g.index == index] or gpus[:1]
        gpu = chosen[0]
        info = {"kind": "gpu", "name": gpu.name, "memory_bytes": gpu.memory_bytes, "count": len(chosen)}
    else:
        if memory_limit is None:
            import psutil

            memory_limit = psutil.virtual_memory().total
        info = {"kind": "cpu", "name": cpu_name(), "memory_bytes": int(memory_limit), "count": 1}
    info["jax_platform"] = jax_platform
    info["software"] = software_versions()
    info["label"] = f"{info['kind']}: {info['name']}, {format_bytes(info['memory_bytes'])}"
    return info


#: The packages whose versions a worker reports (what a notebook's provenance records).
REPORTED_PACKAGES = ("jax", "jaxlib", "numpy", "gpunet")


def software_versions() -> dict[str, str | None]:
    """The versions a result depends on: Python, JAX, jaxlib, NumPy, gpunet (None
    where one is not installed) and, where NVML answers, the CUDA driver."""
    from importlib import metadata

    versions: dict[str, str | None] = {"python": platform.python_version()}
    for package in REPORTED_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    driver = cuda_driver_version()
    if driver is not None:
        versions["cuda_driver"] = driver
    return versions


def cuda_driver_version() -> str | None:
    """The NVIDIA driver version and the CUDA version it supports ("550.54.15 (CUDA
    12.4)"), by NVML; None where there is no NVML or no driver."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - pynvml raises NVMLError subclasses; no driver is the CPU case
        return None
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        cuda = pynvml.nvmlSystemGetCudaDriverVersion()
        driver = driver.decode() if isinstance(driver, bytes) else str(driver)
        return f"{driver} (CUDA {cuda // 1000}.{cuda % 1000 // 10})"
    except Exception:  # noqa: BLE001
        return None
    finally:
        pynvml.nvmlShutdown()


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def parse_size(text: str) -> int:
    """'40GB' / '40 GiB' / '512M' / '1e9' -> bytes. Raises ValueError naming the text."""
    from dask.utils import parse_bytes

    try:
        return int(parse_bytes(text.replace(" ", "")))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"cannot read {text!r} as a size; write it like 40GB, 16GiB or 512MB") from exc


# -- a Dask worker's device (run on the worker, e.g. with Client.run) ----------------------------


#: Environment variables through which `gpunet provide` tells its worker processes
#: whose they are (the provider's credit token) and what they charge.
PROVIDER_TOKEN_ENV = "GPUNET_PROVIDER_TOKEN"
PROVIDER_RATE_ENV = "GPUNET_PROVIDER_RATE"


def device_info(dask_worker: Worker) -> dict[str, Any]:
    """The device a worker offers (run it with ``Client.run(device_info)``)."""
    device = getattr(dask_worker, "gpunet_device", None)
    if device is None:
        device = describe_this_device(memory_limit(dask_worker), gpu=has_gpu_resource(dask_worker))
        dask_worker.gpunet_device = device
    return device


def memory_limit(worker: Worker) -> int | None:
    """The worker's memory limit in bytes (None where Dask sets none)."""
    manager = getattr(worker, "memory_manager", None)
    return getattr(manager, "memory_limit", None)


async def measure_capability(seconds: float = 1.0, refresh: bool = False, dask_worker: Worker | None = None) -> dict[str, Any]:
    """Measure this worker's device with the capability probe of ``gpunet.kernels``
    (matmul TFLOP/s, memory bandwidth) and keep it in ``worker.gpunet_device``.

    Run it with ``Client.run(measure_capability, workers=[address])``; it runs off
    the event loop. A measured worker answers from its cache unless ``refresh``.
    """
    device = device_info(dask_worker)
    if device.get("capability") is None or refresh:
        from gpunet.kernels.probe import probe  # imports JAX: only where a worker measures

        capability = await asyncio.to_thread(probe, seconds=seconds)
        device["capability"] = {
            "tflops_f32": capability.tflops_f32,
            "tflops_bf16": capability.tflops_bf16,
            "bf16_native": capability.bf16_native,
            "bandwidth_gbs": capability.bandwidth_gbs,
            "seconds": capability.seconds,
        }
        logger.info("gpunet worker %s measured %.3f TFLOP/s float32, %.1f GB/s", dask_worker.address,
                    capability.tflops_f32, capability.bandwidth_gbs)
    return device


def has_gpu_resource(worker: Worker) -> bool:
    """Whether this worker offers a GPU: a CPU worker on a GPU host must not claim one."""
    state = getattr(worker, "state", None)
    return bool(getattr(state, "total_resources", {}).get(GPU_RESOURCE))
