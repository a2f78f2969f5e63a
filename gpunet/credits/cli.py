"""``gpunet credits ...`` and ``gpunet ledger ...`` (the credit service's verbs).

* ``gpunet credits serve [--db URL] [--host 127.0.0.1] [--port N] [--operator-token-file PATH]``
* ``gpunet credits account create NAME --role client|provider|operator [-o TOKEN_FILE] [--token-file OPERATOR_TOKEN_FILE]``
* ``gpunet credits mint ACCOUNT AMOUNT [--key K] [--token-file OPERATOR_TOKEN_FILE]``
* ``gpunet credits balance [ACCOUNT] [--token-file F]``
* ``gpunet credits receipt SESSION [--url URL] [--token T | --token-file F] [-o FILE]``
* ``gpunet credits providers [--credits URL] [--token T | --token-file F] [--json]``
* ``gpunet credits clear-quarantine PROVIDER [--credits URL] [--token-file OPERATOR_TOKEN_FILE] [--key K]``
* ``gpunet credits release-stale --older-than SECONDS [--dry-run] [--force] [--account A] [--credits URL]
  [--token-file OPERATOR_TOKEN_FILE] [--json]``
* ``gpunet ledger verify [--db URL | --url URL --token-file F | --receipt FILE | --heads FILE...] [--public-key HEX]``
* ``gpunet ledger pin [SERVICE PUBLIC_KEY]`` (list the pinned keys, or pin a service to a new one)

Every ``ledger verify`` remembers the heads it sees and pins each service's key on first
contact, in the data dir (see :mod:`gpunet.credits._witness`).

``--credits`` and ``--url`` are the same option. The same verbs run as
``python -m gpunet.credits serve|receipt|providers|clear-quarantine|release-stale|verify``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from gpunet.clitools import read_token_file, run_command, wait_for
from gpunet.credits._audit import verify_database, verify_service
from gpunet.credits._book import ROLES
from gpunet.credits._client import CreditClient
from gpunet.credits._db import beside_db, resolve_db_url
from gpunet.credits._ledger import key_id
from gpunet.credits._receipts import check_receipt, heads_records, proofs_from, read_documents
from gpunet.credits._witness import Witness, check_heads, one_key_per_service
from gpunet.errors import (
    ConflictError,
    CreditsUnavailableError,
    ForbiddenError,
    IdempotencyConflictError,
    InvalidRequestError,
    LedgerKeyError,
    LedgerVerificationError,
)
from gpunet.credits._process import PARENT_PID_ENV, TOKEN_FILE_PREFIX, URL_PREFIX, watch_parent
from gpunet.credits._trust import MISMATCHES_PER_CLIENT_DAY, REPUTATION_FLOOR
from gpunet.paths import write_private
from gpunet.ui.look import text_table

logger = logging.getLogger(__name__)


def _add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", help="database: an SQLite file path or URL, or postgresql://user@host/db "
                   "(default: credits.sqlite3 in the user's data dir)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 picks a free one)")
    p.add_argument("--operator-token-file", help="where the operator token is written on first start "
                   "(mode 600; default: beside the database)")
    p.add_argument("--key-file", help="the ed25519 signing key (created on first start; default: beside "
                   "the database)")
    p.add_argument("--reputation-floor", type=float, default=REPUTATION_FLOOR, metavar="R",
                   help=f"quarantine a provider whose reputation falls below R (default {REPUTATION_FLOOR}; 0 never "
                   "quarantines)")
    p.add_argument("--mismatches-per-client-day", type=int, default=MISMATCHES_PER_CLIENT_DAY, metavar="N",
                   help=f"count at most N mismatches from one client account against one provider a day (default "
                   f"{MISMATCHES_PER_CLIENT_DAY}: fewer than it takes to quarantine a clean record; -1: no limit)")
    p.add_argument("--rotate-operator-token", action="store_true",
                   help="issue a new operator token (the old one stops working) and write it to the token file")
    p.add_argument("--access-log", action="store_true", help="log every request")
    p.set_defaults(func=cmd_serve)


def _add_auth_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", "--credits", dest="url", metavar="URL", default=os.environ.get("GPUNET_CREDITS"),
                   help="the credit service (default: $GPUNET_CREDITS)")
    p.add_argument("--token-file", "--operator-token-file", dest="token_file", metavar="PATH",
                   help="read the bearer token from this file (operator verbs: the operator token file that "
                   "`gpunet credits serve` wrote; default: $GPUNET_TOKEN)")
    p.add_argument("--token", default=None, help="the bearer token itself (default: $GPUNET_TOKEN); prefer "
                   "--token-file: a token on a command line shows in `ps` and the shell's history")
    p.add_argument("--wait", type=float, default=SERVICE_WAIT_S, metavar="SECONDS",
                   help=f"wait this long for the service to answer, as it may be starting (default {SERVICE_WAIT_S:g})")


#: How long a verb waits for a credit service that does not answer yet (it may be starting).
SERVICE_WAIT_S = 30.0


def _add_account_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="account_command", metavar="SUBCOMMAND")
    sub.required = True
    create = sub.add_parser("create", help="create an account and write its token to a file (operator)",
                            description="Create an account on the credit service and write its token to a new "
                            "file of mode 600 (the token is never printed). Clients spend credits (mint them some "
                            "with `gpunet credits mint`), providers are paid for their workers' work.")
    _add_auth_args(create)
    create.add_argument("name", help="the account's name (letters, digits, . _ -)")
    create.add_argument("--role", choices=ROLES, required=True, help="client (a notebook that spends), provider "
                        "(paid for its workers' work), meter (a scheduler that may only pay and release holds) or "
                        "operator")
    create.add_argument("-o", "--output", metavar="PATH", help="write the token here, a new file of mode 600 "
                        "(default: NAME.token in the current folder)")
    create.set_defaults(func=cmd_account_create)
    revoke = sub.add_parser("revoke-token", help="revoke an account's token and write a new one to a file (operator)",
                            description="The account's token stops working at once (a gateway refuses it at the "
                            "next submission); a new token is written to a new file of mode 600 (never printed). "
                            "Revoking the token this command uses (the operator's own) replaces it in the file it "
                            "was read from: --token-file, or the operator token file beside the default database.")
    _add_auth_args(revoke)
    revoke.add_argument("name", help="the account whose token to revoke")
    revoke.add_argument("-o", "--output", metavar="PATH", help="write the new token here, a new file of mode 600 "
                        "(default: NAME.token in the current folder; for the account whose token this command "
                        "uses, the file it read it from, replaced)")
    revoke.set_defaults(func=cmd_account_revoke_token)


def _add_mint_args(p: argparse.ArgumentParser) -> None:
    _add_auth_args(p)
    p.add_argument("account", help="the account to credit")
    p.add_argument("amount", type=int, help="whole credits to create")
    p.add_argument("--key", help="idempotency key: the same key mints once (default: a fresh one)")
    p.set_defaults(func=cmd_mint)


def _add_balance_args(p: argparse.ArgumentParser) -> None:
    _add_auth_args(p)
    p.add_argument("account", nargs="?", help="whose balance (default: the token's own account)")
    p.set_defaults(func=cmd_balance)


def _add_verify_args(p: argparse.ArgumentParser) -> None:
    _add_auth_args(p)
    p.add_argument("--db", help="verify this database directly (SQLite file or URL) instead of a service")
    p.add_argument("--service-memory", metavar="DIR", help="with --db: the folder of heads the service signed, "
                   "kept beside its signing key (KEY_FILE.heads; found beside an SQLite database by default); a "
                   "database cut back to an earlier head is caught against it")
    p.add_argument("--receipt", metavar="FILE", help="verify a receipt offline: a JSON file from `gpunet credits "
                   "receipt`, or a notebook with %%gpunet receipt outputs (with a token, consistency proofs are "
                   "fetched from --url)")
    p.add_argument("--heads", nargs="+", metavar="FILE", help="check heads gathered from notebooks, receipts or "
                   "heads files for consistency (a fork fails); with a token, missing proofs come from --url")
    p.add_argument("--service", help="the address a receipt comes from, when it names none (its key is pinned "
                   "for it)")
    p.add_argument("--public-key", help="the service's ed25519 public key (hex) to pin")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_verify)


def _add_pin_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("service", nargs="?", help="the service's address, as receipts and --url name it")
    p.add_argument("public_key", nargs="?", help="its new ed25519 public key (64 hex digits)")
    p.set_defaults(func=cmd_pin)


def _add_receipt_args(p: argparse.ArgumentParser) -> None:
    _add_auth_args(p)
    p.add_argument("session", help="the session id")
    p.add_argument("-o", "--output", help="write the receipt here (default: stdout)")
    p.set_defaults(func=cmd_receipt)


def _add_providers_args(p: argparse.ArgumentParser) -> None:
    _add_auth_args(p)
    p.add_argument("--json", action="store_true", help="print the records as JSON")
    p.set_defaults(func=cmd_providers)


def _add_clear_quarantine_args(p: argparse.ArgumentParser) -> None:
    _add_auth_args(p)
    p.add_argument("provider", help="the provider account")
    p.add_argument("--key", help="idempotency key (default: a fresh one)")
    p.add_argument("--json", action="store_true", help="print the new record as JSON")
    p.set_defaults(func=cmd_clear_quarantine)


STALE_MIN_SECONDS = 60
STALE_WARNING = (
    "Releasing a hold gives what is left of it back to its client at once: if the task it covers is still "
    "running, that task will NOT be paid when it finishes (its scheduler's settlement is refused, the hold "
    "being closed). Choose --older-than longer than your longest task, e.g. 86400 (a day)."
)


def _seconds(text: str) -> int:
    """``argparse`` type: a whole number of seconds, 0 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number of seconds, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more seconds, got {value}")
    return value


def _add_release_stale_args(p: argparse.ArgumentParser) -> None:
    p.description = ("Release the holds still open that were placed at least --older-than seconds ago: holds "
                     "whose scheduler died before it settled or released them (its queue of reports lives in "
                     "memory). Each is released through the operator's release with the key "
                     "release-stale-HOLD, giving back what is left of it (a hold paid in parts keeps what it "
                     "paid and ends settled). " + STALE_WARNING)
    _add_auth_args(p)
    p.add_argument("--older-than", type=_seconds, required=True, metavar="SECONDS",
                   help="only holds placed at least SECONDS ago; longer than your longest task (e.g. 86400, "
                   f"a day); below {STALE_MIN_SECONDS} needs --force")
    p.add_argument("--account", help="only the holds of this client account")
    p.add_argument("--dry-run", action="store_true", help="list the holds and what would be released; move nothing")
    p.add_argument("--force", action="store_true", help=f"allow --older-than below {STALE_MIN_SECONDS} seconds")
    p.add_argument("--json", action="store_true", help="print the holds and the releases as JSON")
    p.set_defaults(func=cmd_release_stale)


def _add_credit_verbs(sub: argparse._SubParsersAction) -> None:
    """The verbs ``gpunet credits`` and ``python -m gpunet.credits`` share."""
    _add_serve_args(sub.add_parser("serve", help="run the credit service (HTTP JSON)"))
    _add_account_args(sub.add_parser("account", help="accounts and their tokens (operator)"))
    _add_mint_args(sub.add_parser("mint", help="create credits in an account (operator)"))
    _add_balance_args(sub.add_parser("balance", help="an account's balance"))
    _add_receipt_args(sub.add_parser("receipt", help="fetch a session's verifiable receipt"))
    _add_providers_args(sub.add_parser("providers", help="providers' trust records: reputation, quarantine"))
    _add_clear_quarantine_args(sub.add_parser("clear-quarantine", help="let a quarantined provider work again "
                                              "(operator)"))
    _add_release_stale_args(sub.add_parser("release-stale", help="release holds left open by a scheduler "
                                           "that died (operator)"))


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add the credit service's verbs to the ``gpunet`` parser."""
    credits = subparsers.add_parser("credits", help="the credit service")
    sub = credits.add_subparsers(dest="credits_command", metavar="SUBCOMMAND")
    sub.required = True
    _add_credit_verbs(sub)
    ledger = subparsers.add_parser("ledger", help="the credit ledger")
    lsub = ledger.add_subparsers(dest="ledger_command", metavar="SUBCOMMAND")
    lsub.required = True
    _add_verify_args(lsub.add_parser("verify", help="check chain, Merkle tree, signatures and balances"))
    _add_pin_args(lsub.add_parser("pin", help="list the services' pinned keys, or pin one to a new key"))


def _token(args: argparse.Namespace) -> str:
    if args.token_file:
        return read_token_file(args.token_file)
    token = args.token or os.environ.get("GPUNET_TOKEN")
    if not token:
        raise InvalidRequestError("no token: pass --token, --token-file (operator verbs: the operator token file "
                                  "that `gpunet credits serve` printed) or set GPUNET_TOKEN")
    return token


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the credit service in the foreground; prints its URL and the operator token file."""
    from gpunet.credits._service import serve  # Starlette, uvicorn, SQLAlchemy: loaded only to serve

    if not 0 <= args.reputation_floor <= 1:
        print(f"gpunet credits serve: --reputation-floor must be between 0 and 1, got {args.reputation_floor}",
              file=sys.stderr)
        return 2

    if os.environ.get(PARENT_PID_ENV, "").isdigit():  # started by serve_in_background: never outlive it
        watch_parent(int(os.environ[PARENT_PID_ENV]))

    def ready(url: str, token_file: object) -> None:
        print(f"{URL_PREFIX}{url}", flush=True)
        print(f"{TOKEN_FILE_PREFIX}{token_file}", flush=True)

    serve(args.db, args.host, args.port, operator_token_file=args.operator_token_file, key_file=args.key_file,
          rotate_operator_token=args.rotate_operator_token, access_log=args.access_log, on_ready=ready,
          reputation_floor=args.reputation_floor, mismatches_per_client_day=args.mismatches_per_client_day)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Verify a receipt, heads, a database or a running service; exit 0 when everything checks out."""
    t0 = time.perf_counter()
    witness = Witness()
    if args.receipt:
        return _verify_receipts(args, witness, t0)
    if args.heads:
        return _verify_heads(args, witness, t0)
    if args.db or not args.url:
        summary = verify_database(args.db, public_key=args.public_key, witness=witness,
                                  service_memory=args.service_memory)
        what = f"ledger in {args.db or 'the default database'}"
    else:
        summary = verify_service(args.url, _token(args), public_key=args.public_key, witness=witness)
        what = f"ledger at {args.url}"
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"OK {what}: {summary['size']} entries, chain and hashes intact, root {summary['root']}, "
          f"{summary['heads']} signed head(s) verified, the newest covering every entry, {summary['accounts']} "
          f"account balances "
          f"{'match their entries' if summary.get('balances_checked', True) else 'not compared (ledger grew)'}"
          f" ({summary['seconds']} s)")
    if "key_id" in summary:
        print(_memory_line(summary, summary["seen_heads"], []))
    if summary.get("service_heads"):
        print(f"   consistent with the {summary['service_heads']} head(s) its service kept beside its key")
    return 0


def _memory_line(summary: dict[str, Any], seen: int, unlinked: list[int]) -> str:
    """What the check against this machine's ledger memory found, in words."""
    service = summary.get("service")
    if summary.get("pinned_now"):
        pin = (f"first contact with {service}: pinned its key, fingerprint {summary['key_id']}; compare it with the "
               "fingerprint its operator publishes")
    elif service:
        pin = f"key {summary['key_id']} is the one pinned for {service}"
    else:
        pin = f"key {summary['key_id']} (no service named, so no pin compared; --service names one)"
    agree = (f"consistent with the {seen - 1} head(s) seen of this ledger before" if seen > 1
             else "the first head seen of this ledger")
    if unlinked:
        agree += (f"; {len(unlinked)} of them at other sizes not yet proven consistent (offline): pass --url and a "
                  "token to fetch the proofs")
    return f"   {pin}; {agree}"


def _online_proofs(args: argparse.Namespace) -> Any:
    """Consistency proofs from ``--url`` where a token is at hand, else None (offline)."""
    if not args.url or not (args.token or args.token_file or os.environ.get("GPUNET_TOKEN")):
        return None
    return proofs_from(CreditClient(args.url, _token(args)))


def _verify_receipts(args: argparse.Namespace, witness: Witness, t0: float) -> int:
    items = [it for it in read_documents(args.receipt) if it["receipt"] is not None]
    if not items:
        raise LedgerVerificationError(f"{args.receipt} holds no receipt: run %gpunet receipt in the notebook, or "
                                      "`gpunet credits receipt SESSION -o FILE`")
    proofs = _online_proofs(args)
    summaries = []
    for it in items:
        summary = check_receipt(it["receipt"], witness=witness, service=args.service or it["service"],
                                public_key=args.public_key, proofs=proofs,
                                also=[it["ledger"]] if it["ledger"] else [], source=it["source"])
        summary["key_id"] = key_id(bytes.fromhex(summary["public_key"]))
        summary["seconds"] = round(time.perf_counter() - t0, 3)
        summaries.append(summary)
        if not args.json:
            print(f"OK receipt {it['source']}: session {summary['session']}, {summary['entries']} entries, spent "
                  f"{summary['spent']}, held {summary['held']}; all included in the tree of {summary['size']} "
                  f"entries with root {summary['root']} signed by key {summary['key_id']} ({summary['seconds']} s)")
            print(_memory_line(summary, summary["seen_heads"], summary["unlinked"]))
    if args.json:
        print(json.dumps(summaries[0] if len(summaries) == 1 else summaries, indent=2))
    return 0


def _verify_heads(args: argparse.Namespace, witness: Witness, t0: float) -> int:
    items = [it for path in args.heads for it in read_documents(path)]
    records = heads_records(items)
    if not records:
        raise LedgerVerificationError(f"no signed heads in {', '.join(args.heads)}")
    named = []
    for it in items:  # each service's key against its pin, and against the other files' heads
        head = it["head"] or (it["receipt"] or {}).get("head") or {}
        service = args.service or it["service"]
        named.append((service, str(head.get("public_key", "")), it["source"]))
        if args.public_key and head.get("public_key", "").lower() != args.public_key.lower():
            raise LedgerKeyError(f"{it['source']} is signed by key {head.get('key_id')}, not the --public-key given",
                                 evidence={"public_key": head.get("public_key"), "expected": args.public_key})
    one_key_per_service(named)
    for service, public_key, _ in named:
        if service and public_key:
            witness.check_pin(service, public_key)
    keys = {str(doc.get("public_key", "")).lower() for _, doc in records}
    local = []
    for log in (witness.load(k) for k in sorted(keys)):
        if log.heads and not log.unlinked():  # what this machine has proven of that ledger
            local.append(("this machine's ledger memory", log.to_json()))
    client = None
    if _online_proofs(args) is not None:
        client = CreditClient(args.url, _token(args))
        service_key = client.health().get("public_key")
    ledgers = check_heads([*local, *records], proofs=lambda key: proofs_from(client)
                          if client is not None and key == service_key else None)
    for source, doc in records:
        witness.remember(doc, source=source)
    seconds = round(time.perf_counter() - t0, 3)
    if args.json:
        print(json.dumps({"ledgers": ledgers, "files": args.heads, "seconds": seconds}, indent=2))
        return 0
    for led in ledgers:
        print(f"OK heads: {led['heads']} signed head(s) of the ledger with key {led['key_id']} from "
              f"{len(args.heads)} file(s) and this machine's memory agree: {led['links']} consistency proof(s) "
              f"link them to the largest, of {led['top']} entries ({seconds} s)")
    return 0


def cmd_pin(args: argparse.Namespace) -> int:
    """List the pinned keys, or pin a service to a new key (after checking its fingerprint with the operator)."""
    witness = Witness()
    if args.service is None:
        pins = witness.pins()
        if not pins:
            print("no service pinned yet: the first receipt or `ledger verify` of a service pins its key")
        for service, pin in sorted(pins.items()):
            print(f"{service}  key {pin['key_id']}  pinned {pin['pinned']}  {pin['public_key']}")
        return 0
    if args.public_key is None:
        raise InvalidRequestError("gpunet ledger pin SERVICE PUBLIC_KEY: give the new key (64 hex digits) too")
    try:
        if len(bytes.fromhex(args.public_key)) != 32:
            raise ValueError
    except ValueError:
        raise InvalidRequestError(f"a public key is 64 hex digits (32 bytes), got {args.public_key!r:.80}") from None
    old = witness.pins().get(args.service)
    witness.pin(args.service, args.public_key, replace=True)
    was = f"(was {old['key_id']}) " if old else ""
    print(f"pinned {args.service} to key {key_id(bytes.fromhex(args.public_key))} {was}; the heads seen of its "
          "ledgers stay remembered, and new heads must still agree with them")
    return 0


def cmd_receipt(args: argparse.Namespace) -> int:
    """Fetch a session's receipt (JSON) to a file or stdout."""
    doc = _client(args).receipt(args.session)
    text = json.dumps(doc, indent=2)
    if args.output:
        with open(args.output, "w") as fh:
            fh.write(text + "\n")
        print(f"wrote the receipt of {args.session} ({len(doc['entries'])} entries) to {args.output}")
    else:
        print(text)
    return 0


def _client(args: argparse.Namespace) -> Any:
    """A client of the service named by the verb's options, once the service answers
    (up to ``--wait`` seconds: it may have been started a moment ago)."""
    if not args.url:
        raise InvalidRequestError("no service: pass --credits URL (or --url) or set GPUNET_CREDITS")
    wait_for_service(args.url, args.wait)
    return CreditClient(args.url, _token(args))


def wait_for_service(url: str, timeout: float) -> None:
    """Return once the credit service at ``url`` answers its health check; raise
    :class:`CreditsUnavailableError` naming it after ``timeout`` seconds."""
    probe = CreditClient(url, "", timeout=2.0, retries=0)

    def answers() -> bool:
        try:
            return bool(probe.health().get("ok"))
        except CreditsUnavailableError:
            return False

    try:
        if not wait_for(answers, timeout):
            raise CreditsUnavailableError(f"no credit service answers at {url} (waited {timeout:g} s): start one "
                                          "with `gpunet credits serve`, or check --credits", url=url)
    finally:
        probe.close()


def cmd_account_create(args: argparse.Namespace) -> int:
    """Create an account and write its token to a new file of mode 600 (never printed)."""
    target = _new_token_file(args)
    created = _client(args).create_account(args.name, args.role)
    write_private(target, created["token"].encode() + b"\n")
    hint = {"client": f"; give it credits with `gpunet credits mint {args.name} AMOUNT`",
            "provider": f"; its workers join with `gpunet provide SCHEDULER --credits {args.url} --token-file "
                        f"{target}`",
            "meter": f"; a scheduler reports with it: `gpunet scheduler --credits {args.url} --meter-token-file "
                     f"{target} ...`"}.get(args.role, "")
    print(f"created the {args.role} account {args.name}; its token is in {target} (mode 600){hint}")
    return 0


def cmd_account_revoke_token(args: argparse.Namespace) -> int:
    """Revoke an account's token and write its new one to a file of mode 600 (never printed):
    one's own (the operator revoking the operator token) replaces, at once, the file it was
    read from (:func:`_own_token_file`); any other account's goes to a new file (-o, or NAME.token)."""
    client = _client(args)
    own = client.ping()["account"] == args.name
    replaced = _own_token_file(args) if own and not args.output else None
    target = replaced or _new_token_file(args)
    folder = next(place for place in (target.parent, *target.parent.parents) if place.exists())
    if not (folder.is_dir() and os.access(folder, os.W_OK)):  # before the token changes: nobody would have it
        raise InvalidRequestError(f"cannot write the new token to {target}: {folder} is not a folder this user may "
                                  "write to; nothing was revoked. Choose another file with -o")
    token = client.revoke_token(args.name)["token"]
    try:
        write_private(target, token.encode() + b"\n")
    except OSError as exc:
        raise InvalidRequestError(
            f"the token of {args.name} was revoked, but its new token could not be written to {target} "
            f"({exc.strerror}); nobody has it: revoke it again with an operator token"
            + (" (or restart `gpunet credits serve` with --rotate-operator-token)" if own else "")) from None
    if replaced is not None:
        print(f"revoked the token of {args.name}; its new token replaced the old one in {target} (mode 600)")
        return 0
    print(f"revoked the token of {args.name}; its new token is in {target} (mode 600)")
    if own and args.token_file:
        print(f"note: {args.token_file}, which this command read the token from, still holds the revoked one",
              file=sys.stderr)
    return 0


def _own_token_file(args: argparse.Namespace) -> Path | None:
    """Where the token a verb authenticated with is read from, to replace it with the account's
    new token: ``--token-file``; else, for a token from --token or ``GPUNET_TOKEN``, the operator
    token file beside the default database (where `gpunet credits serve` writes it) when it
    holds that very token. None when no file holds it."""
    if args.token_file:
        return Path(args.token_file).expanduser()
    default = beside_db(resolve_db_url(None), ".operator-token")
    try:
        held = default.read_text().strip()
    except OSError:
        return None
    return default if held and held == _token(args) else None


def _new_token_file(args: argparse.Namespace) -> Path:
    """Where a verb writes an account's token: -o, or NAME.token; it must not exist yet."""
    target = Path(args.output or f"{args.name}.token").expanduser()
    if target.exists():  # before the token changes: a refused file must not leave a token nobody has
        raise InvalidRequestError(f"{target} exists already; choose another file with -o, or delete it")
    return target


def cmd_mint(args: argparse.Namespace) -> int:
    """Mint credits into an account (operator) and print its new balance."""
    client = _client(args)
    client.mint(args.account, args.amount, key=args.key or f"mint-{args.account}-{uuid.uuid4().hex}")
    print(f"minted {args.amount} credits into {args.account}; its balance is {client.balance(args.account)}")
    return 0


def cmd_balance(args: argparse.Namespace) -> int:
    """Print an account's balance (the token's own account by default)."""
    client = _client(args)
    account = args.account or client.ping()["account"]
    print(f"{account}: {client.balance(account)} credits")
    return 0


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]], left: int = 1) -> str:
    """Return a text table: the first ``left`` columns flush left, the others flush right but the
    last (free text)."""
    return "\n".join(text_table(header, rows, indent="", right=range(left, len(header) - 1)))


def format_records(records: list[dict[str, Any]]) -> str:
    """Return providers' trust records as a text table, one provider a line."""
    header = ("provider", "reputation", "consecutive valid", "valid", "mismatches", "quarantined")
    rows = [(r["provider"], f"{r['reputation']:.3f}", str(r["consecutive_valid"]), str(r["valid"]),
             str(r["mismatches"]), f"yes: {r['quarantine_reason']}" if r["quarantined"] else "no")
            for r in records]
    return _table(header, rows)


def format_age(seconds: float) -> str:
    """Return a duration in seconds the way people read it: ``42s``, ``5m 03s``, ``2h 05m``, ``3d 04h``."""
    s = int(seconds)
    for unit, size, sub, sub_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60), ("m", 60, "s", 1)):
        if s >= size:
            return f"{s // size}{unit} {s % size // sub_size:02d}{sub}"
    return f"{s}s"


def format_holds(holds: list[dict[str, Any]]) -> str:
    """Return open holds (as :meth:`CreditClient.holds` returns them) as a text table, one hold a line."""
    header = ("hold", "session", "account", "amount", "paid", "left", "age", "placed")
    rows = [(h["hold"], h["session"], h["account"], str(h["amount"]), str(h["paid"]), str(h["left"]),
             format_age(h["age"]), h["created"]) for h in holds]
    return _table(header, rows, left=3)


def cmd_providers(args: argparse.Namespace) -> int:
    """Print every provider's trust record: reputation, valid results, mismatches, quarantine."""
    records = _client(args).provider_records()
    if args.json:
        print(json.dumps(records, indent=2))
    elif not records:
        print("no provider accounts yet")
    else:
        print(format_records(records))
    return 0


def cmd_clear_quarantine(args: argparse.Namespace) -> int:
    """Clear a provider's quarantine (operator token) and print its new record."""
    key = args.key or f"clear-quarantine-{args.provider}-{uuid.uuid4().hex}"
    record = _client(args).clear_quarantine(args.provider, key=key)
    if args.json:
        print(json.dumps(record, indent=2))
    else:
        print(f"cleared the quarantine of {args.provider}; its mismatches are forgiven:")
        print(format_records([record]))
    return 0


def cmd_release_stale(args: argparse.Namespace) -> int:
    """List the open holds placed at least ``--older-than`` seconds ago and, unless ``--dry-run``,
    release each (operator token; idempotency key ``release-stale-HOLD``); print each and the total."""
    if args.older_than < STALE_MIN_SECONDS and not args.force:
        print(f"gpunet credits release-stale: --older-than {args.older_than} is below {STALE_MIN_SECONDS} "
              "seconds: a hold that young most likely covers a task still running, which would then not be "
              "paid when it finishes. Choose longer than your longest task (e.g. --older-than 86400, a day), "
              "or add --force if you know no such task runs.", file=sys.stderr)
        return 2
    client = _client(args)
    try:
        holds = client.holds(older_than=args.older_than, account=args.account)
    except ForbiddenError as exc:
        raise ForbiddenError(f"{exc}. Releasing holds needs the operator: pass --token-file with the operator "
                             "token file that `gpunet credits serve` wrote", status=exc.status, code=exc.code,
                             url=exc.url, details=exc.details) from exc
    which = f"{f' of {args.account}' if args.account else ''} placed {args.older_than} s or more ago"
    report: dict[str, Any] = {"older_than": args.older_than, "account": args.account, "dry_run": args.dry_run,
                              "holds": holds, "released": [], "skipped": [], "total": 0}
    if not holds:
        print(json.dumps(report, indent=2) if args.json else f"no open holds{which}; nothing to release")
        return 0
    print(f"warning: {STALE_WARNING}", file=sys.stderr)
    if not args.json:
        print(f"{len(holds)} open hold(s){which}:")
        print(format_holds(holds))
    if args.dry_run:
        report["total"] = sum(h["left"] for h in holds)
        print(json.dumps(report, indent=2) if args.json else
              f"dry run: would release {report['total']} credit(s) of {len(holds)} hold(s); nothing was moved")
        return 0
    for h in holds:
        try:
            done = client.release(h["hold"], key=f"release-stale-{h['hold']}")
        except IdempotencyConflictError:
            raise
        except ConflictError as exc:  # closed since it was listed: its scheduler settled or released it
            report["skipped"].append({"hold": h["hold"], "state": exc.details.get("state"), "reason": str(exc)})
            if not args.json:
                print(f"skipped hold {h['hold']}: it was {exc.details.get('state', 'closed')} meanwhile")
            continue
        report["released"].append(done)
        report["total"] += done["released"]
        if not args.json:
            paid = (f"; the {done['total_paid']} it paid in parts stay paid (it ends settled)"
                    if done["total_paid"] else "")
            print(f"released {done['released']} credit(s) of hold {h['hold']} (session {h['session']}) back to "
                  f"{h['account']}{paid}")
    print(json.dumps(report, indent=2) if args.json else
          f"released {report['total']} credit(s) of {len(report['released'])} hold(s) in total")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m gpunet.credits`` (the credit verbs, and ``verify``)."""
    parser = argparse.ArgumentParser(prog="python -m gpunet.credits", description="gpunet's credit service")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_credit_verbs(sub)
    _add_verify_args(sub.add_parser("verify", help="verify a ledger or a receipt"))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m gpunet.credits``; returns the exit code."""
    return run_command(build_parser(), argv)
