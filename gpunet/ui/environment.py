"""``%gpunet env``: the packages this session asks of providers, and where they are met.

What the session sends: the ``--pip`` requirements of ``%gpunet connect`` and what its
jobs asked for so far (found from their imports at this notebook's versions,
:mod:`gpunet.packages`); and per worker, whether its provider says it has them, would
install them (``gpunet provide --allow-installs``), or cannot. Workers that report no
environment (the embedded network's, a private network's plain Dask workers) share the
notebook's. What a provider reports is its own claim: on an open network nothing checks it
until a cell runs there (the result then says which versions it ran with).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gpunet import packages
from gpunet.ui import look

if TYPE_CHECKING:  # pragma: no cover
    from gpunet.client.network import Network

HEADER = ("worker", "provider", "the session's packages")


class SessionEnvironment:
    """What ``%gpunet env`` shows (HTML in a notebook, text elsewhere)."""

    def __init__(self, net: Network) -> None:
        asked = {**net.sent_requirements}
        pinned = packages.resolve((), net.pins)
        asked.update(pinned.requirements)
        self.environment = packages.CellEnvironment(asked, {name: "--pip" for name in pinned.requirements})
        self.reports = net.environment_reports(fresh=True)
        self.rows = packages.describe_where(self.environment, self.reports, net.scheduler_workers(fresh=True))
        self.shared = not self.reports

    def _asked_text(self) -> str:
        if not self.environment.requirements:
            return "no packages asked for yet (a cell's imports are found when it is sent; --pip adds more)"
        return ", ".join(f"{name}{spec}" for name, spec in sorted(self.environment.requirements.items()))

    def _note(self) -> str:
        if self.shared:
            return ("no worker reports an environment: they share this notebook's (the embedded network, or a "
                    "private network's own workers), so nothing is checked or installed")
        return "what each provider reports is its own claim; the versions a cell ran with are in its provenance record"

    def __repr__(self) -> str:
        lines = [f"gpunet env: this session asks for {self._asked_text()}", f"  ({self._note()})"]
        lines += [f"  {worker}  {provider}  {how}" for worker, provider, how in self.rows]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        body = (f"<div>this session asks for <code>{look.esc(self._asked_text())}</code></div>"
                f"<div style='color:{look.COLOURS['muted']}'>{look.esc(self._note())}</div>"
                + look.table(HEADER, self.rows, empty="no worker"))
        return look.panel("gpunet env", body)
