"""gpunet's Dask worker plugin: says what device a worker offers.

Register it from a client (``client.register_plugin(GpunetWorkerPlugin())``, which
also reaches workers that join later) or start workers with
``--preload gpunet.extensions.worker_plugin``. On setup it describes the worker's
device with the real APIs (NVML, JAX; see :mod:`gpunet.devices`) off the event
loop, keeps it as ``worker.gpunet_device``, and routes job threads' stdout/stderr
(:mod:`gpunet.remote`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from distributed.diagnostics.plugin import WorkerPlugin

from gpunet.devices import describe_this_device

if TYPE_CHECKING:  # pragma: no cover
    from distributed import Worker

logger = logging.getLogger(__name__)


#: Environment variables through which `gpunet provide` tells its worker processes
#: whose they are (the provider's credit token) and what they charge.
PROVIDER_TOKEN_ENV = "GPUNET_PROVIDER_TOKEN"
PROVIDER_RATE_ENV = "GPUNET_PROVIDER_RATE"


class GpunetWorkerPlugin(WorkerPlugin):
    """Describes the worker's device once, at setup; with a provider token, registers
    the worker with the scheduler's metering plugin as that provider's. Register with
    ``Client.register_plugin(GpunetWorkerPlugin())``."""

    name = "gpunet-device"
    idempotent = True

    def __init__(self, provider_token: str | None = None, rate: float = 1.0) -> None:
        self.provider_token = provider_token
        self.rate = rate

    async def setup(self, worker: Worker) -> None:
        """Describe this worker's device and keep it as ``worker.gpunet_device``;
        register it as its provider's with the scheduler where it has a token."""
        from gpunet.remote import _install_routers

        _install_routers()
        worker.gpunet_device = await asyncio.to_thread(describe_this_device, _memory_limit(worker),
                                                       gpu=_has_gpu_resource(worker))
        logger.info("gpunet worker %s offers %s", worker.address, worker.gpunet_device["label"])
        if self.provider_token:
            # Setup may run before the worker is connected; register once it is.
            self._registering = asyncio.ensure_future(self._register_when_connected(worker))

    async def _register_when_connected(self, worker: Worker, timeout: float = 120) -> None:
        """Tell the scheduler whose worker this is, over the worker's own stream, so
        that the scheduler knows which worker says it (nobody can speak for another)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            stream = worker.batched_stream
            if stream is not None and stream.comm is not None and not stream.comm.closed():
                worker.batched_send({"op": "gpunet-register-provider", "token": self.provider_token,
                                     "rate": self.rate})
                return
            await asyncio.sleep(0.05)
        logger.error("gpunet worker %s never connected to its scheduler; it was not registered", worker.address)


def device_info(dask_worker: Worker) -> dict[str, Any]:
    """The device a worker offers (run it with ``Client.run(device_info)``)."""
    device = getattr(dask_worker, "gpunet_device", None)
    if device is None:
        device = describe_this_device(_memory_limit(dask_worker), gpu=_has_gpu_resource(dask_worker))
        dask_worker.gpunet_device = device
    return device


async def dask_setup(worker: Worker) -> None:
    """Entry point for ``dask worker --preload gpunet.extensions.worker_plugin``; the
    provider's token and rate come from GPUNET_PROVIDER_TOKEN / GPUNET_PROVIDER_RATE."""
    import os
    import signal
    import threading

    token = os.environ.pop(PROVIDER_TOKEN_ENV, None) or None  # not left for the tasks to read
    if token and threading.current_thread() is threading.main_thread():
        # Ctrl-C in `gpunet provide`'s terminal reaches its worker processes too; the
        # provide process drains them first, so they must not die of it.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    plugin = GpunetWorkerPlugin(token, float(os.environ.get(PROVIDER_RATE_ENV, "1.0")))
    await worker.plugin_add(plugin, name=GpunetWorkerPlugin.name)


def _memory_limit(worker: Worker) -> int | None:
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
        from gpunet.kernels.probe import probe

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


def _has_gpu_resource(worker: Worker) -> bool:
    """Whether this worker offers a GPU: a CPU worker on a GPU host must not claim one."""
    from gpunet.devices import GPU_RESOURCE

    state = getattr(worker, "state", None)
    return bool(getattr(state, "total_resources", {}).get(GPU_RESOURCE))
