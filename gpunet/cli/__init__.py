"""The ``gpunet`` command line, one parser: ``up``, ``scheduler``, ``provide``
(:mod:`gpunet.cli.network`), ``certs`` (:mod:`gpunet.cli.certs`), ``dashboard`` (:mod:`gpunet.cli.dashboard`),
``credits`` and ``ledger`` (:mod:`gpunet.credits.cli`, beside the credit service they drive),
``reproduce`` (:mod:`gpunet.cli.reproduce`).

A verb module exposes ``add_commands(subparsers)``, which adds its sub-parsers with
``set_defaults(func=...)``; ``func(args)`` returns the exit code, and
:func:`gpunet.clitools.run_command` turns a :class:`~gpunet.errors.GpunetError`
into one line on stderr.
"""

from __future__ import annotations

import argparse

import gpunet
from gpunet.cli import certs, dashboard, gateway, network, reproduce
from gpunet.clitools import run_command
from gpunet.credits import cli as credits_cli


def build_parser() -> argparse.ArgumentParser:
    """Return the parser for every ``gpunet`` verb."""
    parser = argparse.ArgumentParser(
        prog="gpunet", description="A decentralized GPU network, Jupyter-native."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    parser.add_argument("--version", action="version", version=f"gpunet {gpunet.__version__}",
                        help="print gpunet's version and exit")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    network.add_commands(subparsers)
    certs.add_commands(subparsers)
    gateway.add_commands(subparsers)
    dashboard.add_commands(subparsers)
    credits_cli.add_commands(subparsers)
    reproduce.add_commands(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``gpunet`` command line; returns the process exit code."""
    return run_command(build_parser(), argv)
