"""The notebook's side of an open network's gateway (``gpunet gateway``, :mod:`gpunet.gateway`).

On an open network the notebook is no Dask client: it speaks HTTPS to the gateway,
which checks its credit token, places its holds, sends its jobs to the workers and
streams back what they do. Here:

- :class:`GatewayLink`: the HTTPS connection. The gateway's certificate must come
  from the operator's CA (``--ca FILE`` / ``GPUNET_GATEWAY_CA``); the credit token
  travels in the ``Authorization`` header; bodies are msgpack.
- :func:`job_request`: a job as the gateway takes it: its code, names and flags as
  data, and what the notebook pickled (inputs, map items, a function and its
  arguments) as opaque bytes that only the worker loads, sent as a framed body
  (:mod:`gpunet.framed`: large buffers raw after a msgpack head, no copy into it).
- :class:`GatewayJob`: the job's handle, fed by the job's server-sent events (where
  it started, its output, progress, then its results as codec data, never pickles: a
  small result in its last event, a large one fetched as a framed body of raw frames).
"""

from __future__ import annotations

import base64
import logging
import os
import threading
from collections.abc import Iterator
from typing import Any

import msgpack
import requests
import urllib3

from gpunet import codec, errors, framed, wire
from gpunet.client.handle import JobHandle, pickled
from gpunet.client.received import checked_result
from gpunet.client.reused import say_reused
from gpunet.errors import ConnectError, GatewayError, GpunetError
from gpunet.wire import Job, JobResult, Pickled

logger = logging.getLogger(__name__)

#: The environment variable naming the operator's CA certificate (``ca.pem``), which
#: the gateway's HTTPS certificate must come from (``--ca FILE`` wins).
GATEWAY_CA_ENV = "GPUNET_GATEWAY_CA"
#: Seconds to wait for the gateway to answer a plain request.
REQUEST_TIMEOUT_S = 60.0
#: The largest plain answer the notebook reads from the gateway.
MAX_ANSWER_BYTES = 64 * 1024 * 1024
#: The version of what the notebook and the gateway send each other: 2 sends large inputs
#: and results as framed bodies (gpunet.framed). Each side refuses the other's older one,
#: saying which to upgrade, rather than misread it.
GATEWAY_PROTOCOL = 2
#: What a job's held result may take beyond its results' caps (its head: events, text).
RESULT_BODY_SLACK_BYTES = 64 * 1024 * 1024
#: The codec frames a map's result may bring per item, beyond gpunet.framed.MAX_BUFFERS.
FRAMES_PER_RESULT = 8


def pack(value: Any) -> bytes:
    """``value`` as msgpack (what the gateway and the notebook send each other); codec
    frames inside it as a list of their frames."""
    return msgpack.packb(value, use_bin_type=True, default=codec.frames_as_list)


def unpack(data: bytes, *, max_bytes: int = MAX_ANSWER_BYTES) -> Any:
    """msgpack ``data`` as Python data (never objects: msgpack has none to make)."""
    if len(data) > max_bytes:
        raise GatewayError(f"an answer of {len(data)} bytes is over the {max_bytes} this side reads", status=413,
                           code="too_large")
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def sse_frame(event: str, data: Any) -> bytes:
    """One server-sent event: its name, and ``data`` as base64 msgpack on one line."""
    return f"event: {event}\ndata: {base64.b64encode(pack(data)).decode()}\n\n".encode()


def sse_events(lines: Iterator[bytes | str]) -> Iterator[tuple[str, Any]]:
    """(event, data) of each server-sent event in ``lines`` (see :func:`sse_frame`)."""
    event, data = "message", []
    for raw in lines:
        line = raw.decode() if isinstance(raw, bytes) else raw
        if not line:
            if data:
                yield event, unpack(base64.b64decode("".join(data)))
            event, data = "message", []
        elif line.startswith(":"):  # the gateway cut the event short (it dropped a slow reader): discard it
            event, data = "message", []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())


def check_gateway_protocol(opened: dict[str, Any], url: str) -> None:
    """Refuse (:class:`GpunetError`, saying which side to upgrade) a gateway whose answer to
    opening a session says another protocol than :data:`GATEWAY_PROTOCOL` (an older one says none)."""
    theirs = opened.get("protocol", 1)
    if theirs == GATEWAY_PROTOCOL:
        return
    if isinstance(theirs, int) and theirs > GATEWAY_PROTOCOL:
        raise GpunetError(f"the gateway at {url} runs a newer gpunet (gateway protocol {theirs}; this notebook speaks "
                          f"{GATEWAY_PROTOCOL}): upgrade gpunet here (pip install -U gpunet)")
    raise GpunetError(f"the gateway at {url} runs an older gpunet (gateway protocol {theirs}; this notebook speaks "
                      f"{GATEWAY_PROTOCOL}): ask its operator to upgrade the gateway, or install the gateway's "
                      "gpunet version here")


def gateway_ca(ca: str | None) -> str:
    """The operator's CA file to check the gateway's certificate with (``--ca`` or
    ``GPUNET_GATEWAY_CA``); a clear error where there is none."""
    ca = ca or os.environ.get(GATEWAY_CA_ENV) or None
    if ca is None:
        raise GpunetError(f"an https:// gateway needs its operator's CA certificate to check it: pass --ca FILE "
                          f"(gpunet.connect(..., ca=FILE)) or set {GATEWAY_CA_ENV}; the operator hands out ca.pem")
    if not os.path.isfile(ca):
        raise GpunetError(f"the CA file {ca} does not exist: pass the operator's ca.pem with --ca FILE or "
                          f"{GATEWAY_CA_ENV}")
    return ca


#: How much of a request body goes to the connection at a time (urllib3's default: 16 kB).
SEND_BLOCK_BYTES = 1024 * 1024


class LargeBlocks(requests.adapters.HTTPAdapter):
    """``requests``' adapter sending a streamed body :data:`SEND_BLOCK_BYTES` at a time."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        """The pools, their connections sending bodies in large blocks."""
        super().init_poolmanager(*args, **{**kwargs, "blocksize": SEND_BLOCK_BYTES})


class GatewayLink:
    """HTTPS to the gateway at ``url`` with this notebook's credit ``token``, checking
    its certificate against the operator's CA file ``ca``."""

    def __init__(self, url: str, token: str, ca: str, *, timeout: float = REQUEST_TIMEOUT_S) -> None:
        self.url = url.rstrip("/")
        self.ca = ca
        self.timeout = timeout
        self.http = requests.Session()
        self.http.mount("https://", LargeBlocks())
        self.http.headers.update({"Authorization": f"Bearer {token}", "Content-Type": "application/msgpack"})

    def request(self, method: str, path: str, body: Any = None, *, stream: bool = False,
                timeout: float | None = None, framed_body: bool = False) -> requests.Response:
        """The gateway's answer to ``method path`` (``body`` as msgpack, or with
        ``framed_body`` as a framed body: its :class:`gpunet.framed.Laid` buffers raw); its
        refusal raised as :class:`GatewayError` (or the gpunet error it names)."""
        data: Any = None
        headers = None
        if framed_body and body is not None:
            data, headers = framed.FramedBody(body).reader(), {"Content-Type": framed.MEDIA_TYPE}
        elif body is not None:
            data = pack(body)
        try:
            answer = self.http.request(method, f"{self.url}/v1{path}", data=data, headers=headers,
                                       stream=stream, verify=self.ca,  # per request: REQUESTS_CA_BUNDLE
                                       timeout=(min(self.timeout, 10.0), timeout or self.timeout))
        except requests.exceptions.SSLError as exc:
            raise ConnectError(
                f"the gateway at {self.url} did not present a certificate from the operator's CA in {self.ca} "
                f"({_reason(exc)}). Check the address, and that {self.ca} is the ca.pem of this network's operator "
                f"(--ca FILE or {GATEWAY_CA_ENV}); ask the operator for it.", address=self.url) from None
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise ConnectError(
                f"cannot reach the gateway at {self.url} ({type(exc).__name__}). Check the address and that "
                "`gpunet gateway` runs there.", address=self.url) from None
        if answer.status_code >= 400:
            raise refusal_of(answer)
        return answer

    def call(self, method: str, path: str, body: Any = None) -> Any:
        """The gateway's msgpack answer to ``method path``, as data."""
        return unpack(self.request(method, path, body).content)

    def fetch_framed(self, path: str, max_bytes: int, *, what: str, max_buffers: int = framed.MAX_BUFFERS) -> Any:
        """The framed body the gateway answers ``GET path`` with (:mod:`gpunet.framed`), its
        buffers read into fresh ones of this notebook's own; refused over ``max_bytes`` or
        ``max_buffers``."""
        answer = self.request("GET", path, stream=True)
        try:
            declared = answer.headers.get("content-length", "")
            if answer.headers.get("content-type", "") != framed.MEDIA_TYPE or not declared.isdigit():
                raise framed.version_refusal(what)
            if int(declared) > max_bytes:
                raise GatewayError(f"{what} is {declared} bytes, over the {max_bytes} this side reads", status=413,
                                   code="too_large")
            return framed.read_framed(answer.raw.read, int(declared), what=what, max_buffers=max_buffers)
        except (OSError, ValueError, urllib3.exceptions.HTTPError) as exc:  # the body broke off on its way
            raise GatewayError(f"{what} broke off on its way from the gateway ({type(exc).__name__}); run it "
                               "again", status=502, code="short_body") from None
        finally:
            answer.close()

    def close(self) -> None:
        """Close the HTTPS connections."""
        self.http.close()


def _reason(exc: Exception) -> str:
    text = str(exc)
    for known in ("CERTIFICATE_VERIFY_FAILED", "certificate verify failed", "hostname mismatch"):
        if known in text:
            return text[text.index(known):].split(")")[0].strip(" '\"")
    return type(exc).__name__


def refusal_of(answer: requests.Response) -> GpunetError:
    """The error a gateway's 4xx/5xx answer says (its one clear message)."""
    try:
        error = unpack(answer.content)["error"]
        message, code = str(error["message"]), str(error.get("code", "refused"))
    except Exception:  # noqa: BLE001 - not the gateway's own answer
        message, code = f"the gateway answered {answer.status_code} {answer.reason}", "refused"
    return GatewayError(message, status=answer.status_code, code=code)


def error_from(data: dict[str, Any]) -> GpunetError:
    """The gpunet error the gateway sent for a job (its class, where it is one of
    :mod:`gpunet.errors`; otherwise a :class:`GpunetError` with its message)."""
    cls = getattr(errors, str(data.get("type")), None)
    message = str(data.get("message", "the gateway reported an error"))
    if isinstance(cls, type) and issubclass(cls, GpunetError):
        try:
            return cls(message)
        except TypeError:  # one that needs more than its message
            pass
    return GpunetError(message)


def blob_out(blob: bytes | Pickled) -> bytes | dict[str, Any]:
    """A pickle (:func:`gpunet.wire.pickle_value`'s) as a framed body carries it: its bytes,
    or its stream and its out-of-band buffers laid out raw (:class:`gpunet.framed.Laid`)."""
    if isinstance(blob, Pickled):
        return {"stream": bytes(blob.stream), "buffers": [framed.Laid(buffer) for buffer in blob.buffers],
                "writable": list(blob.writable)}
    return bytes(blob)


def blob_in(data: Any) -> bytes | Pickled | None:
    """What :func:`blob_out` made, as the pickle it was (never loaded; its buffers as they
    arrived: bytes, or views of the request's body); None when malformed."""
    if isinstance(data, bytes):
        return data
    if isinstance(data, dict) and isinstance(data.get("stream"), bytes) and isinstance(data.get("buffers"), list) \
            and all(isinstance(buffer, (bytes, memoryview)) for buffer in data["buffers"]) \
            and isinstance(data.get("writable"), list) and len(data["writable"]) == len(data["buffers"]) \
            and all(isinstance(flag, bool) for flag in data["writable"]):
        return Pickled(data["stream"], list(data["buffers"]), tuple(data["writable"]))
    return None


def job_request(job: Job, *, items: list[Any] | None, resources: dict[str, float],
                workers: list[str] | list[list[str]] | None, max_credits: float | None, timeout: float | None,
                verify: Any, tolerance: Any, max_rate: float | None = None, prefer: str = "cheapest") -> dict[str, Any]:
    """``job`` as the gateway takes it: data, and the notebook's pickles as opaque bytes."""
    function = None
    if job.function is not None:
        function = blob_out(pickled(job.function, f"the function {getattr(job.function, '__name__', job.function)!r}"))
    return {
        "code": job.code, "function": function, "arguments": blob_out(job.arguments) if job.arguments else b"",
        "inputs": {name: blob_out(blob) for name, blob in job.inputs.items()}, "max_rate": max_rate, "prefer": prefer,
        "items": None if items is None else [blob_out(pickled(item, f"map item {index}"))
                                             for index, item in enumerate(items)],
        "outputs": list(job.outputs), "strict_outputs": job.strict_outputs,
        "display_last_expression": job.display_last_expression, "map_name": job.map_name,
        "announce": job.announce, "resources": dict(resources), "workers": workers, "max_credits": max_credits,
        "timeout": timeout, "verify": None if verify is None else str(verify),
        "tolerance": None if tolerance is None else list(tolerance),
    }


class GatewayJob(JobHandle):
    """A job sent through the gateway, followed through its server-sent events:
    ``live`` (a start, output text: checked on the gateway as its worker's), ``progress``,
    then ``results`` (codec data, checked again here) or ``error``."""

    def __init__(self, network: Any, job: Job, *, items: int | None, resources: dict[str, float],
                 allowed_workers: list[str] | None, answer: requests.Response, events: Iterator[tuple[str, Any]],
                 sent: dict[str, Any]) -> None:
        super().__init__(network, job, count=1 if items is None else items, mapped=items is not None,
                         resources=resources, allowed_workers=allowed_workers)
        self.job.job_id = str(sent["job"])  # the gateway's id for it, which stopping names
        self.holds = [str(hold) for hold in sent.get("holds") or []]
        #: the provenance record of the verified run whose result the gateway reused (None: it ran)
        self.reused_from: dict[str, Any] | None = sent["reused"] if isinstance(sent.get("reused"), dict) else None
        if self.reused_from is not None:
            say_reused(self.reused_from)
        self._answer = answer
        self._done_count = 0
        self._results: list[JobResult] | None = None
        self._error: dict[str, Any] | None = None
        self._over = False
        #: the provenance facts (where it ran, verification, payment) the gateway saw
        self.facts: dict[str, Any] | None = None
        self.waiting = ""
        self._reader = threading.Thread(target=self._read, args=(events,), daemon=True,
                                        name=f"gpunet-gateway-{job.job_id}")
        self._reader.start()

    @property
    def completed(self) -> int:
        """How many units have an outcome (all, once the gateway said how it ended)."""
        return self.count if self._over else min(self._done_count, self.count - 1)

    def _read(self, events: Iterator[tuple[str, Any]]) -> None:
        try:
            for event, data in events:
                self._take(event, data)
        except Exception as exc:  # noqa: BLE001 - a broken stream ends the job with its reason
            if not self._over:
                self._error = {"type": "ConnectError", "message": f"the connection to the gateway broke while "
                               f"the job ran ({type(exc).__name__}: {exc}); it was stopped"}
        finally:
            if self._results is None and self._error is None:
                self._error = {"type": "GpunetError", "message": "the gateway closed the job's stream before its "
                               "result came; run it again"}
            self._over = True
            self.wake.set()

    def _take(self, event: str, data: Any) -> None:
        if event == "live" and isinstance(data, dict):
            self._on_live_event(data)
        elif event == "progress" and isinstance(data, dict):
            self._done_count = int(data.get("done", self._done_count))
            self.waiting = str(data.get("waiting", self.waiting))
            self.wake.set()
        elif event == "results-ready" and isinstance(data, dict):
            try:
                results = self.network.link.fetch_framed(
                    f"/sessions/{self.network.gateway_session}/jobs/{self.job.job_id}/result",
                    self.count * self.network.max_result_bytes + RESULT_BODY_SLACK_BYTES, what="the job's result",
                    max_buffers=max(framed.MAX_BUFFERS, FRAMES_PER_RESULT * self.count))
            except GpunetError as exc:
                self._error = {"type": type(exc).__name__, "message": f"the job's result could not be fetched "
                               f"from the gateway: {exc}"}
                self._over = True
                return
            self._take("results", results)
        elif event == "results" and isinstance(data, dict):
            self._results = [checked_result(result, "a result from the gateway") for result in data["results"]]
            self.facts = data.get("facts")
            self._over = True
        elif event == "error" and isinstance(data, dict):
            self._error = data
            self._over = True

    def _outcome(self, progress: Any, echo: bool) -> list[JobResult]:
        if self._error is not None:
            raise error_from(self._error)
        results = self._results or []
        if progress is not None and results and not self.mapped:
            progress.ran_on(results[0].worker, results[0].device)
        return results

    def stop(self, reason: str) -> None:
        """Stop the job on its workers (the gateway does), and stop reading its events."""
        self.stopped_because = reason
        if not self._over:
            try:
                self.network.link.call("POST", f"/sessions/{self.network.gateway_session}/jobs/"
                                               f"{self.job.job_id}/stop", {"reason": reason})
            except GpunetError as exc:
                logger.warning("gpunet: could not stop job %s through the gateway: %s", self.job.job_id, exc)
        self._answer.close()


def first_event(answer: requests.Response) -> tuple[Iterator[tuple[str, Any]], dict[str, Any]]:
    """The job's events, and the first: ``sent`` (its id and holds), or its refusal raised."""
    events = sse_events(answer.iter_lines(chunk_size=None))
    try:
        event, data = next(events)
    except StopIteration:
        answer.close()
        raise GpunetError("the gateway closed the connection before it sent the job; run it again") from None
    if event == "error":
        answer.close()
        raise error_from(data)
    if event != "sent":
        answer.close()
        raise GpunetError(f"the gateway answered {event!r} before sending the job; run it again")
    return events, data


def codec_only(result_format: str) -> None:
    """Results through a gateway are codec data: a network that wants pickles is refused."""
    if result_format != wire.CODEC:
        raise GpunetError("results through a gateway come back as data only; --trust-providers does not apply")
