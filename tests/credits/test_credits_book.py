"""The bank's operations, from a data file, against a real SQLite file through the writer (no HTTP).

Each case of ``data/book_cases.json`` creates its accounts (as the operator), then runs its
steps: ``op`` with ``params`` as the account ``as`` (``key``: its idempotency key), expecting
the answer to contain ``expect`` or the error class ``error``; ``save`` keeps fields of the
answer for later steps (``"$name"``). After every step the balances add up to what the ledger
minted (credits only move); at the end they are ``balances``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

import gpunet.credits as credits
from gpunet.credits._book import ID_RE
from gpunet.credits._db import resolve_db_url
from gpunet.credits._store import CreditStore

CASES = json.loads((Path(__file__).parent / "data" / "book_cases.json").read_text())


@pytest.fixture
def store(tmp_path):
    store = CreditStore(resolve_db_url(tmp_path / "book.sqlite3"))
    store.ensure_operator()
    yield store
    store.close()


def _fill(value, saved):
    if isinstance(value, str) and value.startswith("$"):
        return saved[value[1:]]
    if isinstance(value, dict):
        return {k: _fill(v, saved) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, saved) for v in value]
    return value


def _contains(answer, expected) -> bool:
    if isinstance(expected, dict):
        return isinstance(answer, dict) and all(k in answer and _contains(answer[k], v) for k, v in expected.items())
    if isinstance(expected, list):
        return len(answer) == len(expected) and all(_contains(a, e) for a, e in zip(answer, expected))
    return answer == expected


def _balances(store) -> dict[str, int]:
    return {a["account"]: a["balance"] for a in store.read_accounts()}


def _minted(store) -> int:
    return sum(row[5] for row in store.read_entries(0, store.size) if row[2] == "mint")


@pytest.mark.parametrize("case", CASES, ids=[c["case"][:60] for c in CASES])
def test_book_case(store, case):
    for name, role in case["accounts"].items():
        store.call("create_account", "operator", {"name": name, "role": role})
    saved: dict[str, str] = {}
    for i, step in enumerate(case["steps"]):
        where = f"step {i} ({step['op']} as {step['as']})"
        future = store.submit(step["op"], step["as"], _fill(step["params"], saved), step.get("key"))
        if "error" in step:
            with pytest.raises(getattr(credits, step["error"])):
                future.result(30)
        else:
            answer = future.result(30)
            assert _contains(answer, _fill(step.get("expect", {}), saved)), (where, answer)
            saved.update({var: answer[field] for var, field in step.get("save", {}).items()})
        assert sum(_balances(store).values()) == _minted(store), where
    balances = _balances(store)
    assert {name: balances[name] for name in case["balances"]} == case["balances"]
    for var, usage in case.get("session", {}).items():
        assert _contains(store.read_session(saved[var]), usage)


def test_a_failed_write_rolls_the_book_back(store, monkeypatch):
    """When the database refuses a group, the in-memory objects go back to what was committed."""
    store.call("create_account", "operator", {"name": "alice", "role": "client"})
    store.call("mint", "operator", {"account": "alice", "amount": 10}, "m1")
    conn = store.book.conn

    def refuse(table, rows):
        raise RuntimeError("disk full")

    monkeypatch.setattr(conn, "insert", refuse)
    with pytest.raises(credits.CreditsUnavailableError, match="refused the write"):
        store.call("mint", "operator", {"account": "alice", "amount": 5}, "m2")
    assert store.book.accounts["alice"].balance == 10 and store.book.next_index == store.size
    monkeypatch.undo()
    assert store.call("mint", "operator", {"account": "alice", "amount": 5}, "m2")["balance"] == 15
    assert _balances(store)["alice"] == 15


def test_hold_ids_begin_with_the_time_they_were_placed(store):
    """New holds' keys go to the end of the holds table's index (not to a random page of it)."""
    store.call("create_account", "operator", {"name": "alice", "role": "client"})
    store.call("mint", "operator", {"account": "alice", "amount": 100}, "m")
    sid = store.call("open_session", "alice", {"budget": 100}, "o")["session"]
    ids = [store.call("hold", "alice", {"session": sid, "amount": 1}, f"h{i}")["hold"] for i in range(20)]
    assert all(ID_RE.match(hid) and hid.startswith("h_") for hid in ids) and len(set(ids)) == 20
    times = [int(hid[2:13], 16) for hid in ids]
    assert times == sorted(times) and all(abs(t - time.time() * 1000) < 600_000 for t in times)
