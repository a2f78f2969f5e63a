"""``gpunet certs``: the operator's CA for an open network (:mod:`gpunet.certs`)."""

from __future__ import annotations

import argparse
from typing import Any

from gpunet import certs


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``certs init``, ``certs issue`` and ``certs revoke`` to the ``gpunet`` parser."""
    parser = subparsers.add_parser(
        "certs", help="the operator's certificate authority for an open network",
        description="An open network speaks Dask over mutual TLS with certificates from one CA, the operator's. "
                    "A certificate binds a role (scheduler, gateway, provider) and a name: a provider's is its "
                    "credit account, which its workers are paid to.",
    )
    verbs = parser.add_subparsers(dest="certs_command", metavar="VERB")
    verbs.required = True
    init = verbs.add_parser("init", help="make the operator's CA (ca.pem, ca-key.pem)")
    init.add_argument("--dir", default=None, help=f"where to keep it (default {certs.certs_dir()})")
    init.add_argument("--force", action="store_true", help="replace an existing CA (its certificates stop working)")
    init.set_defaults(func=_init)
    issue = verbs.add_parser("issue", help="issue a certificate for a scheduler, a gateway or a provider")
    issue.add_argument("--role", required=True, choices=certs.ROLES,
                       help="what the certificate lets its holder be on an open network")
    issue.add_argument("--name", required=True, metavar="NAME",
                       help="who it is for: a provider's credit account name, any name for the others")
    issue.add_argument("--host", action="append", default=[], metavar="HOST",
                       help="a host name or IP address clients reach it at (repeatable; for the gateway's HTTPS)")
    issue.add_argument("--dir", default=None, help=f"the CA's directory (default {certs.certs_dir()})")
    issue.set_defaults(func=_issue)
    revoke = verbs.add_parser("revoke", help="revoke a certificate: every party reading this CA refuses it",
                              description="Adds the serial number to revoked.txt beside ca.pem; the scheduler and "
                                          "the workers read it again whenever it changes. Copy it beside ca.pem "
                                          "wherever a party runs on another host.")
    revoke.add_argument("serial", metavar="SERIAL", help="the certificate's serial number (hex, as `gpunet certs "
                                                         "issue` prints it) or its PEM file")
    revoke.add_argument("--dir", default=None, help=f"the CA's directory (default {certs.certs_dir()})")
    revoke.set_defaults(func=_revoke)


def _init(args: Any) -> int:
    made = certs.init_ca(args.dir, force=args.force)
    print(f"CA certificate: {made.cert}", flush=True)
    print(f"CA key (keep it private, mode 600): {made.key}", flush=True)
    print("issue certificates with:  gpunet certs issue --role scheduler|gateway|provider --name NAME", flush=True)
    return 0


def _issue(args: Any) -> int:
    made = certs.issue(args.role, args.name, args.dir, hosts=tuple(args.host))
    print(f"certificate: {made.cert}", flush=True)
    print(f"key (mode 600; hand it only to {args.name}): {made.key}", flush=True)
    print(f"CA certificate: {made.ca}", flush=True)
    print(f"serial (to revoke it: gpunet certs revoke SERIAL): {certs.serial_of_file(made.cert)}", flush=True)
    return 0


def _revoke(args: Any) -> int:
    path = certs.revoke(args.serial, args.dir)
    print(f"revoked; the revocation list is {path} (copy it beside ca.pem on every host of the network)", flush=True)
    return 0
