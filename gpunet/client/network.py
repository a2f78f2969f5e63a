"""The connection to a gpunet network: a Dask scheduler and the workers behind it.

:func:`connect` joins a scheduler (an address, or ``GPUNET_SCHEDULER``) or, with
neither, starts an embedded network in the background (:mod:`gpunet.client.local`).
A :class:`Network` is what the magics and the Python API use: it places and sends
jobs (:mod:`gpunet.client.placement`, :mod:`gpunet.client.submit`), hands each
job's handle its live events, and reaches the scheduler plugin through its named
handlers (:meth:`Network.call_scheduler`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from distributed import Client

from gpunet import wire
from gpunet.client import placement
from gpunet.client.cells import CellRun, run_cell
from gpunet.client.local import EmbeddedNetwork
from gpunet.client.submit import function_job, function_value, submit
from gpunet.credits import CreditClient
from gpunet.errors import ConnectError, GpunetError, PlacementError
from gpunet.kernels import weighted_chunks
from gpunet.metering.meter import DEFAULT_RATE, Meter
from gpunet.provenance import Recorder, finish_record, in_notebook
from gpunet.verify.quorum import tolerance_if_verified
from gpunet.wire import DEVICE_RESOURCE
from gpunet.worker.device import device_info, measure_capability

if TYPE_CHECKING:  # pragma: no cover
    from gpunet.client.handle import JobHandle
    from gpunet.kernels import Tolerance
    from gpunet.verify.quorum import Policy
    from gpunet.wire import Job

logger = logging.getLogger(__name__)

#: Seconds to wait for a scheduler before saying it cannot be reached.
CONNECT_TIMEOUT_S = 5.0
#: How long a finished job's small result stays wanted at most (see Network.release_soon).
RELEASE_AFTER_S = 0.1


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
        # an unmetered session's id is this kernel's session id
        self.session = meter.session if meter is not None else _kernel_and_notebook()[0]
        #: the scheduler's address
        self.address = client.scheduler.address
        self.topic = f"gpunet-events-{uuid.uuid4().hex[:12]}"
        self._jobs: dict[str, JobHandle] = {}
        self._jobs_lock = threading.Lock()
        self._workers_cache: tuple[float, dict[str, dict[str, Any]]] = (0.0, {})
        self._rate_cache: tuple[float, float] = (0.0, 1.0)
        self._finished_futures: list[Any] = []
        self._finished_generation = 0
        self.client.subscribe_topic(self.topic, self._on_event)
        self._closed = False

    # -- identity ----------------------------------------------------------------------
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
    def scheduler_workers(self, *, fresh: bool = False) -> dict[str, dict[str, Any]]:
        """Workers as the scheduler reports them (cached for a second: cells are hot)."""
        stamp, workers = self._workers_cache
        if fresh or time.monotonic() - stamp > 1.0:
            workers = dict(self.client.scheduler_info(n_workers=-1)["workers"])
            self._workers_cache = (time.monotonic(), workers)
        return workers

    def workers(self) -> list[WorkerInfo]:
        """Every worker with its device, resources and free slots."""
        scheduler_workers = self.scheduler_workers(fresh=True)
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
        devices = self.client.run(device_info)
        for address in sorted(devices):
            if refresh or devices[address].get("capability") is None:
                devices[address] = self.client.run(measure_capability, 1.0, refresh, workers=[address])[address]
        return {address: device["capability"] for address, device in sorted(devices.items())}

    def workers_with(self, *, min_tflops: float) -> list[str]:
        """Addresses of workers whose measured float32 matmul rate is at least
        ``min_tflops``; :class:`PlacementError` naming the best when there is none."""
        return placement.capable_workers(self.capabilities(), min_tflops=min_tflops)

    @staticmethod
    def resources_for(*, gpus: int | None = None, gpu_mem: int | str | None = None) -> dict[str, float]:
        """The Dask resources a job asks for (see :func:`gpunet.client.placement.resources_for`)."""
        return placement.resources_for(gpus=gpus, gpu_mem=gpu_mem)

    def check_placement(self, resources: dict[str, float]) -> None:
        """Raise :class:`PlacementError` at once when the connected workers can never
        run a job asking for ``resources``, saying what the largest worker has. With
        no worker connected at all (workers restarting, a provider reconnecting) the
        job is sent and waits for one, saying so, up to its timeout."""
        for fresh in (False, True):
            workers = self.scheduler_workers(fresh=fresh)
            if workers and placement.can_ever_run(resources, workers):
                return
        if not workers:
            logger.warning("gpunet: no worker is connected to %s now; the job waits for one (up to its "
                           "--timeout)", self.address)
            return
        raise PlacementError(placement.never_runs_message(resources, workers))

    def waiting_reason(self, resources: dict[str, float], workers: list[str] | None = None) -> str:
        """Why a job asking for ``resources`` has not started: which workers could run
        it and how many of them are busy."""
        infos = self.scheduler_workers(fresh=True)
        return placement.waiting_reason(resources, infos, self.client.processing(list(infos)) if infos else {},
                                        workers)

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
        job = function_job(fn, args, kwargs, topic=self.topic)
        workers = None if min_tflops is None else self.workers_with(min_tflops=min_tflops)
        remote = self.submit(job, resources=placement.resources_for(gpus=gpus, gpu_mem=gpu_mem), workers=workers,
                             max_credits=max_credits, timeout=timeout, verify=verify,
                             tolerance=tolerance_if_verified(verify, fn, rtol=rtol, atol=atol))
        self.sent()
        recorder = self._recorder(fn, {"args": list(args), "kwargs": kwargs}, "run", gpus=gpus, gpu_mem=gpu_mem,
                                  min_tflops=min_tflops, timeout=timeout, max_credits=max_credits, verify=verify,
                                  rtol=rtol, atol=atol)
        results = remote.wait(timeout=timeout)
        value = function_value(results[0])
        finish_record(recorder, remote, results, {"value": value}, show=True)
        return value

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
        items = list(items)
        if not items:
            return []
        if placement not in ("any", "capability"):
            raise GpunetError(f"placement must be 'any' or 'capability', got {placement!r}")
        job = function_job(fn, (), {}, topic=self.topic, announce=False)
        resources = self.resources_for(gpus=gpus, gpu_mem=gpu_mem)
        workers = None if min_tflops is None else self.workers_with(min_tflops=min_tflops)
        if placement == "capability":  # item i pinned to the i-th worker
            order = workers or list(self.capabilities())
            workers = [[order[index % len(order)]] for index in range(len(items))]
        remote = self.submit(job, resources=resources, items=items, workers=workers, max_credits=max_credits,
                             timeout=timeout, verify=verify, tolerance=tolerance_if_verified(verify, fn, rtol=rtol, atol=atol))
        recorder = self._recorder(fn, {"items": items}, "map", gpus=gpus, gpu_mem=gpu_mem, min_tflops=min_tflops,
                                  timeout=timeout, max_credits=max_credits, placement=placement, verify=verify,
                                  rtol=rtol, atol=atol)
        results = remote.wait(timeout=timeout)
        values = [function_value(result) for result in results]
        finish_record(recorder, remote, results, {"value": values}, show=True)
        return values

    @staticmethod
    def _recorder(fn: Callable[..., Any], arguments: dict[str, Any], kind: str, **flags: Any) -> Recorder | None:
        """The provenance recorder of a call made from a notebook (None elsewhere:
        a script's calls leave no record to keep)."""
        if not in_notebook():
            return None
        flags = {name: value for name, value in flags.items() if value not in (None, "any")}
        return Recorder.start(Recorder.for_call, fn, arguments, flags=flags, kind=kind)

    def run_cell(self, code: str, namespace: dict[str, Any], **options: Any) -> CellRun:
        """Run a cell's ``code`` on a worker with its inputs from ``namespace`` and land
        its outputs there, as ``%%gpunet`` does; see :func:`gpunet.client.cells.run_cell`."""
        return run_cell(self, code, namespace, **options)

    def split(self, total: int, *, align: int = 1) -> list[int]:
        """Chunk sizes adding up to ``total``, one per worker, proportional to each
        worker's measured float32 matmul rate (order: :meth:`capabilities`)."""
        capabilities = self.capabilities()
        if not capabilities:
            raise PlacementError("no worker is connected, so there is nothing to split over")
        weights = [cap["tflops_f32"] for cap in capabilities.values()]
        return [chunk.count for chunk in weighted_chunks(total, weights, align=align)]

    def submit(self, job: Job, *, resources: dict[str, float], items: list[Any] | None = None,
               workers: list[str] | list[list[str]] | None = None, max_credits: float | None = None,
               timeout: float | None = None, verify: str | Policy | None = None,
               tolerance: Tolerance | None = None) -> JobHandle:
        """Send ``job`` (once, or once per item) and return its handle; see
        :func:`gpunet.client.submit.submit`."""
        if self._closed:
            raise GpunetError("this network connection is closed; connect again with gpunet.connect() or %gpunet connect")
        return submit(self, job, resources=resources, items=items, workers=workers, max_credits=max_credits,
                      timeout=timeout, verify=verify, tolerance=tolerance)

    # -- the scheduler plugin's named handlers ----------------------------------------------
    def call_scheduler(self, handler: str, **kwargs: Any) -> Any:
        """Call one of the named handlers the scheduler plugin serves (:mod:`gpunet.wire`)."""
        return self.client.sync(getattr(self.client.scheduler, handler), **kwargs)

    def metering_state(self) -> dict[str, Any] | None:
        """Whether the scheduler meters work, how far its reports have got, and the
        providers' rates; None where the scheduler does not meter."""
        return _metering_state(self.client)

    def release_unsent(self, holds: list[str]) -> None:
        """Give back holds of a job that was never sent (only the scheduler may release)."""
        try:
            self.call_scheduler(wire.RELEASE_HOLDS, holds=holds)
        except Exception as exc:  # noqa: BLE001
            logger.warning("gpunet: could not release holds %s of an unsent job: %s", holds, exc)

    def max_rate(self) -> float:
        """The highest rate (credits per device-second) any provider asks (cached)."""
        stamp, rate = self._rate_cache
        if time.monotonic() - stamp > 5.0:
            state = self.metering_state() or {}
            rates = [info["rate"] for info in state.get("providers", {}).values()]
            rate = max(rates + [state.get("default_rate", DEFAULT_RATE)])
            self._rate_cache = (time.monotonic(), rate)
        return rate

    def release_soon(self, futures: list[Any]) -> None:
        """Let Dask forget a finished job's futures soon: once the next job is sent, or
        after :data:`RELEASE_AFTER_S` if none is. Forgetting them at once puts a message
        on the worker's batched stream just before the next cell's task, which the stream
        then holds back (measured: about 5 ms a cell); keeping them long would let Dask
        run a finished cell again, unpaid, if the worker holding its result died."""
        self._finished_futures = futures
        self._finished_generation += 1
        generation = self._finished_generation  # the timer must not keep the futures alive itself
        self.client.loop.add_callback(self.client.loop.call_later, RELEASE_AFTER_S, self._forget_finished, generation)

    def _forget_finished(self, generation: int) -> None:
        if generation == self._finished_generation:
            self._finished_futures = []

    def sent(self) -> None:
        """A job's tasks were sent: the previous job's results may be forgotten now."""
        self._finished_futures = []

    # -- jobs and their events -------------------------------------------------------------
    def register_job(self, handle: JobHandle) -> None:
        """Hand ``handle`` its job's topic events from now on (before its first task is sent)."""
        with self._jobs_lock:
            self._jobs[handle.job.job_id] = handle

    def forget_job(self, job_id: str) -> None:
        """Stop handing job ``job_id`` its events."""
        with self._jobs_lock:
            self._jobs.pop(job_id, None)

    def _on_event(self, event: tuple[float, dict[str, Any]]) -> None:
        """Topic handler (client event loop thread): hand the event to its job."""
        _, message = event
        with self._jobs_lock:
            remote = self._jobs.get(message.get("job"))
        if remote is not None:
            remote.on_event(message)

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


def _metering_state(client: Client) -> dict[str, Any] | None:
    """The metering plugin's state; None where the scheduler runs none (it then has no
    such handler: Dask answers None, and logs that on the scheduler)."""
    return client.sync(getattr(client.scheduler, wire.METERING_STATE))


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
    if _metering_state(client) is None:
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
