"""The notebook's side of a pre-authorized session hold, with no servers: what is free
of it as jobs draw on it, finish, and the scheduler says what it paid
(:class:`gpunet.metering.meter.Meter`'s draw / job_done / look_at_paid / refill)."""

from __future__ import annotations

import pytest

from gpunet.metering import meter as meter_module
from gpunet.metering import copy_holds as copy_holds_module
from gpunet.metering import growth as growth_module
from gpunet.metering.copy_holds import CopyHolds
from gpunet.metering.growth import EXPECTED_ITEM_SECONDS, ItemTimes, function_key, more_to_hold
from gpunet.metering.meter import Meter, Preauthorized, expected_hold, hold_price


def _meter(amount: int = 100) -> Meter:
    meter = Meter(credits=None, session="s_test")  # type: ignore[arg-type] - these steps send nothing
    meter.preauth = Preauthorized("P", amount)
    return meter


def _answer(paid: int, jobs: dict[str, tuple[int, int]]):
    """A scheduler that says ``paid`` from hold P in all, and (paid, done) per job."""
    asked = []

    def ask(holds, wanted):
        asked.append((list(holds), list(wanted)))
        return {"P": {"paid": paid, "short": 0,
                      "jobs": {job: {"paid": p, "done": d} for job, (p, d) in jobs.items() if job in wanted}}}

    ask.asked = asked
    return ask


def test_a_draw_reserves_locally_and_a_job_that_does_not_fit_gets_none():
    meter = _meter(100)
    assert meter.draw("j1", 60) == ("P", 100)
    assert meter.preauth.free() == 40
    assert meter.draw("j2", 41) is None, "more than is free: the job places its own hold"
    assert meter.draw("j2", 40) == ("P", 100)
    assert meter.preauth.free() == 0


def test_a_finished_job_counts_whole_until_the_scheduler_counted_all_its_tasks():
    meter = _meter(100)
    meter.draw("j1", 60, tasks=2)
    meter.job_done("j1")
    meter.look_at_paid(_answer(1, {"j1": (1, 1)}))  # one of its two tasks counted there so far
    assert meter.preauth.free() == 100 - 1 - (60 - 1), "still reserved, less what it was paid"
    meter.look_at_paid(_answer(2, {"j1": (2, 2)}))
    assert meter.preauth.free() == 98 and not meter.preauth.busy


def test_a_job_paid_beyond_its_reservation_grows_into_what_is_free():
    """A map drawn for its expected price whose items ran longer: what it was paid counts."""
    meter = _meter(100)
    meter.draw("map", 30, tasks=10)
    meter.look_at_paid(_answer(45, {"map": (45, 8)}))
    assert meter.preauth.free() == 55
    assert meter.draw("cell", 56) is None


def test_a_finished_job_never_counted_there_stops_counting_after_a_while(monkeypatch):
    meter = _meter(100)
    meter.draw("j1", 60)
    meter.job_done("j1")
    monkeypatch.setattr(meter_module, "COUNT_GIVE_UP_S", -1.0)
    meter.look_at_paid(lambda holds, jobs: {})
    assert meter.preauth.free() == 100


def test_refill_places_a_fresh_hold_when_low_and_releases_the_old_one_once_done(monkeypatch):
    meter = _meter(100)
    placed = []

    def preauthorize():
        placed.append(True)
        meter.retiring.append(meter.preauth)
        meter.preauth = Preauthorized("Q", 100)

    monkeypatch.setattr(meter, "preauthorize", preauthorize)
    released = []
    meter.draw("j1", 60)
    meter.refill(released.extend, _answer(0, {}))
    assert placed and meter.preauth.hold == "Q" and released == [], "P still has a job drawing on it"
    meter.job_done("j1")
    meter.refill(released.extend, _answer(1, {"j1": (1, 1)}))
    assert released == ["P"] and meter.retiring == []


def test_an_idle_hold_is_released(monkeypatch):
    meter = _meter(100)
    released = []
    meter.refill(released.extend, _answer(0, {}), now=meter.preauth.used_at + meter_module.PREAUTH_IDLE_S + 1)
    assert released == ["P"] and meter.preauth is None


def test_copy_holds_placed_when_the_session_connected_are_released_once_idle():
    meter = _meter(100)
    meter.copy_holds.want(copy_holds_module.FIRST_JOB_COPIES, 60)
    meter.copy_holds.add(60, "c1")
    meter.copy_holds.add(60, "c2")
    released = []
    meter.refill(released.extend, _answer(0, {}), now=meter.copy_holds.used_at + meter_module.PREAUTH_IDLE_S - 1)
    assert released == [] and meter.preauthorized == 100 + 120
    meter.refill(released.extend, _answer(0, {}), now=meter.copy_holds.used_at + meter_module.PREAUTH_IDLE_S + 1)
    assert sorted(released) == ["P", "c1", "c2"] and meter.preauthorized == 0
    assert meter.copy_holds.missing() == [], "none is placed again until a verified job asks"


@pytest.mark.parametrize("count, per_item, rate, held", [
    (2000, 10, 1.0, 3000),  # the trivial map: 2,000 x 1 credit x 1.5, not 20,000
    (3, 10, 1.0, 5),
    (10, 1, 1.0, 10),  # never more than the worst case
    (4, 100, 2.5, 18),  # 1 s at 2.5 credits/s is 3 credits an item
])
def test_a_map_holds_its_expected_price_with_a_margin(count, per_item, rate, held):
    assert expected_hold(count, per_item, rate) == held
    assert hold_price(0.001, rate) == 1


# -- a running map's holds (gpunet.metering.growth) ---------------------------------------------
@pytest.mark.parametrize("state, more", [
    # 2,000 trivial items on a few workers, held 3,000: the running ones at worst and the rest at a credit fit
    (dict(held=3000, paid=0, done=0, running=8, tasks=2000, per_item=10, expected_price=1), 0),
    (dict(held=3000, paid=1500, done=1500, running=8, tasks=2000, per_item=10, expected_price=1), 0),
    # 4 slow items held 6: the 2 running may each earn 10, the 2 waiting 1 each (x1.5 margin)
    (dict(held=6, paid=0, done=0, running=2, tasks=4, per_item=10, expected_price=1), 20 + 3 - 6),
    # what the done items cost (3 each) prices the rest, never more than the most an item may be paid
    (dict(held=40, paid=30, done=10, running=0, tasks=20, per_item=10, expected_price=1), 45 - 10),
    (dict(held=40, paid=200, done=10, running=0, tasks=20, per_item=10, expected_price=1), 150 + 160),
    (dict(held=100, paid=0, done=0, running=0, tasks=0, per_item=10, expected_price=1), 0),
])
def test_a_map_grows_before_its_holds_could_run_short(state, more):
    assert more_to_hold(**state) == more


def test_item_times_learn_each_functions_items_from_the_maps_that_ran():
    times = ItemTimes()
    assert times.expected("f") == EXPECTED_ITEM_SECONDS, "a function never seen: the default"
    times.observe("f", [2.0, 4.0])
    assert times.expected("f") == 3.0
    times.observe("f", [1.0])
    assert times.expected("f") == 2.0, "each map moves the estimate half way"
    times.observe("f", [float("nan"), None])  # nothing measured: nothing learned
    assert times.expected("f") == 2.0 and times.expected("g") == EXPECTED_ITEM_SECONDS
    for number in range(growth_module.REMEMBERED_FUNCTIONS + 1):
        times.observe(f"h{number}", [0.5])
    assert times.expected("f") == EXPECTED_ITEM_SECONDS, "the oldest is forgotten past the limit"


def test_a_map_of_slow_items_is_held_at_what_they_took():
    """The hold follows the learned time: 4 s items at 1 credit/s hold 4 x 4 x 1.5, never their worst case."""
    times = ItemTimes()
    times.observe("slow", [4.0] * 3)
    assert expected_hold(10, 10, 1.0, times.expected("slow")) == 60
    assert expected_hold(10, 3, 1.0, times.expected("slow")) == 30


def test_function_key_names_a_function_by_module_and_name_and_code_by_its_digest():
    from types import SimpleNamespace

    assert function_key(SimpleNamespace(function=abs)) == "builtins.abs"
    assert function_key(SimpleNamespace(function=None, code="x = 1")) == function_key(
        SimpleNamespace(function=None, code="x = 1")) != function_key(SimpleNamespace(function=None, code="x = 2"))


# -- copy holds placed ahead for verified jobs (gpunet.metering.copy_holds) ---------------------
def test_copy_holds_are_taken_when_enough_are_ready_and_as_many_are_kept_ready():
    pool = CopyHolds()
    ahead = copy_holds_module.JOBS_AHEAD
    assert pool.take(2, 60) is None, "none ready yet: the job places its own"
    assert pool.missing() == [(60, 2 * ahead)], "two of 60 are wanted ready for each of the next jobs"
    pool.add(60, "a")
    assert pool.take(2, 60) is None and pool.missing() == [(60, 2 * ahead - 1)]
    pool.add(60, "b")
    assert pool.take(2, 60) == ["a", "b"] and pool.held() == {}
    assert pool.take(3, 10) is None and sorted(pool.missing()) == [(10, 3 * ahead), (60, 2 * ahead)]
    pool.add(10, "c")
    assert pool.give_up() == ["c"] and pool.missing() == [] and pool.held() == {}
    assert pool.take(1000, 5) is None and pool.missing() == [(5, copy_holds_module.MOST_READY)]


def test_a_copy_takes_the_smallest_ready_holds_that_cover_it_and_a_first_job_is_wanted_ready():
    pool = CopyHolds()
    pool.want(copy_holds_module.FIRST_JOB_COPIES, 60)
    assert pool.missing() == [(60, copy_holds_module.FIRST_JOB_COPIES)], "placed when the session connects"
    for amount, hold in ((60, "a"), (60, "b"), (100, "big")):
        pool.add(amount, hold)
    assert pool.missing() == []
    assert pool.take(2, 10) == ["a", "b"], "a copy of 10 may take a ready hold of 60: it is paid at most 10"
    assert pool.take(1, 200) is None, "no ready hold covers 200: the job places its own"
    assert pool.take(1, 60) == ["big"] and pool.held() == {}
    ahead = copy_holds_module.JOBS_AHEAD
    assert sorted(pool.missing()) == [(10, 2 * ahead), (60, max(ahead, copy_holds_module.FIRST_JOB_COPIES)),
                                      (200, ahead)], "as many as each job took are kept ready for the next ones"


def test_the_meter_takes_copy_holds_with_no_request_and_counts_them_pre_authorized():
    meter = _meter(100)
    meter.copy_holds.add(60, "h1")
    assert meter.take_copy_holds(1, 60) == ["h1"]
    meter.copy_holds.add(60, "h2")
    assert meter.preauthorized == 100 + 60


def test_trust_records_nobody_read_are_fetched_again_only_every_half_minute():
    meter = _meter(100)
    meter._records, meter._records_at = [], 1000.0  # as fetched when the session connected
    assert not meter._records_stale(1000.0 + meter_module.RECORDS_FRESH_S + 1), "unread: not every few seconds"
    assert meter._records_stale(1000.0 + meter_module.RECORDS_UNREAD_FRESH_S + 1)
    meter.provider_records()  # a verified job reads them: kept as fresh as before
    assert meter._records_stale(1000.0 + meter_module.RECORDS_FRESH_S + 1)
