"""An open network's Dask wire, in this process: a scheduler, provider workers and a
gateway client over mutual TLS with certificates from a real operator CA
(gpunet.certs), the metering plugin guarding the wire, against a real credit service.
Each attack from issue 12 that reaches the Dask wire is tried and refused, and an
honest, held task still runs and is paid to the provider its certificate names."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import os
import ssl
import stat
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dask
import numpy as np
import pytest
from distributed import Client, Scheduler, Worker
from distributed.core import rpc

import gpunet
from gpunet import certs, wire
from gpunet.credits import CreditsRequestError, ForbiddenError, verify_service
from gpunet.errors import OptionError
from gpunet.extensions.scheduler_plugin import GpunetMeteringPlugin
from gpunet.roles import EVENT_MAX_BYTES, WorkerDoor
from gpunet.ui.status import NetworkStatus
from gpunet_processes import GPUNET, credit_service_with_accounts, expect, start, stop

WAIT_S = 20.0
#: How a request the peer's role does not allow comes back (gpunet.roles.RoleError).
REFUSED = r"' refused: "
#: ... or, for a message carrying what a provider may not send, the connection closed
#: before it is decoded (gpunet.guarded_tls).
REFUSED_OR_CLOSED = r"' refused: |[Ss]tream is closed|closed"


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Any]:
    """The operator's CA and certificates for each party; a second CA for a stranger."""
    root = tmp_path_factory.mktemp("pki")
    certs.init_ca(root / "ca")
    issued = {name: certs.issue(role, name, root / "ca") for role, name in
              (("scheduler", "sched"), ("gateway", "gw"), ("provider", "alice"), ("provider", "bob"))}
    certs.init_ca(root / "other")
    issued["stranger"] = certs.issue("gateway", "stranger", root / "other")
    return {name: certs.security(i.ca, i.cert, i.key) for name, i in issued.items()}


@pytest.fixture(autouse=True)
def dasks_own_tls():
    """The doors guard their process's TLS comms (gpunet.guarded_tls): each test here
    starts with Dask's, as a gateway's or a provider's process does, and ends with it."""
    from distributed.comm import registry

    dasks = registry.backends["tls"]
    yield
    registry.backends["tls"] = dasks


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """A credit service: providers alice and bob (bob plays the attacker), client carol."""
    svc, tokens = credit_service_with_accounts(tmp_path_factory.mktemp("credits"))
    yield svc, tokens
    svc.stop()


def open_network(test: Callable[..., Any]) -> Callable[..., None]:
    """Run ``async test(net, **fixtures)`` on an open network in this process: a TLS
    scheduler with the metering plugin in open mode, alice's and bob's workers
    (guarded as the worker preload guards them, registered as the worker plugin
    registers), and the gateway's client."""

    @functools.wraps(test)
    def run(pki: dict[str, Any], service: Any, **fixtures: Any) -> None:
        async def main() -> None:
            async with Scheduler(host="127.0.0.1", port=0, dashboard_address=":0", protocol="tls",
                                 security=pki["sched"]) as s:
                plugin = GpunetMeteringPlugin(service[0].url, service[1]["meter"], open_network=True)
                await s.register_scheduler_plugin(plugin, idempotent=True)
                async with Worker(s.address, nthreads=1, security=pki["alice"], resources={"device": 1}) as a, \
                        Worker(s.address, nthreads=1, security=pki["bob"], resources={"device": 1}) as m, \
                        Client(s.address, asynchronous=True, security=pki["gw"]) as gateway:
                    for worker in (a, m):
                        WorkerDoor(certs.own_identity(worker.security, "worker")).install(worker)
                        worker.batched_send({"op": wire.REGISTER_PROVIDER, "rate": 1.0})
                    net = OpenNetwork(s, plugin, a, m, gateway, pki, service)
                    await net.until(lambda: len(plugin.providers) == 2, "both workers to register")
                    await asyncio.wait_for(test(net, **fixtures), 120)

        asyncio.run(main())

    signature = inspect.signature(test)
    run.__signature__ = signature.replace(parameters=[
        inspect.Parameter("pki", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        inspect.Parameter("service", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        *list(signature.parameters.values())[1:]])
    return run


class OpenNetwork:
    def __init__(self, s, plugin, alice, bob, gateway, pki, service) -> None:
        self.s, self.plugin, self.alice, self.bob, self.gateway = s, plugin, alice, bob, gateway
        self.pki, self.service, self.tokens = pki, service[0], service[1]

    async def until(self, condition: Callable[[], Any], what: str) -> Any:
        deadline = time.monotonic() + WAIT_S
        while not (value := condition()):
            assert time.monotonic() < deadline, f"waited {WAIT_S:g} s for {what}"
            await asyncio.sleep(0.05)
        return value

    def as_(self, who: str, address: str | None = None) -> Any:
        """An RPC to ``address`` (the scheduler) presenting ``who``'s certificate."""
        return rpc(address or self.s.address, connection_args=self.pki[who].get_connection_args("client"))

    def balances(self) -> dict[str, int]:
        with self.service.client() as operator:
            return {a["account"]: a["balance"] for a in operator.accounts()}


def marker(path: str) -> str:
    """A task that leaves a file behind if it ever runs."""
    Path(path).write_text("ran")
    return path


def test_certificates_bind_role_and_account_and_keys_are_private(tmp_path):
    made = certs.init_ca(tmp_path)
    assert stat.S_IMODE(os.stat(made.key).st_mode) == 0o600
    issued = certs.issue("provider", "alice", tmp_path, hosts=("gw.example",))
    assert stat.S_IMODE(os.stat(issued.key).st_mode) == 0o600
    assert certs.identity_of_file(issued.cert) == certs.Identity("provider", "alice")
    with pytest.raises(OptionError, match="already holds a CA"):
        certs.init_ca(tmp_path)
    with pytest.raises(OptionError, match="unknown role"):
        certs.issue("admin", "alice", tmp_path)
    with pytest.raises(OptionError, match="cannot name a certificate"):
        certs.issue("provider", "../alice", tmp_path)
    with pytest.raises(OptionError, match="no CA in"):
        certs.issue("provider", "alice", tmp_path / "nowhere")


def test_the_revocation_list_is_looked_at_once_a_second_however_many_ask(tmp_path):
    """A busy scheduler checks every request's certificate against revoked.txt without a
    stat per request, and refuses one revoked meanwhile within certs.REVOCATION_CHECK_S."""
    now = [100.0]
    revoked = certs._RevocationList(clock=lambda: now[0])
    revoked.watch(tmp_path / certs.REVOKED_FILE)  # no file yet: nothing is revoked
    assert not any(revoked.has("0A") for _ in range(10_000)) and revoked.looks == 1
    certs.revoke("0a", tmp_path)
    assert not revoked.has("0A")  # within the second: what was read
    now[0] += certs.REVOCATION_CHECK_S
    assert revoked.has("0A") and revoked.has("a") and (revoked.looks, revoked.reads) == (2, 1)
    for _ in range(5):  # unchanged: looked at, not read again
        now[0] += certs.REVOCATION_CHECK_S
        assert revoked.has("0A")
    assert (revoked.looks, revoked.reads) == (7, 1)
    revoked.watch(tmp_path / "elsewhere" / certs.REVOKED_FILE)  # another CA folder: read at once
    assert not revoked.has("0A") and revoked.looks == 8


@open_network
async def test_a_held_task_runs_and_pays_the_provider_its_certificate_names(net):
    with net.service.client(net.tokens["carol"]) as carol:
        session = carol.open_session(10_000)
        hold = carol.hold(session, 100, key=f"hold-{uuid.uuid4().hex}", meter="meter")
    with dask.annotate(**{wire.ANNOTATION: wire.annotation(hold, 100)}):
        future = net.gateway.submit(time.sleep, 0.05, key=f"gpunet-cell-{uuid.uuid4().hex}",
                                    workers=[net.alice.address], resources={"device": 1})
    await future
    assert net.plugin.providers[net.alice.address]["provider"] == "alice"
    assert net.plugin.providers[net.bob.address]["provider"] == "bob"
    await net.until(lambda: net.plugin.reporter.reported >= 1, "the settlement to be reported")
    assert net.balances()["alice"] > 0


def test_a_meter_token_can_only_pay_and_release_holds(service):
    """What an open network's scheduler holds instead of the operator's token."""
    svc, tokens = service
    with svc.client(tokens["meter"]) as meter, svc.client(tokens["carol"]) as carol:
        for attempt in (lambda: meter.mint("meter", 10**15, key=f"mint-{uuid.uuid4().hex}"),
                        lambda: meter.create_account(f"m{uuid.uuid4().hex[:8]}", "client"),
                        lambda: meter.accounts(),
                        lambda: meter.clear_quarantine("alice", key=f"clear-{uuid.uuid4().hex}")):
            with pytest.raises(ForbiddenError):
                attempt()
        session = carol.open_session(100)
        hold = carol.hold(session, 40, key=f"hold-{uuid.uuid4().hex}", meter="meter")
        with pytest.raises(CreditsRequestError):  # never more than the hold holds
            meter.settle(hold, "alice", 41, key=f"settle-{uuid.uuid4().hex}")
        with pytest.raises(CreditsRequestError):  # only to a provider
            meter.settle(hold, "meter", 10, key=f"settle-{uuid.uuid4().hex}")
        assert meter.settle(hold, "alice", 40, key=f"settle-{uuid.uuid4().hex}")["paid"] == 40


@open_network
async def test_a_task_without_a_hold_is_refused_before_it_runs(net, tmp_path):
    ran = tmp_path / "ran"
    future = net.gateway.submit(marker, str(ran), key=f"free-{uuid.uuid4().hex}", resources={"device": 1})
    with pytest.raises(Exception, match="cancel|Cancel"):
        await asyncio.wait_for(future.result(), WAIT_S)
    assert net.plugin.refused_tasks == 1 and not ran.exists()
    assert not any(ws.processing for ws in net.s.workers.values())


@pytest.mark.parametrize("who", ["bob", "stranger", None])
def test_only_the_gateway_may_be_a_client(pki, service, who):
    async def main() -> None:
        async with Scheduler(host="127.0.0.1", port=0, dashboard_address=":0", protocol="tls",
                             security=pki["sched"]) as s:
            plugin = GpunetMeteringPlugin(service[0].url, service[1]["meter"], open_network=True)
            await s.register_scheduler_plugin(plugin, idempotent=True)
            security = pki[who] if who else None
            address = s.address if who else s.address.replace("tls://", "tcp://")
            with pytest.raises(Exception) as failed:
                async with Client(address, asynchronous=True, security=security, timeout=5):
                    pass
            if who == "bob":  # a certificate of the operator's CA, the wrong role: told why
                assert "'register-client' refused" in str(failed.value)
            assert not s.clients or set(s.clients) == {"fire-and-forget"}

    asyncio.run(main())


@open_network
async def test_a_provider_certificate_cannot_act_as_a_client_on_the_scheduler(net):
    before = net.balances()
    victim = net.alice.address
    async with net.as_("bob") as scheduler:
        attacks = {
            "run_function": scheduler.run_function(function=b"", args=b"", kwargs=b""),
            "broadcast": scheduler.broadcast(msg={"op": "run"}, workers=[victim]),
            "register_worker_plugin": scheduler.register_worker_plugin(plugin=b"", name="x"),
            "retire_workers": scheduler.retire_workers(workers=[victim]),
            "set_resources": scheduler.set_resources(worker=victim, resources={"device": 0}),
            "retire by name": scheduler.retire_workers(workers=[net.bob.address], names=["x"]),
            "gpunet_release_holds": scheduler.gpunet_release_holds(holds=["h_" + "0" * 32]),
            "gpunet_charge_used": scheduler.gpunet_charge_used(key="gpunet-x", client="Client-x"),
            "gpunet_verdict": scheduler.gpunet_verdict(client="Client-x", job="x", copies={"gpunet-x": False}),
            "gpunet_map_state": scheduler.gpunet_map_state(job="x", client="Client-x"),
            "gpunet_reuse_lookup": scheduler.gpunet_reuse_lookup(key="x", client="Client-x"),
            "gpunet event": scheduler.log_event(topic="gpunet-events-victim", msg={"text": "forged"}),
            "a huge event": scheduler.log_event(topic="mine", msg="x" * (EVENT_MAX_BYTES + 1)),
        }
        for name, call in attacks.items():
            with pytest.raises(Exception, match=REFUSED):
                await call
    assert victim in net.s.workers and net.s.workers[victim].resources == {"device": 1}
    assert await net.gateway.get_events("gpunet-events-victim") == () and await net.gateway.get_events("mine") == ()
    assert net.balances() == before


@open_network
async def test_workers_answer_only_the_scheduler_and_the_gateway(net):
    async with net.as_("bob", net.alice.address) as worker:
        for call in (worker.run(function=b"", args=b"", kwargs=b""),  # serialized bytes: not even read
                     getattr(worker, "plugin-add")(plugin=b"", name="x"), worker.terminate()):
            with pytest.raises(Exception, match=REFUSED_OR_CLOSED):
                await call
    assert net.alice.status.name == "running"
    async with net.as_("gw", net.alice.address) as worker:  # the gateway may
        assert list(await worker.keys()) == []


@open_network
async def test_a_workers_stream_carries_only_worker_messages(net):
    refused = net.plugin.door.refused
    net.bob.batched_send({"op": "update-graph", "graph_header": {}, "graph_frames": [], "keys": [],
                              "client": next(iter(net.s.clients))})
    net.bob.batched_send({"op": "log-event", "topic": "gpunet-events-victim", "msg": {"text": "forged"}})
    net.bob.batched_send({"op": "task-finished", "key": "x", "worker": net.alice.address})
    await net.until(lambda: net.plugin.door.refused >= refused + 3, "the three messages to be dropped")
    assert await net.gateway.get_events("gpunet-events-victim") == ()
    assert net.bob.address in net.s.workers  # its own worker messages still flow


def test_a_stranger_is_refused_at_the_tls_handshake(pki):
    """A certificate from another CA does not complete the handshake with the
    operator's CA (what every open network's listener requires)."""
    server = pki["sched"].get_listen_args("scheduler")["ssl_context"]
    client = pki["stranger"].get_connection_args("client")["ssl_context"]

    async def main() -> None:
        async def handle(reader, writer):
            try:
                await reader.read(1)
            finally:
                writer.close()

        listener = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server)
        port = listener.sockets[0].getsockname()[1]
        try:
            with pytest.raises(ssl.SSLError):
                _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, ssl=client), WAIT_S)
                writer.close()
        finally:
            listener.close()
            await listener.wait_closed()

    asyncio.run(main())


# -- every party its own process -----------------------------------------------------------


@pytest.fixture
def open_market(tmp_path):
    """An open network of processes on 127.0.0.1: certificates from `gpunet certs`, a
    credit service, `gpunet scheduler` over mutual TLS, `gpunet provide` for alice and
    bob with their provider certificates (no token anywhere near their workers)."""
    with open_network_of_processes(tmp_path) as market:
        yield market


@contextlib.contextmanager
def open_network_of_processes(tmp_path: Path, *, env_of: dict[str, dict[str, str]] | None = None,
                              args_of: dict[str, list[str]] | None = None) -> Iterator[dict[str, Any]]:
    """What :func:`open_market` gives, in ``tmp_path``; ``env_of`` / ``args_of`` add to a
    provider's (alice's, bob's) environment and `gpunet provide` arguments."""
    ca = tmp_path / "certs"
    for args in (["init"], ["issue", "--role", "scheduler", "--name", "sched"],
                 ["issue", "--role", "gateway", "--name", "gw"], ["issue", "--role", "provider", "--name", "alice"],
                 ["issue", "--role", "provider", "--name", "bob"]):
        done = subprocess.run([*GPUNET, "certs", *args, "--dir", str(ca)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr

    def tls(role: str, name: str) -> list[str]:
        return ["--tls-ca-file", str(ca / "ca.pem"), "--tls-cert", str(ca / f"{role}-{name}.pem"),
                "--tls-key", str(ca / f"{role}-{name}-key.pem")]

    (tmp_path / "credits").mkdir()
    service, tokens = credit_service_with_accounts(tmp_path / "credits")
    meter_token_file = tmp_path / "meter-token"
    meter_token_file.write_text(tokens["meter"])
    processes = []
    try:
        refused = subprocess.run([*GPUNET, "scheduler", "--port", "0", "--credits", service.url, "--operator-token-file",
                                  str(service.operator_token_file), *tls("scheduler", "sched")],
                                 capture_output=True, text=True, timeout=60)
        assert refused.returncode == 1 and "meter account" in refused.stderr, refused.stderr
        scheduler = start(["scheduler", "--port", "0", "--dashboard-port", "0", "--credits", service.url,
                           "--meter-token-file", str(meter_token_file), *tls("scheduler", "sched")])
        processes.append(scheduler)
        expect(scheduler, r"network: open")
        address = expect(scheduler, r"scheduler: (tls://127\.0\.0\.1:\d+)").group(1)
        providers = {}
        for name in ("alice", "bob"):
            # each provider on a loopback address of its own: a host of its own (verified copies need two)
            host = {"alice": "127.0.0.2", "bob": "127.0.0.3"}[name]
            provide = start(["provide", address, "--host", host, *tls("provider", name), *(args_of or {}).get(name, [])],
                            env=(env_of or {}).get(name))
            processes.append(provide)
            providers[name] = expect(provide, rf"provider: {name}; workers: (tls://127\.0\.0\.\d+:\d+)").group(1)
        gateway = {"distributed.comm.require-encryption": True, "distributed.comm.tls.ca-file": str(ca / "ca.pem"),
                   "distributed.comm.tls.client.cert": str(ca / "gateway-gw.pem"),
                   "distributed.comm.tls.client.key": str(ca / "gateway-gw-key.pem")}
        yield {"service": service, "tokens": tokens, "address": address, "workers": providers, "ca": ca,
               "gateway": gateway, "processes": processes,
               "security": {name: certs.security(ca / "ca.pem", ca / f"{role}-{name}.pem", ca / f"{role}-{name}-key.pem")
                            for role, name in (("provider", "bob"), ("gateway", "gw"))}}
    finally:
        for process in reversed(processes):
            stop(process)
        service.stop()


def test_open_network_of_processes(open_market, detached):
    """Through the gateway's certificate an honest notebook's cell runs and is paid to
    the provider whose certificate its worker holds; a client without a certificate,
    and a provider's certificate used as a client or against another provider's worker
    and nanny, are refused, with nothing moved; the ledger verifies; Ctrl-C drains."""
    market, service = open_market, open_market["service"]
    with service.client() as operator:
        before = {a["account"]: a["balance"] for a in operator.accounts()}
    with dask.config.set(market["gateway"]):
        with gpunet.connect(market["address"], credits=service.url, token=market["tokens"]["carol"],
                            budget=500) as net:
            net.client.wait_for_workers(2, timeout=60)
            assert net.run(lambda: 6 * 7, timeout=120) == 42
            back = net.run(np.ones, 200_000, timeout=120)  # its buffer travels as a Dask frame of its own (codec)
            assert back.sum() == 200_000 and back.flags.writeable
            assert "network: open" in str(NetworkStatus.of(net))
            assert net.meter.meter == "meter" == net.metering_state()["meter"]  # its holds name the meter
            nannies = {address: info["nanny"] for address, info in net.client.scheduler_info()["workers"].items()}
            deadline = time.monotonic() + WAIT_S
            while not (net.meter.wait_settled() and net.meter.usage()["held_for_jobs"] == 0) \
                    and time.monotonic() < deadline:
                time.sleep(0.1)
            spent = net.credits.usage(net.session)["spent"]
            assert spent > 0
            free = net.client.submit(time.sleep, 0, key=f"free-{uuid.uuid4().hex}", resources={"device": 1})
            with pytest.raises(Exception, match="cancel|Cancel"):
                free.result(timeout=WAIT_S)

    async def attacks() -> None:
        with pytest.raises(Exception):  # no certificate: refused at the handshake
            async with Client(market["address"].replace("tls://", "tcp://"), asynchronous=True, timeout=5):
                pass
        with pytest.raises(Exception):  # a provider's certificate is no client's
            async with Client(market["address"], asynchronous=True, timeout=10, security=market["security"]["bob"]):
                pass
        alice = market["workers"]["alice"]
        bob_args = market["security"]["bob"].get_connection_args("client")
        async with rpc(alice, connection_args=bob_args) as worker:
            with pytest.raises(Exception, match=REFUSED):
                await worker.run(function=b"", args=b"", kwargs=b"")
        async with rpc(nannies[alice], connection_args=bob_args) as nanny:
            for call in (nanny.kill(), nanny.restart(), nanny.plugin_add(plugin=b"", name="x")):
                with pytest.raises(Exception, match=REFUSED):
                    await call

    asyncio.run(attacks())
    with service.client() as operator:
        after = {a["account"]: a["balance"] for a in operator.accounts()}
    paid = after["alice"] + after["bob"] - before["alice"] - before["bob"]
    assert paid == spent and after["carol"] == before["carol"] - spent
    verify_service(service.url, service.operator_token)
    with dask.config.set(market["gateway"]):  # the workers are still there, untouched
        with Client(market["address"], timeout=30) as gateway:
            assert set(gateway.scheduler_info()["workers"]) == set(market["workers"].values())
    alice_provide = market["processes"][1]
    output = stop(alice_provide)
    assert "gpunet provide: stopped" in output, output


@open_network
async def test_a_provider_registers_only_its_own_workers_under_its_own_names(net):
    refused = net.plugin.door.refused
    # alice's names, and those of an account "bob-gpu" (whose names bob's prefix would cover)
    for squatted in ("alice/0", "bob-gpu", "bob-gpu/0"):
        with pytest.raises(Exception) as failed:
            async with Worker(net.s.address, nthreads=1, security=net.pki["bob"], name=squatted):
                pass
        assert "named bob or bob/" in str(failed.value.__cause__)
    assert net.plugin.door.refused == refused + 3
    assert set(net.s.workers) == {net.alice.address, net.bob.address}
    async with Worker(net.s.address, nthreads=1, security=net.pki["bob"], name="bob/2") as extra:
        assert net.plugin.door.owners[extra.address] == "bob"


def test_the_schedulers_rules_for_a_providers_events_and_stream_messages():
    """SchedulerDoor's rules, as data: what a provider's worker may post and send."""
    from gpunet.roles import EVENT_BURST_BYTES, MAX_TOPICS_PER_PROVIDER, SchedulerDoor

    running = {"tls://w:1": {"gpunet-events-mine"}}
    door = SchedulerDoor(scheduler=None, topics_of=lambda worker: running.get(worker, set()))
    door.owners["tls://w:1"] = "alice"
    assert door.event_refusal("alice", "tls://w:1", "gpunet-events-mine", {"text": "hi"}) is None
    assert "only for the tasks" in door.event_refusal("alice", "tls://w:1", "gpunet-events-other", {"text": "x"})
    assert "only for the tasks" in door.event_refusal("alice", None, "gpunet-events-mine", {"text": "x"})
    assert "over the" in door.event_refusal("alice", "tls://w:1", "mine", "x" * (EVENT_MAX_BYTES + 1))
    assert "over the" in door.event_refusal("alice", "tls://w:1", "t" * EVENT_MAX_BYTES, "x")  # the topic counts
    assert "must be one string" in door.event_refusal("alice", "tls://w:1", 7, {})
    assert "must be one string" in door.event_refusal("alice", "tls://w:1", ["mine", "other"], "x")
    for index in range(MAX_TOPICS_PER_PROVIDER):
        assert door.event_refusal("carol", "tls://w:3", f"topic-{index}", "x") is None
    assert "topics of its own" in door.event_refusal("carol", "tls://w:3", "one-more", "x")
    assert door.event_refusal("carol", "tls://w:3", "topic-0", "x") is None  # its own topics still take events
    chunk = "x" * (EVENT_MAX_BYTES // 2)
    posted = 0
    while door.event_refusal("alice", "tls://w:1", "mine", chunk) is None:
        posted += len(chunk)
        assert posted <= 2 * EVENT_BURST_BYTES, "the rate limit never bit"
    assert posted >= EVENT_BURST_BYTES // 2
    assert door.event_refusal("bob", "tls://w:2", "mine", chunk) is None  # per provider

    assert door.stream_refusal("tls://w:1", {"op": "task-finished", "key": "k"}) is None
    assert door.stream_refusal("tls://w:1", {"op": "close-stream"}) is None
    assert "not a worker's message" in door.stream_refusal("tls://w:1", {"op": "update-graph"})
    assert "not a worker's message" in door.stream_refusal("tls://w:1", {"op": "cancel-keys", "keys": []})
    assert "not a worker's message" in door.stream_refusal("tls://w:1", {"op": "add-keys", "keys": ["k"]})
    assert "who sent it" in door.stream_refusal("tls://w:1", {"op": "task-erred", "worker": "tls://w:2"})
    assert "who sent it" in door.stream_refusal("tls://w:1", {"op": "keep-alive", "client": "c"})
    from distributed.protocol.serialize import Serialize, Serialized

    hidden = Serialized({"serializer": "pickle"}, [b"x"])
    nested = {"op": "task-finished", "key": "k", "metadata": {"a": [1, 2.0, None, b"b", ("c", {"d": hidden})]}}
    assert "no serialized objects" in door.stream_refusal("tls://w:1", nested)
    assert "no serialized objects" in door.stream_refusal("tls://w:1", {"op": "task-finished", "k": {Serialize(1)}})

    class Text(str, Serialize):  # a serialized object passing for text is still looked at
        pass

    assert "no serialized objects" in door.stream_refusal("tls://w:1", {"op": "task-finished", "key": Text("k")})
    plain = {"op": "task-finished", "key": "k", "metadata": {"a": [1, 2.0, None, b"b", True, ("c", {"d": "e"})]}}
    assert door.stream_refusal("tls://w:1", plain) is None
