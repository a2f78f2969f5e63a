"""The ``gpunet`` command line: ``up``, ``scheduler``, ``provide``, ``credits``,
``ledger`` and ``reproduce``.

Each verb lives beside the part it drives; this module only wires them into one
``argparse`` parser. A verb module exposes ``add_commands(subparsers)`` which adds
its sub-parsers with ``set_defaults(func=...)``; ``func(args)`` returns the exit code.
"""

from __future__ import annotations

import argparse
import sys

from gpunet.clitools import run_command


def build_parser() -> argparse.ArgumentParser:
    """Return the parser for every ``gpunet`` verb."""
    from gpunet import network_cli
    from gpunet.credits import cli as credits_cli

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


if __name__ == "__main__":  # pragma: no cover - python -m gpunet.cli
    sys.exit(main())
