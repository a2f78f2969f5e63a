"""The notebook's Dask connection to a network whose providers it does not trust.

Dask's wire may carry pickles: a ``Serialized`` payload whose serializer is
``pickle`` (or ``dask``, whose header pickles the type), and a ``__Pickled__``
payload that ``distributed.protocol.core.loads`` unpickles whatever deserializers
the reader allows. A worker makes both (a task's exception on ``task-erred``, a
``Client.run`` result, any payload it chooses), and the scheduler passes them on to
the client untouched. ``Client(deserializers=...)`` restricts only the first kind,
and not on the client's stream to the scheduler.

So on such a network the notebook's client talks over ``gpunet-data://`` (and
``gpunet-data-tls://``): Dask's TCP (TLS) comm whose :meth:`DataOnlyRead.read`

- refuses a message over its cap before reading it (:data:`max_message_bytes`),
  so a provider cannot make the notebook allocate a huge result;
- refuses compressed payloads (a few bytes of zlib can decompress to gigabytes past
  the cap; gpunet providers send frames uncompressed, Dask's default);
- decodes msgpack itself, loading ``Serialized`` payloads only through the
  ``msgpack`` serializer (data) and turning every other payload, and every
  ``__Pickled__`` one, into a :class:`RefusedPayload` that is never unpickled.

The worker answers a request with the serializers the client asks for (Dask's
``send_recv`` sends them along), so honest replies (a codec result's bytes, a
``Client.run`` dict) travel as msgpack and still arrive.
"""

from __future__ import annotations

import logging
import struct
from typing import Any

import msgpack
from distributed.comm.core import CommClosedError
from distributed.comm.registry import backends
from distributed.comm.tcp import (
    TCP,
    TLS,
    TCPBackend,
    TCPConnector,
    TLSBackend,
    TLSConnector,
    convert_stream_closed_error,
    read_bytes_rw,
)
from distributed.protocol.core import msgpack_opts
from distributed.protocol.serialize import merge_and_deserialize, msgpack_decode_default
from tornado.iostream import StreamClosedError

from gpunet import codec
from gpunet.codec import clean_text
from gpunet.errors import ProviderDataError, ResultTooLargeError

logger = logging.getLogger(__name__)

#: The serializers whose payloads are loaded: msgpack (data), gpunet's codec frames
#: (wrapped as they came, decoded later within the job's caps: :func:`gpunet.codec.decode`)
#: and Dask's "error" (which only raises a TypeError naming what could not be serialized).
#: In this order, as a worker tries them: an older provider (no gpunet-codec family)
#: answers with msgpack before it would look the unknown name up; a newer one's
#: :class:`~gpunet.codec.Frames` are no msgpack and go on as frames.
DATA_SERIALIZERS = ("msgpack", codec.DASK_SERIALIZER, "error")
#: scheme of Dask's comm -> scheme of the data-only one
SCHEMES = {"tcp": "gpunet-data", "tls": "gpunet-data-tls"}
#: What a message may carry besides a job's result (Dask's framing, the reply's keys).
MESSAGE_SLACK_BYTES = 1024 * 1024
#: What each frame of a message is charged against its cap: about what the notebook keeps
#: per frame (its length, a view of it), however few bytes it has on the wire.
FRAME_CHARGE_BYTES = 256
#: The largest message the notebook reads on a data-only connection (connect() sets it
#: from its max_result_bytes: the process has one, the last connection's).
max_message_bytes = 256 * 1024 * 1024 + MESSAGE_SLACK_BYTES


class RefusedPayload(ProviderDataError):
    """Stands in for a payload a data-only connection refused to load (never raised by it)."""


def data_only_address(address: str) -> str:
    """``tcp://host:port`` -> ``gpunet-data://host:port``; a clear error for a scheme
    the data-only connection cannot wrap."""
    scheme, sep, location = address.partition("://")
    if not sep:
        scheme, location = "tcp", address
    if scheme in SCHEMES.values():
        return address
    if scheme not in SCHEMES:
        raise ProviderDataError(f"a notebook that does not trust its providers reaches a scheduler over tcp:// or "
                                f"tls://, not {scheme}://; connect to its tcp:// address, or pass --trust-providers "
                                "on a private network whose providers you trust")
    return f"{SCHEMES[scheme]}://{location}"


def _refused(what: str,
             why: str = "which this notebook does not load from providers it does not trust") -> RefusedPayload:
    what = clean_text(what)
    logger.warning("gpunet: refused a %s payload from the network; that payload was not loaded", what)
    return RefusedPayload(f"the network sent a {what} payload, {why}; that payload was not loaded (the rest of the "
                          "message was)")


def _compressed(header: dict[str, Any]) -> list[str]:
    """The compressions a payload header names (none: an empty list)."""
    named = header.get("compression")
    if named is None or named is False:
        return []
    if not isinstance(named, (list, tuple)):
        return [str(named)]
    return [str(name) for name in named if name is not None and name is not False]


def data_only_loads(frames: list[Any]) -> Any:
    """``distributed.protocol.core.loads`` for a data-only connection (see the module docstring)."""

    taken: set[int] = set()  # frames a payload took: each is one payload's alone

    def decode_default(obj: dict[Any, Any]) -> Any:
        offset = obj.get("__Serialized__", 0)
        if offset > 0:
            header = msgpack_within(frames[offset], msgpack_decode_default)
            count = header.get("num-sub-frames")
            if type(count) is not int or count < 0:
                return _refused("malformed", "whose header does not say how many frames it takes")
            named = set(range(offset, offset + 1 + count))
            if named & taken:  # two payloads would be views of one buffer
                return _refused("second", "which names frames another payload of the message took")
            taken.update(named)
            sub_frames = frames[offset + 1: offset + 1 + count]
            serializers = _serializers_of(header)
            if not serializers <= set(DATA_SERIALIZERS):  # an empty collection names none, and is data
                return _refused("/".join(sorted(str(s) for s in serializers)))
            problem = _layout_problem(header, len(sub_frames))
            if problem is not None:
                return _refused("forged", f"whose frames {problem}")
            compressed = _compressed(header)
            if compressed:  # a few compressed bytes may decompress to gigabytes past the size cap
                return _refused("/".join(sorted(set(compressed))) + "-compressed",
                                "which could expand past this notebook's size cap (gpunet providers send "
                                "uncompressed frames; a provider that compresses is not one)")
            try:
                if "msgpack" in serializers:  # Dask's msgpack loads charges nothing: checked within the budget first
                    _check_msgpack_parts(header, _merged(header, sub_frames))
                return merge_and_deserialize(header, sub_frames, deserializers=DATA_SERIALIZERS)
            except Exception as exc:  # noqa: BLE001 - "error" payloads raise; nothing runs
                return RefusedPayload(clean_text(f"a payload from the network could not be loaded ({exc}); that "
                                                 "payload was not loaded (the rest of the message was)"))
        if obj.get("__Pickled__", 0) > 0:
            return _refused("pickled")
        return msgpack_decode_default(obj)

    return msgpack_within(frames[0], decode_default)


def msgpack_within(data: Any, object_hook: Any = None) -> Any:
    """``msgpack.loads`` of ``data`` as Dask's comm decodes it (tuples, Dask's options),
    its lists and maps charged as :func:`gpunet.codec.decode` charges them:
    :class:`ProviderDataError` past that, before much of it is built (an empty map is one
    byte on the wire and 64 in memory)."""
    budget = codec.SLOT_BYTES * memoryview(data).nbytes + codec.DECODE_SLACK_BYTES

    def charged(value: Any) -> Any:
        nonlocal budget
        budget = codec.charge_container(value, budget)
        return value

    hook = charged if object_hook is None else (lambda value: object_hook(charged(value)))
    return msgpack.loads(data, object_hook=hook, list_hook=charged, use_list=False, **msgpack_opts)


def _merged(header: dict[str, Any], frames: list[Any]) -> list[Any]:
    """``frames`` merged as the header says (a layout :func:`_layout_problem` passed)."""
    if "split-num-sub-frames" not in header:
        return list(frames)
    return [b"".join(frames[offset:offset + n])
            for n, offset in zip(header["split-num-sub-frames"], header["split-offsets"])]


def _check_msgpack_parts(header: dict[str, Any], frames: list[Any]) -> None:
    """Decode, within the budget, every msgpack part of a payload (of a layout checked)."""
    if "is-collection" in header:
        start = 0
        for part, length in zip(header["sub-headers"], header["frame-lengths"]):
            if isinstance(part, dict):
                _check_msgpack_parts(part, frames[start:start + length])
            start += length
    elif header.get("serializer") == "msgpack":
        msgpack_within(b"".join(frames))


def _layout_problem(header: dict[str, Any], count: int) -> str | None:
    """Why the layout a payload header gives its ``count`` frames is not one Dask makes
    (each frame merged once, in order: ``serialize_and_split``; a collection's parts one
    after another), else None. Dask merges and slices frames as the header says, so a
    forged one could hand two outputs one buffer, or copy a message many times over."""
    if "split-num-sub-frames" in header:
        sizes, offsets = header.get("split-num-sub-frames"), header.get("split-offsets")
        if not _counts(sizes, least=1) or not _counts(offsets, least=0) or sum(sizes) != count \
                or list(offsets) != [sum(sizes[:i]) for i in range(len(sizes))]:
            return "are merged in a layout Dask never makes (a frame twice, or out of order)"
        count = len(sizes)
    return _parts_problem(header, count)


def _parts_problem(header: dict[str, Any], count: int) -> str | None:
    """Why a collection header's parts do not take its ``count`` frames one after another."""
    if "is-collection" not in header:
        return None
    lengths, parts = header.get("frame-lengths"), header.get("sub-headers")
    if not _counts(lengths, least=0) or not isinstance(parts, (list, tuple)) or len(parts) != len(lengths) \
            or sum(lengths) != count:
        return "are shared out among a collection's parts in a layout Dask never makes"
    for part, length in zip(parts, lengths):
        problem = _parts_problem(part, length) if isinstance(part, dict) else None
        if problem is not None:
            return problem
    return None


def _counts(values: Any, *, least: int) -> bool:
    """Whether ``values`` is a list or tuple of ints of at least ``least``."""
    return isinstance(values, (list, tuple)) and all(type(v) is int and v >= least for v in values)


def _serializers_of(header: dict[str, Any]) -> set[Any]:
    """Every serializer a (possibly nested, "is-collection") payload header names."""
    if "is-collection" in header:
        found: set[Any] = set()
        for sub in header.get("sub-headers", ()):
            found |= _serializers_of(sub) if isinstance(sub, dict) else {None}
        return found
    return {header.get("serializer")}


class DataOnlyRead:
    """The read side of a data-only comm (mixed into Dask's TCP and TLS comms)."""

    async def read(self, deserializers: Any = None) -> Any:
        """Read one message: refused over :data:`max_message_bytes`, decoded by
        :func:`data_only_loads` (``deserializers`` is ignored: the set is fixed)."""
        stream = self.stream
        if stream is None:
            raise CommClosedError()
        try:
            (nosplit_nbytes,) = struct.unpack("Q", await stream.read_bytes(8))
            self._check_size(nosplit_nbytes)
            (count,) = struct.unpack("Q", await stream.read_bytes(8))  # Dask's prelude: frame count, lengths
            if 8 * (count + 1) > nosplit_nbytes:
                raise ProviderDataError(f"the network sent a message of {count:,} frames in {nosplit_nbytes:,} "
                                        "bytes; it was not read")
            self._check_frames(count)
            lengths = struct.unpack(f"{count}Q", await stream.read_bytes(8 * count)) if count else ()
            self._check_size(8 * (count + 1) + sum(lengths))
            if 8 * (count + 1) + sum(lengths) < nosplit_nbytes:
                raise ProviderDataError("the network sent a message whose frames do not fill its size; it was not "
                                        "read")
            frames = await _read_frames(stream, lengths)
        except StreamClosedError as exc:
            self.stream = None
            self._closed = True
            convert_stream_closed_error(self, exc)
        except BaseException:
            self.abort()  # what was read is unknown: the stream cannot be used again
            raise
        try:
            return data_only_loads(frames)
        except EOFError:
            self.abort()
            raise CommClosedError("aborted stream on truncated data") from None

    def _check_frames(self, count: int) -> None:
        """Refuse a message of more frames than the cap allows at :data:`FRAME_CHARGE_BYTES`
        each (an empty frame is free on the wire, not in the notebook)."""
        if count * FRAME_CHARGE_BYTES > max_message_bytes:
            raise ResultTooLargeError(
                f"the network sent a message of {count:,} frames, over the {max_message_bytes // FRAME_CHARGE_BYTES:,} "
                f"this notebook's cap of {max_message_bytes:,} bytes allows ({FRAME_CHARGE_BYTES} bytes a frame); it "
                "was not read (raise the cap with max_result_bytes= when connecting)")

    def _check_size(self, nbytes: int) -> None:
        if nbytes > max_message_bytes:
            raise ResultTooLargeError(
                f"the network sent a message of {nbytes:,} bytes, over this notebook's cap of {max_message_bytes:,} "
                "bytes; it was not read (raise the cap with max_result_bytes= when connecting)")


#: A frame of this many bytes or more is read into a buffer of its own (fresh and aligned,
#: so that an array decoded from it is a writable view, not a copy); smaller ones share one.
OWN_BUFFER_BYTES = 64 * 1024


async def _read_frames(stream: Any, lengths: tuple[int, ...]) -> list[memoryview]:
    """Frames of ``lengths`` bytes from ``stream``: runs of small frames read together
    and sliced, each large one into a buffer of its own. (Dask reads its first large
    buffer together with the small frames before it, at whatever offset they leave.)"""
    frames: list[memoryview] = []
    small: list[int] = []

    async def read_small() -> None:
        if small:
            block = await read_bytes_rw(stream, sum(small))
            frames.extend(unpack_lengths(block, small))
            small.clear()

    for length in lengths:
        if length < OWN_BUFFER_BYTES:
            small.append(length)
            continue
        await read_small()
        frames.append(await read_bytes_rw(stream, length))
    await read_small()
    return frames


def unpack_lengths(block: memoryview, lengths: list[int]) -> list[memoryview]:
    """``block`` cut into consecutive frames of ``lengths`` bytes."""
    view = memoryview(block)
    parts, start = [], 0
    for length in lengths:
        parts.append(view[start:start + length])
        start += length
    return parts


class DataOnlyTCP(DataOnlyRead, TCP):
    """Dask's TCP comm, reading data only."""


class DataOnlyTLS(DataOnlyRead, TLS):
    """Dask's TLS comm, reading data only."""


class _TCPConnector(TCPConnector):
    prefix = "gpunet-data://"
    comm_class = DataOnlyTCP


class _TLSConnector(TLSConnector):
    prefix = "gpunet-data-tls://"
    comm_class = DataOnlyTLS


class _TCPBackend(TCPBackend):
    _connector_class = _TCPConnector


class _TLSBackend(TLSBackend):
    _connector_class = _TLSConnector


codec.register_with_dask()
backends.setdefault(SCHEMES["tcp"], _TCPBackend())
backends.setdefault(SCHEMES["tls"], _TLSBackend())
