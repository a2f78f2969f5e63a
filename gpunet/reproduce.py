"""``gpunet reproduce``: re-run a notebook and compare its gpunet cells with their records.

    gpunet reproduce analysis.ipynb [--connect ADDRESS] [--report report.html]
    gpunet reproduce analysis.ipynb --check-only

:func:`reproduce` executes a copy of the notebook headless (nbclient, a fresh
kernel; its ``%gpunet connect`` starts an embedded network unless ``--connect``
names a scheduler) and compares each gpunet cell's new provenance records
(:mod:`gpunet.provenance`) with the ones saved in the notebook, output by output:

- ``same``: every output's codec digest is equal;
- ``within tolerance``: some differ, but by no more than their recorded tolerance
  (the largest absolute and relative difference are shown); this needs the values,
  which a record keeps up to :data:`gpunet.provenance.KEEP_VALUE_BYTES` (a larger
  float array is compared by its summary statistics);
- ``different``: which output, by how much, and which inputs or code changed;
- ``not reproducible``: the cell has no record to compare with.

:func:`check_only` runs nothing: it checks each record's integrity
(:func:`gpunet.provenance.check_record`) and every credit receipt the notebook
holds (``%gpunet receipt``), as ``gpunet ledger verify --receipt`` does, linking each
record's holds to the ledger entries that paid them.
"""

from __future__ import annotations

import html
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpunet.client.reused import REUSE_ENV
from gpunet.credits import Witness
from gpunet.credits._receipts import check_receipt, read_documents
from gpunet.errors import GpunetError, LedgerVerificationError, PackageError, ReproduceError
from gpunet.kernels import Tolerance, compare
from gpunet.provenance import check_record, kept_value, records_in
from gpunet.worker.environment import checked_requirements

SAME, WITHIN, DIFFERENT, NOT_REPRODUCIBLE, CHECKED, BROKEN = (
    "same", "within tolerance", "different", "not reproducible", "record intact", "record broken")
#: Statuses with which a notebook counts as reproduced (exit status 0).
GOOD = (SAME, WITHIN, CHECKED)
#: How a float output is compared when its record names no tolerance.
EXACT = Tolerance(0.0, 0.0)


@dataclass
class Difference:
    """One output that is not the same: what the notebook recorded, what the re-run made."""

    name: str
    how: str
    recorded: str
    rerun: str


@dataclass
class CellOutcome:
    """The verdict on one gpunet cell."""

    index: int
    label: str
    status: str
    details: list[str] = field(default_factory=list)
    differences: list[Difference] = field(default_factory=list)

    @property
    def good(self) -> bool:
        return self.status in GOOD


# -- reading and running ---------------------------------------------------------------------


def read_notebook(path: str | os.PathLike[str]) -> Any:
    """The notebook at ``path`` (nbformat v4); :class:`ReproduceError` saying what is wrong."""
    import nbformat

    path = Path(path)
    if not path.is_file():
        raise ReproduceError(f"no notebook at {path}: give the path of an .ipynb file")
    try:
        return nbformat.read(path, as_version=4)
    except Exception as exc:  # noqa: BLE001 - nbformat raises JSON, validation and version errors
        raise ReproduceError(f"{path} is not a notebook nbformat can read ({type(exc).__name__}: {exc})") from None


def execute(notebook: Any, *, directory: Path, connect: str | None = None, timeout: int = 600) -> Any:
    """Run a copy of ``notebook`` in a fresh kernel (cells that raise are kept, not
    fatal); its ``%gpunet connect`` joins ``connect`` or starts an embedded network."""
    import copy

    from nbclient import NotebookClient

    executed = copy.deepcopy(notebook)
    env = {name: value for name, value in os.environ.items() if name != "GPUNET_SCHEDULER"}
    env[REUSE_ENV] = "0"  # every cell computes again: a reused result would prove nothing
    asked = recorded_requirements(notebook)
    if asked:  # the re-run asks for the packages the records name, at their versions
        env["GPUNET_PIP"] = " ".join(f"{name}{spec}" for name, spec in sorted(asked.items()))
    if connect:
        env["GPUNET_SCHEDULER"] = connect
    client = NotebookClient(executed, timeout=timeout, kernel_name="python3", allow_errors=True,
                            resources={"metadata": {"path": str(directory)}})
    client.execute(env=env)
    return executed


def recorded_requirements(notebook: Any) -> dict[str, str]:
    """The packages the notebook's provenance records say its jobs asked for
    (``{name: specifier}``; where two records disagree, the later wins)."""
    asked: dict[str, str] = {}
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        for record in records_in(cell.get("outputs", [])):
            requirements = (record.get("environment") or {}).get("requirements") or {}
            if isinstance(requirements, dict):
                asked.update({str(name): str(spec) for name, spec in requirements.items()
                              if _plain_requirement(str(name), str(spec))})
    return asked


def _plain_requirement(name: str, spec: str) -> bool:
    """A name and a version specifier only: what a record may ask a re-run for (the
    notebook may come from anyone; nothing else reaches the kernel's environment)."""
    try:
        checked_requirements({name: spec})
    except PackageError:
        return False
    return True


def gpunet_cells(notebook: Any) -> list[tuple[int, Any]]:
    """(index, cell) of the code cells that ran on gpunet: ``%%gpunet`` cells, and any
    cell whose outputs hold a provenance record (``net.run`` / ``net.map`` calls)."""
    return [(index, cell) for index, cell in enumerate(notebook.cells)
            if cell.cell_type == "code" and (cell.source.lstrip().startswith("%%gpunet") or records_in(cell.outputs))]


def _label(index: int, cell: Any) -> str:
    first = next((line for line in cell.source.splitlines() if line.strip()), "")
    return f"cell {index + 1}: {first[:60]}"


# -- comparing -------------------------------------------------------------------------------


def reproduce(path: str | os.PathLike[str], *, connect: str | None = None, timeout: int = 600) -> list[CellOutcome]:
    """Re-run the notebook at ``path`` and compare each gpunet cell with its records."""
    original = read_notebook(path)
    executed = execute(original, directory=Path(path).resolve().parent, connect=connect, timeout=timeout)
    return compare_notebooks(original, executed)


def compare_notebooks(original: Any, executed: Any) -> list[CellOutcome]:
    """The outcome of each gpunet cell of ``original``, against the same cell of ``executed``."""
    outcomes = []
    for index, cell in gpunet_cells(original):
        label = _label(index, cell)
        recorded = records_in(cell.outputs)
        if not recorded:
            outcomes.append(CellOutcome(index, label, NOT_REPRODUCIBLE, ["the notebook holds no provenance record "
                                                                         "for this cell (run it with gpunet to make one)"]))
            continue
        rerun_cell = executed.cells[index]
        outcomes.append(compare_cell(index, label, recorded, records_in(rerun_cell.outputs), _error_of(rerun_cell)))
    return outcomes


def _error_of(cell: Any) -> str | None:
    for output in cell.outputs:
        if output.get("output_type") == "error":
            return f"{output.get('ename')}: {output.get('evalue')}"
    return None


def compare_cell(index: int, label: str, recorded: list[dict[str, Any]], rerun: list[dict[str, Any]],
                 error: str | None = None) -> CellOutcome:
    """Compare a cell's recorded records with the re-run's, in order."""
    outcome = CellOutcome(index, label, SAME)
    if error is not None:
        outcome.details.append(f"the re-run raised {error}")
    if len(rerun) != len(recorded):
        outcome.status = DIFFERENT
        outcome.details.append(f"the notebook has {len(recorded)} record(s) for this cell, the re-run made {len(rerun)}")
    for number, (old, new) in enumerate(zip(recorded, rerun)):
        prefix = f"call {number + 1}: " if len(recorded) > 1 else ""
        try:
            _compare_records(outcome, prefix, old, new)
        except Exception as exc:  # noqa: BLE001 - a record edited into any shape
            outcome.status = DIFFERENT
            outcome.details.append(f"{prefix}the recorded record cannot be read ({type(exc).__name__}: {exc}); "
                                   "gpunet reproduce --check-only says what is wrong with it")
    return outcome


def _compare_records(outcome: CellOutcome, prefix: str, old: dict[str, Any], new: dict[str, Any]) -> None:
    """Add what differs between one recorded record and its re-run to ``outcome``."""
    if (old.get("code") or {}).get("digest") != (new.get("code") or {}).get("digest"):
        outcome.details.append(f"{prefix}the code differs from the code that made the record")
    changed = _changed_names(old.get("inputs") or {}, new.get("inputs") or {})
    if changed:
        outcome.details.append(f"{prefix}input{'s' * (len(changed) > 1)} {', '.join(changed)} differ from the "
                               "recorded ones")
    old_out, new_out = old.get("outputs") or {}, new.get("outputs") or {}
    for name in sorted(set(old_out) | set(new_out)):
        status, difference = compare_output(f"{prefix}{name}", old_out.get(name), new_out.get(name))
        if difference is not None:
            outcome.differences.append(difference)
        outcome.status = _worse(outcome.status, status)


def _changed_names(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return [name for name in sorted(set(old) | set(new))
            if (old.get(name) or {}).get("digest") != (new.get(name) or {}).get("digest")
            or (old.get(name) or {}).get("digest") is None]


def _worse(a: str, b: str) -> str:
    order = [SAME, WITHIN, DIFFERENT]
    return max(a, b, key=order.index)


def compare_output(name: str, old: dict[str, Any] | None, new: dict[str, Any] | None) -> tuple[str, Difference | None]:
    """(status, the difference or None) of one output's recorded and re-run entries."""
    if old is None or new is None:
        missing = "the recorded cell" if old is None else "the re-run"
        return DIFFERENT, Difference(name, f"{missing} has no output {name!r}", _shown(old), _shown(new))
    if old.get("digest") is not None and old.get("digest") == new.get("digest"):
        return SAME, None
    if old.get("digest") is None:
        return DIFFERENT, Difference(name, f"it has no digest to compare ({old.get('no_digest')})", _shown(old),
                                     _shown(new))
    tolerance = Tolerance(**old["tolerance"]) if old.get("class") == "float" and old.get("tolerance") else EXACT
    if "value" in old and "value" in new:
        a, b = kept_value(old), kept_value(new)
        try:
            mismatch = compare(b, a, tolerance, path=name)
        except Exception as exc:  # noqa: BLE001 - values of any shape
            return DIFFERENT, Difference(name, f"the values could not be compared ({exc})", _shown(old), _shown(new))
        biggest_abs, biggest_rel = max_differences(a, b)
        size = f"max abs difference {biggest_abs:.3g}, max rel difference {biggest_rel:.3g}"
        if mismatch is None:
            return WITHIN, Difference(name, f"within rtol={tolerance.rtol:g}, atol={tolerance.atol:g}: {size}",
                                      _shown(old), _shown(new))
        return DIFFERENT, Difference(name, f"{mismatch}; {size}", _shown(old), _shown(new))
    if "summary" in old and "summary" in new:
        return _compare_summaries(name, old, new, tolerance)
    return DIFFERENT, Difference(name, "the digests differ, and the values were too large to keep, so how much "
                                       "cannot be said", _shown(old), _shown(new))


def _compare_summaries(name: str, old: dict[str, Any], new: dict[str, Any],
                       tolerance: Tolerance) -> tuple[str, Difference]:
    a, b = old["summary"], new["summary"]
    if a.get("shape") != b.get("shape") or a.get("dtype") != b.get("dtype"):
        return DIFFERENT, Difference(name, f"shape/dtype {a.get('shape')} {a.get('dtype')} became "
                                           f"{b.get('shape')} {b.get('dtype')}", _shown(old), _shown(new))
    count = 1
    for n in a.get("shape") or []:
        count *= n
    limits = {"min": 1, "max": 1, "mean": 1, "sum": max(count, 1)}  # a sum's error grows with its terms
    worst = max(abs(a[k] - b[k]) - (tolerance.atol * limits[k] + tolerance.rtol * abs(a[k])) for k in limits)
    size = ", ".join(f"{k} {a[k]:.6g} -> {b[k]:.6g}" for k in limits)
    if worst <= 0:
        return WITHIN, Difference(name, f"by its summary (too large to keep), within rtol={tolerance.rtol:g}: {size}",
                                  _shown(old), _shown(new))
    return DIFFERENT, Difference(name, f"by its summary (too large to keep): {size}", _shown(old), _shown(new))


def max_differences(a: Any, b: Any) -> tuple[float, float]:
    """The largest absolute and relative difference between the numbers of ``a`` and ``b``."""
    import numpy as np

    biggest_abs = biggest_rel = 0.0
    for x, y in zip(_leaves(a), _leaves(b)):
        try:
            x64 = np.asarray(x, dtype=np.complex128)
            y64 = np.asarray(y, dtype=np.complex128)
            if x64.shape != y64.shape or x64.size == 0:
                continue
        except (TypeError, ValueError):
            continue
        with np.errstate(all="ignore"):
            diff = np.abs(x64 - y64)
            rel = diff / np.maximum(np.abs(x64), np.finfo(np.float64).tiny)
        finite = diff[np.isfinite(diff)]
        if finite.size:
            biggest_abs = max(biggest_abs, float(finite.max()))
        finite = rel[np.isfinite(rel) & (diff > 0)]
        if finite.size:
            biggest_rel = max(biggest_rel, float(finite.max()))
    return biggest_abs, biggest_rel


def _leaves(value: Any) -> Iterable[Any]:
    if isinstance(value, dict):
        for key in sorted(value, key=str):
            yield from _leaves(value[key])
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _leaves(item)
    elif hasattr(value, "to_numpy"):
        yield value.to_numpy()
    else:
        yield value


def _shown(entry: dict[str, Any] | None, limit: int = 400) -> str:
    """A short text of a record entry: its kept value, else its summary, else its digest."""
    if entry is None:
        return "(none)"
    if "value" in entry:
        try:
            text = repr(kept_value(entry))
        except GpunetError as exc:
            text = f"<kept value does not decode: {exc}>"
    elif "summary" in entry:
        text = "summary " + ", ".join(f"{k}={v}" for k, v in entry["summary"].items())
    else:
        text = f"{entry.get('type')} {entry.get('digest') or entry.get('no_digest')}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- checking without running ------------------------------------------------------------------


def check_only(path: str | os.PathLike[str], *, public_key: str | None = None) -> list[CellOutcome]:
    """Check every record and receipt in the notebook at ``path`` without running anything."""
    notebook = read_notebook(path)
    receipts, receipt_problems = _receipts(path, public_key)
    paid_by: dict[str, list[int]] = {}  # a map's shared hold is settled in parts
    for receipt in receipts:
        for entry in receipt["entries"]:
            if entry.get("kind") == "settle":
                paid_by.setdefault(entry.get("hold"), []).append(entry.get("index"))
    outcomes = []
    for index, cell in gpunet_cells(notebook):
        label = _label(index, cell)
        records = records_in(cell.outputs)
        if not records:
            outcomes.append(CellOutcome(index, label, NOT_REPRODUCIBLE, ["the cell has no provenance record"]))
            continue
        outcome = CellOutcome(index, label, CHECKED)
        for number, record in enumerate(records):
            prefix = f"call {number + 1}: " if len(records) > 1 else ""
            source = cell.source if cell.source.lstrip().startswith("%%gpunet") else None
            problems = check_record(record, source)
            if problems:
                outcome.status = BROKEN
                outcome.details.extend(prefix + problem for problem in problems)
            holds = ((record.get("payment") or {}).get("holds") or []) if isinstance(record, dict) else []
            entries = [index for hold in holds for index in paid_by.get(hold, [])]
            if entries:
                outcome.details.append(f"{prefix}paid by ledger entr{'ies' if len(entries) > 1 else 'y'} "
                                       f"{', '.join(str(e) for e in entries)} (receipt verified)")
            elif holds and receipts:
                outcome.details.append(f"{prefix}its holds are not settled in any receipt of this notebook")
        outcomes.append(outcome)
    if receipt_problems:
        outcomes.append(CellOutcome(-1, "receipts", BROKEN, receipt_problems))
    elif not receipts:
        outcomes.append(CellOutcome(-1, "receipts", CHECKED, ["the notebook holds no credit receipt (%gpunet "
                                                              "receipt keeps one), so what the cells cost was not "
                                                              "checked"]))
    else:
        outcomes.append(CellOutcome(-1, "receipts", CHECKED, [f"{len(receipts)} receipt(s) verified"]))
    return outcomes


def _receipts(path: str | os.PathLike[str], public_key: str | None) -> tuple[list[dict[str, Any]], list[str]]:
    """The credit receipts a notebook holds (``%gpunet receipt`` outputs), each checked as
    ``gpunet ledger verify --receipt`` checks it: entries, inclusion proofs, the signed
    head, the service's pinned key, and the head against every head seen of its ledger."""
    witness = Witness()
    good, problems = [], []
    try:
        items = [item for item in read_documents(path) if item["receipt"] is not None]
    except (LedgerVerificationError, ValueError) as exc:
        return [], [f"the notebook's receipts cannot be read: {exc}"]
    for item in items:
        try:
            check_receipt(item["receipt"], witness=witness, service=item["service"], public_key=public_key,
                          also=[item["ledger"]] if item["ledger"] else [], source=item["source"])
            good.append(item["receipt"])
        except LedgerVerificationError as exc:
            problems.append(f"the receipt in {item['source']} does not verify: {exc}")
    return good, problems


# -- showing -------------------------------------------------------------------------------------


def table(outcomes: list[CellOutcome]) -> str:
    """The outcomes as a plain-text table, one cell a row, its details indented below."""
    width = max([len(o.label) for o in outcomes] + [4])
    lines = [f"{'cell'.ljust(width)}  status", f"{'-' * width}  {'-' * 16}"]
    for outcome in outcomes:
        lines.append(f"{outcome.label.ljust(width)}  {outcome.status}")
        lines.extend(f"{' ' * width}    {detail}" for detail in outcome.details)
        lines.extend(f"{' ' * width}    {d.name}: {d.how}" for d in outcome.differences)
    return "\n".join(lines)


def html_report(path: str, outcomes: list[CellOutcome]) -> str:
    """A standalone HTML page: the table, and each difference side by side."""
    rows = []
    for outcome in outcomes:
        notes = "<br>".join(html.escape(detail) for detail in outcome.details)
        rows.append(f"<tr class='{'good' if outcome.good else 'bad'}'><td>{html.escape(outcome.label)}</td>"
                    f"<td>{html.escape(outcome.status)}</td><td>{notes}</td></tr>")
    sections = []
    for outcome in outcomes:
        for d in outcome.differences:
            sections.append(
                f"<h3>{html.escape(outcome.label)} · {html.escape(d.name)}</h3><p>{html.escape(d.how)}</p>"
                "<table class='side'><tr><th>recorded</th><th>re-run</th></tr>"
                f"<tr><td><pre>{html.escape(d.recorded)}</pre></td><td><pre>{html.escape(d.rerun)}</pre></td></tr></table>")
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>gpunet reproduce: {html.escape(path)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;
padding:4px 8px;vertical-align:top;text-align:left}}tr.bad td:nth-child(2){{color:#b00;font-weight:bold}}
tr.good td:nth-child(2){{color:#070}}table.side td{{width:50%}}pre{{white-space:pre-wrap;margin:0}}</style>
</head><body><h1>gpunet reproduce</h1><p>{html.escape(path)}</p>
<table><tr><th>cell</th><th>status</th><th>details</th></tr>{''.join(rows)}</table>
<h2>Differences</h2>{''.join(sections) or '<p>none</p>'}</body></html>
"""


def exit_status(outcomes: list[CellOutcome]) -> int:
    """0 when every cell is same or within tolerance (or, checked only, intact), else 1."""
    return 0 if all(outcome.good for outcome in outcomes) else 1

