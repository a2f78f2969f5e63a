"""The ``%gpunet`` line magic and the ``%%gpunet`` cell magic (``%load_ext gpunet``).

Line magic::

    In [1]: %load_ext gpunet
    In [2]: %gpunet connect                 # embedded local network
    In [3]: %gpunet connect tcp://10.0.0.5:8786
    In [4]: %gpunet status                  # workers, devices, free slots
    In [5]: %gpunet disconnect

Cell magic::

    In [6]: %%gpunet --map seed=range(8) --timeout 60
       ...: import jax
       ...: value = float(jax.random.normal(jax.random.key(seed)))

The cell's inputs travel, it runs on a worker, its outputs come back (as lists in
item order with ``--map``), with its stdout, displays and errors.
"""

from __future__ import annotations

import shlex
import threading
from typing import Any

import cloudpickle
from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.core.magic_arguments import MagicArgumentParser
from IPython.display import display

from gpunet import jobs, network
from gpunet.cell import CellAnalysis, analyze
from gpunet.devices import parse_size
from gpunet.errors import CellError, GpunetError, MissingOutputError
from gpunet.remote import Job, JobResult
from gpunet.widgets import JobProgress
from gpunet.verify import Policy, VerificationError, tolerance_for

#: The names IPython defines in every namespace; they never travel.
_NEVER_INPUTS = {"In", "Out", "get_ipython", "exit", "quit", "_gpunet"}

LINE_USAGE = """\
%gpunet connect [SCHEDULER] [--credits URL] [--token TOKEN] [--budget CREDITS] [--workers N]
                                             join SCHEDULER (or GPUNET_SCHEDULER), else start a local network
%gpunet status                               workers, their devices and free slots
%gpunet usage                                this session's credits: spent, held, left, tasks by worker
%gpunet disconnect                           close the connection (and the local network it started)"""


def _cell_parser() -> MagicArgumentParser:
    parser = MagicArgumentParser(
        prog="%%gpunet", add_help=False,
        description="Run the cell on a worker of the gpunet network.",
    )
    parser.add_argument("--gpus", type=int, default=None, metavar="N", help="GPUs the cell needs")
    parser.add_argument("--gpu-mem", default=None, metavar="SIZE", help="GPU memory the cell needs, e.g. 40GB")
    parser.add_argument("--min-tflops", type=float, default=None, metavar="X",
                        help="least measured float32 matmul TFLOP/s of the device")
    parser.add_argument("--in", dest="inputs", default=None, metavar="a,b", help="names that travel (instead of the detected inputs)")
    parser.add_argument("--out", dest="outputs", default=None, metavar="x,y", help="names that come back (instead of the detected outputs)")
    parser.add_argument("--map", dest="map", default=None, metavar="NAME=EXPR", help="run once per item of EXPR with NAME bound to it")
    parser.add_argument("--verify", default="none", metavar="none|replicate[:K]|spot[:P]|adaptive",
                        help="run on distinct providers and accept what they agree on")
    parser.add_argument("--rtol", type=float, default=None, metavar="X",
                        help="relative tolerance for comparing verified floats (default: the kernel's)")
    parser.add_argument("--atol", type=float, default=None, metavar="X",
                        help="absolute tolerance for comparing verified floats (default: the kernel's)")
    parser.add_argument("--max-credits", type=float, default=None, metavar="C", help="most credits the cell may cost")
    parser.add_argument("--timeout", type=float, default=None, metavar="SECONDS", help="stop the cell after this long")
    parser.add_argument("--no-block", action="store_true", help="return at once; outputs land when done (handle in _gpunet)")
    parser.add_argument("--quiet", action="store_true", help="no progress display")
    return parser


def _connect_parser() -> MagicArgumentParser:
    parser = MagicArgumentParser(prog="%gpunet connect", add_help=False)
    parser.add_argument("scheduler", nargs="?", default=None)
    parser.add_argument("--credits", default=None, metavar="URL")
    parser.add_argument("--token", default=None)
    parser.add_argument("--budget", type=float, default=None, metavar="CREDITS")
    parser.add_argument("--workers", type=int, default=None, metavar="N", help="CPU workers of a local network")
    return parser


CELL_PARSER = _cell_parser()
CONNECT_PARSER = _connect_parser()


def _names(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [name.strip() for name in text.split(",") if name.strip()]
    bad = [name for name in names if not name.isidentifier()]
    if bad:
        raise UsageError(f"not a Python name: {', '.join(bad)} (write --in a,b / --out x,y)")
    return names


@magics_class
class GpunetMagics(Magics):
    """``%gpunet`` (connect, status, usage, disconnect) and ``%%gpunet`` (run a cell remotely)."""

    @line_cell_magic
    def gpunet(self, line: str, cell: str | None = None) -> Any:
        """Run the cell on a gpunet worker, or manage the connection (see ``%gpunet``)."""
        if cell is None:
            return self._line(line)
        return self._cell(line, cell)

    # -- %gpunet ... -------------------------------------------------------------------
    def _line(self, line: str) -> Any:
        words = shlex.split(line)
        if not words:
            raise UsageError("%gpunet needs a command:\n" + LINE_USAGE)
        command, rest = words[0], line.split(None, 1)[1] if len(words) > 1 else ""
        if command == "connect":
            args = CONNECT_PARSER.parse_argstring(rest)
            net = network.connect(args.scheduler, workers=args.workers, credits=args.credits,
                                  token=args.token, budget=args.budget)
            where = net.address if net.embedded is None else f"a local network at {net.address}"
            note = f" ({net.embedded.note})" if net.embedded is not None else ""
            print(f"gpunet: connected to {where}{note}; dashboard: {net.dashboard_link or 'none'}")
            if net.meter is not None:
                usage = net.credits.usage(net.session)
                print(f"gpunet: session {net.session} has a budget of {usage['budget']} credits "
                      f"at {net.credits.url} (%gpunet usage shows what it spent)")
            else:
                print("gpunet: this network does not meter work: no credits are held or paid")
            return None
        if command in ("status", "usage", "disconnect") and rest.strip():
            raise UsageError(f"%gpunet {command} takes no arguments, got {rest.strip()!r}")
        if command == "status":
            from gpunet.status import NetworkStatus

            return NetworkStatus.of(network.current())
        if command == "usage":
            from gpunet.metering import SessionUsage

            return SessionUsage(network.current())
        if command == "disconnect":
            try:
                net = network.current()
            except GpunetError:
                print("gpunet: not connected")
                return None
            net.close()
            print(f"gpunet: disconnected from {net.address if not net.embedded else 'the local network'}")
            return None
        raise UsageError(f"unknown %gpunet command {command!r}:\n" + LINE_USAGE)

    # -- %%gpunet ----------------------------------------------------------------------
    def _cell(self, line: str, cell: str) -> Any:
        args = CELL_PARSER.parse_argstring(line)
        try:
            policy = Policy.parse(args.verify)
            tolerance = tolerance_for(cell, rtol=args.rtol, atol=args.atol) if policy.active else None
        except VerificationError as exc:
            raise UsageError(str(exc)) from None
        if not policy.active and (args.rtol is not None or args.atol is not None):
            raise UsageError("--rtol / --atol are tolerances for comparing verified copies: give --verify too")
        net = network.current()
        if args.max_credits is not None and net.meter is None:
            raise UsageError("--max-credits needs a metered network: %gpunet connect --credits URL --token TOKEN, "
                             "or %gpunet connect with no address for a local one")
        analysis = analyze(cell)
        map_name, items = self._map_items(args.map)
        inputs = _names(args.inputs)
        outputs = _names(args.outputs)
        input_names = inputs if inputs is not None else [
            name for name in analysis.inputs if name != map_name and self._travels(name)
        ]
        values = self._input_values(input_names, explicit=inputs is not None)
        output_names = outputs if outputs is not None else [name for name in analysis.outputs if name != map_name]
        try:
            gpu_mem = None if args.gpu_mem is None else parse_size(args.gpu_mem)
        except ValueError as exc:
            raise UsageError(f"--gpu-mem: {exc}") from None
        resources = net.resources_for(gpus=args.gpus, gpu_mem=gpu_mem)
        workers = None if args.min_tflops is None else net.workers_with(min_tflops=args.min_tflops)
        job = Job(
            jobs.new_job_id(), code=cell, inputs=jobs.pickle_inputs(values), outputs=tuple(output_names),
            strict_outputs=outputs is not None, display_last_expression=analysis.displays_last_expression,
            map_name=map_name, topic=net.topic,
            announce=items is None and (not args.quiet or args.max_credits is not None),
        )
        remote = net.submit(job, resources=resources, items=items, workers=workers, max_credits=args.max_credits,
                            timeout=args.timeout, verify=policy, tolerance=tolerance)
        progress = None if args.quiet else JobProgress("gpunet", total=len(items) if items is not None else 1)
        handle = CellHandle(self.shell, remote, analysis, progress, timeout=args.timeout)
        self.shell.user_ns["_gpunet"] = handle
        if args.no_block:
            handle.start_background()
            return None
        handle.run()
        return None

    def _travels(self, name: str) -> bool:
        """A detected input travels if the notebook has it and it is not IPython's own."""
        user_ns, hidden = self.shell.user_ns, self.shell.user_ns_hidden
        if name not in user_ns or name in _NEVER_INPUTS:
            return False
        if name in ("_", "__", "___") or (name.startswith("_") and name.lstrip("_i").isdigit()):
            return False
        return not (name in hidden and hidden[name] is user_ns[name])

    def _input_values(self, names: list[str], *, explicit: bool) -> dict[str, Any]:
        user_ns = self.shell.user_ns
        missing = [name for name in names if name not in user_ns]
        if missing and explicit:
            raise CellError(f"--in names {', '.join(missing)}, which the notebook does not define; define it or drop it from --in")
        return {name: user_ns[name] for name in names if name in user_ns}

    def _map_items(self, spec: str | None) -> tuple[str | None, list[Any] | None]:
        if spec is None:
            return None, None
        name, sep, expression = spec.partition("=")
        name = name.strip()
        if not sep or not name.isidentifier() or not expression.strip():
            raise UsageError(f"--map wants NAME=EXPR, e.g. --map seed=range(8); got {spec!r}")
        try:
            items = list(self.shell.ev(expression))
        except Exception as exc:  # noqa: BLE001 - the user's expression
            raise CellError(f"--map {name}={expression}: evaluating {expression!r} here failed: "
                            f"{type(exc).__name__}: {exc}") from None
        if not items:
            raise CellError(f"--map {name}={expression}: {expression!r} has no items, so nothing would run")
        return name, items


class CellHandle:
    """A %%gpunet cell that was sent: ``_gpunet`` in the notebook.

    ``result()`` waits for it and brings its outputs, output text and displays into
    the notebook (or raises its error); ``done()`` says whether it finished;
    ``cancel()`` stops it on its worker.
    """

    def __init__(self, shell: Any, remote: jobs.RemoteJob, analysis: CellAnalysis, progress: JobProgress | None,
                 *, timeout: float | None) -> None:
        self.shell = shell
        self.remote = remote
        self.analysis = analysis
        self.progress = progress
        self.timeout = timeout
        self.outputs: dict[str, Any] = {}
        self._results: list[JobResult] | None = None
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._shown = False

    def __repr__(self) -> str:
        state = "done" if self.done() else "running"
        return f"<gpunet cell {self.remote.job.job_id} {state}>"

    def done(self) -> bool:
        """True once the cell has finished on the network."""
        return self.remote.done()

    def cancel(self) -> None:
        """Stop the cell on its worker."""
        self.remote.stop("cancelled")

    def run(self) -> None:
        """Wait in the foreground, showing output as it comes, then land the outputs."""
        try:
            results = self.remote.wait(self.timeout, progress=self.progress)
            self._land(results)
        except BaseException as exc:
            if self.progress is not None:
                self.progress.finish(ok=False, note=f" ({type(exc).__name__})")
            raise
        if self.progress is not None:
            self.progress.finish(ok=True)

    def start_background(self) -> None:
        """--no-block: wait in a thread; outputs land in the namespace when done."""
        def wait() -> None:
            try:
                self._results = self.remote.wait(self.timeout, progress=self.progress, echo=False)
                self.outputs = self._collect_outputs(self._results)
                self.shell.user_ns.update(self.outputs)
            except BaseException as exc:  # noqa: BLE001 - kept for result()
                self._error = exc
            if self.progress is not None:
                note = f" ({type(self._error).__name__}: _gpunet.result() shows it)" if self._error else ""
                self.progress.finish(ok=self._error is None, note=note)

        self._thread = threading.Thread(target=wait, name=f"gpunet-{self.remote.job.job_id}", daemon=True)
        self._thread.start()
        print(f"gpunet: sent; outputs {', '.join(self.remote.job.outputs) or '(none)'} land when it is done "
              "(_gpunet.result() waits and shows its output)")

    def result(self, timeout: float | None = None) -> dict[str, Any]:
        """Wait for a --no-block cell; show its output and return its outputs by name."""
        if self._thread is None:
            return self.outputs
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"the cell is still running after {timeout} s")
        if not self._shown and self._results is not None:
            self._shown = True
            for result in self._results:
                self.remote._echo_rest(result)
                _show(result)
        if self._error is not None:
            raise self._error
        return self.outputs

    def _land(self, results: list[JobResult]) -> None:
        for result in results:
            _show(result)
        self.outputs = self._collect_outputs(results)
        self.shell.user_ns.update(self.outputs)

    def _collect_outputs(self, results: list[JobResult]) -> dict[str, Any]:
        """Decode every output first, so that one bad output changes nothing."""
        mapped = self.remote.mapped
        for result in results:
            jobs.raise_for_error(result, label=f", item {result.index}" if mapped else "")
        job = self.remote.job
        for result in results:
            if result.missing_outputs:
                where = f" (item {result.index})" if mapped else ""
                raise MissingOutputError(
                    f"the cell never assigned {', '.join(result.missing_outputs)}{where}, which --out asks for; "
                    "assign it in the cell or drop it from --out. Nothing was changed in the notebook.",
                    names=result.missing_outputs,
                )
            for name, type_name, reason in result.unpicklable_outputs:
                message = (f"output {name!r} ({type_name}) cannot be pickled to come back from {result.worker} "
                           f"({reason})")
                if job.strict_outputs:
                    raise CellError(message + "; leave it out of --out. Nothing was changed in the notebook.")
                print(f"gpunet: {message}; it stayed on the worker (choose outputs with --out)")
        decoded: dict[str, list[Any]] = {name: [] for name in job.outputs}
        for result in results:
            for name in job.outputs:
                blob = result.outputs.get(name)
                try:
                    decoded[name].append(None if blob is None else cloudpickle.loads(blob))
                except Exception as exc:  # noqa: BLE001 - e.g. a module the notebook lacks
                    raise CellError(
                        f"output {name!r} came back but cannot be unpickled here ({type(exc).__name__}: {exc}); "
                        "install what it needs in the notebook's environment, or leave it out with --out. "
                        "Nothing was changed in the notebook."
                    ) from None
        if mapped:
            return {name: values for name, values in decoded.items() if any(r.outputs.get(name) for r in results)}
        return {name: values[0] for name, values in decoded.items() if name in results[0].outputs}


def _show(result: JobResult) -> None:
    for data, metadata in result.displays:
        display(data, raw=True, metadata=metadata)


def load_ipython_extension(ipython: Any) -> None:
    """Register the magics with ``ipython``."""
    ipython.register_magics(GpunetMagics)


def unload_ipython_extension(ipython: Any) -> None:
    """Disconnect a network the magics connected."""
    try:
        network.current().close()
    except GpunetError:
        pass
