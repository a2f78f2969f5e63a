"""What the notebook accepts from providers it does not trust, piece by piece: the
data-only Dask comm's reader, a result checked on arrival, signed live events,
sanitized displays, the worker's caps, and verification over decoded data."""

from __future__ import annotations

import dataclasses

import pytest
from distributed.protocol import Serialized, dumps, serialize, to_serialize
from distributed.protocol.serialize import ToPickle

from gpunet import codec
from gpunet.client import data_comm
from gpunet.client.received import accept, accept_chunk, live_event, sanitized_html, shown_display
from gpunet.client.submit import MAP_CHUNK_ITEMS, map_chunks
from gpunet.errors import ProviderDataError, RemoteCellError, ResultTooLargeError
from gpunet.kernels import Tolerance
from gpunet.verify.quorum import disagreement, result_digest
from gpunet.wire import CODEC, PICKLE, TOO_LARGE, Job, JobResult, pickle_value, result_to_event, sign_event
from gpunet.worker import runner
from gpunet.worker.runner import encode_result, run_chunk, run_job


class WritesMarker:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


# -- the data-only comm's reader ------------------------------------------------------------


def read(message):
    return data_comm.data_only_loads(dumps(message))


def test_a_message_over_the_cap_is_refused_before_it_is_read(monkeypatch):
    """The data-only comm reads a message's sizes first (gpunet.guarded_tls.read_frames):
    over the cap, nothing more is read and the connection is closed."""
    import asyncio

    from distributed.comm import connect, listen

    monkeypatch.setattr(data_comm, "max_message_bytes", 1000)

    async def main():
        async def send_big(comm):
            await comm.write({"blob": b"x" * 10_000})

        listener = listen("tcp://127.0.0.1:0", send_big)
        await listener.start()
        try:
            comm = await connect(data_comm.data_only_address(listener.contact_address))
            with pytest.raises(ResultTooLargeError, match="over this notebook's cap of 1,000 bytes"):
                await comm.read()
            assert comm.closed()
        finally:
            listener.stop()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_msgpack_payloads_and_plain_messages_are_read():
    message = {"op": "gather", "data": {"k": to_serialize(b"codec bytes")}, "n": [1, 2]}
    header, frames = serialize(b"codec bytes", serializers=["msgpack"])
    message["data"]["k"] = Serialized(header, frames)
    assert read(message) == {"op": "gather", "data": {"k": b"codec bytes"}, "n": (1, 2)}


@pytest.mark.parametrize("wrap", [
    lambda evil: Serialized(*serialize(evil, serializers=["pickle"])),
    lambda evil: Serialized(*serialize(evil, serializers=["dask", "pickle"])),
    lambda evil: ToPickle(evil),
    lambda evil: Serialized(*serialize([evil, 1], serializers=["pickle", "msgpack"], iterate_collection=True)),
])
def test_pickled_payloads_are_refused_and_never_loaded(tmp_path, wrap):
    marker = tmp_path / "ran"
    got = read({"op": "task-erred", "exception": wrap(WritesMarker(marker))})
    assert isinstance(got["exception"], data_comm.RefusedPayload)
    assert not marker.exists()


def test_a_compressed_payload_is_refused_before_it_is_decompressed():
    import zlib

    import msgpack

    bomb = zlib.compress(msgpack.packb(bytes(100_000_000)), 9)  # ~100 KB on the wire, 100 MB decompressed
    header = {"serializer": "msgpack", "compression": ("zlib",), "num-sub-frames": 1}
    got = read({"op": "gather", "data": Serialized(header, [bomb]), "n": 1})
    assert isinstance(got["data"], data_comm.RefusedPayload) and got["n"] == 1
    assert "zlib-compressed" in str(got["data"]) and "that payload was not loaded (the rest" in str(got["data"])
    plain = {"serializer": "msgpack", "compression": (None,), "num-sub-frames": 1}
    assert read({"data": Serialized(plain, [msgpack.packb(b"ok")])}) == {"data": b"ok"}


def test_refusals_carry_no_terminal_escapes(caplog):
    error = {"serializer": "error", "num-sub-frames": 1}
    named = {"serializer": "\x1b[31mevil\x1b[0m", "num-sub-frames": 0}
    got = read({"exception": Serialized(error, [b"\x1b]0;pwned\x07\x1b[2Jfake"]), "x": Serialized(named, [])})
    texts = [str(got["exception"]), str(got["x"]), caplog.text]
    assert all("\x1b" not in text and "\x07" not in text for text in texts)
    assert "fake" in texts[0] and "evil" in texts[1]


def test_data_only_addresses():
    assert data_comm.data_only_address("tcp://10.0.0.1:8786") == "gpunet-data://10.0.0.1:8786"
    assert data_comm.data_only_address("tls://h:1") == "gpunet-data-tls://h:1"
    with pytest.raises(ProviderDataError, match="tcp:// or tls://"):
        data_comm.data_only_address("ucx://h:1")


# -- a result checked on arrival ---------------------------------------------------------------


def codec_job(**options):
    return Job("job1", code="pass", result_format=CODEC, **options)


def encoded(job, **fields):
    result = JobResult("job1", None, "tcp://w:1", "cpu", 0.0, 1.0, result_format=CODEC)
    return codec.encode(result_to_event(dataclasses.replace(result, **fields)))


def test_a_result_is_decoded_and_its_text_cleaned():
    job = codec_job()
    raw = encoded(job, worker="tcp://w:1\x1b[8m", streams=[(1, "stdout", "a\x1b[2Jb\n")],
                  outputs={"y": codec.encode([1, 2])},
                  error=None)
    result = accept(raw, job, None)
    assert result.worker == "tcp://w:1" and result.streams == [(1, "stdout", "ab\n")]
    assert codec.load(result.outputs["y"], result.result_format, what="y") == [1, 2]


@pytest.mark.parametrize("fields, why", [
    ({"job_id": "another"}, "not the one asked for"),
    ({"index": 3}, "not the one asked for"),
    ({"outputs": {"y": "not bytes"}}, "outputs"),
    ({"streams": [(1, "tty", "x")]}, "output text"),
    ({"error": {"ename": 1}}, "error"),
    ({"displays": [({1: "x"}, {})]}, "displays"),
])
def test_a_malformed_or_misdirected_result_is_refused(fields, why):
    with pytest.raises(ProviderDataError, match=why):
        accept(encoded(codec_job(), **fields), codec_job(), None)


def test_a_pickled_or_oversized_result_is_refused():
    job = codec_job(max_result_bytes=100)
    with pytest.raises(ProviderDataError, match="not as data"):
        accept(JobResult("job1", None, "w", "d", 0, 1), job, None)
    with pytest.raises(ResultTooLargeError, match="over its cap of 100 bytes"):
        accept(encoded(job, outputs={"y": bytes(1000)}), job, None)


def test_output_text_over_its_rate_is_refused():
    job = codec_job(max_stream_bytes_per_s=100)
    with pytest.raises(ResultTooLargeError, match="100 bytes per second"):
        accept(encoded(job, streams=[(1, "stdout", "x" * 10_000)]), job, None)


def test_live_events_count_only_when_signed_with_the_jobs_key():
    job = codec_job()
    event = {"job": "job1", "kind": "stream", "seq": 1, "name": "stdout", "text": "hi\x1b[2J"}
    assert live_event(job, dict(event)) is None
    assert live_event(job, sign_event("guessed", dict(event))) is None
    signed = sign_event(job.event_key, dict(event))
    shown = live_event(job, {**signed, "worker": "tcp://stamped-by-the-scheduler"})
    assert shown["text"] == "hi"
    assert live_event(job, {**signed, "text": "changed"}) is None


@pytest.mark.parametrize("change", [{"seq": "1"}, {"seq": True}, {"text": ["hi"]}, {"name": None}, {"index": "0"},
                                    {"kind": "other"}, {"kind": "started"}])
def test_a_signed_live_event_of_the_wrong_shape_is_ignored(change):
    """A provider's worker signs what it likes: a stream event whose seq is text made the
    notebook's wait fail with a TypeError (through the gateway too)."""
    job = codec_job()
    event = {"job": "job1", "kind": "stream", "seq": 1, "name": "stdout", "text": "hi", "index": None}
    assert live_event(job, sign_event(job.event_key, dict(event)))["text"] == "hi"
    assert live_event(job, sign_event(job.event_key, {**event, **change})) is None
    started = {"job": "job1", "kind": "started", "worker": "tls://w", "device": "cpu"}
    assert live_event(job, sign_event(job.event_key, started))["device"] == "cpu"


# -- displays -----------------------------------------------------------------------------------


def test_html_and_svg_lose_everything_that_runs_or_loads():
    html = sanitized_html('<table onclick="x()"><tr><td style="background:url(http://e)">1</td></tr></table>'
                          '<script>alert(1)</script><img src="http://e/x.png" onerror="alert(1)">'
                          '<img src="data:image/png;base64,AAAA"><iframe src="http://e"></iframe>'
                          '<form action="http://e"><input></form><a href="javascript:alert(1)">link</a>')
    for bad in ("script", "onclick", "onerror", "http://e", "iframe", "form", "input", "style", "javascript"):
        assert bad not in html
    assert "<td>1</td>" in html and 'src="data:image/png;base64,AAAA"' in html and "link" in html
    svg = sanitized_html('<svg viewBox="0 0 1 1" onload="x()"><script>y()</script><path d="M0 0" fill="red"/>'
                         '<foreignObject><div>z</div></foreignObject><image href="http://e/x.png"/></svg>', svg=True)
    assert svg.startswith('<svg viewBox="0 0 1 1">') and '<path d="M0 0" fill="red">' in svg
    for bad in ("onload", "script", "foreignObject", "http://e"):
        assert bad not in svg


def test_a_display_keeps_only_what_is_safe_and_says_what_it_dropped():
    shown, metadata, dropped = shown_display(
        {"text/plain": "a\x1b[2Jb", "image/png": b"\x89PNG", "application/javascript": "alert(1)",
         "application/vnd.jupyter.widget-view+json": {"model_id": "x"}, "text/html": "<b onmouseover=x>hi</b>"},
        {"image/png": {"width": 10, "onload": "x"}, "application/javascript": {"a": 1}})
    assert shown == {"text/plain": "ab", "image/png": b"\x89PNG", "text/html": "<b>hi</b>"}
    assert metadata == {"image/png": {"width": 10}}
    assert dropped == ["application/javascript", "application/vnd.jupyter.widget-view+json"]


def test_svg_and_html_load_nothing_from_elsewhere_and_borrow_no_notebook_styles():
    svg = sanitized_html('<svg><defs><clipPath id="c1"><rect width="1" height="1"/></clipPath></defs>'
                         '<rect width="10" height="10" fill="url(https://evil.example/p.svg#g)"/>'
                         '<g clip-path="url(#c1)"><path d="M0 0" fill="url( #grad )"/></g></svg>', svg=True)
    assert "evil" not in svg and 'clip-path="url(#c1)"' in svg and 'fill="url( #grad )"' in svg
    html = sanitized_html('<div class="jp-Dialog">Session expired</div><img src="data:image/svg+xml,<svg>">'
                          '<img src="data:image/png;base64,AAAA" width="99999999" height="10">')
    assert "class" not in html and "svg" not in html and "99999999" not in html
    assert '<img src="data:image/png;base64,AAAA" height="10">' in html


def test_an_image_given_as_text_must_be_base64():
    shown, metadata, dropped = shown_display({"image/png": '"><script>alert(1)</script>', "image/jpeg": "/9j/4A==\n"},
                                             {"image/png": {"width": 10**9}, "image/jpeg": {"width": 10**9}})
    assert shown == {"image/jpeg": "/9j/4A==\n"} and dropped == ["image/png"] and metadata == {}


def test_a_copys_preview_carries_no_terminal_escapes():
    import pandas as pd

    from gpunet.verify.quorum import preview

    frame = pd.DataFrame({"x": ["\x1b]0;pwned\x07\x1b[2Jhi"]})
    result = JobResult("j", None, "w", "d", 0.0, 1.0, value=codec.encode(frame), result_format=CODEC)
    assert "\x1b" not in preview(result) and "hi" in preview(result)


# -- the worker's side: codec results within their caps -------------------------------------------


def test_a_codec_job_returns_data_with_its_exception_as_text():
    raw = run_job(Job("j", code="x = 1\nraise KeyError('k')", result_format=CODEC))
    result = accept(raw, Job("j", result_format=CODEC), None)
    assert result.error["ename"] == "KeyError" and result.error["exception"] is None
    assert 'line 2' in result.error["traceback"]
    error = RemoteCellError.of(result.error["ename"], result.error["evalue"], result.error["traceback"])
    assert isinstance(error, KeyError)


def test_a_codec_job_over_its_caps_sends_only_its_error():
    job = Job("j", code="y = bytes(5000)", outputs=("y",), result_format=CODEC, max_result_bytes=1000)
    result = JobResult(**codec.decode(run_job(job)))
    assert result.error["ename"] == TOO_LARGE and "over its cap of 1,000 bytes" in result.error["evalue"]
    assert result.outputs == {}
    context = runner._JobContext(Job("j", result_format=CODEC, max_stream_bytes_per_s=1000), None, None)
    context.write("stdout", "x" * 900)
    with pytest.raises(runner.OutputTooLarge, match="1,000 bytes per second"):
        context.write("stdout", "x" * 200)


def test_a_display_the_codec_cannot_carry_is_left_out_with_a_note():
    result = JobResult("j", None, "w", "d", 0.0, 1.0, displays=[({"text/plain": "ok"}, {}),
                                                                 ({"application/x": object()}, {})])
    decoded = JobResult(**codec.decode(encode_result(result, 10**6)))
    assert decoded.displays == [({"text/plain": "ok"}, {})] or decoded.displays == [[{"text/plain": "ok"}, {}]]
    assert "could not travel" in decoded.streams[-1][2]


# -- verification compares decoded data, displays included ----------------------------------------


def test_copies_that_differ_only_in_a_display_disagree():
    def copy(displays, value=1.0):
        return JobResult("j", None, "w", "d", 0.0, 1.0, value=codec.encode({"v": value, "k": [1]}),
                         displays=displays, result_format=CODEC)

    plain = [({"text/html": "<b>1</b>"}, {})]
    scripted = [({"text/html": "<b>1</b><script>x()</script>"}, {})]
    tolerance = Tolerance(1e-5, 1e-8)
    assert disagreement(copy(plain), copy(plain, 1.0 + 1e-9), tolerance) is None
    assert result_digest(copy(plain)) != result_digest(copy(scripted))
    assert disagreement(copy(plain), copy(scripted), tolerance) == "their displays differ"


def test_live_output_past_its_cap_is_not_shown(capsys):
    from gpunet.client.submit import RemoteJob

    handle = RemoteJob(None, Job("j", result_format=CODEC, max_stream_bytes_per_s=1000), items=None, resources={},
                       allowed_workers=None)
    assert handle._within_text_cap("x" * 900)
    assert not handle._within_text_cap("x" * 200)
    assert not handle._within_text_cap("x")
    assert capsys.readouterr().err.count("over its cap of 1,000 bytes per second") == 1


def test_a_provider_sends_uncompressed_frames_whatever_its_config_says(monkeypatch):
    import dask

    from gpunet.cli import network

    monkeypatch.setenv("DASK_DISTRIBUTED__COMM__COMPRESSION", "zlib")
    with dask.config.set({"distributed.comm.compression": "zlib"}):
        network._uncompressed_comms()
        assert dask.config.get("distributed.comm.compression") is False
    assert network.os.environ["DASK_DISTRIBUTED__COMM__COMPRESSION"] == "False"


def test_a_providers_device_description_is_cleaned_and_type_checked():
    from gpunet.ui.status import device_columns, provider_capability, provider_device

    honest = {"tflops_f32": 12.5, "tflops_bf16": None, "bf16_native": False, "bandwidth_gbs": 300.0, "seconds": 1.0}
    device = provider_device({"kind": "\x1b]0;pwned\x07\x1b[2Jgpu", "name": "H100\x1b[8m hidden", "memory_bytes": 2**30,
                              "evil": object(), 7: "x", "software": {"torch": "2.4\x1b[31m"}, "capability": honest})
    assert device == {"kind": "gpu", "name": "H100 hidden", "memory_bytes": 2**30, "software": {"torch": "2.4"},
                      "capability": honest}
    assert "\x1b" not in "".join(device_columns(device))
    for lie in ({**honest, "tflops_f32": 9999.0}, {**honest, "tflops_f32": "fast"}, {**honest, "seconds": float("nan")},
                {**honest, "tflops_f32": True}, {**honest, "bandwidth_gbs": -1.0}, "fast", {"tflops_f32": 1.0}):
        assert provider_capability(lie) is None
    assert device_columns(provider_device({"capability": {**honest, "tflops_f32": "1e9"}}))[2] == "not measured"
    assert provider_device("not a dict") == {}


def test_a_payload_the_comm_refused_says_why_on_arrival():
    job = codec_job()
    with pytest.raises(ProviderDataError, match="was refused on arrival: the network sent a zlib-compressed payload"):
        accept(data_comm._refused("zlib-compressed", "which could expand past this notebook's size cap"), job, None)


# -- a map's chunk: several items run as one task ---------------------------------------------


def test_a_chunk_runs_its_items_in_order_each_with_its_own_result_and_error():
    job = Job("j", code="y = 10 // i", outputs=("y",), map_name="i", result_format=CODEC)
    items = [pickle_value(i) for i in (2, 0, 5)]
    results = accept_chunk(run_chunk(job, items, 7), job, range(7, 10))
    assert [result.index for result in results] == [7, 8, 9]
    assert results[1].error["ename"] == "ZeroDivisionError" and results[0].error is results[2].error is None
    assert [codec.decode(result.outputs["y"]) for result in (results[0], results[2])] == [5, 2]


def test_a_chunk_with_results_for_items_it_was_not_given_is_refused():
    job = Job("j", code="y = i", outputs=("y",), map_name="i", result_format=CODEC)
    raw = run_chunk(job, [pickle_value(i) for i in range(3)], 0)
    with pytest.raises(ProviderDataError, match="not the one asked for"):
        accept_chunk(raw, job, range(1, 4))  # the items it ran were 0 to 2
    # a chunk ended early (near the cap) is its first items' results; the rest go again
    assert [result.index for result in accept_chunk(raw, job, range(0, 4))] == [0, 1, 2]
    extra = codec.encode(codec.decode(raw) * 2)  # each item's result as its frames, twice over
    with pytest.raises(ProviderDataError, match="6 results, not one per item"):
        accept_chunk(extra, job, range(0, 3))
    with pytest.raises(ProviderDataError, match="0 results, not one per item"):  # a provider may not run none
        accept_chunk(codec.encode([]), job, range(0, 3))
    shifted = codec.encode(codec.decode(raw)[1:])  # items 1 and 2, passed off as the chunk's first two
    with pytest.raises(ProviderDataError, match="not the one asked for"):
        accept_chunk(shifted, job, range(0, 3))
    with pytest.raises(ProviderDataError, match="over its cap"):
        accept_chunk(codec.encode([bytes(500)] * 3), dataclasses.replace(job, max_result_bytes=100), range(3))
    with pytest.raises(ProviderDataError, match="not one per item"):
        accept_chunk(codec.encode({"0": b""}), job, range(1))


def test_a_chunk_ends_before_its_results_pass_the_cap_and_always_runs_its_first_item():
    job = Job("j", code="y = bytes(n)", outputs=("y",), map_name="n", result_format=CODEC, max_result_bytes=10_000)
    sizes = [4000] * 5
    raw = run_chunk(job, [pickle_value(n) for n in sizes], 0)
    assert codec.nbytes(raw) <= job.max_result_bytes + 64  # within the cap, as one message
    results = accept_chunk(raw, job, range(5))
    assert [result.index for result in results] == [0, 1]  # a third as large as the largest would pass the cap
    # one that is larger than any before it and passes the cap is left out; it goes again
    results = accept_chunk(run_chunk(job, [pickle_value(n) for n in (3000, 9000, 5)], 3), job, range(3, 6))
    assert [result.index for result in results] == [3]
    alone = accept_chunk(run_chunk(job, [pickle_value(9000)], 7), job, range(7, 8))  # alone, it runs
    assert len(codec.decode(alone[0].outputs["y"])) == 9000
    over = accept_chunk(run_chunk(job, [pickle_value(20_000), pickle_value(1)], 0), job, range(2))
    assert [r.error and r.error["ename"] for r in over] == [TOO_LARGE, None]  # over the cap alone: its error, as ever
    trusted = dataclasses.replace(job, result_format=PICKLE)  # no comm cap between trusted ones: never ended early
    assert len(run_chunk(trusted, [pickle_value(n) for n in sizes], 0)) == 5


def test_a_map_travels_in_chunks_only_where_its_items_still_spread_over_every_worker():
    assert map_chunks(2000, 2) == [range(start, start + MAP_CHUNK_ITEMS) for start in range(0, 2000, MAP_CHUNK_ITEMS)]
    assert len(map_chunks(2000, 2)) <= 200  # a few hundred tasks at most
    runs = map_chunks(100, 2)  # 3 items a task at most, lengths differing by one at most
    assert [len(run) for run in runs] == [3] * 32 + [2] * 2 and [i for run in runs for i in run] == list(range(100))
    assert map_chunks(2000, 1000) == [range(i, i + 1) for i in range(2000)]  # many workers: an item a task
    assert map_chunks(5, 0) == [range(i, i + 1) for i in range(5)]
