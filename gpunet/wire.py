"""What travels between the notebook, the scheduler and the workers.

- :class:`Job` goes from the notebook to a worker (as a Dask task's argument) and
  :class:`JobResult` comes back; small results also travel as an event on the job's
  topic (:func:`result_to_event` / :func:`result_from_event`).
- A job's tasks carry their hold to the scheduler plugin as the ``gpunet`` Dask
  annotation (:func:`annotation`).
- The notebook reaches the scheduler plugin through the named scheduler handlers
  below (``client.scheduler.<name>(...)``); it never ships a function there.

This module imports nothing of gpunet: every side may use it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import pickle
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Callable

import cloudpickle

#: The annotation under which a job's tasks carry their hold.
ANNOTATION = "gpunet"
#: The ``ename`` of a job stopped on its worker (Ctrl-C, --timeout, no longer needed).
INTERRUPTED = "JobInterrupted"
#: The ``ename`` of a job whose encoded result went over its cap on the worker.
TOO_LARGE = "ResultTooLarge"
#: The ``ename`` of a job whose packages the worker could not provide (nothing of the cell ran).
PACKAGES = "PackagesUnmet"
#: The ``ename`` of a job from a notebook too old to read this worker's results.
VERSION_MISMATCH = "GpunetVersionMismatch"

#: How results travel (see gpunet.codec): pickled on the embedded network and on a
#: private one that trusts its providers, as codec data everywhere else.
PICKLE, CODEC = "pickle", "codec"
#: Caps of a job on a network whose providers are not trusted (settable per network).
DEFAULT_MAX_RESULT_BYTES = 256 * 1024 * 1024
DEFAULT_MAX_STREAM_BYTES_PER_S = 1024 * 1024

#: The Dask worker resources gpunet places work with. Every gpunet worker has one
#: ``device`` slot (its GPU, or the CPU where it has none), so that one cell owns a
#: device at a time; GPU workers also have ``GPU`` (count) and ``GPU_MEM`` (bytes).
DEVICE_RESOURCE = "device"
GPU_RESOURCE = "GPU"
GPU_MEMORY_RESOURCE = "GPU_MEM"

#: Named handlers the scheduler plugin serves (``client.scheduler.<name>(...)``).
METERING_STATE = "gpunet_metering_state"  # () -> dict | None: whether and how it meters
RELEASE_HOLDS = "gpunet_release_holds"  # (client, holds): holds of a job that was never sent
CLOSE_UNKNOWN = "gpunet_close_unknown"  # (client, hold, keys): tasks the scheduler never created
CHARGE_USED = "gpunet_charge_used"  # (client, key) -> credits: stop a cell at its --max-credits
VERDICT = "gpunet_verdict"  # (client, job, copies, method, digest, checked): a verified unit's verdict
EXECUTING = "gpunet_executing"  # (workers) -> {worker: tasks processing there}: a provider drains its own
REUSE_STORE = "gpunet_reuse_store"  # (client, job, key, record, results) -> kept: a verified result, for reuse
REUSE_LOOKUP = "gpunet_reuse_lookup"  # (client, key) -> {record, results} | None: a verified result with that key
ENVIRONMENTS = "gpunet_environments"  # () -> {worker: its provider's environment report}
PREAUTH_STATE = "gpunet_preauth_state"  # (client, holds, jobs) -> {hold: {paid, short, jobs}}: what shared holds paid
MAP_STATE = "gpunet_map_state"  # (client, job) -> {tasks, done, running, paid, grown} | None: how far a map has got
GROW_MAP = "gpunet_grow_map"  # (client, job, hold, amount) -> bool: a further hold pays a map's items
PAUSE_MAP = "gpunet_pause_map"  # (client, keys) -> int: cancel a map's items not yet sent to a worker
#: The handlers above that act on a notebook session's own holds, tasks, maps or reuse entries: the
#: caller's Dask client id goes with each call (``client=``, added by the session's own connection,
#: :meth:`gpunet.client.network.Network.call_scheduler`), and the scheduler refuses a call about
#: another client's (:mod:`gpunet.metering.owners`).
CALLER_NAMED = frozenset({RELEASE_HOLDS, CLOSE_UNKNOWN, CHARGE_USED, VERDICT, REUSE_STORE, REUSE_LOOKUP,
                          PREAUTH_STATE, MAP_STATE, GROW_MAP, PAUSE_MAP})
#: The name of the metering plugin on the scheduler.
METERING_PLUGIN = "gpunet-metering"
#: The modules Dask preloads into a gpunet scheduler / worker (``--preload``): gpunet's
#: Dask plugins, named here so that the core starts them without importing them.
SCHEDULER_PRELOAD = "gpunet.extensions.scheduler_plugin"
WORKER_PRELOAD = "gpunet.extensions.worker_plugin"
#: The stream message a worker sends to say which provider it belongs to.
REGISTER_PROVIDER = "gpunet-register-provider"
#: The handler a provider's worker serves so that the scheduler can check that a
#: registration naming it came from it: (digest) -> whether its token has that digest.
#: Dask lets a message's own keys override the sender the scheduler adds, so anyone
#: could send a registration that names another's worker; only the worker can confirm.
CONFIRM_PROVIDER = "gpunet_confirm_provider"
#: The stream message a provider's worker sends when its installed distributions changed.
ENVIRONMENT_CHANGED = "gpunet-environment-changed"


def session_digest(session: str) -> str:
    """The name a notebook session's sandbox has on a worker: the SHA-256 of the session's
    secret (``Job.session``), so that ending a session, which every worker hears of,
    reveals no secret."""
    return hashlib.sha256(session.encode()).hexdigest()


#: A pickle stream longer than this travels as a Dask frame of its own too, not copied
#: into the frame of the task or result that carries it.
OUT_OF_BAND_BYTES = 64 * 1024


class Pickled:
    """A value pickled once, where it was made (cloudpickle, protocol 5): its pickle
    stream and, kept out of it, its large buffers (NumPy arrays, pandas columns).

    Dask pickles what it sends with protocol 5 and sends every out-of-band buffer as
    a frame of its own, so an input, map item or result held here travels as Dask's
    own ``client.submit`` would send the value: no copy into one bytes blob, and none
    into the task's frame. :meth:`load` rebuilds the value on the buffers as they
    arrived (copying only a buffer that arrived read-only and was writable where it
    was made, as Dask does). Only the notebook's own values and results from trusted
    providers are ever pickled: results from providers the notebook does not trust
    travel as codec data (:mod:`gpunet.codec`)."""

    __slots__ = ("stream", "buffers", "writable")

    def __init__(self, stream: bytes | memoryview, buffers: list[Any], writable: tuple[bool, ...] = ()) -> None:
        self.stream = stream
        self.buffers = buffers
        self.writable = writable or tuple(not memoryview(buffer).readonly for buffer in buffers)

    def load(self) -> Any:
        """The value, rebuilt on its buffers."""
        buffers = [bytearray(buffer) if writable and memoryview(buffer).readonly else buffer
                   for buffer, writable in zip(self.buffers, self.writable)]
        return pickle.loads(self.stream, buffers=buffers)

    def parts(self) -> Iterator[Any]:
        """The stream and then each buffer, as bytes-like objects (for hashing)."""
        yield self.stream
        for buffer in self.buffers:
            yield buffer.raw() if isinstance(buffer, pickle.PickleBuffer) else buffer

    def __len__(self) -> int:
        return len(self.stream) + sum(memoryview(buffer).nbytes for buffer in self.buffers)

    def __sizeof__(self) -> int:  # what Dask counts in a worker's memory
        return len(self)

    def __reduce_ex__(self, protocol: int) -> tuple[Any, ...]:
        if protocol < 5:  # no out-of-band buffers: plain copies
            return Pickled, (bytes(self.stream), [bytes(memoryview(buffer)) for buffer in self.buffers], self.writable)
        stream = pickle.PickleBuffer(self.stream) if len(self.stream) > OUT_OF_BAND_BYTES else self.stream
        return _rebuilt_pickled, (stream, self.writable, *(pickle.PickleBuffer(buffer) for buffer in self.buffers))


def _rebuilt_pickled(stream: Any, writable: tuple[bool, ...], *buffers: Any) -> Pickled:
    return Pickled(stream, list(buffers), tuple(writable))


def pickle_value(value: Any) -> bytes | Pickled:
    """``value`` pickled once (cloudpickle, protocol 5): plain bytes when small, a
    :class:`Pickled` whose buffers travel as Dask frames when it holds large buffers
    (or its stream is long). Raises whatever pickling raises."""
    buffers: list[pickle.PickleBuffer] = []
    stream = cloudpickle.dumps(value, protocol=5, buffer_callback=buffers.append)
    if not buffers and len(stream) <= OUT_OF_BAND_BYTES:
        return stream
    if len(stream) + sum(memoryview(buffer).nbytes for buffer in buffers) <= OUT_OF_BAND_BYTES:
        return cloudpickle.dumps(value, protocol=5)  # small: one blob (a small result also travels as an event)
    return Pickled(stream, list(buffers))


def unpickle_value(blob: bytes | Pickled) -> Any:
    """The value :func:`pickle_value` made (only ever of the notebook's own values, or
    of results from providers it trusts)."""
    return blob.load() if isinstance(blob, Pickled) else cloudpickle.loads(blob)


def flat_result(result: JobResult) -> JobResult:
    """``result`` with every pickled value as one bytes blob, as msgpack carries it (for
    the scheduler's reuse table); values with buffers kept apart are pickled again."""
    def flat(blob: Any) -> Any:
        return cloudpickle.dumps(blob.load()) if isinstance(blob, Pickled) else blob

    return dataclasses.replace(result, value=flat(result.value),
                               outputs={name: flat(blob) for name, blob in result.outputs.items()})


def pickled_parts(blob: bytes | Pickled) -> Iterator[Any]:
    """The bytes-like parts of what :func:`pickle_value` made, in order (for hashing)."""
    if isinstance(blob, Pickled):
        yield from blob.parts()
    else:
        yield blob


def token_digest(token: str) -> str:
    """The SHA-256 of a provider token, which the scheduler asks a worker to confirm."""
    return hashlib.sha256(token.encode()).hexdigest()


class PassedOn:
    """What a notebook pickled (a map item; :func:`pickle_value`'s bytes or
    :class:`Pickled`), carried unopened: the gateway passes it on as it is, and only
    the worker that runs the job loads it."""

    __slots__ = ("blob",)

    def __init__(self, blob: bytes | Pickled) -> None:
        self.blob = blob


@dataclass
class Job:
    """One unit of remote work: a cell body or a pickled function, and its inputs."""

    job_id: str
    #: source of a %%gpunet cell; None for a function job
    code: str | None = None
    #: the function of a function job (Dask pickles it with cloudpickle), or its pickle
    #: (:func:`pickle_value`), loaded only on the worker (a job that came through the gateway)
    function: Callable[..., Any] | bytes | Pickled | None = None
    #: {name: pickled value} of a cell's inputs (:func:`pickle_value`: pickled one by
    #: one on the client, so that one that cannot be pickled is named there)
    inputs: dict[str, bytes | Pickled] = field(default_factory=dict)
    #: (args, kwargs) of a function job, pickled (:func:`pickle_value`)
    arguments: bytes | Pickled = b""
    outputs: tuple[str, ...] = ()
    #: outputs named with --out: a missing or unpicklable one is an error
    strict_outputs: bool = False
    display_last_expression: bool = False
    #: --map NAME: the item of a mapped cell is bound to this name
    map_name: str | None = None
    #: topic for live events (stdout, started); None sends none
    topic: str | None = None
    #: send a "started" event naming the worker and its device
    announce: bool = True
    #: send a small result as an event too (single jobs: saves a gather round trip;
    #: a map's thousands of events would cost the scheduler more than one gather)
    result_event: bool = True
    #: how the result travels back: PICKLE, or CODEC (data only, see gpunet.codec)
    result_format: str = PICKLE
    #: caps of a CODEC job: its encoded result, and its output text per second run
    max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES
    max_stream_bytes_per_s: int = DEFAULT_MAX_STREAM_BYTES_PER_S
    #: the distributions the job needs ({name: specifier}, gpunet.packages; a worker builds
    #: one environment per session and requirements); empty: the worker's own is taken as it is
    requirements: dict[str, str] = field(default_factory=dict)
    #: the secret the job's own worker signs its live events with (sign_event): it
    #: travels only inside the task, so no other party can make an event the
    #: notebook accepts for this job
    event_key: str = field(default_factory=lambda: secrets.token_hex(16))
    #: the secret of the notebook session that sent the job: a provider's worker runs the
    #: session's jobs in one sandbox of its own (gpunet.worker.sandbox), never shared with
    #: another session; None gets a sandbox for the job alone
    session: str | None = None
    #: the notebook reads CODEC results as frames (:class:`gpunet.codec.Frames`). Every Job
    #: made by this version has it; a job pickled by an older notebook lacks it in its
    #: state (reading it gives this default), so the worker asks :func:`reads_frames`.
    reads_frames: bool = True


def reads_frames(job: Job) -> bool:
    """Whether ``job``'s notebook reads codec frames: False for a job an older gpunet
    pickled, whose state has no ``reads_frames``."""
    return bool(vars(job).get("reads_frames", False))


@dataclass
class JobResult:
    """What comes back from :func:`run_job`."""

    job_id: str
    index: int | None
    worker: str
    device: str
    started: float
    finished: float
    #: {name: encoded value} of a cell's outputs: codec bytes, or pickled (:func:`pickle_value`)
    outputs: dict[str, Any] = field(default_factory=dict)
    #: the encoded return value of a function job (as ``outputs``)
    value: Any = None
    #: names asked for (strictly) that the cell never assigned
    missing_outputs: list[str] = field(default_factory=list)
    #: (name, type name, reason) of outputs that could not be pickled
    unpicklable_outputs: list[tuple[str, str, str]] = field(default_factory=list)
    #: every (seq, stream name, text) chunk the job wrote, in order
    streams: list[tuple[int, str, str]] = field(default_factory=list)
    #: (data, metadata) MIME bundles from display(), figures and the last expression
    displays: list[tuple[dict[str, Any], dict[str, Any]]] = field(default_factory=list)
    #: set when the job raised: ename, evalue, traceback (text), exception (pickled, or None
    #: always for CODEC)
    error: dict[str, Any] | None = None
    #: how ``outputs`` and ``value`` are encoded: PICKLE or CODEC
    result_format: str = PICKLE
    #: the environment it ran in, where it asked for packages: ``{"kind": "base" | "session",
    #: "packages": {name: version}, ...}`` (gpunet.worker.environment)
    environment: dict[str, Any] | None = None

    @property
    def seconds(self) -> float:
        return self.finished - self.started


def result_to_event(result: JobResult) -> dict[str, Any]:
    """A JobResult as a msgpack-friendly dict of its fields (see :func:`result_from_event`);
    shallow, so that a large output is not copied."""
    return {item.name: getattr(result, item.name) for item in dataclasses.fields(result)}


def result_from_event(data: dict[str, Any]) -> JobResult:
    """Rebuild a JobResult sent as an event (msgpack turned its tuples into lists)."""
    result = JobResult(**data)
    result.missing_outputs = list(result.missing_outputs)
    result.streams = [tuple(chunk) for chunk in result.streams]  # type: ignore[misc]
    result.displays = [tuple(bundle) for bundle in result.displays]  # type: ignore[misc]
    result.unpicklable_outputs = [tuple(entry) for entry in result.unpicklable_outputs]  # type: ignore[misc]
    return result


def stream_allowance(job: Job, seconds: float) -> int:
    """How many bytes of output text a CODEC job may send having run ``seconds``."""
    return int(job.max_stream_bytes_per_s * max(1.0, seconds))


def sign_event(key: str, event: dict[str, Any]) -> dict[str, Any]:
    """``event`` with its ``mac`` (see :func:`event_is_signed`)."""
    event["mac"] = _event_mac(key, event)
    return event


def event_is_signed(key: str, event: dict[str, Any]) -> bool:
    """Whether ``event`` was signed with ``key``, i.e. made by the worker the task
    was sent to. The scheduler's own ``worker`` stamp is not covered (a sender can
    override it) and tuples count as lists (msgpack's round trip)."""
    mac = event.get("mac")
    return isinstance(mac, str) and hmac.compare_digest(mac, _event_mac(key, event))


def _event_mac(key: str, event: dict[str, Any]) -> str:
    body = {name: value for name, value in event.items() if name not in ("mac", "worker")}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), default=_json_bytes)
    return hmac.new(key.encode(), text.encode(), hashlib.sha256).hexdigest()


def _json_bytes(value: Any) -> str:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    raise TypeError(f"{type(value).__name__} in an event")


def job_kind(meta: dict[str, Any]) -> str:
    """What kind of job a task's ``gpunet`` annotation says it belongs to: an item of a map,
    a copy of a verified job, or a single job (a cell or a function)."""
    if meta.get("verify"):
        return "verified copy"
    if "tasks" in meta:
        return "map item"
    return "single job"


def annotation(hold: str, amount: int, *, tasks: int | None = None, verify: str | None = None,
               topic: str | None = None, held: int | None = None, preauth: int | None = None,
               job: str | None = None, overflow: tuple[str, int] | None = None,
               items: int | None = None, map_tasks: int | None = None) -> dict[str, Any]:
    """The ``gpunet`` annotation a job's tasks carry to the scheduler plugin: its
    hold and what one task may be paid from it; for a map, how many ``tasks``
    share the hold and what it ``held`` in all; for a job drawing on the session's
    pre-authorized hold, that hold's size (``preauth``), the ``job``'s id and, for a map,
    how many tasks it sends (``map_tasks``); for a map
    with its own hold, the session's pre-authorized hold and its size (``overflow``) that
    pay what its items earn beyond it; for a
    copy of a verified job, that job's id (``verify``); the notebook's event
    ``topic``, on which the task's worker may then post; for a map sent in chunks, how
    many ``items`` each task runs (each is paid at least a credit an item)."""
    meta: dict[str, Any] = {"hold": hold, "amount": amount}
    if tasks is not None:
        meta["tasks"] = tasks
    if held is not None:
        meta["held"] = held
    if preauth is not None:
        meta["preauth"], meta["job"] = preauth, job
        if map_tasks is not None:
            meta["map_tasks"] = map_tasks
    if overflow is not None:
        meta["overflow"], meta["overflow_held"], meta["job"] = *overflow, job
    if verify is not None:
        meta["verify"] = verify
    if topic is not None:
        meta["topic"] = topic
    if items is not None:
        meta["items"] = items
    return meta


def is_hold_annotation(meta: Any) -> bool:
    """Whether ``meta`` is a ``gpunet`` annotation that names a hold and a positive amount."""
    return (isinstance(meta, dict) and isinstance(meta.get("hold"), str) and bool(meta["hold"])
            and isinstance(meta.get("amount"), int) and not isinstance(meta["amount"], bool) and meta["amount"] > 0)
