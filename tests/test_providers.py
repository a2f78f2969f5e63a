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
from gpunet.credits import serve_in_background, verify_service
from gpunet_processes import expect, start, stop

@pytest.fixture
def market(tmp_path):
    """Credit service, metered scheduler, two providers (alice, bob) and a client account."""
    service = serve_in_background(tmp_path / "credits.sqlite3", operator_token_file=tmp_path / "operator-token")
    operator = service.client()
    tokens = {name: operator.create_account(name, role)["token"]
              for name, role in (("alice", "provider"), ("bob", "provider"), ("carol", "client"))}
    operator.mint("carol", 10_000, key="mint-carol")
    processes = []
    try:
        scheduler = start(["scheduler", "--port", "0", "--dashboard-port", "0", "--credits", service.url,
                            "--operator-token-file", str(tmp_path / "operator-token")])
        processes.append(scheduler)
        address = expect(scheduler, r"scheduler: (tcp://127\.0\.0\.1:\d+)").group(1)
        providers = {}
        for name in ("alice", "bob"):
            provide = start(["provide", address, "--credits", service.url, "--token", tokens[name],
                              "--host", "127.0.0.1"])
            processes.append(provide)
            expect(provide, rf"provider: {name}; workers: tcp://127\.0\.0\.1:\d+")
            providers[name] = provide
        yield {"service": service, "operator": operator, "address": address, "tokens": tokens,
               "providers": providers}
    finally:
        for process in reversed(processes):
            stop(process)
        operator.close()
        service.stop()


def test_killed_provider_is_not_paid_and_the_cell_completes_elsewhere(market, tmp_path, detached):
    marker = tmp_path / "running-on"

    def _runs_then_reports_parent(path, seconds):  # defined here, so that it travels by value
        import os
        import time

        with open(path, "w") as out:
            out.write(str(os.getppid()))  # the worker's Nanny lives in the `gpunet provide` process
        time.sleep(seconds)
        return os.getppid()

    with gpunet.connect(market["address"], credits=market["service"].url, token=market["tokens"]["carol"],
                        budget=500) as net:
        net.client.wait_for_workers(2, timeout=60)
        outcome = {}
        runner = threading.Thread(target=lambda: outcome.update(
            ppid=net.run(_runs_then_reports_parent, str(marker), 3.0, timeout=120)))
        runner.start()
        deadline = time.monotonic() + 60
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        victim_pid = int(marker.read_text())
        victim = next(name for name, p in market["providers"].items() if p.pid == victim_pid)
        survivor = "bob" if victim == "alice" else "alice"
        os.killpg(victim_pid, signal.SIGKILL)
        runner.join(timeout=120)
        assert outcome["ppid"] == market["providers"][survivor].pid

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            usage = net.credits.usage(net.session)
            if usage["held"] == 0:
                break
            time.sleep(0.2)
        operator = market["operator"]
        assert usage["held"] == 0
        assert 3 <= usage["spent"] <= 5, usage  # one paid attempt of about 3 device-seconds
        assert operator.balance(victim) == 0, "the killed provider must not be paid for the lost attempt"
        assert operator.balance(survivor) == usage["spent"], "charged once, paid once"
    verify_service(market["service"].url, market["service"].operator_token)


def test_a_bad_provider_token_is_refused_clearly(market):
    provide = start(["provide", market["address"], "--credits", market["service"].url, "--token", "not-a-token"])
    out = provide.communicate(timeout=60)[0]
    assert provide.returncode == 1
    assert "token" in out.lower() and market["service"].url in out


def test_provider_drains_on_ctrl_c(market, detached):
    with gpunet.connect(market["address"], credits=market["service"].url, token=market["tokens"]["carol"],
                        budget=500) as net:
        net.client.wait_for_workers(2, timeout=60)
        alice = market["providers"]["alice"]

        def nap(seconds):  # travels by value; returns the provider process that ran it
            import os
            import time

            time.sleep(seconds)
            return os.getppid()

        futures = net.client.map(nap, [2.0, 2.0], pure=False, resources={"device": 1})  # one on each
        time.sleep(0.7)
        os.killpg(alice.pid, signal.SIGINT)  # as Ctrl-C in its terminal: the whole process group
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and all(
                w["resources"].get("device") for w in net.client.scheduler_info()["workers"].values()):
            time.sleep(0.05)  # until alice's device slot is closed: the drain has begun
        # Sent while alice drains: it must not start there.
        late = net.client.map(nap, [0.1] * 4, pure=False, resources={"device": 1})
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
        job = jobs.function_job(abs, (), {}, topic=net.topic, announce=False)
        remote = net.submit(job, resources=net.resources_for(), items=list(range(-100, 100)))
        os.kill(service.pid, signal.SIGSTOP)  # holds placed; now it stops answering
        try:
            assert [jobs.function_value(r) for r in remote.wait(timeout=120)] == [abs(i) for i in range(-100, 100)]
            time.sleep(3)
            state = net.metering_state()
            # What the 200 items earned waits as parts of the map's one hold (one per
            # provider and report), then the release of its rest; at least that release.
            assert state["queued"] >= 1 and state["maps_open"] == 0
        finally:
            os.kill(service.pid, signal.SIGCONT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and net.credits.usage(net.session)["held"]:
            time.sleep(0.2)
        usage = net.credits.usage(net.session)
        operator = market["operator"]
        assert usage["held"] == 0 and usage["spent"] == 200
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
        net.client._send_to_scheduler({"op": "gpunet-register-provider", "token": market["tokens"]["bob"],
                                       "rate": 99})
        time.sleep(1.0)
        assert net.metering_state()["providers"] == before
