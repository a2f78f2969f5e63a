"""``gpunet dashboard``: a provider's dashboard (:class:`gpunet.ProviderDashboard`) as a page of
its own, served by Voila, for providers who do not use notebooks.

The page is a one-cell notebook written into a private temporary folder; Voila runs it
and shows only its output. The provider's token never enters the notebook nor a command
line: the kernel reads it from her token file (``GPUNET_TOKEN_FILE``), and the page asks
for a token of its own, printed with the address. It listens on 127.0.0.1 unless told.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from gpunet.clitools import wait_for, wait_for_stop
from gpunet.credits import CreditClient
from gpunet.errors import GpunetError
from gpunet.ui.dashboard import CREDITS_ENV, SCHEDULER_ENV, TOKEN_ENV, TOKEN_FILE_ENV, provider_token

#: How long Voila has to start listening.
START_TIMEOUT_S = 60.0

NOTEBOOK = {
    "cells": [{"cell_type": "code", "execution_count": None, "id": "dashboard", "metadata": {}, "outputs": [],
               "source": "import gpunet\ngpunet.ProviderDashboard()"}],
    "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}},
    "nbformat": 4, "nbformat_minor": 5,
}


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``dashboard`` to the ``gpunet`` parser."""
    dashboard = subparsers.add_parser(
        "dashboard", help="serve a provider's dashboard as a web page (Voila)",
        description="Serve your provider dashboard (earnings, workers, reputation, live) as a page of its own, "
                    "with Voila, on 127.0.0.1 by default; the address to open is printed. Ctrl-C stops it.",
    )
    dashboard.add_argument("--token-file", required=True, metavar="PATH", help="the file holding your provider token")
    dashboard.add_argument("--credits", default=None, metavar="URL", help=f"the credit service (or {CREDITS_ENV})")
    dashboard.add_argument("--scheduler", default=None, metavar="ADDRESS",
                           help=f"the network whose workers to show, tcp://HOST:PORT (or {SCHEDULER_ENV})")
    dashboard.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    dashboard.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    dashboard.set_defaults(func=_dashboard)


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _dashboard(args: Any) -> int:
    url = args.credits or os.environ.get(CREDITS_ENV)
    if not url:
        raise GpunetError(f"the dashboard reads your figures from the credit service: give --credits URL "
                          f"(or set {CREDITS_ENV})")
    token_file = Path(args.token_file).expanduser().resolve()
    with CreditClient(url, provider_token(None, token_file)) as me:
        account = me.provider_account("gpunet dashboard")  # a wrong token stops here, clearly
    if shutil.which("voila") is None and importlib.util.find_spec("voila") is None:
        raise GpunetError("gpunet dashboard serves the page with Voila: pip install 'gpunet[dashboard]'")
    port = args.port or _free_port(args.host)
    page_token = secrets.token_urlsafe(24)
    folder = Path(tempfile.mkdtemp(prefix="gpunet-dashboard-"))  # mode 700: only this user reads it
    try:
        (folder / "dashboard.ipynb").write_text(json.dumps(NOTEBOOK))
        config = folder / "voila.json"  # Voila reads its config from its working folder
        config.write_text(json.dumps({"Voila": {"token": page_token}}))
        config.chmod(0o600)
        env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
        env.update({TOKEN_FILE_ENV: str(token_file), CREDITS_ENV: url})
        if args.scheduler or os.environ.get(SCHEDULER_ENV):
            env[SCHEDULER_ENV] = args.scheduler or os.environ[SCHEDULER_ENV]
        command = [sys.executable, "-m", "voila", "dashboard.ipynb", "--no-browser", f"--port={port}",
                   f"--Voila.ip={args.host}", "--Voila.port_retries=0"]
        voila = subprocess.Popen(command, cwd=folder, env=env, stdin=subprocess.DEVNULL,
                                 stdout=None if args.verbose else subprocess.DEVNULL,
                                 stderr=None if args.verbose else subprocess.DEVNULL)
        try:
            started = wait_for(lambda: voila.poll() is not None or _listening(args.host, port), START_TIMEOUT_S, 0.1)
            if voila.poll() is not None:
                raise GpunetError(f"Voila stopped at start (exit code {voila.returncode}); run "
                                  "`gpunet -v dashboard ...` to see why")
            if not started:
                raise GpunetError(f"Voila did not listen on {args.host}:{port} within {START_TIMEOUT_S:.0f} s")
            shown = f"[{args.host}]" if ":" in args.host else args.host
            print(f"gpunet dashboard: provider {account}", flush=True)
            print(f"dashboard: http://{shown}:{port}/?token={page_token}", flush=True)
            if args.host not in ("127.0.0.1", "localhost", "::1"):
                print(f"gpunet dashboard: listening on {args.host}: whoever reaches it with that address sees "
                      "your figures", flush=True)
            print("Ctrl-C stops it.", flush=True)
            wait_for_stop(ended=lambda: voila.poll() is not None)
        finally:
            if voila.poll() is None:
                voila.terminate()
                try:
                    voila.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    voila.kill()
                    voila.wait()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print("gpunet dashboard: stopped", flush=True)
    return 0
