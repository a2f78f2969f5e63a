"""The credit database: where it is, its schema (written once), engines, the writer's lock and reads.

SQLAlchemy Core over SQLite (a file, WAL, ``synchronous=FULL``) or PostgreSQL
(``postgresql://`` URLs, through psycopg 3). The tables below are the only
definition of the schema: :func:`create_schema` creates them and gives a database
made by an earlier version the columns it lacks. Invariants hold again here by
``CHECK`` constraints: no balance below zero, no session holding or spending
beyond its budget, no hold paying out more than it holds.

The writer (:mod:`gpunet.credits._writer`) speaks plain DB-API through a
:class:`WriteConnection`: prepared SQL strings and ``executemany``, no statement
compilation per group. Readers use the engine's own pooled connections and see
committed rows only. Nothing here knows a rule of the bank.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import functools
import hashlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpunet.errors import CreditsError, CreditsUnavailableError
from gpunet.paths import data_dir

if TYPE_CHECKING:  # pragma: no cover
    import sqlalchemy as sa

logger = logging.getLogger(__name__)

_PG_LOCK_KEY = 0x67706E6574  # "gpnet": the advisory lock of the one writing service
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


def redact(url: str) -> str:
    """Return a database URL fit for messages: its password hidden."""
    import sqlalchemy as sa

    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - only for messages
        return url


# -- the schema, once -------------------------------------------------------------------

# The columns of a ledger entry in the order the ledger reads them (see gpunet.credits._ledger); a
# plain string so that the audit's workers read SQLite files without loading SQLAlchemy.
ENTRY_COLUMNS = "idx, time, kind, src, dst, amount, session, hold, key, prev, hash, memo"


#: The tables SQLite stores otherwise than a database made by an earlier version did (an entry's
#: index is the entries table's rowid now, not a column with an index of its own beside the table);
#: :func:`create_schema` rebuilds those still in the old form.
_REBUILT_ON_SQLITE = ("entries",)


@functools.cache
def metadata() -> sa.MetaData:
    """Return the schema: every table of the credit database (its only definition)."""
    import sqlalchemy as sa

    # An entry's index: on SQLite the table's rowid (declared INTEGER), with no index of its own.
    entry_index = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
    md = sa.MetaData()
    sa.Table("meta", md, sa.Column("key", sa.Text, primary_key=True), sa.Column("value", sa.Text))
    sa.Table(
        "accounts", md,
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("role", sa.Text, nullable=False),
        sa.Column("token_hash", sa.Text, unique=True),
        sa.Column("balance", sa.BigInteger, nullable=False),
        sa.Column("created", sa.Text, nullable=False),
        sa.CheckConstraint("balance >= 0", name="balance_not_negative"),
    )
    sa.Table(
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
    sa.Table(
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
        # The meter account (an open network's scheduler) that may pay and close the hold, named by
        # its client when placing it; "" where only an operator may.
        sa.Column("meter", sa.Text, nullable=False, server_default=""),
        # The provider whose verified result this hold's verdict recorded ("" before one).
        sa.Column("verified", sa.Text, nullable=False, server_default=""),
        sa.CheckConstraint("amount > 0 AND paid >= 0 AND paid <= amount", name="hold_amounts"),
    )
    sa.Table(
        "entries", md,
        sa.Column("idx", entry_index, primary_key=True, autoincrement=False),
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
        # A settlement's memo: canonical JSON text, '' for none (see gpunet.credits._ledger). Added
        # after the first release: create_schema gives older databases the column.
        sa.Column("memo", sa.Text, nullable=False, server_default=""),
        sa.Index("entries_by_session", "session"),
    )
    sa.Table(
        "idempotency", md,
        sa.Column("scope", sa.Text, primary_key=True),
        sa.Column("request_hash", sa.Text, nullable=False),
        sa.Column("response", sa.Text, nullable=False),
    )
    sa.Table(
        "heads", md,
        sa.Column("size", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("root", sa.Text, nullable=False),
        sa.Column("timestamp", sa.Text, nullable=False),
        sa.Column("signature", sa.Text, nullable=False),
        sa.Column("public_key", sa.Text, nullable=False),
    )
    sa.Table(
        "provider_records", md,
        sa.Column("provider", sa.Text, primary_key=True),
        sa.Column("consecutive_valid", sa.BigInteger, nullable=False),
        sa.Column("valid", sa.BigInteger, nullable=False),
        sa.Column("mismatches", sa.BigInteger, nullable=False),
        sa.Column("quarantined", sa.Boolean, nullable=False),
        sa.Column("quarantine_reason", sa.Text, nullable=False),
        sa.Column("updated", sa.Text, nullable=False),
    )
    assert ", ".join(md.tables["entries"].columns.keys()) == ENTRY_COLUMNS
    return md


def get_table(name: str) -> sa.Table:
    """Return the table ``name`` of the schema."""
    return metadata().tables[name]


def columns(name: str) -> tuple[str, ...]:
    """Return the column names of table ``name`` in their order."""
    return tuple(get_table(name).columns.keys())


def create_schema(engine: sa.Engine) -> None:
    """Create the tables missing, and give tables made by an earlier version the columns they lack
    (existing rows take the column's default)."""
    import sqlalchemy as sa

    metadata().create_all(engine)
    inspector = sa.inspect(engine)
    for t in metadata().sorted_tables:
        have = {c["name"] for c in inspector.get_columns(t.name)}
        for column in t.columns:
            if column.name not in have:
                ddl = sa.schema.CreateColumn(column).compile(dialect=engine.dialect)
                with engine.begin() as conn:
                    conn.exec_driver_sql(f"ALTER TABLE {t.name} ADD COLUMN {ddl}")
                logger.info("added the column %s.%s to the credit database", t.name, column.name)
    if engine.url.get_backend_name() == "sqlite":
        for name in _REBUILT_ON_SQLITE:
            _rebuild_if_old(engine, get_table(name))


def _rebuild_if_old(engine: sa.Engine, table: sa.Table) -> None:
    """Store an SQLite table of a database made by an earlier version in its current form (its primary
    key the rowid, no index of its own), its rows copied unchanged, in one transaction: a crash or
    a refusal leaves the old table as it was."""
    import sqlalchemy as sa

    with engine.connect() as conn:
        old_form = conn.exec_driver_sql(
            "SELECT count(*) FROM sqlite_master WHERE type = 'index' AND tbl_name = ? AND name LIKE 'sqlite_autoindex_%'",
            (table.name,)).scalar()
    if not old_form:
        return
    names = ", ".join(f'"{c}"' for c in table.columns.keys())
    old = f"{table.name}_before_rebuild"
    steps = [f"ALTER TABLE {table.name} RENAME TO {old}",
             # The indexes went with the old table; they are made again on the new one.
             *(f"DROP INDEX IF EXISTS {index.name}" for index in table.indexes),
             str(sa.schema.CreateTable(table).compile(dialect=engine.dialect)),
             *(str(sa.schema.CreateIndex(index).compile(dialect=engine.dialect)) for index in table.indexes),
             f"INSERT INTO {table.name} ({names}) SELECT {names} FROM {old}",
             f"DROP TABLE {old}"]
    raw = engine.raw_connection()
    sqlite = raw.driver_connection
    # The sqlite3 module would commit each DDL statement by itself: one explicit transaction instead.
    isolation, sqlite.isolation_level = sqlite.isolation_level, None
    try:
        sqlite.execute("BEGIN IMMEDIATE")
        count = sqlite.execute(f"SELECT count(*) FROM {table.name}").fetchone()[0]
        for sql in steps:
            sqlite.execute(sql)
        sqlite.execute("COMMIT")
    except Exception as exc:  # noqa: BLE001 - any refusal, said once
        if sqlite.in_transaction:
            sqlite.execute("ROLLBACK")
        raise CreditsUnavailableError(
            f"the credit database's {table.name} table could not be stored in this version's form "
            f"({exc.__class__.__name__}: {str(exc).splitlines()[0]}); nothing was changed. Check the ledger with "
            "`gpunet ledger verify --db FILE`, or run the version that made this database.",
            url=redact(str(engine.url))) from exc
    finally:
        sqlite.isolation_level = isolation
        raw.close()
    logger.warning("stored the %s table of the credit database in this version's form (%d rows copied as they were)",
                   table.name, count)


# -- engines ----------------------------------------------------------------------------


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
            f"cannot open the credit database {redact(url)}: {exc.__class__.__name__}: "
            f"{str(exc).splitlines()[0]}. Check the URL, that the server runs and the user may connect.",
            url=redact(url),
        ) from exc
    return engine


# -- the one writer's connection and lock -----------------------------------------------


class WriteConnection:
    """The writer's own DB-API connection, with the statements it needs built from the tables."""

    def __init__(self, engine: sa.Engine, url: str) -> None:
        self.url = url
        self.raw = engine.raw_connection()
        self.p = "?" if url.startswith("sqlite") else "%s"
        self._lock_file: Any = None

    def take_lock(self) -> None:
        """Make sure this is the only service writing to the database (the writer keeps its state
        in memory): a file lock beside an SQLite file, an advisory lock on PostgreSQL."""
        path = sqlite_path(self.url)
        if path is not None:
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
        cur = self.raw.cursor()
        cur.execute("SELECT pg_try_advisory_lock(%s)", (_PG_LOCK_KEY,))
        (got,) = cur.fetchone()
        cur.close()
        self.raw.commit()
        if not got:
            raise CreditsUnavailableError(
                f"another credit service already writes to {redact(self.url)} (it holds the advisory lock "
                f"{_PG_LOCK_KEY}); stop it first, or talk to it instead of starting a second one",
                url=redact(self.url))

    def close(self) -> None:
        """Close the connection and let another service take the writer's lock."""
        self.raw.close()
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def row(self, table: str, key: Any) -> tuple | None:
        """Return the row of ``table`` whose primary key is ``key`` (all columns), or None."""
        rows = self.rows_in(table, [key])
        return rows[0] if rows else None

    def rows_in(self, table: str, keys: list[Any]) -> list[tuple]:
        """Return the rows of ``table`` whose primary key is one of ``keys``."""
        key = get_table(table).primary_key.columns[0].name
        out: list[tuple] = []
        cur = self.raw.cursor()
        for i in range(0, len(keys), 500):
            chunk = keys[i : i + 500]
            cur.execute(f"SELECT {', '.join(columns(table))} FROM {table} WHERE {key} IN "
                        f"({', '.join([self.p] * len(chunk))})", chunk)
            out.extend(tuple(r) for r in cur.fetchall())
        cur.close()
        return out

    def insert(self, table: str, rows: list[tuple]) -> None:
        """Insert ``rows``, each the values of every column of ``table`` in order."""
        if rows:
            names = columns(table)
            self._many(f"INSERT INTO {table} ({', '.join(names)}) VALUES ({', '.join([self.p] * len(names))})",
                       rows)

    def update(self, table: str, names: tuple[str, ...], rows: list[tuple]) -> None:
        """Update columns ``names`` of ``table``; each row is their values, then the primary key."""
        if rows:
            key = get_table(table).primary_key.columns[0].name
            self._many(f"UPDATE {table} SET {', '.join(f'{n} = {self.p}' for n in names)} WHERE {key} = {self.p}",
                       rows)

    def _many(self, sql: str, rows: list[tuple]) -> None:
        cur = self.raw.cursor()
        cur.executemany(sql, rows)
        cur.close()


# -- reads ------------------------------------------------------------------------------


def insert_row(engine: sa.Engine, table: str, **values: Any) -> None:
    """Insert one row in a transaction of its own (before the writer runs: setup only)."""
    with engine.begin() as conn:
        conn.execute(get_table(table).insert().values(**values))


def read_setup(engine: sa.Engine) -> tuple[list[tuple], list[bytes], int | None, str | None]:
    """Return what a starting writer loads: every account's row, every entry's hash in order,
    the size of the largest signed head (None: none yet) and the recorded public key."""
    import sqlalchemy as sa

    a, meta = get_table("accounts"), get_table("meta")
    with engine.connect() as conn:
        accounts = [tuple(r) for r in conn.execute(sa.select(a))]
        hashes = [bytes(h) for (h,) in conn.exec_driver_sql("SELECT hash FROM entries ORDER BY idx")]
        last_head = conn.exec_driver_sql("SELECT max(size) FROM heads").scalar()
        public_key = conn.execute(sa.select(meta.c.value).where(meta.c.key == "public_key")).scalar()
    return accounts, hashes, last_head, public_key


def read_accounts(engine: sa.Engine, name: str | None = None) -> list[dict[str, Any]]:
    """Return every account (or only ``name``) with its committed role and balance, by name."""
    import sqlalchemy as sa

    a = get_table("accounts")
    query = sa.select(a.c["name", "role", "balance"]).order_by(a.c.name)
    if name is not None:
        query = query.where(a.c.name == name)
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    return [{"account": r[0], "role": r[1], "balance": r[2]} for r in rows]


def read_session(engine: sa.Engine, sid: str) -> tuple | None:
    """Return a session's committed row (every column), or None."""
    import sqlalchemy as sa

    s = get_table("sessions")
    with engine.connect() as conn:
        row = conn.execute(sa.select(s).where(s.c.id == sid)).first()
    return None if row is None else tuple(row)


def read_entries(engine: sa.Engine, start: int, end: int, session: str | None = None) -> list[tuple]:
    """Return stored entry rows with ``start <= index < end`` in order (only ``session``'s if given)."""
    p = "?" if engine.url.get_backend_name() == "sqlite" else "%s"
    sql = f"SELECT {ENTRY_COLUMNS} FROM entries WHERE idx >= {p} AND idx < {p}"
    params: tuple = (start, end)
    if session is not None:
        sql += f" AND session = {p}"
        params += (session,)
    with engine.connect() as conn:
        return [tuple(r) for r in conn.exec_driver_sql(sql + " ORDER BY idx", params)]


def read_settlements_to(engine: sa.Engine, provider: str) -> list[tuple]:
    """Return ``(index, time, amount, memo)`` of every settlement paid to ``provider``, in order."""
    p = "?" if engine.url.get_backend_name() == "sqlite" else "%s"
    sql = f"SELECT idx, time, amount, memo FROM entries WHERE kind = 'settle' AND dst = {p} ORDER BY idx"
    with engine.connect() as conn:
        return [tuple(r) for r in conn.exec_driver_sql(sql, (provider,))]


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


def read_provider_rows(engine: sa.Engine, name: str | None) -> list[tuple]:
    """Return ``(name, role, *record columns but the provider)`` for account ``name`` or, with None,
    every provider account by name; the record columns are all None where there is no record yet."""
    import sqlalchemy as sa

    a, r = get_table("accounts"), get_table("provider_records")
    query = sa.select(a.c.name, a.c.role, *list(r.columns)[1:]).select_from(
        a.outerjoin(r, r.c.provider == a.c.name))
    query = query.where(a.c.name == name) if name is not None else query.where(a.c.role == "provider").order_by(
        a.c.name)
    with engine.connect() as conn:
        return [tuple(row) for row in conn.execute(query)]
