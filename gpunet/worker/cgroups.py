"""A cgroup per sandbox: its memory (page cache, memfd and tmpfs pages included) and
process limits, where the provider's process may make one.

setrlimit counts only a process's private memory: a cell could hold any amount in a
``memfd_create`` file or on a tmpfs. A cgroup's memory limit charges those pages too, and
the kernel kills the sandbox that goes over it. :func:`cgroup_home` finds, once, where
this process can make cgroups (cgroup v2 with the memory and pids controllers delegated
to its own cgroup, or the cgroup v1 memory and pids hierarchies), by making a trial one;
:class:`SandboxCgroup` is one sandbox's.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class CgroupHome:
    """Where sandboxes' cgroups are made: ``version`` "v2" (one folder) or "v1" (a memory
    and a pids folder)."""

    version: str
    memory: Path
    pids: Path

    def describe(self) -> str:
        """A few words for the provider's isolation line."""
        return f"a cgroup {self.version} per sandbox (memory and processes, shared memory included)"


class SandboxCgroup:
    """One sandbox's cgroup (one folder per hierarchy): made with its limits, emptied and
    removed at the end."""

    def __init__(self, home: CgroupHome, name: str, memory_bytes: int | None, processes: int) -> None:
        self.home = home
        memory, pids = home.memory / name, home.pids / name
        self.memory_folder = memory
        self.folders: list[Path] = []  # those made (one for v2), removed at the end
        required = {pids / "pids.max": processes}
        optional = {}  # where the kernel has them: no swapping around the limit; v2 ends the whole sandbox
        if home.version == "v2":
            optional = {memory / "memory.swap.max": 0, memory / "memory.oom.group": 1}
            if memory_bytes:
                required[memory / "memory.max"] = memory_bytes
        elif memory_bytes:
            required[memory / "memory.limit_in_bytes"] = memory_bytes
            optional[memory / "memory.memsw.limit_in_bytes"] = memory_bytes
        try:
            for folder in dict.fromkeys((memory, pids)):
                folder.mkdir()
                self.folders.append(folder)
            for path, value in required.items():
                path.write_text(str(value))
        except OSError:
            self.remove()
            raise
        for path, value in optional.items():
            try:
                path.write_text(str(value))
            except OSError:
                pass

    def command(self, command: list[str]) -> list[str]:
        """``command`` as one that joins this cgroup first (a shell that moves itself in,
        then runs it), so that nothing it starts is ever outside."""
        joins = " && ".join(f'echo $$ > "${index + 1}"' for index in range(len(self.folders)))
        return ["/bin/sh", "-c", f'{joins} && shift {len(self.folders)} && exec "$@"', "sh",
                *(str(folder / "cgroup.procs") for folder in self.folders), *command]

    def killed_for_memory(self) -> bool:
        """Whether the kernel killed a process here for going over the memory limit."""
        events = self.memory_folder / ("memory.events" if self.home.version == "v2" else "memory.oom_control")
        try:
            counts = dict(line.split() for line in events.read_text().splitlines() if len(line.split()) == 2)
        except OSError:
            return False
        return int(counts.get("oom_kill", 0)) > 0

    def remove(self, within_s: float = 10.0) -> None:
        """Kill every process still here and remove the cgroup (bounded)."""
        deadline = time.monotonic() + within_s
        for folder in self.folders:
            while folder.exists():
                try:
                    for pid in (folder / "cgroup.procs").read_text().split():
                        try:
                            os.kill(int(pid), signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                    folder.rmdir()
                except OSError:  # busy while its processes exit
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.02)


@functools.lru_cache(maxsize=1)
def cgroup_home() -> CgroupHome | None:
    """Where this process can make a sandbox's cgroup with memory and pids limits; None
    where it cannot (then sandboxes have setrlimit limits only)."""
    for home in _candidates():
        try:
            trial = SandboxCgroup(home, f"gpunet-trial-{os.getpid()}", 64 * 1024**2, 8)
        except OSError:
            continue
        try:  # a process must be able to join it, as each sandbox does
            joined = subprocess.run(trial.command(["true"]), capture_output=True, timeout=30).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            joined = False
        trial.remove()
        if joined:
            return home
    return None


def _candidates() -> list[CgroupHome]:
    """cgroup v2 (at /sys/fs/cgroup or /sys/fs/cgroup/unified) below this process's own
    cgroup, where memory and pids are, or can be, enabled for its children, or beside it
    (a delegated parent, as systemd gives a user's session); then v1's memory and pids
    hierarchies below this process's cgroups in them."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    mine = {}
    for line in lines:
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else ["v2"]:
            mine[controller] = path.lstrip("/")
    found = []
    for mount in (CGROUP_ROOT, CGROUP_ROOT / "unified"):
        own = mount / mine.get("v2", "")
        if "v2" not in mine or not (mount / "cgroup.controllers").exists():
            continue
        if _delegated(own, enable=True):
            found.append(CgroupHome("v2", own, own))
        if own != mount and _delegated(own.parent, enable=False):
            found.append(CgroupHome("v2", own.parent, own.parent))
    if "memory" in mine and "pids" in mine:
        found.append(CgroupHome("v1", CGROUP_ROOT / "memory" / mine["memory"], CGROUP_ROOT / "pids" / mine["pids"]))
    return found


def _delegated(folder: Path, enable: bool) -> bool:
    """Whether ``folder``'s children get the memory and pids controllers (enabling them
    where asked and it may: a cgroup v2 with processes of its own refuses, unless it is the root)."""
    try:
        enabled = (folder / "cgroup.subtree_control").read_text().split()
        wanted = [name for name in ("memory", "pids") if name not in enabled]
        if wanted and not enable:
            return False
        if wanted:
            (folder / "cgroup.subtree_control").write_text(" ".join(f"+{name}" for name in wanted))
    except OSError:
        return False
    return True
