"""What every ``gpunet`` command line shares: running a parsed verb.

Both ``gpunet`` (:mod:`gpunet.cli`) and ``python -m gpunet.credits``
(:mod:`gpunet.credits.cli`) import it from here, so neither imports the other.
"""

from __future__ import annotations

import argparse
import logging
import sys

from pathlib import Path

from gpunet.errors import GpunetError, OptionError

logger = logging.getLogger(__name__)


def read_token_file(path: str | Path) -> str:
    """The token in file ``path`` (tokens go in files or the environment, never on a
    command line), with a clear error where it cannot be read or is empty."""
    try:
        token = Path(path).expanduser().read_text().strip()
    except OSError as exc:
        raise OptionError(f"cannot read the token file {path}: {exc.strerror}") from None
    if not token:
        raise OptionError(f"the token file {path} is empty")
    return token


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
