"""A credit database made by an earlier version (its entries keyed by a ``BIGINT`` column with an
index of its own beside the table): it verifies as it is, a service stores the table in this
version's form (an entry's index is the rowid) without changing an entry, and tampering is
still caught on both forms. In-process stores, no service process."""

from __future__ import annotations

import shutil
import sqlite3

import pytest

from gpunet.credits import LedgerVerificationError, verify_database
from gpunet.credits._db import read_entries
from gpunet.credits._service import open_store
from gpunet.errors import CreditsUnavailableError

# The entries table as the versions before this one made it (SQLAlchemy's DDL for a BigInteger key).
OLD_ENTRIES = """CREATE TABLE entries (
    idx BIGINT NOT NULL, time TEXT NOT NULL, kind TEXT NOT NULL, src TEXT NOT NULL, dst TEXT NOT NULL,
    amount BIGINT NOT NULL, session TEXT NOT NULL, hold TEXT NOT NULL, "key" TEXT NOT NULL,
    prev BLOB NOT NULL, hash BLOB NOT NULL, memo TEXT DEFAULT '' NOT NULL, PRIMARY KEY (idx))"""


def _make_ledger(db):
    """A small ledger (mint, holds, a settlement, a release) and a signed head covering it."""
    store = open_store(str(db))
    try:
        store.ensure_operator()
        store.call("create_account", "operator", {"name": "alice", "role": "client"})
        store.call("create_account", "operator", {"name": "gpu", "role": "provider"})
        store.call("mint", "operator", {"account": "alice", "amount": 100}, "m")
        sid = store.call("open_session", "alice", {"budget": 100}, "o")["session"]
        first = store.call("hold", "alice", {"session": sid, "amount": 30}, "h1")["hold"]
        store.call("settle", "operator", {"hold": first, "provider": "gpu", "amount": 20}, "s1")
        second = store.call("hold", "alice", {"session": sid, "amount": 10}, "h2")["hold"]
        store.call("release", "operator", {"hold": second}, "r2")
    finally:
        store.close()  # signs a last head
    return sid


def _to_old_form(db, by_session=True):
    """Store the entries table as an earlier version did, the rows unchanged (``by_session``: with
    the index of entries by session, which the first versions did not have)."""
    conn = sqlite3.connect(db)
    conn.executescript(f"""
        BEGIN;
        ALTER TABLE entries RENAME TO entries_new;
        DROP INDEX entries_by_session;
        {OLD_ENTRIES};
        INSERT INTO entries SELECT * FROM entries_new;
        DROP TABLE entries_new;
        {"CREATE INDEX entries_by_session ON entries (session);" if by_session else ""}
        COMMIT;""")
    conn.close()


def _entries_form(db):
    conn = sqlite3.connect(db)
    try:
        ddl = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'entries'").fetchone()[0]
        own_index = conn.execute("SELECT count(*) FROM sqlite_master WHERE tbl_name = 'entries' "
                                 "AND name LIKE 'sqlite_autoindex_%'").fetchone()[0]
        rows = conn.execute("SELECT * FROM entries ORDER BY idx").fetchall()
        by_session = conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'entries_by_session'").fetchone()[0]
    finally:
        conn.close()
    return ddl, own_index, rows, by_session


def _edit(db, sql):
    """Change a database behind its service's back; returns its path."""
    conn = sqlite3.connect(db)
    conn.execute(sql)
    conn.commit()
    conn.close()
    return db


def _copy(db, to):
    """Copy a database with its signing key and the heads its service kept beside it."""
    to.mkdir()
    for suffix in ("", ".ed25519.pem", ".ed25519.pem.heads"):
        src = db.with_name(db.name + suffix)
        (shutil.copytree if src.is_dir() else shutil.copy)(src, to / src.name)
    return to / db.name


def test_a_ledger_of_the_old_schema_verifies_and_is_stored_in_the_new_form_unchanged(tmp_path):
    db = tmp_path / "made" / "credits.sqlite3"
    db.parent.mkdir()
    sid = _make_ledger(db)
    assert _entries_form(db)[1] == 0  # this version: the index is the rowid, no index beside it
    _to_old_form(db)
    ddl, own_index, old_rows, _ = _entries_form(db)
    assert "idx BIGINT" in ddl and own_index == 1
    before = verify_database(db, workers=1)
    assert before["size"] == len(old_rows) == 6

    # Tampering is caught on the old form, named as before.
    bad = _edit(_copy(db, tmp_path / "tampered-old"), "UPDATE entries SET amount = amount + 1 WHERE idx = 3")
    with pytest.raises(LedgerVerificationError, match="entry 3: stored hash .* this entry was altered"):
        verify_database(bad, workers=1)

    # A service opening it stores the table in the new form; every entry is as it was.
    store = open_store(str(db))
    try:
        ddl, own_index, rows, by_session = _entries_form(db)
        assert "idx INTEGER" in ddl and own_index == 0 and by_session == 1
        assert rows == old_rows
        # ... and it goes on writing the same chain.
        store.call("mint", "operator", {"account": "alice", "amount": 5}, "m2")
        assert [e[0] for e in read_entries(store.engine, 0, 10, session=sid)] == [1, 2, 3, 4, 5]
    finally:
        store.close()
    after = verify_database(db, workers=1)
    assert after["size"] == 7 and after["root"] != before["root"]
    assert verify_database(db, workers=3, parallel_min=1)["root"] == after["root"]

    # Tampering is caught on the new form too.
    bad = _edit(_copy(db, tmp_path / "tampered-new"), "DELETE FROM entries WHERE idx = 2")
    with pytest.raises(LedgerVerificationError, match="entry 2 is missing"):
        verify_database(bad, workers=1)


def test_an_old_ledger_whose_index_is_not_a_number_is_refused_unchanged_and_named_by_verify(tmp_path):
    db = tmp_path / "credits.sqlite3"
    _make_ledger(db)
    _to_old_form(db)
    _edit(db, "UPDATE entries SET idx = 'two' WHERE idx = 2")  # only the old form lets an index hold text
    _, _, rows, _ = _entries_form(db)
    with pytest.raises(CreditsUnavailableError, match="entries table could not be stored in this version's form.*"
                                                     "nothing was changed.*gpunet ledger verify"):
        open_store(str(db))
    assert _entries_form(db)[2] == rows and _entries_form(db)[1] == 1
    with pytest.raises(LedgerVerificationError, match="entry 2 is missing"):
        verify_database(db, workers=1)


def test_an_old_ledger_without_the_index_by_session_gets_it(tmp_path):
    db = tmp_path / "credits.sqlite3"
    _make_ledger(db)
    _to_old_form(db, by_session=False)
    _, own_index, rows, by_session = _entries_form(db)
    assert own_index == 1 and by_session == 0
    open_store(str(db)).close()
    assert _entries_form(db)[1:] == (0, rows, 1)
    assert verify_database(db, workers=1)["size"] == 6
