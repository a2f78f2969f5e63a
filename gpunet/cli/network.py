"""The network's verbs: ``gpunet up`` and ``gpunet scheduler`` run a network in the
foreground; ``gpunet provide`` attaches this host's devices to one (and drains them on Ctrl-C)."""

from __future__ import annotations

import argparse
import logging
import asyncio
import os
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
from gpunet.wire import DEVICE_RESOURCE, GPU_MEMORY_RESOURCE, GPU_RESOURCE, SCHEDULER_PRELOAD, WORKER_PRELOAD
from gpunet.worker.device import PROVIDER_RATE_ENV, PROVIDER_TOKEN_ENV, local_gpus

logger = logging.getLogger(__name__)


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
        account = me.ping()["account"]  # a bad token or an unreachable service stops here, clearly
    # The worker processes inherit these and register with the scheduler as this provider's.
    os.environ[PROVIDER_TOKEN_ENV] = token
    os.environ[PROVIDER_RATE_ENV] = str(args.rate)

    def own_record() -> dict[str, Any]:
        with CreditClient(url, token) as me:
            return me.provider_record(account)

    return asyncio.run(_run_provider(args, account, own_record))


#: `gpunet provide`'s exit status when the provider's workers left because it is quarantined.
EXIT_QUARANTINED = 3


def quarantine_notice(record: dict[str, Any], credits_url: str | None = None) -> str:
    """What a quarantined provider is told: why (its mismatches, its reputation and the
    floor it fell below, as the credit service recorded them) and how to appeal."""
    where = f" --credits {credits_url}" if credits_url else ""
    reason = record.get("quarantine_reason") or (f"reputation {record.get('reputation', 0):.3f} fell below the "
                                                 "credit service's --reputation-floor")
    return (f"gpunet provide: provider {record['provider']} is QUARANTINED, so the scheduler retired its workers "
            f"and gives it no more work.\n"
            f"  why: {record.get('mismatches', 0)} of its verified results disagreed with other providers' "
            f"(mismatches), against {record.get('valid', 0)} that agreed: {reason}.\n"
            f"  appeal: ask the network's operator to check your device and run "
            f"`gpunet credits clear-quarantine {record['provider']}{where}`, which forgives the mismatches; "
            "then start `gpunet provide` again.")


async def _run_provider(args: Any, account: str, own_record: Any = None) -> int:
    """Run the provider's workers until Ctrl-C (drain, exit 0), the scheduler's end (an
    error), or a quarantine (:data:`EXIT_QUARANTINED`, saying why and how to appeal).
    ``own_record`` reads this provider's trust record from the credit service."""
    name = args.name or account
    host = args.host or get_ip(args.scheduler.split("://")[-1].rsplit(":", 1)[0])
    gpus = local_gpus()
    if args.gpus != "all":
        gpus = gpus[: int(args.gpus)]
    preload = [WORKER_PRELOAD]
    nannies: list[Any] = []
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
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopped.set)
    finished = asyncio.ensure_future(asyncio.gather(*(n.finished() for n in nannies)))
    await asyncio.wait([finished, asyncio.ensure_future(stopped.wait())], return_when=asyncio.FIRST_COMPLETED)
    if not stopped.is_set():
        record = await _record_if_reachable(own_record)
        if record is not None and record.get("quarantined"):
            print(quarantine_notice(record, getattr(args, "credits", None) or os.environ.get("GPUNET_CREDITS")),
                  file=sys.stderr, flush=True)
            return EXIT_QUARANTINED
        raise GpunetError("the workers stopped by themselves (is the scheduler gone?)")
    print("gpunet provide: draining ...", flush=True)
    live = [n.worker_address for n in nannies if n.worker_address]  # a Nanny may have restarted its worker
    async with Client(args.scheduler, asynchronous=True, timeout=10) as client:
        await _drain(client, live)
    await asyncio.gather(*(n.close(timeout=10) for n in nannies), return_exceptions=True)
    print("gpunet provide: stopped", flush=True)
    return 0


async def _record_if_reachable(own_record: Any) -> dict[str, Any] | None:
    """The provider's trust record, or None where it cannot be read (no credit service)."""
    if own_record is None:
        return None
    try:
        return await asyncio.to_thread(own_record)
    except Exception as exc:  # noqa: BLE001 - only used to explain why the workers left
        logger.warning("gpunet provide: could not read this provider's trust record: %s", exc)
        return None


async def _drain(client: Any, addresses: list[str], timeout: float = 600) -> None:
    """Take the workers' device slots away (the scheduler then starts no gpunet task
    there: every one asks for a slot), wait for the tasks they are executing to
    finish, then retire them: their results move elsewhere, and tasks that were
    queued there but never started go to other workers."""
    await client.run(_close_device_slots, workers=addresses, on_error="return")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        executing = await client.run(_executing, workers=addresses, on_error="return")
        if not any(count for count in executing.values() if isinstance(count, int)):
            break
        await asyncio.sleep(0.2)
    await client.retire_workers(workers=addresses, close_workers=False)


async def _close_device_slots(dask_worker: Any = None) -> None:
    await dask_worker.set_resources(**{DEVICE_RESOURCE: 0})


def _executing(dask_worker: Any = None) -> int:
    return len(dask_worker.state.executing)
