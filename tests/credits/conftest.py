"""Fixtures for the credit service tests: real services on 127.0.0.1, real SQLite files,
and a real PostgreSQL server started here when its binaries are installed."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from credits_helpers import Party
from gpunet.credits import serve_in_background


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """A credit service on a fresh SQLite file, shared by the tests of one module."""
    root = tmp_path_factory.mktemp("credits")
    svc = serve_in_background(root / "credits.sqlite3", log_path=root / "service.log")
    yield svc
    svc.stop()


@pytest.fixture
def fresh_service(tmp_path):
    """A credit service of its own, for tests that kill, restart or tamper."""
    svc = serve_in_background(tmp_path / "credits.sqlite3", log_path=tmp_path / "service.log")
    yield svc
    if svc.alive():
        svc.stop()


@pytest.fixture
def party(service) -> Party:
    return Party(service)


@pytest.fixture(scope="module")
def world(service):
    """A client with a session, an open and a settled hold, a provider and another client (the bad
    requests' cases name them), with every token: (party, tokens, names)."""
    party = Party(service)
    client, client_api = party.account("client", credits=1000)
    other, other_api = party.account("client", credits=1000)
    provider, provider_api = party.account("provider")
    session = client_api.open_session(100000)
    open_hold = client_api.hold(session, 10, key="open-hold")
    settled_hold = client_api.hold(session, 10, key="settled-hold")
    party.ops.settle(settled_hold, provider, 5, key="settle-it")
    tokens = {"operator": service.operator_token, "client": client_api.token, "other_client": other_api.token,
              "provider": provider_api.token, "bad_token": "gpn_not-a-token"}
    names = {"client": client, "provider": provider, "session": session, "open_hold": open_hold,
             "settled_hold": settled_hold}
    return party, tokens, names


# -- PostgreSQL -----------------------------------------------------------------------


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    cands = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return cands[-1] if cands else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def postgres_server():
    """Start a throw-away PostgreSQL on 127.0.0.1 (initdb + pg_ctl); yields its base URL."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) are not installed; "
                    "`apt-get install postgresql` to run the PostgreSQL tests")
    base = Path(tempfile.mkdtemp(prefix="gpunet-pg-"))
    data = base / "data"
    prefix: list[str] = []
    if os.geteuid() == 0:
        # initdb refuses to run as root: run the server as the postgres user.
        runuser = shutil.which("runuser")
        try:
            import pwd

            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run PostgreSQL as")
        if not runuser:
            pytest.skip("running as root without runuser to start PostgreSQL as 'postgres'")
        os.chown(base, pw.pw_uid, pw.pw_gid)
        prefix = [runuser, "-u", "postgres", "--"]
    os.chmod(base, 0o755)
    port = _free_port()
    env = dict(os.environ, LC_ALL="C", LANG="C")
    subprocess.run([*prefix, initdb, "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8"],
                   check=True, capture_output=True, env=env, cwd=base)
    subprocess.run([*prefix, pg_ctl, "-D", str(data), "-l", str(base / "log"), "-w", "-t", "60", "-o",
                    f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off", "start"],
                   check=True, capture_output=True, env=env, cwd=base)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run([*prefix, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True,
                       env=env, cwd=base)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def postgres_db(postgres_server):
    """A fresh, empty database on the test PostgreSQL server; yields its URL."""
    import psycopg

    name = "credits_" + uuid.uuid4().hex[:10]
    deadline = time.monotonic() + 20
    while True:
        try:
            with psycopg.connect(f"{postgres_server}/postgres", autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{name}"')
            break
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    yield f"{postgres_server}/{name}"


@pytest.fixture(autouse=True)
def own_ledger_memory(tmp_path, monkeypatch):
    """Each test its own ledger memory (pins and heads, in the data dir's ledger/): keys are
    pinned by address, and another test's service may reuse a port with another key."""
    monkeypatch.setenv("GPUNET_DATA_DIR", str(tmp_path / "data"))
