"""The connection to a gpunet network: a Dask scheduler and the workers behind it.

:func:`connect` joins a scheduler (an address, or ``GPUNET_SCHEDULER``) or, with
neither, starts an embedded network in the background (:mod:`gpunet.client.local`).
A :class:`Network` is what the magics and the Python API use: it places and sends
jobs (:mod:`gpunet.client.placement`, :mod:`gpunet.client.submit`), hands each
job's handle its live events, and reaches the scheduler plugin through its named
handlers (:meth:`Network.call_scheduler`).
"""

from __future__ import annotations

import ast
import contextlib
import atexit
import logging
import math
import os
import secrets
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from distributed import Client

from gpunet import packages, wire
from gpunet.client import data_comm, placement
from gpunet.client.cells import CellRun, run_cell, stopped_by_ctrl_c
from gpunet.client.gateway_link import (
    GATEWAY_PROTOCOL,
    REQUEST_TIMEOUT_S,
    GatewayJob,
    GatewayLink,
    check_gateway_protocol,
    first_event,
    gateway_ca,
    job_request,
)
from gpunet.client.local import EmbeddedNetwork
from gpunet.client.reused import reuse_allowed
from gpunet.codec import clean_text
from gpunet.client.submit import function_job, function_value, submit
from gpunet.credits import CreditClient
from gpunet.errors import ConnectError, GpunetError, OptionError, PlacementError
from gpunet.kernels import weighted_chunks
from gpunet.metering.meter import DEFAULT_RATE, Meter, WorkerTally, default_timeout
from gpunet.provenance import Recorder, finish_record, in_notebook
from gpunet.ui.status import NetworkStatus, WorkerInfo, provider_device
from gpunet.verify.quorum import Policy, tolerance_if_verified
from gpunet.wire import DEVICE_RESOURCE, session_digest
from gpunet.worker.device import device_info, measure_capability
from gpunet.worker.runner import end_session

if TYPE_CHECKING:  # pragma: no cover
    from gpunet.client.handle import JobHandle
    from gpunet.kernels import Tolerance
    from gpunet.wire import Job

logger = logging.getLogger(__name__)

#: Seconds to wait for a scheduler before saying it cannot be reached.
CONNECT_TIMEOUT_S = 5.0
#: How long placement waits for workers still registering their provider's price.
PRICE_WAIT_S = 10.0
#: How long a finished job's small result stays wanted at most (see Network.release_soon).
RELEASE_AFTER_S = 0.1


def _wait_or_say_cancelled(remote: JobHandle, wait_s: float | None) -> list[Any]:
    """Wait for a ``net.run`` / ``net.map`` job; Ctrl-C (which stops it on its workers)
    becomes one line and a bare ``KeyboardInterrupt``, as in a cell."""
    try:
        return remote.wait(timeout=wait_s)
    except KeyboardInterrupt:
        raise stopped_by_ctrl_c(remote) from None


_current: Network | None = None
_current_lock = threading.RLock()


def _last_user_leaves(net: Any, force: bool) -> bool:
    """Count one user of ``net`` out (every user with ``force``); True when the network
    should close now (its last user left), after which it is no longer the current one."""
    global _current
    with _current_lock:
        if net._closed:
            return False
        net._users = 0 if force else net._users - 1
        if net._users > 0:
            return False
        net._closed = True
        if _current is net:
            _current = None
    return True


#: every network not yet closed, closed quietly when the interpreter exits
_open_networks: weakref.WeakSet[Network] = weakref.WeakSet()


class Network:
    """A connection to a gpunet network; what the magics and the Python API use.

    ``client`` is its :class:`distributed.Client`, ``credits`` its credit client
    (None while no credit service is connected), ``session`` this notebook session's
    id. Use it as a context manager, or call :meth:`close`.
    """

    def __init__(self, client: Client, *, embedded: EmbeddedNetwork | None = None,
                 meter: Meter | None = None, result_format: str = wire.PICKLE,
                 max_result_bytes: int = wire.DEFAULT_MAX_RESULT_BYTES,
                 max_stream_bytes_per_s: int = wire.DEFAULT_MAX_STREAM_BYTES_PER_S,
                 address: str | None = None, max_rate: float | None = None, pip: Iterable[str] | None = ()) -> None:
        self.client = client
        #: ``--pip`` requirements every job of this session asks for (gpunet.packages)
        self.pins = list(pip or ())
        #: what this session's jobs asked of providers' environments, by name (``%gpunet env``)
        self.sent_requirements: dict[str, str] = {}
        self._environments_cache: tuple[float, dict[str, dict[str, Any]] | None] = (0.0, None)
        self.embedded = embedded
        self.meter = meter
        #: how results come back: wire.PICKLE from the embedded network or providers the
        #: notebook trusts, wire.CODEC (data only, see gpunet.codec) from any other
        self.result_format = result_format
        #: a CODEC job's caps: its result, and its output text per second run
        self.max_result_bytes = max_result_bytes
        self.max_stream_bytes_per_s = max_stream_bytes_per_s
        self.credits = meter.credits if meter is not None else None
        # an unmetered session's id is this kernel's session id
        self.session = meter.session if meter is not None else _kernel_and_notebook()[0]
        #: the scheduler's address
        self.address = address or client.scheduler.address
        self.topic = f"gpunet-events-{uuid.uuid4().hex[:12]}"
        #: names this connection's sandbox on each provider's worker (Job.session); secret,
        #: so that no other notebook can send cells into it
        self.session_secret = secrets.token_hex(16)
        self._jobs: dict[str, JobHandle] = {}
        self._jobs_lock = threading.Lock()
        self._workers_cache: tuple[float, dict[str, dict[str, Any]]] = (0.0, {})
        self._rates_cache: tuple[float, dict[str, Any], dict[str, float]] = (0.0, {}, {})
        self._finished_futures: list[Any] = []
        self._finished_generation = 0
        self.client.subscribe_topic(self.topic, self._on_event)
        self._closed = False
        state = self.metering_state() if meter is not None else None
        #: this session's price limit, credits per device-second: only providers at or below it
        #: run its jobs, and holds are priced at it (a job's max_rate= / --max-rate overrides it);
        #: by default the one the operator configured (`gpunet scheduler --default-max-rate`)
        self.rate_limit = placement.check_max_rate(max_rate) if max_rate is not None else _default_rate(state)
        if meter is not None:  # the session's pre-authorized hold, placed now and refilled in the background
            meter.preauthorize()
            self._prepare_verified(meter, state)
            meter.start_refilling(self.release_unsent, self.preauth_state)
        #: how many connect() calls handed this network out and have not closed it
        self._users = 1
        _open_networks.add(self)

    def _prepare_verified(self, meter: Meter, state: dict[str, Any] | None) -> None:
        """Where the network has providers enough to verify, place now what the session's
        first verified job needs from the credit service (its copies' holds, the providers'
        trust records), so that it sends with no request there on its path; on failure that
        job asks for them itself."""
        providers = {info.get("provider") for info in ((state or {}).get("providers") or {}).values()}
        if len(providers - {None}) < 2:
            return
        amount = meter.plan(count=1, max_credits=None, timeout=None, max_rate=self.rate_limit).amount
        try:
            meter.prepare_verified(amount)
        except Exception as exc:  # noqa: BLE001 - the session works without them
            logger.warning("gpunet: the holds for a first verified job could not be placed ahead (%s); it places "
                           "them when it is sent", exc)

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
        return f"<gpunet.Network {self.address} session={self.session} results={self.result_format}>"

    #: whether the scheduler's table of verified results is asked from here (through a gateway the gateway asks it)
    reuses_results = True
    #: whether a job's data is scattered for the workers to fetch from each other (see
    #: gpunet.client.handle.Connection)
    scatters = True
    #: the gateway this network is reached through (None: a Dask client of its own)
    gateway: str | None = None

    @property
    def metered(self) -> bool:
        """Whether this network's jobs are paid for from a credit session."""
        return self.meter is not None

    @property
    def trusts_providers(self) -> bool:
        """Whether results come back pickled (any object), not as data only."""
        return self.result_format == wire.PICKLE

    @property
    def session_meter(self) -> Any:
        """What ``%gpunet usage`` and ``%gpunet receipt`` read this session's credits from:
        its :class:`Meter` (None: not metered); through a gateway, :class:`GatewaySpending`."""
        return self.meter

    def _repr_html_(self) -> str:
        """In a notebook: the scheduler, its dashboard link, the workers with their devices and
        providers, and this session's credits (``%gpunet status``), as Dask's ``Client`` shows itself."""
        return NetworkStatus.of(self)._repr_html_()

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
            resources = {clean_text(name)[:64]: value for name, value in resources.items()
                         if isinstance(value, (int, float)) and math.isfinite(value)}
            infos.append(WorkerInfo(clean_text(address)[:200], clean_text(info.get("name", address))[:200],
                                    provider_device(devices.get(address)), resources, slots, busy))
        return infos

    def capabilities(self, *, refresh: bool = False) -> dict[str, dict[str, Any]]:
        """Each worker's measured capability (``tflops_f32``, ``bandwidth_gbs``, ...),
        by address. Workers not yet measured run the probe now, one at a time, so
        that workers sharing a host do not slow each other's measurement (about a
        second each); the figures are kept on the workers."""
        devices = {address: provider_device(device) for address, device in self.client.run(device_info).items()}
        for address in sorted(devices):
            if refresh or devices[address].get("capability") is None:
                measured = self.client.run(measure_capability, 1.0, refresh, workers=[address])[address]
                devices[address] = provider_device(measured)
        for address in sorted(address for address, device in devices.items() if device.get("capability") is None):
            logger.warning("gpunet: worker %s reported a missing, malformed or implausible capability; it is "
                           "counted as not measured", clean_text(address))
        return {address: device["capability"] for address, device in sorted(devices.items())
                if device.get("capability") is not None}

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

    def environment_reports(self, *, fresh: bool = False) -> dict[str, dict[str, Any]] | None:
        """Each provider's worker -> what its provider says is installed there (a claim:
        see :mod:`gpunet.packages`); None where the scheduler keeps no reports (no gpunet
        scheduler plugin: its workers share the notebook's environment). Cached for a second."""
        stamp, reports = self._environments_cache
        if fresh or time.monotonic() - stamp > 1.0:
            try:
                reports = self.call_scheduler(wire.ENVIRONMENTS)
            except Exception as exc:  # noqa: BLE001 - a scheduler without gpunet's plugin has no such handler
                logger.debug("gpunet: the scheduler keeps no environment reports (%s)", exc)
                reports = None
            self._environments_cache = (time.monotonic(), reports)
        return reports

    def environment_of(self, job: Job, pip: Iterable[str] = ()) -> packages.CellEnvironment:
        """What ``job`` asks of a worker's environment: its imports at this notebook's
        versions, with this session's and ``pip``'s requirements."""
        pins = [*self.pins, *pip]
        if job.code is not None:
            return packages.for_code(job.code, pins)
        return packages.for_function(job.function, pins) if job.function is not None else packages.resolve((), pins)

    def place_packages(self, job: Job, resources: dict[str, float], workers: list[str] | list[list[str]] | None,
                       pip: Iterable[str] = ()) -> list[str] | list[list[str]] | None:
        """Restrict ``workers`` to those whose environment meets ``job``'s packages (or
        that install them), set ``job.requirements`` for them, and return the new
        restriction; :class:`~gpunet.errors.PackageError` before anything is sent when
        no provider can. Where no worker reports an environment (the embedded network, a
        private one's plain workers) nothing changes: they share the notebook's."""
        environment = self.environment_of(job, pip)
        self.sent_requirements.update(environment.requirements)
        reports = self.environment_reports()
        if not reports:
            return workers
        per_item = bool(workers) and isinstance(workers[0], list)
        allowed = None if workers is None or per_item else set(workers)

        def candidates(fresh: bool) -> list[str]:
            return [address for address, info in self.scheduler_workers(fresh=fresh).items()
                    if placement.satisfies(info.get("resources") or {}, resources)
                    and (allowed is None or address in allowed)]

        fitting = candidates(False)
        if any(address not in reports for address in fitting):
            # a worker without a report shares the notebook's environment, or it just left
            # and the cached list still has it: look again, at the workers and their reports
            # at once, so that a cell is never pinned to a worker that is gone
            reports = self.environment_reports(fresh=True) or {}
            fitting = candidates(True)
        chosen = packages.place(environment, reports, fitting)
        job.requirements = dict(environment.requirements)
        job.session = job.session or self.session  # one environment per session on each worker
        if chosen.workers is None:
            return workers
        if per_item:
            narrowed = [[address for address in item if address in chosen.workers] for item in workers]
            if not all(narrowed):
                raise PlacementError("placement='capability' pins items to workers whose providers lack the packages "
                                     f"the function needs; {packages.refusal(environment, reports, candidates)}")
            return narrowed
        return chosen.workers

    def waiting_reason(self, resources: dict[str, float], workers: list[str] | None = None) -> str:
        """Why a job asking for ``resources`` has not started: which workers could run
        it and how many of them are busy."""
        infos = self.scheduler_workers(fresh=True)
        return placement.waiting_reason(resources, infos, self.client.processing(list(infos)) if infos else {},
                                        workers)

    # -- running work ------------------------------------------------------------------
    def timeout_for(self, timeout: float | None, *, count: int = 1, max_credits: float | None = None,
                    max_rate: float | None = None) -> float:
        """``timeout``, or where none was given the device time the job's hold covers
        (:func:`gpunet.metering.meter.default_timeout`): a cell 60 s, a map 10 s per item;
        with ``max_credits``, that many credits' time at the job's price limit."""
        if timeout is not None:
            if not timeout > 0:
                raise OptionError(f"--timeout must be a positive number of seconds, got {timeout:g}")
            return timeout
        return default_timeout(count, max_credits=max_credits, max_rate=self.hold_rate(max_rate))

    def run(self, fn: Callable[..., Any], *args: Any, gpus: int | None = None, gpu_mem: int | str | None = None,
            min_tflops: float | None = None, timeout: float | None = None, max_credits: float | None = None,
            verify: str | None = None, rtol: float | None = None, atol: float | None = None,
            max_rate: float | None = None, prefer: str = "cheapest", **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` on a worker and return its result.

        ``gpus`` / ``gpu_mem`` / ``min_tflops`` restrict placement; ``timeout``
        (seconds, default: what the call's hold covers, 60 s) stops the call on the
        worker when it runs longer. The worker's
        stdout is printed here as it runs; an exception is raised here with the
        remote traceback. ``verify`` ("replicate[:K]", "spot[:P]", "adaptive")
        runs it on distinct providers and returns what they agree on, within the
        kernel's tolerance or ``rtol`` / ``atol`` (see :mod:`gpunet.verify`).
        ``max_rate`` (credits per device-second) is this call's price limit instead of
        the session's: only providers at or below it run it, and its hold is priced at
        it; ``prefer`` ("cheapest", the default, or "fastest") picks among those free.
        """
        job = function_job(fn, args, kwargs, topic=self.topic)
        wait_s = self.timeout_for(timeout, max_credits=max_credits, max_rate=max_rate)
        workers = None if min_tflops is None else self.workers_with(min_tflops=min_tflops)
        remote = self.submit(job, resources=placement.resources_for(gpus=gpus, gpu_mem=gpu_mem), workers=workers,
                             max_credits=max_credits, timeout=timeout, verify=verify,
                             tolerance=tolerance_if_verified(verify, fn, rtol=rtol, atol=atol), max_rate=max_rate,
                             prefer=prefer)
        self.sent()
        recorder = self._recorder(fn, {"args": list(args), "kwargs": kwargs}, "run", gpus=gpus, gpu_mem=gpu_mem,
                                  min_tflops=min_tflops, timeout=timeout, max_credits=max_credits, verify=verify,
                                  rtol=rtol, atol=atol, max_rate=max_rate)
        results = _wait_or_say_cancelled(remote, wait_s)
        value = function_value(results[0])
        finish_record(recorder, remote, results, {"value": value}, show=True)
        return value

    def map(self, fn: Callable[..., Any], items: Iterable[Any], *, gpus: int | None = None,
            gpu_mem: int | str | None = None, min_tflops: float | None = None, timeout: float | None = None,
            max_credits: float | None = None, placement: str = "any", verify: str | None = None,
            rtol: float | None = None, atol: float | None = None, max_rate: float | None = None) -> list[Any]:
        """Run ``fn(item)`` for every item, spread over the workers; results in item order.

        ``placement="capability"`` pins item i to the i-th worker of :func:`split`'s
        order (wrapping around), so chunks sized by ``gpunet.split(total, net)``
        finish together on fast and slow workers. ``verify`` / ``rtol`` / ``atol``
        / ``max_rate`` as in :meth:`run`, for every item (items spread over every
        provider within the price limit).
        """
        items = list(items)
        if not items:
            return []
        if placement not in ("any", "capability"):
            raise GpunetError(f"placement must be 'any' or 'capability', got {placement!r}")
        job = function_job(fn, (), {}, topic=self.topic, announce=False)
        wait_s = self.timeout_for(timeout, count=len(items), max_credits=max_credits, max_rate=max_rate)
        resources = self.resources_for(gpus=gpus, gpu_mem=gpu_mem)
        workers = None if min_tflops is None else self.workers_with(min_tflops=min_tflops)
        if placement == "capability":  # item i pinned to the i-th worker
            order = workers or list(self.capabilities())
            workers = [[order[index % len(order)]] for index in range(len(items))]
        remote = self.submit(job, resources=resources, items=items, workers=workers, max_credits=max_credits,
                             timeout=timeout, verify=verify, tolerance=tolerance_if_verified(verify, fn, rtol=rtol, atol=atol),
                             max_rate=max_rate)
        recorder = self._recorder(fn, {"items": items}, "map", gpus=gpus, gpu_mem=gpu_mem, min_tflops=min_tflops,
                                  timeout=timeout, max_credits=max_credits, placement=placement, verify=verify,
                                  rtol=rtol, atol=atol, max_rate=max_rate)
        results = _wait_or_say_cancelled(remote, wait_s)
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
               tolerance: Tolerance | None = None, max_rate: float | None = None,
               prefer: str = "cheapest", pip: Iterable[str] = (), reuse: bool = False) -> JobHandle:
        """Send ``job`` (once, or once per item) and return its handle; see
        :func:`gpunet.client.submit.submit`. On a metered network it runs only on
        providers at or below its price limit (``max_rate``, else the session's),
        a single task on the ``prefer``-red one of those free now (:meth:`priced_workers`),
        among the workers whose environment meets its packages, with the ``pip`` requirements
        (:meth:`place_packages`). ``reuse`` is for a gateway's network (a verified result it
        keeps may answer the job); a Dask client's cell asked the reuse table before
        (:func:`gpunet.client.reused.reused_result`)."""
        if self._closed:
            raise GpunetError("this network connection is closed; connect again with gpunet.connect() or %gpunet connect")
        job.session = self.session_secret
        self.check_placement(resources)
        # first the workers whose environment meets the job's packages, then the price among those
        workers = self.place_packages(job, resources, workers, pip)
        workers = self.priced_workers(resources, workers, single=items is None and not Policy.parse(verify).active,
                                      max_rate=max_rate, prefer=prefer)
        return submit(self, job, resources=resources, items=items, workers=workers, max_credits=max_credits,
                      timeout=timeout, verify=verify, tolerance=tolerance, max_rate=self.hold_rate(max_rate))

    # -- the scheduler plugin's named handlers ----------------------------------------------
    def call_scheduler(self, handler: str, **kwargs: Any) -> Any:
        """Call one of the named handlers the scheduler plugin serves (:mod:`gpunet.wire`); one
        about this session's own holds, tasks or maps names this session's Dask client
        (:data:`gpunet.wire.CALLER_NAMED`), never another."""
        if handler in wire.CALLER_NAMED:
            kwargs["client"] = self.client.id
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

    def preauth_state(self, holds: list[str], jobs: list[str]) -> dict[str, Any]:
        """What the scheduler paid so far from the session's pre-authorized ``holds``, in all
        and for each of ``jobs`` (see :meth:`gpunet.metering.meter.Meter.look_at_paid`)."""
        return self.call_scheduler(wire.PREAUTH_STATE, holds=holds, jobs=jobs)

    def hold_rate(self, max_rate: float | None = None) -> float:
        """The price per device-second a hold uses: the notebook's limit (the job's
        ``max_rate`` / ``--max-rate``, else this session's :attr:`rate_limit`), never the
        rate of the most expensive provider on the network: only providers at or below
        the limit run the job, so it never costs more than that a second."""
        return placement.check_max_rate(max_rate) if max_rate is not None else self.rate_limit

    def worker_rates(self, *, fresh: bool = False) -> tuple[dict[str, Any], dict[str, float]]:
        """The scheduler's metering state and the rate each worker's provider asks
        (:func:`gpunet.client.placement.worker_rates`), cached for 5 s (cells are hot)."""
        stamp, state, rates = self._rates_cache
        if fresh or time.monotonic() - stamp > 5.0:
            state = self.metering_state() or {}
            rates = placement.worker_rates(self.scheduler_workers(fresh=fresh), state)
            self._rates_cache = (time.monotonic(), state, rates)
        return state, rates

    def priced_workers(self, resources: dict[str, float], workers: list[str] | list[list[str]] | None, *,
                       single: bool, max_rate: float | None = None,
                       prefer: str = "cheapest") -> list[str] | list[list[str]] | None:
        """Where a job may run on a metered network: the workers that can run it whose
        provider asks at most its price limit (among ``workers``: one list for all items,
        or one per item); for a ``single`` task, only the cheapest (``prefer="fastest"``:
        the fastest measured) of those free now, when several are. Where no worker asks
        more than the limit and no preference narrows it, ``workers`` as given (unpinned). Raises
        :class:`PlacementError` saying which rates exist and what to set when none is
        within the limit. An unmetered network pays nobody: ``workers`` as given."""
        placement.check_prefer(prefer)
        limit = self.hold_rate(max_rate)
        if self.meter is None:
            return workers
        deadline, fresh = time.monotonic() + PRICE_WAIT_S, False
        while True:  # a provider that joined a moment ago may still be registering its price
            infos = self.scheduler_workers(fresh=fresh)
            state, rates = self.worker_rates(fresh=fresh)
            eligible = placement.within_limit(infos, rates, resources, limit)
            registering = [address for address, info in infos.items() if address not in rates
                           and placement.satisfies(info.get("resources") or {}, resources)]
            if eligible or not infos or (fresh and not registering) or time.monotonic() > deadline:
                break
            if fresh:
                time.sleep(0.1)
            fresh = True
        if not infos:
            return workers  # none connected: the job waits for one (check_placement said so)
        per_item = bool(workers) and isinstance(workers[0], list)
        if per_item:
            pinned = [[address for address in where if address in eligible] for where in workers]
            if all(pinned):
                return pinned
        elif workers is not None:
            eligible = [address for address in eligible if address in workers]
        if not eligible:
            owners = {address: info["provider"] for address, info in (state.get("providers") or {}).items()}
            allowed = infos if workers is None or per_item else {a: infos[a] for a in workers if a in infos}
            raise PlacementError(placement.over_limit_message(allowed, rates, resources, limit, owners))
        same_price = len({rates[address] for address in eligible}) == 1 and prefer == "cheapest"
        if per_item or not single or same_price:
            # Where no worker asks more than the limit, the job is not pinned: a worker that
            # leaves (or one still registering its provider) does not strand it.
            over = any(rate > limit for rate in rates.values())
            return eligible if over or workers is not None else workers
        free = placement.free_workers({a: infos[a] for a in eligible}, self.client.processing(eligible))
        speeds = ({address: cap["tflops_f32"] for address, cap in self.capabilities().items()}
                  if prefer == "fastest" else None)
        return placement.preferred_workers(eligible, rates, free, prefer, speeds)

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
    def close(self, *, force: bool = False) -> None:
        """Close the client, and stop the embedded network if this connection started it.

        A network that :func:`connect` handed out again (``gpunet.connect()`` while
        ``%gpunet connect`` is connected) closes only when its last user closes it,
        so that a ``with gpunet.connect() as net:`` block never closes the magic's
        connection; ``force=True`` (``%gpunet disconnect``) closes it at once."""
        if not _last_user_leaves(self, force):
            return
        if self.meter is not None:  # the session's pre-authorized holds go back
            self.meter.stop_refilling(self.release_unsent)
        if self.meter is not None and self.meter.doubtful:  # holds an outage left in doubt go back
            try:
                self.meter.resolve_doubtful(self.release_unsent)
            except Exception as exc:  # noqa: BLE001 - closing goes on; release-stale finds them later
                logger.warning("gpunet: could not give back holds left in doubt by an outage: %s", exc)
        try:
            self._end_sandboxes()
            self.client.close(timeout=5)
        finally:
            if self.embedded is not None:
                self.embedded.close()

    def _end_sandboxes(self) -> None:
        """Tell the workers that this session's sandboxes may end (they also end when idle)."""
        if self.embedded is not None or self.client.status != "running":
            return
        try:
            self.client.run(end_session, session_digest(self.session_secret), wait=False)
        except Exception as exc:  # noqa: BLE001 - closing goes on; idle sandboxes end by themselves
            logger.debug("gpunet: could not end this session's sandboxes: %s", exc)

    @property
    def closed(self) -> bool:
        """True once the connection is closed."""
        return self._closed


class GatewayNetwork(Network):
    """An open network reached through its gateway (``https://``, :mod:`gpunet.gateway`):
    the same API as :class:`Network`, but no Dask client in the notebook. The gateway
    holds this notebook's session (its holds, metered submission, verified jobs) and
    streams each job's events back (:mod:`gpunet.client.gateway_link`)."""

    reuses_results = False

    def __init__(self, link: GatewayLink, opened: dict[str, Any], *, max_result_bytes: int,
                 max_stream_bytes_per_s: int, pip: Iterable[str] = ()) -> None:
        self.link = link
        #: ``--pip`` requirements every job of this session asks for (sent with each job)
        self.pins = list(pip)
        #: what this session's jobs asked of providers' environments, by name (``%gpunet env``)
        self.sent_requirements: dict[str, str] = {}
        self._environments_cache: tuple[float, dict[str, dict[str, Any]] | None] = (0.0, None)
        self.client = None  # type: ignore[assignment]
        self.embedded = None
        self.meter = None
        self.credits = GatewayCredits(link, str(opened["session_id"]), str(opened.get("credits") or link.url))
        self.result_format = wire.CODEC
        self.max_result_bytes, self.max_stream_bytes_per_s = max_result_bytes, max_stream_bytes_per_s
        #: the gateway's id of this notebook's session there; the credit session's id
        self.gateway_session = str(opened["session_id"])
        self.session = str(opened["credit_session"])
        self.account = str(opened["account"])
        self.address = self.gateway = link.url
        self.topic = None  # type: ignore[assignment]  # the gateway gives each job its topic
        self._jobs: dict[str, JobHandle] = {}
        self._jobs_lock = threading.Lock()
        self._state_cache: tuple[float, dict[str, Any]] = (0.0, {})
        self._rates_cache: tuple[float, dict[str, Any], dict[str, float]] = (0.0, {}, {})
        self._closed = False
        self._users = 1
        self._reason = ""
        _open_networks.add(self)

    @classmethod
    def open(cls, url: str, token: str, ca: str, *, budget: int | None, timeout: float, max_result_bytes: int,
             max_stream_bytes_per_s: int, max_rate: float | None = None, pip: Iterable[str] = ()) -> GatewayNetwork:
        """Open this notebook's session on the gateway at ``url``."""
        link = GatewayLink(url, token, ca, timeout=max(timeout, REQUEST_TIMEOUT_S))
        kernel, notebook = _kernel_and_notebook()
        try:
            opened = link.call("POST", "/sessions", {
                "budget": int(budget or DEFAULT_BUDGET), "kernel": kernel, "notebook": notebook,
                "max_result_bytes": max_result_bytes, "max_stream_bytes_per_s": max_stream_bytes_per_s,
                "protocol": GATEWAY_PROTOCOL})
            try:
                check_gateway_protocol(opened, url)
            except GpunetError:  # another version's gateway would misread what this notebook sends
                with contextlib.suppress(GpunetError):
                    link.call("DELETE", f"/sessions/{opened.get('session_id')}")
                raise
        except BaseException:
            link.close()
            raise
        network = cls(link, opened, max_result_bytes=max_result_bytes, max_stream_bytes_per_s=max_stream_bytes_per_s,
                      pip=pip)
        #: this session's price limit (see Network.rate_limit); the gateway places by it
        network.rate_limit = placement.check_max_rate(max_rate) if max_rate is not None else (
            _default_rate(network.metering_state()))
        return network

    @property
    def metered(self) -> bool:
        """Always: an open network's every task carries a hold."""
        return True

    @property
    def dashboard_link(self) -> str | None:
        """None: an open network's dashboard is its operator's."""
        return None

    @property
    def session_meter(self) -> GatewaySpending:
        """This session's credits as the gateway's meter of it says (``%gpunet usage`` and ``receipt``)."""
        return GatewaySpending(self.link, self.gateway_session, self.session)

    def environment_reports(self, *, fresh: bool = False) -> dict[str, dict[str, Any]] | None:
        """Each provider's worker -> what its provider says is installed there, as the
        gateway reads it from the scheduler (cached for a second)."""
        stamp, reports = self._environments_cache
        if fresh or time.monotonic() - stamp > 1.0:
            reports = self.link.call("GET", f"/sessions/{self.gateway_session}/environments")
            self._environments_cache = (time.monotonic(), reports)
        return reports

    def __repr__(self) -> str:
        return f"<gpunet.Network gateway {self.address} account={self.account} session={self.session} results=codec>"

    def _state(self, *, fresh: bool = False) -> dict[str, Any]:
        stamp, state = self._state_cache
        if fresh or time.monotonic() - stamp > 1.0:
            state = self.link.call("GET", f"/sessions/{self.gateway_session}/state")
            self._state_cache = (time.monotonic(), state)
        return state

    def scheduler_workers(self, *, fresh: bool = False) -> dict[str, dict[str, Any]]:
        """The workers as the gateway reports them (cached for a second)."""
        return {info["address"]: info for info in self._state(fresh=fresh)["workers"]}

    def workers(self) -> list[WorkerInfo]:
        """Every worker with its device, resources and free slots (the gateway asks them)."""
        return [WorkerInfo(**info) for info in self._state(fresh=True)["workers"]]

    def capabilities(self, *, refresh: bool = False) -> dict[str, dict[str, Any]]:
        """Each worker's measured capability, measured by the gateway where not yet."""
        return self.link.call("POST", f"/sessions/{self.gateway_session}/capabilities", {"refresh": refresh})

    def check_placement(self, resources: dict[str, float]) -> None:
        """The gateway checks placement when the job is sent (its refusal is raised then)."""

    def waiting_reason(self, resources: dict[str, float], workers: list[str] | None = None) -> str:
        """Why the job still waits, as the gateway last said."""
        return self._reason or "waiting for a worker"

    def metering_state(self) -> dict[str, Any] | None:
        """The scheduler's metering state, as the gateway sees it."""
        return self._state()["metering"]

    def call_scheduler(self, handler: str, **kwargs: Any) -> Any:
        """Refused: through a gateway only the gateway calls the scheduler."""
        raise GpunetError(f"{handler} is the gateway's to call; through a gateway the notebook never reaches the "
                          "scheduler")

    def release_unsent(self, holds: list[str]) -> None:
        """Nothing: the gateway gives back the holds of a job it could not send."""

    def release_soon(self, futures: list[Any]) -> None:
        """Nothing: the gateway keeps the futures."""

    def sent(self) -> None:
        """Nothing: the gateway keeps the futures."""

    def submit(self, job: Job, *, resources: dict[str, float], items: list[Any] | None = None,
               workers: list[str] | list[list[str]] | None = None, max_credits: float | None = None,
               timeout: float | None = None, verify: str | Policy | None = None,
               tolerance: Tolerance | None = None, max_rate: float | None = None,
               prefer: str = "cheapest", pip: Iterable[str] = (), reuse: bool = False) -> JobHandle:
        """Send ``job`` through the gateway and return its handle, once the gateway
        has placed its hold and sent it (its refusal is raised here, nothing sent).
        The gateway places it among the providers within ``max_rate`` (else this
        session's limit), ``prefer``-ring the cheapest or the fastest, and among those
        whose environment meets the packages resolved here (its imports at this
        notebook's versions, this session's and ``pip``'s requirements: sent as data).
        With ``reuse`` (a verified cell without ``--no-reuse``) the gateway answers it with
        a verified result of this account's with the same code and inputs, where it keeps one."""
        if self._closed:
            raise GpunetError("this network connection is closed; connect again with gpunet.connect() or %gpunet connect")
        if items is not None and not items:
            raise GpunetError("nothing to send: the map has no items")
        placement.check_prefer(prefer)
        body = job_request(job, items=items, resources=resources, workers=workers, max_credits=max_credits,
                           timeout=timeout, verify=verify, tolerance=tolerance, max_rate=self.hold_rate(max_rate),
                           prefer=prefer)
        environment = self.environment_of(job, pip)
        self.sent_requirements.update(environment.requirements)
        job.requirements = dict(environment.requirements)  # what its provenance record says it asked for
        body["environment"] = {"requirements": environment.requirements, "sources": environment.sources,
                               "gpu_build": environment.gpu_build, "gpu_packages": environment.gpu_packages}
        body["reuse"] = reuse and reuse_allowed()
        answer = self.link.request("POST", f"/sessions/{self.gateway_session}/jobs", body, stream=True,
                                   timeout=None if timeout is None else timeout + REQUEST_TIMEOUT_S, framed_body=True)
        events, sent = first_event(answer)
        per_item = bool(workers) and isinstance(workers[0], list)
        handle = GatewayJob(self, job, items=None if items is None else len(items), resources=resources,
                            allowed_workers=None if per_item else workers, answer=answer, events=events, sent=sent)
        return handle

    def close(self, *, force: bool = False) -> None:
        """Close this notebook's session on the gateway (its unspent holds go back)."""
        if not _last_user_leaves(self, force):
            return
        try:
            self.link.call("DELETE", f"/sessions/{self.gateway_session}")
        except GpunetError as exc:
            logger.warning("gpunet: could not close the session on the gateway: %s", exc)
        finally:
            self.link.close()


class GatewaySpending:
    """A session's meter as ``%gpunet usage`` and ``%gpunet receipt`` read it through the
    gateway, which meters the session: its figures (with the pre-authorized part) once
    what finished was settled, and the tasks and device-seconds by worker."""

    def __init__(self, link: GatewayLink, gateway_session: str, session: str) -> None:
        self.link, self.gateway_session, self.session = link, gateway_session, session
        self.tally: dict[str, WorkerTally] = {}
        self._usage: dict[str, Any] | None = None

    def wait_settled(self) -> bool:
        """Read the session's figures once the gateway saw what finished settled (bounded);
        False when some were still settling."""
        spending = self.link.call("GET", f"/sessions/{self.gateway_session}/spending")
        self._usage = dict(spending["usage"])
        self.tally = {str(entry["worker"]): WorkerTally(int(entry["tasks"]), float(entry["seconds"]),
                                                        str(entry["device"])) for entry in spending["tally"]}
        return bool(spending["settled"])

    def usage(self) -> dict[str, Any]:
        """The session's budget, spent, held (pre-authorized among it) and left credits, as last read."""
        if self._usage is None:
            self.wait_settled()
        return dict(self._usage or {})


class GatewayCredits:
    """What the notebook reads of its credit session through the gateway (the status
    and ``%gpunet usage``): the gateway asks the credit service with this notebook's token."""

    def __init__(self, link: GatewayLink, session_id: str, url: str) -> None:
        self.link, self.session_id, self.url = link, session_id, url

    def usage(self, session: str) -> dict[str, Any]:
        """The session's budget, spent, held and left credits."""
        return self.link.call("GET", f"/sessions/{self.session_id}/usage")

    def provider_records(self) -> list[dict[str, Any]]:
        """The providers' trust records."""
        return self.link.call("GET", f"/sessions/{self.session_id}/providers")

    def receipt(self, session: str) -> dict[str, Any]:
        """This session's receipt (the gateway fetches it with this notebook's token, for
        the credit session it opened for it; ``session`` is that one's id)."""
        return self.link.call("GET", f"/sessions/{self.session_id}/receipt")

    def consistency_proof(self, first: int, second: int | None = None) -> dict[str, Any]:
        """The credit service's proof that its ledger of ``first`` entries grew into ``second``'s."""
        query = f"first={int(first)}" + ("" if second is None else f"&second={int(second)}")
        return self.link.call("GET", f"/sessions/{self.session_id}/ledger/consistency?{query}")


def _default_rate(state: dict[str, Any] | None) -> float:
    """The price limit the operator configured for notebooks, as the scheduler's metering
    ``state`` says (:data:`DEFAULT_RATE` where it says none, or does not meter)."""
    limit = (state or {}).get("default_max_rate", DEFAULT_RATE)
    return float(limit) if isinstance(limit, (int, float)) and 0 < limit < math.inf else DEFAULT_RATE


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
            timeout: float = CONNECT_TIMEOUT_S, trust_providers: bool = False,
            max_result_bytes: int | None = None, max_stream_bytes_per_s: int | None = None,
            replace: bool = False, max_rate: float | None = None, ca: str | None = None,
            pip: Iterable[str] | None = None) -> Network:
    """Connect to a gpunet network and make it :func:`current`.

    ``address`` (or ``GPUNET_SCHEDULER``) joins that scheduler; with neither, an
    embedded network starts in the background (``workers`` CPU workers where there
    is no GPU, default 2) with its own credit service and a funded local account,
    unless ``metered=False``. ``credits`` / ``token`` (or ``GPUNET_CREDITS`` /
    ``GPUNET_TOKEN``) name the credit service and this notebook's account on a
    shared network; ``budget`` caps this notebook session (default
    :data:`DEFAULT_BUDGET` credits). ``max_rate`` is the session's price limit in
    credits per device-second (default: the operator's, ``gpunet scheduler
    --default-max-rate``): only providers asking at most that run its jobs, and its
    holds are priced at it. Raises :class:`ConnectError` naming the address
    when the scheduler or the credit service cannot be reached.

    From a scheduler given by address, results come back as data only
    (:mod:`gpunet.codec`: values, arrays, data frames, figures; nothing that can run
    code in this kernel), each job's within ``max_result_bytes`` (default 256 MiB)
    and its output text within ``max_stream_bytes_per_s`` (default 1 MiB per second
    run). ``trust_providers=True``, for a private network whose providers you
    trust, brings back any object, pickled, as the embedded network does.

    ``pip`` (``["pkg==1.2", ...]``, also ``GPUNET_PIP``, requirements separated by
    spaces) adds requirements to, or overrides those found in, every job of the session
    (:mod:`gpunet.packages`: a job's packages are found from its imports).

    While a network is connected (``%gpunet connect``), ``connect()`` with no
    arguments, or naming the same scheduler, returns that same network (closing it
    then closes only this use of it); asking for another network raises
    :class:`GpunetError`, unless ``replace=True`` (what ``%gpunet connect`` does),
    which closes the current one first. Every network still open when the
    interpreter exits is closed then, quietly, its local network with it.

    An ``https://`` address is an open network's gateway (``gpunet gateway``): the
    notebook speaks HTTPS to it with ``token`` (no ``credits``: the gateway knows its
    credit service), checking its certificate against the operator's CA file ``ca``
    (or ``GPUNET_GATEWAY_CA``); results come back as data only.
    """
    global _current
    result_options = trust_providers or max_result_bytes is not None or max_stream_bytes_per_s is not None
    explicit = (any(value is not None for value in (address, workers, credits, token, budget, max_rate, pip))
                or not metered or result_options)
    pip = list(pip) if pip is not None else os.environ.get("GPUNET_PIP", "").split()
    for pin in pip:
        packages.parse_pin(pin)  # a bad one is an OptionError now, before anything connects
    address = address or os.environ.get("GPUNET_SCHEDULER") or None
    credits = credits or os.environ.get("GPUNET_CREDITS") or None
    token = token or os.environ.get("GPUNET_TOKEN") or None
    with _current_lock:
        previous = _current if _current is not None and not _current.closed else None
        if previous is not None:
            same = not explicit or (address == previous.address and workers is None and budget is None
                                    and not result_options and max_rate is None
                                    and credits in (None, previous.credits.url if previous.credits else None))
            if same:
                if not replace:
                    previous._users += 1
                return previous
            if not replace:
                raise GpunetError(
                    f"already connected to {previous.address} (%gpunet connect or an earlier gpunet.connect()); "
                    "gpunet.connect() with no arguments returns that network. To use another one, close it "
                    "first (%gpunet disconnect, or gpunet.current().close()), or pass replace=True."
                )
    gateway = address is not None and address.startswith("https://")
    if gateway:
        if credits is not None or trust_providers:
            raise GpunetError(f"{address} is a gateway: it knows its credit service and never trusts providers; "
                              "connect with only --token-file (or GPUNET_TOKEN), --ca and --budget")
        if token is None:
            raise GpunetError(f"the gateway at {address} admits notebooks by their credit token: pass --token-file "
                              "FILE (or set GPUNET_TOKEN); the operator of the credit service issues it")
        ca = gateway_ca(ca)
    elif ca is not None:
        raise GpunetError("--ca checks a gateway's certificate; it applies only to an https:// address")
    if address is not None and workers is not None:
        raise GpunetError(f"workers={workers} only sizes a local network; {address} already has its own workers "
                          "(connect without --workers, or without an address)")
    if max_rate is not None:
        placement.check_max_rate(max_rate)
    if budget is not None and budget < 1:
        raise GpunetError(f"a session's budget must be at least 1 credit, got {budget}")
    if (credits is None) != (token is None) and not (address is None and token is None) and not gateway:
        raise GpunetError("a credit service needs both its URL (--credits / GPUNET_CREDITS) and this notebook's "
                          "token (--token / GPUNET_TOKEN)")
    caps = {"max_result_bytes": max_result_bytes or wire.DEFAULT_MAX_RESULT_BYTES,
            "max_stream_bytes_per_s": max_stream_bytes_per_s or wire.DEFAULT_MAX_STREAM_BYTES_PER_S}
    for name, value in caps.items():
        if not (isinstance(value, int) and value > 0):
            raise GpunetError(f"{name} must be a whole number of bytes above 0, got {value!r}")
    embedded = None
    if address is None:
        _refuse_unguarded_script()
        embedded = EmbeddedNetwork(n_workers=workers, credits=metered and credits is None)
        address = embedded.scheduler_address
        if embedded.credits_service is not None:
            credits, token = embedded.credits_url, embedded.client_token
    result_format = wire.PICKLE if embedded is not None or trust_providers else wire.CODEC
    try:
        if gateway:
            network: Network = GatewayNetwork.open(address, token, ca, budget=budget, timeout=timeout,
                                                   max_rate=max_rate, pip=pip, **caps)
        else:
            network = join(address, credits=credits, token=token, budget=budget, timeout=timeout,
                           result_format=result_format, embedded=embedded, max_rate=max_rate, pip=pip, **caps)
    except BaseException:
        if embedded is not None:
            embedded.close()
        raise
    if previous is not None:
        previous.close(force=True)
    with _current_lock:
        _current = network
    _close_at_exit_once()
    return network


def join(address: str, *, credits: str | None, token: str | None, budget: int | None, timeout: float,
         result_format: str, max_result_bytes: int, max_stream_bytes_per_s: int,
         embedded: EmbeddedNetwork | None = None, notebook: tuple[str, str] | None = None,
         network_class: type[Network] | None = None, max_rate: float | None = None,
         pip: Iterable[str] | None = None, client_name: str | None = None) -> Network:
    """A :class:`Network` on the scheduler at ``address`` as a Dask client (what
    :func:`connect` makes, and what the gateway makes for each notebook it serves):
    with ``result_format`` CODEC over the data-only comm, metered with ``token``'s
    account when ``credits`` is given (``notebook``: the session's kernel and notebook);
    ``network_class``: a subclass of :class:`Network` to make (the gateway's); ``client_name``:
    the Dask client's name (the gateway names each session's after its account)."""
    options: dict[str, Any] = {}
    dask_address = address
    if result_format == wire.CODEC:  # Dask itself must not unpickle what providers send
        dask_address = data_comm.data_only_address(address)
        options["deserializers"] = list(data_comm.DATA_SERIALIZERS)
        data_comm.max_message_bytes = max_result_bytes + data_comm.MESSAGE_SLACK_BYTES
    try:
        client = Client(dask_address, timeout=timeout, set_as_default=False, name=client_name, **options)
    except (OSError, TimeoutError) as exc:
        raise ConnectError(
            f"cannot reach the scheduler at {address} within {timeout:g} s ({exc.__class__.__name__}). "
            "Check the address and that `gpunet up` or `gpunet scheduler` runs there; "
            "with no address, `%gpunet connect` starts a local network.",
            address=address,
        ) from None
    try:
        meter = _open_meter(client, credits, token, budget, notebook) if credits is not None and token else None
        return (network_class or Network)(client, embedded=embedded, meter=meter, result_format=result_format,
                                          address=address, max_result_bytes=max_result_bytes,
                                          max_stream_bytes_per_s=max_stream_bytes_per_s, max_rate=max_rate,
                                          pip=pip)
    except BaseException:
        client.close()
        raise


def _refuse_unguarded_script() -> None:
    """Starting a network spawns worker processes, which import the script that runs
    as ``__main__`` again: code at its top level that connects must sit under
    ``if __name__ == "__main__":``, or each worker would start a network of its own."""
    import multiprocessing

    main = sys.modules.get("__main__")
    if multiprocessing.parent_process() is not None and getattr(main, "__name__", "") == "__mp_main__":
        raise GpunetError(
            f"gpunet.connect() ran again inside a worker process, which re-imported {getattr(main, '__file__', 'the script')}: "
            "put the code that connects under `if __name__ == \"__main__\":`"
        )
    script = getattr(main, "__file__", None)
    if not script or not script.endswith(".py") or hasattr(sys, "ps1"):
        return
    frame, top = sys._getframe(1), None
    while frame is not None:  # the script's own top-level line that led here, through any functions
        if frame.f_globals is vars(main) and frame.f_code.co_name == "<module>":
            top = frame
        frame = frame.f_back
    if top is None:
        return
    if not _inside_main_guard(Path(script), top.f_lineno):
        raise GpunetError(
            f"{script}, line {top.f_lineno}: gpunet.connect() runs at the top level of the script, which the "
            "network's worker processes import again when they start; put it (and the code that uses it) under "
            "`if __name__ == \"__main__\":`"
        )


def _inside_main_guard(script: Path, line: int) -> bool:
    """Whether ``line`` of ``script`` lies inside an ``if __name__ == "__main__":`` block."""
    try:
        tree = ast.parse(script.read_text())
    except (OSError, SyntaxError, ValueError):
        return True  # cannot tell: let it be
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test) and "__name__" in ast.unparse(node.test):
            if node.body[0].lineno <= line <= (node.body[-1].end_lineno or line):
                return True
    return False


_exit_hook_registered = False


def _close_at_exit_once() -> None:
    """Close every open network when the interpreter exits, before Python stops the
    thread pools that Dask's event loop still needs (``threading._register_atexit``
    runs before them; a plain ``atexit`` handler runs after, and closing then fails
    with "cannot schedule new futures after interpreter shutdown")."""
    global _exit_hook_registered
    with _current_lock:
        if _exit_hook_registered:
            return
        _exit_hook_registered = True
    try:
        threading._register_atexit(_close_all_quietly)  # type: ignore[attr-defined]
    except (AttributeError, RuntimeError):  # not CPython, or already shutting down
        atexit.register(_close_all_quietly)


def _close_all_quietly() -> None:
    """Close what is still open, with Dask's shutdown chatter kept out of the terminal."""
    networks = [net for net in list(_open_networks) if not net.closed]
    if not networks:
        return
    quiet = [logging.getLogger(name) for name in ("distributed", "tornado", "asyncio")]
    levels = [logger_.level for logger_ in quiet]
    for logger_ in quiet:
        logger_.setLevel(logging.CRITICAL)
    try:
        for net in networks:
            try:
                net.close(force=True)
            except Exception as exc:  # noqa: BLE001 - exiting anyway: one line, not a traceback
                print(f"gpunet: closing {net.address} at exit failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    finally:
        for logger_, level in zip(quiet, levels):
            logger_.setLevel(level)


def _open_meter(client: Client, url: str, token: str, budget: int | None,
                notebook: tuple[str, str] | None = None) -> Meter:
    """Check that the scheduler meters work, then open this notebook's session."""
    state = _metering_state(client)
    if state is None:
        raise GpunetError(
            f"the scheduler at {client.scheduler.address} does not meter work, so credits at {url} would never be "
            "settled; start it with `gpunet scheduler --credits URL --operator-token-file FILE`, or connect "
            "without --credits"
        )
    credits = CreditClient(url, token)
    kernel, notebook = notebook or _kernel_and_notebook()
    session = credits.open_session(int(budget or DEFAULT_BUDGET), notebook=notebook, kernel=kernel)
    # Holds name the scheduler's meter account: only it may pay them (None on a private network).
    return Meter(credits, session, meter=state.get("meter"))


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
