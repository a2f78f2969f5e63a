"""The credit store: the three rooms of the credit service wired together, as the service sees them.

* :mod:`gpunet.credits._db`: the database (schema, engines, the writer's lock, reads);
* :mod:`gpunet.credits._writer`: the one writer, group-committing what it is given;
* :mod:`gpunet.credits._book`: the bank (its objects, rules and operations).

Requests become :class:`Request`\\ s submitted to the writer, which applies them to a
unit of the book and answers them after their transaction commits. Readers use
their own pooled connections, or the committed values the book keeps in memory.
"""

from __future__ import annotations

import functools
import logging
from concurrent.futures import Future
from typing import Any

from gpunet.credits import _db
from gpunet.credits._book import OPERATOR, Account, Book, Record, Request, Session, hash_token, new_token
from gpunet.errors import CreditsError, NotFoundError
from gpunet.credits._ledger import ESCROW
from gpunet.credits._trust import MISMATCHES_PER_CLIENT_DAY, REPUTATION_FLOOR
from gpunet.credits._witness import Witness
from gpunet.credits._writer import Writer

logger = logging.getLogger(__name__)


class CreditStore:
    """The credit database, its single writer and the bank's book.

    ``submit(name, actor, params, key)`` queues an operation and returns a
    ``concurrent.futures.Future`` answered after its transaction commits.
    """

    def __init__(self, url: str, *, signing_key: Any = None, reputation_floor: float = REPUTATION_FLOOR,
                 memory: Witness | None = None, mismatches_per_client_day: int = MISMATCHES_PER_CLIENT_DAY) -> None:
        self.url = url
        #: the heads this service signed, kept beside its key, outside the database (see check_memory)
        self.memory = memory
        self.engine = _db.open_engine(url)
        conn = _db.WriteConnection(self.engine, url)
        try:
            conn.take_lock()
            _db.create_schema(self.engine)
        except BaseException:
            conn.close()
            self.engine.dispose()
            raise
        accounts, hashes, last_head, self.public_key_hex = _db.read_setup(self.engine)
        self.book = Book(conn, accounts, hashes, last_head, signing_key=signing_key,
                         reputation_floor=reputation_floor, mismatches_per_client_day=mismatches_per_client_day)
        if ESCROW not in self.book.accounts:
            self._add_account(ESCROW, "system", None)
        self.writer = Writer(conn.raw, self.book.begin)  # it commits and rolls back the DB-API connection
        self._closed = False
        logger.info("credit store %s: %d accounts, %d ledger entries", _db.redact(url), len(accounts),
                    self.size)

    # -- setup (before the writer runs, or through it) --

    def _add_account(self, name: str, role: str, token_hash: str | None) -> None:
        acct = Account(name, role, token_hash, 0, _db.utcnow())
        _db.insert_row(self.engine, "accounts", name=name, role=role, token_hash=token_hash, balance=0,
                       created=acct.created)
        self.book.add_account(acct)

    def bind_public_key(self, public_key_hex: str) -> None:
        """Record the signing key in the database on first start; refuse a different key later."""
        if self.public_key_hex is None:
            _db.insert_row(self.engine, "meta", key="public_key", value=public_key_hex)
            self.public_key_hex = public_key_hex
        elif self.public_key_hex != public_key_hex:
            raise CreditsError(
                f"the signing key given (public key {public_key_hex}) is not the one this ledger's heads "
                f"were signed with ({self.public_key_hex}); start the service with the original key file"
            )

    def ensure_operator(self) -> str | None:
        """Create the operator account if missing; return its new token, or None if it existed."""
        if OPERATOR in self.book.accounts:
            return None
        token = new_token()
        self._add_account(OPERATOR, "operator", hash_token(token))
        logger.info("created the operator account")
        return token

    # -- reads from memory --

    def authenticate(self, token: str) -> tuple[str, str] | None:
        """Return ``(account, role)`` for a bearer token, or None if unknown."""
        name = self.book.tokens.get(hash_token(token))
        role = None if name is None else self.book.role_of(name)
        return None if role is None else (name, role)

    def cached_account(self, name: str) -> dict[str, Any] | None:
        """Return an account's committed balance from memory, or None if unknown."""
        bal = self.book.committed_balances.get(name)
        role = self.book.role_of(name)
        if bal is None or role is None:
            return None
        return {"account": name, "role": role, "balance": bal}

    def cached_session(self, sid: str) -> dict[str, Any] | None:
        """Return a session's committed usage from memory, or None if not cached (read the database)."""
        row = self.book.committed_sessions.get(sid)
        return None if row is None else Session(*row).usage()

    def proof_inclusion(self, index: int, size: int | None) -> tuple[int, list[bytes], bytes]:
        """Return ``(size, audit path, leaf hash)`` for entry ``index`` at ``size`` (default: now)."""
        with self.book.tree_lock:
            tree = self.book.tree
            size = tree.size if size is None else size
            return size, tree.inclusion_proof(index, size), tree.leaf(index) if index < size else b""

    def proof_consistency(self, first: int, second: int | None) -> tuple[int, list[bytes], bytes, bytes]:
        """Return ``(second, proof, first root, second root)``."""
        with self.book.tree_lock:
            tree = self.book.tree
            second = tree.size if second is None else second
            return second, tree.consistency_proof(first, second), tree.root(first), tree.root(second)

    @property
    def size(self) -> int:
        """The number of committed ledger entries."""
        return self.book.tree.size

    # -- reads from the database (committed rows) --

    def __getattr__(self, name: str) -> Any:
        """``read_X(...)``, unless defined below, is :func:`_db.read_X` on this store's engine."""
        if name.startswith("read_") and hasattr(_db, name):
            return functools.partial(getattr(_db, name), self.engine)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def read_session(self, sid: str) -> dict[str, Any] | None:
        """Return a session's committed usage, or None."""
        row = _db.read_session(self.engine, sid)
        return None if row is None else Session(*row).usage()

    def read_provider_record(self, name: str) -> dict[str, Any]:
        """Return provider ``name``'s committed trust record (defaults when it has none yet).

        Raises :class:`NotFoundError` when there is no such account or it is not a provider.
        """
        rows = _db.read_provider_rows(self.engine, name)
        if not rows:
            raise NotFoundError(f"no account named {name!r}; trust records are kept for provider accounts",
                                details={"account": name})
        name, role, *fields = rows[0]
        if role != "provider":
            raise NotFoundError(f"account {name!r} is a {role}, not a provider; trust records are kept for "
                                "provider accounts", details={"account": name})
        return _record_json(name, fields)

    def read_provider_records(self) -> list[dict[str, Any]]:
        """Return the committed trust record of every provider account, by name."""
        return [_record_json(name, fields) for name, _, *fields in _db.read_provider_rows(self.engine, None)]

    # -- writing --

    def submit(self, name: str, actor: str | None, params: dict[str, Any], key: str | None = None) -> Future:
        """Queue an operation for the writer; the future is answered after its commit."""
        return self.writer.submit(Request(name, actor, params, key))

    def call(self, name: str, actor: str | None, params: dict[str, Any], key: str | None = None,
             timeout: float = 60) -> Any:
        """Run one operation and wait for its answer (raises its error)."""
        return self.submit(name, actor, params, key).result(timeout)

    def check_memory(self) -> None:
        """Check the database against the heads this service signed before (its memory, kept
        outside the database): entries rewritten or removed since then, or entries added while
        it was stopped after a clean stop, raise :class:`LedgerForkError`, and the service does
        not start on them."""
        if self.memory is None or self.public_key_hex is None:
            return
        tree = self.book.tree
        why = ("The database was changed behind the service's back (by someone who can write to it), so the "
               "service does not start on it. Restore it from a backup taken before; if you restored an older "
               f"backup on purpose, move the folder {self.memory.root} away to start anyway (readers who saw the "
               "later heads will report a fork)")
        what = f"the credit database {_db.redact(self.url)}"
        self.memory.check_ledger(self.public_key_hex, lambda sizes: {s: tree.root(s) for s in sizes}, tree.size,
                                 what=what, why=why)
        running = self.memory.root / "running"
        log = self.memory.load(self.public_key_hex)
        top = log.top
        if top is not None and tree.size > top["size"] and not running.exists():
            # It stopped cleanly after signing a head of every entry: nobody else writes here.
            log.fork(f"{what} holds {tree.size} entries, but the service stopped cleanly after signing a head of "
                     f"{top['size']}: entries {top['size']}..{tree.size - 1} were added while it was stopped",
                     top, {"size": tree.size}, why)
        if top is not None and tree.size > top["size"]:
            logger.warning("entries %d..%d of %s were written after the last head this service remembers (it did "
                           "not stop cleanly); they are taken as its own", top["size"], tree.size - 1, what)
        running.parent.mkdir(parents=True, exist_ok=True)
        running.touch()

    def close(self, *, sign: bool = True) -> None:
        """Finish queued operations, sign a last head (unless ``sign`` is false) and remember it,
        stop the writer and close connections."""
        if self._closed:
            return
        if self.book.signing_key is not None and sign:
            try:
                head = self.call("sign_head", None, {}, None, timeout=30)
                if self.memory is not None:
                    self.memory.observe(head, proofs=self.book.tree.consistency_proof, latest=True)
                    (self.memory.root / "running").unlink(missing_ok=True)  # a clean stop
            except Exception:  # noqa: BLE001 - closing anyway
                logger.exception("could not sign (or remember) the last tree head on close")
        self._closed = True
        self.writer.close()
        self.book.conn.close()
        self.engine.dispose()


def _record_json(name: str, fields: list[Any]) -> dict[str, Any]:
    """The JSON form of a trust record read with ``LEFT JOIN`` (all ``None``: no record yet)."""
    if fields[0] is None:
        return Record(name).to_json()
    return Record(name, *fields).to_json()
