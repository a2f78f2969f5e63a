"""What keeps a stranger from exhausting the gateway (:mod:`gpunet.gateway`) with
connections it holds open or results it never reads.

- :class:`UnreadResults`: every job's events wait in its :class:`Relay` until the
  notebook reads them. The bytes nobody read yet are counted per job stream and
  gateway-wide; a reader over either cap, or one that reads nothing for
  ``slow_reader_s`` while bytes wait, is dropped: its job is stopped (the holds of what
  did not run go back), what waited for it is freed, the reason is logged and is the
  last event of its stream, which it reads if it comes back. A large result waits in
  its relay, counted the same way, until the notebook fetches it as a framed body
  (:meth:`Relay.hold_result`, :mod:`gpunet.framed`), or is freed when its stream broke,
  its reader is dropped, or its session ends.
- :func:`guarded_protocol`: uvicorn's HTTP/1.1 protocol with a cap on the connections
  open from one address, and deadlines for a request's headers and for its body: a
  connection that sends nothing, or a request a byte at a time, is answered 408 and
  closed; one over the cap is answered 429 and closed. :func:`guarded_server` closes a
  connection whose TLS handshake does not finish within the headers' deadline.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

from gpunet.client.gateway_link import pack, sse_frame
from gpunet.framed import FramedBody

logger = logging.getLogger(__name__)

#: A job's events go out in pieces of at most this many bytes, so a reader that stops
#: reading leaves at most one piece in the connection's buffers, not a whole result.
PIECE_BYTES = 64 * 1024
#: What ends an event cut short (a dropped reader): the notebook's side discards it.
CUT_MARK = b"\n:cut\n\n"
#: How often the slow readers are looked for.
SWEEP_EVERY_S = 1.0


class Relay:
    """A job's events on their way to its notebook: put from any thread, read as
    server-sent events on the gateway's event loop (:meth:`pieces`)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, unread: UnreadResults | None = None, *, account: str = "",
                 job_id: str = "", on_drop: Callable[[str], None] | None = None) -> None:
        self.loop = loop
        self.unread = unread
        self.account = account
        self.job_id = job_id
        #: called (on the event loop) with the reason when this reader is dropped
        self.on_drop = on_drop
        self.frames: deque[bytes | None] = deque()
        self.ready = asyncio.Event()
        #: the job's thread has put its last event
        self.over = False
        #: the stream was read to its end, or its connection closed
        self.closed = False
        #: why this reader was dropped, or None
        self.dropped: str | None = None
        #: bytes put and not yet read (the rest of the frame being sent, and those waiting)
        self.waiting_bytes = 0
        self.last_read = time.monotonic()
        self._sending: bytes | None = None
        #: a result waiting to be fetched (:meth:`hold_result`), and its bytes not yet sent
        self.held: FramedBody | None = None
        self.held_bytes = 0

    def put(self, event: str, data: Any) -> None:
        """Send ``event`` with ``data`` (msgpack-able) to the notebook."""
        self.loop.call_soon_threadsafe(self._add, sse_frame(event, data))

    def end(self) -> None:
        """No more events."""
        self.loop.call_soon_threadsafe(self._add, None)

    def hold_result(self, body: FramedBody, event: str, data: Any) -> None:
        """Keep ``body`` (a result) until the notebook fetches it (:meth:`send_held`), its
        bytes counted as unread ones, then send ``event`` (which says it is ready)."""
        self.loop.call_soon_threadsafe(self._hold, body, sse_frame(event, data))

    def _hold(self, body: FramedBody, frame: bytes) -> None:
        if self.dropped is not None or self.closed or (self.unread is not None and
                                                       not self.unread.admit(self, body.size)):
            return
        if self.unread is None:
            self.waiting_bytes += body.size
        self.held, self.held_bytes = body, body.size
        self._add(frame)

    async def send_held(self, piece_bytes: int) -> AsyncIterator[bytes | memoryview]:
        """The held result's body in pieces, counted as read as they go; freed at the end,
        or when its connection closes, or its reader is dropped, on the way."""
        body = self.held
        try:
            if body is None:
                return
            for piece in body.pieces(piece_bytes):
                if self.dropped is not None:
                    return
                yield piece
                self.held_bytes -= len(piece)
                self._read(len(piece))
        finally:
            self.release()

    def release(self) -> None:
        """Free the held result (fetched, or nobody will: its stream broke, its session ended)."""
        if self.held is None:
            return
        self.held = None
        if self.dropped is None:
            self.waiting_bytes -= self.held_bytes
            if self.unread is not None:
                self.unread.total -= self.held_bytes
        self.held_bytes = 0
        if self.closed and self.unread is not None:
            self.unread.forget(self)

    @property
    def finished(self) -> bool:
        """Whether this job holds nothing on the gateway any more (its events read and its
        result fetched, or dropped)."""
        return self.dropped is not None or (self.held is None and (self.closed or (
            self.over and self.waiting_bytes == 0)))

    def _add(self, frame: bytes | None) -> None:
        if frame is None:
            self.over = True
        elif self.dropped is not None or self.closed:
            return  # what a dropped (or gone) reader's job still says goes nowhere
        elif self.unread is not None and not self.unread.admit(self, len(frame)):
            return
        self.frames.append(frame)
        self.ready.set()

    async def pieces(self) -> AsyncIterator[bytes]:
        """The stream's bytes as they come, each frame in pieces of at most :data:`PIECE_BYTES`."""
        ended = False
        try:
            while True:
                while not self.frames:
                    self.ready.clear()
                    await self.ready.wait()
                frame = self.frames.popleft()
                if frame is None:
                    ended = True
                    return
                self._sending, offset = frame, 0
                del frame
                while self._sending is not None and offset < len(self._sending):
                    piece = self._sending[offset:offset + PIECE_BYTES]
                    offset += len(piece)
                    yield piece
                    self._read(len(piece))
                if self._sending is None and offset:  # dropped in the middle of a frame
                    yield CUT_MARK
                self._sending = None
        finally:
            self.closed = True
            if not ended:  # the notebook went away before it heard its result was ready
                self.release()
            if self.dropped is None:  # what it left unread (its connection closed mid-event) is freed
                left = self.waiting_bytes - self.held_bytes
                self.waiting_bytes -= left
                if self.unread is not None:
                    self.unread.total -= left
            if self.unread is not None and self.held is None:
                self.unread.forget(self)

    def _read(self, size: int) -> None:
        self.last_read = time.monotonic()
        if self.dropped is None:
            self.waiting_bytes -= size
            if self.unread is not None:
                self.unread.total -= size

    def drop(self, reason: str) -> None:
        """Free what waits for this reader, stop its job, and leave ``reason`` as its stream's last event."""
        if self.dropped is not None:
            return
        self.dropped = reason
        if self.unread is not None:
            self.unread.total -= self.waiting_bytes
            self.unread.forget(self)
        self.waiting_bytes = 0
        self._sending = None
        self.held, self.held_bytes = None, 0
        self.frames.clear()
        self.frames.extend([sse_frame("error", {"type": "GatewayError", "message": reason}), None])
        self.ready.set()
        logger.warning("gateway: dropped the reader of job %s (account %s): %s", self.job_id, self.account, reason)
        if self.on_drop is not None:
            self.on_drop(reason)


class UnreadResults:
    """The bytes of job events nobody read yet: per job stream at most ``per_job``,
    gateway-wide at most ``total_cap``; a reader that reads nothing for
    ``slow_reader_s`` while bytes wait for it is dropped (:meth:`sweep`)."""

    def __init__(self, per_job: int, total_cap: int, slow_reader_s: float) -> None:
        self.per_job = per_job
        self.total_cap = total_cap
        self.slow_reader_s = slow_reader_s
        self.total = 0
        self.relays: set[Relay] = set()
        self._sweeper: asyncio.Task[None] | None = None

    def admit(self, relay: Relay, size: int) -> bool:
        """Count ``size`` more bytes for ``relay``'s reader, or drop it (False) where a cap does not allow them."""
        if relay.waiting_bytes + size > self.per_job:
            relay.drop(f"the job's stream had {relay.waiting_bytes + size} bytes its notebook had not read, over "
                       f"this gateway's cap of {self.per_job} per job: the job was stopped. Read a job's events as "
                       "they come (gpunet's notebook side does), and run it again")
            return False
        if self.total + size > self.total_cap:
            self._make_room(self.total + size - self.total_cap, size, but=relay)
        if self.total + size > self.total_cap:
            relay.drop(f"this gateway holds {self.total} bytes of results its notebooks have not read, its cap is "
                       f"{self.total_cap}: the job was stopped. Run it again in a moment")
            return False
        relay.waiting_bytes += size
        self.total += size
        self.relays.add(relay)
        self._start_sweeping()
        return True

    def forget(self, relay: Relay) -> None:
        """``relay`` holds nothing any more."""
        self.relays.discard(relay)

    def _make_room(self, needed: int, size: int, *, but: Relay) -> None:
        """Drop readers until ``needed`` bytes are free: those of the account holding the most
        unread bytes first, each account's longest stalled first, and only of accounts holding
        at least as much as ``but``'s would with its ``size`` more. A stranger reading a trickle to
        keep the gateway full is the biggest holder: an honest reader that paused is not."""
        now = time.monotonic()
        held: dict[str, int] = {}
        for relay in self.relays:
            held[relay.account] = held.get(relay.account, 0) + relay.waiting_bytes
        mine = held.get(but.account, 0) + size
        eligible = sorted((r for r in self.relays if r is not but and r.waiting_bytes and held[r.account] >= mine),
                          key=lambda r: (-held[r.account], r.last_read))
        for relay in eligible:
            if needed <= 0:
                break
            needed -= relay.waiting_bytes
            relay.drop(f"this gateway ran short of room for unread results and this job's account held the most "
                       f"of them ({held[relay.account]} bytes), its notebook last read {now - relay.last_read:.0f} s "
                       "ago: the job was stopped. Read a job's events as they come (gpunet's notebook side does), "
                       "and run it again")

    def sweep(self) -> None:
        """Drop every reader that read nothing for ``slow_reader_s`` while bytes waited for it."""
        now = time.monotonic()
        for relay in [r for r in self.relays if r.waiting_bytes and now - r.last_read > self.slow_reader_s]:
            relay.drop(f"the notebook read nothing of this job's stream for {self.slow_reader_s:g} s while "
                       f"{relay.waiting_bytes} bytes waited: the job was stopped. Read a job's events as they "
                       "come (gpunet's notebook side does), and run it again")

    def _start_sweeping(self) -> None:
        self._sweeper = repeat_while(self._sweeper, lambda: bool(self.relays), SWEEP_EVERY_S, self.sweep)


def repeat_while(task: asyncio.Task | None, keep_going: Callable[[], bool], every_s: float,
                 step: Callable[[], Any]) -> asyncio.Task:
    """``task`` while it still runs; else a new task on the running loop that calls
    ``step()`` (awaited where it is a coroutine function's) every ``every_s`` for as long
    as ``keep_going()``."""
    if task is not None and not task.done():
        return task

    async def repeat() -> None:
        while keep_going():
            await asyncio.sleep(every_s)
            done = step()
            if asyncio.iscoroutine(done):
                await done

    return asyncio.get_running_loop().create_task(repeat())


# -- connections ------------------------------------------------------------------------


def _refusal_bytes(status: int, reason: str, code: str, message: str) -> bytes:
    body = pack({"error": {"status": status, "code": code, "message": message}})
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/msgpack\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode() + body


def holder_of(address: str) -> str:
    """Who an address counts as: an IPv4 address itself (an IPv4-mapped IPv6 one too), an
    IPv6 address its /64 (one subscriber's network: a stranger given one picks from 2**64)."""
    try:
        parsed = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(parsed, ipaddress.IPv6Address):
        if parsed.ipv4_mapped is not None:
            return str(parsed.ipv4_mapped)
        return str(ipaddress.ip_network(f"{parsed}/64", strict=False))
    return str(parsed)


class ConnectionCounts:
    """How many connections each address (an IPv6 one: its /64, :func:`holder_of`) holds
    open, at most ``per_address``."""

    def __init__(self, per_address: int) -> None:
        self.per_address = per_address
        self.open: dict[str, int] = {}

    def take(self, address: str) -> bool:
        """Count one more connection from ``address``, or False where it holds the most it may."""
        address = holder_of(address)
        if self.open.get(address, 0) >= self.per_address:
            return False
        self.open[address] = self.open.get(address, 0) + 1
        return True

    def give_back(self, address: str) -> None:
        """One connection from ``address`` closed."""
        address = holder_of(address)
        left = self.open.get(address, 0) - 1
        if left > 0:
            self.open[address] = left
        else:
            self.open.pop(address, None)


def guarded_protocol(counts: ConnectionCounts, headers_s: float, body_s: float) -> type:
    """uvicorn's h11 protocol class, with at most ``counts.per_address`` connections from
    one address (429), a request's headers due within ``headers_s`` of its first byte (or
    of the connection opening), and its body within ``body_s`` after them (408)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        """H11Protocol with the gateway's connection cap and request deadlines."""

        _address: str | None = None
        _refused = False
        _deadline: asyncio.TimerHandle | None = None
        _phase: str | None = None
        _before: Any = None

        def connection_made(self, transport: Any) -> None:  # noqa: D102 - uvicorn's
            super().connection_made(transport)
            address = self.client[0] if self.client else "?"
            if not counts.take(address):
                self._refused = True
                logger.warning("gateway: refused a connection from %s: it holds %d open", address, counts.per_address)
                transport.write(_refusal_bytes(
                    429, "Too Many Requests", "too_many_connections",
                    f"your address holds {counts.per_address} connections to this gateway, the most it may: close "
                    "some (a notebook needs a few), then try again"))
                transport.close()
                return
            self._address = address
            self._await("headers", headers_s)

        def connection_lost(self, exc: Exception | None) -> None:  # noqa: D102 - uvicorn's
            if self._address is not None:
                counts.give_back(self._address)
                self._address = None
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:  # noqa: D102 - uvicorn's
            if self._refused:
                return
            before = self.cycle
            super().data_received(data)
            cycle = self.cycle
            if cycle is not before or (self._phase == "headers" and cycle is not self._before):
                self._disarm()  # a request's headers came: its body is due next
                if cycle.more_body:
                    self._await("body", body_s)
            elif self._phase == "body" and not cycle.more_body:
                self._disarm()
            elif self._phase is None and (cycle is None or cycle.response_complete):
                self._await("headers", headers_s)  # the first bytes of the next request

        def on_response_complete(self) -> None:  # noqa: D102 - uvicorn's
            finished = self.cycle
            super().on_response_complete()  # a pipelined request waiting starts here, not in data_received
            self._disarm()
            cycle = self.cycle
            if cycle is not finished and cycle is not None and not cycle.response_complete and cycle.more_body:
                self._await("body", body_s)

        def _await(self, phase: str, seconds: float) -> None:
            self._disarm()
            self._phase, self._before = phase, self.cycle
            self._deadline = self.loop.call_later(seconds, self._late, phase, seconds)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            self._deadline, self._phase = None, None

        def _late(self, phase: str, seconds: float) -> None:
            self._deadline = None
            if self.transport.is_closing():
                return
            logger.warning("gateway: closed a connection from %s: a request's %s took more than %g s",
                           self._address, phase, seconds)
            if self.cycle is None or not self.cycle.response_started:
                self.transport.write(_refusal_bytes(
                    408, "Request Timeout", "too_slow",
                    f"this gateway waits at most {seconds:g} s for a request's {phase}: send the whole request "
                    "at once"))
            if self.cycle is not None:  # the app reading the body hears the connection went; its answer goes nowhere
                self.cycle.disconnected = True
                self.cycle.message_event.set()
            self.transport.close()

    return GuardedH11Protocol


class _CountedConnection(socket.socket):
    """An accepted connection that gives its address's place back when it closes."""

    counts: ConnectionCounts | None = None
    address = ""

    def close(self) -> None:  # noqa: D102 - socket's
        if self.counts is not None:
            self.counts.give_back(self.address)
            self.counts = None
        super().close()


class _CountingListener(socket.socket):
    """A listening socket that accepts at most ``counts.per_address`` connections from one
    address, counted from the moment they are accepted (before their TLS handshake: the
    protocol's own cap sees a connection only once its handshake is done)."""

    counts: ConnectionCounts

    def accept(self) -> tuple[socket.socket, Any]:  # noqa: D102 - socket's
        fd, address = self._accept()  # type: ignore[attr-defined]
        connection = _CountedConnection(self.family, self.type, self.proto, fileno=fd)
        host = address[0] if isinstance(address, tuple) else "?"
        if not self.counts.take(host):
            connection.close()
            logger.warning("gateway: refused a connection from %s: it holds %d open, counting those in their TLS "
                           "handshake", host, self.counts.per_address)
            raise ConnectionAbortedError(f"{host} holds too many connections")  # asyncio's loop skips it
        connection.counts, connection.address = self.counts, host
        return connection, address


def counting_listener(sock: socket.socket, per_address: int) -> socket.socket:
    """``sock`` (listening) as a socket that refuses an address's connection past
    ``per_address`` open at once, those still in their TLS handshake included."""
    listener = _CountingListener(sock.family, sock.type, sock.proto, fileno=sock.detach())
    listener.counts = ConnectionCounts(per_address)
    return listener


def guarded_server(config: Any, handshake_s: float, sockets_per_address: int | None = None) -> Any:
    """A uvicorn server for ``config`` whose listening sockets close a connection that has
    not finished its TLS handshake within ``handshake_s`` (asyncio's default: 60 s) and,
    with ``sockets_per_address``, hold at most that many connections from one address,
    those in their handshake included."""
    import uvicorn

    class GuardedServer(uvicorn.Server):
        """uvicorn's Server, its given sockets served with a TLS handshake deadline."""

        async def startup(self, sockets: list[Any] | None = None) -> None:  # noqa: D102 - uvicorn's
            if not sockets or config.ssl is None:
                await super().startup(sockets)
                return
            await self.lifespan.startup()
            loop = asyncio.get_running_loop()

            def create_protocol(_loop: asyncio.AbstractEventLoop | None = None) -> asyncio.Protocol:
                return config.http_protocol_class(config=config, server_state=self.server_state,
                                                  app_state=self.lifespan.state, _loop=_loop)

            if sockets_per_address is not None:
                sockets = [counting_listener(sock, sockets_per_address) for sock in sockets]
            self.servers = [await loop.create_server(create_protocol, sock=sock, ssl=config.ssl,
                                                     backlog=config.backlog, ssl_handshake_timeout=handshake_s)
                            for sock in sockets]
            self.started = True

    return GuardedServer(config)
