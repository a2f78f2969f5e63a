"""The credit service over HTTP: Starlette handlers on uvicorn, apart from storage.

Every request carries ``Authorization: Bearer TOKEN``. Bodies are JSON objects;
an unknown field, a missing one or a value of the wrong kind is refused (422),
malformed JSON too (400), before anything reaches the store. Errors answer
``{"error": {"status", "code", "message", ...details}}``.

A body may instead be MessagePack (``Content-Type: application/msgpack``): the same
objects, the same size, depth and field checks, at most ``MAX_PACKED_CONTAINERS`` arrays
and maps (a malformed one is a 400 naming it; extension types are refused). ``Accept: application/msgpack`` asks for a MessagePack
answer; errors always answer JSON. :class:`CreditClient` sends its batches so: they
cost the service and the client less to decode and encode than JSON.

===========================================  ======================================  ================
route                                        what                                    who
===========================================  ======================================  ================
``GET  /v1/health``                          liveness, ledger size                   anyone
``POST /v1/ping``                            trivial authenticated JSON echo         any token
``POST /v1/accounts``                        create an account, returns its token    operator
``GET  /v1/accounts``                        every account with its balance          operator
``GET  /v1/accounts/{name}``                 one account's balance                   it, operator
``GET  /v1/accounts/{name}/earnings``        a provider's earnings: totals, series   it, operator
``POST /v1/mint``                            mint credits into an account            operator
``POST /v1/sessions``                        open a session with a budget            client, operator
``GET  /v1/sessions/{id}``                   usage: budget, held, spent, left        owner, operator
``GET  /v1/sessions/{id}/receipt``           entries + inclusion proofs + head       owner, operator
``POST /v1/holds``                           hold credits of a session               owner, operator
``GET  /v1/holds``                           open holds: age, what was paid so far   operator, own
``POST /v1/holds/{id}/settle``               pay a provider, release the rest        operator
``POST /v1/holds/{id}/settle_part``          pay a part, keep the hold open          operator
``POST /v1/holds/{id}/release``              give back what is left, close it        operator
``POST /v1/batch``                           mint/hold/settle(_part)/release/verif.  per item
``GET  /v1/providers``                       every provider's trust record           any token
``GET  /v1/providers/{name}``                one provider's trust record             any token
``POST /v1/providers/{name}/verifications``  record a verified result                operator
``POST /v1/providers/{name}/clear``          clear a provider's quarantine           operator
``GET  /v1/ledger/head``                     a signed tree head                      any token
``GET  /v1/ledger/heads``                    every stored signed head                any token
``GET  /v1/ledger/entries``                  entries ``start``..``start+limit``      operator
``GET  /v1/ledger/proof/inclusion``          audit path for ``index`` at ``size``    any token
``GET  /v1/ledger/proof/consistency``        proof between ``first`` and ``second``  any token
===========================================  ======================================  ================

A settle may carry a ``memo``: a JSON object of at most ``MAX_MEMO_BYTES`` (4096)
bytes in canonical form (anything else is refused with 400), recorded in, and hashed
with, its ledger entry.

``settle_part`` pays ``amount`` (>= 1) of an open hold to a provider and leaves the hold
open, so one hold can pay for many tasks (a whole map) to several providers as they
finish; the parts never add up to more than the hold (422 naming what is left). A later
``settle`` pays at most what is left and releases the rest; ``release`` gives back what
is left. Either closes the hold: ``settled`` if anything was paid from it.

``GET /v1/holds?state=held&older_than=SECONDS&account=NAME`` lists the holds still open,
oldest first, each with ``paid`` (by parts so far), ``left``, ``created`` (its ledger
``hold`` entry's time) and ``age`` in seconds at the answer's ``now``: an operator finds
so the holds that a dead scheduler will never close (``gpunet credits release-stale``).
Any account may list its own (``account=`` its name); every account's needs an operator.

``GET /v1/accounts/NAME/earnings?after=INDEX`` answers a provider (or an operator) what she
was paid: her balance, the credits, tasks and device-seconds of every settlement to her
(in total and since 00:00 UTC today), and the settlements after ledger entry ``INDEX``
(the last ``MAX_EARNINGS_SERIES``) as ``[index, time, credits, tasks, device-seconds]``, for a
plot, with her trust record and the reputation below which she would be quarantined. Nothing in it names a client, a session or a task: only what she earned and when.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Any, Callable

import msgpack
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gpunet.errors import (
    AuthError,
    CreditsError,
    CreditsRequestError,
    CreditsUnavailableError,
    ForbiddenError,
    InvalidRequestError,
    LedgerVerificationError,
    NotFoundError,
)
from gpunet.credits._ledger import (
    MAX_MEMO_BYTES,
    RECEIPT_FORMAT,
    canonical_memo,
    entry_to_json,
    load_or_create_signing_key,
    public_key_raw,
)
from gpunet.credits._book import (
    BATCH_OPS,
    ID_RE,
    KEY_RE,
    MAX_AMOUNT,
    MAX_BATCH,
    NAME_RE,
    OPERATIONS,
    OPERATOR_ONLY,
    ROLES,
    Request as BookRequest,
    refusal,
    require_role,
)
from gpunet.credits._client import MSGPACK  # the binary form of a body: see the module's doc
from gpunet.credits._db import beside_db, format_time, resolve_db_url, sqlite_path
from gpunet.credits._store import CreditStore
from gpunet.credits._trust import MISMATCHES_PER_CLIENT_DAY, REPUTATION_FLOOR
from gpunet.credits._witness import Witness
from gpunet.paths import write_private

logger = logging.getLogger(__name__)

MAX_BODY = 4 * 1024 * 1024
#: Seconds a request's body may take to come in whole (a token's holder trickling one byte a
#: second held a connection, and the service's shutdown, for as long as it liked).
BODY_WITHIN_S = 30.0
#: The most settlements ``GET /v1/accounts/NAME/earnings`` lists (the latest).
MAX_EARNINGS_SERIES = 1000

# -- validation -------------------------------------------------------------------------


def _bad(field: str, value: Any, want: str) -> InvalidRequestError:
    return InvalidRequestError(f"field {field!r} must be {want}, got {value!r:.80}",
                               details={"field": field})


def _amount(field: str, v: Any, minimum: int = 1) -> int:
    if type(v) is not int or not minimum <= v <= MAX_AMOUNT:
        raise _bad(field, v, f"an integer number of credits from {minimum} to {MAX_AMOUNT}")
    return v


def _matching(pattern: re.Pattern[str], want: str, prefix: str = "") -> Callable[[str, Any], str]:
    """A check of a string field: it matches ``pattern`` and starts with ``prefix``, else it must be ``want``."""
    def check(field: str, v: Any) -> str:
        if not isinstance(v, str) or not pattern.match(v) or not v.startswith(prefix):
            raise _bad(field, v, want)
        return v
    return check


_name = _matching(NAME_RE, "an account name: 1-64 of letters, digits, '.', '_', '@', '-', starting with a letter "
                  "or digit")
_key = _matching(KEY_RE, "an idempotency key: 1-200 printable ASCII characters, no spaces")
_session_id = _matching(ID_RE, "a session id like s_0123…(32 hex digits)", "s_")
_hold_id = _matching(ID_RE, "a hold id like h_0123…(32 hex digits)", "h_")


def _text(limit: int) -> Callable[[str, Any], str]:
    def check(field: str, v: Any) -> str:
        if not isinstance(v, str) or len(v) > limit or any(ord(c) < 32 for c in v):
            raise _bad(field, v, f"a string of at most {limit} characters without control characters")
        return v
    return check


def _bool(field: str, v: Any) -> bool:
    if type(v) is not bool:
        raise _bad(field, v, "true or false")
    return v


def _memo(field: str, v: Any) -> dict[str, Any] | None:
    """A settlement memo: a JSON object within the size limit; ``null`` or ``{}`` is no memo (None)."""
    limit = (f"a JSON object of at most {MAX_MEMO_BYTES} bytes when canonically encoded "
             "(json.dumps(memo, sort_keys=True, separators=(',', ':')))")
    if v is None:
        return None
    if not isinstance(v, dict) or not all(isinstance(k, str) for k in v):
        raise InvalidRequestError(f"field {field!r} must be {limit}, got {type(v).__name__} {v!r:.80}",
                                  status=400, details={"field": field})
    try:
        size = len(canonical_memo(v).encode())
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError(f"field {field!r} must be {limit} and plain JSON: {exc}", status=400,
                                  details={"field": field}) from None
    if size > MAX_MEMO_BYTES:
        raise InvalidRequestError(f"field {field!r} must be {limit}; this one is {size} bytes. Keep digests and "
                                  "names in it, not data", status=400, details={"field": field, "bytes": size})
    return v or None


def _role(field: str, v: Any) -> str:
    if v not in ROLES:
        raise _bad(field, v, f"one of {', '.join(ROLES)}")
    return v


SPECS: dict[str, dict[str, tuple[Callable[[str, Any], Any], bool]]] = {
    "create_account": {"name": (_name, True), "role": (_role, True)},
    "mint": {"account": (_name, True), "amount": (_amount, True), "key": (_key, True)},
    "open_session": {"budget": (lambda f, v: _amount(f, v, 0), True), "notebook": (_text(1024), False),
                     "kernel": (_text(256), False), "key": (_key, False)},
    "hold": {"session": (_session_id, True), "amount": (_amount, True), "meter": (_name, False),
             "key": (_key, True)},
    "settle": {"hold": (_hold_id, True), "provider": (_name, True),
               "amount": (lambda f, v: _amount(f, v, 0), True), "memo": (_memo, False), "key": (_key, True)},
    "settle_part": {"hold": (_hold_id, True), "provider": (_name, True), "amount": (_amount, True),
                    "memo": (_memo, False), "key": (_key, True)},
    "release": {"hold": (_hold_id, True), "key": (_key, True)},
    "record_verification": {"provider": (_name, True), "agreed": (_bool, True), "hold": (_hold_id, False),
                            "key": (_key, True)},
    "clear_quarantine": {"provider": (_name, True), "key": (_key, True)},
    "ping": {},
}


#: The fields a batch item of each operation may carry: its own and ``op``.
_ITEM_FIELDS = {op: frozenset(spec) | {"op"} for op, spec in SPECS.items()}


def validate(op: str, body: Any, *, extra: dict[str, Any] | None = None, item: bool = False) -> dict[str, Any]:
    """Check a request body (with ``item``: a batch item, which names its ``op`` too) against the
    fields of ``op``; return the clean parameters.

    An optional field whose check answers ``None`` (an empty memo) is left out, so it
    counts as absent, in the idempotency key's request hash too.
    """
    if not isinstance(body, dict):
        raise InvalidRequestError(f"the request body must be a JSON object, got {type(body).__name__}")
    spec = SPECS[op]
    if not body.keys() <= (_ITEM_FIELDS[op] if item else spec.keys()):
        # a MessagePack map may name a field in bytes: named as it came, never sorted with strings
        unknown = sorted(name if isinstance(name, str) else repr(name)
                         for name in set(body) - set(spec) - ({"op"} if item else set()))
        raise InvalidRequestError(
            f"unknown field(s) {', '.join(map(repr, unknown))} for {op}; allowed: {', '.join(spec) or 'none'} "
            "(field names are strings)", details={"fields": unknown})
    out: dict[str, Any] = dict(extra or {})
    for field, (check, required) in spec.items():
        if field in out:
            continue
        if field not in body:
            if required:
                raise InvalidRequestError(f"missing field {field!r} for {op}", details={"field": field})
            continue
        value = check(field, body[field])
        if value is not None:
            out[field] = value
    return out


async def read_capped_body(request: Request, limit: int, *, within_s: float | None = None) -> bytes:
    """The request's body, read as it streams in and refused (413, nothing kept) as
    soon as it passes ``limit`` bytes, or at once where Content-Length says it will:
    a huge body never sits in memory whole; and (408) when it has not all come within
    ``within_s`` seconds (None: no deadline here, as where the server sets its own)."""
    def too_large(size: str) -> InvalidRequestError:
        return InvalidRequestError(f"the request body is {size} bytes, over the limit of {limit}: send less "
                                   "(split a batch)", status=413, code="body_too_large")

    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(declared)
    chunks, size = [], 0
    try:
        async with asyncio.timeout(within_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise too_large(f"more than {limit}")
                chunks.append(chunk)
    except TimeoutError:
        raise InvalidRequestError(f"the request body did not all come within {within_s:g} s ({size} bytes came): "
                                  "send it at once", status=408, code="too_slow") from None
    return b"".join(chunks)


#: How deep a request body's arrays and objects may nest (a batch of memos needs 4 or 5).
MAX_JSON_DEPTH = 32


def _json_depth(value: Any) -> int:
    """How deep ``value``'s lists and dicts nest (walked level by level, without recursion)."""
    depth, level = 0, [value] if isinstance(value, (list, dict)) else []
    while level:
        depth += 1
        level = [child for node in level for child in (node.values() if isinstance(node, dict) else node)
                 if isinstance(child, (list, dict))]
    return depth


def _media_types(header: str) -> list[str]:
    """The media types a Content-Type or Accept header names (lower case, parameters dropped; an
    Accept entry with ``q=0`` refuses its type and is left out)."""
    types = []
    for entry in header.split(","):
        media, *params = (part.strip() for part in entry.split(";"))
        if media and not any(p.replace(" ", "") in ("q=0", "q=0.0", "q=0.00", "q=0.000") for p in params):
            types.append(media.lower())
    return types


def _refuse_extension(code: int, data: bytes) -> Any:
    raise ValueError(f"MessagePack extension type {code} is not accepted (plain maps, arrays, strings, "
                     "integers, booleans and nil only)")


#: The most arrays and maps a MessagePack body may hold (a full batch of items with memos holds
#: far fewer). An empty one is 1 byte of MessagePack (2 or 3 of JSON) and some 60 of memory: without
#: a cap a body at the size limit would cost about three times what the same limit allows JSON.
MAX_PACKED_CONTAINERS = 20 * MAX_BATCH


def _decode_msgpack(body: bytes) -> Any:
    """A MessagePack body as Python objects: map keys must be strings, strings valid UTF-8, no
    extension types, at most ``MAX_PACKED_CONTAINERS`` arrays and maps; the lengths it declares
    are bounded by the body's size, so a few bytes never make it allocate much."""
    containers = 0

    def counted(container: Any) -> Any:
        nonlocal containers
        containers += 1
        if containers > MAX_PACKED_CONTAINERS:
            raise ValueError(f"it holds more than {MAX_PACKED_CONTAINERS} arrays and maps; send a smaller batch")
        return container

    return msgpack.unpackb(body, raw=False, strict_map_key=True, ext_hook=_refuse_extension, timestamp=0,
                           object_hook=counted, list_hook=counted)


async def _json_body(request: Request) -> Any:
    """The request's body as Python objects: JSON, or MessagePack when its Content-Type says so.
    Both pass the same checks: at most ``MAX_BODY`` bytes (413), no deeper than ``MAX_JSON_DEPTH``
    levels, malformed or anything else a 400, and then each route's own field checks."""
    body = await read_capped_body(request, MAX_BODY, within_s=BODY_WITHIN_S)
    if not body:
        return {}
    binary = MSGPACK in _media_types(request.headers.get("content-type", ""))
    kind = "MessagePack" if binary else "JSON"
    try:
        value = _decode_msgpack(body) if binary else json.loads(body)
    except (msgpack.StackError, RecursionError):  # "[" x 200,000: the JSON parser recurses per level
        too_deep = True
    except (ValueError, UnicodeDecodeError, TypeError) as exc:  # msgpack's errors are ValueErrors too
        raise InvalidRequestError(f"malformed {kind} in the request body: {exc or exc.__class__.__name__}",
                                  status=400, code="malformed_json") from exc
    else:
        too_deep = _json_depth(value) > MAX_JSON_DEPTH
    if too_deep:
        raise InvalidRequestError(f"the request body nests arrays and objects deeper than {MAX_JSON_DEPTH} levels; "
                                  f"send a flatter {kind} body", status=400, code="malformed_json")
    return value


def _answer(request: Request, value: Any) -> Response:
    """A handler's answer: MessagePack where the request's Accept names it, else JSON."""
    if MSGPACK in _media_types(request.headers.get("accept", "")):
        try:
            return Response(msgpack.packb(value), media_type=MSGPACK)
        except (TypeError, ValueError, OverflowError):  # pragma: no cover - answers are plain JSON values
            logger.exception("an answer could not be packed as MessagePack; answering JSON")
    return JSONResponse(value)


# -- the app ----------------------------------------------------------------------------


class CreditService:
    """The HTTP handlers over one :class:`CreditStore`."""

    def __init__(self, store: CreditStore) -> None:
        self.store = store

    # helpers

    def _auth(self, request: Request) -> tuple[str, str]:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError("missing bearer token: send 'Authorization: Bearer TOKEN' (the token that "
                            "create_account returned, or the operator token file's content)")
        who = self.store.authenticate(token.strip())
        if who is None:
            raise AuthError("unknown bearer token: it was never issued or has been replaced; "
                            "check GPUNET_TOKEN or the token file")
        return who

    def operation(self, name: str, path: tuple[str, str, Callable[[str, Any], Any]] | None = None) -> Callable:
        """Return the handler of ``POST`` operation ``name`` (see the routes): the body checked by
        :func:`validate`, ``path`` = (path parameter, field, check) adding a field from the path. The
        book checks the actor's role (see ``OPERATIONS``)."""
        async def handler(request: Request) -> Any:
            actor, _ = self._auth(request)
            body = await _json_body(request)
            extra = None if path is None else {path[1]: path[2](path[1], request.path_params[path[0]])}
            params = validate(name, body, extra=extra)
            key = params.pop("key", None)
            # The store's future is an asyncio one with the writer on this loop (wrap_future passes
            # it through), a concurrent one with the writer on its thread.
            return await asyncio.wrap_future(self.store.submit(name, actor, params, key))
        return handler

    def listing(self, field: str, read: Callable[[], Any], what: str | None = None) -> Callable:
        """Return the handler of a ``GET`` answering ``{field: read()}`` (committed rows, read in a
        thread): to any token or, with ``what`` (the refusal calls it so), to the operator only."""
        async def handler(request: Request) -> dict[str, Any]:
            actor, role = self._auth(request)
            if what is not None:
                require_role(role, OPERATOR_ONLY, what, actor)
            return {field: await run_in_threadpool(read)}
        return handler

    @staticmethod
    def _int_query(request: Request, name: str, default: int | None = None, *, minimum: int = 0,
                   required: bool = False) -> int | None:
        raw = request.query_params.get(name)
        if raw is None:
            if required:
                raise InvalidRequestError(f"missing query parameter {name!r}")
            return default
        try:
            value = int(raw)
        except ValueError:
            raise InvalidRequestError(f"query parameter {name!r} must be an integer, got {raw!r:.40}") from None
        if value < minimum:
            raise InvalidRequestError(f"query parameter {name!r} must be >= {minimum}, got {value}")
        return value

    # handlers

    async def health(self, request: Request) -> dict[str, Any]:
        """GET /v1/health: liveness and the ledger's size and public key (no token needed)."""
        return {"ok": True, "size": self.store.size, "public_key": self.store.public_key_hex}

    async def ping(self, request: Request) -> dict[str, Any]:
        """POST /v1/ping: a trivial authenticated JSON round trip (the benchmark's yardstick)."""
        actor, role = self._auth(request)
        validate("ping", await _json_body(request))
        return {"ok": True, "account": actor, "role": role}

    async def revoke_token(self, request: Request) -> dict[str, Any]:
        """POST /v1/accounts/{name}/token: the account's token stops working and a new one
        is issued, in the answer (operator)."""
        actor, role = self._auth(request)
        require_role(role, OPERATOR_ONLY, "revoking a token", actor)
        name = _name("name", request.path_params["name"])
        return await asyncio.wrap_future(self.store.submit("rotate_token", actor, {"account": name}, None))

    async def get_account(self, request: Request) -> dict[str, Any]:
        """GET /v1/accounts/{name}: one account's committed balance (itself or operator)."""
        actor, role = self._auth(request)
        name = request.path_params["name"]
        if name != actor and role != "operator":
            raise ForbiddenError(f"account {actor!r} may not read account {name!r}; only its owner or an "
                                 "operator may")
        acct = self.store.cached_account(name)
        if acct is None:
            found = await run_in_threadpool(self.store.read_accounts, name)  # [] or [that account]
            acct = found[0] if found else None
        if acct is None:
            raise NotFoundError(f"no account named {name!r}", details={"account": name})
        return acct

    async def earnings(self, request: Request) -> dict[str, Any]:
        """GET /v1/accounts/{name}/earnings?after=INDEX: what a provider was paid (itself or operator)."""
        account = await self.get_account(request)
        if account["role"] != "provider":
            raise NotFoundError(f"account {account['account']!r} is a {account['role']}, not a provider; "
                                "earnings are kept for provider accounts", details={"account": account["account"]})
        after = self._int_query(request, "after", -1, minimum=-1)
        rows = await run_in_threadpool(self.store.read_settlements_to, account["account"])
        today = format_time(dt.datetime.now(dt.timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0))
        series = [_earned(row) for row in rows]
        totals = {"credits": 0, "tasks": 0, "seconds": 0.0}
        totals_today = dict(totals)
        for (index, time, credits, tasks, seconds) in series:
            for into in (totals, totals_today) if time >= today else (totals,):
                into["credits"] += credits
                into["tasks"] += tasks
                into["seconds"] += seconds
        later = [item for item in series if item[0] > after][-MAX_EARNINGS_SERIES:]
        record = await run_in_threadpool(self.store.read_provider_record, account["account"])
        return {**account, "size": self.store.size, "total": totals, "today": totals_today, "since": today,
                "after": after, "series": later, "record": record,
                "quarantine_below": self.store.book.reputation_floor}

    async def usage(self, request: Request) -> dict[str, Any]:
        """GET /v1/sessions/{sid}: budget, held, spent and left (owner or operator)."""
        actor, role = self._auth(request)
        sid = _session_id("session", request.path_params["sid"])
        usage = self.store.cached_session(sid)
        if usage is None:
            usage = await run_in_threadpool(self.store.read_session, sid)
        if usage is None:
            raise NotFoundError(f"no session {sid!r}", details={"session": sid})
        if usage["account"] != actor and role != "operator":
            raise ForbiddenError(f"account {actor!r} may not read session {sid!r}, which belongs to another "
                                 "account", details={"session": sid})
        return usage

    async def receipt(self, request: Request) -> dict[str, Any]:
        """GET /v1/sessions/{sid}/receipt: entries with inclusion proofs and a signed head."""
        usage = await self.usage(request)  # who may read the session may have its receipt
        head = await asyncio.wrap_future(self.store.submit("sign_head", None, {}))
        return await run_in_threadpool(self._build_receipt, usage, head)

    def _build_receipt(self, usage: dict[str, Any], head: dict[str, Any]) -> dict[str, Any]:
        size = head["size"]
        rows = self.store.read_entries(0, size, session=usage["session"])
        entries = []
        spent = held = 0
        for row in rows:
            entry = entry_to_json(row)
            _, proof, _ = self.store.proof_inclusion(entry["index"], size)
            entry["proof"] = [p.hex() for p in proof]
            entries.append(entry)
            if entry["kind"] == "hold":
                held += entry["amount"]
            elif entry["kind"] == "settle":
                spent += entry["amount"]
                held -= entry["amount"]
            elif entry["kind"] == "release":
                held -= entry["amount"]
        session = {k: usage[k] for k in ("session", "account", "notebook", "kernel", "budget", "created")}
        session.update(spent=spent, held=held, left=usage["budget"] - spent - held)
        return {"format": RECEIPT_FORMAT, "session": session, "entries": entries, "head": head}

    async def list_holds(self, request: Request) -> dict[str, Any]:
        """GET /v1/holds?state=held&older_than=SECONDS&account=NAME: the open holds, oldest first,
        with what was paid from each so far and their age (operator; any account its own)."""
        actor, role = self._auth(request)
        state = request.query_params.get("state", "held")
        if state != "held":
            raise InvalidRequestError(f"query parameter 'state' must be 'held' (only open holds are listed), "
                                      f"got {state!r:.40}", details={"field": "state"})
        account = request.query_params.get("account")
        if account is not None:
            _name("account", account)
        if role != "operator" and account != actor:
            whose = "every account's open holds" if account is None else f"the holds of account {account!r}"
            raise ForbiddenError(f"account {actor!r} has role {role}; listing {whose} needs role operator; an "
                                 f"account may list its own with account={actor}", details={"role": role})
        older_than = self._int_query(request, "older_than")
        now = dt.datetime.now(dt.timezone.utc)
        holds = await run_in_threadpool(self.store.read_open_holds, older_than=older_than, account=account, now=now)
        return {"state": state, "older_than": older_than, "account": account, "now": format_time(now),
                "holds": holds}

    async def batch(self, request: Request) -> dict[str, Any]:
        """POST /v1/batch: many items (mint, hold, settle, settle_part, release, record_verification)
        in one transaction, one result each."""
        actor, role = self._auth(request)
        body = await _json_body(request)
        if not isinstance(body, dict) or set(body) != {"items"} or not isinstance(body["items"], list):
            raise InvalidRequestError("a batch body is {\"items\": [...]}, each item an object with 'op' "
                                      f"({', '.join(BATCH_OPS)}), 'key' and that call's fields")
        items = body["items"]
        if len(items) > MAX_BATCH:
            raise InvalidRequestError(f"a batch holds at most {MAX_BATCH} items, got {len(items)}; split it")
        results: dict[int, dict[str, Any]] = {}
        good: dict[int, dict[str, Any]] = {}  # the valid items, by their place in the batch
        for i, item in enumerate(items):
            try:
                if not isinstance(item, dict):
                    raise InvalidRequestError(f"batch item {i} must be an object")
                op = item.get("op")
                if op not in BATCH_OPS:
                    raise InvalidRequestError(f"batch item {i}: 'op' must be one of {', '.join(BATCH_OPS)}, "
                                              f"got {op!r:.40}")
                require_role(role, OPERATIONS[op].roles, op, actor)
                params = validate(op, item, item=True)
                good[i] = BookRequest(op, actor, params, params.pop("key", None))
            except CreditsRequestError as exc:
                results[i] = refusal(exc)
        if good:
            done = await asyncio.wrap_future(self.store.submit("batch", actor, {"items": list(good.values())}))
            results.update(zip(good, done))
        return {"results": [results[i] for i in range(len(items))]}

    async def provider_record(self, request: Request) -> dict[str, Any]:
        """GET /v1/providers/{name}: one provider's trust record (any token)."""
        self._auth(request)
        name = _name("provider", request.path_params["name"])
        return await run_in_threadpool(self.store.read_provider_record, name)

    async def head(self, request: Request) -> dict[str, Any]:
        """GET /v1/ledger/head: sign (and store) a tree head at the committed size."""
        self._auth(request)
        return await asyncio.wrap_future(self.store.submit("sign_head", None, {}))

    async def entries(self, request: Request) -> dict[str, Any]:
        """GET /v1/ledger/entries?start=&limit=: raw entries for verifiers (operator)."""
        actor, role = self._auth(request)
        require_role(role, OPERATOR_ONLY, "reading the ledger's entries", actor)
        start = self._int_query(request, "start", 0)
        limit = min(self._int_query(request, "limit", 10000, minimum=1), 100000)
        rows = await run_in_threadpool(self.store.read_entries, start, start + limit)
        return {"start": start, "size": self.store.size, "entries": [entry_to_json(r) for r in rows]}

    async def inclusion(self, request: Request) -> dict[str, Any]:
        """GET /v1/ledger/proof/inclusion?index=&size=: the audit path of one entry."""
        self._auth(request)
        index = self._int_query(request, "index", required=True)
        size = self._int_query(request, "size")
        committed = self.store.size
        if index >= (committed if size is None else size) or (size is not None and size > committed):
            raise NotFoundError(f"no entry {index} in a ledger of {committed} entries"
                                + (f" (asked at size {size})" if size is not None else ""),
                                details={"index": index, "size": committed})
        size, proof, leaf = self.store.proof_inclusion(index, size)
        return {"index": index, "size": size, "leaf_hash": leaf.hex(), "proof": [p.hex() for p in proof]}

    async def consistency(self, request: Request) -> dict[str, Any]:
        """GET /v1/ledger/proof/consistency?first=&second=: proof that one head extends another."""
        self._auth(request)
        first = self._int_query(request, "first", required=True)
        second = self._int_query(request, "second")
        committed = self.store.size
        if (second if second is not None else committed) > committed or first > (second if second is not None
                                                                                  else committed):
            raise NotFoundError(f"no consistency proof from size {first} to {second}: the ledger has "
                                f"{committed} entries and first must not exceed second",
                                details={"size": committed})
        second, proof, r1, r2 = self.store.proof_consistency(first, second)
        return {"first": first, "second": second, "first_root": r1.hex(), "second_root": r2.hex(),
                "proof": [p.hex() for p in proof]}


def _earned(row: tuple) -> list[Any]:
    """``[index, time, credits, tasks, device-seconds]`` of a settlement row ``(index, time, amount,
    memo)``: a part names its tasks in its memo (else one); the scheduler writes the seconds."""
    index, time, amount, memo_text = row
    try:
        memo = json.loads(memo_text) if memo_text else {}
    except ValueError:
        memo = {}
    memo = memo if isinstance(memo, dict) else {}
    tasks, seconds = memo.get("tasks", 1), memo.get("seconds", 0.0)
    tasks = tasks if type(tasks) is int and tasks >= 0 else 1
    seconds = float(seconds) if isinstance(seconds, (int, float)) and seconds >= 0 else 0.0
    return [index, time, amount, tasks, seconds]


def _error_response(exc: CreditsError) -> Any:
    status = getattr(exc, "status", 500)
    body = {"status": status, "code": getattr(exc, "code", "error"), "message": str(exc),
            **getattr(exc, "details", {})}
    return JSONResponse({"error": body}, status_code=status)


def build_app(store: CreditStore) -> Starlette:
    """Return the Starlette application serving ``store``."""
    svc = CreditService(store)
    hold, provider = ("hid", "hold", _hold_id), ("name", "provider", _name)

    def wrap(handler: Callable[[Any], Any]) -> Callable[[Any], Any]:
        async def endpoint(request: Any) -> Any:
            try:
                return _answer(request, await handler(request))
            except (CreditsRequestError, CreditsUnavailableError) as exc:
                return _error_response(exc)
            except LedgerVerificationError as exc:  # a proof asked outside the tree
                return _error_response(NotFoundError(str(exc)))
            except Exception:  # noqa: BLE001 - answer, log, keep serving
                logger.exception("unexpected error in %s %s", request.method, request.url.path)
                return JSONResponse({"error": {"status": 500, "code": "internal", "message":
                                               "internal error in the credit service; see its log"}},
                                    status_code=500)
        return endpoint

    routes = [
        Route("/v1/health", wrap(svc.health), methods=["GET"]),
        Route("/v1/ping", wrap(svc.ping), methods=["POST"]),
        Route("/v1/accounts", wrap(svc.operation("create_account")), methods=["POST"]),
        Route("/v1/accounts", wrap(svc.listing("accounts", store.read_accounts, "listing accounts")), methods=["GET"]),
        Route("/v1/accounts/{name}", wrap(svc.get_account), methods=["GET"]),
        Route("/v1/accounts/{name}/token", wrap(svc.revoke_token), methods=["POST"]),
        Route("/v1/accounts/{name}/earnings", wrap(svc.earnings), methods=["GET"]),
        Route("/v1/mint", wrap(svc.operation("mint")), methods=["POST"]),
        Route("/v1/sessions", wrap(svc.operation("open_session")), methods=["POST"]),
        Route("/v1/sessions/{sid}", wrap(svc.usage), methods=["GET"]),
        Route("/v1/sessions/{sid}/receipt", wrap(svc.receipt), methods=["GET"]),
        Route("/v1/holds", wrap(svc.operation("hold")), methods=["POST"]),
        Route("/v1/holds", wrap(svc.list_holds), methods=["GET"]),
        Route("/v1/holds/{hid}/settle", wrap(svc.operation("settle", hold)), methods=["POST"]),
        Route("/v1/holds/{hid}/settle_part", wrap(svc.operation("settle_part", hold)), methods=["POST"]),
        Route("/v1/holds/{hid}/release", wrap(svc.operation("release", hold)), methods=["POST"]),
        Route("/v1/batch", wrap(svc.batch), methods=["POST"]),
        Route("/v1/providers", wrap(svc.listing("providers", store.read_provider_records)), methods=["GET"]),
        Route("/v1/providers/{name}", wrap(svc.provider_record), methods=["GET"]),
        Route("/v1/providers/{name}/verifications", wrap(svc.operation("record_verification", provider)),
              methods=["POST"]),
        Route("/v1/providers/{name}/clear", wrap(svc.operation("clear_quarantine", provider)), methods=["POST"]),
        Route("/v1/ledger/head", wrap(svc.head), methods=["GET"]),
        Route("/v1/ledger/heads", wrap(svc.listing("heads", store.read_heads)), methods=["GET"]),
        Route("/v1/ledger/entries", wrap(svc.entries), methods=["GET"]),
        Route("/v1/ledger/proof/inclusion", wrap(svc.inclusion), methods=["GET"]),
        Route("/v1/ledger/proof/consistency", wrap(svc.consistency), methods=["GET"]),
    ]

    async def not_found(request: Any, exc: Any) -> Any:
        status = getattr(exc, "status_code", 404)
        msg = ("no such route: " if status == 404 else "method not allowed: ") + \
            f"{request.method} {request.url.path}; see gpunet.credits._service for the API"
        return JSONResponse({"error": {"status": status, "code": "no_route", "message": msg}}, status_code=status)

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> Any:
        # With SQLite the writer runs on this loop: its statements take microseconds, and on the
        # loop thread they never wait for the GIL; only the commit (the fsync) goes to a thread.
        # A server database keeps its writer thread.
        if sqlite_path(store.url) is not None:
            store.writer.attach_loop()
        try:
            yield
        finally:
            await store.writer.detach_loop()

    return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found}, lifespan=lifespan)


# -- running it -------------------------------------------------------------------------


class _Stop(Exception):
    """SIGTERM arrived: leave the server loop and close the store."""


def _raise_stop(signum: int, frame: Any) -> None:
    raise _Stop()


def open_store(db: str | None, *, key_file: str | os.PathLike[str] | None = None,
               reputation_floor: float = REPUTATION_FLOOR,
               mismatches_per_client_day: int = MISMATCHES_PER_CLIENT_DAY) -> CreditStore:
    """Open (creating on first use) the credit database and its signing key; providers whose
    reputation falls below ``reputation_floor`` are quarantined; one client's verdicts count
    at most ``mismatches_per_client_day`` mismatches against a provider a day."""
    url = resolve_db_url(db)
    key_path = Path(key_file) if key_file else beside_db(url, ".ed25519.pem")
    key = load_or_create_signing_key(key_path)
    memory = Witness(key_path.with_name(key_path.name + ".heads"))
    store = CreditStore(url, signing_key=key, reputation_floor=reputation_floor, memory=memory,
                        mismatches_per_client_day=mismatches_per_client_day)
    try:
        store.bind_public_key(public_key_raw(key).hex())
        store.check_memory()
    except CreditsError:
        store.close(sign=False)
        raise
    return store


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind and listen on ``host:port`` (0 picks a free port); raise CreditsUnavailableError if taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY only on sockets that say so,
    # and without it Nagle + delayed ACK stall every keep-alive response by 40 ms.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise CreditsUnavailableError(f"cannot listen on {host}:{port}: {exc.strerror}; choose another --port "
                                      "or stop what uses it") from exc
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class _CoalescingTransport:
    """A connection's transport whose writes made in one turn of the event loop leave in one send.

    uvicorn writes an answer's head and its body apart; on a TCP_NODELAY socket each write is a
    send, a segment and a wake-up of the client: a batch's answer cost two (the head's the dearer,
    about 4 µs of the service's CPU per hold+settle pair). Every other call goes to the transport."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        """Queue ``data``; what this turn of the loop queued is sent at the end of it."""
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._flush)
        self._pending.append(bytes(data))

    def _flush(self) -> None:
        data, self._pending = b"".join(self._pending), []
        if data and not self._transport.is_closing():
            self._transport.write(data)

    def close(self) -> None:
        """Send what is queued, then close."""
        self._flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def _coalescing_protocol() -> type:
    """uvicorn's h11 protocol writing through a :class:`_CoalescingTransport`."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class CoalescingH11Protocol(H11Protocol):
        """H11Protocol whose writes of one turn of the event loop leave in one send."""

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            """Take the connection, its transport wrapped."""
            super().connection_made(_CoalescingTransport(transport))

    return CoalescingH11Protocol


def serve(
    db: str | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    operator_token_file: str | os.PathLike[str] | None = None,
    key_file: str | os.PathLike[str] | None = None,
    rotate_operator_token: bool = False,
    access_log: bool = False,
    on_ready: Callable[[str, Path], None] | None = None,
    reputation_floor: float = REPUTATION_FLOOR,
    mismatches_per_client_day: int = MISMATCHES_PER_CLIENT_DAY,
) -> None:
    """Run the credit service in the foreground until SIGINT/SIGTERM.

    Creates the database, the ed25519 key and the operator account (its token
    written to ``operator_token_file``, mode 600) on first start; calls
    ``on_ready(url, token_file)`` once the socket listens. A provider whose reputation falls
    below ``reputation_floor`` is quarantined (0: never); one client account's verdicts count
    at most ``mismatches_per_client_day`` mismatches against one provider a day (-1: no limit).
    """
    import uvicorn

    # The event loop and the writer thread hand the GIL back and forth for every
    # request; the default 5 ms switch interval would add up to that to each one.
    sys.setswitchinterval(float(os.environ.get("GPUNET_CREDITS_SWITCH_INTERVAL", "0.0005")))
    store = open_store(db, key_file=key_file, reputation_floor=reputation_floor,
                       mismatches_per_client_day=mismatches_per_client_day)
    try:
        token_path = Path(operator_token_file) if operator_token_file else beside_db(store.url, ".operator-token")
        token = store.ensure_operator()
        if token is None and rotate_operator_token:
            token = store.call("rotate_token", None, {"account": "operator"})["token"]
        if token is not None:
            write_private(token_path, f"{token}\n".encode())
            logger.info("wrote the operator token to %s (mode 600)", token_path)
        elif not token_path.exists():
            logger.warning("the operator account exists but its token file %s is missing; restart with "
                           "--rotate-operator-token to issue a new one", token_path)
        sock = bind_socket(host, port)
        bound = sock.getsockname()
        shown = f"[{bound[0]}]" if sock.family == socket.AF_INET6 else bound[0]
        url = f"http://{shown}:{bound[1]}"
        config = uvicorn.Config(build_app(store), log_level="warning", access_log=access_log,
                                lifespan="on", timeout_keep_alive=60, backlog=2048, http=_coalescing_protocol())
        server = uvicorn.Server(config)
        if on_ready is not None:
            on_ready(url, token_path)
        # uvicorn re-raises SIGTERM after its graceful shutdown; turn it into an
        # exception here so the store still signs a last head and closes.
        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, _raise_stop)
        try:
            server.run(sockets=[sock])
        except _Stop:
            pass
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
    finally:
        store.close()
        logger.info("credit service stopped")

