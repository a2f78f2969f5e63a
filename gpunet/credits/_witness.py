"""What a reader has seen of each ledger: the service's pinned key and every signed head.

A signed head only says what the operator's key signed. An operator who holds the key
can re-sign a rewritten history, or show two readers two different ledgers, and each
head checks out on its own. What catches it is memory, as RFC 9162's clients keep it:
every head a reader has seen is remembered, and each new one must extend the ones before
it, which a Merkle consistency proof shows (:func:`~gpunet.credits._merkle.verify_consistency`).
Two heads that cannot both be true (two roots at one size, a proof that fails, a ledger
shorter than a head seen before) are a fork: :class:`~gpunet.errors.LedgerForkError`,
with both signed heads as the evidence.

The memory lives in the data dir (:func:`gpunet.paths.data_dir`), under ``ledger/``:

``pins.json``
    ``{service address: {"public_key", "key_id", "pinned"}}``: the key each service
    signed with when this machine first met it (trust on first use). Another key for the
    same address is a :class:`~gpunet.errors.LedgerKeyError` naming both fingerprints.
``heads/PUBLIC_KEY.json``
    one ledger, named by its signing key (:class:`HeadLog`): the heads seen (one per
    size), the consistency proofs that link them (each verified before it was kept), and
    any fork found, kept as evidence.

A head is *linked* when verified proofs lead from it to the largest head (the *top*), each
proof from one head to the next larger one;
heads met offline (a receipt file) stay unlinked until a service or a full check of the
ledger links them. Heads at one size are compared even offline.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from gpunet.credits._ledger import key_id, verify_head
from gpunet.credits._merkle import verify_consistency
from gpunet.errors import LedgerForkError, LedgerKeyError, LedgerVerificationError, ProofError
from gpunet.paths import data_dir

logger = logging.getLogger(__name__)

HEADS_FORMAT = "gpunet-heads-v1"
#: The fields of a signed head (what is kept of one).
HEAD_FIELDS = ("size", "root", "timestamp", "signature", "public_key", "key_id")

#: ``proofs(first, second)`` returns the consistency proof between two sizes (raw hashes).
ProofSource = Callable[[int, int], Sequence[bytes]]


#: What a fork between two signed heads means, and what to do.
SIGNED_FORK = ("Both are signed with the ledger's key, so its operator rewrote the ledger's history or shows "
               "different readers different ledgers. Do not trust this service's receipts; keep both heads (gpunet "
               "keeps them in its ledger memory) as evidence and tell the network's users.")
#: What a head seen that the ledger's entries no longer match means.
REWRITTEN = ("The head is signed with the ledger's key and its entries now say otherwise: someone rewrote them (with "
             "write access to the database, or the operator). Do not trust this service's receipts; keep the head "
             "(gpunet keeps it in its ledger memory) as evidence and tell the network's users.")


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _short(root: str) -> str:
    return f"{root[:16]}…"


class HeadLog:
    """The heads of one ledger (one signing key) that a reader has seen, and the verified
    consistency proofs linking them. Every method that adds checks what it adds."""

    def __init__(self, public_key: str) -> None:
        self.public_key = public_key.lower()
        self.key_id = key_id(bytes.fromhex(self.public_key))
        self.heads: dict[int, dict[str, Any]] = {}
        self.links: dict[tuple[int, int], list[str]] = {}
        self.forks: list[dict[str, Any]] = []

    # -- reading and writing --

    @classmethod
    def from_json(cls, doc: Mapping[str, Any], *, source: str = "") -> HeadLog:
        """Rebuild a log from :meth:`to_json`'s form, checking every head's signature and every link."""
        where = f" in {source}" if source else ""
        if not isinstance(doc, Mapping) or doc.get("format") != HEADS_FORMAT:
            raise LedgerVerificationError(f"not a gpunet heads record{where}: expected format {HEADS_FORMAT!r}")
        log = cls(str(doc.get("public_key", "")))
        log.merge(doc, source=source)
        return log

    def merge(self, doc: Mapping[str, Any], *, source: str = "") -> None:
        """Add the heads and links of another record of the same ledger (checked as they come)."""
        for head in doc.get("heads", []):
            self.add_head(head, source=source)
        for link in doc.get("links", []):
            try:
                first, second, proof = int(link["first"]), int(link["second"]), link["proof"]
                hashes = [bytes.fromhex(p) for p in proof]
            except (KeyError, TypeError, ValueError) as exc:
                raise LedgerVerificationError(f"a link of the heads record{' in ' + source if source else ''} is "
                                              f"malformed ({exc!r}): {link!r:.200}") from None
            self.add_link(first, second, hashes, source=source)
        self.forks.extend(f for f in doc.get("forks", []) if f not in self.forks)

    def to_json(self, *, upto: int | None = None, since: int = 0) -> dict[str, Any]:
        """This log as JSON: ``{"format", "public_key", "key_id", "heads", "links", "forks"}``
        (only the heads of sizes ``since``..``upto`` and the links between them, when given)."""
        keep = [s for s in sorted(self.heads) if since <= s and (upto is None or s <= upto)]
        kept = set(keep)
        return {
            "format": HEADS_FORMAT,
            "public_key": self.public_key,
            "key_id": self.key_id,
            "heads": [self.heads[s] for s in keep],
            "links": [{"first": a, "second": b, "proof": p} for (a, b), p in sorted(self.links.items())
                      if a in kept and b in kept],
            "forks": list(self.forks),
        }

    # -- adding --

    def add_head(self, head: Mapping[str, Any], *, source: str = "") -> bool:
        """Add a signed head after checking its signature against this ledger's key and any head
        seen at its size; returns whether it was new. Raises :class:`LedgerForkError` for two
        roots at one size."""
        verify_head(head, self.public_key)
        size = head["size"]
        kept = {f: head[f] for f in HEAD_FIELDS if f in head}
        kept["key_id"] = self.key_id  # not signed: computed, never taken from the head
        if source:
            kept["seen_in"] = source
        known = self.heads.get(size)
        if known is None:
            self.heads[size] = kept
            return True
        if known["root"] != head["root"]:
            self.fork(f"two signed heads of the ledger with key {self.key_id} name different roots at the same "
                       f"size {size}: {known['root']} (signed {known['timestamp']}"
                       f"{', seen in ' + known['seen_in'] if known.get('seen_in') else ''}) and {head['root']} "
                       f"(signed {head['timestamp']}{', seen in ' + source if source else ''})", known, kept)
        return False

    def add_link(self, first: int, second: int, proof: Sequence[bytes], *, source: str = "") -> None:
        """Keep the consistency proof from the head at ``first`` to the one at ``second`` after
        verifying it against their roots; raises :class:`LedgerForkError` when it fails."""
        a, b = self.heads.get(first), self.heads.get(second)
        if a is None or b is None or first >= second:
            raise LedgerVerificationError(f"a consistency link from size {first} to {second} does not join two "
                                          f"heads of the record{' in ' + source if source else ''}")
        try:
            verify_consistency(first, second, bytes.fromhex(a["root"]), bytes.fromhex(b["root"]), proof)
        except ProofError as exc:
            self.fork(f"the signed head at size {second} (root {_short(b['root'])}, signed {b['timestamp']}) does "
                       f"not extend the head at size {first} (root {_short(a['root'])}, signed {a['timestamp']}) "
                       f"that was seen before: their consistency proof fails ({exc})", a, b)
        self.links[(first, second)] = [bytes(p).hex() for p in proof]

    def fork(self, what: str, earlier: Mapping[str, Any], later: Mapping[str, Any], why: str = SIGNED_FORK) -> None:
        """Keep two heads that cannot both be true as evidence, and raise :class:`LedgerForkError`."""
        evidence = {"key_id": self.key_id, "earlier": dict(earlier), "later": dict(later)}
        if evidence not in self.forks:
            self.forks.append(evidence)
        raise LedgerForkError(f"FORK: {what}. {why}", evidence=evidence)

    # -- reading --

    @property
    def top(self) -> dict[str, Any] | None:
        """The largest head seen, or None."""
        return self.heads[max(self.heads)] if self.heads else None

    def unlinked(self) -> list[int]:
        """The sizes of the heads that no chain of verified proofs leads from to the top."""
        if not self.heads:
            return []
        reach = {max(self.heads)}
        grew = True
        while grew:
            grew = False
            for a, b in self.links:
                if b in reach and a not in reach:
                    reach.add(a)
                    grew = True
        return sorted(set(self.heads) - reach)

    def link_all(self, proofs: ProofSource, *, source: str = "") -> int:
        """Link every unlinked head to the next larger head with proofs from ``proofs``, largest
        first, so that the heads form a chain (any run of them carries its own proofs); returns
        how many were linked."""
        sizes = sorted(self.heads)
        missing = self.unlinked()
        for size in reversed(missing):
            following = sizes[sizes.index(size) + 1]
            self.add_link(size, following, proofs(size, following), source=source)
        return len(missing)

    def check_roots(self, roots: Mapping[int, bytes], size: int, *, what: str, why: str = REWRITTEN) -> None:
        """Check every head seen against the roots of a ledger recomputed from its entries
        (``roots`` at every size seen up to ``size``, the ledger's length); ``why`` ends the error."""
        for s, head in sorted(self.heads.items()):
            seen = f"signed {head['timestamp']}{', seen in ' + head['seen_in'] if head.get('seen_in') else ''}"
            if s > size:
                self.fork(f"{what} holds {size} entries, but a head of it covering {s} entries was seen ({seen}): "
                           f"entries {size}..{s - 1} were removed", head, {"size": size}, why)
            if roots[s].hex() != head["root"]:
                self.fork(f"{what} hashes to root {roots[s].hex()} at size {s}, but a head seen of it says "
                           f"{head['root']} ({seen}): entries up to {s - 1} were rewritten after that head was "
                           "signed", head, {"size": s, "root": roots[s].hex()}, why)


class Witness:
    """The ledger memory in a folder (default: ``data_dir()/ledger``): pins and head logs."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root) if root is not None else data_dir() / "ledger"

    # -- files --

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the memory's lock (another notebook or command may be writing it)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a") as fh:
            try:
                import fcntl
            except ImportError:  # pragma: no cover - Windows: one writer at a time is assumed
                yield
                return
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _read(self, path: Path) -> Any:
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise LedgerVerificationError(f"the ledger memory file {path} cannot be read ({exc}); move it away "
                                          "to start that memory afresh (what it held is then forgotten)") from exc

    def _write(self, path: Path, doc: Any) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(doc, indent=1) + "\n")
        os.replace(tmp, path)

    def _log_path(self, public_key: str) -> Path:
        key = str(public_key).lower()
        if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
            raise LedgerVerificationError(f"a ledger's public key is 64 hex digits, got {key!r:.80}")
        return self.root / "heads" / f"{key}.json"

    # -- pins --

    def pins(self) -> dict[str, dict[str, Any]]:
        """Every pinned service: ``{address: {"public_key", "key_id", "pinned"}}``."""
        return self._read(self.root / "pins.json") or {}

    def check_pin(self, service: str, public_key: str) -> bool:
        """Raise :class:`LedgerKeyError` when ``service`` is pinned to another key than ``public_key``;
        returns whether it is pinned (to this key)."""
        public_key = public_key.lower()
        known = self.pins().get(service)
        if known is not None and known["public_key"] != public_key:
            new_id, old_id = key_id(bytes.fromhex(public_key)), known["key_id"]
            raise LedgerKeyError(
                f"the credit service {service} signs with key {new_id}, but on first contact ({known['pinned']}) "
                f"it signed with key {old_id}, which this machine pinned for it. Either someone else signed what "
                f"you are checking, or the operator changed the key. Ask the operator for the key's fingerprint "
                f"by another channel; only if it is {new_id}, run `gpunet ledger pin {service} {public_key}`",
                evidence={"service": service, "pinned": known["public_key"], "pinned_key_id": old_id,
                          "public_key": public_key, "key_id": new_id})
        return known is not None

    def pin(self, service: str, public_key: str, *, replace: bool = False) -> bool:
        """Pin ``service`` to ``public_key`` on first contact; returns True when pinned now.

        Raises :class:`LedgerKeyError` when another key is pinned for it (unless ``replace``).
        """
        public_key = public_key.lower()
        if not replace and self.check_pin(service, public_key):
            return False
        pins = self.pins()
        if pins.get(service, {}).get("public_key") == public_key:
            return False
        pins[service] = {"public_key": public_key, "key_id": key_id(bytes.fromhex(public_key)), "pinned": _now()}
        self._write(self.root / "pins.json", pins)
        return True

    # -- heads --

    def load(self, public_key: str) -> HeadLog:
        """The heads seen of the ledger signed by ``public_key`` (empty when none)."""
        doc = self._read(self._log_path(public_key))
        return HeadLog.from_json(doc, source="") if doc else HeadLog(public_key)

    def save(self, log: HeadLog) -> None:
        """Write a ledger's heads back."""
        self._write(self._log_path(log.public_key), log.to_json())

    def observe(self, head: Mapping[str, Any], *, service: str | None = None, proofs: ProofSource | None = None,
                latest: bool = False, source: str = "",
                also: Iterable[Mapping[str, Any]] = ()) -> dict[str, Any]:
        """Check a signed head against everything seen of its ledger, then remember it.

        ``service`` (its address) is pinned to the head's key on first contact and checked
        after. ``proofs`` fetches consistency proofs (a service); without it (offline) only heads
        at the same size are compared and the new head stays unlinked. ``latest``: the head is
        the service's newest, so it may not be shorter than a head seen before. ``also``: heads
        records (:meth:`HeadLog.to_json`) met with it, e.g. in a notebook, merged in first.
        Returns ``{"key_id", "pinned_now", "new", "heads", "linked", "unlinked"}``; a fork is
        remembered as evidence and raised.
        """
        verify_head(head)  # its form and its signature, before its key is pinned
        public_key = str(head["public_key"]).lower()
        with self.locked():
            pinned_now = self.pin(service, public_key) if service else False
            log = self.load(public_key)
            try:
                for doc in also:
                    if str(doc.get("public_key", "")).lower() == public_key:
                        log.merge(doc, source=source)
                top = log.top
                if latest and top is not None and top["size"] > head["size"]:
                    log.fork(f"the service now signs a ledger of {head['size']} entries, but it signed one of "
                              f"{top['size']} entries before ({top['timestamp']}): entries were removed",
                              top, dict(head))
                new = log.add_head(head, source=source)
                linked = log.link_all(proofs, source=source) if proofs is not None else 0
            finally:
                self.save(log)  # a fork's evidence is kept too
        return {"key_id": log.key_id, "pinned_now": pinned_now, "new": new, "heads": len(log.heads),
                "linked": linked, "unlinked": log.unlinked()}

    def remember(self, doc: Mapping[str, Any], *, source: str = "") -> HeadLog:
        """Merge a heads record (checked) into this machine's memory of its ledger; returns the log."""
        with self.locked():
            log = self.load(str(doc.get("public_key", "")))
            try:
                log.merge(doc, source=source)
            finally:
                self.save(log)
        return log

    def check_ledger(self, public_key: str, roots: Callable[[Iterable[int]], Mapping[int, bytes]], size: int,
                     *, what: str, proofs: ProofSource | None = None, why: str = REWRITTEN) -> int:
        """Check every head seen of this ledger against its recomputed roots (``roots(sizes)``) and
        link them with ``proofs``; returns how many heads were compared. Raises on a fork, its
        message ending with ``why``."""
        with self.locked():
            log = self.load(public_key)
            if not log.heads:
                return 0
            try:
                log.check_roots(roots([s for s in log.heads if s <= size]), size, what=what, why=why)
                if proofs is not None:
                    log.link_all(proofs)
            finally:
                self.save(log)
        return len(log.heads)


def one_key_per_service(heads: Iterable[tuple[str | None, str, str]]) -> None:
    """Refuse (:class:`LedgerKeyError`) heads of one service signed by two keys: ``heads`` are
    ``(service address or None, public key hex, source)``. A service has one signing key, so
    two are a forgery by someone holding the other (a fresh reader has no pin to tell which)."""
    seen: dict[str, tuple[str, str]] = {}
    for service, public_key, source in heads:
        if not service or not public_key:
            continue
        key = public_key.lower()
        first = seen.setdefault(service, (key, source))
        if first[0] != key:
            ids = [key_id(bytes.fromhex(k)) for k in (first[0], key)]
            raise LedgerKeyError(
                f"the heads of the credit service {service} are signed by two keys: {ids[0]} in {first[1]} and "
                f"{ids[1]} in {source}. One of them was not signed by that service; ask its operator for its key's "
                "fingerprint by another channel and pass it with --public-key (or `gpunet ledger pin`)",
                evidence={"service": service, "public_keys": [first[0], key], "sources": [first[1], source]})


def check_heads(records: Iterable[tuple[str, Mapping[str, Any]]], *,
                proofs: Callable[[str], ProofSource | None] | None = None) -> list[dict[str, Any]]:
    """Check heads gathered from several places for consistency; returns one summary per ledger.

    ``records`` are ``(source, heads record)`` pairs (:meth:`HeadLog.to_json` forms, or a
    single signed head). Heads are grouped by signing key: two roots at one size, or a link
    that fails, is a fork. ``proofs(public_key)`` may fetch missing consistency proofs; a
    head that stays unlinked to the largest is an error (its consistency cannot be told).
    """
    logs: dict[str, HeadLog] = {}
    for source, doc in records:
        if "format" not in doc and "signature" in doc:
            doc = {"format": HEADS_FORMAT, "public_key": doc.get("public_key", ""), "heads": [doc]}
        key = str(doc.get("public_key", "")).lower()
        if key not in logs:
            try:
                bytes.fromhex(key)
            except ValueError:
                raise LedgerVerificationError(f"the heads in {source} name no valid public key: {key!r:.80}") \
                    from None
            logs[key] = HeadLog(key)
        logs[key].merge(doc, source=source)
    out = []
    for key, log in logs.items():
        fetch = proofs(key) if proofs is not None else None
        if fetch is not None:
            log.link_all(fetch)
        missing = log.unlinked()
        if missing:
            top = log.top
            raise LedgerVerificationError(
                f"cannot tell whether the head(s) at size {', '.join(map(str, missing))} of the ledger with key "
                f"{log.key_id} are consistent with its largest head (size {top['size']}): no consistency proof "
                "links them. Pass --url with the service's address (and --token) to fetch the proofs",
                evidence={"key_id": log.key_id, "unlinked": missing})
        out.append({"key_id": log.key_id, "public_key": key, "heads": len(log.heads), "links": len(log.links),
                    "top": log.top["size"] if log.top else 0})
    return out
