"""``GET /v1/accounts/NAME/earnings``: what a provider was paid, for her dashboard; only she
(or an operator) may read it, and it names no client, session or task."""

from __future__ import annotations

import pytest

from credits_helpers import Party
from gpunet.credits import ForbiddenError, InvalidRequestError, NotFoundError


def _pay(party: Party, client, provider: str, parts: list[tuple[int, dict | None]]) -> None:
    """One hold of ``client``'s, paid to ``provider`` in ``parts`` (amount, memo), then released."""
    sid = client.open_session(1_000)
    hold = client.hold(sid, 500, key=f"hold-{sid}")
    for number, (amount, memo) in enumerate(parts):
        party.ops.settle_part(hold, provider, amount, key=f"part-{hold}-{number}", memo=memo)
    party.ops.release(hold, key=f"release-{hold}")


def test_a_provider_reads_her_totals_and_series(party: Party):
    alice, alice_api = party.account("provider")
    bob, _ = party.account("provider")
    carol, carol_api = party.account("client", credits=5_000)
    fresh = alice_api.earnings(alice)
    assert (fresh["account"], fresh["role"], fresh["balance"]) == (alice, "provider", 0)
    assert fresh["total"] == fresh["today"] == {"credits": 0, "tasks": 0, "seconds": 0.0}
    assert fresh["series"] == [] and fresh["record"]["reputation"] == 1.0 and fresh["quarantine_below"] == 0.5

    _pay(party, carol_api, alice, [(7, {"seconds": 3.5}), (20, {"tasks": 4, "seconds": 10.25}), (3, None)])
    _pay(party, carol_api, bob, [(100, {"seconds": 1.0})])  # not hers
    mine = alice_api.earnings(alice)
    assert mine["balance"] == 30 == party.ops.balance(alice)
    assert mine["total"] == mine["today"] == {"credits": 30, "tasks": 6, "seconds": 13.75}
    assert [row[2:] for row in mine["series"]] == [[7, 1, 3.5], [20, 4, 10.25], [3, 1, 0.0]]
    # later reads ask only for what is new; the totals stay whole
    last = mine["series"][-1][0]
    assert alice_api.earnings(alice, after=last)["series"] == []
    assert alice_api.earnings(alice, after=mine["series"][0][0])["total"]["credits"] == 30
    assert [row[2] for row in alice_api.earnings(alice, after=mine["series"][0][0])["series"]] == [20, 3]
    # nothing in it names the client, her session or a hold
    text = repr(mine)
    assert carol not in text and "s_" not in text and "h_" not in text
    assert party.ops.earnings(alice)["total"] == mine["total"]  # an operator may read it too


def test_only_she_or_an_operator_reads_her_earnings(party: Party):
    alice, _ = party.account("provider")
    bob, bob_api = party.account("provider")
    carol, carol_api = party.account("client")
    for api in (bob_api, carol_api):
        with pytest.raises(ForbiddenError, match="only its owner or an operator"):
            api.earnings(alice)
    with pytest.raises(NotFoundError, match="is a client, not a provider"):
        carol_api.earnings(carol)
    with pytest.raises(NotFoundError, match="no account named"):
        party.ops.earnings("nobody-here")
    with pytest.raises(InvalidRequestError, match="'after' must be an integer"):
        bob_api._get(f"/v1/accounts/{bob}/earnings", after="x")
