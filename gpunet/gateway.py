"""``gpunet gateway``: an open network's front door for notebooks (HTTPS, Starlette on uvicorn).

On an open network the gateway is the only Dask client (its certificate has the
gateway role, :mod:`gpunet.roles`). Notebooks speak HTTPS to it
(:mod:`gpunet.client.gateway_link`) with their credit token, which the gateway
checks with the credit service (a client account's, or the request is refused). For
each notebook session it runs gpunet's own notebook-side machinery, a
:class:`gpunet.client.network.Network` over the data-only comm opened with that
notebook's token: placement, holds on that notebook's account, metered and verified
submission, verdicts.

What a notebook sends is never unpickled here: a job's code, names and flags are
data (msgpack, checked field by field); what the notebook pickled (inputs, map
items, a function and its arguments) stays opaque bytes that travel inside a task
whose function is gpunet's own runner (:func:`gpunet.worker.runner.run_job`), and
only the worker loads them. Each job's live output and progress stream back as
server-sent events, then its results as codec data (:mod:`gpunet.codec`): a small one in
its last event, a large one held until the notebook fetches it as a framed body, its arrays'
buffers raw after a msgpack head (:mod:`gpunet.framed`), as a job's large inputs come.

Limits: a request body is capped while it streams in (413), a job's pickled bytes
are capped (413), submissions are rate-limited per account (429), an account holds at
most a few sessions (429) and jobs in flight (429) at once; the job events nobody read
are capped per job and gateway-wide, and a reader that stays too slow is dropped; one
address holds at most so many connections, and a request's headers and body are due
within deadlines (:mod:`gpunet.gateway_guard`). Every job takes a device slot, and a
revoked token stops at the next submission, or within :data:`REVOCATION_CHECK_S` when its
notebook sends nothing more (the open sessions' tokens are asked about that often).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import os
import secrets
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpunet import certs, codec, framed, packages, wire
from gpunet.client.gateway_link import GATEWAY_PROTOCOL, blob_in, pack
from gpunet.client.handle import JobHandle, new_job_id
from gpunet.client.network import Network, join
from gpunet.client.reused import lookup_reusable, store_for_reuse
from gpunet.credits import CreditClient
from gpunet.credits._service import bind_socket, read_capped_body
from gpunet.errors import (AuthError, CreditsError, CreditsRequestError, GatewayError, GpunetError, OptionError,
                           PackageError, ProviderDataError)
from gpunet.kernels import Tolerance
from gpunet.metering.owners import client_name
from gpunet.gateway_guard import (ConnectionCounts, Relay, UnreadResults, guarded_protocol, guarded_server,
                                  holder_of, repeat_while)
from gpunet.guarded_tls import expect_scheduler_at, use_guarded_tls
from gpunet.provenance import run_facts
from gpunet.reuse import gateway_reuse_key
from gpunet.roles import TokenBucket
from gpunet.verify.quorum import Policy
from gpunet.wire import Job, PassedOn, result_to_event
from gpunet.worker.environment import checked_requirements

logger = logging.getLogger(__name__)

#: The largest request body the gateway reads (a job with its pickled inputs).
DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
#: What a request body's decoded lists and maps may take (gpunet.codec.CONTAINER_BYTES): a
#: job of MAX_ITEMS pickled items takes about a third of it.
MAX_BODY_CONTAINER_BYTES = 64 * 1024 * 1024
#: The most bytes a job's pickles (inputs, items, function, arguments) may take together.
DEFAULT_MAX_JOB_BYTES = 32 * 1024 * 1024
#: Per account: submissions at once, and per second after that.
DEFAULT_SUBMIT_BURST = 20
DEFAULT_SUBMITS_PER_S = 5.0
#: Per account: sessions open at once (each is a Dask client on the gateway).
DEFAULT_MAX_SESSIONS = 4
#: A session with no job running and no request for this long is closed (its holds go
#: back) when its account opens another: a kernel that died leaves one behind.
SESSION_IDLE_S = 15 * 60.0
#: How long a checked token is believed before the credit service is asked again, for
#: reads; a submission and a session's opening always ask (a revoked token stops at once).
TOKEN_TTL_S = 5.0
#: How often the tokens of the open sessions are asked about, so that a revoked one's
#: running jobs stop even if its notebook never sends another request.
REVOCATION_CHECK_S = 10.0
#: Per address (an IPv6 one: its /64): tokens the credit service does not know, at once
#: and per second after that; past them the address's unknown tokens are refused (429)
#: without asking the credit service, whose every check takes one of the gateway's threads.
UNKNOWN_TOKEN_BURST = 10
UNKNOWN_TOKENS_PER_S = 0.2
#: Per account: jobs in flight at once (sent and not yet read to their end).
DEFAULT_MAX_JOBS_IN_FLIGHT = 32
#: Bytes of job events and held results the notebooks have not read yet: per job, and
#: gateway-wide (a job holds its results, at most a session's max_result_bytes, and events).
DEFAULT_MAX_UNREAD_BYTES_PER_JOB = 512 * 1024 * 1024
DEFAULT_MAX_UNREAD_BYTES = 2 * 1024 * 1024 * 1024
#: A reader that reads nothing for this long while bytes wait for it is dropped.
DEFAULT_SLOW_READER_S = 60.0
#: Connections one address may hold open, and how long a request's headers (from its
#: first byte, or the connection's opening) and then its body may take to arrive.
DEFAULT_MAX_CONNECTIONS_PER_ADDRESS = 64
DEFAULT_HEADERS_S = 10.0
DEFAULT_BODY_S = 120.0
#: The most items a map may have, and the longest cell, through the gateway.
MAX_ITEMS = 100_000
MAX_CODE_CHARS = 1024 * 1024
#: The longest --timeout a job may ask for (seconds).
MAX_TIMEOUT_S = 7 * 24 * 3600.0
#: Per session: reads that wait for its settlements (usage, receipt) at once.
WAITING_READS = 2
#: How long a stopping gateway waits for open connections (a notebook's event stream, a
#: kept-alive connection) before it closes them: their sessions close and holds go back.
GRACEFUL_SHUTDOWN_S = 5.0
#: How often a job's progress is sent while nothing else happens.
PROGRESS_EVERY_S = 1.0
#: Results of more bytes than this are held for the notebook to fetch as a framed body
#: (raw buffers); smaller ones travel in the job's last event (one round trip fewer).
INLINE_RESULT_BYTES = 256 * 1024
#: A held result's body goes out in pieces of at most this many bytes (views: no copy).
BODY_PIECE_BYTES = 1024 * 1024
#: The Dask resources a job may ask for.
RESOURCES = (wire.DEVICE_RESOURCE, wire.GPU_RESOURCE, wire.GPU_MEMORY_RESOURCE)
#: The message of a request without a token.
NO_TOKEN = ("send your credit token: %gpunet connect https://GATEWAY --token-file FILE (or GPUNET_TOKEN); the "
            "operator of the credit service issues it")


@dataclass
class GatewayLimits:
    """What the gateway caps (see the module docstring)."""

    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_job_bytes: int = DEFAULT_MAX_JOB_BYTES
    submit_burst: int = DEFAULT_SUBMIT_BURST
    submits_per_s: float = DEFAULT_SUBMITS_PER_S
    max_sessions: int = DEFAULT_MAX_SESSIONS
    max_jobs_in_flight: int = DEFAULT_MAX_JOBS_IN_FLIGHT
    max_unread_bytes_per_job: int = DEFAULT_MAX_UNREAD_BYTES_PER_JOB
    max_unread_bytes: int = DEFAULT_MAX_UNREAD_BYTES
    slow_reader_s: float = DEFAULT_SLOW_READER_S
    max_connections_per_address: int = DEFAULT_MAX_CONNECTIONS_PER_ADDRESS
    headers_s: float = DEFAULT_HEADERS_S
    body_s: float = DEFAULT_BODY_S


class ServedNetwork(Network):
    """A notebook's network on the gateway: a :class:`Network` whose jobs' live events
    (those its handles accept as their workers') also go to the job's relay. A job's data
    travels inside its tasks: an open network's workers fetch nothing from another
    provider's workers (:class:`gpunet.roles.WorkerDoor`)."""

    scatters = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.relays: dict[str, Relay] = {}
        #: each job's packages as its notebook resolved them (the gateway's own environment is not the notebook's)
        self.environments: dict[str, packages.CellEnvironment] = {}
        #: verified cells whose notebook lets a kept result answer them (gpunet.reuse: not --no-reuse)
        self.reuse_asked: set[str] = set()

    def environment_of(self, job: Job, pip: Any = ()) -> packages.CellEnvironment:
        """What the notebook said ``job`` needs (checked by :func:`environment_from`): never
        what the gateway's own environment would make of the job's imports."""
        return self.environments.get(job.job_id) or packages.CellEnvironment()

    def register_job(self, handle: JobHandle) -> None:
        """Hand ``handle`` its events, and its relay the events it shows."""
        relay = self.relays.get(handle.job.job_id)
        if relay is not None:
            shown = handle._on_live_event

            def relayed(message: dict[str, Any]) -> None:
                shown(message)
                if handle._shows(message) and message.get("kind") in ("started", "stream", "installing"):
                    relay.put("live", {name: value for name, value in message.items() if name != "mac"})

            handle._on_live_event = relayed  # type: ignore[method-assign]
        super().register_job(handle)


class RelayProgress:
    """The progress a job's handle reports (:class:`gpunet.ui.progress.JobProgress`'s
    calls), sent to the notebook, which shows it with its own widget."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.done = 0
        self.asked = 0.0
        self.started = False

    def running(self, worker: str, device: str, *, rerun_after: str | None = None) -> None:
        """The job started (the notebook sees the worker's own event)."""
        self.started = True

    def wants_reason(self) -> bool:
        """Whether to say why the job still waits (about once a second, before it starts)."""
        if self.started or time.monotonic() - self.asked < PROGRESS_EVERY_S:
            return False
        self.asked = time.monotonic()
        return True

    def waiting(self, reason: str) -> None:
        """Say why the job still waits."""
        self.relay.put("progress", {"done": self.done, "waiting": reason})

    def tick(self, done: int | None = None) -> None:
        """Say how many units finished, when that changed."""
        if done is not None and done != self.done:
            self.done = done
            self.relay.put("progress", {"done": done})

    def ran_on(self, worker: str, device: str) -> None:
        """Nothing: the results say where each unit ran."""

    def installing(self, text: str) -> None:
        """Nothing: the notebook sees the worker's own event."""


@dataclass
class ClientSession:
    """One notebook's session on the gateway."""

    session_id: str
    account: str
    token_digest: str
    network: ServedNetwork
    jobs: dict[str, JobHandle] = field(default_factory=dict)
    last_used: float = field(default_factory=time.monotonic)
    #: the relays of jobs whose result waits to be fetched, by job id
    held: dict[str, Relay] = field(default_factory=dict)


def free_held(session: ClientSession) -> None:
    """Free the results ``session``'s notebook did not fetch (its session ended)."""
    for relay in list(session.held.values()):
        relay.loop.call_soon_threadsafe(relay.release)
    session.held.clear()


def shut(session: ClientSession, reason: str) -> None:
    """Stop ``session``'s jobs for ``reason`` and close its client (its holds go back)."""
    for handle in list(session.jobs.values()):
        handle.stop(reason)
    free_held(session)
    try:
        session.network.close(force=True)
    except AuthError:  # a revoked token: its holds were given back; seeing them settled is refused
        logger.warning("gateway: session %s of account %s closed without its token (revoked)",
                       session.session_id[:8], session.account)
        session.network.client.close(timeout=5)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def refusal(message: str, status: int, code: str) -> Any:
    """The gateway's answer refusing a request: one clear message."""
    from starlette.responses import Response

    return Response(pack({"error": {"status": status, "code": code, "message": message}}), status_code=status,
                    media_type="application/msgpack")


def answer(data: Any) -> Any:
    """A msgpack answer."""
    from starlette.responses import Response

    return Response(pack(data), media_type="application/msgpack")


class Gateway:
    """The gateway's state: the notebooks' sessions, checked tokens, rate limits."""

    def __init__(self, scheduler: str, credits_url: str, limits: GatewayLimits | None = None) -> None:
        self.scheduler = scheduler
        self.credits_url = credits_url
        self.limits = limits or GatewayLimits()
        self.sessions: dict[str, ClientSession] = {}
        self._tokens: dict[str, tuple[str, float]] = {}
        self._buckets: dict[str, TokenBucket] = {}
        #: sessions being opened (connecting to the scheduler), by account
        self._opening: dict[str, int] = {}
        #: reads that wait for settlements in flight, by session
        self._waiting: dict[str, int] = {}
        self._lock = threading.Lock()
        self.unread = UnreadResults(self.limits.max_unread_bytes_per_job, self.limits.max_unread_bytes,
                                    self.limits.slow_reader_s)
        #: each account's jobs whose streams still hold something on the gateway
        self._in_flight: dict[str, set[Relay]] = {}
        #: the role of each token checked, by digest (a role never changes)
        self._roles: dict[str, tuple[str, str]] = {}
        self._watcher: asyncio.Task[None] | None = None
        #: each address's room for tokens the credit service does not know
        self._unknown_tokens: dict[str, TokenBucket] = {}

    # -- who is asking ---------------------------------------------------------------
    async def account_of(self, request: Any, *, fresh: bool = False) -> tuple[str, str]:
        """(account, token) of the request's bearer token, a client account's; ``fresh``:
        asked of the credit service now (a submission: a revoked token stops at once)."""
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if not token:
            raise GatewayError(NO_TOKEN, status=401, code="no_token")
        digest = _digest(token)
        known = self._tokens.get(digest)
        if known is not None and known[1] > time.monotonic() and not fresh:
            return known[0], token
        address = holder_of(request.client.host if request.client else "?")
        unknown = self._unknown_tokens.get(address)
        if known is None and unknown is not None and unknown.take(0) and unknown.tokens < 1:
            raise GatewayError(f"your address sent more than {UNKNOWN_TOKEN_BURST} tokens the credit service does "
                               f"not know; this gateway checks one more every {1 / UNKNOWN_TOKENS_PER_S:g} s from "
                               "it: use the token the operator issued (--token-file, or GPUNET_TOKEN)",
                               status=429, code="too_many_bad_tokens")
        try:
            account = await asyncio.to_thread(self._check_token, token)
        except GatewayError as exc:
            if exc.code == "bad_token":  # revoked: what its sessions hold goes back
                self._close_sessions_of(digest)
                self._count_unknown_token(address)
            raise
        self._tokens[digest] = (account, time.monotonic() + TOKEN_TTL_S)
        return account, token

    def _count_unknown_token(self, address: str) -> None:
        """One more token the credit service does not know came from ``address``."""
        if len(self._unknown_tokens) > 4096:  # forget the addresses whose room is whole again
            for name, bucket in list(self._unknown_tokens.items()):
                if bucket.take(0) and bucket.tokens >= bucket.burst:
                    del self._unknown_tokens[name]
        self._unknown_tokens.setdefault(address, TokenBucket(UNKNOWN_TOKEN_BURST, UNKNOWN_TOKENS_PER_S)).take(1)

    def _close_sessions_of(self, digest: str) -> None:
        """Close (in the background) the sessions opened with the token of ``digest``:
        their jobs stop, their holds go back."""
        for session in [s for s in self.sessions.values() if s.token_digest == digest]:
            self.sessions.pop(session.session_id, None)
            logger.warning("gateway: closing session %s of account %s: its token was revoked", session.session_id[:8],
                           session.account)
            threading.Thread(target=shut, args=(session, "the notebook's token was revoked"), daemon=True).start()

    def _watch_revocations(self) -> None:
        """Keep asking about the open sessions' tokens while there are any (on the event loop)."""
        self._watcher = repeat_while(self._watcher, lambda: bool(self.sessions), REVOCATION_CHECK_S,
                                     self._check_open_tokens)

    async def _check_open_tokens(self) -> None:
        """Ask the credit service about every open session's token; close the revoked ones' sessions."""
        tokens = {s.token_digest: s.network.credits.token for s in list(self.sessions.values())}
        for digest, token in tokens.items():
            try:
                await asyncio.to_thread(self._check_token, token)
            except GatewayError as exc:
                if exc.code == "bad_token":
                    self._close_sessions_of(digest)
            except Exception as exc:  # noqa: BLE001 - the credit service away: ask again next round
                logger.warning("gateway: could not check a session's token: %s", exc)

    def _check_token(self, token: str) -> str:
        digest = _digest(token)
        try:
            with CreditClient(self.credits_url, token) as credits:
                account = credits.ping()["account"]
                known = self._roles.get(digest)
                role = known[1] if known is not None and known[0] == account else credits.account(account)["role"]
        except AuthError:
            self._tokens.pop(digest, None)
            raise GatewayError("the credit service does not know this token: check the file given with "
                               "--token-file (or GPUNET_TOKEN), or ask the operator for a client account's token",
                               status=401, code="bad_token") from None
        if role != "client":
            raise GatewayError(f"this is a {role} account's token; notebooks use a client account's token "
                               "(the operator makes one with `gpunet credits create-account NAME --role client`)",
                               status=403, code="wrong_role")
        self._roles[digest] = (account, role)
        return account

    def session_of(self, request: Any, account: str, token: str) -> ClientSession:
        """The request's session, which must be this token's."""
        session = self.sessions.get(request.path_params["sid"])
        if session is None or session.token_digest != _digest(token):
            raise GatewayError("no such session of yours on this gateway (it was closed, or the gateway restarted): "
                               "connect again (%gpunet connect)", status=404, code="no_session")
        session.last_used = time.monotonic()
        return session

    def _take_submission(self, account: str) -> None:
        limits = self.limits
        bucket = self._buckets.setdefault(account, TokenBucket(limits.submit_burst, limits.submits_per_s))
        if not bucket.take(1):
            raise GatewayError(f"too many submissions: this gateway takes at most {limits.submits_per_s:g} jobs a "
                               f"second from one account (bursts of {limits.submit_burst}); wait a moment and send "
                               "it again, or send many items as one --map", status=429, code="rate_limited")

    def _take_job_slot(self, account: str) -> None:
        """Refuse a submission (429) where ``account`` has the most jobs in flight it may."""
        mine = self._in_flight.setdefault(account, set())
        mine.difference_update([relay for relay in mine if relay.finished])
        if len(mine) >= self.limits.max_jobs_in_flight:
            raise GatewayError(f"account {account} has {len(mine)} jobs in flight on this gateway, the most it may: "
                               "read their results (wait for the cells you sent, or interrupt "
                               "some), then send it again", status=429, code="too_many_jobs")

    def _relay_for(self, session: ClientSession, job_id: str) -> Relay:
        """The relay of a new job of ``session``: its unread bytes counted; a reader
        dropped for reading too slowly stops the job."""
        def stop(reason: str) -> None:
            handle = session.jobs.get(job_id)
            if handle is not None:
                threading.Thread(target=handle.stop, args=(reason,), daemon=True).start()

        relay = Relay(asyncio.get_running_loop(), self.unread, account=session.account, job_id=job_id, on_drop=stop)
        self._in_flight.setdefault(session.account, set()).add(relay)
        return relay

    # -- the endpoints -----------------------------------------------------------------
    async def open_session(self, request: Any) -> Any:
        """POST /v1/sessions: open this notebook's credit session and its Dask client."""
        account, token = await self.account_of(request, fresh=True)
        body = await self._body(request)
        mine = [s for s in self.sessions.values() if s.account == account]
        for idle in [s for s in mine if not s.jobs and time.monotonic() - s.last_used > SESSION_IDLE_S]:
            self.sessions.pop(idle.session_id, None)
            mine.remove(idle)
            free_held(idle)
            await asyncio.to_thread(idle.network.close, force=True)
        opening = self._opening.get(account, 0)  # sessions of this account being opened right now count too
        count = opening + sum(1 for s in self.sessions.values() if s.account == account)
        if count >= self.limits.max_sessions:
            raise GatewayError(f"account {account} already has {count} sessions open on this gateway, "
                               f"the most it may; disconnect one (%gpunet disconnect), or wait: one idle for "
                               f"{SESSION_IDLE_S / 60:g} minutes is closed then", status=429, code="too_many_sessions")
        theirs = body.get("protocol", 1)
        if theirs != GATEWAY_PROTOCOL:
            newer = type(theirs) is int and theirs > GATEWAY_PROTOCOL
            raise GatewayError(f"this gateway speaks gpunet's gateway protocol {GATEWAY_PROTOCOL} (large inputs and "
                               f"results as framed binary bodies) and the notebook's gpunet speaks {theirs!r}: " + (
                                   "ask the operator to upgrade the gateway, or install the gateway's gpunet version "
                                   "in the notebook" if newer else "upgrade gpunet in the notebook (pip install -U "
                                   "gpunet) to the gateway's version"),
                               status=426, code="upgrade_gateway" if newer else "upgrade_notebook")
        budget = _integer(body, "budget", 1, 10**15)
        caps = {name: _integer(body, name, 1, wire.DEFAULT_MAX_RESULT_BYTES if name == "max_result_bytes"
                               else 64 * wire.DEFAULT_MAX_STREAM_BYTES_PER_S)
                for name in ("max_result_bytes", "max_stream_bytes_per_s")}
        caps["max_result_bytes"] = min(caps["max_result_bytes"], result_bytes_within(self.limits))
        notebook = (_text(body, "kernel", 200), _text(body, "notebook", 1000))
        self._opening[account] = opening + 1
        try:
            network = await asyncio.to_thread(join, self.scheduler, credits=self.credits_url, token=token,
                                              budget=budget, timeout=30.0, result_format=wire.CODEC,
                                              notebook=notebook, network_class=ServedNetwork,
                                              client_name=client_name(account), **caps)
        finally:
            self._opening[account] -= 1
        session = ClientSession(secrets.token_urlsafe(24), account, _digest(token), network)  # type: ignore[arg-type]
        self.sessions[session.session_id] = session
        self._watch_revocations()
        logger.info("gateway: account %s opened session %s", account, session.session_id[:8])
        return answer({"session_id": session.session_id, "credit_session": network.session, "account": account,
                       "credits": self.credits_url, "protocol": GATEWAY_PROTOCOL})

    async def close_session(self, request: Any) -> Any:
        """DELETE /v1/sessions/{sid}: stop its jobs, give back its holds, close its client."""
        account, token = await self.account_of(request)
        session = self.session_of(request, account, token)
        self.sessions.pop(session.session_id, None)
        await asyncio.to_thread(shut, session, "the notebook disconnected")
        return answer({"closed": True})

    async def state(self, request: Any) -> Any:
        """GET /v1/sessions/{sid}/state: the workers and the scheduler's metering state."""
        account, token = await self.account_of(request)
        network = self.session_of(request, account, token).network

        def read() -> dict[str, Any]:
            return {"workers": [dataclasses.asdict(info) for info in network.workers()],
                    "metering": network.metering_state()}

        return answer(await asyncio.to_thread(read))

    async def capabilities(self, request: Any) -> Any:
        """POST /v1/sessions/{sid}/capabilities: each worker's measured capability."""
        account, token = await self.account_of(request, fresh=True)
        network = self.session_of(request, account, token).network
        self._take_submission(account)  # measuring runs work on every worker: it counts as a submission
        body = await self._body(request)
        return answer(await asyncio.to_thread(network.capabilities, refresh=bool(body.get("refresh"))))

    async def usage(self, request: Any) -> Any:
        """GET /v1/sessions/{sid}/usage: the credit session's figures."""
        account, token = await self.account_of(request)
        network = self.session_of(request, account, token).network
        return answer(await asyncio.to_thread(network.credits.usage, network.session))

    async def spending(self, request: Any) -> Any:
        """GET /v1/sessions/{sid}/spending: what ``%gpunet usage`` shows of this session,
        once what finished was settled (bounded): the credit service's figures with the
        pre-authorized part, and the tasks and device-seconds by worker."""
        account, token = await self.account_of(request)
        network = self.session_of(request, account, token).network

        def read() -> dict[str, Any]:
            settled = network.meter.wait_settled()
            tally = [{"worker": worker, "device": entry.device, "tasks": entry.tasks, "seconds": entry.seconds}
                     for worker, entry in list(network.meter.tally.items())]
            return {"usage": network.meter.usage(), "settled": settled, "tally": tally}

        return answer(await self._waiting_once(request, read))

    async def receipt(self, request: Any) -> Any:
        """GET /v1/sessions/{sid}/receipt: this session's receipt (its ledger entries with
        inclusion proofs and a signed head), asked with the notebook's own token for the
        credit session the gateway opened for it: never another's."""
        account, token = await self.account_of(request)
        network = self.session_of(request, account, token).network

        def read() -> dict[str, Any]:
            network.meter.wait_settled()  # what the scheduler paid for the cells so far lands first (bounded)
            return network.credits.receipt(network.session)

        return answer(await self._waiting_once(request, read))

    async def consistency_proof(self, request: Any) -> Any:
        """GET /v1/sessions/{sid}/ledger/consistency?first=N&second=M: the credit service's
        proof that the ledger of ``first`` entries grew into that of ``second`` (which the
        notebook checks a receipt's head against the heads it saw before with)."""
        account, token = await self.account_of(request)
        network = self.session_of(request, account, token).network
        sizes = {}
        for name in ("first", "second"):
            text = request.query_params.get(name)
            if text is not None and not (text.isascii() and text.isdigit() and len(text) < 16):
                raise GatewayError(f"{name} must be a ledger size (a whole number)", status=422, code="invalid")
            sizes[name] = None if text is None else int(text)
        if sizes["first"] is None:
            raise GatewayError("first must be a ledger size (a whole number)", status=422, code="invalid")
        return answer(await asyncio.to_thread(network.credits.consistency_proof, sizes["first"], sizes["second"]))

    async def environments(self, request: Any) -> Any:
        """GET /v1/sessions/{sid}/environments: each provider's worker -> what its provider
        says is installed there and whether it installs more (what ``%gpunet env`` shows)."""
        account, token = await self.account_of(request)
        network = self.session_of(request, account, token).network
        return answer(await asyncio.to_thread(network.environment_reports, fresh=True))

    async def _waiting_once(self, request: Any, read: Callable[[], Any]) -> Any:
        """``read()`` off the event loop, at most :data:`WAITING_READS` at a time per session
        (a live ``%gpunet usage`` and a ``%gpunet receipt``): each may wait seconds for
        settlements, so a notebook asking many at once gets 429."""
        sid = request.path_params["sid"]
        if self._waiting.get(sid, 0) >= WAITING_READS:
            raise GatewayError(f"this session already waits for its settlements {WAITING_READS} times (%gpunet usage "
                               "or receipt); ask again when those answered", status=429, code="busy")
        self._waiting[sid] = self._waiting.get(sid, 0) + 1
        try:
            return await asyncio.to_thread(read)
        finally:
            self._waiting[sid] -= 1
            if not self._waiting[sid]:
                del self._waiting[sid]

    async def providers(self, request: Any) -> Any:
        """GET /v1/sessions/{sid}/providers: the providers' trust records."""
        account, token = await self.account_of(request)
        network = self.session_of(request, account, token).network
        return answer(await asyncio.to_thread(network.credits.provider_records))

    async def stop_job(self, request: Any) -> Any:
        """POST /v1/sessions/{sid}/jobs/{job}/stop: stop one of this session's jobs."""
        account, token = await self.account_of(request)
        session = self.session_of(request, account, token)
        body = await self._body(request)
        handle = session.jobs.get(request.path_params["job"])
        if handle is not None:
            await asyncio.to_thread(handle.stop, _text(body, "reason", 200) or "stopped by the notebook")
        return answer({"stopped": handle is not None})

    async def fetch_result(self, request: Any) -> Any:
        """GET /v1/sessions/{sid}/jobs/{job}/result: a job's held result, once, as a framed
        body (:mod:`gpunet.framed`): only the session's own token gets it (404 for anyone
        else's), and it is freed as it is sent."""
        from starlette.responses import StreamingResponse

        account, token = await self.account_of(request)
        session = self.session_of(request, account, token)
        relay = session.held.pop(request.path_params["job"], None)
        if relay is None:
            raise GatewayError("no result of this job waits for you here (it was fetched already, or freed when its "
                               "stream broke or its session ended): run it again", status=404, code="no_result")
        if relay.dropped is not None or relay.held is None:
            raise GatewayError(relay.dropped or "the job's result was freed before it was fetched: run it again",
                               status=410, code="result_gone")
        return StreamingResponse(relay.send_held(BODY_PIECE_BYTES), media_type=framed.MEDIA_TYPE,
                                 headers={"Cache-Control": "no-store", "Content-Length": str(relay.held.size)})

    async def submit(self, request: Any) -> Any:
        """POST /v1/sessions/{sid}/jobs: send a job; the answer is its event stream."""
        from starlette.responses import StreamingResponse

        account, token = await self.account_of(request, fresh=True)
        session = self.session_of(request, account, token)
        self._take_submission(account)
        spec = await self._body(request, framed_allowed=True)
        job, options = job_from(spec, session.network.topic, self.limits)
        environment = environment_from(spec)
        reuse = _flag(spec, "reuse") and Policy.parse(options["verify"]).active  # only verified results are reused
        self._take_job_slot(account)  # no await from here until the relay counts: concurrent ones see it
        relay = self._relay_for(session, job.job_id)
        session.network.environments[job.job_id] = environment
        if reuse:
            session.network.reuse_asked.add(job.job_id)
        session.network.relays[job.job_id] = relay
        thread = threading.Thread(target=self._run, args=(session, job, options, relay), daemon=True,
                                  name=f"gpunet-gateway-{job.job_id}")
        thread.start()

        async def events() -> AsyncIterator[bytes]:
            try:
                async for piece in relay.pieces():
                    yield piece
            finally:
                if not relay.over and job.job_id in session.jobs:  # the notebook went away: stop it
                    handle = session.jobs[job.job_id]
                    threading.Thread(target=handle.stop, args=("the notebook went away",), daemon=True).start()

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})

    def _run(self, session: ClientSession, job: Job, options: dict[str, Any], relay: Relay) -> None:
        """Send ``job`` for ``session``, wait for it, relay how it went (a thread)."""
        network = session.network
        try:
            count = len(options["items"]) if options["items"] is not None else 1
            wait_s = network.timeout_for(options["timeout"], count=count, max_credits=options["max_credits"],
                                         max_rate=options["max_rate"])
            key = reuse_key_for(session, job, options)
            if key is not None and job.job_id in network.reuse_asked and answered_from_reuse(network, job, key, relay):
                return
            remote = network.submit(job, **options)
            session.jobs[job.job_id] = remote
            if relay.dropped is not None:  # its reader was dropped while the job was being sent
                remote.stop(relay.dropped)
            network.sent()
            relay.put("sent", {"job": job.job_id, "holds": remote.placed_holds()})
            results = remote.wait(wait_s, progress=RelayProgress(relay), echo=False)
            facts = run_facts(remote, results)
            self._send_results(session, job, relay, {"results": [result_to_event(result) for result in results],
                                                     "facts": facts})
            if key is not None and facts["verification"].get("verdict") == "verified":
                store_for_reuse(network, remote, results, key, {"job": job.job_id, **facts})
        except GpunetError as exc:
            relay.put("error", {"type": type(exc).__name__, "message": str(exc)})
        except Exception as exc:  # noqa: BLE001 - the notebook hears of it; the gateway goes on
            logger.exception("gateway: job %s failed", job.job_id)
            relay.put("error", {"type": "GpunetError", "message": f"the gateway could not run the job "
                                f"({type(exc).__name__}: {exc}); see the gateway's log"})
        finally:
            session.jobs.pop(job.job_id, None)
            network.relays.pop(job.job_id, None)
            network.environments.pop(job.job_id, None)
            network.reuse_asked.discard(job.job_id)
            relay.end()

    @staticmethod
    def _send_results(session: ClientSession, job: Job, relay: Relay, results: dict[str, Any]) -> None:
        """Send a job's ``results``: in its last event when small, else held for the notebook
        to fetch as a framed body (its ``results`` event names its size)."""
        body = framed.FramedBody(results)
        if body.size <= INLINE_RESULT_BYTES:
            relay.put("results", results)
            return
        session.held[job.job_id] = relay
        relay.hold_result(body, "results-ready", {"bytes": body.size})

    async def _body(self, request: Any, *, framed_allowed: bool = False) -> dict[str, Any]:
        body = await read_capped_body(request, self.limits.max_body_bytes)
        if not body:
            return {}
        head, data = body, b""
        if framed_allowed and request.headers.get("content-type", "") == framed.MEDIA_TYPE:
            start = framed.PREFIX.size
            end = start + framed.head_length(body, len(body), "the request body")
            head, data = memoryview(body)[start:end], memoryview(body)[end:]
        try:  # off the event loop; its lists and maps charged, so a small body cannot expand 64-fold
            value = await asyncio.to_thread(codec.unpack_plain, head, budget=MAX_BODY_CONTAINER_BYTES)
        except ProviderDataError:
            raise GatewayError(f"the request body's lists and maps would take more than {MAX_BODY_CONTAINER_BYTES} "
                               "bytes of the gateway's memory; send what gpunet's notebook side sends (or split the "
                               "job)", status=413, code="too_many_values") from None
        except Exception as exc:  # noqa: BLE001 - whatever is not msgpack
            raise GatewayError(f"the request body is not msgpack ({type(exc).__name__}); send what gpunet's "
                               "notebook side sends", status=400, code="malformed") from None
        if not isinstance(value, dict):
            raise GatewayError("the request body must be a msgpack map", status=400, code="malformed")
        if head is not body:  # the buffers laid out after the head: views of the body, no copy (off the loop)
            value = await asyncio.to_thread(framed.laid_out_in, data, value, what="the request body")
        return value

    def close(self) -> None:
        """Close every session (their holds go back)."""
        for session in list(self.sessions.values()):
            self.sessions.pop(session.session_id, None)
            session.held.clear()  # the event loop stops: its relays go with it
            try:
                session.network.close(force=True)
            except Exception as exc:  # noqa: BLE001 - closing goes on
                logger.warning("gateway: could not close session %s: %s", session.session_id[:8], exc)


def result_bytes_within(limits: GatewayLimits) -> int:
    """The largest result a session may ask for whose body (its frames, a head and the
    job's events) fits within what may wait unread for a job, and for all of them."""
    return max(1024, min(limits.max_unread_bytes_per_job, limits.max_unread_bytes) - 1024 * 1024)


# -- a job from a request, checked field by field -------------------------------------


def _bad(name: str, want: str) -> GatewayError:
    return GatewayError(f"the job's {name} must be {want}", status=422, code="invalid")


def _integer(body: dict[str, Any], name: str, low: int, high: int) -> int:
    value = body.get(name)
    if type(value) is not int or not low <= value <= high:
        raise _bad(name, f"a whole number from {low} to {high}")
    return value


def _number(body: dict[str, Any], name: str, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if type(value) not in (int, float) or not 0 < value <= high:
        raise _bad(name, f"a number above 0 and at most {high:g}")
    return float(value)


def _text(body: dict[str, Any], name: str, limit: int) -> str:
    value = body.get(name) or ""
    if not isinstance(value, str) or len(value) > limit:
        raise _bad(name, f"text of at most {limit} characters")
    return value


def _names(body: dict[str, Any], name: str) -> list[str]:
    value = body.get(name) or []
    if not isinstance(value, list) or len(value) > 10_000 or not all(
            isinstance(item, str) and item.isidentifier() for item in value):
        raise _bad(name, "a list of Python names")
    return value


def _flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise _bad(name, "true or false")
    return value


def job_from(spec: dict[str, Any], topic: str, limits: GatewayLimits) -> tuple[Job, dict[str, Any]]:
    """The :class:`Job` (with a fresh id, the gateway's ``topic`` and a fresh event key) and the
    submission options a notebook's request asks for; :class:`GatewayError` naming
    the first field that is wrong, or the job's bytes over ``limits.max_job_bytes``."""
    code, function = spec.get("code"), spec.get("function")
    if (code is None) == (function is None):
        raise _bad("code or function", "exactly one of a cell's code and a pickled function")
    if code is not None and (not isinstance(code, str) or len(code) > MAX_CODE_CHARS):
        raise _bad("code", f"text of at most {MAX_CODE_CHARS} characters")
    if function is not None and (function := blob_in(function)) is None:
        raise _bad("function", "the function's pickle")
    arguments = blob_in(spec.get("arguments") or b"")
    if arguments is None:
        raise _bad("arguments", "the arguments' pickle")
    raw_inputs = spec.get("inputs") or {}
    inputs = {name: blob_in(blob) for name, blob in raw_inputs.items()} if isinstance(raw_inputs, dict) else None
    if inputs is None or not all(isinstance(name, str) and name.isidentifier() and blob is not None
                                 for name, blob in inputs.items()):
        raise _bad("inputs", "a map of Python names to pickles")
    items = spec.get("items")
    if items is not None:
        items = [blob_in(item) for item in items] if isinstance(items, list) and 0 < len(items) <= MAX_ITEMS else None
        if items is None or any(item is None for item in items):
            raise _bad("items", f"a list of 1 to {MAX_ITEMS} pickles")
    size = len(function or b"") + len(arguments) + sum(map(len, inputs.values())) + sum(map(len, items or []))
    if size > limits.max_job_bytes:
        raise GatewayError(f"the job's inputs take {size} bytes, over this gateway's cap of {limits.max_job_bytes}: "
                           "send less (load large data on the worker, inside the cell), or split the job",
                           status=413, code="job_too_large")
    resources = spec.get("resources") or {}
    if not isinstance(resources, dict) or not all(
            name in RESOURCES and type(value) in (int, float) and 0 <= value < 2**53
            for name, value in resources.items()):
        raise _bad("resources", f"a map of {', '.join(RESOURCES)} to numbers")
    resources = {wire.DEVICE_RESOURCE: 1, **resources}  # every task takes a device slot: a draining worker has none
    if resources[wire.DEVICE_RESOURCE] < 1:
        raise _bad("resources", f"a map whose {wire.DEVICE_RESOURCE} is at least 1 (every job through the gateway "
                   "takes a device slot of its worker)")
    workers = spec.get("workers")
    flat = [w for group in workers for w in (group if isinstance(group, list) else [group])] if isinstance(
        workers, list) else []
    if workers is not None and (not isinstance(workers, list) or not all(isinstance(w, str) and len(w) < 300
                                                                          for w in flat)):
        raise _bad("workers", "a list of worker addresses, or one such list per item")
    verify = spec.get("verify")
    if verify is not None:
        if not isinstance(verify, str):
            raise _bad("verify", "a policy such as replicate:2")
        Policy.parse(verify)  # a policy that does not parse is refused with its own message
    tolerance = spec.get("tolerance")
    if tolerance is not None:
        if not isinstance(tolerance, list) or not 2 <= len(tolerance) <= 3 or not all(
                type(value) in (int, float) and value >= 0 for value in tolerance):
            raise _bad("tolerance", "[rtol, atol] or [rtol, atol, max_mismatch], numbers of at least 0")
        tolerance = Tolerance(*map(float, tolerance))
    map_name = spec.get("map_name")
    if map_name is not None and not (isinstance(map_name, str) and map_name.isidentifier()):
        raise _bad("map_name", "a Python name")
    job = Job(new_job_id(), code=code, function=function, inputs=dict(inputs), arguments=arguments,
              outputs=tuple(_names(spec, "outputs")), strict_outputs=_flag(spec, "strict_outputs"),
              display_last_expression=_flag(spec, "display_last_expression"), map_name=map_name,
              topic=topic, announce=_flag(spec, "announce"))
    options = {"resources": {name: float(value) for name, value in resources.items()},
               "items": None if items is None else [PassedOn(item) for item in items], "workers": workers,
               "max_credits": _number(spec, "max_credits", 10.0**15), "timeout": _number(spec, "timeout", MAX_TIMEOUT_S),
               "verify": verify, "tolerance": tolerance, "max_rate": _number(spec, "max_rate", 10.0**9),
               "prefer": _text(spec, "prefer", 20) or "cheapest"}
    return job, options


def environment_from(spec: dict[str, Any]) -> packages.CellEnvironment:
    """The packages a job's notebook resolved for it (``environment``: ``requirements``,
    names to version specifiers; ``gpu_build``; ``sources``, where each came from), as data
    checked as a worker checks them; an empty environment where none was sent."""
    sent = spec.get("environment")
    if sent is None:
        return packages.CellEnvironment()
    if not isinstance(sent, dict):
        raise _bad("environment", "a map of requirements, gpu_build and sources")
    try:
        requirements = checked_requirements(sent.get("requirements") or {})
    except PackageError as exc:
        raise GatewayError(f"the job's environment: {exc}; send what gpunet's notebook side sends (--pip "
                           "\"name==version\")", status=422, code="invalid") from None
    sources, gpu_packages = sent.get("sources") or {}, sent.get("gpu_packages") or {}
    for name, value in (("sources", sources), ("gpu_packages", gpu_packages)):
        if not isinstance(value, dict) or len(value) > 1000 or not all(
                isinstance(key, str) and isinstance(text, str) and len(key) <= 200 and len(text) <= 200
                for key, text in value.items()):
            raise _bad(f"environment's {name}", "a map of names to short texts")
    return packages.CellEnvironment(requirements, {name: sources[name] for name in requirements if name in sources},
                                    _flag(sent, "gpu_build") or bool(gpu_packages), dict(gpu_packages))


def reuse_key_for(session: ClientSession, job: Job, options: dict[str, Any]) -> str | None:
    """The reuse key of a verified cell (None for any other job): computed here from what
    the notebook sent (:func:`gpunet.reuse.gateway_reuse_key`), for this session's account
    only. Its verified result is kept under it, and looked up where the notebook lets it be
    reused (not ``--no-reuse``), as a direct network's notebook does."""
    if job.code is None or not Policy.parse(options["verify"]).active:
        return None
    items = None if options["items"] is None else [item.blob for item in options["items"]]
    return gateway_reuse_key(session.account, job, items, session.network.environment_of(job).requirements)


def answered_from_reuse(network: ServedNetwork, job: Job, key: str, relay: Relay) -> bool:
    """Send the notebook the verified result kept under ``key`` (nothing held or run),
    saying whose run it was; False where there is none."""
    found = lookup_reusable(network, key)
    if found is None:
        return False
    relay.put("sent", {"job": job.job_id, "holds": [], "reused": found.get("record") or {}})
    relay.put("results", {"results": found["results"], "facts": None})
    return True


# -- the app -----------------------------------------------------------------------------


def build_app(gateway: Gateway) -> Any:
    """The Starlette application serving ``gateway``."""
    from starlette.applications import Starlette
    from starlette.requests import ClientDisconnect
    from starlette.routing import Route

    def wrap(handler: Callable[[Any], Any]) -> Callable[[Any], Any]:
        async def endpoint(request: Any) -> Any:
            try:
                return await handler(request)
            except GatewayError as exc:
                return refusal(str(exc), exc.status, exc.code)
            except ClientDisconnect:  # its connection closed (too slow a body): nobody hears the answer
                return refusal("the request's connection closed before its body came", 408, "too_slow")
            except CreditsRequestError as exc:  # the request's body (413) or the credit service's answer
                return refusal(str(exc), getattr(exc, "status", 400) or 400, getattr(exc, "code", "refused"))
            except (CreditsError, GpunetError) as exc:
                return refusal(str(exc), 503 if isinstance(exc, CreditsError) else 400, type(exc).__name__)
            except Exception:  # noqa: BLE001 - answer, log, keep serving
                logger.exception("gateway: unexpected error in %s %s", request.method, request.url.path)
                return refusal("internal error in the gateway; see its log", 500, "internal")
        return endpoint

    async def health(request: Any) -> Any:
        return answer({"ok": True, "sessions": len(gateway.sessions)})

    session = "/v1/sessions/{sid}"
    routes = [
        Route("/v1/health", health, methods=["GET"]),
        Route("/v1/sessions", wrap(gateway.open_session), methods=["POST"]),
        Route(session, wrap(gateway.close_session), methods=["DELETE"]),
        Route(f"{session}/state", wrap(gateway.state), methods=["GET"]),
        Route(f"{session}/capabilities", wrap(gateway.capabilities), methods=["POST"]),
        Route(f"{session}/usage", wrap(gateway.usage), methods=["GET"]),
        Route(f"{session}/providers", wrap(gateway.providers), methods=["GET"]),
        Route(f"{session}/spending", wrap(gateway.spending), methods=["GET"]),
        Route(f"{session}/receipt", wrap(gateway.receipt), methods=["GET"]),
        Route(f"{session}/ledger/consistency", wrap(gateway.consistency_proof), methods=["GET"]),
        Route(f"{session}/environments", wrap(gateway.environments), methods=["GET"]),
        Route(f"{session}/jobs", wrap(gateway.submit), methods=["POST"]),
        Route(f"{session}/jobs/{{job}}/stop", wrap(gateway.stop_job), methods=["POST"]),
        Route(f"{session}/jobs/{{job}}/result", wrap(gateway.fetch_result), methods=["GET"]),
    ]

    async def not_found(request: Any, exc: Any) -> Any:
        status = getattr(exc, "status_code", 404)
        return refusal(f"no such route: {request.method} {request.url.path} (gpunet's notebook side knows the API)",
                       status, "no_route")

    return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})


def use_certificate(scheduler: str, ca_file: str | Path, cert_file: str | Path, key_file: str | Path) -> None:
    """Make this process the open network's gateway on the Dask wire: its Dask clients
    present ``cert_file`` (which must bind the gateway role), over guarded TLS, to a
    ``scheduler`` that must present the scheduler role."""
    import dask

    certs.security(ca_file, cert_file, key_file)  # a clear error for a missing file or a roleless certificate
    identity = certs.identity_of_file(cert_file)
    if identity is None or identity.role != certs.GATEWAY:
        raise OptionError(f"{cert_file} is a {identity.role if identity else 'roleless'} certificate; the gateway "
                          "needs one of the gateway role: gpunet certs issue --role gateway --name NAME --host HOST")
    dask.config.set({"distributed.comm.require-encryption": True, "distributed.comm.tls.ca-file": str(ca_file),
                     "distributed.comm.tls.client.cert": str(cert_file),
                     "distributed.comm.tls.client.key": str(key_file)})
    use_guarded_tls()
    certs.watch_revocations(ca_file)
    expect_scheduler_at(scheduler)


def serve(scheduler: str, credits_url: str, *, ca_file: str | Path, cert_file: str | Path, key_file: str | Path,
          host: str = "127.0.0.1", port: int = 0, https_cert: str | Path | None = None,
          https_key: str | Path | None = None, limits: GatewayLimits | None = None,
          on_ready: Callable[[str], None] | None = None) -> None:
    """Run the gateway in the foreground until SIGINT/SIGTERM: HTTPS on ``host:port``
    (with ``https_cert`` / ``https_key``, else the gateway certificate), the only Dask
    client of the open network at ``scheduler`` with the gateway certificate."""
    import uvicorn

    if not scheduler.startswith("tls://"):
        raise OptionError(f"the gateway serves an open network, whose scheduler speaks tls://, not {scheduler}")
    use_certificate(scheduler, ca_file, cert_file, key_file)
    for path in (https_cert, https_key):
        if path is not None and not os.path.isfile(path):
            raise OptionError(f"the file {path} does not exist (give the HTTPS certificate and key the operator issued)")
    gateway = Gateway(scheduler, credits_url, limits)
    sock = bind_socket(host, port)
    bound = sock.getsockname()
    url = f"https://{f'[{bound[0]}]' if sock.family == socket.AF_INET6 else bound[0]}:{bound[1]}"
    limits = gateway.limits
    protocol = guarded_protocol(ConnectionCounts(limits.max_connections_per_address), limits.headers_s, limits.body_s)
    config = uvicorn.Config(build_app(gateway), log_level="warning", access_log=False, lifespan="off",
                            http=protocol, timeout_keep_alive=60, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
                            ssl_certfile=str(https_cert or cert_file),
                            ssl_keyfile=str(https_key or key_file))
    # a connection in its TLS handshake is not yet the protocol's: the listener counts those too, up to twice
    server = guarded_server(config, limits.headers_s, 2 * limits.max_connections_per_address)
    if on_ready is not None:
        on_ready(url)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, lambda *_: setattr(server, "should_exit", True))
    try:
        server.run(sockets=[sock])
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        gateway.close()
        logger.info("gateway stopped")
