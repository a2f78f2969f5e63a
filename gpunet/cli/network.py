"""The network's verbs: ``gpunet up`` and ``gpunet scheduler`` run a network in the
foreground; ``gpunet provide`` attaches this host's devices to one (and drains them on Ctrl-C)."""

from __future__ import annotations

import argparse
import logging
import asyncio
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from collections.abc import Awaitable, Callable
from typing import Any

from gpunet import certs
from gpunet.client.placement import check_max_rate
from gpunet.clitools import read_token_file, wait_for_stop
from gpunet.credits import CreditClient
from gpunet.credits.cli import SERVICE_WAIT_S, wait_for_service
from gpunet.errors import GpunetError, OptionError
from gpunet.paths import write_private
from gpunet.roles import WORKER_NAME_SEPARATOR, WorkerDoor
from gpunet.wire import (
    DEVICE_RESOURCE,
    EXECUTING,
    METERING_STATE,
    SCHEDULER_PRELOAD,
    WORKER_PRELOAD,
)
from gpunet.worker.environment import (
    DEFAULT_MAX_INSTALL_BYTES,
    DEFAULT_MAX_INSTALL_SECONDS,
    INSTALLS_ENV,
    InstallPolicy,
)
from gpunet.worker.device import (
    PROVIDER_RATE_ENV,
    PROVIDER_TOKEN_ENV,
    dask_cuda_or_none,
    gpu_resources,
    local_gpus,
    parse_size,
)
from gpunet.worker.sandbox import BUBBLEWRAP, PROCESS, SANDBOX_ENV, SandboxSettings, bubblewrap_works, make_non_dumpable

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
    up.add_argument("--dashboard-port", type=int, default=8787, help="dashboard port (0 picks a free one; default 8787)")
    up.add_argument("--workers", type=int, default=None, help="CPU workers where there is no GPU (default 2)")
    up.add_argument("--no-credits", action="store_true", help="do not start a credit service (work is not metered)")
    up.set_defaults(func=_up)

    scheduler = subparsers.add_parser(
        "scheduler", help="run only a gpunet scheduler in the foreground",
        description="Run a Dask scheduler configured for gpunet. Providers join it with `gpunet provide ADDRESS`. "
                    "An open network (strangers) speaks mutual TLS only, with certificates from `gpunet certs`: "
                    "give --tls-ca-file, --tls-cert, --tls-key (and --credits: every task carries a hold). "
                    "--private runs a lab network where everyone is trusted (plain Dask, no certificates).",
    )
    scheduler.add_argument("--host", default="127.0.0.1",
                           help="interface to listen on (default 127.0.0.1: this machine only; 0.0.0.0: every "
                                "interface, for providers and notebooks on other machines)")
    scheduler.add_argument("--port", type=int, default=8786, help="scheduler port (0 picks a free one; default 8786)")
    scheduler.add_argument("--dashboard-port", type=int, default=8787,
                           help="dashboard port; an open network's dashboard listens on 127.0.0.1 only")
    scheduler.add_argument("--private", action="store_true",
                           help="a private network: every Dask client is trusted (it can run code on the scheduler "
                                "and the workers)")
    _add_tls_arguments(scheduler, "scheduler")
    scheduler.add_argument("--credits", default=None, metavar="URL",
                           help="meter work against this credit service (with --meter-token-file)")
    scheduler.add_argument("--meter-token-file", default=None, metavar="PATH",
                           help="a file holding the token of a meter account (it may only pay and release holds)")
    scheduler.add_argument("--operator-token-file", default=None, metavar="PATH",
                           help="a private network only: the operator token (written by `gpunet credits serve`)")
    scheduler.add_argument("--default-max-rate", type=float, default=None, metavar="R",
                           help="the price limit of a notebook that sets none (%%gpunet connect --max-rate), credits "
                                "per device-second: only providers at or below it run its cells (default 1)")
    scheduler.add_argument("--max-rate", type=float, default=None, metavar="R",
                           help="the most a provider may ask with `gpunet provide --rate` (default 100)")
    scheduler.set_defaults(func=_scheduler)

    status = subparsers.add_parser(
        "status", help="the workers a scheduler has, waiting for some to join",
        description="Connect to SCHEDULER (a private network's) and list its workers (name, address, resources), "
                    "after waiting for --wait-for workers to join (exit 1 if they do not within --timeout).",
    )
    status.add_argument("scheduler", help="the scheduler's address, tcp://HOST:PORT")
    status.add_argument("--wait-for", type=int, default=0, metavar="N", help="wait until N workers have joined")
    status.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                        help="how long to wait for the scheduler and the workers")
    status.set_defaults(func=_status)

    provide = subparsers.add_parser(
        "provide", help="attach this host's GPUs (or CPU) to a gpunet network",
        description="Start workers for SCHEDULER: one dask-cuda worker per GPU where there are NVIDIA GPUs and "
                    "dask-cuda, else CPU workers that say they are CPU devices. They are paid, through the "
                    "scheduler's metering, to the provider account whose token is given. Ctrl-C drains: running "
                    "tasks finish, no new ones start, then the workers leave.",
    )
    provide.add_argument("scheduler", help="the scheduler's address, tcp://HOST:PORT (tls://HOST:PORT on an open "
                                           "network)")
    provide.add_argument("--credits", default=None, metavar="URL",
                         help="the credit service (or GPUNET_CREDITS); a private network's providers only")
    provide.add_argument("--token-file", default=None, metavar="PATH",
                         help="a file holding this provider's credit token (or GPUNET_TOKEN); a private network's "
                              "providers only (an open one pays the account its certificate names)")
    provide.add_argument("--token", default=None, help=argparse.SUPPRESS)  # kept for old scripts: use --token-file
    _add_tls_arguments(provide, "provider")
    provide.add_argument("--gpus", default="all", help="'all' or how many GPUs to offer (default all)")
    provide.add_argument("--workers", type=int, default=1, help="CPU workers where there is no GPU (default 1)")
    provide.add_argument("--name", default=None, help="worker name prefix (default: the provider account)")
    provide.add_argument("--rate", type=float, default=1.0, help="credits per device-second (default 1)")
    provide.add_argument("--allow-installs", action="store_true",
                         help="build a session its own virtual environment, over this host's Python, with the "
                              "packages its cells need that this host lacks (binary wheels from the registry, PIP_INDEX_URL "
                              "if set; off by default)")
    provide.add_argument("--install-max-mb", type=float, default=DEFAULT_MAX_INSTALL_BYTES / 1e6, metavar="MB",
                         help="most megabytes one session's install may download "
                              f"(default {DEFAULT_MAX_INSTALL_BYTES / 1e6:.0f})")
    provide.add_argument("--install-max-seconds", type=float, default=DEFAULT_MAX_INSTALL_SECONDS, metavar="S",
                         help=f"longest one session's install may take (default {DEFAULT_MAX_INSTALL_SECONDS:g})")
    provide.add_argument("--allow-builds", action="store_true",
                         help="with --allow-installs: also build source distributions (this runs their build code "
                              "on this host; off by default: binary wheels only)")
    provide.add_argument("--host", default=None, help="interface the workers listen on (default: the one that "
                                                       "reaches the scheduler)")
    provide.add_argument("--allow-network", action="store_true",
                         help="let cells reach the network (with bubblewrap they have none by default)")
    provide.add_argument("--sandbox-memory", default=None, metavar="SIZE",
                         help="memory a session's sandbox may use (default: the worker's memory limit)")
    provide.add_argument("--sandbox-processes", type=int, default=SandboxSettings.processes, metavar="N",
                         help=f"processes and threads a sandbox may have (default {SandboxSettings.processes})")
    provide.add_argument("--sandbox-file-size", default="4GiB", metavar="SIZE",
                         help="the largest file a cell may write (default 4GiB)")
    provide.add_argument("--sandbox-cpu-seconds", type=int, default=SandboxSettings.cpu_seconds, metavar="S",
                         help=f"CPU seconds a session's sandbox may use in all (default {SandboxSettings.cpu_seconds})")
    provide.add_argument("--sandbox-idle", type=float, default=SandboxSettings.idle_seconds, metavar="SECONDS",
                         help="a session's sandbox with no cell for this long ends (default "
                              f"{SandboxSettings.idle_seconds:.0f})")
    provide.add_argument("--verbose", "-v", action="store_true", default=argparse.SUPPRESS,
                         help="show Dask's log lines (INFO) as well as the status line")
    provide.set_defaults(func=_provide)


def _add_tls_arguments(parser: argparse.ArgumentParser, role: str) -> None:
    parser.add_argument("--tls-ca-file", default=None, metavar="PATH", help="an open network: the operator's CA "
                                                                             "certificate (ca.pem)")
    parser.add_argument("--tls-cert", default=None, metavar="PATH",
                        help=f"an open network: this {role}'s certificate (`gpunet certs issue --role {role}`)")
    parser.add_argument("--tls-key", default=None, metavar="PATH", help="an open network: its key")


def _tls_security(args: Any, role: str) -> Any:
    """The Dask ``Security`` of an open network's party from --tls-* (None without
    them); the certificate must bind ``role``."""
    given = [args.tls_ca_file, args.tls_cert, args.tls_key]
    if not any(given):
        return None
    if not all(given):
        raise OptionError("an open network needs all of --tls-ca-file, --tls-cert and --tls-key "
                          "(from `gpunet certs init` / `gpunet certs issue`)")
    security = certs.security(args.tls_ca_file, args.tls_cert, args.tls_key)
    identity = certs.identity_of_file(args.tls_cert)
    if identity.role != role:
        raise OptionError(f"{args.tls_cert} is a {identity.role}'s certificate; this needs a {role}'s "
                          f"(`gpunet certs issue --role {role} --name ...`)")
    return security


def _up(args: Any) -> int:
    from gpunet.client.local import EmbeddedNetwork

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
            token_file = Path(embedded.credits_service.operator_token_file).with_name("notebook-token")
            write_private(token_file, embedded.client_token.encode())
            print(f"notebook token file: {token_file}", flush=True)
            connect += f" --credits {embedded.credits_url} --token-file {token_file}"
        print(f"connect from a notebook with:  {connect}", flush=True)
        print("Ctrl-C stops the network.", flush=True)
        wait_for_stop()
    finally:
        print("gpunet: stopping ...", file=sys.stderr, flush=True)
        embedded.close()
    print("gpunet: stopped", flush=True)
    return 0


def _scheduler(args: Any) -> int:
    import dask
    from distributed import Scheduler

    from gpunet.client.local import EMBEDDED_DASK_CONFIG

    security = _tls_security(args, certs.SCHEDULER)
    if security is None and not args.private:
        raise OptionError("choose the kind of network: an open one for strangers (--tls-ca-file, --tls-cert, "
                          "--tls-key from `gpunet certs`, and --credits), or --private for a lab where everyone "
                          "is trusted")
    if security is not None and args.private:
        raise OptionError("--private runs plain Dask without certificates; drop it, or drop the --tls-* options")
    preload = _metering_preload(args, open_network=security is not None)
    if security is not None and not preload:
        raise OptionError("an open network runs only tasks that carry a hold: give --credits URL and "
                          "--meter-token-file PATH")
    if security is not None:
        preload.update(security=security, protocol="tls")
    dashboard_host = args.host if security is None else "127.0.0.1"

    async def serve() -> None:
        with dask.config.set(EMBEDDED_DASK_CONFIG):
            async with Scheduler(host=args.host, port=args.port,
                                 dashboard_address=f"{dashboard_host}:{args.dashboard_port}", **preload) as scheduler:
                print(f"network: {'open (mutual TLS)' if security is not None else 'private'}", flush=True)
                if preload:
                    print(f"metering: {args.credits}", flush=True)
                print(f"scheduler: {scheduler.address}", flush=True)
                print(f"providers join with:  {_join_hint(scheduler.address, args, open_network=security is not None)}",
                      flush=True)
                if args.host in ("127.0.0.1", "localhost"):
                    print("listening on 127.0.0.1 only: providers and notebooks on other machines need "
                          "--host 0.0.0.0 (or this machine's address)", flush=True)
                loop = asyncio.get_running_loop()
                stopped = asyncio.Event()
                for signum in (signal.SIGINT, signal.SIGTERM):
                    loop.add_signal_handler(signum, stopped.set)
                await stopped.wait()

    asyncio.run(serve())
    print("gpunet: scheduler stopped", flush=True)
    return 0


def _join_hint(address: str, args: Any, *, open_network: bool) -> str:
    """The whole `gpunet provide` line a provider runs to join this scheduler."""
    if open_network:
        return f"gpunet provide {address} --tls-ca-file CA.pem --tls-cert PROVIDER.pem --tls-key PROVIDER.key"
    if args.credits is None:
        return f"gpunet provide {address}   (this scheduler does not meter: providers are not paid)"
    return f"gpunet provide {address} --credits {args.credits} --token-file PROVIDER_TOKEN_FILE"


def _status(args: Any) -> int:
    from distributed import Client

    try:
        client = Client(args.scheduler, timeout=args.timeout, set_as_default=False)
    except (OSError, TimeoutError) as exc:
        raise GpunetError(f"cannot reach the scheduler at {args.scheduler} within {args.timeout:g} s "
                          f"({type(exc).__name__}); is `gpunet scheduler` running there?") from None
    with client:
        if args.wait_for:
            try:
                client.wait_for_workers(args.wait_for, timeout=args.timeout)
            except TimeoutError:
                raise GpunetError(f"{args.scheduler} has {len(client.scheduler_info()['workers'])} worker(s), "
                                  f"not the {args.wait_for} waited for, after {args.timeout:g} s; are the "
                                  "providers running (gpunet provide)?") from None
        workers = client.scheduler_info(n_workers=-1)["workers"]
        print(f"scheduler {client.scheduler.address}: {len(workers)} worker(s)")
        for address, info in sorted(workers.items()):
            resources = ", ".join(f"{k}={v:g}" for k, v in sorted((info.get("resources") or {}).items()))
            print(f"  {info.get('name', address)}  {address}  {resources}")
    return 0


def _metering_preload(args: Any, open_network: bool) -> dict[str, Any]:
    """The scheduler arguments that load the metering plugin for `gpunet scheduler
    --credits` (none without it), after checking its token with the service: a meter
    account's, which may only pay and release holds; the operator's only on a private
    network (an open one must not hold a token that can mint)."""
    token_file = args.meter_token_file or args.operator_token_file
    prices = []
    for flag, value in (("--default-max-rate", args.default_max_rate), ("--max-rate", args.max_rate)):
        if value is not None:
            prices += [flag, repr(check_max_rate(value, flag))]
    if args.credits is None and token_file is None:
        if prices:
            raise OptionError("--default-max-rate and --max-rate are prices: they need a metered network "
                              "(--credits URL and --meter-token-file PATH)")
        return {}
    if args.meter_token_file and args.operator_token_file:
        raise OptionError("give one of --meter-token-file and --operator-token-file")
    if args.credits is None or token_file is None:
        raise OptionError("metering needs both --credits URL and --meter-token-file PATH (or, on a private network, "
                          "--operator-token-file PATH)")
    token = read_token_file(token_file)
    wait_for_service(args.credits, SERVICE_WAIT_S)  # it may have been started a moment ago
    with CreditClient(args.credits, token) as me:  # a clear error for an unreachable service or a bad token
        account = me.ping()["account"]
        role = me.account(account).get("role")
    if open_network and role != "meter":
        raise OptionError(f"an open network's scheduler reports with a meter account's token, which can only pay "
                          f"and release holds; {token_file} is a {role} account's. Create one (as the operator: "
                          "CreditClient(URL, OPERATOR_TOKEN).create_account('meter', 'meter')) and pass its token "
                          "with --meter-token-file")
    if role not in ("meter", "operator"):
        raise OptionError(f"{token_file} is the token of {role} account {account!r}; metering needs a meter "
                          "account's (or the operator's, on a private network)")
    return {"preload": [SCHEDULER_PRELOAD],
            "preload_argv": [["--credits", args.credits, "--token-file", str(token_file), *prices]]}


def _provide(args: Any) -> int:
    security = _tls_security(args, certs.PROVIDER)
    os.environ[PROVIDER_RATE_ENV] = str(check_max_rate(args.rate, "--rate"))
    _install_policy(args)
    sandbox = _sandbox_settings(args)
    os.environ[SANDBOX_ENV] = sandbox.to_env()  # the worker processes inherit it
    make_non_dumpable()  # a cell of this user cannot read this process's environment or memory
    if security is not None:
        if args.token or args.token_file or os.environ.get("GPUNET_TOKEN"):
            raise OptionError("an open network pays the account the provider certificate names: drop --token-file "
                              "(and GPUNET_TOKEN), which would only travel to the workers for nothing")
        return asyncio.run(_run_provider(args, certs.identity_of_file(args.tls_cert).name, security))
    url = args.credits or os.environ.get("GPUNET_CREDITS")
    token = args.token or (read_token_file(args.token_file) if args.token_file else os.environ.get("GPUNET_TOKEN"))
    if not url or not token:
        raise GpunetError("a provider is paid through the credit service: give --credits URL and --token-file PATH "
                          "(or GPUNET_CREDITS / GPUNET_TOKEN); `gpunet credits account create NAME --role provider` "
                          "writes the token file")
    wait_for_service(url, SERVICE_WAIT_S)
    with CreditClient(url, token) as me:
        # a bad token, one that is not a provider's or an unreachable service stops here, clearly,
        # before any worker starts
        account = me.provider_account("gpunet provide")
    # The worker processes inherit it and register with the scheduler as this provider's.
    os.environ[PROVIDER_TOKEN_ENV] = token
    with CreditClient(url, token, retries=0) as me:
        return asyncio.run(_run_provider(args, account, me=me))


def _install_policy(args: Any) -> None:
    """Tell the worker processes whether and within which caps they install a session's packages."""
    if not args.allow_installs:
        if args.allow_builds:
            raise OptionError("--allow-builds only matters with --allow-installs: add it, or drop --allow-builds")
        os.environ.pop(INSTALLS_ENV, None)
        return
    if not (args.install_max_mb > 0 and args.install_max_seconds > 0):
        raise OptionError(f"--install-max-mb and --install-max-seconds must be above 0, got {args.install_max_mb:g} "
                          f"and {args.install_max_seconds:g}")
    policy = InstallPolicy(int(args.install_max_mb * 1e6), args.install_max_seconds, args.allow_builds)
    os.environ[INSTALLS_ENV] = policy.to_env()
def _sandbox_settings(args: Any) -> SandboxSettings:
    """How this provider's workers confine cells: bubblewrap where it works, with the limits given."""
    for flag, value in (("--sandbox-processes", args.sandbox_processes), ("--sandbox-cpu-seconds", args.sandbox_cpu_seconds),
                        ("--sandbox-idle", args.sandbox_idle)):
        if not value > 0:
            raise OptionError(f"{flag} must be a positive number, got {value}")
    hidden = tuple(os.path.abspath(path) for path in (args.token_file, args.tls_key) if path)
    return SandboxSettings(
        isolation=BUBBLEWRAP if bubblewrap_works() else PROCESS, allow_network=args.allow_network,
        memory_bytes=None if args.sandbox_memory is None else _size(args.sandbox_memory, "--sandbox-memory"),
        cpu_seconds=args.sandbox_cpu_seconds, processes=args.sandbox_processes,
        file_bytes=_size(args.sandbox_file_size, "--sandbox-file-size"), idle_seconds=args.sandbox_idle,
        hidden_paths=hidden)


def _size(text: str, flag: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise OptionError(f"{flag}: {exc}") from None


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


def _quiet_dask(args: Any) -> None:
    """Dask's INFO lines only with --verbose: the status line says what matters."""
    if getattr(args, "verbose", False):
        return
    import dask

    os.environ["DASK_LOGGING__DISTRIBUTED"] = "warning"  # the worker processes
    dask.config.set({"logging.distributed": "warning"})
    logging.getLogger("distributed").setLevel(logging.WARNING)


def _uncompressed_comms() -> None:
    """A provider sends its frames uncompressed (Dask's default, kept whatever the
    provider's own Dask config says): a notebook that does not trust its providers
    refuses compressed payloads, which could expand past its size cap."""
    import dask

    os.environ["DASK_DISTRIBUTED__COMM__COMPRESSION"] = "False"  # the worker processes
    dask.config.set({"distributed.comm.compression": False})


async def _run_provider(args: Any, account: str, security: Any = None, me: CreditClient | None = None) -> int:
    """Run the provider's workers until Ctrl-C (drain, exit 0), the scheduler's end (an
    error), or a quarantine (:data:`EXIT_QUARANTINED`, saying why and how to appeal);
    ``me`` is the provider's credit client (its trust record, the status line)."""
    from distributed import Client, Nanny
    from distributed.utils import get_ip

    _quiet_dask(args)
    _uncompressed_comms()
    print(f"gpunet provide: {SandboxSettings.from_env(os.environ[SANDBOX_ENV]).describe()}", flush=True)

    name = args.name or account
    if security is not None:  # an open network's scheduler takes only names of the certificate's account
        own = f"{account}{WORKER_NAME_SEPARATOR}"
        name = name if name.startswith(own) else f"{own}{args.name or 'device'}"
    host = args.host or get_ip(args.scheduler.split("://")[-1].rsplit(":", 1)[0])
    gpus = local_gpus()
    if args.gpus != "all":
        gpus = gpus[: int(args.gpus)]
    # an open network's parties speak mutual TLS only
    tls = {"security": security, "protocol": "tls" if security is not None else None}
    # The worker processes inherit an ignored SIGTERM (a service manager sends it to the whole
    # group): this process drains them, and a worker's end at its signal would lose its task.
    # Nannies still stop them (over a queue, then SIGKILL), and they end with this process.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    dask_cuda = dask_cuda_or_none()
    if gpus and dask_cuda is not None:
        visible = ",".join(str(g.index) for g in gpus)
        cuda_worker = dask_cuda.CUDAWorker(args.scheduler, host=host, nthreads=1, name=name,
                                           resources=gpu_resources(gpus), preload=[WORKER_PRELOAD],
                                           CUDA_VISIBLE_DEVICES=visible, **tls,
                                           dashboard=security is None)  # an open network's workers serve no HTTP
        nannies = list(cuda_worker.nannies)
        started = f"{len(gpus)} dask-cuda worker(s), one per GPU ({gpus[0].name})"
    else:
        cuda_worker = None
        why = "no NVIDIA GPU found" if not gpus else "dask-cuda is not installed (pip install 'gpunet[cuda]')"
        nannies = [Nanny(args.scheduler, host=host, nthreads=1, name=f"{name}-{index}", resources={DEVICE_RESOURCE: 1},
                         preload=[WORKER_PRELOAD], dashboard=False, **tls) for index in range(args.workers)]
        started = f"{why}: {args.workers} CPU worker(s)"
    for nanny in nannies:  # guarded before they start listening
        _guard_nanny(nanny, security)
    await (cuda_worker if cuda_worker is not None else asyncio.gather(*nannies))
    print(f"gpunet provide: {started}", flush=True)
    addresses = [n.worker_address for n in nannies]
    print(f"provider: {account}; workers: {' '.join(addresses)}", flush=True)
    print("Ctrl-C drains them: running tasks finish, then they leave.", flush=True)
    stopped = asyncio.Event()

    def stop() -> None:
        # A signal sent to the whole process group may have reached the workers too (SIGINT
        # from a terminal's Ctrl-C): a worker that it ends is not started again.
        for nanny in nannies:
            nanny.close_gracefully(reason="gpunet-provide-stopping")
        stopped.set()

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop)
    # On an open network a provider is no Dask client: no status line there.
    client = None if security is not None else await Client(args.scheduler, asynchronous=True, timeout=10)
    try:
        status = (asyncio.ensure_future(_show_status(client, me, account, nannies, stopped))
                  if client is not None and me is not None else None)
        finished = asyncio.ensure_future(asyncio.gather(*(n.finished() for n in nannies)))
        await asyncio.wait([finished, asyncio.ensure_future(stopped.wait())], return_when=asyncio.FIRST_COMPLETED)
        if status is not None:
            status.cancel()
        if not stopped.is_set():
            record = await _record_if_reachable(me, account)
            if record is not None and record.get("quarantined"):
                print(quarantine_notice(record, getattr(args, "credits", None) or os.environ.get("GPUNET_CREDITS")),
                      file=sys.stderr, flush=True)
                return EXIT_QUARANTINED
            raise GpunetError("the workers stopped by themselves (is the scheduler gone?)")
        print("\ngpunet provide: draining ...", flush=True)
        started = time.monotonic()
        live = [n.worker_address for n in nannies if n.worker_address and n.is_alive()]
        if live and security is not None:
            await _drain_open(args.scheduler, security, live)
        elif live:
            try:
                await _drain_private(client, live)
            except (OSError, TimeoutError) as exc:  # the scheduler stopped first: nothing left to drain to
                print(f"gpunet provide: the scheduler at {args.scheduler} cannot be reached ({type(exc).__name__}); "
                      "stopping without draining", flush=True)
    finally:
        if client is not None:
            await client.close()
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


async def _record_if_reachable(me: CreditClient | None, account: str) -> dict[str, Any] | None:
    """The provider's trust record, or None where it cannot be read (no credit service)."""
    if me is None:
        return None
    try:
        return await asyncio.to_thread(me.provider_record, account)
    except Exception as exc:  # noqa: BLE001 - only used to explain why the workers left
        logger.warning("gpunet provide: could not read this provider's trust record: %s", exc)
        return None


def _guard_nanny(nanny: Any, security: Any) -> None:
    """On an open network a provider's nanny answers only the scheduler and the
    gateway (and its own worker asking to close)."""
    own = certs.own_identity(security, "worker")
    if own is not None:
        WorkerDoor(own, nanny=True).install(nanny)


async def _drain_open(scheduler_address: str, security: Any, addresses: list[str]) -> None:
    """:func:`_drain` on an open network, where a provider is no Dask client: it asks
    the scheduler, as the owner of these workers, to take their device slots away,
    and how many tasks they execute."""
    from distributed.core import rpc

    async with rpc(scheduler_address, connection_args=security.get_connection_args("worker")) as scheduler:
        async def close_slots() -> None:
            for address in addresses:
                await scheduler.set_resources(worker=address, resources={DEVICE_RESOURCE: 0})

        await _drain(close_slots, lambda: getattr(scheduler, EXECUTING)(workers=addresses),
                     lambda: scheduler.retire_workers(workers=addresses, close_workers=False))


async def _drain_private(client: Any, addresses: list[str]) -> None:
    """:func:`_drain` as a Dask client of the scheduler: each call is bounded (a worker
    that does not answer is gone)."""
    await _drain(
        lambda: asyncio.wait_for(client.run(_close_device_slots, workers=addresses, on_error="return"), 10),
        lambda: asyncio.wait_for(client.run(_executing, workers=addresses, on_error="return"), 10),
        lambda: asyncio.wait_for(client.retire_workers(workers=addresses, close_workers=False), 30))


async def _drain(close_slots: Callable[[], Awaitable[Any]], executing: Callable[[], Awaitable[dict[str, Any]]],
                 retire: Callable[[], Awaitable[Any]], timeout: float = 600) -> None:
    """Take the workers' device slots away (the scheduler then starts no gpunet task
    there: every one asks for a slot), wait (up to ``timeout``) until they execute no
    task (``executing()``: a count per worker, or a worker's error), then retire them:
    their results move elsewhere, and tasks that were queued there but never started
    go to other workers."""
    await close_slots()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        counts = await executing()
        if not any(count for count in counts.values() if isinstance(count, int)):
            break
        await asyncio.sleep(0.2)
    await retire()


async def _close_device_slots(dask_worker: Any = None) -> None:
    await dask_worker.set_resources(**{DEVICE_RESOURCE: 0})


def _executing(dask_worker: Any = None) -> int:
    return len(dask_worker.state.executing)
