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

    >>> import numpy as np
    >>> from gpunet import codec
    >>> codec.decode(codec.encode({"x": np.arange(3), "label": ("a", 1)}))
    {'x': array([0, 1, 2]), 'label': ('a', 1)}
"""

from __future__ import annotations

import hashlib
import re
import struct
from typing import Any

import msgpack

from gpunet.errors import ProviderDataError, UnsupportedResultError
from gpunet.wire import PICKLE, pickle_value, unpickle_value

# msgpack extension type codes
_TUPLE, _BIGINT, _COMPLEX, _NDARRAY, _NPSCALAR, _SERIES, _DATAFRAME, _FIGURE = range(1, 9)

#: NumPy dtype kinds the codec carries: bool, int, uint, float, complex, bytes, str,
#: timedelta64, datetime64 (never "O" objects or "V" structured records).
ARRAY_KINDS = frozenset("biufcSUmM")

SUPPORTED = ("None, bool, int, float, complex, str, bytes; lists, tuples and dicts of them; NumPy or JAX arrays "
             "of numbers, bools, strings or datetimes; pandas Series/DataFrames of such columns; matplotlib figures")


def encode(obj: Any, *, name: str = "the result") -> memoryview:
    """``obj`` as codec bytes (a read-only view of the packer's own buffer: no copy of
    a large result); :class:`UnsupportedResultError` naming ``name`` (e.g. "output
    'model'") and the first value inside it the codec cannot carry."""
    try:
        packer = msgpack.Packer(default=_default, use_bin_type=True, strict_types=True, autoreset=False,
                                buf_size=256 * 1024 + _large_bytes(obj))
        packer.pack(obj)
        return packer.getbuffer().toreadonly()
    except _Unsupported as exc:
        raise UnsupportedResultError(_unsupported_message(name, obj, exc.value, exc.reason),
                                     name=name, type_name=_type_name(exc.value)) from None


def decode(data: bytes | bytearray | memoryview, *, max_bytes: int | None = None, what: str = "a result") -> Any:
    """The value :func:`encode` made of ``data``. Never runs code: malformed or
    hostile input, or input over ``max_bytes``, raises :class:`ProviderDataError`."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProviderDataError(f"{what} came back as {_type_name(data)}, not as codec bytes; it was not loaded")
    if max_bytes is not None and len(data) > max_bytes:
        raise ProviderDataError(f"{what} is {len(data):,} bytes, over its cap of {max_bytes:,} bytes; it was not "
                                "loaded (raise the cap with --max-result-bytes, or return less)")
    size = max_bytes if max_bytes is not None else len(data)
    try:
        return _Decoder(size + DECODE_SLACK_BYTES, SLOT_BYTES * size + DECODE_SLACK_BYTES).unpack(data)
    except ProviderDataError as exc:
        raise ProviderDataError(f"{what} could not be decoded ({exc}); it was not loaded") from None
    except Exception as exc:  # noqa: BLE001 - anything a stranger's bytes can make msgpack or NumPy raise
        raise ProviderDataError(f"{what} could not be decoded ({type(exc).__name__}: {exc}); it was not loaded") from None


def dump(value: Any, result_format: str, *, name: str) -> Any:
    """``value`` as it travels back in ``result_format``: codec bytes (:func:`encode`),
    or where the notebook trusts its providers (``PICKLE``) pickled once, its large
    buffers kept apart to travel as Dask frames (:func:`gpunet.wire.pickle_value`)."""
    if result_format == PICKLE:
        return pickle_value(value)
    return encode(value, name=name)


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


def _pack(obj: Any) -> bytes:
    # strict_types: a tuple, an int or float subclass (NumPy scalars) reaches _default.
    # A buffer sized for the large values up front: growing it copies them again.
    return msgpack.packb(obj, default=_default, use_bin_type=True, strict_types=True,
                         buf_size=256 * 1024 + _large_bytes(obj))


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


def _default(obj: Any) -> Any:
    """msgpack's hook for what it does not carry natively."""
    if isinstance(obj, tuple):
        return msgpack.ExtType(_TUPLE, _pack(list(obj)))
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
            return msgpack.ExtType(_NDARRAY, _array_payload(obj))
        if isinstance(obj, np.generic):
            return msgpack.ExtType(_NPSCALAR, _array_payload(np.asarray(obj)))
    if module in ("jax", "jaxlib") and hasattr(obj, "__array__"):
        import numpy as np

        return msgpack.ExtType(_NDARRAY, _array_payload(np.asarray(obj)))
    if module == "pandas":
        import pandas as pd

        if isinstance(obj, pd.Series):
            return msgpack.ExtType(_SERIES, _pack([obj.name, _index_payload(obj.index), _column(obj)]))
        if isinstance(obj, pd.DataFrame):
            if not all(isinstance(column, (str, int)) for column in obj.columns):
                raise _Unsupported(obj, "its column names must be strings or integers")
            columns = [(column, _column(obj[column] if obj.columns.is_unique else obj.iloc[:, i]))
                       for i, column in enumerate(obj.columns)]
            return msgpack.ExtType(_DATAFRAME, _pack([_index_payload(obj.index), columns]))
    if module == "matplotlib" and type(obj).__name__ == "Figure":
        import io

        buffer = io.BytesIO()
        obj.savefig(buffer, format="png", bbox_inches="tight")
        return msgpack.ExtType(_FIGURE, buffer.getvalue())
    raise _Unsupported(obj)


def _array_payload(array: Any) -> bytes:
    import numpy as np

    if array.dtype.kind not in ARRAY_KINDS or array.dtype.fields is not None:
        raise _Unsupported(array, f"its dtype {array.dtype} is not one of numbers, bools, strings or datetimes")
    contiguous = array if array.flags.c_contiguous else np.array(array, order="C")  # keeps 0-d arrays 0-d
    # header length, header, raw buffer: joined in one allocation, and read back without copying the buffer
    header = _pack([contiguous.dtype.str, list(contiguous.shape)])
    return b"".join([struct.pack("<I", len(header)), header, memoryview(contiguous.reshape(-1).view(np.uint8))])


#: pandas dtypes a column of Python values comes back as (anything else: object)
_LIST_DTYPES = ("str", "string", "object", "category")


def _column(series: Any) -> list[Any]:
    """A pandas column: an array payload, or (object, string and categorical columns)
    its values as a list of what the codec carries."""
    values = series.to_numpy()
    if values.dtype.kind != "O":
        return ["array", _array_payload(values)]
    try:
        return ["list", str(series.dtype), _pack(series.tolist())]
    except _Unsupported as exc:
        raise _Unsupported(series, f"its column {series.name!r} ({series.dtype}) holds a "
                                   f"{_type_name(exc.value)}") from None


def _index_payload(index: Any) -> Any:
    import pandas as pd

    if isinstance(index, pd.RangeIndex):
        return ["range", index.start, index.stop, index.step, index.name]
    if isinstance(index, pd.MultiIndex):
        raise _Unsupported(index, "a MultiIndex does not travel; reset_index() first")
    return ["values", _column(index.to_series()), index.name]


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


def unpack_plain(data: bytes | bytearray | memoryview, *, budget: int) -> Any:
    """msgpack ``data`` as plain Python data (no codec extension decoded), its lists and
    maps charged against ``budget`` bytes (:data:`CONTAINER_BYTES`, :data:`SLOT_BYTES`):
    :class:`ProviderDataError` past it, before much of it is built."""
    try:
        return _Decoder(0, budget, extensions=False).unpack(data)
    except ValueError as exc:  # msgpack's own refusal of a list or map longer than the budget allows
        if "exceeds max_" not in str(exc):
            raise
        raise ProviderDataError("its lists and maps would take more memory than its size allows") from None


class _Decoder:
    """One :func:`decode`: counts how deep extension values nest and charges what the
    decoded arrays and indexes take against a byte budget, so neither a deep nest nor
    a small payload that expands (a 0-d column under a huge RangeIndex, an array of
    zero-size items) can crash the notebook or exhaust its memory."""

    def __init__(self, budget: int, containers: int, *, extensions: bool = True) -> None:
        self.depth = 0
        self.budget = budget
        #: what lists and maps may still take (see CONTAINER_BYTES)
        self.containers = containers
        self.extensions = extensions

    def unpack(self, data: bytes) -> Any:
        self.depth += 1
        try:
            if self.depth > MAX_EXT_DEPTH:
                raise ProviderDataError(f"values nest more than {MAX_EXT_DEPTH} tuples, arrays or frames deep")
            slots = max(self.containers, 0) // SLOT_BYTES  # a longer list or map is refused before it is made
            return msgpack.unpackb(data, ext_hook=self.ext_hook if self.extensions else msgpack.ExtType, raw=False,
                                   strict_map_key=False, use_list=True, list_hook=self.container,
                                   object_hook=self.container, max_array_len=slots, max_map_len=slots // 2)
        finally:
            self.depth -= 1

    def container(self, value: Any) -> Any:
        """Charge a decoded list or map (msgpack's hook) and return it."""
        self.containers -= CONTAINER_BYTES + SLOT_BYTES * len(value) * (2 if isinstance(value, dict) else 1)
        if self.containers < 0:
            raise ProviderDataError("its lists and maps would take more memory than its size allows")
        return value

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
            return pd.DataFrame(values, index=self.index(index, lengths.pop() if lengths else None),
                                columns=[name for name, _ in columns])
        if code == _FIGURE:
            from IPython.display import Image

            return Image(data=bytes(data), format="png")
        raise ProviderDataError(f"unknown codec extension type {code}")

    def array(self, payload: bytes) -> Any:
        import numpy as np

        (length,) = struct.unpack_from("<I", payload)
        dtype_text, shape = self.unpack(payload[4:4 + length])
        raw = memoryview(payload)[4 + length:]
        dtype = np.dtype(str(dtype_text))
        if dtype.kind not in ARRAY_KINDS or dtype.fields is not None or dtype.subdtype is not None:
            raise ProviderDataError(f"an array of dtype {dtype} does not travel in the codec")
        shape = tuple(int(n) for n in shape)
        count = 1
        for n in shape:
            if n < 0:
                raise ProviderDataError(f"an array has a negative dimension in its shape {shape}")
            count *= n
        if count * dtype.itemsize != len(raw):
            raise ProviderDataError(f"an array's {len(raw)} bytes do not fit its shape {shape} and dtype {dtype}")
        self.charge(count * max(dtype.itemsize, 1))
        return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()  # the notebook's own, writable copy

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
            values = self.array(payload[1])
            if values.ndim != 1:
                raise ProviderDataError(f"a column's values are a {values.ndim}-dimensional array, not a 1-D one")
            return values
        _, dtype, packed = payload
        values = self.unpack(packed)
        if not isinstance(values, list):
            raise ProviderDataError("a column's values are not a list")
        return pd.array(values, dtype=dtype if dtype in _LIST_DTYPES else "object")


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


def _unsupported_message(name: str, obj: Any, value: Any, reason: str) -> str:
    where = _path_to(obj, value, "") or ""
    inside = f" holds at {where} a {_type_name(value)}" if where else f" is a {_type_name(value)}"
    because = f" ({reason})" if reason else ""
    return (f"{name}{inside}{because}, which cannot come back from a provider this notebook does not trust: results "
            f"come back as data ({SUPPORTED}). Return its data instead (arrays, numbers, a dict of its parameters), "
            "or keep it on the worker; on a private network whose providers you trust, connect with "
            "--trust-providers (trust_providers=True) to bring back any object.")

