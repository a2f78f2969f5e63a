"""``%gpunet receipt`` / ``gpunet.SessionReceipt()``: this session's receipt, kept in the notebook.

The display carries the receipt (entries, inclusion proofs, signed head) under its own
MIME type, ``application/vnd.gpunet.receipt+json``, and the heads seen of the ledger in
the display's metadata, so both are saved in the ``.ipynb``; JupyterLab shows the one
``text/plain`` line. ``gpunet ledger verify --receipt NOTEBOOK.ipynb`` checks it offline.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gpunet.client.network import current
from gpunet.credits._receipts import RECEIPT_MIME, fetch_receipt
from gpunet.credits._witness import Witness
from gpunet.errors import GpunetError

if TYPE_CHECKING:  # pragma: no cover
    from gpunet.client.network import Network


class SessionReceipt:
    """The receipt of this notebook session, checked when fetched: its entries are in the signed
    tree, the service signs with the key pinned for it, and the head extends every head seen
    of its ledger before (a consistency proof from the service). A fork or another key raises."""

    def __init__(self, net: Network | None = None, *, witness: Witness | None = None) -> None:
        self.net = net or current()
        meter = self.net.session_meter  # through a gateway, what the gateway's meter of this session says
        if meter is None:
            raise GpunetError("this connection has no credit service, so its session has no receipt "
                              "(connect with --credits URL --token TOKEN, or without an address)")
        # The embedded network's service is this notebook's own, with a fresh key each time: nothing to pin.
        service = None if self.net.embedded is not None else self.net.credits.url
        # the scheduler pays a pre-authorized hold in parts, in batches: what it paid for the
        # cells so far lands in the ledger before the receipt is taken (bounded)
        meter.wait_settled()
        self.payload, self.metadata, self.summary = fetch_receipt(
            self.net.credits, meter.session, witness=witness or Witness(), service=service)

    @property
    def receipt(self) -> dict[str, Any]:
        """The receipt itself (as ``gpunet credits receipt`` writes it)."""
        return self.payload["receipt"]

    def __str__(self) -> str:
        s = self.summary
        seen = s["seen_heads"] - 1
        where = f"pinned for {s['service']}" if s["service"] else "of this notebook's own network"
        return (f"gpunet receipt: session {s['session']}, {s['entries']} ledger entries, spent {s['spent']} credits, "
                f"{s['held']} held · signed head of {s['size']} entries, root {s['root'][:16]}…, key "
                f"{self.metadata['ledger']['key_id']} {where} · "
                + (f"consistent with the {seen} head(s) seen before" if seen else "the first head seen of this ledger")
                + " · check it: gpunet ledger verify --receipt NOTEBOOK.ipynb")

    __repr__ = __str__

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(str(self))

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
        return {RECEIPT_MIME: self.payload, "text/plain": str(self)}, {RECEIPT_MIME: self.metadata}
