"""Credit service figures: movement throughput over HTTP, ledger appends, verify time, proof size.

    .venv/bin/python benchmarks/credits.py            # everything (about 2 minutes on 2 cores)
    .venv/bin/python benchmarks/credits.py --quick    # smaller ledgers, shorter runs
    .venv/bin/python benchmarks/credits.py --only-batched --rounds 3   # the batched hold+settle alone

Prints, on this machine:
* hold+settle pairs/s over HTTP with 16 concurrent clients on SQLite, per request and
  batched, next to a trivial authenticated endpoint measured with the same client in the
  same run (the per-request path aims at >= 0.8x of it);
* ledger appends/s in-process (the writer alone, no HTTP);
* ``gpunet ledger verify`` time for ledgers of 100,000 and 1,000,000 entries (in-process,
  and as the command with interpreter start-up);
* the size of an inclusion proof at 1,000,000 entries (raw bytes and the JSON answer).

Figures, never asserted: these machines are noisy (+-20% run to run).
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from gpunet.credits import CreditClient, serve_in_background, verify_database
from gpunet.credits._ledger import ESCROW, ZERO_HASH, entry_hash

logger = logging.getLogger(__name__)


def _threads(n: int, target, *args) -> float:
    barrier = threading.Barrier(n + 1)
    ts = [threading.Thread(target=target, args=(i, barrier, *args)) for i in range(n)]
    for t in ts:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in ts:
        t.join()
    return time.perf_counter() - t0


def _process_cpu(pid: int) -> float:
    """CPU seconds (user + system) that process ``pid`` has used so far (Linux's /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench_http(workdir: Path, seconds: float, clients: int = 16, *, only_batched: bool = False,
               batched_rounds: int = 1) -> None:
    svc = serve_in_background(workdir / "http.sqlite3", log_path=workdir / "http.log")
    try:
        ops = svc.client()
        names = []
        for i in range(clients):
            name = f"bench-client-{i}"
            token = ops.create_account(name, "client")["token"]
            ops.mint(name, 10**12, key=f"mint-{i}")
            names.append((name, token))
        ops.create_account("bench-gpu", "provider")
        sessions = [CreditClient(svc.url, tok).open_session(10**12) for _, tok in names]

        def trivial(i, barrier, counts):
            c = CreditClient(svc.url, names[i][1])
            c.ping()
            barrier.wait()
            end = time.perf_counter() + seconds
            n = 0
            while time.perf_counter() < end:
                c.ping()
                n += 1
            counts[i] = n

        def pairs(i, barrier, counts, tag):
            me = CreditClient(svc.url, names[i][1])
            op = CreditClient(svc.url, svc.operator_token)
            me.ping()
            op.ping()
            barrier.wait()
            end = time.perf_counter() + seconds
            n = 0
            while time.perf_counter() < end:
                hold = me.hold(sessions[i], 5, key=f"{tag}-{i}-{n}")
                op.settle(hold, "bench-gpu", 3, key=f"{tag}-{i}-{n}-s")
                n += 1
            counts[i] = n

        batch_tags = iter(range(10**6))

        def batched(i, barrier, counts, size):
            tag = next(batch_tags)  # each run's keys its own
            op = CreditClient(svc.url, svc.operator_token)
            op.ping()
            barrier.wait()
            end = time.perf_counter() + seconds
            n = 0
            while time.perf_counter() < end:
                holds = op.batch([{"op": "hold", "session": sessions[i], "amount": 5, "key": f"b-{i}-{tag}-{n + k}"}
                                  for k in range(size)], raise_on_error=True)
                op.batch([{"op": "settle", "hold": h["hold"], "provider": "bench-gpu", "amount": 3,
                           "key": f"b-{i}-{tag}-{n + k}-s"} for k, h in enumerate(holds)], raise_on_error=True)
                n += size
            counts[i] = n

        # Alternate the two measurements (three times each) so that drift on a noisy
        # machine hits both alike; report the median of each.
        trivial_rates, pair_rates = [], []
        # Warm-up, not measured: the service's first few thousand movements run slower
        # (SQLite pages and the WAL grow, caches fill).
        _threads(clients, pairs, [0] * clients, "warm")
        for rnd in range(0 if only_batched else 3):
            counts = [0] * clients
            wall = _threads(clients, trivial, counts)
            trivial_rates.append(sum(counts) / wall)
            counts = [0] * clients
            wall = _threads(clients, pairs, counts, f"p{rnd}")
            pair_rates.append(sum(counts) / wall)
        print(f"HTTP, {clients} concurrent clients (requests.Session each), SQLite WAL synchronous=FULL:")
        if not only_batched:
            trivial_rate = sorted(trivial_rates)[1]
            pair_rate = sorted(pair_rates)[1]
            print(f"  trivial authenticated JSON POST (/v1/ping)    {trivial_rate:8.0f} requests/s "
                  f"(rounds: {', '.join(f'{r:.0f}' for r in trivial_rates)})")
            print(f"  hold + settle, one request each               {pair_rate:8.0f} pairs/s "
                  f"= {2 * pair_rate:.0f} requests/s = {2 * pair_rate / trivial_rate:.2f}x the trivial endpoint "
                  f"(rounds: {', '.join(f'{r:.0f}' for r in pair_rates)} pairs/s)")
        else:
            _threads(clients, batched, [0] * clients, 100)  # warm-up of the batched path
        size = 100
        for _ in range(batched_rounds):
            counts = [0] * clients
            cpu0, own0 = _process_cpu(svc.pid), time.process_time()
            wall = _threads(clients, batched, counts, size)
            pairs_done = max(sum(counts), 1)
            per_pair = (_process_cpu(svc.pid) - cpu0) / pairs_done * 1e6
            # The clients are this process's threads: their CPU shares the same cores.
            client_per_pair = (time.process_time() - own0) / pairs_done * 1e6
            print(f"  hold + settle, batched {size} per request        {sum(counts) / wall:8.0f} pairs/s "
                  f"({per_pair:.0f} µs of the service's CPU per pair, {client_per_pair:.0f} µs of the clients'; "
                  f"one core's worth of the service is {1e6 / per_pair:.0f} pairs/s; load average "
                  f"{os.getloadavg()[0]:.1f})")
        from gpunet.credits import verify_service

        t0 = time.perf_counter()
        summary = verify_service(svc.url, svc.operator_token)
        print(f"  the ledger after the run: {summary['size']} entries, verified over HTTP in "
              f"{time.perf_counter() - t0:.1f} s")
    finally:
        svc.stop()


def bench_appends(workdir: Path, n: int) -> None:
    from gpunet.credits._service import open_store

    store = open_store(str(workdir / "appends.sqlite3"), key_file=workdir / "appends.pem")
    try:
        store.ensure_operator()
        store.call("create_account", "operator", {"name": "a", "role": "client"})
        futures = [store.submit("mint", "operator", {"account": "a", "amount": 1}, f"k{i}") for i in range(n)]
        t0 = time.perf_counter()
        for f in futures:
            f.result()
        single = n / (time.perf_counter() - t0)
        batches = [[{"op": "mint", "account": "a", "amount": 1, "key": f"b{j}-{i}"} for i in range(100)]
                   for j in range(n // 100)]
        t0 = time.perf_counter()
        for f in [store.submit("batch", "operator", {"items": b}) for b in batches]:
            f.result()
        batched = n / (time.perf_counter() - t0)
    finally:
        store.close()
    print("Ledger appends in-process (the writer alone; hash, chain, tree, idempotency row, commit):")
    print(f"  one operation each, group-committed          {single:8.0f} entries/s")
    print(f"  100 operations per batch                     {batched:8.0f} entries/s")


def make_ledger(path: Path, entries: int) -> None:
    """Write a ledger of ``entries`` entries in the service's format (mint, then hold/settle/release
    cycles), with matching balances and a signed head, as the service would leave it."""
    from gpunet.credits._service import open_store
    from gpunet.paths import write_private

    store = open_store(str(path), key_file=path.with_name(path.name + ".ed25519.pem"))
    write_private(path.with_name(path.name + ".operator-token"), store.ensure_operator().encode())
    for name, role in (("alice", "client"), ("bob", "client"), ("gpu-1", "provider"), ("gpu-2", "provider")):
        store.call("create_account", "operator", {"name": name, "role": role})
    store.close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA synchronous=OFF")
    t = "2026-01-01T00:00:00.000000Z"
    prev = ZERO_HASH
    balances = {"alice": 0, "bob": 0, "gpu-1": 0, "gpu-2": 0, ESCROW: 0}
    rows = []
    idx = 0

    def add(kind, src, dst, amount, session, hold, key):
        nonlocal prev, idx
        h = entry_hash(prev, idx, t, kind, src, dst, amount, session, hold, key)
        rows.append((idx, t, kind, src, dst, amount, session, hold, key, prev, h))
        if src:
            balances[src] -= amount
        balances[dst] += amount
        prev = h
        idx += 1

    add("mint", "", "alice", 10**14, "", "", "mint-a")
    add("mint", "", "bob", 10**14, "", "", "mint-b")
    sessions = ["s_" + f"{i:032x}" for i in range(2)]
    cycle = 0
    while idx < entries:
        client = ("alice", "bob")[cycle % 2]
        sid = sessions[cycle % 2]
        hold = "h_" + f"{cycle:032x}"
        add("hold", client, ESCROW, 100, sid, hold, f"k{cycle}")
        if idx < entries:
            if cycle % 4 == 3:
                add("release", ESCROW, client, 100, sid, hold, f"k{cycle}-r")
            else:
                add("settle", ESCROW, ("gpu-1", "gpu-2")[cycle % 2], 60, sid, hold, f"k{cycle}-s")
                if idx < entries:
                    add("release", ESCROW, client, 40, sid, hold, f"k{cycle}-s")
        cycle += 1
        if len(rows) >= 100_000:
            conn.executemany("INSERT INTO entries VALUES (?,?,?,?,?,?,?,?,?,?,?,'')", rows)
            rows.clear()
    conn.executemany("INSERT INTO entries VALUES (?,?,?,?,?,?,?,?,?,?,?,'')", rows)
    for name, bal in balances.items():
        conn.execute("UPDATE accounts SET balance = ? WHERE name = ?", (bal, name))
    conn.commit()
    conn.close()
    # Entries written behind the service's back are what it refuses to start on (it remembers
    # the heads it signed beside its key): let it forget the empty ledger it signed.
    shutil.rmtree(path.with_name(path.name + ".ed25519.pem.heads"))
    store = open_store(str(path), key_file=path.with_name(path.name + ".ed25519.pem"))
    store.call("sign_head", None, {})
    store.close()


def bench_verify(workdir: Path, sizes: list[int]) -> None:
    print("gpunet ledger verify (chain, every hash, Merkle root, signed heads, balances):")
    for n in sizes:
        db = workdir / f"ledger-{n}.sqlite3"
        t0 = time.perf_counter()
        make_ledger(db, n)
        made = time.perf_counter() - t0
        t0 = time.perf_counter()
        summary = verify_database(db)
        inproc = time.perf_counter() - t0
        assert summary["size"] == n
        # `gpunet ledger verify` as a user runs it (its ledger memory in a folder of its own);
        # the CPU seconds it used (its workers included) tell what a loaded machine's wall time hides.
        env = dict(os.environ, GPUNET_DATA_DIR=str(workdir / "reader"))
        cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "gpunet.cli", "ledger", "verify", "--db", str(db)], check=True,
                       capture_output=True, env=env)
        cli = time.perf_counter() - t0
        cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime
        print(f"  {n:>9,} entries: {inproc:5.2f} s in-process, {cli:5.2f} s as the command, which used {cpu:.2f} "
              f"CPU-s ({db.stat().st_size / 2**20:.0f} MiB file, written in {made:.0f} s)")
        if n == max(sizes):
            t0 = time.perf_counter()
            svc = serve_in_background(db, log_path=workdir / "proof.log")
            started = time.perf_counter() - t0
            try:
                import requests

                resp = requests.get(f"{svc.url}/v1/ledger/proof/inclusion", params={"index": n // 3},
                                    headers={"Authorization": f"Bearer {svc.operator_token}"}, timeout=30)
                body = resp.json()
                raw = 32 * len(body["proof"])
                print(f"Inclusion proof at {n:,} entries: {len(body['proof'])} hashes = {raw} bytes raw, "
                      f"{len(resp.content)} bytes as the JSON answer (service start with this ledger: "
                      f"{started:.1f} s)")
            finally:
                svc.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller ledgers and shorter runs")
    parser.add_argument("--seconds", type=float, default=None, help="seconds per HTTP measurement")
    parser.add_argument("--sizes", default=None, help="ledger sizes for verify, comma-separated")
    parser.add_argument("--only-batched", action="store_true",
                        help="measure only the batched hold+settle over HTTP (after a warm-up)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of the batched measurement")
    args = parser.parse_args()
    seconds = args.seconds or (2.0 if args.quick else 4.0)
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else (
        [10_000, 100_000] if args.quick else [100_000, 1_000_000])
    print(f"credits benchmark: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
    with tempfile.TemporaryDirectory(prefix="gpunet-bench-credits-") as tmp:
        workdir = Path(tmp)
        bench_http(workdir, seconds, only_batched=args.only_batched, batched_rounds=args.rounds)
        if args.only_batched:
            return
        bench_appends(workdir, 5_000 if args.quick else 20_000)
        bench_verify(workdir, sizes)


if __name__ == "__main__":
    main()
