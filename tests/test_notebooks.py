"""Every notebook in notebooks/ runs end to end, headless, through nbclient and an ipykernel."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest

from gpunet.demo import main as demo_main, run_notebook

NOTEBOOKS = sorted(p for p in (Path(__file__).parent.parent / "notebooks").glob("*.ipynb")
                   if not p.name.endswith(".executed.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    monkeypatch.delenv("GPUNET_SCHEDULER", raising=False)
    copy = tmp_path / path.name
    copy.write_text(path.read_text())
    notebook, executed = run_notebook(copy)
    errors = [out for cell in notebook.cells if cell.cell_type == "code"
              for out in cell.get("outputs", []) if out.output_type == "error"]
    assert errors == []
    sources = "\n".join(cell.source for cell in notebook.cells if cell.cell_type == "code")
    assert "%gpunet connect" in sources and ("%%gpunet" in sources or "gpunet.map" in sources)
    assert executed.exists()


def test_make_demo_summary(tmp_path, capsys, monkeypatch, detached):
    source = Path(__file__).parent.parent / "notebooks" / "quickstart.ipynb"
    copy = tmp_path / "quickstart.ipynb"
    copy.write_text(source.read_text())
    for name in ("GPUNET_SCHEDULER", "GPUNET_CREDITS", "GPUNET_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    assert demo_main([str(copy)]) == 0
    # The demo's network is gone: it must not stay in this process's environment, where
    # a later gpunet.connect() would look for it.
    assert not {"GPUNET_SCHEDULER", "GPUNET_CREDITS", "GPUNET_TOKEN"} & set(os.environ)
    out = capsys.readouterr().out
    assert "workers (2):" in out and "cpu:" in out
    assert "cells run remotely: 3" in out
    assert int(out.split("credits paid to the local provider: ")[1].split()[0]) > 0
    assert (tmp_path / "quickstart.executed.ipynb").exists()
    nbformat.read(tmp_path / "quickstart.executed.ipynb", as_version=4)
