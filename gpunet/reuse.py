"""Reuse by content: a verified result is not computed twice.

A cell's *reuse key* is the codec digest of what determines its outputs: its code
digest, its inputs' digests (``--map`` items among them) and which outputs it asks
for (:func:`reuse_key`, from its provenance record). The scheduler's metering
plugin keeps a :class:`ReuseTable` of verified results by key. It takes a result
only from the notebook that judged it, and only when a *checked* verdict (copies on
distinct providers that agreed) accepted exactly that result: the result's digest
must be one the verdict named. A later ``--verify`` cell with the same key, from
any session, gets the stored result at no cost (``--no-reuse`` runs it again).

The table is in the scheduler's memory (it goes when the scheduler stops), bounded
by :data:`MAX_TABLE_BYTES` (least recently used first out); a result over
:data:`MAX_ENTRY_BYTES` is not kept.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any

from gpunet import codec
from gpunet.wire import Job, Pickled

#: The largest result (its outputs' pickled bytes together) the table keeps.
MAX_ENTRY_BYTES = 4 * 1024 * 1024
#: What the table keeps at most, all entries together.
MAX_TABLE_BYTES = 256 * 1024 * 1024
#: Flags that change what a cell's outputs are (the others say where or how it runs).
KEY_FLAGS = ("inputs", "outputs", "map")


def reuse_key(record: dict[str, Any]) -> str | None:
    """The reuse key of a record's code and inputs; None when an input has no
    digest (the codec cannot encode it), so nothing says two runs had the same."""
    inputs = record.get("inputs") or {}
    if any(entry.get("digest") is None for entry in inputs.values()):
        return None
    flags = record.get("flags") or {}
    return codec.digest({"kind": record.get("kind"), "code": (record.get("code") or {}).get("digest"),
                         "inputs": {name: entry["digest"] for name, entry in inputs.items()},
                         "flags": {name: str(flags[name]) for name in KEY_FLAGS if name in flags}})


def blob_digest(blob: bytes | Pickled) -> str:
    """The SHA-256 of a pickle as the notebook sent it (its stream and out-of-band
    buffers, each with its length), never loaded."""
    digest = hashlib.sha256()
    for part in (blob.stream, *blob.buffers) if isinstance(blob, Pickled) else (blob,):
        view = memoryview(part).cast("B")
        digest.update(len(view).to_bytes(8, "big"))
        digest.update(view)
    return digest.hexdigest()


def gateway_reuse_key(account: str, job: Job, items: list[bytes | Pickled] | None,
                      requirements: dict[str, str]) -> str:
    """The reuse key the gateway gives a job it forwards, from what it received and never
    loads: the job's code (or its function's pickle), the pickled bytes of its arguments,
    inputs and map items, the outputs it asks for, its packages, and the client
    ``account``, so that only the same account's cells find it (another account's lookup
    would tell it which code and inputs this one ran). Equal bytes are equal inputs; two
    pickles of one value that differ only miss a reuse, never give a wrong one."""
    return codec.digest({
        "account": account, "code": job.code,
        "function": None if job.function is None else blob_digest(job.function),
        "arguments": blob_digest(job.arguments or b""),
        "inputs": {name: blob_digest(blob) for name, blob in job.inputs.items()},
        "items": None if items is None else [blob_digest(item) for item in items],
        "outputs": list(job.outputs), "strict_outputs": job.strict_outputs, "map_name": job.map_name,
        "display_last_expression": job.display_last_expression, "requirements": dict(sorted(requirements.items())),
    })


class ReuseTable:
    """Verified results by reuse key, least recently used first out."""

    def __init__(self, max_bytes: int = MAX_TABLE_BYTES, max_entry_bytes: int = MAX_ENTRY_BYTES) -> None:
        self.max_bytes = max_bytes
        self.max_entry_bytes = max_entry_bytes
        self.size = 0
        self._entries: OrderedDict[str, tuple[int, dict[str, Any]]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, key: str, entry: dict[str, Any], size: int) -> bool:
        """Keep ``entry`` (of ``size`` bytes) under ``key``; False when it is too large."""
        if size > self.max_entry_bytes:
            return False
        if key in self._entries:
            self.size -= self._entries.pop(key)[0]
        self._entries[key] = (size, entry)
        self.size += size
        while self.size > self.max_bytes:
            _, (dropped, _) = self._entries.popitem(last=False)
            self.size -= dropped
        return True

    def get(self, key: str) -> dict[str, Any] | None:
        """The entry under ``key`` (now the most recently used), or None."""
        found = self._entries.get(key)
        if found is None:
            return None
        self._entries.move_to_end(key)
        return found[1]
