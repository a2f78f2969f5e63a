"""A running map's holds, kept ahead of what its items will cost.

A map is sent holding what its items are expected to cost (:func:`gpunet.metering.meter.expected_hold`).
While it runs, :class:`MapGrowth` looks at how far it has got on the scheduler
(``wire.MAP_STATE``: items done and running, what they were paid) and, before its holds
could run short, places a further hold from the session's budget and hands it to the
scheduler (``wire.GROW_MAP``), which pays from it what the items earn beyond the holds
they were sent with (:meth:`gpunet.metering.settlement.Settlement.grow`). The items
running are covered at their worst case (each may be paid up to its hold per item), the
rest at what the map's items have cost so far. When the budget cannot cover more, the map
pauses: the scheduler cancels its items not yet sent to a worker (``wire.PAUSE_MAP``, in
one step there), the items running finish and are paid in full, and waiting for the map
raises a :class:`~gpunet.errors.BudgetError` that says how much more it needs.

:class:`ItemTimes` learns how long a function's map items take on a device, so that the
next map of that function is held at what it is expected to cost.
"""

from __future__ import annotations

import hashlib
import logging
import math
import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from gpunet import wire
from gpunet.credits import BudgetExceededError
from gpunet.worker.runner import pause_job

logger = logging.getLogger(__name__)

#: What a map item is expected to take on a device, where nothing better is known.
EXPECTED_ITEM_SECONDS = 1.0
#: How much more than its items' expected price a map holds (and grows by).
EXPECTED_MARGIN = 1.5
#: How often a running map's holds are looked at.
GROWTH_LOOK_S = 0.25
#: Looks that failed in a row after which a map's holds are no longer looked at (its network is gone).
GIVE_UP_LOOKS = 40
#: How much one map of a function moves its expected item time: the weight of the
#: newest map's mean against what the earlier ones taught.
NEWEST_WEIGHT = 0.5
#: How many functions' item times a session remembers.
REMEMBERED_FUNCTIONS = 256


def more_to_hold(*, held: int, paid: int, done: int, running: int, tasks: int, per_item: int,
                 expected_price: float) -> int:
    """How many more credits a map should hold now (0: its holds suffice). ``held``: what
    its holds hold in all; ``paid``: what its ``done`` items were paid; ``running``: items
    sent to a worker and not back; ``tasks``: its items; ``per_item``: the most one item may
    be paid; ``expected_price``: what an item was expected to cost. The running items are
    covered at ``per_item`` each (so none is ever paid less than it earned), the ones not
    yet sent at what the done ones cost on average (at least ``expected_price``); it grows,
    by :data:`EXPECTED_MARGIN` of that, once what is left of its holds covers less."""
    left = held - paid
    waiting = max(0, tasks - done - running)
    price = min(float(per_item), max(expected_price, paid / done if done else 0.0))
    if left >= running * per_item + waiting * price:
        return 0
    return max(1, math.ceil(running * per_item + waiting * price * EXPECTED_MARGIN) - left)


def function_key(job: Any) -> str:
    """What names a map's function across maps of a session: its module and qualified
    name, or the digest of its code."""
    function = getattr(job, "function", None)
    if function is not None:
        return f"{getattr(function, '__module__', '')}.{getattr(function, '__qualname__', repr(function))}"
    return hashlib.sha256(str(getattr(job, "code", "")).encode()).hexdigest()


@dataclass
class ItemTimes:
    """A session's running estimate of how long one map item of each function takes on a
    device (its items' mean, each map weighing :data:`NEWEST_WEIGHT` against the earlier
    ones), :data:`EXPECTED_ITEM_SECONDS` for a function never seen."""

    seconds: OrderedDict[str, float] = field(default_factory=OrderedDict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def expected(self, key: str) -> float:
        """Seconds an item of function ``key`` is expected to take."""
        with self._lock:
            return self.seconds.get(key, EXPECTED_ITEM_SECONDS)

    def observe(self, key: str, durations: list[float]) -> None:
        """A map of function ``key`` ran items that took ``durations`` seconds each."""
        durations = [max(0.0, float(d)) for d in durations if d is not None and math.isfinite(d)]
        if not durations:
            return
        mean = sum(durations) / len(durations)
        with self._lock:
            earlier = self.seconds.pop(key, None)
            self.seconds[key] = mean if earlier is None else earlier + NEWEST_WEIGHT * (mean - earlier)
            while len(self.seconds) > REMEMBERED_FUNCTIONS:
                self.seconds.popitem(last=False)


@dataclass
class MapGrowth:
    """Keeps one running map's holds ahead of what its items will cost (see the module
    docstring): ``held`` is what it was sent with, ``per_item`` the most an item may be
    paid, ``expected_price`` what an item was expected to cost."""

    #: the notebook's connection (a :class:`gpunet.client.handle.Connection` with a meter)
    network: Any
    job_id: str
    tasks: int
    per_item: int
    held: int
    expected_price: float
    #: the keys of the map's items not finished here (for a pause)
    unfinished: Any = None
    grown: int = 0
    #: why the map paused (None while it runs), said on its progress line and in its error
    paused: str | None = None
    _number: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        """Look at the map every :data:`GROWTH_LOOK_S` in the background until :meth:`stop`."""
        def loop() -> None:
            failures = 0
            while not self._stop.wait(GROWTH_LOOK_S):
                try:
                    if not self.look():
                        return
                    failures = 0
                except Exception as exc:  # noqa: BLE001 - the scheduler or service away: try again
                    failures += 1
                    logger.warning("gpunet metering: could not look at map %s's holds now: %s", self.job_id, exc)
                    if failures >= GIVE_UP_LOOKS:
                        return

        self._thread = threading.Thread(target=loop, name=f"gpunet-grow-{self.job_id}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop looking (the map is done here)."""
        self._stop.set()

    def look(self) -> bool:
        """One look: grow the map's holds if they could run short, or pause it where the
        budget cannot cover more. False once there is nothing more to do."""
        if self.paused is not None or (self.unfinished is not None and not self.unfinished()):
            return False
        state = self.network.call_scheduler(wire.MAP_STATE, job=self.job_id)
        if state is None:  # no item reached a worker yet, or every one is done
            return True
        more = more_to_hold(held=self.held + self.grown, paid=int(state["paid"]), done=int(state["done"]),
                            running=int(state["running"]), tasks=self.tasks, per_item=self.per_item,
                            expected_price=self.expected_price)
        if more > 0:
            self._grow(more)
        return True

    def _grow(self, more: int) -> None:
        meter = self.network.meter
        try:
            self._place(more)
            return
        except BudgetExceededError:
            pass
        left = meter.credits.usage(meter.session)["left"]
        if left >= 1:  # what is left of the budget still pays the items running
            try:
                self._place(left)
            except BudgetExceededError:
                pass
        self._pause(more, left)

    def _place(self, amount: int) -> None:
        self._number += 1
        hold = self.network.meter.place(f"grow-{self.job_id}-{self._number}", amount)
        try:
            grown = self.network.call_scheduler(wire.GROW_MAP, job=self.job_id, hold=hold, amount=amount)
        except BaseException:
            self.network.release_unsent([hold])  # not handed over: nothing may stay held by it
            raise
        if grown:
            self.grown += amount
        else:  # the map finished meanwhile (the scheduler released it already)
            self.network.release_unsent([hold])

    def _pause(self, more: int, left: int) -> None:
        self.paused = (f"the map needs about {more} more credits than it holds for its items still to run, and "
                       f"the session's budget has {left} left; its items not started yet do not start (those "
                       f"running are paid in full). To run it: raise the budget (%gpunet connect --budget N), "
                       f"or send fewer items")
        client = self.network.client
        # every worker's items of it not started yet never start (each errs at once, unpaid);
        # those still queued at the scheduler are cancelled there
        try:
            client.sync(client._run, pause_job, self.job_id, on_error="ignore")
        except Exception as exc:  # noqa: BLE001 - where workers run nothing for a client (an open network)
            logger.warning("gpunet metering: could not tell the workers that map %s paused: %s", self.job_id, exc)
        keys = list(self.unfinished()) if self.unfinished is not None else []
        cancelled = self.network.call_scheduler(wire.PAUSE_MAP, keys=keys)
        print(f"[gpunet: the map paused: {self.paused}]", file=sys.stderr, flush=True)
        logger.warning("gpunet metering: map %s paused (%d items cancelled before they reached a worker): %s",
                       self.job_id, cancelled, self.paused)
