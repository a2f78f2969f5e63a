"""Metering end to end: holds before a job is sent, settlements after, on a real
embedded network with its real credit service (a separate process) on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import time

import pytest

import gpunet
from gpunet.client import network as network_module
from gpunet import wire
from gpunet.client.local import EmbeddedNetwork
from gpunet.credits import verify_service
from network_probes import running_jobs, spy_on_sending, wait_until


def _settled(net, timeout=30.0):
    """Wait until the scheduler has reported everything; return the session's usage
    (``held`` then is what is pre-authorized: jobs hold nothing more)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        net.meter.wait_settled(timeout=timeout)  # what the scheduler paid from pre-authorized holds, landed
        state = net.metering_state()
        usage = net.meter.usage()
        if state["queued"] == 0 and usage["held_for_jobs"] == 0:
            return usage
        time.sleep(0.1)
    raise AssertionError(f"reports still pending: {state}, {usage}")


def _network_of_its_own(budget=2_000):
    """A metered embedded network that is not the shared one; the shared one is current
    again after it closes."""
    previous, network_module._current = network_module._current, None
    try:
        net = gpunet.connect(budget=budget)
        try:
            yield net
        finally:
            net.close()
    finally:
        network_module._current = previous


@pytest.fixture
def own():
    """A metered embedded network of its own (tests here stop its credit service)."""
    yield from _network_of_its_own()


def test_each_task_is_paid_once_and_holds_return(net):
    before = _settled(net)
    assert net.map(abs, range(-5, 5)) == [5, 4, 3, 2, 1, 0, 1, 2, 3, 4]
    after = _settled(net)
    assert after["spent"] - before["spent"] == 10, "ten trivial tasks cost one credit each"
    assert after["left"] == after["budget"] - after["spent"] - after["preauthorized"]
    usage = gpunet.SessionUsage(net)
    assert "spent" in str(usage) and "tcp://127.0.0.1" in str(usage)


def test_a_map_bigger_than_the_budget_is_refused_before_it_is_sent(own, tmp_path, monkeypatch):
    marker = tmp_path / "ran"

    def touch(_):
        marker.touch()

    sent = spy_on_sending(monkeypatch, own)
    with pytest.raises(gpunet.BudgetError) as caught:
        own.map(touch, range(2_500))  # 2,500 items cost at least a credit each > 2,000
    message = str(caught.value)
    assert "2000" in message and "left" in message and "nothing was sent" in message
    # the real cause (more items than credits, at a credit each at least) and the real fix
    assert "what 2500 items are expected to cost" in message and "send fewer, larger items" in message
    assert "lower --max-credits" not in message
    # Refused before any task existed: nothing reached Dask, so nothing can run later.
    assert sent == []
    assert not marker.exists()
    assert _settled(own)["held_for_jobs"] == 0


def test_a_map_whose_worst_case_exceeds_the_budget_runs_in_slices_as_credits_come_back(own):
    """300 items hold 10 credits each at worst (3,000 > the 2,000 budget) and cost
    about 1 each: the map goes in slices, each held when credits come back, pausing
    (and saying so) while none fits; every item is paid once and nothing stays held."""
    before = _settled(own)

    def slow_square(i):  # travels by value; long enough that the first slices are still running
        import time

        time.sleep(0.02)
        return i * i

    assert own.map(slow_square, range(300), timeout=300) == [i * i for i in range(300)]
    after = _settled(own)
    assert after["spent"] - before["spent"] == 300 and after["held_for_jobs"] == 0
    assert after["spent"] <= after["budget"]


def test_max_credits_stops_the_cell_and_charges_the_limit(own):
    before = _settled(own)
    started = time.monotonic()
    with pytest.raises(gpunet.BudgetError, match="max-credits"):
        own.run(_spin, max_credits=2)
    # Stopped at the limit (~2 s of work), not left to spin: the bound is loose because a
    # loaded machine (load 9) took 12 s; the charge below pins the point it stopped at.
    assert time.monotonic() - started < 60
    # Stopped: no worker still runs the endless loop.
    assert all(keys == [] for keys in running_jobs(own).values()), running_jobs(own)
    after = _settled(own)
    assert after["spent"] - before["spent"] in (1, 2), "charged for its time on the worker, at most the limit"


def test_a_map_whose_max_credits_cannot_pay_each_item_is_refused(own):
    with pytest.raises(gpunet.BudgetError, match="at least --max-credits 5"):
        own.map(abs, range(5), max_credits=3)
    assert own.map(abs, range(-2, 3), max_credits=5) == [2, 1, 0, 1, 2]
    assert _settled(own)["spent"] <= 5


def _spin():
    while True:
        pass


def test_reports_survive_the_credit_service_pausing(own):
    """Holds are placed, then the service stops answering while 200 tasks run; the
    cells complete, the reports wait in the scheduler's queue and arrive later."""
    from gpunet.client import submit as jobs

    service = own.embedded.credits_service
    before = _settled(own)
    job_started = time.monotonic()
    job = jobs.function_job(abs, (), {}, topic=own.topic, announce=False)
    # The holds are placed while the service answers; it stops right after.
    remote = own.submit(job, resources=own.resources_for(), items=list(range(-100, 100)))
    os.kill(service.pid, signal.SIGSTOP)
    try:
        results = [jobs.function_value(r) for r in remote.wait(timeout=120)]
        assert len(results) == 200
        # The scheduler saw every task finish before this notebook did, so their
        # reports are queued by now; polled (bounded) all the same, not slept on.
        deadline = time.monotonic() + 30
        while own.metering_state()["queued"] == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert own.metering_state()["queued"] > 0, "reports should be waiting"
    finally:
        os.kill(service.pid, signal.SIGCONT)
    after = _settled(own, timeout=60)
    assert after["spent"] - before["spent"] == 200
    assert time.monotonic() - job_started < 120


#: How many times its clients' longest timeout the credit service stays away.
OUTAGE_TIMEOUTS = 10


@pytest.fixture
def short_timeouts(monkeypatch):
    """A metered embedded network whose credit clients (the notebook's and the
    scheduler's) time out after 1 s connecting and 2 s reading (``GPUNET_CREDITS_TIMEOUT``)."""
    monkeypatch.setenv("GPUNET_CREDITS_TIMEOUT", "1,2")
    yield from _network_of_its_own()


def test_a_bad_credits_timeout_says_what_to_give(monkeypatch):
    from gpunet.credits import CreditClient
    from gpunet.errors import GpunetError

    monkeypatch.setenv("GPUNET_CREDITS_TIMEOUT", "soon")
    with pytest.raises(GpunetError, match="READ or CONNECT,READ seconds"):
        CreditClient("http://127.0.0.1:1", "t")
    monkeypatch.setenv("GPUNET_CREDITS_TIMEOUT", "7")
    assert CreditClient("http://127.0.0.1:1", "t").timeout == (3.05, 7.0)


def test_reports_queue_retry_and_land_after_an_outage_longer_than_every_client_timeout(short_timeouts):
    """The credit service stops answering (SIGSTOP) for :data:`OUTAGE_TIMEOUTS` times the
    longest client timeout while a map runs: the map completes, a map sent meanwhile runs
    on the session's pre-authorized hold (no request to the service on its path), a map
    too big for that hold is refused saying the service is unreachable (nothing sent),
    the scheduler's reports time out, queue and retry, and once the service is back they
    land exactly once. The clients' timeouts are shortened for the test (2 s read instead
    of 30 s, as ``GPUNET_CREDITS_TIMEOUT`` sets them), so that the outage outlasts them
    all in 20 s instead of minutes."""
    from gpunet.client import submit as jobs
    from gpunet.errors import GpunetError

    own = short_timeouts
    service = own.embedded.credits_service
    plugin = own.embedded.cluster.scheduler.plugins[wire.METERING_PLUGIN]
    short = (1.0, 2.0)
    assert plugin._client.timeout == own.credits.timeout == short  # the scheduler's and the notebook's
    outage_s = OUTAGE_TIMEOUTS * max(short)
    before = _settled(own)
    job = jobs.function_job(abs, (), {}, topic=own.topic, announce=False)
    remote = own.submit(job, resources=own.resources_for(), items=list(range(-100, 100)))  # drawn before the stop
    os.kill(service.pid, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        assert len(remote.wait(timeout=120)) == 200
        assert own.map(abs, range(3), timeout=30) == [0, 1, 2], "drawn on the pre-authorized hold"
        with pytest.raises(GpunetError, match="unreachable"):
            own.map(abs, range(1_000), timeout=30)  # expected to cost 1,500: more than is pre-authorized
        wait_until(lambda: own.metering_state()["queued"] > 0, 30, "the reports to queue")
        # the outage goes on: the scheduler's requests time out again and again meanwhile
        wait_until(lambda: time.monotonic() - stopped >= outage_s, outage_s + 10, "the outage to last")
        assert own.metering_state()["queued"] > 0, "nothing can have landed while the service was stopped"
    finally:
        os.kill(service.pid, signal.SIGCONT)
    # The refused map's hold request waited in the stopped service's socket, and was
    # placed once it ran again: the next job gives it back.
    assert own.map(abs, range(-1, 1)) == [1, 0]
    after = _settled(own, timeout=120)
    assert after["spent"] - before["spent"] == 205, "every item paid exactly once, none lost, none twice"
    assert after["held_for_jobs"] == 0
    verify_service(service.url, service.operator_token)


def test_the_ledger_verifies_after_metered_work(net):
    net.map(abs, range(20))
    _settled(net)
    service = net.embedded.credits_service
    report = verify_service(service.url, service.operator_token)  # raises on any bad entry
    # The map's 20 items draw on the session's pre-authorized hold: the mint, the hold, its parts paid.
    assert report["size"] >= 3 and report["balances_checked"]
    assert report["minted"] == EmbeddedNetwork.LOCAL_CREDITS


def test_usage_magic_and_budget_refusal_through_the_magic(ip, net):
    from IPython.utils.capture import capture_output

    with capture_output():
        usage = ip.run_line_magic("gpunet", "usage")
    assert isinstance(usage, gpunet.SessionUsage)
    assert "left" in str(usage) and "<table" in usage._repr_html_()
    left = usage.numbers["left"] + usage.numbers["preauthorized"]  # an idle pre-authorization is given back first
    with pytest.raises(gpunet.BudgetError, match="nothing was sent"):
        with capture_output():
            ip.run_cell_magic("gpunet", f"--max-credits {left + 1} --quiet", "x = 1")
    with capture_output():
        ip.run_cell_magic("gpunet", "--max-credits 3 --quiet --map i=range(3)", "y = i")
    assert ip.user_ns["y"] == [0, 1, 2]


def test_more_items_than_credits_says_each_task_costs_a_credit(own):
    with pytest.raises(gpunet.BudgetError) as caught:
        own.map(abs, range(2_500), max_credits=2_500)
    assert "nothing was sent" in str(caught.value) and "2500 tasks need 2500 credits" in str(caught.value)


def test_a_cell_that_raises_is_paid_and_a_stopped_one_is_not(ip, net):
    """The pricing the README states: a cell that raises ran on the provider's device
    and is paid; a cell stopped before its end (here by --timeout) is released."""
    from IPython.utils.capture import capture_output

    before = _settled(net)
    with pytest.raises(ZeroDivisionError), capture_output():
        ip.run_cell_magic("gpunet", "--quiet", "ratio = 1 / 0")
    raised = _settled(net)
    assert raised["spent"] - before["spent"] == 1, "a cell that raises is paid (1 credit: under a second)"
    with pytest.raises(gpunet.CellTimeoutError), capture_output():
        ip.run_cell_magic("gpunet", "--quiet --timeout 1", "while True:\n    pass")
    stopped = _settled(net)
    assert stopped["spent"] == raised["spent"], "a cell stopped before its end is not paid"


def test_usage_right_after_a_cell_is_exact(ip, net):
    from IPython.utils.capture import capture_output

    _settled(net)
    with capture_output():
        ip.run_cell_magic("gpunet", "--quiet", "z = 1")
        usage = ip.run_line_magic("gpunet", "usage")
    assert usage.numbers["held_for_jobs"] == 0 and not usage.settling, str(usage)
    assert usage.numbers["preauthorized"] > 0 and "pre-authorized" in str(usage)


def test_an_empty_map_costs_nothing(net):
    before = _settled(net)
    assert net.map(abs, []) == []
    assert _settled(net)["spent"] == before["spent"]


def test_a_hold_whose_tasks_never_reached_the_scheduler_is_released(net):
    """The scheduler refuses a graph whose input was lost before it arrived: the
    notebook then has it close the hold of tasks that never existed there."""
    before = _settled(net)
    hold = net.meter.hold_shared("never-sent", count=3, amount=5)
    assert net.credits.usage(net.session)["held"] == before["held"] + 15
    net.call_scheduler(wire.CLOSE_UNKNOWN, hold=hold,
                       keys=["gpunet-never-sent-0", "gpunet-never-sent-1", "gpunet-never-sent-2"])
    after = _settled(net)
    assert after["held_for_jobs"] == 0 and after["spent"] == before["spent"]


def test_the_embedded_defaults_run_a_2000_item_trivial_map_in_one_go(capfd):
    """The issue's newcomer: the default budget (10,000) and `net.map(f, range(2000))`.
    Its hold is what the items are expected to cost (3,000), not 2,000 x 10 at worst: it
    is sent whole (no pause), and each item is paid once."""
    previous, network_module._current = network_module._current, None
    try:
        net = gpunet.connect()
        try:
            before = _settled(net)
            assert before["budget"] == network_module.DEFAULT_BUDGET
            assert net.map(abs, range(2000)) == list(range(2000))
            after = _settled(net)
            assert after["spent"] - before["spent"] == 2000 and after["held_for_jobs"] == 0
            # the session learned that abs's items take far less than the default second
            assert net.meter.item_times.expected("builtins.abs") < 1.0
            assert net.map(abs, range(2000)) == list(range(2000)), "the next map is held by what was learned"
            assert _settled(net)["spent"] - after["spent"] == 2000
            assert "paused" not in capfd.readouterr().err
        finally:
            net.close()
    finally:
        network_module._current = previous


def test_a_map_whose_items_run_longer_than_expected_is_paid_from_the_preauthorized_hold(own):
    """A map held at its expected price (4 items x 1 s x 1.5 = 6 credits) whose items take
    about 1.6 s each (2 credits): what they earn beyond its hold is paid from the
    session's pre-authorized hold, so every item is paid its price (8 in all), and the
    ledger verifies."""
    before = _settled(own)
    free = own.meter.preauth.free()
    # a reservation that leaves the pre-authorized hold too small for the map (it never
    # finishes here, so nothing waits for the scheduler to count it)
    assert own.meter.draw("filler", free - 3) is not None

    def slow(i):
        import time

        time.sleep(1.6)
        return i

    assert own.map(slow, range(4), timeout=120) == [0, 1, 2, 3]
    after = _settled(own)
    assert after["spent"] - before["spent"] == 8, "each item paid its price, 2 credits"
    plugin = own.embedded.cluster.scheduler.plugins[wire.METERING_PLUGIN]
    assert plugin.reporter.failed == [], "no part exceeded what was left of a hold"
    verify_service(own.embedded.credits_service.url, own.embedded.credits_service.operator_token)


def test_another_client_cannot_draw_on_a_sessions_preauthorized_hold(net, tmp_path):
    """A stranger who names this session's pre-authorized hold on her own tasks has them
    refused by the scheduler before they run: only the client that drew on it first may."""
    import dask
    from distributed import Client

    assert net.run(abs, -1) == 1  # this session draws on its pre-authorized hold
    hold, size = net.meter.preauth.hold, net.meter.preauth.amount
    marker = tmp_path / "ran"

    def touch():
        marker.touch()

    before = _settled(net)
    with Client(net.address, timeout=30) as stranger:
        with dask.annotate(**{wire.ANNOTATION: wire.annotation(hold, 60, preauth=size, job="stolen")}):
            future = stranger.submit(touch, pure=False)
        with pytest.raises(Exception, match="(?i)cancel"):
            future.result(timeout=30)
    assert not marker.exists()
    assert _settled(net)["spent"] == before["spent"]


def _slow_marked(folder):
    """A map item that takes about 1.3 s on a device (2 credits at 1 credit/s) and leaves a
    file behind, so that a test sees which items ran."""

    def slow(i):
        import pathlib
        import time

        time.sleep(1.3)
        (pathlib.Path(folder) / f"ran-{i}").touch()
        return i

    return slow


def test_a_map_whose_items_run_longer_than_expected_grows_its_hold(own, tmp_path):
    """Six items expected to take a second each (9 credits held) take 1.3 s, and those
    running may each be paid up to 10: the map's hold grows from the budget while it runs
    (no item waits for it), every item is paid in full, nothing stays held, the ledger verifies."""
    plugin = own.embedded.cluster.scheduler.plugins[wire.METERING_PLUGIN]
    before = _settled(own)
    grown = plugin.settlement.grown_holds
    assert own.map(_slow_marked(tmp_path), range(6), timeout=120) == list(range(6))
    after = _settled(own)
    assert plugin.settlement.grown_holds > grown, "the map placed a further hold"
    assert plugin.settlement.short == 0, "no item was paid less than it earned"
    assert plugin.reporter.failed == []
    assert after["spent"] - before["spent"] >= 12 and after["held_for_jobs"] == 0
    verify_service(own.embedded.credits_service.url, own.embedded.credits_service.operator_token)


@pytest.fixture
def tight():
    """A metered embedded network of its own with a budget of 30 credits."""
    yield from _network_of_its_own(budget=30)


def test_a_map_the_budget_cannot_cover_pauses_and_says_what_it_needs(tight, tmp_path, capfd):
    """Eight 1.3 s items on a budget of 30 credits, with up to 10 credits an item: the map
    cannot grow enough, so it pauses. Its items not started are never sent, those that ran
    are paid in full, the error says how much more it needs and what to do, no hold stays
    open, and the ledger verifies."""
    plugin = tight.embedded.cluster.scheduler.plugins[wire.METERING_PLUGIN]
    before = _settled(tight)
    with pytest.raises(gpunet.BudgetError) as caught:
        tight.map(_slow_marked(tmp_path), range(8), timeout=120)
    message = str(caught.value)
    assert "more credits" in message and "budget has" in message and "--budget" in message, message
    assert "paused" in capfd.readouterr().err
    ran = len(list(tmp_path.glob("ran-*")))
    assert 1 <= ran < 8, f"{ran} items ran"
    after = _settled(tight)
    assert plugin.settlement.short == 0, "the items that ran were paid in full"
    assert plugin.reporter.failed == []
    assert after["spent"] - before["spent"] >= 2 * ran and after["spent"] <= after["budget"]
    assert after["held_for_jobs"] == 0, "no hold left open"
    assert len(list(tmp_path.glob("ran-*"))) == ran, "no item not started ran later"
    verify_service(tight.embedded.credits_service.url, tight.embedded.credits_service.operator_token)
