"""Judging verified results: pure functions of the copies, no Dask, no network.

With ``--verify`` a job's every unit (the cell, or each item of a map) runs as
*copies* on distinct providers (see :mod:`gpunet.client.verified`, which sends
them). This room decides what the copies say:

- :class:`Policy` parses ``--verify``: ``replicate[:K]`` (K copies, a result that
  ``K // 2 + 1`` agree on is accepted), ``spot[:P]`` (one copy, a second one with
  probability P), ``adaptive`` (one copy, checked by a second provider as its
  result arrives unless its provider has earned trust: :mod:`gpunet.verify.adaptive`).
- Two results agree when their digests are equal (SHA-256 over the codec's
  canonical bytes of the decoded outputs and displays, or of the pickled outputs
  where the notebook trusts its providers), or when the decoded values agree
  within the tolerance: exactly for integers, strings, bytes and displays, within
  ``rtol``/``atol`` for floats. Nothing a provider sent as codec data is unpickled. The tolerance is the
  kernel's (``gpunet.kernels.<name>.tolerance``), else NumPy's ``allclose``
  defaults; ``--rtol`` / ``--atol`` override it (:func:`tolerance_for`).
- :func:`judge` groups the copies that agree and says what to do next: accept the
  largest group once it reaches the quorum, wait for copies still running, send
  another copy (up to :data:`MAX_EXTRA_COPIES` per unit), or fail.
"""

from __future__ import annotations

import ast
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gpunet import codec, kernels
from gpunet.errors import PolicyError
from gpunet.kernels import KERNELS, Tolerance, compare
from gpunet.wire import CODEC, pickled_parts

if TYPE_CHECKING:  # pragma: no cover
    from gpunet.kernels import Mismatch
    from gpunet.wire import JobResult

#: Copies sent beyond the first ones when they disagree, per unit.
MAX_EXTRA_COPIES = 2
#: The tolerance where neither a kernel nor --rtol/--atol gives one (numpy.allclose's).
DEFAULT_RTOL, DEFAULT_ATOL = 1e-5, 1e-8

POLICY_HELP = "none, replicate[:K] (K >= 2), spot[:P] (0 < P <= 1) or adaptive"


@dataclass(frozen=True)
class Policy:
    """How results are verified: ``mode`` with its ``copies`` (replicate) or
    ``probability`` (spot)."""

    mode: str = "none"
    copies: int = 1
    probability: float = 0.0

    @classmethod
    def parse(cls, text: str | Policy | None) -> Policy:
        """``"replicate:3"`` -> Policy("replicate", copies=3); a clear error otherwise."""
        if isinstance(text, Policy):
            return text
        spec = (text or "none").strip().lower()
        mode, _, arg = spec.partition(":")
        try:
            if mode == "none" and not arg:
                return cls()
            if mode == "replicate":
                copies = int(arg) if arg else 2
                if copies >= 2:
                    return cls("replicate", copies=copies)
            elif mode == "spot":
                probability = float(arg) if arg else 0.1
                if 0 < probability <= 1:
                    return cls("spot", probability=probability)
            elif mode == "adaptive" and not arg:
                return cls("adaptive")
        except ValueError:
            pass
        raise PolicyError(f"--verify must be {POLICY_HELP}; got {text!r}")

    def __str__(self) -> str:
        if self.mode == "replicate":
            return f"replicate:{self.copies}"
        if self.mode == "spot":
            return f"spot:{self.probability:g}"
        return self.mode

    @property
    def active(self) -> bool:
        return self.mode != "none"

    @property
    def max_copies(self) -> int:
        """The most copies one unit may run: its first ones and the extra ones."""
        return (self.copies if self.mode == "replicate" else 2) + MAX_EXTRA_COPIES

    @property
    def providers_needed(self) -> int:
        """Distinct providers the policy needs to verify anything at all."""
        return self.copies if self.mode == "replicate" else 2


# -- tolerance and comparison ------------------------------------------------------------


def tolerance_for(work: Any = None, *, rtol: float | None = None, atol: float | None = None) -> Tolerance:
    """The tolerance to compare results of ``work`` (a function, or a cell's code):
    the loosest of the ``gpunet.kernels`` modules it uses, else NumPy's allclose
    defaults; ``rtol`` / ``atol`` replace the corresponding part."""
    found = [getattr(kernels, name).tolerance for name in _kernels_used(work)]
    base = Tolerance(max(t.rtol for t in found), max(t.atol for t in found),
                     max(t.max_mismatch for t in found)) if found else Tolerance(DEFAULT_RTOL, DEFAULT_ATOL)
    for name, value in (("rtol", rtol), ("atol", atol)):
        if value is not None and not value >= 0:
            raise PolicyError(f"--{name} must be a number >= 0, got {value!r}")
    return base._replace(rtol=base.rtol if rtol is None else float(rtol),
                         atol=base.atol if atol is None else float(atol))


def tolerance_if_verified(verify: str | Policy | None, work: Any = None, *, rtol: float | None = None,
                          atol: float | None = None) -> Tolerance | None:
    """The tolerance for verifying ``work`` under ``verify``; None where nothing is
    verified, and then ``rtol`` / ``atol`` are refused (they would mean nothing)."""
    if Policy.parse(verify).active:
        return tolerance_for(work, rtol=rtol, atol=atol)
    if rtol is not None or atol is not None:
        raise PolicyError("--rtol / --atol are tolerances for comparing verified copies: give --verify too "
                          "(verify= in Python)")
    return None


def _kernels_used(work: Any) -> list[str]:
    """Names of the gpunet.kernels modules a function belongs to or a cell imports."""
    if callable(work):
        module = getattr(work, "__module__", "") or ""
        name = module.rsplit(".", 1)[-1]
        return [name] if module.startswith(("gpunet.kernels.", "kernels.")) and name in KERNELS else []
    if not isinstance(work, str):
        return []
    try:
        tree = ast.parse(work)
    except SyntaxError:
        return []
    used: set[str] = set()
    for node in ast.walk(tree):
        dotted = []
        if isinstance(node, ast.Import):
            dotted = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            dotted = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Attribute):
            dotted = [ast.unparse(node)]
        for name in dotted:
            parts = name.split(".")
            if parts[:2] == ["gpunet", "kernels"] and len(parts) > 2 and parts[2] in KERNELS:
                used.add(parts[2])
    return sorted(used)


def result_digest(result: JobResult) -> str:
    """``sha256:...`` of what a copy returned: its error, its value, or its outputs by
    name; and its displays (a copy that adds a script to its output disagrees)."""
    h = hashlib.sha256()
    if result.error is not None:
        h.update(f"error\0{result.error['ename']}\0{result.error['evalue']}".encode())
    elif result.result_format == CODEC:
        h.update(codec.canonical_bytes(["value", _decoded(result)] if result.value is not None
                                       else ["outputs", _decoded(result), sorted(result.missing_outputs)]))
    elif result.value is not None:
        h.update(b"value\0")
        _hash_pickled(h, result.value)
    else:
        for name in sorted(result.outputs):
            h.update(f"output\0{name}\0".encode())
            _hash_pickled(h, result.outputs[name])
        h.update("\0".join(sorted(result.missing_outputs)).encode())
    h.update(b"displays\0" + _displays_digest(result).encode())
    return "sha256:" + h.hexdigest()


def _hash_pickled(h: Any, blob: Any) -> None:
    """Hash a pickled value's parts (its stream, then its out-of-band buffers), each
    after its length, so that where one part ends is part of what is hashed."""
    for part in pickled_parts(blob):
        view = memoryview(part)
        h.update(f"{view.nbytes}\0".encode())
        h.update(view)


def _displays_digest(result: JobResult) -> str:
    try:
        return codec.digest([[data, metadata] for data, metadata in result.displays])
    except Exception:  # noqa: BLE001 - a trusted provider's display of something the codec does not carry
        return hashlib.sha256(repr(result.displays).encode()).hexdigest()


def _decoded(result: JobResult) -> Any:
    """The comparable content of a copy's result (unpickled only where the notebook
    trusts its providers: ``result_format`` says so)."""
    if result.error is not None:
        return ("error", result.error["ename"], result.error["evalue"])
    if result.value is not None:
        return codec.load(result.value, result.result_format, what="a copy's return value")
    return {name: codec.load(blob, result.result_format, what=f"a copy's output {name!r}")
            for name, blob in result.outputs.items()}


def disagreement(a: JobResult, b: JobResult, tolerance: Tolerance) -> Mismatch | str | None:
    """None when two copies agree (same digest, or equal within ``tolerance``), else
    what differs: a :class:`~gpunet.kernels.Mismatch`, or a sentence."""
    if result_digest(a) == result_digest(b):
        return None
    if (a.error is None) != (b.error is None):
        failed = a if a.error is not None else b
        return f"one copy raised {failed.error['ename']}: {failed.error['evalue']}, the other did not"
    if _displays_digest(a) != _displays_digest(b):
        return "their displays differ"
    try:
        return compare(_decoded(a), _decoded(b), tolerance)
    except Exception as exc:  # noqa: BLE001 - arbitrary user objects
        return f"the results could not be compared ({type(exc).__name__}: {exc}), and their digests differ"


def preview(result: JobResult, limit: int = 80) -> str:
    """A short repr of what a copy returned, for messages (a provider's text: terminal
    escapes removed, as a DataFrame's repr keeps its strings' raw)."""
    try:
        text = codec.clean_text(repr(_decoded(result)))
    except Exception as exc:  # noqa: BLE001
        text = codec.clean_text(f"<undecodable: {exc}>")
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- judging ------------------------------------------------------------------------------

ACCEPT, WAIT, ANOTHER, FAIL = "accept", "wait", "another", "fail"


@dataclass(frozen=True)
class Judgement:
    """What :func:`judge` decided for one unit: ``verdict`` is :data:`ACCEPT`,
    :data:`WAIT`, :data:`ANOTHER` or :data:`FAIL`; ``groups`` are the indices of
    the copies with a result, grouped by agreement, largest first; with
    :data:`ACCEPT` the first group is the quorum."""

    verdict: str
    groups: tuple[tuple[int, ...], ...]

    @property
    def agreeing(self) -> tuple[int, ...]:
        """The copies of the accepted result (empty unless accepted)."""
        return self.groups[0] if self.verdict == ACCEPT else ()


def judge(results: Sequence[JobResult | None], tolerance: Tolerance, quorum: int, *, running: int = 0,
          extra_left: int = 0) -> Judgement:
    """Judge a unit's copies: ``results`` has one entry per finished copy (None for a
    copy that gave no result), ``running`` counts copies still on their way, and
    ``extra_left`` how many more copies the unit may still send.

    Accept once ``quorum`` copies agree; else wait while copies run; else ask for
    another copy while one may be sent; else fail.
    """
    groups: list[list[int]] = []
    for index, result in enumerate(results):
        if result is None:
            continue
        for group in groups:
            if disagreement(results[group[0]], result, tolerance) is None:
                group.append(index)
                break
        else:
            groups.append([index])
    groups.sort(key=len, reverse=True)  # stable: among equals, the first to arrive leads
    shaped = tuple(tuple(group) for group in groups)
    if groups and len(groups[0]) >= quorum:
        return Judgement(ACCEPT, shaped)
    if running:
        return Judgement(WAIT, shaped)
    return Judgement(ANOTHER if extra_left > 0 else FAIL, shaped)
