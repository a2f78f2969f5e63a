"""The service's HTTP API: the happy path, idempotency, and a 4xx for every bad input with nothing moved."""

from __future__ import annotations

import http.client
import json

import pytest
import requests

from credits_helpers import DATA, Party, fill_names
from gpunet.credits import (
    AuthError,
    BudgetExceededError,
    CreditClient,
    CreditsUnavailableError,
    ForbiddenError,
    IdempotencyConflictError,
    InvalidRequestError,
    NotFoundError,
    verify_receipt,
)

BAD = json.loads((DATA / "bad_requests.json").read_text())


def test_hold_settle_release_flow(party: Party):
    ops = party.ops
    alice, me = party.account("client", credits=1000)
    gpu, _ = party.account("provider")
    sid = me.open_session(600, notebook="work/analysis.ipynb", kernel="kernel-1")
    assert me.usage(sid) | {} == me.usage(sid)
    h1 = me.hold(sid, 200, key="cell-1")
    h2 = me.hold(sid, 300, key="cell-2")
    assert me.usage(sid)["held"] == 500 and me.usage(sid)["left"] == 100
    assert me.balance(alice) == 500
    paid = ops.settle(h1, gpu, 150, key="cell-1-ok")
    assert (paid["paid"], paid["released"]) == (150, 50)
    ops.release(h2, key="cell-2-lost")
    usage = me.usage(sid)
    assert (usage["budget"], usage["spent"], usage["held"], usage["left"]) == (600, 150, 0, 450)
    assert usage["notebook"] == "work/analysis.ipynb" and usage["kernel"] == "kernel-1"
    assert me.balance(alice) == 850 and ops.balance(gpu) == 150
    with pytest.raises(BudgetExceededError, match="budget exhausted"):
        me.hold(sid, 451, key="cell-3")
    receipt = me.receipt(sid)
    assert [e["kind"] for e in receipt["entries"]] == ["hold", "hold", "settle", "release", "release"]
    summary = verify_receipt(receipt, public_key=ops.health()["public_key"])
    assert (summary["spent"], summary["held"], summary["entries"]) == (150, 0, 5)


def test_retries_with_the_same_key_move_credits_once(party: Party):
    ops = party.ops
    alice, me = party.account("client", credits=100)
    gpu, _ = party.account("provider")
    sid = me.open_session(100, key="open-once")
    assert me.open_session(100, key="open-once") == sid
    size = ops.health()["size"]
    holds = {me.hold(sid, 30, key="same") for _ in range(3)}
    assert len(holds) == 1
    hold = holds.pop()
    first = ops.settle(hold, gpu, 10, key="pay")
    assert ops.settle(hold, gpu, 10, key="pay") == first
    assert ops.mint(alice, 5, key="bonus") == ops.mint(alice, 5, key="bonus")
    assert ops.health()["size"] == size + 4  # hold, settle, release of the rest, mint
    assert me.balance(alice) == 100 - 10 + 5
    with pytest.raises(IdempotencyConflictError, match="'same' was already used"):
        me.hold(sid, 31, key="same")
    # Keys belong to the account that sent them: another account may use the same key.
    bob, other = party.account("client", credits=10)
    other.hold(other.open_session(10), 5, key="same")


def test_batch_runs_items_in_one_request(party: Party):
    ops = party.ops
    alice, me = party.account("client", credits=1000)
    gpu, _ = party.account("provider")
    sid = me.open_session(1000)
    res = ops.batch([{"op": "hold", "session": sid, "amount": 10, "key": f"b-{i}"} for i in range(20)])
    assert all(r["ok"] for r in res)
    items = [{"op": "settle", "hold": r["hold"], "provider": gpu, "amount": 7, "key": f"s-{i}"}
             for i, r in enumerate(res[:10])]
    items += [{"op": "release", "hold": r["hold"], "key": f"r-{i}"} for i, r in enumerate(res[10:])]
    items.append({"op": "hold", "session": sid, "amount": 10**6, "key": "too-much"})
    out = ops.batch(items)
    assert [r["ok"] for r in out] == [True] * 20 + [False]
    assert out[-1]["status"] == 402 and "budget exhausted" in out[-1]["error"]["message"]
    assert ops.batch(items) == out  # the whole batch again: idempotent item by item
    assert me.usage(sid) | {} == me.usage(sid)
    usage = me.usage(sid)
    assert (usage["spent"], usage["held"]) == (70, 0)
    assert ops.balance(gpu) == 70 and me.balance(alice) == 930
    with pytest.raises(BudgetExceededError, match="batch item 0"):
        ops.batch([{"op": "hold", "session": sid, "amount": 10**6, "key": "x"}], raise_on_error=True)


def test_proofs_and_heads(party: Party):
    from gpunet.credits import verify_consistency, verify_head, verify_inclusion

    ops = party.ops
    alice, _ = party.account("client", credits=5)
    head1 = ops.head()
    verify_head(head1)
    ops.mint(alice, 1, key="more-1")
    ops.mint(alice, 1, key="more-2")
    head2 = ops.head()
    assert head2["size"] == head1["size"] + 2
    cons = ops.consistency_proof(head1["size"], head2["size"])
    verify_consistency(head1["size"], head2["size"], bytes.fromhex(head1["root"]), bytes.fromhex(head2["root"]),
                       [bytes.fromhex(p) for p in cons["proof"]])
    for index in (0, head2["size"] - 1):
        inc = ops.inclusion_proof(index, head2["size"])
        verify_inclusion(index, head2["size"], bytes.fromhex(inc["leaf_hash"]), [bytes.fromhex(p) for p in inc["proof"]],
                         bytes.fromhex(head2["root"]))
    assert {h["size"] for h in ops.heads()} >= {head1["size"], head2["size"]}


@pytest.mark.parametrize("case", BAD, ids=[c["description"] for c in BAD])
def test_bad_requests_are_refused_and_move_nothing(world, case):
    party, tokens, names = world
    before = (party.ops.health()["size"], party.ops.accounts(), party.ops.provider_records())
    headers = {}
    if case["as"] != "no_token":
        headers["Authorization"] = f"Bearer {tokens[case['as']]}"
    kw = {}
    if "raw" in case:
        kw["data"] = fill_names(case["raw"], names)
        headers["Content-Type"] = "application/json"
    elif "body" in case:
        kw["json"] = fill_names(case["body"], names)
    resp = requests.request(case["method"], party.svc.url + fill_names(case["path"], names), headers=headers,
                            timeout=10, **kw)
    assert resp.status_code == case["status"], resp.text
    if "item_status" in case:
        (item,) = resp.json()["results"]
        assert not item["ok"] and item["status"] == case["item_status"], item
    else:
        err = resp.json()["error"]
        assert err["status"] == case["status"]
        assert case["match"] in err["message"], err["message"]
    after = (party.ops.health()["size"], party.ops.accounts(), party.ops.provider_records())
    assert after == before, "a refused request moved credits or changed a trust record"


def test_client_errors_name_what_happened(service, party: Party):
    alice, me = party.account("client", credits=10)
    with pytest.raises(AuthError, match=r"unknown bearer token.*\[401 from http://127\.0\.0\.1:\d+/v1/accounts/"):
        CreditClient(service.url, "gpn_wrong").balance(alice)
    with pytest.raises(ForbiddenError, match="mint needs role operator"):
        me.mint(alice, 5, key="self-mint")
    with pytest.raises(NotFoundError, match="no session"):
        me.usage("s_" + "0" * 32)


def test_only_the_operator_revokes_a_token_and_the_escrow_never_gets_one(service, party: Party):
    alice, me = party.account("client", credits=10)
    bob, provider = party.account("provider")
    for stranger in (me, provider):  # neither may revoke anyone's token, their own or the operator's
        for name in (alice, bob, "operator"):
            with pytest.raises(ForbiddenError, match="revoking a token needs role operator"):
                stranger.revoke_token(name)
    assert me.balance(alice) == 10 and party.ops.ping()["role"] == "operator"
    with pytest.raises(InvalidRequestError, match="'escrow' is the system's account and has no token"):
        party.ops.revoke_token("escrow")
    fresh = party.ops.revoke_token(alice)["token"]
    with pytest.raises(AuthError, match="unknown bearer token"):
        me.balance(alice)
    assert CreditClient(service.url, fresh).balance(alice) == 10


def test_unreachable_service_is_a_503_naming_the_url():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    client = CreditClient(url, "gpn_x", retries=1, backoff=0.01, timeout=2)
    with pytest.raises(CreditsUnavailableError, match=f"credit service at {url} is unreachable") as err:
        client.hold("s_" + "0" * 32, 5, key="k")
    assert err.value.status == 503 and err.value.url == url
    with pytest.raises(CreditsUnavailableError, match="unreachable"):
        client.create_account("x", "client")


def test_idempotent_calls_retry_across_a_restart_and_move_once(tmp_path):
    import threading

    from gpunet.credits import serve_in_background

    db = tmp_path / "c.sqlite3"
    svc = serve_in_background(db, log_path=tmp_path / "log1")
    party = Party(svc)
    name, api = party.account("client", credits=100)
    sid = api.open_session(100)
    first = api.hold(sid, 10, key="across")
    port = int(svc.url.rsplit(":", 1)[1])
    svc.stop()
    patient = CreditClient(svc.url, api.token, retries=8, backoff=0.25)
    impatient = CreditClient(svc.url, svc.operator_token, retries=8, backoff=0.25)
    got: dict = {}

    def call() -> None:
        got["hold"] = patient.hold(sid, 10, key="across")  # retried until the service is back

    t = threading.Thread(target=call)
    t.start()
    import time

    attempts = []
    send = impatient._send

    def counted(*args, **kwargs):  # counts what reaches the wire, attempt by attempt
        attempts.append(args[:2])
        return send(*args, **kwargs)

    impatient._send = counted
    t0 = time.monotonic()
    with pytest.raises(CreditsUnavailableError, match="unreachable"):
        impatient.create_account("late", "client")  # no key: not retried, fails at once
    assert len(attempts) == 1, f"create_account was retried: {attempts}"
    # 8 retries would back off for over a minute; 10 s is room for a loaded machine.
    assert time.monotonic() - t0 < 10, "create_account was retried (8 retries back off for over a minute)"
    svc2 = serve_in_background(db, port=port, log_path=tmp_path / "log2")
    try:
        t.join(60)
        assert got["hold"] == first
        assert api.balance(name) == 90 and api.usage(sid)["held"] == 10
    finally:
        svc2.stop()


def _rss_bytes(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def test_a_body_over_the_limit_is_refused_while_it_streams(service):
    """A declared-too-long body is refused before it is read; a chunked one is cut off
    as it streams: the service never holds it whole (issue 12: 1.5 GiB took it to 3.1 GB)."""
    from urllib.parse import urlsplit

    host, port = urlsplit(service.url).hostname, urlsplit(service.url).port
    headers = {"Authorization": f"Bearer {service.operator_token}", "Content-Type": "application/json"}
    declared = http.client.HTTPConnection(host, port, timeout=30)
    declared.putrequest("POST", "/v1/ping")
    for name, value in {**headers, "Content-Length": str(1 << 30)}.items():
        declared.putheader(name, value)
    declared.endheaders()
    answer = declared.getresponse()
    assert answer.status == 413 and b"over the limit" in answer.read()
    declared.close()

    before = _rss_bytes(service.pid)
    chunked = http.client.HTTPConnection(host, port, timeout=30)
    chunk = b" " * (1 << 20)
    try:
        chunked.putrequest("POST", "/v1/ping")
        for name, value in {**headers, "Transfer-Encoding": "chunked"}.items():
            chunked.putheader(name, value)
        chunked.endheaders()
        for _ in range(64):  # 64 MiB, far over the limit: the service stops reading at the limit
            chunked.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
    except OSError:
        pass  # the service answered 413 and closed the connection while we were still sending
    finally:
        chunked.close()
    assert _rss_bytes(service.pid) - before < 32 * (1 << 20)
    assert requests.get(f"{service.url}/v1/health", timeout=10).ok


@pytest.mark.parametrize("path, body", [
    ("/v1/ping", b"[" * 200_000),                          # the parser's recursion overflows
    ("/v1/batch", b'{"items":' + b"[" * 200_000),
    ("/v1/batch", b'{"items":[' + b"[" * 40 + b"]" * 40 + b"]}"),  # parses, but deeper than allowed
])
def test_deeply_nested_json_is_a_400_not_a_500(service, path, body):
    """Issue 12 review (svc1.py): "[" x 200,000 raised an uncaught RecursionError (500)."""
    headers = {"Authorization": f"Bearer {service.operator_token}", "Content-Type": "application/json"}
    size = requests.get(f"{service.url}/v1/ledger/head", headers=headers, timeout=10).json()["size"]
    answer = requests.post(f"{service.url}{path}", data=body, headers=headers, timeout=30)
    assert answer.status_code == 400, answer.text
    assert "deeper than 32 levels" in answer.json()["error"]["message"]
    assert requests.post(f"{service.url}/v1/ping", json={}, headers=headers, timeout=10).ok
    assert requests.get(f"{service.url}/v1/ledger/head", headers=headers, timeout=10).json()["size"] == size
