"""Storage of the credit service: schema, reads, and the one writer.

SQLAlchemy Core over SQLite (a file, WAL, ``synchronous=FULL``) or PostgreSQL
(``postgresql://`` URLs, through psycopg 3).

One writer owns the only write connection (as datasette does): a thread, or, inside
the service on SQLite, the event loop itself with only the commit in a thread.
Requests become *operations* queued to it; it takes every operation waiting, applies them
in memory (checks first, then changes, so a refused operation changes nothing),
writes the result in **one transaction** and only then answers them all: group
commit. A crash before the commit loses only unanswered operations; an
answered one is on disk. Readers use their own pooled connections.

The writer keeps accounts, open sessions and open holds in memory (it is the only
writer, so its copy is the truth) and undoes its in-memory changes when a
transaction fails. Invariants hold by construction and again by database
``CHECK`` constraints: no balance below zero, no session holding or spending
beyond its budget; credits only move between accounts (held credits sit in the
``escrow`` account), so the total changes only by minting.

A hold is closed once, by ``settle`` or ``release``, and may before that be paid out in
parts (``settle_part``) to any number of providers: each part is one ``settle`` entry,
grows the hold's ``paid`` (never beyond its ``amount``) and moves the part from the
session's ``held`` to its ``spent`` at once. Closing releases what is left; a hold that
paid anything ends ``settled``, one that paid nothing ``released``.

Providers' trust records (see :mod:`gpunet.credits._trust`) go through the same
writer; they move no credits, so they write no ledger entries.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import hashlib
import json
import logging
import os
import queue
import re
import secrets
import threading
import uuid
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpunet.credits._errors import (
    BudgetExceededError,
    ConflictError,
    CreditsError,
    CreditsRequestError,
    CreditsUnavailableError,
    ForbiddenError,
    IdempotencyConflictError,
    InvalidRequestError,
    NotFoundError,
)
from gpunet.credits._ledger import ESCROW, ZERO_HASH, canonical_memo, entry_hash, sign_head
from gpunet.credits._merkle import MerkleTree
from gpunet.credits._trust import REPUTATION_FLOOR, quarantine_reason, record_json
from gpunet.paths import data_dir

if TYPE_CHECKING:  # pragma: no cover
    import sqlalchemy as sa

logger = logging.getLogger(__name__)

ROLES = ("client", "provider", "operator")
OPERATOR = "operator"
MAX_AMOUNT = 10**15
MAX_BATCH = 5000
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}\Z")
KEY_RE = re.compile(r"[\x21-\x7e]{1,200}\Z")
ID_RE = re.compile(r"[a-z]_[0-9a-f]{32}\Z")
_GROUP_LIMIT = 2000  # operations per transaction at most
_PG_LOCK_KEY = 0x67706E6574  # "gpnet": the advisory lock of the one writing service
MAX_BALANCE = 2**62


TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"  # the ledger's times: UTC, microseconds, a ``Z``


def utcnow() -> str:
    """Return the current UTC time as ISO 8601 with microseconds and a ``Z``."""
    return format_time(_dt.datetime.now(_dt.timezone.utc))


def format_time(when: _dt.datetime) -> str:
    """Return an aware datetime as the ledger writes times (``TIME_FORMAT``, UTC)."""
    return when.astimezone(_dt.timezone.utc).strftime(TIME_FORMAT)


def parse_time(text: str) -> _dt.datetime:
    """Return the aware UTC datetime of a time the ledger wrote (see :func:`utcnow`)."""
    return _dt.datetime.strptime(text, TIME_FORMAT).replace(tzinfo=_dt.timezone.utc)


def hash_token(token: str) -> str:
    """Return the stored form of a bearer token (SHA-256 hex); tokens themselves are never stored."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """Return a fresh bearer token (256 random bits)."""
    return "gpn_" + secrets.token_urlsafe(32)


def resolve_db_url(db: str | os.PathLike[str] | None) -> str:
    """Turn ``--db`` into an SQLAlchemy URL: ``None`` is ``credits.sqlite3`` in the data dir,
    a plain path is an SQLite file, ``postgresql://`` uses psycopg 3."""
    if db is None:
        return f"sqlite:///{data_dir() / 'credits.sqlite3'}"
    db = os.fspath(db)
    if "://" not in db:
        return f"sqlite:///{Path(db).expanduser().resolve()}"
    if db.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + db.split("://", 1)[1]
    return db


def sqlite_path(url: str) -> Path | None:
    """Return the file of an SQLite URL, or ``None`` for other databases."""
    if url.startswith("sqlite:///"):
        return Path(url[len("sqlite:///"):])
    return None


def beside_db(url: str, suffix: str) -> Path:
    """Return a path next to the SQLite file (or in the data dir for a server database)."""
    path = sqlite_path(url)
    if path is not None:
        return path.with_name(path.name + suffix)
    import sqlalchemy as sa

    u = sa.engine.make_url(url)
    return data_dir() / f"credits-{u.host or 'local'}-{u.port or 5432}-{u.database}{suffix}"


def _redact(url: str) -> str:
    import sqlalchemy as sa

    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - only for messages
        return url


# -- schema -----------------------------------------------------------------------------


def _schema() -> tuple[Any, dict[str, Any]]:
    import sqlalchemy as sa

    md = sa.MetaData()
    t = {}
    t["meta"] = sa.Table("meta", md, sa.Column("key", sa.Text, primary_key=True), sa.Column("value", sa.Text))
    t["accounts"] = sa.Table(
        "accounts", md,
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("role", sa.Text, nullable=False),
        sa.Column("token_hash", sa.Text, unique=True),
        sa.Column("balance", sa.BigInteger, nullable=False),
        sa.Column("created", sa.Text, nullable=False),
        sa.CheckConstraint("balance >= 0", name="balance_not_negative"),
    )
    t["sessions"] = sa.Table(
        "sessions", md,
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("account", sa.Text, nullable=False),
        sa.Column("notebook", sa.Text, nullable=False),
        sa.Column("kernel", sa.Text, nullable=False),
        sa.Column("budget", sa.BigInteger, nullable=False),
        sa.Column("held", sa.BigInteger, nullable=False),
        sa.Column("spent", sa.BigInteger, nullable=False),
        sa.Column("created", sa.Text, nullable=False),
        sa.CheckConstraint("held >= 0 AND spent >= 0 AND held + spent <= budget", name="within_budget"),
    )
    t["holds"] = sa.Table(
        "holds", md,
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("session", sa.Text, nullable=False),
        sa.Column("account", sa.Text, nullable=False),
        sa.Column("amount", sa.BigInteger, nullable=False),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("provider", sa.Text, nullable=False),
        sa.Column("paid", sa.BigInteger, nullable=False),
        sa.Column("entry", sa.BigInteger, nullable=False),
        # The entry that closed the hold; while it is open and paid in parts, its latest part.
        sa.Column("closed_entry", sa.BigInteger),
        sa.CheckConstraint("amount > 0 AND paid >= 0 AND paid <= amount", name="hold_amounts"),
    )
    t["entries"] = sa.Table(
        "entries", md,
        sa.Column("idx", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("time", sa.Text, nullable=False),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("src", sa.Text, nullable=False),
        sa.Column("dst", sa.Text, nullable=False),
        sa.Column("amount", sa.BigInteger, nullable=False),
        sa.Column("session", sa.Text, nullable=False),
        sa.Column("hold", sa.Text, nullable=False),
        sa.Column("key", sa.Text, nullable=False),
        sa.Column("prev", sa.LargeBinary, nullable=False),
        sa.Column("hash", sa.LargeBinary, nullable=False),
        # A settlement's memo: canonical JSON text, '' for none (see gpunet.credits._ledger).
        sa.Column("memo", sa.Text, nullable=False, server_default=""),
        sa.Index("entries_by_session", "session"),
    )
    t["idempotency"] = sa.Table(
        "idempotency", md,
        sa.Column("scope", sa.Text, primary_key=True),
        sa.Column("request_hash", sa.Text, nullable=False),
        sa.Column("response", sa.Text, nullable=False),
    )
    t["heads"] = sa.Table(
        "heads", md,
        sa.Column("size", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("root", sa.Text, nullable=False),
        sa.Column("timestamp", sa.Text, nullable=False),
        sa.Column("signature", sa.Text, nullable=False),
        sa.Column("public_key", sa.Text, nullable=False),
    )
    t["provider_records"] = sa.Table(
        "provider_records", md,
        sa.Column("provider", sa.Text, primary_key=True),
        sa.Column("consecutive_valid", sa.BigInteger, nullable=False),
        sa.Column("valid", sa.BigInteger, nullable=False),
        sa.Column("mismatches", sa.BigInteger, nullable=False),
        sa.Column("quarantined", sa.Boolean, nullable=False),
        sa.Column("quarantine_reason", sa.Text, nullable=False),
        sa.Column("updated", sa.Text, nullable=False),
    )
    return md, t


ENTRY_COLUMNS = "idx, time, kind, src, dst, amount, session, hold, key, prev, hash, memo"
# Columns added after the first release: (table, column, SQL type and default). A database
# made before gets them when the service opens it; existing rows take the default.
ADDED_COLUMNS = (("entries", "memo", "TEXT NOT NULL DEFAULT ''"),)


def _sqlite_synchronous() -> str:
    """``FULL`` (default: an answered movement survives a power cut) or ``NORMAL`` (survives a
    crash of the service, not of the machine), from ``GPUNET_CREDITS_SYNCHRONOUS``."""
    value = os.environ.get("GPUNET_CREDITS_SYNCHRONOUS", "FULL").upper()
    if value not in ("FULL", "NORMAL"):
        raise CreditsError(f"GPUNET_CREDITS_SYNCHRONOUS must be FULL or NORMAL, got {value!r}")
    return value


def make_engine(url: str) -> sa.Engine:
    """Create the SQLAlchemy engine; SQLite gets WAL, ``synchronous=FULL`` and a busy timeout."""
    import sqlalchemy as sa

    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        path = sqlite_path(url)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
    else:
        kwargs["pool_size"] = 8
        kwargs["pool_pre_ping"] = True
    engine = sa.create_engine(url, **kwargs)
    if url.startswith("sqlite"):

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA synchronous={_sqlite_synchronous()}")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

    return engine


def open_engine(url: str) -> sa.Engine:
    """Create an engine and check the database answers; raises CreditsUnavailableError naming it."""
    import sqlalchemy as sa

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except sa.exc.SQLAlchemyError as exc:
        raise CreditsUnavailableError(
            f"cannot open the credit database {_redact(url)}: {exc.__class__.__name__}: "
            f"{str(exc).splitlines()[0]}. Check the URL, that the server runs and the user may connect.",
            url=_redact(url),
        ) from exc
    return engine


# -- in-memory state --------------------------------------------------------------------


class _Account:
    __slots__ = ("name", "role", "token_hash", "balance")

    def __init__(self, name: str, role: str, token_hash: str | None, balance: int) -> None:
        self.name, self.role, self.token_hash, self.balance = name, role, token_hash, balance


class _Session:
    __slots__ = ("id", "account", "notebook", "kernel", "budget", "held", "spent", "created")

    def __init__(self, id: str, account: str, notebook: str, kernel: str, budget: int, held: int,
                 spent: int, created: str) -> None:
        self.id, self.account, self.notebook, self.kernel = id, account, notebook, kernel
        self.budget, self.held, self.spent, self.created = budget, held, spent, created

    def usage(self) -> dict[str, Any]:
        return session_usage(self.id, self.account, self.notebook, self.kernel, self.budget, self.held,
                             self.spent, self.created)


class _Hold:
    __slots__ = ("id", "session", "account", "amount", "state", "provider", "paid", "entry", "closed_entry")

    def __init__(self, id: str, session: str, account: str, amount: int, state: str, provider: str,
                 paid: int, entry: int, closed_entry: int | None) -> None:
        self.id, self.session, self.account, self.amount = id, session, account, amount
        self.state, self.provider, self.paid = state, provider, paid
        self.entry, self.closed_entry = entry, closed_entry


def session_usage(sid: str, account: str, notebook: str, kernel: str, budget: int, held: int,
                  spent: int, created: str) -> dict[str, Any]:
    """Return the JSON form of a session's usage."""
    return {
        "session": sid, "account": account, "notebook": notebook, "kernel": kernel,
        "budget": budget, "held": held, "spent": spent, "left": budget - held - spent, "created": created,
    }


class _Record:
    __slots__ = ("provider", "consecutive_valid", "valid", "mismatches", "quarantined", "quarantine_reason",
                 "updated")

    def __init__(self, provider: str, consecutive_valid: int = 0, valid: int = 0, mismatches: int = 0,
                 quarantined: bool = False, quarantine_reason: str = "", updated: str | None = None) -> None:
        self.provider, self.consecutive_valid, self.valid = provider, consecutive_valid, valid
        self.mismatches, self.quarantined = mismatches, bool(quarantined)
        self.quarantine_reason, self.updated = quarantine_reason, updated

    def to_json(self) -> dict[str, Any]:
        return record_json(self.provider, self.consecutive_valid, self.valid, self.mismatches, self.quarantined,
                           self.quarantine_reason, self.updated)


RECORD_COLUMNS = "provider, consecutive_valid, valid, mismatches, quarantined, quarantine_reason, updated"


class _Op:
    """One queued operation: what to do, for whom, and the future that answers it."""

    __slots__ = ("name", "actor", "params", "key", "future")

    def __init__(self, name: str, actor: str | None, params: dict[str, Any], key: str | None) -> None:
        self.name, self.actor, self.params, self.key = name, actor, params, key
        self.future: Future = Future()


def request_hash(name: str, params: dict[str, Any]) -> str:
    """Return the digest that ties an idempotency key to one request body."""
    return hashlib.sha256(json.dumps([name, params], sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# -- the store --------------------------------------------------------------------------


class CreditStore:
    """The credit database and its single writer thread.

    ``submit(name, actor, params, key)`` queues an operation and returns a
    ``concurrent.futures.Future`` answered after its transaction commits.
    """

    def __init__(self, url: str, *, signing_key: Any = None, reputation_floor: float = REPUTATION_FLOOR) -> None:
        import sqlalchemy as sa

        self.url = url
        self.reputation_floor = reputation_floor
        self.engine = open_engine(url)
        self._lock_file: Any = None
        # The writer speaks plain DB-API on its own connection: prepared SQL strings and
        # executemany, no statement compilation per group.
        self._write_conn = self.engine.raw_connection()
        self._p = "?" if url.startswith("sqlite") else "%s"
        try:
            self._take_writer_lock()
            self._md, self.tables = _schema()
            self._md.create_all(self.engine)
            self._add_missing_columns()
        except BaseException:
            self._release_writer_lock()
            self._write_conn.close()
            self.engine.dispose()
            raise
        self.signing_key = signing_key
        self._tree_lock = threading.Lock()
        self._accounts: dict[str, _Account] = {}
        self._tokens: dict[str, str] = {}
        self._sessions: dict[str, _Session] = {}
        self._holds: dict[str, _Hold] = {}
        self._records: dict[str, _Record] = {}  # providers' trust records, loaded when first used
        # What readers see without a database round trip: committed values only.
        self._committed_balances: dict[str, int] = {}
        self._committed_sessions: dict[str, tuple] = {}
        with self.engine.connect() as conn:
            for name, role, th, bal in conn.execute(
                sa.select(self.tables["accounts"].c["name", "role", "token_hash", "balance"])
            ):
                self._accounts[name] = _Account(name, role, th, bal)
                self._committed_balances[name] = bal
                if th:
                    self._tokens[th] = name
            hashes = [bytes(h) for (h,) in conn.exec_driver_sql("SELECT hash FROM entries ORDER BY idx")]
            last_head = conn.exec_driver_sql("SELECT max(size) FROM heads").scalar()
            self.public_key_hex = conn.execute(
                sa.select(self.tables["meta"].c.value).where(self.tables["meta"].c.key == "public_key")
            ).scalar()
        self.tree = MerkleTree(hashes)
        self._next_index = len(hashes)
        self._last_hash = hashes[-1] if hashes else ZERO_HASH
        self._last_head_size = -1 if last_head is None else int(last_head)
        if ESCROW not in self._accounts:
            self._write_direct_account(ESCROW, "system", None)
        self._closed = False
        self._loop: Any = None
        self._loop_thread: int | None = None
        self._start_thread()
        logger.info("credit store %s: %d accounts, %d ledger entries", _redact(url), len(self._accounts),
                    self.tree.size)

    # -- setup helpers (before the writer runs, or through it) --

    def _take_writer_lock(self) -> None:
        """Make sure this is the only service writing to the database (its state lives in memory)."""
        path = sqlite_path(self.url)
        if path is not None:
            import fcntl

            path.parent.mkdir(parents=True, exist_ok=True)
            fh = open(path.with_name(path.name + ".writer.lock"), "a+")
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.seek(0)
                holder = fh.read().strip() or "?"
                fh.close()
                raise CreditsUnavailableError(
                    f"another credit service (pid {holder}) already writes to {path}; stop it first, or "
                    "talk to it instead of starting a second one", url=str(path)) from None
            fh.seek(0)
            fh.truncate()
            fh.write(str(os.getpid()))
            fh.flush()
            self._lock_file = fh
            return
        cur = self._write_conn.cursor()
        cur.execute("SELECT pg_try_advisory_lock(%s)", (_PG_LOCK_KEY,))
        (got,) = cur.fetchone()
        cur.close()
        self._write_conn.commit()
        if not got:
            raise CreditsUnavailableError(
                f"another credit service already writes to {_redact(self.url)} (it holds the advisory lock "
                f"{_PG_LOCK_KEY}); stop it first, or talk to it instead of starting a second one",
                url=_redact(self.url))

    def _add_missing_columns(self) -> None:
        """Give a database made by an earlier version the columns it lacks (see ``ADDED_COLUMNS``)."""
        import sqlalchemy as sa

        inspector = sa.inspect(self.engine)
        for table, column, ddl in ADDED_COLUMNS:
            if column not in {c["name"] for c in inspector.get_columns(table)}:
                with self.engine.begin() as conn:
                    conn.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN {column} {ddl}")
                logger.info("added the column %s.%s to the credit database", table, column)

    def _release_writer_lock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def _write_direct_account(self, name: str, role: str, token_hash: str | None) -> None:
        with self.engine.begin() as conn:
            conn.execute(self.tables["accounts"].insert().values(
                name=name, role=role, token_hash=token_hash, balance=0, created=utcnow()))
        self._accounts[name] = _Account(name, role, token_hash, 0)
        self._committed_balances[name] = 0
        if token_hash:
            self._tokens[token_hash] = name

    def bind_public_key(self, public_key_hex: str) -> None:
        """Record the signing key in the database on first start; refuse a different key later."""
        if self.public_key_hex is None:
            with self.engine.begin() as conn:
                conn.execute(self.tables["meta"].insert().values(key="public_key", value=public_key_hex))
            self.public_key_hex = public_key_hex
        elif self.public_key_hex != public_key_hex:
            raise CreditsError(
                f"the signing key given (public key {public_key_hex}) is not the one this ledger's heads "
                f"were signed with ({self.public_key_hex}); start the service with the original key file"
            )

    def ensure_operator(self) -> str | None:
        """Create the operator account if missing; return its new token, or None if it existed."""
        if OPERATOR in self._accounts:
            return None
        token = new_token()
        self._write_direct_account(OPERATOR, "operator", hash_token(token))
        logger.info("created the operator account")
        return token

    def rotate_token(self, name: str) -> str:
        """Give account ``name`` a new token (the old one stops working) and return it."""
        return self.call("rotate_token", None, {"account": name}, None)["token"]

    # -- reads --

    def authenticate(self, token: str) -> tuple[str, str] | None:
        """Return ``(account, role)`` for a bearer token, or None if unknown."""
        name = self._tokens.get(hash_token(token))
        if name is None:
            return None
        acct = self._accounts.get(name)
        return (name, acct.role) if acct else None

    def role_of(self, name: str) -> str | None:
        """Return the role of an account, or None if there is no such account."""
        acct = self._accounts.get(name)
        return acct.role if acct else None

    def cached_account(self, name: str) -> dict[str, Any] | None:
        """Return an account's committed balance from memory, or None if unknown."""
        bal = self._committed_balances.get(name)
        acct = self._accounts.get(name)
        if bal is None or acct is None:
            return None
        return {"account": name, "role": acct.role, "balance": bal}

    def cached_session(self, sid: str) -> dict[str, Any] | None:
        """Return a session's committed usage from memory, or None if not cached (read the database)."""
        row = self._committed_sessions.get(sid)
        return None if row is None else session_usage(*row)

    def read_account(self, name: str) -> dict[str, Any] | None:
        """Return an account's committed name, role and balance, or None."""
        import sqlalchemy as sa

        a = self.tables["accounts"]
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(a.c["name", "role", "balance"]).where(a.c.name == name)).first()
        return None if row is None else {"account": row[0], "role": row[1], "balance": row[2]}

    def read_accounts(self) -> list[dict[str, Any]]:
        """Return every account with its committed balance."""
        import sqlalchemy as sa

        a = self.tables["accounts"]
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(a.c["name", "role", "balance"]).order_by(a.c.name)).all()
        return [{"account": r[0], "role": r[1], "balance": r[2]} for r in rows]

    def read_session(self, sid: str) -> dict[str, Any] | None:
        """Return a session's committed usage, or None."""
        import sqlalchemy as sa

        s = self.tables["sessions"]
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(s.c["id", "account", "notebook", "kernel", "budget", "held", "spent",
                                               "created"]).where(s.c.id == sid)).first()
        return None if row is None else session_usage(*row)

    def read_entries(self, start: int, end: int) -> list[tuple]:
        """Return stored entry rows with ``start <= index < end`` in order."""
        with self.engine.connect() as conn:
            return [tuple(r) for r in conn.exec_driver_sql(
                f"SELECT {ENTRY_COLUMNS} FROM entries WHERE idx >= %s AND idx < %s ORDER BY idx"
                if not self.url.startswith("sqlite") else
                f"SELECT {ENTRY_COLUMNS} FROM entries WHERE idx >= ? AND idx < ? ORDER BY idx",
                (start, end))]

    def read_session_entries(self, sid: str, size: int) -> list[tuple]:
        """Return the entry rows of session ``sid`` below index ``size``."""
        p = "%s" if not self.url.startswith("sqlite") else "?"
        with self.engine.connect() as conn:
            return [tuple(r) for r in conn.exec_driver_sql(
                f"SELECT {ENTRY_COLUMNS} FROM entries WHERE session = {p} AND idx < {p} ORDER BY idx",
                (sid, size))]

    def read_heads(self) -> list[dict[str, Any]]:
        """Return every stored signed tree head, oldest first."""
        return read_heads(self.engine)

    def read_open_holds(self, *, older_than: float | None = None, account: str | None = None,
                        now: _dt.datetime | None = None) -> list[dict[str, Any]]:
        """Return the committed holds still open, oldest first; see :func:`read_open_holds`."""
        return read_open_holds(self.engine, older_than=older_than, account=account, now=now)

    def _read_records(self, name: str | None) -> list[tuple]:
        a = ", ".join(f"r.{c}" for c in RECORD_COLUMNS.split(", ")[1:])
        sql = (f"SELECT a.name, a.role, {a} FROM accounts a LEFT JOIN provider_records r ON r.provider = a.name "
               + ("WHERE a.name = {p}" if name is not None else "WHERE a.role = 'provider' ORDER BY a.name"))
        with self.engine.connect() as conn:
            return [tuple(r) for r in conn.exec_driver_sql(sql.format(p=self._p),
                                                           (name,) if name is not None else ())]

    def read_provider_record(self, name: str) -> dict[str, Any]:
        """Return provider ``name``'s committed trust record (defaults when it has none yet).

        Raises :class:`NotFoundError` when there is no such account or it is not a provider.
        """
        rows = self._read_records(name)
        if not rows:
            raise NotFoundError(f"no account named {name!r}; trust records are kept for provider accounts",
                                details={"account": name})
        name, role, *fields = rows[0]
        if role != "provider":
            raise NotFoundError(f"account {name!r} is a {role}, not a provider; trust records are kept for "
                                "provider accounts", details={"account": name})
        return _record_from_row(name, fields)

    def read_provider_records(self) -> list[dict[str, Any]]:
        """Return the committed trust record of every provider account, by name."""
        return [_record_from_row(name, fields) for name, _, *fields in self._read_records(None)]

    def proof_inclusion(self, index: int, size: int | None) -> tuple[int, list[bytes], bytes]:
        """Return ``(size, audit path, leaf hash)`` for entry ``index`` at ``size`` (default: now)."""
        with self._tree_lock:
            size = self.tree.size if size is None else size
            return size, self.tree.inclusion_proof(index, size), self.tree.leaf(index) if index < size else b""

    def proof_consistency(self, first: int, second: int | None) -> tuple[int, list[bytes], bytes, bytes]:
        """Return ``(second, proof, first root, second root)``."""
        with self._tree_lock:
            second = self.tree.size if second is None else second
            proof = self.tree.consistency_proof(first, second)
            return second, proof, self.tree.root(first), self.tree.root(second)

    @property
    def size(self) -> int:
        """The number of committed ledger entries."""
        return self.tree.size

    # -- writing --

    def submit(self, name: str, actor: str | None, params: dict[str, Any], key: str | None = None) -> Future:
        """Queue an operation for the writer; the future is answered after its commit."""
        op = _Op(name, actor, params, key)
        if self._closed:
            op.future.set_exception(CreditsUnavailableError("the credit store is closing; retry shortly"))
            return op.future
        loop = self._loop
        if loop is not None:
            if threading.get_ident() == self._loop_thread:
                op.future = loop.create_future()
                self._enqueue(op)
            else:
                loop.call_soon_threadsafe(self._enqueue, op)
            return op.future
        self._queue.put(op)
        return op.future

    def call(self, name: str, actor: str | None, params: dict[str, Any], key: str | None = None,
             timeout: float = 60) -> Any:
        """Run one operation and wait for its answer (raises its error)."""
        return self.submit(name, actor, params, key).result(timeout)

    def close(self) -> None:
        """Finish queued operations, sign a last head, stop the writer and close connections."""
        if self._closed:
            return
        if self.signing_key is not None:
            try:
                self.call("sign_head", None, {}, None, timeout=30)
            except Exception:  # noqa: BLE001 - closing anyway
                logger.exception("could not sign the last tree head on close")
        self._closed = True
        self._stop_thread()
        self._write_conn.close()
        self._release_writer_lock()
        self.engine.dispose()

    def _start_thread(self) -> None:
        self._queue: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = threading.Thread(
            target=self._run, name="gpunet-credits-writer", daemon=True)
        self._thread.start()

    def _stop_thread(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=30)
            self._thread = None

    def _publish(self, sessions: Any, accounts: Any) -> None:
        """After a commit: let readers see the new committed values."""
        for sess in sessions:
            self._committed_sessions[sess.id] = (sess.id, sess.account, sess.notebook, sess.kernel, sess.budget,
                                                 sess.held, sess.spent, sess.created)
        for acct in accounts:
            self._committed_balances[acct.name] = acct.balance

    def _run(self) -> None:
        while True:
            op = self._queue.get()
            if op is None:
                return
            group = [op]
            stop = False
            while len(group) < _GROUP_LIMIT:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                group.append(nxt)
            try:
                self._apply_group(group)
            except Exception:  # noqa: BLE001 - the writer must keep running
                logger.exception("credit writer failed on a group of %d operations", len(group))
                for o in group:
                    _resolve(o, None, CreditsUnavailableError(
                        "the credit store failed to write; nothing of this request was kept; retry it"))
            if stop:
                return

    def _apply_group(self, group: list[_Op]) -> None:
        staged = self._stage(group)
        if staged is None:
            return
        uow, results = staged
        try:
            self._write_conn.commit()
            error = None
        except Exception as exc:  # noqa: BLE001
            error = exc
        self._finish(uow, results, error)

    def _stage(self, group: list[_Op]) -> tuple[_UnitOfWork, list[tuple[_Op, Any, BaseException | None]]] | None:
        """Apply a group in memory and write it, without committing; None when nothing is left to commit."""
        conn = self._write_conn
        while group:
            uow = _UnitOfWork(self)
            results: list[tuple[_Op, Any, BaseException | None]] = []
            broken: _Op | None = None
            try:
                uow.prefetch_idempotency(group)
                for op in group:
                    try:
                        results.append((op, uow.apply(op), None))
                    except CreditsRequestError as exc:
                        results.append((op, None, exc))
                    except Exception:  # noqa: BLE001 - a bug in one operation must not sink the others
                        logger.exception("credit operation %s failed unexpectedly", op.name)
                        broken = op
                        break
                if broken is None:
                    uow.flush()
            except Exception as exc:  # noqa: BLE001
                conn.rollback()
                uow.undo()
                logger.exception("credit transaction of %d operations failed and was rolled back", len(group))
                err = CreditsUnavailableError(
                    f"the credit database refused the write ({exc.__class__.__name__}); nothing was moved; retry")
                for op in group:
                    _resolve(op, None, err)
                return None
            if broken is not None:
                conn.rollback()
                uow.undo()
                _resolve(broken, None, CreditsUnavailableError(
                    f"the credit service failed on this {broken.name} request (a bug, logged by the service); "
                    "nothing was moved", status=500))
                group = [op for op in group if op is not broken]
                continue
            return uow, results
        return None

    def _finish(self, uow: _UnitOfWork, results: list[tuple[_Op, Any, BaseException | None]],
                error: BaseException | None) -> None:
        """After the commit (or its failure): publish and answer every operation of the group."""
        if error is not None:
            self._write_conn.rollback()
            uow.undo()
            logger.error("commit of %d credit operations failed: %r", len(results), error)
            err = CreditsUnavailableError(
                f"the credit database refused the commit ({error.__class__.__name__}); nothing was moved; retry")
            for op, _, _ in results:
                _resolve(op, None, err)
            return
        uow.committed()
        with self._tree_lock:
            self.tree.extend(uow.new_leaves)
        uow.evict()
        for op, result, exc in results:
            _resolve(op, result, exc)

    # -- the writer on an event loop (SQLite, inside the service) --

    @property
    def prefers_loop(self) -> bool:
        """Whether the writer should run on the service's event loop: SQLite statements take
        microseconds, and on the loop thread they never wait for the GIL; only the commit
        (the fsync) goes to a thread. A server database keeps its writer thread."""
        return sqlite_path(self.url) is not None

    def attach_loop(self) -> None:
        """Move the writer onto the running event loop (call from that loop)."""
        import asyncio
        from concurrent.futures import ThreadPoolExecutor

        self._stop_thread()
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._pending: list[_Op] = []
        self._wake = asyncio.Event()
        self._detaching = False
        self._commit_pool = ThreadPoolExecutor(1, thread_name_prefix="gpunet-credits-commit")
        self._task = self._loop.create_task(self._writer_task())

    async def detach_loop(self) -> None:
        """Finish the queued operations and move the writer back to its own thread."""
        if self._loop is None:
            return
        self._detaching = True
        self._wake.set()
        await self._task
        self._commit_pool.shutdown()
        self._loop = None
        self._start_thread()

    def _enqueue(self, op: _Op) -> None:
        self._pending.append(op)
        self._wake.set()

    async def _writer_task(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending or not self._detaching:
            if not self._pending:
                await self._wake.wait()
                self._wake.clear()
                continue
            group = self._pending[:_GROUP_LIMIT]
            del self._pending[:_GROUP_LIMIT]
            try:
                staged = self._stage(group)
                if staged is None:
                    continue
                uow, results = staged
                try:
                    await loop.run_in_executor(self._commit_pool, self._write_conn.commit)
                    error = None
                except Exception as exc:  # noqa: BLE001
                    error = exc
                self._finish(uow, results, error)
            except Exception:  # noqa: BLE001 - the writer must keep running
                logger.exception("credit writer failed on a group of %d operations", len(group))
                for op in group:
                    _resolve(op, None, CreditsUnavailableError(
                        "the credit store failed to write; nothing of this request was kept; retry it"))


def _record_from_row(name: str, fields: list[Any]) -> dict[str, Any]:
    """The JSON form of a trust record read with ``LEFT JOIN`` (all ``None``: no record yet)."""
    if fields[0] is None:
        return _Record(name).to_json()
    return _Record(name, *fields).to_json()


def _resolve(op: _Op, result: Any, exc: BaseException | None) -> None:
    """Answer an operation's future (a concurrent or an asyncio one) unless it was given up."""
    if op.future.done():
        return
    if exc is not None:
        op.future.set_exception(exc)
    else:
        op.future.set_result(result)


class _UnitOfWork:
    """The in-memory changes of one writer transaction, with an undo log."""

    def __init__(self, store: CreditStore) -> None:
        self.s = store
        self.undo_log: list[tuple[Any, str, Any]] = []
        self.new_objects: list[tuple[dict, str]] = []
        self.dirty_accounts: dict[str, _Account] = {}
        self.new_accounts: list[_Account] = []
        self.new_sessions: list[_Session] = []
        self.dirty_sessions: dict[str, _Session] = {}
        self.new_holds: dict[str, _Hold] = {}
        self.dirty_holds: dict[str, _Hold] = {}
        self.new_records: dict[str, _Record] = {}
        self.dirty_records: dict[str, _Record] = {}
        self.entries: list[dict[str, Any]] = []
        self.new_leaves: list[bytes] = []
        self.idem_found: dict[str, tuple[str, str]] = {}
        self.idem_new: dict[str, tuple[str, str]] = {}
        self.heads: list[dict[str, Any]] = []
        self.token_changes: list[tuple[str | None, str | None, str]] = []
        self.next_index = store._next_index
        self.last_hash = store._last_hash
        self.now = utcnow()
        self.closed_holds: list[str] = []

    # -- helpers --

    def _set(self, obj: Any, attr: str, value: Any) -> None:
        self.undo_log.append((obj, attr, getattr(obj, attr)))
        setattr(obj, attr, value)

    def undo(self) -> None:
        for obj, attr, old in reversed(self.undo_log):
            setattr(obj, attr, old)
        for mapping, key in self.new_objects:
            mapping.pop(key, None)
        for old_hash, new_hash, name in self.token_changes:
            if new_hash:
                self.s._tokens.pop(new_hash, None)
            if old_hash:
                self.s._tokens[old_hash] = name

    def prefetch_idempotency(self, group: list[_Op]) -> None:
        scopes = [f"{op.actor}/{op.key}" for op in group if op.key]
        for op in group:
            if op.name == "batch":
                scopes.extend(f"{op.actor}/{it.get('key')}" for it in op.params["items"] if it.get("key"))
        if not scopes:
            return
        cur = self.s._write_conn.cursor()
        p = self.s._p
        for i in range(0, len(scopes), 500):
            chunk = scopes[i : i + 500]
            cur.execute(f"SELECT scope, request_hash, response FROM idempotency WHERE scope IN "
                        f"({', '.join([p] * len(chunk))})", chunk)
            for scope, rh, resp in cur.fetchall():
                self.idem_found[scope] = (rh, resp)
        cur.close()

    def _one(self, sql: str, value: Any) -> tuple | None:
        cur = self.s._write_conn.cursor()
        cur.execute(sql.format(p=self.s._p), (value,))
        row = cur.fetchone()
        cur.close()
        return None if row is None else tuple(row)

    def _account(self, name: str, what: str = "account") -> _Account:
        acct = self.s._accounts.get(name)
        if acct is None:
            raise NotFoundError(f"no {what} named {name!r}; create it first (operator: create_account)",
                                details={"account": name})
        return acct

    def _session(self, sid: str) -> _Session:
        sess = self.s._sessions.get(sid)
        if sess is None:
            row = self._one("SELECT id, account, notebook, kernel, budget, held, spent, created FROM sessions "
                            "WHERE id = {p}", sid)
            if row is None:
                raise NotFoundError(f"no session {sid!r}; open one with open_session first",
                                    details={"session": sid})
            sess = _Session(*row)
            self.s._sessions[sid] = sess
            self.s._committed_sessions[sid] = row
        return sess

    def _hold(self, hid: str) -> _Hold:
        hold = self.s._holds.get(hid)
        if hold is None:
            row = self._one("SELECT id, session, account, amount, state, provider, paid, entry, closed_entry "
                            "FROM holds WHERE id = {p}", hid)
            if row is None:
                raise NotFoundError(f"no hold {hid!r}; place it with hold() first", details={"hold": hid})
            hold = _Hold(*row)
            self.s._holds[hid] = hold
        return hold

    def _record(self, provider: str) -> _Record:
        acct = self._account(provider, "provider account")
        if acct.role != "provider":
            raise InvalidRequestError(f"account {provider!r} is a {acct.role}, not a provider; trust records are "
                                      "kept for provider accounts", details={"account": provider})
        rec = self.s._records.get(provider)
        if rec is None:
            row = self._one(f"SELECT {RECORD_COLUMNS} FROM provider_records WHERE provider = {{p}}", provider)
            rec = _Record(provider) if row is None else _Record(*row)
            self.s._records[provider] = rec
            self.new_objects.append((self.s._records, provider))  # forgotten again if this write fails
            if row is None:
                self.new_records[provider] = rec
        if provider not in self.new_records:
            self.dirty_records[provider] = rec
        return rec

    def _move(self, kind: str, src: _Account | None, dst: _Account, amount: int, session: str, hold: str,
              key: str, memo: str = "") -> int:
        if src is not None:
            self._set(src, "balance", src.balance - amount)
            self.dirty_accounts[src.name] = src
        self._set(dst, "balance", dst.balance + amount)
        self.dirty_accounts[dst.name] = dst
        index = self.next_index
        prev = self.last_hash
        src_name = src.name if src is not None else ""
        h = entry_hash(prev, index, self.now, kind, src_name, dst.name, amount, session, hold, key, memo)
        self.entries.append((index, self.now, kind, src_name, dst.name, amount, session, hold, key, prev, h, memo))
        self.new_leaves.append(h)
        self.next_index = index + 1
        self.last_hash = h
        return index

    # -- operations --

    def apply(self, op: _Op) -> Any:
        if op.name == "batch":
            return self._batch(op)
        return self._apply_one(op.name, op.actor, op.params, op.key)

    def _batch(self, op: _Op) -> list[dict[str, Any]]:
        out = []
        for item in op.params["items"]:
            name = item["op"]
            params = {k: v for k, v in item.items() if k not in ("op", "key")}
            try:
                res = self._apply_one(name, op.actor, params, item.get("key"))
                out.append({"ok": True, **res})
            except CreditsRequestError as exc:
                out.append({"ok": False, "status": exc.status,
                            "error": {"code": exc.code, "message": str(exc), **exc.details}})
        return out

    def _apply_one(self, name: str, actor: str | None, params: dict[str, Any], key: str | None) -> Any:
        scope = None
        if key is not None:
            scope = f"{actor}/{key}"
            rh = request_hash(name, params)
            seen = self.idem_new.get(scope) or self.idem_found.get(scope)
            if seen is not None:
                if seen[0] != rh:
                    raise IdempotencyConflictError(
                        f"idempotency key {key!r} was already used by this account for a different request; "
                        "nothing was moved. Use a new key for a new request.",
                        details={"key": key})
                return json.loads(seen[1])
        handler = getattr(self, "_op_" + name)
        result = handler(actor, key or "", **params)
        if scope is not None:
            self.idem_new[scope] = (rh, json.dumps(result, separators=(",", ":")))
        return result

    def _op_create_account(self, actor: str | None, key: str, *, name: str, role: str) -> dict[str, Any]:
        if name in self.s._accounts:
            raise ConflictError(f"an account named {name!r} already exists; choose another name",
                                details={"account": name})
        token = new_token()
        acct = _Account(name, role, hash_token(token), 0)
        self.s._accounts[name] = acct
        self.new_objects.append((self.s._accounts, name))
        self.new_accounts.append(acct)
        self.s._tokens[acct.token_hash] = name
        self.token_changes.append((None, acct.token_hash, name))
        return {"account": name, "role": role, "token": token}

    def _op_rotate_token(self, actor: str | None, key: str, *, account: str) -> dict[str, Any]:
        acct = self._account(account)
        token = new_token()
        old = acct.token_hash
        self._set(acct, "token_hash", hash_token(token))
        if old:
            self.s._tokens.pop(old, None)
        self.s._tokens[acct.token_hash] = account
        self.token_changes.append((old, acct.token_hash, account))
        self.dirty_accounts[account] = acct
        return {"account": account, "token": token}

    def _op_mint(self, actor: str | None, key: str, *, account: str, amount: int) -> dict[str, Any]:
        acct = self._account(account)
        if acct.role == "system":
            raise InvalidRequestError(f"cannot mint into the {account!r} account; mint to a client or provider")
        if acct.balance + amount > MAX_BALANCE:
            raise InvalidRequestError(f"minting {amount} would take {account!r} past the largest balance, "
                                      f"{MAX_BALANCE}", details={"account": account, "balance": acct.balance})
        index = self._move("mint", None, acct, amount, "", "", key)
        return {"account": account, "amount": amount, "balance": acct.balance, "entry": index}

    def _op_open_session(self, actor: str | None, key: str, *, budget: int, notebook: str = "",
                         kernel: str = "") -> dict[str, Any]:
        sid = "s_" + uuid.uuid4().hex
        sess = _Session(sid, actor or "", notebook, kernel, budget, 0, 0, self.now)
        self.s._sessions[sid] = sess
        self.new_objects.append((self.s._sessions, sid))
        self.new_sessions.append(sess)
        return sess.usage()

    def _owner_or_operator(self, actor: str | None, sess: _Session, verb: str) -> None:
        if actor == sess.account:
            return
        role = self.s.role_of(actor or "")
        if role != "operator":
            raise ForbiddenError(
                f"account {actor!r} ({role}) may not {verb} session {sess.id!r}, which belongs to "
                f"{sess.account!r}; only its owner or an operator may",
                details={"session": sess.id})

    def _op_hold(self, actor: str | None, key: str, *, session: str, amount: int) -> dict[str, Any]:
        sess = self._session(session)
        self._owner_or_operator(actor, sess, "hold credits of")
        left = sess.budget - sess.held - sess.spent
        if amount > left:
            raise BudgetExceededError(
                f"budget exhausted: session {session} has budget {sess.budget}, spent {sess.spent}, "
                f"held {sess.held}, so {left} left; a hold of {amount} does not fit. Open a session with "
                "a larger budget or wait for running work to settle.",
                details={"session": session, "budget": sess.budget, "spent": sess.spent, "held": sess.held,
                         "left": left, "amount": amount})
        owner = self._account(sess.account)
        if amount > owner.balance:
            raise BudgetExceededError(
                f"insufficient balance: account {owner.name!r} has {owner.balance} credits, a hold of "
                f"{amount} needs more; ask the operator to mint credits to it.",
                details={"account": owner.name, "balance": owner.balance, "amount": amount})
        hid = "h_" + uuid.uuid4().hex
        index = self._move("hold", owner, self.s._accounts[ESCROW], amount, session, hid, key)
        hold = _Hold(hid, session, owner.name, amount, "held", "", 0, index, None)
        self.s._holds[hid] = hold
        self.new_objects.append((self.s._holds, hid))
        self.new_holds[hid] = hold
        self._set(sess, "held", sess.held + amount)
        self.dirty_sessions[session] = sess
        return {"hold": hid, "session": session, "amount": amount, "entry": index, "left": left - amount}

    def _open_hold(self, hid: str, verb: str) -> tuple[_Hold, _Session]:
        hold = self._hold(hid)
        if hold.state != "held":
            raise ConflictError(
                f"hold {hid} was already {hold.state} (entry {hold.closed_entry}); it cannot be {verb} again",
                details={"hold": hid, "state": hold.state})
        return hold, self._session(hold.session)

    def _provider(self, name: str) -> _Account:
        """The provider account ``name`` that a settlement pays (checked before anything moves)."""
        prov = self._account(name, "provider account")
        if prov.role != "provider":
            raise InvalidRequestError(f"account {name!r} is a {prov.role}, not a provider; settle pays providers",
                                      details={"account": name})
        return prov

    @staticmethod
    def _check_left(h: _Hold, amount: int, verb: str) -> int:
        """Refuse paying ``amount`` out of hold ``h`` beyond what is left of it; return what is left."""
        left = h.amount - h.paid
        if amount > left:
            if h.paid:
                why = (f": {h.paid} of it was already paid in parts, so {left} are left; pay at most the {left} "
                       "left (settle or release closes it)")
            else:
                why = f"; pay at most the amount held ({left})"
            raise InvalidRequestError(f"cannot {verb} {amount} from hold {h.id} of {h.amount}{why}",
                                      details={"hold": h.id, "held": h.amount, "paid": h.paid, "left": left,
                                               "amount": amount})
        return left

    def _pay(self, h: _Hold, sess: _Session, prov: _Account, amount: int, key: str, memo_text: str) -> int:
        """Pay ``amount`` (>= 1) of an open hold to a provider: one ``settle`` entry; the hold's
        ``paid`` and the session's ``spent`` grow by it, the session's ``held`` shrinks by it."""
        index = self._move("settle", self.s._accounts[ESCROW], prov, amount, sess.id, h.id, key, memo_text)
        self._set(h, "paid", h.paid + amount)
        self._set(h, "provider", prov.name)
        # Until the hold closes, ``closed_entry`` names its latest payout, so a hold paid in full
        # by parts and then closed (no release entry) still names its last entry.
        self._set(h, "closed_entry", index)
        if h.id not in self.new_holds:
            self.dirty_holds[h.id] = h
        self._set(sess, "held", sess.held - amount)
        self._set(sess, "spent", sess.spent + amount)
        self.dirty_sessions[sess.id] = sess
        return index

    def _close(self, h: _Hold, sess: _Session, state: str, key: str, memo_text: str = "") -> list[int]:
        """Close an open hold in ``state``: release what is left of it (amount - paid) to its client
        with one ``release`` entry (none when nothing is left). Returns that entry's index, if any."""
        rest = h.amount - h.paid
        entries = []
        if rest:
            entries.append(self._move("release", self.s._accounts[ESCROW], self._account(h.account), rest,
                                      sess.id, h.id, key, memo_text))
            self._set(h, "closed_entry", entries[0])
            self._set(sess, "held", sess.held - rest)
            self.dirty_sessions[sess.id] = sess
        self._set(h, "state", state)
        if h.id not in self.new_holds:
            self.dirty_holds[h.id] = h
        self.closed_holds.append(h.id)
        return entries

    def _op_settle_part(self, actor: str | None, key: str, *, hold: str, provider: str, amount: int,
                        memo: dict[str, Any] | None = None) -> dict[str, Any]:
        memo_text = canonical_memo(memo)
        h, sess = self._open_hold(hold, "paid from")
        prov = self._provider(provider)
        self._check_left(h, amount, "pay a part of")
        index = self._pay(h, sess, prov, amount, key, memo_text)
        return {"hold": hold, "session": sess.id, "provider": provider, "paid": amount, "total_paid": h.paid,
                "left": h.amount - h.paid, "entries": [index]}

    def _op_settle(self, actor: str | None, key: str, *, hold: str, provider: str, amount: int,
                   memo: dict[str, Any] | None = None) -> dict[str, Any]:
        memo_text = canonical_memo(memo)
        h, sess = self._open_hold(hold, "settled")
        prov = self._provider(provider)
        left = self._check_left(h, amount, "settle")
        entries = [self._pay(h, sess, prov, amount, key, memo_text)] if amount else []
        # A settlement that pays nothing writes only the release: the memo goes on it.
        entries += self._close(h, sess, "settled", key, "" if amount else memo_text)
        if not amount:
            self._set(h, "provider", provider)
        return {"hold": hold, "session": sess.id, "provider": provider, "paid": amount, "released": left - amount,
                "total_paid": h.paid, "entries": entries}

    def _op_release(self, actor: str | None, key: str, *, hold: str) -> dict[str, Any]:
        h, sess = self._open_hold(hold, "released")
        rest = h.amount - h.paid
        # A hold paid in parts ends settled, whoever closes it.
        entries = self._close(h, sess, "settled" if h.paid else "released", key)
        return {"hold": hold, "session": sess.id, "released": rest, "total_paid": h.paid, "entries": entries}

    def _op_record_verification(self, actor: str | None, key: str, *, provider: str,
                                agreed: bool) -> dict[str, Any]:
        rec = self._record(provider)
        if agreed:
            self._set(rec, "valid", rec.valid + 1)
            self._set(rec, "consecutive_valid", rec.consecutive_valid + 1)
        else:
            self._set(rec, "mismatches", rec.mismatches + 1)
            self._set(rec, "consecutive_valid", 0)
        if not rec.quarantined:
            reason = quarantine_reason(rec.valid, rec.mismatches, self.s.reputation_floor)
            if reason:
                self._set(rec, "quarantined", True)
                self._set(rec, "quarantine_reason", reason)
                logger.warning("provider %s is quarantined: %s", provider, reason)
        self._set(rec, "updated", self.now)
        return rec.to_json()

    def _op_clear_quarantine(self, actor: str | None, key: str, *, provider: str) -> dict[str, Any]:
        rec = self._record(provider)
        self._set(rec, "quarantined", False)
        self._set(rec, "quarantine_reason", "")
        self._set(rec, "mismatches", 0)
        self._set(rec, "consecutive_valid", 0)
        self._set(rec, "updated", self.now)
        logger.info("the quarantine of provider %s was cleared by %s", provider, actor)
        return rec.to_json()

    def _op_sign_head(self, actor: str | None, key: str) -> dict[str, Any]:
        size = self.next_index
        with self.s._tree_lock:
            tree = self.s.tree
            if tree.size != size:
                # Entries of this very group are not in the tree yet: sign the committed size.
                size = tree.size
            root = tree.root(size)
        head = sign_head(self.s.signing_key, size, root, self.now)
        if size > self.s._last_head_size and not any(h["size"] == size for h in self.heads):
            self.heads.append(head)
        return head

    # -- writing it out --

    def flush(self) -> None:
        if not (self.dirty_accounts or self.new_accounts or self.new_sessions or self.entries or self.heads
                or self.dirty_sessions or self.idem_new or self.new_records or self.dirty_records):
            return
        p = self.s._p
        cur = self.s._write_conn.cursor()

        def many(sql: str, rows: list) -> None:
            if rows:
                cur.executemany(sql.format(p=p), rows)

        new_names = {a.name for a in self.new_accounts}
        many("INSERT INTO accounts (name, role, token_hash, balance, created) VALUES ({p}, {p}, {p}, {p}, {p})",
             [(a.name, a.role, a.token_hash, a.balance, self.now) for a in self.new_accounts])
        many("UPDATE accounts SET balance = {p}, token_hash = {p} WHERE name = {p}",
             [(a.balance, a.token_hash, a.name) for n, a in self.dirty_accounts.items() if n not in new_names])
        many("INSERT INTO sessions (id, account, notebook, kernel, budget, held, spent, created) "
             "VALUES ({p}, {p}, {p}, {p}, {p}, {p}, {p}, {p})",
             [(x.id, x.account, x.notebook, x.kernel, x.budget, x.held, x.spent, x.created)
              for x in self.new_sessions])
        new_sids = {x.id for x in self.new_sessions}
        many("UPDATE sessions SET held = {p}, spent = {p} WHERE id = {p}",
             [(x.held, x.spent, x.id) for sid, x in self.dirty_sessions.items() if sid not in new_sids])
        many("INSERT INTO holds (id, session, account, amount, state, provider, paid, entry, closed_entry) "
             "VALUES ({p}, {p}, {p}, {p}, {p}, {p}, {p}, {p}, {p})",
             [(h.id, h.session, h.account, h.amount, h.state, h.provider, h.paid, h.entry, h.closed_entry)
              for h in self.new_holds.values()])
        many("UPDATE holds SET state = {p}, paid = {p}, provider = {p}, closed_entry = {p} WHERE id = {p}",
             [(h.state, h.paid, h.provider, h.closed_entry, h.id) for h in self.dirty_holds.values()])
        many(f"INSERT INTO entries ({ENTRY_COLUMNS}) VALUES ({{p}}, {{p}}, {{p}}, {{p}}, {{p}}, {{p}}, {{p}}, "
             "{p}, {p}, {p}, {p}, {p})", self.entries)
        many(f"INSERT INTO provider_records ({RECORD_COLUMNS}) "
             "VALUES ({p}, {p}, {p}, {p}, {p}, {p}, {p})",
             [(r.provider, r.consecutive_valid, r.valid, r.mismatches, r.quarantined, r.quarantine_reason,
               r.updated) for r in self.new_records.values()])
        many("UPDATE provider_records SET consecutive_valid = {p}, valid = {p}, mismatches = {p}, quarantined = {p}, "
             "quarantine_reason = {p}, updated = {p} WHERE provider = {p}",
             [(r.consecutive_valid, r.valid, r.mismatches, r.quarantined, r.quarantine_reason, r.updated,
               r.provider) for r in self.dirty_records.values()])
        many("INSERT INTO idempotency (scope, request_hash, response) VALUES ({p}, {p}, {p})",
             [(scope, rh, resp) for scope, (rh, resp) in self.idem_new.items()])
        many("INSERT INTO heads (size, root, timestamp, signature, public_key) VALUES ({p}, {p}, {p}, {p}, {p})",
             [(h["size"], h["root"], h["timestamp"], h["signature"], h["public_key"]) for h in self.heads])
        cur.close()

    def committed(self) -> None:
        """After the commit: the store takes the new chain position; readers see the new values."""
        self.s._publish(list(self.new_sessions) + list(self.dirty_sessions.values()),
                        list(self.new_accounts) + list(self.dirty_accounts.values()))
        self.s._next_index = self.next_index
        self.s._last_hash = self.last_hash
        if self.heads:
            self.s._last_head_size = max(self.s._last_head_size, *(h["size"] for h in self.heads))

    def evict(self) -> None:
        """Forget closed holds after commit so memory holds only open ones."""
        for hid in self.closed_holds:
            self.s._holds.pop(hid, None)


def read_heads(engine: sa.Engine) -> list[dict[str, Any]]:
    """Return every signed tree head stored in a credit database, oldest first."""
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(
            "SELECT size, root, timestamp, signature, public_key FROM heads ORDER BY size").all()
    return [{"size": r[0], "root": r[1], "timestamp": r[2], "signature": r[3], "public_key": r[4],
             "key_id": hashlib.sha256(bytes.fromhex(r[4])).hexdigest()[:16]} for r in rows]


def read_open_holds(engine: sa.Engine, *, older_than: float | None = None, account: str | None = None,
                    now: _dt.datetime | None = None) -> list[dict[str, Any]]:
    """Return the holds of a credit database still ``held`` (neither settled nor released), oldest first.

    ``older_than`` keeps only those placed at least that many seconds before ``now`` (an aware
    datetime; default: the current time), ``account`` only those of that client account. Each is
    ``{"hold", "session", "account", "amount", "paid", "left", "created", "age"}``: ``paid`` is what
    parts (``settle_part``) paid from it so far, ``left`` what a release would give back,
    ``created`` the time of its ledger ``hold`` entry and ``age`` the seconds since then at ``now``.
    """
    import sqlalchemy as sa

    now = now or _dt.datetime.now(_dt.timezone.utc)
    sql = ("SELECT h.id, h.session, h.account, h.amount, h.paid, e.time FROM holds h "
           "JOIN entries e ON e.idx = h.entry WHERE h.state = 'held'")
    params: dict[str, Any] = {}
    if account is not None:
        sql += " AND h.account = :account"
        params["account"] = account
    with engine.connect() as conn:
        rows = conn.execute(sa.text(sql + " ORDER BY h.entry"), params).all()
    out = []
    # Open holds are the work in flight, few: their age is compared here, not in SQL, where
    # PostgreSQL would order the time strings by the database's collation.
    for hid, sid, owner, amount, paid, created in rows:
        age = (now - parse_time(created)).total_seconds()
        if older_than is None or age >= older_than:
            out.append({"hold": hid, "session": sid, "account": owner, "amount": amount, "paid": paid,
                        "left": amount - paid, "created": created, "age": round(age, 3)})
    return out
