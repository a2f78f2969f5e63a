"""Provenance records: what ran where, on what, with which inputs, and what came out.

Every finished ``%%gpunet`` cell, and every ``net.run`` / ``net.map`` call made from
a notebook, leaves one record in the cell's outputs, a display of MIME type
:data:`MIME_TYPE` (saved in the .ipynb) with a one-line ``text/plain`` fallback::

    gpunet: ran on provider local (cpu: AMD EPYC 7B13, 11.2 GiB), 0.02 s, ≈1 credit, not verified · hold 3f2a…

A record holds:

- ``code``: the digest of the cell's source (or of a function's source);
- ``inputs`` / ``outputs``: each value's digest over the data codec's canonical
  encoding (:func:`gpunet.codec.digest`), its type, and its tolerance class
  (``exact``, or ``float`` with the rtol/atol that compares it). A value whose
  canonical encoding is at most :data:`KEEP_VALUE_BYTES` is kept in the record
  (base64 of that encoding), so that ``gpunet reproduce`` can say by how much a
  re-run differs; a larger float array keeps a summary (shape, dtype, min, max,
  mean, sum), compared within the tolerance; anything else keeps its digest only.
  A value the codec cannot encode has ``digest: null`` and ``no_digest`` says why;
- ``flags``, ``seeds`` (the PRNG seeds the code passes as literals or names to
  ``jax.random.key`` and friends, found in its source), ``ran`` (each worker: its
  provider, device, measured capability, and the versions of Python, JAX, jaxlib,
  NumPy, gpunet and the CUDA driver it reported, and, where the job asked for packages,
  the ``environment`` it ran in: the provider's own or a session's, each package's
  version, the SHA-256 of each wheel installed), ``environment`` (the requirements the
  job asked for, :mod:`gpunet.packages`; what ``gpunet reproduce`` asks for again),
  ``verification`` (policy, the
  agreeing providers), ``payment`` (the holds that paid for it; the ledger entries
  are found from them in the session's receipt);
- ``record_digest``: the codec digest of everything else in the record.

:func:`check_record` is what ``gpunet reproduce --check-only`` runs on each record:
its own digest, the digest of every kept value against the digest beside it, and
the code digest against the cell's source in the notebook. A record digest alone
only catches careless edits (anyone can recompute it); the kept values catch an
edited output digest; a forger who rewrites both the value and the digests is
caught only by what a third party signed (the credit service's receipts).
"""

from __future__ import annotations

import ast
import base64
import hashlib
import inspect
import json
import logging
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from gpunet import codec
from gpunet.errors import GpunetError
from gpunet.metering.settlement import price
from gpunet.verify.quorum import tolerance_for
from gpunet.worker.device import device_info

if TYPE_CHECKING:  # pragma: no cover
    from gpunet.client.handle import Connection, JobHandle
    from gpunet.wire import JobResult

logger = logging.getLogger(__name__)

#: The MIME type of a provenance record in a notebook's outputs.
MIME_TYPE = "application/vnd.gpunet.provenance+json"
#: The version of the record's layout.
RECORD_VERSION = 1
#: Values whose canonical encoding is at most this many bytes are kept in the record.
KEEP_VALUE_BYTES = 64 * 1024
#: Calls whose arguments are PRNG seeds (matched on the end of their dotted name).
SEED_CALLS = ("random.key", "random.PRNGKey", "random.default_rng", "random.seed", "random.Random",
              "manual_seed")

#: What each network's workers reported (device, software) and which provider each
#: belongs to, by worker address: asked once per worker, not once per cell.
_worker_cache: weakref.WeakKeyDictionary[Any, dict[str, dict[str, Any]]] = weakref.WeakKeyDictionary()


# -- values --------------------------------------------------------------------------------


def describe_value(value: Any, tolerance: Any = None) -> dict[str, Any]:
    """A value's entry in a record: ``type``, ``digest`` (or ``no_digest``, why not),
    ``class`` (``exact`` or ``float``, with ``tolerance``), and ``value`` (base64 of
    its canonical encoding) when small, or a ``summary`` for a large float array."""
    entry: dict[str, Any] = {"type": _type_name(value)}
    floating = _has_floats(value)
    entry["class"] = "float" if floating else "exact"
    if floating and tolerance is not None:
        entry["tolerance"] = {"rtol": float(tolerance.rtol), "atol": float(tolerance.atol),
                              "max_mismatch": float(tolerance.max_mismatch)}
    try:
        entry["digest"] = codec.digest(value)
    except GpunetError as exc:  # UnsupportedResultError: the codec does not carry it
        entry["digest"] = None
        entry["no_digest"] = f"the data codec does not carry a {getattr(exc, 'type_name', _type_name(value))}"
        return entry
    if _small(value):
        data = codec.canonical_bytes(value)
        if len(data) <= KEEP_VALUE_BYTES:
            entry["value"] = base64.b64encode(data).decode("ascii")
            return entry
    summary = _summary(value) if floating else None
    if summary is not None:
        entry["summary"] = summary
    return entry


def kept_value(entry: dict[str, Any]) -> Any:
    """The value kept in a record entry (None when it keeps none); ``ProviderDataError``
    for bytes that do not decode."""
    if "value" not in entry:
        return None
    return codec.decode(base64.b64decode(entry["value"]), what="a value kept in a provenance record")


def _small(value: Any) -> bool:
    """Whether a value may be small enough to keep, without encoding it to find out."""
    return _size_hint(value, KEEP_VALUE_BYTES) <= KEEP_VALUE_BYTES


def _size_hint(value: Any, limit: int) -> int:
    """The bytes of the arrays in ``value`` (its containers walked until ``limit`` is passed)."""
    nbytes = getattr(value, "nbytes", None)
    if isinstance(nbytes, int):
        return nbytes
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        total = 0
        for item in value:
            total += _size_hint(item, limit - total) + 1
            if total > limit:
                break
        return total
    return 0


def _has_floats(value: Any, depth: int = 0) -> bool:
    if depth > 20:
        return False
    if isinstance(value, (float, complex)):
        return True
    if isinstance(value, dict):
        return any(_has_floats(v, depth + 1) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_has_floats(v, depth + 1) for v in value)
    dtypes = getattr(value, "dtypes", None)  # a pandas DataFrame
    if dtypes is not None and hasattr(dtypes, "__iter__"):
        return any(getattr(d, "kind", "") in "fc" for d in dtypes)
    dtype = getattr(value, "dtype", None)
    return getattr(dtype, "kind", "") in ("f", "c")


def _summary(value: Any) -> dict[str, Any] | None:
    """Shape, dtype and statistics of a float array, for values too large to keep."""
    import numpy as np

    try:
        array = np.asarray(value)
    except Exception:  # noqa: BLE001 - a structure NumPy cannot make an array of
        return None
    if array.dtype.kind not in "fc" or array.size == 0:
        return None
    data = np.abs(array) if array.dtype.kind == "c" else array
    with np.errstate(all="ignore"):
        return {"shape": list(array.shape), "dtype": array.dtype.str, "min": float(np.nanmin(data)),
                "max": float(np.nanmax(data)), "mean": float(np.nanmean(data)), "sum": float(np.nansum(data))}


def _type_name(value: Any) -> str:
    cls = type(value)
    return f"{cls.__module__}.{cls.__qualname__}".removeprefix("builtins.")


# -- code ----------------------------------------------------------------------------------


def code_digest(source: str) -> str:
    """The digest of a cell's source, without the ``%%gpunet`` line and surrounding blank lines."""
    return codec.digest(cell_body(source))


def cell_body(source: str) -> str:
    """A cell's code as it runs remotely: its ``%%gpunet ...`` line dropped, stripped."""
    text = source.strip()
    if text.startswith("%%gpunet"):
        text = text.split("\n", 1)[1] if "\n" in text else ""
    return text.strip()


def seeds_in(source: str) -> list[dict[str, Any]]:
    """The PRNG seeds ``source`` passes to ``jax.random.key`` / ``PRNGKey``,
    ``np.random.default_rng`` / ``seed``, ``random.Random``, ``torch.manual_seed``: a
    literal as ``seed``, a name or expression (an input, a map item) as ``expression``."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        name = ast.unparse(node.func)
        if not name.endswith(SEED_CALLS):
            continue
        argument = node.args[0]
        entry: dict[str, Any] = {"call": name, "line": node.lineno}
        if isinstance(argument, ast.Constant) and isinstance(argument.value, int):
            entry["seed"] = argument.value
        else:
            entry["expression"] = ast.unparse(argument)
        found.append(entry)
    return found


def function_source(fn: Any) -> tuple[str, dict[str, Any]]:
    """A function's source and the values it reads besides its arguments (closure
    variables and globals, modules left out): what its code digest and inputs cover."""

    try:
        source = inspect.getsource(fn)
    except (OSError, TypeError):
        source = f"<no source: {getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}>"
    try:
        closure = inspect.getclosurevars(fn)
        reads = {**closure.globals, **closure.nonlocals}
    except (TypeError, ValueError):
        reads = {}
    values = {}
    for name, value in reads.items():
        if inspect.ismodule(value):
            continue
        if callable(value) and hasattr(value, "__code__"):
            values[name] = function_source(value)[0]  # a helper's source, not its code object
        elif not inspect.isclass(value) and not callable(value):
            values[name] = value
    return source, values


# -- records -------------------------------------------------------------------------------


class Recorder:
    """Builds the record of one job: what it was given when it was sent
    (:meth:`for_cell`, :meth:`for_call`), and what came back (:meth:`finish`)."""

    def __init__(self, kind: str, code: str, inputs: dict[str, Any], flags: dict[str, Any],
                 tolerance: Any) -> None:
        self.kind = kind
        self.started = time.monotonic()
        self.tolerance = tolerance
        self.record: dict[str, Any] = {
            "version": RECORD_VERSION,
            "kind": kind,
            "code": {"digest": codec.digest(code)},
            "seeds": seeds_in(code),
            "flags": {name: value for name, value in flags.items() if value not in (None, False, "none")},
            "inputs": {name: describe_value(value, tolerance) for name, value in inputs.items()},
        }

    @staticmethod
    def start(make: Callable[..., Recorder], *args: Any, **kwargs: Any) -> Recorder | None:
        """``make(*args, **kwargs)`` (:meth:`for_cell`, :meth:`for_call`); a failure
        costs the job its record, never the job itself (it is logged)."""
        try:
            return make(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - a user's object can fail in any way when described
            logger.warning("gpunet: this job will have no provenance record: %s: %s", type(exc).__name__, exc)
            return None

    @classmethod
    def for_cell(cls, code: str, inputs: dict[str, Any], *, map_name: str | None, items: list[Any] | None,
                 flags: dict[str, Any], tolerance: Any = None) -> Recorder:
        """A ``%%gpunet`` cell: its code, its inputs' values, ``--map`` items, its flags."""
        values = dict(inputs)
        if map_name is not None:
            values[f"--map {map_name}"] = items
        return cls("cell", cell_body(code), values, flags, tolerance or tolerance_for(code))

    @classmethod
    def for_call(cls, fn: Any, arguments: dict[str, Any], *, flags: dict[str, Any], kind: str = "run",
                 tolerance: Any = None) -> Recorder:
        """A ``net.run`` / ``net.map`` call: ``fn``'s source, its arguments, and the
        values it reads besides them (``reads NAME``: closure variables, globals)."""
        source, reads = function_source(fn)
        inputs = {**arguments, **{f"reads {name}": value for name, value in reads.items()}}
        recorder = cls(kind, source, inputs, flags, tolerance or tolerance_for(fn))
        recorder.record["code"]["function"] = getattr(fn, "__qualname__", None)
        return recorder

    def finish(self, handle: JobHandle, results: list[JobResult], outputs: dict[str, Any]) -> dict[str, Any]:
        """The finished record: ``outputs`` by name, where and how it ran, how it was
        verified and paid for, and the record's own digest."""
        network = handle.network
        record = dict(self.record, job=handle.job.job_id)
        record["seconds"] = round(time.monotonic() - self.started, 4)
        record["outputs"] = {name: describe_value(value, self.tolerance) for name, value in outputs.items()}
        earlier = getattr(handle, "reused_from", None)
        if earlier is not None:  # nothing ran: where it ran and how it was verified are the earlier run's
            record["ran"] = earlier.get("ran") or []
            record["verification"] = {**(earlier.get("verification") or {}), "reused_from": {
                "job": earlier.get("job"), "record_digest": earlier.get("record_digest"),
                "holds": (earlier.get("payment") or {}).get("holds") or []}}
            record["payment"] = {"metered": network.meter is not None, "holds": [], "credits_estimate": 0}
            return seal(record)
        facts = getattr(handle, "facts", None)  # a job run through a gateway: the gateway saw it run
        record.update(facts if facts is not None else run_facts(handle, results))
        if handle.job.requirements:
            record["environment"] = {"requirements": dict(sorted(handle.job.requirements.items()))}
        return seal(record)


def run_facts(handle: JobHandle, results: list[JobResult]) -> dict[str, Any]:
    """What a provenance record says of how a finished job ran (``ran``: where, on
    what, for how long), was verified (``verification``) and paid for (``payment``),
    as the side that sent it to the workers saw it (the notebook, or the gateway)."""
    network = handle.network
    units = getattr(handle, "units", None)  # a verified job: every agreeing copy ran it
    copies = [copy.result for unit in units for copy in unit.agreeing] if units is not None else results
    workers = _workers(network, sorted({result.worker for result in copies}))
    ran: dict[str, dict[str, Any]] = {}
    for result in copies:
        known = workers.get(result.worker, {})
        entry = ran.setdefault(result.worker, {
            "worker": result.worker, "provider": known.get("provider"), "device": result.device,
            "capability": known.get("capability"), "software": known.get("software"),
            "tasks": 0, "seconds": 0.0, "rate": known.get("rate")})
        if result.environment is not None:  # what the provider says it ran with (gpunet.worker.environment)
            entry["environment"] = result.environment
        entry["tasks"] += 1
        entry["seconds"] = round(entry["seconds"] + result.seconds, 4)
    facts = {"ran": list(ran.values()), "verification": _verification(handle)}
    facts["payment"] = _payment(network, handle, facts["ran"])
    return facts


def finish_record(recorder: Recorder | None, handle: JobHandle, results: list[JobResult], outputs: dict[str, Any],
                  *, show: bool) -> dict[str, Any] | None:
    """The finished record of a job that went well (None without a recorder, or
    where making it failed: logged, never the job's failure); shown at once with
    ``show`` (a cell waited for in the foreground)."""
    if recorder is None:
        return None
    try:
        record = recorder.finish(handle, results, outputs)
    except Exception as exc:  # noqa: BLE001 - see Recorder.start
        logger.warning("gpunet: job %s has no provenance record: %s: %s", handle.job.job_id, type(exc).__name__, exc)
        return None
    if show:
        show_record(record)
    return record


def seal(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` as it will read back from a notebook's JSON (tuples as lists), with
    its ``record_digest`` (the codec digest of all the rest) set."""
    body = json.loads(json.dumps({key: value for key, value in record.items() if key != "record_digest"},
                                 default=str))
    return {**body, "record_digest": codec.digest(body)}


def _workers(network: Connection, addresses: list[str]) -> dict[str, dict[str, Any]]:
    """What ``addresses`` reported (device, capability, software) and whose they are;
    asked once per worker and kept, so that a cell's round trip is not slowed."""
    known = _worker_cache.setdefault(network, {})
    missing = [address for address in addresses if address not in known]
    if missing:
        try:
            devices = network.client.run(device_info, workers=missing, on_error="return")
        except Exception as exc:  # noqa: BLE001 - the worker may have left: the record says less
            logger.warning("gpunet: could not ask workers %s what they run: %s", missing, exc)
            devices = {}
        try:
            state = network.metering_state() if network.meter is not None else None
        except Exception:  # noqa: BLE001
            state = None
        providers = (state or {}).get("providers", {})
        for address in missing:
            device = devices.get(address)
            device = device if isinstance(device, dict) else {}
            owner = providers.get(address) or {}
            known[address] = {
                "provider": owner.get("provider") or (state or {}).get("default_provider"),
                "rate": owner.get("rate", (state or {}).get("default_rate")),
                "capability": device.get("capability"), "software": device.get("software"),
            }
    return {address: known[address] for address in addresses}


def _verification(handle: JobHandle) -> dict[str, Any]:
    policy = getattr(handle, "policy", None)
    if policy is None:
        return {"policy": "none", "verdict": "not verified"}
    agreeing = sorted({copy.provider for unit in handle.units for copy in unit.agreeing})
    checked = all(len(unit.agreeing) > 1 for unit in handle.units)
    return {"policy": str(policy), "verdict": "verified" if checked else "accepted unchecked",
            "providers": agreeing, "copies": sum(len(unit.copies) for unit in handle.units)}


def _payment(network: Connection, handle: JobHandle, ran: list[dict[str, Any]]) -> dict[str, Any]:
    if network.meter is None:
        return {"metered": False}
    units = getattr(handle, "units", None)
    if units is not None:  # verified: the agreeing copies are paid, the rest released
        holds = [copy.hold for unit in units for copy in unit.agreeing if copy.hold]
        cap = getattr(handle, "amount", None)
    else:
        # a job that drew on the session's pre-authorized hold was paid in parts of it
        drew_on = getattr(handle, "drew_on", None)
        holds = list(getattr(handle, "holds", [])) or ([drew_on] if drew_on else [])
        cap = None
    estimate = sum(price(entry["seconds"] / max(entry["tasks"], 1), entry["rate"] or 1.0, cap or 10**9)
                   * entry["tasks"] for entry in ran)
    return {"metered": True, "session": network.meter.session, "holds": holds, "credits_estimate": estimate}


# -- showing -------------------------------------------------------------------------------


def summary_line(record: dict[str, Any]) -> str:
    """The record's one discreet line (its ``text/plain``), with any control
    characters a worker put in its device label or provider name removed."""
    ran = record.get("ran") or []
    providers = sorted({str(entry.get("provider") or entry.get("worker")) for entry in ran})
    devices = sorted({str(entry.get("device")) for entry in ran})
    where = (f"provider {providers[0]} ({devices[0]})" if len(providers) == 1 and len(devices) == 1 else
             f"providers {', '.join(providers)} ({'; '.join(devices)})")
    parts = [f"gpunet: ran on {where}", f"{record.get('seconds', 0):.2f} s"]
    payment = record.get("payment") or {}
    if payment.get("metered"):
        credits = payment.get("credits_estimate", 0)
        parts.append(f"≈{credits} credit{'s' * (credits != 1)}")
    verification = record.get("verification") or {}
    parts.append("not verified" if verification.get("policy") == "none" else
                 f"{verification.get('verdict')} by {verification.get('policy')}")
    reused = verification.get("reused_from")
    if reused:
        parts[0] = f"gpunet: reused the verified result of job {reused.get('job')} (it ran on {where})"
    holds = payment.get("holds") or []
    tail = f" · hold{'s' * (len(holds) != 1)} {', '.join(h[:8] for h in holds[:3])}" if holds else ""
    return codec.clean_text(", ".join(parts) + tail)  # names and labels come from workers


def bundle(record: dict[str, Any]) -> dict[str, Any]:
    """The MIME bundle of a record: the record itself and its one-line fallback."""
    return {MIME_TYPE: record, "text/plain": summary_line(record)}


def show_record(record: dict[str, Any]) -> None:
    """Put the record in the current cell's outputs, where a frontend keeps them."""
    if in_notebook():
        from IPython.display import display

        display(bundle(record), raw=True)


def in_notebook() -> bool:
    """Whether an IPython frontend keeps the cells' displays (a Jupyter kernel, or
    IPython's ``capture_output``): a terminal shell would only print them, and a
    script has nowhere to keep them."""
    try:
        from IPython.core.displaypub import DisplayPublisher
        from IPython.core.interactiveshell import InteractiveShell
    except ImportError:
        return False
    return InteractiveShell.initialized() and type(InteractiveShell.instance().display_pub) is not DisplayPublisher


# -- checking ------------------------------------------------------------------------------


def records_in(outputs: list[Any]) -> list[dict[str, Any]]:
    """The provenance records among a notebook cell's outputs, in order."""
    return [output["data"][MIME_TYPE] for output in outputs
            if output.get("output_type") in ("display_data", "execute_result") and MIME_TYPE in output.get("data", {})]


def check_record(record: Any, cell_source: str | None = None) -> list[str]:
    """What is wrong with a record as it sits in a notebook (an empty list: nothing
    found): its own digest, each kept value against the digest beside it, the code
    digest against ``cell_source`` (for a ``%%gpunet`` cell's record)."""
    if not isinstance(record, dict):
        return [f"the record is a {type(record).__name__}, not an object"]
    problems = []
    try:
        expected = seal(record)["record_digest"]
    except GpunetError as exc:
        return [f"the record cannot be digested ({exc})"]
    if record.get("record_digest") != expected:
        problems.append("its record digest does not match its content (the record was edited after it was made)")
    for side in ("inputs", "outputs"):
        for name, entry in (record.get(side) or {}).items():
            if not isinstance(entry, dict) or "value" not in entry:
                continue
            try:
                data = base64.b64decode(entry["value"], validate=True)
            except ValueError:
                problems.append(f"{side[:-1]} {name!r}: its kept value is not base64")
                continue
            # codec.digest is the SHA-256 of the canonical encoding, which is what is kept
            if "sha256:" + hashlib.sha256(data).hexdigest() != entry.get("digest"):
                problems.append(f"{side[:-1]} {name!r}: its digest {str(entry.get('digest'))[:19]}… does not match "
                                "the value kept beside it (the digest or the value was edited)")
    if cell_source is not None and record.get("kind") == "cell":
        if (record.get("code") or {}).get("digest") != code_digest(cell_source):
            problems.append("its code digest does not match the cell's source (the code was edited after it ran)")
    return problems
