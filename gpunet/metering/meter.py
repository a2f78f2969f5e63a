"""The notebook's side of metering: holds before a job is sent, usage after.

Before a job is sent, :class:`Meter` places a hold on the notebook session's
credits: one for a cell, one for a whole map (its items' amounts together); a hold
that cannot be placed refuses the job before anything is sent, with the session's
numbers in the message. The tasks carry their hold id as a Dask annotation, and
the scheduler plugin (:mod:`gpunet.extensions.scheduler_plugin`, :mod:`gpunet.metering.settlement`) settles a cell's
hold to the provider whose worker ran it, or releases it; a map's hold is paid out
in parts to the providers of the items as they finish, and its rest released when
the last item is done.

Pre-authorization: when it connects, a session places one hold for a share of its
budget (:data:`PREAUTH_SHARE`), like a card pre-authorization, and jobs draw on it
with no request to the credit service on their path: the notebook reserves each
job's amount from it locally (:meth:`Meter.draw`), the tasks name it with the
``preauth`` annotation, and the scheduler plugin pays each task's part from it,
never more than is left of it. A background thread (:meth:`Meter.start_refilling`)
asks the scheduler what was paid, places a fresh hold before the current one runs
low (the old one is released once its jobs are done), and releases it when the
session idles (:data:`PREAUTH_IDLE_S`) or closes; the scheduler releases it too
when the notebook's client leaves. A job that does not fit in what is free of it
places its own hold, as before, and is refused (before anything is sent) when the
session cannot cover it. A verified job's copies each need a hold of their own
(:mod:`gpunet.metering.copy_holds`): those are placed ahead too, when the session
connects (:meth:`Meter.prepare_verified`) and in the background after each verified job.

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

A map holds what its items are expected to cost, not their worst case:
:func:`expected_hold`, each item as long as the session saw the function's items take
(:class:`gpunet.metering.growth.ItemTimes`; :data:`EXPECTED_ITEM_SECONDS` for a function
not seen yet) at the price limit (:func:`hold_price`) with a margin
(:data:`EXPECTED_MARGIN`); an item may still be paid up to its worst case: while the map
runs its holds grow ahead of what its items cost, or it pauses where the budget cannot
cover more (:class:`gpunet.metering.growth.MapGrowth`).

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
from gpunet.metering.copy_holds import FIRST_JOB_COPIES, CopyHolds
from gpunet.metering.growth import EXPECTED_ITEM_SECONDS, EXPECTED_MARGIN, ItemTimes

if TYPE_CHECKING:  # pragma: no cover
    from gpunet.credits import CreditClient

logger = logging.getLogger(__name__)

DEFAULT_HOLD_SECONDS = 60.0
DEFAULT_ITEM_HOLD_SECONDS = 10.0
#: Credits per device-second where no provider said otherwise.
DEFAULT_RATE = 1.0
#: How long usage figures wait for the scheduler to report the jobs that finished here.
SETTLE_WAIT_S = 5.0
#: The share of its budget a session pre-authorizes at a time (one hold, placed when it
#: connects and again each time it refills).
PREAUTH_SHARE = 0.2
#: A fresh pre-authorized hold is placed once less than this share of the current one is free.
REFILL_BELOW = 0.5
#: A pre-authorized hold that no job drew on for this long is released (the next job
#: places its own hold, and a fresh pre-authorization follows it).
PREAUTH_IDLE_S = 300.0
#: How often the refilling thread looks at what was paid while jobs draw on a hold.
REFILL_LOOK_S = 0.2
#: Providers' trust records older than this are fetched again in the background (a verified
#: job uses them as they are meanwhile; which providers are quarantined it asks the scheduler).
RECORDS_FRESH_S = 2.0
#: ... but only as often as this while no job has read them since they were fetched (a session
#: that connected, and placed its first verified job's holds, may never verify: it should not
#: ask the credit service every few seconds for records nobody reads).
RECORDS_UNREAD_FRESH_S = 30.0
#: A job done here whose tasks the scheduler has not all counted after this long counts no more
#: (tasks cancelled before they reached it are never counted there).
COUNT_GIVE_UP_S = 30.0


def hold_price(seconds: float, max_rate: float) -> int:
    """The credits a hold sets aside for ``seconds`` of device time at ``max_rate`` (the
    rate holds are priced at): at least 1. Every hold's size comes from here."""
    return max(1, math.ceil(seconds * max_rate))


def expected_hold(count: int, per_item: int, max_rate: float, seconds: float = EXPECTED_ITEM_SECONDS) -> int:
    """What a map of ``count`` items holds: their expected price (each ``seconds`` at
    ``max_rate``) with :data:`EXPECTED_MARGIN`, at least a credit an item and at most
    their worst case (``count x per_item``)."""
    expected = math.ceil(count * hold_price(seconds, max_rate) * EXPECTED_MARGIN)
    return max(count, min(count * per_item, expected))


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
class Draw:
    """A job drawing on a pre-authorized hold: the credits reserved for it, its tasks, and
    (once it is done here) when it finished."""

    amount: int
    tasks: int
    finished_at: float | None = None


@dataclass
class Preauthorized:
    """One pre-authorized hold of the session, as the notebook counts it: ``amount``
    held, what the scheduler said was ``paid`` from it (in all and per job), and the jobs
    drawing on it: running, or done here but not yet all counted by the scheduler (a
    result may come before the scheduler hears that its task finished). Each job counts
    at its reservation until the scheduler counted all its tasks, or more where it was
    paid more."""

    hold: str
    amount: int
    draws: dict[str, Draw] = field(default_factory=dict)
    paid: int = 0
    job_paid: dict[str, int] = field(default_factory=dict)
    used_at: float = field(default_factory=time.monotonic)

    def free(self) -> int:
        """Credits of it that no job may still be paid: never more than what is really left."""
        drawing = sum(max(0, draw.amount - self.job_paid.get(job, 0)) for job, draw in self.draws.items())
        return self.amount - self.paid - drawing

    @property
    def busy(self) -> bool:
        """Whether jobs draw on it, or finished here before the scheduler counted them."""
        return bool(self.draws)


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
    #: how long each function's map items take, as this session saw them (sizes maps' holds)
    item_times: ItemTimes = field(default_factory=ItemTimes)
    #: holds placed ahead for verified jobs' copies (:meth:`take_copy_holds`)
    copy_holds: CopyHolds = field(default_factory=CopyHolds)
    _records: list[dict[str, Any]] | None = None
    _records_at: float = 0.0
    _records_read: bool = False
    #: the pre-authorized hold jobs draw on now (None: none yet, or released when idle)
    preauth: Preauthorized | None = None
    #: earlier pre-authorized holds, released once the jobs drawing on them are done
    retiring: list[Preauthorized] = field(default_factory=list)
    _account: str | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    #: held while holds are placed for a job on its path, or for copies ahead (not both at once)
    _placing: threading.RLock = field(default_factory=threading.RLock)
    _wake: threading.Event = field(default_factory=threading.Event)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _preauth_number: int = 0
    #: pre-authorized holds released here that the service may still show open
    letting_go: set[str] = field(default_factory=set)
    #: releases holds through the scheduler (set by :meth:`start_refilling`)
    _release: Callable[[list[str]], None] | None = None
    #: asks the scheduler what it paid from pre-authorized holds (set by :meth:`start_refilling`)
    _ask: Callable[[list[str], list[str]], dict[str, Any]] | None = None

    # -- pre-authorization -----------------------------------------------------------------
    @property
    def preauthorized(self) -> int:
        """Credits this session has pre-authorized now (its open pre-authorized holds)."""
        with self._lock:
            return sum(p.amount for p in self._preauths()) + sum(self.copy_holds.held().values())

    def usage(self) -> dict[str, Any]:
        """The session's figures from the credit service (budget, spent, held, left), with the
        credits pre-authorized now (``preauthorized``, part of ``held``) and the rest held
        for jobs (``held_for_jobs``)."""
        with self._lock:
            mine = {p.hold for p in self._preauths()} | self.letting_go | set(self.copy_holds.held())
        usage = self.credits.usage(self.session)
        open_holds = self.credits.holds(account=self._owner()) if mine else []
        preauthorized = sum(hold["amount"] - hold.get("paid", 0) for hold in open_holds if hold["hold"] in mine)
        with self._lock:  # released ones the service shows closed are gone for good
            self.letting_go &= {hold["hold"] for hold in open_holds}
        return {**usage, "preauthorized": preauthorized, "held_for_jobs": usage["held"] - preauthorized}

    def _preauths(self) -> list[Preauthorized]:
        return ([self.preauth] if self.preauth is not None else []) + self.retiring

    def preauthorize(self, share: float = PREAUTH_SHARE) -> Preauthorized | None:
        """Place a pre-authorized hold of ``share`` of the budget (at most what is left);
        it becomes the one jobs draw on, the previous one retires. None when nothing is
        left to hold; raises :class:`CreditsUnavailableError` when the service is away."""
        usage = self.credits.usage(self.session)
        amount = min(usage["left"], max(1, math.ceil(usage["budget"] * share)))
        if amount < 1:
            return None
        with self._lock:
            self._preauth_number += 1
            key = f"preauth-{self.session}-{self._preauth_number}"
        try:
            hold = self.place(key, amount)
        except BudgetExceededError:
            return None
        fresh = Preauthorized(hold, amount)
        with self._lock:
            if self.preauth is not None:
                self.retiring.append(self.preauth)
            self.preauth = fresh
        return fresh

    def draw(self, job_id: str, amount: int, tasks: int = 1) -> tuple[str, int] | None:
        """Reserve ``amount`` credits of the pre-authorized hold for job ``job_id`` (of
        ``tasks`` tasks), with no request anywhere; returns ``(hold, its size)`` for the
        job's annotation, or None when no pre-authorized hold has that much free (the job
        places its own)."""
        with self._lock:
            current = self.preauth
            if current is None or current.free() < amount:
                self._wake.set()  # a fresh one, for the next job
                return None
            current.draws[job_id] = Draw(amount, tasks)
            current.used_at = time.monotonic()
            if current.free() < REFILL_BELOW * current.amount:
                self._wake.set()
            return current.hold, current.amount

    def take_copy_holds(self, count: int, amount: int) -> list[str] | None:
        """``count`` holds of ``amount`` credits placed ahead for a verified job's copies, with
        no request anywhere; None while fewer are ready (the job places its own, and as many
        are kept ready for the next one)."""
        taken = self.copy_holds.take(count, amount)
        self._wake.set()
        return taken

    def provider_records(self) -> list[dict[str, Any]]:
        """The providers' trust records, as the credit service last said: fetched once, then
        again in the background whenever they are older than :data:`RECORDS_FRESH_S`."""
        if self._records is None:
            self._refresh_records()
        elif time.monotonic() - self._records_at > RECORDS_FRESH_S:
            self._wake.set()
        self._records_read = True
        return list(self._records or [])

    def _refresh_records(self) -> None:
        self._records, self._records_at = self.credits.provider_records(), time.monotonic()
        self._records_read = False

    def _records_stale(self, now: float) -> bool:
        """Whether the trust records should be fetched again: they are older than
        :data:`RECORDS_FRESH_S` and a job read them since, or older than
        :data:`RECORDS_UNREAD_FRESH_S`."""
        age = now - self._records_at
        return age > RECORDS_UNREAD_FRESH_S or (age > RECORDS_FRESH_S and self._records_read)

    def _refill_copy_holds(self, release: Callable[[list[str]], None], now: float) -> None:
        """Place the copy holds wanted ready, or release them all once none was taken for
        :data:`PREAUTH_IDLE_S`; and fetch the trust records again once they are old."""
        if self._records is not None and self._records_stale(now) \
                and now - self.copy_holds.used_at < PREAUTH_IDLE_S:
            self._refresh_records()
        if now - self.copy_holds.used_at > PREAUTH_IDLE_S:
            idle = self.copy_holds.give_up()
            if idle:
                with self._lock:
                    self.letting_go.update(idle)
                release(idle)
            return
        self._place_copy_holds()

    def prepare_verified(self, amount: int, copies: int = FIRST_JOB_COPIES) -> None:
        """Make ready, now, what a first verified job needs from the credit service, so that
        it sends with no request there on its path (a session on a network with providers
        enough to verify does this when it connects): the providers' trust records, and
        ``copies`` holds of ``amount`` credits for its copies (those the budget cannot
        cover are left out; all are released when the session idles or closes, or when a
        job's own hold needs the room). Raises :class:`CreditsUnavailableError` when the
        service is away."""
        self._refresh_records()
        self.copy_holds.want(copies, amount)
        self._place_copy_holds()

    def _place_copy_holds(self) -> None:
        """Place the copy holds missing from those wanted ready, in one request (never while
        a job places its own: they would take the room it needs)."""
        with self._placing:
            wanted = [amount for amount, count in self.copy_holds.missing() for _ in range(count)]
            if not wanted:
                return
            with self._lock:  # one request for them all; a batch's items succeed or fail one by one
                first = self._preauth_number + 1
                self._preauth_number += len(wanted)
            items = [{"op": "hold", "session": self.session, "amount": amount,
                      "key": f"copy-{self.session}-{first + n}", **({"meter": self.meter} if self.meter else {})}
                     for n, amount in enumerate(wanted)]
            try:
                results = self.credits.batch(items)
            except CreditsUnavailableError:
                with self._lock:
                    self.doubtful.extend((item["key"], item["amount"]) for item in items)
                raise
            for amount, result in zip(wanted, results):
                if result.get("ok"):  # one the budget could not cover is left out: jobs place their own
                    self.copy_holds.add(amount, result["hold"])

    def overflow(self, job_id: str, tasks: int) -> tuple[str, int] | None:
        """The pre-authorized hold (and its size) that pays what map ``job_id`` (of ``tasks``
        items), with its own hold sized by their expected price, earns beyond it; None when
        there is none. What it pays there is counted as the map's draw on it (of 0 reserved)."""
        with self._lock:
            current = self.preauth
            if current is None:
                return None
            current.draws[job_id] = Draw(0, tasks)
            return current.hold, current.amount

    def job_done(self, job_id: str) -> None:
        """Job ``job_id`` is done here: it counts until the scheduler counted its tasks."""
        with self._lock:
            for preauth in self._preauths():
                draw = preauth.draws.get(job_id)
                if draw is not None and draw.finished_at is None:
                    draw.finished_at = time.monotonic()
                    self._wake.set()

    @property
    def counting(self) -> bool:
        """Whether jobs that finished here wait for the scheduler to count them."""
        with self._lock:
            return any(d.finished_at is not None for p in self._preauths() for d in p.draws.values())

    def look_at_paid(self, ask: Callable[[list[str], list[str]], dict[str, Any]]) -> None:
        """Learn from the scheduler (``ask(holds, jobs)``, its ``preauth_state``) what was paid
        from the pre-authorized holds, in all and per job; a job done here whose tasks the
        scheduler all counted (or that finished :data:`COUNT_GIVE_UP_S` ago: tasks that never
        reached it) no longer counts."""
        with self._lock:
            preauths = self._preauths()
            holds = [p.hold for p in preauths]
            jobs = [job for p in preauths for job in p.draws]
        state = ask(holds, jobs) or {}
        now = time.monotonic()
        with self._lock:
            for preauth in preauths:
                seen = state.get(preauth.hold)
                if seen is None:
                    continue  # no task of it finished there yet
                preauth.paid = max(preauth.paid, int(seen["paid"]))
                for job, tally in seen.get("jobs", {}).items():
                    preauth.job_paid[job] = int(tally["paid"])
                    draw = preauth.draws.get(job)
                    if draw is not None and draw.finished_at is not None and int(tally["done"]) >= draw.tasks:
                        del preauth.draws[job]
                        preauth.job_paid.pop(job, None)
            for preauth in preauths:
                for job, draw in list(preauth.draws.items()):
                    if draw.finished_at is not None and now - draw.finished_at > COUNT_GIVE_UP_S:
                        del preauth.draws[job]

    def refill(self, release: Callable[[list[str]], None], ask: Callable[[list[str], list[str]], dict[str, Any]],
               *, now: float | None = None) -> None:
        """One turn of the refilling thread: look at what was paid, place a fresh hold before
        the current one runs low (or once a job found none), release retired holds whose jobs
        are done and a hold nobody drew on for :data:`PREAUTH_IDLE_S`."""
        now = time.monotonic() if now is None else now
        wanted = self._wake.is_set()
        self._wake.clear()
        if any(p.busy for p in self._preauths()):
            self.look_at_paid(ask)
        with self._lock:
            current = self.preauth
            done = [p for p in self.retiring if not p.busy]
            self.retiring = [p for p in self.retiring if p.busy]
            idle = current is not None and not current.busy and now - current.used_at > PREAUTH_IDLE_S
            if idle:
                done.append(current)
                self.preauth = current = None
            low = current is not None and current.free() < REFILL_BELOW * current.amount
        if done:
            with self._lock:
                self.letting_go.update(p.hold for p in done)
            release([p.hold for p in done])
        if low or (current is None and wanted and not idle):
            self.preauthorize()
        self._refill_copy_holds(release, now)

    def start_refilling(self, release: Callable[[list[str]], None],
                        ask: Callable[[list[str], list[str]], dict[str, Any]]) -> None:
        """Start the refilling thread (:meth:`refill`, woken by draws and finished jobs)."""
        self._release, self._ask = release, ask
        def loop() -> None:
            while not self._stop.is_set():
                try:
                    self.refill(release, ask)
                except Exception as exc:  # noqa: BLE001 - the service or scheduler away: try again later
                    logger.warning("gpunet metering: the pre-authorized hold could not be refilled now: %s", exc)
                    self._stop.wait(1.0)
                busy = any(p.busy for p in self._preauths())
                self._wake.wait(REFILL_LOOK_S if busy else 5.0)

        self._thread = threading.Thread(target=loop, name="gpunet-preauth", daemon=True)
        self._thread.start()

    def stop_refilling(self, release: Callable[[list[str]], None]) -> None:
        """Stop the refilling thread and release every pre-authorized hold (the session closes)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        with self._lock:
            holds = [p.hold for p in self._preauths()] + self.copy_holds.give_up()
            self.preauth, self.retiring = None, []
        if holds:
            release(holds)
            with self._lock:
                self.unsettled.update(holds)
            try:  # the account's balance is whole again once the session is closed
                self.wait_settled(set(holds))
            except CreditsUnavailableError:
                logger.warning("gpunet metering: the credit service is away; the pre-authorized holds %s are "
                               "released once the scheduler reaches it", holds)

    def finished(self, holds: list[str]) -> None:
        """The jobs of ``holds`` finished here: the scheduler settles or releases them soon."""
        with self._lock:
            self.unsettled.update(holds)

    def wait_settled(self, holds: set[str] | None = None, timeout: float = SETTLE_WAIT_S) -> bool:
        """Wait until the credit service shows ``holds`` (default: every job that finished
        here, and what the scheduler paid so far from the pre-authorized holds) closed,
        settled or released; False when some are still open after ``timeout`` seconds (the
        scheduler reports in batches, retried while the service is away)."""
        deadline = time.monotonic() + timeout
        if holds is None and self._ask is not None:
            while self.counting and time.monotonic() < deadline:  # the scheduler has not heard of them all yet
                self.look_at_paid(self._ask)
                if self.counting:
                    time.sleep(0.02)
        owed = self._paid_by_scheduler() if holds is None else {}
        while True:
            with self._lock:
                waiting = set(self.unsettled if holds is None else holds & self.unsettled)
            if not waiting and not owed:
                return True
            listed = {hold["hold"]: hold for hold in self.credits.holds(account=self._owner())}
            still_open = waiting & set(listed)
            owed = {hold: paid for hold, paid in owed.items() if hold in listed and listed[hold]["paid"] < paid}
            with self._lock:
                self.unsettled -= waiting - still_open
            if not still_open and not owed:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)

    def charged_from(self, hold: str, job_id: str, tasks: int = 1, timeout: float = SETTLE_WAIT_S) -> int | None:
        """What job ``job_id`` (of ``tasks`` tasks) was paid from pre-authorized hold ``hold``,
        once the scheduler counted its tasks; None when it has not after ``timeout``."""
        if self._ask is None:
            return None
        deadline = time.monotonic() + timeout
        while True:
            tally = ((self._ask([hold], [job_id]) or {}).get(hold) or {}).get("jobs", {}).get(job_id)
            if tally is not None and int(tally["done"]) >= tasks:
                return int(tally["paid"])
            if time.monotonic() > deadline:
                return None
            time.sleep(0.05)

    def _paid_by_scheduler(self) -> dict[str, int]:
        """What the scheduler says it paid from each pre-authorized hold (reported or not yet)."""
        with self._lock:
            holds = [p.hold for p in self._preauths()]
        if not holds or self._ask is None:
            return {}
        return {hold: int(state["paid"]) for hold, state in (self._ask(holds, []) or {}).items()}

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
        return Plan(hold_price(seconds, max_rate), None, basis=basis, fix=fix)

    def hold_shared(self, job_id: str, *, count: int, amount: int, plan: Plan | None = None,
                    total: int | None = None) -> str:
        """One hold for the ``count`` tasks of a job (each is paid at most ``amount`` from
        it) of ``total`` credits (default ``count x amount``); returns its id. Raises
        :class:`BudgetError` (nothing held) when the session cannot cover it, saying why
        it holds that much (``plan``) and how to hold less. Pre-authorized holds no job
        draws on are given back first when they are what stands in the way."""
        total = count * amount if total is None else total
        with self._placing:  # no hold placed ahead in the background takes the room meanwhile
            try:
                return self.place(f"hold-{job_id}", total)
            except BudgetExceededError as exc:
                if self._give_back_idle(total):
                    return self.hold_shared(job_id, count=count, amount=amount, plan=plan, total=total)
                raise self._refusal(amount, count, exc, plan=plan, total=total) from None

    def place(self, key: str, amount: int) -> str:
        """Place a hold of ``amount`` credits under idempotency ``key``; returns its id. Raises
        :class:`BudgetExceededError` when the session cannot cover it, and
        :class:`CreditsUnavailableError` when the service did not answer (the hold is then in
        doubt, and given back later: :meth:`resolve_doubtful`)."""
        try:
            return self.credits.hold(self.session, amount, key=key, meter=self.meter)
        except CreditsUnavailableError:
            with self._lock:
                self.doubtful.append((key, amount))
            raise

    def _give_back_idle(self, wanted: int) -> bool:
        """Release the pre-authorized holds no job draws on, when that frees enough for a
        hold of ``wanted``; True once the credit service shows them released."""
        release = self._release
        with self._lock:
            idle = [p for p in self._preauths() if not p.busy]
        ready = self.copy_holds.held()
        if release is None or not (idle or ready):
            return False
        usage = self.credits.usage(self.session)
        if usage["left"] + sum(p.amount - p.paid for p in idle) + sum(ready.values()) < wanted:
            return False
        with self._lock:
            self.retiring = [p for p in self.retiring if p not in idle]
            if self.preauth in idle:
                self.preauth = None
        gone = {p.hold for p in idle} | set(self.copy_holds.give_up())
        release(sorted(gone))
        deadline = time.monotonic() + SETTLE_WAIT_S
        while time.monotonic() < deadline:
            if not gone & {hold["hold"] for hold in self.credits.holds(account=self._owner())}:
                return True
            time.sleep(0.05)
        return False

    def _owner(self) -> str:
        if self._account is None:
            self._account = self.credits.ping()["account"]
        return self._account

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
        with self._placing:  # no hold placed ahead in the background takes the room meanwhile
            usage = self.credits.usage(self.session)
            if usage["left"] < count * amount and self._give_back_idle(count * amount):
                usage = self.credits.usage(self.session)  # pre-authorized holds no job drew on went back
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
                 usage: dict[str, Any] | None = None, plan: Plan | None = None,
                 total: int | None = None) -> BudgetError:
        left = None
        try:
            usage = usage or self.credits.usage(self.session)
            left = usage["left"]
            preauthorized = self.preauthorized
            numbers = (f"the session has {usage['left']} of its {usage['budget']} credits left "
                       f"({usage['spent']} spent, {usage['held']} held"
                       + (f", {preauthorized} of them pre-authorized for the jobs running now" if preauthorized
                          else "") + ")")
        except Exception:  # noqa: BLE001 - the refusal itself is what matters
            numbers = f"the credit service refused it ({cause})"
        total = count * amount if total is None else total
        if left is not None and "balance" in str(cause).lower() and total <= left:
            numbers += f", but the account's balance cannot cover it ({cause})"
        need = (f"{total} credits" if count == 1 or total != count * amount
                else f"{count} x {amount} = {total} credits")
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
