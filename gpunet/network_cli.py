"""``gpunet up`` and ``gpunet scheduler``: run a network in the foreground."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Any


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``up`` and ``scheduler`` to the ``gpunet`` parser."""
    up = subparsers.add_parser(
        "up", help="start a whole network on this machine (scheduler + local workers) in the foreground",
        description="Start the embedded network in the foreground: a Dask scheduler with gpunet's plugins and "
                    "one worker per GPU (or CPU workers). Ctrl-C stops it.",
    )
    up.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    up.add_argument("--port", type=int, default=8786, help="scheduler port (0 picks a free one; default 8786)")
    up.add_argument("--dashboard-port", type=int, default=8787, help="dashboard port (0 picks a free one)")
    up.add_argument("--workers", type=int, default=None, help="CPU workers where there is no GPU (default 2)")
    up.add_argument("--no-credits", action="store_true", help="do not start a credit service (work is not metered)")
    up.set_defaults(func=_up)

    scheduler = subparsers.add_parser(
        "scheduler", help="run only a gpunet scheduler in the foreground",
        description="Run a Dask scheduler configured for gpunet. Providers join it with `gpunet provide ADDRESS`.",
    )
    scheduler.add_argument("--host", default="127.0.0.1")
    scheduler.add_argument("--port", type=int, default=8786)
    scheduler.add_argument("--dashboard-port", type=int, default=8787)
    scheduler.set_defaults(func=_scheduler)


def _wait_for_stop() -> None:
    """Block until Ctrl-C or SIGTERM."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass


def _up(args: Any) -> int:
    from gpunet.network import EmbeddedNetwork

    embedded = EmbeddedNetwork(n_workers=args.workers, host=args.host, port=args.port,
                               dashboard_port=args.dashboard_port, credits=not args.no_credits)
    try:
        print(f"gpunet: {embedded.note}", flush=True)
        print(f"scheduler: {embedded.scheduler_address}", flush=True)
        print(f"dashboard: {embedded.dashboard_link or 'none (install bokeh)'}", flush=True)
        connect = f"%gpunet connect {embedded.scheduler_address}"
        if embedded.credits_service is not None:
            print(f"credits: {embedded.credits_url}", flush=True)
            print(f"operator token file: {embedded.credits_service.operator_token_file}", flush=True)
            print(f"notebook token: {embedded.client_token}", flush=True)
            connect += f" --credits {embedded.credits_url} --token {embedded.client_token}"
        print(f"connect from a notebook with:  {connect}", flush=True)
        print("Ctrl-C stops the network.", flush=True)
        _wait_for_stop()
    finally:
        print("gpunet: stopping ...", file=sys.stderr, flush=True)
        embedded.close()
    print("gpunet: stopped", flush=True)
    return 0


def _scheduler(args: Any) -> int:
    import asyncio

    import dask
    from distributed import Scheduler  # imported first: it loads the config we set part of

    from gpunet.network import EMBEDDED_DASK_CONFIG

    async def serve() -> None:
        with dask.config.set(EMBEDDED_DASK_CONFIG):
            async with Scheduler(host=args.host, port=args.port,
                                 dashboard_address=f"{args.host}:{args.dashboard_port}") as scheduler:
                print(f"scheduler: {scheduler.address}", flush=True)
                print(f"providers join with:  gpunet provide {scheduler.address}", flush=True)
                loop = asyncio.get_running_loop()
                stopped = asyncio.Event()
                for signum in (signal.SIGINT, signal.SIGTERM):
                    loop.add_signal_handler(signum, stopped.set)
                await stopped.wait()

    asyncio.run(serve())
    print("gpunet: scheduler stopped", flush=True)
    return 0
