"""Bodies that carry large buffers raw, between the notebook and the gateway
(:mod:`gpunet.gateway`, :mod:`gpunet.client.gateway_link`).

A framed body is a msgpack head and, after it, the raw bytes of the large buffers the
head refers to: a job's NumPy inputs as they were pickled (:class:`gpunet.wire.Pickled`'s
out-of-band buffers), a job's results as the codec's frames (:class:`gpunet.codec.Frames`).
Nothing is base64-encoded or copied into one msgpack blob; each buffer is sent from
its own memory and read into a fresh buffer of its own.

    MAGIC (8 bytes) | head length (8 bytes, little-endian) | head (msgpack) | buffers

In the head, a buffer is the extension :data:`BUFFER_EXT` and a value's codec frames
:data:`FRAMES_EXT`; their payloads are msgpack ``[offset, size]`` spans (``FRAMES_EXT``:
a list of them), offsets counted from the end of the head. A reader checks every span
against the body's size, and that the spans tile the data exactly.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from typing import Any

import msgpack

from gpunet import codec
from gpunet.errors import GatewayError, ProviderDataError

#: What a framed body starts with: the version of the layout (a body of another one is refused).
MAGIC = b"GPUNETF2"
PREFIX = struct.Struct("<8sQ")
#: msgpack extension codes of a buffer laid out after the head, and of a value's codec frames.
BUFFER_EXT, FRAMES_EXT = 64, 65
#: The content type of a framed body.
MEDIA_TYPE = "application/x-gpunet-framed"
#: The longest head a reader takes.
MAX_HEAD_BYTES = 64 * 1024 * 1024
#: The most buffers a body may lay out, where its reader says no other number: each costs the
#: reader some hundred bytes of bookkeeping whatever its size (a zero-byte one too).
MAX_BUFFERS = 256 * 1024


class Laid:
    """A buffer to lay out after the head (raw), not to copy into it."""

    __slots__ = ("buffer",)

    def __init__(self, buffer: Any) -> None:
        self.buffer = buffer


def byte_view(buffer: Any) -> memoryview:
    """``buffer`` as a flat view of its bytes (no copy)."""
    view = memoryview(buffer)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


class FramedBody:
    """``value`` as a framed body: :attr:`parts` (the prefix and head, then each buffer as
    a view of its own memory) and :attr:`size`, their total in bytes."""

    def __init__(self, value: Any) -> None:
        self.buffers: list[memoryview] = []
        self._offset = 0
        head = msgpack.packb(value, use_bin_type=True, default=self._laid_out)
        self.parts: list[bytes | memoryview] = [PREFIX.pack(MAGIC, len(head)) + head, *self.buffers]
        self.size = PREFIX.size + len(head) + self._offset

    def _span(self, buffer: Any) -> list[int]:
        view = byte_view(buffer)
        self.buffers.append(view)
        span = [self._offset, view.nbytes]
        self._offset += view.nbytes
        return span

    def _laid_out(self, value: Any) -> Any:
        if isinstance(value, Laid):
            return msgpack.ExtType(BUFFER_EXT, msgpack.packb(self._span(value.buffer)))
        if isinstance(value, codec.Frames):
            return msgpack.ExtType(FRAMES_EXT, msgpack.packb([self._span(frame) for frame in value.parts]))
        raise TypeError(f"can not serialize {type(value).__name__!r} object")

    def pieces(self, piece_bytes: int) -> Iterator[bytes | memoryview]:
        """The body in pieces of at most ``piece_bytes`` (views: no copy)."""
        for part in self.parts:
            view = memoryview(part)
            for start in range(0, len(view), piece_bytes):
                yield view[start:start + piece_bytes]

    def reader(self) -> BodyReader:
        """A file-like reader of the body (what ``requests`` streams as a request body)."""
        return BodyReader(self)


class BodyReader:
    """A framed body as a file-like object of known length: ``requests`` sends it with a
    Content-Length, reading it a block at a time."""

    def __init__(self, body: FramedBody) -> None:
        self.len = body.size
        self._pieces = body.pieces(1024 * 1024)
        self._rest = memoryview(b"")

    def __len__(self) -> int:
        return self.len

    def __iter__(self) -> Iterator[bytes]:
        while block := self.read(1024 * 1024):
            yield block

    def read(self, size: int = -1) -> bytes | memoryview:
        """Up to ``size`` more bytes of the body (all the rest with -1): a view of one
        buffer where they lie in one (no copy), else bytes."""
        out = []
        wanted = self.len if size is None or size < 0 else size
        while wanted > 0:
            if not self._rest:
                self._rest = next(self._pieces, memoryview(b""))
                if not self._rest:
                    break
            block, self._rest = self._rest[:wanted], self._rest[wanted:]
            out.append(block)
            wanted -= len(block)
        return out[0] if len(out) == 1 else b"".join(out)


def version_refusal(what: str) -> GatewayError:
    """The error for a body that is not a framed body of this version."""
    return GatewayError(f"{what} is not a gpunet framed body of this version ({MAGIC.decode()}): the notebook's and "
                        "the gateway's gpunet differ; install the gateway's gpunet version in the notebook (or ask "
                        "the operator to upgrade the gateway)", status=400, code="version")


def head_length(prefix: bytes | memoryview, size: int, what: str) -> int:
    """The head's length a body of ``size`` bytes says in its ``prefix`` (checked)."""
    if len(prefix) < PREFIX.size:
        raise version_refusal(what)
    magic, length = PREFIX.unpack(prefix[:PREFIX.size])
    if magic != MAGIC:
        raise version_refusal(what)
    if length > min(size - PREFIX.size, MAX_HEAD_BYTES):
        raise GatewayError(f"{what} says its head takes {length} bytes, more than the body holds", status=400,
                           code="malformed")
    return length


class Spans:
    """The buffers a head refers to, checked against ``size`` bytes of data: every span
    within them, their total at most ``size`` (so a head cannot make a reader allocate more
    than the body holds), and (:meth:`check_tiled`) together exactly the data, no overlap."""

    def __init__(self, size: int, make: Callable[[int, int], Any], *, max_buffers: int = MAX_BUFFERS) -> None:
        self.size = size
        self.make = make
        self.max_buffers = max_buffers
        self.taken: list[tuple[int, int, Any]] = []
        self.total = 0

    def take(self, span: Any) -> Any:
        """The buffer of one ``[offset, size]`` span."""
        if not (isinstance(span, list) and len(span) == 2 and all(type(n) is int and n >= 0 for n in span)
                and span[0] + span[1] <= self.size and self.total + span[1] <= self.size):
            raise GatewayError("a framed body refers to bytes it does not hold", status=400, code="malformed")
        if len(self.taken) >= self.max_buffers:
            raise GatewayError(f"a framed body lays out more than {self.max_buffers} buffers: send fewer, larger "
                               "arrays (stack them), or split the job", status=413, code="too_many_buffers")
        self.total += span[1]
        buffer = self.make(*span)
        self.taken.append((span[0], span[1], buffer))
        return buffer

    def spans_in(self, payload: bytes) -> Any:
        """An extension's payload: spans, no longer a list than the buffers still allowed (a
        few bytes of empty lists cannot expand before :meth:`take` looks at them)."""
        return msgpack.unpackb(payload, max_array_len=max(2, self.max_buffers - len(self.taken)), max_map_len=0)

    def ext(self, code: int, payload: bytes) -> Any:
        """A head's extension value: a laid-out buffer, or codec frames."""
        if code == BUFFER_EXT:
            return self.take(self.spans_in(payload))
        if code == FRAMES_EXT:
            spans = self.spans_in(payload)
            if not isinstance(spans, list) or not spans:
                raise GatewayError("a framed body's frames are malformed", status=400, code="malformed")
            return codec.Frames([self.take(span) for span in spans])
        return msgpack.ExtType(code, payload)

    def check_tiled(self) -> list[Any]:
        """The buffers in the order of their offsets, once they cover the data exactly."""
        cursor = 0
        ordered = sorted(self.taken, key=lambda entry: entry[0])
        for offset, size, _ in ordered:
            if offset != cursor:
                raise GatewayError("a framed body's buffers overlap or leave gaps", status=400, code="malformed")
            cursor += size
        if cursor != self.size:
            raise GatewayError("a framed body holds bytes its head does not refer to", status=400, code="malformed")
        return [buffer for _, _, buffer in ordered]


def read_framed(read: Callable[[int], bytes], size: int, *, what: str, chunk_bytes: int = 4 * 1024 * 1024,
                max_buffers: int = MAX_BUFFERS) -> Any:
    """The value of a framed body of ``size`` bytes read with ``read(n)`` (a stream): each
    buffer read into a fresh buffer of its own, codec frames marked as owned by this reader
    (decoded arrays are writable views of them, not copies). Its head's lists and maps are
    charged as :func:`gpunet.codec.decode` charges a result's, its buffers counted
    (``max_buffers``): a sender's few bytes never make this reader allocate much."""
    prefix = _read_exactly(read, PREFIX.size, what)
    head = _read_exactly(read, head_length(prefix, size, what), what)
    spans = Spans(size - PREFIX.size - len(head), lambda offset, length: bytearray(length), max_buffers=max_buffers)
    try:
        value = codec.unpack_plain(head, budget=codec.SLOT_BYTES * len(head) + codec.DECODE_SLACK_BYTES,
                                   ext_hook=spans.ext)
    except ProviderDataError:
        raise GatewayError(f"{what}'s head would take far more memory than its size (lists or maps by the million?); "
                           "it was not loaded", status=502, code="malformed") from None
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise GatewayError(f"{what} has a malformed head ({type(exc).__name__})", status=502, code="malformed") from None
    for buffer in spans.check_tiled():
        view, filled = memoryview(buffer), 0
        while filled < len(view):
            block = read(min(chunk_bytes, len(view) - filled))
            if not block:
                raise GatewayError(f"{what} ended early", status=502, code="short_body")
            view[filled:filled + len(block)] = block
            filled += len(block)
    _mark_owned(value)
    return value


def _mark_owned(value: Any, depth: int = 0) -> None:
    """Mark the codec frames in ``value`` (read into fresh buffers here) as this reader's own."""
    if isinstance(value, codec.Frames):
        value.owned = True
    elif depth < 8 and isinstance(value, dict):
        for item in value.values():
            _mark_owned(item, depth + 1)
    elif depth < 8 and isinstance(value, list):
        for item in value:
            _mark_owned(item, depth + 1)


def _read_exactly(read: Callable[[int], bytes], size: int, what: str) -> bytes:
    chunks, left = [], size
    while left:
        block = read(left)
        if not block:
            raise GatewayError(f"{what} ended early", status=502, code="short_body")
        chunks.append(block)
        left -= len(block)
    return b"".join(chunks)


def laid_out_in(body: bytes | memoryview, value: Any, *, what: str, depth: int = 4) -> Any:
    """``value`` (a head unpacked with its extensions left as :class:`msgpack.ExtType`) with
    every laid-out buffer, to ``depth`` levels of lists and maps, as a read-only view of
    ``body`` (the data after the head; no copy), once the spans tile it exactly."""
    spans = Spans(len(body), lambda offset, length: memoryview(body)[offset:offset + length].toreadonly())

    def resolve(item: Any, level: int) -> Any:
        if isinstance(item, msgpack.ExtType) and item.code == BUFFER_EXT:
            try:
                return spans.take(spans.spans_in(item.data))
            except (ValueError, TypeError, msgpack.UnpackException):
                raise GatewayError(f"{what} names a buffer malformed", status=400, code="malformed") from None
        if level < depth and isinstance(item, dict):
            return {key: resolve(entry, level + 1) for key, entry in item.items()}
        if level < depth and isinstance(item, list):
            return [resolve(entry, level + 1) for entry in item]
        return item

    resolved = resolve(value, 0)
    spans.check_tiled()
    return resolved
