"""A session's Python environment on a provider's worker: what the provider has installed,
whether that satisfies a cell, and, where the provider allows installs, a virtual
environment of the session's own built from the package registry.

A cell travels with its *requirements* (``{distribution: specifier}``, e.g.
``{"tinycss2": "==1.4.0"}``, found in the notebook: :mod:`gpunet.packages`). A worker
whose own (base) environment satisfies them runs the cell there. Otherwise, where the
provider started with ``gpunet provide --allow-installs``, :class:`SessionEnvironments`
builds a virtual environment layered over the base (``python -m venv
--system-site-packages``: only what the base lacks goes into it), once per session and
requirements digest, and keeps it while the worker lives (at most
:data:`ENVIRONMENTS_KEPT`, of which :data:`ENVIRONMENTS_PER_SESSION` per session, the least
recently used removed first):

1. pip resolves what the venv lacks (``--dry-run --report``: names, versions, URLs and
   the registry's SHA-256 of each file), binary wheels only unless the provider
   allows builds;
2. each file not yet in the wheel cache that every session of this worker shares is
   downloaded, its size counted against the provider's cap as it comes and its SHA-256
   checked against the registry's;
3. pip installs those files, and nothing else (``--no-index --no-deps``), within the
   provider's time cap.

Every step runs in a process group of its own (downloads in a thread): a stop of the job
(Ctrl-C, its timeout) ends the build at once, kills the group and removes the half-built
environment (:class:`InstallStopped`), so that the next try starts clean.

:meth:`SessionEnvironments.prepare` returns a :class:`PreparedEnvironment`: the Python
executable of the session and its ``site-packages``: what the session's sandbox
(:class:`gpunet.worker.sandbox.SandboxPool`) puts first on its ``sys.path``, or
:func:`layered` when the cell runs in the worker process itself. Nothing here runs a cell.

What an install lets a stranger do: choose packages from the registry that the
provider's machine downloads and unpacks. A wheel runs no code when it is installed
(an sdist's build would: refused unless the provider passes ``--allow-builds``); its
code runs when the cell imports it, which is the cell running anyway. The size and time
caps bound the disk and the minutes a client can take, and the environments kept bound
how many a client can leave behind.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import signal
import sysconfig
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Container, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from gpunet.errors import PackageError
from gpunet.worker.device import format_bytes

#: How `gpunet provide --allow-installs` tells its worker processes its install policy (JSON).
INSTALLS_ENV = "GPUNET_ALLOW_INSTALLS"
#: Default caps of one session's install: bytes downloaded, seconds taken.
DEFAULT_MAX_INSTALL_BYTES = 200 * 1024 * 1024
DEFAULT_MAX_INSTALL_SECONDS = 300.0
#: Session environments a worker keeps (beyond this, one not in use is removed: of the session
#: that keeps the most, its least recently used; :func:`evictions`).
ENVIRONMENTS_KEPT = 8
#: Of those, one session keeps at most this many (its cells may alternate between them).
ENVIRONMENTS_PER_SESSION = 4
#: The wheel cache holds at most this many sessions' installs at the cap (least recently used
#: wheels removed first), so that clients cannot fill the provider's disk through it.
WHEEL_CACHE_INSTALLS = 10
#: What a session's wheels may unpack to, in multiples of the download cap (a wheel is a zip:
#: a few kilobytes of it may unpack to gigabytes), and in files.
UNPACKED_PER_DOWNLOADED = 10
MAX_UNPACKED_FILES = 200_000
#: Most distributions a report may list (a provider's claim is capped like any message).
MAX_REPORTED = 5000
#: How often an install looks whether its job was stopped (seconds).
STOP_POLL_S = 0.05


#: Where a venv made at ``sys.argv[1]`` keeps its packages, as the Python that made it lays
#: one out (run with -I -S: no site-packages of anyone's is read).
_VENV_PURELIB = ("import sys, sysconfig; print(sysconfig.get_path('purelib', 'posix_prefix', "
                 "vars={'base': sys.argv[1], 'platbase': sys.argv[1]}))")


class InstallStopped(BaseException):
    """The job whose install this was was stopped (Ctrl-C, its timeout): the installer's
    processes are killed and the half-built environment removed. A BaseException, as
    :class:`gpunet.worker.runner.JobInterrupted` is, so that no handler of the build's
    own errors takes it; the runner turns it into the job's interrupted result."""


def canonical(name: str) -> str:
    """A distribution's name as the registry compares it (PEP 503): ``Foo_Bar`` -> ``foo-bar``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_distributions(paths: list[str] | None = None) -> dict[str, str]:
    """``{canonical name: version}`` of every distribution importable from ``paths``
    (default ``sys.path``); where two carry one name, the first on the path wins, as
    ``import`` does."""
    found: dict[str, str] = {}
    for distribution in metadata.distributions(path=paths if paths is not None else sys.path):
        name = distribution.metadata["Name"] if distribution.metadata else None
        if name:
            found.setdefault(canonical(name), distribution.version)
    return found


def unmet(requirements: dict[str, str], installed: dict[str, str]) -> dict[str, str | None]:
    """The requirements ``installed`` does not satisfy: ``{name: the version it has, or None}``."""
    from packaging.specifiers import InvalidSpecifier, SpecifierSet
    from packaging.version import InvalidVersion

    missing: dict[str, str | None] = {}
    for name, specifier in requirements.items():
        have = installed.get(canonical(name))
        try:
            if have is not None and SpecifierSet(specifier).contains(have, prereleases=True):
                continue
        except (InvalidSpecifier, InvalidVersion):
            pass
        missing[name] = have
    return missing


def requirements_digest(requirements: dict[str, str]) -> str:
    """The SHA-256 of a set of requirements, independent of their order."""
    text = json.dumps({canonical(name): spec for name, spec in requirements.items()}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


#: A distribution's name (PEP 508): what a requirement from a notebook may name, nothing that
#: pip could read as an option (``--index-url``, ``-r FILE``) or a path.
NAME_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?$")

#: What a downloaded file's name may be in the shared cache: one plain name of a wheel (or an
#: sdist, where the provider allows builds), never a path.
DOWNLOAD_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*\.(whl|tar\.gz|zip)$")


def download_file_name(entry: dict[str, Any]) -> str:
    """The cache file name of a planned download (``entry['url']``'s last part, unquoted);
    :class:`PackageError` when it is no plain file name: an index that served ``%2F`` or
    ``..`` in a name must not make the worker write outside its wheel cache."""
    name = unquote(urlparse(entry["url"]).path.rsplit("/", 1)[-1])
    if not DOWNLOAD_NAME_RE.match(name) or ".." in name:
        raise PackageError(f"{entry['name']} {entry['version']} has no file to download "
                           f"(the index named it {name!r}); not installed")
    return name


#: At most this many requirements per job (a stranger's job: bounded like any message).
MAX_REQUIREMENTS = 200


def checked_requirements(requirements: Any) -> dict[str, str]:
    """A job's requirements as a worker accepts them: at most :data:`MAX_REQUIREMENTS`, each
    a distribution name and a version specifier (``==1.2``, ``>=2,<3``, or none), never an
    option, a URL or a path; :class:`PackageError` naming the first that is not."""
    from packaging.specifiers import InvalidSpecifier, SpecifierSet

    if not isinstance(requirements, dict) or len(requirements) > MAX_REQUIREMENTS:
        raise PackageError(f"a job's requirements must be at most {MAX_REQUIREMENTS} names with versions")
    checked = {}
    for name, spec in requirements.items():
        if not (isinstance(name, str) and NAME_RE.match(name) and isinstance(spec, str) and len(spec) <= 200):
            raise PackageError(f"{str(name)[:80]!r} is not a distribution's name with a version specifier")
        try:
            checked[canonical(name)] = str(SpecifierSet(spec))
        except InvalidSpecifier:
            raise PackageError(f"{spec[:80]!r} is not a version specifier (for {name})") from None
    return checked


def pip_lines(requirements: dict[str, str]) -> list[str]:
    """``{"a": "==1", "b": ""}`` -> ``["a==1", "b"]`` (requirements :func:`checked_requirements` passed)."""
    return [f"{name}{spec}" for name, spec in sorted(checked_requirements(requirements).items())]


@dataclass(frozen=True)
class InstallPolicy:
    """What a provider lets a session install (``gpunet provide --allow-installs``)."""

    max_bytes: int = DEFAULT_MAX_INSTALL_BYTES
    max_seconds: float = DEFAULT_MAX_INSTALL_SECONDS
    #: whether source distributions may be built (runs their build code on the provider)
    builds: bool = False

    def to_env(self) -> str:
        """The policy as the worker processes read it (:data:`INSTALLS_ENV`)."""
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls) -> InstallPolicy | None:
        """The policy :data:`INSTALLS_ENV` holds, or None (installs not allowed)."""
        text = os.environ.get(INSTALLS_ENV)
        if not text:
            return None
        data = json.loads(text)
        return cls(int(data["max_bytes"]), float(data["max_seconds"]), bool(data.get("builds", False)))


def environment_report(*, gpu: bool, policy: InstallPolicy | None) -> dict[str, Any]:
    """What a provider's worker tells the scheduler about its environment (a claim, on an
    open network: nothing checks it): its distributions, Python, platform, whether it
    offers a GPU, and its install policy (None: no installs)."""
    return {"packages": installed_distributions(), "python": "%d.%d" % sys.version_info[:2],
            "platform": sysconfig.get_platform(), "gpu": gpu,
            "installs": asdict(policy) if policy is not None else None}


def path_fingerprint() -> tuple[tuple[str, float], ...]:
    """The modification times of the folders on ``sys.path``: what changes when a
    distribution is installed or removed there (cheap to take every few seconds)."""
    stamps = []
    for entry in sys.path:
        try:
            stamps.append((entry, os.stat(entry or ".").st_mtime))
        except OSError:
            continue
    return tuple(stamps)


# -- session environments --------------------------------------------------------------------------


@dataclass
class PreparedEnvironment:
    """A session's environment on this worker, ready for a cell."""

    path: Path
    #: the Python executable of the session (its venv's)
    python: Path
    #: its own site-packages, put first on sys.path of the session's sandbox (or of the
    #: worker process, where cells run there)
    site_packages: Path
    #: what it installed over the provider's base: {name: version}
    installed: dict[str, str]
    #: SHA-256 of each wheel installed, by file name
    wheels: dict[str, str]
    #: whether this call built it (False: reused)
    built_now: bool = False
    #: seconds the build took; wheels found in / missing from the shared cache
    seconds: float = 0.0
    cache_hits: int = 0
    cache_misses: int = 0
    downloaded_bytes: int = 0
    last_used: float = field(default_factory=time.monotonic)
    #: its name among the worker's environments (:class:`SessionEnvironments`): the session's part first
    key: str = ""

    def describe(self) -> dict[str, Any]:
        """What a result says about it (msgpack-friendly)."""
        return {"kind": "session", "installed": dict(self.installed), "wheels": dict(self.wheels),
                "built_now": self.built_now, "seconds": round(self.seconds, 3), "cache_hits": self.cache_hits,
                "cache_misses": self.cache_misses, "downloaded_bytes": self.downloaded_bytes}


#: How many characters of an environment's key name its session.
SESSION_KEY_CHARS = 12


def evictions(keys: list[str], in_use: Container[str], *, kept: int = ENVIRONMENTS_KEPT,
              per_session: int = ENVIRONMENTS_PER_SESSION) -> list[str]:
    """Which of a worker's environments ``keys`` (least recently used first; each key starts
    with its session's part, :data:`SESSION_KEY_CHARS`) to remove, so that no session keeps
    more than ``per_session`` and the worker no more than ``kept``: never one ``in_use`` (a
    job runs with it), and always one of the session that keeps the most (its least recently
    used): a session that builds one environment after another removes its own before any
    other's, and another session's only where that one keeps as many as it does. Where all
    that could go are in use, the worker keeps more for a while (until a job ends)."""
    left = list(keys)
    removed = []

    def sessions() -> dict[str, list[str]]:
        by_session: dict[str, list[str]] = {}
        for key in left:
            by_session.setdefault(key[:SESSION_KEY_CHARS], []).append(key)
        return by_session

    while True:
        by_session = sessions()
        over = [own for own in by_session.values() if len(own) > per_session]
        crowded = over or (list(by_session.values()) if len(left) > kept else [])
        # the sessions that keep the most first; among equals, the one whose oldest is the oldest
        candidates = sorted(crowded, key=lambda own: (-len(own), left.index(own[0])))
        victim = next((key for own in candidates for key in own if key not in in_use), None)
        if victim is None:
            return removed
        left.remove(victim)
        removed.append(victim)


def next_install(waiting: list[tuple[int, str]], installs: Mapping[str, int]) -> tuple[int, str] | None:
    """Whose build goes next among ``waiting`` ((ticket, session), in the order they came):
    that of the session with the fewest ``installs`` on this worker so far, the earliest among
    equals; so a session that sends one install after another waits behind a newcomer's."""
    return min(waiting, key=lambda ticket: (installs.get(ticket[1], 0), ticket[0]), default=None)


class SessionEnvironments:
    """The session environments of one worker, under ``root``, built within ``policy``'s
    caps from the wheel cache ``wheels`` (which every worker of the machine may share).
    An environment a job runs with (from :meth:`prepare` until :meth:`done_with`) is never
    removed; which others are, :func:`evictions` says."""

    def __init__(self, root: Path, wheels: Path, policy: InstallPolicy, *, python: str = sys.executable,
                 kept: int = ENVIRONMENTS_KEPT, per_session: int = ENVIRONMENTS_PER_SESSION) -> None:
        self.root = Path(root)
        self.policy = policy
        self.python = python
        self.wheels = Path(wheels)
        self.kept, self.per_session = kept, per_session
        self._kept: OrderedDict[str, PreparedEnvironment] = OrderedDict()
        #: the install lock: one build at a time on this worker
        self._lock = threading.Lock()
        #: guards what is kept and in use (never held while a build runs)
        self._state = threading.Lock()
        #: environment key -> jobs running with it now
        self._users: dict[str, int] = {}
        #: builds waiting for the install lock, (ticket, session), and each session's builds here
        self._waiting: list[tuple[int, str]] = []
        self._tickets = itertools.count()
        self._installs: collections.Counter[str] = collections.Counter()

    def prepare(self, session: str | None, requirements: dict[str, str],
                announce: Callable[[int, int], None] | None = None,
                stopped: threading.Event | None = None) -> PreparedEnvironment:
        """The environment of ``session`` with ``requirements`` over the base, built now
        (``announce(count, bytes)`` is called once the wheels are here, before pip
        installs them) or reused; :class:`PackageError` saying which package and why
        when it cannot be built within the policy (nothing of it is kept then).
        ``stopped`` set (the job was stopped) ends the build at once:
        :class:`InstallStopped`, the installer's processes killed, nothing of it kept."""
        stopped = stopped or threading.Event()
        session_key = hashlib.sha256(f"{session or ''}".encode()).hexdigest()[:SESSION_KEY_CHARS]
        key = session_key + hashlib.sha256(f"{session or ''}\0{requirements_digest(requirements)}"
                                           .encode()).hexdigest()[:24]
        kept = self._reused(key)  # built already: no wait behind another session's install
        if kept is not None:
            return kept
        self._take_install_turn(session_key, stopped)
        try:
            kept = self._reused(key)
            if kept is not None:
                return kept
            self._installs[session_key] += 1
            prepared = self._build(key, requirements, announce, stopped)
            prepared.key = key
            with self._state:
                self._kept[key] = prepared
                self._users[key] = self._users.get(key, 0) + 1
                self._evict_locked()
            self._prune_wheels()
            return prepared
        finally:
            self._lock.release()

    def _reused(self, key: str) -> PreparedEnvironment | None:
        """The environment ``key`` kept here, now in use by one more job; None where there is none."""
        with self._state:
            kept = self._kept.get(key)
            if kept is None or not kept.python.exists():
                return None
            self._kept.move_to_end(key)
            kept.built_now, kept.last_used = False, time.monotonic()
            self._users[key] = self._users.get(key, 0) + 1
            return kept

    def _take_install_turn(self, session_key: str, stopped: threading.Event) -> None:
        """Take the install lock when it is this build's turn (:func:`next_install`: the waiting
        session that installed least here goes first); a stop ends the wait."""
        ticket = (next(self._tickets), session_key)
        with self._state:
            self._waiting.append(ticket)
        try:
            while True:
                with self._state:
                    mine = next_install(self._waiting, self._installs) == ticket
                if mine and self._lock.acquire(timeout=STOP_POLL_S):
                    return
                if stopped.wait(0 if mine else STOP_POLL_S):
                    raise InstallStopped("stopped while it waited for another install")
        finally:
            with self._state:
                self._waiting.remove(ticket)

    def done_with(self, prepared: PreparedEnvironment | None) -> None:
        """A job that ran with ``prepared`` (from :meth:`prepare`) ended: it may be removed again."""
        if prepared is None:
            return
        with self._state:
            users = self._users.get(prepared.key, 0) - 1
            if users > 0:
                self._users[prepared.key] = users
            else:
                self._users.pop(prepared.key, None)
            self._evict_locked()

    def _evict_locked(self) -> None:
        """Remove what :func:`evictions` says (with ``_state`` held)."""
        for old_key in evictions(list(self._kept), self._users, kept=self.kept, per_session=self.per_session):
            old = self._kept.pop(old_key)
            shutil.rmtree(old.path, ignore_errors=True)

    def _prune_wheels(self) -> None:
        """Keep the wheel cache within :data:`WHEEL_CACHE_INSTALLS` installs at the size cap,
        removing the least recently used wheels first (a hit touches its wheel)."""
        files = sorted((entry.stat().st_mtime, entry.stat().st_size, entry) for entry in self.wheels.glob("*")
                       if entry.is_file() and ".part" not in entry.name)
        total = sum(size for _, size, _ in files)
        for _, size, entry in files:
            if total <= WHEEL_CACHE_INSTALLS * self.policy.max_bytes:
                break
            entry.unlink(missing_ok=True)
            total -= size

    def close(self) -> None:
        """Remove every environment kept (the wheel cache stays)."""
        with self._lock, self._state:
            self._kept.clear()
            shutil.rmtree(self.root, ignore_errors=True)

    def _build(self, key: str, requirements: dict[str, str], announce: Callable[[int, int], None] | None,
               stopped: threading.Event) -> PreparedEnvironment:
        started = time.monotonic()
        deadline = started + self.policy.max_seconds
        # a folder of its own per build: a sandbox still running with an earlier build
        # of the same requirements (removed since) never sees this one change under it
        path = self.root / f"{key}-{uuid.uuid4().hex[:8]}"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.wheels.mkdir(parents=True, exist_ok=True)
        try:
            self._run([self.python, "-m", "venv", "--system-site-packages", "--without-pip", str(path)],
                      deadline, "making the session's virtual environment", stopped)
            python = path / "bin" / "python"
            plan = self._resolve(python, requirements, deadline, stopped)
            files, hits, misses, fetched = self._fetch(plan, deadline, stopped)
            self._check_unpacked(files)
            if announce is not None:
                announce(len(files), sum(file.stat().st_size for file in files))
            if files:
                self._run([self.python, "-m", "pip", "--python", str(python), "install", "--no-index", "--no-deps",
                           "--no-warn-script-location", "--disable-pip-version-check", "--quiet",
                           *map(str, files)], deadline, "installing the wheels", stopped)
            # asked of the provider's own Python, never the venv's: a wheel's .pth file runs in
            # every Python that starts on the venv's site-packages (the sandbox's alone)
            site = Path(self._run([self.python, "-I", "-S", "-c", _VENV_PURELIB, str(path)], deadline,
                                  "finding the environment's site-packages", stopped).strip())
            if not site.is_dir():
                raise PackageError(f"the session's environment has no site-packages at {site}")
        except BaseException:  # a failure, or a stop: nothing half-built is kept
            shutil.rmtree(path, ignore_errors=True)
            raise
        return PreparedEnvironment(
            path, python, site, {entry["name"]: entry["version"] for entry in plan},
            {file.name: entry["sha256"] for file, entry in zip(files, plan)}, built_now=True,
            seconds=time.monotonic() - started, cache_hits=hits, cache_misses=misses, downloaded_bytes=fetched)

    def _check_unpacked(self, files: list[Path]) -> None:
        """Refuse wheels that together unpack past :data:`UNPACKED_PER_DOWNLOADED` times the
        size cap, or to more than :data:`MAX_UNPACKED_FILES` files, as their zip listing says
        (pip's extraction writes no more than it lists), before pip writes any of them."""
        import zipfile

        cap, total, count = UNPACKED_PER_DOWNLOADED * self.policy.max_bytes, 0, 0
        for file in files:
            if file.suffix != ".whl":  # an sdist, where the provider allows builds (and so their code)
                continue
            try:
                with zipfile.ZipFile(file) as archive:
                    listing = archive.infolist()
            except (zipfile.BadZipFile, OSError) as exc:
                raise PackageError(f"{file.name} is not a wheel that can be read ({exc}); not installed") from None
            size = sum(info.file_size for info in listing)
            total, count = total + size, count + len(listing)
            if total > cap or count > MAX_UNPACKED_FILES:
                raise PackageError(
                    f"{file.name} unpacks to {format_bytes(size)} in {len(listing):,} files, over the provider's cap "
                    f"of {format_bytes(cap)} and {MAX_UNPACKED_FILES:,} files for what a session's install unpacks "
                    f"to ({UNPACKED_PER_DOWNLOADED}x its download cap); not installed: ask for a smaller package, "
                    "or use a provider with a larger --install-max-mb")

    def _run(self, command: list[str], deadline: float, doing: str, stopped: threading.Event) -> str:
        """``command``'s output, run in a process group of its own that is killed, with
        whatever it started, when the job is stopped or the time cap runs out."""
        if stopped.is_set():
            raise InstallStopped(f"stopped before {doing}")
        if deadline - time.monotonic() <= 0:
            raise PackageError(f"the provider's install time cap of {self.policy.max_seconds:g} s ran out before "
                               f"{doing}")
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, start_new_session=True,
                                   env={**os.environ, "PIP_NO_INPUT": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
        try:
            while True:
                try:  # retrying communicate() after its timeout loses no output
                    out, err = process.communicate(timeout=STOP_POLL_S)
                    break
                except subprocess.TimeoutExpired:
                    if stopped.is_set():
                        raise InstallStopped(f"stopped while {doing}") from None
                    if time.monotonic() > deadline:
                        raise PackageError(f"{doing} went over the provider's install time cap of "
                                           f"{self.policy.max_seconds:g} s") from None
        finally:
            if process.returncode is None:  # stopped, over time, or interrupted: the whole group goes
                _kill_group(process)
        if process.returncode != 0:
            raise PackageError(f"{doing} failed: {_pip_reason(err)}")
        return out

    def _resolve(self, python: Path, requirements: dict[str, str], deadline: float,
                 stopped: threading.Event) -> list[dict[str, Any]]:
        """What pip would install into the venv for ``requirements`` (over the base):
        ``[{name, version, url, sha256}]``, found without installing anything."""
        binary = [] if self.policy.builds else ["--only-binary", ":all:"]
        lines = pip_lines(requirements)
        try:
            out = self._run([self.python, "-m", "pip", "--python", str(python), "install", "--dry-run", "--quiet",
                             "--report", "-", "--find-links", str(self.wheels), *binary, *lines], deadline,
                            f"resolving {', '.join(lines)}", stopped)
        except PackageError as exc:
            wheel_note = "" if self.policy.builds else " (binary wheels only: this provider builds no sdists)"
            raise PackageError(f"{exc}{wheel_note}") from None
        plan = []
        for item in json.loads(out or "{}").get("install", []):
            info = item.get("download_info") or {}
            hashes = (info.get("archive_info") or {}).get("hashes") or {}
            plan.append({"name": canonical(item["metadata"]["name"]), "version": item["metadata"]["version"],
                         "url": info.get("url", ""), "sha256": hashes.get("sha256", "")})
        return plan

    def _fetch(self, plan: list[dict[str, Any]], deadline: float,
               stopped: threading.Event) -> tuple[list[Path], int, int, int]:
        """The files of ``plan`` in the shared wheel cache, downloading those it lacks
        (size counted against the cap as they come, SHA-256 checked):
        (files, cache hits, cache misses, bytes downloaded)."""
        files, hits, misses, fetched = [], 0, 0, 0
        for entry in plan:
            url = entry["url"]
            name = download_file_name(entry)
            target = self.wheels / name
            if url.startswith("file:"):
                target = Path(unquote(urlparse(url).path))
            if target.exists() and (not entry["sha256"] or _sha256(target) == entry["sha256"]):
                target.touch()  # recently used: the cache keeps it longest
                hits += 1
                files.append(target)
                continue
            misses += 1
            # in a thread of its own, so that a stop ends the build at once even while the
            # registry is slow to answer; the thread sees the stop at its next chunk (or
            # its timeout), removes its part file and ends
            fetched += _until_stopped(stopped, f"downloading {name}", self._download, entry, name, target,
                                      deadline, self.policy.max_bytes - fetched, stopped)
            files.append(target)
        return files, hits, misses, fetched

    def _download(self, entry: dict[str, Any], name: str, target: Path, deadline: float, allowance: int,
                  stopped: threading.Event) -> int:
        """Download ``entry`` to ``target`` (at most ``allowance`` bytes); the bytes it took."""
        import requests

        partial = target.with_name(f"{target.name}.part-{uuid.uuid4().hex[:12]}")
        digest, fetched = hashlib.sha256(), 0
        try:
            with requests.get(entry["url"], stream=True, timeout=max(1.0, deadline - time.monotonic())) as response:
                response.raise_for_status()
                with open(partial, "wb") as out:
                    for chunk in response.iter_content(1 << 16):
                        fetched += len(chunk)
                        if stopped.is_set():
                            raise InstallStopped(f"stopped while downloading {name}")
                        if fetched > allowance:
                            raise PackageError(
                                f"{entry['name']} {entry['version']} went over the provider's size cap of "
                                f"{format_bytes(self.policy.max_bytes)} for a session's install")
                        if time.monotonic() > deadline:
                            raise PackageError(f"downloading {entry['name']} went over the provider's install "
                                               f"time cap of {self.policy.max_seconds:g} s")
                        digest.update(chunk)
                        out.write(chunk)
            if entry["sha256"] and digest.hexdigest() != entry["sha256"]:
                raise PackageError(f"{name} did not match the SHA-256 the registry lists for it; not installed")
            partial.replace(target)
        except requests.RequestException as exc:
            raise PackageError(f"downloading {entry['name']} {entry['version']} failed: {exc}") from None
        finally:
            partial.unlink(missing_ok=True)
        return fetched


def _until_stopped(stopped: threading.Event, doing: str, function: Callable[..., Any], *arguments: Any) -> Any:
    """``function(*arguments)`` run in a thread, waited for until it ends or ``stopped``
    is set (:class:`InstallStopped`; the thread is left to end by itself)."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = function(*arguments)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, name="gpunet-install-download", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(STOP_POLL_S)
        if stopped.is_set() and thread.is_alive():
            raise InstallStopped(f"stopped while {doing}")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _kill_group(process: subprocess.Popen) -> None:
    """Kill ``process`` and every process of its group (pip and what it started), and reap it."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        process.kill()
    process.wait()
    for pipe in (process.stdout, process.stderr):  # not read: a process it detached may still hold them
        if pipe is not None:
            pipe.close()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _pip_reason(stderr: str) -> str:
    """pip's own reason, in a line or two (its ERROR lines, else its last line)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line.removeprefix("ERROR: ") for line in lines if line.startswith("ERROR:")]
    return "; ".join(errors[:2]) or (lines[-1] if lines else "no reason given")


@contextmanager
def layered(prepared: PreparedEnvironment | None) -> Iterator[None]:
    """Run the body with the session's ``site-packages`` first on ``sys.path`` (the cell
    runs in this worker process: one cell at a time, as a worker has one device slot),
    and forget the modules imported from it afterwards, so that the next session
    imports its own. A module the process already holds from the base cannot be
    replaced in place: :class:`PackageError` names it (a per-session sandbox, a process
    started with the session's site-packages first on its path, has no such limit)."""
    if prepared is None:
        yield
        return
    import importlib

    site = str(prepared.site_packages)
    stale = [name for name in _top_level_modules(prepared.site_packages)
             if name in sys.modules and not _module_file(name).startswith(site)]
    if stale:
        raise PackageError(f"the session's environment has its own {', '.join(sorted(stale))}, which this worker "
                           "process had already imported from the provider's base; it cannot be replaced in a "
                           "running process (a provider's worker, `gpunet provide`, runs cells in a fresh sandbox "
                           "process per session, which has no such limit)")
    sys.path.insert(0, site)
    importlib.invalidate_caches()
    try:
        yield
    finally:
        if site in sys.path:
            sys.path.remove(site)
        for name, module in list(sys.modules.items()):
            if (getattr(module, "__file__", None) or "").startswith(site):
                del sys.modules[name]
        importlib.invalidate_caches()


def _module_file(name: str) -> str:
    return getattr(sys.modules.get(name), "__file__", None) or ""


def _top_level_modules(site: Path) -> list[str]:
    """The importable top-level names a site-packages folder holds."""
    names = []
    for entry in site.iterdir() if site.exists() else ():
        if entry.name.endswith((".dist-info", ".egg-info", ".pth")) or entry.name.startswith(("_", ".")):
            continue
        if entry.is_dir() or entry.suffix in (".py", ".so"):
            names.append(entry.name.split(".")[0])
    return names
