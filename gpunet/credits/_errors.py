"""The credit service's errors.

Every error derives from :class:`gpunet.errors.CreditsError`; the HTTP status the
service answers with decides the class on the client side::

    CreditsError
    ├── CreditsUnavailableError    the service cannot be reached, or answered 5xx (503)
    ├── CreditsRequestError        the service refused the request; nothing moved
    │   ├── InvalidRequestError    malformed JSON, unknown fields, bad values (400, 422)
    │   ├── AuthError              missing or unknown bearer token (401)
    │   ├── BudgetExceededError    the session's budget or the balance is too small (402)
    │   ├── ForbiddenError         the token's role may not do this (403)
    │   ├── NotFoundError          unknown account, session, hold or entry (404)
    │   └── ConflictError          the request clashes with what exists (409)
    │       └── IdempotencyConflictError   a key reused with a different body (409)
    └── LedgerVerificationError    the ledger, a proof, a head or a receipt does not check out
        └── ProofError             a Merkle inclusion or consistency proof fails

Context travels as keyword-only attributes (``status``, ``code``, ``url``,
``details``; ``index`` and ``evidence`` for verification errors).
"""

from __future__ import annotations

import logging
from typing import Any

from gpunet.errors import CreditsError

logger = logging.getLogger(__name__)

__all__ = [
    "AuthError",
    "BudgetExceededError",
    "ConflictError",
    "CreditsError",
    "CreditsRequestError",
    "CreditsUnavailableError",
    "ForbiddenError",
    "IdempotencyConflictError",
    "InvalidRequestError",
    "LedgerVerificationError",
    "NotFoundError",
    "ProofError",
    "error_for_status",
]


class CreditsUnavailableError(CreditsError):
    """The credit service could not be reached or failed (HTTP 5xx or no answer)."""

    status = 503
    code = "unavailable"

    def __init__(self, message: str, *, url: str | None = None, status: int = 503) -> None:
        super().__init__(message)
        self.url = url
        self.status = status


class CreditsRequestError(CreditsError):
    """The service refused a request (a 4xx answer); no credits moved."""

    status = 400
    code = "bad_request"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        url: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code
        self.url = url
        self.details = dict(details or {})


class InvalidRequestError(CreditsRequestError):
    """The request is malformed: bad JSON, unknown or missing fields, bad values."""

    status = 422
    code = "invalid_request"


class AuthError(CreditsRequestError):
    """The bearer token is missing or unknown (HTTP 401)."""

    status = 401
    code = "unauthorized"


class BudgetExceededError(CreditsRequestError):
    """The hold does not fit the session's budget or the client's balance (HTTP 402)."""

    status = 402
    code = "budget_exhausted"


class ForbiddenError(CreditsRequestError):
    """The token is valid but its role or owner may not do this (HTTP 403)."""

    status = 403
    code = "forbidden"


class NotFoundError(CreditsRequestError):
    """An account, session, hold or ledger entry does not exist (HTTP 404)."""

    status = 404
    code = "not_found"


class ConflictError(CreditsRequestError):
    """The request clashes with the service's state (HTTP 409), e.g. a taken name."""

    status = 409
    code = "conflict"


class IdempotencyConflictError(ConflictError):
    """An idempotency key was reused with a different request body (HTTP 409)."""

    code = "idempotency_conflict"


class LedgerVerificationError(CreditsError):
    """The ledger, a signed head or a receipt failed a check.

    ``index`` names the first bad entry where one can be named (``None`` when the
    fault is not in one entry, e.g. a bad signature); ``evidence`` holds the values
    that disagree (hex digests, sizes, balances).
    """

    def __init__(
        self, message: str, *, index: int | None = None, evidence: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.index = index
        self.evidence = dict(evidence or {})


class ProofError(LedgerVerificationError):
    """A Merkle inclusion or consistency proof does not verify."""


_BY_STATUS: dict[int, type[CreditsRequestError]] = {
    400: InvalidRequestError,
    401: AuthError,
    402: BudgetExceededError,
    403: ForbiddenError,
    404: NotFoundError,
    409: ConflictError,
    422: InvalidRequestError,
}


def error_for_status(
    status: int, code: str, message: str, *, url: str | None = None, details: dict | None = None
) -> CreditsError:
    """Return the error object matching an HTTP ``status`` and error ``code`` answered by the service."""
    if status >= 500:
        return CreditsUnavailableError(message, url=url, status=status)
    if code == IdempotencyConflictError.code:
        cls: type[CreditsRequestError] = IdempotencyConflictError
    else:
        cls = _BY_STATUS.get(status, CreditsRequestError)
    return cls(message, status=status, code=code, url=url, details=details)
