"""The notebook's side of metering: holds before a job is sent, usage after.

Before a job is sent, :class:`Meter` places a hold on the notebook session's
credits: one for a cell, one for a whole map (its items' amounts together); a hold
that cannot be placed refuses the job before anything is sent, with the session's
numbers in the message. The tasks carry their hold id as a Dask annotation, and
the scheduler plugin (:mod:`gpunet.extensions.scheduler_plugin`, :mod:`gpunet.metering.settlement`) settles a cell's
hold to the provider whose worker ran it, or releases it; a map's hold is paid out
in parts to the providers of the items as they finish, and its rest released when
the last item is done.

How much is held per task:

- with ``--max-credits C``: ``C`` for a cell, ``floor(C / items)`` per item of a map
  (so a map never costs more than ``C``); a cell is stopped when, counted from its
  start on a worker, its time at the highest provider rate would pass ``C``, and is
  then charged its time on the worker at that worker's rate, at most ``C``;
- else the task's ``--timeout`` (or :data:`DEFAULT_HOLD_SECONDS`, per item
  :data:`DEFAULT_ITEM_HOLD_SECONDS` for a map) at the highest provider rate.

A provider is paid ``ceil(compute seconds x its rate)``, at least 1 credit and never
more than the hold; the rest of the hold goes back to the session.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from gpunet.credits import BudgetExceededError, CreditsUnavailableError
from gpunet.errors import BudgetError

if TYPE_CHECKING:  # pragma: no cover
    from gpunet.credits import CreditClient

logger = logging.getLogger(__name__)

DEFAULT_HOLD_SECONDS = 60.0
DEFAULT_ITEM_HOLD_SECONDS = 10.0
#: Credits per device-second where no provider said otherwise.
DEFAULT_RATE = 1.0


@dataclass
class Plan:
    """What a job holds: ``amount`` credits per task, and the device-time limit that
    keeps it within ``--max-credits`` (None when no limit was asked for)."""

    amount: int
    limit_s: float | None


@dataclass
class WorkerTally:
    """What one worker did for this session (counted by the notebook)."""

    tasks: int = 0
    seconds: float = 0.0
    device: str = ""


@dataclass
class Meter:
    """Places holds for one notebook session on a credit service."""

    credits: CreditClient
    session: str
    tally: dict[str, WorkerTally] = field(default_factory=dict)
    #: (key, amount) of holds whose request got no answer: the service may have placed
    #: them after all (a stopped service answers what waited in its socket once it
    #: runs again), so they are resolved later (:meth:`resolve_doubtful`)
    doubtful: list[tuple[str, int]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def plan(self, *, count: int, max_credits: float | None, timeout: float | None, max_rate: float,
             what: str | None = None) -> Plan:
        """How much to hold per task, and the time limit that --max-credits implies
        (``what`` names the ``count`` tasks in a refusal)."""
        if max_credits is not None:
            if max_credits < count:
                what = what or ("a task" if count == 1 else f"each of {count} items")
                raise BudgetError(f"--max-credits {max_credits:g} cannot pay for {what} (every task costs at least "
                                  f"1 credit): give at least --max-credits {count}. Nothing was sent.")
            per_task = math.floor(max_credits / count)
            return Plan(per_task, per_task / max_rate if count == 1 else None)
        seconds = timeout or (DEFAULT_HOLD_SECONDS if count == 1 else DEFAULT_ITEM_HOLD_SECONDS)
        return Plan(max(1, math.ceil(seconds * max_rate)), None)

    def hold_shared(self, job_id: str, *, count: int, amount: int) -> str:
        """One hold of ``count x amount`` credits for the ``count`` tasks of a map
        (each is paid at most ``amount`` from it); returns its id. Raises
        :class:`BudgetError` (nothing held) when the session cannot cover it."""
        try:
            return self.credits.hold(self.session, count * amount, key=f"hold-{job_id}")
        except BudgetExceededError as exc:
            raise self._refusal(amount, count, exc) from None
        except CreditsUnavailableError:
            with self._lock:
                self.doubtful.append((f"hold-{job_id}", count * amount))
            raise

    def resolve_doubtful(self, release: Callable[[list[str]], None]) -> None:
        """Holds whose request got no answer may have been placed after all: ask for
        each again under its idempotency key (the service answers with the hold it
        made, or makes it now) and ``release`` it; those still without an answer wait
        for the next call."""
        with self._lock:
            pending, self.doubtful = self.doubtful, []
        for number, (key, amount) in enumerate(pending):
            try:
                hold = self.credits.hold(self.session, amount, key=key)
            except BudgetExceededError:
                continue  # it was never placed, and cannot be now: nothing to give back
            except CreditsUnavailableError:
                with self._lock:
                    self.doubtful.extend(pending[number:])
                return
            release([hold])

    def hold(self, job_id: str, *, count: int, amount: int) -> list[str]:
        """Hold ``amount`` credits for each of ``count`` tasks; returns the hold ids.

        Raises :class:`BudgetError` (nothing held) when the session cannot cover them.
        """
        if count == 1:
            return [self.hold_shared(job_id, count=1, amount=amount)]
        # A map's holds go in one batch whose items succeed or fail one by one: check
        # the total first, so that a map too big for the budget holds nothing.
        usage = self.credits.usage(self.session)
        if usage["left"] < count * amount:
            raise self._refusal(amount, count, "budget", usage=usage)
        items = [{"op": "hold", "session": self.session, "amount": amount, "key": f"hold-{job_id}-{index}"}
                 for index in range(count)]
        results = self.credits.batch(items)
        holds = [result.get("hold") for result in results]
        if all(result.get("ok") for result in results):
            return holds
        failure = next(result for result in results if not result.get("ok"))
        raise self._refusal(amount, count, failure.get("error", {}).get("message", "refused"),
                            placed=[hold for hold in holds if hold])

    def _refusal(self, amount: int, count: int, cause: Any, *, placed: list[str] | None = None,
                 usage: dict[str, Any] | None = None) -> BudgetError:
        try:
            usage = usage or self.credits.usage(self.session)
            numbers = (f"the session has {usage['left']} of its {usage['budget']} credits left "
                       f"({usage['spent']} spent, {usage['held']} held)")
        except Exception:  # noqa: BLE001 - the refusal itself is what matters
            numbers = f"the credit service refused it ({cause})"
        need = f"{amount} credits" if count == 1 else f"{count} x {amount} = {count * amount} credits"
        error = BudgetError(
            f"this job needs a hold of {need} and {numbers}; nothing was sent. "
            "Lower --max-credits (or --timeout), or connect with a larger --budget."
        )
        error.placed = placed or []  # type: ignore[attr-defined]
        return error

    def count(self, worker: str, device: str, seconds: float) -> None:
        """Add a finished task to the per-worker tally."""
        with self._lock:
            entry = self.tally.setdefault(worker, WorkerTally(device=device))
            entry.tasks += 1
            entry.seconds += seconds
