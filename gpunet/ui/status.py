"""``%gpunet status``: which kind of network this is, its workers, their devices and
free slots, whose provider each belongs to, and the providers' trust records."""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gpunet.worker.device import format_bytes

if TYPE_CHECKING:  # pragma: no cover
    from gpunet.client.network import Network, WorkerInfo


@dataclass(frozen=True)
class NetworkStatus:
    """A snapshot of a network, shown as a table (HTML in a notebook, text elsewhere)."""

    scheduler: str
    dashboard: str | None
    session: str
    workers: list[WorkerInfo]
    note: str | None = None
    #: this session's credits, where the network meters work
    usage: str | None = None
    #: worker address -> provider account (metered networks)
    owners: dict[str, str] | None = None
    #: one line on the providers' trust records (metered networks)
    trust: str | None = None
    #: which kind of network, and who is trusted on it (:data:`NETWORK_KINDS`)
    kind: str | None = None

    @classmethod
    def of(cls, net: Network) -> NetworkStatus:
        """Take a snapshot of ``net`` now."""
        note = net.embedded.note if net.embedded is not None else None
        usage = owners = trust = None
        workers = net.workers()
        if net.meter is not None:
            n = net.credits.usage(net.session)
            usage = f"credits: spent {n['spent']}, held {n['held']}, left {n['left']} of {n['budget']}"
            owners, trust = _providers(net, [worker.address for worker in workers])
        else:
            usage = "credits: not metered"
        return cls(net.address, net.dashboard_link, net.session, workers, note, usage, owners, trust,
                   network_kind(net))

    def rows(self) -> list[tuple[str, ...]]:
        """One row per worker: address, name, device, memory, free/total slots, resources."""
        rows = []
        for worker in self.workers:
            device = worker.device or {}
            kind_name = f"{device.get('kind', '?')}: {device.get('name', 'unknown')}"
            memory = format_bytes(device["memory_bytes"]) if device.get("memory_bytes") else "?"
            resources = ", ".join(f"{k}={v:g}" for k, v in sorted(worker.resources.items()))
            capability = device.get("capability")
            measured = f"{capability['tflops_f32']:.3f}" if capability else "not measured"
            provider = (self.owners or {}).get(worker.address, "-")
            rows.append((worker.address, worker.name, provider, kind_name, memory,
                         f"{worker.free_slots}/{worker.slots}", measured, resources))
        return rows

    HEADER = ("worker", "name", "provider", "device", "memory", "free slots", "TFLOP/s f32", "resources")

    def __str__(self) -> str:
        lines = [f"scheduler {self.scheduler}   dashboard {self.dashboard or 'none'}   session {self.session}"]
        if self.kind:
            lines.append(self.kind)
        if self.note:
            lines.append(self.note)
        if self.usage:
            lines.append(self.usage)
        if self.trust:
            lines.append(self.trust)
        table = [self.HEADER, *self.rows()]
        widths = [max(len(row[i]) for row in table) for i in range(len(self.HEADER))]
        for row in table:
            lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
        lines.append(f"{len(self.workers)} worker(s), {sum(w.free_slots for w in self.workers)} free slot(s)")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return str(self)

    def _repr_pretty_(self, printer, cycle: bool) -> None:  # noqa: ANN001 - IPython's pretty printer
        printer.text(str(self))

    def _repr_html_(self) -> str:
        dashboard = (f'<a href="{html.escape(self.dashboard)}" target="_blank">{html.escape(self.dashboard)}</a>'
                     if self.dashboard else "none")
        head = "".join(f"<th>{html.escape(h)}</th>" for h in self.HEADER)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in self.rows())
        note = "".join(f"<br>{html.escape(text)}" for text in (self.kind, self.note, self.usage, self.trust)
                       if text)
        return (f"<div><b>gpunet</b> scheduler <code>{html.escape(self.scheduler)}</code> · dashboard {dashboard}"
                f" · session <code>{html.escape(self.session)}</code>{note}"
                f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>")


#: What ``%gpunet status`` says of each kind of network (README, "Security model").
NETWORK_KINDS = {
    "embedded": "network: embedded (your own processes on this machine)",
    "private": "network: private (a lab: every Dask client on it is trusted, and can run code on the scheduler and "
               "the workers)",
    "open": "network: open (strangers: mutual TLS with the operator's certificates; only the gateway is a Dask "
            "client; every task carries a hold)",
}


def network_kind(net: Network) -> str:
    """What ``%gpunet status`` says of the kind of network ``net`` is."""
    if net.embedded is not None:
        return NETWORK_KINDS["embedded"]
    state = net.metering_state() or {}
    return NETWORK_KINDS["open" if state.get("network") == "open" else "private"]


def _providers(net: Network, addresses: list[str]) -> tuple[dict[str, str], str | None]:
    """Which provider each worker belongs to (as the scheduler's metering knows it),
    and a line on those providers' trust records in the credit service."""
    state = net.metering_state() or {}
    known = {address: info["provider"] for address, info in state.get("providers", {}).items()}
    default = state.get("default_provider")
    owners = {address: known.get(address, default) for address in addresses if known.get(address, default)}
    try:
        records = {record["provider"]: record for record in net.credits.provider_records()}
    except Exception as exc:  # noqa: BLE001 - the status must show even so
        return owners, f"providers: trust records unavailable ({exc})"
    parts = []
    for provider in sorted(set(owners.values()) | set(state.get("quarantined", ()))):
        record = records.get(provider, {})
        if record.get("quarantined") or provider in state.get("quarantined", ()):
            parts.append(f"{provider} QUARANTINED")
        else:
            parts.append(f"{provider} reputation {record.get('reputation', 1.0):.2f}, "
                         f"{record.get('consecutive_valid', 0)} verified in a row")
    return owners, ("providers: " + "; ".join(parts)) if parts else None
