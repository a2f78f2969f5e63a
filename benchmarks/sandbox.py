"""Round trip of a trivial cell with the provider's sandbox against without it, in one run.

Two local Dask clusters of one gpunet worker each (gpunet's worker preload), one of them
sandboxed as `gpunet provide` sandboxes (bubblewrap where it works), joined by one
notebook each, as a stranger's notebook (results as codec data). Rounds are
interleaved, so that drift in the machine's load hits both alike. Reports the first
cell of a fresh session (a warm spare sandbox serves it) and the session's later cells.

    .venv/bin/python benchmarks/sandbox.py [--repeats 200] [--sessions 5]

Prints figures; never fails on a time.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time


def trivial(x: int = 1) -> int:
    return x + 1


def in_a_sandbox() -> bool:
    import os

    return "GPUNET_WORKER" in os.environ  # set in sandboxes only


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200, help="warm cells per mode")
    parser.add_argument("--sessions", type=int, default=5, help="fresh sessions per mode (their first cells)")
    args = parser.parse_args()

    from distributed import LocalCluster

    import gpunet
    from gpunet.client import network as network_module
    from gpunet.wire import DEVICE_RESOURCE, WORKER_PRELOAD
    from gpunet.worker.sandbox import BUBBLEWRAP, PROCESS, SANDBOX_ENV, SandboxSettings, bubblewrap_works

    settings = SandboxSettings(isolation=BUBBLEWRAP if bubblewrap_works() else PROCESS)
    clusters = {}
    for label, env in (("in the worker", {}), ("sandboxed", {SANDBOX_ENV: settings.to_env()})):
        clusters[label] = LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0",
                                       preload=[WORKER_PRELOAD], resources={DEVICE_RESOURCE: 1}, env=env,
                                       silence_logs=logging.ERROR)
    try:
        print(f"sandbox: {settings.describe()}")
        first: dict[str, list[float]] = {label: [] for label in clusters}
        warm: dict[str, list[float]] = {label: [] for label in clusters}
        rounds = max(args.sessions, 1)
        for _ in range(rounds):
            for label, cluster in clusters.items():
                network_module._current = None  # keep the other connection apart
                with gpunet.connect(cluster.scheduler_address) as net:
                    net.client.wait_for_workers(1, timeout=60)
                    assert net.run(in_a_sandbox, timeout=120) == (label == "sandboxed"), label
                    started = time.perf_counter()
                    net.run(trivial, 1, timeout=120)
                    first[label].append(time.perf_counter() - started)
                    for _ in range(2):
                        net.run(trivial, 1, timeout=120)  # warm-up
                    for _ in range(max(args.repeats // rounds, 1)):
                        started = time.perf_counter()
                        net.run(trivial, 1, timeout=120)
                        warm[label].append(time.perf_counter() - started)
        print(f"{'net.run(trivial), results as data':40s} {'in the worker':>14s} {'sandboxed':>10s} {'ratio':>7s}")
        for name, samples in (("first cell of a session, median (ms)", first), ("later cells, median (ms)", warm)):
            medians = {label: statistics.median(values) * 1e3 for label, values in samples.items()}
            print(f"{name:40s} {medians['in the worker']:14.2f} {medians['sandboxed']:10.2f} "
                  f"{medians['sandboxed'] / medians['in the worker']:7.2f}")
        print("(aim: later cells at most 1.3x in the sandbox)")
    finally:
        for cluster in clusters.values():
            cluster.close()


if __name__ == "__main__":
    main()
