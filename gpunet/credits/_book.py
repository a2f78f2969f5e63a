"""The bank: its objects, its rules and the table of its operations.

The :class:`Book` is the writer's in-memory state: accounts, open sessions and open
holds, providers' trust records and the position of the ledger's chain. The
writer is the only one to change them, so its copy is the truth; readers see the
committed values it publishes after each commit. Every operation of the bank is
named in :data:`OPERATIONS` with the roles that may ask for it and runs as a
method of a :class:`Unit`, the changes of one transaction: checks first, then
changes, so a refused operation changes nothing; each change goes through an undo
log that rolls the objects back if the transaction fails. A request with an
idempotency key is answered once: its retry gets the stored answer, the same key
with another request an :class:`IdempotencyConflictError`.

Credits only move between accounts (held credits sit in the ``escrow`` account), so
the total changes only by minting; no balance goes below zero and no session holds
or spends beyond its budget. A hold is closed once, by ``settle`` or ``release``,
and may before that be paid out in parts (``settle_part``) to any number of
providers: each part is one ``settle`` entry, grows the hold's ``paid`` (never
beyond its ``amount``) and moves the part from the session's ``held`` to its
``spent`` at once. Closing releases what is left; a hold that paid anything ends
``settled``, one that paid nothing ``released``.

Providers' trust records (see :mod:`gpunet.credits._trust`) go through the same
writer; they move no credits, so they write no ledger entries.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, Callable

from gpunet.credits._db import WriteConnection, columns, utcnow
from gpunet.errors import (
    BudgetExceededError,
    ConflictError,
    CreditsRequestError,
    ForbiddenError,
    IdempotencyConflictError,
    InvalidRequestError,
    NotFoundError,
)
from gpunet.credits._ledger import ESCROW, ZERO_HASH, canonical_memo, entry_hash
from gpunet.credits._ledger import sign_head as sign_tree_head
from gpunet.credits._merkle import MerkleTree
from gpunet.credits._trust import (
    MISMATCHES_PER_CLIENT_DAY,
    REPUTATION_FLOOR,
    counts_today,
    quarantine_reason,
    record_json,
)

logger = logging.getLogger(__name__)

#: ``meter``: a scheduler's metering, which may only pay the open holds placed for it (a hold
#: names its meter; at most what each still holds, to provider accounts), release them, and
#: record the verdict on a provider it settled one of those holds to: what an open network's
#: scheduler holds instead of the operator's token.
ROLES = ("client", "provider", "operator", "meter")
OPERATOR = "operator"
MAX_AMOUNT = 10**15
MAX_BATCH = 5000
MAX_BALANCE = 2**62
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}\Z")
KEY_RE = re.compile(r"[\x21-\x7e]{1,200}\Z")
ID_RE = re.compile(r"[a-z]_[0-9a-f]{32}\Z")


def hash_token(token: str) -> str:
    """Return the stored form of a bearer token (SHA-256 hex); tokens themselves are never stored."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """Return a fresh bearer token (256 random bits)."""
    return "gpn_" + secrets.token_urlsafe(32)


def _json_writer(*, sort_keys: bool = False) -> Callable[[Any], str]:
    """``JSONEncoder(sort_keys, separators=(",", ":")).encode``, with the C encoder built once
    (``encode`` builds it again on every call: a third of the writer's JSON time) and no check
    for circular references: what it encodes are requests' parameters and answers, plain trees."""
    encoder = json.JSONEncoder(sort_keys=sort_keys, separators=(",", ":"), check_circular=False)
    make = json.encoder.c_make_encoder
    if make is None:  # pragma: no cover - an interpreter without the C accelerator
        return encoder.encode
    chunks = make(None, encoder.default, json.encoder.encode_basestring_ascii, None, ":", ",", sort_keys, False, True)
    return lambda value: "".join(chunks(value, 0))


_CANONICAL_JSON = _json_writer(sort_keys=True)
_COMPACT_JSON = _json_writer()


#: Random hex digits for hold ids, drawn from the system's CSPRNG 256 ids' worth at a time (one
#: ``getrandom`` call per id cost about 1 µs of the writer per hold); forgotten in a forked child.
_HOLD_RANDOM: list[str] = []
os.register_at_fork(after_in_child=_HOLD_RANDOM.clear)


def new_hold_id() -> str:
    """Return a new hold id, ``h_`` and 32 hex digits: the milliseconds since 1970 (11 digits), then
    84 random bits. Ids placed one after another sort one after another, so each new hold's key
    lands at the end of the holds table's index, not on a random page of it: a batch of holds
    dirtied (and wrote to the WAL at its commit) a page of that index for nearly every hold, about
    5 µs of the writer's CPU per hold+settle pair. 84 random bits keep it unguessable (and paying
    or releasing a hold takes its meter or an operator besides)."""
    if not _HOLD_RANDOM:
        digits = secrets.token_hex(11 * 256)
        _HOLD_RANDOM.extend(digits[i : i + 21] for i in range(0, len(digits), 22))
    return f"h_{time.time_ns() // 1_000_000 % 16**11:011x}{_HOLD_RANDOM.pop()}"


def request_hash(name: str, params: dict[str, Any]) -> str:
    """Return the digest that ties an idempotency key to one request body."""
    return hashlib.sha256(_CANONICAL_JSON([name, params]).encode()).hexdigest()


def require_role(role: str | None, allowed: frozenset[str], what: str, actor: str | None) -> None:
    """Refuse (ForbiddenError) an account of ``role`` asking for ``what``, which needs one of ``allowed``."""
    if role not in allowed:
        raise ForbiddenError(f"account {actor!r} has role {role}; {what} needs role "
                             f"{' or '.join(sorted(allowed))}", details={"role": role})


def refusal(exc: CreditsRequestError) -> dict[str, Any]:
    """The answer of a refused batch item: ``{"ok": False, "status", "error": {"code", "message", ...}}``."""
    return {"ok": False, "status": exc.status, "error": {"code": exc.code, "message": str(exc), **exc.details}}


# -- the bank's objects: a row of their table each, fields in the columns' order -----------


@dataclass(slots=True)
class Account:
    """An account: who it is, what it may do, its token's hash and its balance."""

    name: str
    role: str
    token_hash: str | None
    balance: int
    created: str


@dataclass(slots=True)
class Session:
    """A notebook session: the budget it may hold and spend, and what it holds and spent."""

    id: str
    account: str
    notebook: str
    kernel: str
    budget: int
    held: int
    spent: int
    created: str

    def usage(self) -> dict[str, Any]:
        """Return the JSON form of the session's usage."""
        return {"session": self.id, "account": self.account, "notebook": self.notebook, "kernel": self.kernel,
                "budget": self.budget, "held": self.held, "spent": self.spent,
                "left": self.budget - self.held - self.spent, "created": self.created}


@dataclass(slots=True)
class Hold:
    """Credits of a session held in escrow for work in flight, paid out in parts or at once."""

    id: str
    session: str
    account: str
    amount: int
    state: str
    provider: str
    paid: int
    entry: int
    closed_entry: int | None
    meter: str = ""
    verified: str = ""


@dataclass(slots=True)
class Record:
    """A provider's trust record (see :mod:`gpunet.credits._trust`)."""

    provider: str
    consecutive_valid: int = 0
    valid: int = 0
    mismatches: int = 0
    quarantined: bool = False
    quarantine_reason: str = ""
    updated: str | None = None

    def __post_init__(self) -> None:
        self.quarantined = bool(self.quarantined)  # SQLite answers 0 or 1

    def to_json(self) -> dict[str, Any]:
        """Return the JSON form of the record, with its reputation."""
        return record_json(self.provider, self.consecutive_valid, self.valid, self.mismatches, self.quarantined,
                           self.quarantine_reason, self.updated)


@dataclass(slots=True)
class Request:
    """One request to the bank, as the writer queues it: an operation, who asks, its parameters
    (the ``params`` of :data:`OPERATIONS`' method) and its idempotency key."""

    name: str
    actor: str | None
    params: dict[str, Any]
    key: str | None = None


def _item_key(item: dict[str, Any] | Request) -> str | None:
    """The idempotency key of a batch item (a dict or a :class:`Request`)."""
    return item.key if type(item) is Request else item.get("key")


# -- the book ---------------------------------------------------------------------------


class Book:
    """The bank's state in the writer's memory, and the factory of its units of work."""

    def __init__(self, conn: WriteConnection, accounts: list[tuple], hashes: list[bytes], last_head: int | None,
                 *, signing_key: Any = None, reputation_floor: float = REPUTATION_FLOOR,
                 mismatches_per_client_day: int = MISMATCHES_PER_CLIENT_DAY) -> None:
        self.conn = conn
        self.signing_key = signing_key
        self.reputation_floor = reputation_floor
        self.mismatches_per_client_day = mismatches_per_client_day
        #: (client account, provider, UTC day) -> mismatches that client's verdicts counted
        #: against that provider that day (kept in memory: counted since the service started)
        self.mismatches_by_client: dict[tuple[str, str, str], int] = {}
        self.accounts: dict[str, Account] = {}
        self.tokens: dict[str, str] = {}
        self.sessions: dict[str, Session] = {}
        self.holds: dict[str, Hold] = {}
        self.records: dict[str, Record] = {}  # providers' trust records, loaded when first used
        # What readers see without a database round trip: committed values only.
        self.committed_balances: dict[str, int] = {}
        self.committed_sessions: dict[str, tuple] = {}
        for row in accounts:
            self.add_account(Account(*row))
        self.tree_lock = threading.Lock()
        self.tree = MerkleTree(hashes)
        self.next_index = len(hashes)
        self.last_hash = hashes[-1] if hashes else ZERO_HASH
        self.last_head_size = -1 if last_head is None else int(last_head)

    def begin(self, requests: list[Request]) -> Unit:
        """Return the unit of work of one writer transaction over ``requests`` (the writer's factory)."""
        return Unit(self, requests)

    def add_account(self, acct: Account) -> None:
        """Take in a committed account (loaded, or written directly before the writer runs)."""
        self.accounts[acct.name] = acct
        self.committed_balances[acct.name] = acct.balance
        if acct.token_hash:
            self.tokens[acct.token_hash] = acct.name

    def role_of(self, name: str) -> str | None:
        """Return the role of an account, or None if there is no such account."""
        acct = self.accounts.get(name)
        return acct.role if acct else None



TABLE_OF = {Account: "accounts", Session: "sessions", Hold: "holds", Record: "provider_records"}


#: Each table's row getter: an object's fields in order, read in C.
_ROW_GETTERS = {cls: attrgetter(*cls.__slots__) for cls in TABLE_OF}


def _row(obj: Any) -> tuple:
    """An object's fields in order, as its table's row (``dataclasses.astuple`` would
    deep-copy every value, which cost the writer a tenth of its time)."""
    return _ROW_GETTERS[type(obj)](obj)


class Unit:
    """The in-memory changes of one writer transaction, with an undo log; its methods named in
    :data:`OPERATIONS` are the bank's operations, each ``(actor, key, **params) -> answer``."""

    def __init__(self, book: Book, requests: list[Request]) -> None:
        self.b = book
        self.undo_log: list[tuple[Any, tuple]] = []  # (object, its row before this unit changed it)
        self.new_objects: list[tuple[dict, str]] = []
        # The objects this unit made (inserted on flush) and changed (updated), by id().
        self.new: dict[int, Any] = {}
        self.dirty: dict[int, Any] = {}
        self.entries: list[tuple] = []
        self.idem_found: dict[str, tuple[str, str]] = {}
        self.idem_new: dict[str, tuple[str, str]] = {}
        self.heads: list[dict[str, Any]] = []
        self.token_changes: list[tuple[str | None, str | None, str]] = []
        self.next_index = book.next_index
        self.last_hash = book.last_hash
        self.now = utcnow()
        self.prefetch_idempotency(requests)

    # -- helpers --

    def _touch(self, obj: Any) -> Any:
        """Enter a book object in the undo log before its first change in this unit (it is updated
        on flush); return it. Its fields are then set directly: ``self._touch(h).paid += 3``."""
        if id(obj) not in self.dirty:  # the first change of it in this unit: keep what it was
            self.undo_log.append((obj, _row(obj)))
            self.dirty[id(obj)] = obj
        return obj

    def _set(self, obj: Any, **changes: Any) -> None:
        """Change fields of a book object through the undo log (it is updated on flush)."""
        self._touch(obj)
        for attr, value in changes.items():
            setattr(obj, attr, value)

    def _create(self, mapping: dict[str, Any], key: str, obj: Any) -> Any:
        """Put a new object in the book (forgotten again if the transaction fails; inserted on flush)."""
        mapping[key] = obj
        self.new_objects.append((mapping, key))
        self.new[id(obj)] = obj
        return obj

    def undo(self) -> None:
        """Roll the book's objects back to where they were before this unit: its transaction failed."""
        for obj, old in self.undo_log:
            for attr, value in zip(obj.__slots__, old):
                setattr(obj, attr, value)
        for mapping, key in self.new_objects:
            mapping.pop(key, None)
        for old_hash, new_hash, name in self.token_changes:
            if new_hash:
                self.b.tokens.pop(new_hash, None)
            if old_hash:
                self.b.tokens[old_hash] = name

    def prefetch_idempotency(self, group: list[Request]) -> None:
        """Read at once the stored answers of every idempotency key the group's requests carry."""
        scopes = [f"{op.actor}/{op.key}" for op in group if op.key]
        for op in group:
            if op.name == "batch":
                scopes.extend(f"{op.actor}/{key}" for key in map(_item_key, op.params["items"]) if key)
        for scope, rh, resp in self.b.conn.rows_in("idempotency", scopes):
            self.idem_found[scope] = (rh, resp)

    def _account(self, name: str, what: str = "account") -> Account:
        acct = self.b.accounts.get(name)
        if acct is None:
            raise NotFoundError(f"no {what} named {name!r}; create it first (operator: create_account)",
                                details={"account": name})
        return acct

    def _stored(self, mapping: dict[str, Any], cls: type, key: str) -> Any:
        """The book's object ``key`` of ``cls``, read from its table when not in memory yet (and
        forgotten again if this write fails); None when there is none."""
        obj = mapping.get(key)
        if obj is None:
            row = self.b.conn.row(TABLE_OF[cls], key)
            if row is not None:
                obj = mapping[key] = cls(*row)
                self.new_objects.append((mapping, key))
        return obj

    def _session(self, sid: str) -> Session:
        sess = self._stored(self.b.sessions, Session, sid)
        if sess is None:
            raise NotFoundError(f"no session {sid!r}; open one with open_session first", details={"session": sid})
        return sess

    def _hold(self, hid: str) -> Hold:
        hold = self._stored(self.b.holds, Hold, hid)
        if hold is None:
            raise NotFoundError(f"no hold {hid!r}; place it with hold() first", details={"hold": hid})
        return hold

    def _record(self, provider: str) -> Record:
        self._provider(provider, "trust records are kept for provider accounts")
        rec = self._stored(self.b.records, Record, provider)
        return rec if rec is not None else self._create(self.b.records, provider, Record(provider))

    def _move(self, kind: str, src: Account | None, dst: Account, amount: int, session: str, hold: str,
              key: str, memo: str = "") -> int:
        # Direct writes after _touch: the hot path of every movement (a keyword dict and a setattr
        # loop per change cost the writer about 3 µs per hold+settle pair).
        if src is not None:
            self._touch(src).balance -= amount
        self._touch(dst).balance += amount
        index = self.next_index
        prev = self.last_hash
        src_name = src.name if src is not None else ""
        h = entry_hash(prev, index, self.now, kind, src_name, dst.name, amount, session, hold, key, memo)
        self.entries.append((index, self.now, kind, src_name, dst.name, amount, session, hold, key, prev, h, memo))
        self.next_index = index + 1
        self.last_hash = h
        return index

    # -- operations --

    def batch(self, actor: str | None, key: str, *, items: list[dict[str, Any] | Request]) -> list[dict[str, Any]]:
        """Apply many items (``{"op", "key", ...params}``, or :class:`Request`\\ s of ``actor``, as the
        service passes its checked items), each answered ``{"ok": True, ...}`` or with its error; a
        refused item changes nothing and does not stop the others."""
        out = []
        for item in items:
            if type(item) is not Request:
                item = Request(item["op"], actor, {k: v for k, v in item.items() if k not in ("op", "key")},
                               item.get("key"))
            elif item.actor != actor:
                raise ValueError(f"a batch of {actor!r} holds a request of {item.actor!r}")
            try:
                out.append({"ok": True, **self.apply(item)})
            except CreditsRequestError as exc:
                out.append(refusal(exc))
        return out

    def apply(self, op: Request) -> Any:
        """Apply one request in memory: check who asks, replay or record its idempotency key, run it."""
        name, actor, params, key = op.name, op.actor, op.params, op.key
        operation = OPERATIONS[name]
        if operation.roles is not None:
            require_role(self.b.role_of(actor or ""), operation.roles, name.replace("_", " "), actor)
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
        result = operation.run(self, actor, key or "", **params)
        if scope is not None:
            self.idem_new[scope] = (rh, _COMPACT_JSON(result))
        return result

    def create_account(self, actor: str | None, key: str, *, name: str, role: str) -> dict[str, Any]:
        """Create account ``name`` with ``role`` and balance 0; the answer carries its token."""
        if name in self.b.accounts:
            raise ConflictError(f"an account named {name!r} already exists; choose another name",
                                details={"account": name})
        acct = self._create(self.b.accounts, name, Account(name, role, None, 0, self.now))
        return {"account": name, "role": role, "token": self._new_token(acct)}

    def rotate_token(self, actor: str | None, key: str, *, account: str) -> dict[str, Any]:
        """Give ``account`` a new token (the old one stops working); the answer carries it. The
        system account (escrow) has no token and never gets one: nobody may act as it."""
        acct = self._account(account)
        if acct.role == "system":
            raise InvalidRequestError(f"{account!r} is the system's account and has no token to revoke; revoke a "
                                      "client's, provider's, meter's or operator's")
        return {"account": account, "token": self._new_token(acct)}

    def _new_token(self, acct: Account) -> str:
        """Give ``acct`` a fresh token (its old one stops working) and return it."""
        token = new_token()
        old = acct.token_hash
        self._set(acct, token_hash=hash_token(token))
        if old:
            self.b.tokens.pop(old, None)
        self.b.tokens[acct.token_hash] = acct.name
        self.token_changes.append((old, acct.token_hash, acct.name))
        return token

    def mint(self, actor: str | None, key: str, *, account: str, amount: int) -> dict[str, Any]:
        """Create ``amount`` credits in ``account``: the only way the total grows."""
        acct = self._account(account)
        if acct.role == "system":
            raise InvalidRequestError(f"cannot mint into the {account!r} account; mint to a client or provider")
        if acct.balance + amount > MAX_BALANCE:
            raise InvalidRequestError(f"minting {amount} would take {account!r} past the largest balance, "
                                      f"{MAX_BALANCE}", details={"account": account, "balance": acct.balance})
        index = self._move("mint", None, acct, amount, "", "", key)
        return {"account": account, "amount": amount, "balance": acct.balance, "entry": index}

    def open_session(self, actor: str | None, key: str, *, budget: int, notebook: str = "",
                     kernel: str = "") -> dict[str, Any]:
        """Open a session of ``actor`` that may hold and spend at most ``budget``; moves nothing."""
        sid = "s_" + secrets.token_hex(16)
        return self._create(self.b.sessions, sid, Session(sid, actor or "", notebook, kernel, budget, 0, 0,
                                                          self.now)).usage()

    def hold(self, actor: str | None, key: str, *, session: str, amount: int, meter: str = "") -> dict[str, Any]:
        """Hold ``amount`` of a session's budget: move it from its owner's balance to escrow. ``meter``
        names the meter account (the scheduler the work goes to) that may pay and close it; without
        one only an operator may."""
        sess = self._session(session)
        role = self.b.role_of(actor or "")
        if actor != sess.account and role != "operator":
            raise ForbiddenError(
                f"account {actor!r} ({role}) may not hold credits of session {session!r}, which belongs to "
                f"{sess.account!r}; only its owner or an operator may", details={"session": session})
        left = sess.budget - sess.held - sess.spent
        if amount > left:
            raise BudgetExceededError(
                f"budget exhausted: session {session} has budget {sess.budget}, spent {sess.spent}, "
                f"held {sess.held}, so {left} left; a hold of {amount} does not fit. Open a session with "
                "a larger budget or wait for running work to settle.",
                details={"session": session, "budget": sess.budget, "spent": sess.spent, "held": sess.held,
                         "left": left, "amount": amount})
        if meter and self._account(meter, "meter account").role != "meter":
            raise InvalidRequestError(f"account {meter!r} is a {self.b.role_of(meter)}, not a meter; name the meter "
                                      "account of the scheduler the work goes to, or none", details={"meter": meter})
        owner = self._account(sess.account)
        if amount > owner.balance:
            raise BudgetExceededError(
                f"insufficient balance: account {owner.name!r} has {owner.balance} credits, a hold of "
                f"{amount} needs more; ask the operator to mint credits to it.",
                details={"account": owner.name, "balance": owner.balance, "amount": amount})
        hid = new_hold_id()
        index = self._move("hold", owner, self.b.accounts[ESCROW], amount, session, hid, key)
        self._create(self.b.holds, hid, Hold(hid, session, owner.name, amount, "held", "", 0, index, None,
                                                      meter))
        self._touch(sess).held += amount
        answer = {"hold": hid, "session": session, "amount": amount, "entry": index, "left": left - amount}
        if meter:
            answer["meter"] = meter
        return answer

    def _meters(self, actor: str | None, hold: Hold, verb: str) -> None:
        """Refuse a meter account ``actor`` acting on a hold placed for another meter (or for none)."""
        if self.b.role_of(actor or "") == "meter" and hold.meter != actor:
            whose = f"meter {hold.meter!r}" if hold.meter else "no meter (an operator closes it)"
            raise ForbiddenError(f"meter {actor!r} may not {verb} hold {hold.id}: it was placed for {whose}; a meter "
                                 "acts only on the holds its clients placed for it", details={"hold": hold.id})

    def _open_hold(self, actor: str | None, hid: str, verb: str) -> tuple[Hold, Session]:
        hold = self._hold(hid)
        self._meters(actor, hold, "pay or close")
        if hold.state != "held":
            raise ConflictError(
                f"hold {hid} was already {hold.state} (entry {hold.closed_entry}); it cannot be {verb} again",
                details={"hold": hid, "state": hold.state})
        return hold, self._session(hold.session)

    def _provider(self, name: str, why: str = "settle pays providers") -> Account:
        """The provider account ``name`` (a settlement pays it, a trust record is its): checked
        before anything moves, refused with ``why`` when it is another role's."""
        prov = self._account(name, "provider account")
        if prov.role != "provider":
            raise InvalidRequestError(f"account {name!r} is a {prov.role}, not a provider; {why}",
                                      details={"account": name})
        return prov

    @staticmethod
    def _check_left(h: Hold, amount: int, verb: str) -> int:
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

    def _pay(self, h: Hold, sess: Session, prov: Account, amount: int, key: str, memo_text: str) -> int:
        """Pay ``amount`` (>= 1) of an open hold to a provider: one ``settle`` entry; the hold's
        ``paid`` and the session's ``spent`` grow by it, the session's ``held`` shrinks by it."""
        index = self._move("settle", self.b.accounts[ESCROW], prov, amount, sess.id, h.id, key, memo_text)
        # Until the hold closes, ``closed_entry`` names its latest payout, so a hold paid in full
        # by parts and then closed (no release entry) still names its last entry.
        self._touch(h)
        h.paid += amount
        h.provider = prov.name
        h.closed_entry = index
        self._touch(sess)
        sess.held -= amount
        sess.spent += amount
        return index

    def _close(self, h: Hold, sess: Session, state: str, key: str, memo_text: str = "") -> list[int]:
        """Close an open hold in ``state``: release what is left of it (amount - paid) to its client
        with one ``release`` entry (none when nothing is left). Returns that entry's index, if any."""
        rest = h.amount - h.paid
        entries = []
        if rest:
            entries.append(self._move("release", self.b.accounts[ESCROW], self._account(h.account), rest,
                                      sess.id, h.id, key, memo_text))
            self._touch(h).closed_entry = entries[0]
            self._touch(sess).held -= rest
        self._touch(h).state = state
        return entries

    def settle_part(self, actor: str | None, key: str, *, hold: str, provider: str, amount: int,
                    memo: dict[str, Any] | None = None) -> dict[str, Any]:
        """Pay ``amount`` (>= 1) of an open hold to ``provider``; the hold stays open."""
        memo_text = canonical_memo(memo)
        h, sess = self._open_hold(actor, hold, "paid from")
        prov = self._provider(provider)
        self._check_left(h, amount, "pay a part of")
        index = self._pay(h, sess, prov, amount, key, memo_text)
        return {"hold": hold, "session": sess.id, "provider": provider, "paid": amount, "total_paid": h.paid,
                "left": h.amount - h.paid, "entries": [index]}

    def settle(self, actor: str | None, key: str, *, hold: str, provider: str, amount: int,
               memo: dict[str, Any] | None = None) -> dict[str, Any]:
        """Pay ``amount`` (>= 0) of an open hold to ``provider`` and release the rest; closes the hold."""
        memo_text = canonical_memo(memo)
        h, sess = self._open_hold(actor, hold, "settled")
        prov = self._provider(provider)
        left = self._check_left(h, amount, "settle")
        entries = [self._pay(h, sess, prov, amount, key, memo_text)] if amount else []
        # A settlement that pays nothing writes only the release: the memo goes on it.
        entries += self._close(h, sess, "settled", key, "" if amount else memo_text)
        if not amount:
            self._set(h, provider=provider)
        return {"hold": hold, "session": sess.id, "provider": provider, "paid": amount, "released": left - amount,
                "total_paid": h.paid, "entries": entries}

    def release(self, actor: str | None, key: str, *, hold: str) -> dict[str, Any]:
        """Give what is left of an open hold back to its client; closes it (settled if it paid parts)."""
        h, sess = self._open_hold(actor, hold, "released")
        rest = h.amount - h.paid
        # A hold paid in parts ends settled, whoever closes it.
        entries = self._close(h, sess, "settled" if h.paid else "released", key)
        return {"hold": hold, "session": sess.id, "released": rest, "total_paid": h.paid, "entries": entries}

    def record_verification(self, actor: str | None, key: str, *, provider: str, agreed: bool,
                            hold: str = "") -> dict[str, Any]:
        """Count a verified result of ``provider`` (agreed or a mismatch); quarantine it below the floor.
        A meter names the ``hold`` of the verified task: one of its own, settled to ``provider`` (a
        mismatch settles 0), not yet used for a verdict."""
        judged = self._verdict_hold(actor, hold, provider) if hold or self.b.role_of(actor or "") == "meter" else None
        rec = self._record(provider)
        if judged is not None:
            self._set(judged, verified=provider)
        if not agreed and judged is not None:  # a client's verdict: at most so many a day against one provider
            day = (judged.account, provider, self.now[:10])
            counted = self.b.mismatches_by_client.get(day, 0)
            if not counts_today(counted, self.b.mismatches_per_client_day):
                logger.warning("a mismatch of provider %s on hold %s is not counted: client %s already counted %d "
                               "today", provider, hold, judged.account, counted)
                return {**rec.to_json(), "counted": False}
            if len(self.b.mismatches_by_client) > 100_000:  # only today's counts matter
                self.b.mismatches_by_client = {k: n for k, n in self.b.mismatches_by_client.items() if k[2] == day[2]}
            self.b.mismatches_by_client[day] = counted + 1
        if agreed:
            self._set(rec, valid=rec.valid + 1, consecutive_valid=rec.consecutive_valid + 1)
        else:
            self._set(rec, mismatches=rec.mismatches + 1, consecutive_valid=0)
        if not rec.quarantined:
            reason = quarantine_reason(rec.valid, rec.mismatches, self.b.reputation_floor)
            if reason:
                self._set(rec, quarantined=True, quarantine_reason=reason)
                logger.warning("provider %s is quarantined: %s", provider, reason)
        self._set(rec, updated=self.now)
        return rec.to_json()

    def _verdict_hold(self, actor: str | None, hid: str, provider: str) -> Hold:
        """Check the hold a verdict on ``provider`` is about (the caller marks it used)."""
        if not hid:
            raise InvalidRequestError("a meter records a verdict on the hold of the verified task: give 'hold'")
        h = self._hold(hid)
        self._meters(actor, h, "record a verdict with")
        if h.state == "held" or h.provider != provider:
            raise ForbiddenError(f"hold {hid} was not settled to provider {provider!r}; a verdict is recorded on "
                                 "the provider a hold was settled to, after it is", details={"hold": hid})
        if h.verified:
            raise ConflictError(f"hold {hid} already carries a verdict on {h.verified!r}; one verdict per hold",
                                details={"hold": hid})
        return h

    def clear_quarantine(self, actor: str | None, key: str, *, provider: str) -> dict[str, Any]:
        """Lift ``provider``'s quarantine and forgive its mismatches."""
        rec = self._record(provider)
        self._set(rec, quarantined=False, quarantine_reason="", mismatches=0, consecutive_valid=0,
                  updated=self.now)
        logger.info("the quarantine of provider %s was cleared by %s", provider, actor)
        return rec.to_json()

    def sign_head(self, actor: str | None, key: str) -> dict[str, Any]:
        """Sign a tree head at the committed size (stored when it is a new size)."""
        size = self.next_index
        with self.b.tree_lock:
            tree = self.b.tree
            if tree.size != size:
                # Entries of this very group are not in the tree yet: sign the committed size.
                size = tree.size
            root = tree.root(size)
        head = sign_tree_head(self.b.signing_key, size, root, self.now)
        if size > self.b.last_head_size and not any(h["size"] == size for h in self.heads):
            self.heads.append(head)
        return head

    # -- writing it out --

    def flush(self) -> None:
        """Write this unit's changes to the writer's connection (the writer commits them)."""
        w = self.b.conn
        new: dict[type, list[tuple]] = {cls: [] for cls in TABLE_OF}
        changed: dict[type, list[tuple]] = {cls: [] for cls in TABLE_OF}
        for o in self.new.values():
            new[type(o)].append(_row(o))
        for k, o in self.dirty.items():
            if k not in self.new:
                row = _row(o)
                changed[type(o)].append(row[1:] + row[:1])  # every column but the key, then the key
        for cls, table in TABLE_OF.items():
            w.insert(table, new[cls])
            w.update(table, columns(table)[1:], changed[cls])
        w.insert("entries", self.entries)
        w.insert("idempotency", [(scope, rh, resp) for scope, (rh, resp) in self.idem_new.items()])
        w.insert("heads", [tuple(h[c] for c in columns("heads")) for h in self.heads])

    def committed(self) -> None:
        """After the commit: the book takes the new chain position and tree, readers see the new
        values, and closed holds are forgotten (memory keeps only open ones)."""
        for obj in (*self.new.values(), *self.dirty.values()):
            if type(obj) is Session:
                self.b.committed_sessions[obj.id] = _row(obj)
            elif type(obj) is Account:
                self.b.committed_balances[obj.name] = obj.balance
            elif type(obj) is Hold and obj.state != "held":
                self.b.holds.pop(obj.id, None)
        self.b.next_index = self.next_index
        self.b.last_hash = self.last_hash
        if self.heads:
            self.b.last_head_size = max(self.b.last_head_size, *(h["size"] for h in self.heads))
        leaves = [entry[10] for entry in self.entries]  # each entry's hash
        with self.b.tree_lock:
            self.b.tree.extend(leaves)


@dataclass(frozen=True)
class Operation:
    """One of the bank's operations: the :class:`Unit` method that runs it and the roles that may
    ask for it (None: no role is checked; the service itself, or each item of a batch)."""

    run: Callable[..., Any]
    roles: frozenset[str] | None = None


OPERATOR_ONLY = frozenset({"operator"})
_CLIENT = frozenset({"client", "operator"})
_METER = frozenset({"meter", "operator"})

OPERATIONS: dict[str, Operation] = {
    "create_account": Operation(Unit.create_account, OPERATOR_ONLY),
    "mint": Operation(Unit.mint, OPERATOR_ONLY),
    "open_session": Operation(Unit.open_session, _CLIENT),
    "hold": Operation(Unit.hold, _CLIENT),
    "settle": Operation(Unit.settle, _METER),
    "settle_part": Operation(Unit.settle_part, _METER),
    "release": Operation(Unit.release, _METER),
    "record_verification": Operation(Unit.record_verification, _METER),
    "clear_quarantine": Operation(Unit.clear_quarantine, OPERATOR_ONLY),
    "sign_head": Operation(Unit.sign_head),
    "rotate_token": Operation(Unit.rotate_token),
    "batch": Operation(Unit.batch),
}
BATCH_OPS = ("mint", "hold", "settle", "settle_part", "release", "record_verification")
