"""Whose each hold and map is, as the scheduler saw them: so that one notebook session
cannot act on another's.

On an open network the gateway is the only Dask client, but it runs one Dask client per
notebook session, and every named handler that acts on a hold, a task or a map
(:data:`gpunet.wire.CALLER_NAMED`) is told the calling session's client id, which the
session's own connection adds (never what a request says). The scheduler plugin records
here the client that first named each hold (the graph it sent, or the handler it called
for a hold it never sent) and each map's job, and refuses a call about another client's
(:class:`~gpunet.errors.NotYoursError`): a bug in the gateway that let account A name
account B's hold, task or map still gives A no power over them.

Accounts: the gateway names each session's Dask client after its account
(:func:`client_name`), so the scheduler keeps verified results for reuse per account
(:func:`account_of`): another account's lookup or store never reaches them.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Iterable

from gpunet.errors import NotYoursError

#: How many maps' owners are kept (the oldest is forgotten beyond it; as many as the
#: settlement counts, gpunet.metering.settlement.MAX_MAPS).
MAX_JOBS = 10_000
#: What a gateway session's Dask client is named: this, then its account.
CLIENT_NAME_PREFIX = "gpunet@"
#: A Dask client's id: ``Client-{name}-{uuid1}`` (distributed.Client).
_CLIENT_ID = re.compile(r"Client-gpunet@(?P<account>[A-Za-z0-9][A-Za-z0-9._@-]{0,63})-"
                        r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")


def client_name(account: str) -> str:
    """The Dask client name of a gateway session of ``account`` (its id then says whose it is)."""
    return f"{CLIENT_NAME_PREFIX}{account}"


def account_of(client: str | None) -> str | None:
    """The account a gateway session's Dask client id names, or None (a client the gateway did
    not name: a notebook on a private or embedded network)."""
    matched = _CLIENT_ID.match(client) if isinstance(client, str) else None
    return matched.group("account") if matched else None


class Owners:
    """Which Dask client (notebook session) each hold and each map belongs to."""

    def __init__(self, max_jobs: int = MAX_JOBS) -> None:
        self.max_jobs = max_jobs
        self.holds: dict[str, str] = {}
        self.jobs: OrderedDict[str, str] = OrderedDict()
        self._by_client: dict[str, set[str]] = {}
        #: calls refused because they named another client's hold, task or map
        self.refused = 0

    def foreign(self, client: str, holds: Iterable[str]) -> list[str]:
        """Those of ``holds`` another client named first."""
        return [hold for hold in holds if self.holds.get(hold, client) != client]

    def claim(self, client: str, holds: Iterable[str]) -> None:
        """``client`` owns ``holds`` from now on (those nobody named yet)."""
        for hold in holds:
            if self.holds.setdefault(hold, client) == client:
                self._by_client.setdefault(client, set()).add(hold)

    def claim_job(self, client: str, job: str) -> bool:
        """Whether map ``job`` is ``client``'s (it is from now on if nobody named it yet)."""
        owner = self.jobs.setdefault(job, client)
        self.jobs.move_to_end(job)
        while len(self.jobs) > self.max_jobs:
            self.jobs.popitem(last=False)
        return owner == client

    def job_is_foreign(self, client: str | None, job: str) -> bool:
        """Whether map ``job`` is known to be another client's."""
        return self.jobs.get(job, client) != client

    def check(self, client: str | None, holds: Iterable[str], doing: str, *, required: bool,
              job: str | None = None) -> None:
        """Refuse (:class:`NotYoursError`) ``doing`` on ``holds`` (and map ``job``) for ``client``
        where another client named any of them first, or where ``required`` and no client is
        named; else ``client`` owns the holds from now on."""
        holds = [hold for hold in holds if isinstance(hold, str)]
        if client is None:
            if required:
                self._refuse(f"{doing} names no client: this open network's scheduler acts only on the calling "
                             "session's own holds, tasks and maps (run the same gpunet version on the gateway)")
            return
        foreign = self.foreign(client, holds)
        if foreign:
            self._refuse(f"{doing} refused: hold {foreign[0]} belongs to another notebook session; a session acts "
                         "only on its own holds, tasks and maps")
        if job is not None and self.job_is_foreign(client, job):
            self._refuse(f"{doing} refused: map {job} belongs to another notebook session; a session acts only on "
                         "its own holds, tasks and maps")
        self.claim(client, holds)

    def _refuse(self, message: str) -> None:
        self.refused += 1
        raise NotYoursError(message)

    def client_left(self, client: str) -> None:
        """Forget ``client``'s holds and maps (their holds are closed as it leaves; a closed hold
        nobody owns may not be named again, gpunet.extensions.scheduler_plugin)."""
        for hold in self._by_client.pop(client, ()):
            if self.holds.get(hold) == client:
                del self.holds[hold]
        for job in [job for job, owner in self.jobs.items() if owner == client]:
            del self.jobs[job]
