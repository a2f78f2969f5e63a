"""What the end-to-end tests ask a running network: what reached Dask, what the workers
still run, and a bounded wait for a positive event (never a fixed sleep)."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

#: What a clean exit never prints: tracebacks, or a network shut down badly at exit.
EXIT_NOISE = ("Traceback", "RuntimeError", "not reported", "cannot schedule new futures")


def spy_on_sending(monkeypatch: Any, net: Any) -> list[str]:
    """Record each call of ``net.client.submit`` / ``map`` / ``scatter``, the only ways a
    job's tasks and inputs reach Dask (gpunet/client/submit.py, verified.py); an empty
    list means nothing was sent."""
    calls: list[str] = []
    for name in ("submit", "map", "scatter"):
        original = getattr(net.client, name)

        def spy(*args: Any, _name: str = name, _original: Any = original, **kwargs: Any) -> Any:
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(net.client, name, spy)
    return calls


def running_jobs(net: Any) -> dict[str, list[str]]:
    """The jobs each worker's runner has registered as running (gpunet.worker.runner._running,
    keys "<job id>" or "<job id>/<item>"), asked through Client.run: it runs on the workers'
    event loops, so it answers even while every worker thread is busy."""
    def running_keys() -> list[str]:  # nested, so that it travels by value: workers cannot import this module
        from gpunet.worker import runner

        with runner._registry_lock:
            return sorted(runner._running)

    return net.client.run(running_keys)


def wait_until(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``condition()`` until it is true and return its value; fail saying ``what`` was
    awaited after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout:g} s for {what}")
        time.sleep(0.05)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie, exited but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"
    except OSError:
        return False


@contextlib.contextmanager
def ctrl_c_once_it_runs(beacon: Path, within: float = 60) -> Iterator[None]:
    """Send this thread a SIGINT (Ctrl-C) once the remote job writes ``beacon``, at most
    ``within`` seconds from now; the signal is not sent after the block has ended."""
    main = threading.get_ident()
    done = threading.Event()

    def interrupt() -> None:
        deadline = time.monotonic() + within
        while not beacon.exists() and time.monotonic() < deadline and not done.is_set():
            time.sleep(0.02)
        if not done.is_set():
            signal.pthread_kill(main, signal.SIGINT)

    # a process started in the background by a non-interactive shell ignores SIGINT: Python's own handler here
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    interrupter = threading.Thread(target=interrupt, daemon=True)
    interrupter.start()
    try:
        yield
    finally:
        done.set()
        interrupter.join(timeout=10)
        signal.signal(signal.SIGINT, previous)


def wait_reported(net, timeout=30):
    """Until the scheduler has sent every settlement and verdict to the credit service."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = net.metering_state()
        if state["queued"] == 0 and state["awaiting_verdict"] == 0:
            return state
        time.sleep(0.1)
    raise AssertionError(f"reports still queued: {state}")
