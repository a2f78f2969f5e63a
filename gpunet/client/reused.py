"""Reusing verified results by content (:mod:`gpunet.reuse`), on the notebook's side.

Before a ``--verify`` cell is sent, :func:`reused_result` asks the scheduler for a
verified result with the cell's reuse key; when there is one, the cell gets a
:class:`ReusedJob`, a handle that is already done, and nothing is held or sent.
After a cell that copies on distinct providers agreed on, :func:`offer_for_reuse`
gives its result to the scheduler, which keeps it only if its own record of the
verdict agrees.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import TYPE_CHECKING, Any

from gpunet import codec, wire
from gpunet.client.handle import JobHandle
from gpunet.client.received import checked_result
from gpunet.reuse import reuse_key
from gpunet.wire import flat_result, result_from_event, result_to_event

if TYPE_CHECKING:  # pragma: no cover
    from gpunet.client.handle import Connection
    from gpunet.provenance import Recorder
    from gpunet.ui.progress import JobProgress
    from gpunet.wire import Job, JobResult

logger = logging.getLogger(__name__)

#: ``GPUNET_REUSE=0`` turns reuse off for the whole process (``gpunet reproduce`` sets it
#: for the notebooks it re-runs: a reproduction that reused results would prove nothing).
REUSE_ENV = "GPUNET_REUSE"


class ReusedJob(JobHandle):
    """A job answered from the network's table of verified results: nothing runs."""

    def __init__(self, network: Connection, job: Job, found: dict[str, Any], *, mapped: bool) -> None:
        # what the table keeps came from providers: as data only, unless the notebook trusts them
        self.results = [checked_result(result, "a reused result") if network.result_format == wire.CODEC
                        else result_from_event(result) for result in found["results"]]
        super().__init__(network, job, count=len(self.results), mapped=mapped)
        #: the provenance record of the run whose result this is
        self.reused_from: dict[str, Any] = found.get("record") or {}

    @property
    def completed(self) -> int:
        """All of it: the results are here."""
        return self.count

    def _outcome(self, progress: JobProgress | None, echo: bool) -> list[JobResult]:
        if echo:
            for result in self.results:
                self.echo_rest(result)
        return self.results

    def stop(self, reason: str) -> None:
        """Nothing runs, so nothing is stopped."""
        self.stopped_because = reason


def reused_result(network: Connection, job: Job, recorder: Recorder | None, *, mapped: bool) -> ReusedJob | None:
    """A handle on the verified result the network keeps for this job's code and
    inputs (saying so), or None: there is none, or its key cannot be known."""
    key = reuse_key(recorder.record) if recorder is not None else None
    found = lookup_reusable(network, key) if key is not None else None
    if found is None:
        return None
    handle = ReusedJob(network, job, found, mapped=mapped)
    say_reused(handle.reused_from)
    return handle


def reuse_allowed() -> bool:
    """Whether this process reuses verified results (not where ``GPUNET_REUSE=0``)."""
    return os.environ.get(REUSE_ENV, "1") != "0"


def lookup_reusable(network: Connection, key: str) -> dict[str, Any] | None:
    """The verified result (``{record, results}``) the scheduler keeps under ``key``, or
    None: there is none, reuse is off here, or the scheduler keeps no table."""
    if not reuse_allowed():
        return None
    try:
        found = network.call_scheduler(wire.REUSE_LOOKUP, key=key)
    except Exception as exc:  # noqa: BLE001 - a scheduler without the table: run it
        logger.warning("gpunet: could not ask the scheduler for a reusable result: %s", exc)
        return None
    if not found or len(found.get("results") or []) == 0:
        return None
    return found


def say_reused(earlier: dict[str, Any]) -> None:
    """The line that says a cell got the verified result of an earlier job, at no cost."""
    verification = earlier.get("verification") or {}
    print(f"gpunet: reused verified result of job {earlier.get('job', '?')} ({verification.get('verdict', '?')} by "
          f"{verification.get('policy', '?')}), at no cost; --no-reuse to run again")


def offer_for_reuse(network: Connection, handle: JobHandle, results: list[JobResult],
                    record: dict[str, Any] | None) -> None:
    """Give a verified cell's result to the scheduler's reuse table (which keeps it
    only if its own verdicts say the copies agreed on it)."""
    if record is None or (record.get("verification") or {}).get("verdict") != "verified" \
            or isinstance(handle, ReusedJob):
        return
    key = reuse_key(record)
    if key is not None:
        store_for_reuse(network, handle, results, key, record)


def as_message(result: JobResult) -> JobResult:
    """``result`` as a message to the scheduler carries it (msgpack): a pickled value as one
    bytes blob (:func:`gpunet.wire.flat_result`), a provider's codec frames as a list of
    bytes, which :func:`gpunet.codec.frames_of` takes back. Never anything Dask would
    have to pickle: the scheduler's table answers other notebooks as data."""
    def plain(blob: Any) -> Any:
        return codec.frames_as_list(blob) if isinstance(blob, codec.Frames) else blob

    flat = flat_result(result)
    return dataclasses.replace(flat, value=plain(flat.value),
                               outputs={name: plain(blob) for name, blob in flat.outputs.items()})


def store_for_reuse(network: Connection, handle: JobHandle, results: list[JobResult], key: str,
                    record: dict[str, Any]) -> None:
    """Give a verified job's result to the scheduler's reuse table under ``key`` (kept only
    if the scheduler's own record of this client's verdict on that job accepted it)."""
    try:
        network.call_scheduler(wire.REUSE_STORE, job=handle.job.job_id, key=key,
                               record=record, results=[result_to_event(as_message(result)) for result in results])
    except Exception as exc:  # noqa: BLE001 - the result stands; it is only not kept for others
        logger.warning("gpunet: could not offer job %s's verified result for reuse: %s", handle.job.job_id, exc)
