"""An open network's front door, every party its own process on 127.0.0.1: the
scheduler and alice's and bob's workers over mutual TLS with the operator's
certificates, the credit service, and `gpunet gateway`. An honest notebook's cells
run through the gateway (HTTPS, its credit token), are metered, verified, and the
ledger verifies; bad tokens, a gateway certificate from another CA, an unreachable
gateway, a job too big, too many submissions, and a job built to make the gateway
unpickle something are each refused with one clear message."""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgpack
import pytest
import requests

import gpunet
from gpunet import certs
from gpunet import framed
from gpunet.client.gateway_link import GATEWAY_PROTOCOL, pack, sse_events, unpack
from gpunet.codec import decode
from gpunet.credits import verify_service
from gpunet.errors import ConnectError, GatewayError, GpunetError, RemoteCellError
from gpunet.ui.status import NetworkStatus
from gpunet_processes import expect, start, stop
from test_open_network import open_market  # noqa: F401 - the fixture

WAIT_S = 30.0
#: The gateway's caps in these tests.
MAX_JOB_BYTES = 1_000_000
MAX_BODY_BYTES = 2_000_000


class Evil:
    """Unpickling this runs code: it leaves a file named after the process that did."""

    def __init__(self, folder: Path) -> None:
        self.folder = str(folder)

    def __reduce__(self):
        return (exec, (f"import os, pathlib; pathlib.Path({self.folder!r}, str(os.getpid())).write_text('ran')",))


@contextlib.contextmanager
def gateway_in_front(open_market, *flags: str):  # noqa: F811 - the fixture imported above
    """`gpunet gateway FLAGS` in front of the open market of test_open_network.py; what it
    says is in the answer's "said" (a list its lines are added to)."""
    ca = open_market["ca"]
    for process in open_market["processes"]:  # read what they log, or a full pipe would stop them
        threading.Thread(target=process.stdout.read, daemon=True).start()
    gateway = start(["gateway", open_market["address"], "--credits", open_market["service"].url, "--port", "0",
                     "--tls-ca-file", str(ca / "ca.pem"), "--tls-cert", str(ca / "gateway-gw.pem"),
                     "--tls-key", str(ca / "gateway-gw-key.pem"), *flags])
    said: list[str] = []
    try:
        url = expect(gateway, r"gateway: (https://127\.0\.0\.1:\d+)").group(1)
        threading.Thread(target=lambda: said.extend(gateway.stdout), daemon=True).start()
        yield {**open_market, "url": url, "gateway": gateway, "ca_file": str(ca / "ca.pem"), "said": said}
    finally:
        stop(gateway)
        assert "Traceback" not in "".join(said), "".join(said)


@pytest.fixture
def gateway_market(open_market):  # noqa: F811 - the fixture imported above
    """The open market of test_open_network.py, with `gpunet gateway` in front of it."""
    with gateway_in_front(open_market, "--max-job-bytes", str(MAX_JOB_BYTES), "--max-body-bytes",
                          str(MAX_BODY_BYTES), "--submit-burst", "40", "--submits-per-second", "0.1") as market:
        yield market


def balances(service) -> dict[str, int]:
    with service.client() as operator:
        return {a["account"]: a["balance"] for a in operator.accounts()}


def settled(credits, session: str) -> dict:
    """The session's usage once nothing is held any more (within WAIT_S)."""
    deadline = time.monotonic() + WAIT_S
    while (usage := credits.usage(session))["held"] and time.monotonic() < deadline:
        time.sleep(0.1)
    return usage


def test_an_honest_notebook_runs_through_the_gateway(gateway_market, detached, shell, capsys, tmp_path):
    market, service = gateway_market, gateway_market["service"]
    before = balances(service)
    add_one = lambda x: x + 1  # noqa: E731 - pickled by value (the workers cannot import this module)
    with gpunet.connect(market["url"], token=market["tokens"]["carol"], ca=market["ca_file"], budget=5_000) as net:
        assert net.run(lambda: 6 * 7, timeout=120) == 42
        namespace = {"x": 20}
        cell = net.run_cell("y = x + 1\nprint('y is', y)", namespace, timeout=120)
        assert namespace["y"] == 21 and "y is 21" in capsys.readouterr().out  # live output came back
        record = cell.provenance
        assert record["payment"]["metered"] and record["payment"]["holds"]
        assert {entry["provider"] for entry in record["ran"]} <= {"alice", "bob"}
        assert net.map(add_one, range(50), timeout=120) == list(range(1, 51))
        assert net.run(add_one, 1, verify="replicate:2", timeout=120) == 2  # alice and bob both ran it
        mapped = {}
        net.run_cell("z = seed * 2", mapped, map="seed=range(4)", timeout=120)
        assert mapped["z"] == [0, 2, 4, 6]
        with pytest.raises(RemoteCellError) as failed:
            net.run_cell("raise KeyError('nope')", {}, timeout=120)
        assert isinstance(failed.value, KeyError)
        status = str(NetworkStatus.of(net))
        assert f"through the gateway {market['url']}" in status and "alice" in status
        session = net.session
    with service.client() as operator:  # closed: the pre-authorized hold is back, every task's part paid
        usage = settled(operator, session)
    assert usage["spent"] > 0 and usage["held"] == 0
    after = balances(service)
    paid = after["alice"] + after["bob"] - before["alice"] - before["bob"]
    assert paid == usage["spent"] == before["carol"] - after["carol"]
    verify_service(service.url, service.operator_token)
    # The magics, as a notebook uses them: the token from a file, the operator's CA.
    token_file = tmp_path / "carol.token"
    token_file.write_text(market["tokens"]["carol"])
    shell.run_line_magic("gpunet", f"connect {market['url']} --token-file {token_file} --ca {market['ca_file']} "
                                   "--budget 500")
    shell.user_ns["x"] = 5
    shell.run_cell_magic("gpunet", "--quiet --timeout 120", "w = x * 3\nprint('w is', w)")
    assert shell.user_ns["w"] == 15
    status = str(shell.run_line_magic("gpunet", "status"))
    said = capsys.readouterr().out
    assert "w is 15" in said and "budget of 500" in said and f"through the gateway {market['url']}" in status
    shell.run_line_magic("gpunet", "disconnect")
    verify_service(service.url, service.operator_token)


def test_a_large_map_through_the_gateway_runs_in_chunks_in_order_and_is_paid(gateway_market, detached):
    """A map large enough to travel several items a task (gpunet.client.submit.map_chunks):
    every item comes back in order, a failing item's error names it, a map stopped at its
    timeout gives its holds back, and the providers are paid what the ledger verifies."""
    market, service = gateway_market, gateway_market["service"]
    before = balances(service)
    triple = lambda x: 3 * x  # noqa: E731 - pickled by value

    def fails_at_123(x):
        if x == 123:
            raise ValueError(f"no {x}")
        return x

    def slow(x):
        import time
        time.sleep(0.2)
        return x

    with gpunet.connect(market["url"], token=market["tokens"]["carol"], ca=market["ca_file"], budget=50_000) as net:
        assert net.map(triple, range(300), timeout=120) == [3 * x for x in range(300)]
        mapped = {}
        net.run_cell("z = seed * 2\nprint('seed', seed)", mapped, map="seed=range(300)", timeout=120)
        assert mapped["z"] == [2 * x for x in range(300)]
        with pytest.raises(ValueError, match="no 123") as failed:
            net.map(fails_at_123, range(300), timeout=120)
        assert isinstance(failed.value, RemoteCellError) and "item 123" in str(failed.value)
        with pytest.raises(gpunet.CellTimeoutError):  # 300 items of 0.2 s on two workers: 30 s
            net.map(slow, range(300), timeout=3)
        assert net.map(triple, range(300), timeout=120)[-1] == 897  # still serving
        session = net.session
    with service.client() as operator:
        usage = settled(operator, session)
    assert usage["spent"] > 0 and usage["held"] == 0
    after = balances(service)
    assert after["alice"] + after["bob"] - before["alice"] - before["bob"] == usage["spent"]
    assert before["carol"] - after["carol"] == usage["spent"]
    verify_service(service.url, service.operator_token)


def test_a_map_whose_chunks_pass_the_sessions_result_cap_comes_back_whole_through_the_gateway(gateway_market,
                                                                                            detached):
    """A session's max_result_bytes (100 KB) caps each result the gateway fetches for it: a
    map whose items' results (40 KB each) add up to more than that in a chunk comes back
    whole, its chunks ended before the cap and the rest sent again an item a task, each
    paid (nothing stays held)."""
    market, service = gateway_market, gateway_market["service"]
    sized = lambda x: bytes(40_000) + x.to_bytes(4, "big")  # noqa: E731 - pickled by value
    with gpunet.connect(market["url"], token=market["tokens"]["carol"], ca=market["ca_file"], budget=20_000,
                        max_result_bytes=100_000) as net:
        assert net.map(sized, range(300), timeout=120) == [sized(x) for x in range(300)]
        session = net.session
    with service.client() as operator:
        usage = settled(operator, session)
    assert usage["spent"] >= 300 and usage["held"] == 0


def test_the_gateway_refuses_strangers_with_one_clear_message(gateway_market, detached, tmp_path, monkeypatch):
    market = gateway_market
    url, ca, tokens = market["url"], market["ca_file"], market["tokens"]
    with pytest.raises(GatewayError, match="does not know this token") as bad:
        gpunet.connect(url, token="not-a-token", ca=ca)
    assert bad.value.status == 401
    with pytest.raises(GatewayError, match="provider account's token") as wrong:
        gpunet.connect(url, token=tokens["alice"], ca=ca)
    assert wrong.value.status == 403
    anonymous = requests.post(f"{url}/v1/sessions", verify=ca, timeout=WAIT_S)
    assert anonymous.status_code == 401 and "send your credit token" in unpack(anonymous.content)["error"]["message"]
    headers = {"Authorization": f"Bearer {tokens['carol']}"}
    # A body of 1-byte empty lists would take 64 times its size once unpacked: refused within a budget.
    bomb = b"\xdd" + (1_500_000).to_bytes(4, "big") + b"\x90" * 1_500_000
    refused = requests.post(f"{url}/v1/sessions", data=bomb, headers=headers, verify=ca, timeout=WAIT_S)
    assert refused.status_code == 413 and "lists and maps" in unpack(refused.content)["error"]["message"]

    def open_one(_):
        return requests.post(f"{url}/v1/sessions", data=pack({"budget": 10, "max_result_bytes": 10**6,
                                                              "max_stream_bytes_per_s": 10**6,
                                                              "protocol": GATEWAY_PROTOCOL}),
                             headers=headers, verify=ca, timeout=WAIT_S)

    with ThreadPoolExecutor(7) as pool:  # at once: sessions still connecting count against the cap too
        opened = sorted(pool.map(open_one, range(7)), key=lambda answer: answer.status_code)
    assert [answer.status_code for answer in opened] == [200] * 4 + [429] * 3
    assert "sessions open on this gateway, the most it may" in unpack(opened[-1].content)["error"]["message"]
    for answer in opened[:4]:
        closing = requests.delete(f"{url}/v1/sessions/{unpack(answer.content)['session_id']}", headers=headers,
                                  verify=ca, timeout=WAIT_S)
        assert closing.status_code == 200
    certs.init_ca(tmp_path / "other")
    with pytest.raises(ConnectError, match="did not present a certificate from the operator's CA"):
        gpunet.connect(url, token=tokens["carol"], ca=str(tmp_path / "other" / "ca.pem"))
    monkeypatch.delenv("GPUNET_GATEWAY_CA", raising=False)
    with pytest.raises(GpunetError, match="needs its operator's CA certificate"):
        gpunet.connect(url, token=tokens["carol"])
    with pytest.raises(ConnectError, match="cannot reach the gateway"):
        gpunet.connect("https://127.0.0.1:9", token=tokens["carol"], ca=ca)


def test_the_gateway_caps_bodies_and_jobs_and_never_unpickles_what_a_notebook_sends(gateway_market, detached,
                                                                                     tmp_path):
    market = gateway_market
    marks = tmp_path / "unpickled"
    marks.mkdir()
    evil = pickle.dumps(Evil(marks))
    with gpunet.connect(market["url"], token=market["tokens"]["carol"], ca=market["ca_file"], budget=5_000) as net:
        with pytest.raises(GatewayError, match="over this gateway's cap") as big:
            net.run_cell("n = len(blob)", {"blob": b"x" * (MAX_JOB_BYTES + 1)}, timeout=60)
        assert big.value.status == 413
        session = f"{market['url']}/v1/sessions/{net.gateway_session}/jobs"
        headers = {"Authorization": f"Bearer {market['tokens']['carol']}"}

        def chunks():  # a body without Content-Length, streamed past the cap
            for _ in range(MAX_BODY_BYTES // 65536 + 2):
                yield b"\0" * 65536

        answer = requests.post(session, data=chunks(), headers=headers, verify=market["ca_file"], timeout=WAIT_S)
        assert answer.status_code == 413
        # A pickle that runs code wherever it is loaded, as every field the gateway reads or passes on.
        body = {"code": None, "function": evil, "arguments": evil, "inputs": {"x": evil}, "items": [evil],
                "outputs": [], "resources": {"device": 1}, "timeout": 60.0}
        for extra in ({}, {"verify": "replicate:2", "tolerance": [0.0, 0.0]}):
            answer = requests.post(session, data=pack({**body, **extra}), headers=headers, verify=market["ca_file"],
                                   timeout=WAIT_S, stream=True)
            assert answer.status_code == 200
            text = answer.content.decode()  # the whole event stream, to the job's end
            assert "event: results" in text or "event: error" in text, text
        unpickled_by = {int(path.name) for path in marks.iterdir()}
        assert market["gateway"].pid not in unpickled_by  # the gateway never loaded it
        pickle.loads(evil)  # and the payload is live: loading it here leaves this process's mark
        assert (marks / str(os.getpid())).exists()
        assert net.run(lambda: "still serving", timeout=120) == "still serving"
        # Submissions are rate-limited per account: the burst runs out, then 429 says so.
        for _ in range(60):
            refused = requests.post(session, data=b"", headers=headers, verify=market["ca_file"], timeout=WAIT_S)
            if refused.status_code == 429:
                break
        assert refused.status_code == 429
        with pytest.raises(GatewayError, match="too many submissions") as limited:
            net.run(lambda: 1, timeout=60)
        assert limited.value.status == 429


def open_by_hand(market, token: str, **fields) -> tuple[str, dict[str, str]]:
    """(the gateway's session id, the headers) of a session ``token`` opens with plain HTTP."""
    headers = {"Authorization": f"Bearer {token}"}
    answer = requests.post(f"{market['url']}/v1/sessions", headers=headers, verify=market["ca_file"], timeout=WAIT_S,
                           data=pack({"budget": 1_000, "max_result_bytes": 10**8, "max_stream_bytes_per_s": 10**6,
                                      "protocol": GATEWAY_PROTOCOL, **fields}))
    assert answer.status_code == 200, unpack(answer.content)
    return unpack(answer.content)["session_id"], headers


def ready_result(market, session: str, headers: dict[str, str], code: str) -> tuple[str, int]:
    """(job id, bytes) of a cell sent by hand whose result the gateway holds to be fetched."""
    answer = requests.post(f"{market['url']}/v1/sessions/{session}/jobs", headers=headers, verify=market["ca_file"],
                           data=pack({"code": code, "outputs": ["y"], "timeout": 120.0}), timeout=WAIT_S * 4)
    events = dict(sse_events(answer.content.decode().split("\n")))
    assert "results-ready" in events, events
    return events["sent"]["job"], events["results-ready"]["bytes"]


def test_a_large_result_is_fetched_raw_once_and_only_by_its_owner(gateway_market, detached):
    """A large result waits on the gateway to be fetched as a framed body (its array's buffer
    raw, no base64), once, by the session's own token; another account's fetch is answered
    404 as a missing session's is; a closed session's result is freed."""
    import numpy as np

    market, ca = gateway_market, gateway_market["ca_file"]
    with market["service"].client() as operator:
        market["tokens"]["dave"] = operator.create_account("dave", "client")["token"]
        operator.mint("dave", 10_000, key="mint-dave")
    with gpunet.connect(market["url"], token=market["tokens"]["carol"], ca=ca, budget=5_000) as net:
        big = net.run(lambda n: __import__("numpy").arange(n, dtype="float64"), 3_000_000, timeout=120)
        assert big.shape == (3_000_000,) and big[-1] == 2_999_999.0 and big.flags.writeable
        big[0] = -1.0  # the notebook's own buffer
        namespace = {"x": np.full(100_000, 2.5)}  # an 800 kB input: its buffer raw after the framed body's head
        net.run_cell("y = x * 2", namespace, timeout=120)
        assert namespace["y"].shape == (100_000,) and float(namespace["y"][7]) == 5.0
    session, carol = open_by_hand(market, market["tokens"]["carol"])
    job, size = ready_result(market, session, carol, "y = b'z' * 2_000_000")
    assert size > 2_000_000
    fetch = f"{market['url']}/v1/sessions/{session}/jobs/{job}/result"
    dave_session, dave = open_by_hand(market, market["tokens"]["dave"])
    for url in (fetch, f"{market['url']}/v1/sessions/{dave_session}/jobs/{job}/result"):
        stolen = requests.get(url, headers=dave, verify=ca, timeout=WAIT_S)
        assert stolen.status_code == 404 and b"z" * 1000 not in stolen.content, stolen.content[:200]
    answer = requests.get(fetch, headers=carol, verify=ca, timeout=WAIT_S, stream=True)
    assert answer.status_code == 200 and answer.headers["content-type"] == framed.MEDIA_TYPE
    data = framed.read_framed(answer.raw.read, int(answer.headers["content-length"]), what="the result")
    assert decode(data["results"][0]["outputs"]["y"]) == b"z" * 2_000_000
    again = requests.get(fetch, headers=carol, verify=ca, timeout=WAIT_S)  # fetched: freed
    assert again.status_code == 404 and "fetched already" in unpack(again.content)["error"]["message"]
    job, _ = ready_result(market, session, carol, "y = b'w' * 2_000_000")
    closed = requests.delete(f"{market['url']}/v1/sessions/{session}", headers=carol, verify=ca, timeout=WAIT_S)
    assert closed.status_code == 200
    gone = requests.get(f"{market['url']}/v1/sessions/{session}/jobs/{job}/result", headers=carol, verify=ca,
                        timeout=WAIT_S)
    assert gone.status_code == 404
    requests.delete(f"{market['url']}/v1/sessions/{dave_session}", headers=dave, verify=ca, timeout=WAIT_S)


def test_bodies_of_another_version_or_over_the_cap_are_refused_clearly(gateway_market, detached):
    market, ca = gateway_market, gateway_market["ca_file"]
    headers = {"Authorization": f"Bearer {market['tokens']['carol']}"}
    older = requests.post(f"{market['url']}/v1/sessions", headers=headers, verify=ca, timeout=WAIT_S,
                          data=pack({"budget": 10, "max_result_bytes": 10**6, "max_stream_bytes_per_s": 10**6}))
    assert older.status_code == 426
    assert "upgrade gpunet in the notebook" in unpack(older.content)["error"]["message"]
    session, headers = open_by_hand(market, market["tokens"]["carol"])
    jobs = f"{market['url']}/v1/sessions/{session}/jobs"
    framed_headers = {**headers, "Content-Type": framed.MEDIA_TYPE}
    wrong = requests.post(jobs, data=b"GPUNETF1" + bytes(8) + pack({}), headers=framed_headers, verify=ca,
                          timeout=WAIT_S)
    assert wrong.status_code == 400 and "not a gpunet framed body of this version" in unpack(wrong.content)[
        "error"]["message"]
    lying = framed.FramedBody({"code": "y = 1", "inputs": {"x": framed.Laid(b"abc")}})
    body = b"".join(bytes(part) for part in lying.parts)[:-1]  # its head names 3 bytes, 2 follow
    refused = requests.post(jobs, data=body, headers=framed_headers, verify=ca, timeout=WAIT_S)
    assert refused.status_code == 400 and "does not hold" in unpack(refused.content)["error"]["message"]
    over = framed.FramedBody({"code": "y = 1", "inputs": {"x": framed.Laid(bytes(MAX_BODY_BYTES))}})
    refused = requests.post(jobs, data=over.reader(), headers=framed_headers, verify=ca, timeout=WAIT_S)
    assert refused.status_code == 413 and f"over the limit of {MAX_BODY_BYTES}" in unpack(refused.content)[
        "error"]["message"]
    requests.delete(f"{market['url']}/v1/sessions/{session}", headers=headers, verify=ca, timeout=WAIT_S)


def _forged(head: bytes, data: bytes = b"", *, length: int | None = None) -> bytes:
    """A framed body whose prefix says ``length`` (the head's own, unless given)."""
    return framed.PREFIX.pack(framed.MAGIC, len(head) if length is None else length) + head + data


def _buffers(*spans) -> bytes:
    return pack({"code": "y = 1", "inputs": {"x": {"stream": b"", "writable": [False] * len(spans), "buffers": [
        msgpack.ExtType(framed.BUFFER_EXT, msgpack.packb(span)) for span in spans]}}})


#: (body, status, what the refusal says) of framed job bodies a stranger forges.
FORGED_BODIES = [
    (_forged(_buffers([0, 4]), b"abc"), 400, "does not hold"),  # past the body's end
    (_forged(_buffers([0, 2], [1, 2]), b"abc"), 400, "does not hold"),  # overlapping, more than sent
    (_forged(_buffers([0, 2], [1, 1]), b"abc"), 400, "overlap or leave gaps"),
    (_forged(_buffers([-1, 2]), b"abc"), 400, "does not hold"),  # a negative offset
    (_forged(_buffers([2**64 - 1, 2**64 - 1]), b"abc"), 400, "does not hold"),  # the largest lengths
    (_forged(_buffers([0, 1, 2]), b"abc"), 400, "does not hold"),  # a span of three numbers
    (_forged(_buffers([0, 3])[:-5], b"abc"), 400, "not msgpack"),  # a head cut short
    (_forged(b"\x91" * 100_000 + b"\x90"), 400, "not msgpack"),  # nested deeper than msgpack's stack
    (_forged(b"\xdb\xff\xff\xff\xff"), 400, "not msgpack"),  # a 4 GB string declared in 5 bytes
    (_forged(b"\xdd\xff\xff\xff\xff"), 413, "lists and maps would take more"),  # 4 billion items declared
    (_forged(pack({"code": "y = 1"}), length=2**63), 400, "more than the body holds"),  # a head past the body
    (_forged(pack([1, 2])), 400, "must be a msgpack map"),
    (_forged(pack({"code": "y = 1", "inputs": {"x": msgpack.ExtType(66, b"\x80")}})), 422,
     "the job's inputs"),  # an extension value the gateway does not know, where a pickle goes
    (_forged(pack({"code": "y = 1", "inputs": {1: b"\x80"}})), 422, "the job's inputs"),  # a name that is no string
]


def test_a_stranger_body_of_many_buffers_and_racing_fetches_are_refused_cleanly(gateway_market, detached):
    """A framed body of 270,000 zero-byte buffers (2 MB) is refused 413 before the gateway builds
    their views (a 64 MB one took it seconds and gigabytes); of two fetches racing for one held
    result, one gets it and the other a 404; forged heads, lengths and labels are each refused
    with what is wrong; the session goes on."""
    market, ca = gateway_market, gateway_market["ca_file"]
    session, carol = open_by_hand(market, market["tokens"]["carol"])
    jobs = f"{market['url']}/v1/sessions/{session}/jobs"
    count = 270_000
    buffer = msgpack.ExtType(framed.BUFFER_EXT, msgpack.packb([0, 0]))
    head = pack({"code": "y = 1", "inputs": {"x": {"stream": b"", "buffers": [buffer] * count,
                                                   "writable": [False] * count}}})
    body = framed.PREFIX.pack(framed.MAGIC, len(head)) + head
    assert len(body) < MAX_BODY_BYTES
    refused = requests.post(jobs, data=body, headers={**carol, "Content-Type": framed.MEDIA_TYPE}, verify=ca,
                            timeout=WAIT_S)
    assert refused.status_code == 413, refused.content[:300]
    assert "more than 262144 buffers" in unpack(refused.content)["error"]["message"]
    for forged, status, message in FORGED_BODIES:
        answer = requests.post(jobs, data=forged, headers={**carol, "Content-Type": framed.MEDIA_TYPE}, verify=ca,
                               timeout=WAIT_S)
        said = unpack(answer.content)["error"]["message"]
        assert answer.status_code == status and message in said, (forged[:40], answer.status_code, said)
    lied = requests.post(jobs, data=pack({"code": "y = 1"}), verify=ca, timeout=WAIT_S,
                         headers={**carol, "Content-Type": framed.MEDIA_TYPE})  # msgpack labelled framed
    assert lied.status_code == 400 and "not a gpunet framed body" in unpack(lied.content)["error"]["message"]
    lied = requests.post(jobs, data=FORGED_BODIES[0][0], headers=carol, verify=ca, timeout=WAIT_S)  # framed, unlabelled
    assert lied.status_code == 400 and "not msgpack" in unpack(lied.content)["error"]["message"]
    job, _ = ready_result(market, session, carol, "y = b'r' * 2_000_000")
    fetch = f"{market['url']}/v1/sessions/{session}/jobs/{job}/result"
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda _: requests.get(fetch, headers=carol, verify=ca, timeout=WAIT_S), range(2)))
    assert sorted(answer.status_code for answer in answers) == [200, 404]
    (won,) = [answer for answer in answers if answer.status_code == 200]
    data = framed.read_framed(io.BytesIO(won.content).read, len(won.content), what="the result")
    assert decode(data["results"][0]["outputs"]["y"]) == b"r" * 2_000_000
    requests.delete(f"{market['url']}/v1/sessions/{session}", headers=carol, verify=ca, timeout=WAIT_S)
