"""`gpunet reproduce`, end to end: a notebook written here runs on one embedded network
(through nbclient and an ipykernel), and its copies are re-run on fresh embedded networks
or checked without running."""

from __future__ import annotations

import json

import nbformat
import pytest

from gpunet import codec, provenance
from gpunet.cli import main as gpunet_main
from gpunet.reproduce import execute, gpunet_cells

CELLS = [
    "%load_ext gpunet\n%gpunet connect",
    "import numpy as np\nx = 3\nxs = np.linspace(0, 1, 50)",
    "%%gpunet\nimport numpy as np\ny = x * 2\nz = np.sin(xs) * x",
    "%%gpunet --map seed=range(3)\nimport numpy as np\nsample = float(np.random.default_rng(seed).normal())",
    "import gpunet\ntotal = gpunet.current().run(lambda a: float(a.sum()), z)",
    "print(y, total, sample)",
    # the session's receipt, once the scheduler has reported every settlement
    "import time\nnet, deadline = gpunet.current(), time.monotonic() + 60\n"
    "while net.metering_state()['queued'] and time.monotonic() < deadline:\n    time.sleep(0.05)",
    "%gpunet receipt",
    "%gpunet disconnect",
]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """The notebook, run once on an embedded network and saved with its records."""
    folder = tmp_path_factory.mktemp("reproduce")
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source) for source in CELLS])
    executed = execute(notebook, directory=folder)
    errors = [output for cell in executed.cells for output in cell.outputs if output.output_type == "error"]
    assert errors == []
    path = folder / "analysis.ipynb"
    nbformat.write(executed, path)
    return path


def _copy(path, name, edit):
    notebook = nbformat.read(path, as_version=4)
    edit(notebook)
    copy = path.with_name(name)
    nbformat.write(notebook, copy)
    return copy


def test_the_notebook_holds_a_record_for_every_gpunet_cell(recorded):
    notebook = nbformat.read(recorded, as_version=4)
    assert [index for index, _ in gpunet_cells(notebook)] == [2, 3, 4]
    (cell_record,) = provenance.records_in(notebook.cells[2].outputs)
    assert cell_record["outputs"]["y"]["digest"] == codec.digest(6)
    (map_record,) = provenance.records_in(notebook.cells[3].outputs)
    assert map_record["inputs"]["--map seed"]["digest"] == codec.digest([0, 1, 2])
    (run_record,) = provenance.records_in(notebook.cells[4].outputs)
    assert run_record["kind"] == "run" and run_record["inputs"]["args"]["class"] == "float"
    text = [output for output in notebook.cells[2].outputs if provenance.MIME_TYPE in output.get("data", {})]
    assert text[0]["data"]["text/plain"].startswith("gpunet: ran on provider ")


def test_a_copy_reproduces_on_a_fresh_network(recorded, tmp_path, capsys):
    copy = _copy(recorded, "copy.ipynb", lambda notebook: None)
    report = tmp_path / "report.html"
    assert gpunet_main(["reproduce", str(copy), "--report", str(report)]) == 0
    out = capsys.readouterr().out
    assert "3 of 3 gpunet cells reproduce" in out
    assert out.count("  same") == 3
    assert "<td>same</td>" in report.read_text()


def test_a_changed_input_makes_its_cells_different(recorded, capsys):
    def change_x(notebook):
        notebook.cells[1].source = notebook.cells[1].source.replace("x = 3", "x = 4")

    copy = _copy(recorded, "changed.ipynb", change_x)
    assert gpunet_main(["reproduce", str(copy)]) == 1
    out = capsys.readouterr().out
    rows = {line.split("  ")[0].split(":")[0]: line for line in out.splitlines() if line.startswith("cell ")}
    assert rows["cell 3"].rstrip().endswith("different") and rows["cell 5"].rstrip().endswith("different")
    assert rows["cell 4"].rstrip().endswith("same")
    assert "input x differ from the recorded ones" in out
    assert "y: " in out and "max abs difference 2" in out


def _receipt_key(path):
    """The public key of the receipt a notebook holds (what its reader gets from the operator)."""
    for cell in nbformat.read(path, as_version=4).cells:
        for output in cell.get("outputs", []):
            payload = output.get("data", {}).get("application/vnd.gpunet.receipt+json")
            if payload:
                return payload["receipt"]["head"]["public_key"]
    raise AssertionError(f"no receipt in {path}")


def test_check_only_passes_an_intact_notebook_and_catches_an_edited_digest(recorded, capsys):
    # An embedded network's receipt names no service and its key is pinned nowhere: a reader
    # must be given the key (by the notebook's author), or the receipt proves nothing.
    assert gpunet_main(["reproduce", str(recorded), "--check-only"]) == 1
    assert "names no credit service" in capsys.readouterr().out
    key = ["--public-key", _receipt_key(recorded)]
    assert gpunet_main(["reproduce", str(recorded), "--check-only", *key]) == 0
    out = capsys.readouterr().out
    assert "3 of 3 gpunet cells check out" in out and "1 receipt(s) verified" in out
    assert out.count("(receipt verified)") == 3, out  # each cell's holds, settled in the receipt's entries

    def forge(notebook):
        for output in notebook.cells[2].outputs:
            record = output.get("data", {}).get(provenance.MIME_TYPE)
            if record:
                record["outputs"]["z"]["digest"] = codec.digest([0.0])
                output["data"][provenance.MIME_TYPE] = provenance.seal(json.loads(json.dumps(record)))

    forged = _copy(recorded, "forged.ipynb", forge)
    assert gpunet_main(["reproduce", str(forged), "--check-only", *key]) == 1
    out = capsys.readouterr().out
    assert "record broken" in out and "output 'z'" in out and "does not match the value kept beside it" in out

    def pay_less(notebook):  # an edited ledger entry in the receipt
        for cell in notebook.cells:
            for output in cell.outputs:
                payload = output.get("data", {}).get("application/vnd.gpunet.receipt+json")
                if payload:
                    settle = next(e for e in payload["receipt"]["entries"] if e["kind"] == "settle")
                    settle["amount"] += 1

    assert gpunet_main(["reproduce", str(_copy(recorded, "receipt.ipynb", pay_less)), "--check-only", *key]) == 1
    out = capsys.readouterr().out
    assert "receipts" in out and "does not verify" in out and "was altered" in out


def test_bad_uses_are_one_clear_error(tmp_path, capsys):
    assert gpunet_main(["reproduce", str(tmp_path / "missing.ipynb")]) == 1
    assert "no notebook at" in capsys.readouterr().err
    (tmp_path / "bad.ipynb").write_text("not json")
    assert gpunet_main(["reproduce", str(tmp_path / "bad.ipynb"), "--check-only"]) == 1
    assert "is not a notebook nbformat can read" in capsys.readouterr().err
    assert gpunet_main(["reproduce", str(tmp_path / "bad.ipynb"), "--check-only", "--connect", "tcp://x:1"]) == 1
    assert "--check-only runs nothing" in capsys.readouterr().err
