"""Running `gpunet ...` verbs as real processes in the tests, as a user would."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

GPUNET = [sys.executable, "-m", "gpunet.cli"]


def start(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start `gpunet ARGS` in its own process group (so Ctrl-C can reach all of it), with
    ``env`` added to this process's environment."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.Popen(GPUNET + args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)


def expect(process: subprocess.Popen, pattern: str, timeout: float = 90) -> re.Match:
    """Read the process's output until a line matches ``pattern``; fail showing what it said."""
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            if process.poll() is not None:
                break
            continue
        seen.append(line)
        match = re.search(pattern, line)
        if match:
            return match
    raise AssertionError(f"never saw {pattern!r}; output was:\n{''.join(seen)}")


def stop(process: subprocess.Popen, sig: int = signal.SIGINT, timeout: float = 60) -> str:
    """Send ``sig`` to the process group (as Ctrl-C in its terminal) and return its output."""
    if process.poll() is None:
        os.killpg(process.pid, sig)
    try:
        return process.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        return process.communicate()[0]


@contextlib.contextmanager
def metered_network(place: Path, providers: list[str], client: str, credits: int = 10_000,
                    provide_args: tuple[str, ...] = (), provide_env: dict[str, str] | None = None,
                    token_folder: Path | None = None) -> Iterator[dict]:
    """A credit service, `gpunet scheduler --private --credits` and one `gpunet provide` process per
    provider account (with ``provide_args``, ``provide_env``, its token file in ``token_folder``,
    default ``place``), on 127.0.0.1; ``client`` is a client account holding ``credits``.
    Yields {"service", "operator", "address", "tokens", "providers": {name: process},
    "workers": {worker address: provider name}, "outputs": {name: what its provide said first}};
    stops every part on exit."""
    from gpunet.credits import serve_in_background

    service = serve_in_background(place / "credits.sqlite3", operator_token_file=place / "operator-token")
    operator = service.client()
    tokens = {name: operator.create_account(name, "provider")["token"] for name in providers}
    tokens[client] = operator.create_account(client, "client")["token"]
    operator.mint(client, credits, key=f"mint-{client}")
    processes = []
    try:
        scheduler = start(["scheduler", "--private", "--port", "0", "--dashboard-port", "0", "--credits",
                           service.url, "--operator-token-file", str(place / "operator-token")])
        processes.append(scheduler)
        address = expect(scheduler, r"scheduler: (tcp://127\.0\.0\.1:\d+)").group(1)
        running, workers, outputs = {}, {}, {}
        for name in providers:
            token_file = (token_folder or place) / f"{name}-token"
            token_file.write_text(tokens[name])
            token_file.chmod(0o600)
            provide = start(["provide", address, "--credits", service.url, "--token-file", str(token_file),
                             "--host", "127.0.0.1", *provide_args], env=provide_env)
            processes.append(provide)
            outputs[name] = expect(provide, r"gpunet provide: cells run in a sandbox.*").group(0)
            worker = expect(provide, rf"provider: {name}; workers: (tcp://127\.0\.0\.1:\d+)").group(1)
            running[name] = provide
            workers[worker] = name
        yield {"service": service, "operator": operator, "address": address, "tokens": tokens, "providers": running,
               "workers": workers, "outputs": outputs}
    finally:
        for process in reversed(processes):
            stop(process)
        operator.close()
        service.stop()


@contextlib.contextmanager
def metered_market(folder: Path) -> Iterator[dict]:
    """:func:`metered_network` with providers alice and bob and client carol (their tokens in
    ``folder/NAME-token``)."""
    with metered_network(folder, ["alice", "bob"], "carol") as market:
        yield market


def credit_service_with_accounts(root: Any) -> tuple[Any, dict[str, str]]:
    """A credit service process in ``root`` (nobody is ever quarantined) with provider
    accounts alice and bob, client carol (1,000,000 credits) and a meter account (what a
    scheduler reports with); returns (service, {name: token}). The caller stops it."""
    from gpunet.credits import serve_in_background

    svc = serve_in_background(root / "credits.sqlite3", operator_token_file=root / "operator-token",
                              log_path=root / "service.log", extra_args=["--reputation-floor", "0"])
    with svc.client() as operator:
        tokens = {name: operator.create_account(name, role)["token"]
                  for name, role in (("alice", "provider"), ("bob", "provider"), ("carol", "client"), ("meter", "meter"))}
        operator.mint("carol", 1_000_000, key="mint-carol")
    return svc, tokens
