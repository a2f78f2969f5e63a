"""The ledger keeps its promise against its own operator: the attacks of issue 16, as an attacker
would run them against a real credit service (SQLite and PostgreSQL), and `gpunet ledger ...`
as a reader runs it, each reader with a data dir of its own (its ledger memory)."""

from __future__ import annotations

import base64
import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from credits_helpers import Party
from gpunet.credits import CreditsUnavailableError, serve_in_background
from gpunet.credits._ledger import entry_hash, key_id, sign_head


def ledger(*args, data, check=None):
    """`gpunet ledger ARGS` in a child process, with ``data`` as its data dir."""
    env = dict(os.environ, GPUNET_DATA_DIR=str(data))
    out = subprocess.run([sys.executable, "-m", "gpunet.cli", "ledger", *map(str, args)], capture_output=True,
                         text=True, env=env, timeout=120)
    if check is not None:
        assert out.returncode == check, (out.stdout, out.stderr)
    return out


def refused(out, *needles):
    """The command failed with one line on stderr that says all of ``needles``."""
    assert out.returncode == 1, (out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpunet ledger: "), out.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def fetch_receipt(svc, token, sid, path):
    """`gpunet credits receipt SID -o PATH` as the session's owner runs it."""
    out = subprocess.run([sys.executable, "-m", "gpunet.cli", "credits", "receipt", sid, "--url", svc.url,
                          "--token", token, "-o", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(path.read_text())


class Backend:
    """Where the ledger lives, and an attacker's write access to it (the database, not the key)."""

    def __init__(self, kind, tmp_path, request):
        self.kind = kind
        self.env = dict(os.environ, GPUNET_DATA_DIR=str(tmp_path / "service"))  # a PostgreSQL ledger's key
        if kind == "sqlite":
            self.db = str(tmp_path / "credits.sqlite3")
        else:
            self.db = request.getfixturevalue("postgres_db")
        self.tmp_path = tmp_path
        self.starts = 0

    def serve(self, port=0):
        self.starts += 1
        return serve_in_background(self.db, port=port, env=self.env, log_path=self.tmp_path / f"log{self.starts}",
                                   operator_token_file=self.tmp_path / "operator.token")

    def memory(self):
        """The heads the service signed, beside its key (a SQLite ledger's key is beside the database)."""
        if self.kind == "sqlite":
            return f"{self.db}.ed25519.pem.heads"
        (found,) = (self.tmp_path / "service").glob("*.ed25519.pem.heads")
        return found

    def connect(self):
        if self.kind == "sqlite":
            import sqlite3

            return sqlite3.connect(self.db), "?"
        import psycopg

        return psycopg.connect(self.db), "%s"

    def redirect_payment(self, to):
        """The first settlement pays ``to`` instead, every later hash recomputed so the chain is whole,
        the balances moved to match, and every signed head that covered it deleted. Returns its index."""
        conn, p = self.connect()
        try:
            (index,) = conn.execute("SELECT min(idx) FROM entries WHERE kind = 'settle'").fetchone()
            rows = conn.execute("SELECT idx, time, kind, src, dst, amount, session, hold, key, memo, prev "
                                f"FROM entries WHERE idx >= {p} ORDER BY idx", (index,)).fetchall()
            prev = bytes(rows[0][10])
            for idx, time, kind, src, dst, amount, session, hold, key, memo, _ in rows:
                if idx == index:
                    conn.execute(f"UPDATE accounts SET balance = balance - {p} WHERE name = {p}", (amount, dst))
                    conn.execute(f"UPDATE accounts SET balance = balance + {p} WHERE name = {p}", (amount, to))
                    dst = to
                digest = entry_hash(prev, idx, time, kind, src, dst, amount, session, hold, key, memo)
                conn.execute(f"UPDATE entries SET dst = {p}, prev = {p}, hash = {p} WHERE idx = {p}",
                             (dst, prev, digest, idx))
                prev = digest
            conn.execute(f"DELETE FROM heads WHERE size > {p}", (index,))
            conn.commit()
            return index
        finally:
            conn.close()


    def append_mint(self, to, amount):
        """A mint of ``amount`` to ``to`` appended after the last entry, chained and hashed as the
        service would, the balance raised to match."""
        conn, p = self.connect()
        try:
            index, prev = conn.execute("SELECT idx, hash FROM entries ORDER BY idx DESC LIMIT 1").fetchone()
            when = "2026-01-01T00:00:00.000000Z"
            row = (index + 1, when, "mint", "", to, amount, "", "", "forged")
            digest = entry_hash(bytes(prev), *row)
            conn.execute(f"INSERT INTO entries (idx, time, kind, src, dst, amount, session, hold, key, prev, hash, "
                         f"memo) VALUES ({', '.join([p] * 11)}, '')", (*row, bytes(prev), digest))
            conn.execute(f"UPDATE accounts SET balance = balance + {p} WHERE name = {p}", (amount, to))
            conn.commit()
        finally:
            conn.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request, tmp_path):
    return Backend(request.param, tmp_path, request)


def pay(svc):
    """A client pays a provider three times; returns (party, client api, session, provider, mallory)."""
    party = Party(svc)
    _, api = party.account("client", credits=500)
    gpu, _ = party.account("provider")
    mallory, _ = party.account("provider")
    sid = api.open_session(400)
    for i in range(3):
        party.ops.settle(api.hold(sid, 50, key=f"h{i}"), gpu, 30, key=f"s{i}")
    return party, api, sid, gpu, mallory


def test_a_redirected_payment_with_its_heads_deleted_fails_verify(backend, tmp_path):
    """Attack 1: write access to the database, not the key."""
    svc = backend.serve()
    try:
        _, _, _, _, mallory = pay(svc)
    finally:
        svc.stop()  # signs a last head, covering every entry
    reader = tmp_path / "reader"
    ok = ledger("verify", "--db", backend.db, data=reader, check=0)
    assert "the newest covering every entry" in ok.stdout and "pinned its key" in ok.stdout

    backend.redirect_payment(mallory)
    # Someone who never saw this ledger: no signed head covers the rewritten entries.
    refused(ledger("verify", "--db", backend.db, data=tmp_path / "stranger"),
            "entries 0..", "are covered by no signed head", "heads deleted")
    refused(ledger("verify", "--db", backend.db, data=reader), "covered by no signed head")

    # The service remembers the heads it signed beside its key, outside the database: it does not
    # start on the rewritten one.
    with pytest.raises(CreditsUnavailableError, match="FORK: the credit database .* hashes to root") as err:
        backend.serve()
    assert "changed behind the service's back" in str(err.value)
    # An attacker who can delete that memory too gets the service to sign heads over the rewritten
    # entries: what the reader saw before still tells.
    shutil.rmtree(backend.memory())
    svc = backend.serve()
    try:
        line = refused(ledger("verify", "--url", svc.url, "--token-file", svc.operator_token_file, data=reader),
                       "FORK", "rewritten")
        assert "entries up to" in line
    finally:
        svc.stop()


def test_a_database_cut_back_to_an_earlier_head_fails_verify_against_the_services_memory(backend, tmp_path):
    """Review ledger2.py: write access to the database, no key: the newest payments and every head
    above an earlier one deleted, balances recomputed. A fresh auditor's `ledger verify --db` found
    a whole, signed ledger; with the heads the service keeps beside its key it finds the cut."""
    svc = backend.serve()
    try:
        party, api, sid, gpu, _ = pay(svc)
        earlier = api.head()["size"]  # a head covering the three payments
        party.ops.settle(api.hold(sid, 200, key="h-late"), gpu, 200, key="s-late")
    finally:
        svc.stop()  # signs a last head, remembered beside its key
    flags = [] if backend.kind == "sqlite" else ["--service-memory", backend.memory()]
    ok = ledger("verify", "--db", backend.db, *flags, data=tmp_path / "auditor", check=0)
    assert "head(s) its service kept beside its key" in ok.stdout
    conn, p = backend.connect()
    try:
        conn.execute(f"DELETE FROM entries WHERE idx >= {p}", (earlier,))
        conn.execute(f"DELETE FROM heads WHERE size > {p}", (earlier,))
        for (name,) in conn.execute("SELECT name FROM accounts").fetchall():
            (incoming,) = conn.execute(f"SELECT coalesce(sum(amount), 0) FROM entries WHERE dst = {p}",
                                       (name,)).fetchone()
            (outgoing,) = conn.execute(f"SELECT coalesce(sum(amount), 0) FROM entries WHERE src = {p}",
                                       (name,)).fetchone()
            conn.execute(f"UPDATE accounts SET balance = {p} WHERE name = {p}", (incoming - outgoing, name))
        conn.commit()
    finally:
        conn.close()
    # Without the service's memory the cut ledger is whole and signed: a fresh auditor cannot tell.
    if backend.kind == "sqlite":
        memory = Path(backend.memory())
        hidden = memory.with_name("hidden")
        memory.rename(hidden)
        ledger("verify", "--db", backend.db, data=tmp_path / "fresh0", check=0)
        hidden.rename(memory)
    refused(ledger("verify", "--db", backend.db, *flags, data=tmp_path / "fresh"), "FORK",
            f"holds {earlier} entries, but a head of it covering", "were removed", "kept in")
    refused(ledger("verify", "--db", backend.db, "--service-memory", tmp_path / "nowhere", data=tmp_path / "fresh2"),
            "no service memory at", "--service-memory")


def test_entries_added_while_the_service_was_stopped_are_refused(backend, tmp_path):
    """Attack 1, appending: a mint to oneself, chained and hashed, after the service stopped."""
    svc = backend.serve()
    try:
        _, _, _, _, mallory = pay(svc)
    finally:
        svc.stop()
    backend.append_mint(mallory, 10**6)
    refused(ledger("verify", "--db", backend.db, data=tmp_path / "stranger"), "covered by no signed head")
    with pytest.raises(CreditsUnavailableError, match="were added while it was stopped"):
        backend.serve()
    # After a crash (the service's memory still says it runs) it cannot tell its own last entries
    # from others': it starts, saying so.
    (Path(backend.memory()) / "running").touch()
    svc = backend.serve()
    svc.stop()
    assert "were written after the last head this service remembers" in (tmp_path / f"log{backend.starts}").read_text()


def test_an_operator_who_re_signs_a_rewritten_history_is_caught(backend, tmp_path):
    """Attack 2: the operator holds the key, rewrites a payment, and signs the new history."""
    svc = backend.serve()
    try:
        party, api, sid, gpu, mallory = pay(svc)
        first = fetch_receipt(svc, api.token, sid, tmp_path / "a.json")
        port = int(svc.url.rsplit(":", 1)[1])
    finally:
        svc.stop()
    reader = tmp_path / "reader"
    ok = ledger("verify", "--receipt", tmp_path / "a.json", data=reader, check=0)
    assert f"first contact with {svc.url}: pinned its key, fingerprint {first['head']['key_id']}" in ok.stdout

    backend.redirect_payment(mallory)
    shutil.rmtree(backend.memory())  # the operator has the service's files too
    svc = backend.serve(port=port)  # the same address, the same key
    try:
        second = fetch_receipt(svc, api.token, sid, tmp_path / "b.json")
        assert second["head"]["size"] == first["head"]["size"] and second["head"]["root"] != first["head"]["root"]
        # Each receipt verifies on its own ...
        ledger("verify", "--receipt", tmp_path / "b.json", data=tmp_path / "stranger", check=0)
        # ... but not both, by one reader, nor gathered from two notebooks.
        refused(ledger("verify", "--receipt", tmp_path / "b.json", data=reader), "FORK",
                f"different roots at the same size {first['head']['size']}")
        refused(ledger("verify", "--heads", tmp_path / "a.json", tmp_path / "b.json", data=tmp_path / "gathered"),
                "FORK", "different roots at the same size")

        # Later heads are checked with a consistency proof from the service against the head seen.
        party = Party(svc)
        party.ops.settle(api.hold(sid, 50, key="h9"), gpu, 30, key="s9")
        fetch_receipt(svc, api.token, sid, tmp_path / "c.json")
        refused(ledger("verify", "--receipt", tmp_path / "c.json", "--url", svc.url, "--token", api.token,
                       data=reader), "FORK", "does not extend the head at size")
    finally:
        svc.stop()


@pytest.fixture
def paid(fresh_service, tmp_path):
    """A receipt of a paying session, and the service."""
    party, api, sid, gpu, _ = pay(fresh_service)
    return fresh_service, api, sid, gpu, fetch_receipt(fresh_service, api.token, sid, tmp_path / "a.json")


def test_a_later_head_that_does_not_extend_the_one_seen_is_a_fork(paid, tmp_path):
    svc, api, sid, gpu, receipt = paid
    operator = Party(svc).ops
    reader = tmp_path / "reader"
    ledger("verify", "--receipt", tmp_path / "a.json", data=reader, check=0)
    operator.mint(gpu, 1, key="m1")  # the ledger grows by one entry
    fetch_receipt(svc, api.token, sid, tmp_path / "b.json")
    ok = ledger("verify", "--receipt", tmp_path / "b.json", "--url", svc.url, "--token", api.token, data=reader,
                check=0)
    assert "consistent with the 1 head(s) seen of this ledger before" in ok.stdout
    # Offline, a head of another size is remembered but not yet proven: the reader is told.
    operator.mint(gpu, 1, key="m2")
    fetch_receipt(svc, api.token, sid, tmp_path / "c.json")
    offline = ledger("verify", "--receipt", tmp_path / "c.json", data=reader, check=0)
    assert "not yet proven consistent (offline)" in offline.stdout
    online = ledger("verify", "--receipt", tmp_path / "c.json", "--url", svc.url, "--token", api.token,
                    data=reader, check=0)
    assert "not yet proven" not in online.stdout
    # A head whose proof from the heads seen fails: signed by the operator's key at a larger size,
    # with a root that is not the ledger's.
    operator.mint(gpu, 1, key="m3")
    forged = sign_head(_service_key(svc), receipt["head"]["size"] + 3, bytes(32), receipt["head"]["timestamp"])
    (tmp_path / "d.json").write_text(json.dumps(forged))
    refused(ledger("verify", "--heads", tmp_path / "d.json", "--url", svc.url, "--token", api.token, data=reader),
            "FORK", "does not extend")


def _service_key(svc):
    from gpunet.credits._ledger import load_or_create_signing_key

    return load_or_create_signing_key(f"{svc.db}.ed25519.pem")


def test_trust_on_first_use_and_a_changed_key(paid, tmp_path):
    svc, api, sid, _, receipt = paid
    reader = tmp_path / "reader"
    fingerprint = receipt["head"]["key_id"]
    ok = ledger("verify", "--receipt", tmp_path / "a.json", data=reader, check=0)
    assert f"pinned its key, fingerprint {fingerprint}" in ok.stdout
    again = ledger("verify", "--receipt", tmp_path / "a.json", data=reader, check=0)
    assert f"key {fingerprint} is the one pinned for {svc.url}" in again.stdout
    assert svc.url in ledger("pin", data=reader, check=0).stdout

    # The same receipt re-signed with another key: it verifies on its own, but not against the pin.
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    other = Ed25519PrivateKey.generate()
    resigned = copy.deepcopy(receipt)
    head = receipt["head"]
    resigned["head"] = sign_head(other, head["size"], bytes.fromhex(head["root"]), head["timestamp"])
    (tmp_path / "resigned.json").write_text(json.dumps(resigned))
    ledger("verify", "--receipt", tmp_path / "resigned.json", data=tmp_path / "stranger", check=0)
    new_id = resigned["head"]["key_id"]
    refused(ledger("verify", "--receipt", tmp_path / "resigned.json", data=reader),
            f"signs with key {new_id}", f"signed with key {fingerprint}", "gpunet ledger pin")
    refused(ledger("verify", "--receipt", tmp_path / "resigned.json", "--public-key", head["public_key"],
                   data=tmp_path / "stranger2"), "not the expected key")
    # Only after the reader pins the new key on purpose.
    ledger("pin", svc.url, resigned["head"]["public_key"], data=reader, check=0)
    ledger("verify", "--receipt", tmp_path / "resigned.json", data=reader, check=0)
    refused(ledger("pin", svc.url, "abc", data=reader), "64 hex digits")
    # The service itself, now that its address is pinned to the other key.
    refused(ledger("verify", "--url", svc.url, "--token-file", svc.operator_token_file, data=reader),
            f"signs with key {fingerprint}", f"signed with key {new_id}", "gpunet ledger pin")


def test_a_re_signed_receipt_that_names_no_service_or_two_keys_for_one_is_refused(paid, tmp_path):
    """Review ledger1.py: a receipt re-signed with a key of one's own and ``"service": null``
    passed on a machine that had pinned the real key; two files naming one service with two
    keys passed ``--heads`` on a fresh auditor."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    svc, api, sid, _, receipt = paid
    reader = tmp_path / "reader"
    ledger("verify", "--receipt", tmp_path / "a.json", data=reader, check=0)  # pins the real key
    head = receipt["head"]
    forged = dict(copy.deepcopy(receipt), service=None)
    forged["head"] = sign_head(Ed25519PrivateKey.generate(), head["size"], bytes.fromhex(head["root"]),
                               head["timestamp"])
    (tmp_path / "null.json").write_text(json.dumps(forged))
    notebook = {"format": "gpunet-notebook-receipt-v1", "service": None, "receipt": forged}
    (tmp_path / "nb.json").write_text(json.dumps(notebook))
    for path in ("null.json", "nb.json"):
        for data in (reader, tmp_path / "fresh"):
            refused(ledger("verify", "--receipt", tmp_path / path, data=data), "names no credit service",
                    f"key {forged['head']['key_id']} is pinned for no service")
    # Given the real key by another channel, the forgery fails against it; the real receipt passes.
    refused(ledger("verify", "--receipt", tmp_path / "null.json", "--public-key", head["public_key"],
                   data=tmp_path / "fresh"), "not the expected key")
    real_unnamed = dict(receipt, service=None)
    (tmp_path / "real-null.json").write_text(json.dumps(real_unnamed))
    ledger("verify", "--receipt", tmp_path / "real-null.json", data=reader, check=0)  # its key is pinned here

    (tmp_path / "named.json").write_text(json.dumps(dict(forged, service=svc.url)))
    for data in ("auditor", "auditor2"):
        refused(ledger("verify", "--heads", tmp_path / "a.json", tmp_path / "named.json", data=tmp_path / data),
                f"the heads of the credit service {svc.url} are signed by two keys", head["key_id"],
                forged["head"]["key_id"])
    refused(ledger("verify", "--heads", tmp_path / "null.json", "--public-key", head["public_key"],
                   data=tmp_path / "auditor3"), "not the --public-key given")
    assert not (tmp_path / "auditor" / "ledger" / "pins.json").exists()  # nothing pinned by a refusal


def test_offline_receipt_names_what_was_tampered(paid, tmp_path):
    svc, api, sid, _, receipt = paid
    svc.stop()  # offline: no service at all
    ok = ledger("verify", "--receipt", tmp_path / "a.json", data=tmp_path / "reader", check=0)
    assert ok.stdout.startswith("OK receipt")
    doc = copy.deepcopy(receipt)
    settle = next(e for e in doc["entries"] if e["kind"] == "settle")
    settle["to"] = "mallory"
    (tmp_path / "t.json").write_text(json.dumps(doc))
    refused(ledger("verify", "--receipt", tmp_path / "t.json", data=tmp_path / "reader"),
            f"entry {settle['index']}: stored hash", "this entry was altered")
    doc = copy.deepcopy(receipt)
    raw = base64.b64decode(doc["head"]["signature"])
    doc["head"]["signature"] = base64.b64encode(bytes([raw[0] ^ 1]) + raw[1:]).decode()
    (tmp_path / "s.json").write_text(json.dumps(doc))
    refused(ledger("verify", "--receipt", tmp_path / "s.json", data=tmp_path / "reader"), "does not verify")
    (tmp_path / "x.json").write_text('{"format": "something else"}')
    refused(ledger("verify", "--receipt", tmp_path / "x.json", data=tmp_path / "reader"), "neither a notebook")
    assert key_id(bytes.fromhex(receipt["head"]["public_key"])) == receipt["head"]["key_id"]


def _notebook_with(tmp_path, name, *bundles):
    """An .ipynb whose cells show ``bundles`` ((data, metadata) pairs), as Jupyter saves them."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    for n, (data, metadata) in enumerate(bundles, 1):
        cell = nbformat.v4.new_code_cell("%gpunet receipt", execution_count=n)
        cell.outputs = [nbformat.v4.new_output("execute_result", data=data, metadata=metadata, execution_count=n)]
        nb.cells.append(cell)
    path = tmp_path / name
    nbformat.write(nb, path)
    return path


def test_percent_gpunet_receipt_embeds_a_receipt_that_checks_offline(ip, tmp_path):
    from IPython.utils.capture import capture_output

    from gpunet.credits._receipts import RECEIPT_MIME

    def receipt_display():
        with capture_output():
            ip.run_cell_magic("gpunet", "--quiet", "y = 2 * 21")  # a metered cell: a hold and its settlement
        shown = ip.run_line_magic("gpunet", "receipt")
        return ip.display_formatter.format(shown)

    data, metadata = receipt_display()
    assert set(data) == {RECEIPT_MIME, "text/plain"}
    line = data["text/plain"]
    assert line.startswith("gpunet receipt: session ") and "the first head seen of this ledger" in line
    receipt = data[RECEIPT_MIME]["receipt"]
    assert receipt["entries"] and data[RECEIPT_MIME]["service"] is None  # the notebook's own network
    data2, metadata2 = receipt_display()
    assert "consistent with the 1 head(s) seen before" in data2["text/plain"]
    record = metadata2[RECEIPT_MIME]["ledger"]
    assert len(record["heads"]) == 2 and len(record["links"]) == 1

    notebook = _notebook_with(tmp_path, "analysis.ipynb", (data, metadata), (data2, metadata2))
    # The notebook's own network names no service: a reader elsewhere needs its key, by another channel.
    refused(ledger("verify", "--receipt", notebook, data=tmp_path / "reader"), "names no credit service",
            "--public-key")
    ok = ledger("verify", "--receipt", notebook, "--public-key", receipt["head"]["public_key"],
                data=tmp_path / "reader", check=0)
    assert ok.stdout.count("OK receipt") == 2 and "cell 2" in ok.stdout
    assert "not yet proven" not in ok.stdout  # the notebook carries the proof linking its heads
    heads = ledger("verify", "--heads", notebook, data=tmp_path / "other", check=0)
    assert "OK heads: 2 signed head(s)" in heads.stdout

    tampered = json.loads(json.dumps(data2))
    hold = tampered[RECEIPT_MIME]["receipt"]["entries"][0]
    hold["amount"] += 1
    bad = _notebook_with(tmp_path, "edited.ipynb", (tampered, metadata2))
    refused(ledger("verify", "--receipt", bad, data=tmp_path / "reader2"), f"entry {hold['index']}",
            "this entry was altered")


def test_percent_gpunet_receipt_takes_no_arguments(ip):
    from IPython.core.error import UsageError

    with pytest.raises(UsageError, match="%gpunet receipt takes no arguments, got 'now'"):
        ip.run_line_magic("gpunet", "receipt now")
