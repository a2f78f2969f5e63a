"""The data codec: what a provider sends comes back as data, never as code.

Providers are strangers (DESIGN.md, "Trust between strangers"). Unpickling their
bytes runs whatever code they chose, so on every network that is not the
notebook's own embedded one, results, exceptions, displays and events travel in
this codec, built on msgpack with extension types, which cannot run code:

- ``None``, ``bool``, ``int`` (any size), ``float``, ``complex``, ``str``, ``bytes``;
- lists, tuples and dicts of these (tuples and dict keys come back as they went);
- NumPy arrays and scalars of bool, integer, float, complex, bytes, str, datetime64
  and timedelta64 dtypes, as their raw buffer with dtype and shape (never an object
  dtype, never ``allow_pickle``); JAX arrays come back as NumPy arrays;
- pandas Series and DataFrames whose columns are such arrays (string columns too),
  with a RangeIndex or an index of such values;
- matplotlib figures, as PNG (they come back as an ``IPython.display.Image``).

Anything else is refused by :func:`encode` with :class:`UnsupportedResultError`,
naming the output, where in it the value sits, its type, and what to return
instead. :func:`decode` checks the size first and turns any malformed input into
:class:`ProviderDataError`. :func:`digest` hashes the canonical encoding (dict keys
sorted), which verification compares across providers.

A result travels as :class:`Frames` (:func:`encode_frames`): a msgpack head, then each
large array's buffer as a frame of its own, a read-only view of the array's memory that
Dask sends as its own frame (:func:`register_with_dask`), never copied into one blob.
In the notebook an array decoded from a frame the connection read into a fresh buffer
is a writable view of that buffer (the notebook's alone); any other frame is copied.

    >>> import numpy as np
    >>> from gpunet import codec
    >>> codec.decode(codec.encode({"x": np.arange(3), "label": ("a", 1)}))
    {'x': array([0, 1, 2]), 'label': ('a', 1)}
"""

from __future__ import annotations

import hashlib
import re
import struct
from collections.abc import Callable
from typing import Any

import msgpack

from gpunet.errors import ProviderDataError, UnsupportedResultError
from gpunet.wire import PICKLE, pickle_value, unpickle_value

# msgpack extension type codes (_NDFRAME: an array whose buffer is a frame of its own;
# _FRAMES: codec data encoded before, as frames, inside a value)
_TUPLE, _BIGINT, _COMPLEX, _NDARRAY, _NPSCALAR, _SERIES, _DATAFRAME, _FIGURE, _NDFRAME, _FRAMES = range(1, 11)

#: NumPy dtype kinds the codec carries: bool, int, uint, float, complex, bytes, str,
#: timedelta64, datetime64 (never "O" objects or "V" structured records).
ARRAY_KINDS = frozenset("biufcSUmM")

SUPPORTED = ("None, bool, int, float, complex, str, bytes; lists, tuples and dicts of them; NumPy or JAX arrays "
             "of numbers, bools, strings or datetimes; pandas Series/DataFrames of such columns; matplotlib figures")


class Frames:
    """Codec data as frames (what :func:`encode_frames` makes): the msgpack head first,
    then the raw buffers of its large arrays, each sent as a frame of its own (Dask's
    frames, the sandbox's), never copied into one blob. ``owned``: the frames are the
    receiver's alone (fresh buffers a connection read), so decoded arrays may be
    writable views of them instead of copies.

    A sequence of frames, but not a tuple: Dask's msgpack serializer cannot pack it,
    so a worker asked for ``("msgpack", DASK_SERIALIZER)`` (as the notebook asks, an
    older provider answering with msgpack, which knows no gpunet serializer) sends it
    as frames (:data:`DASK_SERIALIZER`)."""

    __slots__ = ("parts", "owned")

    def __init__(self, parts: Any = ()) -> None:
        self.parts = tuple(parts)
        self.owned = False

    def __len__(self) -> int:
        return len(self.parts)

    def __iter__(self) -> Any:
        return iter(self.parts)

    def __getitem__(self, index: Any) -> Any:
        return self.parts[index]

    def __sizeof__(self) -> int:  # what Dask's memory accounting counts
        return self.nbytes

    @property
    def nbytes(self) -> int:
        """The frames' total size in bytes."""
        return sum(memoryview(frame).nbytes for frame in self.parts)


def encode(obj: Any, *, name: str = "the result") -> memoryview:
    """``obj`` as codec bytes (a read-only view of the packer's own buffer: no copy of
    a large result); :class:`UnsupportedResultError` naming ``name`` (e.g. "output
    'model'") and the first value inside it the codec cannot carry."""
    try:
        packer = msgpack.Packer(default=_Encoder(None).default, use_bin_type=True, strict_types=True,
                                autoreset=False, buf_size=256 * 1024 + _large_bytes(obj))
        packer.pack(obj)
        return packer.getbuffer().toreadonly()
    except _Unsupported as exc:
        raise _refusal(name, obj, exc) from None


def encode_frames(obj: Any, *, name: str = "the result") -> Frames:
    """``obj`` as :class:`Frames`: what :func:`encode` makes, but each NumPy buffer of
    :data:`FRAME_MIN_BYTES` or more left out of the head as a read-only view of the
    array's own memory (no copy; a non-contiguous array is made contiguous once), and
    the frames of :class:`Frames` inside ``obj`` (a result's encoded outputs) taken
    over as they are."""
    encoder = _Encoder([])
    try:
        head = msgpack.packb(obj, default=encoder.default, use_bin_type=True, strict_types=True)
    except _Unsupported as exc:
        raise _refusal(name, obj, exc) from None
    return Frames([head, *encoder.frames])


#: The Dask serialization family that sends :class:`Frames` as Dask frames of their own
#: (registered by :func:`register_with_dask` in the notebook and on workers). The notebook
#: asks for msgpack first and this second: an older provider, which knows no such family,
#: answers with msgpack (its codec bytes) before Dask would look this name up and fail.
DASK_SERIALIZER = "gpunet-codec"


def register_with_dask() -> None:
    """Teach Dask (in this process) to send :class:`Frames` as frames: no copy of a
    result's arrays into one msgpack blob on the worker, nor out of it in the notebook."""
    from distributed.protocol.serialize import families, register_serialization_family

    if DASK_SERIALIZER not in families:
        register_serialization_family(DASK_SERIALIZER, _dask_dumps, _dask_loads)


def _dask_dumps(value: Any) -> tuple[dict[str, Any], list[Any]]:
    if not isinstance(value, Frames):
        raise NotImplementedError  # Dask tries the next serializer (msgpack)
    return {}, list(value)


def _dask_loads(header: dict[str, Any], frames: list[Any]) -> Frames:
    """Frames as a connection read them: only wrapped (decoding is :func:`decode`'s, with
    the job's caps). Owned when every array frame is a writable buffer of its own
    (a connection's fresh read), never a sender's read-only views in this process."""
    received = Frames(frames)
    received.owned = bool(frames) and all(not memoryview(frame).readonly for frame in frames[1:])
    return received


def frames_as_list(value: Any) -> list[Any]:
    """msgpack's ``default`` for a message that carries :class:`Frames` (the gateway's relay
    to the notebook): their frames as a list of bytes, which :func:`frames_of` takes back."""
    if isinstance(value, Frames):
        return list(value.parts)
    raise TypeError(f"can not serialize {_type_name(value)!r} object")


def frames_of(data: Any) -> Frames | None:
    """``data`` as :class:`Frames` when it is frames (as made, or a tuple or list of
    bytes-like frames, as msgpack carries them), else None."""
    if isinstance(data, Frames):
        return data
    if isinstance(data, (tuple, list)) and data and all(isinstance(f, (bytes, bytearray, memoryview)) for f in data):
        return Frames(data)
    return None


def nbytes(data: Any) -> int:
    """The size of codec bytes or :class:`Frames`."""
    return data.nbytes if isinstance(data, Frames) else len(data)


def decode(data: bytes | bytearray | memoryview | Frames, *, max_bytes: int | None = None,
           what: str = "a result") -> Any:
    """The value :func:`encode` (or :func:`encode_frames`) made of ``data``. Never runs
    code: malformed or hostile input, or input over ``max_bytes``, raises
    :class:`ProviderDataError`. Arrays are the caller's own: writable copies, or
    writable views of frames the caller owns (:attr:`Frames.owned`), the first time only:
    decoded again, they are copies (no two values share a buffer)."""
    frames = frames_of(data)
    if frames is None and not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProviderDataError(f"{what} came back as {_type_name(data)}, not as codec bytes; it was not loaded")
    length = nbytes(frames if frames is not None else data)
    if max_bytes is not None and length > max_bytes:
        raise ProviderDataError(f"{what} is {length:,} bytes, over its cap of {max_bytes:,} bytes; it was not "
                                "loaded (raise the cap with --max-result-bytes, or return less)")
    size = max_bytes if max_bytes is not None else length
    try:
        decoder = _Decoder(size + DECODE_SLACK_BYTES, SLOT_BYTES * size + DECODE_SLACK_BYTES, frames=frames)
        try:
            return decoder.unpack(frames[0] if frames is not None else data)
        finally:
            if frames is not None:  # its buffers are handed out once: a second decode copies them
                frames.owned = False
    except ProviderDataError as exc:
        raise ProviderDataError(f"{what} could not be decoded ({exc}); it was not loaded") from None
    except Exception as exc:  # noqa: BLE001 - anything a stranger's bytes can make msgpack or NumPy raise
        raise ProviderDataError(f"{what} could not be decoded ({type(exc).__name__}: {exc}); it was not loaded") from None


def dump(value: Any, result_format: str, *, name: str) -> Any:
    """``value`` as it travels back in ``result_format``: codec :class:`Frames` (:func:`encode_frames`),
    or where the notebook trusts its providers (``PICKLE``) pickled once, its large
    buffers kept apart to travel as Dask frames (:func:`gpunet.wire.pickle_value`)."""
    if result_format == PICKLE:
        return pickle_value(value)
    return encode_frames(value, name=name)


def load(blob: Any, result_format: str, *, what: str) -> Any:
    """The value :func:`dump` made. Only ``PICKLE`` unpickles, and only the embedded
    network and a private one that trusts its providers send it (the notebook says
    which format it accepts, and a JobResult in another is refused on arrival)."""
    if result_format == PICKLE:
        return unpickle_value(blob)
    return decode(blob, what=what)


def digest(obj: Any) -> str:
    """``sha256:...`` of ``obj``'s canonical encoding: equal data, equal digest,
    whatever the order its dicts were built in."""
    return "sha256:" + hashlib.sha256(canonical_bytes(obj)).hexdigest()


def canonical_bytes(obj: Any) -> bytes:
    """The encoding of ``obj`` with every dict's keys in the order of their own encoding."""
    return encode(_canonical(obj))


def _canonical(obj: Any) -> Any:
    if isinstance(obj, dict):
        pairs = sorted(((bytes(encode(_canonical(key))), key, value) for key, value in obj.items()),
                       key=lambda p: p[0])
        return {key: _canonical(value) for _, key, value in pairs}
    if isinstance(obj, list):
        return [_canonical(item) for item in obj]
    if type(obj) is tuple:
        return tuple(_canonical(item) for item in obj)
    return obj


# -- values that travel as their type name, message and text ---------------------------

#: Terminal control sequences (CSI/OSC/other ESC sequences) and C0/C1 control
#: characters other than tab, newline and carriage return.
_CONTROL = re.compile(r"\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-Z\\-_]|"
                      r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def clean_text(text: Any) -> str:
    """``text`` from a provider, safe to print: terminal escape sequences and other
    control characters removed (tab, newline and carriage return kept)."""
    return _CONTROL.sub("", text if isinstance(text, str) else str(text))


# -- encoding --------------------------------------------------------------------------


class _Unsupported(Exception):
    def __init__(self, value: Any, reason: str = "") -> None:
        super().__init__(reason)
        self.value = value
        self.reason = reason


def _large_bytes(obj: Any, depth: int = 3) -> int:
    """About how many bytes ``obj``'s large values take (a few levels deep; cheap)."""
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return len(obj)
    if hasattr(obj, "nbytes") and isinstance(getattr(obj, "nbytes"), int):
        return obj.nbytes
    if depth and isinstance(obj, dict):
        return sum(_large_bytes(value, depth - 1) for value in obj.values())
    if depth and isinstance(obj, (list, tuple)) and len(obj) < 64:
        return sum(_large_bytes(value, depth - 1) for value in obj)
    return 0


#: Arrays of this many bytes or more travel as frames of their own (:func:`encode_frames`);
#: smaller ones inside the head, where a copy costs less than a frame.
FRAME_MIN_BYTES = 16 * 1024


class _Encoder:
    """One encoding: ``frames`` None packs every array's buffer into the bytes
    (:func:`encode`); a list collects large buffers as frames (:func:`encode_frames`)."""

    def __init__(self, frames: list[Any] | None) -> None:
        self.frames = frames

    def pack(self, obj: Any) -> bytes:
        # strict_types: a tuple, an int or float subclass (NumPy scalars) reaches default.
        # A buffer sized for the large values up front: growing it copies them again.
        large = _large_bytes(obj) if self.frames is None else 0
        return msgpack.packb(obj, default=self.default, use_bin_type=True, strict_types=True,
                             buf_size=256 * 1024 + large)

    def default(self, obj: Any) -> Any:
        """msgpack's hook for what it does not carry natively."""
        if isinstance(obj, Frames):  # an output encoded before its result
            if self.frames is None:
                return msgpack.ExtType(_FRAMES, self.pack([bytes(memoryview(frame)) for frame in obj]))
            self.frames.extend(obj)
            return msgpack.ExtType(_FRAMES, self.pack([len(self.frames) - len(obj) + 1, len(obj)]))
        if isinstance(obj, tuple):
            return msgpack.ExtType(_TUPLE, self.pack(list(obj)))
        if isinstance(obj, complex):
            return msgpack.ExtType(_COMPLEX, struct.pack("<dd", obj.real, obj.imag))
        module = type(obj).__module__.split(".")[0]
        if isinstance(obj, int) and module != "numpy":  # beyond 64 bits, or a subclass (IntEnum)
            value = int(obj)
            return value if -(2**63) <= value < 2**64 and type(obj) is not int else \
                msgpack.ExtType(_BIGINT, str(value).encode())
        if isinstance(obj, (float, str, bytes)) and module != "numpy":  # subclasses travel as their base
            return (float if isinstance(obj, float) else str if isinstance(obj, str) else bytes)(obj)
        if isinstance(obj, dict):
            return dict(obj)
        if isinstance(obj, list):
            return list(obj)
        if module == "numpy":
            import numpy as np

            if isinstance(obj, np.ndarray):
                return self.array(obj)
            if isinstance(obj, np.generic):
                return msgpack.ExtType(_NPSCALAR, self.array_payload(np.asarray(obj)))
        if module in ("jax", "jaxlib") and hasattr(obj, "__array__"):
            import numpy as np

            return self.array(np.asarray(obj))
        if module == "pandas":
            import pandas as pd

            if isinstance(obj, pd.Series):
                return msgpack.ExtType(_SERIES, self.pack([obj.name, self.index_payload(obj.index), self.column(obj)]))
            if isinstance(obj, pd.DataFrame):
                if not all(isinstance(column, (str, int)) for column in obj.columns):
                    raise _Unsupported(obj, "its column names must be strings or integers")
                columns = [(column, self.column(obj[column] if obj.columns.is_unique else obj.iloc[:, i]))
                           for i, column in enumerate(obj.columns)]
                return msgpack.ExtType(_DATAFRAME, self.pack([self.index_payload(obj.index), columns]))
        if module == "matplotlib" and type(obj).__name__ == "Figure":
            import io

            buffer = io.BytesIO()
            obj.savefig(buffer, format="png", bbox_inches="tight")
            return msgpack.ExtType(_FIGURE, buffer.getvalue())
        raise _Unsupported(obj)

    def array(self, array: Any) -> msgpack.ExtType:
        """An array: its buffer in the bytes, or (a large one, when collecting frames)
        a frame of its own, the head naming its dtype, shape and frame."""
        if self.frames is None or array.nbytes < FRAME_MIN_BYTES:
            return msgpack.ExtType(_NDARRAY, self.array_payload(array))
        contiguous = _contiguous(array)
        self.frames.append(memoryview(contiguous.reshape(-1).view("u1")).toreadonly())
        return msgpack.ExtType(_NDFRAME, self.pack([contiguous.dtype.str, list(contiguous.shape), len(self.frames)]))

    def array_payload(self, array: Any) -> bytes:
        contiguous = _contiguous(array)
        # header length, header, raw buffer: joined in one allocation, and read back without copying the buffer
        header = self.pack([contiguous.dtype.str, list(contiguous.shape)])
        return b"".join([struct.pack("<I", len(header)), header, memoryview(contiguous.reshape(-1).view("u1"))])

    def column(self, series: Any) -> list[Any]:
        """A pandas column: an array, or (object, string and categorical columns) its
        values as a list of what the codec carries."""
        values = series.to_numpy()
        if values.dtype.kind != "O":  # in the bytes: the same encoding as before frames (digests stay)
            return ["array", self.array_payload(values) if self.frames is None else self.array(values)]
        try:
            return ["list", str(series.dtype), self.pack(series.tolist())]
        except _Unsupported as exc:
            raise _Unsupported(series, f"its column {series.name!r} ({series.dtype}) holds a "
                                       f"{_type_name(exc.value)}") from None

    def index_payload(self, index: Any) -> Any:
        import pandas as pd

        if isinstance(index, pd.RangeIndex):
            return ["range", index.start, index.stop, index.step, index.name]
        if isinstance(index, pd.MultiIndex):
            raise _Unsupported(index, "a MultiIndex does not travel; reset_index() first")
        return ["values", self.column(index.to_series()), index.name]


def _contiguous(array: Any) -> Any:
    """``array`` itself when C-contiguous, else a C-contiguous copy; refused when its
    dtype does not travel."""
    import numpy as np

    if array.dtype.kind not in ARRAY_KINDS or array.dtype.fields is not None:
        raise _Unsupported(array, f"its dtype {array.dtype} is not one of numbers, bools, strings or datetimes")
    return array if array.flags.c_contiguous else np.array(array, order="C")  # keeps 0-d arrays 0-d


#: pandas dtypes a column of Python values comes back as (anything else: object)
_LIST_DTYPES = ("str", "string", "object", "category")


# -- decoding --------------------------------------------------------------------------

#: How deeply extension values (tuples, Series, ...) may nest in one another. Each
#: level starts a fresh msgpack unpack on the C stack, so a few hundred crash the
#: process; honest results nest a handful deep.
MAX_EXT_DEPTH = 32
#: What a decoded value may take beyond its encoded size where no cap is given
#: (arrays of zero-size items, a RangeIndex without columns).
DECODE_SLACK_BYTES = 64 * 1024 * 1024
#: What a decoded list or map is charged: a fixed part (an empty one's header) and a part
#: per slot. An encoded byte may make a whole empty list (64x its size in memory), while
#: honest data (a list of small ints) takes at most SLOT_BYTES per encoded byte.
CONTAINER_BYTES = 64
SLOT_BYTES = 8


def charge_container(value: Any, budget: int) -> int:
    """What is left of ``budget`` once the decoded list or map ``value`` is charged to it
    (:data:`CONTAINER_BYTES`, :data:`SLOT_BYTES`); :class:`ProviderDataError` past it."""
    budget -= CONTAINER_BYTES + SLOT_BYTES * len(value) * (2 if isinstance(value, dict) else 1)
    if budget < 0:
        raise ProviderDataError("its lists and maps would take more memory than its size allows")
    return budget


def unpack_plain(data: bytes | bytearray | memoryview, *, budget: int,
                 ext_hook: Callable[[int, bytes], Any] = msgpack.ExtType) -> Any:
    """msgpack ``data`` as plain Python data (no codec extension decoded: each is what
    ``ext_hook`` makes of it), its lists, maps and extension values charged against
    ``budget`` bytes (:data:`CONTAINER_BYTES`, :data:`SLOT_BYTES`; an extension value its
    bytes too): :class:`ProviderDataError` past it, before much of it is built."""
    try:
        return _Decoder(0, budget, extensions=False, opaque_ext=ext_hook).unpack(data)
    except ValueError as exc:  # msgpack's own refusal of a list or map longer than the budget allows
        if "exceeds max_" not in str(exc):
            raise
        raise ProviderDataError("its lists and maps would take more memory than its size allows") from None


class _Decoder:
    """One :func:`decode`: counts how deep extension values nest and charges what the
    decoded arrays and indexes take against a byte budget, so neither a deep nest nor
    a small payload that expands (a 0-d column under a huge RangeIndex, an array of
    zero-size items) can crash the notebook or exhaust its memory."""

    def __init__(self, budget: int, containers: int, *, extensions: bool = True, frames: Frames | None = None,
                 opaque_ext: Callable[[int, bytes], Any] = msgpack.ExtType) -> None:
        self.depth = 0
        #: what an extension value becomes where codec extensions are not decoded
        self.opaque_ext = opaque_ext
        self.budget = budget
        #: what lists and maps may still take (see CONTAINER_BYTES)
        self.containers = containers
        self.extensions = extensions
        #: the frames the head's arrays refer to (None: bytes, where a frame is refused)
        self.frames = frames
        #: frames already taken: each is one value's alone (no two arrays share memory)
        self.taken: set[int] = set()

    def unpack(self, data: bytes) -> Any:
        self.depth += 1
        try:
            if self.depth > MAX_EXT_DEPTH:
                raise ProviderDataError(f"values nest more than {MAX_EXT_DEPTH} tuples, arrays or frames deep")
            slots = max(self.containers, 0) // SLOT_BYTES  # a longer list or map is refused before it is made
            return msgpack.unpackb(data, ext_hook=self.ext_hook if self.extensions else self.opaque, raw=False,
                                   strict_map_key=False, use_list=True, list_hook=self.container,
                                   object_hook=self.container, max_array_len=slots, max_map_len=slots // 2)
        finally:
            self.depth -= 1

    def container(self, value: Any) -> Any:
        """Charge a decoded list or map (msgpack's hook) and return it."""
        self.containers = charge_container(value, self.containers)
        return value

    def opaque(self, code: int, data: bytes) -> Any:
        """An extension value left undecoded (:func:`unpack_plain`), charged as a container
        and its bytes: a body of small ones cannot expand far past its size either."""
        self.containers -= CONTAINER_BYTES + len(data)
        if self.containers < 0:
            raise ProviderDataError("its lists and maps would take more memory than its size allows")
        return self.opaque_ext(code, data)

    def charge(self, nbytes: int) -> None:
        self.budget -= nbytes
        if self.budget < 0:
            raise ProviderDataError("its decoded values would take more memory than its cap allows")

    def ext_hook(self, code: int, data: bytes) -> Any:
        if code == _TUPLE:
            return tuple(self.unpack(data))
        if code == _BIGINT:
            return int(data.decode("ascii"))
        if code == _COMPLEX:
            real, imag = struct.unpack("<dd", data)
            return complex(real, imag)
        if code == _NDARRAY:
            return self.array(data)
        if code == _NDFRAME:
            return self.framed_array(data)
        if code == _FRAMES:
            return self.nested_frames(data)
        if code == _NPSCALAR:
            return self.array(data)[()]
        if code in (_SERIES, _DATAFRAME):
            import pandas as pd

            if code == _SERIES:
                name, index, values = self.unpack(data)
                column = self.column_values(values)
                return pd.Series(column, index=self.index(index, len(column)), name=name)
            index, columns = self.unpack(data)
            values = {name: self.column_values(payload) for name, payload in columns}
            lengths = {len(column) for column in values.values()}
            if len(lengths) > 1:
                raise ProviderDataError(f"a DataFrame's columns have different lengths {sorted(lengths)}")
            names = [name for name, _ in columns]
            # copy=False: the columns are this decoding's own (copies, or views of frames taken
            # once), so pandas need not copy them again; the names only where they repeat
            return pd.DataFrame(values, index=self.index(index, lengths.pop() if lengths else None),
                                columns=None if len(values) == len(names) else names, copy=False)
        if code == _FIGURE:
            from IPython.display import Image

            return Image(data=bytes(data), format="png")
        raise ProviderDataError(f"unknown codec extension type {code}")

    def array(self, payload: bytes) -> Any:
        import numpy as np

        (length,) = struct.unpack_from("<I", payload)
        dtype_text, shape = self.unpack(payload[4:4 + length])
        raw = memoryview(payload)[4 + length:]
        dtype, shape, size = self.dtype_and_shape(dtype_text, list(shape) if isinstance(shape, tuple) else shape)
        if size != len(raw):
            raise ProviderDataError(f"an array's {len(raw)} bytes do not fit its shape {shape} and dtype {dtype}")
        return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()  # the notebook's own, writable copy

    def dtype_and_shape(self, dtype_text: Any, shape: Any) -> tuple[Any, tuple[int, ...], int]:
        """An array's checked dtype and shape, and its size in bytes, charged to the
        budget; refused (before anything is allocated) for a dtype the codec does not
        carry, a bad shape, or more than the budget allows."""
        import numpy as np

        dtype = np.dtype(str(dtype_text))
        if dtype.kind not in ARRAY_KINDS or dtype.fields is not None or dtype.subdtype is not None:
            raise ProviderDataError(f"an array of dtype {dtype} does not travel in the codec")
        if not isinstance(shape, list):
            raise ProviderDataError("an array's shape is not a list")
        shape = tuple(int(n) for n in shape)
        count = 1
        for n in shape:
            if n < 0:
                raise ProviderDataError(f"an array has a negative dimension in its shape {shape}")
            count *= n
        self.charge(count * max(dtype.itemsize, 1))
        return dtype, shape, count * dtype.itemsize

    def take_frames(self, first: Any, count: Any) -> list[Any]:
        """Frames ``first`` to ``first + count - 1``, each taken once; refused when they
        are not there or were taken before."""
        if self.frames is None:
            raise ProviderDataError("codec bytes refer to a frame, but came as one piece")
        if type(first) is not int or type(count) is not int or first < 1 or count < 1 \
                or first + count > len(self.frames):
            raise ProviderDataError(f"a value refers to frames {first!r}+{count!r} of {len(self.frames) - 1}")
        wanted = set(range(first, first + count))
        if wanted & self.taken:
            raise ProviderDataError("two values refer to the same frame")
        self.taken |= wanted
        return list(self.frames[first:first + count])

    def framed_array(self, data: bytes) -> Any:
        """An array whose buffer is a frame: a view of it where the frames are the
        caller's own (:attr:`Frames.owned`), writable and aligned; else a copy."""
        import numpy as np

        described = self.unpack(data)
        if not isinstance(described, list) or len(described) != 3:
            raise ProviderDataError("an array's description is malformed")
        dtype, shape, size = self.dtype_and_shape(described[0], described[1])
        (frame,) = self.take_frames(described[2], 1)
        raw = memoryview(frame).cast("B") if memoryview(frame).format != "B" else memoryview(frame)
        if size != raw.nbytes:
            raise ProviderDataError(f"an array's {raw.nbytes} bytes do not fit its shape {shape} and dtype {dtype}")
        array = np.frombuffer(raw, dtype=dtype).reshape(shape)
        if self.frames.owned and array.flags.writeable and array.flags.aligned:
            return array  # the frame is the notebook's alone: no copy
        return array.copy()

    def nested_frames(self, data: bytes) -> Frames:
        """Codec data encoded inside this value (a result's output): its frames, as
        :class:`Frames` to decode later (owned where these are)."""
        described = self.unpack(data)
        if not isinstance(described, list):
            raise ProviderDataError("nested codec data is malformed")
        if self.frames is None:  # inside bytes: the frames themselves
            if not described or not all(isinstance(frame, bytes) for frame in described):
                raise ProviderDataError("nested codec data is malformed")
            return Frames(described)
        if len(described) != 2:
            raise ProviderDataError("nested codec data is malformed")
        nested = Frames(self.take_frames(*described))
        nested.owned = self.frames.owned
        return nested

    def index(self, payload: list[Any], length: int | None) -> Any:
        """A Series' or DataFrame's index; ``length``: its columns' (None: no columns)."""
        import pandas as pd

        if payload[0] == "range":
            _, start, stop, step, name = payload
            index = pd.RangeIndex(int(start), int(stop), int(step), name=name)
            if length is None:
                self.charge(8 * len(index))
        else:
            _, values, name = payload
            index = pd.Index(self.column_values(values), name=name)
        if length is not None and len(index) != length:
            raise ProviderDataError(f"an index of length {len(index):,} does not fit columns of length {length:,}")
        return index

    def column_values(self, payload: list[Any]) -> Any:
        import pandas as pd

        if payload[0] == "array":
            values = payload[1] if _is_array(payload[1]) else self.array(payload[1])
            if values.ndim != 1:
                raise ProviderDataError(f"a column's values are a {values.ndim}-dimensional array, not a 1-D one")
            return values
        _, dtype, packed = payload
        values = self.unpack(packed)
        if not isinstance(values, list):
            raise ProviderDataError("a column's values are not a list")
        return pd.array(values, dtype=dtype if dtype in _LIST_DTYPES else "object")


def _is_array(value: Any) -> bool:
    """Whether ``value`` is a decoded NumPy array (a frame's), not an array's bytes."""
    return type(value).__module__ == "numpy" and type(value).__name__ == "ndarray"


# -- messages --------------------------------------------------------------------------


def _type_name(value: Any) -> str:
    cls = type(value)
    return f"{cls.__module__}.{cls.__qualname__}".removeprefix("builtins.")


def _path_to(obj: Any, target: Any, path: str) -> str | None:
    """Where ``target`` sits inside ``obj`` (``["model"][2]``), for the refusal message."""
    if obj is target:
        return path
    if isinstance(obj, dict):
        for key, value in obj.items():
            found = _path_to(key, target, f"{path} (a key)") or _path_to(value, target, f"{path}[{key!r}]")
            if found is not None:
                return found
    elif isinstance(obj, (list, tuple)):
        for index, value in enumerate(obj):
            found = _path_to(value, target, f"{path}[{index}]")
            if found is not None:
                return found
    return None


def _refusal(name: str, obj: Any, exc: _Unsupported) -> UnsupportedResultError:
    return UnsupportedResultError(_unsupported_message(name, obj, exc.value, exc.reason), name=name,
                                  type_name=_type_name(exc.value))


def _unsupported_message(name: str, obj: Any, value: Any, reason: str) -> str:
    where = _path_to(obj, value, "") or ""
    inside = f" holds at {where} a {_type_name(value)}" if where else f" is a {_type_name(value)}"
    because = f" ({reason})" if reason else ""
    return (f"{name}{inside}{because}, which cannot come back from a provider this notebook does not trust: results "
            f"come back as data ({SUPPORTED}). Return its data instead (arrays, numbers, a dict of its parameters), "
            "or keep it on the worker; on a private network whose providers you trust, connect with "
            "--trust-providers (trust_providers=True) to bring back any object.")

