"""The one writer: a generic group-commit loop over the only write connection (as datasette's).

``submit(job)`` queues a job and returns a future. The writer takes every job
waiting (up to ``limit``), asks its *unit of work factory* for a unit, applies each
job to it, has it write its changes and commits them in **one transaction**: one
fsync for the whole group. Only then does it answer the futures: a crash before the
commit loses only unanswered jobs, an answered one is on disk.

One group loop runs on an event loop: the writer's own, on a thread of its own, or, where
statements take microseconds (SQLite inside the service), the service's, with only the
commit in a thread (:meth:`Writer.attach_loop`): on the loop thread they never wait for the GIL.

The writer knows no rule of what it writes. A unit has four methods: ``apply(job)`` applies
a job in memory and returns its answer, or refuses it by raising a :class:`CreditsRequestError`
(which answers that job alone); ``flush()`` writes the changes to the connection; ``undo()``
rolls them back in memory when the transaction fails; ``committed()`` publishes them. Any
other exception is a bug in that job, answered with an error while the others of its group
are applied again without it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

from gpunet.errors import CreditsRequestError, CreditsUnavailableError

logger = logging.getLogger(__name__)

GROUP_LIMIT = 2000  # jobs per transaction at most
_FAILED = "the credit store failed to write; nothing of this request was kept; retry it"


class Writer:
    """Runs submitted jobs in group commits on one connection; ``begin(jobs)`` makes their unit."""

    def __init__(self, conn: Any, begin: Callable[[list[Any]], Any], *, limit: int = GROUP_LIMIT) -> None:
        self.conn, self.begin, self.limit = conn, begin, limit
        self._closed = False
        self._thread: threading.Thread | None = None
        self._start(asyncio.new_event_loop())

    def submit(self, job: Any) -> Future:
        """Queue ``job``; the future (an asyncio one when submitted on the writer's loop) is
        answered after its transaction commits."""
        item = _Pending(job)
        if self._closed:
            item.future.set_exception(CreditsUnavailableError("the credit store is closing; retry shortly"))
        elif threading.get_ident() == self._loop_thread:
            item.future = self._loop.create_future()
            self._enqueue(item)
        else:
            self._loop.call_soon_threadsafe(self._enqueue, item)
        return item.future

    def close(self) -> None:
        """Finish the queued jobs, refuse new ones and stop the thread."""
        self._closed = True
        self._stop_thread()

    def attach_loop(self) -> None:
        """Move the writer onto the running event loop (call from that loop)."""
        self._stop_thread()
        self._start(asyncio.get_running_loop(), ThreadPoolExecutor(1, thread_name_prefix="gpunet-credits-commit"))

    async def detach_loop(self) -> None:
        """Finish the queued jobs and move the writer back to its own thread."""
        if self._commit_pool is None:
            return
        self._detach()
        await self._task
        self._commit_pool.shutdown()
        self._start(asyncio.new_event_loop())

    def _start(self, loop: asyncio.AbstractEventLoop, commit_pool: ThreadPoolExecutor | None = None) -> None:
        """Run the group loop on ``loop``: the running one of the service (statements on it, commits
        on ``commit_pool``'s thread), or a new one on a thread of its own (commits there too)."""
        self._loop, self._commit_pool = loop, commit_pool
        self._pending: list[_Pending] = []
        self._wake = asyncio.Event()
        self._detaching = False
        if loop.is_running():
            self._loop_thread: int | None = threading.get_ident()
            self._task = loop.create_task(self._writer_task())
        else:
            self._thread = threading.Thread(target=self._run, args=(loop,), name="gpunet-credits-writer", daemon=True)
            self._thread.start()
            self._loop_thread = self._thread.ident

    def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.run_until_complete(self._writer_task())
        loop.close()

    def _stop_thread(self) -> None:
        if self._thread is not None:
            self._loop.call_soon_threadsafe(self._detach)
            self._thread.join(timeout=30)
            self._thread = None

    def _detach(self) -> None:
        self._detaching = True
        self._wake.set()

    def _enqueue(self, item: _Pending) -> None:
        self._pending.append(item)
        self._wake.set()

    async def _writer_task(self) -> None:
        """The group loop: take every job waiting (up to ``limit``), apply and write them, commit, answer."""
        while self._pending or not self._detaching:
            if not self._pending:
                await self._wake.wait()
                self._wake.clear()
                continue
            group = self._pending[: self.limit]
            del self._pending[: self.limit]
            try:
                staged = self._stage(group)
                if staged is not None:
                    pool = self._commit_pool
                    error = self._commit() if pool is None else await self._loop.run_in_executor(pool, self._commit)
                    self._finish(*staged, error)
            except Exception:  # noqa: BLE001 - the writer must keep running
                logger.exception("credit writer failed on a group of %d operations", len(group))
                for item in group:
                    item.resolve(None, CreditsUnavailableError(_FAILED))

    def _commit(self) -> BaseException | None:
        try:
            self.conn.commit()
        except Exception as exc:  # noqa: BLE001 - answered by _finish
            return exc
        return None

    def _abort(self, unit: Any, items: list[_Pending], error: BaseException) -> None:
        """Roll the transaction and the unit's changes in memory back; answer ``items`` with ``error``."""
        self.conn.rollback()
        if unit is not None:
            unit.undo()
        for item in items:
            item.resolve(None, error)

    def _stage(self, group: list[_Pending]) -> tuple[Any, list[tuple[_Pending, Any, BaseException | None]]] | None:
        """Apply a group in memory and write it, without committing; None when nothing is left to commit."""
        while group:
            unit = None
            try:
                unit = self.begin([item.job for item in group])
                results: list[tuple[_Pending, Any, BaseException | None]] = []
                for item in group:
                    try:
                        results.append((item, unit.apply(item.job), None))
                    except CreditsRequestError as exc:
                        results.append((item, None, exc))
                    except Exception:  # noqa: BLE001 - a bug in one job must not sink the others
                        logger.exception("credit operation %s failed unexpectedly", _name(item.job))
                        self._abort(unit, [item], CreditsUnavailableError(
                            f"the credit service failed on this {_name(item.job)} request (a bug, logged by the "
                            "service); nothing was moved", status=500))
                        group = [other for other in group if other is not item]
                        break
                else:  # every job applied: write them
                    unit.flush()
                    return unit, results
            except Exception as exc:  # noqa: BLE001
                logger.exception("credit transaction of %d operations failed and was rolled back", len(group))
                self._abort(unit, group, CreditsUnavailableError(
                    f"the credit database refused the write ({exc.__class__.__name__}); nothing was moved; retry"))
                return None
        return None

    def _finish(self, unit: Any, results: list[tuple[_Pending, Any, BaseException | None]],
                error: BaseException | None) -> None:
        """After the commit (or its failure): publish and answer every job of the group."""
        if error is not None:
            logger.error("commit of %d credit operations failed: %r", len(results), error)
            self._abort(unit, [item for item, _, _ in results], CreditsUnavailableError(
                f"the credit database refused the commit ({error.__class__.__name__}); nothing was moved; retry"))
            return
        unit.committed()
        for item, result, exc in results:
            item.resolve(result, exc)


class _Pending:
    """A queued job and the future that answers it."""

    __slots__ = ("job", "future")

    def __init__(self, job: Any) -> None:
        self.job = job
        self.future: Any = Future()

    def resolve(self, result: Any, exc: BaseException | None) -> None:
        """Answer the future (a concurrent or an asyncio one) unless it was given up."""
        if self.future.done():
            return
        if exc is not None:
            self.future.set_exception(exc)
        else:
            self.future.set_result(result)


def _name(job: Any) -> str:
    """What a job is called in messages: its ``name``, else its type's."""
    return getattr(job, "name", type(job).__name__)
