"""Providers and metering with every part in its own process on 127.0.0.1: a credit
service, `gpunet scheduler --credits`, two `gpunet provide` processes, and this test
as the notebook. One provider is killed (SIGKILL) while it runs a cell."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

import gpunet
from gpunet.cli.network import EXIT_QUARANTINED
from gpunet.credits import verify_service
from gpunet_processes import expect, metered_network, start, stop


@pytest.fixture
def market(tmp_path):
    """Credit service, metered scheduler, two providers (alice, bob) and a client account (carol)."""
    with metered_network(tmp_path, ["alice", "bob"], "carol") as network:
        yield network


def test_killed_provider_is_not_paid_and_the_cell_completes_elsewhere(market, tmp_path, detached):
    def _naps_then_reports_worker(seconds):  # defined here, so that it travels by value
        import os
        import time

        time.sleep(seconds)  # the attempt that is paid: about `seconds` device-seconds
        return os.environ["GPUNET_WORKER"]  # the worker its sandbox belongs to

    with gpunet.connect(market["address"], credits=market["service"].url, token=market["tokens"]["carol"],
                        budget=500) as net:
        net.client.wait_for_workers(2, timeout=60)
        outcome = {}
        runner = threading.Thread(target=lambda: outcome.update(
            worker=net.run(_naps_then_reports_worker, 3.0, timeout=120)), daemon=True)
        runner.start()
        # The cell's sandbox can write nowhere the test reads: the scheduler says where it
        # runs, and that provider is killed long before its 3 s nap ends.
        deadline = time.monotonic() + 60
        busy = []
        while not busy and time.monotonic() < deadline:
            busy = [worker for worker, keys in net.client.processing().items() if keys]
            time.sleep(0.02)
        assert busy, "the cell never started"
        victim = market["workers"][busy[0]]
        survivor = "bob" if victim == "alice" else "alice"
        os.killpg(market["providers"][victim].pid, signal.SIGKILL)
        runner.join(timeout=120)
        assert not runner.is_alive(), "the cell did not complete within 120 s"
        assert market["workers"][outcome["worker"]] == survivor

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            usage = net.meter.usage()
            if net.meter.wait_settled() and usage["held_for_jobs"] == 0:
                break
            time.sleep(0.2)
        usage = net.meter.usage()
        operator = market["operator"]
        assert usage["held_for_jobs"] == 0
        assert 3 <= usage["spent"] <= 5, usage  # one paid attempt of about 3 device-seconds
        assert operator.balance(victim) == 0, "the killed provider must not be paid for the lost attempt"
        assert operator.balance(survivor) == usage["spent"], "charged once, paid once"
    verify_service(market["service"].url, market["service"].operator_token)


def test_a_bad_provider_token_is_refused_clearly(market, tmp_path):
    (tmp_path / "bad-token").write_text("not-a-token")
    provide = start(["provide", market["address"], "--credits", market["service"].url, "--token-file",
                     str(tmp_path / "bad-token")])
    out = provide.communicate(timeout=60)[0]
    assert provide.returncode == 1
    assert "token" in out.lower() and market["service"].url in out


def test_provider_drains_on_ctrl_c(market, detached, tmp_path):
    started, release = tmp_path / "started", tmp_path / "release"
    started.mkdir()
    with gpunet.connect(market["address"], credits=market["service"].url, token=market["tokens"]["carol"],
                        budget=500) as net:
        net.client.wait_for_workers(2, timeout=60)
        alice = market["providers"]["alice"]

        def hold(started_dir, release_path):  # travels by value; returns the provider process that ran it
            import os
            import time

            open(os.path.join(started_dir, str(os.getpid())), "w").close()
            deadline = time.monotonic() + 60  # runs until the test releases it (bounded)
            while not os.path.exists(release_path) and time.monotonic() < deadline:
                time.sleep(0.02)
            return os.getppid()

        def nap(seconds):  # travels by value; returns the provider process that ran it
            import os
            import time

            time.sleep(seconds)
            return os.getppid()

        try:
            futures = net.client.map(hold, [str(started)] * 2, [str(release)] * 2, pure=False,
                                     resources={"device": 1})  # one on each
            deadline = time.monotonic() + 60
            while len(os.listdir(started)) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(os.listdir(started)) == 2, "both tasks should run, one on each provider"
            os.killpg(alice.pid, signal.SIGINT)  # as Ctrl-C in its terminal: the whole process group

            def every_slot_open():
                return all(w["resources"].get("device") for w in net.client.scheduler_info()["workers"].values())

            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and every_slot_open():
                time.sleep(0.05)  # until alice's device slot is closed: the drain has begun
            assert not every_slot_open(), "alice never closed her device slot"
            # Sent while alice drains, her task still running: it must not start there.
            late = net.client.map(nap, [0.1] * 4, pure=False, resources={"device": 1})
        finally:
            release.touch()  # alice's running task may finish now (and a failed test ends quickly)
        out = alice.communicate(timeout=60)[0]
        assert alice.returncode == 0 and "stopped" in out, out
        ran_on = set(net.client.gather(futures))
        bob = market["providers"]["bob"].pid
        assert ran_on == {alice.pid, bob}, "alice's running task must finish there"
        assert set(net.client.gather(late)) == {bob}, "nothing new may start on a draining provider"
        assert len(net.client.scheduler_info()["workers"]) == 1


def test_reports_wait_for_a_stopped_credit_service(market, detached):
    """The credit service stops answering during a map of 200 tasks: the tasks complete,
    the scheduler keeps its reports, and they all arrive once it answers again."""
    from gpunet.client import submit as jobs

    service = market["service"]
    with gpunet.connect(market["address"], credits=service.url, token=market["tokens"]["carol"],
                        budget=5_000) as net:
        net.client.wait_for_workers(2, timeout=60)
        # Registering a provider asks the credit service too: wait until both are known,
        # or an item on a worker still registering stays owed while the service is stopped.
        deadline = time.monotonic() + 60
        while len(net.metering_state()["providers"]) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(net.metering_state()["providers"]) == 2, "both providers should have registered"
        job = jobs.function_job(abs, (), {}, topic=net.topic, announce=False)
        remote = net.submit(job, resources=net.resources_for(), items=list(range(-100, 100)))
        os.kill(service.pid, signal.SIGSTOP)  # holds placed; now it stops answering
        try:
            assert [jobs.function_value(r) for r in remote.wait(timeout=120)] == [abs(i) for i in range(-100, 100)]
            # The scheduler saw every item finish before this notebook did; poll (bounded)
            # until it shows the map's hold closed and its reports queued.
            deadline = time.monotonic() + 30
            state = net.metering_state()
            while not (state["queued"] >= 1 and state["maps_open"] == 0) and time.monotonic() < deadline:
                time.sleep(0.1)
                state = net.metering_state()
            # What the 200 items earned waits as parts of the map's one hold (one per
            # provider and report), then the release of its rest; at least that release.
            assert state["queued"] >= 1 and state["maps_open"] == 0
        finally:
            os.kill(service.pid, signal.SIGCONT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (net.meter.wait_settled()
                                                   and net.meter.usage()["held_for_jobs"] == 0):
            time.sleep(0.2)
        usage = net.meter.usage()
        operator = market["operator"]
        assert usage["held_for_jobs"] == 0 and usage["spent"] == 200
        assert operator.balance("alice") + operator.balance("bob") == 200
    verify_service(service.url, service.operator_token)



def test_a_client_cannot_register_a_worker_to_another_provider(market, detached):
    """Registration rides on a worker's own stream: a client sending the same message
    (with bob's token) changes nothing, and alice's worker stays alice's."""
    with gpunet.connect(market["address"], credits=market["service"].url, token=market["tokens"]["carol"],
                        budget=500) as net:
        net.client.wait_for_workers(2, timeout=60)
        deadline = time.monotonic() + 30
        while len(net.metering_state()["providers"]) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)  # registrations are checked with the credit service first
        before = net.metering_state()["providers"]
        assert sorted(p["provider"] for p in before.values()) == ["alice", "bob"]
        registrations = _probe_registrations(net)
        net.client._send_to_scheduler({"op": "gpunet-register-provider", "token": market["tokens"]["bob"],
                                       "rate": 99})
        # Wait until the scheduler reports that it handled that message to the end (the
        # handler, and the registration check it may start), then look.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            forged = [entry for entry in registrations() if entry["from"] == "client" and entry["done"]]
            if forged:
                break
            time.sleep(0.05)
        assert forged, f"the scheduler never handled the forged registration: {registrations()}"
        assert forged[0]["raised"] or "error" in (forged[0]["registered"] or {}), forged
        assert net.metering_state()["providers"] == before


def _probe_registrations(net):
    """Test-only instrumentation of the scheduler (nothing in product code reports a
    refused registration): wrap its `gpunet-register-provider` stream handler and the
    metering plugin's register_provider, recording for each message whether it came on
    a client's or a worker's stream, what the handler raised, and what the registration
    it started returned, once it is done. Returns a function reading those records."""
    def install(dask_scheduler=None):
        from gpunet import wire

        plugin = dask_scheduler.plugins[wire.METERING_PLUGIN]
        handler = dask_scheduler.stream_handlers[wire.REGISTER_PROVIDER]
        register = plugin.register_provider
        records = dask_scheduler._gpunet_test_registrations = []
        current = [None]

        def probed_register(*args, **kwargs):
            entry = current[0]
            if entry is not None:
                entry["scheduled"] = True

            async def run():
                try:
                    result = await register(*args, **kwargs)
                except Exception as exc:
                    if entry is not None:
                        entry.update(raised=repr(exc), done=True)
                    raise
                if entry is not None:
                    entry.update(registered=result, done=True)
                return result

            return run()

        def probed_handler(**kwargs):
            entry = {"from": "client" if "client" in kwargs else "worker", "raised": None, "registered": None,
                     "scheduled": False, "done": False}
            records.append(entry)
            current[0] = entry
            try:
                handler(**kwargs)
            except Exception as exc:
                entry.update(raised=repr(exc), done=True)
                raise  # as it was: the scheduler's own handling of the error goes on
            finally:
                current[0] = None
            if not entry["scheduled"]:
                entry["done"] = True

        plugin.register_provider = probed_register
        dask_scheduler.stream_handlers[wire.REGISTER_PROVIDER] = probed_handler

    def read(dask_scheduler=None):
        return [dict(entry) for entry in dask_scheduler._gpunet_test_registrations]

    net.client.run_on_scheduler(install)
    return lambda: net.client.run_on_scheduler(read)


def test_a_quarantined_provider_is_told_why_and_how_to_appeal(market, tmp_path):
    operator = market["operator"]
    token_file = tmp_path / "mallory-token"
    token_file.write_text(operator.create_account("mallory", "provider")["token"])
    for number in range(3):  # three mismatches and no valid result: reputation 0.4, below the 0.5 floor
        operator.record_verification("mallory", agreed=False, key=f"lie-{number}")
    assert operator.provider_record("mallory")["quarantined"]
    provide = start(["provide", market["address"], "--credits", market["service"].url, "--token-file",
                     str(token_file), "--host", "127.0.0.1"])
    try:
        out = provide.communicate(timeout=120)[0]
    finally:
        stop(provide)
    assert provide.returncode == EXIT_QUARANTINED, out
    assert "provider mallory is QUARANTINED" in out and "3 of its verified results disagreed" in out, out
    assert "fell below 0.5" in out and f"gpunet credits clear-quarantine mallory --credits {market['service'].url}" in out


def test_a_token_that_is_not_a_providers_is_refused_before_any_worker_starts(market, tmp_path):
    for who, token in (("carol", market["tokens"]["carol"]), ("operator", market["service"].operator_token)):
        token_file = tmp_path / f"{who}-token"
        token_file.write_text(token)
        provide = start(["provide", market["address"], "--credits", market["service"].url,
                         "--token-file", str(token_file)])
        out = provide.communicate(timeout=60)[0]
        assert provide.returncode == 1, out
        assert f"'{who}'" in out and "account, not a provider's" in out, out
        assert "worker" not in out.split("provider's")[0], out  # said before any worker started
    assert market["operator"].balance("carol") == 10_000


def test_an_idle_provider_drains_and_exits_within_10_s_on_sigterm(market):
    bob = market["providers"]["bob"]
    expect(bob, r"gpunet provide: 1 worker\(s\), 0 running · earned today 0 credits")  # the status line
    started = time.monotonic()
    out = stop(bob, signal.SIGTERM)
    took = time.monotonic() - started
    assert bob.returncode == 0 and "gpunet provide: stopped" in out, out
    assert took < 10, f"an idle provider took {took:.1f} s to stop:\n{out}"
    assert "INFO" not in out, "Dask's INFO lines only with --verbose"
