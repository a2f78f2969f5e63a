"""Invariants under concurrency, and a SIGKILL in the middle of 16 busy clients."""

from __future__ import annotations

import random
import threading
import time

from credits_helpers import Party, run_threads
from gpunet.credits import (
    BudgetExceededError,
    CreditClient,
    CreditsUnavailableError,
    serve_in_background,
    verify_database,
    verify_service,
)


def _check_invariants(party: Party, minted: int) -> None:
    accounts = party.ops.accounts()
    assert all(a["balance"] >= 0 for a in accounts), accounts
    assert sum(a["balance"] for a in accounts) == minted
    verify_service(party.svc.url, party.svc.operator_token)


def test_sixteen_clients_keep_every_invariant(fresh_service):
    party = Party(fresh_service)
    clients = [party.account("client", credits=400) for _ in range(4)]
    providers = [party.account("provider")[0] for _ in range(2)]
    sessions = [(name, api, api.open_session(250)) for name, api in clients]
    errors: list[BaseException] = []
    paid = [0] * 16
    refused = [0] * 16

    def worker(n: int) -> None:
        rng = random.Random(n)
        name, api, sid = sessions[n % 4]
        me = CreditClient(fresh_service.url, api.token)
        ops = CreditClient(fresh_service.url, fresh_service.operator_token)
        try:
            for i in range(25):
                size = rng.randint(1, 40)
                try:
                    hold = me.hold(sid, size, key=f"w{n}-{i}")
                except BudgetExceededError:
                    refused[n] += 1
                    continue
                if rng.random() < 0.7:
                    amount = rng.randint(0, min(size, 5))
                    ops.settle(hold, providers[n % 2], amount, key=f"w{n}-{i}-settle")
                    paid[n] += amount
                else:
                    ops.release(hold, key=f"w{n}-{i}-release")
                usage = me.usage(sid)
                assert usage["held"] + usage["spent"] <= usage["budget"]
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    run_threads([threading.Thread(target=worker, args=(n,)) for n in range(16)])
    assert not errors, errors
    for name, api, sid in sessions:
        usage = api.usage(sid)
        assert usage["held"] == 0 and usage["spent"] <= usage["budget"]
    assert sum(party.ops.balance(p) for p in providers) == sum(paid)
    _check_invariants(party, 4 * 400)


def test_racing_holds_never_exceed_the_budget(party: Party):
    name, api = party.account("client", credits=10_000)
    sid = api.open_session(100)
    won: list[str] = []
    refused: list[int] = []
    barrier = threading.Barrier(16)

    def worker(n: int) -> None:
        me = CreditClient(party.svc.url, api.token)
        barrier.wait()
        for i in range(3):
            try:
                won.append(me.hold(sid, 10, key=f"race-{n}-{i}"))
            except BudgetExceededError:
                refused.append(n)

    run_threads([threading.Thread(target=worker, args=(n,)) for n in range(16)])
    assert len(won) == 10 and len(refused) == 38
    assert api.usage(sid)["held"] == 100 and api.balance(name) == 10_000 - 100


def test_racing_retries_of_one_key_move_once(party: Party):
    name, api = party.account("client", credits=1_000)
    sid = api.open_session(1_000)
    holds: list[str] = []
    barrier = threading.Barrier(16)

    def worker() -> None:
        me = CreditClient(party.svc.url, api.token)
        barrier.wait()
        holds.append(me.hold(sid, 25, key="one-key"))

    run_threads([threading.Thread(target=worker) for _ in range(16)])
    assert len(set(holds)) == 1 and len(holds) == 16
    assert api.balance(name) == 975


def test_sigkill_loses_no_acknowledged_movement(tmp_path):
    db = tmp_path / "credits.sqlite3"
    svc = serve_in_background(db, log_path=tmp_path / "log1")
    party = Party(svc)
    clients = [party.account("client", credits=100_000) for _ in range(4)]
    provider, _ = party.account("provider")
    sessions = [(api.token, api.open_session(100_000)) for _, api in clients]
    acked: list[tuple[str, str, str]] = []  # (kind, key, hold)
    pending: list[tuple[str, dict]] = []  # requests without an answer when the service died
    stop = threading.Event()

    def worker(n: int) -> None:
        token, sid = sessions[n % 4]
        me = CreditClient(svc.url, token, retries=0, timeout=5)
        ops = CreditClient(svc.url, svc.operator_token, retries=0, timeout=5)
        i = 0
        while not stop.is_set():
            key = f"k{n}-{i}"
            try:
                hold = me.hold(sid, 3, key=key)
            except CreditsUnavailableError:
                pending.append(("hold", {"token": token, "sid": sid, "key": key}))
                return
            acked.append(("hold", key, hold))
            try:
                ops.settle(hold, provider, 2, key=key + "-s")
            except CreditsUnavailableError:
                pending.append(("settle", {"hold": hold, "key": key + "-s"}))
                return
            acked.append(("settle", key + "-s", hold))
            i += 1

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while len(acked) < 400 and time.monotonic() < deadline:
        time.sleep(0.05)
    svc.kill()  # SIGKILL in the middle of it
    stop.set()
    for t in threads:
        t.join(30)
    assert len(acked) >= 100, "the clients hardly got going before the kill"

    svc2 = serve_in_background(db, log_path=tmp_path / "log2")
    try:
        ops = CreditClient(svc2.url, svc2.operator_token)
        entries = []
        start = 0
        while True:
            page = ops.entries(start, 100_000)["entries"]
            entries += page
            start += len(page)
            if len(page) < 100_000:
                break
        by_key = {}
        for e in entries:
            by_key.setdefault((e["kind"], e["key"]), []).append(e)
        for kind, key, hold in acked:
            found = by_key.get((kind, key))
            assert found and len(found) == 1 and found[0]["hold"] == hold, (kind, key)
        # Retrying the unanswered requests with their keys moves credits at most once.
        for kind, req in pending:
            if kind == "hold":
                CreditClient(svc2.url, req["token"]).hold(req["sid"], 3, key=req["key"])
            else:
                ops.settle(req["hold"], provider, 2, key=req["key"])
        keys = [(e["kind"], e["key"]) for e in ops.entries(0, 100_000)["entries"]]
        assert len(keys) == len(set(keys))
        _check_invariants(Party(svc2), 4 * 100_000)
    finally:
        svc2.stop()
    verify_database(db)


def test_concurrent_batches_keep_every_invariant(party: Party):
    clients = [party.account("client", credits=1_000) for _ in range(4)]
    provider, _ = party.account("provider")
    sessions = [api.open_session(600) for _, api in clients]
    minted_before = sum(a["balance"] for a in party.ops.accounts())
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        ops = CreditClient(party.svc.url, party.svc.operator_token)
        sid = sessions[n % 4]
        try:
            for r in range(5):
                held = ops.batch([{"op": "hold", "session": sid, "amount": 7, "key": f"bh{n}-{r}-{k}"}
                                  for k in range(10)])
                ok = [h["hold"] for h in held if h["ok"]]
                assert all(h["ok"] or h["status"] == 402 for h in held), held
                ops.batch([{"op": "settle", "hold": h, "provider": provider, "amount": 3, "key": f"bs{h}"}
                           if i % 2 else {"op": "release", "hold": h, "key": f"br{h}"}
                           for i, h in enumerate(ok)], raise_on_error=True)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    run_threads([threading.Thread(target=worker, args=(n,)) for n in range(8)])
    assert not errors, errors
    for (name, api), sid in zip(clients, sessions):
        usage = api.usage(sid)
        assert usage["held"] == 0 and usage["spent"] <= 600
        assert api.balance(name) == 1_000 - usage["spent"]
    accounts = party.ops.accounts()
    assert all(a["balance"] >= 0 for a in accounts)
    assert sum(a["balance"] for a in accounts) == minted_before
    verify_service(party.svc.url, party.svc.operator_token)
