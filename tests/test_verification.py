"""Verified results end to end: a credit service, a metered scheduler and three
providers' worker processes on 127.0.0.1, one of which lies (gpunet.testing)."""

from __future__ import annotations

import math
import os
import signal
import threading
import time

import pytest

from gpunet import errors as gpunet_errors
from gpunet import provenance
from gpunet import wire
from gpunet.client import submit as jobs
from gpunet.credits import verify_service
from gpunet.ui.status import NetworkStatus
from gpunet.testing import local_market
from gpunet.errors import BudgetError, VerificationError
from gpunet.verify.quorum import Policy, result_digest, tolerance_for
from network_probes import running_jobs, wait_reported, wait_until


def _square_and_root(i):  # travels by value: the workers cannot import this test module
    return (i * i, math.sqrt(i) + 0.5)


def _settled(market, provider=None, session=None):
    entries = market.operator.entries(0, 100_000)["entries"]
    return [e for e in entries if e["kind"] == "settle" and (provider is None or e["to"] == provider)
            and (session is None or e["session"] == session)]


# -- without a network ---------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("none", "none"), ("replicate", "replicate:2"), ("replicate:3", "replicate:3"), ("spot", "spot:0.1"),
    ("spot:0.25", "spot:0.25"), ("adaptive", "adaptive"), (None, "none"),
])
def test_policy_parses(text, expected):
    assert str(Policy.parse(text)) == expected


@pytest.mark.parametrize("text", ["replicate:1", "replicate:x", "spot:0", "spot:1.5", "majority", "adaptive:3"])
def test_bad_policy_is_refused_with_the_forms_it_takes(text):
    with pytest.raises(VerificationError, match=r"none, replicate\[:K\] \(K >= 2\), spot\[:P\]"):
        Policy.parse(text)


def test_tolerance_comes_from_the_kernel_a_cell_uses_or_the_flags():
    from gpunet.kernels import montecarlo, nbody

    assert tolerance_for("from gpunet.kernels import montecarlo\nx = montecarlo.price(1)") == montecarlo.tolerance
    both = tolerance_for("import gpunet.kernels.nbody\nimport gpunet.kernels.montecarlo")
    assert both.rtol == max(nbody.tolerance.rtol, montecarlo.tolerance.rtol)
    assert tolerance_for("x = 1").rtol == 1e-5
    assert tolerance_for("x = 1", rtol=0.1, atol=0).rtol == 0.1
    with pytest.raises(VerificationError, match="--rtol must be a number >= 0"):
        tolerance_for("x = 1", rtol=-1)


# -- the shared embedded network has one provider ------------------------------------------


def test_verification_with_one_provider_is_refused_before_anything_is_sent(net):
    before = net.credits.usage(net.session)
    with pytest.raises(VerificationError, match=r"needs 2 distinct providers .* has 1: local-provider \(2 workers\)"):
        net.run(_square_and_root, 3, verify="replicate")
    with pytest.raises(VerificationError, match=r"--verify spot:0.5 needs 2 distinct providers"):
        net.map(_square_and_root, range(3), verify="spot:0.5")
    after = net.credits.usage(net.session)
    assert (after["held"], after["spent"]) == (before["held"], before["spent"])


def test_magic_refuses_a_bad_policy_and_tolerances_without_verify(ip):
    from IPython.core.error import UsageError

    with pytest.raises(UsageError, match="--verify must be"):
        ip.run_cell_magic("gpunet", "--verify replicate:1", "x = 1")
    with pytest.raises(UsageError, match="give --verify too"):
        ip.run_cell_magic("gpunet", "--rtol 1e-3", "x = 1")
    with pytest.raises(VerificationError, match=r"needs 2 distinct providers"):
        ip.run_cell_magic("gpunet", "--verify replicate", "x = 1")


# -- a market with a liar -------------------------------------------------------------------


@pytest.fixture
def liar_market(tmp_path):
    """alice and bob are honest; mallory falsifies 30% of her results. One client is to
    quarantine her here, so the credit service counts every mismatch of that client
    (by default one client account counts at most 2 a day: tests/test_fairness.py)."""
    with local_market({"alice": 0.0, "bob": 0.0, "mallory": 0.3}, directory=tmp_path, seed=1,
                      mismatches_per_client_day=-1) as market:
        yield market


def test_replicate_detects_every_lie_pays_none_and_quarantines_the_liar(liar_market, detached):
    market = liar_market
    expected = [_square_and_root(i) for i in range(40)]
    with market.connect() as net:
        rounds = 0
        while True:
            rounds += 1
            assert net.map(_square_and_root, range(40), verify="replicate") == expected
            record = market.operator.provider_record("mallory")
            if record["quarantined"] or rounds == 6:
                break
        assert record["quarantined"], f"mallory was not quarantined after {rounds} rounds: {record}"
        wait_reported(net)
        log = market.lies("mallory")
        lies = [line for line in log if line["lied"]]
        assert lies, "the liar never lied: the test proves nothing"
        # Paid only for honest copies: every lie was released, unpaid. (Honest copies
        # that finished once she was quarantined are not paid either.)
        paid_tasks = {entry["memo"]["task"] for entry in _settled(market, "mallory")}
        honest = {line["key"] for line in log if not line["lied"]}
        assert paid_tasks and paid_tasks <= honest
        # Her record counts the lies judged before she was quarantined.
        assert 0 < record["mismatches"] <= len(lies)
        for entry in _settled(market):
            memo = entry["memo"]
            assert memo["verified"] == "replicate:2" and len(memo["providers"]) == 2
            assert entry["to"] in memo["providers"] and memo["digest"].startswith("sha256:")

        # Quarantined: she gets no more work, and the results stay right.
        seen = len(market.lies("mallory"))
        assert net.map(_square_and_root, range(10), verify="replicate") == expected[:10]
        assert len(market.lies("mallory")) == seen
        assert "mallory" in net.metering_state()["quarantined"]
        assert "mallory QUARANTINED" in str(NetworkStatus.of(net))
    verify_service(market.credits_url, market.operator.token)  # raises on any bad entry


def test_spot_checks_catch_lies_at_their_rate(tmp_path, detached):
    # Nobody is quarantined here: a liar sent away after its first few detected lies
    # would end the sample right after those detections and bias the rate.
    with local_market({"alice": 0.0, "bob": 0.0, "mallory": 0.5}, directory=tmp_path, seed=2,
                      reputation_floor=0) as market, market.connect() as net:
        results = net.map(_square_and_root, range(500), verify="spot:0.2")
        wait_reported(net)
        first_copy_lies = [line for line in market.lies("mallory") if line["lied"] and line["key"].endswith("-0")]
        wrong = sum(result != _square_and_root(i) for i, result in enumerate(results))
        caught = len(first_copy_lies) - wrong
        rate = caught / len(first_copy_lies)
        sigma = math.sqrt(0.2 * 0.8 / len(first_copy_lies))
        print(f"spot:0.2 over 500 tasks: caught {caught} of {len(first_copy_lies)} lies on first copies, "
              f"detection rate {rate:.3f} (expected 0.2 +- {sigma:.3f})")
        assert len(first_copy_lies) >= 20
        assert abs(rate - 0.2) <= 3 * sigma + 1 / len(first_copy_lies)
        verify_service(market.credits_url, market.operator.token)  # raises on any bad entry


def _sum_in_provider_order(values):
    """Sum in an order that depends on the provider (as a different GPU or library
    would): the float results differ in their last bits, not in substance."""
    import os

    name = os.environ["GPUNET_WORKER_NAME"]  # the worker the provider's sandbox belongs to
    order = {"alice": values, "bob": values[::-1]}.get(name.split("-")[0], sorted(values, key=lambda v: v % 0.37))
    total = 0.0
    for value in order:
        total += value
    return total


def test_floats_within_tolerance_agree_and_the_ledger_records_how(tmp_path, detached):
    values = [0.1 * i + 1e-3 / (i + 1) for i in range(1, 2000)]
    with local_market({"alice": 0.0, "bob": 0.0, "carol": 0.0}, directory=tmp_path) as market, \
            market.connect() as net:
        total = net.run(_sum_in_provider_order, values, verify="replicate:3")
        assert total == pytest.approx(sum(values), rel=1e-12)

        # Exact comparison: the three summation orders disagree, so no quorum exists.
        wait_reported(net)
        first = _settled(market)
        before = net.credits.usage(net.session)["spent"]
        with pytest.raises(VerificationError) as caught:
            net.run(_sum_in_provider_order, values, verify="replicate", rtol=0, atol=0)
        message = str(caught.value)
        assert "no 2 of 3 copies on distinct providers agree" in message and "nobody was paid" in message
        for provider in ("alice", "bob", "carol"):
            assert provider in message
        state = wait_reported(net)
        assert net.credits.usage(net.session)["spent"] == before  # nobody paid for the disagreement
        assert not state["quarantined"]  # without a majority nobody is blamed
        # The first run: two or three agreeing copies paid (a third still running when
        # two agreed was cancelled), each entry naming how and by whom it was verified.
        assert _settled(market) == first and len(first) in (2, 3)
        for entry in first:
            assert entry["memo"]["verified"] == "replicate:3" and entry["to"] in entry["memo"]["providers"]
            assert len(entry["memo"]["providers"]) == len(first)
        verify_service(market.credits_url, market.operator.token)  # raises on any bad entry


@pytest.fixture(scope="module")
def honest_market(tmp_path_factory):
    """Two honest providers, shared by the tests below (each in its own session)."""
    with local_market({"alice": 0.0, "bob": 0.0}, directory=tmp_path_factory.mktemp("honest")) as market:
        yield market


def test_verified_cell_in_the_notebook(honest_market, shell, detached):
    market = honest_market
    with market.connect() as net:
        from IPython.utils.capture import capture_output

        shell.user_ns["n"] = 12
        with capture_output() as captured:
            shell.run_cell_magic("gpunet", "--verify replicate --quiet",
                                 "import time\nprint('hello from', n, flush=True)\ntime.sleep(0.5)\n"
                                 "print('bye')\nsquares = [i * i for i in range(n)]")
        assert shell.user_ns["squares"] == [i * i for i in range(12)]
        # One copy's output, shown once (live from the first copy to speak).
        lines = captured.stdout.splitlines()
        assert lines.count("hello from 12") == 1 and lines.count("bye") == 1, captured.stdout
        wait_reported(net)
        settled = _settled(market, session=net.session)
        assert sorted(e["to"] for e in settled) == ["alice", "bob"]
        assert settled[0]["memo"]["digest"] == settled[1]["memo"]["digest"]
        # its provenance record, in the cell's outputs, names the verdict and the holds that paid
        (record,) = [output.data[provenance.MIME_TYPE] for output in captured.outputs
                     if provenance.MIME_TYPE in output.data]
        assert record is shell.user_ns["_gpunet"].provenance
        assert record["verification"]["verdict"] == "verified" and record["verification"]["providers"] == ["alice", "bob"]
        assert sorted(record["payment"]["holds"]) == sorted(e["hold"] for e in settled)
        assert sorted(entry["provider"] for entry in record["ran"]) == ["alice", "bob"]


def test_a_verdict_from_another_client_changes_nothing(honest_market, detached):
    """Only the notebook that wants a copy may judge it; the scheduler refuses others."""
    from distributed import Client

    from gpunet.errors import NotYoursError

    market = honest_market
    with market.connect() as net:
        job = jobs.function_job(_square_and_root, (4,), {}, topic=None)
        remote = net.submit(job, resources=net.resources_for(), verify="replicate")
        wait_until(lambda: all(copy.future.status == "finished" for unit in remote.units for copy in unit.copies),
                    60, "both copies to finish")
        keys = [copy.key for unit in remote.units for copy in unit.copies]
        verdicts = net.metering_state()["verdicts"]
        with Client(market.scheduler) as other:
            # Through the handler a notebook's own verdict takes (VerifiedJob._verdict), as
            # itself. The call returns once the scheduler has refused it.
            with pytest.raises(NotYoursError, match="belongs to another notebook session"):
                other.sync(getattr(other.scheduler, wire.VERDICT), client=other.id, job=job.job_id,
                           copies=dict.fromkeys(keys, False), method="replicate:2", digest="", checked=True)
        state = net.metering_state()
        assert state["verdicts"] == verdicts and state["refused_calls"] == 1
        assert state["awaiting_verdict"] == 2
        assert remote.wait()[0] and result_digest(remote.units[0].accepted.result)
        wait_reported(net)
        assert len(_settled(market, session=net.session)) == 2


def _sized_copy(i):  # travels by value: the workers cannot import this test module
    return bytes(300_000) + i.to_bytes(4, "big")


def test_a_verified_map_whose_copies_pass_the_result_cap_together_comes_back(honest_market, detached, caplog):
    """On a network whose providers the notebook does not trust, each message is refused over
    the job's max_result_bytes (400 KB here) and a slack of 1 MiB. A verified map's 16 copies
    (300 KB each, 4.8 MB together), all finished before the notebook first looks, are fetched a
    cap's worth at a time, as a plain map's results are: each within the cap, so none is lost
    or fetched again one by one, and both agreeing copies of each item are paid after the verdict."""
    market = honest_market
    items = range(8)
    with market.connect(max_result_bytes=400_000) as net:
        assert net.result_format == wire.CODEC
        job = jobs.function_job(_sized_copy, (), {}, topic=None, announce=False)
        remote = net.submit(job, resources=net.resources_for(), items=list(items), verify="replicate")
        wait_until(lambda: all(copy.future.status == "finished" for unit in remote.units for copy in unit.copies),
                   60, "every copy to finish")
        with caplog.at_level("WARNING", logger="gpunet.client.verified"):
            results = remote.wait(60)
        assert [jobs.function_value(result) for result in results] == [_sized_copy(i) for i in items]
        assert not [r for r in caplog.records if "one by one" in r.getMessage()], "no fetch passed the cap"
        assert all(copy.failed is None for unit in remote.units for copy in unit.copies), "no copy was lost"
        wait_reported(net)
        assert len(_settled(market, session=net.session)) == 2 * len(items)


def _sleeps(seconds):
    import time

    for _ in range(int(seconds * 10)):  # short sleeps: a stop lands between them
        time.sleep(0.1)
    return seconds


def test_timeout_and_cancel_stop_every_copy_and_pay_nobody(honest_market, shell, detached):
    from gpunet.errors import CellTimeoutError

    with honest_market.connect() as net:
        started = time.monotonic()
        with pytest.raises(CellTimeoutError, match="timeout of 1 s"):
            net.run(_sleeps, 30, verify="replicate", timeout=1)
        assert time.monotonic() - started < 10  # stopped at its timeout, not after its 30 s
        wait_until(lambda: not any(running_jobs(net).values()), 30, "every copy to be stopped on its worker")

        shell.run_cell_magic("gpunet", "--verify replicate --no-block --quiet", "import time\nfor _ in range(300):\n    time.sleep(0.1)\nx = 1")
        handle = shell.user_ns["_gpunet"]
        try:
            # Cancel once both copies run, each on its provider's worker.
            wait_until(lambda: sum(bool(keys) for keys in running_jobs(net).values()) == 2, 30,
                        "both copies to run")
            handle.cancel()
            with pytest.raises(gpunet_errors.GpunetError, match="cancelled before it was verified"):
                handle.result(timeout=20)
            wait_until(lambda: not any(running_jobs(net).values()), 30, "every copy to be stopped on its worker")
        finally:
            if not handle.done():
                handle.cancel()
        usage = net.meter.usage()
        deadline = time.monotonic() + 30
        while usage["held_for_jobs"] and time.monotonic() < deadline:
            time.sleep(0.1)
            usage = net.meter.usage()
        assert usage["held_for_jobs"] == 0 and usage["spent"] == 0
        # The workers are free again: a verified call runs at once.
        assert net.run(_square_and_root, 3, verify="replicate", timeout=20) == _square_and_root(3)


def test_max_credits_caps_every_copy_a_unit_may_need(honest_market, detached):
    from gpunet.errors import BudgetError

    with honest_market.connect() as net:
        with pytest.raises(BudgetError, match=r"up to 4 copies .* give at least --max-credits 4\. Nothing was sent"):
            net.run(_square_and_root, 3, verify="replicate", max_credits=3)
        assert net.run(_square_and_root, 3, verify="replicate", max_credits=40) == _square_and_root(3)
        wait_reported(net)
        assert net.credits.usage(net.session)["spent"] <= 40


def test_a_verified_result_is_reused_by_content_in_another_session(honest_market, shell, detached):
    from IPython.utils.capture import capture_output

    code = "total = sum(i * i for i in range(n))"
    shell.user_ns["n"] = 1234
    with honest_market.connect():
        shell.run_cell_magic("gpunet", "--verify replicate --quiet", code)
        made = shell.user_ns["_gpunet"].provenance
        assert made["verification"]["verdict"] == "verified"
    with honest_market.connect() as second:
        del shell.user_ns["total"]
        with capture_output() as captured:
            shell.run_cell_magic("gpunet", "--verify replicate --quiet", code)
        assert shell.user_ns["total"] == sum(i * i for i in range(1234))
        assert f"reused verified result of job {made['job']} (verified by replicate:2), at no cost; --no-reuse to " \
               "run again" in captured.stdout
        record = shell.user_ns["_gpunet"].provenance
        assert record["verification"]["reused_from"]["job"] == made["job"]
        assert record["outputs"]["total"]["digest"] == made["outputs"]["total"]["digest"]
        assert record["payment"]["holds"] == [], record["payment"]
        assert record["ran"] == made["ran"], (record["ran"], made["ran"])
        usage = second.meter.usage()
        assert (usage["spent"], usage["held_for_jobs"]) == (0, 0)
        # --no-reuse runs it again
        shell.run_cell_magic("gpunet", "--verify replicate --quiet --no-reuse", code)
        again = shell.user_ns["_gpunet"].provenance
        assert "reused_from" not in again["verification"] and len(again["payment"]["holds"]) == 2
        # a result nobody checked (a spot check that did not happen) is not kept for reuse
        shell.user_ns["n"] = 99
        for _ in range(2):
            shell.run_cell_magic("gpunet", "--verify spot:1e-9 --quiet", code)
            unchecked = shell.user_ns["_gpunet"].provenance
            assert unchecked["verification"]["verdict"] == "accepted unchecked"
            assert "reused_from" not in unchecked["verification"]


def test_the_first_verified_job_of_a_session_sends_with_the_credit_service_stopped(honest_market, detached):
    """A fresh session places its first verified job's copy holds (and reads the providers'
    trust records) when it connects: that job runs while the credit service answers nothing
    (SIGSTOP), so no request to it is on the job's way (one would wait there, then fail).
    Once it answers again, each copy is settled on a hold placed at connect, with the
    verdict's memo; the session spent what the settlements say, and once it closes none of
    its holds is open and the ledger verifies."""
    market = honest_market
    service = market.credits_service
    with market.connect() as net:
        ready = set(net.meter.copy_holds.held())
        assert len(ready) == 2, "the first verified job's two copy holds are placed when the session connects"
        os.kill(service.pid, signal.SIGSTOP)
        try:
            assert net.run(_square_and_root, 5, verify="replicate") == _square_and_root(5)
        finally:
            os.kill(service.pid, signal.SIGCONT)
        wait_reported(net)
        settled = _settled(market, session=net.session)
        assert {entry["hold"] for entry in settled} == ready, settled
        assert all(entry["memo"]["verified"] == "replicate:2" for entry in settled), settled
        assert sorted(entry["to"] for entry in settled) == ["alice", "bob"]
        assert net.meter.wait_settled()
        usage = net.meter.usage()
        assert usage["spent"] == sum(entry["amount"] for entry in settled) and usage["held_for_jobs"] == 0
        session = net.session
    wait_until(lambda: not [h for h in market.operator.holds() if h.get("session") == session], 30,
               "every hold of the session released once it closed")
    usage = market.operator.usage(session)
    assert (usage["held"], usage["spent"]) == (0, sum(entry["amount"] for entry in settled))
    verify_service(market.credits_url, market.credits_service.operator_token)


def test_a_verified_job_gets_the_room_of_holds_placed_ahead_that_no_job_uses(honest_market, detached):
    """A session's budget keeps its meaning with holds placed ahead: a verified map that
    needs the room of the pre-authorized hold and the copy holds nobody uses gets it (they
    are released first), and one that the budget cannot cover is refused before anything
    is sent, holding nothing."""
    market = honest_market
    with market.connect(budget=300) as net:
        assert net.meter.preauthorized == 60 + 2 * 60  # a fifth of the budget, and two copy holds of 60
        with pytest.raises(BudgetError, match="nothing was sent"):
            net.map(_square_and_root, range(6), verify="replicate", timeout=30)  # 12 copies x 30 > 300
        assert net.map(_square_and_root, range(4), verify="replicate", timeout=30) == [
            _square_and_root(i) for i in range(4)]  # 8 copies x 30 = 240: more than the 120 left beside them
        wait_reported(net)
        assert net.meter.wait_settled()
        assert net.credits.usage(net.session)["spent"] <= 240
        session = net.session
    wait_until(lambda: not [h for h in market.operator.holds() if h.get("session") == session], 30,
               "every hold of the session released once it closed")


def test_verified_jobs_draw_on_copy_holds_placed_ahead_and_pay_only_agreeing_copies(honest_market, detached):
    """A session's second verified call finds its copies' holds placed ahead (in the
    background, after the first): it sends no request to the credit service on its way.
    Each copy is still settled on its own hold once the verdict says it agreed, and the
    holds left ready are released when the session closes."""
    market = honest_market
    with market.connect() as net:
        assert net.run(_square_and_root, 3, verify="replicate") == _square_and_root(3)
        wait_until(lambda: len(net.meter.copy_holds.held()) >= 2, 30, "two copy holds placed ahead")
        ready = set(net.meter.copy_holds.held())
        asked = []
        for name in ("hold", "batch", "provider_records"):
            real = getattr(net.meter.credits, name)

            def counted(*args, _real=real, _name=name, **kwargs):
                if threading.current_thread() is threading.main_thread():  # on the job's path, not the refill's
                    asked.append(_name)
                return _real(*args, **kwargs)

            setattr(net.meter.credits, name, counted)
        assert net.run(_square_and_root, 4, verify="replicate") == _square_and_root(4)
        assert asked == [], f"requests to the credit service on the verified job's path: {asked}"
        wait_reported(net)
        used = {e["hold"] for e in _settled(market, session=net.session)} & ready
        assert len(used) == 2, "both copies were settled on holds placed ahead"
        assert net.meter.usage()["preauthorized"] >= 0
        session = net.session
    wait_until(lambda: not [h for h in market.operator.holds() if h.get("session") == session], 30,
               "the holds left ready released once the session closed")
