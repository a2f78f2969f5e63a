"""Verified jobs: send a job's units as copies to distinct providers and settle what a quorum agrees on.

Providers are strangers: a GPU may be faulty, an owner may cheat. With
``--verify`` (``verify=`` in the Python API) every unit of a job (the cell, or each
item of a map) runs as copies on distinct providers on distinct hosts (provider
accounts, not just workers; hosts by their workers' addresses,
:func:`gpunet.client.placement.host_groups`: two accounts with workers on one host
never both run a unit), and the notebook, which owns the work as a volunteer-computing project
owns its work units, judges what came back (:mod:`gpunet.verify.quorum`). Once a
quorum exists, copies still running are cancelled (their holds released).

The verdict goes to the scheduler plugin, which settles the agreeing copies (the
ledger entry's memo says how the result was verified, by which providers, and its
digest), releases the rest unpaid, and reports each provider's outcome to its
trust record in the credit service, where repeated mismatches quarantine it.
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import dask

from gpunet import wire
from gpunet.client.handle import (
    SCATTER_THRESHOLD_BYTES,
    JobHandle,
    failure_of,
    gather_within,
    pickled,
    scatter_surviving,
    stop_job_everywhere,
    stop_on_workers_soon,
    write,
)
from gpunet.client.placement import host_groups, host_of, satisfies
from gpunet.client.received import accept
from gpunet.errors import BudgetError, GpunetError, VerificationError
from gpunet.verify.adaptive import TrustRecords
from gpunet.verify.quorum import (
    ACCEPT,
    ANOTHER,
    MAX_EXTRA_COPIES,
    WAIT,
    Policy,
    disagreement,
    judge,
    preview,
    result_digest,
)
from gpunet.worker.runner import run_job

if TYPE_CHECKING:  # pragma: no cover
    from distributed import Future

    from gpunet.client.handle import Connection
    from gpunet.kernels import Tolerance
    from gpunet.ui.progress import JobProgress
    from gpunet.wire import Job, JobResult

logger = logging.getLogger(__name__)

#: How often a verdict is sent before the job goes on without it (its copies are then
#: released unpaid when the scheduler forgets them).
VERDICT_ATTEMPTS = 3
#: The longest wait for finished copies' results to be fetched; a copy whose worker
#: left before its result was fetched is then lost, and replaced.
FETCH_S = 10.0
#: The least time one copy's fetch is given once a look's :data:`FETCH_S` is spent.
FETCH_ONE_S = 0.5

# -- providers ------------------------------------------------------------------------------


@dataclass
class ProviderPool:
    """The providers that may run copies of a job: their eligible workers, trust
    records, and how many copies of this job each has been given."""

    workers: dict[str, list[str]]
    records: dict[str, dict[str, Any]]
    quarantined: list[str] = field(default_factory=list)
    load: Counter = field(default_factory=Counter)
    rng: random.Random = field(default_factory=random.Random)
    #: the records as this job's verdicts move them, for adaptive trust
    trust: TrustRecords = field(init=False)
    #: provider -> its host group: providers sharing a host are one group, and a unit's
    #: copies go to distinct groups (:func:`gpunet.client.placement.host_groups`)
    hosts: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.trust = TrustRecords.of(self.records)
        self.hosts = host_groups(self.workers)

    @classmethod
    def of(cls, network: Connection, resources: dict[str, float], allowed: list[str] | None) -> ProviderPool:
        """The providers of ``network`` with a worker that can run a job asking for
        ``resources`` (among ``allowed`` workers), quarantined ones left out."""
        state = network.metering_state() if network.meter is not None else None
        if state is None:
            raise VerificationError(
                "--verify needs a metered network: results are compared across provider accounts, which only a "
                "metering scheduler knows (connect with --credits URL --token TOKEN, or with no address)")
        owners = {address: info["provider"] for address, info in state["providers"].items()}
        workers: dict[str, list[str]] = {}
        for address, info in network.scheduler_workers(fresh=True).items():
            provider = owners.get(address, state.get("default_provider"))
            if (provider is not None and (allowed is None or address in allowed)
                    and satisfies(info.get("resources") or {}, resources)):
                workers.setdefault(provider, []).append(address)
        records = {record["provider"]: record for record in network.meter.provider_records()}
        # quarantined as the credit service's records say, or as the scheduler learned since
        quarantined = sorted(p for p in workers
                             if records.get(p, {}).get("quarantined") or p in state.get("quarantined", ()))
        for provider in quarantined:
            workers.pop(provider, None)
        return cls(workers, records, quarantined)

    def require(self, policy: Policy) -> None:
        """Refuse, before anything is sent, a policy this network cannot honour."""
        need = policy.providers_needed
        groups = len(set(self.hosts.values()))
        if len(self.workers) >= need and groups >= need:
            return
        have = ", ".join(f"{p} ({len(w)} worker{'s' * (len(w) != 1)})" for p, w in sorted(self.workers.items()))
        quarantined = f"; quarantined, so left out: {', '.join(self.quarantined)}" if self.quarantined else ""
        if len(self.workers) >= need:
            shared = "; ".join(
                ", ".join(f"{p} ({', '.join(sorted({host_of(a) for a in self.workers[p]}))})"
                          for p in sorted(self.workers) if self.hosts[p] == group)
                for group in sorted(set(self.hosts.values())))
            raise VerificationError(
                f"--verify {policy} needs {need} distinct providers on {need} distinct hosts, and the providers that "
                f"can run this job are on {groups} host{'s' * (groups != 1)} (by their workers' addresses): "
                f"{shared}. Copies from one host may be one person's, so they do not check each other. Nothing was "
                "sent. Use --verify none, or connect to a network with providers on more hosts.")
        raise VerificationError(
            f"--verify {policy} needs {need} distinct providers that can run this job, and this network has "
            f"{len(self.workers)}{': ' + have if have else ''}{quarantined}. Nothing was sent. Use --verify none, "
            "ask for less (--gpus, --gpu-mem), or connect to a network with more providers.")

    def choose(self, exclude: set[str], *, trusted: bool = False) -> str | None:
        """A provider on another host than those in ``exclude`` (the providers of a
        unit's copies so far): the least loaded (per worker), or, with ``trusted``, the
        one with the best record; None when none is left."""
        taken = {self.hosts.get(p) for p in exclude}
        candidates = [p for p in self.workers if p not in exclude and self.hosts.get(p) not in taken]
        if not candidates:
            return None
        self.rng.shuffle(candidates)  # ties go to a random provider
        def busy(p: str) -> float:
            return self.load[p] / len(self.workers[p])
        if trusted:
            best = max(candidates, key=lambda p: (self.trust.run(p), -busy(p)))
        else:
            best = min(candidates, key=busy)
        self.load[best] += 1
        return best


# -- the verified job ----------------------------------------------------------------------------


@dataclass(eq=False)
class Copy:
    """One copy of a unit, sent to one provider."""

    key: str
    provider: str
    hold: str | None
    future: Future
    result: JobResult | None = None
    failed: str | None = None  # why the copy produced no result
    #: its place among its provider's results in the job's trust records
    token: int | None = None


@dataclass(eq=False)
class Unit:
    """The cell, or one item of a map, and its copies."""

    index: int | None
    blob: bytes | None
    copies: list[Copy] = field(default_factory=list)
    quorum: int = 1
    extra: int = 0
    #: adaptive: whether the first result was already judged trusted or sent for a check
    trust_decided: bool = False
    accepted: Copy | None = None
    #: the copies that agree with the accepted one (it among them)
    agreeing: list[Copy] = field(default_factory=list)
    error: str | None = None

    @property
    def decided(self) -> bool:
        return self.accepted is not None or self.error is not None


class VerifiedJob(JobHandle):
    """A job whose units run as copies on distinct providers (see the module
    docstring). Make one with :meth:`submit`."""

    def __init__(self, network: Connection, job: Job, policy: Policy, tolerance: Tolerance, pool: ProviderPool, *,
                 resources: dict[str, float], items: list[bytes] | None, amount: int | None) -> None:
        super().__init__(network, job, count=1 if items is None else len(items), mapped=items is not None,
                         resources=resources)
        self.policy = policy
        self.tolerance = tolerance
        self.pool = pool
        self.amount = amount
        self.units = [Unit(None, None)] if items is None else [Unit(i, blob) for i, blob in enumerate(items)]
        self._inputs: Future | None = None
        self._shared: Any = job
        #: task key -> its unit and copy
        self._owner: dict[str, tuple[Unit, Copy]] = {}
        self._quarantine_checked = time.monotonic()
        #: until when the current look may fetch finished copies (see _judge_finished)
        self._fetch_until = time.monotonic() + FETCH_S
        #: the worker of the copy whose live output is shown (the first to start or print)
        self._streamed_from: str | None = None

    def placed_holds(self) -> list[str]:
        """Every copy's hold."""
        return [copy.hold for unit in self.units for copy in unit.copies if copy.hold]

    # -- sending ---------------------------------------------------------------------
    @classmethod
    def submit(cls, network: Connection, job: Job, policy: Policy, tolerance: Tolerance, *,
               resources: dict[str, float], items: list[Any] | None = None, workers: list[str] | None = None,
               max_credits: float | None = None, timeout: float | None = None,
               max_rate: float | None = None) -> VerifiedJob:
        """Choose each unit's providers, hold credits for every copy, and send them.
        Refuses (nothing held, nothing sent) when too few providers can run it. Every
        copy's hold is priced at ``max_rate`` (the job's price limit, by default the session's)."""
        pool = ProviderPool.of(network, resources, workers)
        pool.require(policy)
        blobs = None if items is None else [pickled(item, f"map item {i}") for i, item in enumerate(items)]
        # A cell's live output is shown from one copy (the first to speak); a map's
        # copies report only through their results.
        job.topic = network.topic if items is None else None
        job.result_event, job.announce = False, items is None
        # With --max-credits every copy a unit may need (its first ones and the extra
        # ones) holds an equal share, so that all of them together stay within it;
        # without it each copy holds what the task would hold unverified.
        units = 1 if items is None else len(items)
        what = ("the cell" if job.code is not None else "the call") if items is None else f"each of {units} items"
        plan = network.meter.plan(count=units if max_credits is None else units * policy.max_copies,
                                  max_credits=max_credits, timeout=timeout, max_rate=network.hold_rate(max_rate),
                                  what=f"the up to {policy.max_copies} copies that --verify {policy} may run of {what}")
        self = cls(network, job, policy, tolerance, pool, resources=resources, items=blobs, amount=plan.amount)
        planned = [(unit, provider) for unit in self.units for provider in self._first_providers(unit)]
        try:  # holds placed ahead for copies, where enough are ready: no request to the credit service
            holds = (network.meter.take_copy_holds(len(planned), plan.amount)
                     or network.meter.hold(job.job_id, count=len(planned), amount=plan.amount))
        except BudgetError as exc:
            if getattr(exc, "placed", None):  # a race took the budget between check and batch
                network.release_unsent(exc.placed)
            raise
        client = network.client
        network.register_job(self)
        try:
            if network.scatters and sum(len(blob) for blob in job.inputs.values()) > SCATTER_THRESHOLD_BYTES:
                self._inputs, job.inputs = scatter_surviving(client, job.inputs, timeout=timeout), {}
            if network.scatters and (self.mapped or len(job.arguments) > SCATTER_THRESHOLD_BYTES):
                self._shared = scatter_surviving(client, job, timeout=timeout)  # sent once, not with every copy
            for (unit, provider), hold in zip(planned, holds):
                self._send(unit, provider, hold)
        except BaseException:
            network.release_unsent([h for h in holds if h not in {c.hold for u in self.units for c in u.copies}])
            self.stop("not sent")
            network.forget_job(job.job_id)
            raise
        return self

    def _first_providers(self, unit: Unit) -> list[str]:
        """The providers of a unit's first copies, by policy."""
        pool, policy = self.pool, self.policy
        if policy.mode == "replicate":
            unit.quorum = policy.copies // 2 + 1
            chosen: list[str] = []
            for _ in range(policy.copies):
                chosen.append(pool.choose(set(chosen)))
            return chosen
        first = pool.choose(set())
        if policy.mode == "spot":
            check = pool.rng.random() < policy.probability
        elif self.mapped:  # adaptive, decided per unit as its result arrives (see _judge)
            return [first]
        else:  # adaptive for one unit: its provider's record is as current now as it will be
            check = pool.trust.needs_check(first, pool.rng.random())
        unit.trust_decided = True
        if not check:
            return [first]
        unit.quorum = 2
        return [first, pool.choose({first}, trusted=True)]

    def _send(self, unit: Unit, provider: str, hold: str, *, priority: int = 0) -> None:
        """Send a copy of ``unit`` to ``provider``; a check or tie-breaker goes with a
        higher ``priority``, ahead of the first copies still queued, so that verdicts
        (and the trust records they move) come as early as they can."""
        number = len(unit.copies)
        key = f"gpunet-{self.job.job_id}-{'c' if unit.index is None else unit.index}-{number}"
        with dask.annotate(**{wire.ANNOTATION: wire.annotation(hold, self.amount, verify=self.job.job_id,
                                                                     topic=self.job.topic)}):
            future = self.network.client.submit(
                run_job, self._shared, unit.blob, unit.index, self._inputs, key=key, pure=False, priority=priority,
                resources=self.resources, workers=self.pool.workers[provider], allow_other_workers=False)
        future.add_done_callback(lambda _: self.wake.set())
        copy = Copy(key, provider, hold, future)
        unit.copies.append(copy)
        self._owner[key] = (unit, copy)

    # -- waiting ---------------------------------------------------------------------
    @property
    def completed(self) -> int:
        """How many units are accepted or failed."""
        return sum(unit.decided for unit in self.units)

    def _shows(self, message: dict[str, Any]) -> bool:
        """Show the live events of one copy: the first to start or to print."""
        if self._streamed_from is None and message.get("kind") in ("started", "stream"):
            self._streamed_from = message.get("worker")
        return message.get("worker") == self._streamed_from

    def _look(self) -> None:
        self._judge_finished()
        self._drop_quarantined()

    def _outcome(self, progress: JobProgress | None, echo: bool) -> list[JobResult]:
        """Settle-ready verdicts are sent; return the accepted results in item order."""
        if self.stopped_because is not None:
            self._release_futures()
            raise GpunetError(f"the job was {self.stopped_because} before it was verified; nobody was paid for it")
        failures = [unit for unit in self.units if unit.error is not None]
        results = [unit.accepted.result for unit in self.units if unit.accepted is not None]
        self._count([copy.result for unit in self.units for copy in unit.copies if copy.result is not None])
        self._release_futures()
        if failures:
            shown = "\n".join(unit.error for unit in failures[:5])
            more = f"\n(and {len(failures) - 5} more)" if len(failures) > 5 else ""
            raise VerificationError(f"{len(failures)} of {self.count} results could not be verified; nobody was "
                                    f"paid for them:\n{shown}{more}")
        if progress is not None and not self.mapped:
            progress.ran_on(results[0].worker, f"{results[0].device}, verified {self.policy}")
        if echo:
            self._drain(progress, echo)
            for unit in self.units:
                self._echo_accepted(unit)
        return results

    def _echo_accepted(self, unit: Unit) -> None:
        """Show the verified output: the rest of the copy shown live where it is one of
        the agreeing copies, else all of the accepted one's (saying so)."""
        shown_live = next((copy for copy in unit.agreeing if copy.result.worker == self._streamed_from), None)
        if shown_live is None and self.shown_seq.get(unit.index):
            write("stderr", f"[gpunet: the output above came from the copy on {self._streamed_from}, which was "
                             f"not accepted; the accepted copy's, from {unit.accepted.result.worker}, follows]\n")
            self.shown_seq[unit.index] = 0
        self.echo_rest((shown_live or unit.accepted).result)

    def _judge_finished(self) -> None:
        """Fetch the copies that finished since the last look, and judge their units."""
        running = [copy.future for unit in self.units if not unit.decided for copy in unit.copies
                   if copy.result is None and copy.failed is None]
        # "lost": its data went with a worker and Dask runs it again; still pending here
        finished = [future for future in running if future.status in ("finished", "error", "cancelled")]
        fetched = {}
        good = [future for future in finished if future.status == "finished"]
        # one bound for this look's fetching, so that copies lost with their workers cost it once, not each
        left = self.time_left()
        self._fetch_until = time.monotonic() + (FETCH_S if left is None else max(FETCH_ONE_S, min(FETCH_S, left)))
        if good:
            try:
                # a cap's worth at a time, each part's wait bounded by what is left of this look's
                client = self.network.client
                raws = self.fetch_within_cap(good, lambda part: gather_within(client, part, self._fetch_s()))
                fetched = dict(zip((f.key for f in good), raws))
            except Exception as exc:  # noqa: BLE001 - judged one by one below
                logger.warning("gpunet: fetching %d copies failed (%s); fetching them one by one", len(good), exc)
        for future in finished:
            self._arrived(future, fetched.get(future.key))

    def _fetch_s(self) -> float:
        """How long fetching finished copies may still take in this look: :data:`FETCH_S`
        from its start, within the job's timeout (at least :data:`FETCH_ONE_S`, for one copy)."""
        left = self.time_left()
        bound = FETCH_S if left is None else min(FETCH_S, left)
        return max(FETCH_ONE_S, min(bound, self._fetch_until - time.monotonic()))

    def _drop_quarantined(self) -> None:
        """A provider quarantined mid-job, or whose workers all left, gets no more
        copies, and its copies still waiting are replaced by copies elsewhere (they
        are pinned to workers that will never run them)."""
        now = time.monotonic()
        if now - self._quarantine_checked < 1.0:
            return
        self._quarantine_checked = now
        state = self.network.metering_state() or {}
        present = set(self.network.scheduler_workers(fresh=True))
        quarantined = set(state.get("quarantined", ()))
        for provider in list(self.pool.workers):
            if provider in quarantined:
                why = f"its provider {provider} was quarantined"
                self.pool.quarantined.append(provider)
            elif not present & set(self.pool.workers[provider]):
                why = f"every worker of its provider {provider} left"
            else:
                continue
            logger.warning("gpunet: job %s: %s; its copies go elsewhere", self.job.job_id, why.removeprefix("its "))
            self.pool.workers.pop(provider)
            for unit in self.units:
                stale = [copy for copy in unit.copies if not unit.decided and copy.provider == provider
                         and copy.result is None and copy.failed is None]
                if stale:
                    self._cancel(stale, why=why)
                    unit.extra = max(0, unit.extra - len(stale))  # a replacement, not an extra copy
                    self._judge(unit)

    def _arrived(self, future: Future, result: JobResult | None) -> None:
        """A copy finished: judge its unit if it can be judged now."""
        found = self._owner.get(future.key)
        if found is None:
            return
        unit, copy = found
        if unit.decided or copy.failed is not None or copy.result is not None:
            return
        status = future.status  # read once: a copy lost with its worker goes back to pending meanwhile
        if status == "finished":
            try:
                raw = result if result is not None else future.result(timeout=self._fetch_s())
            except Exception as exc:  # noqa: BLE001 - a lost worker between finish and fetch
                if future.status != "finished":
                    return  # lost with its worker: Dask runs it again, or its provider is dropped
                # its worker left before its result came: lost, and replaced (not an extra copy)
                self._cancel([copy], why=f"its result could not be fetched ({type(exc).__name__}: {exc})")
                unit.extra = max(0, unit.extra - 1)
            else:
                try:
                    copy.result = accept(raw, self.job, unit.index)
                except Exception as exc:  # noqa: BLE001 - a refused result
                    copy.failed = f"its result could not be accepted ({type(exc).__name__}: {exc})"
            if copy.result is not None and copy.result.error and copy.result.error["ename"] == wire.INTERRUPTED:
                copy.failed, copy.result = f"it was stopped on {copy.result.worker}", None
            if copy.result is not None:
                copy.token = self.pool.trust.arrived(copy.provider)
        elif status == "cancelled":
            copy.failed = "it was lost (cancelled by the scheduler)"
        else:
            exc = failure_of(future)
            if exc is None:
                return  # lost with its worker since it was listed: Dask runs it again
            copy.failed = f"it failed in Dask: {type(exc).__name__}: {exc}"
        self._judge(unit)

    def _judge(self, unit: Unit) -> None:
        """Accept the unit when a quorum agrees; else send another copy or give up."""
        if self.stopped_because is not None or unit.decided:
            return
        finished = [copy for copy in unit.copies if copy.result is not None or copy.failed is not None]
        running = len(unit.copies) - len(finished)
        judgement = judge([copy.result for copy in finished], self.tolerance, unit.quorum, running=running,
                          extra_left=MAX_EXTRA_COPIES - unit.extra)
        groups = [[finished[index] for index in group] for group in judgement.groups]
        if len(groups) > 1 and judgement.verdict != ACCEPT:  # one of them lied: none is trusted meanwhile
            for copy in (copy for group in groups for copy in group if copy.token is not None):
                self.pool.trust.dispute(copy.provider, copy.token)
        if judgement.verdict == ACCEPT and self._checks(unit, groups[0][0]):
            return
        if judgement.verdict == ACCEPT:
            winner = groups[0]
            unit.accepted, unit.agreeing = winner[0], winner
            self._cancel([copy for copy in unit.copies if copy.result is None and copy.failed is None])
            self._verdict(unit, winner, checked=sum(copy.result is not None for copy in finished) > 1)
            return
        if judgement.verdict == WAIT:
            return  # more copies are coming
        if judgement.verdict == ANOTHER:
            # one more copy, to the provider with the best record that has not run this unit yet
            provider = self.pool.choose({copy.provider for copy in unit.copies}, trusted=True)
            if provider is not None:
                self._send_extra(unit, provider)
                return
        unit.error = self._no_quorum(unit, groups)
        self._verdict(unit, [], checked=False)

    def _checks(self, unit: Unit, first: Copy) -> bool:
        """Adaptive trust, decided as a unit's first result arrives: whether a second
        provider checks it, by its provider's record as this job's verdicts left it."""
        if self.policy.mode != "adaptive" or unit.trust_decided:
            return False
        unit.trust_decided = True
        if not self.pool.trust.needs_check(first.provider, self.pool.rng.random()):
            return False
        checker = self.pool.choose({copy.provider for copy in unit.copies}, trusted=True)
        if checker is None:
            return False  # the checkers left mid-job: the unit goes unchecked, as a spot check would
        unit.quorum = 2
        self._send_extra(unit, checker, extra=False)  # or, where no check can be held, the unit fails
        return True

    def _send_extra(self, unit: Unit, provider: str, *, extra: bool = True) -> None:
        """Send one more copy of ``unit`` to ``provider``: a tie-breaker (``extra``) or
        an adaptive check."""
        unit.extra += extra
        label = "c" if unit.index is None else unit.index
        try:
            # one placed ahead where one is ready; else keyed by the copy's number, unique in its
            # unit: a retried hold is the same hold
            hold = (self.network.meter.take_copy_holds(1, self.amount)
                    or self.network.meter.hold(f"{self.job.job_id}-{label}-copy{len(unit.copies)}", count=1,
                                               amount=self.amount))[0]
        except BudgetError as exc:
            unit.extra = MAX_EXTRA_COPIES
            why = "the copies disagree" if extra else f"its result from {unit.copies[0].provider} needs a check"
            unit.error = f"{self._where(unit)}: {why} and no further copy could be held: {exc}"
            self._verdict(unit, [], checked=False)
            return
        try:
            self._send(unit, provider, hold, priority=1)
        except BaseException:
            self.network.release_unsent([hold])
            raise

    def _where(self, unit: Unit) -> str:
        if unit.index is not None:
            return f"item {unit.index}"
        return "the cell" if self.job.code is not None else "the call"

    def _no_quorum(self, unit: Unit, groups: list[list[Copy]]) -> str:
        lines = [f"{self._where(unit)}: no {unit.quorum} of {len(unit.copies)} copies on distinct providers agree "
                 f"(tolerance rtol={self.tolerance.rtol:g}, atol={self.tolerance.atol:g}):"]
        reference = groups[0][0] if groups else None
        for group in groups:
            names = ", ".join(f"{copy.provider} ({copy.result.worker})" for copy in group)
            line = f"  {names}: {preview(group[0].result)}"
            if reference is not None and group[0] is not reference:
                line += f"  [differs from {reference.provider}'s: {disagreement(reference.result, group[0].result, self.tolerance)}]"
            lines.append(line)
        for copy in unit.copies:
            if copy.failed is not None:
                lines.append(f"  {copy.provider}: no result, {copy.failed}")
        return "\n".join(lines)

    def _verdict(self, unit: Unit, agreeing: list[Copy], *, checked: bool) -> None:
        """Tell the scheduler which finished copies agree; it settles and records."""
        finished = {copy.key: any(copy is a for a in agreeing) for copy in unit.copies if copy.result is not None}
        if not finished:
            return
        digest = result_digest(agreeing[0].result) if agreeing else ""
        for copy in unit.copies:  # this job's view of the records moves at once: the next unit's choice uses it
            if copy.token is not None:
                self.pool.trust.settle(copy.provider, copy.token, (copy in agreeing) if checked else None)
        for attempt in range(VERDICT_ATTEMPTS):
            try:
                self.network.call_scheduler(wire.VERDICT, job=self.job.job_id,
                                            copies=finished, method=str(self.policy), digest=digest,
                                            checked=checked)
                return
            except Exception as exc:  # noqa: BLE001 - the accepted result stands either way
                logger.warning("gpunet: job %s: sending a verdict failed (attempt %d): %s", self.job.job_id,
                               attempt + 1, exc)
                time.sleep(0.2 * (attempt + 1))
        logger.error("gpunet: job %s: its verdict could not be sent; the scheduler releases the copies unpaid "
                     "once the job is forgotten", self.job.job_id)

    # -- stopping ----------------------------------------------------------------------
    def _cancel(self, copies: list[Copy], why: str = "cancelled: no longer needed") -> None:
        """Cancel copies (their holds are released), stopping any that already run:
        a cancelled Dask task would otherwise keep its device busy, unpaid."""
        if not copies:
            return
        for copy in copies:
            copy.failed = why
        client = self.network.client
        client.cancel([copy.future for copy in copies], force=True)
        for copy in copies:
            unit, _ = self._owner[copy.key]
            running = self.job.job_id if unit.index is None else f"{self.job.job_id}/{unit.index}"
            workers = self.pool.workers.get(copy.provider)
            if workers:
                stop_on_workers_soon(client, running, "no longer needed", workers)

    def _release_futures(self) -> None:
        for unit in self.units:
            for copy in unit.copies:
                copy.future = None  # type: ignore[assignment]
        self._owner.clear()
        self._inputs = None
        self._shared = None

    def stop(self, reason: str) -> None:
        """Cancel every copy and stop the job's threads on the workers."""
        self.stopped_because = reason
        futures = [copy.future for unit in self.units for copy in unit.copies if copy.future is not None]
        stop_job_everywhere(self.network, self.job.job_id, futures, reason)
        for unit in self.units:  # finished copies of undecided units: released, nobody paid
            if not unit.decided:
                unit.error = f"{self._where(unit)}: {reason}"
                try:
                    self._verdict(unit, [], checked=False)
                except Exception as exc:  # noqa: BLE001 - forgetting the tasks releases them too
                    logger.warning("gpunet: could not send the release of job %s: %s", self.job.job_id, exc)
