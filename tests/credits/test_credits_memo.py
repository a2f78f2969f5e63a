"""Settlement memos: recorded in the settle entry, covered by its hash, shown in listings and
receipts, bounded in size, part of the idempotency key's request, and old databases still open."""

from __future__ import annotations

import json
import sqlite3

import pytest

from credits_helpers import Party
from gpunet.credits import (
    CreditClient,
    IdempotencyConflictError,
    InvalidRequestError,
    LedgerVerificationError,
    serve_in_background,
    verify_database,
    verify_receipt,
    verify_service,
)
from gpunet.credits._ledger import MAX_MEMO_BYTES, canonical_memo, entry_hash


def _memo(*providers: str, digest: str = "sha256:" + "ab" * 32) -> dict:
    return {"verified": "replicate:2", "providers": list(providers), "digest": digest}


def _entries(ops: CreditClient, indexes: list[int]) -> list[dict]:
    return [ops.entries(i, 1)["entries"][0] for i in indexes]


def _hash_of(entry: dict) -> bytes:
    return entry_hash(bytes.fromhex(entry["prev"]), entry["index"], entry["time"], entry["kind"], entry["from"],
                      entry["to"], entry["amount"], entry["session"], entry["hold"], entry["key"],
                      canonical_memo(entry.get("memo")))


def test_memo_is_recorded_hashed_listed_and_in_the_receipt(party: Party, service):
    ops = party.ops
    alice, me = party.account("client", credits=100)
    gpu, _ = party.account("provider")
    sid = me.open_session(100)
    memo = _memo(gpu, "bob")
    paid = ops.settle(me.hold(sid, 30, key="m-1"), gpu, 20, key="m-1-s", memo=memo)
    plain = ops.settle(me.hold(sid, 30, key="m-2"), gpu, 30, key="m-2-s")
    settle, release = _entries(ops, paid["entries"])
    assert settle["kind"] == "settle" and settle["memo"] == memo
    assert release["kind"] == "release" and "memo" not in release
    (unmemoed,) = _entries(ops, plain["entries"])
    assert "memo" not in unmemoed
    # The memo is part of the entry's hash; an entry without one hashes as before memos existed.
    assert _hash_of(settle).hex() == settle["hash"]
    assert _hash_of({**settle, "memo": None}).hex() != settle["hash"]
    assert _hash_of(release).hex() == release["hash"]
    receipt = me.receipt(sid)
    memos = [e.get("memo") for e in receipt["entries"]]
    assert memos == [None, memo, None, None, None]  # hold, settle, release, hold, settle
    assert verify_receipt(receipt)["spent"] == 50
    forged = json.loads(json.dumps(receipt))
    forged["entries"][1]["memo"]["providers"] = ["mallory"]
    with pytest.raises(LedgerVerificationError, match="this entry was altered"):
        verify_receipt(forged)
    dropped = json.loads(json.dumps(receipt))
    del dropped["entries"][1]["memo"]
    with pytest.raises(LedgerVerificationError, match="this entry was altered"):
        verify_receipt(dropped)
    assert verify_service(service.url, service.operator_token)["size"] >= paid["entries"][0]


def test_memo_is_canonical_and_part_of_the_idempotent_request(party: Party):
    ops = party.ops
    _, me = party.account("client", credits=100)
    gpu, _ = party.account("provider")
    sid = me.open_session(100)
    hold = me.hold(sid, 10, key="i-1")
    first = ops.settle(hold, gpu, 5, key="pay", memo={"b": 1, "a": "é", "n": [1.5, None, True]})
    # The same memo with its keys in another order is the same request.
    assert ops.settle(hold, gpu, 5, key="pay", memo={"n": [1.5, None, True], "a": "é", "b": 1}) == first
    with pytest.raises(IdempotencyConflictError, match="'pay' was already used"):
        ops.settle(hold, gpu, 5, key="pay", memo={"b": 2, "a": "é", "n": [1.5, None, True]})
    with pytest.raises(IdempotencyConflictError):
        ops.settle(hold, gpu, 5, key="pay")
    (settle, _) = _entries(ops, first["entries"])
    assert settle["memo"] == {"a": "é", "b": 1, "n": [1.5, None, True]}
    assert canonical_memo(settle["memo"]) == '{"a":"\\u00e9","b":1,"n":[1.5,null,true]}'
    # An empty memo is no memo: the request is the one without it.
    other = me.hold(sid, 10, key="i-2")
    done = ops.settle(other, gpu, 5, key="pay-2", memo={})
    assert ops.settle(other, gpu, 5, key="pay-2") == done
    assert "memo" not in _entries(ops, done["entries"][:1])[0]


def test_memo_size_limit_and_shape(party: Party):
    ops = party.ops
    _, me = party.account("client", credits=100)
    gpu, _ = party.account("provider")
    sid = me.open_session(100)
    hold = me.hold(sid, 10, key="l-1")
    size = ops.health()["size"]
    filler = MAX_MEMO_BYTES - len(canonical_memo({"x": ""}))
    at_limit = {"x": "a" * filler}
    over = {"x": "a" * (filler + 1)}
    assert len(canonical_memo(at_limit)) == MAX_MEMO_BYTES
    with pytest.raises(InvalidRequestError, match="at most 4096 bytes when canonically encoded.*4097 bytes") as err:
        ops.settle(hold, gpu, 5, key="l-1-s", memo=over)
    assert err.value.status == 400
    # Non-ASCII is escaped in the canonical form, so it counts as six bytes a character.
    with pytest.raises(InvalidRequestError, match="at most 4096 bytes"):
        ops.settle(hold, gpu, 5, key="l-1-s", memo={"x": "é" * 700})
    for bad in (["a"], "text", 5):
        with pytest.raises(InvalidRequestError, match="must be a JSON object") as err:
            ops.settle(hold, gpu, 5, key="l-1-s", memo=bad)
        assert err.value.status == 400
    assert ops.health()["size"] == size, "a refused memo moved credits"
    result = ops.batch([{"op": "settle", "hold": hold, "provider": gpu, "amount": 5, "memo": over, "key": "l-b"}])
    assert result[0]["status"] == 400 and "4096" in result[0]["error"]["message"]
    assert ops.health()["size"] == size
    paid = ops.settle(hold, gpu, 5, key="l-1-s", memo=at_limit)
    assert _entries(ops, paid["entries"][:1])[0]["memo"] == at_limit


def test_memo_in_a_batch_and_on_a_settlement_that_pays_nothing(party: Party):
    ops = party.ops
    _, me = party.account("client", credits=100)
    gpu, _ = party.account("provider")
    sid = me.open_session(100)
    holds = [me.hold(sid, 10, key=f"b-{i}") for i in range(3)]
    memo = _memo(gpu, "other")
    out = ops.batch([{"op": "settle", "hold": holds[0], "provider": gpu, "amount": 10, "memo": memo, "key": "b-0"},
                     {"op": "settle", "hold": holds[1], "provider": gpu, "amount": 4, "key": "b-1"},
                     {"op": "settle", "hold": holds[2], "provider": gpu, "amount": 0, "memo": memo, "key": "b-2"}],
                    raise_on_error=True)
    (paid,) = _entries(ops, out[0]["entries"])
    assert paid["kind"] == "settle" and paid["memo"] == memo
    assert all("memo" not in e for e in _entries(ops, out[1]["entries"]))
    # Nothing paid: the settlement writes only a release, and the memo goes on it.
    (nothing,) = _entries(ops, out[2]["entries"])
    assert nothing["kind"] == "release" and nothing["memo"] == memo and nothing["amount"] == 10
    assert verify_receipt(me.receipt(sid))["spent"] == 14


def test_a_database_from_before_memos_opens_and_verifies(tmp_path):
    db = tmp_path / "old.sqlite3"
    svc = serve_in_background(db, log_path=tmp_path / "log1")
    party = Party(svc)
    _, me = party.account("client", credits=50)
    gpu, _ = party.account("provider")
    sid = me.open_session(50)
    party.ops.settle(me.hold(sid, 20, key="h"), gpu, 15, key="s")
    svc.stop()
    # What an earlier version left: the same tables, without the memo column.
    conn = sqlite3.connect(db)
    conn.execute("ALTER TABLE entries DROP COLUMN memo")
    conn.commit()
    conn.close()
    assert verify_database(db)["size"] == 4
    svc = serve_in_background(db, log_path=tmp_path / "log2")
    try:
        ops = svc.client()
        me = svc.client(me.token)
        paid = ops.settle(me.hold(sid, 20, key="h2"), gpu, 15, key="s2", memo=_memo(gpu))
        assert _entries(ops, paid["entries"][:1])[0]["memo"] == _memo(gpu)
        assert "memo" not in ops.entries(0, 4)["entries"][2]
        verify_service(svc.url, svc.operator_token)
    finally:
        svc.stop()
    assert verify_database(db)["size"] == 7
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT count(*) FROM entries WHERE memo != ''").fetchone() == (1,)
    conn.close()
