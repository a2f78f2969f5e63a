"""``gpunet gateway``: an open network's HTTPS front door for notebooks (:mod:`gpunet.gateway`)."""

from __future__ import annotations

import argparse
from typing import Any

from gpunet import gateway
from gpunet.errors import OptionError


#: Each of the gateway's caps: its flag, the :class:`gpunet.gateway.GatewayLimits` field it
#: sets, and what it means.
LIMIT_FLAGS = [
    ("--max-body-bytes", "max_body_bytes", "the largest request body"),
    ("--max-job-bytes", "max_job_bytes", "the most bytes of a job's pickled inputs, items and function"),
    ("--submits-per-second", "submits_per_s", "jobs one account may send a second, after a burst"),
    ("--submit-burst", "submit_burst", "jobs one account may send at once"),
    ("--max-sessions", "max_sessions", "sessions one account may hold open"),
    ("--max-jobs-in-flight", "max_jobs_in_flight", "jobs one account may have sent and not yet read to their end"),
    ("--max-unread-bytes-per-job", "max_unread_bytes_per_job",
     "bytes of a job's events and held result its notebook may leave unread before it is dropped"),
    ("--max-unread-bytes", "max_unread_bytes", "bytes of job events all notebooks together may leave unread"),
    ("--slow-reader-seconds", "slow_reader_s",
     "a notebook that reads nothing of a job's waiting events for this long is dropped and its job stopped"),
    ("--max-connections-per-address", "max_connections_per_address",
     "connections one client address may hold open"),
    ("--headers-seconds", "headers_s", "how long a request's headers may take to arrive"),
    ("--body-seconds", "body_s", "how long a request's body may take to arrive after its headers"),
]


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``gateway`` to the ``gpunet`` parser."""
    parser = subparsers.add_parser(
        "gateway", help="an open network's HTTPS front door for notebooks (the only Dask client there)",
        description="Notebooks connect with `%%gpunet connect https://HOST:PORT --token-file FILE --ca ca.pem`; the "
                    "gateway checks their credit tokens with the credit service, holds credits for their jobs and "
                    "sends them to the workers with its gateway certificate. It never unpickles what a notebook "
                    "sends. It holds no operator token: each notebook's own token pays for its jobs.",
    )
    parser.add_argument("scheduler", metavar="SCHEDULER", help="the open network's scheduler, tls://HOST:PORT")
    parser.add_argument("--credits", required=True, metavar="URL", help="the credit service the scheduler meters with")
    parser.add_argument("--tls-ca-file", required=True, metavar="PATH", help="the operator's CA certificate (ca.pem)")
    parser.add_argument("--tls-cert", required=True, metavar="PATH",
                        help="the gateway certificate (gpunet certs issue --role gateway --name NAME --host HOST)")
    parser.add_argument("--tls-key", required=True, metavar="PATH", help="its key")
    parser.add_argument("--https-cert", default=None, metavar="PATH",
                        help="another certificate for HTTPS (one the operator gives it; default: --tls-cert)")
    parser.add_argument("--https-key", default=None, metavar="PATH", help="its key (with --https-cert)")
    parser.add_argument("--host", default="127.0.0.1", help="the address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8788, help="the port to listen on (default 8788; 0: any free)")
    limits = gateway.GatewayLimits()
    for flag, name, meaning in LIMIT_FLAGS:
        default = getattr(limits, name)
        whole = isinstance(default, int)
        parser.add_argument(flag, dest=name, type=type(default), default=default, metavar="N" if whole else "S",
                            help=f"{meaning} (default {default if whole else f'{default:g}'})")
    parser.set_defaults(func=_gateway)


def _gateway(args: Any) -> int:
    if (args.https_cert is None) != (args.https_key is None):
        raise OptionError("give both --https-cert and --https-key, or neither")
    for flag, name, _ in LIMIT_FLAGS:
        if not getattr(args, name) > 0:
            raise OptionError(f"{flag} must be above 0, got {getattr(args, name)}")
    limits = gateway.GatewayLimits(**{name: getattr(args, name) for _, name, _ in LIMIT_FLAGS})

    def ready(url: str) -> None:
        print(f"gateway: {url}", flush=True)
        print(f"notebooks connect with: %gpunet connect {url} --token-file FILE --ca {args.tls_ca_file}", flush=True)

    gateway.serve(args.scheduler, args.credits, ca_file=args.tls_ca_file, cert_file=args.tls_cert,
                  key_file=args.tls_key, host=args.host, port=args.port, https_cert=args.https_cert,
                  https_key=args.https_key, limits=limits, on_ready=ready)
    print("gpunet gateway: stopped", flush=True)
    return 0

