"""How the credit service's HTTP answers become exceptions (the classes live in
:mod:`gpunet.errors`, the one exception tree)."""

from __future__ import annotations

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
    NotFoundError,
)

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
