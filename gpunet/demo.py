"""``make demo``: run a notebook headless against an embedded network and summarise.

    python -m gpunet.demo notebooks/quickstart.ipynb

Starts the embedded network (as ``gpunet up`` does), points the notebook's
``%gpunet connect`` at it through ``GPUNET_SCHEDULER``, executes the notebook with
nbclient, writes the executed copy beside it (``*.executed.ipynb``) and prints the
workers with their devices, the cells that ran remotely, and the time taken.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from gpunet.client.local import EmbeddedNetwork
from gpunet.client.network import connect


def run_notebook(path: Path, *, timeout: int = 600) -> tuple[object, Path]:
    """Execute ``path`` headless in a fresh ipykernel; returns (notebook, written copy)."""
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    executed = path.with_suffix(".executed.ipynb")
    nbformat.write(notebook, executed)
    return notebook, executed


def remote_cells(notebook: object) -> int:
    """How many code cells of the executed notebook were %%gpunet cells."""
    return sum(1 for cell in notebook.cells  # type: ignore[attr-defined]
               if cell.cell_type == "code" and cell.source.lstrip().startswith("%%gpunet"))


def _spent(embedded: object) -> int | None:
    """Credits the embedded network's provider was paid (None without credits)."""
    service = getattr(embedded, "credits_service", None)
    if service is None:
        return None
    operator = service.client()
    try:
        return operator.balance(embedded.LOCAL_PROVIDER)  # type: ignore[attr-defined]
    finally:
        operator.close()


@contextlib.contextmanager
def _environment(settings: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of the block, then put back what was there."""
    before = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    path = Path(argv[0] if argv else "notebooks/quickstart.ipynb")
    started = time.monotonic()
    embedded = EmbeddedNetwork()
    try:
        print(f"gpunet demo: {embedded.note}; scheduler {embedded.scheduler_address}", flush=True)
        with connect(embedded.scheduler_address) as net:
            workers = net.workers()
        settings = {"GPUNET_SCHEDULER": embedded.scheduler_address}
        if embedded.credits_service is not None:  # the notebook's cells are metered too
            settings.update(GPUNET_CREDITS=embedded.credits_url, GPUNET_TOKEN=embedded.client_token)
        with _environment(settings):  # the notebook's kernel inherits them; this process keeps its own
            notebook, executed = run_notebook(path)
        spent = _spent(embedded)
    finally:
        embedded.close()
    print(f"\nran {path} headless; executed copy: {executed}")
    print(f"workers ({len(workers)}):")
    for worker in workers:
        print(f"  {worker.address}  {worker.device.get('label', 'unknown device')}")
    print(f"cells run remotely: {remote_cells(notebook)}")
    if spent is not None:
        print(f"credits paid to the local provider: {spent}")
    print(f"time taken: {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
