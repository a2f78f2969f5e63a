"""The credit ledger's audit (``gpunet ledger verify``): check a ledger in a database file, at a
running service, or a receipt. Unrelated to :mod:`gpunet.verify`, which checks job results.

Reading is the cost at a million entries, so a database is read in index ranges
of 100,000 rows through the driver's own cursor (stdlib ``sqlite3`` opened
read-only for SQLite files), and every entry is hashed once: its leaf hash is
both its chain link and its Merkle leaf.
"""

from __future__ import annotations

import logging
import os
import pickle
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import gpunet
from gpunet.credits._client import CreditClient
from gpunet.credits._db import ENTRY_COLUMNS, beside_db, open_engine, redact, resolve_db_url, sqlite_path
from gpunet.credits._merkle import MerkleTree, subtree_levels
from gpunet.credits._witness import REWRITTEN, Witness
from gpunet.errors import CreditsUnavailableError, LedgerVerificationError
from gpunet.credits._ledger import (
    ZERO_HASH,
    LedgerChecker,
    entry_memo_text,
    key_id,
    stitch_holds,
)

logger = logging.getLogger(__name__)

CHUNK = 100_000
#: The Merkle levels each verify worker hashes over its range (ranges are aligned to 2**LEVELS, a
#: step small enough to split a ledger evenly; the parent hashes the few nodes above).
LEVELS = 12


def verify_database(
    db: str | os.PathLike[str] | None,
    *,
    public_key: str | None = None,
    workers: int | None = None,
    parallel_min: int = 200_000,
    witness: Witness | None = None,
    service_memory: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Check the ledger stored in a credit database (a file path or a URL).

    Checks the hash chain, every entry's hash, the Merkle root at every stored
    signed head and its signature (with the key recorded in the database unless
    ``public_key`` pins another), that a signed head covers the whole ledger (a
    service signs one when it stops and whenever a head is asked of it), that every
    account's balance equals the sum of its entries, and that no hold pays out (in
    one settlement, in parts, and its release) more than was placed on it. With a
    ``witness`` (``gpunet ledger verify`` passes the data dir's), every head seen of
    this ledger before must match it, the database's key is pinned to it, and its
    newest head is remembered. The heads the service signed, which it keeps beside its key
    (``service_memory``; by default the folder beside an SQLite database's default key, when
    there is one), must match the ledger too: a database cut back to an earlier head, with the
    later heads deleted from it, is caught there. Returns a summary; raises
    :class:`LedgerVerificationError` naming the first bad entry.

    Ledgers of ``parallel_min`` entries or more are read and hashed by ``workers``
    processes (default: one per CPU, at most 4), each over one range of indexes;
    the ranges are stitched by their chain links.
    """
    url = resolve_db_url(db)
    path = sqlite_path(url)
    if path is not None and not path.exists():
        raise CreditsUnavailableError(f"no credit database at {path}; pass --db with the right file or URL",
                                      url=str(path))
    conn, close = _connect(url)
    try:
        cur = conn.cursor()
        try:
            cur.execute("SELECT value FROM meta WHERE key = 'public_key'")
        except Exception as exc:  # noqa: BLE001 - any driver's "no such table"
            raise LedgerVerificationError(f"this database holds no gpunet ledger ({exc})") from exc
        row = cur.fetchone()
        recorded = row[0] if row else None
        # Apart: SQLite answers each from an index, both in one query by scanning the table.
        cur.execute("SELECT count(*) FROM entries")
        (count,) = cur.fetchone()
        cur.execute("SELECT max(idx) FROM entries")
        (top,) = cur.fetchone()
        if isinstance(top, str):  # SQLite's old entries table let an index hold text (it sorts last): the numbers'
            cur.execute("SELECT max(idx) FROM entries WHERE idx < 9223372036854775807")
            (top,) = cur.fetchone()
        slots = 0 if top is None else int(top) + 1
        cur.execute("SELECT name, balance FROM accounts")
        balances = {name: bal for name, bal in cur.fetchall()}
        cur.execute("SELECT size, root, timestamp, signature, public_key FROM heads ORDER BY size")
        heads = [{"size": r[0], "root": r[1], "timestamp": r[2], "signature": r[3], "public_key": r[4]}
                 for r in cur.fetchall()]
    finally:
        close()
    if workers is None:
        workers = min(os.cpu_count() or 1, 4) if slots >= parallel_min else 1
    # Ranges start at multiples of 2**LEVELS where they are long enough, so that each worker
    # hashes the Merkle levels of its range too, and the parent only joins them.
    step = 1 << LEVELS if slots // workers >= 1 << LEVELS else 1
    bounds = sorted({0, slots, *((slots * i // workers + step // 2) // step * step for i in range(1, workers))})
    height = min([LEVELS, *((lo & -lo).bit_length() - 1 for lo in bounds[1:-1])])
    jobs = [(url, lo, hi, height) for lo, hi in zip(bounds, bounds[1:]) if hi > lo] or [(url, 0, 0, height)]
    parts = _scan_in_processes(jobs)
    checker = _stitch(parts, height)
    if checker.size != count:  # pragma: no cover - a gap is caught by the scans
        raise LedgerVerificationError(f"the ledger has {count} entries but its indexes run to {slots - 1}")
    for h in heads:
        if recorded and public_key is None and h["public_key"] != recorded:
            raise LedgerVerificationError(
                f"the tree head at size {h['size']} is signed by key {key_id(bytes.fromhex(h['public_key']))}, "
                f"not the ledger's key {key_id(bytes.fromhex(recorded))}",
                evidence={"size": h["size"], "public_key": h["public_key"], "expected": recorded})
    summary = checker.finish(heads=heads, balances=balances, public_key=public_key)
    what = f"the ledger in {path if path is not None else redact(url)}"
    _require_covering_head(heads, checker.size, what,
                           "A running service signs its newest entries when a head is asked of it: verify it with "
                           "`gpunet ledger verify --url URL`, or stop it (it signs a last head) and verify again. "
                           "A stopped service's database without one had its heads deleted")
    summary["public_key"] = public_key or recorded
    summary["workers"] = len(jobs)
    summary["service_heads"] = _check_service_memory(url, service_memory, public_key or recorded, checker, what)
    if witness is not None and heads:
        service = f"db:{path}" if path is not None else f"db:{redact(url)}"
        summary.update(_witness_ledger(witness, checker, heads[-1], service, what))
    return summary


def _check_service_memory(url: str, given: str | os.PathLike[str] | None, public_key: str | None,
                          checker: LedgerChecker, what: str) -> int:
    """Check the ledger against the heads its service signed and keeps beside its key (read only);
    returns how many were compared (0: no such folder, or no key to look them up by)."""
    folder = Path(given) if given is not None else beside_db(url, ".ed25519.pem.heads")
    if not folder.is_dir():
        if given is not None:
            raise CreditsUnavailableError(f"no service memory at {folder}: pass --service-memory with the folder "
                                          "the service keeps beside its signing key (KEY_FILE.heads)", url=str(folder))
        return 0
    if public_key is None:
        return 0
    log = Witness(folder).load(public_key)
    if log.heads:
        size = checker.size
        log.check_roots(checker.roots([s for s in log.heads if s <= size]), size,
                        what=f"{what} (against the heads its service kept in {folder})", why=REWRITTEN)
    return len(log.heads)


def _require_covering_head(heads: list[dict[str, Any]], size: int, what: str, how: str) -> None:
    """Raise unless a signed head covers all ``size`` entries: entries no head covers could
    have been rewritten, with the heads that covered them deleted, by anyone who can write
    to the database."""
    covered = max((h["size"] for h in heads), default=0)
    if covered < size:
        newest = f"the newest signed head covers {covered}" if heads else "there is no signed head"
        raise LedgerVerificationError(
            f"{what} holds {size} entries but {newest}: entries {covered}..{size - 1} are covered by no signed head, "
            f"so nothing shows they are what the service wrote. {how}",
            index=covered, evidence={"size": size, "covered": covered})


def _witness_ledger(witness: Witness, checker: LedgerChecker, head: dict[str, Any], service: str | None,
                    what: str) -> dict[str, Any]:
    """Check the heads seen before of this whole, verified ledger (their roots recomputed from
    its entries), link them with proofs from it, and remember ``head`` (it covers the ledger)."""
    tree: list[MerkleTree] = []

    def proofs(first: int, second: int) -> list[bytes]:
        if not tree:
            tree.append(checker.tree())
        return tree[0].consistency_proof(first, second)

    seen = witness.check_ledger(head["public_key"], checker.roots, checker.size, what=what)
    note = witness.observe(head, service=service, proofs=proofs, latest=True, source=service or "")
    return {"seen_heads": seen, "pinned_now": note["pinned_now"], "key_id": note["key_id"], "service": service}


def _connect(url: str) -> tuple[Any, Any]:
    path = sqlite_path(url)
    if path is not None:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        return conn, conn.close
    engine = open_engine(url)
    raw = engine.raw_connection()

    def close() -> None:
        raw.close()
        engine.dispose()

    return raw.driver_connection, close


def _entry_columns(cur: Any, sqlite: bool) -> str:
    """The entry columns to read; a database no service has opened since settlement memos
    came has no ``memo`` column, and every one of its entries has no memo."""
    if sqlite:
        cur.execute("SELECT name FROM pragma_table_info('entries')")
    else:
        cur.execute("SELECT column_name FROM information_schema.columns WHERE table_name = 'entries' "
                    "AND table_schema = current_schema()")
    if "memo" in {name for (name,) in cur.fetchall()}:
        return ENTRY_COLUMNS
    return ENTRY_COLUMNS.replace(", memo", ", '' AS memo")


def _scan(url: str, start: int, end: int, height: int = 0) -> dict[str, Any]:
    """Check entries ``start <= index < end`` (in a worker process) and hash ``height`` Merkle
    levels over them (``start`` is a multiple of ``2**height``); return what stitching needs."""
    sqlite = sqlite_path(url) is not None
    p = "?" if sqlite else "%s"
    conn, close = _connect(url)
    checker = LedgerChecker(start, ZERO_HASH if start == 0 else None)
    error = None
    try:
        cur = conn.cursor()
        columns = _entry_columns(cur, sqlite)
        for lo in range(start, end, CHUNK):
            cur.execute(f"SELECT {columns} FROM entries WHERE idx >= {p} AND idx < {p} ORDER BY idx",
                        (lo, min(lo + CHUNK, end)))
            checker.feed(cur.fetchall())
        if checker.size != end:
            raise LedgerVerificationError(
                f"entry {checker.size} is missing: the entries stop at {checker.size - 1} and go on at a "
                f"later index, so entries were removed here", index=checker.size,
                evidence={"expected_index": checker.size})
    except LedgerVerificationError as exc:
        error = (str(exc), exc.index, exc.evidence)
    finally:
        close()
    return {"start": start, "size": checker.size, "first_prev": checker.first_prev, "last": checker.last,
            "levels": subtree_levels(b"".join(checker.leaves), height), "balances": checker.balances,
            "minted": checker.minted,
            "holds": checker.holds, "lows": checker.lows, "error": error}


def _scan_in_processes(jobs: list[tuple[str, int, int, int]]) -> list[dict[str, Any]]:
    """Run :func:`_scan` over the first range here and over each other one in its own ``python``
    child (started first, so that they run meanwhile); their results come back pickled.

    Plain child processes rather than multiprocessing: nothing of the caller's
    ``__main__`` is re-run and no threads are forked.
    """
    code = "import sys; from gpunet.credits._audit import _scan_main; _scan_main()"
    root = str(Path(gpunet.__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    # The URL (it may hold a password) goes through stdin, not the command line.
    procs = [subprocess.Popen([sys.executable, "-c", code, str(lo), str(hi), str(height)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
             for _, lo, hi, height in jobs[1:]]
    try:
        for proc, (url, *_) in zip(procs, jobs[1:]):
            proc.stdin.write(url.encode())
            proc.stdin.close()
        parts = [_scan(*jobs[0])]
        for proc, job in zip(procs, jobs[1:]):
            out, err = proc.stdout.read(), proc.stderr.read()
            proc.wait()
            if proc.returncode != 0:
                raise LedgerVerificationError(
                    f"the verify worker for entries {job[1]}..{job[2] - 1} failed (exit {proc.returncode}): "
                    f"{err.decode(errors='replace').strip().splitlines()[-1:] or ''}")
            parts.append(pickle.loads(out))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return parts


def _scan_main() -> None:
    """Entry point of a verify worker: ``_scan(url, start, end, height)`` pickled to stdout."""
    url, lo, hi, height = sys.stdin.read(), int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    sys.stdout.buffer.write(pickle.dumps(_scan(url, lo, hi, height), protocol=pickle.HIGHEST_PROTOCOL))
    sys.stdout.buffer.flush()


def _stitch(parts: list[dict[str, Any]], height: int) -> LedgerChecker:
    """Join the checked ranges: chain links, holds, balances, and the Merkle levels the workers
    hashed (up to ``height``; the parent hashes the levels above)."""
    whole = LedgerChecker()
    levels: list[list[bytes]] = []
    for i, part in enumerate(parts):
        error = part["error"]
        if error is not None and error[1] == part["start"] and error[2].get("index") != error[2].get(
                "expected_index"):
            # The range's first entry is missing: say so rather than "the chain is broken".
            raise LedgerVerificationError(error[0], index=error[1], evidence=error[2])
        if i and part["first_prev"] is not None and part["first_prev"] != parts[i - 1]["last"]:
            start = part["start"]
            raise LedgerVerificationError(
                f"entry {start}: its prev hash {part['first_prev'].hex()} is not the hash of entry {start - 1}, "
                f"{parts[i - 1]['last'].hex()}: the chain is broken here", index=start,
                evidence={"prev": part["first_prev"].hex(), "expected_prev": parts[i - 1]["last"].hex()})
        # Entries before the range's own error that overpay a hold placed in an earlier range come first.
        stitch_holds(whole.holds, part["holds"], part["lows"])
        if error is not None:
            raise LedgerVerificationError(error[0], index=error[1], evidence=error[2])
        for level, nodes in enumerate(part["levels"]):
            if level == len(levels):
                levels.append([])
            levels[level].append(nodes)
        for name, delta in part["balances"].items():
            whole.balances[name] = whole.balances.get(name, 0) + delta
        whole.minted += part["minted"]
        whole.size = part["size"]
        whole.last = part["last"]
    joined = [b"".join(nodes) for nodes in levels[: height + 1]]
    whole.levels = joined + subtree_levels(joined[-1])[1:]
    return whole


def verify_service(url: str, token: str, *, public_key: str | None = None, page: int = 100_000,
                   witness: Witness | None = None, service: str | None = None) -> dict[str, Any]:
    """Check the ledger of a running service (operator token): entries, heads, balances.

    The service signs a head first; the entries it covers are read and checked against it,
    so the check covers the whole ledger as it was when it began. With a ``witness``, the
    service (``service``, default ``url``) is pinned to its key on first contact, every head
    seen of its ledger before must match it, and the new head is remembered.
    """
    service = service or url.rstrip("/")
    with CreditClient(url, token, timeout=(3.05, 300)) as client:
        head = client.head()
        if witness is not None and public_key is None:
            witness.check_pin(service, head["public_key"])  # another key: both fingerprints, what to do
        pinned = public_key or (witness.pins().get(service, {}).get("public_key") if witness else None) \
            or client.health().get("public_key")
        checker = LedgerChecker()
        start = 0
        while start < head["size"]:
            got = client.entries(start, min(page, head["size"] - start))["entries"]
            rows = [(e["index"], e["time"], e["kind"], e["from"], e["to"], e["amount"], e["session"], e["hold"],
                     e["key"], bytes.fromhex(e["prev"]), bytes.fromhex(e["hash"]),
                     entry_memo_text(e, f"entry {e['index']}")) for e in got]
            if not rows:
                raise LedgerVerificationError(f"the service signed a head of {head['size']} entries but serves only "
                                              f"{start}: entries {start}..{head['size'] - 1} are missing",
                                              index=start)
            checker.feed(rows)
            start += len(rows)
        heads = [h for h in client.heads() if h["size"] <= head["size"] and h != head] + [head]
        accounts = client.accounts()
        size_after = client.health()["size"]
    # Balances are compared only when no movement happened while the entries were read.
    balances = {a["account"]: a["balance"] for a in accounts}
    still = size_after == checker.size
    summary = checker.finish(heads=heads, balances=balances if still else None, public_key=pinned)
    summary["public_key"] = pinned
    summary["balances_checked"] = still
    if witness is not None:
        summary.update(_witness_ledger(witness, checker, head, service, f"the ledger at {service}"))
    return summary
