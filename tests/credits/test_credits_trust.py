"""Providers' trust records: verified results counted, reputation, sticky quarantine, clearing,
idempotency, who may do what, batches beside settlements, concurrency and restarts."""

from __future__ import annotations

import threading

import pytest

from credits_helpers import Party, run_threads
from gpunet.credits import (
    CreditClient,
    ForbiddenError,
    IdempotencyConflictError,
    InvalidRequestError,
    NotFoundError,
    serve_in_background,
)
from gpunet.credits._trust import PENALTY, PRIOR, REPUTATION_FLOOR, reputation

FIELDS = {"provider", "consecutive_valid", "valid", "mismatches", "reputation", "quarantined", "quarantine_reason",
          "updated"}


def test_the_formula_and_its_constants():
    assert (PRIOR, PENALTY, REPUTATION_FLOOR) == (10, 5, 0.5)
    assert reputation(0, 0) == 1.0
    assert reputation(2, 1) == pytest.approx(12 / 17)
    assert reputation(0, 2) == 0.5  # at the floor: not below it
    assert reputation(0, 3) < REPUTATION_FLOOR


def test_a_new_provider_has_the_default_record_readable_by_anyone(party: Party):
    gpu, gpu_api = party.account("provider")
    client, client_api = party.account("client")
    for api in (party.ops, gpu_api, client_api):
        record = api.provider_record(gpu)
        assert set(record) == FIELDS
        assert record == {"provider": gpu, "consecutive_valid": 0, "valid": 0, "mismatches": 0, "reputation": 1.0,
                          "quarantined": False, "quarantine_reason": "", "updated": None}
    assert gpu in [r["provider"] for r in client_api.provider_records()]
    with pytest.raises(NotFoundError, match="no account named 'nobody-at-all'"):
        client_api.provider_record("nobody-at-all")
    with pytest.raises(NotFoundError, match=f"account '{client}' is a client, not a provider"):
        gpu_api.provider_record(client)


def test_verifications_count_and_quarantine_is_sticky_until_cleared(party: Party):
    ops = party.ops
    gpu, gpu_api = party.account("provider")
    size = ops.health()["size"]
    ops.record_verification(gpu, True, key="v1")
    rec = ops.record_verification(gpu, True, key="v2")
    assert (rec["valid"], rec["consecutive_valid"], rec["mismatches"], rec["reputation"]) == (2, 2, 0, 1.0)
    assert rec["updated"] is not None
    rec = ops.record_verification(gpu, False, key="v3")
    assert (rec["valid"], rec["consecutive_valid"], rec["mismatches"]) == (2, 0, 1)
    assert rec["reputation"] == pytest.approx(12 / 17) and not rec["quarantined"]
    rec = ops.record_verification(gpu, False, key="v4")
    assert not rec["quarantined"] and rec["reputation"] == pytest.approx(12 / 22)
    rec = ops.record_verification(gpu, False, key="v5")
    assert rec["quarantined"] and rec["reputation"] == pytest.approx(12 / 27)
    reason = rec["quarantine_reason"]
    assert "0.444" in reason and "2 valid" in reason and "3 mismatch" in reason
    # Sticky: valid results lift the reputation above the floor, the quarantine stays.
    for i in range(5):
        rec = ops.record_verification(gpu, True, key=f"v-after-{i}")
    assert rec["reputation"] > REPUTATION_FLOOR and rec["quarantined"] and rec["quarantine_reason"] == reason
    assert rec["consecutive_valid"] == 5 and rec["valid"] == 7
    assert gpu_api.provider_record(gpu) == rec
    assert ops.health()["size"] == size, "trust records wrote ledger entries"
    cleared = ops.clear_quarantine(gpu, key="clear-1")
    assert (cleared["quarantined"], cleared["quarantine_reason"], cleared["mismatches"],
            cleared["consecutive_valid"], cleared["valid"]) == (False, "", 0, 0, 7)
    assert cleared["reputation"] == 1.0
    assert ops.clear_quarantine(gpu, key="clear-1") == cleared  # a retry answers the same
    assert ops.provider_record(gpu) == cleared
    assert ops.clear_quarantine(gpu, key="clear-2")["valid"] == 7  # clearing a clear provider is harmless


def test_a_retried_verification_counts_once(party: Party):
    ops = party.ops
    gpu, _ = party.account("provider")
    first = ops.record_verification(gpu, False, key="same")
    assert ops.record_verification(gpu, False, key="same") == first
    assert ops.provider_record(gpu)["mismatches"] == 1
    with pytest.raises(IdempotencyConflictError, match="'same' was already used"):
        ops.record_verification(gpu, True, key="same")
    with pytest.raises(IdempotencyConflictError):
        ops.clear_quarantine(gpu, key="same")


def test_only_an_operator_records_or_clears(party: Party):
    gpu, gpu_api = party.account("provider")
    client, client_api = party.account("client")
    for api in (gpu_api, client_api):
        with pytest.raises(ForbiddenError, match="record verification needs role meter or operator"):
            api.record_verification(gpu, True, key="self-praise")
        with pytest.raises(ForbiddenError, match="clear quarantine needs role operator"):
            api.clear_quarantine(gpu, key="self-clear")
    with pytest.raises(NotFoundError, match="no provider account named 'nobody-at-all'"):
        party.ops.record_verification("nobody-at-all", True, key="nobody")
    with pytest.raises(InvalidRequestError, match="is a client, not a provider"):
        party.ops.record_verification(client, True, key="client")
    assert party.ops.provider_record(gpu)["updated"] is None


def test_settlements_and_verifications_in_one_batch(party: Party):
    ops = party.ops
    alice, me = party.account("client", credits=100)
    good, _ = party.account("provider")
    bad, _ = party.account("provider")
    sid = me.open_session(100)
    h1, h2 = me.hold(sid, 10, key="c1"), me.hold(sid, 10, key="c2")
    memo = {"verified": "replicate:2", "providers": [good], "digest": "sha256:" + "0" * 64}
    items = [{"op": "settle", "hold": h1, "provider": good, "amount": 10, "memo": memo, "key": "settle-c1"},
             {"op": "release", "hold": h2, "key": "release-c2"},
             {"op": "record_verification", "provider": good, "agreed": True, "key": "verdict-c1"},
             {"op": "record_verification", "provider": bad, "agreed": False, "key": "verdict-c2"},
             {"op": "record_verification", "provider": alice, "agreed": False, "key": "verdict-client"},
             {"op": "record_verification", "provider": bad, "agreed": "no", "key": "verdict-bad"}]
    out = ops.batch(items)
    assert [r["ok"] for r in out] == [True, True, True, True, False, False]
    assert out[2]["provider"] == good and out[2]["valid"] == 1 and not out[2]["quarantined"]
    assert out[3]["provider"] == bad and out[3]["mismatches"] == 1
    assert out[4]["status"] == 422 and "not a provider" in out[4]["error"]["message"]
    assert out[5]["status"] == 422 and "true or false" in out[5]["error"]["message"]
    assert ops.batch(items) == out  # the whole batch again: nothing counted twice
    assert ops.provider_record(good)["valid"] == 1 and ops.provider_record(bad)["mismatches"] == 1
    assert ops.balance(good) == 10
    # A batch of verdicts quarantines within the batch and says so in the item's result.
    out = ops.batch([{"op": "record_verification", "provider": bad, "agreed": False, "key": f"more-{i}"}
                     for i in range(2)])
    assert [r["quarantined"] for r in out] == [False, True]
    listed = {r["provider"]: r for r in ops.provider_records()}
    assert listed[bad]["quarantined"] and not listed[good]["quarantined"]
    names = [r["provider"] for r in ops.provider_records()]
    assert names == sorted(names) and alice not in names


def test_concurrent_verifications_are_all_counted(party: Party):
    gpu, _ = party.account("provider")
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        api = CreditClient(party.svc.url, party.svc.operator_token)
        try:
            for i in range(25):
                api.record_verification(gpu, (n + i) % 5 != 0, key=f"c-{n}-{i}")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    run_threads([threading.Thread(target=worker, args=(n,)) for n in range(8)], timeout=60)
    assert not errors, errors
    rec = party.ops.provider_record(gpu)
    assert rec["valid"] + rec["mismatches"] == 200 and rec["mismatches"] == 40
    assert rec["quarantined"]  # 40 mismatches against 160 valid: 170 / 370 < 0.5


def test_records_survive_a_restart(tmp_path):
    db = tmp_path / "c.sqlite3"
    svc = serve_in_background(db, log_path=tmp_path / "log1")
    party = Party(svc)
    gpu, _ = party.account("provider")
    first = [party.ops.record_verification(gpu, False, key=f"r{i}") for i in range(3)][0]
    before = party.ops.provider_record(gpu)
    assert before["quarantined"]
    svc.kill()
    svc = serve_in_background(db, log_path=tmp_path / "log2")
    try:
        ops = svc.client()
        assert ops.provider_record(gpu) == before
        assert ops.record_verification(gpu, False, key="r0") == first  # the key and its answer are kept
        rec = ops.record_verification(gpu, True, key="after")
        assert (rec["valid"], rec["mismatches"], rec["quarantined"]) == (1, 3, True)
    finally:
        svc.stop()
