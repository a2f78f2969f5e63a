"""The gateway's protocol as data, no servers: a job checked field by field before
anything is sent, server-sent events both ways, errors carried by name, and the
notebook's connect() refusing what cannot work with a gateway."""

from __future__ import annotations

import asyncio
import pickle

import pytest

import gpunet
from gpunet.client import network as network_module
from gpunet.client.gateway_link import error_from, job_request, sse_events, sse_frame
from gpunet.errors import BudgetError, CellTimeoutError, GatewayError, GpunetError, PolicyError
from gpunet.gateway import GatewayLimits, job_from
from gpunet.gateway_guard import CUT_MARK, PIECE_BYTES, Relay, UnreadResults
from gpunet.wire import Job, PassedOn


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
