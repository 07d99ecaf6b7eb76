"""Unpickling a frame's message with an allow-list: each side of the engine boundary
names the classes it accepts (the HTTP side never unpickles torch objects), and a
class outside the list is refused, not imported."""

from __future__ import annotations

import builtins
import io
import pickle
from collections.abc import Callable, Iterable

Allow = Callable[[str, str], bool]


# -- unpickling with an allow-list -------------------------------------------------------


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, *, buffers: Iterable[object], allow: Allow) -> None:
        super().__init__(file, buffers=buffers)
        self._allow = allow

    def find_class(self, module: str, name: str, /) -> object:
        # Dunder steps (``X.__init__.__globals__``) reach past any class, whatever the policy.
        if any(part.startswith("__") for part in name.split(".")) or not self._allow(module, name):
            raise pickle.UnpicklingError(f"refused to unpickle {module}.{name}: not on the allow-list")
        return super().find_class(module, name)


def loads(meta: bytes | bytearray | memoryview, buffers: Iterable[object], *, allow: Allow) -> object:
    """Unpickle ``meta`` with its out-of-band ``buffers``, importing only the globals
    ``allow(module, name)`` admits; anything else raises ``pickle.UnpicklingError``
    naming ``module.name`` (as do trailing bytes after the pickle)."""
    size = memoryview(meta).nbytes
    file = io.BytesIO(meta)
    msg = _Unpickler(file, buffers=buffers, allow=allow).load()
    if file.tell() != size:
        raise pickle.UnpicklingError(f"{size - file.tell()} trailing bytes after the pickle")
    return msg


_SAFE_BUILTINS = frozenset(
    {
        "bool", "int", "float", "complex", "str", "bytes", "bytearray",
        "list", "tuple", "dict", "set", "frozenset", "slice", "range",
        "Ellipsis", "NotImplemented",
    }
) | frozenset(n for n, v in vars(builtins).items() if isinstance(v, type) and issubclass(v, BaseException))  # fmt: skip
_NUMPY_PRIVATE = frozenset(
    (m, n)
    for core in ("numpy._core", "numpy.core")  # numpy 2 and numpy 1 senders
    for m, n in (
        (f"{core}.numeric", "_frombuffer"),  # protocol 5 arrays (out of band or in-band)
        (f"{core}.multiarray", "_reconstruct"),  # non-contiguous arrays, older protocols
        (f"{core}.multiarray", "scalar"),  # numpy scalars (np.float64(1.5))
    )
)
_NUMPY_TYPES = frozenset(
    {
        "ndarray", "dtype", "bool", "bool_", "int8", "int16", "int32", "int64",
        "uint8", "uint16", "uint32", "uint64", "float16", "float32", "float64",
        "complex64", "complex128", "str_", "bytes_", "datetime64", "timedelta64",
    }
)  # fmt: skip
_STDLIB: dict[str, frozenset[str]] = {
    "datetime": frozenset({"date", "datetime", "time", "timedelta", "timezone"}),
    "zoneinfo": frozenset({"ZoneInfo._unpickle"}),
    "collections": frozenset({"OrderedDict", "defaultdict", "deque", "Counter"}),
    "decimal": frozenset({"Decimal"}),
    "uuid": frozenset({"UUID", "SafeUUID"}),
}
# A pydantic model pickles as its own class plus builtins; its field types may add these.
_PYDANTIC: dict[str, frozenset[str] | None] = {
    "pydantic.networks": None,  # AnyUrl and friends (None: any public name)
    "pydantic_core._pydantic_core": frozenset({"Url", "MultiHostUrl"}),
}
HTTP_SIDE_PREFIXES = ("spectralmc_server.ipc", "spectralmc_server.pricing")
ENGINE_SIDE_PREFIXES = ("spectralmc_server",)


def _under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _plain(module: str, name: str) -> bool:
    """Builtins, numpy arrays / dtypes / scalars, datetimes, collections, pydantic field types."""
    if module == "builtins":
        return name in _SAFE_BUILTINS
    if module == "numpy":
        return name in _NUMPY_TYPES
    if module == "numpy.dtypes":
        return not name.startswith("_")
    if (module, name) in _NUMPY_PRIVATE:
        return True
    names = _STDLIB.get(module)
    if names is not None:
        return name in names
    if module in _PYDANTIC:
        public = _PYDANTIC[module]
        return not name.startswith("_") if public is None else name in public
    return False


def http_side_allow(module: str, name: str) -> bool:
    """The HTTP process's policy: plain data plus ``spectralmc_server.ipc`` and
    ``.pricing`` (engine_service/protocol.py adds the message modules); never torch (nor
    any module whose name starts with "torch"), never ``spectralmc_server.engine``. An
    admitted module is imported on first use, so the message classes' modules must not
    import torch themselves."""
    if module.startswith("torch"):
        return False
    return _plain(module, name) or _under(module, HTTP_SIDE_PREFIXES)


def engine_side_allow(module: str, name: str) -> bool:
    """The engine process's policy: plain data plus any ``spectralmc_server`` class."""
    return _plain(module, name) or _under(module, ENGINE_SIDE_PREFIXES)
