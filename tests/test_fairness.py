"""Fair prices and fair verdicts (issue 13): a rate is an offer and the notebook sets
its limit; one client cannot ruin a provider; copies of a verified job go to distinct
hosts. The attacks run as real processes (gpunet.testing.local_market: a credit
service, a metered scheduler, one worker process per provider, each provider on a
loopback address of its own); the rules are also tested as pure functions."""

from __future__ import annotations

import pytest
from IPython.core.error import UsageError
from IPython.utils.capture import capture_output

import gpunet
from gpunet.client import placement
from gpunet.errors import OptionError, PlacementError
from gpunet.testing import local_market
from gpunet.ui.status import NetworkStatus
from network_probes import wait_reported, wait_until

# -- price limits: pure -------------------------------------------------------------------

WORKERS = {address: {"resources": {"device": 1}} for address in ("tcp://a:1", "tcp://b:1", "tcp://m:1")}
STATE = {"providers": {"tcp://a:1": {"provider": "alice", "rate": 1.0}, "tcp://b:1": {"provider": "bob", "rate": 2.0},
                       "tcp://m:1": {"provider": "mallory", "rate": 100.0}},
         "default_provider": None, "default_rate": 1.0}


def test_rates_come_from_the_scheduler_and_a_worker_without_a_provider_has_none():
    workers = {**WORKERS, "tcp://new:1": {"resources": {"device": 1}}}
    assert placement.worker_rates(workers, STATE) == {"tcp://a:1": 1.0, "tcp://b:1": 2.0, "tcp://m:1": 100.0}
    # where the network pays a default provider, its workers ask the default rate
    assert placement.worker_rates(workers, {**STATE, "default_provider": "local"})["tcp://new:1"] == 1.0


def test_only_workers_at_or_below_the_limit_are_eligible():
    rates = placement.worker_rates(WORKERS, STATE)
    assert placement.within_limit(WORKERS, rates, {"device": 1}, 1.0) == ["tcp://a:1"]
    assert placement.within_limit(WORKERS, rates, {"device": 1}, 2.0) == ["tcp://a:1", "tcp://b:1"]
    assert placement.within_limit(WORKERS, rates, {"device": 1, "GPU": 1}, 100.0) == []


def test_a_job_no_provider_within_the_limit_can_run_is_told_which_rates_exist_and_what_to_set():
    rates = placement.worker_rates(WORKERS, STATE)
    owners = {address: info["provider"] for address, info in STATE["providers"].items()}
    message = placement.over_limit_message(WORKERS, rates, {"device": 1}, 0.5, owners)
    assert "price limit of 0.5" in message
    assert "1 (alice); 2 (bob); 100 (mallory)" in message
    assert "--max-rate 1" in message and "%gpunet connect --max-rate 1" in message and "max_rate=1" in message


def test_the_cheapest_free_worker_goes_first_and_all_wait_when_none_is_free():
    rates = {"tcp://a:1": 1.0, "tcp://b:1": 2.0, "tcp://c:1": 1.0}
    eligible = sorted(rates)
    assert placement.preferred_workers(eligible, rates, set(eligible)) == ["tcp://a:1", "tcp://c:1"]
    assert placement.preferred_workers(eligible, rates, {"tcp://b:1", "tcp://c:1"}) == ["tcp://c:1"]
    assert placement.preferred_workers(eligible, rates, {"tcp://b:1"}) == ["tcp://b:1"]
    assert placement.preferred_workers(eligible, rates, set()) == eligible
    speeds = {"tcp://a:1": 0.1, "tcp://b:1": 5.0, "tcp://c:1": 0.2}
    assert placement.preferred_workers(eligible, rates, set(eligible), "fastest", speeds) == ["tcp://b:1"]


def test_free_workers_are_those_with_a_slot_free():
    workers = {"tcp://a:1": {"resources": {"device": 1}}, "tcp://b:1": {"resources": {"device": 2}}}
    assert placement.free_workers(workers, {"tcp://a:1": ["k"], "tcp://b:1": ["k"]}) == {"tcp://b:1"}


@pytest.mark.parametrize("bad", [0, -1, float("inf"), float("nan"), "2", True])
def test_a_bad_max_rate_is_refused_saying_what_it_must_be(bad):
    with pytest.raises(OptionError, match="--max-rate must be a positive number of credits per device-second"):
        placement.check_max_rate(bad)


def test_a_bad_preference_is_refused_naming_the_choices():
    with pytest.raises(OptionError, match="--prefer must be cheapest or fastest"):
        placement.check_prefer("quickest")


# -- price limits: a provider asking 100 credits a second ------------------------------------


def _where(_):  # travels by value
    import os

    return os.environ["GPUNET_WORKER"]  # the worker the provider's sandbox belongs to


@pytest.fixture(scope="module")
def priced_market(tmp_path_factory):
    """alice asks 1 credit a device-second, bob 2, mallory 100; the operator's default
    price limit for notebooks is 2."""
    with local_market({"alice": 0.0, "bob": 0.0, "mallory": 0.0}, rates={"alice": 1, "bob": 2, "mallory": 100},
                      default_max_rate=2, directory=tmp_path_factory.mktemp("priced")) as market:
        yield market


def test_one_expensive_provider_does_not_price_every_notebook_out(priced_market, detached):
    """The attack: mallory's --rate 100 made every default hold 6,000 credits, so a
    5,000-credit session could run nothing. Now holds follow the notebook's limit."""
    with priced_market.connect(budget=5000) as net:
        assert net.rate_limit == 2.0  # the operator's default (gpunet scheduler --default-max-rate)
        assert net.hold_rate() == 2.0 and net.hold_rate(1) == 1.0
        ran_on = {net.run(_where, 0) for _ in range(4)}
        # only providers within the limit, the cheapest first while it is free
        assert ran_on == set(priced_market.workers_of["alice"])
        usage = net.credits.usage(net.session)
        assert usage["spent"] <= 8 and usage["budget"] == 5000
        holds = [entry for entry in priced_market.operator.entries(0, 100_000)["entries"]
                 if entry["kind"] == "hold" and entry["session"] == net.session]
        # the cells drew on the session's pre-authorized hold (a fifth of its budget), each
        # reserving 60 s at the limit of 2, not at 100; the holds placed for a first verified
        # cell's two copies when the session connected are 60 s at the limit too
        assert holds and {entry["amount"] for entry in holds} == {1000, 120}
        assert net.meter.plan(count=1, max_credits=None, timeout=None, max_rate=net.hold_rate()).amount == 120
        # a map spreads over every provider within the limit, never mallory
        assert set(net.map(_where, range(6))) <= set(priced_market.workers_of["alice"] + priced_market.workers_of["bob"])


def test_a_cell_limit_below_every_offer_gets_one_clear_message(priced_market, detached):
    with priced_market.connect(budget=5000, max_rate=1) as net:
        assert net.run(_where, 0) in priced_market.workers_of["alice"]
        with pytest.raises(PlacementError) as refused:
            net.run(_where, 0, max_rate=0.5)
        message = str(refused.value)
        assert "price limit of 0.5" in message and "1 (alice); 2 (bob); 100 (mallory)" in message
        assert "--max-rate 1" in message and "Nothing was sent" in message
        with pytest.raises(PlacementError, match="price limit of 0.5"):
            net.run(_where, 0, max_rate=0.5, verify="replicate")
        # asking for mallory's price reaches her, and holds that much (a short cell)
        assert net.run(_where, 0, max_rate=100, timeout=5) in (priced_market.workers_of["alice"])
        usage = net.meter.usage()  # what jobs hold and spent, the pre-authorized hold aside
        assert usage["budget"] - usage["spent"] - usage["held_for_jobs"] > 4000


def test_status_shows_each_providers_rate_and_the_sessions_limit(priced_market, detached):
    with priced_market.connect(budget=5000) as net:
        status = NetworkStatus.of(net)
        text = str(status)
        rows = {row[2]: row[3] for row in status.rows()}
        assert rows == {"alice": "1/s", "bob": "2/s", "mallory": "100/s"}
        assert "holding 120 credits at your price limit, 2 a device-second" in text
        assert ">rate<" in status._repr_html_()


def test_the_magics_take_max_rate_and_prefer(priced_market, shell, detached):
    market = priced_market
    with capture_output() as captured:
        shell.run_line_magic("gpunet", f"connect {market.scheduler} --credits {market.credits_url} "
                                       f"--token {market.client_token} --budget 5000 --max-rate 1")
    try:
        assert "pays at most 1 credits per device-second" in captured.stdout
        assert gpunet.current().rate_limit == 1.0
        with capture_output():
            shell.run_cell_magic("gpunet", "--quiet --prefer fastest --max-rate 2", "import os\n"
                                                                                    "w = os.environ['GPUNET_WORKER']")
        assert shell.user_ns["w"] in market.workers_of["alice"] + market.workers_of["bob"]
        with pytest.raises(UsageError, match="--prefer must be cheapest or fastest"):
            shell.run_cell_magic("gpunet", "--prefer quickest", "x = 1")
        with pytest.raises(UsageError, match="--max-rate must be a positive number"):
            shell.run_cell_magic("gpunet", "--max-rate 0", "x = 1")
        with pytest.raises(UsageError, match="--max-rate must be a positive number"):
            shell.run_line_magic("gpunet", f"connect {market.scheduler} --credits {market.credits_url} "
                                           f"--token {market.client_token} --max-rate -3")
    finally:
        gpunet.current().close(force=True)


# -- verdicts: one client cannot ruin a provider: pure ----------------------------------------

from gpunet.credits._trust import counts_today, quarantine_reason  # noqa: E402
from gpunet.metering.settlement import blamed, overruled  # noqa: E402


def test_a_mismatch_counts_only_against_two_other_agreeing_providers():
    assert blamed("carol", ["alice", "bob"])
    assert not blamed("carol", ["alice"])  # one client and one accomplice frame nobody
    assert not blamed("carol", ["alice", "carol"])
    assert not blamed("carol", [])


def test_copies_whose_digests_equal_an_agreeing_copys_agree_whatever_the_notebook_says():
    copies = {"a": True, "b": True, "c": False, "d": False}
    digests = {"a": "sha256:1", "b": "sha256:1", "c": "sha256:1", "d": "sha256:2"}
    assert overruled(copies, digests) == {"a": True, "b": True, "c": True, "d": False}
    assert overruled(copies, {}) == copies  # nothing fetched: the notebook's verdict stands
    assert overruled({"a": False, "b": False}, {"a": "x", "b": "x"}) == {"a": False, "b": False}


def test_one_client_counts_fewer_mismatches_a_day_than_a_quarantine_takes():
    assert counts_today(0) and counts_today(1) and not counts_today(2)
    assert counts_today(10_000, -1)
    assert not quarantine_reason(0, 2)  # two mismatches on a clean record: reputation 0.5, not below
    assert quarantine_reason(0, 3)


# -- verdicts: false verdicts from one client, as real processes --------------------------------


def _frames(target):  # travels by value: a different answer on one provider's worker only
    import os

    return int(os.environ["GPUNET_WORKER"] == target)  # the worker the provider's sandbox belongs to


def _honest(i):
    return i * i


@pytest.fixture(scope="module")
def judged_market(tmp_path_factory):
    """Three honest providers, each on a host (loopback address) of its own."""
    with local_market({"alice": 0.0, "bob": 0.0, "carol": 0.0},
                      directory=tmp_path_factory.mktemp("judged")) as market:
        yield market


def _copies_on_every_provider(net, market, job_id, fn, argument):
    """Copies of one verified unit of ``fn(argument)``, one on each provider, sent as a
    notebook's verified job sends them (a hold each, annotated with the job, running
    gpunet's job runner), finished; returns provider -> future."""
    import dask

    from gpunet import wire
    from gpunet.client.submit import function_job
    from gpunet.worker.runner import run_job

    job = function_job(fn, (argument,), {}, topic=None, announce=False)
    job.result_format, job.result_event = net.result_format, False
    job.max_result_bytes, job.max_stream_bytes_per_s = net.max_result_bytes, net.max_stream_bytes_per_s
    holds = net.meter.hold(job_id, count=3, amount=10)
    futures = {}
    for provider, hold in zip(("alice", "bob", "carol"), holds):
        with dask.annotate(**{wire.ANNOTATION: wire.annotation(hold, 10, verify=job_id)}):
            futures[provider] = net.client.submit(run_job, job, None, None, None, key=f"gpunet-{job_id}-{provider}",
                                                  pure=False, workers=market.workers_of[provider],
                                                  allow_other_workers=False)
    # bounded: a lost copy fails the test, never hangs it (distributed.wait needs a default client)
    wait_until(lambda: all(future.done() for future in futures.values()), 120, "the copies to finish")
    net.client.gather(list(futures.values()))
    return futures


def _verdict(net, job_id, futures, carol_agrees):
    """The notebook's verdict on the copies: alice's and bob's agree, carol's as said."""
    from gpunet import wire

    net.call_scheduler(wire.VERDICT, client=net.client.id, job=job_id, method="replicate:3", digest="sha256:0",
                       checked=True, copies={futures["alice"].key: True, futures["bob"].key: True,
                                             futures["carol"].key: carol_agrees})


def test_false_verdicts_from_one_client_never_quarantine_an_honest_provider(judged_market, detached):
    """The attack: verdicts calling carol's (right) copies mismatches quarantined her
    (reputation 0.40) for 3 credits. The scheduler now fetches the copies and compares
    their digests itself: hers equal the others', so they agree, and she is paid."""
    market = judged_market
    with market.connect() as net:
        before = market.operator.provider_record("carol")
        for number in range(4):
            job_id = f"frame-carol-{number}"
            _verdict(net, job_id, _copies_on_every_provider(net, market, job_id, _honest, number), False)
        state = wait_reported(net)
        assert state["overruled"] >= 4
        record = market.operator.provider_record("carol")
        assert not record["quarantined"] and record["mismatches"] == before["mismatches"]
        assert record["valid"] == before["valid"] + 4
        paid = [entry for entry in market.operator.entries(0, 100_000)["entries"]
                if entry["kind"] == "settle" and entry["to"] == "carol" and entry["session"] == net.session]
        assert len(paid) == 4


def test_code_that_answers_differently_on_one_provider_costs_it_at_most_the_daily_cap(judged_market, detached):
    """Where the copies really differ (the client's code answers differently on carol's
    worker), two other providers agree against her and the mismatch is hers; but one
    client account counts at most two a day against her: never enough to quarantine a
    clean record, however many such verdicts it sends."""
    market = judged_market
    [carol] = market.workers_of["carol"]
    with market.connect() as net:
        before = market.operator.provider_record("carol")["mismatches"]
        overruled_before = net.metering_state()["overruled"]
        for number in range(4):
            job_id = f"differ-on-carol-{number}"
            _verdict(net, job_id, _copies_on_every_provider(net, market, job_id, _frames, carol), False)
        state = wait_reported(net)
        assert state["overruled"] == overruled_before  # their digests differ: the notebook is right
        record = market.operator.provider_record("carol")
        assert record["mismatches"] == before + 2 and not record["quarantined"], record
        # the copies that differed were not paid
        unpaid = [entry for entry in market.operator.entries(0, 100_000)["entries"]
                  if entry["kind"] == "settle" and entry["to"] == "carol" and entry["session"] == net.session]
        assert unpaid == []


# -- distinct hosts, as real processes -------------------------------------------------------------


def _square(i):
    return i * i


@pytest.fixture(scope="module")
def one_host_market(tmp_path_factory):
    """alice and bob, honest, each on a host of their own; mallory and mal2, one person's two
    accounts on one host (127.0.0.9), both returning the same wrong answer every time."""
    with local_market({"alice": 0.0, "bob": 0.0, "mallory": 1.0, "mal2": 1.0},
                      hosts={"mallory": "127.0.0.9", "mal2": "127.0.0.9"}, mismatches_per_client_day=-1,
                      reputation_floor=0, directory=tmp_path_factory.mktemp("onehost")) as market:
        yield market


def test_two_accounts_on_one_host_never_verify_each_other(one_host_market, detached):
    """The attack: mallory and mal2 on one host returned the same wrong answer, and
    --verify replicate accepted it and paid both. Their copies now never meet."""
    market = one_host_market
    with market.connect() as net:
        assert net.map(_square, range(30), verify="replicate") == [i * i for i in range(30)]
        wait_reported(net)
    settled = [entry for entry in market.operator.entries(0, 100_000)["entries"] if entry["kind"] == "settle"]
    assert settled
    for entry in settled:
        assert set(entry["memo"]["providers"]) != {"mallory", "mal2"}, entry
    assert not [entry for entry in settled if entry["to"] in ("mallory", "mal2")]


@pytest.fixture
def one_host_only(tmp_path):
    """alice and bob, both on one host."""
    with local_market({"alice": 0.0, "bob": 0.0}, hosts={"alice": "127.0.0.5", "bob": "127.0.0.5"},
                      directory=tmp_path) as market:
        yield market


def test_a_verified_job_on_one_host_says_it_cannot_get_distinct_hosts(one_host_only, detached):
    from gpunet.errors import VerificationError

    with one_host_only.connect() as net:
        with pytest.raises(VerificationError) as refused:
            net.run(_square, 3, verify="replicate")
        message = str(refused.value)
        assert "2 distinct hosts" in message and "alice (127.0.0.5), bob (127.0.0.5)" in message
        assert "Nothing was sent" in message
        assert net.meter.usage()["held_for_jobs"] == 0
        assert net.run(_square, 3) == 9


@pytest.mark.parametrize(("flags", "error"), [
    (["--default-max-rate", "2"], "are prices: they need a metered network"),
    (["--max-rate", "0"], "--max-rate must be a positive number of credits per device-second"),
    (["--default-max-rate", "-1", "--credits", "http://127.0.0.1:9"], "--default-max-rate must be a positive number"),
])
def test_a_schedulers_price_flags_are_checked_before_anything_starts(flags, error):
    from gpunet.cli import build_parser
    from gpunet.cli.network import _metering_preload

    args = build_parser().parse_args(["scheduler", "--private", *flags])
    with pytest.raises(OptionError, match=error):
        _metering_preload(args, open_network=False)
