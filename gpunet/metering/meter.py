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
  start on a worker, its time at the notebook's price limit would pass ``C``, and is
  then charged its time on the worker at that worker's rate, at most ``C``;
- else the task's ``--timeout`` (or :data:`DEFAULT_HOLD_SECONDS`, per item
  :data:`DEFAULT_ITEM_HOLD_SECONDS` for a map) at the notebook's price limit
  (``--max-rate``, :meth:`gpunet.client.network.Network.hold_rate`), never at the
  rate of the most expensive provider on the network: only providers at or below
  the limit run the job.

A job given no ``--timeout`` gets :func:`default_timeout`: the device time its hold
covers, so that a provider is never working past what it will be paid for, and a
job nobody waits for any more (a lost Ctrl-C) frees its worker.

A provider is paid ``ceil(compute seconds x its rate)``, at least 1 credit and never
more than the hold; the rest of the hold goes back to the session.
"""

from __future__ import annotations

import logging
import math
import threading
import time
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
#: How long usage figures wait for the scheduler to report the jobs that finished here.
SETTLE_WAIT_S = 5.0


def default_timeout(count: int = 1, *, max_credits: float | None = None, max_rate: float = DEFAULT_RATE) -> float:
    """The ``--timeout`` of a job of ``count`` tasks given none: the device time its
    hold covers, :data:`DEFAULT_HOLD_SECONDS` for a cell, :data:`DEFAULT_ITEM_HOLD_SECONDS`
    per item of a map. With ``--max-credits`` the hold covers that many credits at
    the price limit (a cell is stopped there, counted from its start on a worker),
    and a minute more is allowed for reaching a worker."""
    if max_credits is not None:
        return max_credits / max_rate + DEFAULT_HOLD_SECONDS
    return DEFAULT_HOLD_SECONDS if count == 1 else DEFAULT_ITEM_HOLD_SECONDS * count


@dataclass
class Plan:
    """What a job holds: ``amount`` credits per task, and the device-time limit that
    keeps it within ``--max-credits`` (None when no limit was asked for). ``basis``
    says where the amount comes from and ``fix`` how to hold less, for a refusal."""

    amount: int
    limit_s: float | None
    basis: str = ""
    fix: str = ""


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
    #: the meter account of the scheduler the work goes to, named on every hold (None: no meter,
    #: on a private network whose scheduler pays with the operator's token)
    meter: str | None = None
    tally: dict[str, WorkerTally] = field(default_factory=dict)
    #: (key, amount) of holds whose request got no answer: the service may have placed
    #: them after all (a stopped service answers what waited in its socket once it
    #: runs again), so they are resolved later (:meth:`resolve_doubtful`)
    doubtful: list[tuple[str, int]] = field(default_factory=list)
    #: holds of jobs that finished here and that the credit service may still show open
    unsettled: set[str] = field(default_factory=set)
    _account: str | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def finished(self, holds: list[str]) -> None:
        """The jobs of ``holds`` finished here: the scheduler settles or releases them soon."""
        with self._lock:
            self.unsettled.update(holds)

    def wait_settled(self, holds: set[str] | None = None, timeout: float = SETTLE_WAIT_S) -> bool:
        """Wait until the credit service shows ``holds`` (default: every job that finished
        here) closed, settled or released; False when some are still open after
        ``timeout`` seconds (the scheduler reports in batches, retried while the
        service is away)."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                waiting = set(self.unsettled if holds is None else holds & self.unsettled)
            if not waiting:
                return True
            if self._account is None:
                self._account = self.credits.ping()["account"]
            still_open = waiting & {hold["hold"] for hold in self.credits.holds(account=self._account)}
            with self._lock:
                self.unsettled -= waiting - still_open
            if not still_open:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)

    def charged(self, holds: list[str], timeout: float = SETTLE_WAIT_S) -> int | None:
        """What a stopped job of ``holds`` was charged once its holds are closed (the
        session's spending meanwhile, after the jobs that finished before it were
        settled); None when they are still open after ``timeout``."""
        with self._lock:
            earlier = self.unsettled - set(holds)
        self.wait_settled(earlier, timeout)
        spent = self.credits.usage(self.session)["spent"]
        self.finished(holds)
        if not self.wait_settled(set(holds), timeout):
            return None
        return self.credits.usage(self.session)["spent"] - spent

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
            return Plan(per_task, per_task / max_rate if count == 1 else None, basis=f"--max-credits {max_credits:g}",
                        fix="lower --max-credits")
        rate = f"at your price limit, {max_rate:g} credits a device-second (--max-rate)"
        if timeout is not None:
            per = "" if count == 1 else " for each item"
            basis, fix = f"--timeout {timeout:g} s{per} {rate}", "lower --timeout, or cap the job with --max-credits C"
            seconds = timeout
        else:
            seconds = DEFAULT_HOLD_SECONDS if count == 1 else DEFAULT_ITEM_HOLD_SECONDS
            per = "a cell" if count == 1 else "each map item"
            basis = f"the default hold of {seconds:g} s for {per} {rate}"
            fix = ("cap the whole map with --max-credits C (it then holds C in all)" if count > 1
                   else "cap the cell with --max-credits C, or a shorter --timeout")
        return Plan(max(1, math.ceil(seconds * max_rate)), None, basis=basis, fix=fix)

    def hold_shared(self, job_id: str, *, count: int, amount: int, plan: Plan | None = None) -> str:
        """One hold of ``count x amount`` credits for the ``count`` tasks of a map
        (each is paid at most ``amount`` from it); returns its id. Raises
        :class:`BudgetError` (nothing held) when the session cannot cover it,
        saying why it holds that much (``plan``) and how to hold less."""
        try:
            return self.credits.hold(self.session, count * amount, key=f"hold-{job_id}", meter=self.meter)
        except BudgetExceededError as exc:
            raise self._refusal(amount, count, exc, plan=plan) from None
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
                hold = self.credits.hold(self.session, amount, key=key, meter=self.meter)
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
        items = [{"op": "hold", "session": self.session, "amount": amount, "key": f"hold-{job_id}-{index}",
                  **({"meter": self.meter} if self.meter else {})} for index in range(count)]
        results = self.credits.batch(items)
        holds = [result.get("hold") for result in results]
        if all(result.get("ok") for result in results):
            return holds
        failure = next(result for result in results if not result.get("ok"))
        raise self._refusal(amount, count, failure.get("error", {}).get("message", "refused"),
                            placed=[hold for hold in holds if hold])

    def _refusal(self, amount: int, count: int, cause: Any, *, placed: list[str] | None = None,
                 usage: dict[str, Any] | None = None, plan: Plan | None = None) -> BudgetError:
        left = None
        try:
            usage = usage or self.credits.usage(self.session)
            left = usage["left"]
            numbers = (f"the session has {usage['left']} of its {usage['budget']} credits left "
                       f"({usage['spent']} spent, {usage['held']} held)")
        except Exception:  # noqa: BLE001 - the refusal itself is what matters
            numbers = f"the credit service refused it ({cause})"
        if left is not None and "balance" in str(cause).lower() and count * amount <= left:
            numbers += f", but the account's balance cannot cover it ({cause})"
        need = f"{amount} credits" if count == 1 else f"{count} x {amount} = {count * amount} credits"
        basis = f" ({plan.basis})" if plan is not None and plan.basis else ""
        fixes = [plan.fix] if plan is not None and plan.fix else ["lower --max-credits or --timeout"]
        if left is not None and left < count:
            fixes = [f"every task costs at least 1 credit, so {count} tasks need {count} credits: send fewer, "
                     "larger items"]
        fixes.append("connect with a larger --budget (%gpunet connect --budget N)")
        error = BudgetError(f"this job needs a hold of {need}{basis} and {numbers}; nothing was sent. "
                            f"To run it: {'; or '.join(fixes)}.")
        error.placed = placed or []  # type: ignore[attr-defined]
        return error

    def count(self, worker: str, device: str, seconds: float) -> None:
        """Add a finished task to the per-worker tally."""
        with self._lock:
            entry = self.tally.setdefault(worker, WorkerTally(device=device))
            entry.tasks += 1
            entry.seconds += seconds
