"""The attacks of the open network's review (issue 12's follow-up), each tried from a
provider's certificate against real servers over real TLS, and shown to fail with
nothing moved: unpickling a provider's bytes anywhere, reading other users' results,
events and heartbeats that grow the scheduler, messages too big to read, forged
compute time, squatted worker names (test_open_network.py), revoked certificates."""

from __future__ import annotations

import asyncio
import math
import os
import pickle
import subprocess
import threading
import time
import uuid
from pathlib import Path

import dask
import psutil
import pytest
from distributed import Worker, wait
from distributed.protocol import to_serialize
from distributed.protocol.serialize import ToPickle

from gpunet import certs, wire
from gpunet.errors import OptionError, ProviderTaskError
from gpunet.guarded_tls import PEER_MESSAGE_MAX_BYTES
from gpunet.roles import HEARTBEAT_BURST, MAX_TOPICS_PER_PROVIDER, WorkerDoor
from gpunet_processes import GPUNET, expect, start, stop
from test_open_network import REFUSED, dasks_own_tls, open_network, pki, service  # noqa: F401 - fixtures

#: Where the code a malicious pickle carries would leave its mark if anyone unpickled it.
MARK = Path(os.environ.get("TMPDIR", "/tmp")) / f"gpunet-unpickled-{os.getpid()}"


class Evil:
    """Unpickling this runs code: it writes MARK."""

    def __reduce__(self):
        return (exec, (f"import pathlib, traceback; pathlib.Path({str(MARK)!r}).write_text("
                       "''.join(traceback.format_stack()))",))


def carols_result() -> dict[str, str]:
    return {"secret": "carol's private result"}


def fails() -> None:
    raise ValueError("the provider's own words")


def held(net, amount: int = 100):
    """A hold of carol's and the annotation that carries it."""
    with net.service.client(net.tokens["carol"]) as carol:
        hold = carol.hold(carol.open_session(10_000), amount, key=f"hold-{uuid.uuid4().hex}", meter="meter")
    return dask.annotate(**{wire.ANNOTATION: wire.annotation(hold, amount)})


def refusals(worker: Worker) -> int:
    """How many requests ``worker``'s door (gpunet.roles.WorkerDoor) refused."""
    return worker.handlers.on_refused.__self__.refused


def key() -> str:
    return f"gpunet-cell-{uuid.uuid4().hex}"


def forge(worker: Worker, rewrite) -> None:
    """Have ``worker`` (bob, the attacker) rewrite what it sends on its stream."""
    send = worker.batched_stream.send

    def forging(*msgs):
        return send(*(rewrite(dict(m)) if isinstance(m, dict) else m for m in msgs))

    worker.batched_stream.send = forging


@open_network
async def test_a_provider_cannot_make_anyone_unpickle_its_bytes_or_read_other_results(net):
    MARK.unlink(missing_ok=True)
    with held(net):
        carols = net.gateway.submit(carols_result, key=key(), workers=[net.alice.address], resources={"device": 1})
    await carols
    bob_args = net.pki["bob"].get_connection_args("worker")
    from distributed.core import rpc

    # reading: where every key is, and alice's copy of carol's result
    async with rpc(net.s.address, connection_args=bob_args) as scheduler:
        with pytest.raises(Exception, match=REFUSED):
            await scheduler.who_has()
    alice_refused = refusals(net.alice)
    async with rpc(net.alice.address, connection_args=bob_args) as alice:
        with pytest.raises(Exception):  # refused (and this process reads no pickled error from a provider)
            await alice.get_data(keys=[carols.key], who=net.bob.address)
    assert refusals(net.alice) == alice_refused + 1

    # claiming a replica of carol's result, to serve it as a pickle of its own
    refused = net.plugin.door.refused
    net.bob.batched_send({"op": "add-keys", "keys": [carols.key]})
    await net.until(lambda: net.plugin.door.refused > refused, "bob's add-keys to be dropped")
    assert {ws.address for ws in net.s.tasks[carols.key].who_has} == {net.alice.address}
    assert await net.gateway.gather(carols) == {"secret": "carol's private result"}

    # its own task's exception (and a finished task's type) as pickles for the gateway
    def poisoned(msg):
        if msg.get("op") == "task-erred":
            msg["exception"], msg["traceback"] = to_serialize(Evil()), to_serialize(Evil())
        if msg.get("op") == "task-finished":
            msg["type"] = pickle.dumps(Evil())
        return msg

    forge(net.bob, poisoned)
    with held(net):
        erred = net.gateway.submit(fails, key=key(), workers=[net.bob.address], resources={"device": 1})
    with pytest.raises(ProviderTaskError, match="the provider's own words"):
        await erred
    with held(net):
        finished = net.gateway.submit(int, 1, key=key(), workers=[net.bob.address], resources={"device": 1})
    assert await finished == 1

    # a pickle Dask's decoder would load on arrival: at the scheduler, at alice's worker
    for address in (net.s.address, net.alice.address):
        async with rpc(address, connection_args=bob_args) as there:
            with pytest.raises(Exception):
                await there.log_event(topic="mine", msg=ToPickle(Evil()))
    # a serialized object the scheduler would pass on to a client
    async with rpc(net.s.address, connection_args=bob_args) as scheduler:
        with pytest.raises(Exception, match=REFUSED):
            await scheduler.log_event(topic="mine", msg=to_serialize(Evil()))

    # alice fetching an input of her task from bob's worker, which answers with pickles
    def evil_get_data(comm, keys=(), who=None, serializers=None, **kwargs):
        return {"status": "OK", "data": {k: to_serialize(Evil()) for k in keys}}

    dict.__setitem__(net.bob.handlers, "get_data", evil_get_data)
    with held(net):
        on_bob = net.gateway.submit(carols_result, key=key(), workers=[net.bob.address], resources={"device": 1})
        on_alice = net.gateway.submit(len, on_bob, key=key(), workers=[net.alice.address], resources={"device": 1})
    await wait(on_bob)  # (its value is bob's to forge: the gateway's own Client decodes results as msgpack only)
    await asyncio.wait([asyncio.ensure_future(on_alice.result())], timeout=5)  # however it ends
    await net.gateway.cancel([on_alice])

    # and the gateway's certificate runs no code on the scheduler
    with pytest.raises(Exception, match=REFUSED):
        await net.gateway.run_on_scheduler(lambda: "ran")
    assert not MARK.exists(), f"a provider's pickle was unpickled: {MARK.read_text()}"


@open_network
async def test_a_provider_cannot_grow_the_schedulers_events_or_metrics(net):
    bob_args = net.pki["bob"].get_connection_args("worker")
    from distributed.core import rpc

    topics_before = len(net.s._broker._topics)
    metrics_before = len(net.s.cumulative_worker_metrics)
    bandwidth, hosts = net.s.bandwidth, dict(net.s.host_info)
    async with rpc(net.s.address, connection_args=bob_args) as scheduler:
        with pytest.raises(Exception, match=REFUSED):  # one event on 200,000 topics
            await scheduler.log_event(topic=[f"t-{i}" for i in range(200_000)], msg="x")
        for index in range(MAX_TOPICS_PER_PROVIDER):
            await scheduler.log_event(topic=f"bob-{index}", msg="x")
        with pytest.raises(Exception, match="topics of its own"):
            await scheduler.log_event(topic="one-more", msg="x")
        assert len(net.s._broker._topics) <= topics_before + MAX_TOPICS_PER_PROVIDER

        junk = {f"junk-{i}": 1.0 for i in range(50_000)}
        heartbeat = dict(address=net.bob.address, executing={"not-mine": 1.0}, host_info={"junk": "x" * 1000},
                         extensions={"shuffle": {"junk": 1}},
                         metrics={"bandwidth": {"total": 1e-9, "workers": {"tls://x:1": (1e-9, 1)}, "types": {}},
                                  "digests_total_since_heartbeat": junk, "memory": 0, "managed_bytes": 0,
                                  "spilled_bytes": {"memory": 0, "disk": 0}, "task_counts": {},
                                  "event_loop_interval": 0.0, "junk-table": junk})
        answered = await scheduler.heartbeat_worker(**heartbeat)
        assert answered["status"] == "OK"
        assert len(net.s.cumulative_worker_metrics) == metrics_before
        assert net.s.bandwidth == bandwidth and not net.s.bandwidth_workers
        assert "junk" not in net.s.host_info.get("127.0.0.1", {}) and set(net.s.host_info) == set(hosts)
        assert "junk-table" not in net.s.workers[net.bob.address].metrics
        small = {**heartbeat, "metrics": {**heartbeat["metrics"], "digests_total_since_heartbeat": {},
                                          "junk-table": {}}}
        refusals = 0
        for _ in range(HEARTBEAT_BURST * 3):
            try:
                await scheduler.heartbeat_worker(**small)
            except Exception as exc:  # noqa: BLE001 - counted below
                assert "heartbeats faster" in str(exc)
                refusals += 1
        assert refusals > 0
    assert net.bob.address in net.s.workers and net.alice.address in net.s.workers


@open_network
async def test_a_provider_is_paid_by_the_schedulers_clock_not_its_own(net):
    """Bob's worker claims a million seconds of compute for a trivial task."""
    def a_million_seconds(msg):
        if msg.get("op") == "task-finished":
            msg["startstops"] = [{"action": "compute", "start": 0.0, "stop": 1e6}]
        return msg

    forge(net.bob, a_million_seconds)
    before = net.balances()
    reported = net.plugin.reporter.reported
    started = time.monotonic()
    with held(net, amount=1000):
        trivial = net.gateway.submit(int, 1, key=key(), workers=[net.bob.address], resources={"device": 1})
    assert await trivial == 1
    elapsed = time.monotonic() - started
    await net.until(lambda: net.plugin.reporter.reported > reported, "the settlement to be reported")
    paid = net.balances()["bob"] - before["bob"]
    rate = net.plugin.providers[net.bob.address]["rate"]
    assert 1 <= paid <= max(1, math.ceil(elapsed * rate)), (paid, elapsed)


@open_network
async def test_a_revoked_certificate_is_refused(net, tmp_path):
    ca_dir = Path(net.pki["sched"].tls_ca_file).parent
    issued = certs.issue("provider", f"dave{uuid.uuid4().hex[:6]}", ca_dir)
    dave = certs.security(issued.ca, issued.cert, issued.key).get_connection_args("worker")
    from distributed.core import rpc

    async with rpc(net.s.address, connection_args=dave) as scheduler:
        assert await scheduler.log_event(topic="dave", msg="before") is None
    done = subprocess.run([*GPUNET, "certs", "revoke", str(issued.cert), "--dir", str(ca_dir)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert certs.serial_of_file(issued.cert) in (ca_dir / certs.REVOKED_FILE).read_text().split()
    deadline = time.monotonic() + certs.REVOCATION_CHECK_S + 10  # looked at again within REVOCATION_CHECK_S
    async with rpc(net.s.address, connection_args=dave) as scheduler:
        with pytest.raises(Exception, match="only peers with a certificate"):
            while time.monotonic() < deadline:
                await scheduler.log_event(topic="dave", msg="after")
                await asyncio.sleep(0.05)
    refused = refusals(net.alice)
    async with rpc(net.alice.address, connection_args=dave) as worker:  # workers read the same list
        with pytest.raises(Exception):
            await worker.keys()
    assert refusals(net.alice) == refused + 1
    with pytest.raises(OptionError, match="neither a certificate file nor a hex serial"):
        certs.revoke("not-a-serial", tmp_path)


def test_a_provider_cannot_blow_up_a_real_schedulers_memory(tmp_path):
    """A real `gpunet scheduler` process: one 300 MiB message and five events on
    200,000 topics from a provider's certificate leave its memory where it was."""
    from distributed.core import rpc
    from gpunet.credits import serve_in_background

    certs.init_ca(tmp_path / "ca")
    issued = {name: certs.issue(role, name, tmp_path / "ca") for role, name in (("scheduler", "sched"),
                                                                                  ("provider", "bob"))}
    service = serve_in_background(tmp_path / "c.sqlite3", operator_token_file=tmp_path / "op")
    scheduler = None
    try:
        with service.client() as operator:
            (tmp_path / "meter").write_text(operator.create_account("meter", "meter")["token"])
        scheduler = start(["scheduler", "--port", "0", "--dashboard-port", "0", "--credits", service.url,
                           "--meter-token-file", str(tmp_path / "meter"), "--tls-ca-file", str(issued["sched"].ca),
                           "--tls-cert", str(issued["sched"].cert), "--tls-key", str(issued["sched"].key)])
        address = expect(scheduler, r"scheduler: (tls://127\.0\.0\.1:\d+)").group(1)
        process = psutil.Process(scheduler.pid)

        def rss_mib() -> int:
            return max(p.memory_info().rss for p in [process, *process.children(recursive=True)]) // 2**20

        peak, watching = [rss_mib()], [True]

        def watch() -> None:
            while watching[0]:
                peak[0] = max(peak[0], rss_mib())
                time.sleep(0.02)

        before = rss_mib()
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        bob = certs.security(issued["bob"].ca, issued["bob"].cert, issued["bob"].key).get_connection_args("worker")

        async def attacks() -> None:
            async with rpc(address, connection_args=bob) as s:
                with pytest.raises(Exception):
                    await s.log_event(topic="mine", msg=b"x" * (300 * 2**20))
            async with rpc(address, connection_args=bob) as s:
                for round_ in range(5):
                    with pytest.raises(Exception, match=REFUSED):
                        await s.log_event(topic=[f"t{round_}-{i}-" + "y" * 40 for i in range(200_000)], msg="x")

        asyncio.run(asyncio.wait_for(attacks(), 120))
        watching[0] = False
        watcher.join()
        # the 200,000 topics are read (5 x about 10 MiB, under PEER_MESSAGE_MAX_BYTES) and refused
        assert peak[0] - before < 3 * PEER_MESSAGE_MAX_BYTES // 2**20, (before, peak[0])
        assert rss_mib() - before < 100, (before, rss_mib())
    finally:
        if scheduler is not None:
            stop(scheduler)
        service.stop()


@open_network
async def test_a_worker_connects_only_to_a_scheduler_with_the_scheduler_role(net, caplog):
    """Bob, who can redirect alice's traffic, listens as her scheduler with his own
    certificate (of the operator's CA): her worker does not talk to it."""
    from distributed import Scheduler

    async with Scheduler(host="127.0.0.1", port=0, dashboard_address=":0", protocol="tls",
                         security=net.pki["bob"]) as impostor:
        worker = Worker(impostor.address, nthreads=1, security=net.pki["alice"], death_timeout=10)
        WorkerDoor(certs.own_identity(worker.security, "worker")).install(worker)
        with pytest.raises(Exception):  # it keeps trying until its death timeout
            async with worker:
                pass
        assert not impostor.workers
    assert any("is not the scheduler: it presented gpunet:role/provider/bob" in record.getMessage()
               for record in caplog.records)


def codec_array(n: int):
    """A result as a provider's worker holds a codec job's: codec frames (the array's buffer a frame)."""
    import numpy as np

    from gpunet import codec

    return codec.encode_frames(np.arange(n, dtype="float64"))


def frames_bytes(frames) -> int:
    """What arrived of a codec value fetched from another worker: its frames' bytes."""
    from gpunet import codec

    return -1 if not isinstance(frames, codec.Frames) else sum(memoryview(f).nbytes for f in frames)


@open_network
async def test_a_providers_own_worker_fetches_a_codec_result_as_frames(net):
    """A provider's second worker fetching a result from her first (a replica, an input):
    the codec's frames travel as Dask frames (decoded only into bytes, never unpickled)."""
    async with Worker(net.s.address, nthreads=1, security=net.pki["alice"], resources={"device": 1}) as second:
        WorkerDoor(certs.own_identity(second.security, "worker")).install(second)
        second.batched_send({"op": wire.REGISTER_PROVIDER, "rate": 1.0})
        with held(net, 300):
            made = net.gateway.submit(codec_array, 1_000_000, key=key(), workers=[net.alice.address],
                                      resources={"device": 1})
            fetched = net.gateway.submit(frames_bytes, made, key=key(), workers=[second.address],
                                         resources={"device": 1})
        assert await asyncio.wait_for(fetched.result(), 60) > 8_000_000
