"""A job sent to the network: what every job handle shares.

A handle follows one job (a cell, a function call, or every item of a map) from
the moment it is sent until its results are back: it waits, keeps the deadline,
shows the job's live output and progress, and stops the job on its workers for
real on Ctrl-C or a timeout (:func:`gpunet.worker.runner.stop_job`), restarting a
worker whose thread is stuck in C code so that the device is free again.
Plain and metered jobs (:class:`gpunet.client.submit.RemoteJob`) and verified
ones (:class:`gpunet.client.verified.VerifiedJob`) supply only what differs.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import uuid
from typing import TYPE_CHECKING, Any, Protocol

import cloudpickle

from gpunet.errors import UnpicklableInputError
from gpunet.worker.runner import stop_job

if TYPE_CHECKING:  # pragma: no cover
    from distributed import Client, Future

    from gpunet.metering.meter import Meter

logger = logging.getLogger(__name__)


class Connection(Protocol):
    """What sending and following a job needs of its network (the arrows point one
    way: :class:`gpunet.client.network.Network` is one, and no job module imports it)."""

    client: Client
    meter: Meter | None
    topic: str

    def register_job(self, handle: Any) -> None:
        """Hand ``handle`` its job's topic events from now on."""

    def forget_job(self, job_id: str) -> None:
        """Stop handing a job its events."""

    def call_scheduler(self, handler: str, **kwargs: Any) -> Any:
        """Call a named handler of the scheduler plugin."""

    def metering_state(self) -> dict[str, Any] | None:
        """The scheduler plugin's state (None where it does not meter)."""

    def scheduler_workers(self, *, fresh: bool = False) -> dict[str, dict[str, Any]]:
        """The workers as the scheduler reports them."""

    def check_placement(self, resources: dict[str, float]) -> None:
        """Refuse a job that no connected worker can ever run."""

    def waiting_reason(self, resources: dict[str, float], workers: list[str] | None = None) -> str:
        """Why a job has not started yet."""

    def workers_with(self, *, min_tflops: float) -> list[str]:
        """Workers measured at least this fast."""

    def max_rate(self) -> float:
        """The highest rate a provider asks."""

    def release_unsent(self, holds: list[str]) -> None:
        """Give back the holds of a job that was never sent."""

    def submit(self, job: Any, **options: Any) -> Any:
        """Send a job and return its handle."""

#: Inputs bigger than this travel scattered to the workers, not inside the task.
SCATTER_THRESHOLD_BYTES = 256 * 1024

#: How long a stopped job's thread may take to leave before its worker is restarted.
STOP_GRACE_S = 1.0


def new_job_id() -> str:
    """A fresh job id (also the prefix of its Dask keys)."""
    return uuid.uuid4().hex[:16]


def pickled(value: Any, what: str, *, name: str | None = None) -> bytes:
    """cloudpickle ``value``, or raise :class:`UnpicklableInputError` naming ``what``
    (an input's name, "map item 3") and its type."""
    try:
        return cloudpickle.dumps(value)
    except Exception as exc:  # noqa: BLE001 - pickling fails in many ways
        type_name = f"{type(value).__module__}.{type(value).__qualname__}".removeprefix("builtins.")
        raise UnpicklableInputError(
            f"{what} ({type_name}) cannot be pickled, so it cannot travel to a worker "
            f"({type(exc).__name__}: {exc}). Create it on the worker instead (inside the cell or function), "
            "or choose the inputs with --in.",
            name=name or what,
            type_name=type_name,
        ) from None


def pickle_inputs(values: dict[str, Any]) -> dict[str, bytes]:
    """Pickle each input on its own, naming the one that cannot travel."""
    return {name: pickled(value, f"input {name!r}", name=name) for name, value in values.items()}


def stop_job_everywhere(network: Connection, job_id: str, futures: list[Future], reason: str) -> None:
    """Cancel ``futures`` and stop job ``job_id``'s threads on every worker; a worker
    whose thread does not leave within :data:`STOP_GRACE_S` restarts (under a Nanny)."""
    client = network.client
    try:
        client.cancel(futures, force=True)
        # Bounded, so that one unresponsive worker cannot make Ctrl-C hang.
        statuses = client.sync(asyncio.wait_for, client._run(stop_job, job_id, reason, STOP_GRACE_S),
                               STOP_GRACE_S + 5)
    except Exception as exc:  # noqa: BLE001 - the network may be gone too
        logger.warning("gpunet: could not stop job %s cleanly: %s", job_id, exc)
        return
    for address, status in statuses.items():
        if status == "restarting":
            logger.warning("gpunet: job %s did not stop within %s s on %s; that worker restarts to free its device",
                           job_id, STOP_GRACE_S, address)
        elif status == "stuck":
            logger.warning("gpunet: job %s is stuck on %s, which has no Nanny to restart it; "
                           "its device stays busy until the job ends", job_id, address)


def write(name: str, text: str) -> None:
    """Show a job's output text on this process's stdout or stderr, as it came."""
    stream = sys.stderr if name == "stderr" else sys.stdout
    stream.write(text)
    stream.flush()
