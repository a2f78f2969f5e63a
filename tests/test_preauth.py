"""The notebook's side of a pre-authorized session hold, with no servers: what is free
of it as jobs draw on it, finish, and the scheduler says what it paid
(:class:`gpunet.metering.meter.Meter`'s draw / job_done / look_at_paid / refill)."""

from __future__ import annotations

import pytest

from gpunet.metering import meter as meter_module
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


@pytest.mark.parametrize("count, per_item, rate, held", [
    (2000, 10, 1.0, 3000),  # the trivial map: 2,000 x 1 credit x 1.5, not 20,000
    (3, 10, 1.0, 5),
    (10, 1, 1.0, 10),  # never more than the worst case
    (4, 100, 2.5, 18),  # 1 s at 2.5 credits/s is 3 credits an item
])
def test_a_map_holds_its_expected_price_with_a_margin(count, per_item, rate, held):
    assert expected_hold(count, per_item, rate) == held
    assert hold_price(0.001, rate) == 1
