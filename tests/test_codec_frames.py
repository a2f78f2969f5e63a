"""Results as data without extra copies: the codec's frames (gpunet.codec.encode_frames).

A large array's buffer leaves the worker as a frame of its own (a view of the array's
memory, not copied into one blob), travels as a Dask frame, and lands in the notebook
as a writable view of the buffer the connection read into; everything the codec
refuses in bytes it refuses in frames, before allocating."""

from __future__ import annotations

import msgpack
import numpy as np
import pandas as pd
import pytest
from distributed.protocol import deserialize, serialize

from gpunet import codec
from gpunet.errors import ProviderDataError, UnsupportedResultError

MEGABYTE = np.arange(131_072, dtype=np.float64)


def owned(frames):
    """``frames`` as a connection hands them over: fresh writable buffers of its own."""
    received = codec.Frames([bytearray(memoryview(frame)) for frame in frames])
    received.owned = True
    return received


def forged(head_value, *buffers, owned_by_receiver=True):
    frames = codec.Frames([msgpack.packb(head_value, use_bin_type=True), *[bytearray(b) for b in buffers]])
    frames.owned = owned_by_receiver
    return frames


def framed_array(dtype, shape, index):
    return msgpack.ExtType(9, msgpack.packb([dtype, shape, index], use_bin_type=True))


def test_a_large_array_is_a_frame_of_its_own_uncopied():
    frames = codec.encode_frames({"x": MEGABYTE, "small": np.arange(3)})
    assert len(frames) == 2 and memoryview(frames[0]).nbytes < 1024  # the small array stays in the head
    assert np.shares_memory(np.frombuffer(frames[1], dtype=np.float64), MEGABYTE)  # the array's own memory
    assert memoryview(frames[1]).readonly  # nothing downstream can write into the worker's array
    back = codec.decode(frames)
    assert np.array_equal(back["x"], MEGABYTE) and not np.shares_memory(back["x"], MEGABYTE)
    assert back["x"].flags.writeable and list(back["small"]) == [0, 1, 2]


def test_frames_the_receiver_owns_become_writable_views_not_copies():
    received = owned(codec.encode_frames(MEGABYTE))
    back = codec.decode(received)
    assert np.shares_memory(back, np.frombuffer(received[1], dtype=np.uint8)) and back.flags.writeable
    back[0] = 42.0  # the notebook's own array
    assert MEGABYTE[0] == 0.0


def test_pandas_columns_and_nested_outputs_travel_as_frames():
    frame = pd.DataFrame({"a": np.arange(10_000.0), "b": np.arange(10_000), "s": ["x"] * 10_000})
    outputs = {"frame": codec.encode_frames(frame), "array": codec.encode_frames(MEGABYTE)}
    result = codec.encode_frames({"outputs": outputs, "value": None})
    assert len(result) == 1 + 3 + 2  # its head, each output's head and buffers, taken over uncopied
    assert any(np.shares_memory(np.frombuffer(f, dtype=np.uint8), MEGABYTE) for f in result[1:])
    back = codec.decode(owned(result))
    assert isinstance(back["outputs"]["frame"], codec.Frames) and back["outputs"]["frame"].owned
    assert codec.load(back["outputs"]["frame"], "codec", what="output 'frame'").equals(frame)
    assert np.array_equal(codec.load(back["outputs"]["array"], "codec", what="output 'array'"), MEGABYTE)
    # inside plain codec bytes (a provenance record, a forged result in tests) they still come back
    assert np.array_equal(codec.decode(codec.decode(codec.encode(outputs))["array"]), MEGABYTE)


def test_frames_travel_as_dask_frames_of_their_own_and_arrive_owned():
    codec.register_with_dask()
    frames = codec.encode_frames(MEGABYTE)
    header, sent = serialize(frames, serializers=(codec.DASK_SERIALIZER, "msgpack"))
    assert header["serializer"] == codec.DASK_SERIALIZER
    assert any(np.shares_memory(np.frombuffer(f, dtype=np.uint8), MEGABYTE) for f in sent)
    arrived = deserialize(header, [bytearray(memoryview(f)) for f in sent], deserializers=(codec.DASK_SERIALIZER,))
    assert isinstance(arrived, codec.Frames) and arrived.owned
    # the sender's own read-only views (a peer in this process) are never written into
    assert not deserialize(header, sent, deserializers=(codec.DASK_SERIALIZER,)).owned
    # frames are no msgpack: a peer that asks only for msgpack (an older notebook) gets Dask's
    # error payload, never a half-read result (its jobs get a version error: test_codec_versions)
    header, sent = serialize(frames, serializers=("msgpack",))
    assert header["serializer"] == "error"


def test_output_that_cannot_travel_is_still_named():
    with pytest.raises(UnsupportedResultError, match=r"output 'model' holds at \['w'\] a builtin_function"):
        codec.encode_frames({"w": len}, name="output 'model'")
    with pytest.raises(UnsupportedResultError, match="dtype object"):
        codec.encode_frames(np.array([None] * 10_000, dtype=object), name="output 'x'")


def test_a_forged_header_claiming_a_huge_array_fails_before_allocating():
    huge = forged(framed_array("<f8", [2**40], 1), b"\x00" * 8)
    with pytest.raises(ProviderDataError, match="more memory than its cap"):
        codec.decode(huge, max_bytes=1_000_000)
    with pytest.raises(ProviderDataError, match="do not fit its shape"):
        codec.decode(forged(framed_array("<f8", [1000], 1), b"\x00" * 8))
    with pytest.raises(ProviderDataError, match="more memory than its cap"):
        codec.decode(forged(framed_array("|S0", [2**40], 1), b""))


@pytest.mark.parametrize("head, buffers, match", [
    (framed_array("|O", [1], 1), [b"\x00" * 8], "dtype object"),
    (framed_array("V8", [1], 1), [b"\x00" * 8], "does not travel"),
    (framed_array("<f8", [1], 2), [b"\x00" * 8], "refers to frames 2"),
    (framed_array("<f8", [1], 0), [b"\x00" * 8], "refers to frames 0"),
    (framed_array("<f8", [-1], 1), [b""], "negative dimension"),
    ([framed_array("<f8", [1], 1), framed_array("<f8", [1], 1)], [b"\x00" * 8], "same frame"),
    (msgpack.ExtType(10, msgpack.packb([1, 5])), [b"x"], "refers to frames 1"),
    (msgpack.ExtType(10, msgpack.packb("x")), [], "malformed"),
])
def test_malformed_frames_are_refused(head, buffers, match):
    with pytest.raises(ProviderDataError, match=match):
        codec.decode(forged(head, *buffers))


def test_a_frame_reference_in_plain_bytes_is_refused():
    with pytest.raises(ProviderDataError, match="came as one piece"):
        codec.decode(msgpack.packb(framed_array("<f8", [1], 1)))


def test_frames_over_the_cap_are_refused_before_decoding():
    with pytest.raises(ProviderDataError, match="over its cap of 1,000 bytes"):
        codec.decode(codec.encode_frames(MEGABYTE), max_bytes=1000, what="output 'y'")


def test_frames_that_are_not_the_receivers_own_are_copied():
    frames = codec.encode_frames(MEGABYTE)
    view = forged(framed_array("<f8", [131_072], 1), owned_by_receiver=False)
    shared = bytearray(memoryview(frames[1]))
    back = codec.decode(codec.Frames([view[0], shared]))
    assert not np.shares_memory(back, np.frombuffer(shared, dtype=np.uint8)) and back.flags.writeable


# -- the data-only comm reads each large frame into a buffer of its own --------------------------


async def _over_a_socket_pair(send):
    """What the notebook's data-only comm reads of what ``send(writer, raw_socket)`` writes."""
    import socket

    from distributed.comm.tcp import TCP
    from tornado.iostream import IOStream

    from gpunet.client import data_comm

    ours, theirs = socket.socketpair()
    reader = data_comm.DataOnlyTCP(IOStream(ours), "local", "peer")
    writer = TCP(IOStream(theirs), "peer", "local")
    try:
        await send(writer, theirs)
        return await reader.read()
    finally:
        reader.abort()
        writer.abort()


def test_the_data_only_comm_lands_a_frame_as_a_writable_aligned_view():
    import asyncio

    from distributed.protocol import to_serialize

    from gpunet.client import data_comm

    async def send(writer, _):
        await writer.write({"data": to_serialize(codec.encode_frames(MEGABYTE))},
                           serializers=list(data_comm.DATA_SERIALIZERS))

    arrived = asyncio.run(_over_a_socket_pair(send))["data"]
    assert isinstance(arrived, codec.Frames) and arrived.owned
    back = codec.decode(arrived)
    assert np.array_equal(back, MEGABYTE) and back.flags.writeable and back.flags.aligned
    assert not back.flags.owndata  # a view of the buffer the comm read into: no copy


def test_the_data_only_comm_refuses_a_prelude_that_does_not_fit_its_size():
    import asyncio
    import struct

    async def send(_, raw):
        raw.sendall(struct.pack("QQ", 16, 10**6))  # a million frames in 16 bytes

    with pytest.raises(ProviderDataError, match="1,000,000 frames in 16 bytes"):
        asyncio.run(_over_a_socket_pair(send))


# -- a provider's forged Dask framing (it controls every byte a worker sends) --------------------


def _raw_message(sub_header, sub_frames, *, skeleton=None):
    """Dask's framing of ``{"data": <payload>}`` with a forged payload header, as raw bytes."""
    import struct

    from distributed.protocol.utils import pack_frames

    skeleton = skeleton or {"data": {"__Serialized__": 1}}
    frames = [msgpack.packb(skeleton, use_bin_type=True), msgpack.packb(sub_header, use_bin_type=True),
              *sub_frames]
    packed = pack_frames(frames)
    return struct.pack("Q", len(packed)) + packed


def _two_outputs_in_one_frame():
    """A result whose two outputs name frames 1 and 2, and the one 128 KiB buffer it sends."""
    head = msgpack.packb({"a": framed_array("<f8", [16_384], 1), "b": framed_array("<f8", [16_384], 2)},
                         use_bin_type=True)
    return head, bytes(np.ones(16_384).view(np.uint8))


def _forged_layouts():
    head, buffer = _two_outputs_in_one_frame()
    codec_header = {"serializer": "gpunet-codec", "num-sub-frames": 2}
    yield "one frame merged twice", {**codec_header, "split-num-sub-frames": [1, 1, 1],
                                     "split-offsets": [0, 1, 1]}, [head, buffer]
    yield "frames merged many times over", {**codec_header, "split-num-sub-frames": [2] * 64,
                                            "split-offsets": [0] * 64}, [head, buffer]
    collection = {"is-collection": True, "type-serialized": "list", "num-sub-frames": 2,
                  "frame-lengths": [2, -1, 2], "sub-headers": [
                      {"serializer": "gpunet-codec", "split-num-sub-frames": [1, 1], "split-offsets": [0, 1]}] * 3}
    yield "a collection whose parts overlap", collection, [head, buffer]


@pytest.mark.parametrize("why, sub_header, sub_frames", list(_forged_layouts()), ids=lambda v: v if isinstance(v, str) else "")
def test_a_forged_frame_layout_never_aliases_nor_multiplies_a_buffer(why, sub_header, sub_frames):
    """Dask merges a payload's frames as its header says (split-offsets, a collection's
    frame-lengths): a header that reuses a frame would hand two outputs one buffer (both
    writable views of it) or copy a message many times over. The layout is refused."""
    import asyncio

    from gpunet.client.data_comm import RefusedPayload

    async def send(writer, _):
        writer.stream.write(_raw_message(sub_header, sub_frames))  # flushed while the notebook reads

    arrived = asyncio.run(_over_a_socket_pair(send))["data"]
    assert isinstance(arrived, RefusedPayload) and "frames" in str(arrived), (why, arrived)


def test_two_payloads_naming_the_same_frames_are_refused():
    """Two outputs of one message that point Dask at the same payload frames would be
    decoded as views of one buffer: the second is refused."""
    import asyncio

    from gpunet.client.data_comm import RefusedPayload

    head, buffer = _two_outputs_in_one_frame()
    header = {"serializer": "gpunet-codec", "num-sub-frames": 2, "split-num-sub-frames": [1, 1],
              "split-offsets": [0, 1]}
    skeleton = {"data": {"x": {"__Serialized__": 1}, "y": {"__Serialized__": 1}}}

    async def send(writer, _):
        writer.stream.write(_raw_message(header, [head, buffer], skeleton=skeleton))

    arrived = asyncio.run(_over_a_socket_pair(send))["data"]
    assert isinstance(arrived["x"], codec.Frames) and isinstance(arrived["y"], RefusedPayload)


def test_the_data_only_comm_refuses_a_message_of_countless_empty_frames(monkeypatch):
    """Empty frames cost no bytes on the wire but each costs the notebook a view and a
    length: a message of 300,000 of them is charged for that, and refused."""
    import asyncio
    import struct

    from gpunet.client import data_comm

    monkeypatch.setattr(data_comm, "max_message_bytes", 16 * 1024 * 1024)
    count = 300_000

    async def send(writer, _):
        writer.stream.write(struct.pack("QQ", 8 * (count + 1), count) + bytes(8 * count))

    with pytest.raises(ProviderDataError, match="300,000 frames"):
        asyncio.run(_over_a_socket_pair(send))


def _empty_maps(count):
    """msgpack of a list of ``count`` empty maps: one byte each on the wire, 64 in memory."""
    import struct

    return b"\xdd" + struct.pack(">I", count) + b"\x80" * count


@pytest.mark.parametrize("where", ["the message itself", "a msgpack payload"])
def test_a_small_message_that_decodes_to_countless_containers_is_refused(where, monkeypatch):
    """Dask decodes a message and its msgpack payloads with msgpack: 2,000,000 empty maps
    take 2 MB on the wire and ~140 MB in the notebook (64x; a 256 MB message, 16 GB).
    Lists and maps are charged as the codec charges them, and refused past that."""
    import asyncio
    import struct

    from distributed.protocol.utils import pack_frames

    from gpunet.client import data_comm
    from gpunet.client.data_comm import RefusedPayload

    monkeypatch.setattr(data_comm, "max_message_bytes", 4 * 1024 * 1024)
    maps = _empty_maps(2_000_000)
    if where == "the message itself":
        frames = [b"\x81\xa4data" + maps]  # {"data": [{}, {}, ...]}
    else:
        frames = [msgpack.packb({"data": {"__Serialized__": 1}}), msgpack.packb({"serializer": "msgpack", "num-sub-frames": 1}), maps]

    async def send(writer, _):
        packed = pack_frames(frames)
        writer.stream.write(struct.pack("Q", len(packed)) + packed)

    try:
        arrived = asyncio.run(_over_a_socket_pair(send))
    except ProviderDataError as exc:
        assert where == "the message itself" and "lists and maps" in str(exc)
    else:
        assert isinstance(arrived["data"], RefusedPayload) and "lists and maps" in str(arrived["data"]), where


def test_frames_decoded_twice_never_hand_out_one_buffer_twice():
    """A result the notebook decodes twice (a copy compared for verification, then taken;
    ``.result()`` asked again) must not give two values one buffer: the frames are the
    notebook's once, and a second decode copies (nested outputs too)."""
    frames = owned(codec.encode_frames({"x": MEGABYTE}))
    first, second = codec.decode(frames)["x"], codec.decode(frames)["x"]
    assert not first.flags.owndata and not np.shares_memory(first, second)
    nested = owned(codec.encode_frames({"out": codec.encode_frames(MEGABYTE)}))
    outputs = [codec.decode(codec.decode(nested)["out"]) for _ in range(2)]
    assert not np.shares_memory(*outputs)
    output = codec.decode(nested)["out"]
    assert not np.shares_memory(codec.decode(output), codec.decode(output))
