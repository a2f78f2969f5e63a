"""The same service on a real PostgreSQL server (started by the fixture; skipped without binaries)."""

from __future__ import annotations

import os
import threading

import pytest

from credits_helpers import Party, run_threads
from gpunet.credits import (
    BudgetExceededError,
    CreditClient,
    LedgerVerificationError,
    serve_in_background,
    verify_database,
    verify_receipt,
    verify_service,
)


@pytest.fixture
def pg_service(postgres_db, tmp_path):
    env = dict(os.environ, GPUNET_DATA_DIR=str(tmp_path))
    svc = serve_in_background(postgres_db, env=env, log_path=tmp_path / "log",
                              operator_token_file=tmp_path / "operator.token")
    yield svc, postgres_db, env, tmp_path
    if svc.alive():
        svc.stop()


def test_postgres_flow_concurrency_restart_and_verify(pg_service):
    svc, url, env, tmp_path = pg_service
    party = Party(svc)
    assert (tmp_path / f"credits-127.0.0.1-{url.rsplit(':', 1)[1].split('/')[0]}-"
            f"{url.rsplit('/', 1)[1]}.ed25519.pem").exists()
    clients = [party.account("client", credits=500) for _ in range(4)]
    provider, _ = party.account("provider")
    sessions = [(api.token, api.open_session(300)) for _, api in clients]
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        token, sid = sessions[n % 4]
        me = CreditClient(svc.url, token)
        ops = CreditClient(svc.url, svc.operator_token)
        try:
            for i in range(10):
                try:
                    hold = me.hold(sid, 9, key=f"w{n}-{i}")
                except BudgetExceededError:
                    continue
                if i % 3:
                    ops.settle(hold, provider, 4, key=f"w{n}-{i}-s")
                else:
                    ops.release(hold, key=f"w{n}-{i}-r")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    run_threads([threading.Thread(target=worker, args=(n,)) for n in range(16)])
    assert not errors, errors
    accounts = party.ops.accounts()
    assert sum(a["balance"] for a in accounts) == 2000 and all(a["balance"] >= 0 for a in accounts)
    token, sid = sessions[0]
    receipt = CreditClient(svc.url, token).receipt(sid)
    verify_receipt(receipt)
    verify_service(svc.url, svc.operator_token)
    size = party.ops.health()["size"]
    svc.kill()
    svc2 = serve_in_background(url, env=env, log_path=tmp_path / "log2",
                               operator_token_file=tmp_path / "operator.token")
    try:
        assert svc2.client().health()["size"] == size
        svc2.client().mint(provider, 1, key="after-restart")
    finally:
        svc2.stop()
    summary = verify_database(url)
    assert summary["size"] == size + 1 and summary["heads"] >= 2


def test_postgres_tampering_is_caught(pg_service):
    import psycopg

    svc, url, env, tmp_path = pg_service
    party = Party(svc)
    name, api = party.account("client", credits=100)
    sid = api.open_session(100)
    for i in range(4):
        party.ops.release(api.hold(sid, 5, key=f"h{i}"), key=f"r{i}")
    svc.stop()
    verify_database(url)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE entries SET amount = amount # 1 WHERE idx = 3")
    with pytest.raises(LedgerVerificationError, match="entry 3: stored hash") as err:
        verify_database(url)
    assert err.value.index == 3


def test_unreachable_postgres_is_a_clear_error(tmp_path):
    from gpunet.credits import CreditsUnavailableError
    from gpunet.credits._service import open_store

    with pytest.raises(CreditsUnavailableError, match="cannot open the credit database postgresql"):
        open_store("postgresql://nobody@127.0.0.1:1/none", key_file=tmp_path / "k.pem")


def test_a_second_service_on_the_same_postgres_database_is_refused(pg_service):
    import subprocess
    import sys

    svc, url, env, tmp_path = pg_service
    out = subprocess.run([sys.executable, "-m", "gpunet.credits", "serve", "--db", url, "--port", "0"],
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 1
    assert "another credit service already writes to postgresql" in out.stderr



def test_postgres_old_schema_memos_and_trust_records(pg_service):
    import psycopg

    svc, url, env, tmp_path = pg_service
    party = Party(svc)
    name, api = party.account("client", credits=100)
    gpu, gpu_api = party.account("provider")
    sid = api.open_session(100)
    party.ops.settle(api.hold(sid, 10, key="h0"), gpu, 5, key="s0")
    svc.stop()
    # What an earlier version left: no memo column. It verifies, and the service adds the column.
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("ALTER TABLE entries DROP COLUMN memo")
    size = verify_database(url)["size"]
    svc = serve_in_background(url, env=env, log_path=tmp_path / "log2", operator_token_file=tmp_path / "operator.token")
    try:
        ops = svc.client()
        api = svc.client(api.token)
        memo = {"verified": "replicate:2", "providers": [gpu, "other"], "digest": "sha256:" + "f" * 64}
        out = ops.batch([{"op": "settle", "hold": api.hold(sid, 10, key="h1"), "provider": gpu, "amount": 6,
                          "memo": memo, "key": "s1"},
                         {"op": "record_verification", "provider": gpu, "agreed": True, "key": "v1"}],
                        raise_on_error=True)
        settle_index = out[0]["entries"][0]
        assert settle_index == size + 1
        assert ops.entries(settle_index, 1)["entries"][0]["memo"] == memo
        assert "memo" not in ops.entries(0, 1)["entries"][0]
        assert (out[1]["valid"], out[1]["consecutive_valid"]) == (1, 1)
        for i in range(4):
            rec = ops.record_verification(gpu, False, key=f"m{i}")
        assert rec["quarantined"] and rec["mismatches"] == 4
        assert svc.client(gpu_api.token).provider_record(gpu) == rec
        assert gpu in {r["provider"] for r in svc.client(gpu_api.token).provider_records()}
        cleared = ops.clear_quarantine(gpu, key="clear")
        assert (cleared["quarantined"], cleared["mismatches"], cleared["valid"]) == (False, 0, 1)
        verify_receipt(api.receipt(sid))
        verify_service(svc.url, svc.operator_token)
    finally:
        svc.stop()
    assert verify_database(url)["size"] == size + 3
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE entries SET memo = replace(memo, 'other', 'mallory') WHERE idx = %s", (settle_index,))
    with pytest.raises(LedgerVerificationError, match=f"entry {settle_index}: stored hash") as err:
        verify_database(url)
    assert err.value.index == settle_index


def test_postgres_holds_paid_in_parts(pg_service):
    import psycopg

    from gpunet.credits import ConflictError, InvalidRequestError

    svc, url, env, tmp_path = pg_service
    party = Party(svc)
    name, api = party.account("client", credits=1000)
    providers = [party.account("provider")[0] for _ in range(2)]
    sid = api.open_session(1000)
    raced = api.hold(sid, 300, key="raced")
    kept = api.hold(sid, 100, key="kept")
    paid: list[int] = []
    refused: list[int] = []
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        ops = CreditClient(svc.url, svc.operator_token)
        try:
            for i in range(5):
                try:
                    ops.settle_part(raced, providers[n % 2], 5, key=f"p{n}-{i}")
                    paid.append(5)
                except InvalidRequestError as exc:
                    refused.append(exc.status)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    run_threads([threading.Thread(target=worker, args=(n,)) for n in range(16)])
    assert not errors, errors
    # 16 x 5 parts of 5 ask for 400 of a hold of 300: exactly 60 fit.
    assert sum(paid) == 300 and len(refused) == 20 and set(refused) == {422}
    party.ops.settle_part(kept, providers[0], 30, key="k1", memo={"tasks": 3})
    party.ops.settle_part(kept, providers[1], 20, key="k2")
    svc.kill()
    svc = serve_in_background(url, env=env, log_path=tmp_path / "log2", operator_token_file=tmp_path / "operator.token")
    try:
        ops, me = svc.client(), svc.client(api.token)
        with pytest.raises(InvalidRequestError, match="so 50 are left"):
            ops.settle_part(kept, providers[0], 51, key="k3")
        done = ops.settle(kept, providers[0], 40, key="k3")
        assert (done["paid"], done["released"], done["total_paid"]) == (40, 10, 90)
        assert ops.release(raced, key="raced-done")["entries"] == []
        with pytest.raises(ConflictError, match="was already settled"):
            ops.settle_part(raced, providers[0], 1, key="late")
        usage = me.usage(sid)
        assert (usage["held"], usage["spent"]) == (0, 390)
        assert sum(ops.balance(p) for p in providers) == 390 and me.balance(name) == 610
        receipt = me.receipt(sid)
        assert verify_receipt(receipt)["spent"] == 390
        verify_service(svc.url, svc.operator_token)
    finally:
        svc.stop()
    size = verify_database(url)["size"]
    with psycopg.connect(url, autocommit=True) as conn:
        states = dict(conn.execute("SELECT id, state FROM holds WHERE id IN (%s, %s)", (raced, kept)).fetchall())
        assert states == {raced: "settled", kept: "settled"}
        part = conn.execute("SELECT idx FROM entries WHERE key = 'k1'").fetchone()[0]
        conn.execute("UPDATE entries SET amount = amount + 1 WHERE idx = %s", (part,))
    with pytest.raises(LedgerVerificationError, match=f"entry {part}: stored hash") as err:
        verify_database(url)
    assert err.value.index == part and part < size


def test_postgres_stale_holds_are_listed_and_released(pg_service, capsys):
    from gpunet.credits.cli import main

    svc, url, env, tmp_path = pg_service
    party = Party(svc)
    name, api = party.account("client", credits=100)
    provider, _ = party.account("provider")
    sid = api.open_session(100)
    full, part = api.hold(sid, 40, key="full"), api.hold(sid, 50, key="part")
    party.ops.settle_part(part, provider, 20, key="part-1")
    party.ops.settle(api.hold(sid, 10, key="done"), provider, 10, key="done")
    holds = party.ops.holds(older_than=0)
    assert [(h["hold"], h["amount"], h["paid"], h["left"]) for h in holds] == [(full, 40, 0, 40), (part, 50, 20, 30)]
    assert party.ops.holds(older_than=86400) == []
    assert [h["hold"] for h in api.holds(account=name)] == [full, part]
    auth = ["--credits", svc.url, "--token-file", str(svc.operator_token_file)]
    assert main(["release-stale", *auth, "--older-than", "0", "--force"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "released 70 credit(s) of 2 hold(s) in total"
    assert party.ops.holds() == [] and api.usage(sid)["held"] == 0 and api.balance(name) == 70
    verify_service(svc.url, svc.operator_token)
