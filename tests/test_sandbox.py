"""Cells run in a sandbox on a provider's worker (issue 13.1): the attacks, as real processes.

One credit service, `gpunet scheduler --private --credits` and one `gpunet provide` process
with small sandbox limits, its home and token file in a tmp dir; each test connects
notebook sessions of its own (this process) and sends cells as a stranger would.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import psutil
import pytest

import gpunet
from gpunet.errors import CellTimeoutError, GpunetError
from gpunet.worker.cgroups import cgroup_home
from gpunet.worker.sandbox import bubblewrap_works
from gpunet_processes import metered_network

pytestmark = pytest.mark.skipif(
    not bubblewrap_works(),
    reason="bubblewrap (bwrap) is missing or cannot make namespaces here (apt-get install bubblewrap; .ci/run does)")

PROCESSES = 48
FILE_BYTES = 8 * 1024 * 1024
MEMORY_BYTES = 1024**3


@pytest.fixture(scope="module")
def market(tmp_path_factory):
    """A metered network with one provider (alice) whose home, with her token file and a
    secret, is a tmp dir; client carol."""
    place = tmp_path_factory.mktemp("sandbox")
    home = place / "home"
    home.mkdir()
    (home / "secret.txt").write_text("the provider's own secret")
    with metered_network(place, ["alice"], "carol", credits=100_000, token_folder=home, provide_env={"HOME": str(home)},
                         provide_args=("--sandbox-processes", str(PROCESSES), "--sandbox-file-size", str(FILE_BYTES),
                                       "--sandbox-memory", str(MEMORY_BYTES))) as network:
        network["home"] = home
        yield network


def connect(market):
    """A notebook session of carol's (a sandbox of its own on alice's worker)."""
    net = gpunet.connect(market["address"], credits=market["service"].url, token=market["tokens"]["carol"],
                         budget=5_000)
    net.client.wait_for_workers(1, timeout=60)
    return net


def identity_cell():
    """A function to run in a sandbox, returning a name for the sandbox process (made once
    per process) and its worker's address; made here so that it travels by value, as a
    notebook's functions do (no worker can import this module)."""

    def sandbox_identity():
        import builtins
        import os
        import uuid

        if not hasattr(builtins, "_test_sandbox_identity"):
            builtins._test_sandbox_identity = uuid.uuid4().hex
        return builtins._test_sandbox_identity, os.environ["GPUNET_WORKER"]

    return sandbox_identity


def worker_process(market):
    """alice's worker process (a child of her `gpunet provide` process)."""
    provide = psutil.Process(market["providers"]["alice"].pid)
    children = [child for child in provide.children() if "python" in child.name().lower()]
    assert children, "alice's worker process was not found"
    return children[0]


def test_provide_says_which_isolation_it_has(market):
    line = market["outputs"]["alice"]
    assert "bubblewrap" in line and "no network" in line and f"{PROCESSES} processes" in line, line
    home = cgroup_home()
    assert (f"cgroup {home.version} per sandbox" if home else "no cgroup could be made here") in line, line


OTHER_NOTEBOOK = """
import json, sys
import gpunet

def sandbox_identity():
    import builtins, os, uuid
    if not hasattr(builtins, "_test_sandbox_identity"):
        builtins._test_sandbox_identity = uuid.uuid4().hex
    return builtins._test_sandbox_identity, os.environ["GPUNET_WORKER"]

if __name__ == "__main__":
    with gpunet.connect(sys.argv[1], credits=sys.argv[2], token=sys.argv[3], budget=1000) as net:
        net.client.wait_for_workers(1, timeout=60)
        print(json.dumps([net.run(sandbox_identity, timeout=120), net.run(sandbox_identity, timeout=120)]))
"""


def test_sessions_never_share_a_sandbox_and_a_session_keeps_its_warm_one(market, detached):
    with connect(market) as first:
        one, where = first.run(identity_cell(), timeout=120)
        # another notebook, as its own process, while this session's sandbox is warm
        other = subprocess.run([sys.executable, "-c", OTHER_NOTEBOOK, market["address"], market["service"].url,
                                market["tokens"]["carol"]], capture_output=True, text=True, timeout=300)
        assert other.returncode == 0, other.stderr
        (theirs, where_too), (theirs_again, _) = json.loads(other.stdout.strip().splitlines()[-1])
        again, _ = first.run(identity_cell(), timeout=120)
    assert where == where_too and where in market["workers"]
    assert one == again and theirs == theirs_again, "a session's second cell must reuse its warm sandbox"
    assert theirs != one, "two sessions must never share a sandbox"


def test_a_cell_that_patches_the_runner_does_not_reach_the_next_session(market, detached):
    def poison():
        import gpunet.worker.runner as runner

        def hijacked(job, *args, **kwargs):
            raise RuntimeError("the attacker's runner")

        runner.execute_job = hijacked  # what a cell of today's main did to the worker itself
        runner._run_cell = hijacked
        return "patched"

    def honest():
        return 6 * 7

    with connect(market) as attacker:
        assert attacker.run(poison, timeout=120) == "patched"
        with pytest.raises(GpunetError, match="the attacker's runner"):
            attacker.run(honest, timeout=60)  # its own sandbox is poisoned: its own problem
    with connect(market) as victim:
        assert victim.run(honest, timeout=120) == 42


def test_a_cell_cannot_read_the_providers_token_or_home(market, detached):
    worker_pid = worker_process(market).pid
    token = market["tokens"]["alice"]
    home = str(market["home"])

    def steal(worker_pid, home):
        import os

        found = {"environ": dict(os.environ)}
        for name, path in (("self", "/proc/self/environ"), ("worker", f"/proc/{worker_pid}/environ"),
                           ("parent", f"/proc/{os.getppid()}/environ"), ("token", f"{home}/alice-token"),
                           ("secret", f"{home}/secret.txt")):
            try:
                with open(path, "rb") as file:
                    found[name] = file.read().decode(errors="replace")
            except OSError as exc:
                found[name] = f"refused: {type(exc).__name__}"
        try:
            found["home"] = sorted(os.listdir(home))
        except OSError as exc:
            found["home"] = f"refused: {type(exc).__name__}"
        found["worker visible"] = os.path.exists(f"/proc/{worker_pid}")
        return found

    with connect(market) as net:
        found = net.run(steal, worker_pid, home, timeout=120)
    assert token not in repr(found), found
    assert "the provider's own secret" not in repr(found), found
    assert found["token"].startswith("refused") and found["secret"].startswith("refused"), found
    assert found["home"] in ([], ) or str(found["home"]).startswith("refused"), found
    assert not any(name.startswith("GPUNET_") and "TOKEN" in name for name in found["environ"]), found["environ"]
    # and the worker itself still has it, out of reach
    assert worker_process(market).is_running()


def test_a_fork_bomb_a_memory_hog_and_a_file_hog_are_contained(market, detached):
    def fork_bomb():
        import os
        import time

        children = 0
        try:
            for _ in range(10_000):
                if os.fork() == 0:
                    time.sleep(60)
                    os._exit(0)
                children += 1
        except OSError as exc:
            return children, type(exc).__name__
        return children, None

    def memory_hog():
        try:
            hog = bytearray(4 * 1024**3)
        except MemoryError:
            return "MemoryError"
        return f"allocated {len(hog)}"

    def file_hog():
        import os

        try:
            with open("hog.bin", "wb") as out:
                for _ in range(64):
                    out.write(b"\0" * 1024 * 1024)
        except OSError as exc:
            return type(exc).__name__, os.path.getsize("hog.bin")
        return None, os.path.getsize("hog.bin")

    with connect(market) as attacker:
        children, error = attacker.run(fork_bomb, timeout=120)
        assert error is not None and children < PROCESSES, (children, error)
        assert attacker.run(memory_hog, timeout=120) == "MemoryError"
        error, size = attacker.run(file_hog, timeout=120)
        assert error == "OSError" and size <= FILE_BYTES, (error, size)
    with connect(market) as next_session:
        assert next_session.run(identity_cell(), timeout=120)[1] in market["workers"]


def sandbox_cgroup_cell():
    """A function to run in a sandbox, returning the name of its cgroup: that of its scratch
    directory (its own cgroup namespace shows it only "/")."""

    def cgroup_name():
        import os

        return os.path.basename(os.getcwd())

    return cgroup_name


def wait_until_gone(folder, within_s=60.0):
    deadline = time.monotonic() + within_s
    while folder.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    return not folder.exists()


@pytest.mark.skipif(cgroup_home() is None, reason="no cgroup can be made here (neither cgroup v2 with memory and "
                    "pids delegated to this process's cgroup nor writable cgroup v1 memory and pids hierarchies): "
                    "sandboxes have setrlimit limits only")
def test_memory_in_memfds_is_contained_by_the_sandboxs_cgroup_which_goes_with_it(market, detached):
    def memfd_hog():
        import os

        files, chunk = [], b"\1" * 2**20
        while len(files) * 8 < 2 * 1024:  # 2 GiB in 8 MiB memfds (the file size limit): twice the memory limit
            files.append(os.memfd_create("hog"))
            for _ in range(8):
                os.write(files[-1], chunk)
        return f"held {len(files) * 8} MiB"

    home = cgroup_home()
    with connect(market) as attacker:
        name = attacker.run(sandbox_cgroup_cell(), timeout=120)
        assert (home.memory / name / "cgroup.procs").read_text().split(), f"the sandbox is not in its cgroup {name}"
        with pytest.raises(GpunetError, match="memory limit"):
            attacker.run(memfd_hog, timeout=120)
    with connect(market) as next_session:
        other = next_session.run(sandbox_cgroup_cell(), timeout=120)
        assert other != name and (home.pids / other / "cgroup.procs").read_text().split()
    assert wait_until_gone(home.memory / name) and wait_until_gone(home.pids / name), "the hog's cgroup was removed"
    assert wait_until_gone(home.memory / other), "a closed session's cgroup was removed"


def test_a_timeout_kills_the_sandboxs_work_and_the_worker_lives(market, detached):
    def stuck_in_c():
        import time

        time.sleep(600)  # no exception reaches C code: only ending the sandbox stops it

    def spinning():
        while True:  # Python code: the stop reaches it inside the sandbox
            pass

    worker = worker_process(market)
    with connect(market) as net:
        first, _ = net.run(identity_cell(), timeout=120)
        with pytest.raises(CellTimeoutError):
            net.run(spinning, timeout=3)
        before, where = net.run(identity_cell(), timeout=120)
        assert before == first, "a cell stopped in Python code leaves its session's sandbox warm"
        started = time.monotonic()
        with pytest.raises(CellTimeoutError):
            net.run(stuck_in_c, timeout=3)
        assert time.monotonic() - started < 60
        after, where_after = net.run(identity_cell(), timeout=120)
    assert where_after == where, "the same worker serves the session"
    assert after != before, "the stuck sandbox was ended and a fresh one serves the next cell"
    assert worker_process(market).pid == worker.pid, "the worker process lives"
    sleepers = [child for child in psutil.Process(worker.pid).children(recursive=True)
                if child.is_running() and child.status() != psutil.STATUS_ZOMBIE and "sleep" in " ".join(child.cmdline())]
    assert not sleepers
