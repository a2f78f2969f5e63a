"""``%gpunet usage`` / ``gpunet.SessionUsage()``: this notebook session's credits."""

from __future__ import annotations

import html
import time
from typing import TYPE_CHECKING, Any

from gpunet.client.network import current
from gpunet.errors import GpunetError
from gpunet.ui.progress import widgets_can_render

if TYPE_CHECKING:  # pragma: no cover
    from gpunet.client.network import Network


class SessionUsage:
    """This notebook session's credits: spent, held, left, and tasks by worker.

    An ipywidget in a notebook (``SessionUsage()`` as a cell's last line), a table
    in HTML, plain text elsewhere. ``refresh()`` reads the credit service again.
    """

    def __init__(self, net: Network | None = None) -> None:
        self.net = net or current()
        if self.net.meter is None:
            raise GpunetError("this connection has no credit service, so its session is not metered "
                              "(connect with --credits URL --token TOKEN, or without an address)")
        self.numbers: dict[str, Any] = {}
        self.taken = 0.0
        #: True when jobs that finished here were not yet settled by the scheduler
        self.settling = False
        self.refresh()

    def refresh(self) -> SessionUsage:
        """Read the session's numbers from the credit service, once the scheduler has
        settled the jobs that finished here (waiting a few seconds at most; past that
        the figures say "settling")."""
        meter = self.net.meter
        self.settling = not meter.wait_settled()
        self.numbers = meter.credits.usage(meter.session)
        self.taken = time.time()
        return self

    def rows(self) -> list[tuple[str, str, int, float]]:
        """(worker, device, tasks, device-seconds), busiest first."""
        tally = sorted(self.net.meter.tally.items(), key=lambda item: -item[1].seconds)
        return [(worker, entry.device, entry.tasks, entry.seconds) for worker, entry in tally]

    def __str__(self) -> str:
        n = self.numbers
        lines = [f"session {self.net.meter.session}: spent {n['spent']}, held {n['held']}, "
                 f"left {n['left']} of {n['budget']} credits{self._settling_note()}"]
        for worker, device, tasks, seconds in self.rows():
            lines.append(f"  {worker}  {device}  {tasks} task(s)  {seconds:.2f} device-s")
        return "\n".join(lines)

    __repr__ = __str__

    def _settling_note(self) -> str:
        return " (settling: finished jobs not yet paid; refresh() reads again)" if self.settling else ""

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(str(self))

    def _repr_html_(self) -> str:
        n = self.numbers
        body = "".join(
            f"<tr><td><code>{html.escape(w)}</code></td><td>{html.escape(d)}</td><td>{t}</td><td>{s:.2f}</td></tr>"
            for w, d, t, s in self.rows()
        )
        return (f"<div><b>gpunet session</b> <code>{html.escape(self.net.meter.session)}</code>: "
                f"spent <b>{n['spent']}</b>, held <b>{n['held']}</b>, left <b>{n['left']}</b> "
                f"of {n['budget']} credits{html.escape(self._settling_note())}"
                f"<table><thead><tr><th>worker</th><th>device</th><th>tasks</th><th>device-s</th></tr></thead>"
                f"<tbody>{body}</tbody></table></div>")

    def _ipython_display_(self) -> None:
        from IPython.display import display

        if widgets_can_render():
            import ipywidgets

            display(ipywidgets.HTML(self._repr_html_()))
        else:
            display({"text/plain": str(self), "text/html": self._repr_html_()}, raw=True)
