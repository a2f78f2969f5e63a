"""One notebook session against another on an open network's scheduler, in this process:
a TLS scheduler with the metering plugin, alice's and bob's provider workers, and two of
the gateway's Dask clients, one per notebook session, named after their accounts as the
gateway names them (carol, the victim; dave, the attacker). Each attack stands for a bug
in the gateway that let dave's request name carol's hold, task, map or reuse key: the
scheduler refuses it with one clear error (gpunet.metering.owners), and carol's credits
and results are untouched."""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import dask
import pytest
from distributed import Client

from gpunet import wire
from gpunet.errors import NotYoursError
from gpunet.metering.owners import client_name
from gpunet.verify.quorum import result_digest
from gpunet.wire import JobResult, result_to_event
from test_open_network import WAIT_S, dasks_own_tls, marker, open_network, pki, service  # noqa: F401 - fixtures

NOT_YOURS = "belongs to another notebook session|is another notebook session's"


@contextlib.asynccontextmanager
async def sessions(net):
    """carol's and dave's sessions: Dask clients with the gateway's certificate, as the gateway opens them."""
    async with Client(net.s.address, asynchronous=True, security=net.pki["gw"], name=client_name("carol")) as carol, \
            Client(net.s.address, asynchronous=True, security=net.pki["gw"], name=client_name("dave")) as dave:
        yield carol, dave


class Credits:
    """carol's credit session: holds on it, and what the credit service says of it."""

    def __init__(self, net) -> None:
        self.client = net.service.client(net.tokens["carol"])
        self.session = self.client.open_session(10_000)

    def hold(self, amount: int) -> str:
        return self.client.hold(self.session, amount, key=f"hold-{uuid.uuid4().hex}", meter="meter")

    def usage(self) -> dict:
        return self.client.usage(self.session)


def wait_for(flag: str) -> str:
    """A task that runs until ``flag`` exists."""
    import pathlib
    import time

    deadline = time.monotonic() + 60
    while not pathlib.Path(flag).exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    return "done"


def held(hold: str, amount: int, **more):
    return dask.annotate(**{wire.ANNOTATION: wire.annotation(hold, amount, **more)})


async def refused(call, match: str = NOT_YOURS) -> None:
    with pytest.raises(NotYoursError, match=match):
        await call()


@open_network
async def test_a_session_cannot_charge_release_close_judge_or_spend_anothers_holds(net, tmp_path):
    credits = Credits(net)
    flag, ran = tmp_path / "go", tmp_path / "ran"
    async with sessions(net) as (carol, dave):
        hold, copy_hold = credits.hold(100), credits.hold(50)
        with held(hold, 100):
            running = carol.submit(wait_for, str(flag), key=f"gpunet-{uuid.uuid4().hex}",
                                   workers=[net.alice.address], resources={"device": 1})
        job = uuid.uuid4().hex
        with held(copy_hold, 50, verify=job):
            copy = carol.submit(len, "copy", key=f"gpunet-{job}-copy", workers=[net.bob.address],
                                resources={"device": 1})
        await copy
        await net.until(lambda: net.s.tasks.get(running.key) is not None
                        and net.s.tasks[running.key].state == "processing", "carol's task to run")
        await net.until(lambda: len(net.plugin.settlement.awaiting) == 1, "carol's copy to await its verdict")
        before = credits.usage()
        do = dave.scheduler
        await refused(lambda: do.gpunet_charge_used(key=running.key, client=dave.id))
        await refused(lambda: do.gpunet_release_holds(holds=[hold], client=dave.id))
        await refused(lambda: do.gpunet_close_unknown(hold=hold, keys=["gpunet-never"], client=dave.id))
        await refused(lambda: do.gpunet_preauth_state(holds=[hold], jobs=[], client=dave.id))
        await refused(lambda: do.gpunet_verdict(client=dave.id, job=job, copies={copy.key: False},
                                                method="replicate:2", digest="sha256:0"))
        # a call naming no session at all is refused on an open network
        await refused(lambda: do.gpunet_release_holds(holds=[hold]), match="names no client")
        # dave's graph naming carol's hold (to be paid from it) never runs
        with held(hold, 100):
            stolen = dave.submit(marker, str(ran), key=f"gpunet-{uuid.uuid4().hex}", resources={"device": 1})
        with pytest.raises(Exception, match="cancel|Cancel"):
            await asyncio.wait_for(stolen.result(), WAIT_S)
        # dave's graph naming carol's running task's key: he is not given it, her task goes on
        named = dave.submit(marker, str(ran), key=running.key, resources={"device": 1})
        with pytest.raises(Exception, match="cancel|Cancel"):
            await asyncio.wait_for(named.result(), WAIT_S)
        assert not ran.exists() and net.s.tasks[running.key].state == "processing"
        assert {cs.client_key for cs in net.s.tasks[running.key].who_wants} == {carol.id}
        assert net.plugin.state()["refused_calls"] == 6 and net.plugin.refused_tasks == 2
        # nor can carol herself close her running task's hold with a made-up key (it would run unpaid)
        await carol.scheduler.gpunet_close_unknown(hold=hold, keys=["gpunet-made-up"], client=carol.id)
        assert credits.usage() == before and before["held"] == 150 and before["spent"] == 0
        # carol's own calls still work: her task runs to its end and is paid, her verdict settles her copy
        alice_before = net.balances()["alice"]
        flag.write_text("go")
        assert await running == "done"
        await carol.scheduler.gpunet_verdict(client=carol.id, job=job, copies={copy.key: True},
                                             method="replicate:2", digest="sha256:0")
        await net.until(lambda: credits.usage()["held"] == 0, "carol's holds to be settled")
        assert credits.usage()["spent"] > 0 and net.balances()["alice"] > alice_before


@open_network
async def test_a_session_cannot_read_grow_pause_or_join_anothers_map(net, tmp_path):
    credits = Credits(net)
    ran = tmp_path / "ran"
    async with sessions(net) as (carol, dave):
        preauth, job = credits.hold(1_000), uuid.uuid4().hex
        keys = [f"gpunet-{job}-{index}" for index in range(3)]
        with held(preauth, 10, preauth=1_000, job=job, map_tasks=3):  # on no worker yet: a GPU nobody has
            items = carol.map(len, ["a", "b", "c"], key=keys, resources={"device": 1, "GPU": 1})
        await net.until(lambda: all(net.s.tasks.get(key) is not None and net.s.tasks[key].state == "no-worker"
                                    for key in keys), "carol's map to wait for a worker")
        before = credits.usage()
        do = dave.scheduler
        await refused(lambda: do.gpunet_map_state(job=job, client=dave.id))
        await refused(lambda: do.gpunet_grow_map(client=dave.id, job=job, hold="h_" + "0" * 32, amount=5))
        await refused(lambda: do.gpunet_pause_map(client=dave.id, keys=keys))
        # dave's own task, counted as an item of carol's map, never runs
        with held("h_" + "1" * 32, 10, preauth=100, job=job, map_tasks=1):
            joined = dave.submit(marker, str(ran), key=f"gpunet-{job}-99", resources={"device": 1})
        with pytest.raises(Exception, match="cancel|Cancel"):
            await asyncio.wait_for(joined.result(), WAIT_S)
        assert not ran.exists() and all(net.s.tasks[key].state == "no-worker" for key in keys)
        assert credits.usage() == before
        # carol pauses her own map: her items not sent yet are cancelled
        assert await carol.scheduler.gpunet_pause_map(client=carol.id, keys=keys) == 3
        await carol.scheduler.gpunet_release_holds(holds=[preauth], client=carol.id)
        await net.until(lambda: credits.usage()["held"] == 0, "carol's hold to be released")
        del items


@open_network
async def test_a_session_cannot_read_or_overwrite_another_accounts_reused_results(net):
    credits = Credits(net)
    async with sessions(net) as (carol, dave):
        # carol's verified job: two copies, on alice and bob, that her verdict calls equal
        job, holds = uuid.uuid4().hex, [credits.hold(20), credits.hold(20)]
        copies = []
        for hold, worker in zip(holds, (net.alice, net.bob)):
            with held(hold, 20, verify=job):
                copies.append(carol.submit(len, worker.address, key=f"gpunet-{job}-{len(copies)}",
                                           workers=[worker.address], resources={"device": 1}))
        await carol.gather(copies)
        result = JobResult(job, None, net.alice.address, "cpu", 0.0, 1.0, value=b"carol's result")
        await carol.scheduler.gpunet_verdict(client=carol.id, job=job, copies={c.key: True for c in copies},
                                             method="replicate:2", digest=result_digest(result))
        key = "reuse-key-of-carols-cell"
        assert await carol.scheduler.gpunet_reuse_store(client=carol.id, job=job, key=key, record={"job": job},
                                                        results=[result_to_event(result)])
        # dave asks for the same key: he is told of nothing; his store lands in his account's part only
        assert await dave.scheduler.gpunet_reuse_lookup(key=key, client=dave.id) is None
        assert not await dave.scheduler.gpunet_reuse_store(client=dave.id, job=job, key=key, record={"job": "dave's"},
                                                           results=[result_to_event(result)])
        found = await carol.scheduler.gpunet_reuse_lookup(key=key, client=carol.id)
        assert found["record"] == {"job": job} and found["results"][0]["value"] == b"carol's result"
        # a client the gateway did not name after an account neither keeps nor finds anything
        await refused(lambda: net.gateway.scheduler.gpunet_reuse_lookup(key=key, client=net.gateway.id),
                      match="names no account")
        await net.until(lambda: credits.usage()["held"] == 0, "carol's copies to be settled")


def test_owners_keep_each_hold_and_map_to_the_first_client_that_named_it():
    from gpunet.metering.owners import Owners, account_of

    owners = Owners(max_jobs=2)
    owners.check("carol-1", ["h1"], "releasing holds", required=True)
    with pytest.raises(NotYoursError, match="hold h1 belongs to another notebook session"):
        owners.check("dave-1", ["h2", "h1"], "releasing holds", required=True)
    assert "h2" not in owners.holds  # a refused call claims nothing
    with pytest.raises(NotYoursError, match="names no client"):
        owners.check(None, ["h1"], "releasing holds", required=True)
    owners.check(None, ["h1"], "releasing holds", required=False)  # a private network's older notebook
    assert owners.claim_job("carol-1", "j1") and not owners.claim_job("dave-1", "j1")
    assert owners.job_is_foreign("dave-1", "j1") and not owners.job_is_foreign("dave-1", "unknown")
    owners.claim_job("carol-1", "j2")
    owners.claim_job("carol-1", "j3")
    assert list(owners.jobs) == ["j2", "j3"] and owners.refused == 2
    owners.client_left("carol-1")
    assert owners.holds == {} and owners.jobs == {}
    uid = str(uuid.uuid1())  # Dask's client ids end in one
    assert account_of(f"Client-{client_name('dave.x-1@lab')}-{uid}") == "dave.x-1@lab"
    assert account_of(f"Client-{uid}") is None and account_of(f"Client-gpunet@-{uid}") is None
    assert account_of(None) is None
