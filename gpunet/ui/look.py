"""One look for every gpunet display, and what makes a display live and last.

Every gpunet display is shown as one MIME bundle: the widget's view where a front
end draws ipywidgets, and beside it a static ``text/html`` and ``text/plain`` of its
current state. A saved notebook opened without the kernel's widgets (nbconvert, a
notebook viewer) shows that static state; a display that is finished (a job done, a
dashboard closed) replaces its whole output, through its ``display_id``, by the static
state alone, so that a reopened notebook shows its last state, never "model not found"
nor a widget's repr.

:class:`LivePanel` is the base of the live displays (:class:`~gpunet.ui.usage.SessionUsage`,
:class:`~gpunet.ui.dashboard.ProviderDashboard`): a daemon thread reads their figures
every few seconds and updates the widgets (the kernel stays free to run cells), until
the panel is closed, by :meth:`LivePanel.close`, its stop button, or the kernel's exit.
"""

from __future__ import annotations

import atexit
import html
import threading
import time
import uuid
import weakref
from abc import ABC, abstractmethod
from typing import Any, Container, Iterable, Sequence

#: The colours of states, shared by every display.
COLOURS = {"queued": "#6e7781", "running": "#0969da", "done": "#1a7f37", "failed": "#cf222e",
           "muted": "#6e7781", "accent": "#8250df", "warning": "#bf8700", "cancelled": "#9a6700",
           "installing": "#8250df", "paused": "#bf8700"}
FONT = "font-family:var(--jp-ui-font-family,system-ui,sans-serif);font-size:13px;line-height:1.4"
MONO = "font-family:var(--jp-code-font-family,monospace)"

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def widgets_can_render() -> bool:
    """True inside a Jupyter kernel (where a front end can draw ipywidgets)."""
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover
        return False
    shell = get_ipython()
    if shell is None or getattr(shell, "kernel", None) is None:
        return False
    try:
        import ipywidgets  # noqa: F401
    except ImportError:  # pragma: no cover - a dependency
        return False
    return True


def esc(value: Any) -> str:
    """``value`` as text safe inside HTML."""
    return html.escape(str(value))


def status_line(text: str, state: str) -> str:
    """One line of a job's state, coloured by ``state`` (queued, running, done, failed, cancelled)."""
    return f'<span class="gpunet-status" style="{MONO};color:{COLOURS[state]}">{esc(text)}</span>'


def figures(items: Iterable[tuple[str, str, Any]]) -> str:
    """A row of headline figures: ``(name, label, value)`` each; ``data-gpunet=name`` lets a
    reader (or a browser test) find a figure without parsing the layout."""
    cells = "".join(
        f'<div style="padding:4px 14px 4px 0"><div style="color:{COLOURS["muted"]};font-size:11px">{esc(label)}</div>'
        f'<div data-gpunet="{esc(name)}" style="font-size:18px;font-weight:600">{esc(value)}</div></div>'
        for name, label, value in items)
    return f'<div style="display:flex;flex-wrap:wrap">{cells}</div>'


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], *, empty: str = "none") -> str:
    """An HTML table in the gpunet look (``empty`` where there are no rows)."""
    rows = list(rows)
    if not rows:
        return f'<div style="color:{COLOURS["muted"]}">{esc(empty)}</div>'
    cell = "padding:2px 10px 2px 0;text-align:left;border-bottom:1px solid #d0d7de"
    head = "".join(f'<th style="{cell}">{esc(h)}</th>' for h in header)
    body = "".join("<tr>" + "".join(f'<td style="{cell}">{esc(c)}</td>' for c in row) + "</tr>" for row in rows)
    return f'<table style="border-collapse:collapse"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def text_table(header: Sequence[str], rows: Iterable[Sequence[Any]], *, indent: str = "  ",
               right: Container[int] = ()) -> list[str]:
    """The plain-text lines of a table, columns padded (those numbered in ``right`` flush right)."""
    table_rows = [tuple(map(str, header)), *(tuple(map(str, row)) for row in rows)]
    widths = [max(len(row[i]) for row in table_rows) for i in range(len(header))]
    return [indent + "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
            .rstrip() for row in table_rows]


def panel(title: str, body: str, *, note: str = "") -> str:
    """A gpunet panel: a title line and its body (inline styles only: they survive the
    sanitizers of notebook viewers)."""
    note_html = f' <span style="color:{COLOURS["muted"]}">{esc(note)}</span>' if note else ""
    return (f'<div class="gpunet-panel" style="{FONT};border-left:3px solid {COLOURS["accent"]};padding:4px 10px">'
            f'<div style="font-weight:600;color:{COLOURS["accent"]}">{esc(title)}{note_html}</div>{body}</div>')


def bundle(text: str, html_text: str, widget: Any = None) -> dict[str, Any]:
    """The MIME bundle of a display: the widget's view (if any) beside its static state."""
    data: dict[str, Any] = {"text/plain": text, "text/html": html_text}
    if widget is not None:
        data[WIDGET_VIEW] = {"model_id": widget.model_id, "version_major": 2, "version_minor": 0}
    return data


def show(text: str, html_text: str, widget: Any = None) -> str:
    """Display a bundle (see :func:`bundle`); returns its display id, for :func:`replace`."""
    from IPython.display import display

    display_id = uuid.uuid4().hex
    display(bundle(text, html_text, widget), raw=True, display_id=display_id)
    return display_id


def replace(display_id: str, text: str, html_text: str, widget: Any = None) -> None:
    """Replace a display by a new bundle: the static state alone once it is final."""
    from IPython.display import update_display

    update_display(bundle(text, html_text, widget), raw=True, display_id=display_id)


def line_plot_png(series: Sequence[tuple[str, Sequence[float], Sequence[float], str]], *, xlabel: str,
                  width: float = 6.4, height: float = 2.2) -> bytes:
    """A PNG of line plots ``(label, xs, ys, colour)``, drawn with matplotlib's object API
    (no pyplot, so it is safe from the refreshing thread); each series gets its own axis."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=90)
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(series), squeeze=False)[0]
    for ax, (label, xs, ys, colour) in zip(axes, series):
        ax.plot(list(xs), list(ys), color=colour, drawstyle="steps-post", linewidth=1.6)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    figure.tight_layout()
    out = io.BytesIO()
    figure.savefig(out, format="png")
    return out.getvalue()


_live: weakref.WeakSet[LivePanel] = weakref.WeakSet()


@atexit.register
def _close_live_panels() -> None:
    """The kernel exits: stop every refreshing thread (and leave the last static state)."""
    for live in list(_live):
        live.close()


class LivePanel(ABC):
    """A display that refreshes itself (see the module docstring).

    A subclass reads its figures in :meth:`fetch` (called from the refreshing thread),
    and renders them as :meth:`body_html` and ``__str__``, and optionally a plot
    (:meth:`plot_png`). Outside a kernel that draws widgets it is a static snapshot.
    """

    #: seconds between refreshes
    interval = 2.0
    title = "gpunet"

    def __init__(self, *, interval: float | None = None) -> None:
        if interval is not None:
            if not interval > 0:
                from gpunet.errors import GpunetError

                raise GpunetError(f"interval must be a positive number of seconds, got {interval!r}")
            self.interval = interval
        self.error: str | None = None
        self.refreshed_at = 0.0
        self.refreshes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._display_ids: list[str] = []
        self._widgets: dict[str, Any] = {}
        self._plot_key: Any = None
        self._lock = threading.Lock()

    # -- what a subclass gives ------------------------------------------------------------
    @abstractmethod
    def fetch(self) -> None:
        """Read the figures again (network calls: runs in the refreshing thread)."""

    @abstractmethod
    def body_html(self) -> str:
        """The panel's figures and tables as HTML."""

    def plot_png(self) -> tuple[Any, bytes | None]:
        """``(key, png)``: the plot, redrawn only when ``key`` changes; ``(None, None)``: none."""
        return None, None

    # -- reading ------------------------------------------------------------------------
    def refresh(self, *, raise_errors: bool = False) -> LivePanel:
        """Read the figures now; a failure is shown in the panel (and kept in :attr:`error`),
        or raised with ``raise_errors`` (a panel's first reading: nothing to show yet)."""
        try:
            self.fetch()
            self.error = None
        except Exception as exc:  # noqa: BLE001 - a live display says what failed and goes on
            if raise_errors:
                raise
            self.error = f"{type(exc).__name__}: {exc}"
        self.refreshed_at = time.time()
        self.refreshes += 1
        return self

    @property
    def live(self) -> bool:
        """Whether the panel is refreshing itself now."""
        return bool(self._widgets) and not self._stop.is_set()

    def _note(self) -> str:
        when = time.strftime("%H:%M:%S", time.localtime(self.refreshed_at)) if self.refreshed_at else "never"
        state = f"live, every {self.interval:g} s" if self.live else "stopped"
        return f"{state} · as of {when}" + (f" · last refresh failed: {self.error}" if self.error else "")

    def _repr_html_(self) -> str:
        return panel(self.title, self.body_html(), note=self._note())

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(str(self))

    # -- showing --------------------------------------------------------------------------
    def _ipython_display_(self) -> None:
        if not widgets_can_render():
            from IPython.display import display

            display(bundle(str(self), self._repr_html_()), raw=True)
            return
        self.start()
        self._display_ids.append(show(str(self), self._repr_html_(), self._widgets["box"]))

    def widget(self) -> Any:
        """The panel as an ipywidget (refreshing from now on), to place in a layout of one's own."""
        self.start()
        return self._widgets["box"]

    def start(self) -> None:
        """Build the widgets (once) and start refreshing them."""
        if self._widgets:
            return
        import ipywidgets

        html_widget = ipywidgets.HTML(self._repr_html_())
        plot = ipywidgets.Image(format="png", layout={"max_width": "100%"})
        stop = ipywidgets.Button(description="stop", icon="stop", tooltip="stop refreshing",
                                 layout={"width": "auto"})
        stop.on_click(lambda _: self.close())
        box = ipywidgets.VBox([html_widget, plot, stop])
        box.add_class("gpunet-live")
        self._widgets = {"html": html_widget, "plot": plot, "stop": stop, "box": box}
        self._draw()
        _live.add(self)
        self._thread = threading.Thread(target=self._loop, name=f"gpunet-{type(self).__name__}", daemon=True)
        self._thread.start()

    def _draw(self) -> None:
        with self._lock:
            widgets = self._widgets
            if not widgets:
                return
            widgets["html"].value = self._repr_html_()
            key, png = self.plot_png()
            if png is not None and key != self._plot_key:
                widgets["plot"].value = png
                self._plot_key = key
            widgets["plot"].layout.display = None if self._plot_key is not None else "none"

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            box = self._widgets.get("box")
            if box is None or box.comm is None:  # the widget was closed
                break
            self.refresh()
            self._draw()
        self._stop.set()

    def close(self) -> None:
        """Stop refreshing; the display keeps its last state, static (as a saved notebook shows it)."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=self.interval + 30)
        _live.discard(self)
        with self._lock:
            widgets, self._widgets = self._widgets, {}
        for display_id in self._display_ids:  # every place it was shown
            try:
                replace(display_id, str(self), self._repr_html_())
            except Exception:  # noqa: BLE001 - at the kernel's exit there may be no one to tell
                pass
        for widget in widgets.values():
            widget.close()
        self.closed()

    def closed(self) -> None:
        """Called once the panel stopped: a subclass lets go of its connections here."""
