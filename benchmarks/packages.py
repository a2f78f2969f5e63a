"""A cell's packages on a provider that lacks them: the first cell of a session, which
waits for the install, against the second, which reuses the session's environment; the
wheel cache's hit rate across two sessions (each session builds its own environment,
the wheels they share are downloaded once); and cells of one session that alternate
between the package's environment and the provider's own (`import numpy`), each switch
of which started a sandbox before the session kept one per environment.

    .venv/bin/python benchmarks/packages.py [--package tabulate==0.9.0] [--sessions 2] [--alternate 4]

A local market (credit service, metered scheduler, one provider worker process whose
install policy is `gpunet provide --allow-installs`'s) in a temp dir; the notebook (this
process) has PACKAGE installed in a folder of its own, the provider does not. Needs the
package registry (PyPI, or PIP_INDEX_URL). Prints figures; never fails on a time.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--package", default="tabulate==0.9.0", help="a small pure-Python package the install lacks")
    parser.add_argument("--sessions", type=int, default=2, help="notebook sessions, one after the other")
    parser.add_argument("--alternate", type=int, default=4, help="rounds of two cells that switch environments")
    args = parser.parse_args()
    name = args.package.split("==")[0]
    with tempfile.TemporaryDirectory(prefix="gpunet-bench-packages-") as folder:
        site = Path(folder) / "notebook-site"
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--only-binary", ":all:",
                        "--target", str(site), args.package], check=True)
        # The provider's worker processes inherit these: its install policy, its data dir
        # (the wheel cache starts empty), and this process's sys.path without the package.
        from gpunet.worker.environment import INSTALLS_ENV, InstallPolicy

        os.environ[INSTALLS_ENV] = InstallPolicy().to_env()
        from gpunet.paths import scratch_data_dir
        from gpunet.testing import local_market

        with scratch_data_dir(prefix="gpunet-bench-packages-data-"), \
                local_market({"provider": 0.0}, directory=folder) as market:
            sys.path.insert(0, str(site))
            hits = misses = 0
            for session in range(1, args.sessions + 1):
                with market.connect() as net:
                    times, environments = [], []
                    for attempt in range(2):
                        namespace: dict = {}
                        started = time.perf_counter()
                        cell = net.run_cell(f"import {name}\nversion = {name}.__version__\n", namespace, quiet=True,
                                            timeout=300)
                        times.append(time.perf_counter() - started)
                        environments.append(cell._results[0].environment or {})
                    first = environments[0]
                    hits += first.get("cache_hits", 0)
                    misses += first.get("cache_misses", 0)
                    print(f"session {session}: first cell {times[0]:.2f} s (built its environment: "
                          f"{first.get('built_now')}, install {first.get('seconds', 0):.2f} s, wheel cache "
                          f"{first.get('cache_hits', 0)} hit(s) / {first.get('cache_misses', 0)} miss(es), "
                          f"{first.get('downloaded_bytes', 0) / 1e3:.0f} kB downloaded); second cell "
                          f"{times[1]:.2f} s (reused: {environments[1].get('built_now') is False})")
            total = hits + misses
            print(f"wheel cache hit rate across {args.sessions} sessions: {hits}/{total}"
                  f" = {hits / total:.0%}" if total else "no wheels were needed")
            if args.alternate > 0:
                alternate(market, name, args.alternate)


#: A cell's count of the cells its sandbox process ran (1: a fresh sandbox).
COUNTED = "import builtins\nbuiltins.cells = getattr(builtins, 'cells', 0) + 1\nn = builtins.cells\ndel builtins\n"


def alternate(market, name: str, rounds: int) -> None:
    """Cells of one session that switch between the package's environment and the
    provider's own: seconds per cell, and how many of them found a fresh sandbox."""
    with market.connect() as net:
        net.run_cell(f"import {name}\n{COUNTED}", {}, quiet=True, timeout=300)  # its environment, built once
        times, fresh = [], 0
        for _ in range(rounds):
            for code in (f"import {name}\n{COUNTED}", f"import numpy\n{COUNTED}"):
                namespace: dict = {}
                started = time.perf_counter()
                net.run_cell(code, namespace, quiet=True, timeout=300)
                times.append(time.perf_counter() - started)
                fresh += namespace["n"] == 1
        times.sort()
        print(f"cells alternating between two environments ({len(times)} cells): median {times[len(times) // 2]:.2f} "
              f"s per cell, mean {sum(times) / len(times):.2f} s; {fresh} of them in a freshly started sandbox")


if __name__ == "__main__":
    main()
