"""gpunet's Dask scheduler plugin: meters every task attempt against the credit service.

The notebook places a hold on its session's credits before it sends a job, and
annotates the job's tasks with it (``dask.annotate(gpunet=...)``, :mod:`gpunet.wire`).
This adapter turns the scheduler's hooks (task transitions, workers leaving) and
the notebook's calls into events of :class:`~gpunet.metering.settlement.Settlement`,
which holds the rules (who is paid what, when a hold is released), and a
:class:`~gpunet.metering.reporter.Reporter` sends the resulting movements to the
credit service. Here stay the I/O and the timers: checking providers' tokens,
giving up on workers that never register, retiring a quarantined provider's workers.

Start a scheduler with ``--preload gpunet.extensions.scheduler_plugin`` and
``--preload-argv "--credits URL --operator-token-file F"`` (``gpunet scheduler
--credits URL --operator-token-file F`` and the embedded network do). The notebook
reaches the plugin through the named scheduler handlers it registers
(``client.scheduler.gpunet_metering_state()`` and so on). Beside the Dask dashboard it
serves ``/gpunet``: the workers' providers and rates, what each runs now, and how far
the reports have got.

Providers: a worker started by ``gpunet provide`` registers over its own stream
(a ``gpunet-register-provider`` message), presenting its provider's credit token
and rate. Dask lets a message's own keys override the sender it adds, so anyone can
name any worker there: the plugin believes a registration only once the named worker
confirms the token's digest (``gpunet_confirm_provider``, asked on a connection the
scheduler opens), and nothing an unconfirmed message says touches that worker. The token must belong to a
``provider`` account; a rate above ``max_rate`` and an address already registered
to another account are refused; the token itself is not kept.

On an open network (the scheduler's own certificate binds the scheduler role,
:mod:`gpunet.certs`) the plugin also guards the wire (:class:`gpunet.roles.SchedulerDoor`:
only the gateway acts as a client, a provider only as its own workers), takes a
worker's provider account from its certificate instead of a token, and refuses every
task that carries no hold before it can run. A private network admits trusted
notebooks only: any Dask client can run code on its scheduler
(docs/architecture.md, "Three kinds of network").
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import click
from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.protocol.serialize import Serialized, deserialize

from gpunet import codec, wire
from gpunet.certs import SCHEDULER, identity_of_file
from gpunet.credits import CreditClient, CreditsError
from gpunet.errors import NotYoursError
from gpunet.metering.owners import Owners, account_of
from gpunet.metering.reporter import Reporter
from gpunet.metering.settlement import GiveUpLater, Owned, Request, Retire, Settlement, items_run
from gpunet.roles import SchedulerDoor, holds_topics
from gpunet.reuse import ReuseTable
from gpunet.verify.quorum import result_digest
from gpunet.wire import result_from_event
from gpunet.ui import look

if TYPE_CHECKING:  # pragma: no cover
    from distributed import Scheduler

logger = logging.getLogger(__name__)

#: Jobs whose checked verdicts the scheduler remembers, for keeping their results for reuse.
CHECKED_JOBS_KEPT = 10_000

#: How long a worker named in a registration has to confirm it, and how often it is asked.
CONFIRM_TIMEOUT_S = 10.0
CONFIRM_ATTEMPTS = 3
#: A resource no worker has: what a task without a hold asks for on an open network,
#: so that it waits, never runs, until it is cancelled.
REFUSED_RESOURCE = "gpunet-refused-no-hold"
#: The largest copy the scheduler fetches to compare a disputed verdict's digests itself,
#: and how long it waits for the copies.
DIGEST_FETCH_MAX_BYTES = 16 * 1024 * 1024
DIGEST_FETCH_S = 10.0
#: How the scheduler asks workers for copies to compare: msgpack first (an older provider's
#: codec bytes), then gpunet's codec frames (gpunet.codec.DASK_SERIALIZER).
DIGEST_SERIALIZERS = ("msgpack", codec.DASK_SERIALIZER)
#: The most copies of one verdict the scheduler fetches (a unit has at most replicate:K's K + 2).
DIGEST_FETCH_MAX_COPIES = 16


class GpunetMeteringPlugin(SchedulerPlugin):
    """Settles or releases each task's hold as its attempts finish (see the module
    docstring): Dask's hooks and the named handlers become events of a
    :class:`~gpunet.metering.settlement.Settlement`, whose movements a
    :class:`~gpunet.metering.reporter.Reporter` sends. ``default_provider`` /
    ``default_rate`` apply to workers that did not say who they are (plain ``dask
    worker`` processes). ``open_network`` guards the wire by certificate roles.
    ``max_rate`` is the most a provider may ask, ``default_max_rate`` the price limit of a
    notebook that sets none. Loaded by :func:`dask_setup` (``--preload``)."""

    name = wire.METERING_PLUGIN
    idempotent = True

    def __init__(self, credits_url: str, token: str, *, default_provider: str | None = None,
                 default_rate: float = 1.0, max_rate: float = 100.0, open_network: bool = False,
                 default_max_rate: float = 1.0) -> None:
        self.open_network = open_network
        self.door: SchedulerDoor | None = None
        #: tasks refused on an open network because they carried no hold
        self.refused_tasks = 0
        self.credits_url = credits_url
        #: a meter account's token (the operator's on a private network): it may only pay and release holds
        self.token = token
        self.max_rate = max_rate
        #: the price limit a notebook gets when it sets none (``--default-max-rate``): what a
        #: rate is an offer against, and what its holds are priced at
        self.default_max_rate = default_max_rate
        self.settlement = Settlement(default_provider, default_rate)
        self.scheduler: Scheduler | None = None
        self.reporter: Reporter | None = None
        self._client: CreditClient | None = None
        #: the meter account whose token this is (None for the operator's, on a private network):
        #: notebooks name it on their holds, and only it may pay them
        self.meter_account: str | None = None
        #: registrations that the worker they named did not confirm
        self.refused_registrations = 0
        #: key -> when this scheduler sent the task to a worker (its own clock, for pay)
        self._dispatched: dict[Any, float] = {}
        #: verified results by reuse key (gpunet.reuse), and the result digests that
        #: checked verdicts accepted, by (client, job): only those may be kept
        self.reusable = ReuseTable()
        self._checked: OrderedDict[tuple[str | None, str], set[str]] = OrderedDict()
        #: worker address -> what its provider says is installed there (gpunet.worker.environment):
        #: a claim the provider makes, kept only for workers registered to a provider
        self.environments: dict[str, dict[str, Any]] = {}
        #: pre-authorized hold -> the client that drew on it (released when that client leaves)
        self.preauth_owners: dict[str, str] = {}
        #: which client (notebook session) each hold and map is: only it may act on them
        self.owners = Owners()

    @property
    def providers(self) -> dict[str, dict[str, Any]]:
        """Worker address -> ``{"provider": account, "rate": credits per device-second}``."""
        return {address: dataclasses.asdict(info) for address, info in self.settlement.providers.items()}

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self, scheduler: Scheduler) -> None:
        """Serve the named handlers and start the reporter."""
        self.scheduler = scheduler
        codec.register_with_dask()  # copies to compare may come as codec frames (_digests_of reads them)
        if self.open_network:
            self.door = SchedulerDoor(scheduler, self._topics_on)
            self.door.install()
        self._client = CreditClient(self.credits_url, self.token)
        self.meter_account = await asyncio.to_thread(self._meter_account)
        scheduler.stream_handlers[wire.REGISTER_PROVIDER] = self._on_register_message
        scheduler.stream_handlers[wire.ENVIRONMENT_CHANGED] = self._on_environment_message
        scheduler.handlers.update({
            wire.METERING_STATE: self.state,
            wire.RELEASE_HOLDS: self.release_holds,
            wire.CLOSE_UNKNOWN: self.close_unknown,
            wire.CHARGE_USED: self.charge_used,
            wire.VERDICT: self.verdict,
            wire.EXECUTING: self.executing,
            wire.REUSE_STORE: self.reuse_store,
            wire.REUSE_LOOKUP: self.reuse_lookup,
            wire.ENVIRONMENTS: self.environments_of_workers,
            wire.PREAUTH_STATE: self.preauth_state,
            wire.MAP_STATE: self.map_state,
            wire.GROW_MAP: self.grow_map,
            wire.PAUSE_MAP: self.pause_map,
        })
        self.reporter = Reporter(self.settlement, self._client.batch, self._after)
        self.reporter.start()
        if not self.open_network:  # an open network shows its parties no more than Dask's own door lets them
            self._serve_page(scheduler)

    def _serve_page(self, scheduler: Scheduler) -> None:
        """Serve ``/gpunet`` beside the Dask dashboard (where it runs): gpunet's own context of
        the network, the providers of the workers and what each runs now (never a task's data)."""
        application = getattr(scheduler, "http_application", None)
        if application is None:
            return
        from tornado import web

        plugin = self

        class MeteringPage(web.RequestHandler):
            def get(self) -> None:
                self.set_header("Content-Type", "text/html; charset=utf-8")
                self.write(plugin.page_html())

        application.add_handlers(r".*", [(r"/gpunet/?", MeteringPage)])

    def page_html(self) -> str:
        """The ``/gpunet`` page: what the metering knows, in gpunet's look."""
        state = self.state()
        running = state["running"]
        rows = []
        for address in sorted(self.scheduler.workers):
            info = state["providers"].get(address)
            provider = info["provider"] if info else (state["default_provider"] or "nobody (not metered)")
            rate = info["rate"] if info else state["default_rate"]
            now = "; ".join(f"{task['kind']} for {task['for_s']:.0f} s, {task['held']} credits held"
                            for task in running.get(address, ())) or "idle"
            rows.append((address, self.scheduler.workers[address].name, provider, f"{rate:g}/s", now))
        body = (look.figures([("reported", "movements reported", state["reported"]),
                              ("queued", "queued", state["queued"]), ("failed", "failed", state["failed"]),
                              ("maps_open", "maps open", state["maps_open"]),
                              ("awaiting", "copies awaiting a verdict", state["awaiting_verdict"]),
                              ("verdicts", "verdicts", state["verdicts"])])
                + f"<div>credit service <code>{look.esc(state['credits'])}</code>; quarantined: "
                  f"{look.esc(', '.join(state['quarantined']) or 'none')}</div>"
                + look.table(("worker", "name", "provider", "rate", "running now"), rows, empty="no worker"))
        return (f"<!doctype html><html><head><meta charset='utf-8'><title>gpunet</title>"
                f"<meta http-equiv='refresh' content='5'></head><body>{look.panel('gpunet network', body)}"
                "</body></html>")

    def _meter_account(self) -> str | None:
        """The meter account of this plugin's token (None for an operator's, or when the service
        cannot say now: holds then name no meter, and only an operator may pay them)."""
        try:
            me = self._client.ping()
        except CreditsError as exc:
            logger.warning("gpunet metering: cannot ask the credit service who this token is (%s)", exc)
            return None
        return me["account"] if me.get("role") == "meter" else None

    async def before_close(self) -> None:
        """Try for a few seconds to send what is still queued: what maps' items earned,
        and the release of maps' holds whose items will now never finish."""
        if self.reporter is None:
            return
        self.settlement.release_holds(list(self.settlement.shared))
        await self.reporter.stop()
        self._client.close()

    def _after(self, requests: list[Request] | None = None) -> None:
        """Carry out what the settlement asked for (if anything), and wake the reporter."""
        for request in requests or ():
            if isinstance(request, GiveUpLater):
                asyncio.get_running_loop().call_later(request.after_s, self._give_up_on, request.worker)
            elif isinstance(request, Retire):
                asyncio.ensure_future(self._retire(list(request.workers)))
        if self.reporter is not None and self.settlement.has_work:
            self.reporter.wake()

    def _give_up_on(self, worker: str | None) -> None:
        self._after(self.settlement.give_up(worker))

    def _annotation(self, key: Any) -> dict[str, Any] | None:
        ts = self.scheduler.tasks.get(key)
        return (ts.annotations or {}).get(wire.ANNOTATION) if ts is not None else None

    def _topics_on(self, worker: str) -> set[str]:
        """The notebook topics of the tasks processing on ``worker`` (from their holds)."""
        state = self.scheduler.workers.get(worker)
        return holds_topics(self._annotation(ts.key) for ts in state.processing) if state is not None else set()

    # -- Dask hooks ----------------------------------------------------------------------
    def update_graph(self, scheduler: Scheduler, *, client: str, tasks: list[Any], **kwargs: Any) -> None:
        """Refuse, before any can run, the tasks that name a hold of another client (its
        own, a pre-authorized one drawn on, or one named to pay what a map's items earn
        beyond their own: the first client to name a hold owns it), or a hold closed
        here that no client owns any more, or a map of another client; and on an open
        network those that carry no hold: they ask for a resource no worker has, and are
        cancelled for their client. A task another client wants too (its key named again) is
        never refused for that: only, on an open network, given up for this client, as is a
        new task that would read another client's result (:meth:`_give_up_others`)."""
        cs = scheduler.clients.get(client)
        others = {key for key in tasks if key in scheduler.tasks and _wanted_by_another(scheduler.tasks[key], cs)}
        created = [key for key in tasks if key not in others and key in scheduler.tasks
                   and scheduler.tasks[key].run_spec is not None]
        if self.open_network:
            created = self._give_up_others(scheduler, client, cs, others, created)
        foreign = []
        for key in created:
            meta = self._annotation(key)
            if not isinstance(meta, dict):
                continue
            named = [hold for hold in (meta.get("hold"), meta.get("overflow")) if isinstance(hold, str)]
            ownerless = [hold for hold in named if hold in self.settlement.closed and hold not in self.owners.holds]
            job = meta.get("job")
            if self.owners.foreign(client, named) or ownerless or (
                    isinstance(job, str) and not self.owners.claim_job(client, job)):
                foreign.append(key)
                continue
            self.owners.claim(client, named)
            # a pre-authorized hold drawn on, or named to pay what a map's items earn beyond its own
            drawn = meta.get("hold") if "preauth" in meta else meta.get("overflow")
            if isinstance(drawn, str):
                self.preauth_owners[drawn] = client
        self._refuse_tasks(scheduler, foreign, client, "gpunet-foreign-hold",
                           "these tasks name a hold or a map of another session")
        if not self.open_network:
            return
        skipped = set(foreign)  # refused already
        refused = [key for key in created if key not in skipped and not wire.is_hold_annotation(self._annotation(key))]
        self._refuse_tasks(scheduler, refused, client, "gpunet-no-hold",
                           "this open network runs only tasks that carry a hold (submit through the gateway)")

    def _give_up_others(self, scheduler: Scheduler, client: str, cs: Any, others: set[Any],
                        created: list[Any]) -> list[Any]:
        """On an open network every task is one session's: where ``client``'s graph names
        another's task (``others``), it no longer wants it (cancelled for it alone; the other's
        task goes on untouched), and its new tasks that would take another's result as an
        input are refused. Returns the rest of ``created``."""
        wanted = [key for key in others if cs in scheduler.tasks[key].who_wants]
        if wanted:
            self.refused_tasks += len(wanted)
            logger.warning("gpunet metering: client %s named %d task(s) of another session", client, len(wanted))
            scheduler.client_releases_keys(keys=wanted, client=client, stimulus_id=f"gpunet-not-yours-{time.time()}")
            scheduler.report({"op": "cancelled-keys", "keys": wanted, "reason": "gpunet-foreign-task",
                              "msg": "these tasks are another session's"}, client=client)
        reading = [key for key in created
                   if any(_wanted_by_another(dep, cs) for dep in scheduler.tasks[key].dependencies)]
        self._refuse_tasks(scheduler, reading, client, "gpunet-foreign-input",
                           "these tasks would read another session's results")
        skipped = set(reading)
        return [key for key in created if key not in skipped]

    def _refuse_tasks(self, scheduler: Scheduler, refused: list[Any], client: str, reason: str, msg: str) -> None:
        """Keep ``refused`` tasks from running (a resource no worker has) and cancel them for ``client``,
        with no hold: nothing that happens to them moves credits."""
        if not refused:
            return
        for key in refused:
            ts = scheduler.tasks[key]
            ts.resource_restrictions = {REFUSED_RESOURCE: 1}
            # its hold is not its own to close: its cancellation must not release the owner's hold
            ts.annotations = {name: value for name, value in (ts.annotations or {}).items() if name != wire.ANNOTATION}
        self.refused_tasks += len(refused)
        logger.warning("gpunet metering: refused %d task(s) of client %s: %s", len(refused), client, msg)
        asyncio.get_running_loop().call_soon(
            lambda: scheduler.stimulus_cancel(refused, client, force=True, reason=reason, msg=msg))

    def remove_client(self, scheduler: Scheduler, client: str) -> None:
        """A notebook left: release the pre-authorized holds it drew on (what their tasks
        earned is paid first)."""
        holds = [hold for hold, owner in self.preauth_owners.items() if owner == client]
        for hold in holds:
            del self.preauth_owners[hold]
        if holds:
            self._after(self.settlement.release_holds(holds))
        self.owners.client_left(client)

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        """Queue a settlement for a successful attempt, a release for a failed task.
        An attempt is paid for the seconds between this scheduler sending it and
        hearing it finished; the worker's own figure may only lower that."""
        if self.scheduler is None:
            return
        meta = self._annotation(key)
        if not meta:
            return
        meta = items_run(meta, kwargs.get("metadata"))
        now = time.time()
        sent = self._dispatched.pop(key, now) if start == "processing" else None
        if finish == "processing":
            self._dispatched[key] = now
        seconds = min(_compute_seconds(kwargs), now - sent) if sent is not None else _compute_seconds(kwargs)
        worker = kwargs.get("worker")
        if finish == "processing" and worker is None:  # which worker it went to (a map's items are counted per worker)
            ts = self.scheduler.tasks.get(key)
            worker = ts.processing_on.address if ts is not None and ts.processing_on is not None else None
        self._after(self.settlement.transition(key, meta, start, finish, worker=worker,
                                               seconds=max(0.0, seconds), now=now))

    def remove_worker(self, scheduler: Scheduler, worker: str, **kwargs: Any) -> None:
        """Forget a worker that left: its address may be reused by someone else."""
        self.settlement.worker_left(worker)
        self.environments.pop(worker, None)
        if self.door is not None:
            self.door.worker_left(worker)

    # -- named handlers (gpunet.wire) ----------------------------------------------------
    async def verdict(self, client: str | None = None, job: str = "", copies: dict[str, bool] | None = None,
                      method: str = "", digest: str = "", checked: bool = True, **kwargs: Any) -> None:
        """Handler: a notebook's verdict on the copies of one unit of a verified job
        (:meth:`Settlement.verdict`, told which clients want each judged task). Where
        the notebook calls a copy a mismatch, the scheduler fetches the judged copies
        itself and compares their digests: the notebook's word alone does not make one."""
        tasks = {key: Owned(self._annotation(key), {cs.client_key for cs in self.scheduler.tasks[key].who_wants})
                 for key in copies or () if key in self.scheduler.tasks}
        self._check_owner(client, [owned.meta.get("hold") for owned in tasks.values() if owned.meta],
                          f"a verdict on job {job}")
        disputed = checked and any(not agreed for agreed in (copies or {}).values())
        # only this client's own copies of this job, and no more than a unit ever has
        judged = [key for key, owned in tasks.items()
                  if owned.meta and owned.meta.get("verify") == job and client in owned.owners]
        digests = await self._digests(judged[:DIGEST_FETCH_MAX_COPIES]) if disputed else {}
        self._after(self.settlement.verdict(client, job, copies or {}, tasks, method=method, digest=digest,
                                            checked=checked, digests=digests))
        # a result is kept for reuse only where at least two of the client's own copies of this job agreed
        if checked and digest and sum(bool((copies or {}).get(key)) for key in judged) >= 2:
            self._checked.setdefault((client, job), set()).add(digest)
            self._checked.move_to_end((client, job))
            while len(self._checked) > CHECKED_JOBS_KEPT:
                self._checked.popitem(last=False)

    async def _digests(self, keys: list[Any]) -> dict[Any, str]:
        """The result digests of tasks ``keys``, fetched from their workers by this scheduler
        (each at most :data:`DIGEST_FETCH_MAX_BYTES`; those it cannot fetch in time are left out)."""
        small = [key for key in keys if key in self.scheduler.tasks and self.scheduler.tasks[key].state == "memory"
                 and 0 <= self.scheduler.tasks[key].get_nbytes() <= DIGEST_FETCH_MAX_BYTES]
        if not small:
            return {}
        try:
            # a data-only job's result: codec frames (or, from an older provider, msgpack
            # bytes); nothing else is loaded here
            answer = await asyncio.wait_for(self.scheduler.gather(keys=small, serializers=list(DIGEST_SERIALIZERS)),
                                            DIGEST_FETCH_S)
        except Exception as exc:  # noqa: BLE001 - workers gone or slow: the verdict goes on without digests
            logger.warning("gpunet metering: could not fetch copies %s to compare them: %s", small, exc)
            return {}
        fetched = answer.get("data") or {} if isinstance(answer, dict) else {}
        return await asyncio.to_thread(_digests_of, fetched)

    def reuse_store(self, client: str | None = None, job: str = "", key: str = "",
                    record: dict[str, Any] | None = None, results: list[dict[str, Any]] | None = None) -> bool:
        """Handler: keep a verified result for reuse (gpunet.reuse). Kept only when
        every one of its results is one that a checked verdict of this client on this
        job accepted (its digest was the verdict's); returns whether it was kept."""
        self._check_owner(client, (), "keeping a result for reuse")
        accepted = self._checked.get((client, job), set())
        try:
            rebuilt = [result_from_event(result) for result in results or ()]
        except (TypeError, ValueError):
            return False
        if not rebuilt or not key or any(result_digest(result) not in accepted for result in rebuilt):
            return False
        size = sum(len(blob or b"") for result in rebuilt for blob in result.outputs.values())
        return self.reusable.put(self._reuse_entry(client, key), {"record": record or {}, "results": results}, size)

    def reuse_lookup(self, key: str = "", client: str | None = None) -> dict[str, Any] | None:
        """Handler: the verified result kept under ``key`` (``{record, results}``) for the
        calling client's account, or None."""
        self._check_owner(client, (), "looking up a result kept for reuse")
        return self.reusable.get(self._reuse_entry(client, key))

    def _reuse_entry(self, client: str | None, key: str) -> str:
        """Where a result kept under ``key`` for ``client`` goes in the reuse table: on an open
        network in its account's part (the gateway names each session's client after its account),
        so that no other account's store or lookup ever reaches it."""
        if not self.open_network:
            return key
        account = account_of(client)
        if account is None:
            self.owners.refused += 1
            raise NotYoursError(f"client {client} names no account: on an open network only the gateway's sessions "
                                "keep and look up results for reuse (run the same gpunet version on the gateway)")
        return f"{account}/{key}"

    def _check_owner(self, client: str | None, holds: Any, doing: str, *, job: str | None = None) -> None:
        """Refuse ``doing`` (:class:`NotYoursError`, logged) where ``client`` does not own ``holds``
        or map ``job`` (:meth:`Owners.check`); on an open network a call must name its client."""
        try:
            self.owners.check(client, [hold for hold in holds if isinstance(hold, str)], doing,
                              required=self.open_network, job=job)
        except NotYoursError as exc:
            logger.warning("gpunet metering: refused a call of client %s: %s", client, exc)
            raise

    def environments_of_workers(self) -> dict[str, dict[str, Any]]:
        """Handler: each provider's worker -> what its provider says is installed there,
        whether it installs more for a session, and whose it is (``provider``)."""
        return {address: {**report, "provider": self.settlement.providers[address].provider}
                for address, report in self.environments.items() if address in self.settlement.providers}

    def _on_environment_message(self, worker: str = "", environment: Any = None, **kwargs: Any) -> None:
        """Stream handler: a provider's worker says its installed distributions changed.
        Kept only for a worker already registered to a provider (on a private network
        any trusted party could send it; on an open one only the worker's own stream)."""
        if worker in self.settlement.providers:
            self._keep_environment(worker, environment)

    def _keep_environment(self, address: str, environment: Any) -> None:
        report = checked_environment(environment)
        if report is None:
            logger.warning("gpunet metering: worker %s sent a malformed environment report; it is ignored", address)
            self.environments.pop(address, None)
        else:
            self.environments[address] = report

    def charge_used(self, key: Any, client: str | None = None) -> int | None:
        """Handler: the notebook stops task ``key`` at its --max-credits; returns the
        credits charged to the provider of its worker (:meth:`Settlement.charge_used`).
        Only the client whose hold pays the task may."""
        meta = self._annotation(key)
        self._check_owner(client, [meta.get("hold")] if isinstance(meta, dict) else [], f"charging task {key}")
        ts = self.scheduler.tasks.get(key)
        worker = ts.processing_on.address if ts is not None and ts.processing_on is not None else None
        charged = self.settlement.charge_used(key, self._annotation(key), worker, time.time())
        self._after()
        return charged

    def executing(self, workers: list[str]) -> dict[str, int]:
        """Handler: how many tasks each of ``workers`` is processing (a provider
        draining its workers on an open network, where it is no Dask client)."""
        return {address: len(self.scheduler.workers[address].processing) if address in self.scheduler.workers else 0
                for address in workers}

    def release_holds(self, holds: list[str], client: str | None = None) -> None:
        """Handler: release holds whose tasks were never sent (the notebook's submit failed),
        or a session's pre-authorized holds (it closes, idles or refilled): only the client's
        own (a hold nobody named here is the caller's from now on)."""
        self._check_owner(client, holds, "releasing holds")
        for hold in holds:
            self.preauth_owners.pop(hold, None)
        self._after(self.settlement.release_holds(holds))

    def preauth_state(self, holds: list[str] | None = None, jobs: list[str] | None = None,
                      client: str | None = None) -> dict[str, Any]:
        """Handler: what was paid so far from each of ``holds`` (the client's own), in all and
        per job (:meth:`Settlement.preauth_state`); the notebook sizes its draws by it."""
        holds = list(holds or ())[:100]
        self._check_owner(client, holds, "reading what holds paid")
        return self.settlement.preauth_state(holds, list(jobs or ())[:10_000])

    def map_state(self, job: str = "", client: str | None = None) -> dict[str, Any] | None:
        """Handler: how far map ``job`` (the client's own) has got (:meth:`Settlement.map_state`)."""
        self._check_owner(client, (), "reading a map's state", job=str(job))
        threads = {address: state.nthreads for address, state in self.scheduler.workers.items()}
        return self.settlement.map_state(str(job), threads)

    def grow_map(self, client: str = "", job: str = "", hold: str = "", amount: int = 0) -> bool:
        """Handler: client ``client`` placed hold ``hold`` of ``amount`` credits to pay what
        its map ``job``'s items earn beyond its holds (:meth:`Settlement.grow`). The client
        owns the hold from then on (another naming it is refused, and it is released when
        the client leaves); a hold another client named first is refused."""
        self._check_owner(client, (), "growing a map", job=str(job))
        if not isinstance(hold, str) or not hold or self.owners.foreign(client, [hold]):
            return False
        self.owners.claim(client, [hold])
        self.preauth_owners[hold] = client
        grown = self.settlement.grow(str(job), hold, amount)
        self._after()
        return grown

    def pause_map(self, client: str = "", keys: list[Any] | None = None) -> int:
        """Handler: cancel, for ``client``, those of its map's tasks ``keys`` that no worker
        was sent yet (the map's budget cannot pay for more); those running go on. Decided and
        done in one step here, so no task is sent between the two. Returns how many."""
        self._check_owner(client, (), "pausing a map")
        unsent = []
        cs = self.scheduler.clients.get(client)
        for key in list(keys or ())[:1_000_000]:
            ts = self.scheduler.tasks.get(key)
            if ts is not None and (cs is None or cs not in ts.who_wants) and ts.who_wants:
                self.owners.refused += 1
                raise NotYoursError(f"pausing a map refused: task {key} is another notebook session's; a session "
                                    "acts only on its own holds, tasks and maps")
            if ts is not None and cs is not None and ts.who_wants == {cs} and ts.state in UNSENT_STATES:
                unsent.append(key)
        if unsent:
            self.scheduler.stimulus_cancel(unsent, client, force=False, reason="gpunet-budget",
                                           msg="the map's budget cannot pay for more items")
        return len(unsent)

    def close_unknown(self, hold: str, keys: list[Any], client: str | None = None) -> None:
        """Handler: tasks of ``hold`` (the client's own) the notebook saw cancelled, which this
        scheduler may never have created (``update_graph`` refuses a graph whose input was lost)."""
        self._check_owner(client, [hold], "closing a hold")
        cs = self.scheduler.clients.get(client) if client is not None else None
        pending = sum(1 for ts in (cs.wants_what if cs is not None else ())
                      if ts.state not in ("memory", "erred") and (self._annotation(ts.key) or {}).get("hold") == hold)
        self._after(self.settlement.close_unknown(hold, keys, self.scheduler.tasks, pending))

    def state(self) -> dict[str, Any]:
        """Handler: how far the reports have got, and the providers' rates."""
        s = self.settlement
        return {"credits": self.credits_url, "queued": len(s.queue), "reported": self.reporter.reported,
                "failed": len(self.reporter.failed), "default_rate": s.default_rate, "max_rate": self.max_rate,
                "default_max_rate": self.default_max_rate,
                "default_provider": s.default_provider, "awaiting_verdict": len(s.awaiting),
                "maps_open": sum(share.tasks is not None for share in s.shared.values()),
                "preauthorized_open": sum(share.tasks is None for share in s.shared.values()), "verdicts": s.verdicts,
                "overruled": s.overruled, "short": s.short, "grown_holds": s.grown_holds, "unblamed": s.unblamed, "quarantined": sorted(s.quarantined),
                "refused_registrations": self.refused_registrations,
                "network": "open" if self.open_network else "private", "refused_tasks": self.refused_tasks,
                "refused_calls": self.owners.refused,
                "refused_requests": self.door.refused if self.door is not None else 0,
                "providers": self.providers, "running": self.running(), "meter": self.meter_account}

    def running(self) -> dict[str, list[dict[str, Any]]]:
        """Worker address -> the metered tasks it runs now, each as ``{"kind", "held", "for_s"}``:
        the kind of job (:func:`gpunet.wire.job_kind`), the credits its hold may pay for it, and the
        seconds since it went there. What a provider's dashboard shows; never a task's data."""
        now = time.time()
        running: dict[str, list[dict[str, Any]]] = {}
        for address, ws in self.scheduler.workers.items():
            tasks = running[address] = []
            for ts in ws.processing:
                meta = (ts.annotations or {}).get(wire.ANNOTATION)
                if meta and meta.get("hold"):
                    since = self.settlement.dispatched.get(ts.key, now)
                    tasks.append({"kind": wire.job_kind(meta), "held": int(meta.get("amount", 0)),
                                  "for_s": round(now - since, 1)})
        return running

    # -- providers -----------------------------------------------------------------------
    def _on_register_message(self, worker: str = "", token: str = "", rate: float = 1.0, environment: Any = None,
                             **kwargs: Any) -> None:
        """Stream handler. Dask passes the sending worker's address as ``worker``, but a
        message's own keys win over it, so anyone may claim any worker here:
        :meth:`register_provider` has the named worker confirm it first. On an open
        network the worker's stream can no longer name another worker, and its
        provider is the one its certificate binds (:meth:`register_certified`)."""
        if self.door is not None:
            asyncio.ensure_future(self.register_certified(worker, rate, environment))
        else:
            asyncio.ensure_future(self.register_provider(worker, token, rate, environment))

    async def register_provider(self, address: str, token: str, rate: float,
                                environment: Any = None) -> dict[str, Any]:
        """Check a worker's provider token and rate, and pay that provider for the
        worker's tasks from now on. Returns ``{"provider": account}`` or ``{"error": ...}``."""
        def check() -> str:
            with CreditClient(self.credits_url, token) as as_provider:
                account = as_provider.ping()["account"]
                role = as_provider.account(account).get("role")
            if role != "provider":
                raise CreditsError(f"account {account!r} is a {role!r} account, not a provider")
            return account

        # Nothing an unconfirmed message says may touch the named worker's state: anyone
        # can name any worker, so it is asked first.
        if not await self._confirmed(address, token):
            self.refused_registrations += 1
            return self._refuse(address, f"{address} did not confirm that it sent this registration "
                                         "(someone else named it?)", give_up=False)
        try:
            account = await asyncio.to_thread(check)
        except CreditsError as exc:
            return self._refuse(address, f"the credit service at {self.credits_url} did not accept this provider's "
                                         f"token: {exc}")
        return await self._admit(address, account, rate, environment)

    async def register_certified(self, address: str, rate: float, environment: Any = None) -> dict[str, Any]:
        """Pay the provider whose certificate registered worker ``address`` (open
        network) for its tasks from now on, at ``rate``. Returns ``{"provider":
        account}`` or ``{"error": ...}``."""
        account = self.door.owners.get(address)
        if account is None:
            self.refused_registrations += 1
            return self._refuse(address, f"{address} was not registered with a provider certificate", give_up=False)
        return await self._admit(address, account, rate, environment)

    def _refuse(self, address: str, error: str, give_up: bool = True) -> dict[str, Any]:
        if give_up:  # what the worker was owed is released: nobody is paid for it
            self._give_up_on(address)
        logger.error("gpunet metering: worker %s refused: %s", address, error)
        return {"error": error}

    async def _admit(self, address: str, account: str, rate: float, environment: Any = None) -> dict[str, Any]:
        """The checks every provider's worker passes, whoever said who it is."""
        if not (isinstance(rate, (int, float)) and 0 < rate <= self.max_rate):
            return self._refuse(address, f"a provider's rate must be in (0, {self.max_rate:g}] credits per second, "
                                         f"got {rate!r}")
        known = self.settlement.providers.get(address)
        if known is not None and known.provider != account:
            return self._refuse(address, f"{address} already belongs to provider {known.provider}; "
                                         f"{account} may not take it", give_up=False)
        if await asyncio.to_thread(self._is_quarantined, account):
            await self._retire([address])
            return self._refuse(address, f"provider {account} is quarantined until an operator clears it "
                                         "(gpunet credits clear-quarantine)")
        self._after(self.settlement.provider_registered(address, account, rate, self.scheduler.tasks))
        if environment is not None:
            self._keep_environment(address, environment)
        logger.info("gpunet metering: worker %s belongs to provider %s at %s credits/s", address, account, rate)
        return {"provider": account}

    async def _confirmed(self, address: str, token: str) -> bool:
        """Whether the worker at ``address`` confirms that its provider token is ``token``
        (asked on a connection this scheduler opens to it, so the answer is the worker's)."""
        if not isinstance(token, str) or not token:
            return False
        for attempt in range(CONFIRM_ATTEMPTS):  # a worker busy starting up may answer late
            if address not in self.scheduler.workers:
                return False
            try:
                answer = await asyncio.wait_for(
                    getattr(self.scheduler.rpc(address), wire.CONFIRM_PROVIDER)(digest=wire.token_digest(token)),
                    CONFIRM_TIMEOUT_S)
                return answer is True
            except Exception as exc:  # noqa: BLE001 - no handler (not a gpunet provider, or too old), gone, slow
                logger.warning("gpunet metering: worker %s could not confirm a registration (attempt %d): %s",
                               address, attempt + 1, exc)
                await asyncio.sleep(0.5 * (attempt + 1))
        return False

    def _is_quarantined(self, account: str) -> bool:
        """Whether the credit service has ``account`` quarantined (what this scheduler
        last learned, while the service cannot be reached)."""
        try:
            return bool(self._client.provider_record(account).get("quarantined"))
        except Exception as exc:  # noqa: BLE001 - an unreachable service must not block registration
            logger.warning("gpunet metering: could not read %s's trust record: %s", account, exc)
            return account in self.settlement.quarantined

    async def _retire(self, workers: list[str]) -> None:
        if workers:
            try:
                await self.scheduler.retire_workers(workers=workers, close_workers=True,
                                                    stimulus_id=f"gpunet-quarantine-{time.time()}")
            except Exception:  # noqa: BLE001 - a worker that is already gone is fine
                logger.exception("gpunet metering: could not retire %s", workers)


def _digests_of(results: dict[Any, Any]) -> dict[Any, str]:
    """The digests (:func:`gpunet.verify.quorum.result_digest`) of results as workers sent
    them: a data-only job's codec frames or encoded bytes (as msgpack: no other payload is
    loaded, never a pickle), each within :data:`DIGEST_FETCH_MAX_BYTES`; what is not that,
    or cannot be decoded, has none (a trusted network's pickled results are compared by
    the notebook only)."""
    digests = {}
    for key, data in results.items():
        try:
            if isinstance(data, Serialized):
                data = deserialize(data.header, data.frames, deserializers=DIGEST_SERIALIZERS)
            frames = codec.frames_of(data)
            if frames is not None or isinstance(data, (bytes, bytearray, memoryview)):
                encoded = frames if frames is not None else bytes(data)
                data = result_from_event(codec.decode(encoded, max_bytes=DIGEST_FETCH_MAX_BYTES,
                                                      what="a copy's result"))
            if isinstance(data, wire.JobResult):
                digests[key] = result_digest(data)
        except Exception as exc:  # noqa: BLE001 - a copy that cannot be read is compared by the notebook only
            logger.warning("gpunet metering: could not digest copy %s: %s", key, exc)
    return digests


#: Most distributions an environment report may list, and the longest name or version kept.
MAX_REPORTED_PACKAGES = 5000
MAX_PACKAGE_TEXT = 200


def checked_environment(report: Any) -> dict[str, Any] | None:
    """A provider's environment report as the scheduler keeps it (only the expected
    fields, each of its type, sizes capped), or None when it is malformed."""
    if not isinstance(report, dict):
        return None
    packages = report.get("packages")
    installs = report.get("installs")
    if (not isinstance(packages, dict) or len(packages) > MAX_REPORTED_PACKAGES
            or not all(isinstance(k, str) and isinstance(v, str) and len(k) <= MAX_PACKAGE_TEXT
                       and len(v) <= MAX_PACKAGE_TEXT for k, v in packages.items())):
        return None
    if installs is not None and not (isinstance(installs, dict) and all(
            type(installs.get(key)) in kinds for key, kinds in
            (("max_bytes", (int,)), ("max_seconds", (int, float)), ("builds", (bool,))))):
        return None
    return {"packages": dict(packages), "installs": dict(installs) if installs is not None else None,
            "gpu": report.get("gpu") is True, "python": str(report.get("python", ""))[:16],
            "platform": str(report.get("platform", ""))[:64]}


def _wanted_by_another(ts: Any, cs: Any) -> bool:
    """Whether task ``ts`` is another client's than ``cs``'s: another wants it, or one of its
    dependents, which another wants (a task wanted by nobody is no one's yet)."""
    return any(other is not cs for other in ts.who_wants) or any(
        other is not cs for dependent in ts.dependents for other in dependent.who_wants)


#: Task states in which no worker has been sent the task yet.
UNSENT_STATES = frozenset({"released", "waiting", "queued", "no-worker"})


def _compute_seconds(kwargs: dict[str, Any]) -> float:
    """Seconds the attempt computed, from a ``processing -> memory`` transition's startstops."""
    return sum(ss["stop"] - ss["start"] for ss in kwargs.get("startstops", ()) if ss.get("action") == "compute")


@click.command()
@click.option("--credits", "credits_url", required=True, help="the credit service's URL")
@click.option("--token-file", "--operator-token-file", "token_file", required=True,
              type=click.Path(exists=True, dir_okay=False),
              help="the token the plugin reports with: a meter account's (or, on a private network, the operator's)")
@click.option("--default-provider", default=None, help="who is paid for workers that name no provider")
@click.option("--default-max-rate", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="the price limit (credits per device-second) of a notebook that sets none")
@click.option("--max-rate", type=click.FloatRange(min=0, min_open=True), default=100.0, show_default=True,
              help="the most a provider may ask (credits per device-second)")
def dask_setup(scheduler: Scheduler, credits_url: str, token_file: str, default_provider: str | None,
               default_max_rate: float, max_rate: float) -> None:
    """Entry point for ``--preload gpunet.extensions.scheduler_plugin`` with
    ``--preload-argv`` / ``preload_argv``: meter this scheduler's work against the
    credit service (``gpunet scheduler --credits`` and the embedded network do this).
    A scheduler whose own certificate binds the scheduler role runs an open network."""
    with open(token_file) as file:
        token = file.read().strip()
    scheduler.add_plugin(GpunetMeteringPlugin(credits_url, token, default_provider=default_provider,
                                              open_network=is_open_network(scheduler), max_rate=max_rate,
                                              default_max_rate=default_max_rate))


def is_open_network(scheduler: Scheduler) -> bool:
    """Whether ``scheduler`` runs an open network: its certificate binds gpunet's
    scheduler role. Such a scheduler must require encryption, or it is refused."""
    cert = scheduler.security.tls_scheduler_cert
    identity = identity_of_file(cert) if cert else None
    if identity is None or identity.role != SCHEDULER:
        return False
    if not scheduler.security.require_encryption:
        raise ValueError("an open network's scheduler must require TLS (Security(require_encryption=True))")
    return True
