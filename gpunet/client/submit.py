"""Sending jobs: plain, metered and verified submission, and decoding what comes back.

:func:`submit` places a job's hold on a metered network (one for a cell, one shared
by a map's items), refusing it before anything is sent when the session cannot
pay, then sends it as Dask tasks running :func:`gpunet.worker.runner.run_job`; a
job with ``verify`` goes to :class:`gpunet.client.verified.VerifiedJob` instead.
:class:`RemoteJob` is the handle of a plain or metered job (waiting, live output
and stopping are :class:`gpunet.client.handle.JobHandle`'s).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import cloudpickle
import dask
from distributed.scheduler import KilledWorker

from gpunet import codec, wire
from gpunet.client.handle import (
    SCATTER_THRESHOLD_BYTES,
    JobHandle,
    failure_of,
    new_job_id,
    pickled,
    scatter_surviving,
    stop_job_everywhere,
    write,
)
from gpunet.client.received import accept, accept_chunk
from gpunet.client.verified import VerifiedJob
from gpunet.metering.growth import EXPECTED_MARGIN, MapGrowth, function_key
from gpunet.metering.meter import expected_hold, hold_price
from gpunet.errors import (
    BudgetError,
    GpunetError,
    PackageError,
    ProviderDataError,
    RemoteCellError,
    ResultTooLargeError,
    UnsupportedResultError,
    VerificationError,
    WorkerLostError,
)
from gpunet.verify.quorum import Policy, tolerance_for
from gpunet.wire import Job, JobResult, result_from_event
from gpunet.worker.runner import run_chunk, run_job

if TYPE_CHECKING:  # pragma: no cover
    from distributed import Future

    from gpunet.client.handle import Connection
    from gpunet.kernels import Tolerance
    from gpunet.ui.progress import JobProgress

logger = logging.getLogger(__name__)

#: How often a paused map (see :class:`MapSlices`) tries again to hold for its next items.
SLICE_RETRY_S = 0.5

#: A map's items travel in chunks, at most this many items a task (what the scheduler,
#: and a gateway, spend per task is then shared by them), while every worker's slot still
#: gets at least MAP_TASKS_PER_SLOT tasks, so that the items spread over every worker (a
#: map of a few long items goes an item a task).
MAP_CHUNK_ITEMS = 16
MAP_TASKS_PER_SLOT = 16


def map_chunks(count: int, slots: int) -> list[range]:
    """A map of ``count`` items on workers with ``slots`` slots in all, as the runs of
    items that travel as one task each (:func:`gpunet.worker.runner.run_chunk`), in
    order, their lengths differing by one at most."""
    size = max(1, min(MAP_CHUNK_ITEMS, count // (MAP_TASKS_PER_SLOT * max(1, slots))))
    tasks = -(-count // size)
    length, longer = divmod(count, tasks)
    starts = [number * length + min(number, longer) for number in range(tasks + 1)]
    return [range(start, stop) for start, stop in zip(starts, starts[1:])]


def worker_slots(network: Connection, workers: list[str] | None) -> int:
    """How many tasks the network's workers (those in ``workers``, if given) run at once."""
    infos = network.scheduler_workers()
    chosen = infos.values() if not workers else [infos[address] for address in workers if address in infos]
    return sum(max(1, int((info.get("resources") or {}).get(wire.DEVICE_RESOURCE, info.get("nthreads", 1))))
               for info in chosen)


def function_job(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], *,
                 topic: str | None, announce: bool = True) -> Job:
    """A :class:`Job` that calls ``fn(*args, **kwargs)`` (map items go first)."""
    arguments = pickled((args, kwargs), f"the arguments of {getattr(fn, '__name__', fn)!r}")
    return Job(new_job_id(), function=fn, arguments=arguments, topic=topic, announce=announce)


def function_value(result: JobResult) -> Any:
    """The return value of a function job, or its remote exception raised here."""
    raise_for_error(result, label="" if result.index is None else f", item {result.index}")
    if result.unpicklable_outputs:
        name, type_name, reason = result.unpicklable_outputs[0]
        if result.result_format == wire.CODEC:
            raise UnsupportedResultError(reason, name=name, type_name=type_name)
        raise GpunetError(f"the {name} ({type_name}) cannot be pickled to come back from {result.worker}: {reason}")
    return codec.load(result.value, result.result_format, what="the return value") if result.value is not None else None


def raise_for_error(result: JobResult, *, label: str = "") -> None:
    """Raise the job's remote exception here, with its remote traceback.

    Where the notebook trusts its providers the original exception is unpickled
    where it can be; elsewhere (and where it cannot be) a :class:`RemoteCellError`
    carries its type name, message and traceback, and is also the built-in
    exception type it names, so ``except KeyError`` works in the notebook either
    way. IPython shows the remote traceback (its line numbers are the cell's)
    instead of gpunet's own frames.
    """
    error = result.error
    if error is None:
        return
    if error["ename"] == wire.INTERRUPTED:
        raise GpunetError(f"the job was stopped on {result.worker}{label}")
    if error["ename"] == wire.PACKAGES:
        raise PackageError(f"{error['evalue']}{label}. Nothing of the job ran there; %gpunet env shows which "
                           "providers have which packages.")
    if error["ename"] == wire.TOO_LARGE:
        raise ResultTooLargeError(f"the job on {result.worker}{label} went over a cap: {error['evalue']}; nothing "
                                  "of its result was loaded (return or print less, or raise the cap: "
                                  "max_result_bytes= / max_stream_bytes_per_s= when connecting)")
    remote_tb = error["traceback"]
    header = f"Remote traceback (worker {result.worker}, {result.device}{label}):\n"
    exc = None
    if result.result_format == wire.PICKLE and error.get("exception") is not None:
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
        exc = RemoteCellError.of(error["ename"], error["evalue"], header + remote_tb)
    raise exc


class RemoteJob(JobHandle):
    """A plain or metered job: the Dask futures of one cell, one function call, or
    every item of a map. Make one with :meth:`submit`."""

    #: How often a map's waiter looks at its futures (for items done, failed in Dask, or
    #: lost): every MAP_POLL_S_PER_ITEM per item, within MAP_POLL_S_RANGE, so that a small
    #: map is seen done within milliseconds and a look at 20,000 items stays rare.
    MAP_POLL_S_PER_ITEM = 2.5e-6
    MAP_POLL_S_RANGE = (0.005, 0.05)
    #: A map's finished items are fetched while the rest still run, this many at a time,
    #: so that at the end only the last few are left to fetch.
    EARLY_FETCH_ITEMS = 250

    def __init__(self, network: Connection, job: Job, *, items: int | None, resources: dict[str, float],
                 allowed_workers: list[str] | None) -> None:
        super().__init__(network, job, count=1 if items is None else items, mapped=items is not None,
                         resources=resources, allowed_workers=allowed_workers)
        if self.mapped:
            low, high = self.MAP_POLL_S_RANGE
            self.POLL_S = min(high, max(low, self.count * self.MAP_POLL_S_PER_ITEM))
        self.futures: list[Future] = []
        self.index_of: dict[str, int | None] = {}
        #: a map sent in chunks: each task's key -> the items it runs
        self.items_of: dict[str, range] = {}
        #: results that came as events, by item index (None for a single job)
        self.results: dict[int | None, JobResult] = {}
        #: indices whose future finished
        self.finished: set[int | None] = set()
        #: the device time its --max-credits allows (metered networks)
        self.credit_limit_s: float | None = None
        #: scattered data the tasks depend on, held until the job is done
        self._kept: list[Future] = []
        #: a map's items that finished well and are not fetched yet
        self._finished_unfetched: list[Future] = []
        #: a map sent in slices, as its holds can be placed (None: sent whole)
        self.slicing: MapSlices | None = None
        #: the session's pre-authorized hold this job draws on (None: it placed its own)
        self.drew_on: str | None = None
        #: keeps a metered map's holds ahead of what its items cost (None: not such a map)
        self.growth: MapGrowth | None = None
        #: a map sent in chunks: what sends its items again, an item a task (its shared job,
        #: inputs, Dask options and items' pickles), and, metered, what each item may be paid
        #: and the price limit its holds are placed at
        self.again: tuple[Any, Any, dict[str, Any], list[bytes]] | None = None
        self.item_amount, self.hold_rate = 0, 0.0
        #: items sent again (a chunk's worker ended it before them)
        self.sent_again: set[int] = set()
        self._lock = threading.Lock()

    @classmethod
    def submit(cls, network: Connection, job: Job, *, resources: dict[str, float], items: list[Any] | None = None,
               workers: list[str] | list[list[str]] | None = None,
               annotations: dict[str, Any] | None = None, timeout: float | None = None,
               slicing: MapSlices | None = None, chunks: list[range] | None = None) -> RemoteJob:
        """Send ``job`` to ``network`` with the given placement (``workers``: one
        list for all items, or one per item); ``annotations`` (the job's hold)
        travel with its tasks as the ``gpunet`` annotation; sending its data waits
        at most ``timeout`` seconds. With ``slicing`` only the map's first
        ``slicing.first`` items are sent now (their hold is ``annotations``'), the
        rest as holds for them can be placed (:meth:`_send_more`). With ``chunks``
        (:func:`map_chunks`) each run of items travels as one task."""
        with dask.annotate(**{wire.ANNOTATION: annotations}) if annotations else contextlib.nullcontext():
            client = network.client
            blobs = None if items is None else [pickled(item, f"map item {index}") for index, item in enumerate(items)]
            job.result_event = blobs is None and job.result_format == wire.PICKLE
            per_item = bool(workers) and isinstance(workers[0], list)
            options = dict(resources=resources, pure=False, workers=None if per_item else workers,
                           allow_other_workers=False)
            inputs = None
            if network.scatters and sum(len(blob) for blob in job.inputs.values()) > SCATTER_THRESHOLD_BYTES:
                inputs, job.inputs = scatter_surviving(client, job.inputs, timeout=timeout), {}
            remote = cls(network, job, items=None if blobs is None else len(blobs), resources=resources,
                         allowed_workers=None if per_item else workers)
            network.register_job(remote)
            shared = None
            if blobs is None:
                # large arguments travel scattered, once, as a cell's large inputs do
                if network.scatters and len(job.arguments) > SCATTER_THRESHOLD_BYTES:
                    shared = scatter_surviving(client, job, timeout=timeout)
                futures = [client.submit(run_job, shared or job, None, None, inputs, key=f"gpunet-{job.job_id}",
                                         **options)]
            else:
                keys = [f"gpunet-{job.job_id}-{index}" for index in range(len(blobs))]
                # The job (code, function, inputs) goes to the workers once, as data the
                # tasks depend on; each task then carries only its item (where workers may
                # fetch it from each other: see Connection.scatters).
                shared = scatter_surviving(client, job, timeout=timeout) if network.scatters else job
                if per_item:  # one submit per item, each pinned to its own workers
                    futures = [client.submit(run_job, shared, blob, index, inputs, key=key,
                                             **{**options, "workers": where})
                               for index, (blob, key, where) in enumerate(zip(blobs, keys, workers))]
                elif chunks is not None:
                    futures = []
                    for length in sorted({len(run) for run in chunks}, reverse=True):  # the longer come first
                        runs = [run for run in chunks if len(run) == length]
                        with dask.annotate(**{wire.ANNOTATION: {**annotations, "items": length}}) if annotations \
                                else contextlib.nullcontext():  # each paid at least a credit an item
                            futures += client.map(
                                run_chunk, [shared] * len(runs), [blobs[run.start:run.stop] for run in runs],
                                [run.start for run in runs], [inputs] * len(runs),
                                key=[f"gpunet-{job.job_id}-{run.start}-{run.stop - 1}" for run in runs], **options)
                    remote.items_of = {future.key: run for future, run in zip(futures, chunks)}
                    remote.tasks = len(chunks)
                    remote.again = (shared, inputs, options, blobs)
                else:
                    sent = len(blobs) if slicing is None else slicing.first
                    futures = client.map(run_job, [shared] * sent, blobs[:sent], range(sent),
                                         [inputs] * sent, key=keys[:sent], **options)
                    if slicing is not None:
                        slicing.blobs, slicing.send = blobs, (shared, inputs, options)
                        remote.slicing = slicing
            remote._attach(futures)
            remote._kept = [f for f in (inputs, shared if network.scatters else None) if f is not None]
            return remote

    def _attach(self, futures: list[Future]) -> None:
        self.index_of = {future.key: (index if self.mapped else None) for index, future in enumerate(futures)}
        self.futures = futures
        self._unfinished = list(futures)
        if not self.mapped:  # one callback is cheap; thousands would each wake the event loop
            futures[0].add_done_callback(self._on_done)

    def _send_more(self) -> None:
        """A map sent in slices: send its next items once a hold for them is placed;
        while none can be (the session's credits are held by the items running), the
        map pauses, saying so once."""
        slicing = self.slicing
        if slicing is None or slicing.sent >= len(slicing.blobs) or time.monotonic() < slicing.next_try:
            return
        placed = slicing.place(len(slicing.blobs) - slicing.sent)
        if placed is None:
            slicing.next_try = time.monotonic() + SLICE_RETRY_S
            if not slicing.paused:
                slicing.paused = True
                write("stderr", f"[gpunet: the map paused after {slicing.sent} of {len(slicing.blobs)} items: the "
                                f"session's credits are held by the items running; it goes on as they are paid "
                                f"(a larger --budget avoids the wait)]\n")
            return
        hold, count = placed
        slicing.paused = False
        shared, inputs, options = slicing.send
        start, stop = slicing.sent, slicing.sent + count
        with dask.annotate(**{wire.ANNOTATION: wire.annotation(hold, slicing.amount, tasks=count,
                                                                       topic=self.job.topic)}):
            futures = self.network.client.map(
                run_job, [shared] * count, slicing.blobs[start:stop], range(start, stop), [inputs] * count,
                key=[f"gpunet-{self.job.job_id}-{index}" for index in range(start, stop)], **options)
        slicing.sent = stop
        self.holds.append(hold)
        self.index_of.update({future.key: index for index, future in zip(range(start, stop), futures)})
        self.futures = self.futures + futures
        self._unfinished.extend(futures)

    def _look(self) -> None:
        """A map's items that failed in Dask, or whose results were too large to come
        as events, show only in their futures (a cell's future calls back instead)."""
        if not self.mapped:
            return
        self._send_more()
        still = []
        for future in self._unfinished:
            if future.status == "pending":
                still.append(future)
            else:
                with self._lock:
                    self.finished.update(self._items(future))
                if future.status == "finished":
                    self._finished_unfetched.append(future)
        self._unfinished = still
        if still and sum(len(self._items(future)) for future in self._finished_unfetched) >= self.EARLY_FETCH_ITEMS:
            self._fetch_early()

    def _items(self, future: Future) -> range | tuple[int | None]:
        """The items ``future``'s task runs: a chunk's, or its one item (or the cell)."""
        return self.items_of.get(future.key) or (self.index_of[future.key],)

    def _accepted(self, future: Future, raw: Any) -> dict[int | None, JobResult]:
        """The results of ``future``'s items, as the notebook may use them (by item index)."""
        run = self.items_of.get(future.key)
        if run is None:
            index = self.index_of[future.key]
            return {index: accept(raw, self.job, index)}
        return dict(zip(run, accept_chunk(raw, self.job, run)))

    def _fetch_early(self) -> None:
        """Fetch and check the results of the map's items that finished while others
        still run (:meth:`_gather` then fetches only the rest); a fetch Dask fails is
        left to :meth:`_gather`, which says why."""
        batch, self._finished_unfetched = self._finished_unfetched, []
        with self._lock:
            batch = [future for future in batch if self._items(future)[0] not in self.results]
        try:
            raws = self.fetch_within_cap(batch) if batch else []
        except GpunetError:
            raise
        except Exception:  # noqa: BLE001 - a worker holding them left: _gather tells
            return
        for future, raw in zip(batch, raws):
            accepted = self._accepted(future, raw)
            with self._lock:
                for index, result in accepted.items():
                    self.results.setdefault(index, result)

    # -- callbacks from the client's event loop -------------------------------------------
    def _on_live_event(self, message: dict[str, Any]) -> None:
        """A live event; a small result comes as one too, saving the gather (only where
        results come pickled: a CODEC job's result comes only from its own future)."""
        if message.get("kind") != "result":
            super()._on_live_event(message)
            return
        if self.job.result_format != wire.PICKLE:
            logger.warning("gpunet: ignored a result event for job %s: its result comes from its future", self.job.job_id)
            return
        with self._lock:
            self.results.setdefault(message.get("index"), result_from_event(message["result"]))
            complete = len(self.results) >= self.count
        if not self.mapped or complete:  # the waiter polls a map a few times a second; no wake-up per item
            self.wake.set()

    def _on_done(self, future: Future) -> None:
        with self._lock:
            self.finished.add(self.index_of[future.key])
        self.wake.set()

    @property
    def completed(self) -> int:
        """How many items are done: they have a result or a finished future (well or not)."""
        with self._lock:
            return len(self.finished | self.results.keys())

    # -- waiting ------------------------------------------------------------------------
    @property
    def paused_because(self) -> str | None:
        """Why the map sends no more of its items: its budget cannot cover them."""
        return None if self.growth is None else self.growth.paused

    def unfinished_keys(self) -> list[str]:
        """The keys of the tasks whose items are not finished here (all of them for a job not sent yet)."""
        with self._lock:
            done = self.finished | self.results.keys()
        return [key for key, index in list(self.index_of.items())
                if (self.items_of.get(key) or (index,))[0] not in done]

    def _outcome(self, progress: JobProgress | None, echo: bool) -> list[JobResult]:
        if self.growth is not None:
            self.growth.stop()
        results = self._gather()
        self._count(results)
        if self.mapped and self.network.meter is not None:  # the next map of this function is held by it
            self.network.meter.item_times.observe(function_key(self.job), [result.seconds for result in results])
        if progress is not None and not self.mapped:
            progress.ran_on(results[0].worker, results[0].device)
        # What came back is all there is: Dask may forget the results now, or, for a
        # single small result (it came as an event), soon (see Network.release_soon).
        if not self.mapped and len(self.results) == self.count:
            self.network.release_soon(self.futures + self._kept)
        self.futures, self._kept, self._unfinished, self._finished_unfetched = [], [], [], []
        self._drain(progress, echo)
        if echo:
            for result in results:
                self.echo_rest(result)
        return results

    def _gather(self) -> list[JobResult]:
        with self._lock:
            have = dict(self.results)
        while True:  # twice at most: items a chunk's worker did not run go again, an item a task
            missing = [future for future in self.futures if self._items(future)[0] not in have]
            self._raise_for_missing(missing)
            try:
                raws = self.fetch_within_cap(missing) if missing else []
            except GpunetError:
                raise
            except Exception as exc:  # noqa: BLE001 - Dask's own errors, from a worker that left
                raise WorkerLostError(f"the results could not be fetched: a worker holding them left "
                                      f"({type(exc).__name__}: {exc}); run it again") from None
            for future, raw in zip(missing, raws):
                have.update(self._accepted(future, raw))
            not_run = [index for index in range(self.count) if index not in have] if self.items_of else []
            if not not_run:
                return [have[index] for index in (range(self.count) if self.mapped else (None,))]
            self._send_again(not_run, max((result.finished - result.started for result in have.values()),
                                          default=0.0))

    def _raise_for_missing(self, missing: list[Future]) -> None:
        """Say why a task whose results are missing has none to fetch (failed, stopped,
        lost), if it has none; nothing for those that finished well."""
        if self.paused_because is not None and missing:  # items that never started: the map paused
            raise BudgetError(f"{self.paused_because}.")
        for future in missing:
            run = self._items(future)
            where = ("this job" if not self.mapped else f"item {run[0]} of this map" if len(run) == 1
                     else f"items {run[0]} to {run[-1]} of this map")
            exc = failure_of(future)
            if exc is not None:
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
                    "the network lost this job (a worker holding its data left, its scheduler restarted, or "
                    "this client was disconnected); run it again"
                )

    def _send_again(self, indices: list[int], seconds: float) -> None:
        """Send again, an item a task, the items of chunks whose workers ended them early
        (their results neared the job's cap: :func:`gpunet.worker.runner.run_chunk`), and
        wait for them. A metered map holds for them as for a map (:func:`hold_for_map`), each
        expected to take ``seconds`` (its items' longest so far). Each item goes again once: an
        item-a-task result is the item's or an error, so a provider cannot make this loop."""
        if self.again is None or self.sent_again.intersection(indices):
            raise ProviderDataError(f"items {indices[0]} to {indices[-1]} of this map came back from no worker; "
                                    "none was loaded")
        self.sent_again.update(indices)
        shared, inputs, options, blobs = self.again
        meter, annotations, again_id = self.network.meter, None, f"{self.job.job_id}-again"
        if meter is not None and self.item_amount:
            need = expected_hold(len(indices), self.item_amount, self.hold_rate, seconds)
            annotations, placed = hold_for_map(meter, again_id, len(indices), self.item_amount, need,
                                               topic=self.job.topic)
            self.holds += placed
        try:
            with dask.annotate(**{wire.ANNOTATION: annotations}) if annotations else contextlib.nullcontext():
                futures = self.network.client.map(
                    run_job, [shared] * len(indices), [blobs[index] for index in indices], indices,
                    [inputs] * len(indices), key=[f"gpunet-{self.job.job_id}-{index}" for index in indices],
                    **options)
            self.index_of.update({future.key: index for index, future in zip(indices, futures)})
            self.futures = self.futures + futures
            while any(future.status == "pending" for future in futures):
                if self.deadline is not None and time.monotonic() > self.deadline:
                    self._timed_out(self.timeout or 0.0)
                time.sleep(self.POLL_S)
        finally:
            if meter is not None:
                meter.job_done(again_id)

    def _close_unknown_tasks(self) -> None:
        """Tasks the scheduler cancelled may never have existed there (their input was
        lost before the graph arrived): have it close their hold, or it stays held."""
        if not self.holds:
            return
        try:
            self.network.call_scheduler(wire.CLOSE_UNKNOWN, hold=self.holds[0],
                                        keys=[future.key for future in self.futures])
        except Exception as exc:  # noqa: BLE001 - the network may be gone: nothing more to do
            logger.warning("gpunet: could not close the hold of job %s: %s", self.job.job_id, exc)

    def _limits(self) -> list[tuple[float, Callable[[], None]]]:
        """A single job's --max-credits runs out at its limit counted from the moment
        it started on a worker (time spent queued costs nothing)."""
        if self.credit_limit_s is None or self.mapped or self.started_at is None:
            return []
        return [(self.started_at + self.credit_limit_s, self._stop_at_credit_limit)]

    def _stop_at_credit_limit(self) -> None:
        """The job ran as long as its --max-credits pays for: the scheduler charges the
        provider's time on the worker (at most the limit), then the job is stopped."""
        charged = self.network.call_scheduler(wire.CHARGE_USED, key=self.futures[0].key)
        worker, device = self.workers_seen[-1] if self.workers_seen else (None, "")
        if worker is not None and self.network.meter is not None:  # its time counts in %gpunet usage too
            self.network.meter.count(worker, device, self.credit_limit_s or 0.0)
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
        if self.growth is not None:
            self.growth.stop()
        if self.slicing is not None:  # what was not sent never will be
            self.slicing.blobs = self.slicing.blobs[: self.slicing.sent]
        stop_job_everywhere(self.network, self.job.job_id, self.futures, reason)


@dataclass
class MapSlices:
    """A map whose items' holds do not fit in the session's credits at once: it is
    sent in slices, each with its own shared hold, as credits come back from the
    items already paid. ``place(n)`` holds for up to ``n`` more items and returns
    ``(hold, how many)``, or None while no item fits."""

    first: int
    amount: int
    place: Callable[[int], tuple[str, int] | None]
    blobs: list[bytes] = field(default_factory=list)
    send: tuple[Any, Any, dict[str, Any]] = (None, None, {})
    sent: int = 0
    paused: bool = False
    next_try: float = 0.0


def slice_placer(meter: Any, job_id: str, amount: int) -> Callable[[int], tuple[str, int] | None]:
    """Holds for a map's next slice: half the session's credits left (at least one
    item's), as many items as that covers; None while not even one item fits."""
    number = iter(range(1, 1 << 30))

    def place(wanted: int) -> tuple[str, int] | None:
        left = meter.credits.usage(meter.session)["left"]
        count = min(wanted, max(left // 2, min(left, amount)) // amount)
        if count < 1:
            return None
        try:
            return meter.hold_shared(f"{job_id}-slice{next(number)}", count=count, amount=amount), count
        except BudgetError:  # another job took the credits meanwhile
            return None

    return place


def hold_for_map(meter: Any, job_id: str, count: int, amount: int, need: int, *,
                 topic: str | None) -> tuple[dict[str, Any], list[str]]:
    """The annotation of ``count`` map items of job ``job_id`` (each paid at most ``amount``),
    holding ``need`` credits for them: drawn on the session's pre-authorized hold where it
    has that much free, else a hold of their own whose items' earnings beyond it the
    pre-authorized hold pays. Returns it and the holds placed (none when drawn);
    :class:`BudgetError` when the session cannot cover it."""
    drawn = meter.draw(job_id, need, count)
    if drawn is not None:
        hold, size = drawn
        return wire.annotation(hold, amount, topic=topic, preauth=size, job=job_id, map_tasks=count), []
    hold = meter.hold_shared(job_id, count=count, amount=amount, total=need)
    return wire.annotation(hold, amount, tasks=count, held=need, overflow=meter.overflow(job_id, count),
                           job=job_id, topic=topic), [hold]


def submit(network: Connection, job: Job, *, resources: dict[str, float], items: list[Any] | None = None,
           workers: list[str] | list[list[str]] | None = None, max_credits: float | None = None,
           timeout: float | None = None, verify: str | Policy | None = None,
           tolerance: Tolerance | None = None, max_rate: float | None = None) -> RemoteJob | VerifiedJob:
    """Send ``job`` (once, or once per item) to ``network`` and return its handle:
    a :class:`RemoteJob`, or a :class:`~gpunet.client.verified.VerifiedJob` with ``verify``.

    ``workers`` restricts where it may run: one list for every item, or one list per
    item (``placement="capability"``). On a metered network the job's hold is placed
    first (see :mod:`gpunet.metering.meter`): one hold for a cell, one shared by a
    map's items; a hold that cannot be placed refuses the job before anything is sent.
    Holds are priced at ``max_rate`` credits per device-second (``network.hold_rate()``:
    the job's price limit), never at the most expensive provider's rate.
    """
    rate = network.hold_rate(max_rate)
    if items is not None and not items:
        raise GpunetError("nothing to send: the map has no items")
    job.result_format = network.result_format
    job.max_result_bytes, job.max_stream_bytes_per_s = network.max_result_bytes, network.max_stream_bytes_per_s
    policy = Policy.parse(verify)
    network.check_placement(resources)
    if policy.active:
        if workers and isinstance(workers[0], list):
            raise VerificationError("placement='capability' pins items to workers, and verification needs "
                                    "copies on other providers' workers: use one or the other")
        return VerifiedJob.submit(network, job, policy, tolerance or tolerance_for(job.code or job.function),
                                  resources=resources, items=items, workers=workers, max_credits=max_credits,
                                  timeout=timeout, max_rate=rate)
    meter = network.meter
    chunks = None  # several items a task, unless they are pinned to workers one by one
    if items is not None and not (workers and isinstance(workers[0], list)):
        chunks = map_chunks(len(items), worker_slots(network, workers))
        if len(chunks) == len(items):
            chunks = None
    if meter is None:
        if max_credits is not None:
            raise GpunetError("--max-credits needs a metered network: connect with --credits URL --token TOKEN, "
                              "or without an address for a local one")
        return RemoteJob.submit(network, job, resources=resources, items=items, workers=workers, timeout=timeout,
                                chunks=chunks)
    count = 1 if items is None else len(items)
    if meter.doubtful:  # holds an outage left in doubt: given back once the service answers again
        meter.resolve_doubtful(network.release_unsent)
    plan = meter.plan(count=count, max_credits=max_credits, timeout=timeout, max_rate=rate)
    per_item = bool(workers) and isinstance(workers[0], list)
    # A cell holds its worst case; a map what its items are expected to cost, with a margin,
    # and grows as they run (--max-credits: that many credits in all).
    growing = items is not None and max_credits is None
    seconds = meter.item_times.expected(function_key(job))
    need = plan.amount if items is None else (
        count * plan.amount if max_credits is not None
        else expected_hold(count, plan.amount, rate, seconds))
    if growing:
        plan.basis = (f"what {count} items are expected to cost, {seconds:.3g} s each at your price "
                      f"limit, {rate:g} credits a device-second (--max-rate), with a {EXPECTED_MARGIN:g}x margin; "
                      f"each item may be paid up to {plan.amount}")
    # a chunk's task may be paid what its items may be, for the time it used
    tasks, task_amount = (count, plan.amount) if chunks is None else (len(chunks), plan.amount * len(chunks[0]))

    def grow(remote: RemoteJob) -> RemoteJob:
        """Keep a map's holds ahead of what its tasks cost while it runs (a chunk's task as
        its items together)."""
        if growing and remote.slicing is None:
            per_task = count / len(remote.futures) if remote.futures else 1.0
            # a task is stopped with the map at its --timeout: it is never paid more than that time
            worst = task_amount if timeout is None else min(task_amount, hold_price(timeout, rate))
            remote.growth = MapGrowth(network, job.job_id, tasks=len(remote.futures), per_item=worst,
                                      held=need, expected_price=hold_price(seconds, rate) * per_task,
                                      unfinished=remote.unfinished_keys)
            remote.growth.start()
        return remote

    drawn = meter.draw(job.job_id, need, tasks)
    if drawn is not None:  # on the session's pre-authorized hold: no request to the credit service
        hold, size = drawn
        try:
            remote = RemoteJob.submit(network, job, resources=resources, items=items, workers=workers,
                                      annotations=wire.annotation(hold, task_amount, topic=job.topic, preauth=size,
                                                                  job=job.job_id,
                                                                  map_tasks=None if items is None else tasks),
                                      timeout=timeout, chunks=chunks)
        except BaseException:
            meter.job_done(job.job_id)
            raise
        remote.credit_limit_s, remote.drew_on = plan.limit_s, hold
        remote.item_amount, remote.hold_rate = plan.amount, rate
        return grow(remote)
    # one hold for the cell, or for the whole map, paid out in parts as its items finish
    slicing = None
    try:
        hold = meter.hold_shared(job.job_id, count=count, amount=plan.amount, plan=plan, total=need)
    except BudgetError:
        # A map whose items' expected price does not fit at once, though what they cost
        # at the least (a credit each) does, goes in slices, each held as credits come back.
        sliceable = items is not None and max_credits is None and not per_item
        if not sliceable or meter.credits.usage(meter.session)["left"] < count:
            raise
        place = slice_placer(meter, job.job_id, plan.amount)
        placed = place(count)
        if placed is None:
            raise
        hold, first = placed
        slicing = MapSlices(first, plan.amount, place, sent=first)
        chunks, tasks, task_amount = None, count, plan.amount  # slices go an item a task
    held = tasks if slicing is None else slicing.first
    try:
        remote = RemoteJob.submit(network, job, resources=resources, items=items, workers=workers,
                                  annotations=wire.annotation(hold, task_amount, tasks=None if items is None else held,
                                                              held=None if items is None or slicing else need,
                                                              overflow=None if items is None or slicing
                                                              else meter.overflow(job.job_id, tasks),
                                                              job=job.job_id, topic=job.topic),
                                  timeout=timeout, slicing=slicing, chunks=chunks)
    except BaseException:
        network.release_unsent([hold])
        meter.job_done(job.job_id)  # a map's watch on the pre-authorized hold, if it had one
        raise
    remote.holds, remote.credit_limit_s = [hold], plan.limit_s
    remote.item_amount, remote.hold_rate = plan.amount, rate
    return grow(remote)
