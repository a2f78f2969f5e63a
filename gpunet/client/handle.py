"""A job sent to the network: what every job handle shares.

A handle follows one job (a cell, a function call, or every item of a map) from
the moment it is sent until its results are back: it waits, keeps the deadline,
shows the job's live output and progress, and stops the job on its workers for
real on Ctrl-C or a timeout (:func:`gpunet.worker.runner.stop_job`), restarting a
worker whose thread is stuck in C code so that the device is free again.
Plain and metered jobs (:class:`gpunet.client.submit.RemoteJob`) and verified
ones (:class:`gpunet.client.verified.VerifiedJob`) supply only what differs.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sys
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from gpunet.client.received import live_event
from gpunet.errors import CellTimeoutError, ResultTooLargeError, UnpicklableInputError, WorkerLostError
from gpunet.wire import CODEC, PICKLE, PassedOn, Pickled, pickle_value, stream_allowance
from gpunet.worker.runner import stop_job

if TYPE_CHECKING:  # pragma: no cover
    from distributed import Client, Future

    from gpunet.metering.meter import Meter
    from gpunet.ui.progress import JobProgress
    from gpunet.wire import Job, JobResult

logger = logging.getLogger(__name__)


class Connection(Protocol):
    """What sending and following a job needs of its network (the arrows point one
    way: :class:`gpunet.client.network.Network` is one, and no job module imports it;
    each member is documented there)."""

    client: Client
    meter: Meter | None
    topic: str
    result_format: str
    max_result_bytes: int
    max_stream_bytes_per_s: int
    metered: bool
    reuses_results: bool
    #: whether a job's data may be scattered to one worker, for the others to fetch (not on
    #: an open network, whose providers' workers fetch nothing from each other)
    scatters: bool

    def register_job(self, handle: Any) -> None: ...
    def forget_job(self, job_id: str) -> None: ...
    def call_scheduler(self, handler: str, **kwargs: Any) -> Any: ...
    def metering_state(self) -> dict[str, Any] | None: ...
    def scheduler_workers(self, *, fresh: bool = False) -> dict[str, dict[str, Any]]: ...
    def check_placement(self, resources: dict[str, float]) -> None: ...
    def waiting_reason(self, resources: dict[str, float], workers: list[str] | None = None) -> str: ...
    def workers_with(self, *, min_tflops: float) -> list[str]: ...
    def hold_rate(self, max_rate: float | None = None) -> float: ...
    def timeout_for(self, timeout: float | None, *, count: int = 1, max_credits: float | None = None,
                    max_rate: float | None = None) -> float: ...
    def release_unsent(self, holds: list[str]) -> None: ...
    def release_soon(self, futures: list[Any]) -> None: ...
    def sent(self) -> None: ...
    def submit(self, job: Any, **options: Any) -> Any: ...


#: Inputs bigger than this travel scattered to the workers, not inside the task.
SCATTER_THRESHOLD_BYTES = 256 * 1024

#: How long a stopped job's thread may take to leave before its worker is restarted.
STOP_GRACE_S = 1.0

#: How long reading the exception of a task already in error may take.
FAILURE_WAIT_S = 1.0

#: How often a job's data is sent to the workers when workers leave while it travels.
SCATTER_ATTEMPTS = 3


def scatter_surviving(client: Client, data: Any, *, timeout: float | None) -> Future:
    """``client.scatter(data)`` that survives workers leaving while it travels, within
    ``timeout`` seconds in all (None: each try as long as Dask takes).

    Never with ``broadcast``: Dask's broadcast replicates to the workers it chose and
    raises a bare ``KeyError`` when one of them is gone, or retries a dead one for
    minutes; sent to one worker, the data reaches the others as their tasks need it.
    A send to a worker that died but is not yet known gone waits for Dask's connect
    timeout (30 s), so each try is cut off at the time left. A send that fails as
    workers leave is tried again on those that remain, then :class:`WorkerLostError`
    (or :class:`CellTimeoutError`, when the time ran out) says what happened."""
    deadline = None if timeout is None else time.monotonic() + max(timeout, 1.0)
    failure: BaseException | None = None
    for _ in range(SCATTER_ATTEMPTS):
        key = f"gpunet-data-{uuid.uuid4().hex}"  # ours, so that a send cut off can be released
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            break
        try:
            if left is None:
                return client.scatter({key: data}, hash=False)[key]
            return client.sync(asyncio.wait_for, client._scatter({key: data}, hash=False, timeout=left), left)[key]
        except (KeyError, OSError) as exc:  # CommClosedError and TimeoutError are OSErrors
            logger.warning("gpunet: sending a job's data failed as workers left (%s: %s); trying again",
                           type(exc).__name__, exc)
            failure = exc
            forget_keys(client, [key])
    if timeout is not None and (failure is None or isinstance(failure, TimeoutError)):
        raise CellTimeoutError(f"the job's data could not be sent to the workers within its timeout of {timeout:g} s "
                               "(workers kept leaving while it was sent). Nothing ran; run it again, or give it "
                               "more time (--timeout).")
    raise WorkerLostError(f"the job's data could not be sent to the workers: they kept leaving while it was sent "
                          f"({type(failure).__name__}: {failure}). Nothing ran; run it again.") from None


def forget_keys(client: Client, keys: list[str]) -> None:
    """Tell the scheduler this client no longer wants ``keys`` (data of a send that was
    cut off: the scheduler may hold it although no future here names it)."""
    from distributed import Future

    try:
        client.cancel([Future(key, client, inform=False) for key in keys])
    except Exception as exc:  # noqa: BLE001 - a closed client holds nothing
        logger.debug("gpunet: could not release %s: %s", keys, exc)


def stop_on_workers_soon(client: Client, running: str, reason: str, workers: list[str]) -> None:
    """Ask ``workers`` to stop the threads of ``running`` (a job id, or ``job/index``)
    without waiting for them: a worker that died but is not yet known gone would hold
    a waiting caller for Dask's connect timeout (30 s), past the job's own timeout."""
    async def send() -> None:
        try:
            await client._run(stop_job, running, reason, STOP_GRACE_S, workers=workers, on_error="ignore")
        except Exception as exc:  # noqa: BLE001 - the worker is gone, or the client closed: nothing to stop
            logger.debug("gpunet: could not stop %s on %s: %s", running, workers, exc)

    try:
        client.loop.add_callback(send)
    except Exception as exc:  # noqa: BLE001 - a closed client's loop
        logger.debug("gpunet: could not stop %s: %s", running, exc)


def gather_within(client: Client, futures: list[Future], timeout: float | None) -> list[Any]:
    """``client.gather(futures)``, bounded by ``timeout`` seconds (None: unbounded):
    a result whose worker died before it was fetched otherwise waits forever.
    Raises :class:`TimeoutError` when the time is up."""
    if timeout is None:
        return client.gather(futures)
    return client.sync(asyncio.wait_for, client._gather(futures), max(timeout, 0.001))


def failure_of(future: Future) -> BaseException | None:
    """The exception of ``future`` if it is in error now, without waiting: None when it
    is not (a task lost with its worker goes back to pending while Dask runs it again,
    and ``future.exception()`` would then wait for that run, maybe forever)."""
    if future.status != "error":
        return None
    try:
        return future.exception(timeout=FAILURE_WAIT_S)  # already here: the task is in error
    except Exception:  # noqa: BLE001 - it left the error state meanwhile
        return None


def new_job_id() -> str:
    """A fresh job id (also the prefix of its Dask keys)."""
    return uuid.uuid4().hex[:16]


def pickled(value: Any, what: str, *, name: str | None = None) -> bytes | Pickled:
    """``value`` pickled once, its large buffers kept apart to travel as Dask frames
    (:func:`gpunet.wire.pickle_value`), or :class:`UnpicklableInputError` naming
    ``what`` (an input's name, "map item 3") and its type. A :class:`~gpunet.wire.PassedOn`
    (what a notebook pickled, passed on by the gateway) is already the pickle."""
    if isinstance(value, PassedOn):
        return value.blob
    try:
        return pickle_value(value)
    except Exception as exc:  # noqa: BLE001 - pickling fails in many ways
        type_name = f"{type(value).__module__}.{type(value).__qualname__}".removeprefix("builtins.")
        raise UnpicklableInputError(
            f"{what} ({type_name}) cannot be pickled, so it cannot travel to a worker "
            f"({type(exc).__name__}: {exc}). Create it on the worker instead (inside the cell or function), "
            "or choose the inputs with --in.",
            name=name or what,
            type_name=type_name,
        ) from None


class JobHandle(ABC):
    """A job sent to the network, followed until its results are back.

    The handle owns what every job shares: waiting with a deadline, the job's live
    events (where it started, its output text), progress, and stopping. A kind of
    job supplies only what differs: :attr:`completed`, :meth:`_look`
    (what finished since the last look), :meth:`_outcome` (the results once done),
    :meth:`stop`, and optionally :meth:`_limits` and :meth:`_shows`. A handle is
    registered with its network (which hands it the job's topic events) before its
    first task is sent, so that no event is missed.
    """

    #: Longest sleep of the waiter between looks at the job.
    POLL_S = 0.5

    def __init__(self, network: Connection, job: Job, *, count: int, mapped: bool,
                 resources: dict[str, float] | None = None, allowed_workers: list[str] | None = None) -> None:
        self.network = network
        self.job = job
        self.count = count
        self.mapped = mapped
        #: how many tasks its units travel as (fewer than ``count`` for a map sent in chunks)
        self.tasks = count
        self.resources = resources or {}
        self.allowed_workers = allowed_workers
        self.submitted = time.monotonic()
        #: the monotonic time the job must be done by, gathering included (set by wait())
        self.deadline: float | None = None
        self.stopped_because: str | None = None
        #: the timeout the waiter keeps (seconds from when the job was sent), for every wait
        self.timeout: float | None = None
        #: the job's live events, handed over by the network (client event loop thread)
        self.events: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        #: set whenever something happened that the waiter should look at
        self.wake = threading.Event()
        #: (worker, device) of each start of the job, in order (a re-run adds one)
        self.workers_seen: list[tuple[str, str]] = []
        #: when the last "started" event arrived
        self.started_at: float | None = None
        #: the last output chunk shown, by item index (None for a single job)
        self.shown_seq: dict[int | None, int] = {}
        #: live output text shown (a CODEC job's is capped), and whether the cap was reached
        self.text_shown = 0
        self.text_capped = False
        #: the credit holds the job placed (metered networks)
        self.holds: list[str] = []

    # -- what each kind of job supplies ------------------------------------------------
    @property
    @abstractmethod
    def completed(self) -> int:
        """How many units of the job have an outcome."""

    def _look(self) -> None:
        """Take in what finished since the last look (called by the waiter)."""

    @abstractmethod
    def _outcome(self, progress: JobProgress | None, echo: bool) -> list[JobResult]:
        """The results, in item order, once :meth:`done` (or the job's error, raised)."""

    def _limits(self) -> list[tuple[float, Callable[[], None]]]:
        """Deadlines besides the timeout: (monotonic time, what to do then)."""
        return []

    def _shows(self, message: dict[str, Any]) -> bool:
        """Whether a live event is shown (a verified job shows one copy's)."""
        return True

    @abstractmethod
    def stop(self, reason: str) -> None:
        """Stop the job on its workers; ``reason`` says why ("interrupted", "timeout")."""

    # -- shared ------------------------------------------------------------------------
    def time_left(self) -> float | None:
        """Seconds left of the job's timeout, counted from when it was sent (None: no limit)."""
        return None if self.timeout is None else self.submitted + self.timeout - time.monotonic()

    def done(self) -> bool:
        """True once every unit of the job has an outcome."""
        return self.completed >= self.count

    def on_event(self, message: dict[str, Any]) -> None:
        """A live event of the job (called on the client's event loop thread); one its
        own worker did not sign is ignored and logged."""
        accepted = live_event(self.job, message)
        if accepted is not None:
            self._on_live_event(accepted)

    def _on_live_event(self, message: dict[str, Any]) -> None:
        self.events.put(message)
        self.wake.set()

    def fetch(self, futures: list[Future]) -> list[Any]:
        """Gather ``futures`` within what is left of the job's deadline (--timeout
        covers gathering too): past it, :class:`CellTimeoutError`, nothing loaded."""
        left = None if self.deadline is None else self.deadline - time.monotonic()
        try:
            return gather_within(self.network.client, futures, left)
        except TimeoutError:
            self.stop("timeout")
            raise CellTimeoutError(
                f"the job finished, but its results did not arrive within its timeout of "
                f"{self.deadline - self.submitted:g} s and were not loaded; give it more time (--timeout) "
                "or return less.") from None

    def fetch_within_cap(self, futures: list[Future],
                         fetch: Callable[[list[Future]], list[Any]] | None = None) -> list[Any]:
        """``fetch`` (default :meth:`fetch`) ``futures`` a message within the job's
        ``max_result_bytes`` at a time (the results gathered together otherwise come in
        one message, which a notebook that does not trust its providers refuses over its
        cap), each as large as the scheduler says it is: where a worker said less, its
        results are fetched again one by one. Serves plain maps and verified ones alike."""
        fetch = fetch or self.fetch
        if self.job.result_format == PICKLE or len(futures) < 2:
            return fetch(futures)
        sizes = self.network.client.nbytes([future.key for future in futures], summary=False)
        parts: list[list[Future]] = [[]]
        size = 0
        for future in futures:
            nbytes = max(0, int(sizes.get(future.key, 0)))
            if parts[-1] and size + nbytes > self.job.max_result_bytes:
                parts.append([])
                size = 0
            parts[-1].append(future)
            size += nbytes
        raws: list[Any] = []
        for part in parts:
            try:
                raws += fetch(part)
            except ResultTooLargeError:
                if len(part) == 1:
                    raise
                raws += [fetch([future])[0] for future in part]
        return raws

    def wait(self, timeout: float | None = None, *, progress: JobProgress | None = None,
             echo: bool = True) -> list[JobResult]:
        """Block until the job is done and return its results (in item order).

        Prints live stdout/stderr (``echo``), moves ``progress`` (saying why the job
        still waits in the queue), and stops the job on its workers on Ctrl-C, after
        ``timeout`` seconds (counted from when it was sent), or on any error.
        """
        self.timeout = timeout
        deadline = self.deadline = None if timeout is None else self.submitted + timeout
        try:
            while True:
                self.wake.clear()
                self._drain(progress, echo)
                self._look()
                if self.done():
                    break
                limits = self._limits()
                if deadline is not None:
                    limits.append((deadline, lambda: self._timed_out(timeout)))
                pause = self.POLL_S
                for when, reached in limits:
                    left = when - time.monotonic()
                    if left <= 0:
                        reached()  # raises
                    pause = min(pause, left)
                self.wake.wait(pause)
                if progress is not None:
                    progress.tick(done=self.completed)
                    if self.paused_because is not None and progress.state != "paused":
                        progress.paused(self.paused_because)
                    elif progress.wants_reason():
                        progress.waiting(self.network.waiting_reason(self.resources, self.allowed_workers))
        except KeyboardInterrupt:
            self.stop("interrupted")
            raise
        except BaseException as exc:
            if self.stopped_because is None:  # a device left busy by a job nobody waits for is paid for nothing
                self.stop(f"stopped by an error ({type(exc).__name__})")
            raise
        finally:
            self.network.forget_job(self.job.job_id)
            if self.network.meter is not None:  # usage figures wait for the scheduler to close them
                self.network.meter.finished(self.placed_holds())
                self.network.meter.job_done(self.job.job_id)
        return self._outcome(progress, echo)

    @property
    def paused_because(self) -> str | None:
        """Why the job sends no more of its items (None while nothing holds it back)."""
        return None

    def placed_holds(self) -> list[str]:
        """The credit holds this job placed (none on an unmetered network)."""
        return list(self.holds)

    def _count(self, results: list[JobResult]) -> None:
        """Add what ran to the session's per-worker tally (metered networks)."""
        meter = self.network.meter
        if meter is not None:
            for result in results:
                meter.count(result.worker, result.device, result.seconds)

    def _timed_out(self, timeout: float) -> None:
        never_started = not self.workers_seen and not self.completed
        why = self.network.waiting_reason(self.resources, self.allowed_workers) if never_started else ""
        self.stop("timeout")
        if never_started:
            raise CellTimeoutError(
                f"the job did not start within its timeout of {timeout:g} s and was stopped: it was still "
                f"{why}. Start or wait for workers (gpunet provide), or give it more time (--timeout)."
            )
        where = f" on {self.workers_seen[-1][0]}" if self.workers_seen else ""
        raise CellTimeoutError(
            f"the job did not finish within its timeout of {timeout:g} s (queued and running){where} "
            "and was stopped; give it more time (--timeout) or make it smaller."
        )

    def _drain(self, progress: JobProgress | None, echo: bool) -> None:
        """Show the live events that came: where the job started, its output text."""
        while True:
            try:
                message = self.events.get_nowait()
            except queue.Empty:
                return
            if not self._shows(message):
                continue
            kind = message.get("kind")
            if kind == "started":
                worker, device = message["worker"], message["device"]
                lost = self.workers_seen[-1][0] if self.workers_seen else None
                self.workers_seen.append((worker, device))
                self.started_at = time.monotonic()
                if progress is not None:
                    progress.running(worker, device, rerun_after=lost)
            elif kind == "installing" and progress is not None:
                progress.installing(str(message.get("text", "")))
            elif kind == "stream" and echo:
                index = message.get("index")
                if message["seq"] > self.shown_seq.get(index, 0) and self._within_text_cap(message["text"]):
                    self.shown_seq[index] = message["seq"]
                    write(message["name"], message["text"])

    def _within_text_cap(self, text: Any) -> bool:
        """Whether live output text still fits the job's cap (CODEC jobs: a provider's
        worker could flood the notebook); past it, one note and nothing more."""
        if self.job.result_format != CODEC or not isinstance(text, str):
            return isinstance(text, str)
        self.text_shown += len(text)
        allowance = stream_allowance(self.job, time.monotonic() - self.submitted)
        if self.text_shown <= allowance:
            return True
        if not self.text_capped:
            self.text_capped = True
            write("stderr", f"[gpunet: live output over its cap of {self.job.max_stream_bytes_per_s:,} bytes per "
                            "second; the rest is not shown]\n")
        return False

    def echo_rest(self, result: JobResult) -> None:
        """Show the output text of ``result`` that was not shown live."""
        shown = self.shown_seq.get(result.index, 0)
        for seq, name, text in result.streams:
            if seq > shown:
                write(name, text)
        if result.streams:
            self.shown_seq[result.index] = result.streams[-1][0]


def stop_job_everywhere(network: Connection, job_id: str, futures: list[Future], reason: str) -> None:
    """Cancel ``futures`` and stop job ``job_id``'s threads on every worker; a worker
    whose thread does not leave within :data:`STOP_GRACE_S` restarts (under a Nanny)."""
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


def write(name: str, text: str) -> None:
    """Show a job's output text on this process's stdout or stderr, as it came."""
    stream = sys.stderr if name == "stderr" else sys.stdout
    stream.write(text)
    stream.flush()
