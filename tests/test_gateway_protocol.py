"""The gateway's protocol as data, no servers: a job checked field by field before
anything is sent, server-sent events both ways, errors carried by name, and the
notebook's connect() refusing what cannot work with a gateway."""

from __future__ import annotations

import asyncio
import io
import pickle

import msgpack
import pytest

import gpunet
from gpunet.client import network as network_module
from gpunet.client.gateway_link import (GATEWAY_PROTOCOL, check_gateway_protocol, error_from, job_request,
                                        sse_events, sse_frame)
from gpunet.errors import BudgetError, CellTimeoutError, GatewayError, GpunetError, PolicyError
from gpunet.gateway import GatewayLimits, job_from
from gpunet.gateway_guard import CUT_MARK, PIECE_BYTES, ConnectionCounts, Relay, UnreadResults
from gpunet import codec, framed
from gpunet.wire import Job, PassedOn, Pickled, pickle_value


class Evil:
    """Unpickling this would raise here: a test that unpickled it would fail loudly."""

    def __reduce__(self):
        return (exec, ("raise SystemExit('unpickled!')",))


def cell_spec(**changes):
    return {"code": "y = x + 1", "inputs": {"x": pickle.dumps(1)}, "outputs": ["y"], "resources": {"device": 1},
            **changes}


def test_a_job_is_data_and_its_pickles_stay_bytes():
    evil = pickle.dumps(Evil())
    job, options = job_from({"function": evil, "arguments": evil, "items": [evil, evil], "inputs": {"x": evil}},
                            "gpunet-events-mine", GatewayLimits())
    assert job.function == evil and job.arguments == evil and job.inputs == {"x": evil}
    assert all(isinstance(item, PassedOn) and item.blob == evil for item in options["items"])
    assert job.topic == "gpunet-events-mine" and job.code is None
    other, _ = job_from(cell_spec(), "t", GatewayLimits())
    assert other.job_id != job.job_id and other.event_key != job.event_key  # the gateway's, never the notebook's


@pytest.mark.parametrize(("change", "message"), [
    ({"code": None}, "exactly one of"),
    ({"function": b"f"}, "exactly one of"),
    ({"code": 7}, "job's code must be text"),
    ({"inputs": {"not a name": b""}}, "a map of Python names"),
    ({"inputs": {"x": "text"}}, "a map of Python names"),
    ({"items": []}, "a list of 1 to"),
    ({"resources": {"cpu": 1}}, "resources must be"),
    ({"outputs": ["a b"]}, "Python names"),
    ({"timeout": -1}, "timeout must be a number above 0"),
    ({"verify": 3}, "a policy"),
    ({"tolerance": [1]}, "rtol, atol"),
    ({"map_name": "1x"}, "a Python name"),
    ({"announce": "yes"}, "true or false"),
    ({"workers": [1]}, "worker addresses"),
])
def test_a_wrong_field_is_named(change, message):
    with pytest.raises(GatewayError, match=message) as refused:
        job_from(cell_spec(**change), "t", GatewayLimits())
    assert refused.value.status == 422


def test_a_policy_that_does_not_parse_says_why():
    with pytest.raises(PolicyError):
        job_from(cell_spec(verify="sometimes"), "t", GatewayLimits())


def test_a_jobs_bytes_are_capped():
    limits = GatewayLimits(max_job_bytes=100)
    job_from(cell_spec(inputs={"x": b"x" * 50}, items=[b"y" * 50]), "t", limits)
    with pytest.raises(GatewayError, match="over this gateway's cap of 100") as refused:
        job_from(cell_spec(inputs={"x": b"x" * 50}, items=[b"y" * 51]), "t", limits)
    assert refused.value.status == 413


def test_what_the_notebook_sends_is_what_the_gateway_takes():
    job = Job("j", function=lambda x: x + 1, arguments=pickle.dumps(((), {})))
    body = job_request(job, items=[1, 2], resources={"device": 1}, workers=None, max_credits=None, timeout=5.0,
                       verify=None, tolerance=None)
    taken, options = job_from(body, "t", GatewayLimits())
    assert isinstance(taken.function, bytes) and len(options["items"]) == 2 and options["timeout"] == 5.0


def test_a_jobs_large_buffers_travel_raw_after_the_head_and_stay_unloaded():
    """A NumPy input's buffer is laid out after a framed body's head (no copy into it); the
    gateway takes it as a view of the body it read, still a pickle nobody loaded."""
    import numpy as np

    array = np.arange(50_000, dtype="float64")
    job = Job("j", code="y = x[1]", inputs={"x": pickle_value(array)}, outputs=("y",))
    body = framed.FramedBody(job_request(job, items=None, resources={"device": 1}, workers=None, max_credits=None,
                                         timeout=5.0, verify=None, tolerance=None))
    assert any(part.obj is array.data.obj or np.shares_memory(np.frombuffer(part, "float64"), array)
               for part in body.parts[1:] if isinstance(part, memoryview) and part.nbytes == array.nbytes)
    sent = body.reader().read()
    assert len(sent) == body.size and len(body.parts[0]) < 1024  # the head is small: the buffer is not in it
    start = framed.PREFIX.size
    end = start + framed.head_length(sent, len(sent), "the body")
    head = codec.unpack_plain(sent[start:end], budget=10**6)
    taken, _ = job_from(framed.laid_out_in(memoryview(sent)[end:], head, what="the body"), "t", GatewayLimits())
    blob = taken.inputs["x"]
    assert isinstance(blob, Pickled) and isinstance(blob.buffers[0], memoryview) and blob.buffers[0].readonly
    assert (pickle.loads(pickle.dumps(blob, protocol=5)).load() == array).all()  # as the worker loads it


def test_a_framed_result_is_read_into_buffers_of_the_notebooks_own():
    import numpy as np

    value = codec.encode_frames(np.arange(100_000, dtype="int64"))
    body = framed.FramedBody({"results": [{"outputs": {"y": value}}], "facts": None})
    stream = io.BytesIO(b"".join(bytes(part) for part in body.parts))
    data = framed.read_framed(stream.read, body.size, what="the result", chunk_bytes=10_000)
    frames = data["results"][0]["outputs"]["y"]
    assert isinstance(frames, codec.Frames) and frames.owned
    decoded = codec.decode(frames)
    assert decoded[99_999] == 99_999 and decoded.flags.writeable
    assert np.shares_memory(decoded, np.frombuffer(frames.parts[1], "int64"))  # a view: no copy


@pytest.mark.parametrize("spans, message", [
    ([[0, 5]], "does not hold"), ([[0, 1], [2, 1]], "overlap or leave gaps"), ([[0, 2]], "does not refer to"),
    ([[0, 3], [0, 3]], "does not hold"), ("x", "malformed")])
def test_a_framed_body_that_lies_about_its_buffers_is_refused(spans, message):
    head = msgpack.packb({"y": msgpack.ExtType(framed.FRAMES_EXT, msgpack.packb(spans))})
    sent = framed.PREFIX.pack(framed.MAGIC, len(head)) + head + b"abc"
    stream = io.BytesIO(sent)
    with pytest.raises(GatewayError, match=message):
        framed.read_framed(stream.read, len(sent), what="the result")


def test_a_gateway_of_another_protocol_is_refused_saying_which_side_to_upgrade():
    check_gateway_protocol({"session_id": "s", "protocol": GATEWAY_PROTOCOL}, "https://gw")
    with pytest.raises(GpunetError, match="runs an older gpunet .* ask its operator to upgrade the gateway"):
        check_gateway_protocol({"session_id": "s"}, "https://gw")  # an older gateway says no protocol
    with pytest.raises(GpunetError, match="runs a newer gpunet .* upgrade gpunet here"):
        check_gateway_protocol({"session_id": "s", "protocol": GATEWAY_PROTOCOL + 1}, "https://gw")


def test_a_framed_body_that_breaks_off_is_refused():
    import numpy as np

    body = framed.FramedBody({"y": codec.encode_frames(np.arange(100_000))})
    whole = b"".join(bytes(part) for part in body.parts)
    with pytest.raises(GatewayError, match="ended early"):
        framed.read_framed(io.BytesIO(whole[:-10]).read, body.size, what="the result")


def test_a_body_of_another_layout_says_which_side_to_upgrade():
    with pytest.raises(GatewayError, match="not a gpunet framed body of this version") as refused:
        framed.head_length(b"GPUNETF1" + bytes(8), 100, "the result")
    assert "install the gateway's gpunet version" in str(refused.value)


def test_server_sent_events_carry_bytes_and_end_at_a_blank_line():
    frames = sse_frame("live", {"text": "hi\n", "blob": b"\0\1"}) + sse_frame("results", {"results": []})
    events = list(sse_events(frames.decode().split("\n")))
    assert events == [("live", {"text": "hi\n", "blob": b"\0\1"}), ("results", {"results": []})]


def test_errors_travel_by_name_and_only_as_gpunet_errors():
    assert isinstance(error_from({"type": "CellTimeoutError", "message": "late"}), CellTimeoutError)
    assert isinstance(error_from({"type": "BudgetError", "message": "poor"}), BudgetError)
    for name in ("SystemExit", "os", "ConnectError_", None):
        error = error_from({"type": name, "message": "m"})
        assert type(error) is GpunetError and str(error) == "m"


def test_connecting_to_a_gateway_needs_a_token_and_its_ca(monkeypatch, tmp_path):
    monkeypatch.setattr(network_module, "_current", None)  # connected elsewhere or not, these are refused first
    for name in ("GPUNET_TOKEN", "GPUNET_GATEWAY_CA", "GPUNET_CREDITS"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(GpunetError, match="admits notebooks by their credit token"):
        gpunet.connect("https://gw.example:8788")
    with pytest.raises(GpunetError, match="needs its operator's CA certificate"):
        gpunet.connect("https://gw.example:8788", token="t")
    with pytest.raises(GpunetError, match="does not exist"):
        gpunet.connect("https://gw.example:8788", token="t", ca=str(tmp_path / "nowhere.pem"))
    with pytest.raises(GpunetError, match="is a gateway"):
        gpunet.connect("https://gw.example:8788", token="t", credits="http://127.0.0.1:1")
    with pytest.raises(GpunetError, match="only to an https:// address"):
        gpunet.connect("tcp://127.0.0.1:1", ca=str(tmp_path / "ca.pem"))


def test_a_jobs_packages_are_names_and_versions_checked_as_a_worker_checks_them():
    from gpunet.gateway import environment_from

    sent = environment_from({"environment": {"requirements": {"Tabulate": "==0.9.0"}, "gpu_build": True,
                                             "sources": {"tabulate": "import tabulate", "other": "x"}}})
    assert sent.requirements == {"tabulate": "==0.9.0"} and sent.gpu_build
    assert sent.sources == {"tabulate": "import tabulate"}
    gpu = environment_from({"environment": {"requirements": {"jax": ""}, "gpu_packages": {"jax[cuda12]": "--pip"}}})
    assert gpu.gpu_build and gpu.gpu_packages == {"jax[cuda12]": "--pip"}
    assert environment_from({}).requirements == {}
    for bad, message in (({"requirements": {"--index-url": "==1"}}, "is not a distribution's name"),
                         ({"requirements": {"x": "==1 --extra-index-url=http://evil"}}, "is not a version specifier"),
                         ({"requirements": {}, "gpu_build": "yes"}, "gpu_build must be true or false"),
                         ({"requirements": {}, "sources": {"x": 1}}, "sources must be"),
                         ({"requirements": {}, "gpu_packages": ["jax"]}, "gpu_packages must be"), ("numpy", "environment")):
        with pytest.raises(GatewayError, match=message) as refused:
            environment_from({"environment": bad})
        assert refused.value.status == 422


def test_the_gateways_reuse_key_is_the_accounts_and_the_bytes_it_received():
    from gpunet.reuse import gateway_reuse_key
    from gpunet.wire import Pickled

    job, options = job_from(cell_spec(), "t", GatewayLimits())
    same, _ = job_from(cell_spec(), "t", GatewayLimits())
    key = gateway_reuse_key("carol", job, None, {})
    assert key == gateway_reuse_key("carol", same, None, {})  # another job id, the same code and bytes
    assert key != gateway_reuse_key("dave", job, None, {})  # another account never finds carol's
    assert key != gateway_reuse_key("carol", job, None, {"tabulate": "==0.9.0"})
    other, _ = job_from(cell_spec(inputs={"x": pickle.dumps(2)}), "t", GatewayLimits())
    assert key != gateway_reuse_key("carol", other, None, {})
    assert gateway_reuse_key("carol", job, [b"ab", b"c"], {}) != gateway_reuse_key("carol", job, [b"a", b"bc"], {})
    split = Pickled(b"a", [b"bc"], (False,))
    assert gateway_reuse_key("carol", job, [split], {}) != gateway_reuse_key("carol", job, [b"abc"], {})


def test_reads_that_wait_for_settlements_are_bounded_per_session():
    import asyncio
    import threading
    from types import SimpleNamespace

    from gpunet.gateway import WAITING_READS, Gateway

    gateway = Gateway("tls://127.0.0.1:1", "http://127.0.0.1:1")
    request = SimpleNamespace(path_params={"sid": "s"})
    release = threading.Event()

    async def ask_many():
        reads = [asyncio.create_task(gateway._waiting_once(request, lambda: release.wait(30))) for _ in
                 range(WAITING_READS)]
        while gateway._waiting.get("s", 0) < WAITING_READS:
            await asyncio.sleep(0.01)
        with pytest.raises(GatewayError, match="already waits for its settlements") as busy:
            await gateway._waiting_once(request, lambda: True)
        other = await gateway._waiting_once(SimpleNamespace(path_params={"sid": "t"}), lambda: "another session")
        release.set()
        return busy.value.status, other, await asyncio.gather(*reads)

    status, other, answered = asyncio.run(ask_many())
    assert status == 429 and other == "another session" and answered == [True] * WAITING_READS
    assert gateway._waiting == {}


def test_every_job_takes_a_device_slot():
    """A job without resources still takes its worker's device slot (a draining worker has none to give)."""
    _, options = job_from(cell_spec(resources={}), "t", GatewayLimits())
    assert options["resources"] == {"device": 1.0}
    _, options = job_from(cell_spec(resources={"GPU": 1}), "t", GatewayLimits())
    assert options["resources"] == {"device": 1.0, "GPU": 1.0}
    for device in (0, 0.5):
        with pytest.raises(GatewayError, match="device is at least 1") as refused:
            job_from(cell_spec(resources={"device": device}), "t", GatewayLimits())
        assert refused.value.status == 422


def test_an_event_cut_short_is_discarded():
    whole = sse_frame("live", {"text": "kept"})
    cut = sse_frame("results", {"results": ["x" * 100]})[:40] + CUT_MARK
    error = sse_frame("error", {"type": "GatewayError", "message": "dropped"})
    events = list(sse_events((whole + cut + error).decode().split("\n")))
    assert events == [("live", {"text": "kept"}), ("error", {"type": "GatewayError", "message": "dropped"})]


async def _read_all(relay: Relay) -> bytes:
    return b"".join([piece async for piece in relay.pieces()])


def test_a_relay_sends_its_frames_in_pieces_and_counts_what_waits():
    async def run() -> None:
        unread = UnreadResults(per_job=1_000_000, total_cap=2_000_000, slow_reader_s=60)
        relay = Relay(asyncio.get_running_loop(), unread, account="carol", job_id="j")
        relay.put("results", {"blob": b"\1" * 300_000})
        relay.end()
        await asyncio.sleep(0)
        assert unread.total == relay.waiting_bytes > 400_000
        pieces = [piece async for piece in relay.pieces()]
        assert max(map(len, pieces)) == PIECE_BYTES and len(pieces) > 5
        assert [event for event, _ in sse_events(b"".join(pieces).decode().split("\n"))] == ["results"]
        assert unread.total == relay.waiting_bytes == 0 and relay.finished and not unread.relays

    asyncio.run(run())


def test_a_reader_over_its_cap_is_dropped_and_told_why():
    async def run() -> None:
        unread = UnreadResults(per_job=100_000, total_cap=10_000_000, slow_reader_s=60)
        stopped = []
        relay = Relay(asyncio.get_running_loop(), unread, account="mallory", job_id="j", on_drop=stopped.append)
        for _ in range(3):
            relay.put("live", {"text": "y" * 40_000})
        relay.put("results", {"results": []})  # after the drop: goes nowhere
        relay.end()
        await asyncio.sleep(0)
        assert relay.dropped and stopped == [relay.dropped] and unread.total == 0
        events = list(sse_events((await _read_all(relay)).decode().split("\n")))
        assert [event for event, _ in events] == ["error"]
        assert "over this gateway's cap of 100000 per job" in events[0][1]["message"]

    asyncio.run(run())


def test_a_stalled_reader_makes_room_for_one_that_reads():
    async def run() -> None:
        loop = asyncio.get_running_loop()
        unread = UnreadResults(per_job=1_000_000, total_cap=1_000_000, slow_reader_s=60)
        stalled, reading = (Relay(loop, unread, account=name, job_id=name) for name in ("mallory", "carol"))
        stalled.put("results", {"blob": b"\0" * 500_000})
        await asyncio.sleep(0)
        stalled.last_read -= 5  # it read nothing for 5 s
        reading.put("results", {"blob": b"\0" * 500_000})
        reading.end()
        await asyncio.sleep(0)
        assert stalled.dropped and "ran short of room" in stalled.dropped and reading.dropped is None
        assert [event for event, _ in sse_events((await _read_all(reading)).decode().split("\n"))] == ["results"]
        unread.slow_reader_s = 0.01  # and the sweep drops a reader that reads nothing for that long
        late = Relay(loop, unread, account="mallory", job_id="late")
        late.put("live", {"text": "x"})
        await asyncio.sleep(0)
        late.last_read -= 1
        unread.sweep()
        assert late.dropped and "read nothing of this job's stream" in late.dropped

    asyncio.run(run())


def test_a_stranger_reading_a_trickle_cannot_keep_the_gateway_full():
    """mallory keeps the gateway's room for unread results full and reads a piece now and
    then (never stalled); carol's notebook paused a moment: mallory, the biggest holder,
    makes room, not carol."""
    async def run() -> None:
        loop = asyncio.get_running_loop()
        unread = UnreadResults(per_job=1_000_000, total_cap=1_500_000, slow_reader_s=60)
        trickles = [Relay(loop, unread, account="mallory", job_id=f"m{i}") for i in range(2)]
        for relay in trickles:
            relay.put("results", {"blob": b"\0" * 500_000})
        paused = Relay(loop, unread, account="carol", job_id="c1")
        paused.put("live", {"text": "x" * 100_000})
        await asyncio.sleep(0)
        paused.last_read -= 5  # carol's notebook was busy for 5 s; mallory read a piece just now
        arriving = Relay(loop, unread, account="carol", job_id="c2")
        arriving.put("results", {"blob": b"\0" * 300_000})
        await asyncio.sleep(0)
        assert arriving.dropped is None and paused.dropped is None
        assert any(relay.dropped and "held the most of them" in relay.dropped for relay in trickles)
        assert unread.total <= unread.total_cap

    asyncio.run(run())


def test_an_ipv6_stranger_cannot_pass_the_cap_with_the_addresses_of_its_network():
    """A subscriber gets a /64: each of its 2**64 addresses must not hold a cap of its own."""
    counts = ConnectionCounts(per_address=2)
    assert counts.take("2001:db8:1:2::1") and counts.take("2001:db8:1:2:ffff::9")
    assert not counts.take("2001:db8:1:2:abcd::77") and not counts.take("2001:db8:1:2::1%eth0")
    assert counts.take("2001:db8:1:3::1")  # the next network is someone else
    assert counts.take("::ffff:192.0.2.7") and counts.take("192.0.2.7") and not counts.take("::ffff:192.0.2.7")
    counts.give_back("2001:db8:1:2::1")
    assert counts.take("2001:db8:1:2:5::5")
    assert counts.open == {"2001:db8:1:2::/64": 2, "2001:db8:1:3::/64": 1, "192.0.2.7": 2}


def test_a_held_result_counts_until_it_is_fetched_or_freed():
    """A large result waits in its relay, counted as unread, until it is fetched (freed as
    it goes), or its stream breaks, or its reader is dropped."""
    async def run() -> None:
        loop = asyncio.get_running_loop()
        unread = UnreadResults(per_job=10_000_000, total_cap=10_000_000, slow_reader_s=60)
        relay = Relay(loop, unread, account="carol", job_id="j")
        body = framed.FramedBody({"results": [{"y": framed.Laid(b"\1" * 3_000_000)}]})
        relay.hold_result(body, "results-ready", {"bytes": body.size})
        relay.end()
        await asyncio.sleep(0)
        events = list(sse_events((await _read_all(relay)).decode().split("\n")))
        assert events == [("results-ready", {"bytes": body.size})]
        assert unread.total == relay.waiting_bytes == body.size and not relay.finished and relay in unread.relays
        sent = b"".join([bytes(piece) async for piece in relay.send_held(1024 * 1024)])
        assert len(sent) == body.size and unread.total == 0 and relay.finished and relay not in unread.relays
        broken = Relay(loop, unread, account="carol", job_id="k")
        broken.hold_result(framed.FramedBody({"y": framed.Laid(b"\2" * 1_000_000)}), "results-ready", {})
        await asyncio.sleep(0)
        assert unread.total > 1_000_000
        reader = broken.pieces()
        await reader.__anext__()  # its connection closes mid-event: the result and the event's rest are freed
        await reader.aclose()
        assert unread.total == 0 and broken.finished and broken.held is None
        broken.put("error", {"message": "late"})  # what its job says after that goes nowhere
        await asyncio.sleep(0)
        assert unread.total == 0
        unread.slow_reader_s = 0.01  # never fetched: the sweep drops it, and frees it
        idle = Relay(loop, unread, account="mallory", job_id="m")
        idle.hold_result(framed.FramedBody({"y": framed.Laid(b"\3" * 1_000_000)}), "results-ready", {})
        idle.end()
        await _read_all(idle)
        idle.last_read -= 1
        unread.sweep()
        assert idle.dropped and idle.held is None and unread.total == 0 and idle.finished

    asyncio.run(run())


# -- a hostile gateway's result, as the notebook reads it (the review of framed bodies) ---------


def _framed(head: bytes, data: bytes = b"") -> io.BytesIO:
    return io.BytesIO(framed.PREFIX.pack(framed.MAGIC, len(head)) + head + data)


def _peak_while(read) -> int:
    """The most bytes Python held at once while ``read()`` ran (it must raise GatewayError)."""
    import tracemalloc

    tracemalloc.start()
    try:
        with pytest.raises(GatewayError) as refused:
            read()
        return tracemalloc.get_traced_memory()[1], str(refused.value)
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("head, message", [
    # 8 MB of empty lists: 450 MB of Python lists, read before; refused once a few are charged
    (b"\xdd" + (8_000_000).to_bytes(4, "big") + b"\x90" * 8_000_000, "far more memory than its size"),
    (b"\xdd" + (8_000_000).to_bytes(4, "big") + b"\x80" * 8_000_000, "far more memory than its size"),
    # codec frames whose spans are 8 MB of empty lists, in one extension value
    (msgpack.packb({"y": msgpack.ExtType(framed.FRAMES_EXT, b"\xdd" + (8_000_000).to_bytes(4, "big")
                                         + b"\x90" * 8_000_000)}), "far more memory than its size"),
    # a million zero-byte buffers: each costs the reader its bookkeeping
    (msgpack.packb([msgpack.ExtType(framed.BUFFER_EXT, msgpack.packb([0, 0]))] * 1_000_000),
     "more than 262144 buffers"),
])
def test_a_result_head_that_would_expand_is_refused_before_it_does(head, message):
    peak, said = _peak_while(lambda: framed.read_framed(_framed(head).read, framed.PREFIX.size + len(head),
                                                        what="the job's result"))
    assert message in said
    assert peak < 250_000_000, f"{peak:,} bytes held before it was refused"


def test_a_result_whose_frames_alias_or_are_not_plain_data_never_loads():
    """Two values' frames over the same bytes are refused; an extension the reader does not know
    stays an opaque value, which a result's checks refuse (nothing is unpickled or imported)."""
    from gpunet.client.received import checked_result
    from gpunet.errors import ProviderDataError

    spans = msgpack.packb([[0, 4]])
    head = msgpack.packb({"a": msgpack.ExtType(framed.FRAMES_EXT, spans), "b": msgpack.ExtType(framed.FRAMES_EXT, spans)})
    with pytest.raises(GatewayError, match="does not hold|overlap"):
        framed.read_framed(_framed(head, b"abcd").read, framed.PREFIX.size + len(head) + 4, what="the result")
    result = {"job_id": "j", "index": None, "worker": "w", "device": "cpu", "started": 0.0, "finished": 1.0,
              "outputs": {"y": msgpack.ExtType(66, pickle.dumps(print))}, "value": None, "missing_outputs": [],
              "unpicklable_outputs": [], "streams": [], "displays": [], "error": None}
    head = msgpack.packb({"results": [result], "facts": None})
    data = framed.read_framed(_framed(head).read, framed.PREFIX.size + len(head), what="the result")
    assert isinstance(data["results"][0]["outputs"]["y"], msgpack.ExtType)
    with pytest.raises(ProviderDataError, match="malformed .its outputs"):
        checked_result(data["results"][0], "a result from the gateway")


@pytest.mark.parametrize("dtype, shape, match", [("|O", [1], "dtype object"), ("<f8", [1000], "do not fit its shape"),
                                                 ("<f8", [2**40], "more memory than its cap")])
def test_a_held_results_forged_array_is_refused_when_decoded_not_before(dtype, shape, match):
    """Through the framed body the notebook fetches, a provider's array whose dtype is objects, or
    whose shape does not fit its frame, reads as frames and is refused by the codec, which
    never unpickles (a frame read here is the notebook's own buffer, as any other)."""
    from gpunet.errors import ProviderDataError
    from test_codec_frames import forged, framed_array

    value = forged(framed_array(dtype, shape, 1), b"\x00" * 8)
    body = framed.FramedBody({"results": [{"outputs": {"y": value}}], "facts": None})
    sent = b"".join(bytes(part) for part in body.parts)
    data = framed.read_framed(io.BytesIO(sent).read, len(sent), what="the result")
    frames = data["results"][0]["outputs"]["y"]
    assert isinstance(frames, codec.Frames) and frames.owned
    with pytest.raises(ProviderDataError, match=match):
        codec.decode(frames, max_bytes=1_000_000)
