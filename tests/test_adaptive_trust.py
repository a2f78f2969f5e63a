"""Adaptive trust decided per result as it arrives: the pure decision of
gpunet.verify.adaptive, driven by scripted sequences of verdicts (no Dask, no network)."""

from __future__ import annotations

import random

import pytest

from gpunet.verify.adaptive import (
    CHECK_SHARE,
    TRUSTED_AFTER,
    TrustRecords,
    check_probability,
    needs_check,
    trusted_after,
)

ALMOST_ONE = 0.999999  # a draw that only a certain check passes


def _checked(trust: TrustRecords, provider: str, agreed: bool) -> None:
    """One result of ``provider`` arrives and its check says ``agreed``."""
    trust.settle(provider, trust.arrived(provider), agreed)


def test_a_newcomer_is_checked_every_time_until_its_run_reaches_the_threshold():
    trust = TrustRecords()
    for _ in range(TRUSTED_AFTER):
        assert trust.needs_check("alice", ALMOST_ONE)
        _checked(trust, "alice", True)
    assert not trust.needs_check("alice", ALMOST_ONE)
    assert check_probability(TRUSTED_AFTER, 0) == pytest.approx(1 / CHECK_SHARE)


def test_each_verdict_changes_the_very_next_choice():
    """The record at the moment a result arrives decides: one more agreed result
    turns a certain check into a spot check."""
    trust = TrustRecords.of({"alice": {"consecutive_valid": TRUSTED_AFTER - 1}})
    assert trust.needs_check("alice", 0.5)
    _checked(trust, "alice", True)
    assert not trust.needs_check("alice", 0.5)


def test_a_mismatch_takes_the_trust_away_at_once_and_longer_each_time():
    trust = TrustRecords.of({"mallory": {"consecutive_valid": 10 * TRUSTED_AFTER}})
    assert not trust.needs_check("mallory", 0.5)
    _checked(trust, "mallory", False)
    # every later result of hers in the job is checked, until a run twice as long as a newcomer's
    for _ in range(2 * TRUSTED_AFTER):
        assert trust.needs_check("mallory", ALMOST_ONE)
        _checked(trust, "mallory", True)
    assert not trust.needs_check("mallory", ALMOST_ONE)
    assert trusted_after(2) == 3 * TRUSTED_AFTER


def test_records_come_from_the_credit_service_and_others_are_left_alone():
    trust = TrustRecords.of({"alice": {"consecutive_valid": 60, "mismatches": 1},
                             "bob": {"consecutive_valid": 3, "mismatches": 0}})
    assert not trust.needs_check("alice", 0.5)
    assert trust.needs_check("bob", 0.0) and trust.needs_check("carol", ALMOST_ONE)
    _checked(trust, "bob", False)
    assert trust.run("alice") == 60 and (trust.mismatches("alice"), trust.mismatches("bob")) == (1, 1)


def test_agreements_cannot_overtake_a_check_still_pending():
    """Verdicts finish out of order: a lie whose check is in flight must not be
    overtaken by later agreements that would make its provider trusted."""
    trust = TrustRecords()
    in_flight = trust.arrived("mallory")
    for _ in range(TRUSTED_AFTER + 5):
        _checked(trust, "mallory", True)
    assert trust.run("mallory") == 0 and trust.needs_check("mallory", ALMOST_ONE)
    trust.settle("mallory", in_flight, False)  # it was a lie: the agreements after it count from 0
    assert trust.run("mallory") == TRUSTED_AFTER + 5 and trust.mismatches("mallory") == 1
    assert trust.needs_check("mallory", ALMOST_ONE)  # after a mismatch she needs twice the run
def test_the_check_probability_falls_with_the_run_and_never_reaches_zero():
    probabilities = [check_probability(run, 0) for run in range(TRUSTED_AFTER, 100_000, 997)]
    assert probabilities == sorted(probabilities, reverse=True)
    assert 0 < probabilities[-1] < 0.001
    assert needs_check(10**6, 0, 0.0)


def _scripted_liar(units: int, lie_rate: float, seed: int) -> tuple[int, int, int]:
    """Three providers, one lying at ``lie_rate``, units arriving one by one; a check
    goes to the other provider with the longest run and a disagreement to the third.
    Returns (lies, lies accepted, copies)."""
    rng = random.Random(seed)
    trust = TrustRecords()
    lies = accepted_lies = copies = 0
    providers = ["alice", "bob", "mallory"]
    for unit in range(units):
        first = providers[unit % 3]
        lied = first == "mallory" and rng.random() < lie_rate
        lies += lied
        copies += 1
        token = trust.arrived(first)
        if not trust.needs_check(first, rng.random()):
            trust.settle(first, token, None)
            accepted_lies += lied
            continue
        checker = max((p for p in providers if p != first), key=trust.run)
        checker_lied = checker == "mallory" and rng.random() < lie_rate
        lies += checker_lied
        copies += 1
        if lied or checker_lied:  # a third copy, on the honest one left, settles it
            copies += 1
            trust.settle(first, token, first != "mallory")
            for provider in providers:
                if provider != first:
                    _checked(trust, provider, provider != "mallory")
        else:
            trust.settle(first, token, True)
            _checked(trust, checker, True)
    return lies, accepted_lies, copies


def test_a_liar_at_20_percent_is_caught_nearly_always_and_the_honest_pay_little():
    lies = accepted = copies = 0
    for seed in range(20):
        run_lies, run_accepted, run_copies = _scripted_liar(2000, 0.2, seed)
        lies, accepted, copies = lies + run_lies, accepted + run_accepted, copies + run_copies
    assert (lies - accepted) / lies >= 0.99
    honest = [_scripted_liar(2000, 0.0, seed)[2] / 2000 for seed in range(5)]
    assert max(honest) < 1.2


def test_a_dispute_takes_the_trust_away_until_the_third_copy_says_who_lied():
    trust = TrustRecords.of({"alice": {"consecutive_valid": 100}, "mallory": {"consecutive_valid": 100}})
    alice, mallory = trust.arrived("alice"), trust.arrived("mallory")
    trust.dispute("alice", alice)
    trust.dispute("mallory", mallory)
    assert trust.needs_check("alice", ALMOST_ONE) and trust.needs_check("mallory", ALMOST_ONE)
    trust.settle("alice", alice, True)  # the tie-breaker agreed with alice
    trust.settle("mallory", mallory, False)
    assert trust.run("alice") == 101 and trust.run("mallory") == 0
    assert (trust.mismatches("alice"), trust.mismatches("mallory")) == (0, 1)


def test_an_unchecked_result_neither_counts_nor_blocks():
    trust = TrustRecords()
    unchecked = trust.arrived("alice")
    _checked(trust, "alice", True)
    trust.settle("alice", unchecked, None)
    assert trust.run("alice") == 1
