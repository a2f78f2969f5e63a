"""Data at Dask's speed: a value is pickled once, where it is made, and its large
buffers (NumPy arrays, pandas columns) travel as Dask frames of their own, never
copied into one bytes blob and again into the task's frame."""

from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest
from distributed.protocol import deserialize, serialize

from gpunet import codec, wire
from gpunet.client.handle import pickled
from gpunet.errors import UnpicklableInputError
from gpunet.verify.quorum import result_digest
from gpunet.wire import PICKLE, JobResult, Pickled, pickle_value, unpickle_value


def _views_of(frames):
    return [np.frombuffer(frame, dtype=np.uint8) for frame in frames if memoryview(frame).nbytes]


def test_a_large_array_is_pickled_once_with_its_buffer_kept_apart():
    array = np.arange(1_000_000, dtype=np.float64)
    blob = pickle_value(array)
    assert isinstance(blob, Pickled) and len(blob.buffers) == 1
    assert np.shares_memory(np.frombuffer(blob.buffers[0], dtype=np.float64), array)  # not copied
    assert len(blob) >= array.nbytes
    assert np.array_equal(unpickle_value(blob), array)


def test_a_small_value_stays_plain_bytes():
    blob = pickle_value({"x": 1, "y": [1, 2, 3]})
    assert isinstance(blob, bytes)
    assert unpickle_value(blob) == {"x": 1, "y": [1, 2, 3]}


def test_dask_sends_the_buffers_as_frames_of_their_own_uncopied():
    frame = pd.DataFrame({"a": np.arange(200_000), "b": np.linspace(0.0, 1.0, 200_000)})
    array = np.ones(500_000)
    blob = pickle_value((array, frame))
    header, frames = serialize(blob, serializers=("pickle",))
    views = _views_of(frames)
    assert any(np.shares_memory(view, array) for view in views)  # the array's own memory is the frame
    assert any(np.shares_memory(view, frame["b"].to_numpy()) for view in views)
    assert max(memoryview(f).nbytes for f in frames[:1]) < 64 * 1024  # the first frame: the stream only
    back, back_frame = deserialize(header, frames).load()
    assert np.array_equal(back, array) and back_frame.equals(frame)
    assert back.flags.writeable


def test_a_buffer_that_arrives_read_only_is_the_notebooks_own_writable_copy():
    blob = pickle_value(np.arange(100_000))
    arrived = Pickled(blob.stream, [bytes(memoryview(buffer)) for buffer in blob.buffers], blob.writable)
    value = arrived.load()
    assert value.flags.writeable and np.array_equal(value, np.arange(100_000))


def test_old_protocols_carry_the_buffers_in_band():
    blob = pickle_value(np.arange(100_000))
    again = pickle.loads(pickle.dumps(blob, protocol=4))
    assert np.array_equal(again.load(), np.arange(100_000))


def test_a_long_stream_without_buffers_travels_as_its_own_frame_too():
    value = list(range(100_000))
    blob = pickle_value(value)
    assert isinstance(blob, Pickled) and not blob.buffers
    header, frames = serialize(blob, serializers=("pickle",))
    assert any(memoryview(frame).nbytes == len(blob.stream) for frame in frames[1:])
    assert deserialize(header, frames).load() == value


def test_results_pickled_apart_are_compared_by_their_content():
    def result(value):
        return JobResult("job", None, "w", "cpu", 0.0, 1.0, value=codec.dump(value, PICKLE, name="the return value"))

    assert result_digest(result(np.arange(100_000))) == result_digest(result(np.arange(100_000)))
    assert result_digest(result(np.arange(100_000))) != result_digest(result(np.arange(1, 100_001)))
    # where one part ends is hashed too: the same bytes split differently differ
    split_one = JobResult("job", None, "w", "cpu", 0.0, 1.0, value=Pickled(b"ab", [b"c" * 10]))
    split_two = JobResult("job", None, "w", "cpu", 0.0, 1.0, value=Pickled(b"abc", [b"c" * 9]))
    assert result_digest(split_one) != result_digest(split_two)


def test_an_unpicklable_input_is_still_named():
    import threading

    with pytest.raises(UnpicklableInputError, match="input 'lock'"):
        pickled(threading.Lock(), "input 'lock'", name="lock")


def test_results_as_data_never_unpickle():
    blob = codec.dump(np.arange(10), wire.CODEC, name="x")
    assert not isinstance(blob, Pickled)
    assert np.array_equal(codec.load(blob, wire.CODEC, what="x"), np.arange(10))


def _first(array):
    return float(array.reshape(-1)[0])


def _ones(n):
    return np.ones(n)


def test_large_arrays_travel_both_ways_through_run_and_map(net):
    array = np.random.default_rng(0).random(2 * 1024 * 1024)  # 16 MB
    assert net.run(_first, array) == float(array[0])
    assert net.map(_first, [array, array * 2]) == [float(array[0]), float(array[0] * 2)]
    back = net.run(_ones, 1_000_000)
    assert back.shape == (1_000_000,) and back.flags.writeable and back.sum() == 1_000_000


def test_a_large_cell_input_and_output_travel(ip):
    ip.user_ns["big"] = np.arange(3_000_000, dtype=np.float64)
    ip.run_cell_magic("gpunet", "--quiet", "doubled = big * 2")
    assert np.array_equal(ip.user_ns["doubled"], np.arange(3_000_000, dtype=np.float64) * 2)
    assert ip.user_ns["doubled"].flags.writeable


def test_a_result_kept_for_reuse_is_flat_msgpack_data():
    import msgpack

    from gpunet.wire import flat_result, result_from_event, result_to_event

    result = JobResult("job", None, "w", "cpu", 0.0, 1.0, value=pickle_value(np.arange(100_000)),
                       outputs={"small": pickle_value(3)})
    packed = msgpack.packb(result_to_event(flat_result(result)), use_bin_type=True)
    back = result_from_event(msgpack.unpackb(packed, raw=False))
    assert np.array_equal(unpickle_value(back.value), np.arange(100_000)) and unpickle_value(back.outputs["small"]) == 3


def test_a_small_array_stays_one_blob_so_that_it_can_come_back_as_an_event():
    blob = pickle_value(np.arange(10))
    assert isinstance(blob, bytes) and np.array_equal(unpickle_value(blob), np.arange(10))
