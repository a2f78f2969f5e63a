"""Metering's cost, and what a capability-weighted split buys.

    .venv/bin/python benchmarks/metering.py [--items 2000] [--paths 40000000]

1. Throughput of ``net.map`` over N trivial tasks on the embedded network with
   metering on (holds placed in one batch, settlements reported by the scheduler
   plugin), against plain ``client.map`` + ``gather`` on the same cluster.
2. Makespan of a divisible matmul-bound job (M products of 1024x1024 float32
   matrices) split equally, and split by ``gpunet.split`` (capability-weighted,
   ``placement="capability"``), over two workers of different measured speed. This machine has two identical cores, so the difference is made
   honestly: worker B is confined to one core (and XLA to one thread), worker A may
   use both; each is measured by the probe, one at a time, and the figures printed.

Prints figures; never fails on a time.
"""

from __future__ import annotations

import argparse
import time
import uuid


def trivial(x: int) -> int:
    return x + 1


def two_speed_cluster() -> tuple[object, object]:
    """A local cluster with worker A (any core), and worker B pinned to core 1 by taskset."""
    import subprocess
    import sys

    from distributed import LocalCluster

    cluster = LocalCluster(n_workers=1, threads_per_worker=1, resources={"device": 1}, host="127.0.0.1",
                           dashboard_address="127.0.0.1:0", name="A")
    worker_b = subprocess.Popen(
        ["taskset", "-c", "1", sys.executable, "-m", "distributed.cli.dask_worker", cluster.scheduler_address,
         "--nthreads", "1", "--resources", "device=1", "--name", "B", "--host", "127.0.0.1", "--no-dashboard",
         "--preload", "gpunet.extensions.worker_plugin"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    return cluster, worker_b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--matmuls", type=int, default=300)
    args = parser.parse_args()

    import gpunet
    
    net = gpunet.connect(budget=10 * args.items * 12)
    client = net.client
    print(f"network: {net.embedded.note}; metered by {net.credits.url}")
    items = list(range(args.items))

    def plain() -> None:
        client.gather(client.map(trivial, items, key=[f"plain-{uuid.uuid4().hex}-{i}" for i in items]))

    def metered() -> None:
        net.map(trivial, items)

    contenders = (("client.map + gather (no metering)", plain), ("net.map, metered", metered))
    for _, fn in contenders:
        fn()  # warm-up
    best = {label: float("inf") for label, _ in contenders}
    for _ in range(3):  # interleaved rounds: drift in the machine's load hits both alike
        for label, fn in contenders:
            started = time.perf_counter()
            fn()
            best[label] = min(best[label], time.perf_counter() - started)
    rates = {label: args.items / seconds for label, seconds in best.items()}
    deadline = time.monotonic() + 60
    while net.metering_state()["queued"] and time.monotonic() < deadline:
        time.sleep(0.1)
    net.meter.wait_settled(timeout=60)  # what the scheduler paid from the pre-authorized hold, landed
    usage = net.meter.usage()
    print(f"\nthroughput over {args.items} trivial tasks (best of 3, tasks/s)")
    for label, rate in rates.items():
        print(f"  {label:36s} {rate:8.0f}")
    ratio = rates["net.map, metered"] / rates["client.map + gather (no metering)"]
    print(f"  ratio metered / plain: {ratio:.2f}  (aim: >= 0.8)")
    print(f"  session after the runs: spent {usage['spent']}, held {usage['held']} "
          f"({usage['preauthorized']} of it pre-authorized) "
          f"(every task paid once: {usage['spent']} credits for {4 * args.items} tasks)")
    net.close()

    # -- capability-weighted split against an equal split ----------------------------------
    cluster, worker_b = two_speed_cluster()
    net = gpunet.connect(cluster.scheduler_address)
    net.client.wait_for_workers(2, timeout=60)
    names = {w.address: "A" if w.name != "B" else "B" for w in net.workers()}
    a = next(address for address, name in names.items() if name == "A")
    capabilities = net.capabilities()
    print("\nworker A: any core; worker B: taskset -c 1")
    for address, cap in capabilities.items():
        print(f"  {names[address]}: {cap['tflops_f32'] * 1e3:.1f} GFLOP/s float32 matmul, "
              f"{cap['bandwidth_gbs']:.1f} GB/s (probe)")

    def multiply(count: int) -> float:
        import jax
        import jax.numpy as jnp

        x = jnp.ones((1024, 1024), jnp.float32) / 1024
        step = jax.jit(lambda m: m @ x)
        jax.block_until_ready(step(x))  # compiled before the clock starts
        start = time.perf_counter()
        m = x
        for _ in range(count):
            m = step(m)
        jax.block_until_ready(m)
        return time.perf_counter() - start

    def makespan(sizes: list[int]) -> tuple[float, list[float]]:
        started = time.perf_counter()
        seconds = net.map(multiply, sizes, placement="capability")
        return time.perf_counter() - started, seconds

    order = list(capabilities)  # placement="capability" pins share i to worker order[i]
    equal = [args.matmuls // 2, args.matmuls - args.matmuls // 2]
    weighted = gpunet.split(args.matmuls, net)
    makespan([2, 2])  # warm both workers up
    results = {}
    for label, sizes in (("equal split", equal), ("capability-weighted split", weighted)):
        results[label] = min((makespan(sizes) for _ in range(3)), key=lambda r: r[0])
    print(f"\n{args.matmuls} matmuls of 1024x1024 float32 over workers "
          f"{', '.join('A' if w == a else 'B' for w in order)}")
    for label, sizes in (("equal split", equal), ("capability-weighted split", weighted)):
        wall, seconds = results[label]
        parts = ", ".join(f"{n} in {s:.2f} s" for n, s in zip(sizes, seconds))
        print(f"  {label:28s} makespan {wall:.2f} s  ({parts})")
    gain = results["equal split"][0] / results["capability-weighted split"][0]
    print(f"  equal / weighted makespan: {gain:.2f}")
    net.close()
    worker_b.terminate()
    worker_b.wait(timeout=30)
    cluster.close()


if __name__ == "__main__":
    from gpunet.paths import scratch_data_dir

    with scratch_data_dir(prefix="gpunet-bench-"):  # its embedded networks leave no run folders behind
        main()
