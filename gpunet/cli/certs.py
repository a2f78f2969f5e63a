"""``gpunet certs``: the operator's CA for an open network (:mod:`gpunet.certs`)."""

from __future__ import annotations

import argparse
from typing import Any

from gpunet import certs


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``certs init`` and ``certs issue`` to the ``gpunet`` parser."""
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
    return 0
