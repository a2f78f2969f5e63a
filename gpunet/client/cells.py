"""Running a cell on the network and landing its outputs, with or without IPython.

:func:`run_cell` is what ``%%gpunet`` does, as a function of the cell's code and a
namespace (the notebook's ``user_ns``, or any dict): it finds the cell's inputs and
outputs (:mod:`gpunet.cell`), sends it with the inputs' values, shows its live
output and progress, and on success puts its outputs into the namespace and shows
its displays. One bad output changes nothing in the namespace.

    >>> import gpunet
    >>> net = gpunet.connect()
    >>> namespace = {"x": 20}
    >>> cell = net.run_cell("y = x + 1\nprint(y)", namespace)   # prints 21 from the worker
    >>> namespace["y"]
    21
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterable
from functools import partial
from typing import TYPE_CHECKING, Any

from IPython.display import display

from gpunet import codec, wire
from gpunet.cell import CellAnalysis, analyze
from gpunet.client.handle import new_job_id, pickled
from gpunet.client.placement import check_prefer, resources_for
from gpunet.client.received import shown_display
from gpunet.client.reused import offer_for_reuse, reused_result
from gpunet.client.submit import raise_for_error
from gpunet.errors import CellError, GpunetError, MissingOutputError, OptionError
from gpunet.provenance import Recorder, finish_record, show_record
from gpunet.ui.progress import JobProgress
from gpunet.verify.quorum import tolerance_if_verified
from gpunet.wire import Job, JobResult

if TYPE_CHECKING:  # pragma: no cover
    from gpunet.client.handle import Connection, JobHandle
    from gpunet.verify.quorum import Policy


def run_cell(net: Connection, code: str, namespace: dict[str, Any], *, gpus: int | None = None,
             gpu_mem: int | str | None = None, min_tflops: float | None = None,
             inputs: Iterable[str] | str | None = None, outputs: Iterable[str] | str | None = None,
             map: str | None = None, verify: str | Policy | None = None,  # noqa: A002 - the flag's name
             rtol: float | None = None, atol: float | None = None, max_credits: float | None = None,
             timeout: float | None = None, block: bool = True, quiet: bool = False,
             travels: Callable[[str], bool] | None = None, handle: str | None = None, reuse: bool = True,
             max_rate: float | None = None, prefer: str = "cheapest",
             pip: Iterable[str] | str | None = None) -> CellRun:
    """Run ``code`` on a worker of ``net`` with its inputs from ``namespace`` and land
    its outputs there; the options mean what the ``%%gpunet`` flags of the same names
    mean (``map="seed=range(8)"`` is ``--map``, ``block=False`` is ``--no-block``,
    ``reuse=False`` is ``--no-reuse``: a ``verify`` cell whose code and inputs match a
    verified result the network keeps gets that result at no cost, see :mod:`gpunet.reuse`;
    ``max_rate`` is ``--max-rate``, the cell's price limit, and ``prefer`` ``--prefer``;
    ``pip=["pkg==1.2"]`` is ``--pip``: requirements added to, or overriding, those found
    from the cell's imports, see :mod:`gpunet.packages`).

    Detected inputs that ``namespace`` lacks, or for which ``travels(name)`` is
    false (IPython's own names, for the magic), do not travel. With ``handle`` the
    :class:`CellRun` is put in ``namespace`` under that name as soon as the cell is
    sent (the magic's ``_gpunet``), so that a cell still running can be reached. Returns the :class:`CellRun` (finished unless ``block=False``); raises the
    cell's remote error, :class:`~gpunet.errors.CellError` for a cell that cannot be
    sent, :class:`~gpunet.errors.OptionError` for an option that cannot be used.
    """
    tolerance = tolerance_if_verified(verify, code, rtol=rtol, atol=atol)
    check_prefer(prefer)
    if not reuse and tolerance is None:
        raise OptionError("--no-reuse matters only with --verify (only verified results are reused); drop it, "
                          "or verify the cell")
    if max_credits is not None and not net.metered:
        raise OptionError("--max-credits needs a metered network: %gpunet connect --credits URL --token TOKEN, "
                          "or %gpunet connect with no address for a local one")
    analysis = analyze(code)
    pip = [pip] if isinstance(pip, str) else list(pip or ())
    map_name, items = _map_items(map, namespace)
    asked_inputs, asked_outputs = _names(inputs), _names(outputs)
    if asked_inputs is not None:
        missing = [name for name in asked_inputs if name not in namespace]
        if missing:
            raise CellError(f"--in names {', '.join(missing)}, which the notebook does not define; "
                            "define it or drop it from --in")
        input_names = asked_inputs
    else:
        input_names = [name for name in analysis.inputs
                       if name != map_name and name in namespace and (travels is None or travels(name))]
    output_names = asked_outputs if asked_outputs is not None else [
        name for name in analysis.outputs if name != map_name]
    resources = resources_for(gpus=gpus, gpu_mem=gpu_mem)
    # the job holds for its --timeout (or the default hold); it is stopped after it, or after the default
    wait_s = net.timeout_for(timeout, count=1 if items is None else len(items), max_credits=max_credits,
                             max_rate=max_rate)
    workers = None if min_tflops is None else net.workers_with(min_tflops=min_tflops)
    # Each input is pickled on its own, so that one that cannot travel is named.
    job = Job(
        new_job_id(), code=code, inputs={name: pickled(namespace[name], f"input {name!r}", name=name) for name in input_names},
        outputs=tuple(output_names), strict_outputs=asked_outputs is not None,
        display_last_expression=analysis.displays_last_expression, map_name=map_name, topic=net.topic,
        announce=items is None and (not quiet or max_credits is not None),
    )
    flags = dict(gpus=gpus, gpu_mem=gpu_mem, min_tflops=min_tflops, inputs=inputs, outputs=outputs, map=map,
                 verify=None if verify is None else str(verify), rtol=rtol, atol=atol, max_credits=max_credits,
                 timeout=timeout, max_rate=max_rate, pip=pip or None)
    record = partial(Recorder.start, Recorder.for_cell, code, {name: namespace[name] for name in input_names},
                     map_name=map_name, items=items, flags=flags, tolerance=tolerance)
    # a verified result the network already has is reused (gpunet.reuse); its key needs the digests first
    recorder = record() if reuse and tolerance is not None and net.reuses_results else None
    remote = reused_result(net, job, recorder, mapped=items is not None) if recorder is not None else None
    if remote is None:
        remote = net.submit(job, resources=resources, items=items, workers=workers, max_credits=max_credits,
                            timeout=timeout, verify=verify, tolerance=tolerance, max_rate=max_rate, prefer=prefer,
                            pip=pip, reuse=reuse and tolerance is not None)
    progress = None if quiet else JobProgress("gpunet", total=len(items) if items is not None else 1)
    recorder = recorder or record()  # otherwise the inputs' digests are taken while the cell runs
    cell = CellRun(namespace, remote, analysis, progress, timeout=wait_s, recorder=recorder)
    if handle is not None:
        namespace[handle] = cell
    net.sent()
    if block:
        cell.run()
    else:
        cell.start_background()
    return cell


def _names(names: Iterable[str] | str | None) -> list[str] | None:
    """``"a, b"`` or ``["a", "b"]`` -> ["a", "b"]; OptionError for what is not a Python name."""
    if names is None:
        return None
    if isinstance(names, str):
        names = names.split(",")
    listed = [name.strip() for name in names if name.strip()]
    bad = [name for name in listed if not name.isidentifier()]
    if bad:
        raise OptionError(f"not a Python name: {', '.join(bad)} (write --in a,b / --out x,y)")
    return listed


def _map_items(spec: str | None, namespace: dict[str, Any]) -> tuple[str | None, list[Any] | None]:
    """``"seed=range(8)"`` -> ("seed", [0, ..., 7]), EXPR evaluated in a copy of
    ``namespace`` (so a name EXPR binds, ``xs:=...``, does not land in the notebook)."""
    if spec is None:
        return None, None
    name, sep, expression = spec.partition("=")
    name = name.strip()
    if not sep or not name.isidentifier() or not expression.strip():
        raise OptionError(f"--map wants NAME=EXPR, e.g. --map seed=range(8); got {spec!r}")
    try:
        items = list(eval(expression, {**namespace}))  # noqa: S307 - the user's own expression, in a copy of their namespace
    except Exception as exc:  # noqa: BLE001 - the user's expression
        raise CellError(f"--map {name}={expression}: evaluating {expression!r} here failed: "
                        f"{type(exc).__name__}: {exc}") from None
    if not items:
        raise CellError(f"--map {name}={expression}: {expression!r} has no items, so nothing would run")
    return name, items


class CellRun:
    """A cell that was sent (``_gpunet`` in the notebook after a ``%%gpunet`` cell).

    ``result()`` waits for it and brings its outputs, output text and displays into
    the namespace (or raises its error); ``done()`` says whether it finished;
    ``cancel()`` stops it on its worker.
    """

    def __init__(self, namespace: dict[str, Any], remote: JobHandle, analysis: CellAnalysis,
                 progress: JobProgress | None, *, timeout: float | None, recorder: Recorder | None = None) -> None:
        self.namespace = namespace
        self.recorder = recorder
        #: the cell's provenance record (:mod:`gpunet.provenance`) once it finished well
        self.provenance: dict[str, Any] | None = None
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
        self._wait(foreground=True)
        if self._error is not None:
            raise self._error

    def start_background(self) -> None:
        """--no-block: wait in a thread; outputs land in the namespace when done."""
        self._thread = threading.Thread(target=self._wait, args=(False,), name=f"gpunet-{self.remote.job.job_id}",
                                        daemon=True)
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
                self.remote.echo_rest(result)
                _show(result)
            if self.provenance is not None:
                show_record(self.provenance)
        if self._error is not None:
            raise self._error
        return self.outputs

    def _wait(self, foreground: bool) -> None:
        """Wait for the cell and land its outputs; an error is kept for :meth:`run` or
        :meth:`result`. In the foreground its output text and displays show at once,
        in the background when :meth:`result` is called."""
        try:
            self._results = self.remote.wait(self.timeout, progress=self.progress, echo=foreground)
            if foreground:
                for result in self._results:
                    _show(result)
            self.outputs = self._collect_outputs(self._results)
            self.namespace.update(self.outputs)
            self.provenance = finish_record(self.recorder, self.remote, self._results, self.outputs, show=foreground)
            offer_for_reuse(self.remote.network, self.remote, self._results, self.provenance)
        except KeyboardInterrupt:  # stopped on its workers by the handle: say so in one line
            self._error = _interrupted()
            line = cancelled_line(self.remote)
            if self.progress is not None:
                self.progress.cancelled(line)
            else:
                print(line, flush=True)
            return
        except BaseException as exc:  # noqa: BLE001 - raised by run() or result()
            self._error = exc
        if self.progress is not None:
            hint = "" if foreground else ": _gpunet.result() shows it"
            note = f" ({type(self._error).__name__}{hint})" if self._error else ""
            self.progress.finish(ok=self._error is None, note=note)

    def _collect_outputs(self, results: list[JobResult]) -> dict[str, Any]:
        """Decode every output first, so that one bad output changes nothing."""
        mapped = self.remote.mapped
        for result in results:
            raise_for_error(result, label=f", item {result.index}" if mapped else "")
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
                message = reason if result.result_format == wire.CODEC else (
                    f"output {name!r} ({type_name}) cannot be pickled to come back from {result.worker} ({reason})")
                if job.strict_outputs:
                    raise CellError(message + "; leave it out of --out. Nothing was changed in the notebook.")
                print(f"gpunet: {message}; it stayed on the worker (choose outputs with --out)")
        decoded: dict[str, list[Any]] = {name: [] for name in job.outputs}
        for result in results:
            for name in job.outputs:
                blob = result.outputs.get(name)
                try:
                    decoded[name].append(None if blob is None else codec.load(blob, result.result_format,
                                                                              what=f"output {name!r}"))
                except GpunetError:
                    raise
                except Exception as exc:  # noqa: BLE001 - e.g. a module the notebook lacks
                    raise CellError(
                        f"output {name!r} came back but cannot be unpickled here ({type(exc).__name__}: {exc}); "
                        "install what it needs in the notebook's environment, or leave it out with --out. "
                        "Nothing was changed in the notebook."
                    ) from None
        if mapped:
            return {name: values for name, values in decoded.items() if any(r.outputs.get(name) for r in results)}
        return {name: values[0] for name, values in decoded.items() if name in results[0].outputs}


def cancelled_line(remote: JobHandle) -> str:
    """The one line that says a job was stopped by Ctrl-C, after how long, and what it was
    charged once the scheduler closed its hold."""
    return f"gpunet: cancelled after {time.monotonic() - remote.submitted:.1f} s ({_cost(remote)})"


def stopped_by_ctrl_c(remote: JobHandle) -> KeyboardInterrupt:
    """Print :func:`cancelled_line` for a ``net.run`` / ``net.map`` job stopped by Ctrl-C and
    return the bare ``KeyboardInterrupt`` to raise in its place (no traceback through gpunet)."""
    print(cancelled_line(remote), flush=True)
    return _interrupted()


def _cost(remote: JobHandle) -> str:
    """What a job stopped by Ctrl-C was charged, once the scheduler closed its hold."""
    meter = remote.network.meter
    if meter is None:  # through a gateway the gateway's meter knows: the session's usage says
        return "%gpunet usage shows what the session spent" if remote.network.metered else "not metered"
    try:
        drew_on = getattr(remote, "drew_on", None)
        charged = (meter.charged_from(drew_on, remote.job.job_id, remote.tasks) if drew_on
                   else meter.charged(remote.placed_holds()))
    except Exception as exc:  # noqa: BLE001 - the line must come even so
        return f"what it was charged is unknown: {type(exc).__name__}; %gpunet usage shows it"
    if charged is None:
        return "its hold is still settling; %gpunet usage shows what it cost"
    return "nothing charged" if charged == 0 else f"charged {charged} credit{'s' if charged != 1 else ''}"


def _interrupted() -> KeyboardInterrupt:
    """The ``KeyboardInterrupt`` of a cell stopped by Ctrl-C, after the line that said
    what it cost: IPython shows it as that one word, not a traceback through gpunet."""
    interrupt = KeyboardInterrupt()
    interrupt._render_traceback_ = lambda: ["KeyboardInterrupt"]  # type: ignore[attr-defined]
    return interrupt


def _show(result: JobResult) -> None:
    """Display a result's MIME bundles (figures, HTML reprs): as they were made where
    the notebook trusts its providers, else only what :func:`shown_display` lets
    through (a note says what was dropped)."""
    for data, metadata in result.displays:
        if result.result_format == wire.CODEC:
            data, metadata, dropped = shown_display(data, metadata)
            if dropped:
                print(f"gpunet: dropped {', '.join(dropped)} from a display sent by {result.worker} (only text, "
                      "images, and sanitized SVG and HTML come from providers this notebook does not trust)",
                      file=sys.stderr)
            if not data:
                continue
        display(data, raw=True, metadata=metadata)
