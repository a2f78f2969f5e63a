"""What verification catches and what it costs, against a liar.

For each verification policy (replicate:2, spot:0.1, adaptive trust) and each
liar (a provider that falsifies 5%, 20% or 40% of its results), a fresh local
market starts (credit service, metered scheduler, three providers' worker
processes on 127.0.0.1, one of them the liar; see gpunet.testing) and runs
ROUNDS maps of ITEMS small tasks, as a notebook runs cells one after another
(adaptive trust learns between them). Printed per run:

- lies: results the liar falsified; caught: lies that never reached the notebook
  (detection rate = caught / lies); wrong: falsified results the notebook accepted;
- copies per task: device work relative to running each task once (1.00 = no
  overhead), and the device-seconds the copies took against those of one copy;
  "after 200": the copies per task of the tasks after the first 200 (what trust
  costs once it is earned);
- quarantined: whether the liar lost its place, and after how many rounds.

    .venv/bin/python benchmarks/verification.py [--items 40] [--rounds 8]
    .venv/bin/python benchmarks/verification.py --policies adaptive --lie-rates 0.2,0 --items 200 --rounds 10

Never fails on a figure: it prints them.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time

os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "error")  # the worker processes' logs too


def _task(i):  # travels by value
    import math

    total = 0.0
    for k in range(1, 20_000):  # about 2 ms of Python on one core
        total += math.sin(i + k) / k
    return (i * i, total)


def run(policy: str, lie_rate: float, *, items: int, rounds: int) -> dict:
    from gpunet.testing import local_market

    expected = [_task(i) for i in range(items)]
    with tempfile.TemporaryDirectory() as place, \
            local_market({"alice": 0.0, "bob": 0.0, "mallory": lie_rate}, directory=place, seed=7) as market, \
            market.connect(budget=10_000_000) as net:
        wrong = 0
        quarantined_after = None
        copies_at_200 = None
        started = time.perf_counter()
        for number in range(1, rounds + 1):
            if copies_at_200 is None and (number - 1) * items >= 200:
                copies_at_200 = (sum(entry.tasks for entry in net.meter.tally.values()), (number - 1) * items)
            results = net.map(_task, range(items), verify=policy)
            wrong += sum(result != want for result, want in zip(results, expected))
            if quarantined_after is None and "mallory" in net.metering_state()["quarantined"]:
                quarantined_after = number
        wall = time.perf_counter() - started
        tally = net.meter.tally
        copies = sum(entry.tasks for entry in tally.values())
        seconds = sum(entry.seconds for entry in tally.values())
        lies = sum(line["lied"] for line in market.lies("mallory"))
    tasks = items * rounds
    after_200 = ((copies - copies_at_200[0]) / (tasks - copies_at_200[1])
                 if copies_at_200 and tasks > copies_at_200[1] else None)
    return {"copies_after_200": after_200, "policy": policy, "lie_rate": lie_rate, "tasks": tasks, "lies": lies, "caught": lies - wrong,
            "wrong": wrong, "copies_per_task": copies / tasks, "device_s": seconds,
            "device_s_per_task": seconds / copies if copies else 0.0, "quarantined_after": quarantined_after,
            "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=40, help="tasks per map (default 40)")
    parser.add_argument("--rounds", type=int, default=8, help="maps per run (default 8)")
    parser.add_argument("--policies", default="replicate:2,spot:0.1,adaptive")
    parser.add_argument("--lie-rates", default="0.05,0.2,0.4")
    args = parser.parse_args()
    logging.getLogger("distributed").setLevel(logging.ERROR)
    logging.getLogger("gpunet").setLevel(logging.CRITICAL)  # the table says what matters

    print(f"{args.rounds} maps x {args.items} tasks per run; 3 providers, one liar; CPU workers")
    print(f"{'policy':<13} {'liar':>5} {'lies':>5} {'caught':>6} {'detect':>7} {'wrong':>6} "
          f"{'copies/task':>11} {'after 200':>9} {'device s':>9} {'quarantined':>12} {'wall s':>7}")
    for policy in args.policies.split(","):
        for rate in (float(r) for r in args.lie_rates.split(",")):
            r = run(policy, rate, items=args.items, rounds=args.rounds)
            detect = f"{r['caught'] / r['lies']:.2f}" if r["lies"] else "-"
            after_200 = "-" if r["copies_after_200"] is None else f"{r['copies_after_200']:.3f}"
            quarantined = f"round {r['quarantined_after']}" if r["quarantined_after"] else "no"
            print(f"{policy:<13} {rate:>5.0%} {r['lies']:>5} {r['caught']:>6} {detect:>7} {r['wrong']:>6} "
                  f"{r['copies_per_task']:>11.3f} {after_200:>9} {r['device_s']:>9.2f} {quarantined:>12} {r['wall_s']:>7.1f}",
                  flush=True)


if __name__ == "__main__":
    main()
