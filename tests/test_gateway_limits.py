"""A stranger tries to exhaust the gateway, every party its own process on 127.0.0.1
(the open market of test_open_network.py with `gpunet gateway` in front, its caps
small): jobs whose results it never reads, connections it holds open or fills a byte at
a time, a token the operator revoked, a job asking for no device on a draining network.
Each attack fails with one clear message while an honest notebook's cells still run."""

from __future__ import annotations

import asyncio
import http.client
import socket
import ssl
import time
from urllib.parse import urlsplit

import pytest
import requests

import gpunet
from gpunet import certs
from gpunet.client.gateway_link import GATEWAY_PROTOCOL, pack, sse_events, unpack
from gpunet.errors import GatewayError
from test_gateway import WAIT_S, gateway_in_front, settled
from test_open_network import open_market  # noqa: F401 - the fixture

#: The gateway's caps in these tests.
JOBS_IN_FLIGHT = 3
PER_JOB_UNREAD = 16_000_000
TOTAL_UNREAD = 10_000_000
SLOW_READER_S = 3
CONNECTIONS_PER_ADDRESS = 8
DEADLINE_S = 2
#: The stranger's own loopback address (the providers have 127.0.0.2 and .3).
STRANGER = "127.0.0.5"


@pytest.fixture
def limited_market(open_market):  # noqa: F811 - the fixture imported above
    """The open market with a gateway whose caps these tests reach, and mallory, a second client account."""
    with gateway_in_front(open_market, "--max-jobs-in-flight", str(JOBS_IN_FLIGHT), "--max-unread-bytes-per-job",
                          str(PER_JOB_UNREAD), "--max-unread-bytes", str(TOTAL_UNREAD), "--slow-reader-seconds",
                          str(SLOW_READER_S), "--max-connections-per-address", str(CONNECTIONS_PER_ADDRESS),
                          "--headers-seconds", str(DEADLINE_S), "--body-seconds", str(DEADLINE_S)) as market:
        with market["service"].client() as operator:
            for name in ("mallory", "dave"):
                market["tokens"][name] = operator.create_account(name, "client")["token"]
                operator.mint(name, 100_000, key=f"mint-{name}")
        yield market


def tls_socket(url: str, ca: str, *, source: str = STRANGER, receive_buffer: int | None = None) -> ssl.SSLSocket:
    """A TLS connection to the gateway from ``source`` (a small ``receive_buffer``: a reader that stalls soon)."""
    host, port = urlsplit(url).hostname, urlsplit(url).port
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if receive_buffer is not None:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    raw.bind((source, 0))
    raw.settimeout(WAIT_S)
    raw.connect((host, port))
    return ssl.create_default_context(cafile=ca).wrap_socket(raw, server_hostname=host)


def https_from(url: str, ca: str, **how) -> http.client.HTTPSConnection:
    """An HTTP connection to the gateway over :func:`tls_socket`."""
    connection = http.client.HTTPSConnection(urlsplit(url).hostname, urlsplit(url).port, timeout=WAIT_S)
    connection.sock = tls_socket(url, ca, **how)
    return connection


def open_session(market, token: str) -> tuple[str, str]:
    """(the gateway's session id, its credit session) of a session opened with ``token``."""
    answer = requests.post(f"{market['url']}/v1/sessions", headers={"Authorization": f"Bearer {token}"},
                           data=pack({"budget": 10_000, "max_result_bytes": 10**7, "max_stream_bytes_per_s": 10**6,
                                      "protocol": GATEWAY_PROTOCOL}),
                           verify=market["ca_file"], timeout=WAIT_S)
    assert answer.status_code == 200, answer.content
    opened = unpack(answer.content)
    return opened["session_id"], opened["credit_session"]


def events_of(text: bytes) -> list[tuple[str, dict]]:
    return list(sse_events(text.decode().split("\n")))


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + 2 * WAIT_S
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_results_nobody_reads_cannot_pile_up_on_the_gateway(limited_market, detached):
    market, ca = limited_market, limited_market["ca_file"]
    token = market["tokens"]["mallory"]
    session, credit_session = open_session(market, token)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/msgpack"}
    big = pack({"code": "import time\ntime.sleep(2)\ny = b'x' * 3_000_000", "outputs": ["y"], "timeout": 120.0})
    stalled = []
    for _ in range(JOBS_IN_FLIGHT):  # each job's 3 MB result waits on the gateway: mallory never fetches it
        connection = https_from(market["url"], ca, receive_buffer=4096)
        connection.request("POST", f"/v1/sessions/{session}/jobs", body=big, headers=headers)
        answer = connection.getresponse()
        assert answer.status == 200
        stalled.append(answer)
    jobs = f"{market['url']}/v1/sessions/{session}/jobs"
    refused = requests.post(jobs, data=big, headers=headers, verify=ca, timeout=WAIT_S)
    assert refused.status_code == 429
    assert "3 jobs in flight on this gateway, the most it may: read their results" in unpack(
        refused.content)["error"]["message"]
    # An honest notebook's cells run meanwhile, and its own results come back whole.
    with gpunet.connect(market["url"], token=market["tokens"]["carol"], ca=ca, budget=5_000) as net:
        namespace = {}
        net.run_cell("z = b'z' * 1_000_000", namespace, timeout=120)
        assert namespace["z"] == b"z" * 1_000_000
        # The gateway drops each stalled reader (stopped, its holds back) and says so in its log.
        wait_for(lambda: "".join(market["said"]).count("dropped the reader of job") >= JOBS_IN_FLIGHT,
                 "".join(market["said"]))
        assert net.run(lambda: "still serving", timeout=120) == "still serving"
    assert "".join(market["said"]).count("the job was stopped") >= JOBS_IN_FLIGHT
    # Their slots are free again, and a reader that comes back is told why its job ended.
    again = requests.post(jobs, data=pack({"code": "w = 1", "outputs": ["w"], "timeout": 120.0}), headers=headers,
                          verify=ca, timeout=WAIT_S)
    assert again.status_code == 200 and [event for event, _ in events_of(again.content)][-1] == "results"
    for answer in stalled:
        events = dict(events_of(answer.read()))
        assert "results" not in events and "results-ready" in events, events  # its 3 MB were held, not sent
        fetched = requests.get(f"{jobs}/{events['sent']['job']}/result", headers=headers, verify=ca, timeout=WAIT_S)
        assert fetched.status_code == 410 and "the job was stopped" in unpack(fetched.content)["error"]["message"]
    closed = requests.delete(f"{market['url']}/v1/sessions/{session}", headers=headers, verify=ca, timeout=WAIT_S)
    assert closed.status_code == 200
    with market["service"].client() as operator:  # nothing stays held: the stopped jobs' holds went back
        assert settled(operator, credit_session)["held"] == 0


def test_idle_and_slow_connections_are_capped_and_closed(limited_market, detached):
    market, ca, url = limited_market, limited_market["ca_file"], limited_market["url"]
    slow = [tls_socket(url, ca) for _ in range(3)]  # TLS, then nothing
    for _ in range(3):  # headers a byte at a time, never finished
        connection = tls_socket(url, ca)
        connection.sendall(b"POST /v1/sessions HTTP/1.1\r\nHost: gateway\r\n")
        slow.append(connection)
    for _ in range(CONNECTIONS_PER_ADDRESS - 6):  # a body that never comes
        connection = tls_socket(url, ca)
        connection.sendall(b"POST /v1/sessions HTTP/1.1\r\nHost: gateway\r\nContent-Length: 1000\r\nAuthorization: "
                           b"Bearer " + market["tokens"]["mallory"].encode() + b"\r\n\r\n0123456789")
        slow.append(connection)
    over = https_from(url, ca)
    over.request("GET", "/v1/health")
    answer = over.getresponse()
    assert answer.status == 429
    assert f"holds {CONNECTIONS_PER_ADDRESS} connections to this gateway, the most it may" in unpack(
        answer.read())["error"]["message"]
    # An honest notebook from its own address gets through while they hang on.
    with gpunet.connect(url, token=market["tokens"]["carol"], ca=ca, budget=1_000) as net:
        assert net.run(lambda: 6 * 7, timeout=120) == 42
    for connection in slow:  # each answered 408 and closed by the gateway
        said = b""
        while chunk := connection.recv(65536):
            said += chunk
        assert said.startswith(b"HTTP/1.1 408"), said[:200]
        assert f"waits at most {DEADLINE_S} s for a request's" in unpack(said.split(b"\r\n\r\n", 1)[1])["error"][
            "message"]
        connection.close()
    # A connection that never starts its TLS handshake is closed too (asyncio alone would wait 60 s).
    silent = socket.create_connection((urlsplit(url).hostname, urlsplit(url).port), timeout=WAIT_S,
                                      source_address=(STRANGER, 0))
    started = time.monotonic()
    assert silent.recv(1) == b"" and time.monotonic() - started < WAIT_S
    silent.close()
    # Their places are free again.
    wait_for(lambda: requests.get(f"{url}/v1/health", verify=ca, timeout=WAIT_S).ok, "health")
    fresh = https_from(url, ca)
    fresh.request("GET", "/v1/health")
    assert fresh.getresponse().status == 200


def set_devices(market, count: int) -> None:
    """What `gpunet provide` does to drain (or undrain) its workers on an open network:
    the scheduler, asked with the provider's certificate, sets their device slots."""
    from distributed.core import rpc

    ca = market["ca"]

    async def set_all() -> None:
        for name, worker in market["workers"].items():
            security = certs.security(ca / "ca.pem", ca / f"provider-{name}.pem", ca / f"provider-{name}-key.pem")
            async with rpc(market["address"], connection_args=security.get_connection_args("worker")) as scheduler:
                await scheduler.set_resources(worker=worker, resources={"device": count})

    asyncio.run(set_all())


def test_a_revoked_token_stops_at_once_and_every_job_takes_a_device(limited_market, detached):
    market, ca = limited_market, limited_market["ca_file"]
    token = market["tokens"]["dave"]
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/msgpack"}
    session, _ = open_session(market, token)
    jobs = f"{market['url']}/v1/sessions/{session}/jobs"
    no_resources = pack({"code": "y = 1", "outputs": ["y"], "resources": {}, "timeout": 5.0})
    set_devices(market, 0)  # both providers drain: a job asking for no device must not run anyway
    try:
        answer = requests.post(jobs, data=no_resources, headers=headers, verify=ca, timeout=WAIT_S)
        events = events_of(answer.content)
        assert [event for event, _ in events][-1] == "error" and "results" not in [event for event, _ in events]
    finally:
        set_devices(market, 1)
    answer = requests.post(jobs, data=no_resources, headers=headers, verify=ca, timeout=WAIT_S)
    assert [event for event, _ in events_of(answer.content)][-1] == "results"
    with gpunet.connect(market["url"], token=token, ca=ca, budget=1_000) as net:
        assert net.run(lambda: 1, timeout=120) == 1
        with market["service"].client() as operator:
            operator.revoke_token("dave")
        with pytest.raises(GatewayError, match="does not know this token") as refused:
            net.run(lambda: 2, timeout=120)
        assert refused.value.status == 401
    refused = requests.post(jobs, data=no_resources, headers=headers, verify=ca, timeout=WAIT_S)
    assert refused.status_code == 401


def test_connections_in_their_tls_handshake_count_against_the_address(limited_market, detached):
    """A stranger opens TCP connections and never starts TLS: uvicorn's protocol sees a
    connection only once its handshake is done, so without a count at accept one address
    could hold the gateway's every file descriptor for the handshake's deadline."""
    market, ca, url = limited_market, limited_market["ca_file"], limited_market["url"]
    host, port = urlsplit(url).hostname, urlsplit(url).port
    silent = [socket.create_connection((host, port), timeout=WAIT_S, source_address=(STRANGER, 0))
              for _ in range(2 * CONNECTIONS_PER_ADDRESS)]
    try:
        with pytest.raises((ssl.SSLError, OSError)):  # the next one is closed before its handshake
            over = https_from(url, ca)
            over.request("GET", "/v1/health")
            over.getresponse()
        # the gateway's log is read by a thread of its own: the line may come a moment later
        wait_for(lambda: "counting those in their TLS handshake" in "".join(market["said"]),
                 "the gateway to log the refused connection")
        # An honest notebook from its own address gets through meanwhile.
        assert requests.get(f"{url}/v1/health", verify=ca, timeout=WAIT_S).ok
    finally:
        for connection in silent:
            connection.close()
    # Their places are free again once they close.
    wait_for(lambda: _health_from_stranger(url, ca) == 200, "the stranger's places back")


def _health_from_stranger(url: str, ca: str) -> int | None:
    try:
        connection = https_from(url, ca)
        connection.request("GET", "/v1/health")
        return connection.getresponse().status
    except (ssl.SSLError, OSError):
        return None


def test_a_revoked_tokens_running_job_stops_without_another_request(limited_market, detached):
    """The operator revokes a client's token while its long job runs; the notebook never
    sends another request: the gateway still stops the job and gives its holds back."""
    market, ca = limited_market, limited_market["ca_file"]
    token = market["tokens"]["dave"]
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/msgpack"}
    session, credit_session = open_session(market, token)
    long_job = pack({"code": "import time\ntime.sleep(600)", "timeout": 900.0})
    with requests.post(f"{market['url']}/v1/sessions/{session}/jobs", data=long_job, headers=headers, verify=ca,
                       timeout=4 * WAIT_S, stream=True) as answer:
        lines = answer.iter_lines()
        said = []
        for line in lines:  # until the job was sent (its holds placed)
            said.append(line)
            if line.startswith(b"event: sent"):
                break
        with market["service"].client() as operator:
            operator.revoke_token("dave")
            said.extend(lines)  # the stream ends (the read would time out while the job ran on)
            events = events_of(b"\n".join(said) + b"\n")
            assert events[-1][0] == "error" and "token was revoked" in events[-1][1]["message"], events[-1]
            assert settled(operator, credit_session)["held"] == 0
    assert "its token was revoked" in "".join(market["said"])


def test_a_pipelined_requests_body_is_due_too(limited_market, detached):
    """A second request sent with the first (HTTP pipelining) starts when the first's
    answer ends, not when bytes arrive: its body is due within the deadline all the same."""
    market, ca, url = limited_market, limited_market["ca_file"], limited_market["url"]
    connection = tls_socket(url, ca)
    connection.sendall(b"GET /v1/health HTTP/1.1\r\nHost: gateway\r\n\r\n"
                       b"POST /v1/sessions HTTP/1.1\r\nHost: gateway\r\nContent-Length: 1000\r\nAuthorization: "
                       b"Bearer " + market["tokens"]["mallory"].encode() + b"\r\n\r\n0123456789")
    said = b""
    while chunk := connection.recv(65536):  # the gateway closes it (a socket timeout here: it waited on)
        said += chunk
    connection.close()
    assert said.startswith(b"HTTP/1.1 200") and b"HTTP/1.1 408" in said, said[:500]
    assert f"waits at most {DEADLINE_S} s for a request's body" in unpack(said.rsplit(b"\r\n\r\n", 1)[1])["error"][
        "message"]


def test_a_stranger_guessing_tokens_is_refused_without_asking_the_credit_service(limited_market, detached):
    """Every unknown token costs the gateway a thread and the credit service a request:
    past a burst, an address's unknown tokens are refused on the spot; a known one still goes."""
    from gpunet.gateway import UNKNOWN_TOKEN_BURST

    market, ca, url = limited_market, limited_market["ca_file"], limited_market["url"]
    connection = https_from(url, ca)
    statuses = []
    for guess in range(UNKNOWN_TOKEN_BURST + 3):
        connection.request("POST", "/v1/sessions", body=pack({"budget": 1}),
                           headers={"Authorization": f"Bearer gpn_guess{guess}"})
        answer = connection.getresponse()
        statuses.append(answer.status)
        said = unpack(answer.read())["error"]["message"]
    assert statuses[:UNKNOWN_TOKEN_BURST] == [401] * UNKNOWN_TOKEN_BURST and statuses[-1] == 429, statuses
    assert "tokens the credit service does not know" in said
    connection.close()
    session, _ = open_session(market, market["tokens"]["carol"])  # another address's notebook is not held up
    assert requests.get(f"{url}/v1/health", verify=ca, timeout=WAIT_S).ok and session
