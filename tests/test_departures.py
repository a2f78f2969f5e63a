"""Maps and verified maps while providers leave at any moment: a provider's worker
SIGKILLed again and again (its Nanny restarts it), a provider quarantined and its
workers retired while maps are sent back to back. Every map either completes with
the right results or fails with a gpunet error that names the cause, within its
timeout: no bare Dask KeyError or CommClosedError, no wait without an end."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from gpunet.errors import GpunetError
from gpunet.testing import local_market
from network_probes import wait_until

#: Each map's timeout; a map must end (well or with a gpunet error) within it and a margin.
MAP_TIMEOUT_S = 30
#: Times the victim's worker is killed, and the quarantines in the second test (kept
#: modest so that the whole suite stays within its time on 2 cores).
KILLS = int(os.environ.get("GPUNET_TEST_KILLS", "4"))
QUARANTINES = int(os.environ.get("GPUNET_TEST_QUARANTINES", "3"))


def _square(i):  # travels by value
    import time

    time.sleep(0.01)
    return i * i


class MapLoop:
    """Maps sent back to back on another thread, alternating unverified and verified,
    until stopped; records how each ended."""

    def __init__(self, net, policies=("none", "replicate:2"), items=24, *, liar=False):
        self.net, self.policies, self.items = net, policies, items
        self.liar = liar  # unverified results may be lies: only verified ones are compared
        self.outcomes: list[tuple[str, str, float]] = []  # (policy, "ok" or the error, seconds)
        self.unexpected: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        self._stop.set()
        self._thread.join(timeout=MAP_TIMEOUT_S + 60)
        assert not self._thread.is_alive(), "a map did not end within its timeout"

    def _run(self):
        number = 0
        while not self._stop.is_set():
            policy = self.policies[number % len(self.policies)]
            number += 1
            started = time.monotonic()
            try:
                results = self.net.map(_square, range(self.items), verify=policy, timeout=MAP_TIMEOUT_S)
                if policy != "none" or not self.liar:
                    assert results == [i * i for i in range(self.items)], results
                assert len(results) == self.items
                outcome = "ok"
            except GpunetError as exc:
                outcome = f"{type(exc).__name__}: {exc}"
            except BaseException as exc:  # noqa: BLE001 - what the test is about
                self.unexpected.append(exc)
                outcome = f"RAW {type(exc).__name__}: {exc}"
            self.outcomes.append((policy, outcome, time.monotonic() - started))

    def completed(self, policy: str) -> int:
        return sum(1 for p, outcome, _ in self.outcomes if p == policy and outcome == "ok")

    def check(self):
        assert not self.unexpected, f"raw exceptions reached the user: {self.unexpected!r}"
        slow = [o for o in self.outcomes if o[2] > MAP_TIMEOUT_S + 20]
        assert not slow, f"maps outlived their timeout: {slow}"


@pytest.fixture
def departing_market(tmp_path):
    """Three honest providers; dave is the one who keeps leaving."""
    with local_market({"alice": 0.0, "bob": 0.0, "dave": 0.0}, directory=tmp_path) as market:
        yield market


def _worker_pid(net, address):
    return net.client.run(os.getpid, workers=[address])[address]


def test_maps_survive_a_provider_killed_again_and_again(departing_market, detached):
    market = departing_market
    with market.connect(budget=10_000_000) as net, MapLoop(net) as loop:
        for kill in range(KILLS):
            victims = wait_until(lambda: [a for a, info in net.metering_state()["providers"].items()
                                          if info["provider"] == "dave" and a in net.scheduler_workers(fresh=True)],
                                 60, "dave's worker to (re)join")
            wait_until(lambda: len(loop.outcomes) > 2 * kill, 120, "a map to end since the last kill")
            try:
                os.kill(_worker_pid(net, victims[0]), signal.SIGKILL)
            except Exception:  # noqa: BLE001 - it may have left on its own just now
                continue
        wait_until(lambda: len(loop.outcomes) >= 2 * KILLS + 2, 180, "maps to go on after the kills")
    loop.check()
    assert loop.completed("none") and loop.completed("replicate:2"), loop.outcomes
    failures = [outcome for _, outcome, _ in loop.outcomes if outcome != "ok"]
    for outcome in failures:  # a failure names the cause: a worker that left, or the timeout
        assert "left" in outcome or "died" in outcome or "timeout" in outcome or "lost" in outcome, outcome


@pytest.fixture
def liar_market_to_quarantine(tmp_path):
    """Two honest providers and mallory, who lies every time: replicated, she is
    quarantined after her first few results, and her workers are retired (one client
    quarantines her, again and again: every mismatch of it counts, see tests/test_fairness.py)."""
    with local_market({"alice": 0.0, "bob": 0.0, "mallory": 1.0}, directory=tmp_path,
                      mismatches_per_client_day=-1) as market:
        yield market


def test_maps_sent_back_to_back_survive_quarantines(liar_market_to_quarantine, detached):
    market = liar_market_to_quarantine
    cluster = market.cluster
    with market.connect(budget=10_000_000) as net, \
            MapLoop(net, policies=("replicate:2", "none", "replicate:2", "adaptive"), liar=True) as loop:
        for number in range(QUARANTINES):
            wait_until(lambda: market.operator.provider_record("mallory")["quarantined"], 120,
                       f"mallory's quarantine number {number + 1}")
            if number == QUARANTINES - 1:
                break
            # the operator forgives her, and she comes back with a fresh worker (which lies
            # at once, and is quarantined again while the maps go on)
            market.operator.clear_quarantine("mallory", key=f"clear-mallory-{number}")
            cluster.worker_spec[f"mallory-again-{number}"] = dict(cluster.worker_spec["mallory-0"])
            cluster.sync(cluster._correct_state)
        wait_until(lambda: len(loop.outcomes) >= 4, 120, "maps to go on after the quarantines")
    loop.check()
    assert loop.completed("replicate:2") and loop.completed("none"), loop.outcomes
