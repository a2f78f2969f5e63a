"""The one exception tree of gpunet.

Every error a user can meet derives from :class:`GpunetError`; each message says
what happened, the values involved, and what to do next::

    GpunetError
    ├── ConnectError            a scheduler or service cannot be reached
    ├── GatewayError            an open network's gateway refused a request (bad token, too big, too many)
    ├── CellError               a %%gpunet cell is wrong before anything is sent
    │   ├── CellSyntaxError     the cell does not parse (reported with its line)
    │   ├── UnpicklableInputError   an input cannot travel (names the variable)
    │   └── MissingOutputError  an --out name the cell never assigned
    ├── OptionError             a flag or argument has a value gpunet cannot use (the magic: a usage error)
    │   └── PolicyError         --verify / --rtol / --atol cannot be used (also a VerificationError)
    ├── PlacementError          no worker can ever satisfy the requested resources
    │   └── PackageError        no provider has (or may install) the packages a cell needs, or an install failed
    ├── RemoteCellError         the cell raised on the worker (remote traceback kept; a built-in
    │                           exception type stays catchable: ``except KeyError`` works)
    ├── UnsupportedResultError  an output the data codec cannot carry from an untrusted provider (also a TypeError)
    ├── ProviderDataError       what a provider sent was refused: undecodable, pickled, forged
    │   └── ResultTooLargeError     over its cap (results, displays, streams); nothing was loaded
    ├── WorkerLostError         the worker died and the cell could not be re-run
    ├── CellTimeoutError        the cell ran past --timeout and was stopped
    ├── BudgetError             a job's hold cannot be placed: --max-credits, budget or balance too small
    ├── VerificationError       --verify cannot run here, or the copies did not agree
    ├── NotYoursError           the scheduler refused a call about another notebook session's hold, task or map
    └── CreditsError            the credit service refused or failed (re-exported by gpunet.credits)
        ├── CreditsUnavailableError    the service cannot be reached, or answered 5xx (503)
        ├── CreditsRequestError        the service refused the request; nothing moved
        │   ├── InvalidRequestError    malformed JSON, unknown fields, bad values (400, 422)
        │   ├── AuthError              missing or unknown bearer token (401)
        │   ├── BudgetExceededError    the session's budget or the balance is too small (402; also a BudgetError)
        │   ├── ForbiddenError         the token's role may not do this (403)
        │   ├── NotFoundError          unknown account, session, hold or entry (404)
        │   └── ConflictError          the request clashes with what exists (409)
        │       └── IdempotencyConflictError   a key reused with a different body (409)
        └── LedgerVerificationError    the ledger, a proof, a head or a receipt does not check out
            ├── ProofError             a Merkle inclusion or consistency proof fails
            ├── LedgerForkError        two signed heads of one ledger disagree: its history was rewritten
            └── LedgerKeyError         a service signs with another key than the one pinned for it

Context travels as keyword-only attributes (``address`` of a ConnectError; ``status``,
``code``, ``url``, ``details`` of a credit service's answer; ``index`` and
``evidence`` of a failed ledger check).

Errors of other libraries are translated at the boundary (``raise ... from exc``).
"""

from __future__ import annotations

import builtins
from typing import Any


class GpunetError(Exception):
    """Base class of every error gpunet raises on purpose."""

    def _render_traceback_(self) -> list[str]:
        # IPython shows this instead of a traceback through gpunet's own frames:
        # the message already says what happened and what to do.
        return [f"{type(self).__name__}: {self}"]


class ConnectError(GpunetError):
    """A scheduler (or another gpunet service) could not be reached."""

    def __init__(self, message: str, *, address: str | None = None) -> None:
        super().__init__(message)
        self.address = address


class GatewayError(GpunetError):
    """An open network's gateway refused a request: the token (401, 403), a body or a
    job's inputs over a cap (413), too many submissions (429); nothing was sent."""

    def __init__(self, message: str, *, status: int = 400, code: str = "refused") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class CellError(GpunetError):
    """A %%gpunet cell cannot be sent as it is; nothing was sent."""


class CellSyntaxError(CellError):
    """The cell body does not parse; ``lineno`` is 1-based within the cell."""

    def __init__(self, message: str, *, lineno: int | None = None) -> None:
        super().__init__(message)
        self.lineno = lineno


class UnpicklableInputError(CellError):
    """An input of the cell cannot be pickled, so it cannot travel to a worker."""

    def __init__(self, message: str, *, name: str, type_name: str) -> None:
        super().__init__(message)
        self.name = name
        self.type_name = type_name


class MissingOutputError(CellError):
    """The cell finished but did not assign a name that was asked for as output."""

    def __init__(self, message: str, *, names: list[str]) -> None:
        super().__init__(message)
        self.names = names


class OptionError(GpunetError, ValueError):
    """A flag of ``%%gpunet`` or an argument of the Python API has a value gpunet
    cannot use; nothing was sent. The magic shows it as a usage error."""


class ReproduceError(GpunetError):
    """A notebook cannot be re-run or checked by ``gpunet reproduce`` (no such file,
    not a notebook)."""


class PlacementError(GpunetError):
    """No worker in the network can ever satisfy the requested resources."""


class PackageError(PlacementError):
    """The packages a cell needs: no provider has them at the versions asked (nor may
    install them), or an install on a provider failed (no wheel for its platform, a cap
    exceeded); raised before the cell runs, saying which package, which versions and
    which providers could run it."""


class RemoteCellError(GpunetError):
    """The cell raised on the worker and its exception could not be rebuilt here.

    ``ename`` and ``evalue`` describe the remote exception and ``remote_traceback``
    holds its formatted traceback, with line numbers that point into the cell.
    """

    def __init__(self, ename: str, evalue: str, remote_traceback: str) -> None:
        super().__init__(f"{ename}: {evalue}\n\nRemote traceback:\n{remote_traceback}")
        self.ename = ename
        self.evalue = evalue
        self.remote_traceback = remote_traceback

    def __str__(self) -> str:  # KeyError's own __str__ would quote the message
        return str(self.args[0]) if self.args else ""

    def _render_traceback_(self) -> list[str]:
        # IPython shows these lines instead of the local frames of gpunet itself.
        return self.remote_traceback.rstrip("\n").split("\n")

    @classmethod
    def of(cls, ename: str, evalue: str, remote_traceback: str) -> RemoteCellError:
        """The error to raise for a remote exception known only by its type name,
        message and traceback text: for a built-in exception type (``KeyError``,
        ``ValueError``, ...) a RemoteCellError that is also one, so that
        ``except KeyError`` keeps working; else a plain RemoteCellError."""
        return _remote_class(ename)(ename, evalue, remote_traceback)


_remote_classes: dict[str, type[RemoteCellError]] = {}


def _remote_class(ename: str) -> type[RemoteCellError]:
    builtin = getattr(builtins, ename, None)
    if not (isinstance(builtin, type) and issubclass(builtin, Exception)) or builtin is Exception:
        return RemoteCellError
    if ename not in _remote_classes:
        try:
            _remote_classes[ename] = type(ename, (RemoteCellError, builtin), {
                "__module__": __name__, "__doc__": f"A remote {ename}, raised in the notebook as a RemoteCellError."})
        except TypeError:  # a built-in whose layout cannot be combined
            _remote_classes[ename] = RemoteCellError
    return _remote_classes[ename]


class ProviderTaskError(GpunetError):
    """A task failed on a provider's worker of an open network. The message is the
    worker's text: the scheduler passes on no exception object a provider made (its
    pickle could run code where it is loaded)."""


class UnsupportedResultError(GpunetError, TypeError):
    """An output (or return value) is of a type the data codec does not carry, so it
    cannot come back from a provider the notebook does not trust (:mod:`gpunet.codec`).
    ``name`` says which output, ``type_name`` the type found."""

    def __init__(self, message: str, *, name: str, type_name: str) -> None:
        super().__init__(message)
        self.name = name
        self.type_name = type_name


class ProviderDataError(GpunetError):
    """What a provider sent was refused and nothing of it was loaded: bytes that do
    not decode, a pickled payload on a network whose providers are not trusted, or
    an event that did not come from the job's own worker."""


class ResultTooLargeError(ProviderDataError):
    """A job's result, displays or output text went over its cap; nothing was loaded."""


class WorkerLostError(GpunetError):
    """The worker running a cell died and Dask gave up re-running it elsewhere."""


class CellTimeoutError(GpunetError, TimeoutError):
    """The cell ran longer than its ``--timeout`` and was stopped on the worker."""


class BudgetError(GpunetError):
    """A job's hold could not be placed: the session's budget or the balance is short,
    or ``--max-credits`` cannot pay for it. Nothing was sent."""


class VerificationError(GpunetError):
    """Verification could not run, or the copies of a result did not agree."""


class PolicyError(VerificationError, OptionError):
    """``--verify``, ``--rtol`` or ``--atol`` has a value that cannot be used."""


class NotYoursError(GpunetError, PermissionError):
    """The scheduler refused a call about a hold, a task or a map of another notebook
    session (gpunet.metering.owners): a session acts only on its own."""


class CreditsError(GpunetError):
    """Base class of the credit service's errors (see ``gpunet.credits``); the HTTP
    status the service answers with decides the class on the client side."""


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


class BudgetExceededError(CreditsRequestError, BudgetError):
    """The hold does not fit the session's budget or the client's balance (HTTP 402);
    a :class:`BudgetError` too, so ``except gpunet.BudgetError`` catches every refusal."""

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


class LedgerForkError(LedgerVerificationError):
    """Two heads signed by one ledger's key cannot both be true: at one size they name
    different roots, a later one does not extend an earlier one (its consistency proof
    fails), or the ledger is now shorter than a head seen before. Both heads are signed,
    so together they prove that the operator rewrote the history or shows readers
    different ones; ``evidence`` holds both."""


class LedgerKeyError(LedgerVerificationError):
    """A service's heads are signed by another key than the one pinned for it on first
    contact (trust on first use); ``evidence`` names both keys."""
