"""The ``%gpunet`` line magic and the ``%%gpunet`` cell magic (``%load_ext gpunet``).

A thin shell over :mod:`gpunet.client`: the flags are declared here with IPython's
``magic_arguments`` (so ``%%gpunet?`` shows the whole usage), and the cell is run
by :func:`gpunet.client.cells.run_cell`, which the Python API uses too::

    In [1]: %load_ext gpunet
    In [2]: %gpunet connect                 # embedded local network
    In [3]: %%gpunet --map seed=range(8) --timeout 60
       ...: import jax
       ...: value = float(jax.random.normal(jax.random.key(seed)))
"""

from __future__ import annotations

import argparse
import shlex
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.core.magic_arguments import MagicArgumentParser, argument, magic_arguments

from gpunet.client.network import connect, current
from gpunet.client.placement import check_max_rate, check_prefer
from gpunet.clitools import read_token_file
from gpunet.errors import GpunetError, OptionError
from gpunet.metering.meter import DEFAULT_HOLD_SECONDS, DEFAULT_ITEM_HOLD_SECONDS
from gpunet.ui.receipt import SessionReceipt
from gpunet.ui.environment import SessionEnvironment
from gpunet.ui.status import NetworkStatus
from gpunet.ui.usage import SessionUsage
from gpunet.verify.quorum import Policy

#: The names IPython defines in every namespace; they never travel.
_NEVER_INPUTS = {"In", "Out", "get_ipython", "exit", "quit", "_gpunet"}


class _Once(argparse.Action):
    """Store a flag's value, refusing the flag given twice (the second would silently win)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        given = namespace.__dict__.setdefault("_given", set())
        if self.dest in given:
            parser.error(f"{option_string} is given twice; give it once")
        given.add(self.dest)
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)


def _flag(*names: str, help: str) -> Any:  # noqa: A002 - argparse's name
    """A true/false flag that may be given once."""
    return argument(*names, action=_Once, nargs=0, const=True, default=False, help=help)


def _tokens(line: str) -> list[str]:
    """The words of a magic's line, split as IPython splits a magic's arguments (quotes
    kept, so that ``--map s=['a','b']`` stays Python), a trailing ``# comment`` dropped."""
    lexer = shlex.shlex(_without_comment(line), posix=False)
    lexer.whitespace_split = True
    lexer.commenters = ""
    try:
        return list(lexer)
    except ValueError as exc:  # an unclosed quote
        raise UsageError(f"cannot read the flags {line.strip()!r}: {exc}") from None


def _without_comment(line: str) -> str:
    """``line`` up to a ``#`` that starts a word outside quotes (``--map x="a#b"`` keeps its ``#``)."""
    quote = None
    for index, char in enumerate(line):
        if quote is not None:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1].isspace()):
            return line[:index]
    return line


LINE_USAGE = """\
%gpunet connect [SCHEDULER] [--credits URL] [--token-file PATH] [--budget CREDITS] [--workers N]
                [--trust-providers] [--max-result-bytes N] [--max-rate R] [--ca FILE] [--pip REQ ...]
                           join SCHEDULER (or GPUNET_SCHEDULER), else start a local network;
                           https://GATEWAY: an open network's gateway, checked against the operator's
                           CA (--ca FILE or GPUNET_GATEWAY_CA), with --token-file only;
                           --max-rate: the most credits per device-second this session pays (only
                           providers at or below it run its cells; default: the operator's);
                           results come back as data, or pickled with --trust-providers;
                           the token comes from --token-file or GPUNET_TOKEN (--token TOKEN works, but is
                           then saved with the notebook)
%gpunet status             workers, their devices and free slots, the defaults of a cell
%gpunet env                the packages this session asks for (found from its cells' imports, and
                           --pip) and, per worker, whether its provider has them or would install them
%gpunet usage              this session's credits: spent, held, left, tasks by worker
%gpunet receipt            keep this session's checked receipt in the notebook
%gpunet disconnect         close the connection (and the local network it started)
%gpunet help               this text, and every flag of %%gpunet"""


CONNECT_PARSER = MagicArgumentParser(prog="%gpunet connect", add_help=False)
CONNECT_PARSER.add_argument("scheduler", nargs="?", default=None)
CONNECT_PARSER.add_argument("--credits", action=_Once, default=None, metavar="URL")
CONNECT_PARSER.add_argument("--token", action=_Once, default=None)
CONNECT_PARSER.add_argument("--token-file", action=_Once, default=None, metavar="PATH",
                            help="a file holding this notebook's credit token (keeps it out of the notebook)")
CONNECT_PARSER.add_argument("--ca", action=_Once, default=None, metavar="FILE",
                            help="the operator's CA certificate (ca.pem) an https:// gateway's certificate must come "
                                 "from (or GPUNET_GATEWAY_CA)")
CONNECT_PARSER.add_argument("--budget", action=_Once, type=int, default=None, metavar="CREDITS")
CONNECT_PARSER.add_argument("--workers", action=_Once, type=int, default=None, metavar="N",
                            help="CPU workers of a local network")
CONNECT_PARSER.add_argument("--trust-providers", action=_Once, nargs=0, const=True, default=False,
                            help="a private network whose providers you trust: results come back pickled (any object)")
CONNECT_PARSER.add_argument("--max-result-bytes", action=_Once, type=int, default=None, metavar="N",
                            help="largest result a job may bring back from providers not trusted (default 256 MiB)")
CONNECT_PARSER.add_argument("--max-rate", action=_Once, type=float, default=None, metavar="R",
                            help="this session's price limit, credits per device-second (default: the operator's)")
CONNECT_PARSER.add_argument("--pip", action="append", default=None, metavar="REQ",
                            help='a package every cell of the session asks for, e.g. --pip "tinycss2==1.4.0" '
                                 "(repeatable; adds to or overrides what the cells' imports find)")

#: The ``%gpunet`` commands that show a display of the current network.
DISPLAYS = {"status": NetworkStatus.of, "usage": SessionUsage, "env": SessionEnvironment, "receipt": SessionReceipt}


@magics_class
class GpunetMagics(Magics):
    """``%gpunet`` (connect, status, usage, disconnect) and ``%%gpunet`` (run a cell remotely)."""

    @magic_arguments("%gpunet")  # the usage line reads %%gpunet: these are the cell magic's flags
    @argument("--gpus", action=_Once, type=int, default=None, metavar="N",
              help="GPUs the cell needs (default: none, any device slot)")
    @argument("--gpu-mem", action=_Once, default=None, metavar="SIZE", help="GPU memory the cell needs, e.g. 40GB")
    @argument("--min-tflops", action=_Once, type=float, default=None, metavar="X",
              help="least measured float32 matmul TFLOP/s of the device")
    @argument("--in", action=_Once, dest="inputs", default=None, metavar="a,b",
              help="names that travel (instead of the detected inputs)")
    @argument("--out", action=_Once, dest="outputs", default=None, metavar="x,y",
              help="names that come back (instead of the detected outputs)")
    @argument("--map", action=_Once, dest="map", default=None, metavar="NAME=EXPR",
              help="run once per item of EXPR with NAME bound to it")
    @argument("--verify", action=_Once, default="none", metavar="none|replicate[:K]|spot[:P]|adaptive",
              help="run on distinct providers and accept what they agree on (default none)")
    @argument("--rtol", action=_Once, type=float, default=None, metavar="X",
              help="relative tolerance for comparing verified floats (default: the kernel's)")
    @argument("--atol", action=_Once, type=float, default=None, metavar="X",
              help="absolute tolerance for comparing verified floats (default: the kernel's)")
    @argument("--max-rate", action=_Once, type=float, default=None, metavar="R",
              help="this cell's price limit, credits per device-second: only providers at or below it run it, "
                   "and its hold is priced at it (default: the session's, %%gpunet connect --max-rate)")
    @argument("--prefer", action=_Once, default="cheapest", metavar="cheapest|fastest",
              help="which free provider within the price limit runs the cell first (default cheapest)")
    @argument("--max-credits", action=_Once, type=float, default=None, metavar="C",
              help="most credits the cell may cost (default: what its --timeout holds)")
    @argument("--timeout", action=_Once, type=float, default=None, metavar="SECONDS",
              help=f"stop the cell after this long (default: what its hold covers, {DEFAULT_HOLD_SECONDS:g} s; "
                   f"{DEFAULT_ITEM_HOLD_SECONDS:g} s per --map item; with --max-credits, that many credits' time)")
    @argument("--pip", action="append", default=None, metavar="REQ",
              help='a package the cell asks for, e.g. --pip "tinycss2==1.4.0" (repeatable; adds to or overrides '
                   "the versions found from its imports)")
    @_flag("--no-block", help="return at once; outputs land when done (handle in _gpunet)")
    @_flag("--quiet", help="no progress display")
    @_flag("--no-reuse",
           help="run a --verify cell even when the network keeps a verified result of the same code and inputs")
    @line_cell_magic
    def gpunet(self, line: str, cell: str | None = None) -> Any:
        """Run the cell on a worker of the gpunet network (``%%gpunet [flags]``), or
        manage the connection (``%gpunet connect|status|usage|disconnect``, see below).

        The cell's inputs travel, it runs on a worker, its outputs come back (as
        lists in item order with ``--map``), with its stdout, displays and errors.
        The handle of the last cell is ``_gpunet`` (``_gpunet.result()`` after
        ``--no-block``).

        Line magic (``%gpunet help`` shows this whole text)::

            %gpunet connect [SCHEDULER] [--credits URL] [--token-file F | --token T] [--budget CREDITS]
                            [--workers N] [--trust-providers] [--max-result-bytes N] [--max-rate R]
            %gpunet status
            %gpunet usage
            %gpunet receipt
            %gpunet disconnect
            %gpunet help

        A trailing ``# comment`` on a magic's line is ignored; a flag given twice is an error.
        """
        if cell is None:
            return self._line(line)
        words = _tokens(line)
        if "--help" in words or "-h" in words:
            print(full_usage())
            return None
        args = self.gpunet.parser.parse_args(words)
        shell = self.shell
        try:
            Policy.parse(args.verify)  # a bad flag is a usage error, connected or not
            check_prefer(args.prefer)
            if args.max_rate is not None:
                check_max_rate(args.max_rate)
            current().run_cell(
                cell, shell.user_ns, gpus=args.gpus, gpu_mem=args.gpu_mem, min_tflops=args.min_tflops,
                inputs=args.inputs, outputs=args.outputs, map=args.map, verify=args.verify, rtol=args.rtol,
                atol=args.atol, max_credits=args.max_credits, timeout=args.timeout, block=not args.no_block,
                quiet=args.quiet, travels=self._travels, handle="_gpunet", reuse=not args.no_reuse,
                max_rate=args.max_rate, prefer=args.prefer, pip=[_unquoted(req) for req in args.pip or ()])
        except OptionError as exc:
            raise UsageError(str(exc)) from None
        return None

    # -- %gpunet ... -------------------------------------------------------------------
    def _line(self, line: str) -> Any:
        words = _tokens(line)
        if not words:
            raise UsageError("%gpunet needs a command:\n" + LINE_USAGE)
        command, rest = words[0], words[1:]
        if command in ("help", "--help", "-h"):
            print(full_usage())
            return None
        if command == "connect":
            args = CONNECT_PARSER.parse_args(rest)
            if args.token and args.token_file:
                raise UsageError("give one of --token and --token-file")
            try:
                token = read_token_file(args.token_file) if args.token_file else args.token
                net = connect(args.scheduler, workers=args.workers, credits=args.credits, token=token,
                              budget=args.budget, trust_providers=args.trust_providers,
                              max_result_bytes=args.max_result_bytes, replace=True, max_rate=args.max_rate,
                              ca=args.ca, pip=[_unquoted(req) for req in args.pip] if args.pip else None)
            except OptionError as exc:
                raise UsageError(str(exc)) from None
            where = net.address if net.embedded is None else f"a local network at {net.address}"
            note = f" ({net.embedded.note})" if net.embedded is not None else ""
            print(f"gpunet: connected to {where}{note}; dashboard: {net.dashboard_link or 'none'}")
            if net.embedded is None:
                print("gpunet: results come back pickled: its providers are trusted (--trust-providers)"
                      if net.trusts_providers else "gpunet: results come back as data only (values, arrays, "
                      "data frames, figures), never as code: its providers are strangers")
            if net.metered:
                usage = net.credits.usage(net.session)
                print(f"gpunet: session {net.session} has a budget of {usage['budget']} credits "
                      f"at {net.credits.url} (%gpunet usage shows what it spent); it pays at most "
                      f"{net.rate_limit:g} credits per device-second (--max-rate)")
            else:
                print("gpunet: this network does not meter work: no credits are held or paid")
            return None
        if command in (*DISPLAYS, "disconnect") and rest:
            raise UsageError(f"%gpunet {command} takes no arguments, got {' '.join(rest)!r}")
        if command in DISPLAYS:
            return DISPLAYS[command](current())
        if command == "disconnect":
            try:
                net = current()
            except GpunetError:
                print("gpunet: not connected")
                return None
            net.close(force=True)
            print(f"gpunet: disconnected from {net.address if not net.embedded else 'the local network'}")
            return None
        raise UsageError(f"unknown %gpunet command {command!r}:\n" + LINE_USAGE)

    def _travels(self, name: str) -> bool:
        """A detected input travels unless it is IPython's own (``In``, ``_3``, ...)."""
        user_ns, hidden = self.shell.user_ns, self.shell.user_ns_hidden
        if name in _NEVER_INPUTS:
            return False
        if name in ("_", "__", "___") or (name.startswith("_") and name.lstrip("_i").isdigit()):
            return False
        return not (name in hidden and hidden[name] is user_ns[name])


def _unquoted(text: str) -> str:
    """``"tinycss2==1.4.0"`` (quotes kept by the magic's word splitting) -> ``tinycss2==1.4.0``."""
    return text[1:-1] if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"" else text


def full_usage() -> str:
    """Everything ``%gpunet`` and ``%%gpunet`` take: the line commands, then every cell flag."""
    return LINE_USAGE + "\n\n" + GpunetMagics.gpunet.parser.format_help()


def load_ipython_extension(ipython: Any) -> None:
    """Register the magics with ``ipython``."""
    ipython.register_magics(GpunetMagics)


def unload_ipython_extension(ipython: Any) -> None:
    """Disconnect a network the magics connected."""
    try:
        current().close(force=True)
    except GpunetError:
        pass
