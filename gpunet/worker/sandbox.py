"""Cells run in a sandbox process: one per notebook session on each provider's worker.

A provider's worker (``gpunet provide``) never runs a stranger's cell in its own
process: :class:`SandboxPool` (the worker's job host, :func:`gpunet.worker.runner.set_job_host`)
hands each job to its session's :class:`Sandbox`, a child process that runs it with
:func:`gpunet.worker.runner.execute_job` and sends back what ``run_job`` would have
returned. The worker never unpickles anything a sandbox sends: results come back as
codec bytes (a notebook that does not trust its providers) or as msgpack of the
result's fields (whose outputs stay pickles only the notebook opens); live events are
relayed only to the job's own topic, within the job's output-text cap.

- One sandbox per notebook session (``Job.session``, a secret of the notebook's
  connection; the pool keys sandboxes by its SHA-256) and environment it runs with (the
  session's own ``site-packages``, :mod:`gpunet.worker.environment`; at most
  :data:`SANDBOXES_PER_SESSION`), never shared between sessions; it stays warm between
  the session's cells (modules such as JAX are imported once; cells that alternate
  between environments switch between the session's warm sandboxes) and ends when the
  session closes (:func:`gpunet.worker.runner.end_session`), after
  ``idle_seconds`` without a cell, or when the worker ends. A job with no session gets
  a sandbox of its own. A warm spare is started ahead, so a session's first cell does
  not wait for a process to start.
- Its environment is scrubbed (an allow-list: no tokens, no provider secrets), its
  home and working directory are its own scratch directory, and it has resource limits
  (setrlimit: memory, CPU time, processes, open files, file size, no core dumps). It
  sees only the GPU its worker was placed on (``CUDA_VISIBLE_DEVICES``).
- Where the provider's process can make cgroups (:mod:`gpunet.worker.cgroups`), each
  sandbox has its own, with the memory and process limits: memfd and tmpfs pages count
  there; it is removed, with whatever is left in it, when the sandbox ends.
- A provider running as root gives each sandbox a uid of its own (no capabilities, so
  it reads none of root's files nor any other process's memory); the worker process is
  made non-dumpable, so that a sandbox of the same user cannot read its environment or
  memory through ``/proc``.
- With bubblewrap (``bwrap``) the sandbox also gets a read-only system, a private
  ``/tmp``, no view of the provider's home, data dir or token file, its own process
  namespace (no other process is visible), and no network unless the provider allows
  it (``gpunet provide --allow-network``).
- Processes a cell starts end with the cell. Stopping a job (Ctrl-C, a timeout) stops
  it inside the sandbox; a job that does not stop in time ends its sandbox, never the
  worker.

``SandboxSettings.python`` and ``path_prefix`` start sandboxes with another Python
executable and extra ``sys.path`` entries; :meth:`SandboxPool.settings_for` chooses a
session's settings at its first job (per-session environments override it).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import dataclasses
import json
import logging
import os
import queue
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cloudpickle
import msgpack

from gpunet import codec
from gpunet.errors import GpunetError
from gpunet.paths import data_dir
from gpunet.wire import (CHUNK_FRAMING_BYTES, CODEC, INTERRUPTED, Job, JobResult, flat_result, result_from_event,
                         result_to_event, session_digest, stream_allowance)
from gpunet.worker import runner
from gpunet.worker.environment import PreparedEnvironment
from gpunet.worker.cgroups import SandboxCgroup, cgroup_home

logger = logging.getLogger(__name__)

#: The environment variable through which `gpunet provide` gives its workers their
#: sandbox settings (JSON of :class:`SandboxSettings`); a worker without it runs jobs
#: in its own process (the embedded network).
SANDBOX_ENV = "GPUNET_SANDBOX"
#: Inside a sandbox: the address and the name of the worker it belongs to (where its
#: cells run; ``distributed.get_worker()`` has no worker there).
WORKER_ADDRESS_ENV = "GPUNET_WORKER"
WORKER_NAME_ENV = "GPUNET_WORKER_NAME"
#: Isolation kinds: bubblewrap namespaces on top of the process's own limits, or the
#: process's limits alone.
BUBBLEWRAP, PROCESS = "bubblewrap", "process"
#: The ``ename`` of a job whose sandbox ended under it (a limit, a crash).
SANDBOX_ENDED = "SandboxEnded"

#: Variables a sandbox inherits from its worker (exact names, then prefixes): what
#: Python, JAX, CUDA and locales need, never a token.
KEPT_ENV = frozenset({"PATH", "LANG", "LANGUAGE", "TZ", "TERM", "MPLBACKEND", "OMP_NUM_THREADS",
                      "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "CUDA_HOME", "LD_LIBRARY_PATH"})
KEPT_ENV_PREFIXES = ("LC_", "JAX_", "XLA_", "TF_CPP_", "NVIDIA_DRIVER_", "CUDA_MODULE_", "NCCL_")
#: The first uid of sandboxes of a provider running as root: each gets
#: ``ROOT_SANDBOX_UID_BASE + worker pid * MOST_SANDBOXES + slot``, unique on the host.
ROOT_SANDBOX_UID_BASE = 100_000
#: Sandboxes a worker keeps at once, at most (the hard cap; settings may lower it).
MOST_SANDBOXES = 64
#: Warm sandboxes one session keeps, one per environment its cells ran with (the least
#: recently used beyond this ends): cells that alternate between environments switch
#: sandboxes instead of starting one.
SANDBOXES_PER_SESSION = 3
#: One live event a sandbox relays, at most (output chunks and small results are far below).
EVENT_MAX_BYTES = 256 * 1024
#: A frame from a sandbox of a job that trusts its providers (PICKLE), at most.
TRUSTED_FRAME_MAX_BYTES = 2**32 - 1
#: The most frames a CODEC result may come out of the sandbox in (its head, then one per
#: large array: :func:`gpunet.codec.encode_frames`).
MAX_RESULT_FRAMES = 100_000
#: How long a sandbox may take to start (import gpunet's runner) before it counts as failed.
START_TIMEOUT_S = 120.0

_FRAME_HEADER = struct.Struct(">I")
_PR_SET_DUMPABLE, _PR_SET_CHILD_SUBREAPER, _PR_SET_NO_NEW_PRIVS = 4, 36, 38


@dataclass(frozen=True)
class SandboxSettings:
    """How a provider's worker confines the cells it runs (``gpunet provide`` decides)."""

    isolation: str = PROCESS
    allow_network: bool = False
    #: memory (RLIMIT_DATA) per sandbox; None: the worker's own memory limit
    memory_bytes: int | None = None
    #: CPU seconds a sandbox may use in all (every cell of its session)
    cpu_seconds: int = 24 * 3600
    #: processes and threads the sandbox may have at once
    processes: int = 512
    open_files: int = 1024
    #: the largest file a cell may write
    file_bytes: int = 4 * 1024**3
    #: a sandbox with no cell for this long ends
    idle_seconds: float = 600.0
    #: sandboxes a worker keeps at once (the least recently used idle one ends first)
    most_sandboxes: int = 8
    #: more files or folders a sandbox must not see (the provider's token file)
    hidden_paths: tuple[str, ...] = ()
    #: the Python that runs sandboxes, and sys.path entries put before its own
    python: str = ""
    path_prefix: tuple[str, ...] = ()

    def to_env(self) -> str:
        """These settings as the value of :data:`SANDBOX_ENV`."""
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_env(cls, text: str) -> SandboxSettings:
        """Settings from the value of :data:`SANDBOX_ENV`; a clear error for a bad one."""
        try:
            data = json.loads(text)
            data["hidden_paths"] = tuple(data.get("hidden_paths", ()))
            data["path_prefix"] = tuple(data.get("path_prefix", ()))
            settings = cls(**data)
        except (ValueError, TypeError, AttributeError) as exc:
            raise GpunetError(f"{SANDBOX_ENV} must be the JSON `gpunet provide` writes ({exc}); unset it to run "
                              "jobs in the worker's own process") from None
        if settings.isolation not in (BUBBLEWRAP, PROCESS):
            raise GpunetError(f"{SANDBOX_ENV}: isolation must be {BUBBLEWRAP!r} or {PROCESS!r}, "
                              f"got {settings.isolation!r}")
        return settings

    def describe(self) -> str:
        """One line for the provider: what a cell may and may not do here."""
        memory = "the worker's memory limit" if self.memory_bytes is None else f"{self.memory_bytes / 2**30:.1f} GiB"
        limits = (f"limits: memory {memory}, {self.processes} processes, {self.open_files} open files, files up "
                  f"to {self.file_bytes / 2**30:.1f} GiB, CPU {self.cpu_seconds} s, no core dumps")
        home = cgroup_home()
        limits += (f"; {home.describe()}" if home is not None else
                   "; no cgroup could be made here, so shared memory (memfd, tmpfs) is not counted")
        if os.geteuid() == 0 and not own_uid_possible(self):
            limits += (f"; WARNING: as root, with {self.python or sys.executable} in a folder other users cannot "
                       "read, cells run as root (no process limit): install bubblewrap")
        if self.isolation == BUBBLEWRAP:
            network = "network allowed" if self.allow_network else "no network"
            return (f"cells run in a sandbox per session: bubblewrap (read-only system, no view of your home or "
                    f"token, own processes, {network}); {limits}")
        return (f"cells run in a sandbox per session: process limits only, bubblewrap not found (install it: "
                f"apt-get install bubblewrap); {limits}")


def bubblewrap_works() -> bool:
    """Whether ``bwrap`` is installed and can make namespaces here (user namespaces may be off)."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return False
    try:
        trial = subprocess.run([bwrap, "--ro-bind", "/", "/", "--unshare-pid", "--unshare-net", "--proc", "/proc",
                                "--dev", "/dev", "true"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return trial.returncode == 0


def own_uid_possible(settings: SandboxSettings) -> bool:
    """Whether this provider (root) can give each sandbox a uid of its own: with
    bubblewrap (which shows the Python's folders to it), or where every folder on the
    way to the Python and its libraries lets other users in."""
    if os.geteuid() != 0:
        return False
    if settings.isolation == BUBBLEWRAP:
        return True
    python = os.path.realpath(settings.python or sys.executable)
    for path in (python, sys.base_prefix, sys.prefix, os.path.dirname(os.path.dirname(runner.__file__))):
        for folder in [Path(path), *Path(path).parents]:
            if folder.is_dir() and not folder.stat().st_mode & 0o001:
                return False
    return True


def make_non_dumpable() -> None:
    """Keep this process's environment and memory from other processes of its user
    (``/proc/PID/environ``, ``/proc/PID/mem``, ptrace); core dumps off too."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux
        pass


# -- frames between a worker and its sandbox ---------------------------------------------------


class _Channel:
    """Length-prefixed frames over a socket; sends from several threads."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.send_lock = threading.Lock()

    def send(self, *frames: bytes | memoryview) -> None:
        with self.send_lock:
            for frame in frames:
                self.sock.sendall(_FRAME_HEADER.pack(len(frame)))
                self.sock.sendall(frame)

    def receive(self, max_bytes: int) -> bytearray | None:
        """The next frame, None at the end; ValueError for one over ``max_bytes``."""
        header = self._exactly(_FRAME_HEADER.size)
        if header is None:
            return None
        (size,) = _FRAME_HEADER.unpack(header)
        if size > max_bytes:
            raise ValueError(f"a frame of {size:,} bytes, over {max_bytes:,}")
        return self._exactly(size)

    def _exactly(self, size: int) -> bytearray | None:
        buffer = bytearray(size)  # returned as it is: a result's frame is not copied again
        view = memoryview(buffer)
        got = 0
        while got < size:
            count = self.sock.recv_into(view[got:])
            if count == 0:
                return None
            got += count
        return buffer


# -- the worker's side -------------------------------------------------------------------------


@dataclass
class _Waiting:
    job: Job
    worker: Any
    started: float
    answers: queue.Queue = dataclasses.field(default_factory=queue.Queue)
    event_bytes: int = 0
    #: the items it runs: one, or a map chunk's
    items: int = 1


class Sandbox:
    """One sandbox process and the worker's end of its channel."""

    def __init__(self, settings: SandboxSettings, slot: int, device_env: dict[str, str]) -> None:
        self.settings = settings
        self.slot = slot
        self.uid = (ROOT_SANDBOX_UID_BASE + os.getpid() * MOST_SANDBOXES + slot
                    if own_uid_possible(settings) else None)
        self.scratch = tempfile.mkdtemp(prefix="gpunet-sandbox-")
        if self.uid is not None:
            os.chown(self.scratch, self.uid, self.uid)
        ours, theirs = socket.socketpair()
        command = sandbox_command(settings, self.scratch, theirs.fileno(), self.uid, device_env)
        home = cgroup_home()  # its own cgroup, which it joins before anything of it runs
        self.cgroup = (None if home is None else
                       SandboxCgroup(home, os.path.basename(self.scratch), settings.memory_bytes, settings.processes))
        command = command if self.cgroup is None else self.cgroup.command(command)
        self.log_path = Path(self.scratch) / "sandbox.log"
        with open(self.log_path, "wb") as log:
            if self.uid is not None:
                os.chown(self.log_path, self.uid, self.uid)
            try:
                self.process = subprocess.Popen(command, env=scrubbed_environment(self.scratch, device_env),
                                                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stdout=log,
                                                stderr=log, cwd=self.scratch, start_new_session=True)
            except OSError:
                if self.cgroup is not None:
                    self.cgroup.remove()
                raise
        theirs.close()
        self.channel = _Channel(ours)
        self.ready = threading.Event()
        self.pid: int | None = None
        self.waiting: dict[str, _Waiting] = {}
        self.lock = threading.Lock()
        self.last_used = time.monotonic()
        self.ended: str | None = None
        self.reader = threading.Thread(target=self._read, name=f"gpunet-sandbox-{slot}", daemon=True)
        self.reader.start()

    @property
    def busy(self) -> bool:
        """Whether a job runs in it now."""
        return bool(self.waiting)

    def run(self, job: Job, item: bytes | None, index: int | None, worker: Any, address: str,
            device: str, environment: dict[str, Any] | None = None) -> JobResult | bytes:
        """Run ``job`` here and return what :func:`gpunet.worker.runner.run_job` returns
        (``environment``: the account of the environment the worker prepared for it)."""
        key = job.job_id if index is None else f"{job.job_id}/{index}"
        return self._ask("run", key, (item, index), job, index, 1, worker, address, device, environment)

    def run_chunk(self, job: Job, items: list[bytes], start: int, worker: Any, address: str, device: str,
                  environment: dict[str, Any] | None = None) -> list[JobResult | bytes]:
        """Run items ``start``, ``start + 1``, ... of ``job`` here in one request, as
        :func:`gpunet.worker.runner.run_items` runs them: the results of those it ran (where
        the sandbox failed, the first item's error alone: the rest go again)."""
        key = f"{job.job_id}/{start}-{start + len(items) - 1}"
        answer = self._ask("chunk", key, (items, start), job, start, len(items), worker, address, device,
                           environment)
        return answer if isinstance(answer, list) else [answer]

    def _ask(self, kind: str, key: str, what: tuple[Any, Any], job: Job, index: int | None, items: int,
             worker: Any, address: str, device: str, environment: dict[str, Any] | None) -> Any:
        """Send the sandbox ``job``'s ``what`` (an item and its index, or a chunk's items and
        its first index) as a ``kind`` request under ``key`` and wait for its answer: what
        it ran returned, or the error result of item ``index`` saying why it did not."""
        waiting = _Waiting(job, worker, time.time(), items=items)
        with self.lock:
            self.waiting[key] = waiting
            self.last_used = time.monotonic()
        try:
            if not self.ready.wait(START_TIMEOUT_S) or self.ended:
                return runner.error_result(job, index, address, device, waiting.started, SANDBOX_ENDED,
                                     f"its sandbox did not start: {self.ended or 'it took too long'}")
            blob = cloudpickle.dumps((dataclasses.replace(job, announce=False), *what, address, device, environment))
            with runner.registered_as_running(key):
                self.channel.send(cloudpickle.dumps((kind, key)), blob)
                runner.announce_later(job, worker, lambda: key in self.waiting, device)
                kind, answer = waiting.answers.get()
            if kind == "result":
                return answer
            if kind == "failed":
                return runner.error_result(job, index, address, device, waiting.started, SANDBOX_ENDED, answer)
            if runner.was_stopped(job.job_id):
                return runner.error_result(job, index, address, device, waiting.started, INTERRUPTED,
                                     f"stopped: {answer}")
            return runner.error_result(job, index, address, device, waiting.started, SANDBOX_ENDED, answer)
        except OSError as exc:  # the sandbox went away while the job was sent
            return runner.error_result(job, index, address, device, waiting.started, SANDBOX_ENDED,
                                 self.ended or f"its sandbox could not be reached ({exc})")
        finally:
            with self.lock:
                self.waiting.pop(key, None)
                self.last_used = time.monotonic()

    def stop(self, job_id: str, reason: str, grace: float) -> bool:
        """Stop ``job_id``'s work here within ``grace`` seconds (ending the sandbox if it
        does not stop); False where none of it runs here."""
        with self.lock:
            keys = [key for key in self.waiting if key == job_id or key.startswith(job_id + "/")]
        if not keys:
            return False
        try:
            self.channel.send(cloudpickle.dumps(("stop", job_id, reason, grace / 2)))
        except OSError:
            pass
        deadline = time.monotonic() + grace * 0.8
        while time.monotonic() < deadline:
            with self.lock:
                if not any(key in self.waiting for key in keys):
                    return True
            time.sleep(0.01)
        self.end(f"{reason}: its work did not stop within {grace * 0.8:.1f} s, so its sandbox was ended")
        return True

    def end(self, why: str = "ended") -> None:
        """End the sandbox and every process in it; jobs still waiting get ``why``."""
        with self.lock:
            if self.ended is None:
                self.ended = why
        if self.process.poll() is None:
            for pid in _descendants(self.process.pid):  # those a cell detached, before their reaper ends
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.uid is not None:  # strays that left its process group: everything of its uid
            subprocess.run(["kill", "-KILL", "-1"], user=self.uid, group=self.uid, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, check=False)
        self.process.wait()
        if self.cgroup is not None:  # whatever is left in it, and the cgroup itself
            self.cgroup.remove()
        try:  # wakes the reader even where a stray still holds the other end
            self.channel.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.channel.sock.close()
        shutil.rmtree(self.scratch, ignore_errors=True)

    def _read(self) -> None:
        """Take frames from the sandbox: its ready line, relayed events, results."""
        why = None
        try:
            while True:
                frame = self.channel.receive(EVENT_MAX_BYTES)
                if frame is None:
                    break
                message = msgpack.unpackb(frame, raw=False)
                kind = message[0]
                if kind == "ready":
                    self.pid = int(message[1])
                    self.ready.set()
                elif kind == "event":
                    self._relay(str(message[1]), message[2], message[3], len(frame))
                elif kind == "result":
                    self._results(str(message[1]), str(message[2]), [message[3] if len(message) > 3 else 1])
                elif kind == "results":  # a map chunk's: each item's frame count
                    self._results(str(message[1]), str(message[2]), message[3], chunk=True)
                elif kind == "failed":
                    waiting = self.waiting.get(str(message[1]))
                    if waiting is not None:
                        waiting.answers.put(("failed", str(message[2])[:4096]))
                else:
                    raise ValueError(f"an unknown message {kind!r}")
        except (ValueError, TypeError, IndexError, KeyError, msgpack.UnpackException) as exc:
            why = f"its sandbox sent something malformed ({exc})"
        except OSError:
            pass
        self._ended_by_itself(why)

    def _relay(self, key: str, topic: Any, event: Any, size: int) -> None:
        waiting = self.waiting.get(key)
        if waiting is None or topic != waiting.job.topic or not isinstance(event, dict):
            raise ValueError("an event for no job of its own")
        waiting.event_bytes += size
        allowance = stream_allowance(waiting.job, time.time() - waiting.started) + 2 * runner.RESULT_EVENT_MAX_BYTES
        if waiting.event_bytes > allowance:
            raise ValueError(f"its events went over {allowance:,} bytes")
        if waiting.worker is not None:
            waiting.worker.log_event(topic, event)

    def _results(self, key: str, result_format: str, counts: Any, *, chunk: bool = False) -> None:
        """Read a result (``counts``: its frame count) or a chunk's results (each item's
        frame count, one item to as many as it was given) within the job's cap, all of them
        together, and hand them to the job's waiter."""
        waiting = self.waiting.get(key)
        if waiting is None:
            raise ValueError("a result for no job of its own")
        trusted = waiting.job.result_format != CODEC
        # the job's cap is the notebook's to choose (the cell's author): the worker's own
        # ceiling is what the sandbox could have built within its memory limit
        ceiling = min(TRUSTED_FRAME_MAX_BYTES, self.settings.memory_bytes or TRUSTED_FRAME_MAX_BYTES)
        allowed = min(ceiling, TRUSTED_FRAME_MAX_BYTES if trusted else
                      waiting.job.max_result_bytes + 1024 + CHUNK_FRAMING_BYTES * waiting.items)
        most = MAX_RESULT_FRAMES if result_format == CODEC else 1
        if (not isinstance(counts, list) or not 1 <= len(counts) <= waiting.items
                or not all(type(count) is int and 1 <= count <= most for count in counts)
                or sum(counts) > MAX_RESULT_FRAMES):
            raise ValueError(f"results in {counts!r} frames" if chunk else f"a result in {counts[0]!r} frames")
        results: list[Any] = []
        for count in counts:
            frames = []
            for _ in range(count):  # all of them within the one cap
                payload = self.channel.receive(allowed)
                if payload is None:
                    raise ValueError("a result cut short")
                allowed -= len(payload)
                frames.append(payload)
            if not (result_format == CODEC and not trusted) and not (result_format == "fields" and trusted):
                raise ValueError(f"a result as {result_format!r}")
            # a CODEC result is passed on as it came (the notebook decodes it); a trusted one's fields
            results.append(codec.Frames(frames) if result_format == CODEC
                           else result_from_event(msgpack.unpackb(frames[0], raw=False)))
        waiting.answers.put(("result", results if chunk else results[0]))

    def _ended_by_itself(self, why: str | None) -> None:
        code = self.process.poll()
        if code is None and why is None:
            try:
                code = self.process.wait(timeout=2)
            except subprocess.TimeoutExpired:
                code = None
        if why is None:
            why = self._why_ended(code)
        with self.lock:
            if self.ended is None:
                self.ended = why
            for waiting in self.waiting.values():
                waiting.answers.put(("ended", self.ended))
        self.ready.set()
        if self.process.poll() is None:
            threading.Thread(target=self.end, args=(why,), daemon=True).start()

    def _why_ended(self, code: int | None) -> str:
        limits = self.settings
        if self.cgroup is not None and self.cgroup.killed_for_memory():
            limit = f"{limits.memory_bytes / 2**20:.0f} MiB" if limits.memory_bytes else "the worker's"
            return f"its sandbox went over its memory limit ({limit}, shared memory included) and was ended"
        if code == -signal.SIGXCPU:
            return f"its sandbox used up its CPU time ({limits.cpu_seconds} s) and was ended"
        if code == -signal.SIGKILL:
            return "its sandbox was killed (SIGKILL: stopped, or out of memory)"
        if code is not None and code < 0:
            return f"its sandbox ended by signal {signal.Signals(-code).name}"
        tail = _tail(self.log_path)
        return f"its sandbox exited (status {code})" + (f": {tail}" if tail else "")


def _tail(path: Path, size: int = 400) -> str:
    try:
        with open(path, "rb") as file:
            file.seek(max(0, os.path.getsize(path) - size))
            return file.read().decode(errors="replace").strip().splitlines()[-1][:size]
    except (OSError, IndexError):
        return ""


class SandboxPool:
    """A worker's sandboxes: one per session, a warm spare, ended when idle."""

    def __init__(self, settings: SandboxSettings, device_env: dict[str, str] | None = None) -> None:
        self.settings = settings
        self.device_env = dict(device_env or {})
        #: each session's current sandbox, and its others (of other environments), kept warm
        self.sessions: dict[str, Sandbox] = {}
        self.others: dict[str, list[Sandbox]] = {}
        #: every sandbox in use: the sessions' and those of jobs with no session
        self.in_use: set[Sandbox] = set()
        self.lock = threading.Lock()
        # sandboxes start from one long-lived thread: bubblewrap ends its sandbox when
        # the thread that started it ends
        self.starter = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="gpunet-sandbox-start")
        self.spare: concurrent.futures.Future | None = None
        self.closed = threading.Event()
        self._start_spare()
        self.reaper = threading.Thread(target=self._reap, name="gpunet-sandbox-reaper", daemon=True)
        self.reaper.start()

    def run(self, job: Job, item: bytes | None, index: int | None, worker: Any, address: str, device: str,
            prepared: PreparedEnvironment | None = None, environment: dict[str, Any] | None = None) -> JobResult | bytes:
        """Run ``job`` in its session's sandbox (a fresh one for a job with no session).
        ``prepared``: the session's own environment (the worker built it), whose
        ``site-packages`` the sandbox puts before the worker's; a session keeps a warm
        sandbox per environment (at most :data:`SANDBOXES_PER_SESSION`); a job that asks
        for no packages (no ``environment``) takes the session's current sandbox as it is.
        ``environment``: its account, for the result."""
        if runner.was_stopped(job.job_id):
            return runner.error_result(job, index, address, device, time.time(), INTERRUPTED, "stopped before it started")
        return self._in_sandbox(job, prepared, environment,
                                lambda sandbox: sandbox.run(job, item, index, worker, address, device, environment))

    def run_chunk(self, job: Job, items: list[bytes], start: int, worker: Any, address: str, device: str,
                  prepared: PreparedEnvironment | None = None,
                  environment: dict[str, Any] | None = None) -> list[JobResult | bytes]:
        """Run a map chunk's items (``start``, ``start + 1``, ...) in its session's sandbox
        as :meth:`run` runs one, in one request (:meth:`Sandbox.run_chunk`)."""
        if runner.was_stopped(job.job_id):
            return [runner.error_result(job, start, address, device, time.time(), INTERRUPTED,
                                        "stopped before it started")]
        return self._in_sandbox(job, prepared, environment, lambda sandbox: sandbox.run_chunk(
            job, items, start, worker, address, device, environment))

    def _in_sandbox(self, job: Job, prepared: PreparedEnvironment | None, environment: dict[str, Any] | None,
                    call: Any) -> Any:
        """``call(sandbox)`` with the sandbox of ``job``'s session and environment (a fresh
        one, ended after, for a job with no session)."""
        digest = None if job.session is None else session_digest(job.session)
        sandbox, kept = self._sandbox_for(digest, self.settings_for(prepared, environment))
        try:
            return call(sandbox)
        finally:
            if not kept:
                self._end(sandbox, "its job is done")

    def stop(self, job_id: str, reason: str, grace: float) -> str:
        """Stop ``job_id`` in whichever sandboxes run it: "stopped" or "not-running"."""
        with self.lock:
            sandboxes = list(self.in_use)
        stopped = [sandbox.stop(job_id, reason, grace) for sandbox in sandboxes]
        return "stopped" if any(stopped) else "not-running"

    def end_session(self, digest: str) -> bool:
        """End the sandbox of the session whose digest is ``digest`` (its notebook closed)."""
        with self.lock:
            sandboxes = [*([self.sessions.pop(digest)] if digest in self.sessions else []),
                         *self.others.pop(digest, [])]
        for sandbox in sandboxes:
            self._end(sandbox, "its session closed")
        return bool(sandboxes)

    def close(self) -> None:
        """End every sandbox (the worker is closing)."""
        self.closed.set()
        with self.lock:
            sandboxes = list(self.in_use)
            self.sessions.clear()
            self.others.clear()
            spare, self.spare = self.spare, None
        if spare is not None:
            sandboxes.append(spare.result())
        for sandbox in sandboxes:
            self._end(sandbox, "its worker closed")
        self.starter.shutdown(wait=False)

    def _end(self, sandbox: Sandbox, why: str) -> None:
        sandbox.end(why)
        with self.lock:
            self.in_use.discard(sandbox)

    def settings_for(self, prepared: PreparedEnvironment | None,
                     environment: dict[str, Any] | None) -> SandboxSettings | None:
        """The settings a session's sandbox runs with for a job: the pool's, with the
        session's own ``site-packages`` (``prepared``) first on its path; None (any of the
        session's) for a job that asks for no packages (no ``environment``)."""
        if environment is None:
            return None
        if prepared is None:
            return self.settings
        return dataclasses.replace(self.settings, path_prefix=(*self.settings.path_prefix,
                                                               str(prepared.site_packages)))

    def _sandbox_for(self, digest: str | None, settings: SandboxSettings | None) -> tuple[Sandbox, bool]:
        """The sandbox for a job of the session ``digest`` that runs with ``settings``
        (None: any), and whether it is kept for the session (False: it ends with the job).
        A session's sandbox of other settings, idle, is set aside warm (its cells may
        come back to it), at most :data:`SANDBOXES_PER_SESSION` per session."""
        evicted: list[Sandbox] = []
        with self.lock:
            sandbox = self.sessions.get(digest) if digest is not None else None
            if sandbox is not None and sandbox.ended is None and settings in (None, sandbox.settings):
                sandbox.last_used = time.monotonic()
                return sandbox, True
            aside = self.others.get(digest, []) if digest is not None else []
            warm = next((other for other in aside if other.ended is None and other.settings == settings), None)
            if sandbox is not None and sandbox.ended is None and sandbox.busy:
                digest = None  # another environment while a cell runs there: a sandbox for this job alone
            elif warm is not None:  # the session's sandbox of this environment: no start
                aside.remove(warm)
                evicted += self._set_aside_locked(digest, self.sessions.pop(digest, None))
                self.sessions[digest] = warm
                warm.last_used = time.monotonic()
        if warm is not None and digest is not None:
            for old in evicted:
                self._end(old, "its session keeps its more recently used environments")
            return warm, True
        with self.lock:
            spare = None
            if settings in (None, self.settings):  # the spare was started with the pool's settings
                spare, self.spare = self.spare, None
            if digest is not None and digest in self.sessions:  # it ended (a limit) or has another environment
                evicted += self._set_aside_locked(digest, self.sessions.pop(digest))
            evicted += self._make_room_locked()
        for old in evicted:
            self._end(old, "the worker needed room for another session")
        sandbox = spare.result() if spare is not None else None
        if sandbox is None or sandbox.ended is not None:
            if sandbox is not None:
                sandbox.end(sandbox.ended or "ended")
            sandbox = self.starter.submit(self._new_sandbox, settings).result()
        with self.lock:
            self.in_use.add(sandbox)
            if digest is not None:
                self.sessions[digest] = sandbox
        self._start_spare()
        return sandbox, digest is not None

    def _set_aside_locked(self, digest: str, sandbox: Sandbox | None) -> list[Sandbox]:
        """Keep ``sandbox`` (the session's, of other settings) warm beside the session's
        current one; those to end: an ended one, and the least recently used beyond
        :data:`SANDBOXES_PER_SESSION`."""
        if sandbox is None:
            return []
        if sandbox.ended is not None:
            return [sandbox]
        aside = self.others.setdefault(digest, [])
        aside.append(sandbox)
        aside.sort(key=lambda other: other.last_used)
        ending = aside[:max(0, len(aside) - (SANDBOXES_PER_SESSION - 1))]
        del aside[:len(ending)]
        return ending

    def _make_room_locked(self) -> list[Sandbox]:
        """End idle sandboxes, the least recently used first (set-aside ones before any
        session's current one), until there is room for one more."""
        most = min(self.settings.most_sandboxes, MOST_SANDBOXES - 2)
        evicted = []
        kept = len(self.sessions) + sum(map(len, self.others.values()))
        for digest, aside in list(self.others.items()):
            while aside and kept - len(evicted) >= most:
                evicted.append(aside.pop(0))
            if not aside:
                del self.others[digest]
        for digest, sandbox in sorted(self.sessions.items(), key=lambda entry: entry[1].last_used):
            if kept - len(evicted) < most:
                break
            if sandbox.ended is not None or not sandbox.busy:
                evicted.append(self.sessions.pop(digest))
        return evicted

    def _start_spare(self) -> None:
        with self.lock:
            if self.spare is None and not self.closed.is_set():
                self.spare = self.starter.submit(self._new_sandbox)

    def _new_sandbox(self, settings: SandboxSettings | None = None) -> Sandbox:
        with self.lock:
            used = {sandbox.slot for sandbox in self.in_use}
            if self.spare is not None and self.spare.done() and self.spare.exception() is None:
                used.add(self.spare.result().slot)
        slot = next(index for index in range(MOST_SANDBOXES) if index not in used)
        return Sandbox(settings or self.settings, slot, self.device_env)

    def _reap(self) -> None:
        """End sandboxes idle for ``idle_seconds``, and those that ended by themselves."""
        every = max(0.05, min(5.0, self.settings.idle_seconds / 4))
        while not self.closed.wait(every):
            now = time.monotonic()
            with self.lock:
                idle = [digest for digest, sandbox in self.sessions.items() if sandbox.ended is not None
                        or (not sandbox.busy and now - sandbox.last_used > self.settings.idle_seconds)]
                ending = [self.sessions.pop(digest) for digest in idle]
                for digest, aside in list(self.others.items()):
                    ending += [sandbox for sandbox in aside if sandbox.ended is not None
                               or now - sandbox.last_used > self.settings.idle_seconds]
                    aside[:] = [sandbox for sandbox in aside if sandbox not in ending]
                    if not aside:
                        del self.others[digest]
            for sandbox in ending:
                self._end(sandbox, "idle")


def sandbox_command(settings: SandboxSettings, scratch: str, fd: int, uid: int | None,
                    device_env: dict[str, str]) -> list[str]:
    """The command line of a sandbox: its Python (inside bubblewrap where chosen) running
    :func:`serve` with its configuration."""
    python = settings.python or sys.executable
    config = {"fd": fd, "uid": uid, "own_pids": uid is not None or settings.isolation == BUBBLEWRAP,
              "limits": {"memory": settings.memory_bytes, "cpu": settings.cpu_seconds,
                         "processes": settings.processes, "open_files": settings.open_files,
                         "file_size": settings.file_bytes}}
    # its own Python's path, after the prefix, then what the worker can import too (a
    # function pickled by reference to a module of the worker's path loads there)
    bootstrap = ("import json, sys; config = json.loads(sys.argv[1]); "
                 "sys.path[:] = list(dict.fromkeys(config['path_prefix'] + sys.path + config['worker_path'])); "
                 "from gpunet.worker.sandbox import serve; serve(config)")
    config["path_prefix"] = list(settings.path_prefix)
    config["worker_path"] = [entry for entry in sys.path if entry and os.path.isabs(entry)]
    command = [python, "-I", "-c", bootstrap, json.dumps(config)]
    if settings.isolation != BUBBLEWRAP:
        return command
    return bubblewrap_arguments(settings, scratch, python, device_env) + command


def bubblewrap_arguments(settings: SandboxSettings, scratch: str, python: str, device_env: dict[str, str]) -> list[str]:
    """bwrap's arguments: a read-only system, private /tmp and /dev, the provider's home,
    data dir and hidden paths out of view (the Python's own folders seen again, read-only),
    the scratch directory writable, its own process namespace, and no network unless allowed."""
    arguments = [shutil.which("bwrap") or "bwrap", "--die-with-parent", "--new-session", "--unshare-pid",
                 "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
    if not settings.allow_network:
        arguments.append("--unshare-net")
    arguments += ["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp", "--tmpfs", "/dev/shm"]
    hidden = [os.path.expanduser("~"), "/root", "/home", str(data_dir()), *settings.hidden_paths]
    hidden_files = []
    for path in dict.fromkeys(os.path.realpath(path) for path in hidden):
        if os.path.isdir(path) and path != "/":
            arguments += ["--tmpfs", path]
        elif os.path.isfile(path):
            hidden_files.append(path)
    seen_again = [os.path.dirname(os.path.dirname(os.path.realpath(python))), sys.prefix, sys.base_prefix,
                  *(entry for entry in [*settings.path_prefix, *sys.path] if entry)]
    made: set[str] = set()
    exposed = []
    # under the private /tmp too: the Python's own folders (a checkout's .venv) and what the
    # provider put on the path (a session's site-packages), never the worker's other sys.path
    # entries there (Dask's scratch space holds other sessions' spilled data)
    own = {os.path.realpath(entry) for entry in [*seen_again[:3], *settings.path_prefix]}
    # and where gpunet itself is imported from (an editable install: the checkout)
    gpunet_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
    seen_again.append(gpunet_root)
    own.add(gpunet_root)
    for path in dict.fromkeys(os.path.realpath(path) for path in seen_again):
        covering = [*hidden, "/tmp"] if path in own else hidden
        under = [folder for folder in map(os.path.realpath, covering) if _inside(path, folder)]
        if not os.path.exists(path) or not under:
            continue
        exposed.append(path)
        # the folders on the way, which bwrap would make 0700: readable by a sandbox's own uid
        way = Path(path).parent
        for folder in sorted((p for p in [way, *way.parents] if len(str(p)) > len(min(under, key=len))), key=str):
            if str(folder) not in made:
                made.add(str(folder))
                arguments += ["--perms", "0755", "--dir", str(folder)]
        arguments += ["--ro-bind", path, path]
    for path in hidden_files:  # out of view already, unless in a folder seen again
        if any(_inside(path, folder) for folder in exposed) or not any(
                _inside(path, os.path.realpath(folder)) for folder in hidden if os.path.isdir(folder)):
            arguments += ["--ro-bind", "/dev/null", path]
    arguments += ["--bind", scratch, scratch, "--chdir", scratch]
    for node in gpu_device_nodes(device_env.get("CUDA_VISIBLE_DEVICES")):
        arguments += ["--dev-bind", node, node]
    return arguments


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def gpu_device_nodes(visible: str | None) -> list[str]:
    """The /dev nodes a sandbox needs for the GPU ``visible`` names (an index), and only it."""
    shared = ["/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia-modeset"]
    if not visible or not visible.isdigit() or not os.path.exists(f"/dev/nvidia{visible}"):
        return []
    return [f"/dev/nvidia{visible}", *(node for node in shared if os.path.exists(node))]


def scrubbed_environment(scratch: str, device_env: dict[str, str]) -> dict[str, str]:
    """A sandbox's environment: the kept variables of this one, its scratch dir as home
    and temp dir, and the device it was placed on."""
    env = {name: value for name, value in os.environ.items()
           if name in KEPT_ENV or name.startswith(KEPT_ENV_PREFIXES)}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    env.update(HOME=scratch, TMPDIR=scratch, PYTHONDONTWRITEBYTECODE="1", MPLBACKEND="Agg",
               MPLCONFIGDIR=os.path.join(scratch, ".matplotlib"))
    env.update(device_env)
    return env


def device_environment() -> dict[str, str]:
    """What a sandbox of this worker needs to see its device, and only it: the first
    GPU of ``CUDA_VISIBLE_DEVICES`` (the one dask-cuda pinned this worker to)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return {}
    return {"CUDA_VISIBLE_DEVICES": visible.split(",")[0].strip()}


# -- the sandbox's side ------------------------------------------------------------------------


class _Relay:
    """Stands in for the Dask worker inside a sandbox: a job's events go to the worker."""

    def __init__(self, channel: _Channel, key: str, address: str) -> None:
        self.channel = channel
        self.key = key
        self.address = address

    def log_event(self, topic: str, event: dict[str, Any]) -> None:
        self.channel.send(msgpack.packb(["event", self.key, topic, event], use_bin_type=True))


def serve(config: dict[str, Any]) -> None:
    """A sandbox's main loop: confine this process, say it is ready, then run the jobs
    its worker sends (each in a thread) until the worker closes the channel."""
    channel = _Channel(socket.socket(fileno=config["fd"]))
    _confine(config)
    runner.install_routers()
    running: dict[str, threading.Thread] = {}
    channel.send(msgpack.packb(["ready", os.getpid()]))
    while True:
        frame = channel.receive(TRUSTED_FRAME_MAX_BYTES)
        if frame is None:
            break
        message = cloudpickle.loads(frame)  # from the worker, which trusts itself
        if message[0] in ("run", "chunk"):
            blob = channel.receive(TRUSTED_FRAME_MAX_BYTES)
            if blob is None:
                break
            key = message[1]
            thread = threading.Thread(target=_run_one, args=(channel, key, blob, config, running, message[0]),
                                      daemon=True)
            running[key] = thread
            thread.start()
        elif message[0] == "stop":
            _, job_id, reason, grace = message
            threading.Thread(target=asyncio.run, args=(runner.stop_job(job_id, reason, grace),), daemon=True).start()
    _end_strays(config)
    os._exit(0)


def _run_one(channel: _Channel, key: str, blob: bytes, config: dict[str, Any],
             running: dict[str, threading.Thread], kind: str = "run") -> None:
    """Run a request: one item (``run``) or a map chunk's items in turn (``chunk``:
    :func:`gpunet.worker.runner.run_items`), and send back its result, or theirs."""
    try:
        job, items, start, address, device, environment = cloudpickle.loads(blob)
    except BaseException as exc:  # noqa: BLE001 - e.g. a function of a module it cannot import
        running.pop(key, None)
        channel.send(msgpack.packb(["failed", key, f"the job could not be loaded in its sandbox: "
                                                   f"{type(exc).__name__}: {exc}"]))
        return
    relay = _Relay(channel, key, address)

    def run(item: bytes | None, index: int | None) -> JobResult | codec.Frames:
        started = time.time()
        try:
            return runner.execute_job(job, item, index, relay, address, device, environment)
        except BaseException as exc:  # noqa: BLE001 - a cell that broke the runner itself: say so, not hang
            return runner.error_result(job, index, address, device, started, type(exc).__name__,
                                       f"the sandbox's runner failed: {exc}")

    try:
        results = runner.run_items(job, items, start, run) if kind == "chunk" else [run(items, start)]
    finally:
        running.pop(key, None)
        if not running:
            _end_strays(config)  # processes a cell started end with it
    if all(isinstance(result, codec.Frames) for result in results):  # each frame as a frame of the channel: no join
        counts = [len(result) for result in results]
        header = ["results", key, CODEC, counts] if kind == "chunk" else ["result", key, CODEC, counts[0]]
        channel.send(msgpack.packb(header), *(frame for result in results for frame in result))
        return
    try:
        fields = [_fields(result) for result in results]
    except Exception as exc:  # noqa: BLE001 - say why rather than leave the worker waiting
        channel.send(msgpack.packb(["failed", key, f"its result could not leave the sandbox: {type(exc).__name__}: "
                                                   f"{exc}"]))
        return
    header = ["results", key, "fields", [1] * len(fields)] if kind == "chunk" else ["result", key, "fields"]
    channel.send(msgpack.packb(header), *fields)


def _fields(result: JobResult) -> bytes:
    """A trusted job's result as msgpack of its fields (its pickled values as one blob
    each); displays msgpack cannot carry are left out, saying so in its stderr."""
    result = flat_result(result)
    try:
        return msgpack.packb(result_to_event(result), use_bin_type=True)
    except (TypeError, ValueError):
        kept = []
        for bundle in result.displays:
            try:
                msgpack.packb(bundle, use_bin_type=True)
                kept.append(bundle)
            except (TypeError, ValueError):
                result.streams.append((len(result.streams) + 1, "stderr",
                                       f"[gpunet: a display of {sorted(bundle[0])} could not travel]\n"))
        result.displays = kept
        return msgpack.packb(result_to_event(result), use_bin_type=True)


def _confine(config: dict[str, Any]) -> None:
    """Drop to the sandbox's own uid (a root provider), set its limits, keep its memory
    from its neighbours, and let no program it runs gain privileges."""
    uid = config.get("uid")
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
    # processes a cell detaches (fork, setsid, fork) stay its descendants, for _end_strays
    libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    limits = config["limits"]
    # RLIMIT_NPROC counts every process of the uid: a sandbox's own uid has only its own
    processes = limits["processes"] + (0 if uid is not None else _tasks_of_my_user())
    wanted = {resource.RLIMIT_CORE: 0, resource.RLIMIT_NOFILE: limits["open_files"],
              resource.RLIMIT_FSIZE: limits["file_size"], resource.RLIMIT_CPU: limits["cpu"],
              resource.RLIMIT_NPROC: processes}
    if limits.get("memory"):
        wanted[resource.RLIMIT_DATA] = limits["memory"]
    for which, value in wanted.items():
        _, hard = resource.getrlimit(which)
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(which, (value, value))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a file over its size limit: an OSError, not the end


def _tasks_of_my_user() -> int:
    """Processes and threads this user has now (RLIMIT_NPROC counts them all)."""
    uid, count = os.getuid(), 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    count += len(os.listdir(f"/proc/{entry.name}/task"))
            except OSError:
                continue
    return count


def _end_strays(config: dict[str, Any]) -> None:
    """Kill the processes the sandbox's cells left: everything it can signal where the
    sandbox has its own uid or process namespace, else its own descendants."""
    if config.get("own_pids"):
        try:
            os.kill(-1, signal.SIGKILL)  # never the caller itself, nor a namespace's init
        except (ProcessLookupError, PermissionError):
            pass
    else:
        for pid in _descendants(os.getpid()):
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    _reap_children()


def _reap_children(within_s: float = 5.0) -> None:
    """Wait for this process's killed children (its own, and the strays it adopted as a
    subreaper): until reaped, each stays a zombie that counts against the sandbox's
    process limit, and a fork bomb's zombies would leave it unable to start the thread
    of its next cell."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return  # none left
        if pid == 0:  # some still dying
            if time.monotonic() > deadline:
                return
            time.sleep(0.01)


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as stat:
                    parent = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found
