"""What every ``gpunet`` command line shares: running a parsed verb.

Both ``gpunet`` (:mod:`gpunet.cli`) and ``python -m gpunet.credits``
(:mod:`gpunet.credits.cli`) import it from here, so neither imports the other.
"""

from __future__ import annotations

import argparse
import logging
import sys

from gpunet.errors import GpunetError

logger = logging.getLogger(__name__)


def run_command(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen verb: its errors become one line on stderr
    and exit code 1, Ctrl-C exit code 130."""
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except GpunetError as exc:
        print(f"gpunet {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
