"""Tamper with a stored ledger, a bit at a time, and with receipts: verify names what is wrong."""

from __future__ import annotations

import base64
import copy
import json
import shutil
import sqlite3
import subprocess
import sys

import pytest

from credits_helpers import DATA, Party
from gpunet.credits import (
    LedgerVerificationError,
    ProofError,
    serve_in_background,
    verify_database,
    verify_receipt,
    verify_service,
)
from gpunet.credits._ledger import canonical_memo, entry_hash

CASES = json.loads((DATA / "tamper_cases.json").read_text())


@pytest.fixture(scope="module")
def ledger(tmp_path_factory):
    """A small real ledger (16 entries) in an SQLite file, and one session's receipt.

    Entries 2 and 7 are settlements with a memo; entry 12 is one without."""
    root = tmp_path_factory.mktemp("tamper")
    db = root / "credits.sqlite3"
    svc = serve_in_background(db, log_path=root / "log")
    try:
        party = Party(svc)
        alice, api = party.account("client", credits=1000)
        gpu, _ = party.account("provider")
        sid = api.open_session(900)
        for i in range(6):
            hold = api.hold(sid, 50 + i, key=f"h{i}")
            if i % 2:
                party.ops.release(hold, key=f"r{i}")
            else:
                memo = {"verified": "replicate:2", "providers": [gpu, "other"], "digest": f"sha256:{i:064x}"}
                party.ops.settle(hold, gpu, 20 + i, key=f"s{i}", memo=memo if i < 4 else None)
        receipt = api.receipt(sid)
    finally:
        svc.stop()  # signs a last head
    return db, receipt


def _flip(value, bit):
    if isinstance(value, int):
        return value ^ (1 << bit)
    if isinstance(value, bytes):
        return bytes([value[0] ^ (1 << bit)]) + value[1:]
    return chr(ord(value[0]) ^ (1 << bit)) + value[1:]


def _mutate(db, m):
    conn = sqlite3.connect(db)
    op = m["op"]
    if op == "flip_bit":
        col = m["column"]
        (value,) = conn.execute(f"SELECT {col} FROM entries WHERE idx = ?", (m["index"],)).fetchone()
        conn.execute(f"UPDATE entries SET {col} = ? WHERE idx = ?", (_flip(value, m["bit"]), m["index"]))
    elif op == "delete":
        conn.execute("DELETE FROM entries WHERE idx = ?", (m["index"],))
    elif op == "set_memo":
        conn.execute("UPDATE entries SET memo = ? WHERE idx = ?", (canonical_memo(m["memo"]), m["index"]))
    elif op == "truncate":
        conn.execute("DELETE FROM entries WHERE idx >= ?", (m["keep"],))
    elif op == "rewrite_tail":
        # A forger who changes an amount (or a memo) and recomputes every later hash: the
        # chain is whole again; only the signed head catches it.
        rows = conn.execute("SELECT idx, time, kind, src, dst, amount, session, hold, key, memo, prev FROM entries "
                            "WHERE idx >= ? ORDER BY idx", (m["index"],)).fetchall()
        prev = rows[0][10]
        for idx, time, kind, src, dst, amount, session, hold, key, memo, _ in rows:
            if idx == m["index"]:
                amount += m.get("delta", 0)
                memo = canonical_memo(m["memo"]) if "memo" in m else memo
            h = entry_hash(prev, idx, time, kind, src, dst, amount, session, hold, key, memo)
            conn.execute("UPDATE entries SET amount = ?, memo = ?, prev = ?, hash = ? WHERE idx = ?",
                         (amount, memo, prev, h, idx))
            prev = h
    elif op == "balance":
        conn.execute("UPDATE accounts SET balance = balance + ? WHERE rowid = (SELECT min(rowid) FROM accounts "
                     "WHERE role = ?)", (m["delta"], m["role"]))
    elif op == "flip_head_signature":
        (size, sig) = conn.execute("SELECT size, signature FROM heads ORDER BY size DESC LIMIT 1").fetchone()
        raw = base64.b64decode(sig)
        conn.execute("UPDATE heads SET signature = ? WHERE size = ?",
                     (base64.b64encode(_flip(raw, 0)).decode(), size))
    conn.commit()
    conn.close()


@pytest.mark.parametrize("workers,levels", [(1, 16), (3, 16), (3, 2)],
                         ids=["one-process", "three-processes", "three-processes-hashing-levels"])
@pytest.mark.parametrize("case", CASES, ids=[c["description"] for c in CASES])
def test_tampered_ledger_is_caught(ledger, tmp_path, case, workers, levels, monkeypatch):
    """With three processes the 16 entries split at 5 and 10, so range edges are tampered too;
    with ranges aligned to 2**2 entries (split at 4 and 8), each worker hashes two Merkle levels."""
    import gpunet.credits._audit as audit

    monkeypatch.setattr(audit, "LEVELS", levels)
    src, _ = ledger
    db = tmp_path / "copy.sqlite3"
    shutil.copy(src, db)
    _mutate(db, case["mutation"])
    if not case["error"]:
        assert verify_database(db, workers=workers)["size"] == 16
        return
    with pytest.raises(LedgerVerificationError) as err:
        verify_database(db, workers=workers)
    assert case["match"] in str(err.value)
    if "index" in case:
        assert err.value.index == case["index"]


def test_every_single_bit_flip_in_an_entry_is_named(ledger, tmp_path):
    src, _ = ledger
    cols = ["idx", "time", "kind", "src", "dst", "amount", "session", "hold", "key", "prev", "hash"]
    for n, col in enumerate(cols):
        index = 1 + (n * 7) % 15
        db = tmp_path / f"{col}.sqlite3"
        shutil.copy(src, db)
        bit = 6 if col == "idx" else n % 7  # a renumbered entry must not collide with another
        _mutate(db, {"op": "flip_bit", "column": col, "index": index, "bit": bit})
        with pytest.raises(LedgerVerificationError) as err:
            verify_database(db)
        assert err.value.index == index, (col, str(err.value))


def test_cli_names_the_bad_entry(ledger, tmp_path):
    src, _ = ledger
    db = tmp_path / "copy.sqlite3"
    shutil.copy(src, db)
    ok = subprocess.run([sys.executable, "-m", "gpunet.credits", "verify", "--db", str(db)],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.startswith("OK ledger in"), ok.stderr
    _mutate(db, {"op": "flip_bit", "column": "amount", "index": 11, "bit": 2})
    bad = subprocess.run([sys.executable, "-m", "gpunet.credits", "verify", "--db", str(db)],
                         capture_output=True, text=True)
    assert bad.returncode == 1
    assert "entry 11: stored hash" in bad.stderr and "this entry was altered" in bad.stderr


def test_an_edited_memo_is_named_by_every_verifier(ledger, tmp_path):
    """The command on the database, and verify_service against a service running on it."""
    src, _ = ledger
    db = tmp_path / "copy.sqlite3"
    for suffix in ("", ".ed25519.pem", ".operator-token"):
        shutil.copy(f"{src}{suffix}", f"{db}{suffix}")
    _mutate(db, {"op": "set_memo", "index": 7, "memo": {"verified": "spot-check", "providers": ["mallory"]}})
    bad = subprocess.run([sys.executable, "-m", "gpunet.credits", "verify", "--db", str(db)],
                         capture_output=True, text=True)
    assert bad.returncode == 1
    assert "entry 7: stored hash" in bad.stderr and "this entry was altered" in bad.stderr
    conn = sqlite3.connect(db)
    conn.execute("UPDATE entries SET memo = '{\"verified\":' WHERE idx = 2")  # not even JSON
    conn.commit()
    conn.close()
    svc = serve_in_background(db, log_path=tmp_path / "log")
    try:
        assert svc.client().entries(7, 1)["entries"][0]["memo"]["verified"] == "spot-check"
        with pytest.raises(LedgerVerificationError, match="entry 2: its memo must be a JSON object") as err:
            verify_service(svc.url, svc.operator_token)
        assert err.value.index == 2
        conn = sqlite3.connect(db)
        conn.execute("UPDATE entries SET memo = ? WHERE idx = 2", (canonical_memo({"verified": "none"}),))
        conn.commit()
        conn.close()
        with pytest.raises(LedgerVerificationError, match="entry 2: stored hash") as err:
            verify_service(svc.url, svc.operator_token)
        assert err.value.index == 2
    finally:
        svc.stop()
    with pytest.raises(LedgerVerificationError, match="entry 2: stored hash"):
        verify_database(db)


def _receipt_cases(receipt):
    def amount(r):
        r["entries"][1]["amount"] += 1

    def proof(r):
        p = r["entries"][0]["proof"]
        p[0] = ("0" if p[0][0] != "0" else "1") + p[0][1:]

    def signature(r):
        raw = base64.b64decode(r["head"]["signature"])
        r["head"]["signature"] = base64.b64encode(bytes([raw[0] ^ 1]) + raw[1:]).decode()

    def root(r):
        r["head"]["root"] = ("0" if r["head"]["root"][0] != "0" else "1") + r["head"]["root"][1:]

    def spent(r):
        r["session"]["spent"] += 1

    def dropped(r):
        del r["entries"][2]

    def other_session(r):
        r["entries"][0]["session"] = "s_" + "1" * 32

    def repeated(r):
        r["entries"].insert(1, copy.deepcopy(r["entries"][0]))

    def memo(r):
        r["entries"][1]["memo"]["providers"] = ["mallory"]

    def memo_dropped(r):
        del r["entries"][1]["memo"]

    def memo_not_an_object(r):
        r["entries"][1]["memo"] = "replicate:2"

    return [("amount", amount, LedgerVerificationError, "this entry was altered"),
            ("repeated entry", repeated, LedgerVerificationError, "without repeats"),
            ("proof", proof, ProofError, "inclusion proof fails"),
            ("signature", signature, LedgerVerificationError, "does not verify"),
            ("root", root, LedgerVerificationError, "does not verify"),
            ("spent", spent, LedgerVerificationError, "entries add up to"),
            ("dropped entry", dropped, LedgerVerificationError, "entries add up to"),
            ("other session", other_session, LedgerVerificationError, "this entry was altered"),
            ("memo", memo, LedgerVerificationError, "this entry was altered"),
            ("memo dropped", memo_dropped, LedgerVerificationError, "this entry was altered"),
            ("memo not an object", memo_not_an_object, LedgerVerificationError, "memo must be a JSON object")]


def test_receipt_verifies_offline_and_catches_tampering(ledger, tmp_path):
    _, receipt = ledger
    summary = verify_receipt(receipt)
    assert summary["entries"] == 6 + 3 + 3 + 3 and summary["held"] == 0
    assert [e["index"] for e in receipt["entries"] if "memo" in e] == [2, 7]
    assert summary["spent"] == 20 + 22 + 24
    for name, mutate, exc, match in _receipt_cases(receipt):
        doc = copy.deepcopy(receipt)
        mutate(doc)
        with pytest.raises(exc, match=match):
            verify_receipt(doc)
    with pytest.raises(LedgerVerificationError, match="not the expected key"):
        verify_receipt(receipt, public_key="00" * 32)
    path = tmp_path / "receipt.json"
    path.write_text(json.dumps(receipt))
    out = subprocess.run([sys.executable, "-m", "gpunet.credits", "verify", "--receipt", str(path)],
                         capture_output=True, text=True)
    assert out.returncode == 0 and "OK receipt" in out.stdout, out.stderr
    doc = copy.deepcopy(receipt)
    doc["entries"][3]["amount"] += 5
    path.write_text(json.dumps(doc))
    out = subprocess.run([sys.executable, "-m", "gpunet.credits", "verify", "--receipt", str(path)],
                         capture_output=True, text=True)
    assert out.returncode == 1 and f"entry {doc['entries'][3]['index']}" in out.stderr
