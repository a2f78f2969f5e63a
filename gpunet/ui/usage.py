"""``%gpunet usage`` / ``gpunet.SessionUsage()``: this notebook session's credits, live.

Spent, held and left of the session's budget, a burn-down plot of what is left, and
the tasks and device-seconds by provider and worker; in a notebook it refreshes itself
every few seconds while cells run (:class:`gpunet.ui.look.LivePanel`) until closed.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from gpunet.client.network import current
from gpunet.errors import GpunetError
from gpunet.ui import look
from gpunet.ui.look import LivePanel

if TYPE_CHECKING:  # pragma: no cover
    from gpunet.client.network import Network

HEADER = ("provider", "worker", "device", "tasks", "device-s")


class SessionUsage(LivePanel):
    """This notebook session's credits: spent, held, left, and tasks by provider and worker.

    A live ipywidget in a notebook (``SessionUsage()`` as a cell's last line; ``close()``
    stops it), a table in HTML, plain text elsewhere. ``refresh()`` reads the credit
    service again; ``interval`` is the seconds between refreshes of the live display.
    """

    title = "gpunet session"

    def __init__(self, net: Network | None = None, *, interval: float | None = None) -> None:
        super().__init__(interval=interval)
        self.net = net or current()
        #: the session's meter (through a gateway, what the gateway's meter of it says)
        self.meter = self.net.session_meter
        if self.meter is None:
            raise GpunetError("this connection has no credit service, so its session is not metered "
                              "(connect with --credits URL --token TOKEN, or without an address)")
        self.numbers: dict[str, Any] = {}
        self.owners: dict[str, str] = {}
        #: (seconds since the first reading, credits left) at each reading: the burn-down
        self.burn: list[tuple[float, int]] = []
        self._started = time.time()
        self.taken = 0.0
        #: True when jobs that finished here were not yet settled by the scheduler
        self.settling = False
        self.refresh(raise_errors=True)

    def fetch(self) -> None:
        """Read the session's numbers from the credit service, and whose each worker is."""
        meter = self.meter
        # The figures are exact once the scheduler settled the jobs that finished here (a few
        # seconds at most; past that the headline says "settling").
        self.settling = not meter.wait_settled()
        numbers = meter.usage()
        state = self.net.metering_state() or {}
        self.owners = {address: info["provider"] for address, info in state.get("providers", {}).items()}
        self.default_owner = state.get("default_provider")
        self.numbers = numbers
        self.taken = time.time()
        if not self.burn or self.burn[-1][1] != numbers["left"]:
            self.burn.append((self.taken - self._started, numbers["left"]))

    def rows(self) -> list[tuple[str, str, str, int, str]]:
        """(provider, worker, device, tasks, device-seconds), busiest first."""
        tally = sorted(self.meter.tally.items(), key=lambda item: -item[1].seconds)
        default = getattr(self, "default_owner", None) or "-"
        return [(self.owners.get(worker, default), worker, entry.device, entry.tasks, f"{entry.seconds:.2f}")
                for worker, entry in tally]

    def headline(self) -> str:
        """One line: spent, held and left of the budget."""
        n = self.numbers
        settling = " (settling: finished jobs not yet paid; refresh() reads again)" if self.settling else ""
        preauth = f" ({n['preauthorized']} of them pre-authorized)" if n.get("preauthorized") else ""
        return (f"spent {n['spent']}, held {n['held']}{preauth}, left {n['left']} of {n['budget']} "
                f"credits{settling}")

    def __str__(self) -> str:
        lines = [f"session {self.meter.session}: {self.headline()}"]
        rows = self.rows()
        if rows:
            lines += look.text_table(HEADER, rows)
        return "\n".join(lines)

    __repr__ = __str__

    def body_html(self) -> str:
        n = self.numbers
        return (f'<div>session <code>{look.esc(self.meter.session)}</code></div>'
                + look.figures([("spent", "spent", n["spent"]), ("held", "held", n["held"]),
                                ("preauthorized", "pre-authorized", n.get("preauthorized", 0)),
                                ("left", "left", n["left"]), ("budget", "budget", n["budget"])])
                + look.table(HEADER, self.rows(), empty="no task has run in this session yet"))

    def plot_png(self) -> tuple[Any, bytes | None]:
        if len(self.burn) < 2:
            return None, None
        burn = [*self.burn, (time.time() - self._started, self.burn[-1][1])]
        xs, ys = [t for t, _ in burn], [left for _, left in burn]
        return tuple(self.burn), look.line_plot_png([("credits left", xs, ys, look.COLOURS["accent"])],
                                                    xlabel="seconds")
