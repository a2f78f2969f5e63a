"""The connection to a gpunet network: a Dask scheduler and the workers behind it.

:func:`connect` joins a scheduler (an address, or ``GPUNET_SCHEDULER``) or, with
neither, starts an *embedded* network in the background: a Dask scheduler in this
process and worker processes on 127.0.0.1, one dask-cuda worker per GPU where
dask-cuda and NVIDIA GPUs are present, else two plain workers that say they are CPU
devices. ``gpunet up`` starts the same network in the foreground.

The embedded scheduler runs with ``distributed.scheduler.worker-saturation: inf``:
notebook work is a stream of independent, coarse tasks (cells, map items) that
should start as soon as a device slot is free, not root tasks of a large graph
whose memory queuing protects (measured here: ~3x the task throughput of the
default, see README).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
import threading
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from gpunet.errors import ConnectError, GpunetError, PlacementError

if TYPE_CHECKING:  # pragma: no cover
    from distributed import Client

    from gpunet.jobs import RemoteJob
    from gpunet.metering import Meter
    from gpunet.verify import VerifiedJob

logger = logging.getLogger(__name__)

#: Seconds to wait for a scheduler before saying it cannot be reached.
CONNECT_TIMEOUT_S = 5.0

#: Dask settings of the embedded network (see the module docstring for why).
EMBEDDED_DASK_CONFIG = {
    "distributed.scheduler.worker-saturation": "inf",
    # Cells may start processes of their own (multiprocessing, JAX compilation).
    "distributed.worker.daemon": False,
}

_current: Network | None = None
_current_lock = threading.Lock()


@dataclass(frozen=True)
class WorkerInfo:
    """One worker as ``%gpunet status`` shows it."""

    address: str
    name: str
    device: dict[str, Any]
    resources: dict[str, float]
    slots: int
    busy: int

    @property
    def free_slots(self) -> int:
        return max(self.slots - self.busy, 0)


class EmbeddedNetwork:
    """A scheduler and local workers on 127.0.0.1, started by this process."""

    #: Credits minted for the local notebook account of an embedded network.
    LOCAL_CREDITS = 1_000_000
    #: The provider account the embedded network's workers are paid to.
    LOCAL_PROVIDER = "local-provider"

    def __init__(self, n_workers: int | None = None, *, host: str = "127.0.0.1", port: int = 0,
                 dashboard_port: int = 0, credits: bool = True, credits_port: int = 0) -> None:
        import dask
        import distributed  # noqa: F401 - loads Dask's distributed config before we set part of it

        from gpunet.devices import DEVICE_RESOURCE, GPU_MEMORY_RESOURCE, GPU_RESOURCE, local_gpus

        gpus = local_gpus()
        common = dict(
            host=host,
            scheduler_port=port,
            dashboard_address=f"{host}:{dashboard_port}",
            protocol="tcp://",
        )
        self.note: str
        with dask.config.set(EMBEDDED_DASK_CONFIG), _explained_start_failure(host, port):
            cuda = _import_dask_cuda() if gpus else None
            if gpus and cuda is not None:
                resources = {
                    DEVICE_RESOURCE: 1,
                    GPU_RESOURCE: 1,
                    GPU_MEMORY_RESOURCE: min(g.memory_bytes for g in gpus),
                }
                self.cluster = cuda.LocalCUDACluster(resources=resources, **common)
                self.note = f"started {len(gpus)} dask-cuda workers, one per GPU ({gpus[0].name})"
            else:
                if gpus:
                    why = f"found {len(gpus)} NVIDIA GPU(s) but dask-cuda is not installed (pip install 'gpunet[cuda]')"
                else:
                    why = "no NVIDIA GPU found"
                n_workers = n_workers or 2
                self.cluster = _local_cluster(n_workers, resources={DEVICE_RESOURCE: 1}, **common)
                self.note = f"{why}: started {n_workers} CPU workers"
        logger.info("gpunet: %s", self.note)
        self.credits_service: Any = None
        self.client_token: str | None = None
        try:
            if credits:
                self._start_credits(host, credits_port)
            self._register_plugins()
        except BaseException:
            self.close()
            raise

    def _start_credits(self, host: str, port: int) -> None:
        """Start the credit service (SQLite in gpunet's data dir), a funded local
        client account and the provider account the local workers are paid to."""
        from gpunet.credits import serve_in_background
        from gpunet.paths import data_dir

        folder = data_dir() / "embedded" / time.strftime(f"%Y%m%d-%H%M%S-{os.getpid()}")
        for attempt in range(100):
            place = folder.with_name(f"{folder.name}-{attempt}")
            try:
                place.mkdir(parents=True)
                break
            except FileExistsError:
                continue
        self.credits_dir = place
        self.credits_service = serve_in_background(place / "credits.sqlite3", host, port,
                                                   operator_token_file=place / "operator-token",
                                                   log_path=place / "credits.log")
        operator = self.credits_service.client()
        operator.create_account(self.LOCAL_PROVIDER, "provider")
        self.client_token = operator.create_account("local-notebook", "client")["token"]
        operator.mint("local-notebook", self.LOCAL_CREDITS, key="mint-local-notebook")
        operator.close()

    @property
    def credits_url(self) -> str | None:
        """The credit service's URL (None when started without credits)."""
        return self.credits_service.url if self.credits_service is not None else None

    def _register_plugins(self) -> None:
        """Register gpunet's plugins with the scheduler: the worker plugin, so that
        every worker (restarted ones too) describes its device, and the metering
        plugin where there is a credit service (also for `gpunet up`)."""
        from distributed import Client

        from gpunet.extensions.scheduler_plugin import GpunetMeteringPlugin
        from gpunet.extensions.worker_plugin import GpunetWorkerPlugin

        with Client(self.cluster.scheduler_address, set_as_default=False) as client:
            client.register_plugin(GpunetWorkerPlugin())
            if self.credits_service is not None:
                client.register_plugin(GpunetMeteringPlugin(self.credits_service.url,
                                                            self.credits_service.operator_token,
                                                            default_provider=self.LOCAL_PROVIDER))

    @property
    def scheduler_address(self) -> str:
        return self.cluster.scheduler_address

    @property
    def dashboard_link(self) -> str | None:
        try:
            return self.cluster.dashboard_link
        except Exception:  # noqa: BLE001 - no bokeh, no dashboard
            return None

    def close(self) -> None:
        """Stop the workers and the scheduler (which reports what it still has to the
        credit service), then the credit service."""
        try:
            self.cluster.close(timeout=10)
        finally:
            if self.credits_service is not None:
                self.credits_service.stop()


@contextlib.contextmanager
def _explained_start_failure(host: str, port: int) -> Iterator[None]:
    """Turn Dask's "Cluster failed to start" into a message that names the address."""
    try:
        yield
    except (RuntimeError, OSError) as exc:
        cause = exc.__cause__ or exc.__context__ or exc
        raise GpunetError(
            f"the network could not start on {host}:{port} ({type(cause).__name__}: {cause}). "
            "Is the port in use? Choose another with --port, or --port 0 for a free one."
        ) from exc


def _import_dask_cuda() -> Any:
    try:
        import dask_cuda
    except ImportError:
        return None
    return dask_cuda


def _local_cluster(n_workers: int, **kwargs: Any) -> Any:
    from distributed import LocalCluster

    return LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, **kwargs)


class Network:
    """A connection to a gpunet network; what the magics and the Python API use.

    ``client`` is its :class:`distributed.Client`, ``credits`` its credit client
    (None while no credit service is connected), ``session`` this notebook session's
    id. Use it as a context manager, or call :meth:`close`.
    """

    def __init__(self, client: Client, *, embedded: EmbeddedNetwork | None = None,
                 meter: Meter | None = None) -> None:
        self.client = client
        self.embedded = embedded
        self.meter = meter
        self.credits = meter.credits if meter is not None else None
        self.session = meter.session if meter is not None else _session_id()
        self._address = client.scheduler.address
        self.topic = f"gpunet-events-{uuid.uuid4().hex[:12]}"
        self._jobs: dict[str, RemoteJob] = {}
        self._jobs_lock = threading.Lock()
        self._workers_cache: tuple[float, dict[str, dict[str, Any]]] = (0.0, {})
        self._rate_cache: tuple[float, float] = (0.0, 1.0)
        self.client.subscribe_topic(self.topic, self._on_event)
        self._closed = False

    # -- identity ----------------------------------------------------------------------
    @property
    def address(self) -> str:
        """The scheduler's address."""
        return self._address

    @property
    def dashboard_link(self) -> str | None:
        """The Dask dashboard's URL, where the scheduler serves one."""
        if self.embedded is not None:
            return self.embedded.dashboard_link
        try:
            return self.client.dashboard_link
        except Exception:  # noqa: BLE001
            return None

    def __repr__(self) -> str:
        return f"<gpunet.Network {self.address} session={self.session}>"

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # -- workers and placement ---------------------------------------------------------
    def _scheduler_workers(self, *, fresh: bool = False) -> dict[str, dict[str, Any]]:
        """Workers as the scheduler reports them (cached for a second: cells are hot)."""
        stamp, workers = self._workers_cache
        if fresh or time.monotonic() - stamp > 1.0:
            workers = dict(self.client.scheduler_info(n_workers=-1)["workers"])
            self._workers_cache = (time.monotonic(), workers)
        return workers

    def workers(self) -> list[WorkerInfo]:
        """Every worker with its device, resources and free slots."""
        from gpunet.devices import DEVICE_RESOURCE
        from gpunet.extensions.worker_plugin import device_info

        scheduler_workers = self._scheduler_workers(fresh=True)
        devices = self.client.run(device_info)
        processing = self.client.processing()
        infos = []
        for address, info in sorted(scheduler_workers.items()):
            resources = dict(info.get("resources") or {})
            slots = int(resources.get(DEVICE_RESOURCE, info.get("nthreads", 1)))
            busy = min(len(processing.get(address, ())), slots)
            infos.append(WorkerInfo(address, str(info.get("name", address)), devices.get(address, {}),
                                    resources, slots, busy))
        return infos

    def capabilities(self, *, refresh: bool = False) -> dict[str, dict[str, Any]]:
        """Each worker's measured capability (``tflops_f32``, ``bandwidth_gbs``, ...),
        by address. Workers not yet measured run the probe now, one at a time, so
        that workers sharing a host do not slow each other's measurement (about a
        second each); the figures are kept on the workers."""
        from gpunet.extensions.worker_plugin import device_info, measure_capability

        devices = self.client.run(device_info)
        for address in sorted(devices):
            if refresh or devices[address].get("capability") is None:
                devices[address] = self.client.run(measure_capability, 1.0, refresh, workers=[address])[address]
        return {address: device["capability"] for address, device in sorted(devices.items())}

    def workers_with(self, *, min_tflops: float) -> list[str]:
        """Addresses of workers whose measured float32 matmul rate is at least
        ``min_tflops``; :class:`PlacementError` naming the best when there is none."""
        capabilities = self.capabilities()
        capable = [address for address, cap in capabilities.items() if cap["tflops_f32"] >= min_tflops]
        if not capable:
            best = max(capabilities.items(), key=lambda item: item[1]["tflops_f32"], default=None)
            offer = (f"the best, {best[0]}, measures {best[1]['tflops_f32']:.3f} TFLOP/s" if best
                     else "no worker is connected")
            raise PlacementError(f"no worker can ever run this: it asks for at least {min_tflops:g} TFLOP/s "
                                 f"(float32 matmul) and {offer}. Ask for less with --min-tflops.")
        return capable

    def resources_for(self, *, gpus: int | None = None, gpu_mem: int | None = None) -> dict[str, float]:
        """The Dask resources a job asks for: one device slot, and GPUs / GPU memory
        when asked. With no ``gpus`` the job runs on any device, GPU or CPU."""
        from gpunet.devices import DEVICE_RESOURCE, GPU_MEMORY_RESOURCE, GPU_RESOURCE

        resources: dict[str, float] = {DEVICE_RESOURCE: 1}
        if gpus is not None:
            if gpus < 1:
                raise PlacementError(f"--gpus must be at least 1, got {gpus}")
            resources[GPU_RESOURCE] = gpus
        if gpu_mem is not None:
            resources.setdefault(GPU_RESOURCE, 1)
            resources[GPU_MEMORY_RESOURCE] = gpu_mem
        return resources

    def check_placement(self, resources: dict[str, float]) -> None:
        """Raise :class:`PlacementError` at once when no worker can ever run a job
        asking for ``resources``, saying what the largest worker has."""
        for fresh in (False, True):
            workers = self._scheduler_workers(fresh=fresh)
            if any(_satisfies(info.get("resources") or {}, resources) for info in workers.values()):
                return
        raise PlacementError(_placement_message(resources, workers))

    def waiting_reason(self, resources: dict[str, float], workers: list[str] | None = None) -> str:
        """Why a job asking for ``resources`` has not started: which workers could run
        it and how many of them are busy."""
        from gpunet.devices import DEVICE_RESOURCE

        infos = self._scheduler_workers(fresh=True)
        fit = [address for address, info in infos.items()
               if _satisfies(info.get("resources") or {}, resources) and (workers is None or address in workers)]
        processing = self.client.processing(fit) if fit else {}
        busy = [address for address in fit
                if len(processing.get(address, ())) >= (infos[address].get("resources") or {}).get(DEVICE_RESOURCE, 1)]
        wanted = _show_resources(resources)
        if not fit:
            return f"waiting for a worker with {wanted} (none is connected now)"
        state = "all busy" if len(busy) == len(fit) else f"{len(busy)} busy"
        if len(fit) == 2 and len(busy) == 2:
            state = "both busy"
        return f"waiting for a worker with {wanted} ({len(fit)} such worker{'s' * (len(fit) != 1)}, {state})"

    # -- running work ------------------------------------------------------------------
    def run(self, fn: Callable[..., Any], *args: Any, gpus: int | None = None, gpu_mem: int | str | None = None,
            min_tflops: float | None = None, timeout: float | None = None, max_credits: float | None = None,
            verify: str | None = None, rtol: float | None = None, atol: float | None = None, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` on a worker and return its result.

        ``gpus`` / ``gpu_mem`` / ``min_tflops`` restrict placement; ``timeout``
        (seconds) stops the call on the worker when it runs longer. The worker's
        stdout is printed here as it runs; an exception is raised here with the
        remote traceback. ``verify`` ("replicate[:K]", "spot[:P]", "adaptive")
        runs it on distinct providers and returns what they agree on, within the
        kernel's tolerance or ``rtol`` / ``atol`` (see :mod:`gpunet.verify`).
        """
        from gpunet import jobs

        job = jobs.function_job(fn, args, kwargs, topic=self.topic)
        workers = None if min_tflops is None else self.workers_with(min_tflops=min_tflops)
        remote = self.submit(job, resources=self.resources_for(gpus=gpus, gpu_mem=_size(gpu_mem)), workers=workers,
                             max_credits=max_credits, timeout=timeout, verify=verify,
                             tolerance=_tolerance(verify, fn, rtol, atol))
        return jobs.function_value(remote.wait(timeout=timeout)[0])

    def map(self, fn: Callable[..., Any], items: Iterable[Any], *, gpus: int | None = None,
            gpu_mem: int | str | None = None, min_tflops: float | None = None, timeout: float | None = None,
            max_credits: float | None = None, placement: str = "any", verify: str | None = None,
            rtol: float | None = None, atol: float | None = None) -> list[Any]:
        """Run ``fn(item)`` for every item, spread over the workers; results in item order.

        ``placement="capability"`` pins item i to the i-th worker of :func:`split`'s
        order (wrapping around), so chunks sized by ``gpunet.split(total, net)``
        finish together on fast and slow workers. ``verify`` / ``rtol`` / ``atol``
        as in :meth:`run`, for every item.
        """
        from gpunet import jobs

        items = list(items)
        if not items:
            return []
        job = jobs.function_job(fn, (), {}, topic=self.topic, announce=False)
        resources = self.resources_for(gpus=gpus, gpu_mem=_size(gpu_mem))
        workers = None if min_tflops is None else self.workers_with(min_tflops=min_tflops)
        options = dict(resources=resources, items=items, max_credits=max_credits, timeout=timeout, verify=verify,
                       tolerance=_tolerance(verify, fn, rtol, atol))
        if placement == "capability":
            order = workers or list(self.capabilities())
            pinned = [[order[index % len(order)]] for index in range(len(items))]
            remote = self.submit(job, workers=pinned, **options)
        elif placement == "any":
            remote = self.submit(job, workers=workers, **options)
        else:
            raise GpunetError(f"placement must be 'any' or 'capability', got {placement!r}")
        return [jobs.function_value(result) for result in remote.wait(timeout=timeout)]

    def split(self, total: int, *, align: int = 1) -> list[int]:
        """Chunk sizes adding up to ``total``, one per worker, proportional to each
        worker's measured float32 matmul rate (order: :meth:`capabilities`)."""
        from gpunet.kernels import weighted_chunks

        capabilities = self.capabilities()
        if not capabilities:
            raise PlacementError("no worker is connected, so there is nothing to split over")
        weights = [cap["tflops_f32"] for cap in capabilities.values()]
        return [chunk.count for chunk in weighted_chunks(total, weights, align=align)]

    def submit(self, job: Any, *, resources: dict[str, float], items: list[Any] | None = None,
               workers: list[str] | list[list[str]] | None = None, max_credits: float | None = None,
               timeout: float | None = None, verify: str | None = None,
               tolerance: Any = None) -> RemoteJob | VerifiedJob:
        """Send ``job`` (once, or once per item) and return its :class:`~gpunet.jobs.RemoteJob`
        (a :class:`~gpunet.verify.VerifiedJob` with ``verify``).

        ``workers`` restricts where it may run: one list for every item, or one
        list per item (``placement="capability"``). On a metered network the job's
        holds are placed first (see :mod:`gpunet.metering`); one that cannot be
        placed refuses the job before anything is sent.
        """
        from gpunet import jobs
        from gpunet.metering import annotation
        from gpunet.verify import Policy, VerificationError, VerifiedJob, tolerance_for

        self._ensure_open()
        if items is not None and not items:
            raise GpunetError("nothing to send: the map has no items")
        policy = Policy.parse(verify)
        self.check_placement(resources)
        if policy.active:
            if workers and isinstance(workers[0], list):
                raise VerificationError("placement='capability' pins items to workers, and verification needs "
                                        "copies on other providers' workers: use one or the other")
            return VerifiedJob.submit(self, job, policy, tolerance or tolerance_for(job.code or job.function),
                                      resources=resources, items=items, workers=workers, max_credits=max_credits,
                                      timeout=timeout)
        if self.meter is None:
            if max_credits is not None:
                raise GpunetError("--max-credits needs a metered network: connect with --credits URL --token TOKEN, "
                                  "or without an address for a local one")
            return jobs.RemoteJob.submit(self, job, resources=resources, items=items, workers=workers)
        count = 1 if items is None else len(items)
        plan = self.meter.plan(count=count, max_credits=max_credits, timeout=timeout, max_rate=self.max_rate())
        if items is None:
            hold = self.meter.hold(job.job_id, count=1, amount=plan.amount)[0]
        else:  # one hold for the whole map, paid out in parts as its items finish
            hold = self.meter.hold_shared(job.job_id, count=count, amount=plan.amount)
        try:
            remote = jobs.RemoteJob.submit(self, job, resources=resources, items=items, workers=workers,
                                           annotations=annotation(hold, plan.amount,
                                                                  tasks=None if items is None else count))
        except BaseException:
            self._release_unsent([hold])
            raise
        remote.holds, remote.credit_limit_s = [hold], plan.limit_s
        return remote

    def _release_unsent(self, holds: list[str]) -> None:
        """Give back holds of a job that was never sent (only the scheduler may release)."""
        from gpunet.extensions.scheduler_plugin import release_holds

        try:
            self.client.run_on_scheduler(release_holds, holds)
        except Exception as exc:  # noqa: BLE001
            logger.warning("gpunet: could not release holds %s of an unsent job: %s", holds, exc)

    def max_rate(self) -> float:
        """The highest rate (credits per device-second) any provider asks (cached)."""
        from gpunet.metering import DEFAULT_RATE

        from gpunet.extensions.scheduler_plugin import metering_state

        stamp, rate = self._rate_cache
        if time.monotonic() - stamp > 5.0:
            state = self.client.run_on_scheduler(metering_state) or {}
            rates = [info["rate"] for info in state.get("providers", {}).values()]
            rate = max(rates + [state.get("default_rate", DEFAULT_RATE)])
            self._rate_cache = (time.monotonic(), rate)
        return rate

    def _register(self, remote: RemoteJob) -> None:
        with self._jobs_lock:
            self._jobs[remote.job.job_id] = remote

    def _forget(self, job_id: str) -> None:
        with self._jobs_lock:
            self._jobs.pop(job_id, None)

    def _on_event(self, event: tuple[float, dict[str, Any]]) -> None:
        """Topic handler (client event loop thread): hand the event to its job."""
        _, message = event
        with self._jobs_lock:
            remote = self._jobs.get(message.get("job"))
        if remote is not None:
            remote.on_event(message)

    def _ensure_open(self) -> None:
        if self._closed:
            raise GpunetError("this network connection is closed; connect again with gpunet.connect() or %gpunet connect")

    # -- shutting down -----------------------------------------------------------------
    def close(self) -> None:
        """Close the client, and stop the embedded network if this connection started it."""
        global _current
        if self._closed:
            return
        self._closed = True
        try:
            self.client.close(timeout=5)
        finally:
            if self.embedded is not None:
                self.embedded.close()
            with _current_lock:
                if _current is self:
                    _current = None


def _tolerance(verify: str | None, work: Any, rtol: float | None, atol: float | None) -> Any:
    """The tolerance for verifying ``work`` (None where nothing is verified)."""
    from gpunet.verify import Policy, VerificationError, tolerance_for

    if not Policy.parse(verify).active:
        if rtol is not None or atol is not None:
            raise VerificationError("rtol / atol are tolerances for comparing verified copies: give verify= too")
        return None
    return tolerance_for(work, rtol=rtol, atol=atol)


def _satisfies(offered: dict[str, float], asked: dict[str, float]) -> bool:
    return all(offered.get(name, 0) >= amount for name, amount in asked.items())


def _show_resources(resources: dict[str, float]) -> str:
    """{"device": 1, "GPU_MEM": 4e10} -> 'GPU_MEM=37.3 GiB, device=1'."""
    from gpunet.devices import GPU_MEMORY_RESOURCE, format_bytes

    parts = []
    for name, amount in sorted(resources.items()):
        parts.append(f"{name}={format_bytes(amount)}" if name == GPU_MEMORY_RESOURCE else f"{name}={amount:g}")
    return ", ".join(parts) or "no resources"


def _placement_message(asked: dict[str, float], workers: dict[str, dict[str, Any]]) -> str:
    show = _show_resources

    if not workers:
        return (f"no worker is connected to this network, so nothing can run a job asking for {show(asked)}; "
                "start workers (gpunet provide SCHEDULER) or connect to another scheduler")
    largest = max(workers.values(), key=lambda info: tuple(
        (info.get("resources") or {}).get(name, 0) for name in sorted(asked)))
    return (f"no worker can ever run this: it asks for {show(asked)}, and the largest of the "
            f"{len(workers)} worker(s) has {show(largest.get('resources') or {})} ({largest.get('name')}). "
            "Ask for less (--gpus / --gpu-mem), or connect to a network with bigger devices.")


def _size(value: int | str | None) -> int | None:
    if value is None or isinstance(value, int):
        return value
    from gpunet.devices import parse_size

    try:
        return parse_size(value)
    except ValueError as exc:
        raise PlacementError(str(exc)) from None


def _kernel_and_notebook() -> tuple[str, str]:
    """This kernel's session id (a fresh id outside a kernel) and the notebook's path
    (``JPY_SESSION_NAME`` where Jupyter sets it)."""
    kernel_session = ""
    try:
        from IPython import get_ipython

        shell = get_ipython()
        kernel = getattr(shell, "kernel", None)
        kernel_session = getattr(getattr(kernel, "session", None), "session", "") or ""
    except ImportError:  # pragma: no cover
        pass
    return kernel_session or uuid.uuid4().hex, os.environ.get("JPY_SESSION_NAME", "")


def _session_id() -> str:
    """An id for an unmetered notebook session."""
    return _kernel_and_notebook()[0]


#: The budget of a notebook session when connect() is given none.
DEFAULT_BUDGET = 10_000


def connect(address: str | None = None, *, workers: int | None = None, credits: str | None = None,
            token: str | None = None, budget: int | None = None, metered: bool = True,
            timeout: float = CONNECT_TIMEOUT_S) -> Network:
    """Connect to a gpunet network and make it :func:`current`.

    ``address`` (or ``GPUNET_SCHEDULER``) joins that scheduler; with neither, an
    embedded network starts in the background (``workers`` CPU workers where there
    is no GPU, default 2) with its own credit service and a funded local account,
    unless ``metered=False``. ``credits`` / ``token`` (or ``GPUNET_CREDITS`` /
    ``GPUNET_TOKEN``) name the credit service and this notebook's account on a
    shared network; ``budget`` caps this notebook session (default
    :data:`DEFAULT_BUDGET` credits). Raises :class:`ConnectError` naming the address
    when the scheduler or the credit service cannot be reached.
    """
    global _current
    from distributed import Client

    address = address or os.environ.get("GPUNET_SCHEDULER") or None
    credits = credits or os.environ.get("GPUNET_CREDITS") or None
    token = token or os.environ.get("GPUNET_TOKEN") or None
    if address is not None and workers is not None:
        raise GpunetError(f"workers={workers} only sizes a local network; {address} already has its own workers "
                          "(connect without --workers, or without an address)")
    if budget is not None and budget < 1:
        raise GpunetError(f"a session's budget must be at least 1 credit, got {budget}")
    if (credits is None) != (token is None) and not (address is None and token is None):
        raise GpunetError("a credit service needs both its URL (--credits / GPUNET_CREDITS) and this notebook's "
                          "token (--token / GPUNET_TOKEN)")
    embedded = None
    if address is None:
        embedded = EmbeddedNetwork(n_workers=workers, credits=metered and credits is None)
        address = embedded.scheduler_address
        if embedded.credits_service is not None:
            credits, token = embedded.credits_url, embedded.client_token
    try:
        client = Client(address, timeout=timeout, set_as_default=False)
    except (OSError, TimeoutError) as exc:
        if embedded is not None:
            embedded.close()
        raise ConnectError(
            f"cannot reach the scheduler at {address} within {timeout:g} s ({exc.__class__.__name__}). "
            "Check the address and that `gpunet up` or `gpunet scheduler` runs there; "
            "with no address, `%gpunet connect` starts a local network.",
            address=address,
        ) from None
    try:
        from gpunet.extensions.worker_plugin import GpunetWorkerPlugin

        client.register_plugin(GpunetWorkerPlugin())
        meter = _open_meter(client, credits, token, budget) if credits is not None else None
        network = Network(client, embedded=embedded, meter=meter)
    except BaseException:
        client.close()
        if embedded is not None:
            embedded.close()
        raise
    with _current_lock:
        previous, _current = _current, network
    if previous is not None:
        previous.close()
    return network


def _open_meter(client: Client, url: str, token: str, budget: int | None) -> Meter:
    """Check that the scheduler meters work, then open this notebook's session."""
    from gpunet.credits import CreditClient
    from gpunet.extensions.scheduler_plugin import metering_state
    from gpunet.metering import Meter

    state = client.run_on_scheduler(metering_state)
    if state is None:
        raise GpunetError(
            f"the scheduler at {client.scheduler.address} does not meter work, so credits at {url} would never be "
            "settled; start it with `gpunet scheduler --credits URL --operator-token-file FILE`, or connect "
            "without --credits"
        )
    credits = CreditClient(url, token)
    kernel, notebook = _kernel_and_notebook()
    session = credits.open_session(int(budget or DEFAULT_BUDGET), notebook=notebook, kernel=kernel)
    return Meter(credits, session)


def current() -> Network:
    """The network the magics use (the last one :func:`connect` made)."""
    if _current is None:
        raise GpunetError("not connected to a gpunet network: run `%gpunet connect` or gpunet.connect() first")
    return _current


def map(fn: Callable[..., Any], items: Iterable[Any], **options: Any) -> list[Any]:  # noqa: A001 - the API name
    """``current().map(fn, items, ...)``: run ``fn`` on every item over the network."""
    return current().map(fn, items, **options)


def split(total: int, net: Network | None = None, *, align: int = 1) -> list[int]:
    """Capability-weighted chunk sizes of ``total`` over ``net``'s workers (default:
    :func:`current`): a worker twice as fast gets twice the work."""
    return (net or current()).split(total, align=align)
