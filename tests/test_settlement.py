"""The settlement state machine, walked through the cases in data/settlement_cases.json:
each is a sequence of events and the movements (and adapter requests) they must
produce, checked against :class:`gpunet.metering.settlement.Settlement` with no servers."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from gpunet.metering.settlement import Owned, Settlement, items_run, price, task_price
from gpunet.wire import ITEMS_RUN

CASES = json.loads((Path(__file__).parent / "data" / "settlement_cases.json").read_text())


def _arguments(event: dict[str, Any]) -> dict[str, Any]:
    """An event's arguments as the adapter passes them (sets of live keys, Owned tasks)."""
    args = {name: value for name, value in event.items() if name not in ("event", "returns")}
    if "live" in args:
        args["live"] = set(args["live"])
    if "tasks" in args:
        args["tasks"] = {key: Owned(task["meta"], set(task["owners"])) for key, task in args["tasks"].items()}
    return args


def _view(settlement: Settlement) -> dict[str, Any]:
    """The parts of the state a case may check, as JSON values."""
    return {
        "awaiting": sorted(settlement.awaiting),
        "maps_open": sorted(settlement.shared),
        "owed": {worker: [owed.key for owed in attempts] for worker, attempts in settlement.owed.items()},
        "providers": {worker: dataclasses.asdict(info) for worker, info in settlement.providers.items()},
        "quarantined": sorted(settlement.quarantined),
        "dispatched": sorted(settlement.dispatched),
        "verdicts": settlement.verdicts,
    }


@pytest.mark.parametrize("case", CASES, ids=[case["name"] for case in CASES])
def test_settlement_case(case: dict[str, Any]) -> None:
    settlement = Settlement(**case.get("settlement", {}))
    requests = []
    for number, event in enumerate(case["events"]):
        result = getattr(settlement, event["event"])(**_arguments(event))
        if "returns" in event:
            assert result == event["returns"], f"{case['description']}: event {number} ({event['event']})"
        elif result:
            requests += [{"request": type(r).__name__, **json.loads(json.dumps(dataclasses.asdict(r)))}
                         for r in result]
    assert list(settlement.queue) == case["movements"], case["description"]
    assert requests == case.get("requests", []), case["description"]
    view = _view(settlement)
    for name, expected in case.get("state", {}).items():
        assert view[name] == expected, f"{case['description']}: {name}"


def test_cases_are_named_once() -> None:
    names = [case["name"] for case in CASES]
    assert len(names) == len(set(names))
    assert all(case["description"] for case in CASES)


@pytest.mark.parametrize(("seconds", "rate", "cap", "credits"), [
    (2.1, 2.0, 100, 5),  # ceil(4.2)
    (100.0, 1.0, 10, 10),  # capped by the hold
    (0.0, 5.0, 10, 1),  # at least 1
    (3.0, 1.0, 3, 3),  # exactly the hold
])
def test_price(seconds: float, rate: float, cap: int, credits: int) -> None:
    assert price(seconds, rate, cap) == credits


@pytest.mark.parametrize(("seconds", "items", "cap", "credits"), [
    (0.1, 16, 160, 16),  # a chunk of 16 quick items: a credit each
    (40.2, 16, 160, 41),  # a long one: its time
    (500.0, 16, 160, 160),  # capped by what its items may be paid
    (0.1, 16, 10, 10),  # never over the cap
])
def test_a_chunks_price_is_at_least_a_credit_an_item(seconds: float, items: int, cap: int, credits: int) -> None:
    assert price(seconds, 1.0, cap, items) == credits


def test_a_chunk_ended_early_is_paid_a_credit_for_each_item_it_ran_and_a_worker_may_only_lower_that():
    meta = {"hold": "h", "amount": 160, "items": 16}
    assert task_price(0.001, 1.0, meta) == 16  # a credit an item, at least
    assert task_price(0.001, 1.0, items_run(meta, {ITEMS_RUN: 3})) == 3  # it ran 3: the rest go again
    for claim in (16, 17, 10**9, 0, -1, "3", 2.5, None, [3]):  # never more than the chunk, nor nonsense
        assert items_run(meta, {ITEMS_RUN: claim}) == meta
    assert items_run(meta, None) == meta and items_run(meta, "x") == meta
    assert task_price(20.0, 1.0, items_run(meta, {ITEMS_RUN: 3})) == 20  # its time, as ever
