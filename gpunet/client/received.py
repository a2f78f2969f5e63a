"""What the notebook accepts from a provider, checked on arrival.

On a network whose providers the notebook does not trust, a job's result comes
back as codec bytes (:func:`gpunet.worker.runner.encode_result`). :func:`accept`
decodes them within the job's cap, checks every field's type (a stranger's bytes
may say anything), checks that the result is the one asked for (the job's id and
item), and strips terminal control sequences from every text a provider wrote
(output text, tracebacks, its worker's and device's names). Live events are
accepted only when signed with the job's own key (:func:`live_event`).
"""

from __future__ import annotations

import logging
import re
from typing import Any

from gpunet import codec
from gpunet.errors import ProviderDataError, ResultTooLargeError
from gpunet.wire import CHUNK_FRAMING_BYTES, CODEC, PICKLE, Job, JobResult, event_is_signed, stream_allowance

logger = logging.getLogger(__name__)


def accept(raw: Any, job: Job, index: int | None) -> JobResult:
    """The result of ``job`` (item ``index``) as the notebook may use it; raises
    :class:`ProviderDataError` (:class:`ResultTooLargeError` over a cap) and loads
    nothing when it is not acceptable."""
    if job.result_format == PICKLE:
        return raw  # the embedded network, or one whose providers the notebook trusts
    where = "the job's result" if index is None else f"the result of item {index}"
    if isinstance(raw, ProviderDataError):  # the data-only comm refused the payload, and says why
        raise ProviderDataError(f"{where} was refused on arrival: {raw}")
    frames = codec.frames_of(raw)
    if frames is None and not isinstance(raw, (bytes, bytearray, memoryview)):
        raise ProviderDataError(f"{where} came back as {type(raw).__name__}, not as data; it was not loaded")
    raw = frames if frames is not None else raw
    size = codec.nbytes(raw)
    if size > job.max_result_bytes:
        raise ResultTooLargeError(f"{where} is {size:,} bytes, over its cap of {job.max_result_bytes:,} bytes; "
                                  "nothing of it was loaded (return less, or raise the cap: max_result_bytes=)")
    data = codec.decode(raw, what=where)
    result = checked_result(data, where)
    if result.job_id != job.job_id or result.index != index:
        raise ProviderDataError(f"{where} names job {result.job_id!r} item {result.index!r}, not the one asked for; "
                                "it was not loaded")
    text = sum(len(chunk[2]) for chunk in result.streams)
    allowance = stream_allowance(job, result.finished - result.started)
    if text > allowance + 4096:
        raise ResultTooLargeError(f"{where} carries {text:,} bytes of output text, over its cap of "
                                  f"{job.max_stream_bytes_per_s:,} bytes per second run; nothing of it was loaded")
    return result


def accept_chunk(raw: Any, job: Job, items: range) -> list[JobResult]:
    """The results of a map's chunk (``items``, run as one task by
    :func:`gpunet.worker.runner.run_chunk`), each as :func:`accept` takes one: one result
    for each of the chunk's first items, in order, each naming its own item (at least the
    first; a worker ends a chunk early where its results near the cap, and the items it did
    not run are sent again, :meth:`gpunet.client.submit.RemoteJob._gather`).
    :class:`ProviderDataError` (nothing of the chunk loaded) when the chunk is anything
    else: a provider cannot return results for items it was not given, nor more than the
    items' caps allow."""
    where = f"the results of items {items[0]} to {items[-1]}"
    if job.result_format == PICKLE:
        results = raw
    else:
        if isinstance(raw, ProviderDataError):
            raise ProviderDataError(f"{where} were refused on arrival: {raw}")
        cap = len(items) * (job.max_result_bytes + CHUNK_FRAMING_BYTES) + CHUNK_FRAMING_BYTES
        results = codec.decode(raw, max_bytes=cap, what=where)
    if not isinstance(results, (list, tuple)) or not 1 <= len(results) <= len(items):
        count = len(results) if isinstance(results, (list, tuple)) else type(results).__name__
        raise ProviderDataError(f"{where} came back as {count} results, not one per item run (1 to {len(items)}); "
                                "none was loaded")
    return [accept(result, job, index) for result, index in zip(results, items)]


def live_event(job: Job, message: dict[str, Any]) -> dict[str, Any] | None:
    """A live event of ``job`` as it may be shown, or None (logged) when it was not
    signed by the job's own worker: anyone on the scheduler may post events naming
    any job."""
    if not event_is_signed(job.event_key, message):
        logger.warning("gpunet: ignored a %r event naming job %s that its worker did not send (from %r)",
                       codec.clean_text(message.get("kind")), job.job_id, codec.clean_text(message.get("worker")))
        return None
    if job.result_format == PICKLE:
        return message
    if not _well_formed_event(message):  # signed by the job's worker, but a provider's worker may say anything
        logger.warning("gpunet: ignored a malformed %r event of job %s from its worker %r",
                       codec.clean_text(message.get("kind")), job.job_id, codec.clean_text(message.get("worker")))
        return None
    return {key: codec.clean_text(value) if isinstance(value, str) else value for key, value in message.items()}


#: The fields of each kind of live event gpunet's runner sends, and their types.
_EVENT_FIELDS: dict[str, dict[str, tuple[type, ...]]] = {
    "started": {"worker": (str,), "device": (str,)},
    "installing": {"text": (str,)},  # a provider installs the session's packages (gpunet.worker.runner)
    "stream": {"seq": (int,), "name": (str,), "text": (str,)},
    "result": {"result": (dict,)},
}


def _well_formed_event(message: dict[str, Any]) -> bool:
    fields = _EVENT_FIELDS.get(message.get("kind"))  # type: ignore[arg-type]
    return fields is not None and type(message.get("index")) in (int, type(None)) and all(
        isinstance(message.get(name), types) and not isinstance(message.get(name), bool)
        for name, types in fields.items())


# -- checking a decoded result --------------------------------------------------------------


def checked_result(data: Any, where: str) -> JobResult:
    """A decoded result's fields as a CODEC :class:`JobResult`, every type checked and
    every provider's text cleaned; :class:`ProviderDataError` when malformed. (Also for
    a result the scheduler's reuse table hands back: it came from a provider too.)"""
    def need(ok: bool, field: str) -> None:
        if not ok:
            raise ProviderDataError(f"{where} is malformed (its {field}); it was not loaded")

    need(isinstance(data, dict), "shape")
    text = codec.clean_text
    need(isinstance(data.get("job_id"), str), "job id")
    need(data.get("index") is None or type(data.get("index")) is int, "index")
    for name in ("worker", "device"):
        need(isinstance(data.get(name), str), name)
    for name in ("started", "finished"):
        need(type(data.get(name)) in (int, float), name)
    outputs = data.get("outputs")
    need(isinstance(outputs, dict) and all(isinstance(k, str) and _encoded(v) for k, v in outputs.items()), "outputs")
    need(data.get("value") is None or _encoded(data.get("value")), "value")
    missing = data.get("missing_outputs")
    need(isinstance(missing, (list, tuple)) and all(isinstance(name, str) for name in missing), "missing outputs")
    refused = data.get("unpicklable_outputs")
    need(isinstance(refused, (list, tuple)) and all(_strings(entry, 3) for entry in refused), "refused outputs")
    streams = data.get("streams")
    need(isinstance(streams, (list, tuple)) and all(isinstance(chunk, (list, tuple)) and len(chunk) == 3
                                           and type(chunk[0]) is int and chunk[1] in ("stdout", "stderr")
                                           and isinstance(chunk[2], str) for chunk in streams), "output text")
    displays = data.get("displays")
    need(isinstance(displays, (list, tuple)) and all(isinstance(bundle, (list, tuple)) and len(bundle) == 2
                                            and isinstance(bundle[0], dict) and isinstance(bundle[1], dict)
                                            and all(isinstance(mime, str) for mime in bundle[0])
                                            for bundle in displays), "displays")
    error = data.get("error")
    need(error is None or (isinstance(error, dict)
                           and all(isinstance(error.get(key), str) for key in ("ename", "evalue", "traceback"))),
         "error")
    environment = data.get("environment")
    need(environment is None or _environment_ok(environment), "environment")
    return JobResult(
        job_id=data["job_id"], index=data["index"], worker=text(data["worker"]), device=text(data["device"]),
        started=float(data["started"]), finished=float(data["finished"]),
        outputs={name: codec.frames_of(blob) or blob for name, blob in outputs.items()},
        value=None if data["value"] is None else codec.frames_of(data["value"]) or data["value"],
        missing_outputs=list(missing), unpicklable_outputs=[tuple(text(part) for part in entry) for entry in refused],
        streams=[(seq, name, text(chunk)) for seq, name, chunk in streams],
        displays=[(dict(bundle[0]), dict(bundle[1])) for bundle in displays],
        error=None if error is None else {"ename": text(error["ename"]), "evalue": text(error["evalue"]),
                                          "traceback": text(error["traceback"]), "exception": None},
        result_format=CODEC,
        environment=None if environment is None else _clean_environment(environment),
    )


def _encoded(value: Any) -> bool:
    """Whether ``value`` is a value's codec data: bytes, or frames (as sent, or as msgpack
    carried them: a tuple of bytes)."""
    return isinstance(value, bytes) or codec.frames_of(value) is not None


def _environment_ok(environment: Any) -> bool:
    """Whether a provider's account of the environment a job ran in has the expected shape:
    string keys, and only strings, numbers and {str: str} maps as values."""
    if not isinstance(environment, dict) or len(environment) > 32:
        return False
    for key, value in environment.items():
        if not isinstance(key, str):
            return False
        if isinstance(value, dict):
            if len(value) > 5000 or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
                return False
        elif not (value is None or isinstance(value, (str, int, float, bool))):
            return False
    return True


def _clean_environment(environment: dict[str, Any]) -> dict[str, Any]:
    text = codec.clean_text
    return {text(key): ({text(k)[:200]: text(v)[:200] for k, v in value.items()} if isinstance(value, dict)
                        else text(value)[:200] if isinstance(value, str) else value)
            for key, value in environment.items()}


def _strings(entry: Any, count: int) -> bool:
    return isinstance(entry, (list, tuple)) and len(entry) == count and all(isinstance(part, str) for part in entry)


# -- displays -----------------------------------------------------------------------------

#: MIME types a provider's display may carry into the notebook; SVG and HTML only
#: after :func:`sanitized_html`. Everything else (JavaScript, widget messages,
#: Markdown, unknown types) is dropped with a one-line note.
SHOWN_MIME_TYPES = ("text/plain", "image/png", "image/jpeg", "image/svg+xml", "text/html")

_SVG_TAGS = {"svg", "g", "path", "rect", "circle", "ellipse", "line", "polyline", "polygon", "text", "tspan",
             "defs", "clipPath", "linearGradient", "radialGradient", "stop", "title", "desc"}
_SVG_ATTRIBUTES = {"viewBox", "width", "height", "x", "y", "x1", "y1", "x2", "y2", "cx", "cy", "r", "rx", "ry",
                   "d", "points", "fill", "fill-opacity", "fill-rule", "stroke", "stroke-width", "stroke-opacity",
                   "stroke-linecap", "stroke-linejoin", "stroke-dasharray", "opacity", "transform", "font-size",
                   "font-family", "text-anchor", "clip-path", "offset", "stop-color", "id", "xmlns", "version",
                   "preserveAspectRatio", "gradientUnits", "dominant-baseline"}
_HTML_ATTRIBUTES = {"colspan", "rowspan", "align", "title", "alt", "width", "height", "border"}
#: The only url() an attribute may hold: a reference inside the same drawing (``url(#clip)``).
_LOCAL_URL = re.compile(r"\s*url\(\s*#[A-Za-z_][\w.:-]*\s*\)\s*")
#: The only image an <img> may show: inline PNG, JPEG, GIF or WebP.
_DATA_IMAGE = re.compile(r"data:image/(png|jpeg|gif|webp);base64,[A-Za-z0-9+/=\s]*")
#: A width or height a display may ask for: a plain size, not a page-covering one.
_SIZE = re.compile(r"\d{1,4}(\.\d+)?(px|%|em|pt)?")
#: The largest width or height (pixels) a display's metadata may ask for.
MAX_DISPLAY_PIXELS = 10_000


def sanitized_html(markup: str, *, svg: bool = False) -> str:
    """``markup`` from a provider with nothing that runs or loads: no script, event
    handler, iframe, form, style or external resource (an image only as a
    ``data:image/`` URL); ``svg`` allows SVG drawing elements too."""
    import nh3

    tags = (set(nh3.ALLOWED_TAGS) - {"a", "area", "map"}) | (_SVG_TAGS if svg else set())
    allowed = _HTML_ATTRIBUTES | (_SVG_ATTRIBUTES if svg else set())

    def keep(element: str, attribute: str, value: str) -> str | None:
        if attribute == "src":
            return value if element == "img" and _DATA_IMAGE.fullmatch(value) else None
        if attribute not in allowed or ("url(" in value.lower() and not _LOCAL_URL.fullmatch(value)):
            return None
        if attribute in ("width", "height") and not _SIZE.fullmatch(value.strip()):
            return None
        return value

    return nh3.clean(markup, tags=tags, clean_content_tags={"script", "style"},
                     attributes={"*": allowed | {"src"}}, attribute_filter=keep, url_schemes={"data"},
                     strip_comments=True, link_rel=None)


def shown_display(data: dict[str, Any], metadata: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """A provider's display bundle as the notebook may show it: the MIME types of
    :data:`SHOWN_MIME_TYPES` (text cleaned, SVG and HTML sanitized, images as
    bytes or base64 text), and the types dropped."""
    shown: dict[str, Any] = {}
    for mime, value in data.items():
        if mime not in SHOWN_MIME_TYPES or not isinstance(value, (str, bytes)):
            continue
        if mime.startswith("image/") and mime != "image/svg+xml":
            if isinstance(value, bytes) or _is_base64(value):
                shown[mime] = value
        elif isinstance(value, str):
            shown[mime] = (codec.clean_text(value) if mime == "text/plain"
                           else sanitized_html(value, svg=mime == "image/svg+xml"))
    dropped = sorted(mime for mime in data if mime not in shown)
    sizes = {mime: {key: value for key, value in spec.items()
                    if key in ("width", "height") and type(value) is int and 0 < value <= MAX_DISPLAY_PIXELS}
             for mime, spec in metadata.items() if mime in shown and isinstance(spec, dict)}
    return shown, {mime: spec for mime, spec in sizes.items() if spec}, dropped


def _is_base64(text: str) -> bool:
    """True when ``text`` is base64 (an image as Jupyter carries it), not markup in disguise."""
    import base64
    import binascii

    try:
        base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        return False
    return True
