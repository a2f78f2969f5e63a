"""``gpunet.ProviderDashboard``: what a provider earns, live, in a notebook or a page of its own.

Her figures come from the credit service, read with her own token (it answers a
provider about herself only): balance, credits, tasks and device-seconds earned in total
and today, her verification record and reputation against the quarantine threshold.
Given the scheduler's address, it also shows her workers online (device, memory,
measured TFLOP/s, rate) and what each runs now: the kind of job and the credits held
on it, never the client's data. In a notebook it refreshes itself (see
:class:`gpunet.ui.look.LivePanel`); ``open_beside()`` puts it in JupyterLab's side
panel, and ``gpunet dashboard --token-file F`` serves it as a page of its own.
"""

from __future__ import annotations

import os
import time
from typing import Any

from gpunet import wire
from gpunet.clitools import read_token_file
from gpunet.codec import clean_text
from gpunet.credits import CreditClient
from gpunet.credits._db import parse_time
from gpunet.errors import GpunetError
from gpunet.ui import look
from gpunet.ui.look import LivePanel
from gpunet.ui.status import device_columns, provider_device

WORKER_HEADER = ("worker", "device", "memory", "TFLOP/s f32", "rate", "running now")
#: The environment variables the dashboard reads where no argument is given.
TOKEN_ENV, TOKEN_FILE_ENV, CREDITS_ENV, SCHEDULER_ENV = (
    "GPUNET_TOKEN", "GPUNET_TOKEN_FILE", "GPUNET_CREDITS", "GPUNET_SCHEDULER")


def provider_token(token: str | None = None, token_file: str | os.PathLike[str] | None = None) -> str:
    """The provider's token: ``token``, else the content of ``token_file``, else
    ``GPUNET_TOKEN``, else the file named by ``GPUNET_TOKEN_FILE``."""
    if token:
        return token.strip()
    path = token_file or os.environ.get(TOKEN_FILE_ENV)
    if token_file is None and os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV].strip()
    if path:
        return read_token_file(path)
    raise GpunetError("the dashboard needs your provider token: give token=... or token_file=... "
                      f"(or set {TOKEN_ENV} or {TOKEN_FILE_ENV})")


class ProviderDashboard(LivePanel):
    """A provider's earnings, workers and reputation, refreshed live (see the module docstring).

    ``token`` / ``token_file`` (or ``GPUNET_TOKEN`` / ``GPUNET_TOKEN_FILE``) is her provider
    token, ``credits`` (or ``GPUNET_CREDITS``) the credit service, ``scheduler`` (or
    ``GPUNET_SCHEDULER``, optional) the network whose workers to show; ``interval`` the
    seconds between refreshes. A token that is not a provider's is refused here.
    """

    title = "gpunet provider"

    def __init__(self, token: str | None = None, *, credits: str | None = None, scheduler: str | None = None,
                 token_file: str | os.PathLike[str] | None = None, interval: float | None = None) -> None:
        super().__init__(interval=interval)
        url = credits or os.environ.get(CREDITS_ENV)
        if not url:
            raise GpunetError(f"the dashboard reads your figures from the credit service: give credits=URL "
                              f"(or set {CREDITS_ENV})")
        self.credits = CreditClient(url, provider_token(token, token_file), retries=1)
        try:
            self.account = self.credits.provider_account("the provider dashboard")
        except Exception:
            self.credits.close()
            raise
        self.scheduler = scheduler or os.environ.get(SCHEDULER_ENV) or None
        self._dask: Any = None
        self.earned: dict[str, Any] = {}
        #: every settlement to her seen so far: [index, time, credits, tasks, seconds]
        self.series: list[list[Any]] = []
        self.workers: list[tuple[str, ...]] = []
        self.held = 0
        self.running = 0
        #: (unix time, share of her workers busy) at each reading
        self.utilisation: list[tuple[float, float]] = []
        self.workers_error: str | None = None
        try:
            self.refresh(raise_errors=True)
        except Exception:
            self.closed()
            raise

    # -- reading ----------------------------------------------------------------------------
    def fetch(self) -> None:
        """Read her figures from the credit service and, given a scheduler, her workers."""
        after = self.series[-1][0] if self.series else -1
        earned = self.credits.earnings(self.account, after=after)
        self.series = (self.series + earned["series"])[-5000:]
        self.earned = earned
        if self.scheduler:
            try:
                self._read_workers()
                self.workers_error = None
            except Exception as exc:  # noqa: BLE001 - the credits still show
                self.workers_error = clean_text(f"{type(exc).__name__}: {exc}")

    def _read_workers(self) -> None:
        from distributed import Client

        from gpunet.client import data_comm
        from gpunet.worker.device import device_info

        if self._dask is None:  # data only: what workers send back is never unpickled here
            self._dask = Client(data_comm.data_only_address(self.scheduler), timeout=10, set_as_default=False,
                                deserializers=list(data_comm.DATA_SERIALIZERS))
        client = self._dask
        state = client.sync(getattr(client.scheduler, wire.METERING_STATE)) or {}
        registered = state.get("providers", {})
        mine = {address: info for address, info in registered.items() if info.get("provider") == self.account}
        if state.get("default_provider") == self.account:  # she is paid for the workers that name no one
            default = {"provider": self.account, "rate": state.get("default_rate", 1.0)}
            mine.update({address: default for address in client.scheduler_info(n_workers=-1)["workers"]
                         if address not in registered})
        devices = client.run(device_info, workers=list(mine), on_error="return") if mine else {}
        running = state.get("running", {})
        rows, held, busy = [], 0, 0
        for address in sorted(mine):
            kind_name, memory, measured = device_columns(provider_device(devices.get(address)))
            tasks = running.get(address, [])
            held += sum(task["held"] for task in tasks)
            busy += bool(tasks)
            now = "; ".join(f"{task['kind']} for {task['for_s']:.0f} s, {task['held']} credits held"
                            for task in tasks) or "idle"
            rows.append((address, kind_name, memory, measured, f"{mine[address]['rate']:g}/s", now))
        self.workers, self.held, self.running = rows, held, busy
        self.utilisation.append((time.time(), busy / len(mine) if mine else 0.0))
        del self.utilisation[:-2000]

    def closed(self) -> None:
        if self._dask is not None:
            self._dask.close(timeout=5)
            self._dask = None
        self.credits.close()

    # -- figures ----------------------------------------------------------------------------
    def figures(self) -> list[tuple[str, str, Any]]:
        """The headline figures: ``(name, label, value)``."""
        e = self.earned
        record = e.get("record", {})
        return [
            ("earned", "credits earned (settled)", e["total"]["credits"]),
            ("earned_today", "earned today (UTC)", e["today"]["credits"]),
            ("held", "held on work in progress", self.held if self.scheduler else "-"),
            ("balance", "balance", e["balance"]),
            ("tasks", "tasks served", e["total"]["tasks"]),
            ("tasks_today", "tasks today", e["today"]["tasks"]),
            ("device_seconds", "device-seconds", f"{e['total']['seconds']:.1f}"),
            ("reputation", f"reputation (quarantine below {e.get('quarantine_below', 0):g})",
             "QUARANTINED" if record.get("quarantined") else f"{record.get('reputation', 1.0):.2f}"),
        ]

    def verification(self) -> str:
        """Her verification record in one line."""
        record = self.earned.get("record", {})
        line = (f"{record.get('valid', 0)} verified result(s) agreed, {record.get('mismatches', 0)} mismatch(es), "
                f"{record.get('consecutive_valid', 0)} agreed in a row")
        if record.get("quarantined"):
            line += f"; quarantined: {record.get('quarantine_reason') or 'by the operator'}"
        return line

    def _workers_note(self) -> str:
        if not self.scheduler:
            return f"workers: give scheduler=ADDRESS (or set {SCHEDULER_ENV}) to see them"
        if self.workers_error:
            return f"workers: cannot reach the scheduler {self.scheduler}: {self.workers_error}"
        return f"{len(self.workers)} worker(s) online at {self.scheduler}, {self.running} running"

    def __str__(self) -> str:
        lines = [f"provider {self.account}"]
        lines += [f"  {label}: {value}" for _, label, value in self.figures()]
        lines.append(f"  verification: {self.verification()}")
        lines.append(f"  {self._workers_note()}")
        if self.workers:
            lines += look.text_table(WORKER_HEADER, self.workers, indent="    ")
        return "\n".join(lines)

    __repr__ = __str__

    def body_html(self) -> str:
        return (f"<div>provider <b>{look.esc(self.account)}</b> at <code>{look.esc(self.credits.url)}</code></div>"
                + look.figures(self.figures())
                + f"<div>verification: {look.esc(self.verification())}</div>"
                + f"<div>{look.esc(self._workers_note())}</div>"
                + (look.table(WORKER_HEADER, self.workers, empty="no worker of yours is online")
                   if self.scheduler and not self.workers_error else ""))

    def plot_png(self) -> tuple[Any, bytes | None]:
        key = (self.series[-1][0] if self.series else None, len(self.utilisation) // 5)
        if not self.series and len(self.utilisation) < 2:
            return None, None
        now = time.time()
        earned_before = self.earned["total"]["credits"] - sum(row[2] for row in self.series)
        xs, ys, total = [], [], earned_before
        for _, when, credits, _, _ in self.series:
            total += credits
            xs.append((parse_time(when).timestamp() - now) / 60)
            ys.append(total)
        if xs:
            xs.append(0.0)
            ys.append(total)
        plots = [("credits earned", xs, ys, look.COLOURS["done"])]
        if len(self.utilisation) >= 2:
            plots.append(("share of workers busy", [(t - now) / 60 for t, _ in self.utilisation],
                          [share for _, share in self.utilisation], look.COLOURS["running"]))
        return key, look.line_plot_png(plots, xlabel="minutes from now")

    # -- placing it ---------------------------------------------------------------------------
    def open_beside(self, title: str | None = None) -> Any:
        """Show the dashboard in JupyterLab's side panel (the ``sidecar`` package), beside
        the notebook; returns the side panel (closing the dashboard closes it)."""
        try:
            from sidecar import Sidecar
        except ImportError:
            raise GpunetError("opening the dashboard beside the notebook needs the sidecar package: "
                              "pip install 'gpunet[dashboard]' (or pip install sidecar)") from None
        side = Sidecar(title=title or f"gpunet: {self.account}")
        with side:
            from IPython.display import display

            display(self.widget())
        self._side = side
        return side

    def close(self) -> None:
        """Stop refreshing (the display keeps its last state, static) and close the side panel."""
        super().close()
        side = getattr(self, "_side", None)
        if side is not None:
            side.close()
            self._side = None
