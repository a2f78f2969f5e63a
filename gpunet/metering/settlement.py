"""Settlement: what each task attempt costs and who is paid, as a pure state machine.

The scheduler plugin (:mod:`gpunet.extensions.scheduler_plugin`) turns Dask's hooks
into the events of :class:`Settlement` (a task moved, a provider registered, a
verdict came, ...), passing in what only the scheduler knows: the task's
``gpunet`` annotation, its worker, its compute seconds, the time. Nothing here
reads a clock, touches Dask or the network. The rules:

- an attempt that succeeded (``processing -> memory``) settles its hold to the
  provider of its worker at :func:`price` (``settle-<hold>``);
- a task that erred, or was forgotten before it was paid, releases its hold
  (``release-<hold>``); an attempt lost with its worker is not paid: the task runs
  again under the same hold, and only the attempt that succeeds is paid;
- a map's items share one hold: what they earn is added up per provider and paid
  in parts (``part-<hold>-<n>``, one per provider per report, so 2,000 items cost a
  handful of requests), the rest released once every item is done; an item is
  never paid twice;
- a notebook session's pre-authorized hold (annotation ``preauth``: the hold's size)
  is shared the same way by every task of every job that draws on it, but stays
  open when they are done: it is released when the notebook asks (it closes or
  idles) or leaves;
- a shared hold never pays out more than it holds: an item that finishes once the
  hold is spent is paid what is left (the shortfall is counted and logged), so no
  part is ever refused for exceeding the hold;
- an attempt on a worker whose provider is not known yet is owed until the worker
  registers, or released when the adapter gives up on it (:class:`GiveUpLater`);
- a copy of a verified job waits for the notebook's verdict: the agreeing copies
  are settled with a memo, the others released, and each verdict is recorded to
  the provider's trust record (``verdict-<hold>``). The notebook's word is not all:
  where the scheduler fetched the copies and their digests are equal, they agree,
  whatever the notebook says (:func:`overruled`); and a mismatch counts against a
  provider only when the copies it disagreed with came from at least
  :data:`MIN_OTHER_PROVIDERS` other providers (:func:`blamed`), so one client with
  one accomplice cannot frame anyone (the credit service caps, per day, the
  mismatches one client account can count against a provider);
- a quarantined provider is not paid, and its workers are retired (:class:`Retire`);
- a map's hold grows: the notebook places further holds for it (:meth:`Settlement.grow`)
  as its items run longer than expected, and what an item earns beyond the holds it was
  sent with is paid from them; they are closed (the rest released) with the map's last
  item, and :meth:`Settlement.map_state` tells the notebook how far the map has got.

Movements go to :attr:`Settlement.queue` as the credit service's batch items;
their idempotency keys derive from the hold, so a retry never moves credits twice.
"""

from __future__ import annotations

import collections
import logging
import math
from collections.abc import Collection, Container, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Union

logger = logging.getLogger(__name__)

#: How long an attempt on a worker that has not registered its provider yet waits
#: for that registration before its hold is released (nobody paid).
REGISTRATION_WAIT_S = 60.0

Movement = dict[str, Any]  # one credit-service batch item: {"op", "key", ...}

#: How many other providers a copy must have disagreed with for the mismatch to count
#: against its provider's trust record.
MIN_OTHER_PROVIDERS = 2


def blamed(provider: str, agreeing: Collection[str]) -> bool:
    """Whether a copy of ``provider`` that disagreed with copies of the ``agreeing``
    providers counts against its trust record: only when at least
    :data:`MIN_OTHER_PROVIDERS` other providers agreed with each other against it."""
    return len(set(agreeing) - {provider}) >= MIN_OTHER_PROVIDERS


def overruled(copies: Mapping[Any, bool], digests: Mapping[Any, str]) -> dict[Any, bool]:
    """The notebook's verdict ``copies`` (task key -> in the agreeing quorum) with the
    scheduler's own comparison over it: a copy whose result digest (``digests``, what the
    scheduler fetched and digested itself) equals an agreeing copy's agrees, whatever
    the notebook said (equal canonical bytes are equal within any tolerance)."""
    accepted = {digests[key] for key, agreed in copies.items() if agreed and key in digests}
    return {key: bool(agreed) or (key in digests and digests[key] in accepted) for key, agreed in copies.items()}


def price(seconds: float, rate: float, cap: int, items: int = 1) -> int:
    """Credits for ``seconds`` of a device at ``rate`` credits per second: at least 1 for
    each of the task's ``items`` (a map's chunk runs several), at most ``cap`` (the hold)."""
    return max(1, min(int(cap), max(int(items), math.ceil(seconds * rate))))


def task_price(seconds: float, rate: float, meta: Mapping[str, Any]) -> int:
    """:func:`price` of a task whose annotation is ``meta`` (its ``amount``, its ``items``)."""
    return price(seconds, rate, meta.get("amount", 1), _whole(meta.get("items", 1)))


def _rounded(seconds: float) -> float:
    """Device-seconds as a memo records them: to the millisecond."""
    return round(max(0.0, seconds), 3)


@dataclass(frozen=True)
class ProviderInfo:
    """Who is paid for a worker's tasks, and at how many credits per device-second."""

    provider: str
    rate: float


@dataclass(frozen=True)
class OwedAttempt:
    """A successful attempt on a worker whose provider is not known yet."""

    key: Any
    hold: str
    seconds: float
    meta: dict[str, Any]


@dataclass(frozen=True)
class AwaitingCopy:
    """A verified job's copy that succeeded and waits for the notebook's verdict."""

    key: Any
    provider: str
    amount: int
    job: str
    seconds: float = 0.0


@dataclass
class Part:
    """What one provider earned from a map's hold since the last part was paid."""

    credits: int = 0
    tasks: int = 0
    seconds: float = 0.0


@dataclass
class SharedHold:
    """A hold shared by many tasks: a map's (``tasks`` items; closed once all are
    done) or a session's pre-authorized hold (``tasks`` None; open until released).
    Which tasks are done, which wait for their worker's provider, what each provider
    earned since the last part, and what was paid from it in all (``paid``, never
    beyond ``capacity``) and per job."""

    tasks: int | None
    capacity: int | None = None
    done: set[Any] = field(default_factory=set)
    owed: set[Any] = field(default_factory=set)
    parts: dict[str, Part] = field(default_factory=dict)
    sequence: int = 0
    paid: int = 0
    #: job id -> [credits paid, tasks done] (jobs drawing on a pre-authorized hold)
    by_job: dict[str, list[int]] = field(default_factory=dict)
    #: credits that tasks earned after the hold was spent (not paid)
    short: int = 0
    #: the session's pre-authorized hold that pays what a map's items earn beyond this hold
    overflow: str | None = None
    overflow_held: int = 0

    def payable(self, amount: int) -> int:
        """What of ``amount`` this hold can still pay: at most what is left of it."""
        if self.capacity is None:
            return amount
        return max(0, min(amount, self.capacity - self.paid))


@dataclass
class MapTally:
    """One map as the scheduler counts it: its ``tasks`` items, how many are ``done`` (paid
    or not), which worker each item sent to a worker and not back is on (``on``, and how
    many on each: ``per_worker``), what they were ``paid`` from every hold, and the further
    holds the notebook placed as they ran longer than expected (``growth``, in the order
    they pay)."""

    tasks: int
    done: int = 0
    on: dict[Any, str | None] = field(default_factory=dict)
    per_worker: collections.Counter = field(default_factory=collections.Counter)
    paid: int = 0
    growth: list[str] = field(default_factory=list)

    def running(self, threads: Mapping[str, int]) -> int:
        """At most how many of its items run at once now: on each worker, its items sent
        there and not back, at most that worker's ``threads`` (the rest wait in its queue)."""
        return sum(min(count, threads.get(worker, 1)) for worker, count in self.per_worker.items() if count)


#: How many maps the scheduler counts at once (the oldest is forgotten beyond it).
MAX_MAPS = 10_000


def _map_of(meta: Mapping[str, Any]) -> tuple[str, int] | None:
    """The map a task's annotation names: its job id and how many tasks it sends (None: not a map's task)."""
    job, count = meta.get("job"), meta.get("tasks", meta.get("map_tasks"))
    return (job, _whole(count)) if isinstance(job, str) and count is not None else None


def _shared_by(meta: Mapping[str, Any]) -> bool:
    """Whether a task's annotation names a hold shared by many tasks (a map's or a session's)."""
    return "tasks" in meta or "preauth" in meta


def _new_share(meta: Mapping[str, Any]) -> SharedHold:
    """The shared hold a task's annotation describes: a session's pre-authorized hold of
    ``preauth`` credits, or a map's of ``tasks`` items (``held`` credits, if it says)."""
    if "preauth" in meta:
        return SharedHold(None, capacity=_whole(meta["preauth"]))
    overflow = meta.get("overflow")
    return SharedHold(_whole(meta["tasks"]), capacity=_whole(meta["held"]) if "held" in meta else None,
                      overflow=overflow if isinstance(overflow, str) and "overflow_held" in meta else None,
                      overflow_held=_whole(meta.get("overflow_held", 0)))


def _whole(value: Any) -> int:
    """A count or an amount from an annotation, as a non-negative int (bad values count as 0)."""
    try:
        return max(0, int(value))
    except (TypeError, ValueError):
        return 0


class Owned(NamedTuple):
    """What the adapter tells a verdict about one judged task: its annotation (None
    when the scheduler has no such task) and the clients that want it."""

    meta: dict[str, Any] | None
    owners: Collection[str]


@dataclass(frozen=True)
class GiveUpLater:
    """Request: call :meth:`Settlement.give_up` for ``worker`` after ``after_s`` seconds."""

    worker: str | None
    after_s: float = REGISTRATION_WAIT_S


@dataclass(frozen=True)
class Retire:
    """Request: retire these workers (their provider is quarantined)."""

    workers: tuple[str, ...]


Request = Union[GiveUpLater, Retire]


class Settlement:
    """The settlement of holds, fed events by the scheduler plugin (see the module
    docstring). ``default_provider`` / ``default_rate`` apply to workers that did
    not register a provider (plain ``dask worker`` processes)."""

    def __init__(self, default_provider: str | None = None, default_rate: float = 1.0) -> None:
        self.default_provider = default_provider
        self.default_rate = default_rate
        #: movements for the credit service, oldest first (the reporter pops them)
        self.queue: collections.deque[Movement] = collections.deque()
        #: holds settled or released here (or owed to a worker's registration)
        self.closed: set[str] = set()
        self.providers: dict[str, ProviderInfo] = {}  # by worker address
        self.dispatched: dict[Any, float] = {}  # when each metered task went to its worker
        self.owed: dict[str | None, list[OwedAttempt]] = {}  # by worker address
        self.awaiting: dict[str, AwaitingCopy] = {}  # by hold
        self.shared: dict[str, SharedHold] = {}  # maps' holds still open
        self.maps: collections.OrderedDict[str, MapTally] = collections.OrderedDict()  # by job id
        self.maps_done: set[str] = set()  # maps whose every item is done (a late re-run starts no tally)
        self.quarantined: set[str] = set()  # as learned from the credit service
        self.verdicts = 0
        #: copies a notebook called a mismatch whose digest equalled an agreeing copy's
        self.overruled = 0
        #: mismatches not counted against a provider: too few other providers disagreed with it
        self.unblamed = 0
        #: credits tasks earned that no hold was left to pay (the provider underpaid)
        self.short = 0
        #: further holds maps grew by (:meth:`grow`)
        self.grown_holds = 0
        self._parts_pending = False

    @property
    def has_work(self) -> bool:
        """Whether there is something for the reporter: queued movements or parts."""
        return bool(self.queue) or self._parts_pending

    # -- events ----------------------------------------------------------------------------
    def transition(self, key: Any, meta: dict[str, Any], start: str, finish: str, *, worker: str | None = None,
                   seconds: float = 0.0, now: float = 0.0) -> list[Request]:
        """Task ``key`` (annotated ``meta``) moved from ``start`` to ``finish`` at ``now``;
        a success names its ``worker`` and compute ``seconds``."""
        hold = meta.get("hold")
        if hold is None:
            if finish in ("memory", "erred", "forgotten"):
                logger.error("gpunet metering: task %s carries a gpunet annotation without a hold", key)
            return []
        if finish == "processing":
            self.dispatched[key] = now
        else:
            self.dispatched.pop(key, None)
        self._count_running(key, meta, start, finish, worker)
        share = None
        if _shared_by(meta):
            share = self.shared.get(hold)
            if share is None and hold not in self.closed:
                share = self.shared[hold] = _new_share(meta)
            if share is None or key in share.done or key in share.owed:
                return []  # closed, or paid or refused already: a re-run after its result was lost is not paid again
        elif hold in self.closed:
            return []
        if finish in ("erred", "forgotten"):
            self._unpaid(hold, key, meta)
        if start != "processing" or finish != "memory":
            return []
        info = self._provider_of(worker)
        if info is None:
            # The worker's registration may still be on its way (or being checked):
            # keep the attempt owed to it, paid once it registers, released if never.
            if share is not None:
                share.owed.add(key)
            else:
                self.closed.add(hold)
            first = worker not in self.owed  # one give-up settles all that is owed then
            self.owed.setdefault(worker, []).append(OwedAttempt(key, hold, seconds, meta))
            return [GiveUpLater(worker)] if first else []
        self._paid(key, meta, info.provider, task_price(seconds, info.rate, meta), seconds)
        return []

    def _count_running(self, key: Any, meta: Mapping[str, Any], start: str, finish: str, worker: str | None) -> None:
        """Count a map's items sent to a worker (``worker``, on ``processing``) and not back
        yet: what its holds must cover at worst."""
        named = _map_of(meta)
        if named is None or (finish != "processing" and start != "processing"):
            return
        tally = self._tally(*named)
        if tally is None:
            return
        if key in tally.on:
            tally.per_worker[tally.on.pop(key)] -= 1
        if finish == "processing":
            tally.on[key] = worker
            tally.per_worker[worker] += 1

    def _tally(self, job: str, tasks: int) -> MapTally | None:
        """The map ``job``'s tally, started on its first item (None once it is done)."""
        tally = self.maps.get(job)
        if tally is None and tasks > 0 and job not in self.maps_done:
            tally = self.maps[job] = MapTally(tasks)
            while len(self.maps) > MAX_MAPS:
                self._close_map(next(iter(self.maps)))
        return tally

    def grow(self, job: str, hold: str, amount: Any) -> bool:
        """The notebook placed hold ``hold`` of ``amount`` credits for map ``job``, whose items
        run longer than expected: what they earn beyond the holds they were sent with is
        paid from it. False (released at once) when the map is done or unknown here."""
        tally, amount = self.maps.get(job), _whole(amount)
        if tally is None or hold in self.shared or hold in self.closed or amount < 1:
            if hold not in self.shared:
                self._release(hold)
            return False
        self.shared[hold] = SharedHold(None, capacity=amount)
        tally.growth.append(hold)
        self.grown_holds += 1
        return True

    def map_state(self, job: str, threads: Mapping[str, int] | None = None) -> dict[str, Any] | None:
        """How far map ``job`` has got here: ``tasks``, ``done``, ``running`` (at most how many
        run at once, by its workers' ``threads``: :meth:`MapTally.running`), ``paid`` (from
        every hold) and ``grown`` (credits of the further holds); None before its first item
        was sent to a worker here, or once it is done."""
        tally = self.maps.get(job)
        if tally is None:
            return None
        grown = sum(self.shared[hold].capacity or 0 for hold in tally.growth if hold in self.shared)
        return {"tasks": tally.tasks, "done": tally.done, "running": tally.running(threads or {}),
                "paid": tally.paid, "grown": grown}

    def _close_map(self, job: str) -> None:
        """Map ``job`` is done: pay what its further holds owe and release their rest."""
        tally = self.maps.pop(job, None)
        self.maps_done.add(job)
        for hold in tally.growth if tally is not None else ():
            share = self.shared.pop(hold, None)
            if share is not None:
                self._queue_parts(hold, share)
            if hold not in self.closed:
                self._release(hold)

    def provider_registered(self, worker: str, account: str, rate: float, live: Container[Any]) -> None:
        """``worker`` proved it belongs to provider ``account`` (checked, not
        quarantined) at ``rate``: pay it what it is owed. ``live`` holds the keys the
        scheduler still has (a verified copy forgotten meanwhile is not kept)."""
        self.quarantined.discard(account)  # an operator may have cleared it since
        self.providers[worker] = ProviderInfo(account, float(rate))
        for owed in self.owed.pop(worker, []):
            self._paid(owed.key, owed.meta, account, task_price(owed.seconds, rate, owed.meta),
                       owed.seconds, live)

    def give_up(self, worker: str | None) -> None:
        """A worker that never registered a provider: release what it was owed."""
        for owed in self.owed.pop(worker, []):
            logger.error("gpunet metering: worker %s names no provider; its task %s is not paid", worker, owed.key)
            self._unpaid(owed.hold, owed.key, owed.meta)

    def worker_left(self, worker: str) -> None:
        """Forget a worker that left: its address may be reused by someone else."""
        self.providers.pop(worker, None)

    def verdict(self, client: str | None, job: str, copies: Mapping[Any, bool], tasks: Mapping[Any, Owned], *,
                method: str = "", digest: str = "", checked: bool = True,
                digests: Mapping[Any, str] | None = None) -> None:
        """A notebook's verdict on the copies of one unit of verified job ``job``:
        ``copies`` maps each copy's task key to whether it is in the agreeing quorum.
        Only a client that wants those tasks (``tasks``, from the scheduler) may
        judge them (``client`` is the id the caller gives); the memo names the
        providers seen to run them. ``digests`` are the copies' result digests as
        the scheduler computed them itself: a copy equal to an agreeing one agrees
        (:func:`overruled`), and a mismatch is recorded against a provider only when
        :func:`blamed`."""
        if client is None or not copies:
            return
        corrected = overruled(copies, digests or {})
        if corrected != dict(copies):
            wrong = sorted(str(key) for key in corrected if corrected[key] != bool(copies[key]))
            logger.warning("gpunet metering: client %s called copies %s of job %s mismatches, but their results "
                           "are equal to an agreeing copy's: they agree", client, wrong, job)
            self.overruled += len(wrong)
            copies = corrected
        judged: list[tuple[str, AwaitingCopy, bool]] = []
        for key, agreed in copies.items():
            meta, owners = tasks.get(key) or (None, ())
            if not meta or meta.get("verify") != job or client not in owners:
                logger.error("gpunet metering: client %s judged task %s, which is not one of its copies of job %s",
                             client, key, job)
                continue
            hold = meta.get("hold")
            copy = self.awaiting.pop(hold, None) if hold is not None else None
            if copy is not None:
                judged.append((hold, copy, bool(agreed)))
        agreeing = sorted({copy.provider for _, copy, agreed in judged if agreed})
        memo: dict[str, Any] = {"verified": method, "providers": agreeing, "digest": digest}
        if not checked:
            memo["checked"] = False
        for hold, copy, agreed in judged:
            if copy.provider in self.quarantined:
                self._release(hold)
                continue
            # A mismatch settles 0 to its provider: the hold names whom its verdict is about.
            self._settle(hold, copy.provider, copy.amount if agreed else 0,
                         {**memo, "task": str(copy.key), "seconds": _rounded(copy.seconds)})
            if checked and not agreed and not blamed(copy.provider, agreeing):
                self.unblamed += 1  # it was not accepted (not paid), but it is no evidence against its provider
            elif checked:
                self.queue.append({"op": "record_verification", "provider": copy.provider, "agreed": agreed,
                                   "hold": hold, "key": f"verdict-{hold}"})
        self.verdicts += 1

    def charge_used(self, key: Any, meta: dict[str, Any] | None, worker: str | None, now: float) -> int | None:
        """Task ``key``, processing on ``worker``, is stopped at its --max-credits at
        ``now``: settle its hold for the time since it went there. Returns the
        credits charged, or None when there is nothing to charge."""
        hold = meta.get("hold") if meta else None
        if hold is None or "tasks" in meta or "verify" in meta or hold in self.closed or worker is None:
            # a map's items are not stopped at a limit (they hold their share), and a
            # verified copy is paid only on a verdict
            return None
        info = self._provider_of(worker)
        if info is None:
            return None
        seconds = now - self.dispatched.get(key, now)
        amount = task_price(seconds, info.rate, meta)
        if "preauth" in meta:  # a part of the session's hold, which stays open
            share = self.shared.setdefault(hold, _new_share(meta))
            if key in share.done:
                return None
            return self._item_done(hold, key, info.provider, amount, seconds, meta.get("job"), meta)
        self._settle(hold, info.provider, amount, {"seconds": _rounded(seconds)})
        return amount

    def release_holds(self, holds: Collection[str]) -> None:
        """Release holds whose tasks were never sent (the notebook's submit failed,
        or the scheduler closes); what a map's items earned is paid first."""
        for hold in holds:
            share = self.shared.pop(hold, None)
            if share is not None:
                self._queue_parts(hold, share)
            if hold not in self.closed:
                self._release(hold)

    def close_unknown(self, hold: str, keys: list[Any], live: Container[Any], pending: int = 0) -> None:
        """The notebook saw tasks of ``hold`` cancelled that the scheduler may never
        have created (``live`` holds those it has): count the unknown ones as done,
        unpaid, so that the hold is closed. ``pending`` of the hold's tasks are still alive
        here (not yet done): a map's hold never counts more unknown ones than its tasks leave
        room for beside them, and a cell's hold is not released while its task lives, so
        keys made up cannot close a hold that still pays running work."""
        if len(keys) == 1 and hold not in self.shared:  # a cell's own hold
            if keys[0] not in live and hold not in self.closed and not pending:
                self._release(hold)
            return
        if hold in self.closed:
            return
        share = self.shared.setdefault(hold, SharedHold(len(keys)))
        room = None if share.tasks is None else share.tasks - len(share.done) - len(share.owed) - pending
        for key in keys:
            if room is not None and room <= 0:
                break
            if key not in live and key not in share.done and key not in share.owed:
                self._item_done(hold, key, None, 0, 0.0)
                room = None if room is None else room - 1

    def trust_record(self, record: Mapping[str, Any]) -> list[Request]:
        """A provider's trust record came back from the credit service: a newly
        quarantined provider gets no more work (its workers are retired)."""
        provider = record.get("provider")
        if not record.get("quarantined") or provider in self.quarantined:
            return []
        self.quarantined.add(provider)
        workers = tuple(address for address, info in self.providers.items() if info.provider == provider)
        logger.error("gpunet metering: provider %s is quarantined (%s); retiring its workers %s", provider,
                     record.get("quarantine_reason"), list(workers))
        return [Retire(workers)] if workers else []

    def flush_parts(self) -> None:
        """Queue what maps' items earned since the last report: one ``settle_part`` per
        hold and provider (keyed by its sequence number, so a retry pays it once)."""
        for hold, share in list(self.shared.items()):
            self._queue_parts(hold, share)
        self._parts_pending = False

    # -- rules -----------------------------------------------------------------------------
    def _paid(self, key: Any, meta: dict[str, Any], provider: str, amount: int, seconds: float,
              live: Container[Any] | None = None) -> None:
        """Settle a successful attempt of ``seconds`` on a device, or, for a copy of a
        verified job, keep it until the verdict (a recomputed copy replaces its earlier
        attempt); an item of a map adds to its shared hold's next part. The memo of each
        settlement says the device-seconds it pays for (a provider's dashboard adds them up)."""
        hold = meta["hold"]
        if _shared_by(meta):
            self._item_done(hold, key, provider, amount, seconds, meta.get("job"), meta)
        elif meta.get("verify"):
            if live is not None and key not in live:  # forgotten while its provider was being checked
                self._release(hold)
                return
            self.closed.discard(hold)
            self.awaiting[hold] = AwaitingCopy(key, provider, amount, meta["verify"], seconds)
        elif provider in self.quarantined:  # finished while its workers were being retired: not paid
            self._release(hold)
        else:
            self._settle(hold, provider, amount, {"seconds": _rounded(seconds)})

    def _unpaid(self, hold: str, key: Any, meta: dict[str, Any]) -> None:
        """An attempt nobody is paid for: a map's item counts as done, any other task's
        hold is released (a verified copy no longer awaits its verdict)."""
        if _shared_by(meta):
            self._item_done(hold, key, None, 0, 0.0, meta.get("job"), meta)
        else:
            self.awaiting.pop(hold, None)
            self._release(hold)

    def _item_done(self, hold: str, key: Any, provider: str | None, amount: int, seconds: float,
                   job: Any = None, meta: Mapping[str, Any] | None = None) -> int:
        """One task of a shared hold is done: add what it earned to its provider's next part,
        from the holds that pay it in turn (at most what is left of each: a map's own, the
        further holds it grew, the session's pre-authorized hold), and close a map's hold
        once every item is done. Returns the credits it is paid."""
        share = self.shared.get(hold)
        if share is None:
            return 0
        share.owed.discard(key)
        share.done.add(key)
        tally = share.by_job.setdefault(job, [0, 0]) if isinstance(job, str) else [0, 0]
        tally[1] += 1
        spill = None  # the pre-authorized hold that pays a map's items beyond its own hold
        if share.overflow and share.overflow not in self.closed:
            spill = self.shared.setdefault(share.overflow, SharedHold(None, capacity=share.overflow_held))
        spilled = spill.by_job.setdefault(job, [0, 0]) if spill is not None and isinstance(job, str) else [0, 0]
        spilled[1] += 1
        named = _map_of(meta or {})
        counted = self._tally(*named) if named is not None else None
        grown = [self.shared[h] for h in (counted.growth if counted is not None else ()) if h in self.shared]
        # a map's own hold first, then what it grew; a draw on the pre-authorized hold pays from
        # what the map grew first, so that it leaves the rest of that hold to the session's other jobs
        sources = [share, *grown] if share.tasks is not None else [*grown, share]
        paid = 0
        if provider is not None and provider not in self.quarantined:
            for source in sources + ([spill] if spill is not None and spill.tasks is None else []):
                if paid >= amount:
                    break
                part = self._pay_part(source, provider, source.payable(amount - paid), 0.0 if paid else seconds)
                if source is share:
                    tally[0] += part
                elif source is spill:
                    spilled[0] += part
                paid += part
            if paid < amount:
                share.short += amount - paid
                self.short += amount - paid
                logger.error("gpunet metering: hold %s is spent; task %s earned %d credits and is paid %d",
                             hold, key, amount, paid)
        if counted is not None:
            counted.done += 1
            counted.paid += paid
            if counted.done >= counted.tasks:
                self._close_map(named[0])
        if share.tasks is not None and len(share.done) >= share.tasks:
            self._queue_parts(hold, share)
            del self.shared[hold]
            self._release(hold)
        return paid

    def _pay_part(self, share: SharedHold, provider: str, paid: int, seconds: float) -> int:
        """Add ``paid`` credits for one task to ``provider``'s next part of ``share``."""
        share.paid += paid
        if paid:
            part = share.parts.setdefault(provider, Part())
            part.credits += paid
            part.tasks += 1
            part.seconds += seconds
            self._parts_pending = True
        return paid

    def preauth_state(self, holds: Collection[str], jobs: Collection[str] = ()) -> dict[str, dict[str, Any]]:
        """What was paid so far from each of ``holds`` (pre-authorized or a map's), in all
        and for each of ``jobs`` (``{"paid", "done"}``: credits, and tasks done paid or
        not); a hold no task of which finished here is missing from the answer."""
        state = {}
        for hold in holds:
            share = self.shared.get(hold)
            if share is not None:
                state[hold] = {"paid": share.paid, "short": share.short,
                               "jobs": {job: dict(zip(("paid", "done"), share.by_job[job]))
                                        for job in jobs if job in share.by_job}}
        return state

    def _queue_parts(self, hold: str, share: SharedHold) -> None:
        for provider, part in share.parts.items():
            share.sequence += 1
            self.queue.append({"op": "settle_part", "hold": hold, "provider": provider, "amount": part.credits,
                               "memo": {"tasks": part.tasks, "seconds": _rounded(part.seconds)}, "key": f"part-{hold}-{share.sequence}"})
        share.parts.clear()

    def _provider_of(self, worker: str | None) -> ProviderInfo | None:
        if worker in self.providers:
            return self.providers[worker]
        return None if self.default_provider is None else ProviderInfo(self.default_provider, self.default_rate)

    # -- movements: closing a hold, settled to a provider or released ------------------------
    def _release(self, hold: str) -> None:
        self.closed.add(hold)
        self.queue.append({"op": "release", "hold": hold, "key": f"release-{hold}"})

    def _settle(self, hold: str, provider: str, amount: int, memo: dict[str, Any] | None = None) -> None:
        movement: Movement = {"op": "settle", "hold": hold, "provider": provider, "amount": amount,
                              "key": f"settle-{hold}"}
        if memo is not None:
            movement["memo"] = memo
        self.closed.add(hold)
        self.queue.append(movement)
