"""Holds paid out in parts (``settle_part``): one hold for a whole map of tasks, paid to several
providers as the tasks finish, then closed by ``release`` (the rest goes back) or ``settle``."""

from __future__ import annotations

import copy
import shutil
import sqlite3
import subprocess
import sys
import threading

import pytest

from credits_helpers import Party, run_threads
from gpunet.credits import (
    ConflictError,
    CreditClient,
    ForbiddenError,
    IdempotencyConflictError,
    InvalidRequestError,
    LedgerVerificationError,
    serve_in_background,
    verify_database,
    verify_receipt,
    verify_service,
)
from gpunet.credits._ledger import entry_hash


def _entries(ops: CreditClient, indexes: list[int]) -> list[dict]:
    return [ops.entries(i, 1)["entries"][0] for i in indexes]


def _hold_row(db, hold: str) -> tuple:
    """The hold's row as the service committed it: (amount, state, provider, paid, closed_entry)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT amount, state, provider, paid, closed_entry FROM holds WHERE id = ?",
                            (hold,)).fetchone()
    finally:
        conn.close()


def _totals(party: Party) -> int:
    accounts = party.ops.accounts()
    assert all(a["balance"] >= 0 for a in accounts), accounts
    return sum(a["balance"] for a in accounts)


def test_parts_to_two_providers_then_the_rest_released(party: Party, service):
    ops = party.ops
    alice, me = party.account("client", credits=1000)
    gpu1, _ = party.account("provider")
    gpu2, _ = party.account("provider")
    total = _totals(party)
    sid = me.open_session(500)
    hold = me.hold(sid, 300, key="map-1")
    assert me.balance(alice) == 700

    first = ops.settle_part(hold, gpu1, 100, key="map-1-part-1", memo={"tasks": 10})
    assert {k: first[k] for k in ("hold", "session", "provider", "paid", "total_paid", "left")} == {
        "hold": hold, "session": sid, "provider": gpu1, "paid": 100, "total_paid": 100, "left": 200}
    # The session's spent grows as the parts are paid, not when the hold closes.
    usage = me.usage(sid)
    assert (usage["held"], usage["spent"], usage["left"]) == (200, 100, 200)
    second = ops.settle_part(hold, gpu2, 50, key="map-1-part-2")
    third = ops.settle_part(hold, gpu1, 30, key="map-1-part-3", memo={"tasks": 3})
    assert (third["total_paid"], third["left"]) == (180, 120)
    usage = me.usage(sid)
    assert (usage["held"], usage["spent"], usage["left"]) == (120, 180, 200)
    assert (ops.balance(gpu1), ops.balance(gpu2), me.balance(alice)) == (130, 50, 700)
    assert _hold_row(service.db, hold) == (300, "held", gpu1, 180, third["entries"][0])
    assert _totals(party) == total

    closed = ops.release(hold, key="map-1-done")
    assert (closed["released"], closed["total_paid"], len(closed["entries"])) == (120, 180, 1)
    usage = me.usage(sid)
    assert (usage["held"], usage["spent"], usage["left"]) == (0, 180, 320)
    assert (ops.balance(gpu1), ops.balance(gpu2), me.balance(alice)) == (130, 50, 820)
    # Anything paid: the hold ends settled, whoever closed it.
    assert _hold_row(service.db, hold) == (300, "settled", gpu1, 180, closed["entries"][0])
    assert _totals(party) == total

    parts = _entries(ops, [first["entries"][0], second["entries"][0], third["entries"][0]])
    assert [(e["kind"], e["from"], e["to"], e["amount"], e["hold"], e["session"], e.get("memo")) for e in parts] == [
        ("settle", "escrow", gpu1, 100, hold, sid, {"tasks": 10}),
        ("settle", "escrow", gpu2, 50, hold, sid, None),
        ("settle", "escrow", gpu1, 30, hold, sid, {"tasks": 3})]
    (release,) = _entries(ops, closed["entries"])
    assert (release["kind"], release["from"], release["to"], release["amount"]) == ("release", "escrow", alice, 120)

    receipt = me.receipt(sid)
    assert [e["kind"] for e in receipt["entries"]] == ["hold", "settle", "settle", "settle", "release"]
    assert [e.get("memo") for e in receipt["entries"]] == [None, {"tasks": 10}, None, {"tasks": 3}, None]
    summary = verify_receipt(receipt, public_key=ops.health()["public_key"])
    assert (summary["spent"], summary["held"], summary["entries"]) == (180, 0, 5)
    verify_service(service.url, service.operator_token)

    # Closed: no more parts, no second close.
    size = ops.health()["size"]
    with pytest.raises(ConflictError, match=f"hold {hold} was already settled .*cannot be paid from again"):
        ops.settle_part(hold, gpu2, 1, key="map-1-late")
    with pytest.raises(ConflictError, match="was already settled"):
        ops.release(hold, key="map-1-again")
    with pytest.raises(ConflictError, match="was already settled"):
        ops.settle(hold, gpu2, 1, key="map-1-settle-late")
    assert ops.health()["size"] == size


def test_a_part_beyond_what_is_left_is_refused_and_moves_nothing(party: Party, service):
    ops = party.ops
    alice, me = party.account("client", credits=100)
    gpu, _ = party.account("provider")
    sid = me.open_session(100)
    hold = me.hold(sid, 100, key="h")
    ops.settle_part(hold, gpu, 60, key="p1")
    before = (ops.health()["size"], ops.accounts(), me.usage(sid), _hold_row(service.db, hold))
    with pytest.raises(InvalidRequestError, match=r"cannot pay a part of 50 from hold .* of 100: 60 of it was "
                                                  r"already paid in parts, so 40 are left; pay at most the 40") as err:
        ops.settle_part(hold, gpu, 50, key="p2")
    assert err.value.status == 422
    assert (err.value.details["left"], err.value.details["paid"]) == (40, 60)
    with pytest.raises(InvalidRequestError, match="cannot settle 41 from hold .* so 40 are left"):
        ops.settle(hold, gpu, 41, key="s-too-much")
    out = ops.batch([{"op": "settle_part", "hold": hold, "provider": gpu, "amount": 41, "key": "p-batch"}])
    assert out[0]["status"] == 422 and out[0]["error"]["left"] == 40
    assert (ops.health()["size"], ops.accounts(), me.usage(sid), _hold_row(service.db, hold)) == before
    # A refused part leaves its key unused: the same key pays once it fits.
    assert ops.settle_part(hold, gpu, 40, key="p2")["left"] == 0
    # Paid in full by parts: closing it gives nothing back and writes no entry.
    size = ops.health()["size"]
    closed = ops.release(hold, key="r")
    assert (closed["released"], closed["total_paid"], closed["entries"]) == (0, 100, [])
    assert ops.health()["size"] == size
    assert _hold_row(service.db, hold)[1:4] == ("settled", gpu, 100)
    usage = me.usage(sid)
    assert (usage["held"], usage["spent"]) == (0, 100)
    assert (me.balance(alice), ops.balance(gpu)) == (0, 100)
    assert verify_receipt(me.receipt(sid))["spent"] == 100


def test_a_retried_part_pays_once(party: Party):
    ops = party.ops
    _, me = party.account("client", credits=100)
    gpu, _ = party.account("provider")
    sid = me.open_session(100)
    hold = me.hold(sid, 50, key="h")
    first = ops.settle_part(hold, gpu, 10, key="part-7", memo={"tasks": 2})
    size = ops.health()["size"]
    assert ops.settle_part(hold, gpu, 10, key="part-7", memo={"tasks": 2}) == first
    assert ops.batch([{"op": "settle_part", "hold": hold, "provider": gpu, "amount": 10, "memo": {"tasks": 2},
                       "key": "part-7"}]) == [{"ok": True, **first}]
    assert ops.health()["size"] == size and ops.balance(gpu) == 10 and me.usage(sid)["spent"] == 10
    with pytest.raises(IdempotencyConflictError, match="'part-7' was already used"):
        ops.settle_part(hold, gpu, 11, key="part-7", memo={"tasks": 2})
    with pytest.raises(IdempotencyConflictError):
        ops.settle_part(hold, gpu, 10, key="part-7")  # the memo is part of the request
    with pytest.raises(IdempotencyConflictError):
        ops.settle(hold, gpu, 10, key="part-7", memo={"tasks": 2})  # so is the operation
    ops.release(hold, key="done")
    # After the hold closed, a retry of an answered part still gets its answer.
    assert ops.settle_part(hold, gpu, 10, key="part-7", memo={"tasks": 2}) == first
    assert ops.balance(gpu) == 10


def test_only_the_operator_pays_parts(party: Party):
    _, me = party.account("client", credits=100)
    gpu, gpu_api = party.account("provider")
    hold = me.hold(me.open_session(100), 10, key="h")
    for api in (me, gpu_api):
        with pytest.raises(ForbiddenError, match="settle part needs role meter or operator"):
            api.settle_part(hold, gpu, 1, key="mine")
    assert party.ops.balance(gpu) == 0


def test_settle_after_parts_pays_at_most_the_rest_and_releases_it(party: Party, service):
    ops = party.ops
    alice, me = party.account("client", credits=300)
    gpu1, _ = party.account("provider")
    gpu2, _ = party.account("provider")
    sid = me.open_session(300)
    hold = me.hold(sid, 100, key="h1")
    ops.settle_part(hold, gpu1, 30, key="h1-p")
    done = ops.settle(hold, gpu2, 50, key="h1-s", memo={"verified": "replicate:2"})
    assert (done["paid"], done["released"], done["total_paid"]) == (50, 20, 80)
    settle, release = _entries(ops, done["entries"])
    assert (settle["kind"], settle["to"], settle["amount"], settle["memo"]) == (
        "settle", gpu2, 50, {"verified": "replicate:2"})
    assert (release["kind"], release["to"], release["amount"]) == ("release", alice, 20)
    assert _hold_row(service.db, hold)[1:4] == ("settled", gpu2, 80)
    # Settling what is left exactly writes no release; settling nothing releases the rest.
    exact = me.hold(sid, 40, key="h2")
    ops.settle_part(exact, gpu1, 15, key="h2-p")
    done = ops.settle(exact, gpu2, 25, key="h2-s")
    assert (done["released"], len(done["entries"])) == (0, 1)
    nothing = me.hold(sid, 40, key="h3")
    ops.settle_part(nothing, gpu1, 5, key="h3-p")
    done = ops.settle(nothing, gpu2, 0, key="h3-s")
    assert (done["paid"], done["released"], done["total_paid"]) == (0, 35, 5)
    assert _hold_row(service.db, nothing)[1] == "settled"
    # A hold never paid and released ends released.
    plain = me.hold(sid, 10, key="h4")
    ops.release(plain, key="h4-r")
    assert _hold_row(service.db, plain)[1:4] == ("released", "", 0)
    usage = me.usage(sid)
    assert (usage["held"], usage["spent"]) == (0, 80 + 40 + 5)
    assert (ops.balance(gpu1), ops.balance(gpu2)) == (30 + 15 + 5, 50 + 25)
    assert me.balance(alice) == 300 - usage["spent"]
    assert verify_receipt(me.receipt(sid))["spent"] == usage["spent"]


def test_a_map_of_two_thousand_tasks_paid_in_one_batch(party: Party, service):
    ops = party.ops
    alice, me = party.account("client", credits=5000)
    providers = [party.account("provider")[0] for _ in range(3)]
    total = _totals(party)
    sid = me.open_session(5000)
    hold = me.hold(sid, 2500, key="map")
    items = [{"op": "settle_part", "hold": hold, "provider": providers[i % 3], "amount": 1, "key": f"task-{i}",
              "memo": {"task": i}} for i in range(2000)]
    out = ops.batch(items, raise_on_error=True)
    assert [r["total_paid"] for r in out] == list(range(1, 2001))
    assert len({r["entries"][0] for r in out}) == 2000
    usage = me.usage(sid)
    assert (usage["held"], usage["spent"]) == (500, 2000)
    # In one batch: a part beyond what is left fails alone, the others go through, the release closes it.
    out = ops.batch([{"op": "settle_part", "hold": hold, "provider": providers[0], "amount": 400, "key": "big"},
                     {"op": "settle_part", "hold": hold, "provider": providers[1], "amount": 101, "key": "over"},
                     {"op": "settle_part", "hold": hold, "provider": providers[2], "amount": 99, "key": "fits"},
                     {"op": "release", "hold": hold, "key": "map-done"},
                     {"op": "settle_part", "hold": hold, "provider": providers[2], "amount": 1, "key": "late"}])
    assert [r["ok"] for r in out] == [True, False, True, True, False]
    assert out[1]["status"] == 422 and out[1]["error"]["left"] == 100
    assert out[3]["released"] == 1 and out[4]["status"] == 409
    assert [ops.balance(p) for p in providers] == [667 + 400, 667, 666 + 99]
    usage = me.usage(sid)
    assert (usage["held"], usage["spent"]) == (0, 2499)
    assert me.balance(alice) == 5000 - 2499 and _totals(party) == total
    receipt = me.receipt(sid)
    assert len(receipt["entries"]) == 1 + 2000 + 2 + 1
    assert verify_receipt(receipt)["spent"] == 2499
    verify_service(service.url, service.operator_token)


def test_racing_parts_never_pay_more_than_the_hold(fresh_service):
    party = Party(fresh_service)
    ops = party.ops
    alice, me = party.account("client", credits=2000)
    providers = [party.account("provider")[0] for _ in range(2)]
    sid = me.open_session(2000)
    full = me.hold(sid, 500, key="full")
    raced = me.hold(sid, 500, key="raced")
    paid = {full: [], raced: []}
    refused: list[tuple[str, int]] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(17)

    def worker(n: int) -> None:
        client = CreditClient(fresh_service.url, fresh_service.operator_token)
        barrier.wait()
        try:
            for i in range(10):
                for hold in (full, raced):
                    try:
                        client.settle_part(hold, providers[n % 2], 4, key=f"{hold}-{n}-{i}")
                        paid[hold].append(4)
                    except (InvalidRequestError, ConflictError) as exc:
                        refused.append((hold, exc.status))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    released: dict = {}

    def closer() -> None:
        client = CreditClient(fresh_service.url, fresh_service.operator_token)
        barrier.wait()
        released.update(client.release(raced, key="raced-close"))

    run_threads([threading.Thread(target=worker, args=(n,)) for n in range(16)] + [threading.Thread(target=closer)])
    assert not errors, errors
    # 16 x 10 parts of 4 ask for 640 of a hold of 500: exactly 125 fit, the rest are refused (422).
    assert sum(paid[full]) == 500 and {s for h, s in refused if h == full} == {422}
    ops.release(full, key="full-close")
    # The racing release closed the other hold: what was paid before it plus what it gave back is the hold.
    assert sum(paid[raced]) + released["released"] == 500 and released["total_paid"] == sum(paid[raced])
    assert {s for h, s in refused if h == raced} <= {409, 422}
    usage = me.usage(sid)
    assert (usage["held"], usage["spent"]) == (0, 500 + sum(paid[raced]))
    assert sum(ops.balance(p) for p in providers) == usage["spent"]
    assert me.balance(alice) == 2000 - usage["spent"]
    assert _totals(party) == 2000
    verify_receipt(me.receipt(sid))
    verify_service(fresh_service.url, fresh_service.operator_token)
    fresh_service.stop()
    assert _hold_row(fresh_service.db, full)[1::2] == ("settled", 500)
    assert _hold_row(fresh_service.db, raced)[1::2] == ("settled" if paid[raced] else "released", sum(paid[raced]))
    verify_database(fresh_service.db)


def test_a_partly_paid_hold_survives_a_restart(tmp_path):
    db = tmp_path / "credits.sqlite3"
    svc = serve_in_background(db, log_path=tmp_path / "log1")
    party = Party(svc)
    alice, me = party.account("client", credits=100)
    gpu, _ = party.account("provider")
    sid = me.open_session(100)
    hold = me.hold(sid, 100, key="h")
    ops = party.ops
    ops.settle_part(hold, gpu, 70, key="p1")
    svc.kill()  # no clean stop: what was answered is on disk
    svc = serve_in_background(db, log_path=tmp_path / "log2")
    try:
        ops, me = svc.client(), svc.client(me.token)
        with pytest.raises(InvalidRequestError, match="so 30 are left"):
            ops.settle_part(hold, gpu, 31, key="p2")
        ops.settle_part(hold, gpu, 20, key="p2")
        assert ops.release(hold, key="r")["released"] == 10
        usage = me.usage(sid)
        assert (usage["held"], usage["spent"]) == (0, 90)
        verify_receipt(me.receipt(sid))
    finally:
        svc.stop()
    assert verify_database(db)["size"] == 5


@pytest.fixture(scope="module")
def parts_ledger(tmp_path_factory):
    """A real ledger with a hold paid in parts: entries 0 mint, 1 hold of 90, 2-6 five parts
    of 10, 7 release of 40; then 8 hold of 20 and 9 its settle of 20; signed at size 10."""
    root = tmp_path_factory.mktemp("parts")
    db = root / "credits.sqlite3"
    svc = serve_in_background(db, log_path=root / "log")
    try:
        party = Party(svc)
        _, me = party.account("client", credits=200)
        gpus = [party.account("provider")[0] for _ in range(2)]
        sid = me.open_session(200)
        hold = me.hold(sid, 90, key="map")
        for i in range(5):
            party.ops.settle_part(hold, gpus[i % 2], 10, key=f"part-{i}", memo={"tasks": i})
        party.ops.release(hold, key="map-done")
        party.ops.settle(me.hold(sid, 20, key="one"), gpus[0], 20, key="one-s")
        receipt = me.receipt(sid)
    finally:
        svc.stop()
    return db, receipt


def _rewrite(db, index: int, delta: int) -> None:
    """A forger who raises one amount and re-hashes the rest of the chain; the signed head
    catches it, and so does a hold paying out more than it held, naming the entry."""
    conn = sqlite3.connect(db)
    rows = conn.execute("SELECT idx, time, kind, src, dst, amount, session, hold, key, memo, prev FROM entries "
                        "WHERE idx >= ? ORDER BY idx", (index,)).fetchall()
    prev = rows[0][10]
    for idx, time, kind, src, dst, amount, session, hold, key, memo, _ in rows:
        if idx == index:
            amount += delta
        h = entry_hash(prev, idx, time, kind, src, dst, amount, session, hold, key, memo)
        conn.execute("UPDATE entries SET amount = ?, prev = ?, hash = ? WHERE idx = ?", (amount, prev, h, idx))
        prev = h
    conn.execute("DELETE FROM heads")  # and drops the signed heads that would give it away
    conn.commit()
    conn.close()


@pytest.mark.parametrize("workers", [1, 3], ids=["one-process", "three-processes"])
def test_verify_accepts_parts_and_names_an_overpaid_hold(parts_ledger, tmp_path, workers):
    """With three processes the 10 entries split at 3 and 6: the hold (entry 1) lies in the first
    range, its parts and release in the next two, so the check runs across ranges too."""
    src, _ = parts_ledger
    assert verify_database(src, workers=workers)["size"] == 10
    out = subprocess.run([sys.executable, "-m", "gpunet.credits", "verify", "--db", str(src)],
                         capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("OK ledger in"), out.stderr
    for index, delta, kind, left in ((7, 1, "release", 40), (4, 61, "settle", 70), (9, 1, "settle", 20)):
        db = tmp_path / f"{index}-{workers}.sqlite3"
        shutil.copy(src, db)
        _rewrite(db, index, delta)
        with pytest.raises(LedgerVerificationError,
                           match=f"entry {index}: a {kind} of .* which has only {left} left in escrow") as err:
            verify_database(db, workers=workers)
        assert err.value.index == index
    # Lowering a part instead breaks no hold; the balances still give the forgery away.
    db = tmp_path / f"lower-{workers}.sqlite3"
    shutil.copy(src, db)
    _rewrite(db, 3, -1)
    with pytest.raises(LedgerVerificationError, match="but its ledger entries sum to"):
        verify_database(db, workers=workers)


def test_receipt_with_parts_verifies_and_catches_tampering(parts_ledger):
    _, receipt = parts_ledger
    assert [e["kind"] for e in receipt["entries"]] == ["hold"] + ["settle"] * 5 + ["release", "hold", "settle"]
    summary = verify_receipt(receipt)
    assert (summary["spent"], summary["held"], summary["entries"]) == (70, 0, 9)
    doc = copy.deepcopy(receipt)
    doc["entries"][3]["amount"] += 1
    with pytest.raises(LedgerVerificationError, match="entry 4: stored hash"):
        verify_receipt(doc)
    # Without its hold entry, the hold's parts pay out of nothing.
    doc = copy.deepcopy(receipt)
    del doc["entries"][0]
    with pytest.raises(LedgerVerificationError, match="entry 2: a settle of 10 out of hold .* only 0 left .*never "
                                                      "placed") as err:
        verify_receipt(doc)
    assert err.value.index == 2
    # A part dropped from the receipt: the totals no longer add up.
    doc = copy.deepcopy(receipt)
    del doc["entries"][2]
    with pytest.raises(LedgerVerificationError, match="entries add up to"):
        verify_receipt(doc)
