"""``%gpunet status``: which kind of network this is, its workers, their devices and
free slots, whose provider each belongs to, and the providers' trust records."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

from gpunet.codec import clean_text
from gpunet.metering.meter import DEFAULT_ITEM_HOLD_SECONDS, default_timeout
from gpunet.ui import look
from gpunet.worker.device import format_bytes


@dataclass(frozen=True)
class WorkerInfo:
    """One worker as ``%gpunet status`` shows it."""

    address: str
    name: str
    device: dict[str, Any]
    resources: dict[str, float]
    slots: int
    busy: int

    @property
    def free_slots(self) -> int:
        return max(self.slots - self.busy, 0)


def gpunet_page(dashboard_link: str) -> str:
    """The address of the metering plugin's ``/gpunet`` page beside a Dask dashboard's ``/status``."""
    base = dashboard_link[: -len("/status")] if dashboard_link.endswith("/status") else dashboard_link.rstrip("/")
    return base + "/gpunet"


class Shown(Protocol):
    """What a status needs of its network (the arrows point one way:
    :class:`gpunet.client.network.Network` is one, and imports this module)."""

    address: str
    dashboard_link: str | None
    session: str
    embedded: Any
    meter: Any
    credits: Any
    metered: bool
    gateway: str | None

    def workers(self) -> list[WorkerInfo]: ...
    def metering_state(self) -> dict[str, Any] | None: ...
    def hold_rate(self, max_rate: float | None = None) -> float: ...
    def worker_rates(self, *, fresh: bool = False) -> tuple[dict[str, Any], dict[str, float]]: ...


#: No device measures more than this (TFLOP/s, GB/s): a provider's figure above it is a lie.
MAX_PLAUSIBLE_RATE = 5000.0
#: A capability's figures (numbers; ``tflops_bf16`` may be None).
CAPABILITY_FIGURES = ("tflops_f32", "tflops_bf16", "bandwidth_gbs", "seconds")


def provider_device(raw: Any, depth: int = 2) -> dict[str, Any]:
    """A worker's self-description (``device_info``) as a provider sent it, made safe to
    show and use: text without terminal escapes and cut short, numbers finite, anything
    else dropped; a capability with a missing, non-numeric or absurd figure becomes
    None (not measured)."""
    if not isinstance(raw, dict):
        return {}
    device: dict[str, Any] = {}
    for key, value in list(raw.items())[:64]:
        if not isinstance(key, str):
            continue
        key = clean_text(key)[:64]
        if key == "capability":
            device[key] = provider_capability(value)
        elif value is None or isinstance(value, bool) or _finite_number(value):
            device[key] = value
        elif isinstance(value, str):
            device[key] = clean_text(value)[:200]
        elif isinstance(value, dict) and depth:  # e.g. the software versions
            device[key] = provider_device(value, depth - 1)
    return device


def provider_capability(raw: Any) -> dict[str, Any] | None:
    """A provider's measured capability, or None where a figure is missing, not a
    finite number, negative or past :data:`MAX_PLAUSIBLE_RATE`."""
    if not isinstance(raw, dict):
        return None
    figures = {name: raw.get(name) for name in CAPABILITY_FIGURES}
    if figures["tflops_bf16"] is None:  # not measured on every device
        figures.pop("tflops_bf16")
    if not all(_finite_number(value) and 0 <= value <= MAX_PLAUSIBLE_RATE for value in figures.values()):
        return None
    return {"tflops_bf16": None, **{name: float(value) for name, value in figures.items()},
            "bf16_native": raw.get("bf16_native") is True}


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def device_columns(device: dict[str, Any] | None) -> tuple[str, str, str]:
    """A worker's device as table columns: ``kind: name``, its memory, its measured TFLOP/s (float32)."""
    device = device or {}
    kind_name = f"{device.get('kind', '?')}: {device.get('name', 'unknown')}"
    memory = format_bytes(device["memory_bytes"]) if device.get("memory_bytes") else "?"
    capability = device.get("capability")
    measured = f"{capability['tflops_f32']:.3f}" if capability else "not measured"
    return kind_name, memory, measured


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
    #: one line on what a cell gets when it asks for nothing: its timeout and hold
    defaults: str | None = None
    #: worker address -> the rate its provider asks, credits per device-second (metered networks)
    rates: dict[str, float] | None = None

    @classmethod
    def of(cls, net: Shown) -> NetworkStatus:
        """Take a snapshot of ``net`` now."""
        note = net.embedded.note if net.embedded is not None else None
        usage = owners = trust = rates = None
        workers = net.workers()
        if net.metered:
            n = net.credits.usage(net.session)
            usage = f"credits: spent {n['spent']}, held {n['held']}, left {n['left']} of {n['budget']}"
            owners, trust = _providers(net, [worker.address for worker in workers])
            rates = net.worker_rates(fresh=True)[1]
        else:
            usage = "credits: not metered"
        return cls(net.address, net.dashboard_link, net.session, workers, note, usage, owners, trust,
                   network_kind(net), cell_defaults(net.hold_rate() if net.metered else None), rates)

    def rows(self) -> list[tuple[str, ...]]:
        """One row per worker: address, name, device, memory, free/total slots, resources."""
        rows = []
        for worker in self.workers:
            kind_name, memory, measured = device_columns(worker.device)
            resources = ", ".join(f"{k}={v:g}" for k, v in sorted(worker.resources.items()))
            provider = (self.owners or {}).get(worker.address, "-")
            rate = (self.rates or {}).get(worker.address)
            rows.append((worker.address, worker.name, provider, "-" if rate is None else f"{rate:g}/s", kind_name, memory,
                         f"{worker.free_slots}/{worker.slots}", measured, resources))
        return rows

    HEADER = ("worker", "name", "provider", "rate", "device", "memory", "free slots", "TFLOP/s f32", "resources")

    def notes(self) -> list[str]:
        """The lines above the table: the kind of network, its note, credits, trust, cell defaults."""
        return [text for text in (self.kind, self.note, self.usage, self.trust, self.defaults) if text]

    def __str__(self) -> str:
        return "\n".join([f"scheduler {self.scheduler}   dashboard {self.dashboard or 'none'}   session {self.session}",
                          *self.notes(), *look.text_table(self.HEADER, self.rows(), indent=""),
                          f"{len(self.workers)} worker(s), {sum(w.free_slots for w in self.workers)} free slot(s)"])

    def __repr__(self) -> str:
        return str(self)

    def _repr_pretty_(self, printer, cycle: bool) -> None:  # noqa: ANN001 - IPython's pretty printer
        printer.text(str(self))

    def _repr_html_(self) -> str:
        dashboard = (f'<a href="{look.esc(self.dashboard)}" target="_blank">{look.esc(self.dashboard)}</a>'
                     if self.dashboard else "none")
        if self.dashboard and self.owners is not None:  # a metered network: its /gpunet page
            page = gpunet_page(self.dashboard)
            dashboard += f' (<a href="{look.esc(page)}" target="_blank">gpunet page</a>)'

        notes = "".join(f"<div>{look.esc(text)}</div>" for text in self.notes())
        free = sum(w.free_slots for w in self.workers)
        return look.panel("gpunet network", (
            f"<div>scheduler <code>{look.esc(self.scheduler)}</code> · dashboard {dashboard}"
            f" · session <code>{look.esc(self.session)}</code></div>{notes}"
            + look.table(self.HEADER, self.rows(), empty="no worker is connected")
            + f"<div>{len(self.workers)} worker(s), {free} free slot(s)</div>"))


#: What ``%gpunet status`` says of each kind of network (README, "Security model").
NETWORK_KINDS = {
    "embedded": "network: embedded (your own processes on this machine)",
    "private": "network: private (a lab: every Dask client on it is trusted, and can run code on the scheduler and "
               "the workers)",
    "open": "network: open (strangers: mutual TLS with the operator's certificates; only the gateway is a Dask "
            "client; every task carries a hold)",
    "gateway": "network: open, through the gateway {gateway} (strangers: this notebook is no Dask client; the "
               "gateway checks its credit token, holds credits for each job and sends it; every task carries a hold)",
}


def network_kind(net: Shown) -> str:
    """What ``%gpunet status`` says of the kind of network ``net`` is."""
    results = ("; results come back pickled (any object)" if net.trusts_providers
               else "; results come back as data only (gpunet.codec), never as code")
    if net.embedded is not None:
        return NETWORK_KINDS["embedded"] + results
    if net.gateway is not None:
        return NETWORK_KINDS["gateway"].format(gateway=net.gateway) + results
    state = net.metering_state() or {}
    return NETWORK_KINDS["open" if state.get("network") == "open" else "private"] + results


def cell_defaults(max_rate: float | None) -> str:
    """What a cell without --timeout or --max-credits gets: the time its hold covers, and
    (metered) what it holds at the session's price limit ``max_rate``."""
    cell, item = default_timeout(1), DEFAULT_ITEM_HOLD_SECONDS
    held = "" if max_rate is None else (f", holding {math.ceil(cell * max_rate)} credits at your price limit, "
                                        f"{max_rate:g} a device-second (only providers at or below it run your "
                                        "cells; --max-rate R raises it)")
    return (f"cells: --timeout defaults to {cell:g} s (a --map: {item:g} s per item), the device time a cell's "
            f"hold covers{held}; give --timeout for longer cells")


def _providers(net: Shown, addresses: list[str]) -> tuple[dict[str, str], str | None]:
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
