"""Round trip of a trivial %%gpunet cell against client.submit and ipyparallel's %%px,
and --map throughput against client.map, all on one embedded network in one run; then
results as data (the codec, as from providers the notebook does not trust) against
pickle, on one network in the same run: a 1 MB NumPy result and a 10k-row DataFrame;
then data: net.run with a 10 MB and a 100 MB NumPy array input against client.submit with
the same array, and a 200-item net.map against client.map, in the same run.

    .venv/bin/python benchmarks/cell_latency.py [--repeats 200] [--items 2000] [--unmetered]
                                                [--codec-repeats 50] [--codec-items 200]
                                                [--only-codec] [--only-data] [--data-repeats 10]
    .venv/bin/python benchmarks/cell_latency.py --open [--repeats 200] [--items 2000]
    .venv/bin/python benchmarks/cell_latency.py --open --only-data [--data-repeats 10]
    .venv/bin/python benchmarks/cell_latency.py --only-verified [--repeats 200] [--sessions 10]

--open measures an open network instead, every party its own process on 127.0.0.1
(certificates from `gpunet certs`, a credit service, `gpunet scheduler` over mutual
TLS, two `gpunet provide` processes, `gpunet gateway`): the trivial cell's round trip
through the gateway (HTTPS, metered) against `client.submit` with the gateway's
certificate on the same cluster, and `--map` of the items through the gateway
against `client.map`, the Dask tasks carrying a hold as every task there must.
With --only-data, a 1, 10 and 100 MB NumPy array as net.run's input and as its result
through the gateway, against client.submit with the same array on the same cluster.

--only-verified measures a trivial verified call (two copies on two providers of a local
market) against client.submit, with its copies' holds placed ahead (as a session does)
and with them asked of the credit service on its path (as before this version); then the
first verified call of each of --sessions fresh sessions (connect, one verified call, close):
its round trip and the requests it sent to the credit service on its path.

By default the embedded network meters work, as `%gpunet connect` does: every cell
then also places a hold over HTTP before it is sent. --unmetered measures without.

Prints figures; never fails on a time.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator


def trivial(x: int = 1) -> int:
    return x + 1


def timings(fn: Callable[[], object], repeats: int, warmup: int = 10) -> list[float]:
    """Seconds each call of ``fn`` took, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return samples


def summary(samples: list[float]) -> tuple[float, float]:
    """(median, p95) in milliseconds."""
    ordered = sorted(samples)
    return statistics.median(ordered) * 1e3, ordered[int(0.95 * (len(ordered) - 1))] * 1e3


def megabyte_array(seed: int = 0):
    """A 1 MB float64 NumPy array (what a cell's numeric result often is)."""
    import numpy as np

    return np.full(131_072, float(seed))


def ten_thousand_rows(seed: int = 0):
    """A 10,000-row DataFrame of an int, a float and a string column."""
    import numpy as np
    import pandas as pd

    return pd.DataFrame({"n": np.arange(10_000) + seed, "x": np.linspace(0, 1, 10_000),
                         "label": [f"row-{i % 100}" for i in range(10_000)]})


def result_path_alone(value: object, result_format: str) -> object:
    """One result's trip without the network, as each side makes it: the worker's
    encoding (``codec.dump``, then the whole result's), Dask's serialization to frames,
    each frame read into a fresh buffer (as a connection reads it), Dask's
    deserialization and the notebook's decoding."""
    from distributed.protocol import deserialize, serialize

    from gpunet import codec
    from gpunet.client import data_comm  # registers the codec's Dask frames
    from gpunet.wire import CODEC

    blob = codec.dump(value, result_format, name="the return value")
    sent = codec.encode_frames({"value": blob}) if result_format == CODEC else {"value": blob}
    serializers = data_comm.DATA_SERIALIZERS if result_format == CODEC else ("pickle",)
    header, frames = serialize(sent, serializers=serializers)
    arrived = deserialize(header, [bytearray(memoryview(frame)) for frame in frames])
    if result_format == CODEC:
        arrived = codec.decode(arrived)
    return codec.load(arrived["value"], result_format, what="the return value")


def codec_path_alone(repeats: int = 200) -> None:
    """The codec's own cost: :func:`result_path_alone` in this process, codec against
    pickle (interleaved rounds, medians in microseconds)."""
    from gpunet.wire import CODEC, PICKLE

    print(f"\nresults as data (codec) against pickled, without the network: one result's encoding, Dask frames "
          f"and decoding ({repeats} each, medians)")
    print(f"{'':34s} {'pickle':>10s} {'codec':>10s} {'codec/pickle':>13s}")
    for name, value in (("1 MB NumPy array", megabyte_array()), ("10k-row DataFrame", ten_thousand_rows())):
        samples: dict[str, list[float]] = {PICKLE: [], CODEC: []}
        for _ in range(5):
            for result_format in samples:
                samples[result_format] += timings(lambda: result_path_alone(value, result_format),
                                                  max(repeats // 5, 1), warmup=5)
        medians = {label: statistics.median(values) * 1e6 for label, values in samples.items()}
        print(f"{name + ' (us)':34s} {medians[PICKLE]:10.0f} {medians[CODEC]:10.0f} "
              f"{medians[CODEC] / medians[PICKLE]:13.2f}")


def codec_against_pickle(repeats: int, items: int) -> None:
    """net.run round trip and net.map throughput of the two results, as data and pickled,
    on one unmetered network (its scheduler joined twice: trusting its providers, and not);
    then the same results' path without the network (:func:`codec_path_alone`)."""
    import gpunet
    from gpunet.client import network as network_module
    from gpunet.client.local import EmbeddedNetwork

    embedded = EmbeddedNetwork(credits=False)
    try:
        nets = {}
        for label, trust in (("pickle", True), ("codec", False)):
            network_module._current = None  # keep the other connection open
            nets[label] = gpunet.connect(embedded.scheduler_address, trust_providers=trust)
        print(f"\nresults as data (codec) against pickled, one network ({embedded.note}), unmetered")
        print(f"{'':34s} {'pickle':>10s} {'codec':>10s} {'codec/pickle':>13s}")
        for name, fn in (("1 MB NumPy array", megabyte_array), ("10k-row DataFrame", ten_thousand_rows)):
            samples: dict[str, list[float]] = {label: [] for label in nets}
            for _ in range(5):  # interleaved rounds, so drift in the machine's load hits both alike
                for label, net in nets.items():
                    samples[label] += timings(lambda: net.run(fn, 1), max(repeats // 5, 1), warmup=2)
            medians = {label: summary(values)[0] for label, values in samples.items()}
            print(f"{'net.run round trip, ' + name + ' (ms)':34s} {medians['pickle']:10.2f} {medians['codec']:10.2f} "
                  f"{medians['codec'] / medians['pickle']:13.2f}")
            rates = {label: 0.0 for label in nets}
            for _ in range(3):  # interleaved rounds, best of 3
                for label, net in nets.items():
                    started = time.perf_counter()
                    net.map(fn, range(items))
                    rates[label] = max(rates[label], items / (time.perf_counter() - started))
            print(f"{'net.map, ' + name + ' (items/s)':34s} {rates['pickle']:10.0f} {rates['codec']:10.0f} "
                  f"{rates['pickle'] / rates['codec']:13.2f}")
        print("(aim: codec within 1.2x of pickle; the last column is codec time over pickle time)")
        for net in nets.values():
            net.close()
    finally:
        embedded.close()
    codec_path_alone()


GPUNET = [sys.executable, "-m", "gpunet.cli"]


@contextlib.contextmanager
def open_network(folder: Path, gateway_args: tuple[str, ...] = ()) -> Iterator[dict]:
    """An open network of processes on 127.0.0.1 (see the module docstring)."""
    from gpunet.credits import serve_in_background

    ca = folder / "certs"
    for args in (["init"], ["issue", "--role", "scheduler", "--name", "sched"],
                 ["issue", "--role", "gateway", "--name", "gw"], ["issue", "--role", "provider", "--name", "alice"],
                 ["issue", "--role", "provider", "--name", "bob"]):
        subprocess.run([*GPUNET, "certs", *args, "--dir", str(ca)], check=True, capture_output=True)

    def tls(role: str, name: str) -> list[str]:
        return ["--tls-ca-file", str(ca / "ca.pem"), "--tls-cert", str(ca / f"{role}-{name}.pem"),
                "--tls-key", str(ca / f"{role}-{name}-key.pem")]

    processes: list[subprocess.Popen] = []

    def start(args: list[str], pattern: str) -> str:
        process = subprocess.Popen(GPUNET + args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   start_new_session=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        processes.append(process)
        for line in process.stdout:
            if match := re.search(pattern, line):
                threading.Thread(target=process.stdout.read, daemon=True).start()  # keep its pipe flowing
                return match.group(1)
        raise RuntimeError(f"`gpunet {' '.join(args)}` ended before it said {pattern!r}")

    (folder / "credits").mkdir()
    service = serve_in_background(folder / "credits" / "credits.sqlite3", log_path=folder / "credits" / "log",
                                  operator_token_file=folder / "credits" / "operator-token")
    try:
        with service.client() as operator:
            tokens = {name: operator.create_account(name, role)["token"]
                      for name, role in (("alice", "provider"), ("bob", "provider"), ("carol", "client"),
                                         ("meter", "meter"))}
            operator.mint("carol", 10**9, key="mint-carol")
        (folder / "meter-token").write_text(tokens["meter"])
        address = start(["scheduler", "--port", "0", "--dashboard-port", "0", "--credits", service.url,
                         "--meter-token-file", str(folder / "meter-token"), *tls("scheduler", "sched")],
                        r"scheduler: (tls://127\.0\.0\.1:\d+)")
        for name in ("alice", "bob"):
            start(["provide", address, "--host", "127.0.0.1", *tls("provider", name)], rf"provider: {name}(;)")
        url = start(["gateway", address, "--credits", service.url, "--port", "0", "--submit-burst", "100000",
                     "--submits-per-second", "100000", *gateway_args, *tls("gateway", "gw")], r"gateway: (https://\S+)")
        yield {"address": address, "url": url, "ca": ca, "service": service, "tokens": tokens}
    finally:
        for process in reversed(processes):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGINT)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        service.stop()


def open_network_figures(repeats: int, items: int) -> None:
    """The gateway's round trip and --map throughput against the Dask client's on one open network."""
    import io

    import dask
    from distributed import Client
    from IPython.core.interactiveshell import InteractiveShell

    import gpunet
    from gpunet import certs, wire

    with tempfile.TemporaryDirectory() as folder, open_network(Path(folder)) as market:
        ca = market["ca"]
        security = certs.security(ca / "ca.pem", ca / "gateway-gw.pem", ca / "gateway-gw-key.pem")
        net = gpunet.connect(market["url"], token=market["tokens"]["carol"], ca=str(ca / "ca.pem"),
                             budget=10**8)
        shell = InteractiveShell.instance()
        shell.run_line_magic("load_ext", "gpunet")
        shell.user_ns.update(x=1, items=list(range(items)))
        with Client(market["address"], security=security, timeout=60) as client, \
                market["service"].client(market["tokens"]["carol"]) as carol:
            client.wait_for_workers(2, timeout=120)
            session = carol.open_session(10**8)

            def held(tasks: int):  # every task on an open network carries a hold: one shared by `tasks`
                hold = carol.hold(session, 10 * tasks, key=f"bench-{uuid.uuid4().hex}", meter="meter")
                return dask.annotate(**{wire.ANNOTATION: wire.annotation(hold, 10, tasks=tasks)})

            with held(repeats + 10):
                submit = summary(timings(lambda: client.submit(trivial, 1, pure=False,
                                                               resources={"device": 1}).result(), repeats))

            def cell() -> None:
                saved, sys.stderr = sys.stderr, io.StringIO()
                try:
                    shell.run_cell_magic("gpunet", "--quiet", "y = x + 1")
                finally:
                    sys.stderr = saved

            rows = [("client.submit(f).result(), held", submit),
                    ("net.run(f) through the gateway", summary(timings(lambda: net.run(trivial, 1), repeats))),
                    ("%%gpunet --quiet through the gateway", summary(timings(cell, repeats)))]
            print(f"\nopen network: round trip of a trivial cell, {repeats} repeats (ms)")
            print(f"{'':40s} {'median':>8s} {'p95':>8s}")
            for name, (median, p95) in rows:
                print(f"{name:40s} {median:8.2f} {p95:8.2f}")
            print(f"ratio %%gpunet --quiet through the gateway / client.submit (median): "
                  f"{rows[2][1][0] / submit[0]:.2f}  (aim: <= 2)")
            keys = list(range(items))

            def client_map() -> None:
                with held(items):
                    futures = client.map(trivial, keys, key=[f"bench-{uuid.uuid4().hex}-{i}" for i in keys],
                                         resources={"device": 1})
                client.gather(futures)

            def gateway_map() -> None:
                shell.run_cell_magic("gpunet", "--map i=items --quiet", "y = i + 1")

            contenders = (("client.map + gather, held", client_map), ("%%gpunet --map through the gateway", gateway_map),
                          ("net.map through the gateway", lambda: net.map(trivial, keys)))
            for _, fn in contenders:
                fn()  # warm-up
            best = {label: float("inf") for label, _ in contenders}
            for _ in range(3):
                for label, fn in contenders:
                    started = time.perf_counter()
                    fn()
                    best[label] = min(best[label], time.perf_counter() - started)
            rates = {label: items / seconds for label, seconds in best.items()}
            print(f"\nopen network: throughput over {items} trivial items (best of 3, items/s)")
            for label, rate in rates.items():
                print(f"{label:40s} {rate:8.0f}")
            print(f"ratio %%gpunet --map through the gateway / client.map: "
                  f"{rates['%%gpunet --map through the gateway'] / rates['client.map + gather, held']:.2f}  (aim: >= 0.7)")
            net.close()


def array_of(megabytes: int):
    """What the open network's data benchmark returns: a ``megabytes`` MB float64 array."""
    import numpy as np

    return np.full(megabytes * 1024 * 1024 // 8, 1.5)


def open_data_figures(repeats: int) -> None:
    """A 1, 10 and 100 MB NumPy array as net.run's input and as its result through the
    gateway, against client.submit(...).result() with the gateway's certificate and a hold on
    the same open network, rounds interleaved."""
    import dask
    import numpy as np
    from distributed import Client

    import gpunet
    from gpunet import certs, wire

    room = str(512 * 1024 * 1024)
    with tempfile.TemporaryDirectory() as folder, open_network(Path(folder), (
            "--max-body-bytes", room, "--max-job-bytes", room)) as market:
        ca = market["ca"]
        security = certs.security(ca / "ca.pem", ca / "gateway-gw.pem", ca / "gateway-gw-key.pem")
        net = gpunet.connect(market["url"], token=market["tokens"]["carol"], ca=str(ca / "ca.pem"), budget=10**8)
        tasks = 60 * repeats + 60
        with Client(market["address"], security=security, timeout=60) as client, \
                market["service"].client(market["tokens"]["carol"]) as carol:
            client.wait_for_workers(2, timeout=120)
            session = carol.open_session(10**8)
            hold = carol.hold(session, 10 * tasks, key=f"bench-{uuid.uuid4().hex}", meter="meter")
            print(f"\nopen network: data through the gateway against Dask's client on the same cluster, "
                  f"{repeats} round trips each (median ms)")
            print(f"{'':36s} {'Dask':>10s} {'gateway':>10s} {'gateway/Dask':>13s}")
            with dask.annotate(**{wire.ANNOTATION: wire.annotation(hold, 10, tasks=tasks)}):
                for megabytes in (1, 10, 100):
                    array = np.random.default_rng(megabytes).random(megabytes * 1024 * 1024 // 8)
                    cases = {"input": {"Dask": lambda: client.submit(first_value, array, pure=False,
                                                                     resources={"device": 1}).result(),
                                       "gateway": lambda: net.run(first_value, array, timeout=900)},
                             "result": {"Dask": lambda: client.submit(array_of, megabytes, pure=False,
                                                                      resources={"device": 1}).result(),
                                        "gateway": lambda: net.run(array_of, megabytes, timeout=900)}}
                    for case, contenders in cases.items():
                        samples: dict[str, list[float]] = {label: [] for label in contenders}
                        try:
                            for fn in contenders.values():
                                fn()  # warm-up
                            for _ in range(max(repeats // 2, 1)):  # interleaved, so drift in load hits both alike
                                for label, fn in contenders.items():
                                    samples[label] += timings(fn, 2, warmup=0)
                        except gpunet.GpunetError as exc:  # a version whose gateway cannot carry it
                            print(f"{f'{megabytes} MB array {case}':36s} failed: {exc}")
                            continue
                        medians = {label: summary(values)[0] for label, values in samples.items()}
                        print(f"{f'{megabytes} MB array {case}':36s} {medians['Dask']:10.1f} "
                              f"{medians['gateway']:10.1f} {medians['gateway'] / medians['Dask']:13.2f}")
        net.close()


def first_value(array) -> float:
    """What the data benchmark runs: reads one number of its (large) input."""
    return float(array[0])


def data_against_dask(repeats: int, metered: bool, map_items: int = 200) -> None:
    """net.run(first_value, a) against client.submit(first_value, a).result() with the
    same NumPy array, at 10 MB and 100 MB, and a map over ``map_items`` items against
    client.map, on one embedded network, rounds interleaved."""
    import numpy as np

    import gpunet

    net = gpunet.connect(metered=metered, budget=10_000_000)
    client = net.client
    try:
        print(f"\ndata against Dask's own, one network ({net.embedded.note}), "
              + ("metered" if metered else "unmetered"))
        print(f"{'':44s} {'Dask':>10s} {'gpunet':>10s} {'gpunet/Dask':>12s}")
        for megabytes in (10, 100):
            array = np.random.default_rng(megabytes).random(megabytes * 1024 * 1024 // 8)
            contenders = {"Dask": lambda: client.submit(first_value, array, pure=False).result(),
                          "gpunet": lambda: net.run(first_value, array)}
            samples: dict[str, list[float]] = {label: [] for label in contenders}
            for _ in range(5):  # interleaved rounds, so drift in the machine's load hits both alike
                for label, fn in contenders.items():
                    samples[label] += timings(fn, max(repeats // 5, 1), warmup=1)
            medians = {label: summary(values)[0] for label, values in samples.items()}
            print(f"{f'{megabytes} MB array input, round trip (ms)':44s} {medians['Dask']:10.1f} "
                  f"{medians['gpunet']:10.1f} {medians['gpunet'] / medians['Dask']:12.2f}")
        items = list(range(map_items))

        def client_map() -> None:
            client.gather(client.map(trivial, items, key=[f"bench-{uuid.uuid4().hex}-{i}" for i in items]))

        maps = {"Dask": client_map, "gpunet": lambda: net.map(trivial, items)}
        best = {label: float("inf") for label in maps}
        for _ in range(5):  # interleaved rounds, best of 5
            for label, fn in maps.items():
                started = time.perf_counter()
                fn()
                best[label] = min(best[label], time.perf_counter() - started)
        print(f"{f'{map_items}-item map (items/s)':44s} {map_items / best['Dask']:10.0f} "
              f"{map_items / best['gpunet']:10.0f} {best['Dask'] / best['gpunet']:12.2f}")
        print("(aims: array inputs within 1.2x of client.submit; the map at least 0.8x client.map, its last "
              "column being Dask's time over gpunet's)")
    finally:
        net.close()


def verified_figures(repeats: int) -> None:
    """A trivial verified call (``verify="replicate"``: two copies on two providers) on a
    local market of two honest providers, against ``client.submit`` on the same network:
    with its copies' holds placed ahead and trust records kept fresh in the background (as
    a session does), and with both asked of the credit service on its path (as before)."""
    from gpunet.testing import local_market

    with local_market({"alice": 0.0, "bob": 0.0}) as market:
        with market.connect(budget=1_000_000) as net:
            client = net.client
            meter = net.meter
            take, records = meter.take_copy_holds, meter.provider_records

            def ahead(on: bool) -> None:
                if on:
                    meter.take_copy_holds, meter.provider_records = take, records
                else:  # every copy's hold placed, and the records asked, on the job's path
                    meter.take_copy_holds = lambda count, amount: None
                    meter.provider_records = meter.credits.provider_records

            contenders = [("client.submit(f).result()", lambda: client.submit(trivial, 1, pure=False).result(), True),
                          ("net.run(f, verify='replicate')", lambda: net.run(trivial, 1, verify="replicate"), True),
                          ("  the same, holds asked on its path", lambda: net.run(trivial, 1, verify="replicate"),
                           False)]
            samples: dict[str, list[float]] = {name: [] for name, _, _ in contenders}
            for name, fn, on in contenders:  # warm-up (and the copy holds placed ahead a first time)
                ahead(on)
                timings(fn, 1, warmup=5)
            for _ in range(repeats):  # one of each in turn, so drift in the machine's load hits all alike
                for name, fn, on in contenders:
                    ahead(on)
                    samples[name] += timings(fn, 1, warmup=0)
            ahead(True)
            rows = [(name, summary(samples[name])) for name, _, _ in contenders]
    print(f"\nround trip of a trivial verified call, {repeats} repeats (ms)")
    print(f"{'':36s} {'median':>8s} {'p95':>8s}")
    for name, (median, p95) in rows:
        print(f"{name:36s} {median:8.2f} {p95:8.2f}")
    print(f"ratio verified / client.submit (median): {rows[1][1][0] / rows[0][1][0]:.2f}; "
          f"holds asked on its path / placed ahead: {rows[2][1][0] / rows[1][1][0]:.2f}")


def first_verified_figures(sessions: int) -> None:
    """The first verified call (``verify="replicate"``) of each of ``sessions`` fresh sessions
    on a local market of two honest providers: how long connecting took, the first call's
    round trip, the second's, and the requests the first sent to the credit service on its
    path (counted in this process, on the thread that sent the call)."""
    from gpunet.testing import local_market

    rows: dict[str, list[float]] = {"connect": [], "first verified call": [], "second verified call": []}
    asked: list[int] = []
    with local_market({"alice": 0.0, "bob": 0.0}) as market:
        for _ in range(sessions):
            started = time.perf_counter()
            with market.connect(budget=1_000_000) as net:
                rows["connect"].append(time.perf_counter() - started)
                credits, sent = net.meter.credits, []
                real = credits._request

                def counted(*args, _real=real, _sent=sent, **kwargs):
                    if threading.current_thread() is threading.main_thread():  # the call's path, not the refill's
                        _sent.append(args[:2])
                    return _real(*args, **kwargs)

                credits._request = counted
                rows["first verified call"] += timings(lambda: net.run(trivial, 1, verify="replicate"), 1, warmup=0)
                credits._request = real
                asked.append(len(sent))
                rows["second verified call"] += timings(lambda: net.run(trivial, 1, verify="replicate"), 1, warmup=0)
    print(f"\nthe first verified call of a fresh session, {sessions} sessions (ms)")
    print(f"{'':36s} {'median':>8s} {'p95':>8s}")
    for name, samples in rows.items():
        median, p95 = summary(samples)
        print(f"{name:36s} {median:8.2f} {p95:8.2f}")
    print(f"requests to the credit service on the first call's path: {statistics.median(asked):g} (median), "
          f"{max(asked)} (most)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--unmetered", action="store_true", help="start the embedded network without credits")
    parser.add_argument("--codec-repeats", type=int, default=50, help="round trips per result kind, codec vs pickle")
    parser.add_argument("--codec-items", type=int, default=200, help="map items per round, codec vs pickle")
    parser.add_argument("--only-codec", action="store_true", help="measure only the codec against pickle")
    parser.add_argument("--open", action="store_true", help="measure an open network through its gateway instead")
    parser.add_argument("--data-repeats", type=int, default=10, help="round trips per array size, gpunet vs Dask")
    parser.add_argument("--only-data", action="store_true", help="measure only array inputs and a 200-item map")
    parser.add_argument("--only-verified", action="store_true",
                        help="measure only a trivial verified call on a local market of two providers")
    parser.add_argument("--sessions", type=int, default=10,
                        help="fresh sessions whose first verified call --only-verified measures (0: none)")
    args = parser.parse_args()
    if args.only_verified:
        if args.repeats:
            verified_figures(args.repeats)
        if args.sessions:
            first_verified_figures(args.sessions)
        return
    if args.open and args.only_data:
        open_data_figures(args.data_repeats)
        return
    if args.open:
        open_network_figures(args.repeats, args.items)
        return
    if args.only_codec:
        codec_against_pickle(args.codec_repeats, args.codec_items)
        return
    if args.only_data:
        data_against_dask(args.data_repeats, metered=not args.unmetered)
        return

    import io
    import sys

    from IPython.core.interactiveshell import InteractiveShell

    import gpunet

    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "gpunet")
    net = gpunet.connect(metered=not args.unmetered, budget=100 * args.items * 12)
    client = net.client
    print(f"network: {net.embedded.note}; " + ("unmetered" if args.unmetered else f"metered by {net.credits.url}"))
    shell.user_ns["x"] = 1

    def cell(flags: str) -> Callable[[], None]:
        def run() -> None:
            saved = sys.stderr
            sys.stderr = io.StringIO()  # the progress line, in text mode
            try:
                shell.run_cell_magic("gpunet", flags, "y = x + 1")
            finally:
                sys.stderr = saved
        return run

    rows = []
    submit = summary(timings(lambda: client.submit(trivial, 1, pure=False).result(), args.repeats))
    rows.append(("client.submit(f).result()", submit))
    rows.append(("%%gpunet --quiet (y = x + 1)", summary(timings(cell("--quiet"), args.repeats))))
    rows.append(("%%gpunet (text progress)", summary(timings(cell(""), args.repeats))))

    px = None
    try:
        import ipyparallel as ipp

        cluster = ipp.Cluster(n=2, log_level=40)
        rc = cluster.start_and_connect_sync()
        rc.wait_for_engines(2, timeout=120)
        rc[:].activate()
        rc[:].push({"x": 1}, block=True)
        px = summary(timings(lambda: shell.run_cell_magic("px", "--block", "y = x + 1"), args.repeats))
        rows.append(("ipyparallel %%px on 2 engines", px))
    except ImportError:
        print("ipyparallel is not installed (pip install -e '.[bench]'): %%px not measured")

    print(f"\nround trip of a trivial cell, {args.repeats} repeats (ms)")
    print(f"{'':36s} {'median':>8s} {'p95':>8s}")
    for name, (median, p95) in rows:
        print(f"{name:36s} {median:8.2f} {p95:8.2f}")
    quiet = rows[1][1][0]
    print(f"ratio %%gpunet --quiet / client.submit (median): {quiet / submit[0]:.2f}  (aim: <= 1.3)")
    if px is not None:
        print(f"ratio %%gpunet --quiet / %%px (median): {quiet / px[0]:.2f}  (aim: < 1)")
        cluster.stop_cluster_sync()

    items = list(range(args.items))

    def client_map() -> None:
        futures = client.map(trivial, items, key=[f"bench-{uuid.uuid4().hex}-{i}" for i in items])
        client.gather(futures)

    def gpunet_map() -> None:
        shell.run_cell_magic("gpunet", "--map i=items --quiet", "y = i + 1")

    shell.user_ns["items"] = items
    contenders = (("client.map + gather", client_map), ("%%gpunet --map", gpunet_map),
                  ("net.map", lambda: net.map(trivial, items)))
    for _, fn in contenders:
        fn()  # warm-up
    best = {label: float("inf") for label, _ in contenders}
    for _ in range(3):  # rounds interleave the contenders, so drift in the machine's load hits all alike
        for label, fn in contenders:
            started = time.perf_counter()
            fn()
            best[label] = min(best[label], time.perf_counter() - started)
    results = {label: args.items / seconds for label, seconds in best.items()}
    print(f"\nthroughput over {args.items} trivial items (best of 3, items/s)")
    for label, rate in results.items():
        print(f"{label:36s} {rate:8.0f}")
    ratio = results["%%gpunet --map"] / results["client.map + gather"]
    print(f"ratio %%gpunet --map / client.map: {ratio:.2f}  (aim: >= 0.9)")
    net.close()
    codec_against_pickle(args.codec_repeats, args.codec_items)
    data_against_dask(args.data_repeats, metered=not args.unmetered)


if __name__ == "__main__":
    from gpunet.paths import scratch_data_dir

    with scratch_data_dir(prefix="gpunet-bench-"):  # its embedded networks leave no run folders behind
        main()
