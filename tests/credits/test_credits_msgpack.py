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


@pytest.mark.parametrize("case", BAD, ids=[c["description"] for c in BAD])
def test_every_bad_json_request_is_refused_alike_when_packed(world, case):
    party, tokens, names = world
    if case["method"] != "POST":
        pytest.skip("a GET has no body")
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
