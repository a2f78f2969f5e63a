"""The client side of a remote job: send it, follow it, stop it, decode its result.

A :class:`RemoteJob` holds the Dask futures of one cell, one function call, or
every item of a map. :meth:`RemoteJob.wait` blocks the calling thread (the
notebook's) until they finish, meanwhile printing the job's live stdout/stderr and
moving its progress display; Ctrl-C or ``timeout`` stops the job on its worker for
real (see :func:`gpunet.remote.stop_job`), restarting a worker whose thread is
stuck in C code, so the device is free again.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import sys
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any, Callable

import cloudpickle

from gpunet.errors import (
    CellTimeoutError,
    GpunetError,
    RemoteCellError,
    UnpicklableInputError,
    WorkerLostError,
)
from gpunet.remote import Job, JobResult, run_job

if TYPE_CHECKING:  # pragma: no cover
    from distributed import Future

    from gpunet.network import Network
    from gpunet.widgets import JobProgress

logger = logging.getLogger(__name__)

#: Inputs bigger than this travel scattered to the workers, not inside the task.
SCATTER_THRESHOLD_BYTES = 256 * 1024

#: How long a stopped job's thread may take to leave before its worker is restarted.
STOP_GRACE_S = 1.0


def new_job_id() -> str:
    """A fresh job id (also the prefix of its Dask keys)."""
    return uuid.uuid4().hex[:16]


def pickled(value: Any, what: str, *, name: str | None = None) -> bytes:
    """cloudpickle ``value``, or raise :class:`UnpicklableInputError` naming ``what``
    (an input's name, "map item 3") and its type."""
    try:
        return cloudpickle.dumps(value)
    except Exception as exc:  # noqa: BLE001 - pickling fails in many ways
        type_name = f"{type(value).__module__}.{type(value).__qualname__}".removeprefix("builtins.")
        raise UnpicklableInputError(
            f"{what} ({type_name}) cannot be pickled, so it cannot travel to a worker "
            f"({type(exc).__name__}: {exc}). Create it on the worker instead (inside the cell or function), "
            "or choose the inputs with --in.",
            name=name or what,
            type_name=type_name,
        ) from None


def pickle_inputs(values: dict[str, Any]) -> dict[str, bytes]:
    """Pickle each input on its own, naming the one that cannot travel."""
    return {name: pickled(value, f"input {name!r}", name=name) for name, value in values.items()}


def function_job(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], *,
                 topic: str | None, announce: bool = True) -> Job:
    """A :class:`Job` that calls ``fn(*args, **kwargs)`` (map items go first)."""
    arguments = pickled((args, kwargs), f"the arguments of {getattr(fn, '__name__', fn)!r}")
    return Job(new_job_id(), function=fn, arguments=arguments, topic=topic, announce=announce)


def function_value(result: JobResult) -> Any:
    """The return value of a function job, or its remote exception raised here."""
    raise_for_error(result)
    if result.unpicklable_outputs:
        name, type_name, reason = result.unpicklable_outputs[0]
        raise GpunetError(f"the {name} ({type_name}) cannot be pickled to come back from {result.worker}: {reason}")
    return cloudpickle.loads(result.value) if result.value is not None else None


def raise_for_error(result: JobResult, *, label: str = "") -> None:
    """Raise the job's remote exception here, with its remote traceback.

    The original exception type is rebuilt where it can be (so ``except KeyError``
    works in the notebook); IPython shows the remote traceback instead of gpunet's
    own frames. Otherwise a :class:`RemoteCellError` carries the same text.
    """
    error = result.error
    if error is None:
        return
    if error["ename"] == "JobInterrupted":
        raise GpunetError(f"the job was stopped on {result.worker}{label}")
    remote_tb = error["traceback"]
    header = f"Remote traceback (worker {result.worker}, {result.device}{label}):\n"
    exc: BaseException | None = None
    if error.get("exception") is not None:
        try:
            exc = cloudpickle.loads(error["exception"])
        except Exception:  # noqa: BLE001 - its class may not exist here
            exc = None
    if isinstance(exc, BaseException):
        lines = (header + remote_tb).rstrip("\n").split("\n")
        try:
            exc._render_traceback_ = lambda: lines  # type: ignore[attr-defined]
            if hasattr(exc, "add_note"):
                exc.add_note(header + remote_tb)
        except AttributeError:  # exceptions with __slots__
            exc = None
    if exc is None:
        exc = RemoteCellError(error["ename"], error["evalue"], header + remote_tb)
    raise exc


class RemoteJob:
    """A job sent to the network: its futures, live events and results.

    Make one with :meth:`submit`; it is registered with its network (which hands it
    the job's topic events) before its first task is sent, so no event is missed.
    """

    def __init__(self, network: Network, job: Job, *, items: int | None) -> None:
        self.network = network
        self.job = job
        self.count = 1 if items is None else items
        self.mapped = items is not None
        self.futures: list[Future] = []
        self.index_of: dict[str, int | None] = {}
        self.submitted = time.monotonic()
        self.events: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        self.wake = threading.Event()
        #: results that came as events, by item index (None for a single job)
        self.results: dict[int | None, JobResult] = {}
        #: indices whose future finished
        self.finished: set[int | None] = set()
        self.workers_seen: list[tuple[str, str]] = []
        #: when the "started" event arrived (the --max-credits clock starts there)
        self.started_at: float | None = None
        self.shown_seq: dict[int | None, int] = {}
        self.stopped_because: str | None = None
        self.resources: dict[str, float] = {}
        self.allowed_workers: list[str] | None = None
        #: the job's holds, and the device time its --max-credits allows (metered networks)
        self.holds: list[str] = []
        self.credit_limit_s: float | None = None
        #: scattered data the tasks depend on, held until the job is done
        self._kept: list[Future] = []
        self._lock = threading.Lock()

    @classmethod
    def submit(cls, network: Network, job: Job, *, resources: dict[str, float], items: list[Any] | None = None,
               workers: list[str] | list[list[str]] | None = None,
               annotations: dict[str, Any] | None = None) -> RemoteJob:
        """Send ``job`` to ``network`` with the given placement (``workers``: one
        list for all items, or one per item); ``annotations`` (the job's hold)
        travel with its tasks as the ``gpunet`` annotation."""
        import dask

        with dask.annotate(gpunet=annotations) if annotations else contextlib.nullcontext():
            return cls._submit(network, job, resources=resources, items=items, workers=workers)

    @classmethod
    def _submit(cls, network: Network, job: Job, *, resources: dict[str, float], items: list[Any] | None,
                workers: list[str] | list[list[str]] | None) -> RemoteJob:
        client = network.client
        blobs = None if items is None else [pickled(item, f"map item {index}") for index, item in enumerate(items)]
        job.result_event = blobs is None
        per_item = bool(workers) and isinstance(workers[0], list)
        options = dict(resources=resources, pure=False, workers=None if per_item else workers,
                       allow_other_workers=False)
        inputs = None
        if sum(len(blob) for blob in job.inputs.values()) > SCATTER_THRESHOLD_BYTES:
            inputs, job.inputs = client.scatter(job.inputs, hash=False), {}
        remote = cls(network, job, items=None if blobs is None else len(blobs))
        remote.resources = resources
        remote.allowed_workers = None if per_item else workers
        network._register(remote)
        if blobs is None:
            futures = [client.submit(run_job, job, None, None, inputs, key=f"gpunet-{job.job_id}", **options)]
        else:
            keys = [f"gpunet-{job.job_id}-{index}" for index in range(len(blobs))]
            # The job (code, function, inputs) goes to the workers once, as data the
            # tasks depend on; each task then carries only its item.
            shared = client.scatter(job, hash=False, broadcast=len(blobs) > 1)
            if per_item:  # one submit per item, each pinned to its own workers
                futures = [client.submit(run_job, shared, blob, index, inputs, key=key,
                                         **{**options, "workers": where})
                           for index, (blob, key, where) in enumerate(zip(blobs, keys, workers))]
            else:
                futures = client.map(run_job, [shared] * len(blobs), blobs, range(len(blobs)),
                                     [inputs] * len(blobs), key=keys, **options)
        remote._attach(futures)
        remote._kept = [f for f in (inputs, shared if blobs is not None else None) if f is not None]
        return remote

    def _attach(self, futures: list[Future]) -> None:
        self.index_of = {future.key: (index if self.mapped else None) for index, future in enumerate(futures)}
        self.futures = futures
        self._unfinished = list(futures)
        if not self.mapped:  # one callback is cheap; thousands would each wake the event loop
            futures[0].add_done_callback(self._on_done)

    #: How often a map's waiter looks at its futures for items that failed in Dask or
    #: whose results were too large to come as events.
    POLL_S = 0.05

    def _poll_futures(self) -> None:
        still = []
        for future in self._unfinished:
            if future.status == "pending":
                still.append(future)
            else:
                with self._lock:
                    self.finished.add(self.index_of[future.key])
        self._unfinished = still

    # -- callbacks from the client's event loop -------------------------------------------
    def on_event(self, message: dict[str, Any]) -> None:
        if message.get("kind") == "result":
            from gpunet.remote import result_from_event

            with self._lock:
                self.results.setdefault(message.get("index"), result_from_event(message["result"]))
                complete = len(self.results) >= self.count
            if self.mapped and not complete:
                return  # the waiter polls a map a few times a second; no wake-up per item
        else:
            self.events.put(message)
        self.wake.set()

    def _on_done(self, future: Future) -> None:
        with self._lock:
            self.finished.add(self.index_of[future.key])
        self.wake.set()

    def done(self) -> bool:
        """True once every item has a result or a finished future (well or not)."""
        with self._lock:
            return len(self.finished | self.results.keys()) >= self.count

    @property
    def completed(self) -> int:
        """How many items are done."""
        with self._lock:
            return len(self.finished | self.results.keys())

    # -- waiting ------------------------------------------------------------------------
    def wait(self, timeout: float | None = None, *, progress: JobProgress | None = None,
             echo: bool = True) -> list[JobResult]:
        """Block until the job is done and return its results (in item order).

        Prints live stdout/stderr (``echo``), moves ``progress``, and stops the job
        on its worker on Ctrl-C or after ``timeout`` seconds.
        """
        deadline = None if timeout is None else self.submitted + timeout
        try:
            while True:
                self.wake.clear()
                self._drain(progress, echo)
                if self.done():
                    break
                wait_for = 0.5 if progress is not None else None
                if self.mapped:
                    self._poll_futures()
                    if self.done():
                        break
                    wait_for = min(wait_for or self.POLL_S, self.POLL_S)
                credit_deadline = self._credit_deadline()
                if credit_deadline is not None:
                    left = credit_deadline - time.monotonic()
                    if left <= 0:
                        self._stop_at_credit_limit()
                    wait_for = left if wait_for is None else min(wait_for, left)
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        self.stop("timeout")
                        where = f" on {self.workers_seen[-1][0]}" if self.workers_seen else ""
                        raise CellTimeoutError(
                            f"the job did not finish within its timeout of {timeout:g} s (queued and running){where} "
                            "and was stopped; give it more time (--timeout) or make it smaller."
                        )
                    wait_for = left if wait_for is None else min(wait_for, left)
                self.wake.wait(wait_for)
                if progress is not None:
                    progress.tick(done=self.completed)
                    if progress.wants_reason():
                        progress.waiting(self.network.waiting_reason(self.resources, self.allowed_workers))
        except KeyboardInterrupt:
            self.stop("interrupted")
            raise
        finally:
            self.network._forget(self.job.job_id)
        results = self._gather()
        if self.network.meter is not None:
            for result in results:
                self.network.meter.count(result.worker, result.device, result.seconds)
        if progress is not None and not self.mapped:
            progress.ran_on(results[0].worker, results[0].device)
        # Let Dask forget the results now: what came back is all there is.
        self.futures, self._kept = [], []
        self._drain(progress, echo)
        if echo:
            for result in results:
                self._echo_rest(result)
        return results

    def _gather(self) -> list[JobResult]:
        from distributed.scheduler import KilledWorker

        with self._lock:
            have = dict(self.results)
        missing = [future for future in self.futures if self.index_of[future.key] not in have]
        for future in missing:
            index = self.index_of[future.key]
            where = f"item {index} of this map" if self.mapped else "this job"
            if future.status == "error":
                exc = future.exception()
                if isinstance(exc, KilledWorker):
                    raise WorkerLostError(
                        f"the workers running {where} died, each time it was tried ({exc}); it was not re-run "
                        "again. Check the worker logs (out of memory?) and run it again."
                    ) from None
                raise GpunetError(f"{where} failed in Dask itself: {type(exc).__name__}: {exc}") from exc
            if future.status == "cancelled" and self.stopped_because is not None:
                raise GpunetError(f"{where} was {self.stopped_because} before it finished")
            if future.status == "cancelled":
                self._close_unknown_tasks()
                raise WorkerLostError(
                    "the network lost this job (its scheduler restarted or this client was disconnected); "
                    "run it again"
                )
        for result in self.network.client.gather(missing):
            have[result.index] = result
        return [have[self.index_of[future.key]] for future in self.futures]

    def _close_unknown_tasks(self) -> None:
        """Tasks the scheduler cancelled may never have existed there (their input was
        lost before the graph arrived): have it close their hold, or it stays held."""
        from gpunet.extensions.scheduler_plugin import close_unknown

        if not self.holds:
            return
        try:
            self.network.client.run_on_scheduler(close_unknown, self.holds[0],
                                                 [future.key for future in self.futures])
        except Exception as exc:  # noqa: BLE001 - the network may be gone: nothing more to do
            logger.warning("gpunet: could not close the hold of job %s: %s", self.job.job_id, exc)

    def _drain(self, progress: JobProgress | None, echo: bool) -> None:
        while True:
            try:
                message = self.events.get_nowait()
            except queue.Empty:
                return
            kind = message.get("kind")
            if kind == "started":
                worker, device = message["worker"], message["device"]
                lost = self.workers_seen[-1][0] if self.workers_seen else None
                self.workers_seen.append((worker, device))
                self.started_at = time.monotonic()
                if progress is not None:
                    progress.running(worker, device, rerun_after=lost)
            elif kind == "stream" and echo:
                index = message.get("index")
                if message["seq"] > self.shown_seq.get(index, 0):
                    self.shown_seq[index] = message["seq"]
                    _write(message["name"], message["text"])

    def _echo_rest(self, result: JobResult) -> None:
        shown = self.shown_seq.get(result.index, 0)
        for seq, name, text in result.streams:
            if seq > shown:
                _write(name, text)
        if result.streams:
            self.shown_seq[result.index] = result.streams[-1][0]

    def _credit_deadline(self) -> float | None:
        """When a single job's --max-credits runs out: its limit counted from the
        moment it started on a worker (time spent queued costs nothing)."""
        if self.credit_limit_s is None or self.mapped or self.started_at is None:
            return None
        return self.started_at + self.credit_limit_s

    def _stop_at_credit_limit(self) -> None:
        """The job ran as long as its --max-credits pays for: the scheduler charges the
        provider's time on the worker (at most the limit), then the job is stopped."""
        from gpunet.extensions.scheduler_plugin import charge_used
        from gpunet.metering import BudgetError

        charged = self.network.client.run_on_scheduler(charge_used, self.futures[0].key)
        worker = self.workers_seen[-1][0] if self.workers_seen else None
        self.stop("stopped at its --max-credits")
        raise BudgetError(
            f"the job reached its --max-credits after about {self.credit_limit_s:.1f} s on "
            f"{worker or 'its worker'} and was stopped; it was charged {charged} credits. "
            "Give it more credits (--max-credits) or make it smaller."
        )

    # -- stopping -----------------------------------------------------------------------
    def stop(self, reason: str) -> None:
        """Cancel the job and stop its threads on the workers; restart a stuck worker."""
        self.stopped_because = reason
        stop_job_everywhere(self.network, self.job.job_id, self.futures, reason)


def stop_job_everywhere(network: Network, job_id: str, futures: list[Future], reason: str) -> None:
    """Cancel ``futures`` and stop job ``job_id``'s threads on every worker; a worker
    whose thread does not leave within :data:`STOP_GRACE_S` restarts (under a Nanny)."""
    import asyncio

    from gpunet.remote import stop_job

    client = network.client
    try:
        client.cancel(futures, force=True)
        # Bounded, so that one unresponsive worker cannot make Ctrl-C hang.
        statuses = client.sync(asyncio.wait_for, client._run(stop_job, job_id, reason, STOP_GRACE_S),
                               STOP_GRACE_S + 5)
    except Exception as exc:  # noqa: BLE001 - the network may be gone too
        logger.warning("gpunet: could not stop job %s cleanly: %s", job_id, exc)
        return
    for address, status in statuses.items():
        if status == "restarting":
            logger.warning("gpunet: job %s did not stop within %s s on %s; that worker restarts to free its device",
                           job_id, STOP_GRACE_S, address)
        elif status == "stuck":
            logger.warning("gpunet: job %s is stuck on %s, which has no Nanny to restart it; "
                           "its device stays busy until the job ends", job_id, address)


def _write(name: str, text: str) -> None:
    stream = sys.stderr if name == "stderr" else sys.stdout
    stream.write(text)
    stream.flush()
