"""Mixed gpunet versions across the codec's frames (gpunet.codec.Frames).

A notebook on this version asks workers for ``("msgpack", "gpunet-codec", "error")``:
an older provider, whose Dask knows no ``gpunet-codec`` family, answers with msgpack
(its one-piece codec bytes) before it would look that name up; a provider on this
version sends frames, which msgpack cannot pack. An older notebook's job (pickled
without ``reads_frames``) gets one clear error, as bytes such a notebook reads."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from distributed import Client, LocalCluster

from gpunet import codec
from gpunet.client import data_comm
from gpunet.client.received import checked_result
from gpunet.wire import CODEC, VERSION_MISMATCH, Job
from gpunet.worker.runner import run_job

VALUE = {"x": np.arange(4), "label": ("a", 1)}


def _older_notebooks_job() -> Job:
    job = Job("j1", code="x = 1", outputs=("x",), result_format=CODEC)
    del vars(job)["reads_frames"]  # how an older gpunet's pickled Job arrives: without the field
    return job


def test_frames_are_no_msgpack_so_a_worker_asked_for_msgpack_first_sends_them_as_frames():
    from distributed.protocol import serialize

    with pytest.raises(TypeError):
        msgpack.packb(codec.encode_frames(VALUE), use_bin_type=True)
    header, _ = serialize(codec.encode_frames(VALUE), serializers=data_comm.DATA_SERIALIZERS)
    assert data_comm.DATA_SERIALIZERS[0] == "msgpack" and header["serializer"] == codec.DASK_SERIALIZER
    assert serialize(b"codec bytes", serializers=data_comm.DATA_SERIALIZERS)[0]["serializer"] == "msgpack"


def test_a_job_from_an_older_notebook_gets_one_clear_error_as_one_piece_codec_bytes():
    raw = run_job(_older_notebooks_job(), inputs={})  # its inputs replaced (scattered): still its notebook's job
    assert isinstance(raw, (bytes, memoryview))  # no Frames: the older notebook reads bytes
    result = checked_result(codec.decode(raw), "the job's result")
    assert result.error["ename"] == VERSION_MISMATCH
    assert "this provider runs gpunet" in result.error["evalue"] and "Upgrade gpunet" in result.error["evalue"]
    assert result.outputs == {}  # nothing ran


def test_mixed_versions_over_a_real_worker():
    """A worker process without the gpunet-codec family (an older provider) answers this
    notebook's data-only client; then, on gpunet, sends frames to it; and answers an older
    notebook's client (msgpack only) with the version error as bytes."""
    def _knows_codec_family() -> bool:  # a local function travels by value: the worker imports no gpunet for it
        from distributed.protocol.serialize import families

        return "gpunet-codec" in families

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None, scheduler_port=0) as cluster:
        notebook = Client(data_comm.data_only_address(cluster.scheduler_address), set_as_default=False,
                          deserializers=list(data_comm.DATA_SERIALIZERS))
        older_notebook = Client(cluster.scheduler_address, set_as_default=False,
                                deserializers=["msgpack", "error"])
        try:
            assert list(notebook.run(_knows_codec_family).values()) == [False]
            older_result = bytes(codec.encode(VALUE))  # what an older provider's task returns
            got = notebook.submit(lambda blob: blob, older_result, pure=False).result(timeout=60)
            assert isinstance(got, bytes)
            back = codec.decode(got)
            assert np.array_equal(back["x"], VALUE["x"]) and back["label"] == ("a", 1)

            raw = older_notebook.submit(run_job, _older_notebooks_job(), pure=False).result(timeout=60)
            assert isinstance(raw, bytes)
            assert checked_result(codec.decode(raw), "the result").error["ename"] == VERSION_MISMATCH

            assert list(notebook.run(_knows_codec_family).values()) == [True]  # gpunet now runs there
            big = np.arange(131_072, dtype=np.float64)
            arrived = notebook.submit(codec.encode_frames, big, pure=False).result(timeout=60)
            assert isinstance(arrived, codec.Frames) and arrived.owned
            assert np.array_equal(codec.decode(arrived), big)
        finally:
            older_notebook.close()
            notebook.close()
