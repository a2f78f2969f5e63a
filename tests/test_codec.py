"""The data codec: every type it carries round-trips; nothing else does, and hostile bytes never run code."""

from __future__ import annotations

import math
import pickle
import struct

import msgpack
import numpy as np
import pandas as pd
import pytest

from gpunet import codec
from gpunet.errors import ProviderDataError, UnsupportedResultError


def round_trip(value):
    return codec.decode(codec.encode(value))


@pytest.mark.parametrize("value", [
    None, True, False, 0, -1, 2**63 - 1, -(2**63), 2**64 - 1, 2**200, -(2**130), 1.5, -0.0, math.inf, 1 + 2j,
    "", "text é ✓", b"", b"\x00\xff", [], [1, "a", None], (), (1, (2, 3)), {"a": 1, 2: "b", (1, 2): [3]},
    {"nested": {"deeper": [(1.0, b"x")]}},
])
def test_plain_values_round_trip_with_their_types(value):
    back = round_trip(value)
    assert back == value and type(back) is type(value)


def test_nan_round_trips():
    assert math.isnan(round_trip(float("nan")))


def test_dict_order_is_kept():
    assert list(round_trip({"b": 1, "a": 2})) == ["b", "a"]


@pytest.mark.parametrize("array", [
    np.arange(12, dtype=np.int64).reshape(3, 4),
    np.linspace(0, 1, 7, dtype=np.float32),
    np.array([[True, False]]),
    np.array([1 + 1j, 2 - 3j], dtype=np.complex128),
    np.array(["a", "bcd"]),
    np.array([b"x", b"yz"]),
    np.array(["2024-01-01", "2025-06-30"], dtype="datetime64[ns]"),
    np.array([1, 2], dtype="timedelta64[s]"),
    np.arange(24, dtype=np.uint16).reshape(2, 3, 4)[:, ::2, 1:],  # not contiguous
    np.zeros((0, 3)),
    np.array(3.5),  # 0-d
    np.arange(6, dtype=">i4"),  # big-endian
])
def test_numpy_arrays_round_trip_writable(array):
    back = round_trip(array)
    assert isinstance(back, np.ndarray) and back.dtype == array.dtype and back.shape == array.shape
    np.testing.assert_array_equal(back, array)
    if back.size:
        back.flat[0] = back.flat[-1]  # the notebook may change what came back


def test_numpy_scalars_round_trip():
    for scalar in (np.float32(1.25), np.int8(-3), np.float64(2.5), np.bool_(True), np.datetime64("2020-01-01")):
        back = round_trip(scalar)
        assert back == scalar and type(back) is type(scalar)


def test_jax_arrays_come_back_as_numpy():
    jnp = pytest.importorskip("jax.numpy")
    back = round_trip({"w": jnp.arange(4.0)})
    assert isinstance(back["w"], np.ndarray)
    np.testing.assert_array_equal(back["w"], np.arange(4.0, dtype=np.float32))


def test_pandas_frames_and_series_round_trip():
    frame = pd.DataFrame({"n": np.arange(5), "x": np.linspace(0, 1, 5), "s": list("abcde"),
                          "t": pd.date_range("2024-01-01", periods=5), "b": [True, False] * 2 + [True]})
    pd.testing.assert_frame_equal(round_trip(frame), frame)
    indexed = frame.set_index("s")
    pd.testing.assert_frame_equal(round_trip(indexed), indexed)
    series = pd.Series([1.5, 2.5], index=pd.Index(["a", "b"], name="k"), name="v")
    pd.testing.assert_series_equal(round_trip(series), series)
    stepped = pd.DataFrame({"a": [1, 2]}, index=pd.RangeIndex(10, 14, 2))
    pd.testing.assert_frame_equal(round_trip(stepped), stepped)
    mixed = pd.DataFrame({"c": pd.Categorical(["a", "b", "a"]), "o": [1, "x", None], "s": ["p", None, "q"]})
    pd.testing.assert_frame_equal(round_trip(mixed), mixed)


def test_matplotlib_figures_come_back_as_png():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots()
    axes.plot([1, 2, 3])
    back = round_trip(figure)
    plt.close(figure)
    assert back.format == "png" and back.data.startswith(b"\x89PNG")


class Model:
    pass


@pytest.mark.parametrize("value, where", [
    (Model(), "is a test_codec.Model"),
    ({"model": [1, Model()]}, "holds at ['model'][1] a test_codec.Model"),
    (np.array([Model()], dtype=object), "dtype object"),
    (pd.DataFrame({"o": [Model(), 1]}), "column 'o' (object) holds a test_codec.Model"),
    ({1, 2}, "is a set"),
    (lambda: 1, "function"),
])
def test_other_types_are_refused_naming_the_output_and_what_to_do(value, where):
    with pytest.raises(UnsupportedResultError) as info:
        codec.encode(value, name="output 'res'")
    message = str(info.value)
    assert message.startswith("output 'res'") and where in message
    assert "Return its data instead" in message and "--trust-providers" in message
    assert isinstance(info.value, TypeError)


def test_decode_never_unpickles(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    for hostile in (pickle.dumps(Evil()), msgpack.packb(msgpack.ExtType(4, pickle.dumps(Evil())))):
        with pytest.raises(ProviderDataError):
            codec.decode(hostile)
    assert not marker.exists()


def array_payload(dtype: str, shape: list, raw: bytes) -> bytes:
    """An array extension's payload as a hostile provider would write it."""
    header = msgpack.packb([dtype, shape])
    return struct.pack("<I", len(header)) + header + raw


def test_an_object_dtype_array_is_refused_when_decoding():
    with pytest.raises(ProviderDataError, match="dtype object"):
        codec.decode(msgpack.packb(msgpack.ExtType(4, array_payload("|O", [1], b"\x00" * 8))))


@pytest.mark.parametrize("payload", [
    array_payload("<f8", [3], b"\x00" * 8),  # too few bytes for the shape
    array_payload("<f8", [-1], b""),
    array_payload("V8", [1], b"\x00" * 8),
    struct.pack("<I", 1000) + b"\x91",  # a header longer than the payload
    b"\xc1",
])
def test_malformed_arrays_are_refused(payload):
    with pytest.raises(ProviderDataError):
        codec.decode(msgpack.packb(msgpack.ExtType(4, payload)))


def test_decode_refuses_over_its_cap_before_reading():
    data = codec.encode(b"x" * 1000)
    with pytest.raises(ProviderDataError, match="over its cap of 100 bytes"):
        codec.decode(data, max_bytes=100, what="output 'y'")


def test_unknown_extensions_and_garbage_are_refused():
    for data in (msgpack.packb(msgpack.ExtType(99, b"")), b"\x92\x01", "not bytes"):
        with pytest.raises(ProviderDataError):
            codec.decode(data)


def test_digest_is_canonical_over_dict_order_and_sensitive_to_values():
    assert codec.digest({"a": 1, "b": [1, 2]}) == codec.digest({"b": [1, 2], "a": 1})
    assert codec.digest({"a": 1}) != codec.digest({"a": 2})
    assert codec.digest(np.arange(3)) != codec.digest(np.arange(3.0))


def test_clean_text_strips_terminal_control_sequences():
    hostile = "ok\x1b[2J\x1b[1;1Hfake\x1b]0;title\x07 prompt\x1b]8;;http://x\x1b\\link\x00\x07\tend\r\n"
    assert codec.clean_text(hostile) == "okfake promptlink\tend\r\n"


def test_deeply_nested_extension_values_are_refused_without_crashing():
    # each tuple level starts a fresh msgpack unpack on the C stack: 10,000 of them used to segfault,
    # so the decode runs in a child process, and the test survives a crash to report it
    import subprocess
    import sys

    script = ("import msgpack\nfrom gpunet import codec\nfrom gpunet.errors import ProviderDataError\n"
              "data = msgpack.packb(None)\n"
              "for _ in range(10_000):\n    data = msgpack.packb(msgpack.ExtType(1, b'\\x91' + data))\n"
              "try:\n    codec.decode(data)\nexcept ProviderDataError as exc:\n    print('refused:', exc)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "refused:" in done.stdout and "nest more than 32" in done.stdout
    assert round_trip(((((1,),),),)) == ((((1,),),),)


def frame_payload(index, columns):
    return msgpack.packb(msgpack.ExtType(7, msgpack.packb([index, columns], use_bin_type=True)), use_bin_type=True)


def test_columns_that_would_expand_under_a_huge_index_are_refused():
    scalar = ["array", array_payload("<f8", [], b"\x00" * 8)]
    huge = ["range", 0, 2**28, 1, None]
    series = msgpack.packb(msgpack.ExtType(6, msgpack.packb([None, huge, scalar], use_bin_type=True)),
                           use_bin_type=True)
    with pytest.raises(ProviderDataError, match="0-dimensional array, not a 1-D one"):
        codec.decode(series)
    with pytest.raises(ProviderDataError, match="0-dimensional"):
        codec.decode(frame_payload(huge, [["a", scalar]]))
    one = ["array", array_payload("<f8", [1], b"\x00" * 8)]
    with pytest.raises(ProviderDataError, match="index of length 268,435,456 does not fit columns of length 1"):
        codec.decode(frame_payload(huge, [["a", one]]))
    with pytest.raises(ProviderDataError, match="more memory than its cap"):
        codec.decode(frame_payload(["range", 0, 2**40, 1, None], []), max_bytes=1000)
    assert codec.decode(frame_payload(["range", 0, 5, 1, None], [])).shape == (5, 0)  # honest empty frames load


@pytest.mark.parametrize("dtype, shape", [("<U0", [2**40, 2**40]), ("|S0", [2**30])])
def test_arrays_of_zero_size_items_cannot_claim_huge_shapes(dtype, shape):
    with pytest.raises(ProviderDataError, match="more memory than its cap"):
        codec.decode(msgpack.packb(msgpack.ExtType(4, array_payload(dtype, shape, b""))))


def test_sub_array_dtypes_are_refused():
    with pytest.raises(ProviderDataError, match="does not travel"):
        codec.decode(msgpack.packb(msgpack.ExtType(4, array_payload("(1000000,)f8", [1], b""))))


def empty_lists(count):
    """msgpack of a list of ``count`` empty lists: one byte each, 64 bytes each once decoded."""
    return b"\xdd" + count.to_bytes(4, "big") + b"\x90" * count


def test_lists_and_maps_cannot_expand_far_beyond_their_bytes():
    bomb = empty_lists(2_000_000)  # 2 MB that would take 128 MB
    with pytest.raises(ProviderDataError, match="lists and maps would take more memory"):
        codec.decode(bomb)
    with pytest.raises(ProviderDataError, match="lists and maps would take more memory"):
        codec.decode(codec.encode((1, {"a": [[]] * 2_000_000})))  # inside a tuple (an extension) too
    honest = list(range(100)) * 20_000  # 2 MB of small ints: 8 bytes a slot, as honest data takes
    assert codec.decode(codec.encode(honest)) == honest


def test_plain_msgpack_is_unpacked_within_its_budget():
    assert codec.unpack_plain(msgpack.packb({"items": [b"x"] * 1000, "n": [[1, 2]] * 10}), budget=100_000)["n"][0] \
        == [1, 2]
    for bomb in (empty_lists(10_000), msgpack.packb([None] * 100_000)):  # nested, and flat: refused before it is made
        with pytest.raises(ProviderDataError, match="lists and maps would take more memory"):
            codec.unpack_plain(bomb, budget=100_000)
    assert isinstance(codec.unpack_plain(msgpack.packb(msgpack.ExtType(4, b"")), budget=100), msgpack.ExtType)
