"""``CreditClient``: the Python client of the credit service, on ``requests``.

Every call that moves credits takes an idempotency ``key``; the client retries
those (and reads) on connection errors and 502/503/504 with the *same* key, so a
retry never moves credits twice. ``create_account`` is not retried: it has no
key. Errors are :mod:`gpunet.credits._errors` classes naming the URL::

    >>> ops = CreditClient("http://127.0.0.1:8765", operator_token)
    >>> alice = ops.create_account("alice", "client")["token"]
    >>> ops.mint("alice", 1_000, key="mint-alice-1")
    >>> me = CreditClient("http://127.0.0.1:8765", alice)
    >>> sid = me.open_session(500, notebook="analysis.ipynb", kernel="k-1")
    >>> hid = me.hold(sid, 100, key="cell-7-attempt-1")
    >>> ops.settle(hid, "gpu-host-3", 40, key="cell-7-attempt-1-settle")
    >>> me.usage(sid)["left"]
    460

Amounts are integers: credits are indivisible units (price work in whole credits).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import time
import uuid
from typing import Any, NamedTuple
from urllib.parse import urlencode, urlsplit

from gpunet.credits._errors import error_for_status
from gpunet.errors import CreditsUnavailableError, GpunetError, InvalidRequestError

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = (3.05, 30.0)
#: Sets the clients' timeouts: ``READ`` or ``CONNECT,READ`` seconds (default 3.05,30).
TIMEOUT_ENV = "GPUNET_CREDITS_TIMEOUT"


def timeout_from_env() -> tuple[float, float]:
    """The credit clients' ``(connect, read)`` timeouts: ``GPUNET_CREDITS_TIMEOUT`` where set
    (``READ`` or ``CONNECT,READ`` seconds), else :data:`DEFAULT_TIMEOUT`."""
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_TIMEOUT
    try:
        numbers = [float(part) for part in text.split(",")]
    except ValueError:
        numbers = []
    if len(numbers) not in (1, 2) or not all(0 < number < 3600 for number in numbers):
        raise GpunetError(f"{TIMEOUT_ENV} must be READ or CONNECT,READ seconds (each above 0 and under 3600), "
                          f"got {text!r:.40}; unset it for the defaults ({DEFAULT_TIMEOUT[0]:g},{DEFAULT_TIMEOUT[1]:g})")
    return (numbers[0], numbers[-1]) if len(numbers) == 2 else (DEFAULT_TIMEOUT[0], numbers[0])
_RETRY_STATUS = {502, 503, 504}
#: The media type of MessagePack bodies (see gpunet.credits._service).
MSGPACK = "application/msgpack"
_MSGPACK_HEADERS = {"Content-Type": MSGPACK, "Accept": f"{MSGPACK}, application/json"}


_JSON_HEADERS = {"Content-Type": "application/json"}
_json_text = json.JSONEncoder(allow_nan=False).encode  # the body requests would send for json=
_json_loads = json.loads


class _Unreachable(Exception):
    """No HTTP answer came (refused, reset, timed out): the transport's error, wrapped."""


class _Answer(NamedTuple):
    """An HTTP answer, whichever transport carried it."""

    status: int
    content_type: str
    content: bytes
    reason: str


def _loopback_pool(url: str, timeout: float | tuple[float, float]) -> Any:
    """urllib3's connection pool for a plain-HTTP service on this machine, else None (requests'
    Session then carries the requests: proxies, TLS and its certificate store)."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not _is_loopback(url):
        return None
    import urllib3

    connect, read = timeout if isinstance(timeout, tuple) else (timeout, timeout)
    # As many kept-alive connections as requests' Session keeps (threads beyond them open their own).
    # No retry of urllib3's own (the client retries, with its idempotency keys) and no redirect
    # followed (the service answers none), as requests' adapter asks of urllib3.
    return urllib3.HTTPConnectionPool(parts.hostname, parts.port or 80, maxsize=10, block=False,
                                      timeout=urllib3.Timeout(connect=connect, read=read),
                                      retries=urllib3.Retry(0, read=False))


def _unpack(body: bytes) -> Any:
    """A MessagePack answer's objects (the service sends plain maps, arrays, strings and numbers)."""
    import msgpack

    return msgpack.unpackb(body, raw=False)


def _is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class CreditClient:
    """A client of the credit service at ``url`` acting as the account behind ``token``.

    ``timeout`` is passed to ``requests`` (seconds, or ``(connect, read)``; default
    :func:`timeout_from_env`);
    ``retries`` is how many times an idempotent call is tried again after a
    connection error or a 502/503/504, with exponential backoff from ``backoff``.
    """

    def __init__(self, url: str, token: str, *, timeout: float | tuple[float, float] | None = None,
                 retries: int = 3, backoff: float = 0.1) -> None:
        import requests

        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout_from_env() if timeout is None else timeout
        self.retries = retries
        self.backoff = backoff
        self._headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        self._http = requests.Session()
        # No proxy look-ups for a loopback service: they cost more than the request.
        self._http.trust_env = not _is_loopback(self.url)
        self._http.headers.update(self._headers)
        # A service on this machine over plain HTTP (the embedded network's, a scheduler's own): no
        # proxy, no TLS, no cookies, so urllib3's pool alone carries the requests; a request cost the
        # client 360 µs of CPU through requests' Session and 160 through the pool.
        self._pool = _loopback_pool(self.url, self.timeout)
        self._prefix = urlsplit(self.url).path  # a service mounted under a path: its requests go there
        self._packs = True  # batches go as MessagePack until the service shows it reads JSON only

    def __repr__(self) -> str:
        return f"CreditClient({self.url!r})"

    def close(self) -> None:
        """Close the HTTP connections."""
        self._http.close()
        if self._pool is not None:
            self._pool.close()

    def __enter__(self) -> CreditClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transport --

    def _request(self, method: str, path: str, *, json: Any = None, params: dict | None = None,
                 idempotent: bool = True, packed: bytes | None = None) -> Any:
        """Send a request (``packed``: a MessagePack body, asking for a MessagePack answer) and
        return its answer's objects; retry an idempotent one; raise the error it answers."""
        url = self.url + path
        if packed is not None:
            body, headers = packed, _MSGPACK_HEADERS
        elif json is not None:
            body, headers = _json_text(json).encode(), _JSON_HEADERS
        else:
            body, headers = None, None
        attempts = 1 + (self.retries if idempotent else 0)
        last: Exception | None = None
        for attempt in range(attempts):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                resp = self._send(method, path, body, headers, params)
            except _Unreachable as unreachable:
                exc = unreachable.__cause__ or unreachable  # the transport's own error
                last = CreditsUnavailableError(
                    f"credit service at {self.url} is unreachable ({method} {path}: {exc.__class__.__name__}: "
                    f"{exc}); check that `gpunet credits serve` runs there and the URL is right",
                    url=self.url)
                last.__cause__ = exc
                logger.debug("attempt %d of %s %s failed: %s", attempt + 1, method, url, exc)
                continue
            if resp.status < 400:
                binary = resp.content_type.startswith(MSGPACK)
                try:
                    return _unpack(resp.content) if binary else _json_loads(resp.content)
                except ValueError as exc:
                    raise CreditsUnavailableError(
                        f"credit service at {self.url} answered {method} {path} with a body that is not "
                        f"{'MessagePack' if binary else 'JSON'} ({resp.content[:80]!r}); is that URL a gpunet "
                        "credit service?", url=self.url, status=resp.status) from exc
            try:
                err = _json_loads(resp.content).get("error") or {}
            except (ValueError, AttributeError):
                err = {}
            message = err.get("message") or resp.content[:200].decode(errors="replace") or resp.reason
            details = {k: v for k, v in err.items() if k not in ("status", "code", "message")}
            error = error_for_status(resp.status, err.get("code", ""),
                                     f"{message} [{resp.status} from {self.url}{path}]",
                                     url=self.url, details=details)
            if resp.status in _RETRY_STATUS:
                last = error
                continue
            raise error
        assert last is not None
        raise last

    def _send(self, method: str, path: str, body: bytes | None, headers: dict[str, str] | None,
              params: dict | None) -> _Answer:
        """One HTTP exchange (no retry): through the loopback pool where there is one, else requests'
        Session; raises :class:`_Unreachable` when no answer came."""
        if self._pool is None:
            import requests

            try:
                resp = self._http.request(method, self.url + path, data=body, params=params, headers=headers,
                                          timeout=self.timeout)
            except requests.RequestException as exc:
                raise _Unreachable(exc) from exc
            return _Answer(resp.status_code, resp.headers.get("content-type", ""), resp.content, resp.reason)
        import urllib3

        target = self._prefix + path + (f"?{urlencode(params)}" if params else "")
        try:
            resp = self._pool.urlopen(method, target, body=body, headers={**self._headers, **(headers or {})},
                                      redirect=False, preload_content=True)
        except urllib3.exceptions.HTTPError as exc:
            raise _Unreachable(exc) from exc
        return _Answer(resp.status, resp.headers.get("content-type", ""), resp.data, resp.reason or "")

    def _post(self, path: str, body: dict[str, Any], *, idempotent: bool = True) -> Any:
        return self._request("POST", path, json=body, idempotent=idempotent)

    def _post_packed(self, path: str, body: dict[str, Any]) -> Any:
        """POST ``body`` as MessagePack (cheaper to encode and decode, on both sides, than JSON),
        or as JSON where MessagePack cannot carry it (the service then names what is wrong) or
        the service reads JSON only (an earlier version: it refused the body as malformed JSON;
        nothing was moved, and this client sends it JSON from then on)."""
        import msgpack

        if self._packs:
            try:
                packed = msgpack.packb(body)
            except (TypeError, ValueError, OverflowError):
                packed = None
            if packed is not None:
                try:
                    return self._request("POST", path, packed=packed)
                except InvalidRequestError as exc:
                    if exc.code != "malformed_json" or "malformed JSON" not in str(exc):
                        raise
                    logger.info("the credit service at %s reads JSON only; sending it JSON", self.url)
                    self._packs = False
        return self._post(path, body)

    def _get(self, path: str, **params: Any) -> Any:
        return self._request("GET", path, params={k: v for k, v in params.items() if v is not None} or None)

    # -- accounts and credits --

    def health(self) -> dict[str, Any]:
        """Return ``{"ok": True, "size": ledger size, "public_key": hex}``."""
        return self._get("/v1/health")

    def ping(self) -> dict[str, Any]:
        """A trivial authenticated round trip (used to compare request overheads)."""
        return self._post("/v1/ping", {})

    def create_account(self, name: str, role: str) -> dict[str, Any]:
        """Create an account (operator only); returns ``{"account", "role", "token"}``.

        Not retried: it has no idempotency key and a second try would find the name taken.
        """
        return self._post("/v1/accounts", {"name": name, "role": role}, idempotent=False)

    def revoke_token(self, name: str) -> dict[str, Any]:
        """Revoke account ``name``'s token (operator only): it stops working at once; returns
        ``{"account", "token"}`` with its new token. Not retried: a second try would revoke that one."""
        return self._post(f"/v1/accounts/{name}/token", {}, idempotent=False)

    def accounts(self) -> list[dict[str, Any]]:
        """Return every account with role and balance (operator only)."""
        return self._get("/v1/accounts")["accounts"]

    def account(self, name: str) -> dict[str, Any]:
        """Return ``{"account", "role", "balance"}`` of account ``name`` (one's own, or any for an operator)."""
        return self._get(f"/v1/accounts/{name}")

    def balance(self, account: str) -> int:
        """Return the balance of ``account`` (one's own, or any for an operator)."""
        return int(self.account(account)["balance"])

    def provider_account(self, needed_for: str) -> str:
        """Return the name of this token's account if it is a provider's; else raise
        :class:`GpunetError` saying that ``needed_for`` needs a provider's token."""
        name = self.ping()["account"]
        role = self.account(name)["role"]
        if role != "provider":
            raise GpunetError(f"this token is account {name!r}'s, a {role} account, not a provider's: {needed_for} "
                              "needs a provider's token: that of an account the credit service's operator created "
                              "with role provider")
        return name

    def earnings(self, provider: str, after: int = -1) -> dict[str, Any]:
        """Return what ``provider`` was paid (her own token, or an operator's).

        ``{"account", "role", "balance", "size", "total", "today", "since", "after", "series", "record",
        "quarantine_below"}``:
        ``total`` and ``today`` (since ``since``, 00:00 UTC) are ``{"credits", "tasks", "seconds"}``
        (device-seconds); ``series`` lists the settlements to her after ledger entry ``after``,
        each ``[index, time, credits, tasks, seconds]``; ``record`` is her trust record and
        ``quarantine_below`` the reputation under which she is quarantined. Nothing in it names a
        client or a task.
        """
        return self._get(f"/v1/accounts/{provider}/earnings", after=after)

    def mint(self, account: str, amount: int, key: str) -> dict[str, Any]:
        """Mint ``amount`` credits into ``account`` (operator only); ``key`` makes it idempotent."""
        return self._post("/v1/mint", {"account": account, "amount": amount, "key": key})

    # -- sessions, holds --

    def open_session(self, budget: int, notebook: str | None = "", kernel: str | None = "", *,
                     key: str | None = None) -> str:
        """Open a session with ``budget`` credits paid by this token's account; returns its id.

        ``key`` makes it idempotent; without one a fresh key is made, so the
        client's own retries never open two sessions.
        """
        body: dict[str, Any] = {"budget": budget, "notebook": notebook or "", "kernel": kernel or "",
                                "key": key or f"open-session-{uuid.uuid4().hex}"}
        return self._post("/v1/sessions", body)["session"]

    def hold(self, session: str, amount: int, key: str, meter: str | None = None) -> str:
        """Hold ``amount`` credits of ``session`` (at dispatch); returns the hold id.

        ``meter`` names the meter account of the scheduler the work goes to: the only
        meter that may pay or close the hold (without one, only an operator may).
        Raises :class:`BudgetExceededError` (402) when the session's budget or the
        client's balance cannot cover it.
        """
        body: dict[str, Any] = {"session": session, "amount": amount, "key": key}
        if meter:
            body["meter"] = meter
        return self._post("/v1/holds", body)["hold"]

    def _pay(self, route: str, hold: str, provider: str, amount: int, key: str,
             memo: dict[str, Any] | None) -> dict[str, Any]:
        """POST a payment out of ``hold`` (``settle`` or ``settle_part``)."""
        body: dict[str, Any] = {"provider": provider, "amount": amount, "key": key}
        if memo is not None:
            body["memo"] = memo
        return self._post(f"/v1/holds/{hold}/{route}", body)

    def settle(self, hold: str, provider: str, amount: int, key: str,
               memo: dict[str, Any] | None = None) -> dict[str, Any]:
        """Pay ``amount`` of ``hold`` to ``provider``, release the rest and close it (operator only).

        On a hold already paid in parts, ``amount`` is at most what is left of it.
        ``memo`` (a JSON object, at most 4096 bytes canonically encoded) is recorded in the
        settlement's ledger entry and covered by its hash, e.g. ``{"verified": "replicate:2",
        "providers": ["alice", "bob"], "digest": "sha256:..."}``. Returns ``{"hold", "session",
        "provider", "paid", "released", "total_paid", "entries"}``.
        """
        return self._pay("settle", hold, provider, amount, key, memo)

    def settle_part(self, hold: str, provider: str, amount: int, key: str,
                    memo: dict[str, Any] | None = None) -> dict[str, Any]:
        """Pay ``amount`` (>= 1) of ``hold`` to ``provider`` and leave the hold open (operator only).

        One hold can so pay for many tasks, to several providers, as they finish; close it
        with :meth:`release` (gives back what is left) or :meth:`settle`. The parts never add
        up to more than the hold: a part beyond what is left is refused
        (:class:`InvalidRequestError`, 422, naming what is left) and moves nothing. Each part
        is one ``settle`` ledger entry with its ``memo``; the session's ``spent`` grows at once.
        Returns ``{"hold", "session", "provider", "paid", "total_paid", "left", "entries"}``.
        """
        return self._pay("settle_part", hold, provider, amount, key, memo)

    def release(self, hold: str, key: str) -> dict[str, Any]:
        """Close a hold and give what is left of it back to the session's client (operator only;
        failed or lost work, or the rest of a hold paid in parts). Returns ``{"hold", "session",
        "released", "total_paid", "entries"}``; the hold ends ``settled`` if parts were paid from it."""
        return self._post(f"/v1/holds/{hold}/release", {"key": key})

    def holds(self, state: str = "held", older_than: int | None = None, *,
              account: str | None = None) -> list[dict[str, Any]]:
        """Return the holds still open (``state="held"``, the only state listed), oldest first.

        ``older_than`` keeps those placed at least that many seconds ago (by the service's
        clock), ``account`` those of one client account. Each is ``{"hold", "session", "account",
        "amount", "paid", "left", "created", "age"}``: ``paid`` so far by :meth:`settle_part`,
        ``left`` what :meth:`release` would give back, ``created`` the time of its ledger
        ``hold`` entry, ``age`` in seconds. Every account's holds need an operator token; any
        account may list its own with ``account=`` its name (else :class:`ForbiddenError`).
        """
        return self._get("/v1/holds", state=state, older_than=older_than, account=account)["holds"]

    def usage(self, session: str) -> dict[str, Any]:
        """Return a session's ``budget``, ``held``, ``spent`` and ``left`` (and who, what, when)."""
        return self._get(f"/v1/sessions/{session}")

    def batch(self, items: list[dict[str, Any]], *, raise_on_error: bool = False) -> list[dict[str, Any]]:
        """Run many ``mint``/``hold``/``settle``/``settle_part``/``release``/``record_verification`` items
        in one request and one transaction.

        Each item is ``{"op": ..., "key": ..., **that call's fields}`` (settle, settle_part and
        release name their ``hold``; a settle or settle_part may carry a ``memo``); ``record_verification``
        items (``provider``, ``agreed``) go in the same transaction as the settlements.
        Returns one result per item, in order: ``{"ok": True, ...}`` or ``{"ok": False,
        "status": 402, "error": {...}}``; a failed item changed nothing. With
        ``raise_on_error`` the first failure is raised.
        """
        results = self._post_packed("/v1/batch", {"items": items})["results"]
        if raise_on_error:
            for i, res in enumerate(results):
                if not res.get("ok"):
                    err = res.get("error", {})
                    raise error_for_status(res.get("status", 400), err.get("code", ""),
                                           f"batch item {i}: {err.get('message')}", url=self.url,
                                           details={k: v for k, v in err.items() if k not in ("code", "message")})
        return results

    # -- providers' trust records --

    def record_verification(self, provider: str, agreed: bool, key: str, hold: str | None = None) -> dict[str, Any]:
        """Record that a verified result of ``provider`` agreed (or not) with the others (operator,
        or the meter of ``hold``: the verified task's hold, settled to ``provider``).

        Returns its trust record ``{"provider", "consecutive_valid", "valid", "mismatches",
        "reputation", "quarantined", "quarantine_reason", "updated"}``; a provider whose
        reputation falls below the floor comes back ``quarantined``. ``key`` makes it idempotent.
        """
        body: dict[str, Any] = {"agreed": agreed, "key": key}
        if hold:
            body["hold"] = hold
        return self._post(f"/v1/providers/{provider}/verifications", body)

    def clear_quarantine(self, provider: str, key: str) -> dict[str, Any]:
        """Lift ``provider``'s quarantine and forgive its mismatches (operator only); returns its record."""
        return self._post(f"/v1/providers/{provider}/clear", {"key": key})

    def provider_record(self, provider: str) -> dict[str, Any]:
        """Return ``provider``'s trust record (defaults if nothing was recorded yet)."""
        return self._get(f"/v1/providers/{provider}")

    def provider_records(self) -> list[dict[str, Any]]:
        """Return the trust record of every provider account, by name."""
        return self._get("/v1/providers")["providers"]

    # -- the ledger --

    def head(self) -> dict[str, Any]:
        """Return a signed tree head ``{"size", "root", "timestamp", "signature", "public_key", "key_id"}``."""
        return self._get("/v1/ledger/head")

    def heads(self) -> list[dict[str, Any]]:
        """Return every signed tree head the service has stored."""
        return self._get("/v1/ledger/heads")["heads"]

    def entries(self, start: int = 0, limit: int = 10000) -> dict[str, Any]:
        """Return ``{"start", "size", "entries": [...]}`` (operator only)."""
        return self._get("/v1/ledger/entries", start=start, limit=limit)

    def inclusion_proof(self, index: int, size: int | None = None) -> dict[str, Any]:
        """Return ``{"index", "size", "leaf_hash", "proof": [hex...]}`` for entry ``index``."""
        return self._get("/v1/ledger/proof/inclusion", index=index, size=size)

    def consistency_proof(self, first: int, second: int | None = None) -> dict[str, Any]:
        """Return ``{"first", "second", "first_root", "second_root", "proof": [hex...]}``."""
        return self._get("/v1/ledger/proof/consistency", first=first, second=second)

    def receipt(self, session: str) -> dict[str, Any]:
        """Return the session's receipt: its entries with inclusion proofs and a signed head.

        It verifies offline with :func:`gpunet.credits.verify_receipt` or
        ``gpunet ledger verify --receipt FILE``. Its ``service`` is the address it was
        fetched from, for which a reader pins the key that signed it.
        """
        receipt = self._get(f"/v1/sessions/{session}/receipt")
        receipt["service"] = self.url.rstrip("/")
        return receipt

