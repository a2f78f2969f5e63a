"""Credits, escrow and the verifiable ledger.

* :class:`CreditClient` — the Python client (``requests``) of the credit service.
* ``gpunet credits serve`` / :func:`serve_in_background` — the service itself
  (Starlette on uvicorn; SQLite or PostgreSQL through SQLAlchemy Core).
* :func:`verify_receipt`, :func:`verify_database`, :func:`verify_service` — checks
  anyone can run; the Merkle functions follow RFC 6962 / RFC 9162.
* :class:`Witness` — what this machine has seen of each ledger (in the data dir): the
  key pinned for each service on first contact, and every signed head, each new one
  checked against the others by consistency proofs; a fork is :class:`LedgerForkError`,
  another key :class:`LedgerKeyError`.
* One hold may be paid out in parts (``settle_part``) to several providers as the
  tasks it covers finish, then closed by ``release`` or ``settle``.
* Holds left open by a scheduler that died are listed by :meth:`CreditClient.holds`
  and released by ``gpunet credits release-stale --older-than SECONDS``.
* Settlements may carry a memo (how the work was verified) that the ledger hashes;
  providers have trust records (verified results, reputation, quarantine) kept by
  the service, see :mod:`gpunet.credits._trust`.

Amounts are integers: a credit is the indivisible unit (price work in whole
credits). ``import gpunet.credits`` stays light: the server side (Starlette,
uvicorn, SQLAlchemy) loads only when used.
"""

from __future__ import annotations

import typing as _typing

from gpunet.credits._client import CreditClient
from gpunet.errors import (
    AuthError,
    BudgetExceededError,
    ConflictError,
    CreditsError,
    CreditsRequestError,
    CreditsUnavailableError,
    ForbiddenError,
    IdempotencyConflictError,
    InvalidRequestError,
    LedgerForkError,
    LedgerKeyError,
    LedgerVerificationError,
    NotFoundError,
    ProofError,
)
from gpunet.credits._ledger import verify_head, verify_receipt
from gpunet.credits._witness import Witness
from gpunet.credits._merkle import MerkleTree, leaf_hash, node_hash, verify_consistency, verify_inclusion

if _typing.TYPE_CHECKING:  # pragma: no cover
    from gpunet.credits._process import CreditServiceProcess, serve_in_background
    from gpunet.credits._service import serve
    from gpunet.credits._audit import verify_database, verify_service

__all__ = [
    "AuthError",
    "BudgetExceededError",
    "ConflictError",
    "CreditClient",
    "CreditServiceProcess",
    "CreditsError",
    "CreditsRequestError",
    "CreditsUnavailableError",
    "ForbiddenError",
    "IdempotencyConflictError",
    "InvalidRequestError",
    "LedgerForkError",
    "LedgerKeyError",
    "LedgerVerificationError",
    "MerkleTree",
    "NotFoundError",
    "ProofError",
    "Witness",
    "leaf_hash",
    "node_hash",
    "serve",
    "serve_in_background",
    "verify_consistency",
    "verify_database",
    "verify_head",
    "verify_inclusion",
    "verify_receipt",
    "verify_service",
]

_LAZY = {
    "CreditServiceProcess": "gpunet.credits._process",
    "serve_in_background": "gpunet.credits._process",
    "serve": "gpunet.credits._service",
    "verify_database": "gpunet.credits._audit",
    "verify_service": "gpunet.credits._audit",
}


def __getattr__(name: str) -> _typing.Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gpunet.credits' has no attribute {name!r}")
