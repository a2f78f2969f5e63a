"""``gpunet credits ...`` and ``gpunet ledger ...`` (the credit service's verbs)."""

from __future__ import annotations

import argparse


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add the credit service's verbs to the ``gpunet`` parser."""
