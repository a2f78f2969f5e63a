"""The worker side of a gpunet job: runs a cell (or a function) where it can be stopped.

The client sends a :class:`Job` as an ordinary Dask task whose function is
:func:`run_job`; it runs in a worker thread. While it runs:

- ``print`` output and ``sys.stderr`` writes of that thread go to the job, which
  forwards them to the client as events on the job's topic
  (``Worker.log_event`` -> ``Client.subscribe_topic``), a few times a second at most;
- ``display(obj)`` and matplotlib figures become MIME bundles, as IPython would make;
- the thread is registered under the job id, so :func:`stop_job` (sent with
  ``Client.run``, which runs on the worker's event loop even when every worker thread
  is busy) can raise :class:`JobInterrupted` inside it. ``future.cancel()`` alone
  would leave the thread running.

The result is a :class:`JobResult` whose outputs are encoded one by one here, so an
output that cannot travel is named instead of failing the whole transfer. A job
for a notebook that does not trust its providers (``Job.result_format == CODEC``)
comes back as codec bytes (:mod:`gpunet.codec`): values, exceptions (type name,
message, traceback text), displays and output text as data, within the job's caps
(its encoded result, and its output text per second run). Live events are signed
with the job's ``event_key`` (:func:`gpunet.wire.sign_event`).
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import dataclasses
import builtins
import ctypes
import functools
import io
import linecache
import logging
import os
import sys
import threading
import time
import traceback
import warnings
from typing import Any, Callable, Iterator

import cloudpickle

import gpunet
from gpunet import codec
from gpunet.cell import cell_filename
from gpunet.errors import BudgetError, PackageError, UnsupportedResultError
from gpunet.wire import (
    CODEC,
    INTERRUPTED,
    PACKAGES,
    TOO_LARGE,
    VERSION_MISMATCH,
    Job,
    JobResult,
    Pickled,
    result_to_event,
    reads_frames,
    sign_event,
    stream_allowance,
    unpickle_value,
)
from gpunet.worker.device import describe_this_device, device_info
from gpunet.worker.environment import (
    InstallStopped,
    PreparedEnvironment,
    checked_requirements,
    installed_distributions,
    layered,
    unmet,
)

logger = logging.getLogger(__name__)

# Figures made on a worker are rendered to PNG, never to a window.
os.environ.setdefault("MPLBACKEND", "Agg")

#: How often, at most, a running job sends its stdout/stderr to the client.
STREAM_INTERVAL_S = 0.1

#: A job still running after this long says where it runs ("started" event); a
#: quicker one only reports its result, which names the worker too.
ANNOUNCE_AFTER_S = 0.05

#: Results up to this size also travel as an event on the job's topic, which reaches
#: the client with the task's completion, saving the round trip of a gather. The
#: scheduler keeps the last `distributed.admin.low-level-log-length` (1000) events
#: of a topic, so this bounds what it holds per connected notebook to about 16 MB.
#: Events of a topic can be read by any client of the scheduler (Client.get_events):
#: a shared scheduler must be one whose clients may see each other's small results,
#: as they may see task keys (docs/architecture.md, "Three kinds of network").
RESULT_EVENT_MAX_BYTES = 16 * 1024


class JobInterrupted(BaseException):
    """Raised inside a job's thread to stop it (a BaseException, like KeyboardInterrupt,
    so that a cell's ``except Exception`` does not swallow it)."""


class OutputTooLarge(JobInterrupted):
    """Raised in a CODEC job's thread when its output text goes over its cap."""


# -- per-thread capture of stdout, stderr and display() --------------------------------------


class _JobContext:
    """The running job of one worker thread: its buffered streams and displays."""

    def __init__(self, job: Job, index: int | None, worker: Any) -> None:
        self.job = job
        self.index = index
        self.worker = worker
        self.seq = 0
        self.chunks: list[tuple[int, str, str]] = []
        self.pending: list[tuple[str, str]] = []
        self.displays: list[tuple[dict[str, Any], dict[str, Any]]] = []
        self.displayed_ids: set[int] = set()
        self.last_sent = 0.0
        self.timer: threading.Timer | None = None
        self.lock = threading.Lock()
        self.started = time.monotonic()
        self.text_bytes = 0

    def write(self, name: str, text: str) -> None:
        if not text:
            return
        if self.job.result_format == CODEC:
            self.text_bytes += len(text)
            allowance = stream_allowance(self.job, time.monotonic() - self.started)
            if self.text_bytes > allowance:
                raise OutputTooLarge(f"its output text went over its cap of {self.job.max_stream_bytes_per_s:,} "
                                     f"bytes per second run ({allowance:,} bytes so far)")
        with self.lock:
            if self.pending and self.pending[-1][0] == name:
                self.pending[-1] = (name, self.pending[-1][1] + text)
            else:
                self.pending.append((name, text))
            if "\n" in text or "\r" in text:
                self._send_soon_locked()

    def flush_soon(self) -> None:
        """``sys.stdout.flush()`` in the job: send what is pending, rate-limited."""
        with self.lock:
            self._send_soon_locked()

    def _send_soon_locked(self) -> None:
        if self.job.topic is None or not self.pending:
            return
        wait = STREAM_INTERVAL_S - (time.monotonic() - self.last_sent)
        if wait <= 0:
            self._flush_locked(send=True)
        elif self.timer is None:
            self.timer = threading.Timer(wait, self.flush)
            self.timer.daemon = True
            self.timer.start()

    def flush(self, send: bool = True) -> None:
        with self.lock:
            self._flush_locked(send=send)

    def _flush_locked(self, *, send: bool) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        for name, text in self.pending:
            self.seq += 1
            self.chunks.append((self.seq, name, text))
            if send and self.job.topic is not None and self.worker is not None:
                event = {"job": self.job.job_id, "kind": "stream", "seq": self.seq, "name": name, "text": text}
                if self.index is not None:
                    event["index"] = self.index
                self.worker.log_event(self.job.topic, sign_event(self.job.event_key, event))
        self.pending = []
        self.last_sent = time.monotonic()


_contexts: dict[int, _JobContext] = {}  # thread id -> running job
_running: dict[str, int] = {}  # job id -> thread id
_stopped: dict[str, None] = {}  # job ids asked to stop (the last STOPPED_KEPT, oldest first)
_paused: dict[str, None] = {}  # maps whose items not started yet never start (the last STOPPED_KEPT)
_installing: dict[str, list[threading.Event]] = {}  # job id -> the stop flags of its installs under way
STOPPED_KEPT = 1000
_registry_lock = threading.Lock()


class _ThreadRouter(io.TextIOBase):
    """Stands in for sys.stdout/sys.stderr: a job thread's writes go to its job,
    every other thread's to the original stream."""

    def __init__(self, name: str, original: Any) -> None:
        self.name = name
        self.original = original

    def write(self, text: str) -> int:
        context = _contexts.get(threading.get_ident())
        if context is None:
            return self.original.write(text)
        context.write(self.name, text)
        return len(text)

    def flush(self) -> None:
        context = _contexts.get(threading.get_ident())
        if context is None:
            self.original.flush()
        else:
            context.flush_soon()

    def isatty(self) -> bool:
        return False

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"

    def fileno(self) -> int:
        return self.original.fileno()


_install_lock = threading.Lock()
_installed = False

#: Where this process's jobs run instead of its own threads (a provider's worker: the
#: sessions' sandboxes, :mod:`gpunet.worker.sandbox`); None runs them here.
_job_host: Any = None


def set_job_host(host: Any) -> None:
    """Run this worker's jobs through ``host`` (``host.run(job, item, index, worker,
    address, device, prepared, environment)`` returns what :func:`run_job` returns, with
    the environment the worker prepared and its account; ``host.stop(job_id, reason,
    grace)`` stops them), or in this process again with None."""
    global _job_host
    _job_host = host


def install_routers() -> None:
    """Route sys.stdout/sys.stderr and IPython's display() per thread (once a process)."""
    global _installed
    with _install_lock:
        if _installed:
            return
        sys.stdout = _ThreadRouter("stdout", sys.stdout)
        sys.stderr = _ThreadRouter("stderr", sys.stderr)
        import IPython.core.display_functions as display_functions
        import IPython.display as ipython_display

        original = display_functions.display

        @functools.wraps(original)
        def display(*objs: Any, **kwargs: Any) -> Any:
            context = _contexts.get(threading.get_ident())
            if context is None:
                return original(*objs, **kwargs)
            for obj in objs:
                if kwargs.get("raw"):
                    context.displays.append((dict(obj), dict(kwargs.get("metadata") or {})))
                else:
                    context.displays.append(mime_bundle(obj))
                context.displayed_ids.add(id(obj))
            return None

        display_functions.display = display
        ipython_display.display = display
        _installed = True


@functools.lru_cache(maxsize=1)
def _display_formatter() -> Any:
    from IPython.core.formatters import DisplayFormatter

    formatter = DisplayFormatter()
    formatter.formatters["image/png"].for_type_by_name("matplotlib.figure", "Figure", _figure_png)
    return formatter


def _figure_png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    return buffer.getvalue()


def mime_bundle(obj: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The (data, metadata) MIME bundle IPython would display for ``obj``."""
    data, metadata = _display_formatter().format(obj)
    return dict(data), dict(metadata)


def _collect_open_figures(context: _JobContext) -> None:
    """Display and close the matplotlib figures a cell left open, as the inline backend does."""
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is None:
        return
    for number in pyplot.get_fignums():
        figure = pyplot.figure(number)
        if id(figure) not in context.displayed_ids:
            context.displays.append(mime_bundle(figure))
    pyplot.close("all")


# -- running a job ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=128)
def _compile_cell(code: str, filename: str, display_last: bool) -> tuple[Any, Any]:
    """Compile a cell: its body, and its last expression separately when displayed."""
    tree = ast.parse(code, filename=filename, mode="exec")
    last = None
    if display_last and tree.body and isinstance(tree.body[-1], ast.Expr):
        last = compile(ast.Expression(tree.body.pop().value), filename, "eval")
    body = compile(tree, filename, "exec")
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
    return body, last


def _current_worker() -> Any:
    try:
        from distributed import get_worker

        return get_worker()
    except (ImportError, ValueError):
        return None


def run_job(
    job: Job, item: bytes | None = None, index: int | None = None, inputs: dict[str, bytes] | None = None
) -> JobResult | codec.Frames:
    """Run ``job`` in this worker thread and return its result (never raises for
    the job's own errors: they travel back in ``JobResult.error``).

    ``item`` and ``index`` are one item of a mapped job; ``inputs``, when given,
    replaces ``job.inputs`` (large inputs travel scattered, as a Dask dependency).
    """
    older_notebook = job.result_format == CODEC and not reads_frames(job)  # before replace() gives it the field
    with _registry_lock:
        if job.job_id in _paused:  # raised, so that the task errs: nothing ran, nobody is paid
            raise BudgetError(f"map {job.job_id} paused before this item started: its budget cannot pay for more")
    if inputs is not None:
        job = dataclasses.replace(job, inputs=inputs)
    worker = _current_worker()
    if worker is not None and job.result_format == CODEC:
        codec.register_with_dask()  # its result leaves this worker as Dask frames (not in a sandbox: no Dask there)
    address = getattr(worker, "address", "local")
    # outside a worker (tests, debugging) this process's device
    device = (describe_this_device() if worker is None else device_info(worker))["label"]
    if older_notebook:
        return older_notebook_result(job, index, address, device)
    if _job_host is None:
        return execute_job(job, item, index, worker, address, device)
    # a provider's worker: it prepares the job's environment (its policy and wheel cache
    # stay here), and the session's sandbox, started with that environment, runs the job
    started = time.time()
    try:
        prepared, environment = prepare_environment(job, worker, address)
    except PackageError as exc:  # nothing of the cell ran
        return error_result(job, index, address, device, started, PACKAGES, str(exc))
    except InstallStopped as exc:
        return error_result(job, index, address, device, started, INTERRUPTED, str(exc))
    try:
        return _job_host.run(job, item, index, worker, address, device, prepared, environment)
    finally:  # while the session's sandbox ran it, its environment was never removed
        done_with_environment(worker, prepared)


def done_with_environment(worker: Any, prepared: PreparedEnvironment | None) -> None:
    """The job that ran with ``prepared`` (:func:`prepare_environment`) on ``worker`` ended:
    the worker may remove that environment again (:class:`SessionEnvironments`)."""
    environments = getattr(worker, "gpunet_environments", None)
    if prepared is not None and environments is not None:
        environments.done_with(prepared)


def older_notebook_result(job: Job, index: int | None, address: str, device: str) -> bytes:
    """What a job from a notebook older than codec frames gets instead of running: an
    error saying so, as the one-piece codec bytes such a notebook reads."""
    now = time.time()
    result = JobResult(job.job_id, index, address, device, now, now, result_format=CODEC, error={
        "ename": VERSION_MISMATCH, "traceback": "", "exception": None,
        "evalue": f"this provider runs gpunet {gpunet.__version__}, whose results travel as codec frames, which this "
                  "notebook's older gpunet cannot read; nothing ran. Upgrade gpunet where the notebook runs "
                  f"(pip install 'gpunet>={gpunet.__version__}') and reconnect"})
    return bytes(codec.encode(result_to_event(result)))


def run_chunk(job: Job, items: list[bytes], start: int,
              inputs: dict[str, bytes] | None = None) -> list[JobResult | bytes] | codec.Frames:
    """Run items ``start``, ``start + 1``, ... (``items``) of a mapped job one after another
    in this worker thread: one Dask task for several items, each run as :func:`run_job`
    runs one (its own index, output, error and stop). Their results in order: a list, or
    for a CODEC job the codec frames of the list of each item's codec frames, which the
    notebook checks item by item (:func:`gpunet.client.received.accept_chunk`)."""
    results = [run_job(job, item, start + offset, inputs) for offset, item in enumerate(items)]
    if job.result_format == CODEC:  # as frames: the items' arrays are not copied into one blob
        return codec.encode_frames(results, name="the results of a map's chunk")
    return results


def error_result(job: Job, index: int | None, address: str, device: str, started: float, ename: str,
                 evalue: str) -> JobResult | bytes:
    """The result of ``job`` that did not run (``ename``: why), as :func:`run_job` returns it."""
    result = JobResult(job.job_id, index, address, device, started, time.time(),
                       error={"ename": ename, "evalue": evalue, "traceback": "", "exception": None})
    if job.result_format == CODEC:
        return encode_result(result, job.max_result_bytes)
    return result


def execute_job(job: Job, item: bytes | None, index: int | None, worker: Any, address: str, device: str,
                environment: dict[str, Any] | None = None) -> JobResult | bytes:
    """Run ``job`` in this thread (of a worker, or of a sandbox whose ``worker`` relays
    its events) and return its result: a :class:`JobResult`, or codec bytes for a
    CODEC job. ``address`` and ``device`` name where it ran. ``environment``: the account
    of the environment the worker prepared for it (a sandbox runs with it already);
    None: this process prepares it (:func:`prepare_environment`)."""
    install_routers()
    context = _JobContext(job, index, worker)
    thread_id = threading.get_ident()
    running_key = job.job_id if index is None else f"{job.job_id}/{index}"
    result = JobResult(job.job_id, index, address, device, time.time(), 0.0)
    try:
        with _registry_lock:
            if job.job_id in _stopped:
                raise JobInterrupted("stopped before it started")
            _contexts[thread_id] = context
            _running[running_key] = thread_id
        announce_later(job, worker, lambda: _running.get(running_key) == thread_id, device)
        prepared, result.environment = prepare_environment(job, worker, address) if environment is None \
            else (None, environment)
        try:
            with layered(prepared):
                if job.code is not None:
                    _run_cell(job, item, context, result)
                else:
                    _run_function(job, item, result)
        finally:
            done_with_environment(worker, prepared)
    except PackageError as exc:  # nothing of the cell ran
        result.error = {"ename": PACKAGES, "evalue": str(exc), "traceback": "", "exception": None}
    except OutputTooLarge as exc:
        result.error = {"ename": TOO_LARGE, "evalue": str(exc), "traceback": "", "exception": None}
    except JobInterrupted as exc:
        result.error = _error_info(exc, None, job.result_format)
    except InstallStopped as exc:  # nothing of the cell ran
        result.error = {"ename": INTERRUPTED, "evalue": str(exc), "traceback": "", "exception": None}
    finally:
        _unregister(thread_id, running_key)
    context.flush(send=False)
    result.streams = context.chunks
    result.displays = context.displays
    result.finished = time.time()
    if job.result_format == CODEC:
        return encode_result(result, job.max_result_bytes)
    if job.result_event and job.topic is not None and worker is not None:
        _send_result_event(worker, job.topic, job.event_key, result)
    return result


def encode_result(result: JobResult, max_bytes: int) -> codec.Frames:
    """A CODEC job's result as codec frames (its outputs' arrays travel as frames of
    their own, never copied into one blob): displays the codec cannot carry are left
    out (saying so in its stderr); a result over ``max_bytes`` is replaced by its
    TOO_LARGE error, so that nothing of it travels."""
    result.result_format = CODEC
    kept = []
    for bundle in result.displays:
        try:
            codec.encode(bundle)
            kept.append(bundle)
        except UnsupportedResultError:
            result.streams.append((len(result.streams) + 1, "stderr",
                                   f"[gpunet: a display of {sorted(bundle[0])} could not travel as data]\n"))
    result.displays = kept
    frames = codec.encode_frames(result_to_event(result))
    size = frames.nbytes
    if size <= max_bytes:
        return frames
    too_large = dataclasses.replace(result, outputs={}, value=None, streams=[], displays=[], unpicklable_outputs=[],
                                    error={"ename": TOO_LARGE, "evalue": f"its result is {size:,} bytes, over "
                                           f"its cap of {max_bytes:,} bytes", "traceback": "", "exception": None})
    return codec.encode_frames(result_to_event(too_large))


def prepare_environment(job: Job, worker: Any,
                        address: str) -> tuple[PreparedEnvironment | None, dict[str, Any] | None]:
    """The environment ``job`` runs in on this worker (``address``), and what its result
    says of it: (None, its account) for the worker's own, which meets the job's
    requirements; (the session's, its account) where it does not and the provider allows
    installs (:class:`~gpunet.worker.environment.SessionEnvironments`: built now or
    reused); (None, None) for a job that asks for nothing. :class:`PackageError` when the
    requirements cannot be met here, before anything of the job runs. Runs in the worker
    (it needs the provider's policy and wheel cache): a sandbox is started with the
    prepared environment's Python."""
    if not job.requirements:
        return None, None
    requirements = checked_requirements(job.requirements)  # a stranger's: never a pip option
    report = getattr(worker, "gpunet_environment", None)
    base = report["packages"] if report is not None else installed_distributions()
    missing = unmet(requirements, base)
    ran_with = {name: base[name] for name in sorted(requirements) if name in base}
    if not missing:
        return None, {"kind": "base", "packages": ran_with}
    environments = getattr(worker, "gpunet_environments", None)
    lacking = ", ".join(f"{name}{requirements[name]} (has {have or 'none'})" for name, have in missing.items())
    if environments is None:
        raise PackageError(f"{address} lacks {lacking} and its provider allows no installs")

    def announce(count: int, size: int) -> None:
        if job.topic is not None and worker is not None:
            text = f"installing {count} package{'s' * (count != 1)} ({size / 1e6:.1f} MB) on {address}"
            worker.log_event(job.topic, sign_event(job.event_key, {"job": job.job_id, "kind": "installing",
                                                                   "text": text}))

    with _install_registered(job.job_id) as stopped:
        try:
            prepared = environments.prepare(job.session, requirements, announce, stopped)
        except PackageError as exc:
            raise PackageError(f"{address} could not install {lacking}: {exc}") from None
    return prepared, {**prepared.describe(), "packages": {**ran_with, **prepared.installed}}


@contextlib.contextmanager
def _install_registered(job_id: str) -> Iterator[threading.Event]:
    """A stop flag for an install of ``job_id``, which :func:`stop_job` sets meanwhile
    (set already where the job was stopped before its install began)."""
    stopped = threading.Event()
    with _registry_lock:
        if job_id in _stopped:
            stopped.set()
        _installing.setdefault(job_id, []).append(stopped)
    try:
        yield stopped
    finally:
        with _registry_lock:
            flags = _installing.get(job_id, [])
            if stopped in flags:
                flags.remove(stopped)
            if not flags:
                _installing.pop(job_id, None)


def _unregister(thread_id: int, running_key: str) -> None:
    """Take a job off the registry, even if a stop exception fires meanwhile.

    :func:`stop_job` raises only into threads still registered, under the same
    lock; once the entries are gone no new exception can arrive, and one already
    pending fires here and is absorbed (the job has ended anyway).
    """
    while True:
        try:
            with _registry_lock:
                _contexts.pop(thread_id, None)
                _running.pop(running_key, None)
            return
        except JobInterrupted:
            continue


def announce_later(job: Job, worker: Any, still_running: Callable[[], bool], device: str) -> None:
    """Say where the job runs (a "started" event from ``worker``), if ``still_running()``
    after ANNOUNCE_AFTER_S."""
    if not job.announce or job.topic is None or worker is None:
        return
    started_event = sign_event(job.event_key, {"job": job.job_id, "kind": "started", "worker": worker.address,
                                               "device": device})

    def announce() -> None:
        if still_running():
            worker.log_event(job.topic, started_event)

    worker.loop.add_callback(worker.loop.call_later, ANNOUNCE_AFTER_S, announce)


def _send_result_event(worker: Any, topic: str, key: str, result: JobResult) -> None:
    size = sum(len(blob) for blob in result.outputs.values()) + len(result.value or b"")
    size += sum(len(text) for _, _, text in result.streams)
    size += sum(len(v) for data, _ in result.displays for v in data.values() if isinstance(v, (str, bytes)))
    if size > RESULT_EVENT_MAX_BYTES:
        return
    try:
        worker.log_event(topic, sign_event(key, {"job": result.job_id, "kind": "result", "index": result.index,
                                                 "result": result_to_event(result)}))
    except TypeError:  # something in it is not msgpack-able: the gather brings it
        pass


def _run_cell(job: Job, item: bytes | None, context: _JobContext, result: JobResult) -> None:
    filename = cell_filename(job.code or "")
    body, last = _compile_cell(job.code or "", filename, job.display_last_expression)
    namespace: dict[str, Any] = {"__name__": "__main__", "__builtins__": builtins}
    for name, blob in job.inputs.items():
        namespace[name] = unpickle_value(blob)
    if job.map_name is not None and item is not None:
        namespace[job.map_name] = unpickle_value(item)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*non-interactive.*")
            exec(body, namespace)
            if last is not None:
                value = eval(last, namespace)
                if value is not None:
                    context.displays.append(mime_bundle(value))
                    context.displayed_ids.add(id(value))
            _collect_open_figures(context)
    except JobInterrupted:
        raise
    except BaseException as exc:  # the cell's own error, SystemExit included
        result.error = _error_info(exc, filename, job.result_format)
        return
    for name in job.outputs:
        if name not in namespace:
            if job.strict_outputs:
                result.missing_outputs.append(name)
            continue
        _keep(result, job, name, f"output {name!r}", namespace[name])


def _keep(result: JobResult, job: Job, name: str, what: str, value: Any) -> None:
    """Encode one output (or the return value) for the trip back, or name why it cannot travel."""
    try:
        blob = codec.dump(value, job.result_format, name=what)
    except UnsupportedResultError as exc:
        result.unpicklable_outputs.append((name, type(value).__name__, str(exc)))
        return
    except Exception as exc:  # noqa: BLE001 - any pickling failure is reported by name
        result.unpicklable_outputs.append((name, type(value).__name__, f"{type(exc).__name__}: {exc}"))
        return
    if name == "return value":
        result.value = blob
    else:
        result.outputs[name] = blob


def _run_function(job: Job, item: bytes | None, result: JobResult) -> None:
    assert job.function is not None
    try:
        function = unpickle_value(job.function) if isinstance(job.function, (bytes, Pickled)) else job.function
        args, kwargs = unpickle_value(job.arguments) if job.arguments else ((), {})
        if item is not None:
            args = (unpickle_value(item), *args)
        value = function(*args, **kwargs)
    except JobInterrupted:
        raise
    except BaseException as exc:
        result.error = _error_info(exc, None, job.result_format, skip_runner_frames=True)
        return
    _keep(result, job, "return value", "the return value", value)


def _error_info(exc: BaseException, filename: str | None, result_format: str, *,
                skip_runner_frames: bool = False) -> dict[str, Any]:
    """Describe ``exc`` with a traceback that starts at the cell (or function); the
    exception itself travels pickled only where the notebook trusts its providers."""
    tb = exc.__traceback__
    if filename is not None:
        while tb is not None and tb.tb_frame.f_code.co_filename != filename:
            tb = tb.tb_next
        tb = tb or exc.__traceback__
    elif skip_runner_frames and tb is not None:
        tb = tb.tb_next or tb  # drop _run_function's own frame
    text = "".join(traceback.format_exception(type(exc), exc, tb))
    if result_format == CODEC:
        return {"ename": type(exc).__name__, "evalue": str(exc), "traceback": text, "exception": None}
    try:
        pickled = cloudpickle.dumps(exc)
        cloudpickle.loads(pickled)
    except Exception:  # noqa: BLE001 - not every exception can be rebuilt elsewhere
        pickled = None
    return {"ename": type(exc).__name__, "evalue": str(exc), "traceback": text, "exception": pickled}


# -- stopping a job (runs on the worker's event loop through Client.run) ----------------------


async def end_session(digest: str, dask_worker: Any = None) -> bool:
    """End the sandbox of the notebook session whose digest is ``digest``
    (:func:`gpunet.worker.sandbox.session_digest`) on this worker, if it has one; sent
    with ``Client.run`` when a notebook closes its connection."""
    if _job_host is None:
        return False
    return bool(await asyncio.to_thread(_job_host.end_session, str(digest)))


async def _installs_ended(job_id: str, within: float) -> bool:
    """Whether the installs of ``job_id`` ended within ``within`` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with _registry_lock:
            if job_id not in _installing:
                return True
        await asyncio.sleep(0.02)
    return False


@contextlib.contextmanager
def registered_as_running(running_key: str) -> Iterator[None]:
    """Count this thread's job (run elsewhere: its sandbox) as running here meanwhile, as
    a job run in this process is (``_running``, which probes of running jobs read)."""
    thread_id = threading.get_ident()
    with _registry_lock:
        _running[running_key] = thread_id
    try:
        yield
    finally:
        with _registry_lock:
            if _running.get(running_key) == thread_id:
                del _running[running_key]


def was_stopped(job_id: str) -> bool:
    """Whether :func:`stop_job` was asked to stop ``job_id`` (one of the last STOPPED_KEPT)."""
    with _registry_lock:
        return job_id in _stopped


def _remember(registry: dict[str, None], job_id: str) -> None:
    """Add ``job_id`` to ``registry``, keeping its last :data:`STOPPED_KEPT`."""
    with _registry_lock:
        registry[job_id] = None
        while len(registry) > STOPPED_KEPT:
            del registry[next(iter(registry))]


def pause_job(job_id: str) -> None:
    """Map ``job_id``'s items that have not started here never will (each raises
    :class:`~gpunet.errors.BudgetError` instead, so that nobody is paid for it); those
    running go on. Called on every worker when the map's budget cannot pay for more."""
    _remember(_paused, job_id)


async def stop_job(job_id: str, reason: str = "interrupted", grace: float = 1.0, dask_worker: Any = None) -> str:
    """Raise JobInterrupted in the threads running ``job_id`` (and its map items); on a
    worker whose jobs run in sandboxes, stop them there (ending a sandbox whose job
    does not stop within ``grace``, never the worker).

    Returns ``"stopped"`` when they left within ``grace`` seconds, or
    ``"not-running"``. A thread still there after ``grace`` is blocked in C code
    (``time.sleep``, a long XLA call) where no exception reaches it: then a worker
    under a Nanny exits at once, and the Nanny starts a fresh one, so the device is
    free for real (``"restarting"``); a worker without a Nanny can only say
    ``"stuck"``.
    """
    _remember(_stopped, job_id)  # an install starting from now on sees it stopped
    with _registry_lock:
        installs = list(_installing.get(job_id, ()))
    for flag in installs:  # its packages are installing: the install ends at once
        flag.set()
    installs_stopped = installs and await _installs_ended(job_id, grace)
    if _job_host is not None:  # its sandbox stops it, or is ended: never this worker
        status = await asyncio.to_thread(_job_host.stop, job_id, reason, grace)
        return "stopped" if installs_stopped and status == "not-running" else status
    with _registry_lock:
        threads = {key: tid for key, tid in _running.items() if key == job_id or key.startswith(job_id + "/")}
        for tid in threads.values():
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(tid), ctypes.py_object(JobInterrupted))
    if not threads:
        return "stopped" if installs_stopped else "not-running"
    logger.info("gpunet: stopping job %s (%s) in %d thread(s)", job_id, reason, len(threads))
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        with _registry_lock:
            if not any(key in _running for key in threads):
                return "stopped"
        await asyncio.sleep(0.02)
    if dask_worker is not None and getattr(dask_worker, "nanny", None):
        logger.warning("gpunet: job %s is stuck in C code; exiting so that the Nanny restarts this worker", job_id)
        asyncio.get_running_loop().call_later(0.05, os._exit, 70)
        return "restarting"
    return "stuck"
