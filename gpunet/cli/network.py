"""The network's verbs: ``gpunet up`` and ``gpunet scheduler`` run a network in the
foreground; ``gpunet provide`` attaches this host's devices to one (and drains them on Ctrl-C)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import dask
from distributed import Client, Nanny, Scheduler
from distributed.utils import get_ip

from gpunet.client.local import EMBEDDED_DASK_CONFIG, EmbeddedNetwork
from gpunet.credits import CreditClient
from gpunet.errors import GpunetError
from gpunet.wire import (DEVICE_RESOURCE, GPU_MEMORY_RESOURCE, GPU_RESOURCE, METERING_STATE, SCHEDULER_PRELOAD,
                         WORKER_PRELOAD)
from gpunet.worker.device import PROVIDER_RATE_ENV, PROVIDER_TOKEN_ENV, local_gpus


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
    scheduler.add_argument("--credits", default=None, metavar="URL",
                           help="meter work against this credit service (with --operator-token-file)")
    scheduler.add_argument("--operator-token-file", default=None, metavar="PATH",
                           help="the credit service's operator token (written by `gpunet credits serve`)")
    scheduler.set_defaults(func=_scheduler)

    provide = subparsers.add_parser(
        "provide", help="attach this host's GPUs (or CPU) to a gpunet network",
        description="Start workers for SCHEDULER: one dask-cuda worker per GPU where there are NVIDIA GPUs and "
                    "dask-cuda, else CPU workers that say they are CPU devices. They are paid, through the "
                    "scheduler's metering, to the provider account whose token is given. Ctrl-C drains: running "
                    "tasks finish, no new ones start, then the workers leave.",
    )
    provide.add_argument("scheduler", help="the scheduler's address, tcp://HOST:PORT")
    provide.add_argument("--credits", default=None, metavar="URL", help="the credit service (or GPUNET_CREDITS)")
    provide.add_argument("--token", default=None, help="this provider's credit token (or GPUNET_TOKEN)")
    provide.add_argument("--gpus", default="all", help="'all' or how many GPUs to offer (default all)")
    provide.add_argument("--workers", type=int, default=1, help="CPU workers where there is no GPU (default 1)")
    provide.add_argument("--name", default=None, help="worker name prefix (default: the provider account)")
    provide.add_argument("--rate", type=float, default=1.0, help="credits per device-second (default 1)")
    provide.add_argument("--host", default=None, help="interface the workers listen on (default: the one that "
                                                       "reaches the scheduler)")
    provide.add_argument("--verbose", "-v", action="store_true", default=argparse.SUPPRESS,
                         help="show Dask's log lines (INFO) as well as the status line")
    provide.set_defaults(func=_provide)


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
    preload = _metering_preload(args)

    async def serve() -> None:
        with dask.config.set(EMBEDDED_DASK_CONFIG):
            async with Scheduler(host=args.host, port=args.port, dashboard_address=f"{args.host}:{args.dashboard_port}",
                                 **preload) as scheduler:
                if preload:
                    print(f"metering: {args.credits}", flush=True)
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


def _metering_preload(args: Any) -> dict[str, Any]:
    """The scheduler arguments that load the metering plugin for `gpunet scheduler
    --credits` (none without it), after checking the operator token with the service."""
    if args.credits is None and args.operator_token_file is None:
        return {}
    if args.credits is None or args.operator_token_file is None:
        raise GpunetError("metering needs both --credits URL and --operator-token-file PATH")
    try:
        token = Path(args.operator_token_file).read_text().strip()
    except OSError as exc:
        raise GpunetError(f"cannot read the operator token file {args.operator_token_file}: {exc.strerror}") from None
    with CreditClient(args.credits, token) as operator:
        operator.accounts()  # raises a clear error for an unreachable service or a non-operator token
    return {"preload": [SCHEDULER_PRELOAD],
            "preload_argv": [["--credits", args.credits, "--operator-token-file", str(args.operator_token_file)]]}


def _provide(args: Any) -> int:
    url = args.credits or os.environ.get("GPUNET_CREDITS")
    token = args.token or os.environ.get("GPUNET_TOKEN")
    if not url or not token:
        raise GpunetError("a provider is paid through the credit service: give --credits URL and --token TOKEN "
                          "(or GPUNET_CREDITS / GPUNET_TOKEN)")
    if not args.rate > 0:
        raise GpunetError(f"--rate must be a positive number of credits per device-second, got {args.rate}")
    with CreditClient(url, token) as me:
        # a bad token, one that is not a provider's or an unreachable service stops here, clearly,
        # before any worker starts
        account = me.provider_account("gpunet provide")
    # The worker processes inherit these and register with the scheduler as this provider's.
    os.environ[PROVIDER_TOKEN_ENV] = token
    os.environ[PROVIDER_RATE_ENV] = str(args.rate)
    if not args.verbose:  # Dask's INFO lines only with --verbose: the status line says what matters
        os.environ["DASK_LOGGING__DISTRIBUTED"] = "warning"
        dask.config.set({"logging.distributed": "warning"})
        logging.getLogger("distributed").setLevel(logging.WARNING)
    with CreditClient(url, token, retries=0) as me:
        return asyncio.run(_run_provider(args, account, me))


async def _run_provider(args: Any, account: str, me: CreditClient) -> int:
    name = args.name or account
    host = args.host or get_ip(args.scheduler.split("://")[-1].rsplit(":", 1)[0])
    gpus = local_gpus()
    if args.gpus != "all":
        gpus = gpus[: int(args.gpus)]
    preload = [WORKER_PRELOAD]
    nannies: list[Any] = []
    # The worker processes inherit an ignored SIGTERM (a service manager sends it to the whole
    # group): this process drains them, and a worker's end at its signal would lose its task.
    # Nannies still stop them (over a queue, then SIGKILL), and they end with this process.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        import dask_cuda
    except ImportError:
        dask_cuda = None
    if gpus and dask_cuda is not None:
        resources = {DEVICE_RESOURCE: 1, GPU_RESOURCE: 1, GPU_MEMORY_RESOURCE: min(g.memory_bytes for g in gpus)}
        visible = ",".join(str(g.index) for g in gpus)
        worker = await dask_cuda.CUDAWorker(args.scheduler, host=host, nthreads=1, name=name, resources=resources,
                                            preload=preload, CUDA_VISIBLE_DEVICES=visible)
        nannies = list(worker.nannies)
        print(f"gpunet provide: {len(gpus)} dask-cuda worker(s), one per GPU ({gpus[0].name})", flush=True)
    else:
        why = "no NVIDIA GPU found" if not gpus else "dask-cuda is not installed (pip install 'gpunet[cuda]')"
        for index in range(args.workers):
            nannies.append(Nanny(args.scheduler, host=host, nthreads=1, name=f"{name}-{index}",
                                 resources={DEVICE_RESOURCE: 1}, preload=preload, dashboard=False))
        await asyncio.gather(*nannies)
        print(f"gpunet provide: {why}: {args.workers} CPU worker(s)", flush=True)
    addresses = [n.worker_address for n in nannies]
    print(f"provider: {account}; workers: {' '.join(addresses)}", flush=True)
    print("Ctrl-C drains them: running tasks finish, then they leave.", flush=True)
    stopped = asyncio.Event()

    def stop() -> None:
        # A signal sent to the whole process group (SIGTERM from a service manager) may have
        # reached the workers too: a worker that it ends is not started again.
        for nanny in nannies:
            nanny.close_gracefully(reason="gpunet-provide-stopping")
        stopped.set()

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop)
    async with Client(args.scheduler, asynchronous=True, timeout=10) as client:
        status = asyncio.ensure_future(_show_status(client, me, account, nannies, stopped))
        finished = asyncio.ensure_future(asyncio.gather(*(n.finished() for n in nannies)))
        await asyncio.wait([finished, asyncio.ensure_future(stopped.wait())], return_when=asyncio.FIRST_COMPLETED)
        status.cancel()
        if not stopped.is_set():
            raise GpunetError("the workers stopped by themselves (is the scheduler gone?)")
        print("\ngpunet provide: draining ...", flush=True)
        started = time.monotonic()
        live = [n.worker_address for n in nannies if n.worker_address and n.is_alive()]
        if live:
            await _drain(client, live)
    await asyncio.gather(*(n.close(timeout=5) for n in nannies), return_exceptions=True)
    print(f"gpunet provide: stopped (drained in {time.monotonic() - started:.1f} s)", flush=True)
    return 0


#: How often `gpunet provide` refreshes its status line.
STATUS_EVERY_S = 2.0


async def _show_status(client: Any, me: CreditClient, account: str, nannies: list[Any],
                       stopped: asyncio.Event) -> None:
    """The one-line live status: workers, tasks running, earned today, reputation. On a
    terminal it is rewritten in place; elsewhere (a log) a line is written when it changes."""
    tty = sys.stdout.isatty()
    last = ""
    while not stopped.is_set():
        try:
            mine = {n.worker_address for n in nannies if n.worker_address}
            state = await getattr(client.scheduler, METERING_STATE)() or {}
            running = sum(len(state.get("running", {}).get(address, ())) for address in mine)
            earned = await asyncio.to_thread(me.earnings, account, 2**62)  # the totals, no series
            record = earned["record"]
            standing = ("QUARANTINED" if record["quarantined"]
                        else f"reputation {record['reputation']:.2f} (quarantine below {earned['quarantine_below']:g})")
            line = (f"gpunet provide: {len(mine)} worker(s), {running} running · earned today "
                    f"{earned['today']['credits']} credits ({earned['today']['tasks']} tasks) · balance "
                    f"{earned['balance']} · {standing}")
        except Exception as exc:  # noqa: BLE001 - the status line says so and goes on
            line = f"gpunet provide: status unavailable ({type(exc).__name__}: {exc})"
        if tty:
            print("\r" + line[: shutil.get_terminal_size().columns - 1].ljust(len(last)), end="", flush=True)
        elif line != last:
            print(line, flush=True)
        last = line
        try:
            await asyncio.wait_for(stopped.wait(), STATUS_EVERY_S)
        except asyncio.TimeoutError:
            pass


async def _drain(client: Any, addresses: list[str], timeout: float = 600) -> None:
    """Take the workers' device slots away (the scheduler then starts no gpunet task
    there: every one asks for a slot), wait for the tasks they are executing to
    finish, then retire them: their results move elsewhere, and tasks that were
    queued there but never started go to other workers."""
    await asyncio.wait_for(client.run(_close_device_slots, workers=addresses, on_error="return"), 10)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        executing = await asyncio.wait_for(client.run(_executing, workers=addresses, on_error="return"), 10)
        if not any(count for count in executing.values() if isinstance(count, int)):
            break
        await asyncio.sleep(0.2)
    await asyncio.wait_for(client.retire_workers(workers=addresses, close_workers=False), 30)


async def _close_device_slots(dask_worker: Any = None) -> None:
    await dask_worker.set_resources(**{DEVICE_RESOURCE: 0})


def _executing(dask_worker: Any = None) -> int:
    return len(dask_worker.state.executing)
