"""The ``gpunet`` command line: ``up``, ``scheduler``, ``provide``, ``credits``,
``ledger`` and ``reproduce``.

Each verb lives beside the part it drives; this module only wires them into one
``argparse`` parser. A verb module exposes ``add_commands(subparsers)`` which adds
its sub-parsers with ``set_defaults(func=...)``; ``func(args)`` returns the exit code.
"""

from __future__ import annotations

import argparse
import logging
import sys

from gpunet.errors import GpunetError


def build_parser() -> argparse.ArgumentParser:
    """Return the parser for every ``gpunet`` verb."""
    from gpunet import credits_cli, network_cli

    parser = argparse.ArgumentParser(
        prog="gpunet", description="A decentralized GPU network, Jupyter-native."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    network_cli.add_commands(subparsers)
    credits_cli.add_commands(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``gpunet`` command line; returns the process exit code."""
    return run_command(build_parser(), argv)


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


if __name__ == "__main__":  # pragma: no cover - python -m gpunet.cli
    sys.exit(main())
