"""The embedded network: a scheduler, local workers and a credit service on 127.0.0.1.

:func:`gpunet.connect` with no address (and ``gpunet up`` in the foreground) starts
it: a Dask scheduler in this process and worker processes on 127.0.0.1, one
dask-cuda worker per GPU where dask-cuda and NVIDIA GPUs are present, else two
plain workers that say they are CPU devices, and a credit service (SQLite in
gpunet's data dir) with a funded local notebook account. gpunet's Dask plugins are
loaded by Dask's own preload mechanism, by module name
(``gpunet.extensions.scheduler_plugin``, ``gpunet.extensions.worker_plugin``), as
``gpunet scheduler`` and ``gpunet provide`` load them.

The embedded scheduler runs with ``distributed.scheduler.worker-saturation: inf``:
notebook work is a stream of independent, coarse tasks (cells, map items) that
should start as soon as a device slot is free, not root tasks of a large graph
whose memory queuing protects (measured here: ~3x the task throughput of the
default, see README).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dask
from distributed import LocalCluster

from gpunet.credits import serve_in_background
from gpunet.errors import GpunetError
from gpunet.paths import data_dir
from gpunet.wire import DEVICE_RESOURCE, SCHEDULER_PRELOAD, WORKER_PRELOAD
from gpunet.worker.device import dask_cuda_or_none, gpu_resources, local_gpus

logger = logging.getLogger(__name__)

#: Dask settings of the embedded network (see the module docstring for why).
EMBEDDED_DASK_CONFIG = {
    "distributed.scheduler.worker-saturation": "inf",
    # Cells may start processes of their own (multiprocessing, JAX compilation).
    "distributed.worker.daemon": False,
}


class EmbeddedNetwork:
    """A scheduler and local workers on 127.0.0.1, started by this process."""

    #: Credits minted for the local notebook account of an embedded network.
    LOCAL_CREDITS = 1_000_000
    #: The provider account the embedded network's workers are paid to.
    LOCAL_PROVIDER = "local-provider"

    def __init__(self, n_workers: int | None = None, *, host: str = "127.0.0.1", port: int = 0,
                 dashboard_port: int = 0, credits: bool = True, credits_port: int = 0) -> None:
        gpus = local_gpus()
        self.note: str
        self.credits_service: Any = None
        self.client_token: str | None = None
        self.provider_token: str | None = None
        self.cluster: Any = None
        try:
            scheduler_kwargs = self._start_credits(host, credits_port) if credits else {}
            self._start_cluster(gpus, n_workers, host=host, port=port, dashboard_port=dashboard_port,
                                scheduler_kwargs=scheduler_kwargs)
        except BaseException:
            self.close()
            raise
        logger.info("gpunet: %s", self.note)

    def _start_cluster(self, gpus: list[Any], n_workers: int | None, *, host: str, port: int, dashboard_port: int,
                       scheduler_kwargs: dict[str, Any]) -> None:
        """The scheduler (with gpunet's scheduler plugin where there are credits) and
        the local workers (with gpunet's worker plugin), both loaded by Dask's preload."""
        common = dict(
            host=host,
            scheduler_port=port,
            dashboard_address=f"{host}:{dashboard_port}",
            protocol="tcp://",
            scheduler_kwargs=scheduler_kwargs,
            preload=[WORKER_PRELOAD],
        )
        with dask.config.set(EMBEDDED_DASK_CONFIG), _explained_start_failure(host, port):
            cuda = dask_cuda_or_none() if gpus else None
            if gpus and cuda is not None:
                self.cluster = cuda.LocalCUDACluster(resources=gpu_resources(gpus), **common)
                self.note = f"started {len(gpus)} dask-cuda workers, one per GPU ({gpus[0].name})"
            else:
                if gpus:
                    why = f"found {len(gpus)} NVIDIA GPU(s) but dask-cuda is not installed (pip install 'gpunet[cuda]')"
                else:
                    why = "no NVIDIA GPU found"
                n_workers = n_workers or 2
                self.cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                                            resources={DEVICE_RESOURCE: 1}, **common)
                self.note = f"{why}: started {n_workers} CPU workers"

    def _start_credits(self, host: str, port: int) -> dict[str, Any]:
        """Start the credit service (SQLite in gpunet's data dir), a funded local
        client account and the provider account the local workers are paid to;
        returns the scheduler's arguments that load the metering plugin."""
        prune_embedded_runs(data_dir() / "embedded")
        folder = data_dir() / "embedded" / time.strftime(f"%Y%m%d-%H%M%S-{os.getpid()}")
        for attempt in range(100):
            place = folder.with_name(f"{folder.name}-{attempt}")
            try:
                place.mkdir(parents=True)
                break
            except FileExistsError:
                continue
        self.credits_dir = place
        self.credits_service = serve_in_background(place / "credits.sqlite3", host, port,
                                                   operator_token_file=place / "operator-token",
                                                   log_path=place / "credits.log")
        operator = self.credits_service.client()
        #: the token of the account the local workers are paid to (for gpunet.ProviderDashboard)
        self.provider_token = operator.create_account(self.LOCAL_PROVIDER, "provider")["token"]
        self.client_token = operator.create_account("local-notebook", "client")["token"]
        operator.mint("local-notebook", self.LOCAL_CREDITS, key="mint-local-notebook")
        operator.close()
        return {"preload": [SCHEDULER_PRELOAD],
                "preload_argv": [["--credits", self.credits_service.url,
                                  "--operator-token-file", str(place / "operator-token"),
                                  "--default-provider", self.LOCAL_PROVIDER]]}

    @property
    def credits_url(self) -> str | None:
        """The credit service's URL (None when started without credits)."""
        return self.credits_service.url if self.credits_service is not None else None

    @property
    def scheduler_address(self) -> str:
        return self.cluster.scheduler_address

    @property
    def dashboard_link(self) -> str | None:
        try:
            return self.cluster.dashboard_link
        except Exception:  # noqa: BLE001 - no bokeh, no dashboard
            return None

    #: How long stopping the workers and the scheduler may take: on a loaded machine a
    #: worker restarting after its process died can take longer than Dask's 10 s.
    CLOSE_TIMEOUT_S = 60

    def close(self) -> None:
        """Stop the workers and the scheduler (which reports what it still has to the
        credit service), then the credit service."""
        try:
            if self.cluster is not None:
                self.cluster.close(timeout=self.CLOSE_TIMEOUT_S)
        finally:
            if self.credits_service is not None:
                self.credits_service.stop()


#: How many finished embedded networks' folders (their ledgers and logs) are kept.
KEEP_EMBEDDED_RUNS = 5


def prune_embedded_runs(folder: Path, keep: int = KEEP_EMBEDDED_RUNS) -> list[Path]:
    """Remove the folders of embedded networks that have ended (``<time>-<pid>-<n>``,
    whose process is gone), all but the ``keep`` newest; returns what was removed."""
    try:
        runs = sorted((run for run in folder.iterdir() if run.is_dir()), key=lambda run: run.name)
    except OSError:
        return []
    ended = [run for run in runs if not _process_alive(_run_pid(run.name))]
    removed = ended[:max(len(ended) - keep, 0)]
    for run in removed:
        shutil.rmtree(run, ignore_errors=True)
    return removed


def _run_pid(name: str) -> int | None:
    """The pid in an embedded run folder's name, ``20261130-214500-4242-0``."""
    parts = name.split("-")
    return int(parts[2]) if len(parts) >= 3 and parts[2].isdigit() else None


def _process_alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _explained_start_failure(host: str, port: int) -> Iterator[None]:
    """Turn Dask's "Cluster failed to start" into a message that names the address."""
    try:
        yield
    except (RuntimeError, OSError) as exc:
        cause = exc.__cause__ or exc.__context__ or exc
        raise GpunetError(
            f"the network could not start on {host}:{port} ({type(cause).__name__}: {cause}). "
            "Is the port in use? Choose another with --port, or --port 0 for a free one."
        ) from exc

