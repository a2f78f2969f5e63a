"""The ledger's format, signed tree heads, and the checks that anyone can run.

An entry is one movement of credits. Its fields, in order::

    index  time  kind  from  to  amount  session  hold  key

``kind`` is ``mint``, ``hold``, ``settle`` or ``release``; ``from`` is empty for a
mint; ``to`` of a hold (and ``from`` of a settle or release) is the ``escrow``
account. The leaf input of entry *i* is::

    prev (32 raw bytes) || UTF-8 of the nine fields joined by 0x1F

where ``prev`` is the hash of entry *i - 1* (32 zero bytes for entry 0). The hash
of an entry is its RFC 6962 leaf hash, ``SHA-256(0x00 || leaf input)``, so the
chain and the Merkle tree share one hash per entry. Fields never contain 0x1F
(the service only accepts printable names and keys), so the encoding is
unambiguous; the verifier rejects an entry that breaks this.

A settlement may carry a *memo*, a JSON object (how the work was verified, by
whom). Its canonical text, ``json.dumps(memo, sort_keys=True, separators=(",", ":"))``
(ASCII, so it never holds a raw 0x1F), is appended to the leaf input after one
more 0x1F, and only when the entry has a memo: entries without one hash exactly
as they did before memos existed. :func:`leaf_input` is the one place that rule
lives; the writer and every verifier go through it.

Holds: a ``hold`` entry moves credits from a client into escrow under a new hold id;
``settle`` entries (one per payment: a whole settlement, or each part of a hold paid in
parts) and at most one ``release`` move them out of escrow under the same id. The
verifiers check that no hold ever pays out more than was placed on it.

A signed tree head is ``{"size", "root", "timestamp", "signature", "public_key",
"key_id"}``; the ed25519 signature covers::

    b"gpunet-ledger-head-v1\\n" + f"{size}\\n{root hex}\\n{timestamp}\\n"

Verifiers here return a summary or raise :class:`LedgerVerificationError` naming the
first bad entry and the disagreeing values.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

from gpunet.errors import LedgerVerificationError, ProofError
from gpunet.credits._merkle import MerkleTree, leaf_hash, roots_from_levels, subtree_levels, verify_inclusion

logger = logging.getLogger(__name__)

ZERO_HASH = b"\x00" * 32
HEAD_DOMAIN = b"gpunet-ledger-head-v1\n"
RECEIPT_FORMAT = "gpunet-receipt-v1"
ESCROW = "escrow"
KINDS = ("mint", "hold", "settle", "release")
FIELDS = ("index", "time", "kind", "from", "to", "amount", "session", "hold", "key")
SEP = "\x1f"
MAX_MEMO_BYTES = 4096


def canonical_memo(memo: Mapping[str, Any] | None) -> str:
    """Return the canonical JSON text of a settlement memo, ``""`` for none (``None`` or ``{}``).

    ``json.dumps(memo, sort_keys=True, separators=(",", ":"))``: ASCII only, keys sorted;
    raises ``ValueError`` or ``TypeError`` for what JSON cannot hold (NaN, sets, ...).
    """
    if not memo:
        return ""
    return json.dumps(memo, sort_keys=True, separators=(",", ":"), allow_nan=False)


def leaf_input(
    prev: bytes,
    index: int,
    time: str,
    kind: str,
    src: str,
    dst: str,
    amount: int,
    session: str,
    hold: str,
    key: str,
    memo: str = "",
) -> bytes:
    """Return the bytes that entry ``index`` contributes as a Merkle leaf (see the module doc).

    ``memo`` is the entry's canonical memo text (:func:`canonical_memo`); it is part of
    the leaf only when non-empty, so an entry without a memo hashes as it always did.
    """
    text = f"{index}\x1f{time}\x1f{kind}\x1f{src}\x1f{dst}\x1f{amount}\x1f{session}\x1f{hold}\x1f{key}"
    if memo:
        text += SEP + memo
    return prev + text.encode()


def entry_hash(prev: bytes, index: int, time: str, kind: str, src: str, dst: str, amount: int,
               session: str, hold: str, key: str, memo: str = "") -> bytes:
    """Return the hash of an entry: the RFC 6962 leaf hash of its :func:`leaf_input`."""
    return leaf_hash(leaf_input(prev, index, time, kind, src, dst, amount, session, hold, key, memo))


def entry_memo_text(entry: Mapping[str, Any], what: str = "entry") -> str:
    """Return the canonical memo text of an entry in its JSON form (``""`` without a memo).

    Raises :class:`LedgerVerificationError` naming ``what`` when the memo is not a JSON object.
    """
    memo = entry.get("memo")
    try:
        if memo is not None and not isinstance(memo, Mapping):
            raise TypeError(f"it is a {type(memo).__name__}")
        return canonical_memo(memo)
    except (TypeError, ValueError) as exc:
        raise LedgerVerificationError(f"{what}: its memo must be a JSON object ({exc})",
                                      index=entry.get("index")) from None


def entry_to_json(row: Sequence[Any]) -> dict[str, Any]:
    """Turn a stored entry row ``(index, ..., key, prev, hash, memo)`` into its JSON form.

    The memo appears (as the object, key ``"memo"``) only on entries that have one; a stored
    memo that is not JSON (the database was edited) is shown as its text, which verifiers
    refuse, naming the entry.
    """
    entry = {
        "index": row[0],
        "time": row[1],
        "kind": row[2],
        "from": row[3],
        "to": row[4],
        "amount": row[5],
        "session": row[6],
        "hold": row[7],
        "key": row[8],
        "prev": bytes(row[9]).hex(),
        "hash": bytes(row[10]).hex(),
    }
    if row[11]:
        try:
            entry["memo"] = json.loads(row[11])
        except ValueError:
            entry["memo"] = row[11]
    return entry


# -- signing ----------------------------------------------------------------------------


def head_message(size: int, root_hex: str, timestamp: str) -> bytes:
    """Return the bytes an ed25519 tree-head signature covers."""
    return HEAD_DOMAIN + f"{size}\n{root_hex}\n{timestamp}\n".encode()


def key_id(public_key_raw: bytes) -> str:
    """Return a short fingerprint of a raw ed25519 public key (first 16 hex of its SHA-256)."""
    return hashlib.sha256(public_key_raw).hexdigest()[:16]


def load_or_create_signing_key(path: str | os.PathLike[str]) -> Any:
    """Return the ed25519 private key stored at ``path``, creating it (mode 600) if absent."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = Path(path)
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise LedgerVerificationError(
                f"signing key file {path} does not hold an ed25519 private key; "
                "move it away to let the service create a new one (only for a new ledger)"
            )
        return key
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never over a key another start made
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    logger.info("created the ledger's ed25519 signing key at %s", path)
    return key


def public_key_raw(private_key: Any) -> bytes:
    """Return the 32 raw bytes of the public half of an ed25519 private key."""
    from cryptography.hazmat.primitives import serialization

    return private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def sign_head(private_key: Any, size: int, root: bytes, timestamp: str) -> dict[str, Any]:
    """Return a signed tree head for ``size`` entries with Merkle ``root``."""
    root_hex = root.hex()
    sig = private_key.sign(head_message(size, root_hex, timestamp))
    pub = public_key_raw(private_key)
    return {
        "size": size,
        "root": root_hex,
        "timestamp": timestamp,
        "signature": base64.b64encode(sig).decode(),
        "public_key": pub.hex(),
        "key_id": key_id(pub),
    }


def _hex32(value: Any, what: str) -> bytes:
    try:
        raw = bytes.fromhex(value)
    except (TypeError, ValueError):
        raw = b""
    if len(raw) != 32:
        raise LedgerVerificationError(f"{what} must be 64 hex digits, got {str(value)[:80]!r}",
                                      evidence={what: str(value)[:80]})
    return raw


def verify_head(head: Mapping[str, Any], public_key: str | None = None) -> None:
    """Check a signed tree head's signature; ``public_key`` (hex) pins the expected key.

    Returns nothing; raises :class:`LedgerVerificationError` with the evidence.
    """
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    for field in ("size", "root", "timestamp", "signature", "public_key"):
        if field not in head:
            raise LedgerVerificationError(f"signed tree head lacks {field!r}: {dict(head)!r:.200}")
    size = head["size"]
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise LedgerVerificationError(f"tree head size must be an integer >= 0, got {size!r}")
    _hex32(head["root"], "tree head root")
    pub = _hex32(head["public_key"], "tree head public_key")
    if public_key is not None and pub.hex() != public_key.lower():
        raise LedgerVerificationError(
            f"tree head is signed by key {key_id(pub)} ({pub.hex()}), not the expected key "
            f"{public_key.lower()}",
            evidence={"public_key": pub.hex(), "expected": public_key.lower()},
        )
    try:
        sig = base64.b64decode(head["signature"], validate=True)
        Ed25519PublicKey.from_public_bytes(pub).verify(
            sig, head_message(size, head["root"], str(head["timestamp"]))
        )
    except (InvalidSignature, ValueError, TypeError) as exc:
        raise LedgerVerificationError(
            f"signature on the tree head at size {size} (root {head['root']}) does not verify "
            f"with key {key_id(pub)}",
            evidence={"size": size, "root": head["root"], "key_id": key_id(pub)},
        ) from exc


# -- the whole ledger -------------------------------------------------------------------


class LedgerChecker:
    """Checks a ledger streamed in index order: chain, leaf hashes, Merkle root, heads, balances,
    and that every movement has its shape and no hold pays out more than was placed on it.

    Feed rows ``(index, time, kind, from, to, amount, session, hold, key, prev, hash, memo)``
    (``memo``: the canonical memo text, ``""`` for none) with :meth:`feed` (in chunks, in
    order), then call :meth:`finish`.
    """

    def __init__(self, start: int = 0, prev: bytes | None = ZERO_HASH) -> None:
        # ``start``/``prev``: check a slice of the ledger that begins at entry ``start``;
        # ``prev=None`` takes the first entry's prev link as given (checked by the caller).
        self.start = start
        self.size = start
        self.last = prev
        self.first_prev: bytes | None = None
        self.leaves: list[bytes] = []
        self.balances: dict[str, int] = {}
        self.minted = 0
        # What each hold still has in escrow (holds at zero are dropped). A slice that does not
        # start at entry 0 cannot know what earlier holds had: there a hold may go below zero,
        # and ``lows`` keeps, per such hold, each new low ``(index, net, kind, amount)`` for
        # :func:`stitch_holds` to judge once the earlier slices' holds are known.
        self.holds: dict[str, int] = {}
        self.lows: dict[str, list[tuple[int, int, str, int]]] = {}
        #: the Merkle levels (:func:`subtree_levels`) when hashed elsewhere (by verify workers);
        #: ``leaves`` is then not filled
        self.levels: list[bytes] | None = None

    def feed(self, rows: Iterable[Sequence[Any]]) -> None:
        """Check the next rows; raises on the first bad one, naming its index."""
        sha = hashlib.sha256
        leaves = self.leaves
        append = leaves.append
        bal = self.balances
        holds = self.holds
        strict = self.start == 0
        expected = self.size
        last = self.last
        minted = self.minted
        if last is None:
            rows = iter(rows)
            first = next(rows, None)
            if first is None:
                return
            last = self.first_prev = bytes(first[9])
            rows = itertools.chain((first,), rows)
        for row in rows:
            index, time, kind, src, dst, amount, session, hold, key, prev, stored, memo = row
            if type(prev) is not bytes or type(stored) is not bytes:  # a driver's memoryview
                prev, stored = bytes(prev), bytes(stored)
            data = leaf_input(prev, index, time, kind, src, dst, amount, session, hold, key, memo)
            computed = sha(b"\x00" + data).digest()
            if (computed != stored or prev != last or index != expected
                    or data.count(31, 32) != (9 if memo else 8)):
                self._fail(row, expected, last, computed)
            if type(amount) is not int or amount < 0 or kind not in KINDS:
                self._fail(row, expected, last, computed)
            if kind == "mint":
                if src or hold:
                    self._fail(row, expected, last, computed)
                minted += amount
            else:
                if not src or not hold or (dst if kind == "hold" else src) != ESCROW:
                    self._fail(row, expected, last, computed)
                before = holds.get(hold, 0)
                net = before + amount if kind == "hold" else before - amount
                if net < 0:
                    if strict:
                        _fail_hold(index, kind, amount, hold, before)
                    lows = self.lows.setdefault(hold, [])
                    if not lows or net < lows[-1][1]:
                        lows.append((index, net, kind, amount))
                if net:
                    holds[hold] = net
                else:
                    del holds[hold]
                bal[src] = bal.get(src, 0) - amount
            append(stored)
            last = stored
            expected += 1
            bal[dst] = bal.get(dst, 0) + amount
        self.size = expected
        self.last = last
        self.minted = minted

    def _fail(self, row: Sequence[Any], expected: int, last: bytes, computed: bytes) -> None:
        index, time, kind, src, dst, amount, session, hold, key, prev, stored, memo = row
        prev, stored = bytes(prev), bytes(stored)
        ev: dict[str, Any] = {"index": index, "expected_index": expected}
        if index != expected:
            msg = (f"entry {expected} is missing: the entry at position {expected} carries index {index!r}, "
                   "so an entry was removed, repeated or renumbered here")
        elif prev != last:
            msg = (f"entry {index}: its prev hash {prev.hex()} is not the hash of entry {index - 1}, "
                   f"{last.hex()}: the chain is broken here")
            ev.update(prev=prev.hex(), expected_prev=last.hex())
        elif computed != stored:
            msg = (f"entry {index}: stored hash {stored.hex()} does not match its contents, which hash to "
                   f"{computed.hex()}: this entry was altered")
            ev.update(stored=stored.hex(), computed=computed.hex())
        elif type(amount) is not int or amount < 0:
            msg = f"entry {index}: amount {amount!r} is not a non-negative integer"
        elif kind not in KINDS or (not src and kind != "mint"):
            msg = f"entry {index}: kind {kind!r} with from {src!r} is not a valid movement"
        elif kind == "mint" and (src or hold):
            msg = f"entry {index}: a mint comes from no account and belongs to no hold, not from {src!r}, hold {hold!r}"
        elif kind != "mint" and (not hold or (dst if kind == "hold" else src) != ESCROW):
            side, party = ("to", dst) if kind == "hold" else ("from", src)
            msg = (f"entry {index}: a {kind} must name its hold and go {side} {ESCROW!r}, not {side} {party!r} "
                   f"with hold {hold!r}")
        else:
            msg = f"entry {index}: a field contains the separator byte 0x1f, so its encoding is ambiguous"
        ev["entry"] = {f: v for f, v in zip(FIELDS, (index, time, kind, src, dst, amount, session, hold, key))}
        if memo:
            ev["entry"]["memo"] = memo
        raise LedgerVerificationError(msg, index=expected, evidence=ev)

    def tree(self) -> MerkleTree:
        """Return the Merkle tree over the entries fed so far (from the levels hashed for the roots)."""
        self.roots(())
        return MerkleTree.from_levels(self.levels)

    def roots(self, sizes: Iterable[int]) -> dict[int, bytes]:
        """The Merkle roots of the ledger at ``sizes`` (each at most its size)."""
        if self.levels is None or len(self.levels[0]) != 32 * (self.size - self.start):
            self.levels = subtree_levels(b"".join(self.leaves))
        return roots_from_levels(self.levels, sizes)

    def finish(
        self,
        *,
        heads: Sequence[Mapping[str, Any]] = (),
        balances: Mapping[str, int] | None = None,
        public_key: str | None = None,
    ) -> dict[str, Any]:
        """Check the signed ``heads`` against the tree and stored ``balances`` against the entries.

        Returns a summary ``{"size", "root", "heads", "accounts", "minted"}``.
        """
        sizes = [h["size"] for h in heads if isinstance(h.get("size"), int) and 0 <= h["size"] <= self.size]
        roots = self.roots([*sizes, self.size])
        root = roots[self.size]
        for head in heads:
            verify_head(head, public_key)
            size = head["size"]
            if size > self.size:
                raise LedgerVerificationError(
                    f"a signed tree head covers {size} entries but the ledger holds only {self.size}: "
                    f"entries {self.size}..{size - 1} were removed",
                    index=self.size,
                    evidence={"head_size": size, "ledger_size": self.size},
                )
            computed = roots[size]
            if computed.hex() != head["root"]:
                # The chain is intact yet the root differs: the whole tail was recomputed. Without
                # earlier signed heads the first rewritten entry cannot be pinned (no index).
                raise LedgerVerificationError(
                    f"root hash at size {size} mismatched: computed {computed.hex()}, signed {head['root']}: "
                    "entries were rewritten after that head was signed",
                    index=None,
                    evidence={"size": size, "computed": computed.hex(), "expected": head["root"]},
                )
        if balances is not None:
            names = set(balances) | set(self.balances)
            for name in sorted(names):
                stored = balances.get(name, 0)
                summed = self.balances.get(name, 0)
                if stored != summed:
                    raise LedgerVerificationError(
                        f"account {name!r} has balance {stored} but its ledger entries sum to {summed}",
                        evidence={"account": name, "balance": stored, "entries_sum": summed},
                    )
        return {
            "size": self.size,
            "root": root.hex(),
            "heads": len(heads),
            "accounts": len(balances) if balances is not None else len(self.balances),
            "minted": self.minted,
        }


def _fail_hold(index: int, kind: str, amount: int, hold: str, left: int) -> NoReturn:
    """Raise: entry ``index`` pays ``amount`` out of ``hold``, which had only ``left`` in escrow."""
    raise LedgerVerificationError(
        f"entry {index}: a {kind} of {amount} out of hold {hold!r}, which has only {left} left in escrow "
        f"here: a hold never pays out more than was placed on it{'' if left else ' (or it was never placed)'}",
        index=index, evidence={"index": index, "expected_index": index, "hold": hold, "kind": kind,
                               "amount": amount, "left": left})


def stitch_holds(carry: dict[str, int], holds: Mapping[str, int],
                 lows: Mapping[str, Sequence[tuple[int, int, str, int]]]) -> None:
    """Add the holds of the next slice of a ledger (:attr:`LedgerChecker.holds`, ``lows``) to
    ``carry``, what every hold had in escrow before that slice; raise naming the first entry
    of the slice that takes a hold below zero."""
    worst: tuple[int, str, int, str, int] | None = None
    for hold, marks in lows.items():
        before = carry.get(hold, 0)
        for index, net, kind, amount in marks:
            if before + net < 0:
                if worst is None or index < worst[0]:
                    worst = (index, kind, amount, hold, before + net + amount)
                break
    if worst is not None:
        _fail_hold(*worst)
    for hold, net in holds.items():
        total = carry.get(hold, 0) + net
        if total:
            carry[hold] = total
        else:
            del carry[hold]


# -- receipts ---------------------------------------------------------------------------


def _entry_row_from_json(entry: Mapping[str, Any], position: int) -> tuple:
    missing = [f for f in (*FIELDS, "prev", "hash") if f not in entry]
    if missing:
        raise LedgerVerificationError(f"receipt entry #{position} lacks {', '.join(missing)}", index=entry.get("index"))
    return (
        entry["index"], entry["time"], entry["kind"], entry["from"], entry["to"], entry["amount"],
        entry["session"], entry["hold"], entry["key"],
        _hex32(entry["prev"], "entry prev"), _hex32(entry["hash"], "entry hash"),
        entry_memo_text(entry, f"receipt entry #{position}"),
    )


def verify_receipt(receipt: Mapping[str, Any], public_key: str | None = None) -> dict[str, Any]:
    """Check a session receipt offline: entry hashes, inclusion proofs, the signed head, the totals,
    and that no hold of the session pays out more than was placed on it.

    ``public_key`` (hex) pins the service's key; without it the key inside the
    receipt is used and its fingerprint returned so the reader can compare it.
    Returns a summary; raises :class:`LedgerVerificationError` naming the first bad entry.
    """
    if not isinstance(receipt, Mapping) or receipt.get("format") != RECEIPT_FORMAT:
        raise LedgerVerificationError(
            f"not a gpunet receipt: expected format {RECEIPT_FORMAT!r}, "
            f"got {receipt.get('format') if isinstance(receipt, Mapping) else type(receipt).__name__!r}"
        )
    head = receipt.get("head")
    session = receipt.get("session")
    entries = receipt.get("entries")
    if not isinstance(head, Mapping) or not isinstance(session, Mapping) or not isinstance(entries, list):
        raise LedgerVerificationError("receipt must hold a 'head' object, a 'session' object and an 'entries' list")
    verify_head(head, public_key)
    root = bytes.fromhex(head["root"])
    size = head["size"]
    sid = session.get("session")
    spent = held = 0
    holds: dict[str, int] = {}
    owner = session.get("account")
    last_index = -1
    for pos, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            raise LedgerVerificationError(f"receipt entry #{pos} is not an object")
        row = _entry_row_from_json(entry, pos)
        index, time, kind, src, dst, amount, esession, hold, key, prev, stored, memo = row
        if not isinstance(index, int) or not isinstance(amount, int) or isinstance(amount, bool):
            raise LedgerVerificationError(f"receipt entry #{pos}: index and amount must be integers", index=None)
        computed = entry_hash(prev, index, time, kind, src, dst, amount, esession, hold, key, memo)
        if computed != stored:
            raise LedgerVerificationError(
                f"entry {index}: stored hash {stored.hex()} does not match its contents, which hash to "
                f"{computed.hex()}: this entry was altered",
                index=index, evidence={"stored": stored.hex(), "computed": computed.hex()},
            )
        if esession != sid:
            raise LedgerVerificationError(
                f"entry {index} belongs to session {esession!r}, not to this receipt's session {sid!r}",
                index=index, evidence={"session": esession, "expected": sid},
            )
        if index <= last_index:
            raise LedgerVerificationError(
                f"receipt entries must be in ledger order without repeats: entry {index} follows {last_index}",
                index=index)
        last_index = index
        expected_party = {"hold": (src, owner), "release": (dst, owner), "settle": (src, ESCROW)}.get(kind)
        if expected_party is not None and expected_party[0] != expected_party[1]:
            raise LedgerVerificationError(
                f"entry {index}: a {kind} of session {sid} must involve {expected_party[1]!r}, "
                f"not {expected_party[0]!r}", index=index)
        proof = entry.get("proof")
        if not isinstance(proof, list):
            raise LedgerVerificationError(f"entry {index} has no inclusion proof", index=index)
        try:
            verify_inclusion(index, size, stored, [_hex32(p, "proof hash") for p in proof], root)
        except ProofError as exc:
            raise ProofError(f"entry {index}: inclusion proof fails: {exc}", index=index, evidence=exc.evidence) from exc
        if kind == "hold":
            holds[hold] = holds.get(hold, 0) + amount
            held += amount
        elif kind in ("settle", "release"):
            # Every hold of the session is in its receipt: a payout names one placed before it,
            # and a hold's payouts (a settlement, parts, a release) never exceed it.
            left = holds.get(hold, 0)
            if amount > left:
                _fail_hold(index, kind, amount, hold, left)
            holds[hold] = left - amount
            held -= amount
            if kind == "settle":
                spent += amount
        else:
            raise LedgerVerificationError(f"entry {index}: a {kind!r} entry does not belong in a session receipt",
                                          index=index)
    for field, value in (("spent", spent), ("held", held)):
        if session.get(field) != value:
            raise LedgerVerificationError(
                f"receipt says the session {field} {session.get(field)!r} but its entries add up to {value}",
                evidence={field: session.get(field), "entries_sum": value},
            )
    return {
        "session": sid,
        "entries": len(entries),
        "spent": spent,
        "held": held,
        "size": size,
        "root": head["root"],
        "key_id": key_id(bytes.fromhex(head["public_key"])),
    }
