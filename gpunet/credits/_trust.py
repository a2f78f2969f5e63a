"""Providers' trust records: adaptive trust, as volunteer computing keeps it.

Every verified result of a provider (replicated on distinct providers, or
spot-checked against a known answer) is recorded as *agreed* or a *mismatch*.
A provider's reputation is a smoothed share of good results::

    reputation = (valid + PRIOR) / (valid + PRIOR + PENALTY * mismatches)

``PRIOR`` good results are assumed before the first one, so a newcomer starts
at 1.0 and one early mismatch does not sink it; each mismatch weighs ``PENALTY``
times a valid result. A mismatch reported on a client's hold counts only while that client account has
counted fewer than ``MISMATCHES_PER_CLIENT_DAY`` against the same provider that UTC
day (the scheduler records one only when at least two other providers agreed against
it, :func:`gpunet.metering.settlement.blamed`).
A provider whose reputation falls below the floor
(``REPUTATION_FLOOR``, or ``serve(reputation_floor=...)``) is quarantined: it stays
so (more valid results do not lift it) until an operator clears it, which forgives
its mismatches.
``consecutive_valid`` (the valid results since the last mismatch or clearing)
lets a scheduler verify long-reliable providers less often.

The records move no credits, so they write no ledger entries; they live in the
``provider_records`` table and change only through the store's writer.
"""

from __future__ import annotations

from typing import Any

PRIOR = 10
PENALTY = 5
REPUTATION_FLOOR = 0.5
#: The mismatches one client account's verdicts may count against one provider in a UTC
#: day (``gpunet credits serve --mismatches-per-client-day``): fewer than it takes to
#: quarantine a provider with a clean record (3: reputation 10 / 25 = 0.4), so that no
#: single client can quarantine anyone on its own word in a day.
MISMATCHES_PER_CLIENT_DAY = 2


def counts_today(counted: int, cap: int = MISMATCHES_PER_CLIENT_DAY) -> bool:
    """Whether one more mismatch from a client whose verdicts already ``counted`` that many
    against a provider today counts (at most ``cap`` a day; a negative cap: no limit)."""
    return cap < 0 or counted < cap


def reputation(valid: int, mismatches: int) -> float:
    """Return a provider's reputation in (0, 1] from its counts (see the module doc)."""
    return (valid + PRIOR) / (valid + PRIOR + PENALTY * mismatches)


def quarantine_reason(valid: int, mismatches: int, floor: float = REPUTATION_FLOOR) -> str:
    """Return why a provider with these counts is to be quarantined below reputation ``floor``
    (``serve(reputation_floor=...)``), or ``""`` if it is not."""
    score = reputation(valid, mismatches)
    if score >= floor:
        return ""
    return (f"reputation {score:.3f} fell below {floor} after {valid} valid result(s) and "
            f"{mismatches} mismatch(es)")


def record_json(provider: str, consecutive_valid: int, valid: int, mismatches: int, quarantined: bool,
                quarantine_reason: str, updated: str | None) -> dict[str, Any]:
    """Return the JSON form of a trust record, with its reputation; ``updated`` is ``None`` before the first."""
    return {
        "provider": provider,
        "consecutive_valid": consecutive_valid,
        "valid": valid,
        "mismatches": mismatches,
        "reputation": reputation(valid, mismatches),
        "quarantined": bool(quarantined),
        "quarantine_reason": quarantine_reason,
        "updated": updated,
    }
