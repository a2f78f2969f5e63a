"""The ``gpunet`` command line, one parser: ``up``, ``scheduler``, ``provide``
(:mod:`gpunet.cli.network`), ``certs`` (:mod:`gpunet.cli.certs`), ``dashboard`` (:mod:`gpunet.cli.dashboard`),
``credits`` and ``ledger`` (:mod:`gpunet.credits.cli`, beside the credit service they drive),
``reproduce`` (:mod:`gpunet.cli.reproduce`).

A verb module exposes ``add_commands(subparsers)``, which adds its sub-parsers with
``set_defaults(func=...)``; ``func(args)`` returns the exit code, and
:func:`gpunet.clitools.run_command` turns a :class:`~gpunet.errors.GpunetError`
into one line on stderr.

A command naming a credit verb (``gpunet ledger verify``) builds the parser of the credit verbs
alone: the other verbs' modules load Dask, IPython and Starlette (the gateway's), which took the
verify command more CPU than a fifth of its work at a million entries.
"""

from __future__ import annotations

import argparse
import sys

import gpunet
from gpunet.clitools import run_command
from gpunet.credits import cli as credits_cli

#: The verbs of :mod:`gpunet.credits.cli`: a command naming one needs no other verb's module.
CREDIT_VERBS = ("credits", "ledger")


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """Return the parser for every ``gpunet`` verb, or for the credit verbs alone when ``verb`` is one."""
    parser = argparse.ArgumentParser(
        prog="gpunet", description="A decentralized GPU network, Jupyter-native."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    parser.add_argument("--version", action="version", version=f"gpunet {gpunet.__version__}",
                        help="print gpunet's version and exit")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    if verb in CREDIT_VERBS:
        credits_cli.add_commands(subparsers)
        return parser
    # Here only: the gateway's verb loads Dask (and the dashboard's IPython), heavy for the credit verbs.
    from gpunet.cli import certs, dashboard, gateway, network, reproduce

    network.add_commands(subparsers)
    certs.add_commands(subparsers)
    gateway.add_commands(subparsers)
    dashboard.add_commands(subparsers)
    credits_cli.add_commands(subparsers)
    reproduce.add_commands(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``gpunet`` command line; returns the process exit code."""
    args = sys.argv[1:] if argv is None else argv
    verb = next((arg for arg in args if not arg.startswith("-")), None)  # the global options take no value
    return run_command(build_parser(verb), argv)
