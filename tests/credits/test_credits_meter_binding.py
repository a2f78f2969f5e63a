"""A meter account acts only on the holds its clients placed for it (issue 12, item 4).

The attack (review script meter1.py): a meter token settled every open hold of the
service, even ones never dispatched, to any provider, and quarantined any provider with
three ``record_verification`` calls. Each attempt here runs against a real credit
service process and must move nothing.
"""

from __future__ import annotations

import uuid

import pytest

from credits_helpers import Party
from gpunet.credits import ForbiddenError, InvalidRequestError


def key() -> str:
    return uuid.uuid4().hex


@pytest.fixture
def market(party: Party):
    """Two networks' meters, provider alice (honest) and mallory (the attacker's), client carol."""
    names = {role: party.account(role) for role in ("client",)}
    carol, carol_api = names["client"]
    party.ops.mint(carol, 1000, key=f"mint-{carol}")
    ours, ours_api = party.account("meter")
    theirs, theirs_api = party.account("meter")
    alice, _ = party.account("provider")
    mallory, _ = party.account("provider")
    return party, carol, carol_api, ours, ours_api, theirs, theirs_api, alice, mallory


def test_a_meter_cannot_pay_release_or_judge_holds_placed_for_another(market):
    party, carol, carol_api, ours, ours_api, theirs, theirs_api, alice, mallory = market
    session = carol_api.open_session(900)
    mine = carol_api.hold(session, 300, key=key(), meter=ours)       # sent to our scheduler
    unbound = carol_api.hold(session, 300, key=key())                 # no meter named: an operator's
    before = (party.ops.account(carol)["balance"], party.ops.account(mallory)["balance"], len(party.ops.holds()))
    for hold in (mine, unbound):
        for attempt in (lambda: theirs_api.settle(hold, mallory, 300, key=key()),
                        lambda: theirs_api.settle_part(hold, mallory, 1, key=key()),
                        lambda: theirs_api.release(hold, key=key())):
            with pytest.raises(ForbiddenError, match="acts only on the holds its clients placed for it"):
                attempt()
    batch = theirs_api.batch([{"op": "settle", "hold": mine, "provider": mallory, "amount": 300, "key": key()}])
    assert batch[0]["ok"] is False and batch[0]["status"] == 403
    # A verdict needs a hold of the meter's own, settled to that provider, used once.
    for attempt in (lambda: theirs_api.record_verification(alice, False, key=key()),
                    lambda: theirs_api.record_verification(alice, False, key=key(), hold=mine)):
        with pytest.raises((ForbiddenError, InvalidRequestError)):
            attempt()
    assert party.ops.provider_record(alice)["mismatches"] == 0
    after = (party.ops.account(carol)["balance"], party.ops.account(mallory)["balance"], len(party.ops.holds()))
    assert after == before  # nothing moved, both holds still open

    # Our meter pays its own hold and records one verdict on it, for the provider it paid.
    assert ours_api.settle(mine, alice, 0, key=key())["released"] == 300
    with pytest.raises(ForbiddenError, match="was not settled to provider"):
        ours_api.record_verification(mallory, False, key=key(), hold=mine)
    assert ours_api.record_verification(alice, False, key=key(), hold=mine)["mismatches"] == 1
    with pytest.raises(Exception, match="one verdict per hold"):
        ours_api.record_verification(alice, False, key=key(), hold=mine)
    assert party.ops.provider_record(alice)["mismatches"] == 1
    with pytest.raises(ForbiddenError):
        ours_api.release(unbound, key=key())
    assert party.ops.release(unbound, key=key())["released"] == 300  # the operator still closes any hold


def test_a_hold_names_only_a_meter_account(market):
    party, carol, carol_api, ours, ours_api, theirs, theirs_api, alice, mallory = market
    session = carol_api.open_session(100)
    with pytest.raises(InvalidRequestError, match="not a meter"):
        carol_api.hold(session, 10, key=key(), meter=alice)
    assert carol_api.usage(session)["held"] == 0


def test_the_cli_release_with_another_meters_token_moves_nothing(market, tmp_path):
    import subprocess
    import sys

    party, carol, carol_api, ours, ours_api, theirs, theirs_api, alice, mallory = market
    hold = carol_api.hold(carol_api.open_session(100), 50, key=key(), meter=ours)
    token_file = tmp_path / "theirs"
    token_file.write_text(theirs_api.token)
    out = subprocess.run([sys.executable, "-m", "gpunet.credits", "release-stale", "--credits", party.svc.url,
                          "--token-file", str(token_file), "--older-than", "0", "--force", "--account", carol],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out.stdout + out.stderr
    assert [h["hold"] for h in party.ops.holds(account=carol)] == [hold]
