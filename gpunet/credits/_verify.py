"""``gpunet ledger verify``: check a ledger in a database file, at a running service, or a receipt.

Reading is the cost at a million entries, so a database is read in index ranges
of 100,000 rows through the driver's own cursor (stdlib ``sqlite3`` opened
read-only for SQLite files), and every entry is hashed once: its leaf hash is
both its chain link and its Merkle leaf.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
from pathlib import Path
from typing import Any

from gpunet.credits._errors import CreditsUnavailableError, LedgerVerificationError
from gpunet.credits._ledger import LedgerChecker, key_id, verify_receipt
from gpunet.credits._store import ENTRY_COLUMNS, read_heads, resolve_db_url, sqlite_path

logger = logging.getLogger(__name__)

CHUNK = 100_000


def verify_database(db: str | os.PathLike[str] | None, *, public_key: str | None = None) -> dict[str, Any]:
    """Check the ledger stored in a credit database (a file path or a URL).

    Checks the hash chain, every entry's hash, the Merkle root at every stored
    signed head and its signature (with the key recorded in the database unless
    ``public_key`` pins another), and that every account's balance equals the sum
    of its entries. Returns a summary; raises :class:`LedgerVerificationError`
    naming the first bad entry.
    """
    url = resolve_db_url(db)
    path = sqlite_path(url)
    if path is not None:
        if not path.exists():
            raise CreditsUnavailableError(f"no credit database at {path}; pass --db with the right file or URL",
                                          url=str(path))
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            return _verify_dbapi(conn, "?", public_key, lambda: _heads_sqlite(conn))
        finally:
            conn.close()
    from gpunet.credits._store import open_engine

    engine = open_engine(url)
    try:
        raw = engine.raw_connection()
        try:
            return _verify_dbapi(raw.driver_connection, "%s", public_key, lambda: read_heads(engine))
        finally:
            raw.close()
    finally:
        engine.dispose()


def _heads_sqlite(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    rows = conn.execute("SELECT size, root, timestamp, signature, public_key FROM heads ORDER BY size").fetchall()
    return [{"size": r[0], "root": r[1], "timestamp": r[2], "signature": r[3], "public_key": r[4]} for r in rows]


def _verify_dbapi(conn: Any, p: str, public_key: str | None, heads_fn: Any) -> dict[str, Any]:
    cur = conn.cursor()
    try:
        cur.execute("SELECT value FROM meta WHERE key = 'public_key'")
    except Exception as exc:  # noqa: BLE001 - any driver's "no such table"
        raise LedgerVerificationError(f"this database holds no gpunet ledger ({exc})") from exc
    row = cur.fetchone()
    recorded = row[0] if row else None
    checker = LedgerChecker()
    start = 0
    while True:
        cur.execute(f"SELECT {ENTRY_COLUMNS} FROM entries WHERE idx >= {p} AND idx < {p} ORDER BY idx",
                    (start, start + CHUNK))
        rows = cur.fetchall()
        if not rows:
            break
        checker.feed(rows)
        start += CHUNK
        if len(rows) < CHUNK and checker.size == start - CHUNK + len(rows):
            break
    # Entries beyond a gap (an index missing) would be skipped by the ranges above: catch them.
    cur.execute("SELECT count(*), max(idx) FROM entries")
    count, top = cur.fetchone()
    if count != checker.size:
        cur.execute(f"SELECT {ENTRY_COLUMNS} FROM entries WHERE idx >= {p} ORDER BY idx", (checker.size,))
        checker.feed(cur.fetchall())  # raises at the first out-of-place entry
    cur.execute("SELECT name, balance FROM accounts")
    balances = {name: bal for name, bal in cur.fetchall()}
    heads = heads_fn()
    for h in heads:
        if recorded and public_key is None and h["public_key"] != recorded:
            raise LedgerVerificationError(
                f"the tree head at size {h['size']} is signed by key {key_id(bytes.fromhex(h['public_key']))}, "
                f"not the ledger's key {key_id(bytes.fromhex(recorded))}",
                evidence={"size": h["size"], "public_key": h["public_key"], "expected": recorded})
    summary = checker.finish(heads=heads, balances=balances, public_key=public_key)
    summary["public_key"] = public_key or recorded
    return summary


def verify_service(url: str, token: str, *, public_key: str | None = None, page: int = 100_000) -> dict[str, Any]:
    """Check the ledger of a running service (operator token): entries, heads, balances, current head."""
    from gpunet.credits._client import CreditClient

    with CreditClient(url, token, timeout=(3.05, 300)) as client:
        pinned = public_key or client.health().get("public_key")
        head = client.head()
        checker = LedgerChecker()
        start = 0
        while True:
            got = client.entries(start, page)["entries"]
            rows = [(e["index"], e["time"], e["kind"], e["from"], e["to"], e["amount"], e["session"], e["hold"],
                     e["key"], bytes.fromhex(e["prev"]), bytes.fromhex(e["hash"])) for e in got]
            checker.feed(rows)
            start += len(rows)
            if len(rows) < page:
                break
        heads = client.heads()
        if not any(h["size"] == head["size"] for h in heads):
            heads.append(head)
        accounts = client.accounts()
        size_after = client.health()["size"]
    # Balances are compared only when no movement happened while the entries were read.
    balances = {a["account"]: a["balance"] for a in accounts}
    heads = [h for h in heads if h["size"] <= checker.size]
    still = size_after == checker.size
    summary = checker.finish(heads=heads, balances=balances if still else None, public_key=pinned)
    summary["public_key"] = pinned
    summary["balances_checked"] = still
    return summary


def verify_receipt_file(path: str | os.PathLike[str], *, public_key: str | None = None) -> dict[str, Any]:
    """Check a receipt JSON file offline; see :func:`gpunet.credits.verify_receipt`."""
    try:
        doc = json.loads(Path(path).read_text())
    except OSError as exc:
        raise LedgerVerificationError(f"cannot read receipt {path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise LedgerVerificationError(f"receipt {path} is not valid JSON: {exc}") from exc
    return verify_receipt(doc, public_key)
