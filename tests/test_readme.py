"""The README runs as written: its marked blocks run here against real networks
(tests/readme_blocks.py says how blocks are marked), and every block is either run,
skipped with a reason, or plain text."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from network_probes import EXIT_NOISE, process_alive, wait_until
from readme_blocks import RUNNABLE, blocks, write_session

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DRIVER = Path(__file__).resolve().parent / "readme_blocks.py"


def _session(name: str) -> list:
    return [block for block in blocks(README.read_text()) if block.session == name]


def test_every_readme_block_is_run_skipped_with_a_reason_or_text():
    for block in blocks(README.read_text()):
        if block.language == "text":
            continue
        assert block.how is not None, (f"README.md line {block.line}: a ```{block.language} block needs a "
                                       "<!-- readme-test: SESSION --> or <!-- readme-test: skip (why) --> above it, "
                                       "or ```text if it is not code to run")
        if block.session is not None:
            assert block.language in RUNNABLE, f"README.md line {block.line}: cannot run ```{block.language}"
        else:
            assert "(" in block.how, f"README.md line {block.line}: a skipped block says why: skip (why)"
    assert _session("notebook") and _session("market")


def _environment(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUNET_") or k == "GPUNET_DATA_DIR"}
    env["GPUNET_DATA_DIR"] = str(tmp_path / "data")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the `gpunet` command
    env["PYTHONUNBUFFERED"] = "1"
    return env



def test_the_notebook_blocks_run_and_leave_nothing_behind(tmp_path):
    """"In a notebook" and "From Python", in one IPython shell that then exits without
    %gpunet disconnect: quietly, and nothing it started may keep running."""
    session = _session("notebook")
    probe = ("import gpunet, json, os\nnet = gpunet.current()\n"
             "json.dump({'credits': net.embedded.credits_service.pid, "
             "'workers': list(net.client.run(os.getpid).values())}, open('pids.json', 'w'))\n")
    cells = write_session(session, tmp_path / "blocks.json")
    cells.write_text(json.dumps(json.loads(cells.read_text()) + [{"code": probe, "line": 0}]))
    result = subprocess.run([sys.executable, str(DRIVER), str(cells)], cwd=tmp_path, env=_environment(tmp_path),
                            capture_output=True, text=True, timeout=240)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "1024" in output and "[2, 4, 6]" in output and "done" in output, output
    assert not [word for word in EXIT_NOISE if word in output], output
    pids = json.loads((tmp_path / "pids.json").read_text())
    wait_until(lambda: not any(process_alive(pid) for pid in [pids["credits"], *pids["workers"]]), 30,
               "the credit service and the workers to end with the shell")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_market_in_five_commands(tmp_path):
    """The walkthrough as written, but on free ports (8765 and 8786 are replaced): the
    shell blocks in bash, the notebook's in one IPython shell, in one folder."""
    ports = {"8765": str(_free_port()), "8786": str(_free_port())}
    env = _environment(tmp_path)
    groups: list[int] = []
    logs: list[Path] = []
    ipython_cells: list[dict] = []

    def run_ipython_cells() -> None:
        if not ipython_cells:
            return
        cells = tmp_path / f"cells-{len(logs)}.json"
        cells.write_text(json.dumps(ipython_cells))
        log = tmp_path / f"ipython-{len(logs)}.log"
        logs.append(log)
        with open(log, "w") as out:
            result = subprocess.run([sys.executable, str(DRIVER), str(cells)], cwd=tmp_path, env=env, stdout=out,
                                    stderr=subprocess.STDOUT, timeout=240)
        ipython_cells.clear()
        assert result.returncode == 0, log.read_text()

    try:
        for block in _session("market"):
            code = block.code
            for port, free in ports.items():
                code = code.replace(port, free)
            if block.language == "python":
                ipython_cells.append({"code": code, "line": block.line})
                continue
            run_ipython_cells()
            log = tmp_path / f"bash-{len(logs)}.log"
            logs.append(log)
            with open(log, "w") as out:
                # its own process group, so that what it leaves running in the background can be stopped
                process = subprocess.Popen(["bash", "-e", "-c", code], cwd=tmp_path, env=env, stdout=out,
                                           stderr=subprocess.STDOUT, start_new_session=True)
                groups.append(process.pid)
                assert process.wait(timeout=240) == 0, f"README line {block.line}:\n{log.read_text()}"
        run_ipython_cells()
    finally:
        for group in groups:  # Ctrl-C to what the blocks started, then whatever is left
            try:
                os.killpg(group, signal.SIGINT)
            except ProcessLookupError:
                continue
        for group in groups:
            try:
                wait_until(lambda: not _group_alive(group), 60, f"process group {group} to stop")
            except AssertionError:
                os.killpg(group, signal.SIGKILL)
    output = "\n".join(log.read_text() for log in logs)
    assert "verified" in output.lower() or "norm" in output, output
    assert "gpu-a: " in output and "OK ledger" in output, output
    for name in ("alice", "gpu-a", "gpu-b", "meter"):
        token_file = tmp_path / f"{name}.token"
        assert token_file.stat().st_mode & 0o777 == 0o600
        assert token_file.read_text().strip() not in output, f"{name}'s token was printed"
    earned = int(output.split("gpu-a: ")[1].split()[0])
    assert earned > 0, "gpu-a's worker ran a copy and was paid for it"


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


def _kernel_recipe() -> list[str]:
    """The command `make kernel` runs, from the Makefile (with $(BIN) and $(KERNEL) filled in)."""
    text = (ROOT / "Makefile").read_text()
    recipe = text.split("\nkernel:", 1)[1].split("\n")[1].strip()
    kernel = next(line.split(":=")[1].strip() for line in text.splitlines() if line.startswith("KERNEL :="))
    words = shlex.split(recipe.replace("$(KERNEL)", kernel))
    return [sys.executable if word == "$(BIN)/python" else word for word in words]


def test_the_notebooks_name_the_kernel_that_make_kernel_registers():
    command = _kernel_recipe()
    name = command[command.index("--name") + 1]
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        if path.name.endswith(".executed.ipynb"):
            continue
        spec = json.loads(path.read_text())["metadata"]["kernelspec"]
        assert spec["name"] == name and spec["display_name"] == "Python (gpunet)", path.name
    assert "make lab" in README.read_text() and "Python (gpunet)" in README.read_text()


def test_the_registered_kernel_runs_gpunet(tmp_path):
    """`make kernel`'s command, into a Jupyter data dir of the test's own; a notebook
    naming that kernel then imports gpunet in it."""
    import nbformat
    from nbclient import NotebookClient

    env = dict(os.environ, JUPYTER_DATA_DIR=str(tmp_path / "jupyter"))
    subprocess.run(_kernel_recipe(), env=env, check=True, capture_output=True, timeout=120)
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import gpunet\nprint(gpunet.__version__)")])
    notebook.metadata["kernelspec"] = json.loads((ROOT / "notebooks" / "quickstart.ipynb").read_text())[
        "metadata"]["kernelspec"]
    previous = os.environ.get("JUPYTER_DATA_DIR")
    os.environ["JUPYTER_DATA_DIR"] = env["JUPYTER_DATA_DIR"]
    try:
        NotebookClient(notebook, timeout=120).execute()
    finally:
        if previous is None:
            del os.environ["JUPYTER_DATA_DIR"]
        else:
            os.environ["JUPYTER_DATA_DIR"] = previous
    import gpunet

    assert notebook.cells[0].outputs[0]["text"].strip() == gpunet.__version__
