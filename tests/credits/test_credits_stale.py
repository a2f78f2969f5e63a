"""Holds a dead scheduler left open: ``GET /v1/holds`` and ``gpunet credits release-stale``.

The scheduler's metering plugin keeps its reports in memory; if it dies, the holds it
would have closed stay ``held``. These tests play that scheduler by placing holds (one
of them partly paid) and never closing them, then find and release them as an operator.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys

import pytest

from credits_helpers import Party
from gpunet.credits import (
    ConflictError,
    CreditClient,
    ForbiddenError,
    InvalidRequestError,
    serve_in_background,
    verify_service,
)
from gpunet.credits._db import make_engine, parse_time, read_open_holds, resolve_db_url
from gpunet.credits.cli import format_age, main

WARNING = "that task will NOT be paid when it finishes"


class Stale:
    """A client ``alice`` whose session has two open holds a dead scheduler left behind: ``full``
    (40, nothing paid) and ``part`` (50, 20 paid in parts), next to a settled and a released one."""

    def __init__(self, svc) -> None:
        self.svc = svc
        self.party = Party(svc)
        self.ops = self.party.ops
        self.gpu, _ = self.party.account("provider")
        self.alice, self.api = self.party.account("client", credits=1000)
        self.sid = self.api.open_session(500)
        self.full = self.api.hold(self.sid, 40, key="full")
        self.part = self.api.hold(self.sid, 50, key="part")
        self.ops.settle_part(self.part, self.gpu, 20, key="part-1")
        self.ops.settle(self.api.hold(self.sid, 30, key="settled"), self.gpu, 10, key="settle")
        self.ops.release(self.api.hold(self.sid, 25, key="released"), key="release")

    def size(self) -> int:
        return self.ops.health()["size"]

    def cli(self, *args: str, token: str | None = None) -> subprocess.CompletedProcess:
        """Run ``python -m gpunet.credits release-stale`` (operator token file unless ``token``)."""
        auth = ["--token", token] if token else ["--token-file", str(self.svc.operator_token_file)]
        return subprocess.run([sys.executable, "-m", "gpunet.credits", "release-stale", "--credits", self.svc.url,
                               *auth, *args], capture_output=True, text=True, timeout=60)


@pytest.fixture
def stale(fresh_service) -> Stale:
    return Stale(fresh_service)


def _without_age(holds: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k != "age"} for h in holds]


def _hold_entry_times(ops: CreditClient) -> dict[str, str]:
    return {e["hold"]: e["time"] for e in ops.entries()["entries"] if e["kind"] == "hold"}


def test_listing_open_holds(stale):
    ops, api = stale.ops, stale.api
    holds = ops.holds()
    assert [h["hold"] for h in holds] == [stale.full, stale.part]  # oldest first; closed ones not listed
    times = _hold_entry_times(ops)
    for h, (amount, paid) in zip(holds, [(40, 0), (50, 20)]):
        assert h == {"hold": h["hold"], "session": stale.sid, "account": stale.alice, "amount": amount,
                     "paid": paid, "left": amount - paid, "created": times[h["hold"]], "age": h["age"]}
        assert 0 <= h["age"] < 600
    assert _without_age(ops.holds("held", older_than=0)) == _without_age(holds)
    assert ops.holds(older_than=86400) == []
    other, other_api = stale.party.account("client", credits=10)
    assert ops.holds(account=other) == []
    assert [h["hold"] for h in ops.holds(account=stale.alice)] == [stale.full, stale.part]
    # An account lists its own holds; everyone's, or another's, need the operator.
    assert [h["hold"] for h in api.holds(account=stale.alice)] == [stale.full, stale.part]
    with pytest.raises(ForbiddenError, match="every account's open holds needs role operator.*account="):
        api.holds()
    with pytest.raises(ForbiddenError, match=f"listing the holds of account '{other}' needs role operator"):
        api.holds(account=other)
    with pytest.raises(ForbiddenError):
        other_api.holds(account=stale.alice)
    with pytest.raises(InvalidRequestError, match="'state' must be 'held'"):
        ops.holds("settled")
    with pytest.raises(InvalidRequestError, match="'older_than' must be >= 0"):
        ops.holds(older_than=-1)


def test_ages_against_an_explicit_now(fresh_service):
    """Holds of different ages, at a ``now`` given (the service's own read, no sleeping)."""
    party = Party(fresh_service)
    _, api = party.account("client", credits=100)
    sid = api.open_session(100)
    old, young = api.hold(sid, 10, key="old"), api.hold(sid, 10, key="young")
    engine = make_engine(resolve_db_url(fresh_service.db))
    try:
        placed = {h["hold"]: parse_time(h["created"]) for h in read_open_holds(engine)}
        gap = (placed[young] - placed[old]).total_seconds()
        assert gap > 0  # two requests, two transactions: the young one was placed later
        now = placed[old] + dt.timedelta(hours=2)

        def listed(older_than: float | None) -> list[tuple[str, float]]:
            return [(h["hold"], h["age"]) for h in read_open_holds(engine, older_than=older_than, now=now)]

        both = [(old, 7200.0), (young, round(7200 - gap, 3))]
        assert listed(None) == listed(0) == listed(7200 - gap) == both
        assert listed(7200) == [(old, 7200.0)]
        assert listed(7200.001) == []
        assert read_open_holds(engine, older_than=7200, now=now, account="nobody") == []
    finally:
        engine.dispose()


def test_release_stale_gives_back_what_is_left(stale):
    ops, size = stale.ops, stale.size()
    balance = ops.balance(stale.alice)

    out = stale.cli("--older-than", "0")
    assert out.returncode == 2 and "below 60 seconds" in out.stderr and "--force" in out.stderr
    assert "--older-than 86400, a day" in out.stderr
    out = stale.cli("--older-than", "86400")  # young holds are no one's stale holds
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "no open holds placed 86400 s or more ago; nothing to release"

    out = stale.cli("--older-than", "0", "--force", "--dry-run")
    assert out.returncode == 0, out.stderr
    assert WARNING in out.stderr
    header, full, part = out.stdout.splitlines()[1:4]
    assert header.split() == ["hold", "session", "account", "amount", "paid", "left", "age", "placed"]
    assert full.split()[:6] == [stale.full, stale.sid, stale.alice, "40", "0", "40"]
    assert part.split()[:6] == [stale.part, stale.sid, stale.alice, "50", "20", "30"]
    assert out.stdout.splitlines()[-1] == "dry run: would release 70 credit(s) of 2 hold(s); nothing was moved"
    assert stale.size() == size and len(ops.holds()) == 2

    out = stale.cli("--older-than", "0", "--force")
    assert out.returncode == 0, out.stderr
    assert WARNING in out.stderr
    lines = out.stdout.splitlines()
    assert f"released 40 credit(s) of hold {stale.full} (session {stale.sid}) back to {stale.alice}" in lines
    assert (f"released 30 credit(s) of hold {stale.part} (session {stale.sid}) back to {stale.alice}; "
            "the 20 it paid in parts stay paid (it ends settled)") in lines
    assert lines[-1] == "released 70 credit(s) of 2 hold(s) in total"
    assert ops.holds() == []
    usage = ops.usage(stale.sid)
    assert (usage["held"], usage["spent"]) == (0, 30)
    assert ops.balance(stale.alice) == balance + 70
    releases = [e for e in ops.entries(size)["entries"]]
    assert [(e["kind"], e["hold"], e["amount"], e["key"]) for e in releases] == [
        ("release", stale.full, 40, f"release-stale-{stale.full}"),
        ("release", stale.part, 30, f"release-stale-{stale.part}")]
    size = stale.size()

    # The dead scheduler's reports, were they to come after all, are refused.
    with pytest.raises(ConflictError, match="already released"):
        ops.settle_part(stale.full, stale.gpu, 5, key="late-part")
    with pytest.raises(ConflictError, match="already settled"):
        ops.settle(stale.part, stale.gpu, 5, key="late-settle")

    # Running it again releases nothing twice; so does a retry of one release with its key.
    out = stale.cli("--older-than", "0", "--force")
    assert out.returncode == 0 and "nothing to release" in out.stdout, out.stderr
    again = ops.release(stale.full, key=f"release-stale-{stale.full}")
    assert again["released"] == 40 and again["entries"] == [releases[0]["index"]]
    assert stale.size() == size and ops.balance(stale.alice) == balance + 70
    summary = verify_service(stale.svc.url, stale.svc.operator_token)
    assert summary["size"] == size and summary["balances_checked"]


def test_release_stale_of_one_account_as_json(stale):
    bob, bob_api = stale.party.account("client", credits=100)
    bobs = bob_api.hold(bob_api.open_session(100), 60, key="bob")
    out = stale.cli("--older-than", "0", "--force", "--account", stale.alice, "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert (report["older_than"], report["account"], report["dry_run"], report["total"]) == (0, stale.alice,
                                                                                              False, 70)
    assert [h["hold"] for h in report["holds"]] == [stale.full, stale.part]
    assert [(r["hold"], r["released"], r["total_paid"]) for r in report["released"]] == [
        (stale.full, 40, 0), (stale.part, 30, 20)]
    assert report["skipped"] == []
    assert [h["hold"] for h in stale.ops.holds()] == [bobs]  # bob's hold was left alone
    out = stale.cli("--older-than", "0", "--force", "--account", bob, "--dry-run", "--json")
    assert json.loads(out.stdout)["total"] == 60 and stale.ops.holds()[0]["hold"] == bobs


def test_release_stale_needs_the_operator(stale):
    size = stale.size()
    out = stale.cli("--older-than", "60", token=stale.api.token)
    assert out.returncode == 1
    assert "needs role operator" in out.stderr and "pass --token-file with the operator token file" in out.stderr
    # A client may list its own stale holds, but releasing them is the operator's.
    out = stale.cli("--older-than", "0", "--force", "--account", stale.alice, "--dry-run", token=stale.api.token)
    assert out.returncode == 0 and "would release 70 credit(s) of 2 hold(s)" in out.stdout, out.stderr
    out = stale.cli("--older-than", "0", "--force", "--account", stale.alice, token=stale.api.token)
    assert out.returncode == 1 and "release needs role meter or operator" in out.stderr
    assert stale.size() == size and len(stale.ops.holds()) == 2


def test_a_hold_closed_after_the_listing_is_skipped(stale, monkeypatch, capsys):
    listing = stale.ops.holds()
    stale.ops.settle(stale.full, stale.gpu, 15, key="late-but-alive")  # its scheduler was only slow
    monkeypatch.setattr(CreditClient, "holds", lambda self, *args, **kwargs: listing)
    auth = ["--credits", stale.svc.url, "--token-file", str(stale.svc.operator_token_file)]
    assert main(["release-stale", *auth, "--older-than", "0", "--force"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert f"skipped hold {stale.full}: it was settled meanwhile" in out
    assert out[-1] == "released 30 credit(s) of 1 hold(s) in total"
    assert stale.ops.usage(stale.sid)["spent"] == 10 + 20 + 15


def test_open_holds_survive_a_restart_of_the_service(tmp_path):
    """Holds placed before the service restarted are listed and released from the database."""
    svc = serve_in_background(tmp_path / "credits.sqlite3", log_path=tmp_path / "log")
    try:
        stale = Stale(svc)
        before = stale.ops.holds()
    finally:
        svc.stop()
    svc = serve_in_background(tmp_path / "credits.sqlite3", log_path=tmp_path / "log")
    try:
        stale.svc, stale.ops = svc, svc.client()
        assert _without_age(stale.ops.holds()) == _without_age(before)
        out = stale.cli("--older-than", "0", "--force")
        assert out.returncode == 0 and out.stdout.splitlines()[-1] == "released 70 credit(s) of 2 hold(s) in total"
        verify_service(svc.url, svc.operator_token)
    finally:
        svc.stop()


def test_gpunet_cli_has_release_stale(stale, capsys):
    try:
        from gpunet.cli import build_parser, main as gpunet_main
        build_parser()
    except Exception as exc:  # noqa: BLE001 - the rest of the CLI is another part's
        pytest.skip(f"gpunet.cli does not build yet: {exc}")
    auth = ["--credits", stale.svc.url, "--token-file", str(stale.svc.operator_token_file)]
    assert gpunet_main(["credits", "release-stale", *auth, "--older-than", "0", "--force", "--dry-run"]) == 0
    assert "would release 70 credit(s) of 2 hold(s)" in capsys.readouterr().out
    assert gpunet_main(["credits", "release-stale", *auth, "--older-than", "30"]) == 2
    assert "below 60 seconds" in capsys.readouterr().err


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (59.9, "59s"), (61, "1m 01s"), (3600 * 5 + 720, "5h 12m"),
                                           (86400 * 3 + 3600 * 4 + 5, "3d 04h")])
def test_format_age(seconds, text):
    assert format_age(seconds) == text
