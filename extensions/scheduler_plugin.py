"""gpunet's Dask scheduler plugin: meters every task attempt against the credit service.

The notebook places a hold on its session's credits before it sends a job, and
annotates the job's tasks with the hold ids (``dask.annotate(gpunet=...)``). This
plugin watches each task's transitions:

- ``processing -> memory``: the attempt succeeded on a worker. Its hold is settled
  to that worker's provider at ``ceil(compute seconds x the provider's rate)``
  credits (at least 1), never more than the hold; the rest goes back to the session.
- the tasks of a map share one hold (annotated with ``tasks``, how many share it;
  each may be paid at most ``amount``): what its items earn is added up per
  provider and paid out in parts (``settle_part``, one per provider per report),
  and the rest is released once every item is done. A map of 2,000 items costs the
  credit service a handful of requests, not 2,000 holds and 2,000 settlements.
- ``processing -> erred``, or a task forgotten before it ever succeeded
  (cancelled, interrupted, lost for good): the hold is released, nobody is paid.
- an attempt lost with its worker is simply not paid: the task runs again under the
  same hold, and only the attempt that succeeds is paid for.
- a copy of a verified job (annotated with ``verify``, see :mod:`gpunet.verify`)
  that succeeded waits for the notebook's verdict instead: a copy in the agreeing
  quorum is settled with a ledger memo saying how it was verified, by which
  providers and on which digest; a copy that disagreed is released, unpaid; each
  provider's trust record in the credit service gets the outcome. A copy whose
  task is forgotten before any verdict came is released: nobody is paid for work
  that was never verified. A provider the credit service quarantines has its
  workers retired and its registration refused until an operator clears it.

Reports go to the credit service in batches from a queue, each with an idempotency
key derived from its hold (``settle-<hold>``, ``release-<hold>``), so a retry never
moves credits twice; while the service is unreachable they stay queued and are
retried with backoff, for as long as the scheduler runs.

Start a scheduler with ``--preload gpunet.extensions.scheduler_plugin`` and
``--preload-argv "--credits URL --operator-token-file F"`` (``gpunet scheduler
--credits URL --operator-token-file F`` and the embedded network do). The notebook
reaches the plugin through the named scheduler handlers it registers
(:mod:`gpunet.wire`: ``client.scheduler.gpunet_metering_state()`` and so on).

Providers: a worker started by ``gpunet provide`` registers over its own stream
to the scheduler (a ``gpunet-register-provider`` message, which the scheduler
attributes to the worker whose connection carried it, so nobody can register
another's worker), presenting its provider's credit token and rate. The plugin
checks the token with the credit service (it must belong to a ``provider``
account), refuses a rate above ``max_rate`` and an address already registered to
another account, and pays that account for the worker's tasks; the token itself is
not kept. Providers can only report in this way: settling is the scheduler's.

Known limit: Dask lets every client run code on the scheduler
(``Client.run_on_scheduler``), so a scheduler that holds the operator token must
only admit trusted notebooks (docs/architecture.md, "Three kinds of network").
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from typing import TYPE_CHECKING, Any

import click
from distributed.diagnostics.plugin import SchedulerPlugin

from gpunet import wire
from gpunet.credits import CreditClient, CreditsError, CreditsUnavailableError
from gpunet.wire import ANNOTATION

if TYPE_CHECKING:  # pragma: no cover
    from distributed import Scheduler

logger = logging.getLogger(__name__)

#: Items per batch request to the credit service.
BATCH_SIZE = 2000
#: How long an attempt on a worker that has not registered its provider yet waits
#: for that registration before its hold is released (nobody paid).
REGISTRATION_WAIT_S = 60.0
#: How long the reporter lets movements gather before it sends them.
REPORT_DELAY_S = 0.25
#: Longest wait between retries while the credit service is unreachable.
MAX_BACKOFF_S = 5.0


def price(seconds: float, rate: float, cap: int) -> int:
    """Credits for ``seconds`` of a device at ``rate`` credits per second: at least 1,
    at most ``cap`` (the hold)."""
    return max(1, min(int(cap), math.ceil(seconds * rate)))


class GpunetMeteringPlugin(SchedulerPlugin):
    """Settles or releases each task's hold as its attempts finish (see the module
    docstring). ``default_provider`` / ``default_rate`` apply to workers that did
    not say who they are (plain ``dask worker`` processes)."""

    name = wire.METERING_PLUGIN
    idempotent = True

    def __init__(self, credits_url: str, operator_token: str, *, default_provider: str | None = None,
                 default_rate: float = 1.0, max_rate: float = 100.0) -> None:
        self.credits_url = credits_url
        self.operator_token = operator_token
        self.default_provider = default_provider
        self.default_rate = default_rate
        self.max_rate = max_rate
        self.scheduler: Scheduler | None = None
        self.queue: collections.deque[dict[str, Any]] = collections.deque()
        self.closed_holds: set[str] = set()  # holds already settled or released here
        self.reported = 0
        self.failed: list[dict[str, Any]] = []  # refused by the service for good (logged)
        #: worker address -> {"provider": account, "rate": credits per device-second}
        self.providers: dict[str, dict[str, Any]] = {}
        #: when each metered task went to a worker (for --max-credits charges)
        self.dispatched: dict[Any, float] = {}
        #: successful attempts on workers whose provider is not known yet: (hold, seconds, cap)
        self.owed: dict[str, list[tuple[str, float, int]]] = {}
        #: verified copies that succeeded, by hold: {"key", "provider", "amount", "job"}
        self.awaiting: dict[str, dict[str, Any]] = {}
        #: maps' shared holds still open: hold -> SharedHold
        self.shared: dict[str, SharedHold] = {}
        #: providers the credit service has quarantined (learned from its answers)
        self.quarantined: set[str] = set()
        self.verdicts = 0
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._client: Any = None

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self, scheduler: Scheduler) -> None:
        """Start the reporter that sends queued movements to the credit service."""
        self.scheduler = scheduler
        self._client = CreditClient(self.credits_url, self.operator_token)
        scheduler.stream_handlers[wire.REGISTER_PROVIDER] = self._on_register_message
        scheduler.handlers.update({
            wire.METERING_STATE: self.state,
            wire.RELEASE_HOLDS: self.release_holds,
            wire.CLOSE_UNKNOWN: self.close_unknown,
            wire.CHARGE_USED: self.charge_used,
            wire.VERDICT: self.verdict,
        })
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._report_forever(), name="gpunet-metering-reporter")

    async def before_close(self) -> None:
        """Try for a few seconds to send what is still queued: what maps' items earned,
        and the release of maps' holds whose items will now never finish."""
        if self._task is None:
            return
        for hold in list(self.shared):
            self.release_holds([hold])
        for _ in range(50):
            if not self.queue:
                break
            self._wake.set()
            await asyncio.sleep(0.1)
        self._task.cancel()
        if self.queue:
            logger.warning("gpunet metering: %d movements not reported at shutdown", len(self.queue))

    # -- transitions -------------------------------------------------------------------
    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        """Queue a settlement for a successful attempt, a release for a failed task."""
        if self.scheduler is None:
            return
        ts = self.scheduler.tasks.get(key)
        meta = (ts.annotations or {}).get(ANNOTATION) if ts is not None else None
        if not meta:
            return
        hold = _hold_of(key, meta)
        if hold is None:
            if finish in ("memory", "erred", "forgotten"):
                logger.error("gpunet metering: task %s carries a gpunet annotation without a hold", key)
            return
        if finish == "processing":
            self.dispatched[key] = time.time()
        else:
            self.dispatched.pop(key, None)
        if "tasks" in meta:
            self._shared_transition(key, start, finish, meta, hold, kwargs)
            return
        if hold in self.closed_holds:
            return
        if start == "processing" and finish == "memory":
            worker = kwargs.get("worker")
            seconds = _compute_seconds(kwargs)
            provider, rate = self._provider_of(worker)
            if provider is None:
                # The worker's registration may still be on its way (or being checked):
                # keep the attempt owed to it, settled once it registers, released if never.
                self.closed_holds.add(hold)
                self.owed.setdefault(worker, []).append((hold, seconds, meta.get("amount", 1), key, meta))
                asyncio.get_running_loop().call_later(REGISTRATION_WAIT_S, self._give_up_on, worker)
                return
            self._succeeded(key, meta, hold, provider, price(seconds, rate, meta.get("amount", 1)))
        elif finish == "erred" or finish == "forgotten":
            self.awaiting.pop(hold, None)
            self._close(hold, {"op": "release", "hold": hold, "key": f"release-{hold}"})

    # -- maps: one hold shared by their items -------------------------------------------
    def _shared_transition(self, key: Any, start: str, finish: str, meta: dict[str, Any], hold: str,
                           kwargs: dict[str, Any]) -> None:
        share = self.shared.get(hold)
        if share is None:
            if hold in self.closed_holds:
                return
            share = self.shared[hold] = SharedHold(int(meta["tasks"]))
        if key in share.done or key in share.owed:
            return  # paid or refused already: a re-run after its result was lost is not paid again
        if start == "processing" and finish == "memory":
            worker = kwargs.get("worker")
            seconds = _compute_seconds(kwargs)
            provider, rate = self._provider_of(worker)
            if provider is None:
                share.owed.add(key)
                self.owed.setdefault(worker, []).append((hold, seconds, meta.get("amount", 1), key, meta))
                asyncio.get_running_loop().call_later(REGISTRATION_WAIT_S, self._give_up_on, worker)
                return
            self._succeeded(key, meta, hold, provider, price(seconds, rate, meta.get("amount", 1)))
        elif finish in ("erred", "forgotten"):
            self._shared_done(hold, key, None, 0)

    def _shared_done(self, hold: str, key: Any, provider: str | None, amount: int) -> None:
        """One item of a map is done: add what it earned to its provider's next part,
        and close the hold once every item is done."""
        share = self.shared.get(hold)
        if share is None:
            return
        share.owed.discard(key)
        share.done.add(key)
        if provider is not None and provider not in self.quarantined:
            part = share.parts.setdefault(provider, [0, 0])
            part[0] += amount
            part[1] += 1
            if self._wake is not None:
                self._wake.set()
        if len(share.done) >= share.tasks:
            self._flush_parts(hold)
            del self.shared[hold]
            self._close(hold, {"op": "release", "hold": hold, "key": f"release-{hold}"})

    def _flush_parts(self, only: str | None = None) -> None:
        """Queue what maps' items earned since the last report: one ``settle_part`` per
        hold and provider (keyed by its sequence number, so a retry pays it once)."""
        for hold, share in ([(only, self.shared[only])] if only else list(self.shared.items())):
            self._queue_parts(hold, share)

    def _queue_parts(self, hold: str, share: SharedHold) -> None:
        for provider, (amount, tasks) in share.parts.items():
            share.sequence += 1
            self._queue({"op": "settle_part", "hold": hold, "provider": provider, "amount": amount,
                         "memo": {"tasks": tasks}, "key": f"part-{hold}-{share.sequence}"})
        share.parts.clear()

    def _succeeded(self, key: Any, meta: dict[str, Any], hold: str, provider: str, amount: int) -> None:
        """Settle a successful attempt, or, for a copy of a verified job, keep it until
        the notebook's verdict (a recomputed copy replaces its earlier attempt); an
        item of a map adds to its shared hold's next part."""
        if "tasks" in meta:
            self._shared_done(hold, key, provider, amount)
            return
        if meta.get("verify"):
            if key not in self.scheduler.tasks:  # forgotten while its provider was being checked
                self._close(hold, {"op": "release", "hold": hold, "key": f"release-{hold}"})
                return
            self.closed_holds.discard(hold)
            self.awaiting[hold] = {"key": key, "provider": provider, "amount": amount, "job": meta["verify"]}
            return
        if provider in self.quarantined:  # finished while its workers were being retired: not paid
            self._close(hold, {"op": "release", "hold": hold, "key": f"release-{hold}"})
            return
        self._close(hold, {"op": "settle", "hold": hold, "provider": provider, "amount": amount,
                           "key": f"settle-{hold}"})

    def verdict(self, client: str | None = None, job: str = "", copies: dict[str, bool] | None = None,
                method: str = "", digest: str = "", checked: bool = True, **kwargs: Any) -> None:
        """Handler for a notebook's verdict on the copies of one unit of a
        verified job: ``copies`` maps each copy's task key to whether it is in the
        agreeing quorum. Only the client that wants those tasks may judge them;
        the providers named in the ledger memo are the ones this scheduler saw run
        the copies, not what the notebook says."""
        if client is None or not copies:
            return
        judged: list[tuple[str, dict[str, Any], bool]] = []
        for key, agreed in copies.items():
            ts = self.scheduler.tasks.get(key)
            meta = (ts.annotations or {}).get(ANNOTATION) if ts is not None else None
            if not meta or meta.get("verify") != job or not any(cs.client_key == client for cs in ts.who_wants):
                logger.error("gpunet metering: client %s judged task %s, which is not one of its copies of job %s",
                             client, key, job)
                continue
            hold = _hold_of(key, meta)
            copy = self.awaiting.pop(hold, None) if hold is not None else None
            if copy is not None:
                judged.append((hold, copy, bool(agreed)))
        agreeing = sorted({copy["provider"] for _, copy, agreed in judged if agreed})
        memo = {"verified": method, "providers": agreeing, "digest": digest}
        if not checked:
            memo["checked"] = False
        for hold, copy, agreed in judged:
            if agreed and copy["provider"] not in self.quarantined:
                self._close(hold, {"op": "settle", "hold": hold, "provider": copy["provider"],
                                   "amount": copy["amount"], "memo": {**memo, "task": str(copy["key"])},
                                   "key": f"settle-{hold}"})
            else:
                self._close(hold, {"op": "release", "hold": hold, "key": f"release-{hold}"})
            if checked and copy["provider"] not in self.quarantined:
                self._queue({"op": "record_verification", "provider": copy["provider"], "agreed": agreed,
                             "key": f"verdict-{hold}"})
        self.verdicts += 1

    def charge_used(self, key: Any) -> int | None:
        """The notebook stops task ``key`` at its --max-credits: pay the provider of
        the worker it is on for the time since it went there (at that provider's rate,
        at most the hold). The scheduler, not the notebook, knows the worker and the
        time. Returns the credits charged, or None when there is nothing to charge."""
        ts = self.scheduler.tasks.get(key)
        meta = (ts.annotations or {}).get(ANNOTATION) if ts is not None else None
        hold = _hold_of(key, meta) if meta else None
        if hold is None or "tasks" in meta or hold in self.closed_holds or ts.processing_on is None:
            return None  # a map's items are not stopped at a limit: they hold their share
        provider, rate = self._provider_of(ts.processing_on.address)
        if provider is None:
            return None
        seconds = time.time() - self.dispatched.get(key, time.time())
        amount = price(seconds, rate, meta.get("amount", 1))
        self._close(hold, {"op": "settle", "hold": hold, "provider": provider, "amount": amount,
                           "key": f"settle-{hold}"})
        return amount

    def release_holds(self, holds: list[str]) -> None:
        """Release holds whose tasks were never sent (the notebook's submit failed)."""
        for hold in holds:
            share = self.shared.pop(hold, None)
            if share is not None:  # some items were sent after all: pay what they earned first
                self._queue_parts(hold, share)
            if hold not in self.closed_holds:
                self._close(hold, {"op": "release", "hold": hold, "key": f"release-{hold}"})

    def close_unknown(self, hold: str, keys: list[Any]) -> None:
        """The notebook saw tasks of ``hold`` cancelled that this scheduler may never
        have created (``update_graph`` refuses a graph whose input was lost): count
        the unknown ones as done, unpaid, so that the hold is closed."""
        if len(keys) == 1 and hold not in self.shared:  # a cell's own hold
            if keys[0] not in self.scheduler.tasks and hold not in self.closed_holds:
                self._close(hold, {"op": "release", "hold": hold, "key": f"release-{hold}"})
            return
        if hold in self.closed_holds:
            return
        share = self.shared.setdefault(hold, SharedHold(len(keys)))
        for key in keys:
            if key not in self.scheduler.tasks and key not in share.done and key not in share.owed:
                self._shared_done(hold, key, None, 0)

    def state(self) -> dict[str, Any]:
        """Handler: how far the reports have got, and the providers' rates."""
        return {"credits": self.credits_url, "queued": len(self.queue), "reported": self.reported,
                "failed": len(self.failed), "default_rate": self.default_rate, "max_rate": self.max_rate,
                "default_provider": self.default_provider, "awaiting_verdict": len(self.awaiting),
                "maps_open": len(self.shared), "verdicts": self.verdicts, "quarantined": sorted(self.quarantined),
                "providers": {address: dict(info) for address, info in self.providers.items()}}

    def _on_register_message(self, worker: str, token: str = "", rate: float = 1.0, **kwargs: Any) -> None:
        """Stream handler: only a worker's own stream passes ``worker``, so a client
        cannot register anyone's worker."""
        asyncio.ensure_future(self.register_provider(worker, token, rate))

    def remove_worker(self, scheduler: Scheduler, worker: str, **kwargs: Any) -> None:
        """Forget a worker that left: its address may be reused by someone else."""
        self.providers.pop(worker, None)

    async def register_provider(self, address: str, token: str, rate: float) -> dict[str, Any]:
        """Check a worker's provider token and rate, and pay that provider for the
        worker's tasks from now on. Returns ``{"provider": account}`` or ``{"error": ...}``."""
        def check() -> str:
            with CreditClient(self.credits_url, token) as as_provider:
                account = as_provider.ping()["account"]
            roles = {a["account"]: a.get("role") for a in self._client.accounts()}
            if roles.get(account) != "provider":
                raise CreditsError(f"account {account!r} is a {roles.get(account)!r} account, not a provider")
            return account

        if not (isinstance(rate, (int, float)) and 0 < rate <= self.max_rate):
            self._give_up_on(address)
            logger.error("gpunet metering: worker %s asked for rate %r; this scheduler pays 0 < rate <= %s",
                         address, rate, self.max_rate)
            return {"error": f"a provider's rate must be in (0, {self.max_rate:g}] credits per second, got {rate!r}"}
        try:
            account = await asyncio.to_thread(check)
        except CreditsError as exc:
            self._give_up_on(address)
            logger.error("gpunet metering: worker %s presented a token the credit service refused: %s", address, exc)
            return {"error": f"the credit service at {self.credits_url} did not accept this provider's token: {exc}"}
        known = self.providers.get(address)
        if known is not None and known["provider"] != account:
            logger.error("gpunet metering: %s already belongs to %s; %s may not take it", address,
                         known["provider"], account)
            return {"error": f"{address} is already registered to another provider"}
        if await asyncio.to_thread(self._is_quarantined, account):
            self._give_up_on(address)
            await self._retire([address])
            logger.error("gpunet metering: provider %s is quarantined; its worker %s was sent away", account, address)
            return {"error": f"provider {account} is quarantined until an operator clears it "
                             "(gpunet credits clear-quarantine)"}
        self.quarantined.discard(account)  # an operator may have cleared it since
        self.providers[address] = {"provider": account, "rate": float(rate)}
        for hold, seconds, cap, key, meta in self.owed.pop(address, []):
            self._succeeded(key, meta, hold, account, price(seconds, rate, cap))
        logger.info("gpunet metering: worker %s belongs to provider %s at %s credits/s", address, account, rate)
        return {"provider": account}

    def _provider_of(self, worker: str | None) -> tuple[str | None, float]:
        info = self.providers.get(worker) if worker is not None else None
        if info:
            return info["provider"], info["rate"]
        return self.default_provider, self.default_rate

    def _give_up_on(self, worker: str) -> None:
        """A worker that never registered a provider: release what it was owed."""
        for hold, _, _, key, meta in self.owed.pop(worker, []):
            logger.error("gpunet metering: worker %s names no provider; its task %s is not paid", worker, key)
            if "tasks" in meta:
                self._shared_done(hold, key, None, 0)
            else:
                self._queue({"op": "release", "hold": hold, "key": f"release-{hold}"})

    def _is_quarantined(self, account: str) -> bool:
        """Whether the credit service has ``account`` quarantined (what this scheduler
        last learned, while the service cannot be reached)."""
        try:
            return bool(self._client.provider_record(account).get("quarantined"))
        except Exception as exc:  # noqa: BLE001 - an unreachable service must not block registration
            logger.warning("gpunet metering: could not read %s's trust record: %s", account, exc)
            return account in self.quarantined

    def _learn_quarantine(self, record: dict[str, Any]) -> None:
        """A trust record came back from the credit service: retire the workers of a
        provider that it quarantined, so that it gets no more work."""
        provider = record.get("provider")
        if not record.get("quarantined") or provider in self.quarantined:
            return
        self.quarantined.add(provider)
        workers = [address for address, info in self.providers.items() if info["provider"] == provider]
        logger.error("gpunet metering: provider %s is quarantined (%s); retiring its workers %s", provider,
                     record.get("quarantine_reason"), workers)
        asyncio.ensure_future(self._retire(workers))

    async def _retire(self, workers: list[str]) -> None:
        if workers:
            try:
                await self.scheduler.retire_workers(workers=workers, close_workers=True,
                                                    stimulus_id=f"gpunet-quarantine-{time.time()}")
            except Exception:  # noqa: BLE001 - a worker that is already gone is fine
                logger.exception("gpunet metering: could not retire %s", workers)

    def _close(self, hold: str, item: dict[str, Any]) -> None:
        self.closed_holds.add(hold)
        self._queue(item)

    def _queue(self, item: dict[str, Any]) -> None:
        self.queue.append(item)
        if self._wake is not None:
            self._wake.set()

    # -- reporting ---------------------------------------------------------------------
    async def _report_forever(self) -> None:
        backoff = 0.2
        while True:
            self._flush_parts()  # parts earned while the last batch was out
            if not self.queue:
                self._wake.clear()
                await self._wake.wait()
            # A moment for more to arrive, so that a map's results go in few requests
            # (each request costs the busy machine JSON and HTTP work; settling later
            # costs nobody anything: the holds stay safe meanwhile).
            await asyncio.sleep(REPORT_DELAY_S)
            self._flush_parts()
            if not self.queue:
                continue
            batch = [self.queue[i] for i in range(min(BATCH_SIZE, len(self.queue)))]
            try:
                results = await asyncio.to_thread(self._client.batch, batch)
            except CreditsUnavailableError as exc:
                logger.warning("gpunet metering: credit service unreachable (%s); %d movements queued, "
                               "retrying in %.1f s", exc, len(self.queue), backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
                continue
            except CreditsError as exc:  # the whole request refused: keep it, but don't spin
                logger.error("gpunet metering: the credit service refused a batch: %s", exc)
                await asyncio.sleep(MAX_BACKOFF_S)
                continue
            except Exception:  # noqa: BLE001 - the reporter must outlive any surprise
                logger.exception("gpunet metering: reporting failed; %d movements kept, retrying", len(self.queue))
                await asyncio.sleep(MAX_BACKOFF_S)
                continue
            backoff = 0.2
            for item, result in zip(batch, results):
                self.queue.popleft()
                if result.get("ok"):
                    self.reported += 1
                    if item["op"] == "record_verification":
                        self._learn_quarantine(result)
                else:
                    self.failed.append({"item": item, "result": result})
                    logger.error("gpunet metering: %s (%s) refused: %s", item["op"],
                                 item.get("hold") or item.get("provider"), result.get("error"))


class SharedHold:
    """A map's hold, shared by its ``tasks`` items: which are done, which wait for
    their worker's provider, and what each provider earned since the last part."""

    def __init__(self, tasks: int) -> None:
        self.tasks = tasks
        self.done: set[Any] = set()
        self.owed: set[Any] = set()
        self.parts: dict[str, list[int]] = {}  # provider -> [credits, tasks]
        self.sequence = 0


def _compute_seconds(kwargs: dict[str, Any]) -> float:
    """Seconds the attempt computed, from a ``processing -> memory`` transition's startstops."""
    return sum(ss["stop"] - ss["start"] for ss in kwargs.get("startstops", ()) if ss.get("action") == "compute")


def _hold_of(key: Any, meta: dict[str, Any]) -> str | None:
    """The hold a task's annotation names (one task's, or its map's shared one)."""
    return meta.get("hold")


@click.command()
@click.option("--credits", "credits_url", required=True, help="the credit service's URL")
@click.option("--operator-token-file", required=True, type=click.Path(exists=True, dir_okay=False),
              help="the operator token written by `gpunet credits serve`")
@click.option("--default-provider", default=None, help="who is paid for workers that name no provider")
def dask_setup(scheduler: Scheduler, credits_url: str, operator_token_file: str, default_provider: str | None) -> None:
    """Entry point for ``--preload gpunet.extensions.scheduler_plugin`` with
    ``--preload-argv`` / ``preload_argv``: meter this scheduler's work against the
    credit service (``gpunet scheduler --credits`` and the embedded network do this)."""
    with open(operator_token_file) as file:
        token = file.read().strip()
    scheduler.add_plugin(GpunetMeteringPlugin(credits_url, token, default_provider=default_provider))
