"""What every ``gpunet`` command line shares: running a parsed verb.

Both ``gpunet`` (:mod:`gpunet.cli`) and ``python -m gpunet.credits``
(:mod:`gpunet.credits.cli`) import it from here, so neither imports the other.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
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
    args = show_defaults(parser).parse_args(argv)
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


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Help that ends every option taking a value with its default, unless the help
    already says it (``(default 8786)``)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.option_strings and action.nargs != 0 and not action.required and "default" not in text
                and action.default is not argparse.SUPPRESS):
            shown = "none" if action.default is None else "%(default)s"
            text += f" (default: {shown})"
        return text


def every_parser(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """``parser`` and every sub-parser under it."""
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                found += every_parser(sub)
    return found


def show_defaults(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make ``parser`` and its sub-parsers show each option's default in their help."""
    for each in every_parser(parser):
        each.formatter_class = DefaultsHelpFormatter
    return parser


def wait_for(ready: Callable[[], bool], timeout: float, every: float = 0.2) -> bool:
    """Call ``ready()`` until it is true (True) or ``timeout`` seconds passed (False)."""
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            return False
        time.sleep(every)
    return True



def wait_for_stop(ended: Callable[[], bool] = lambda: False) -> None:
    """Block until Ctrl-C, SIGTERM, or ``ended()`` (what the command serves ended by itself)."""
    stopping = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    try:
        while not stopping.wait(0.2) and not ended():
            pass
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
