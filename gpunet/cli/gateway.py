"""``gpunet gateway``: an open network's HTTPS front door for notebooks (:mod:`gpunet.gateway`)."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from gpunet import gateway
from gpunet.errors import OptionError


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
    parser.add_argument("--max-body-bytes", type=int, default=limits.max_body_bytes, metavar="N",
                        help=f"the largest request body (default {limits.max_body_bytes})")
    parser.add_argument("--max-job-bytes", type=int, default=limits.max_job_bytes, metavar="N",
                        help=f"the most bytes of a job's pickled inputs, items and function (default {limits.max_job_bytes})")
    parser.add_argument("--submits-per-second", type=float, default=limits.submits_per_s, metavar="R",
                        help=f"jobs one account may send a second, after a burst (default {limits.submits_per_s:g})")
    parser.add_argument("--submit-burst", type=int, default=limits.submit_burst, metavar="N",
                        help=f"jobs one account may send at once (default {limits.submit_burst})")
    parser.add_argument("--max-sessions", type=int, default=limits.max_sessions, metavar="N",
                        help=f"sessions one account may hold open (default {limits.max_sessions})")
    parser.set_defaults(func=_gateway)


def _gateway(args: Any) -> int:
    if (args.https_cert is None) != (args.https_key is None):
        raise OptionError("give both --https-cert and --https-key, or neither")
    limits = gateway.GatewayLimits(args.max_body_bytes, args.max_job_bytes, args.submit_burst,
                                   args.submits_per_second, args.max_sessions)
    for item in dataclasses.fields(limits):
        name, value = item.name, getattr(limits, item.name)
        if not value > 0:
            raise OptionError(f"--{name.replace('_', '-')} must be above 0, got {value}")

    def ready(url: str) -> None:
        print(f"gateway: {url}", flush=True)
        print(f"notebooks connect with: %gpunet connect {url} --token-file FILE --ca {args.tls_ca_file}", flush=True)

    gateway.serve(args.scheduler, args.credits, ca_file=args.tls_ca_file, cert_file=args.tls_cert,
                  key_file=args.tls_key, host=args.host, port=args.port, https_cert=args.https_cert,
                  https_key=args.https_key, limits=limits, on_ready=ready)
    print("gpunet gateway: stopped", flush=True)
    return 0

