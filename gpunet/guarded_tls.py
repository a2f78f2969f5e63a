"""Dask's TLS comm, guarded against what a provider could send before any role check.

Dask reads a whole message before a handler (and :mod:`gpunet.roles`) sees it: it
allocates whatever size the peer announces, and its decoder unpickles every
``__Pickled__`` object in it, even on the scheduler, whose comms otherwise pass
serialized objects through undecoded (``distributed.protocol.core.loads``). On an
open network each process's TLS comms are this module's instead (:func:`use_guarded_tls`):
for a peer whose certificate binds the provider role (or none),

- a message that comes in on a listener may be at most :data:`PEER_MESSAGE_MAX_BYTES`,
  checked from the sizes in its header before it is read;
- no message may carry a ``__Pickled__`` object, and where the comm decodes what it
  reads (workers, clients), no serialized object but msgpack's, or the codec's frames
  (:data:`DATA_DESERIALIZERS`, decoded into bytes only) where the reader asks for them (a
  provider's worker fetching a result from her own other worker).

The scheduler's and the gateway's messages (which carry the gateway's graphs and the
results it gathers) are read as Dask reads them. And a connection this process opens to
an address it knows as its scheduler's (:func:`expect_scheduler_at`) must meet a
certificate of the scheduler role: another certificate of the operator's CA (a
provider's, where it can redirect traffic) is not the scheduler.
"""

from __future__ import annotations

import logging
import struct
from typing import Any

from gpunet.certs import GATEWAY, SCHEDULER, identity_of_peer
from gpunet.codec import DASK_SERIALIZER

logger = logging.getLogger(__name__)

#: The most bytes one message from a provider may take on a connection it opened:
#: far above any worker message, heartbeat or event a provider may post.
PEER_MESSAGE_MAX_BYTES = 32 * 1024 * 1024
#: What a provider's bytes may be decoded with: nothing that unpickles.
SAFE_DESERIALIZERS = ("msgpack",)
#: What a reader may also ask a provider's bytes to be decoded with: the codec's frames
#: (gpunet.codec.DASK_SERIALIZER), which decoding wraps as bytes (nothing is loaded).
DATA_DESERIALIZERS = (DASK_SERIALIZER,)
#: The keys Dask's decoder looks for in a msgpack map.
_PICKLED, _SERIALIZED = "__Pickled__", "__Serialized__"

_CLASSES: dict[str, type] = {}
#: Addresses this process knows as its scheduler's (``tls://HOST:PORT``).
_SCHEDULERS: set[str] = set()


class RefusedMessage(ConnectionError):
    """A provider's message that the guarded comm would not read (and closed the comm for)."""


def _trusted(peercert: Any) -> bool:
    identity = identity_of_peer(peercert)
    return identity is not None and identity.role in (SCHEDULER, GATEWAY)


def allowed_deserializers(asked: Any) -> tuple[str, ...]:
    """What a provider's bytes may be decoded with for a reader that ``asked`` for those
    deserializers: msgpack, and of :data:`DATA_DESERIALIZERS` those it asked for."""
    return SAFE_DESERIALIZERS + tuple(name for name in DATA_DESERIALIZERS if name in (asked or ()))


def check_frames(frames: list[Any], *, decoded: bool, allowed: tuple[str, ...] = SAFE_DESERIALIZERS) -> str | None:
    """Why Dask's frames of one message from a provider must not be decoded, or None:
    a ``__Pickled__`` object anywhere; where they will be ``decoded``, a serialized
    object but one of ``allowed``."""
    import msgpack
    from distributed.protocol.utils import msgpack_opts

    found: list[str] = []

    def hook(obj: dict[Any, Any]) -> Any:
        if _PICKLED in obj:
            found.append("a pickled object")
        offset = obj.get(_SERIALIZED, 0)
        if decoded and isinstance(offset, int) and offset > 0:
            try:
                header = msgpack.loads(frames[offset], use_list=False, **msgpack_opts)
                serializer = header.get("serializer") if isinstance(header, dict) else None
            except Exception:  # noqa: BLE001 - a garbled header is refused like a pickle
                serializer = None
            if serializer not in allowed:
                found.append(f"an object serialized with {serializer!r}")
        return obj

    try:
        msgpack.loads(frames[0], object_hook=hook, use_list=False, **msgpack_opts)
    except Exception as exc:  # noqa: BLE001 - not msgpack: Dask could not read it either
        return f"a message that is not msgpack ({exc})"
    return f"a provider may not send {found[0]}" if found else None


def guarded_tls_comm(incoming: bool) -> type:
    """Dask's TLS comm class, guarded (see the module docstring); ``incoming``: for a
    listener's comms, whose messages from providers are size-capped."""
    key = "incoming" if incoming else "outgoing"
    if key in _CLASSES:
        return _CLASSES[key]
    from ssl import SSLError

    from distributed.comm.core import CommClosedError
    from distributed.comm.tcp import TLS, convert_stream_closed_error, read_bytes_rw
    from distributed.comm.utils import from_frames
    from distributed.protocol.utils import unpack_frames
    from tornado.iostream import StreamClosedError

    class GuardedTLS(TLS):
        def _refuse(self, why: str) -> None:
            logger.warning("gpunet: closed the connection with %s: %s", self.peer_address, why)
            self.abort()
            raise RefusedMessage(f"gpunet closed this connection: {why}")

        async def read(self, deserializers: Any = None) -> Any:
            if _trusted(self._extra.get("peercert")):
                return await super().read(deserializers)
            stream = self.stream
            if stream is None:
                raise CommClosedError()
            try:
                (header_bytes,) = struct.unpack("Q", await stream.read_bytes(8))
                if incoming and header_bytes > PEER_MESSAGE_MAX_BYTES:
                    self._refuse(f"a message of {header_bytes} bytes is over the {PEER_MESSAGE_MAX_BYTES} a "
                                 "provider may send")
                frames, buffer_sizes = unpack_frames(await read_bytes_rw(stream, header_bytes), partial=True)
                total = header_bytes + sum(buffer_sizes)
                if incoming and total > PEER_MESSAGE_MAX_BYTES:
                    self._refuse(f"a message of {total} bytes is over the {PEER_MESSAGE_MAX_BYTES} a "
                                 "provider may send")
                for size in buffer_sizes:
                    frames.append(await read_bytes_rw(stream, size))
            except (StreamClosedError, SSLError) as exc:
                self.stream = None
                self._closed = True
                convert_stream_closed_error(self, exc)
            except RefusedMessage:
                raise
            except BaseException:
                self.abort()  # as Dask's read: how much of the stream was read is unknown
                raise
            allowed = allowed_deserializers(deserializers)
            refusal = check_frames(frames, decoded=self.deserialize, allowed=allowed)
            if refusal is not None:
                self._refuse(refusal)
            try:
                return await from_frames(frames, deserialize=self.deserialize,
                                         deserializers=list(allowed) if self.deserialize else None,
                                         allow_offload=self.allow_offload)
            except EOFError:
                self.abort()
                raise CommClosedError("aborted stream on truncated data") from None

    GuardedTLS.__name__ = GuardedTLS.__qualname__ = f"GuardedTLS{key.capitalize()}"
    _CLASSES[key] = GuardedTLS
    return GuardedTLS


def expect_scheduler_at(address: str | None) -> None:
    """From now on, a connection this process opens to ``address`` must meet a
    certificate of the scheduler role (or it is closed before a byte is read)."""
    if address and address.startswith("tls://"):
        _SCHEDULERS.add(address)


def use_guarded_tls(server: Any = None) -> None:
    """From now on, this process's TLS comms are guarded (Dask's ``tls`` backend is
    replaced); ``server``'s listeners, which may already be listening, too."""
    from distributed.comm import registry
    from distributed.comm.tcp import TLSBackend, TLSConnector, TLSListener

    if not getattr(registry.backends.get("tls"), "gpunet_guarded", False):
        class GuardedConnector(TLSConnector):
            comm_class = guarded_tls_comm(incoming=False)

            async def connect(self, address: str, deserialize: bool = True, **connection_args: Any) -> Any:
                from distributed.comm.core import FatalCommClosedError

                comm = await super().connect(address, deserialize, **connection_args)
                if self.prefix + address in _SCHEDULERS:
                    identity = identity_of_peer(comm.extra_info.get("peercert"))
                    if identity is None or identity.role != SCHEDULER:
                        comm.abort()
                        who = identity.uri if identity else "no gpunet role"
                        logger.error("gpunet: %s%s is not the scheduler: it presented %s", self.prefix, address, who)
                        raise FatalCommClosedError(f"{self.prefix}{address} presented a certificate of {who}, not "
                                                   "the scheduler's: not connecting (is the address right?)")
                return comm

        class GuardedListener(TLSListener):
            comm_class = guarded_tls_comm(incoming=True)

        class GuardedBackend(TLSBackend):
            gpunet_guarded = True
            _connector_class = GuardedConnector
            _listener_class = GuardedListener

        registry.backends["tls"] = GuardedBackend()
    for listener in getattr(server, "listeners", ()) or ():
        if isinstance(listener, TLSListener):
            listener.comm_class = guarded_tls_comm(incoming=True)
