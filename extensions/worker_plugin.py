"""gpunet's Dask worker plugin: a thin adapter from Dask's worker to gpunet's worker side.

Start workers with ``--preload gpunet.extensions.worker_plugin`` (``gpunet provide``
and the embedded network do). On setup it describes the worker's device with the
real APIs (NVML, JAX; :mod:`gpunet.worker.device`) off the event loop, keeps it as
``worker.gpunet_device``, routes job threads' stdout/stderr
(:mod:`gpunet.worker.runner`), and, given a provider token, registers the worker
with the scheduler's metering as that provider's.

On an open network (the worker's certificate binds the provider role,
:mod:`gpunet.certs`) the worker answers only the scheduler and the gateway
(:class:`gpunet.roles.WorkerDoor`), and registers with no token: the scheduler takes
its provider account from its certificate.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
import os
import signal
import threading
from typing import TYPE_CHECKING

from distributed.diagnostics.plugin import WorkerPlugin

from gpunet import codec
from gpunet.certs import PROVIDER, own_identity
from gpunet.paths import data_dir
from gpunet.roles import WorkerDoor
from gpunet.wire import CONFIRM_PROVIDER, ENVIRONMENT_CHANGED, REGISTER_PROVIDER, token_digest
from gpunet.worker.device import (
    PROVIDER_RATE_ENV,
    PROVIDER_TOKEN_ENV,
    describe_this_device,
    has_gpu_resource,
    memory_limit,
)
from gpunet.worker.environment import InstallPolicy, SessionEnvironments, environment_report, path_fingerprint
from gpunet.worker.runner import install_routers, set_job_host
from gpunet.worker.sandbox import (
    BUBBLEWRAP,
    PROCESS,
    SANDBOX_ENV,
    WORKER_ADDRESS_ENV,
    WORKER_NAME_ENV,
    SandboxPool,
    SandboxSettings,
    bubblewrap_works,
    device_environment,
    make_non_dumpable,
)

if TYPE_CHECKING:  # pragma: no cover
    from distributed import Worker

logger = logging.getLogger(__name__)


class GpunetWorkerPlugin(WorkerPlugin):
    """Describes the worker's device once, at setup; with a provider token, registers
    the worker with the scheduler's metering plugin as that provider's. Register with
    ``Client.register_plugin(GpunetWorkerPlugin())``."""

    name = "gpunet-device"
    idempotent = True
    #: How often a provider's worker looks whether its installed distributions changed.
    ENVIRONMENT_CHECK_S = 10.0

    def __init__(self, provider_token: str | None = None, rate: float = 1.0, *, certified: bool = False,
                 sandbox: SandboxSettings | None = None) -> None:
        self.provider_token = provider_token
        self.rate = rate
        #: on an open network: the scheduler knows the provider from the certificate
        self.certified = certified
        #: how the worker confines its cells (a provider's always does); None runs them in this process
        self.sandbox = sandbox
        self._pool: SandboxPool | None = None

    async def setup(self, worker: Worker) -> None:
        """Describe this worker's device and keep it as ``worker.gpunet_device``;
        register it as its provider's with the scheduler where it has a token."""
        install_routers()
        worker.gpunet_device = await asyncio.to_thread(describe_this_device, memory_limit(worker),
                                                       gpu=has_gpu_resource(worker))
        logger.info("gpunet worker %s offers %s", worker.address, worker.gpunet_device["label"])
        if self.sandbox is not None:
            make_non_dumpable()  # a sandbox of this user cannot read this process's environment or memory
            settings = self.sandbox
            if settings.memory_bytes is None:
                settings = dataclasses.replace(settings, memory_bytes=memory_limit(worker))
            # cells see what the worker reports it has (gpunet.worker.environment): the
            # folders the provider put on PYTHONPATH too, which `python -I` leaves out
            on_path = tuple(entry for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep) if entry)
            settings = dataclasses.replace(settings, path_prefix=settings.path_prefix + on_path)
            self._pool = SandboxPool(settings, {**device_environment(), WORKER_ADDRESS_ENV: worker.address,
                                                WORKER_NAME_ENV: str(worker.name)})
            set_job_host(self._pool)
        if self.provider_token:
            worker.handlers[CONFIRM_PROVIDER] = self.confirm_provider
        if self.provider_token or self.certified:
            # A provider's machine is not the notebook's: it says what it has installed (and
            # whether it installs more for a session), when it joins and when that changes.
            policy = InstallPolicy.from_env()
            worker.gpunet_environment = await asyncio.to_thread(
                environment_report, gpu=worker.gpunet_device["kind"] == "gpu", policy=policy)
            if policy is not None:
                worker.gpunet_environments = SessionEnvironments(
                    data_dir() / "environments" / f"worker-{os.getpid()}", data_dir() / "wheels", policy)
            # Setup may run before the worker is connected; register once it is.
            self._registering = asyncio.ensure_future(self._register_when_connected(worker))
            self._watching = asyncio.ensure_future(self._watch_environment(worker))

    def confirm_provider(self, digest: str = "") -> bool:
        """Handler: whether this worker's provider token has ``digest``. The scheduler
        asks before it believes a registration that names this worker; the token itself
        never leaves the worker this way."""
        return hmac.compare_digest(str(digest), token_digest(self.provider_token or ""))

    async def _register_when_connected(self, worker: Worker, timeout: float = 120) -> None:
        """Tell the scheduler whose worker this is, over the worker's own stream; the
        scheduler then asks this worker to confirm it (:meth:`confirm_provider`)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            stream = worker.batched_stream
            if stream is not None and stream.comm is not None and not stream.comm.closed():
                message = {"op": REGISTER_PROVIDER, "rate": self.rate, "environment": worker.gpunet_environment}
                if not self.certified:
                    message["token"] = self.provider_token
                worker.batched_send(message)
                return
            await asyncio.sleep(0.05)
        logger.error("gpunet worker %s never connected to its scheduler; it was not registered", worker.address)

    async def _watch_environment(self, worker: Worker) -> None:
        """Tell the scheduler again what is installed when the folders on ``sys.path`` change."""
        seen = path_fingerprint()
        while worker.status.name not in ("closing", "closed", "failed"):
            await asyncio.sleep(self.ENVIRONMENT_CHECK_S)
            now = path_fingerprint()
            if now == seen:
                continue
            seen = now
            report = await asyncio.to_thread(environment_report, gpu=worker.gpunet_device["kind"] == "gpu",
                                             policy=InstallPolicy.from_env())
            if report["packages"] != worker.gpunet_environment["packages"]:
                worker.gpunet_environment = report
                worker.batched_send({"op": ENVIRONMENT_CHANGED, "environment": report})

    async def teardown(self, worker: Worker) -> None:
        """End the worker's sandboxes (before the session environments they run with), and
        stop watching the environment."""
        if self._pool is not None:
            set_job_host(None)
            await asyncio.to_thread(self._pool.close)
        watching = getattr(self, "_watching", None)
        if watching is not None:
            watching.cancel()
        environments = getattr(worker, "gpunet_environments", None)
        if environments is not None:
            await asyncio.to_thread(environments.close)


async def dask_setup(worker: Worker) -> None:
    """Entry point for ``dask worker --preload gpunet.extensions.worker_plugin``; the
    provider's token and rate come from GPUNET_PROVIDER_TOKEN / GPUNET_PROVIDER_RATE,
    or, on an open network, the provider from the worker's certificate."""
    codec.register_with_dask()  # CODEC results (and replicas of them) leave this worker as Dask frames
    token = os.environ.pop(PROVIDER_TOKEN_ENV, None) or None  # not left for the tasks to read
    own = own_identity(worker.security, "worker")
    certified = own is not None and own.role == PROVIDER
    if certified:
        WorkerDoor(own).install(worker)
        token = None  # the certificate says who is paid; a token is never used
    if (token or certified) and threading.current_thread() is threading.main_thread():
        # Ctrl-C in `gpunet provide`'s terminal reaches its worker processes too; the
        # provide process drains them first, so they must not die of it.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A provider's worker runs strangers' cells: always in sandboxes (`gpunet provide` says how)
    sandbox = os.environ.get(SANDBOX_ENV)
    settings = SandboxSettings.from_env(sandbox) if sandbox else None
    if settings is None and (token or certified):
        settings = SandboxSettings(isolation=BUBBLEWRAP if bubblewrap_works() else PROCESS)
    plugin = GpunetWorkerPlugin(token, float(os.environ.get(PROVIDER_RATE_ENV, "1.0")), certified=certified,
                                sandbox=settings)
    await worker.plugin_add(plugin, name=GpunetWorkerPlugin.name)


