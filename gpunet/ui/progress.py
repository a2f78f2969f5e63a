"""Progress of a remote job, as an ipywidget in a notebook or plain text elsewhere.

The display moves queued -> running on WORKER (device) -> done, with the elapsed
time; a map shows a bar of items done. It is only ever updated from the thread
that waits for the job (the notebook's), never from Dask's event loop. Once the job
ends, the widget is replaced by its final line as static HTML (:mod:`gpunet.ui.look`),
which is what a saved notebook keeps.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from gpunet.ui import look
from gpunet.ui.look import widgets_can_render


class JobProgress:
    """Shows one job's state; ``widget=None`` picks a widget where one can render."""

    #: In text mode, say "running on ..." only for jobs that take longer than this.
    TEXT_RUNNING_AFTER_S = 1.0
    #: A job still queued after this long says why it waits (then every few seconds).
    REASON_AFTER_S = 1.0
    REASON_EVERY_S = 3.0

    def __init__(self, label: str, *, total: int = 1, widget: bool | None = None) -> None:
        self.label = label
        self.total = total
        self.started = time.monotonic()
        self.state = "queued"
        self.where = ""
        self.done_count = 0
        self.reason = ""
        self._reason_at = 0.0
        self._said_running = False
        self.use_widget = widgets_can_render() if widget is None else widget
        self._box: Any = None
        self._display_id = ""
        if self.use_widget:
            import ipywidgets

            self._html = ipywidgets.HTML()
            children = [self._html]
            if total > 1:
                self._bar = ipywidgets.IntProgress(min=0, max=total, value=0, layout={"width": "240px"})
                children.insert(0, self._bar)
            self._box = ipywidgets.HBox(children)
            self._render()
            self._display_id = look.show(self.summary(), self._line_html(), self._box)

    # -- state changes ---------------------------------------------------------------
    def running(self, worker: str, device: str, *, rerun_after: str | None = None) -> None:
        """The job started on ``worker``; ``rerun_after`` names a worker it was lost on."""
        self.state = "running"
        self.where = f"{worker} ({device})"
        if rerun_after is not None:
            self.where += f", re-run after {rerun_after} was lost"
            self._text(f"{self.label}: {rerun_after} was lost; re-running on {self.where}")
        self._render()

    def installing(self, text: str) -> None:
        """The worker installs the job's packages first ("installing 3 packages (12 MB) on P")."""
        self.state = "installing"
        self.reason = text
        self._text(f"{self.label}: {text}")
        self._render()

    def wants_reason(self) -> bool:
        """True when the job has waited long enough in the queue to say why (again)."""
        return (self.state == "queued" and self.elapsed > self.REASON_AFTER_S
                and time.monotonic() - self._reason_at > self.REASON_EVERY_S)

    def waiting(self, reason: str) -> None:
        """Show why the job still waits ("waiting for a worker with ... (2 such workers, both busy)")."""
        self._reason_at = time.monotonic()
        if reason != self.reason:
            self.reason = reason
            self._text(f"{self.label}: {reason}")
        self._render()

    def paused(self, reason: str) -> None:
        """The job sends no more of its items (its budget cannot cover them): say why."""
        self.state = "paused"
        self.reason = reason
        self._text(f"{self.label}: paused: {reason}")
        self._render()

    def ran_on(self, worker: str, device: str) -> None:
        """Record where a job ran (quick jobs never announce it while running)."""
        if not self.where:
            self.where = f"{worker} ({device})"

    def tick(self, done: int | None = None) -> None:
        """Refresh the elapsed time (and the count of finished map items)."""
        if done is not None:
            self.done_count = done
            if self.total > 1 and self.state == "queued" and done:
                self.state = "running"
        if (not self.use_widget and not self._said_running and self.state == "running"
                and self.elapsed > self.TEXT_RUNNING_AFTER_S):
            self._said_running = True
            self._text(f"{self.label}: running on {self.where or 'the network'} ...")
        self._render()

    def cancelled(self, line: str) -> None:
        """The job was stopped by Ctrl-C; ``line`` says after how long and what it cost."""
        self.state = "cancelled"
        self._render()
        if not self.use_widget:
            self._text(line)

    def finish(self, *, ok: bool, note: str = "") -> None:
        """The job ended; ``note`` adds e.g. the error's name."""
        self.state = "done" if ok else "failed"
        self.done_count = self.total if ok else self.done_count
        self._render()
        if self.use_widget:
            # the final line, static: what stays in the notebook once the widget is gone
            look.replace(self._display_id, self.summary(), self._line_html())
            self._box.close()
        else:
            where = f" on {self.where}" if self.where else ""
            items = f" {self.total} items" if self.total > 1 else ""
            self._text(f"{self.label}: {self.state}{items}{where} in {self.elapsed:.2f} s{note}")

    # -- drawing ----------------------------------------------------------------------
    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def summary(self) -> str:
        """One line: state, where, elapsed."""
        state = self.state
        if state in ("running", "done") and self.where:
            state = f"{state} on {self.where}"
        elif state in ("queued", "installing") and self.reason:
            state = self.reason
        elif state == "paused":
            state = f"paused: {self.reason}"
        items = f" {self.done_count}/{self.total}" if self.total > 1 else ""
        return f"{self.label}: {state}{items} · {self.elapsed:.1f} s"

    def _line_html(self) -> str:
        return look.status_line(self.summary(), self.state)

    def _render(self) -> None:
        if not self.use_widget:
            return
        self._html.value = self._line_html()
        if self.total > 1:
            self._bar.value = self.done_count
            self._bar.bar_style = {"done": "success", "failed": "danger"}.get(self.state, "")

    def _text(self, line: str) -> None:
        if not self.use_widget:
            print(line, file=sys.stderr, flush=True)
