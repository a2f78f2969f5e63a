"""The reporter: sends a :class:`~gpunet.metering.settlement.Settlement`'s queued
movements to the credit service in batches, and feeds the answers back.

While the service is unreachable the movements stay queued and are retried with
backoff, for as long as the reporter runs; their idempotency keys make a retry
harmless. A trust record that comes back from a ``record_verification`` goes to
:meth:`Settlement.trust_record`, whose requests (retire a quarantined provider's
workers) go to the caller's ``on_requests``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from gpunet.credits import CreditsError, CreditsUnavailableError

if TYPE_CHECKING:  # pragma: no cover
    from gpunet.metering.settlement import Request, Settlement

logger = logging.getLogger(__name__)

#: Items per batch request to the credit service.
BATCH_SIZE = 2000
#: How long the reporter lets movements gather before it sends them.
REPORT_DELAY_S = 0.25
#: Longest wait between retries while the credit service is unreachable.
MAX_BACKOFF_S = 5.0


class Reporter:
    """Sends ``settlement``'s queue through ``send`` (a credit client's ``batch``)
    from an asyncio task: :meth:`start` it on the event loop, :meth:`wake` it when
    the settlement has work, :meth:`stop` it at shutdown."""

    def __init__(self, settlement: Settlement, send: Callable[[list[dict[str, Any]]], list[dict[str, Any]]],
                 on_requests: Callable[[list[Request]], None]) -> None:
        self.settlement = settlement
        self.send = send
        self.on_requests = on_requests
        self.reported = 0
        self.failed: list[dict[str, Any]] = []  # refused by the service for good (logged)
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        """Start reporting (on the running event loop)."""
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._report_forever(), name="gpunet-metering-reporter")

    def wake(self) -> None:
        """The settlement has something to report."""
        if self._wake is not None:
            self._wake.set()

    async def stop(self, drain_s: float = 5.0) -> None:
        """Try for ``drain_s`` seconds to send what is still queued, then stop."""
        if self._task is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain_s
        while self.settlement.has_work and loop.time() < deadline:
            self.wake()
            await asyncio.sleep(0.1)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        if self.settlement.queue:
            logger.warning("gpunet metering: %d movements not reported at shutdown", len(self.settlement.queue))

    async def _report_forever(self) -> None:
        queue = self.settlement.queue
        backoff = 0.2
        while True:
            self.settlement.flush_parts()  # parts earned while the last batch was out
            if not queue:
                self._wake.clear()
                await self._wake.wait()
            # A moment for more to arrive, so that a map's results go in few requests
            # (each request costs the busy machine JSON and HTTP work; settling later
            # costs nobody anything: the holds stay safe meanwhile).
            await asyncio.sleep(REPORT_DELAY_S)
            self.settlement.flush_parts()
            if not queue:
                continue
            batch = [queue[i] for i in range(min(BATCH_SIZE, len(queue)))]
            try:
                results = await asyncio.to_thread(self.send, batch)
            except CreditsUnavailableError as exc:
                logger.warning("gpunet metering: credit service unreachable (%s); %d movements queued, "
                               "retrying in %.1f s", exc, len(queue), backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
                continue
            except Exception as exc:  # noqa: BLE001 - the reporter must outlive any surprise
                if isinstance(exc, CreditsError):  # the whole request refused: keep it, but don't spin
                    logger.error("gpunet metering: the credit service refused a batch: %s", exc)
                else:
                    logger.exception("gpunet metering: reporting failed; %d movements kept, retrying", len(queue))
                await asyncio.sleep(MAX_BACKOFF_S)
                continue
            backoff = 0.2
            for item, result in zip(batch, results):
                queue.popleft()
                if result.get("ok"):
                    self.reported += 1
                    if item["op"] == "record_verification":
                        self.on_requests(self.settlement.trust_record(result))
                else:
                    self.failed.append({"item": item, "result": result})
                    logger.error("gpunet metering: %s (%s) refused: %s", item["op"],
                                 item.get("hold") or item.get("provider"), result.get("error"))
