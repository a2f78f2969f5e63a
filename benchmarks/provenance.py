"""What provenance costs: the trivial %%gpunet cell's round trip with and without its
record, and `gpunet reproduce` on notebooks/montecarlo.ipynb against nbclient alone.

    .venv/bin/python benchmarks/provenance.py [--repeats 200] [--rounds 3] [--notebook-runs 2]

Cells run in an IPython shell whose displays are kept (``capture_output``, as a
notebook keeps them), so that the record is made and shown as in Jupyter. "Without"
turns the recorder off for the round (gpunet has no switch for it; the benchmark
patches :meth:`gpunet.provenance.Recorder.start`). Rounds alternate. Prints figures;
never fails on a time.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cell_round_trips(repeats: int, rounds: int) -> None:
    import io
    import sys

    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output

    import gpunet
    from gpunet import provenance
    from gpunet.client import cells

    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "gpunet")
    net = gpunet.connect()
    shell.user_ns["x"] = 1
    start, finish = provenance.Recorder.start, cells.finish_record
    spent: list[float] = []  # seconds inside the record's own work, per call

    def timed(fn):
        def run(*args, **kwargs):
            began = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent.append(time.perf_counter() - began)
        return run

    cells.finish_record = timed(finish)

    def one_round(recording: bool) -> list[float]:
        provenance.Recorder.start = staticmethod(timed(start)) if recording else staticmethod(lambda *a, **k: None)
        samples = []
        saved = sys.stderr
        sys.stderr = io.StringIO()
        try:
            with capture_output():
                for _ in range(repeats):
                    began = time.perf_counter()
                    shell.run_cell_magic("gpunet", "--quiet", "y = x + 1")
                    samples.append(time.perf_counter() - began)
        finally:
            sys.stderr = saved
            provenance.Recorder.start = start
        return samples

    one_round(True)  # warm-up: the workers' reports are asked once per worker
    with_record, without = [], []
    spent.clear()
    for _ in range(rounds):
        with_record += one_round(True)
        without += one_round(False)
    a, b = statistics.median(with_record) * 1e3, statistics.median(without) * 1e3
    own = sum(spent) / len(with_record) * 1e3
    print(f"%%gpunet --quiet (y = x + 1), {rounds} x {repeats} cells each, metered embedded network")
    print(f"  median with its provenance record     {a:.2f} ms")
    print(f"  median without (recorder off)         {b:.2f} ms")
    print(f"  overhead {100 * (a / b - 1):+.1f}% of the median  (aim: < 5%)")
    print(f"  the record's own work: {own:.3f} ms a cell (making, sealing, showing it) = "
          f"{100 * own / b:.1f}% of the round trip without it")
    import json

    with capture_output():
        shell.run_cell_magic("gpunet", "--quiet", "y = x + 1")
    record = shell.user_ns["_gpunet"].provenance
    print(f"  one record: {len(json.dumps(record))} bytes of JSON in the notebook")
    net.close()


def reproduce_time(runs: int) -> None:
    import nbformat

    from gpunet.reproduce import compare_notebooks, execute

    folder = Path(tempfile.mkdtemp(prefix="gpunet-bench-"))
    try:
        source = ROOT / "notebooks" / "montecarlo.ipynb"
        notebook = nbformat.read(source, as_version=4)
        alone, reproduced = [], []
        recorded = execute(notebook, directory=source.parent)  # the notebook with its records
        for _ in range(runs):
            began = time.perf_counter()
            execute(notebook, directory=source.parent)
            alone.append(time.perf_counter() - began)
            began = time.perf_counter()
            outcomes = compare_notebooks(recorded, execute(recorded, directory=source.parent))
            reproduced.append(time.perf_counter() - began)
        statuses = [outcome.status for outcome in outcomes]
        print(f"notebooks/montecarlo.ipynb, {runs} runs each (each starts a kernel and an embedded network)")
        print(f"  nbclient alone           {', '.join(f'{t:.1f}' for t in alone)} s")
        print(f"  gpunet reproduce         {', '.join(f'{t:.1f}' for t in reproduced)} s")
        print(f"  ratio of medians {statistics.median(reproduced) / statistics.median(alone):.2f}; cells: {statuses}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--notebook-runs", type=int, default=2)
    args = parser.parse_args()
    cell_round_trips(args.repeats, args.rounds)
    if args.notebook_runs:
        reproduce_time(args.notebook_runs)


if __name__ == "__main__":
    from gpunet.paths import scratch_data_dir

    with scratch_data_dir(prefix="gpunet-bench-"):  # its embedded networks leave no run folders behind
        main()
