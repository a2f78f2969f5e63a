"""Holds placed ahead for verified jobs' copies, so that a verified job waits for no credit service.

A copy of a verified job needs a hold of its own: the scheduler settles it to the copy's
provider only once the notebook's verdict says the copy agreed (a copy that lost the
verdict is settled 0), and the credit service records the verdict on that hold, so that
nobody can be blamed for a copy they never ran. What a verified job need not do is wait
while those holds are placed: :class:`CopyHolds` keeps, for each size of copy hold the
session's verified jobs asked for, as many holds ready as the largest of them took (for
:data:`JOBS_AHEAD` such jobs), placed
in the background (by the meter's refilling thread) from the session's budget like its
pre-authorized hold, and released with it when the session idles or closes.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

#: The most copy holds of one size kept ready.
MOST_READY = 32
#: How many jobs' worth of copy holds are kept ready (the next job finds its holds while
#: the ones taken are placed again).
JOBS_AHEAD = 2
#: How many copy holds a session places when it connects, for its first verified job: the
#: copies of a cell with the default policy (``--verify replicate`` sends 2; an adaptive or
#: spot check sends 1, and a second where it checks).
FIRST_JOB_COPIES = 2


@dataclass
class CopyHolds:
    """The copy holds ready, by size (credits), and how many of each size to keep ready."""

    ready: dict[int, list[str]] = field(default_factory=dict)
    wanted: dict[int, int] = field(default_factory=dict)
    used_at: float = field(default_factory=time.monotonic)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self, count: int, amount: int) -> list[str] | None:
        """``count`` ready holds of at least ``amount`` credits (the smallest first), or None
        while fewer are ready (the job places its own); either way, that many of ``amount``
        are kept ready from now on."""
        with self._lock:
            self.used_at = time.monotonic()
            self.wanted[amount] = min(MOST_READY, max(self.wanted.get(amount, 0), JOBS_AHEAD * count))
            sizes = sorted(size for size in self.ready if size >= amount)
            if sum(len(self.ready[size]) for size in sizes) < count:
                return None
            taken: list[str] = []
            for size in sizes:
                ready = self.ready[size]
                grabbed = ready[:count - len(taken)]
                self.ready[size] = ready[len(grabbed):]
                taken += grabbed
            return taken

    def want(self, count: int, amount: int) -> None:
        """Keep at least ``count`` holds of ``amount`` credits ready (before any job took one)."""
        with self._lock:
            self.wanted[amount] = min(MOST_READY, max(self.wanted.get(amount, 0), count))

    def missing(self) -> list[tuple[int, int]]:
        """``(size, how many)`` of the holds to place to have as many ready as wanted."""
        with self._lock:
            return [(amount, want - len(self.ready.get(amount, [])))
                    for amount, want in self.wanted.items() if want > len(self.ready.get(amount, []))]

    def add(self, amount: int, hold: str) -> None:
        """A hold of ``amount`` credits was placed: it is ready."""
        with self._lock:
            self.ready.setdefault(amount, []).append(hold)

    def held(self) -> dict[str, int]:
        """Every ready hold and its size."""
        with self._lock:
            return {hold: amount for amount, holds in self.ready.items() for hold in holds}

    def give_up(self) -> list[str]:
        """Forget every ready hold (to be released) and what was wanted; returns their ids."""
        with self._lock:
            holds = [hold for holds in self.ready.values() for hold in holds]
            self.ready, self.wanted = {}, {}
            return holds
