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
        self.folders = list(dict.fromkeys((home.memory / name, home.pids / name)))
        for folder in self.folders:
            folder.mkdir()
        v2 = home.version == "v2"
        memory_file = "memory.max" if v2 else "memory.limit_in_bytes"
        required = {home.pids / name / "pids.max": processes}
        if memory_bytes:
            required[home.memory / name / memory_file] = memory_bytes
        # where the kernel has them: no swapping around the limit; v2 kills the whole sandbox
        optional = ({home.memory / name / "memory.swap.max": 0, home.memory / name / "memory.oom.group": 1} if v2
                    else {home.memory / name / "memory.memsw.limit_in_bytes": memory_bytes} if memory_bytes else {})
        try:
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
        events = self.folders[0] / ("memory.events" if self.home.version == "v2" else "memory.oom_control")
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
            SandboxCgroup(home, f"gpunet-trial-{os.getpid()}", 64 * 1024**2, 8).remove()
        except OSError:
            continue
        return home
    return None


def _candidates() -> list[CgroupHome]:
    """cgroup v2 (at /sys/fs/cgroup or /sys/fs/cgroup/unified) below this process's own
    cgroup, where memory and pids are, or can be, enabled for its children; then v1's
    memory and pids hierarchies below this process's cgroups in them."""
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
        if "v2" in mine and (mount / "cgroup.controllers").exists() and _delegated(own):
            found.append(CgroupHome("v2", own, own))
    if "memory" in mine and "pids" in mine:
        found.append(CgroupHome("v1", CGROUP_ROOT / "memory" / mine["memory"], CGROUP_ROOT / "pids" / mine["pids"]))
    return found


def _delegated(folder: Path) -> bool:
    """Whether ``folder``'s children get the memory and pids controllers (enabling them
    where it may: a cgroup v2 with processes of its own refuses, unless it is the root)."""
    try:
        enabled = (folder / "cgroup.subtree_control").read_text().split()
        wanted = [name for name in ("memory", "pids") if name not in enabled]
        if wanted:
            (folder / "cgroup.subtree_control").write_text(" ".join(f"+{name}" for name in wanted))
    except OSError:
        return False
    return True
