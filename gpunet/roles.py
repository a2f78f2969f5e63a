"""Who may do what on an open network's Dask wire: roles from the peer's certificate.

Dask's own protocol trusts every peer: any client can run code on the scheduler and
the workers, and the scheduler dispatches a worker's stream messages through the same
table as a client's (so a worker may send ``update-graph``). On an open network every
comm is mutual TLS with a certificate the operator's CA issued (:mod:`gpunet.certs`),
and the parties here check, for every request, what the certificate's role allows:

- the scheduler (:class:`SchedulerDoor`): the gateway may do anything a Dask client
  does except run code on the scheduler; a provider only what a worker and a nanny
  need, for its own workers (whose addresses it proved by presenting the same
  certificate when the scheduler called back); its workers' streams carry only worker
  messages about the tasks they were given (no claim to hold data they were not
  assigned, no pickle of theirs passed on to a client), events on gpunet's topics only
  for tasks they were given, size-capped and rate-limited; heartbeats rate-limited,
  with only the figures the scheduler needs.
- a provider's workers and nannies (:class:`WorkerDoor`): the scheduler and the
  gateway may call anything; the provider's own other workers only ``get_data``
  (another provider's bytes are never unpickled there); its own worker may ask its
  nanny to close it.

A refused request raises :class:`RoleError` back to the caller, and is counted.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from gpunet import codec
from gpunet.certs import GATEWAY, PROVIDER, SCHEDULER, Identity, identity_of_peer, watch_revocations
from gpunet.errors import GpunetError, ProviderTaskError
from gpunet.guarded_tls import SAFE_DESERIALIZERS, expect_scheduler_at, use_guarded_tls
from gpunet.wire import ENVIRONMENT_CHANGED, EXECUTING, REGISTER_PROVIDER

logger = logging.getLogger(__name__)

#: What a provider's worker or nanny may ask of the scheduler outside its stream.
#: Each names the worker it is about in one argument: it must be one of the provider's.
PROVIDER_SCHEDULER_OPS: dict[str, str | None] = {
    "register-worker": "address",   # proved by calling the address back (SchedulerDoor)
    "heartbeat_worker": "address",
    "unregister": "address",
    "set_resources": "worker",
    "retire_workers": "workers",    # a worker closing gracefully retires itself
    "log_event": None,              # checked like a stream's events
    "register_nanny": None,         # the nanny plugins, which only the gateway may register
    EXECUTING: "workers",           # `gpunet provide` drains its own workers
}
#: The messages a worker's own stream may carry (Scheduler's worker_handlers), and
#: gpunet's own registration and environment messages.
#: Not ``add-keys``: a worker claiming a replica of a key it was never given would be
#: asked for it by the gateway and other workers, and answer with its own pickle.
WORKER_STREAM_OPS = frozenset({
    "task-finished", "task-erred", "release-worker-data", "long-running", "reschedule",
    "keep-alive", "log-event", "worker-status-change", "request-refresh-who-has", "close-stream",
    "steal-response",  # only for a task processing on that worker (the victim the scheduler asked)
})
#: What nobody may ask of an open network's scheduler, the gateway included: run code there.
NOBODY_SCHEDULER_OPS = frozenset({"run_function", "register_scheduler_plugin", "unregister_scheduler_plugin"})
#: A worker names its provider's account, then this, then anything: account names
#: (:data:`gpunet.certs.NAME_RE`) cannot contain it, so no account's names are another's.
WORKER_NAME_SEPARATOR = "/"
#: What of a ``task-erred`` message is a pickle the worker made (the door replaces them).
ERRED_OBJECTS = ("exception", "traceback")
#: Keys a stream message may not carry: Dask lets them override who sent it.
SENDER_KEYS = ("worker", "client")
#: Topics gpunet's notebooks read; a provider posts there only for its tasks.
GPUNET_TOPIC_PREFIX = "gpunet"
#: One event, as posted, at most (live output chunks and small results are far below).
EVENT_MAX_BYTES = 256 * 1024
#: Per provider: bytes of events it may post at once, and per second after that.
EVENT_BURST_BYTES = 8 * 1024 * 1024
EVENT_BYTES_PER_S = 1024 * 1024
#: Per provider: how many topics outside gpunet's it may ever post to (each is kept).
MAX_TOPICS_PER_PROVIDER = 64
#: Per worker: heartbeats at once, and per second after that (Dask sends one every 0.5-5 s).
HEARTBEAT_BURST = 10
HEARTBEATS_PER_S = 4.0
#: A heartbeat's figures the scheduler keeps from a provider: plain numbers, and small
#: tables of them (the rest, such as its bandwidth estimate and metric names, is dropped).
HEARTBEAT_TABLE_MAX = 32
#: How long a provider's worker has to answer the scheduler's call-back at registration.
CALL_BACK_TIMEOUT_S = 10.0


#: Requests Dask sends without waiting for a reply (``reply=False``) but then reads an
#: answer of their own shape: a refusal is written in that shape, or the peer would wait.
REFUSAL_ANSWERS: dict[str, Callable[[str], Any]] = {
    "register-worker": lambda text: {"status": "error", "message": text, "time": time.time()},
    "register-client": lambda text: [{"op": "stream-start", "error": text}],
}


class RoleError(GpunetError, PermissionError):
    """A peer asked for something its certificate's role does not allow."""


Policy = Callable[[Identity | None, str, dict[str, Any]], Awaitable[str | None]]


class GuardedHandlers(dict):
    """A Dask server's ``handlers`` table whose every lookup checks, first, what the
    calling comm's certificate allows (``await policy(identity, op, msg)`` returns a
    refusal or None). Dask looks a handler up per request (``Server._handle_comm``),
    so handlers added later are guarded too."""

    def __init__(self, handlers: dict[str, Any], policy: Policy, on_refused: Callable[[], None] | None = None) -> None:
        super().__init__(handlers)
        self.policy = policy
        self.on_refused = on_refused

    def __getitem__(self, op: str) -> Callable[..., Any]:
        return self._guard(op, super().__getitem__(op))

    def _guard(self, op: str, handler: Callable[..., Any]) -> Callable[..., Any]:
        from distributed.core import _expects_comm
        from distributed.utils import has_keyword

        async def guarded(comm: Any, serializers: Any = None, **msg: Any) -> Any:
            identity = identity_of_peer((comm.extra_info or {}).get("peercert"))
            refusal = await self.policy(identity, op, msg)
            if refusal is not None:
                if self.on_refused is not None:
                    self.on_refused()
                who = f"{identity.role} {identity.name}" if identity else "a peer without a gpunet certificate"
                logger.warning("gpunet: refused %r from %s at %s: %s", op, who, comm.peer_address, refusal)
                text = f"{op!r} refused: {refusal}"
                if op in REFUSAL_ANSWERS:
                    await comm.write(REFUSAL_ANSWERS[op](text))
                    await comm.close()
                    return None
                raise RoleError(text)
            if serializers is not None and has_keyword(handler, "serializers"):
                msg["serializers"] = serializers
            result = handler(comm, **msg) if _expects_comm(handler) else handler(**msg)
            return await result if inspect.isawaitable(result) else result

        guarded.__name__ = getattr(handler, "__name__", op)
        return guarded


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


#: Types whose values hold no other value (checked by exact type: a subclass is looked into).
_PLAIN_TYPES = frozenset({str, bytes, int, float, bool, type(None)})


def carries_serialized(value: Any, depth: int = 0) -> bool:
    """Whether ``value`` (a message as the scheduler reads it, undecoded) holds a
    serialized object anywhere, which the scheduler would hand on to a client."""
    from distributed.protocol.serialize import Serialize, Serialized

    if depth > 64:
        return True
    if type(value) in _PLAIN_TYPES:  # most of a message: nothing inside to look at
        return False
    if isinstance(value, (Serialized, Serialize)):
        return True
    if isinstance(value, dict):
        return any(carries_serialized(v, depth + 1) or carries_serialized(k, depth + 1) for k, v in value.items())
    if isinstance(value, (list, tuple, set, frozenset)):
        return any(carries_serialized(v, depth + 1) for v in value)
    return False


def _encoded_size(value: Any) -> int:
    """About how many bytes ``value`` takes on the wire."""
    from dask.sizeof import sizeof

    return int(sizeof(value))


@dataclass
class TokenBucket:
    """A token bucket: ``burst`` at once, ``per_s`` a second after that."""

    burst: float = EVENT_BURST_BYTES
    per_s: float = EVENT_BYTES_PER_S
    tokens: float = field(init=False)
    at: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.tokens = self.burst

    def take(self, amount: float) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.per_s)
        self.at = now
        if amount > self.tokens:
            return False
        self.tokens -= amount
        return True


class SchedulerDoor:
    """The scheduler's checks on an open network (see the module docstring).
    ``topics_of(worker)`` says which gpunet topics the tasks processing on a worker
    may post to (from their holds' annotations)."""

    def __init__(self, scheduler: Any, topics_of: Callable[[str], set[str]]) -> None:
        self.scheduler = scheduler
        self.topics_of = topics_of
        #: worker address -> the provider account whose certificate registered it
        self.owners: dict[str, str] = {}
        self.refused = 0
        self._buckets: dict[str, TokenBucket] = {}
        self._heartbeats: dict[str, TokenBucket] = {}
        #: provider account -> the topics outside gpunet's it has posted to
        self._topics: dict[str, set[str]] = {}

    def install(self) -> None:
        """Guard the scheduler's handlers and its workers' streams."""
        scheduler = self.scheduler
        use_guarded_tls(scheduler)
        watch_revocations(scheduler.security.tls_ca_file)
        scheduler.handlers = GuardedHandlers(scheduler.handlers, self.check, self._count)
        handle_stream = scheduler.handle_stream

        async def guarded_stream(comm: Any, extra: dict[str, Any] | None = None) -> None:
            if extra and "worker" in extra:
                comm = WorkerStream(comm, extra["worker"], self)
            await handle_stream(comm=comm, extra=extra)

        scheduler.handle_stream = guarded_stream

    def _count(self) -> None:
        self.refused += 1

    def worker_left(self, address: str) -> None:
        """Forget a worker that left: its address may later be another provider's."""
        self.owners.pop(address, None)
        self._heartbeats.pop(address, None)

    async def check(self, identity: Identity | None, op: str, msg: dict[str, Any]) -> str | None:
        """The refusal of ``op`` for ``identity``, or None where it may go ahead."""
        if identity is None:
            return "this network admits only peers with a certificate from its operator's CA"
        if op in NOBODY_SCHEDULER_OPS:
            return "nobody runs code on an open network's scheduler"
        if identity.role == GATEWAY:
            return None
        if identity.role != PROVIDER or op not in PROVIDER_SCHEDULER_OPS:
            return f"a {identity.role} certificate may not do this (only the gateway acts as a Dask client)"
        if carries_serialized(msg):
            return "a provider sends no serialized objects to the scheduler (it would pass them on to clients)"
        about = PROVIDER_SCHEDULER_OPS[op]
        if op == "register-worker":
            return await self._check_registration(identity, msg)
        if op == "log_event":
            return self.event_refusal(identity.name, None, msg.get("topic"), msg.get("msg"))
        if op == "retire_workers" and msg.get("names") is not None:
            return "a provider retires its workers by address"
        if about is not None:
            named = msg.get(about)
            addresses = list(named) if isinstance(named, (list, tuple, set)) else [named]
            for address in addresses:
                if self.owners.get(address) != identity.name:
                    return f"{address} is not one of provider {identity.name}'s workers"
        if op == "heartbeat_worker":
            return self._heartbeat_refusal(msg)
        return None

    def _heartbeat_refusal(self, msg: dict[str, Any]) -> str | None:
        """Rate-limit a provider's worker's heartbeats, and keep of ``msg`` only what
        the scheduler needs (in place): its figures as plain numbers, the tasks it says
        it is executing among those it was given; not its host information, extension
        data, bandwidth estimate or metric names, which grow the scheduler's state."""
        address = msg["address"]
        if not self._heartbeats.setdefault(address, TokenBucket(HEARTBEAT_BURST, HEARTBEATS_PER_S)).take(1):
            return f"worker {address} sends heartbeats faster than {HEARTBEATS_PER_S:g} a second"
        metrics = msg.get("metrics") if isinstance(msg.get("metrics"), dict) else {}
        kept: dict[str, Any] = {name: value for name, value in metrics.items()
                                if isinstance(name, str) and _is_number(value)}
        for name, value in metrics.items():
            if isinstance(name, str) and isinstance(value, dict) and len(value) <= HEARTBEAT_TABLE_MAX \
                    and all(isinstance(k, str) and _is_number(v) for k, v in value.items()):
                kept[name] = value
        kept.setdefault("memory", 0)
        kept.setdefault("managed_bytes", 0)
        kept["spilled_bytes"] = {part: kept.get("spilled_bytes", {}).get(part, 0) for part in ("memory", "disk")}
        kept["bandwidth"] = {"total": self.scheduler.bandwidth, "workers": {}, "types": {}}
        kept["digests_total_since_heartbeat"] = {}
        state = self.scheduler.workers.get(address)
        processing = {ts.key for ts in state.processing} if state is not None else set()
        executing = msg.get("executing") if isinstance(msg.get("executing"), dict) else {}
        msg.update(metrics=kept, host_info={}, extensions={},
                   executing={key: seconds for key, seconds in executing.items()
                              if key in processing and _is_number(seconds)})
        return None

    async def _check_registration(self, identity: Identity, msg: dict[str, Any]) -> str | None:
        """A provider registers only its own workers: the worker's address (and its
        nanny's, which the scheduler will ask to restart it) must answer with the same
        certificate, and its name must be its account's (``ACCOUNT`` or ``ACCOUNT/...``),
        so that nobody takes the names another provider's workers use."""
        try:
            address = self.scheduler.coerce_address(str(msg.get("address", "")))
        except Exception as exc:  # noqa: BLE001 - whatever Dask cannot parse is refused here
            return f"a worker's address must be tls://HOST:PORT: {exc}"
        owner = self.owners.get(address)
        if owner is not None and owner != identity.name:
            return f"{address} is provider {owner}'s worker"
        name = msg.get("name")
        own = f"{identity.name}{WORKER_NAME_SEPARATOR}"
        if name not in (None, address) and not (str(name) == identity.name or str(name).startswith(own)):
            return f"provider {identity.name}'s workers are named {identity.name} or {own}..., not {name!r}"
        for what, at in (("worker", address), ("nanny", msg.get("nanny"))):
            if what == "nanny" and not at:
                continue
            answered = await self._identity_at(str(at))
            if answered != identity:
                return (f"the {what} at {at} did not present provider {identity.name}'s certificate "
                        f"(it presented {answered.uri if answered else 'none'})")
        self.owners[address] = identity.name
        return None

    async def _identity_at(self, address: str) -> Identity | None:
        """Whose certificate the server listening at ``address`` presents."""
        from distributed.comm import connect

        try:
            comm = await asyncio.wait_for(
                connect(address, **self.scheduler.security.get_connection_args("scheduler")), CALL_BACK_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - unreachable, not TLS, another CA: not proved
            logger.warning("gpunet: could not call %s back: %s", address, exc)
            return None
        try:
            return identity_of_peer(comm.extra_info.get("peercert"))
        finally:
            comm.abort()

    def event_refusal(self, account: str, worker: str | None, topic: Any, event: Any) -> str | None:
        """Why provider ``account`` (from ``worker``) may not post ``event`` on ``topic``,
        or None. One string topic per event; the topic's length counts with the event's
        size against the provider's rate; a provider keeps at most
        :data:`MAX_TOPICS_PER_PROVIDER` topics of its own."""
        if not isinstance(topic, str):
            return "an event's topic must be one string"
        size = len(topic) + _encoded_size(event)
        if size > EVENT_MAX_BYTES:
            return f"an event of {size} bytes is over the {EVENT_MAX_BYTES} bytes a provider may post"
        if topic.startswith(GPUNET_TOPIC_PREFIX):
            allowed = self.topics_of(worker) if worker is not None else set()
            if topic not in allowed:
                return "a worker posts on a notebook's topic only for the tasks it is running for that notebook"
        else:
            own = self._topics.setdefault(account, set())
            if topic not in own and len(own) >= MAX_TOPICS_PER_PROVIDER:
                return f"provider {account} already posts on {MAX_TOPICS_PER_PROVIDER} topics of its own"
        if not self._buckets.setdefault(account, TokenBucket()).take(size):
            return f"provider {account} posts events faster than {EVENT_BYTES_PER_S} bytes/s"
        if not topic.startswith(GPUNET_TOPIC_PREFIX):
            self._topics[account].add(topic)
        return None

    def stream_refusal(self, worker: str, msg: Any) -> str | None:
        """Why a message on ``worker``'s own stream must be dropped, or None."""
        if not isinstance(msg, dict):
            return None  # Dask's "OK" and the like
        op = msg.get("op")
        if op not in WORKER_STREAM_OPS and op not in (REGISTER_PROVIDER, ENVIRONMENT_CHANGED):
            return f"{op!r} is not a worker's message"
        if any(key in msg for key in SENDER_KEYS):
            return "a worker's message may not say who sent it"
        if carries_serialized({k: v for k, v in msg.items() if op != "task-erred" or k not in ERRED_OBJECTS}):
            return "a worker's message carries no serialized objects (but an erred task's exception, replaced)"
        if op == "log-event":
            return self.event_refusal(self.owners.get(worker, worker), worker, msg.get("topic"), msg.get("msg"))
        if op == "request-refresh-who-has":
            return self._who_has_refusal(worker, msg.get("keys"))
        if op == "steal-response":
            return self._steal_refusal(worker, msg.get("key"))
        return None

    def _steal_refusal(self, worker: str, key: Any) -> str | None:
        """A worker answers the scheduler's work stealing only for a task processing on
        it (without its answer the stolen task would stay in flight for ever)."""
        task = self.scheduler.tasks.get(key) if _hashable(key) else None
        where = getattr(task, "processing_on", None)
        if where is None or where.address != worker:
            return "a worker answers a steal request only for a task it was given"
        return None

    def _who_has_refusal(self, worker: str, keys: Any) -> str | None:
        """A worker asks where keys are only for the inputs of the tasks it was given."""
        state = self.scheduler.workers.get(worker)
        inputs = {dep.key for ts in state.processing for dep in ts.dependencies} if state is not None else set()
        if not isinstance(keys, (list, tuple)) or not all(_hashable(key) and key in inputs for key in keys):
            return "a worker asks where keys are only for the inputs of its own tasks"
        return None

    @staticmethod
    def cleaned(msg: Any) -> Any:
        """``msg`` (a worker's message the door let through) without the pickles a
        provider made, which the scheduler would hand on to the gateway to unpickle:
        a finished task's type, and an erred task's exception and traceback (replaced
        by :class:`ProviderTaskError`, made here, with the worker's text)."""
        from distributed.protocol import Serialize

        if not isinstance(msg, dict):
            return msg
        if msg.get("op") == "task-finished":
            msg["type"] = None
        elif msg.get("op") == "task-erred":
            text = msg.get("exception_text")
            msg["exception"] = Serialize(ProviderTaskError(str(text)[:EVENT_MAX_BYTES] if text else "the task failed"))
            msg["traceback"] = None
        return msg


class WorkerStream:
    """A worker's stream to the scheduler, as Dask's ``handle_stream`` reads it,
    without the messages the worker's role does not allow (dropped, logged, counted)."""

    def __init__(self, comm: Any, worker: str, door: SchedulerDoor) -> None:
        self._comm = comm
        self._worker = worker
        self._door = door

    def __getattr__(self, name: str) -> Any:
        return getattr(self._comm, name)

    async def read(self, *args: Any, **kwargs: Any) -> Any:
        msgs = await self._comm.read(*args, **kwargs)
        batch = msgs if isinstance(msgs, (list, tuple)) else [msgs]
        kept = []
        for msg in batch:
            refusal = self._door.stream_refusal(self._worker, msg)
            if refusal is None:
                kept.append(self._door.cleaned(msg))
            else:
                self._door.refused += 1
                logger.warning("gpunet: dropped a message from worker %s: %s", self._worker, refusal)
        return kept


class WorkerDoor:
    """A provider's worker's or nanny's checks on an open network (see the module
    docstring); ``own`` is the provider's own identity."""

    #: what the provider's own other workers may ask of a worker: the data of a finished
    #: task. Another provider's worker may not: it could read any user's results, and
    #: answering it would have it unpickle this one's bytes (and this one, its).
    PEER_OPS = frozenset({"get_data"})
    #: what a provider's own worker may ask of its nanny
    OWN_NANNY_OPS = frozenset({"close_gracefully"})

    def __init__(self, own: Identity, *, nanny: bool = False) -> None:
        self.own = own
        self.nanny = nanny
        self.refused = 0

    def install(self, server: Any) -> None:
        """Guard ``server``'s (a Worker's or a Nanny's) handlers and listeners."""
        use_guarded_tls(server)
        watch_revocations(server.security.tls_ca_file)
        scheduler = getattr(server, "scheduler", None)
        expect_scheduler_at(getattr(server, "scheduler_addr", None) or getattr(scheduler, "address", None))
        if hasattr(server, "rpc") and not self.nanny:  # what it fetches from other workers: no pickle, and
            codec.register_with_dask()  # a codec result as its frames (Dask frames of their own, never one blob)
            server.rpc.deserializers = [*SAFE_DESERIALIZERS, codec.DASK_SERIALIZER]
        server.handlers = GuardedHandlers(server.handlers, self.check, self._count)

    def _count(self) -> None:
        self.refused += 1

    async def check(self, identity: Identity | None, op: str, msg: dict[str, Any]) -> str | None:
        """The refusal of ``op`` for ``identity``, or None where it may go ahead."""
        if identity is None:
            return "this worker answers only peers with a certificate from the network operator's CA"
        if identity.role in (SCHEDULER, GATEWAY):
            return None
        if identity == self.own and op in (self.OWN_NANNY_OPS if self.nanny else self.PEER_OPS):
            return None
        return (f"a {identity.role} certificate ({identity.name}) may not call {op!r} here "
                "(only the scheduler, the gateway and this provider's own workers may)")


def holds_topics(annotations: Iterable[dict[str, Any] | None]) -> set[str]:
    """The notebook topics named by tasks' gpunet annotations."""
    return {meta["topic"] for meta in annotations if meta and isinstance(meta.get("topic"), str)}
