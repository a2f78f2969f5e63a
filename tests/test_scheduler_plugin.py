"""The metering plugin on a real in-process Dask scheduler and workers,
against a real credit service on 127.0.0.1: its named handlers answer, annotated
tasks settle or release their holds, a map's hold is paid in parts, a verdict settles
the agreeing copy, and a worker registers its provider over its own stream."""

from __future__ import annotations

import asyncio
import functools
import inspect
import time
import uuid
from collections.abc import Callable
from typing import Any

import dask
import pytest
from distributed import Client, Scheduler, Worker

from gpunet import wire
from gpunet.errors import NotYoursError
from gpunet.extensions.scheduler_plugin import GpunetMeteringPlugin
from gpunet.extensions.worker_plugin import GpunetWorkerPlugin
from gpunet_processes import credit_service_with_accounts

WAIT_S = 20.0  # every wait below is bounded by this


def in_process_cluster(test: Callable[..., Any]) -> Callable[..., None]:
    """Run ``async test(c, s, a, b, **fixtures)`` on a scheduler and two workers in this
    process, with an asynchronous client, as distributed's ``gen_cluster(client=True)``
    does. Not gen_cluster itself: its clean-up terminates every child process of the
    test process, the worker processes of the network other tests share included."""

    @functools.wraps(test)
    def run(**fixtures: Any) -> None:
        async def main() -> None:
            async with Scheduler(host="127.0.0.1", port=0, dashboard_address=":0") as s, \
                    Worker(s.address, nthreads=1) as a, Worker(s.address, nthreads=2) as b, \
                    Client(s.address, asynchronous=True) as c:
                await asyncio.wait_for(test(c, s, a, b, **fixtures), 120)

        asyncio.run(main())

    signature = inspect.signature(test)  # pytest injects the fixtures after c, s, a, b
    run.__signature__ = signature.replace(parameters=list(signature.parameters.values())[4:])
    return run


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """One credit service for the module (nobody is ever quarantined): providers alice
    and bob, client carol; yields (service, {name: token})."""
    svc, tokens = credit_service_with_accounts(tmp_path_factory.mktemp("credits"))
    yield svc, tokens
    svc.stop()


class Notebook:
    """Carol's side: a session, holds on it, and what the credit service says of them."""

    def __init__(self, service: Any, tokens: dict[str, str]) -> None:
        self.operator = service.client()
        self.credits = service.client(tokens["carol"])
        self.session = self.credits.open_session(10_000)

    def hold(self, amount: int) -> str:
        return self.credits.hold(self.session, amount, key=f"hold-{uuid.uuid4().hex}")

    def usage(self) -> dict[str, Any]:
        return self.credits.usage(self.session)

    def settlements(self, hold: str) -> list[dict[str, Any]]:
        """The ledger's settle entries paid from ``hold``."""
        return [entry for entry in self.operator.entries()["entries"]
                if entry.get("hold") == hold and entry.get("kind") == "settle"]

    def close(self) -> None:
        self.operator.close()
        self.credits.close()


@pytest.fixture
def notebook(service):
    nb = Notebook(*service)
    yield nb
    nb.close()


async def until(condition: Callable[[], Any], what: str) -> Any:
    """Wait (at most WAIT_S) until ``condition()``, run in a thread (it may call the
    credit service), is true; return its value."""
    deadline = time.monotonic() + WAIT_S
    while not (value := await asyncio.to_thread(condition)):
        assert time.monotonic() < deadline, f"waited {WAIT_S:g} s for {what}"
        await asyncio.sleep(0.05)
    return value


async def metered(scheduler: Scheduler, service: Any) -> GpunetMeteringPlugin:
    """The metering plugin, started on ``scheduler`` the way Dask registers plugins."""
    plugin = GpunetMeteringPlugin(service[0].url, service[0].operator_token)
    await scheduler.register_scheduler_plugin(plugin, idempotent=True)
    return plugin


def serve_confirmation(worker: Any, token: str) -> None:
    """Have ``worker`` confirm registrations with ``token``, with the handler gpunet's
    worker plugin serves (not the whole plugin: its set-up reroutes this process's stdout)."""
    worker.handlers[wire.CONFIRM_PROVIDER] = GpunetWorkerPlugin(token).confirm_provider


async def register(plugin: GpunetMeteringPlugin, worker: Any, token: str, rate: float) -> None:
    """Register ``worker``'s provider over its own stream, as gpunet's worker plugin does."""
    serve_confirmation(worker, token)
    worker.batched_send({"op": wire.REGISTER_PROVIDER, "token": token, "rate": rate})
    await until(lambda: worker.address in plugin.providers, f"{worker.address} to register")


def work(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def fail() -> None:
    raise ValueError("this cell fails")


@in_process_cluster
async def test_handlers_answer(c, s, a, b, service, notebook):
    plugin = await metered(s, service)
    state = await c.scheduler.gpunet_metering_state()
    assert state["credits"] == service[0].url
    assert state["queued"] == 0 and state["providers"] == {} and state["maps_open"] == 0
    assert await c.scheduler.gpunet_charge_used(key="no-such-task") is None

    unsent, unknown = notebook.hold(50), notebook.hold(50)
    await c.scheduler.gpunet_release_holds(holds=[unsent])
    await c.scheduler.gpunet_close_unknown(hold=unknown, keys=["never-created"])
    await until(lambda: plugin.reporter.reported == 2, "both releases to be reported")
    usage = notebook.usage()
    assert usage["held"] == 0 and usage["spent"] == 0 and plugin.reporter.failed == []


@in_process_cluster
async def test_registration_over_the_workers_stream_pays_what_it_was_owed(c, s, a, b, service, notebook):
    plugin = await metered(s, service)
    hold = notebook.hold(100)
    with dask.annotate(**{wire.ANNOTATION: wire.annotation(hold, 100)}):
        future = c.submit(work, 0.2, key=f"gpunet-cell-{uuid.uuid4().hex}", workers=[a.address])
    await future
    await until(lambda: a.address in plugin.settlement.owed, "the attempt to be owed to its worker")
    # A stranger names this worker with a rate the scheduler refuses: unconfirmed, it
    # must not make the worker's owed work be released.
    serve_confirmation(a, service[1]["alice"])
    c._send_to_scheduler({"op": wire.REGISTER_PROVIDER, "worker": a.address, "token": "forged", "rate": 0})
    await until(lambda: plugin.refused_registrations == 1, "the forged registration to be refused")
    assert a.address in plugin.settlement.owed

    await register(plugin, a, service[1]["alice"], 2.0)
    assert (await c.scheduler.gpunet_metering_state())["providers"] == {a.address: {"provider": "alice", "rate": 2.0}}
    [paid] = await until(lambda: notebook.settlements(hold), "the hold to be settled")
    assert paid["to"] == "alice" and 1 <= paid["amount"] <= 100
    assert notebook.usage()["held"] == 0

    serve_confirmation(b, service[1]["carol"])
    refused = await plugin.register_provider(b.address, service[1]["carol"], 1.0)
    assert "not a provider" in refused["error"] and b.address not in plugin.providers


@in_process_cluster
async def test_a_registration_that_names_another_worker_is_refused(c, s, a, b, service, notebook):
    """Dask lets a message's own keys win over the sender it adds, so a client (or another
    worker) can send a registration naming alice's worker: that worker does not confirm it."""
    plugin = await metered(s, service)
    serve_confirmation(a, service[1]["alice"])  # alice's worker, not registered yet
    forged = {"op": wire.REGISTER_PROVIDER, "worker": a.address, "token": service[1]["bob"], "rate": 1.0}
    c._send_to_scheduler(dict(forged))  # as a client of the scheduler
    await until(lambda: plugin.refused_registrations == 1, "the client's forgery to be refused")
    b.batched_send(dict(forged))  # as another worker
    await until(lambda: plugin.refused_registrations == 2, "the worker's forgery to be refused")
    assert a.address not in plugin.providers and b.address not in plugin.providers
    await register(plugin, a, service[1]["alice"], 1.0)
    assert plugin.providers[a.address]["provider"] == "alice"


@in_process_cluster
async def test_a_successful_task_settles_and_a_failed_one_releases(c, s, a, b, service, notebook):
    plugin = await metered(s, service)
    await register(plugin, a, service[1]["alice"], 1.0)
    good, bad = notebook.hold(100), notebook.hold(100)
    with dask.annotate(**{wire.ANNOTATION: wire.annotation(good, 100)}):
        done = c.submit(work, 0.1, key=f"gpunet-good-{uuid.uuid4().hex}", workers=[a.address])
    with dask.annotate(**{wire.ANNOTATION: wire.annotation(bad, 100)}):
        failed = c.submit(fail, key=f"gpunet-bad-{uuid.uuid4().hex}", workers=[a.address])
    await done
    with pytest.raises(ValueError):
        await failed
    usage = await until(lambda: (u := notebook.usage())["held"] == 0 and u, "both holds closed")
    [paid] = notebook.settlements(good)
    assert paid["to"] == "alice" and usage["spent"] == paid["amount"] >= 1
    assert notebook.settlements(bad) == []


@in_process_cluster
async def test_a_maps_shared_hold_is_paid_in_parts(c, s, a, b, service, notebook):
    plugin = await metered(s, service)
    await register(plugin, a, service[1]["alice"], 1.0)
    await register(plugin, b, service[1]["bob"], 1.0)
    hold = notebook.hold(30)
    with dask.annotate(**{wire.ANNOTATION: wire.annotation(hold, 10, tasks=3)}):
        futures = [c.submit(work, 0.05 + i / 100, key=f"gpunet-map-{i}-{uuid.uuid4().hex}",
                            workers=[(a if i < 2 else b).address]) for i in range(3)]
    await c.gather(futures)
    usage = await until(lambda: (u := notebook.usage())["held"] == 0 and u, "the map's hold to be closed")
    parts = notebook.settlements(hold)
    paid = {}
    for part in parts:
        paid[part["to"]] = paid.get(part["to"], 0) + part["amount"]
    assert set(paid) == {"alice", "bob"} and sum(paid.values()) == usage["spent"] <= 30
    assert (await c.scheduler.gpunet_metering_state())["maps_open"] == 0


@in_process_cluster
async def test_a_verdict_settles_the_agreeing_copy_and_releases_the_other(c, s, a, b, service, notebook):
    plugin = await metered(s, service)
    await register(plugin, a, service[1]["alice"], 1.0)
    await register(plugin, b, service[1]["bob"], 1.0)
    job = f"job-{uuid.uuid4().hex}"
    holds, copies = [], []
    for worker in (a, b):
        holds.append(notebook.hold(20))
        with dask.annotate(**{wire.ANNOTATION: wire.annotation(holds[-1], 20, verify=job)}):
            copies.append(c.submit(work, 0.05, key=f"gpunet-copy-{uuid.uuid4().hex}", workers=[worker.address]))
    await c.gather(copies)
    await until(lambda: len(plugin.settlement.awaiting) == 2, "both copies to await the verdict")
    bob_before = notebook.operator.provider_record("bob")["mismatches"]

    with pytest.raises(NotYoursError, match="belongs to another notebook session"):  # only its own copies
        await c.scheduler.gpunet_verdict(client="someone-else", job=job, copies={copies[1].key: True},
                                         method="replicate:2", digest="sha256:0")
    await c.scheduler.gpunet_verdict(client=c.id, job=job, copies={copies[0].key: True, copies[1].key: False},
                                     method="replicate:2", digest="sha256:0")
    await until(lambda: notebook.usage()["held"] == 0, "both copies' holds to be closed")
    [paid] = notebook.settlements(holds[0])
    assert paid["to"] == "alice"
    seconds = paid["memo"].pop("seconds")
    assert paid["memo"] == {"verified": "replicate:2", "providers": ["alice"], "digest": "sha256:0",
                            "task": str(copies[0].key)}
    assert 0 <= seconds < 60
    assert notebook.settlements(holds[1]) == []  # settled 0 to bob (a release entry): the verdict's hold
    # Only alice disagreed with bob: one other provider is no evidence against him (it takes two)
    state = await c.scheduler.gpunet_metering_state()
    assert state["verdicts"] == 1 and state["unblamed"] == 1 and state["refused_calls"] == 1
    await until(lambda: not plugin.settlement.queue, "the verdict's movements to be reported")
    assert notebook.operator.provider_record("bob")["mismatches"] == bob_before


def test_the_preload_entry_point_starts_the_plugin(service):
    """``dask_setup`` with its click options, as ``gpunet scheduler --credits`` preloads it."""
    async def start_and_ask() -> dict[str, Any]:
        async with Scheduler(host="127.0.0.1", dashboard_address=":0", preload=[wire.SCHEDULER_PRELOAD],
                             preload_argv=[["--credits", service[0].url, "--operator-token-file",
                                            str(service[0].operator_token_file), "--default-provider", "alice"]]) as s:
            return s.plugins[wire.METERING_PLUGIN].state()

    state = asyncio.run(start_and_ask())
    assert state["credits"] == service[0].url and state["default_provider"] == "alice"
