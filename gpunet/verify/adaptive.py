"""Adaptive trust: whether one provider's result is checked, decided as it arrives.

``--verify adaptive`` sends each unit once and, when its result arrives, decides
from the provider's record *at that moment* whether a second provider checks it.
The record moves with every verdict of the same job, so a provider's run of
verified results changes the very next unit's choice, and a mismatch (which
resets the run) makes every later result of that provider in the job checked
again, at once; so does a disagreement between two copies, before a third one
has said which of them lied.

The rule (:func:`check_probability`), adaptive replication as volunteer
computing does it, made stricter for providers that have lied before:

- a provider is checked every time until it has :func:`trusted_after` verified
  results in a row: :data:`TRUSTED_AFTER` for a clean record, that many more for
  each mismatch on its record (an operator's clearing forgives them);
- after that, a result is checked with probability
  ``trusted_after / (CHECK_SHARE * consecutive_valid)``: a quarter at first,
  falling as the run grows, never zero.

A provider lying 20% of the time rarely reaches a run of 25 (0.8 ** 25 < 0.4%),
so nearly all its results are checked until its reputation quarantines it; an
honest network's copies per unit fall towards 1 + 1/(4 x its runs).
``benchmarks/verification.py`` measures both.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

#: Verified results in a row before a provider with a clean record is spot-checked
#: rather than checked every time.
TRUSTED_AFTER = 25
#: Once trusted, a result is checked with probability trusted_after / (CHECK_SHARE x run).
CHECK_SHARE = 4


def trusted_after(mismatches: int) -> int:
    """The run of verified results a provider with ``mismatches`` on its record needs
    before its results are checked only some of the time."""
    return TRUSTED_AFTER * (1 + max(0, mismatches))


def check_probability(consecutive_valid: int, mismatches: int) -> float:
    """How likely the next result of a provider with this record is checked (see the
    module doc): 1.0 until it is trusted, then falling with its run."""
    needed = trusted_after(mismatches)
    if consecutive_valid < needed:
        return 1.0
    return min(1.0, needed / (CHECK_SHARE * consecutive_valid))


def needs_check(consecutive_valid: int, mismatches: int, draw: float) -> bool:
    """Whether a result is checked, given a uniform ``draw`` in [0, 1)."""
    return draw < check_probability(consecutive_valid, mismatches)


#: What a result's check said, or has yet to say.
PENDING, DISPUTED = "pending", "disputed"


@dataclass
class _History:
    """One provider's record in a job: the settled part, then its checked results in
    the order they arrived (True agreed, False a mismatch, PENDING, DISPUTED)."""

    run: int = 0
    mismatches: int = 0
    first: int = 0  # the number of outcomes[0] among all the provider's results in the job
    outcomes: list[Any] = field(default_factory=list)


@dataclass
class TrustRecords:
    """A job's view of its providers' trust records, moved by the job's own verdicts
    (the credit service keeps the lasting ones; the scheduler reports to it).

    Results are counted in the order they *arrived*, not the order their checks
    finished: a provider's run grows only up to its first result whose check is still
    pending (a liar's lie in flight cannot be overtaken by later agreements), and
    drops to 0 at once at a mismatch, or at a disagreement that a third copy has yet
    to settle."""

    histories: dict[str, _History] = field(default_factory=dict)

    @classmethod
    def of(cls, records: Mapping[str, Mapping[str, Any]]) -> TrustRecords:
        """The view of the credit service's records (provider -> record)."""
        return cls({p: _History(int(r.get("consecutive_valid", 0)), int(r.get("mismatches", 0)))
                    for p, r in records.items()})

    def _of(self, provider: str) -> _History:
        return self.histories.setdefault(provider, _History())

    def run(self, provider: str) -> int:
        """The provider's verified results in a row, counted in the order they arrived
        and no further than a result whose check is still pending; a mismatch or a
        dispute anywhere resets it."""
        history = self._of(provider)
        run, blocked = history.run, False
        for outcome in history.outcomes:
            if outcome is False or outcome == DISPUTED:
                run, blocked = 0, False
            elif outcome == PENDING:
                blocked = True
            elif outcome is True and not blocked:
                run += 1
        return run

    def mismatches(self, provider: str) -> int:
        """The provider's mismatches: its record's and this job's."""
        history = self._of(provider)
        return history.mismatches + sum(outcome is False for outcome in history.outcomes)

    def needs_check(self, provider: str, draw: float) -> bool:
        """Whether the provider's result that just arrived is checked (``draw`` uniform in [0, 1))."""
        return needs_check(self.run(provider), self.mismatches(provider), draw)

    def arrived(self, provider: str) -> int:
        """A result of the provider arrived: its place in the provider's order (a token
        for :meth:`dispute` and :meth:`settle`)."""
        history = self._of(provider)
        history.outcomes.append(PENDING)
        return history.first + len(history.outcomes) - 1

    def dispute(self, provider: str, token: int) -> None:
        """The result disagrees with another copy, and a third is yet to say who lied:
        the provider is not trusted meanwhile."""
        self._set(provider, token, DISPUTED)

    def settle(self, provider: str, token: int, agreed: bool | None) -> None:
        """The verdict on the result: agreed, a mismatch, or None (it was not checked)."""
        self._set(provider, token, agreed)

    def _set(self, provider: str, token: int, outcome: Any) -> None:
        history = self._of(provider)
        place = token - history.first
        if not 0 <= place < len(history.outcomes):
            return
        history.outcomes[place] = outcome
        while history.outcomes and history.outcomes[0] not in (PENDING, DISPUTED):  # fold the settled part
            settled = history.outcomes.pop(0)
            history.first += 1
            if settled is True:
                history.run += 1
            elif settled is False:
                history.run, history.mismatches = 0, history.mismatches + 1
