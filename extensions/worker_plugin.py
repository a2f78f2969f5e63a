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


class GpunetWorkerPlugin(WorkerPlugin):
    """Describes the worker's device once, at setup. Register with
    ``Client.register_plugin(GpunetWorkerPlugin())``."""

    name = "gpunet-device"
    idempotent = True

    async def setup(self, worker: Worker) -> None:
        """Describe this worker's device and keep it as ``worker.gpunet_device``."""
        from gpunet.remote import _install_routers

        _install_routers()
        worker.gpunet_device = await asyncio.to_thread(describe_this_device, _memory_limit(worker))
        logger.info("gpunet worker %s offers %s", worker.address, worker.gpunet_device["label"])


def device_info(dask_worker: Worker) -> dict[str, Any]:
    """The device a worker offers (run it with ``Client.run(device_info)``)."""
    device = getattr(dask_worker, "gpunet_device", None)
    if device is None:
        device = describe_this_device(dask__memory_limit(worker))
        dask_worker.gpunet_device = device
    return device


async def dask_setup(worker: Worker) -> None:
    """Entry point for ``dask worker --preload gpunet.extensions.worker_plugin``."""
    await worker.plugin_add(GpunetWorkerPlugin(), name=GpunetWorkerPlugin.name)


def _memory_limit(worker: Worker) -> int | None:
    manager = getattr(worker, "memory_manager", None)
    return getattr(manager, "memory_limit", None)
