"""Receipts that travel: checked against what the reader has seen of the ledger, and kept in notebooks.

A receipt (:func:`gpunet.credits.verify_receipt`) proves its entries are in the tree its
signed head names. :func:`check_receipt` adds what a single receipt cannot show: that the
key is the one pinned for its service (trust on first use) and that its head agrees with
every head seen before of that ledger (:class:`~gpunet.credits._witness.Witness`).

``%gpunet receipt`` embeds a receipt in the notebook as a display of type
:data:`RECEIPT_MIME`::

    data[RECEIPT_MIME]     = {"format": NOTEBOOK_RECEIPT_FORMAT, "service": address or None, "receipt": {...}}
    metadata[RECEIPT_MIME] = {"ledger": heads record}

The heads record (:meth:`HeadLog.to_json`) holds the heads seen of that ledger up to the
receipt's, with the consistency proofs linking them, so that a reader elsewhere checks them
(``gpunet ledger verify --heads NOTEBOOK.ipynb``) and learns them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from gpunet.credits._ledger import RECEIPT_FORMAT, key_id, verify_receipt
from gpunet.credits._witness import HEADS_FORMAT, ProofSource, Witness
from gpunet.errors import LedgerKeyError, LedgerVerificationError

RECEIPT_MIME = "application/vnd.gpunet.receipt+json"
NOTEBOOK_RECEIPT_FORMAT = "gpunet-notebook-receipt-v1"
#: How many of the newest heads seen a notebook's receipt carries.
EMBEDDED_HEADS = 32


def proofs_from(client: Any) -> ProofSource:
    """Consistency proofs fetched from a :class:`CreditClient` (any token)."""
    def fetch(first: int, second: int) -> list[bytes]:
        return [bytes.fromhex(p) for p in client.consistency_proof(first, second)["proof"]]
    return fetch


def check_receipt(receipt: Mapping[str, Any], *, witness: Witness, service: str | None = None,
                  public_key: str | None = None, proofs: ProofSource | None = None,
                  also: Iterable[Mapping[str, Any]] = (), source: str = "",
                  unnamed_ok: bool = False) -> dict[str, Any]:
    """Check a receipt on its own (:func:`verify_receipt`), then against the reader's memory.

    ``service`` (default: the receipt's ``service``) must sign with the key pinned for it,
    or is pinned to the receipt's key on first contact; ``public_key`` pins one explicitly. A
    receipt naming no service must be signed by a key pinned for some service, unless
    ``public_key`` is given or ``unnamed_ok`` (the reader fetched it from the service itself).
    Its head must agree with every head seen of its ledger (and with ``also``, heads records
    met with it): at the same size offline, through consistency proofs with ``proofs``.
    Returns :func:`verify_receipt`'s summary with ``service``, ``pinned_now``, ``seen_heads``
    and ``unlinked``; raises :class:`LedgerKeyError` or :class:`LedgerForkError`.
    """
    summary = verify_receipt(receipt, public_key)
    head = receipt["head"]
    service = service or receipt.get("service") or None
    if service and public_key is None:
        witness.check_pin(service, head["public_key"])
    elif not service and public_key is None and not unnamed_ok:
        _require_pinned_somewhere(witness, head, source)
    note = witness.observe(head, service=service, proofs=proofs, also=also, source=source)
    summary.update(service=service, pinned_now=note["pinned_now"], seen_heads=note["heads"],
                   unlinked=note["unlinked"], public_key=head["public_key"])
    return summary


def _require_pinned_somewhere(witness: Witness, head: Mapping[str, Any], source: str) -> None:
    """Refuse a head naming no service whose key no service is pinned to: anyone can sign one."""
    key = str(head["public_key"]).lower()
    if not any(pin.get("public_key", "").lower() == key for pin in witness.pins().values()):
        raise LedgerKeyError(
            f"the receipt{' in ' + source if source else ''} names no credit service, and its key "
            f"{key_id(bytes.fromhex(key))} is pinned for no service on this machine, so nothing says whose it is "
            "(anyone can sign a receipt with a key of their own). Pass the service's address with --service, or "
            "its public key (from its operator, by another channel) with --public-key",
            evidence={"public_key": key})


def fetch_receipt(client: Any, session: str, *, witness: Witness,
                  service: str | None) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Fetch a session's receipt, check it (proofs fetched from the service) and remember its head.

    ``service`` is the address to pin (None: the notebook started the service itself).
    Returns ``(display payload, display metadata, summary)`` for :data:`RECEIPT_MIME`.
    """
    receipt = client.receipt(session)
    if service is None:
        receipt.pop("service", None)
    summary = check_receipt(receipt, witness=witness, service=service, proofs=proofs_from(client),
                            source=f"session {session}", unnamed_ok=True)
    log = witness.load(receipt["head"]["public_key"])
    sizes = sorted(s for s in log.heads if s <= receipt["head"]["size"])[-EMBEDDED_HEADS:]
    record = log.to_json(upto=receipt["head"]["size"], since=sizes[0] if sizes else 0)
    payload = {"format": NOTEBOOK_RECEIPT_FORMAT, "service": service, "receipt": receipt}
    return payload, {"ledger": record}, summary


# -- reading them back -------------------------------------------------------------------


def _load_json(path: str | os.PathLike[str]) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except OSError as exc:
        raise LedgerVerificationError(f"cannot read {path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise LedgerVerificationError(f"{path} is not valid JSON: {exc}") from exc


def read_documents(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """What a file holds of ledgers: a list of ``{"source", "receipt", "service", "ledger", "head"}``
    (each key but ``source`` may be None).

    Reads a notebook (``.ipynb``: every :data:`RECEIPT_MIME` display in it), a receipt, a
    notebook receipt's payload, a heads record (``gpunet-heads-v1``, as the data dir keeps
    them), a signed head, or a JSON list of any of these.
    """
    doc = _load_json(path)
    items: list[dict[str, Any]] = []

    def item(source: str, **fields: Any) -> None:
        items.append({"source": source, "receipt": None, "service": None, "ledger": None, "head": None,
                      **fields})

    def one(value: Any, source: str) -> None:
        fmt = value.get("format") if isinstance(value, Mapping) else None
        if isinstance(value, list):
            for i, v in enumerate(value):
                one(v, f"{source}[{i}]")
        elif isinstance(value, Mapping) and "cells" in value and "nbformat" in value:
            for n, cell in enumerate(value["cells"], 1):
                for output in cell.get("outputs", []):
                    data = output.get("data", {})
                    if RECEIPT_MIME in data:
                        meta = output.get("metadata", {}).get(RECEIPT_MIME, {})
                        payload = data[RECEIPT_MIME]
                        if isinstance(payload, str):  # some writers keep JSON types as text
                            payload = json.loads(payload)
                        one({**payload, **({"ledger": meta["ledger"]} if "ledger" in meta else {})},
                            f"{source} cell {n}")
        elif fmt == NOTEBOOK_RECEIPT_FORMAT:
            item(source, receipt=value.get("receipt"), service=value.get("service"), ledger=value.get("ledger"))
        elif fmt == RECEIPT_FORMAT:
            item(source, receipt=value, service=value.get("service"))
        elif fmt == HEADS_FORMAT:
            item(source, ledger=value)
        elif isinstance(value, Mapping) and "signature" in value and "root" in value:
            item(source, head=value)
        else:
            raise LedgerVerificationError(
                f"{source} is neither a notebook, a receipt, a heads record nor a signed head (format {fmt!r}); "
                "pass a notebook with %gpunet receipt outputs, a receipt from `gpunet credits receipt`, or the "
                "heads files of the data dir's ledger/heads folder")
    one(doc, str(path))
    return items


def heads_records(items: Iterable[Mapping[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """The heads of :func:`read_documents`' items as ``(source, heads record)`` pairs."""
    out: list[tuple[str, dict[str, Any]]] = []
    for it in items:
        if it["ledger"] is not None:
            out.append((it["source"], dict(it["ledger"])))
        head = it["head"] or (it["receipt"] or {}).get("head")
        if isinstance(head, Mapping):
            out.append((it["source"], {"format": HEADS_FORMAT, "public_key": head.get("public_key", ""),
                                       "heads": [head]}))
    return out
