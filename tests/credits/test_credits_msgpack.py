"""MessagePack bodies: the same service behind a cheaper encoding, with the same limits as JSON.

A batch sent as MessagePack answers what the JSON one answers (idempotency keys replay across
the two), every bad input the JSON table refuses is refused the same way when packed, and a
malformed, oversized, too deep or extension-typed MessagePack body is a clear 4xx that moves
nothing.
"""

from __future__ import annotations

import json

import msgpack
import pytest
import requests

from credits_helpers import DATA, Party, fill_names
from gpunet.credits import IdempotencyConflictError
from gpunet.credits._service import MAX_BODY

BAD = [case for case in json.loads((DATA / "bad_requests.json").read_text()) if "body" in case]
PACKED = {"Content-Type": "application/msgpack"}


def _post(svc, path: str, body: bytes, token: str, **headers: str) -> requests.Response:
    return requests.post(f"{svc.url}{path}", data=body, timeout=30,
                         headers={"Authorization": f"Bearer {token}", **PACKED, **headers})


def _state(party: Party) -> tuple:
    return party.ops.health()["size"], party.ops.accounts(), party.ops.provider_records()


def test_a_packed_batch_answers_what_a_json_one_does_and_keys_replay_across_the_two(party: Party):
    ops = party.ops
    alice, me = party.account("client", credits=1000)
    gpu, _ = party.account("provider")
    sid = me.open_session(1000)
    content_types = []
    send = ops._send

    def noted(*args, **kwargs):  # notes the type of each answer that comes back
        answer = send(*args, **kwargs)
        content_types.append(answer.content_type)
        return answer

    ops._send = noted
    holds = ops.batch([{"op": "hold", "session": sid, "amount": 10, "key": f"mp-{i}"} for i in range(5)],
                      raise_on_error=True)
    assert content_types == ["application/msgpack"]  # the client sends and reads batches packed
    items = [{"op": "settle", "hold": h["hold"], "provider": gpu, "amount": 4, "key": f"mp-s-{i}",
              "memo": {"verified": "replicate:2", "providers": [gpu], "seconds": 0.25}}
             for i, h in enumerate(holds)]
    packed = ops.batch(items)
    assert all(r["ok"] for r in packed)
    # The same items as JSON: replayed from their keys, answered alike, nothing moves twice.
    as_json = requests.post(f"{party.svc.url}/v1/batch", json={"items": items}, timeout=30,
                            headers={"Authorization": f"Bearer {party.svc.operator_token}"})
    assert as_json.headers["content-type"] == "application/json" and as_json.json()["results"] == packed
    assert me.usage(sid)["spent"] == 20 and ops.balance(gpu) == 20 and me.balance(alice) == 980
    # Another request under a used key is refused, whichever the encoding.
    with pytest.raises(IdempotencyConflictError):
        ops.batch([{**items[0], "amount": 3}], raise_on_error=True)
    # A JSON body may ask for a packed answer, and a packed one for a JSON answer.
    answer = requests.post(f"{party.svc.url}/v1/ping", json={}, timeout=30,
                           headers={"Authorization": f"Bearer {party.svc.operator_token}",
                                    "Accept": "application/msgpack"})
    assert msgpack.unpackb(answer.content)["account"] == "operator"
    answer = _post(party.svc, "/v1/batch", msgpack.packb({"items": items}), party.svc.operator_token,
                   Accept="application/json")
    assert answer.json()["results"] == packed


#: The bad requests that carry a body (a GET has none to pack).
BAD_BODIES = [case for case in BAD if case["method"] == "POST"]


@pytest.mark.parametrize("case", BAD_BODIES, ids=[c["description"] for c in BAD_BODIES])
def test_every_bad_json_request_is_refused_alike_when_packed(world, case):
    party, tokens, names = world
    before = _state(party)
    headers = dict(PACKED, Accept="application/msgpack")
    if case["as"] != "no_token":
        headers["Authorization"] = f"Bearer {tokens[case['as']]}"
    resp = requests.post(party.svc.url + fill_names(case["path"], names), data=msgpack.packb(fill_names(case["body"], names)),
                         headers=headers, timeout=10)
    assert resp.status_code == case["status"], resp.text
    if "item_status" in case:
        (item,) = msgpack.unpackb(resp.content)["results"]
        assert not item["ok"] and item["status"] == case["item_status"], item
    else:
        err = resp.json()["error"]  # errors answer JSON, whatever was asked
        assert err["status"] == case["status"] and case["match"] in err["message"], err["message"]
    assert _state(party) == before, "a refused request moved credits or changed a trust record"


def _deep(levels: int) -> bytes:
    return b"\x81\xa5items\x91" + b"\x91" * levels + b"\x90"


@pytest.mark.parametrize("body, status, match", [
    (b"\x81\xa5items\x91\x84", 400, "malformed MessagePack"),  # cut off inside an item
    (msgpack.packb({"items": []}) + b"\x00", 400, "malformed MessagePack"),  # trailing bytes
    (b"\xc1", 400, "malformed MessagePack"),  # a byte MessagePack never uses
    (b"\x81\x01\xa1x", 400, "malformed MessagePack"),  # a map key that is not a string
    (b"\x81\xa5items\x91\x81\xa2op\xa2\xff\xfe", 400, "malformed MessagePack"),  # not UTF-8
    (b"\x81\xa5items\xdd\xff\xff\xff\xff", 400, "malformed MessagePack"),  # 4 billion items declared in 10 bytes
    (msgpack.packb({"items": [msgpack.ExtType(5, b"\x00")]}), 400, "extension type 5 is not accepted"),
    (msgpack.packb({"items": [{}] * 200_000}), 400, "more than 100000 arrays and maps"),  # 1 byte each
    (_deep(40), 400, "deeper than 32 levels"),  # parses, but deeper than allowed
    (_deep(200_000), 400, "deeper than 32 levels"),  # deeper than the unpacker's own stack
])
def test_a_malformed_or_too_deep_packed_body_is_a_400_that_moves_nothing(world, body, status, match):
    party, tokens, _ = world
    before = _state(party)
    resp = _post(party.svc, "/v1/batch", body, tokens["operator"])
    assert resp.status_code == status, resp.text
    assert match in resp.json()["error"]["message"]
    assert _state(party) == before


def test_bytes_and_timestamps_are_values_no_field_takes(world):
    party, tokens, names = world
    before = _state(party)
    item = {"op": "mint", "account": names["client"].encode(), "amount": 5, "key": "mp-bytes"}
    (result,) = msgpack.unpackb(_post(party.svc, "/v1/batch", msgpack.packb({"items": [item]}), tokens["operator"],
                                      Accept="application/msgpack").content)["results"]
    assert result["status"] == 422 and "must be an account name" in result["error"]["message"]
    memo = {"when": msgpack.Timestamp(0), "blob": b"\x00"}
    body = msgpack.packb({"provider": names["provider"], "amount": 1, "key": "mp-memo", "memo": memo})
    resp = _post(party.svc, f"/v1/holds/{names['open_hold']}/settle", body, tokens["operator"])
    assert resp.status_code == 400 and "plain JSON" in resp.json()["error"]["message"]
    assert _state(party) == before


def test_a_packed_body_over_the_limit_is_a_413(world):
    party, tokens, names = world
    before = _state(party)
    item = {"op": "mint", "account": names["client"], "amount": 1, "key": "k" * 200}
    body = msgpack.packb({"items": [item] * (MAX_BODY // 200)})
    assert len(body) > MAX_BODY
    resp = _post(party.svc, "/v1/batch", body, tokens["operator"])
    assert resp.status_code == 413 and "over the limit" in resp.json()["error"]["message"]
    assert _state(party) == before


# -- a stranger's packed bodies (the review of this encoding) ------------------------------


def test_a_field_named_in_bytes_is_refused_by_name_and_moves_nothing(world):
    """A MessagePack map may name a key in bytes (JSON cannot): it is an unknown field, said so
    (it was an internal error: bytes and strings do not sort, nor go into a JSON answer)."""
    party, tokens, names = world
    before = _state(party)
    for body in ({b"account": names["client"], "amount": 5, "key": "mp-bkey-1"},
                 {b"account": names["client"], b"amount": 5, b"key": b"mp-bkey-2"}):
        resp = _post(party.svc, "/v1/mint", msgpack.packb(body), tokens["operator"])
        assert resp.status_code == 422, resp.text
        assert "unknown field(s) \"b'account'\"" in resp.json()["error"]["message"]
    item = {"op": "mint", b"account": names["client"], "amount": 1, "key": "mp-bkey-3"}
    resp = _post(party.svc, "/v1/batch", msgpack.packb({"items": [item]}), tokens["operator"])
    (result,) = resp.json()["results"]
    assert result["status"] == 422 and "b'account'" in result["error"]["message"]
    assert _state(party) == before


def test_a_content_type_that_lies_or_an_integer_past_64_bits_is_refused(world):
    party, tokens, names = world
    start = party.ops.balance(names["client"])
    body = {"account": names["client"], "amount": 5, "key": "mp-lie"}
    lied = _post(party.svc, "/v1/mint", msgpack.packb(body), tokens["operator"], **{"Content-Type": "application/json"})
    assert lied.status_code == 400 and "malformed JSON" in lied.json()["error"]["message"]
    lied = _post(party.svc, "/v1/mint", json.dumps(body).encode(), tokens["operator"])  # labelled MessagePack
    assert lied.status_code == 400 and "malformed MessagePack" in lied.json()["error"]["message"]
    for amount in (2**64 - 1, -2**63):  # the widest MessagePack integers
        huge = _post(party.svc, "/v1/mint", msgpack.packb({**body, "amount": amount}), tokens["operator"])
        assert huge.status_code == 422 and "field 'amount' must be an integer" in huge.json()["error"]["message"]
    wide = _post(party.svc, "/v1/mint", b"\x83\xa7account" + msgpack.packb(names["client"]) + b"\xa6amount\xcf"
                 + bytes(7) + b"\x05" + b"\xa3key\xa6mp-lie", tokens["operator"])  # 5 as a uint64
    assert wide.status_code == 200 and wide.json()["amount"] == 5
    party.ops.mint(names["client"], 5, key="mp-lie")  # the key replays: nothing moves again
    assert party.ops.balance(names["client"]) == start + 5  # only the one well-formed request moved credits


def test_duplicate_keys_count_once_the_last_one_wins_as_in_json(world):
    """A map naming a field twice is read as JSON reads it (the last wins); the answer says what
    moved, and a replay of its key says the same."""
    party, tokens, names = world
    start = party.ops.balance(names["client"])
    twice = (b"\x84\xa7account" + msgpack.packb(names["client"]) + b"\xa6amount\x05\xa6amount\x06"
             + b"\xa3key\xa9mp-dup-k1")
    first = _post(party.svc, "/v1/mint", twice, tokens["operator"]).json()
    again = _post(party.svc, "/v1/mint", twice, tokens["operator"]).json()
    assert first["amount"] == 6 and again == first and party.ops.balance(names["client"]) == start + 6


def _peak_kb(pid: int) -> int:
    return int(next(line for line in open(f"/proc/{pid}/status") if line.startswith("VmHWM")).split()[1])


def test_a_packed_body_that_would_expand_far_past_its_size_is_refused_before_it_does(fresh_service):
    """4 MB of empty arrays or maps (one byte each, some 60 in memory) took the service 330 MB
    and 2.8 s of its event loop before it answered 422; its arrays and maps are counted as
    they decode, so it is refused after a few megabytes, and the service goes on."""
    party = Party(fresh_service)
    name, _ = party.account("client", credits=10)
    start = _peak_kb(fresh_service.pid)
    count = MAX_BODY - 16
    for empty in (b"\x90", b"\x80"):  # arrays, maps
        body = b"\x81\xa5items\xdd" + count.to_bytes(4, "big") + empty * count
        resp = _post(fresh_service, "/v1/batch", body, fresh_service.operator_token)
        assert resp.status_code == 400, resp.text
        assert "more than 100000 arrays and maps" in resp.json()["error"]["message"]
    assert _peak_kb(fresh_service.pid) - start < 150_000, "the body was decoded before it was refused"
    assert party.ops.balance(name) == 10 and party.ops.health()["ok"]


def test_a_body_trickled_in_is_cut_off_at_its_deadline_and_moves_nothing(world):
    """A token's holder sending a body one byte at a time held a connection (and the service's
    shutdown) for as long as it liked; the body must now all come within BODY_WITHIN_S."""
    import socket
    from urllib.parse import urlsplit

    from gpunet.credits._service import BODY_WITHIN_S

    party, tokens, _ = world
    before = _state(party)
    where = urlsplit(party.svc.url)
    with socket.create_connection((where.hostname, where.port)) as conn:
        conn.sendall(f"POST /v1/ping HTTP/1.1\r\nHost: credits\r\nAuthorization: Bearer {tokens['operator']}\r\n"
                     "Content-Type: application/msgpack\r\nContent-Length: 100\r\n\r\n\x80".encode())
        conn.settimeout(BODY_WITHIN_S + 60)
        answer = b""
        while b"too_slow" not in answer and (piece := conn.recv(4096)):  # the answer's head and body
            answer += piece
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert f"did not all come within {BODY_WITHIN_S:g} s".encode() in answer
    assert _state(party) == before
