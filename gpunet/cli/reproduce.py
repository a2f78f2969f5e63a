"""``gpunet reproduce``: re-run a notebook and check its gpunet cells against their
provenance records, or (``--check-only``) check the records without running anything
(:mod:`gpunet.reproduce`)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from gpunet.errors import ReproduceError


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``reproduce`` to the ``gpunet`` parser."""
    reproduce = subparsers.add_parser(
        "reproduce", help="re-run a notebook and compare its gpunet cells with their provenance records",
        description="Execute NOTEBOOK headless in a fresh kernel (its %%gpunet connect starts an embedded network, "
                    "or joins --connect ADDRESS) and compare each gpunet cell's outputs with the digests its "
                    "provenance records hold: same, within tolerance, different, or not reproducible (no record). "
                    "Exit status 0 only when every cell is same or within tolerance. --check-only runs nothing: "
                    "it checks each record's integrity and the credit receipts the notebook holds.",
    )
    reproduce.add_argument("notebook", metavar="NOTEBOOK.ipynb")
    reproduce.add_argument("--connect", default=None, metavar="ADDRESS",
                           help="the scheduler the notebook's `%%gpunet connect` joins (default: an embedded network)")
    reproduce.add_argument("--report", default=None, metavar="REPORT.html",
                           help="also write an HTML report: the table and each difference side by side")
    reproduce.add_argument("--check-only", action="store_true",
                           help="check the records and receipts without running anything")
    reproduce.add_argument("--public-key", default=None, metavar="HEX",
                           help="the credit service's public key that receipts must be signed with (--check-only)")
    reproduce.add_argument("--timeout", type=int, default=600, metavar="SECONDS",
                           help="longest a cell may run (default 600)")
    reproduce.set_defaults(func=_reproduce)


def _reproduce(args: argparse.Namespace) -> int:
    from gpunet import reproduce as checks

    if args.check_only and args.connect:
        raise ReproduceError("--check-only runs nothing, so --connect means nothing with it: drop one of them")
    if args.timeout <= 0:
        raise ReproduceError(f"--timeout must be a number of seconds > 0, got {args.timeout}")
    started = time.monotonic()
    if args.check_only:
        outcomes = checks.check_only(args.notebook, public_key=args.public_key)
    else:
        outcomes = checks.reproduce(args.notebook, connect=args.connect, timeout=args.timeout)
    print(checks.table(outcomes))
    status = checks.exit_status(outcomes)
    cells = [outcome for outcome in outcomes if outcome.index >= 0]
    good = sum(outcome.good for outcome in cells)
    print(f"\n{good} of {len(cells)} gpunet cells {'check out' if args.check_only else 'reproduce'} "
          f"({time.monotonic() - started:.1f} s)")
    if args.report:
        Path(args.report).write_text(checks.html_report(args.notebook, outcomes), encoding="utf-8")
        print(f"report: {args.report}")
    return status
