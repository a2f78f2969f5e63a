"""Run the credit service in a child process, for ``gpunet up``, the embedded network and tests.

A child process (not a thread) so that it can be killed for real, SIGKILL
included, and so its writer and event loop never compete with the caller's GIL.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any

import gpunet
from gpunet.credits._client import CreditClient
from gpunet.errors import CreditsUnavailableError

logger = logging.getLogger(__name__)

URL_PREFIX = "credit service: "
TOKEN_FILE_PREFIX = "operator token file: "
#: Set in the child's environment: the pid whose death stops the service (see watch_parent).
PARENT_PID_ENV = "GPUNET_CREDITS_PARENT_PID"


def watch_parent(parent: int, every: float = 0.5) -> threading.Thread:
    """Stop this process gracefully (SIGTERM to itself: finish requests, sign a last head)
    once ``parent`` is gone, so that a service started for a notebook or a network never
    outlives it, however that ended (SIGKILL, a crash, an interpreter that exited
    without closing it). Returns the watching daemon thread."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every)
        logger.warning("the process that started this credit service (pid %d) is gone; stopping", parent)
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=watch, name="credits-parent-watchdog", daemon=True)
    thread.start()
    return thread


class CreditServiceProcess:
    """A running ``gpunet credits serve`` child: ``url``, ``operator_token``, ``stop()``, ``kill()``."""

    def __init__(self, process: subprocess.Popen, url: str, token_file: Path, log_path: Path,
                 db: str | None) -> None:
        self.process = process
        self.url = url
        self.operator_token_file = token_file
        self.log_path = log_path
        self.db = db
        try:
            self.operator_token: str | None = token_file.read_text().strip()
        except OSError:
            logger.warning("the operator token file %s is missing; restart the service with "
                           "--rotate-operator-token to issue a new one", token_file)
            self.operator_token = None

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self.process.pid

    def client(self, token: str | None = None, **kwargs: Any) -> Any:
        """Return a :class:`CreditClient` for this service (operator token by default)."""
        return CreditClient(self.url, token or self.operator_token, **kwargs)

    def alive(self) -> bool:
        """Whether the child still runs."""
        return self.process.poll() is None

    def stop(self, timeout: float = 15) -> int | None:
        """Stop gracefully (SIGTERM: finish requests, sign a last head); SIGKILL after ``timeout``."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning("credit service pid %d did not stop in %.0f s; killing it", self.pid, timeout)
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def kill(self) -> None:
        """Kill the child with SIGKILL at once (what a crash looks like)."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()

    def __enter__(self) -> CreditServiceProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<CreditServiceProcess pid={self.pid} url={self.url}>"


def _pump(stream: IO[str], lines: queue.SimpleQueue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def serve_in_background(
    db: str | os.PathLike[str] | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    operator_token_file: str | os.PathLike[str] | None = None,
    key_file: str | os.PathLike[str] | None = None,
    log_path: str | os.PathLike[str] | None = None,
    timeout: float = 60,
    env: dict[str, str] | None = None,
    extra_args: list[str] | None = None,
) -> CreditServiceProcess:
    """Start ``gpunet credits serve`` in a child process and wait until it listens.

    ``port=0`` picks a free port; ``extra_args`` go to the command as they are
    (``["--reputation-floor", "0"]``). Returns a handle with ``.url``,
    ``.operator_token``, ``.stop()`` and ``.kill()``. The child's log goes to
    ``log_path`` (a temporary file by default). Raises CreditsUnavailableError
    with the log's tail if it does not come up within ``timeout`` seconds.
    """
    cmd = [sys.executable, "-m", "gpunet.credits", "serve", "--host", host, "--port", str(port)]
    if db is not None:
        cmd += ["--db", os.fspath(db)]
    if operator_token_file is not None:
        cmd += ["--operator-token-file", os.fspath(operator_token_file)]
    if key_file is not None:
        cmd += ["--key-file", os.fspath(key_file)]
    cmd += list(extra_args or ())
    if log_path is None:
        fd, name = tempfile.mkstemp(prefix="gpunet-credits-", suffix=".log")
        os.close(fd)
        log = Path(name)
    else:
        log = Path(log_path)
    child_env = dict(os.environ if env is None else env)
    child_env.setdefault("PYTHONUNBUFFERED", "1")
    child_env[PARENT_PID_ENV] = str(os.getpid())  # the child stops when this process is gone
    # The child must import this very gpunet, installed or not.
    root = str(Path(gpunet.__file__).resolve().parent.parent)
    paths = child_env.get("PYTHONPATH", "").split(os.pathsep) if child_env.get("PYTHONPATH") else []
    if root not in paths:
        child_env["PYTHONPATH"] = os.pathsep.join([root, *paths])
    with open(log, "ab") as log_fh:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log_fh, stdin=subprocess.DEVNULL,
                                text=True, env=child_env)
    lines: queue.SimpleQueue = queue.SimpleQueue()
    threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True,
                     name=f"credits-stdout-{proc.pid}").start()
    url = token_file = None
    deadline = time.monotonic() + timeout
    while url is None or token_file is None:
        left = deadline - time.monotonic()
        try:
            line = lines.get(timeout=max(left, 0.01))
        except queue.Empty:
            line = ""
        if line is None or left <= 0:
            proc.kill() if proc.poll() is None else None
            proc.wait()
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
            why = f"exited with status {proc.returncode}" if line is None else f"did not start in {timeout:.0f} s"
            raise CreditsUnavailableError(f"the credit service ({' '.join(cmd)}) {why}; its log {log}:\n{tail}")
        if line.startswith(URL_PREFIX):
            url = line[len(URL_PREFIX):].strip()
        elif line.startswith(TOKEN_FILE_PREFIX):
            token_file = Path(line[len(TOKEN_FILE_PREFIX):].strip())
    logger.info("credit service pid %d at %s (log %s)", proc.pid, url, log)
    return CreditServiceProcess(proc, url, token_file, log, None if db is None else os.fspath(db))
