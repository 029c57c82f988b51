"""The allowlist of the safe unpickler: what each global a checkpoint may name becomes.

Every entry is a rebuilder written here that checks its arguments and builds plain data (a
container, a numpy array of exactly its bytes, a tensor *reference* checked against its storage);
nothing from the file is ever imported or called.  Classes outside the list become inert
`Placeholder`s; names whose only use in a pickle is to run code are refused.  The unpickler that
applies these rules, with its bounds, is `safe_pickle`; in its payload mode the array rebuilders
give `ArrayRef` handles instead of arrays, after the same checks.  (Slightly over 400 lines: every
rebuilder in one table, so that what a file may build is visible in one place.)
"""
from __future__ import annotations

import collections
import re
from typing import TYPE_CHECKING, Any, Callable, Dict, Tuple

from ..errors import UnreadableCheckpoint, UnsafeCheckpoint
from .dtypes import ITEM_SIZE, STORAGE_DTYPES
from .dtypes import STORAGE_OF as _STORAGE_OF  # numpy has no bfloat16: an array never names its row
from .handles import ArrayRef, ByteSwapped, FileBytes, InMemory, Latin1Text, StorageRef, TensorRef, contiguous_stride, extent

if TYPE_CHECKING:
    from .safe_pickle import SafeUnpickler

# Modules whose globals a checkpoint has no use for except running code: refused outright
# (the message names them), rather than read past as placeholders.
_CODE_MODULES = frozenset(
    "os posix nt subprocess builtins __builtin__ sys importlib pickle _pickle marshal types ctypes shutil socket code "
    "codeop runpy functools operator copyreg copy_reg codecs _codecs io _io pty webbrowser platform multiprocessing "
    "asyncio threading _thread signal pathlib tempfile glob inspect gc weakref site pydoc timeit cProfile "
    "profile pdb bdb zipimport pip setuptools distutils urllib http ftplib smtplib telnetlib xmlrpc ssl select "
    "selectors mmap resource fcntl posixpath ntpath genericpath sqlite3 dbm shelve zipfile tarfile".split()
)
# torch and numpy: their functions are refused (torch.load, numpy.load...), their classes read past.
_LIBRARIES_WITH_CODE = frozenset(("torch", "numpy"))
# torch names that are values, not code (a dtype in training arguments): read past like classes.
_TORCH_DATA = frozenset(("torch", n) for n in (
    "float32 float16 bfloat16 float64 int64 int32 int16 int8 uint8 bool complex64 complex128 float half double long int".split()))
_CLASS_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*(\.[A-Z][A-Za-z0-9_]*)*\Z")
_NUMPY_CODE = re.compile(r"(\?|[biufc](1|2|4|8|16))\Z")


class Placeholder:
    """An object of a class outside the allowlist, read past: only its dotted class name is kept."""

    __slots__ = ("cls",)

    def __init__(self, cls: str) -> None:
        self.cls = cls

    def __repr__(self) -> str:
        return f"<{self.cls} (read past, not built)>"

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, Placeholder) and other.cls == self.cls

    def __hash__(self) -> int:
        return hash(("placeholder", self.cls))


class StorageType:
    """A torch storage class named in a persistent id (e.g. FloatStorage); never torch's class."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    @property
    def dtype(self) -> str:
        return STORAGE_DTYPES[self.name]


class Payload:
    """A large byte string or str of the pickle left in the file (the unpickler's payload mode):
    where it is, and what it stands for: "bytes", "bytearray", "str" (a Python 2 string: its bytes
    as they are), "text" (a str, UTF-8 in the file: only ever `_codecs.encode`'s argument) or
    "latin1" (the bytes `_codecs.encode` makes of that text, each character one byte: pickle
    protocol 2's `bytes`; `nbytes` is then the text's length)."""

    __slots__ = ("location", "kind")

    def __init__(self, location: FileBytes, kind: str) -> None:
        self.location, self.kind = location, kind

    @property
    def nbytes(self) -> int:
        return self.location.nbytes

    @property
    def stands_for(self) -> str:
        return self.kind

    def __repr__(self) -> str:
        return f"<{self.kind} of {self.nbytes} bytes at offset {self.location.offset} (not read)>"


def _nbytes(data: Any) -> int:
    return data.nbytes if isinstance(data, Payload) else len(data)


class _Rebuilder:
    """An allowlisted global: calling it in the pickle runs `build(unpickler, args)` written here."""

    __slots__ = ("dotted", "build")

    def __init__(self, dotted: str, build: Callable[["SafeUnpickler", tuple], Any]) -> None:
        self.dotted, self.build = dotted, build


class _PendingDtype:
    """numpy.dtype(code, ...) before its BUILD sets the byte order."""

    def __init__(self, code: str) -> None:
        self.code, self.order = code, "="


class _PendingArray:
    """numpy's _reconstruct(ndarray, ...) before its BUILD supplies shape, dtype and bytes."""


def _corrupt(message: str) -> UnreadableCheckpoint:
    return UnreadableCheckpoint(message, "The file is corrupt or crafted; re-save the weights.")


def _refuse(dotted: str) -> UnsafeCheckpoint:
    return UnsafeCheckpoint(
        f"refusing to load: the file asks to build '{dotted}', which is not tensor data.",
        "Only checkpoints made of tensors, arrays and plain containers are read; "
        "re-save the weights with torch.save(model.state_dict()).",
    )


# ---------------------------------------------------------------- rebuilders (the allowlist)


def _ints(value: Any, what: str) -> Tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    if not isinstance(value, (tuple, list)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise _corrupt(f"{what} is not a tuple of integers ({type(value).__name__}).")
    return tuple(value)


def _count(shape: Tuple[int, ...], limit: int, what: str) -> int:
    """Elements of `shape`, refusing negative sizes and products beyond `limit` (no overflow).
    A zero anywhere makes it empty, however large the dimensions before it (a zero-width stage)."""
    if any(d < 0 for d in shape):
        raise _corrupt(f"{what} has a negative size {list(shape)}.")
    if 0 in shape:
        return 0
    n = 1
    for d in shape:
        n *= d
        if n > limit:
            raise _corrupt(f"{what} of shape {list(shape)} is larger than its data.")
    return n


def _np() -> Any:
    import numpy as np  # only files holding arrays need numpy

    return np


def _dtype(value: Any, what: str) -> Any:
    """A numpy dtype from a pickled dtype or its string spelling: plain numbers only."""
    np = _np()
    if isinstance(value, _PendingDtype):
        code, order = value.code, value.order
    elif isinstance(value, np.dtype):  # built by this unpickler (a dtype's BUILD) and shared
        order, code = value.str[0], value.str[1:]
    elif isinstance(value, str) and len(value) <= 5:
        order, code = (value[0], value[1:]) if value[:1] in "<>|=" else ("=", value)
    else:
        raise _corrupt(f"{what} has no plain numeric dtype ({type(value).__name__}).")
    if not _NUMPY_CODE.match(code) or order not in "<>|=":
        raise _corrupt(f"{what} has dtype {order}{code}, which is not plain numeric data.")
    dt = np.dtype(code)
    return dt.newbyteorder(order) if order in "<>" and dt.itemsize > 1 else dt


def _array_from(u: "SafeUnpickler", data: Any, dtype: Any, shape: Any, fortran: bool, what: str) -> Any:
    """An array of exactly `data`'s bytes (a copy, writable), or a refusal naming what is wrong.
    In payload mode an `ArrayRef` over the same bytes instead, after the same checks."""
    dt = _dtype(dtype, what)
    shape = _ints(shape, f"{what}'s shape")
    if isinstance(data, str):  # a Python 2 pickle's string (read as latin-1): its bytes, as numpy reads it
        data = data.encode("latin1")
    if not isinstance(data, (bytes, bytearray, Payload)):
        raise _corrupt(f"{what} ({dt.str}, shape {list(shape)}) has no data of its own (no buffer).")
    nbytes = _nbytes(data)
    count = _count(shape, nbytes, what)
    if isinstance(data, Payload) and data.kind == "latin1":
        # Text of N characters below 256 takes N to 2N bytes of UTF-8: the exact count is checked
        # when the text is decoded (io.tensor_bytes.read_latin1_text), here only that it can fit.
        fits = count * dt.itemsize <= nbytes <= 2 * count * dt.itemsize
    else:
        fits = nbytes == count * dt.itemsize
    if not fits:
        raise _corrupt(f"{what} ({dt.str}, shape {list(shape)}) needs {count * dt.itemsize} bytes, its data has {nbytes}.")
    u.spend(nbytes)
    if not dt.isnative:  # torch takes native byte order only: same values, swapped once here
        u.spend(nbytes)
    if u.skip_payloads:
        return _array_ref(u, data, dt, shape, fortran)
    buffer = data if isinstance(data, bytearray) else bytearray(data)
    array = _np().frombuffer(buffer, dt).reshape(shape, order="F" if fortran else "C")
    return array if dt.isnative else array.astype(dt.newbyteorder("="))


def _array_ref(u: "SafeUnpickler", data: Any, dt: Any, shape: Tuple[int, ...], fortran: bool) -> ArrayRef:
    """A checked array as a handle: a large payload stays in the file (`FileBytes`; `Latin1Text`
    when protocol 2 spelled it as text; `ByteSwapped` in the other byte order); small data (and
    text in the other byte order) is held in memory, in native order."""
    count = 1
    for d in shape:
        count *= d
    if isinstance(data, Payload) and dt.isnative and data.kind == "latin1":
        location: Any = Latin1Text(data.location.offset, data.location.nbytes, count * dt.itemsize)
    elif isinstance(data, Payload) and dt.isnative:
        location = data.location
    elif isinstance(data, Payload) and data.kind != "latin1":  # the other byte order: swapped when read
        location = ByteSwapped(data.location.offset, data.location.nbytes, dt.str)
    else:
        raw = u.payload_bytes(data) if isinstance(data, Payload) else bytes(data)
        if not dt.isnative:
            raw = _np().frombuffer(raw, dt).astype(dt.newbyteorder("=")).tobytes()
        location = InMemory(raw)
    native = dt.newbyteorder("=") if not dt.isnative else dt
    name = native.name  # computed by numpy in Python: once
    storage = StorageRef(u.add_storage(location), _STORAGE_OF.get(name, name), count)
    stride = tuple(reversed(contiguous_stride(tuple(reversed(shape))))) if fortran else contiguous_stride(shape)
    return ArrayRef(storage, 0, shape, stride, array_dtype=native.str, array_name=name)


def _ndarray(u: "SafeUnpickler", args: tuple) -> Any:
    """numpy.ndarray(shape, dtype, buffer): how Detectron2's model-zoo .pkl spells arrays."""
    if len(args) != 3:
        raise _corrupt(f"an array (numpy.ndarray with {len(args)} arguments) has no data of its own (no buffer).")
    return _array_from(u, args[2], args[1], args[0], False, "an array")


def _reconstruct(u: "SafeUnpickler", args: tuple) -> Any:
    """numpy's own array pickles: _reconstruct(ndarray, (0,), b'b'), then BUILD with the data."""
    if not args or args[0] is not _NDARRAY:
        raise _corrupt("numpy _reconstruct called for something other than an array.")
    return _PendingArray()


def _build_array(u: "SafeUnpickler", state: Any) -> Any:
    if not isinstance(state, tuple) or len(state) not in (4, 5):
        raise _corrupt("a numpy array's state is malformed.")
    version, shape, dtype, fortran, data = state if len(state) == 5 else (1,) + state
    if version not in (0, 1):  # numpy itself reads no other (its __setstate__ raises ValueError)
        raise _corrupt(f"a numpy array's state has version {version!r}; numpy writes and reads only 0 and 1.")
    return _array_from(u, data, dtype, shape, bool(fortran), "an array")


def _frombuffer(u: "SafeUnpickler", args: tuple) -> Any:
    """numpy's protocol-5 spelling: _frombuffer(buffer, dtype, shape, order)."""
    if len(args) != 4:
        raise _corrupt("numpy _frombuffer with the wrong arguments.")
    data = bytes(args[0]) if isinstance(args[0], memoryview) else args[0]
    return _array_from(u, data, args[1], args[2], args[3] == "F", "an array")


def _np_dtype(u: "SafeUnpickler", args: tuple) -> Any:
    if not args or not isinstance(args[0], str):
        raise _corrupt("numpy.dtype without a type code.")
    return _PendingDtype(args[0])


def _scalar(u: "SafeUnpickler", args: tuple) -> Any:
    """numpy.core.multiarray.scalar(dtype, bytes): a numpy number (epochs, metrics)."""
    if len(args) != 2 or not isinstance(args[1], (bytes, bytearray, Payload)):
        raise _corrupt("a numpy scalar without its bytes.")
    dt = _dtype(args[0], "a numpy scalar")
    if _nbytes(args[1]) != dt.itemsize:  # a payload is never a scalar's few bytes
        raise _corrupt(f"a numpy scalar ({dt.str}) has {_nbytes(args[1])} bytes.")
    return _np().frombuffer(bytes(args[1]), dt)[0]


def _ordered_dict(u: "SafeUnpickler", args: tuple) -> Any:
    if args not in ((), ([],)) and not (len(args) == 1 and isinstance(args[0], list)):
        raise _corrupt("OrderedDict built from something other than pairs.")
    out = collections.OrderedDict()
    for pair in args[0] if args else ():
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise _corrupt("OrderedDict built from something other than pairs.")
        out[pair[0]] = pair[1]
    return out


def _bytearray(u: "SafeUnpickler", args: tuple) -> Any:
    """bytearray(bytes) or bytearray(str, 'latin-1') only: bytearray(N) would build N bytes from nothing."""
    if args == ():
        return bytearray()
    data = _latin1(args) if len(args) == 2 else args[0] if len(args) == 1 else None
    if not isinstance(data, (bytes, bytearray, Payload)):
        raise _corrupt(f"bytearray({type(args[0]).__name__ if args else ''}) would build bytes the file does not hold.")
    u.spend(_nbytes(data))
    if isinstance(data, Payload) and data.kind == "latin1":  # spelled as text: the bytes, decoded now
        return bytearray(u.payload_bytes(data))
    return Payload(data.location, "bytearray") if isinstance(data, Payload) else bytearray(data)


def _empty_bytes(u: "SafeUnpickler", args: tuple) -> Any:
    """bytes(): how protocol 2 spells b'' (an empty array's data); bytes(N) would build N bytes from nothing."""
    if args != ():
        raise _refuse("builtins.bytes")
    return b""


def _latin1(args: tuple) -> Any:
    if len(args) == 2 and args[1] in ("latin1", "latin-1"):
        if isinstance(args[0], str):
            return args[0].encode("latin1")
        if isinstance(args[0], Payload) and args[0].kind == "str":  # a Python 2 string left in the file
            return Payload(args[0].location, "bytes")
        if isinstance(args[0], Payload) and args[0].kind == "text":  # protocol 2's bytes in Python 3
            return Payload(args[0].location, "latin1")
    return None


def _encode(u: "SafeUnpickler", args: tuple) -> Any:
    """_codecs.encode(str, 'latin1'): how protocol 2 spells bytes; any other codec is refused."""
    data = _latin1(args)
    if data is None:
        raise _corrupt("_codecs.encode with a codec other than latin1 (a codec chain builds data out of proportion).")
    u.spend(_nbytes(data))
    return data


# The one `_codecs.encode` global: the unpickler leaves a long str in the file only as its argument.
CODECS_ENCODE = _Rebuilder("_codecs.encode", _encode)


def _set(kind: type) -> Callable[["SafeUnpickler", tuple], Any]:
    def build(u: "SafeUnpickler", args: tuple) -> Any:
        if args and not (len(args) == 1 and isinstance(args[0], (list, tuple))):
            raise _corrupt(f"{kind.__name__} built from something other than a list.")
        return kind(args[0]) if args else kind()

    return build


def _reconstructor(u: "SafeUnpickler", args: tuple) -> Any:
    """copyreg._reconstructor(cls, base, state): protocol 0/1 objects; only a placeholder comes out."""
    if len(args) == 3 and isinstance(args[0], Placeholder):
        return u.placeholder(args[0].cls)
    raise _refuse("copyreg._reconstructor")


def _getattr(u: "SafeUnpickler", args: tuple) -> Any:
    """getattr(cls, name): how a method reference pickles (mmengine's HistoryBuffer keeps its
    statistics methods so).  Only on a placeholder, giving another: getattr on anything real is the
    classic way to reach os.system, and is refused."""
    if len(args) == 2 and isinstance(args[0], Placeholder) and isinstance(args[1], str) and _CLASS_NAME.match(args[1]) and "__" not in args[1]:
        return u.placeholder(f"{args[0].cls}.{args[1]}")
    raise _refuse("builtins.getattr")


def _rebuild_tensor(u: "SafeUnpickler", args: tuple) -> Any:
    """torch._utils._rebuild_tensor(_v2)(storage, offset, size, stride, ...): a reference, checked
    to lie inside its storage (otherwise torch would grow the storage with uninitialised memory).
    The storage's bytes are spent once per storage, not per view (`SafeUnpickler.spend_storage`)."""
    if len(args) < 4:
        raise _corrupt("a tensor rebuild with too few arguments.")
    storage, offset, size, stride = args[:4]
    if isinstance(storage, tuple) and len(storage) == 3 and isinstance(storage[0], StorageRef):  # legacy view
        storage, base, view_numel = storage
    else:
        base, view_numel = 0, getattr(storage, "numel", 0)
    if not isinstance(storage, StorageRef) or not isinstance(offset, int):
        raise _corrupt("a tensor refers to something other than a storage.")
    size, stride = _ints(size, "a tensor's size"), _ints(stride, "a tensor's stride")
    _count(size, 1 << 62, "a tensor")
    if offset < 0 or len(size) != len(stride) or any(st < 0 for st in stride) or extent(offset, size, stride) > view_numel:
        raise _corrupt(f"a tensor (shape {list(size)}, offset {offset}) reaches past its storage of {view_numel} elements.")
    hooks = args[5] if len(args) > 5 else None
    if hooks not in (None, {}) and not (isinstance(hooks, dict) and not hooks):
        raise _corrupt("a tensor carries backward hooks.")
    u.spend_storage(storage.key, storage.numel * ITEM_SIZE[STORAGE_DTYPES[storage.storage_type]])
    return TensorRef(StorageRef(storage.key, storage.storage_type, storage.numel), base + offset, size, stride)


def _rebuild_parameter(u: "SafeUnpickler", args: tuple) -> Any:
    if not args or not isinstance(args[0], TensorRef):
        raise _corrupt("a parameter that holds no tensor.")
    return args[0]


def _load_from_bytes(u: "SafeUnpickler", args: tuple) -> Any:
    if u.load_from_bytes is None or len(args) != 1 or not (isinstance(args[0], bytes) or (isinstance(args[0], Payload) and args[0].kind in ("bytes", "latin1"))):
        raise _refuse("torch.storage._load_from_bytes")
    # A payload of raw bytes goes as it is (the caller reads it from the file, counted); one
    # spelled as text, decoded.
    data = args[0]
    return u.load_from_bytes(u.payload_bytes(data) if isinstance(data, Payload) and data.kind == "latin1" else data)


_NDARRAY = _Rebuilder("numpy.ndarray", _ndarray)
_ALLOWED: Dict[Tuple[str, str], _Rebuilder] = {
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _Rebuilder("numpy.dtype", _np_dtype),
    ("collections", "OrderedDict"): _Rebuilder("collections.OrderedDict", _ordered_dict),
    ("builtins", "bytearray"): _Rebuilder("builtins.bytearray", _bytearray),
    ("builtins", "bytes"): _Rebuilder("builtins.bytes", _empty_bytes),
    ("builtins", "set"): _Rebuilder("builtins.set", _set(set)),
    ("builtins", "frozenset"): _Rebuilder("builtins.frozenset", _set(frozenset)),
    ("_codecs", "encode"): CODECS_ENCODE,
    ("copyreg", "_reconstructor"): _Rebuilder("copyreg._reconstructor", _reconstructor),
    ("builtins", "getattr"): _Rebuilder("builtins.getattr", _getattr),
    ("builtins", "object"): _Rebuilder("builtins.object", lambda u, a: u.placeholder("builtins.object")),
    ("torch._utils", "_rebuild_tensor_v2"): _Rebuilder("torch._utils._rebuild_tensor_v2", _rebuild_tensor),
    ("torch._utils", "_rebuild_tensor"): _Rebuilder("torch._utils._rebuild_tensor", _rebuild_tensor),
    ("torch._utils", "_rebuild_parameter"): _Rebuilder("torch._utils._rebuild_parameter", _rebuild_parameter),
    ("torch.storage", "_load_from_bytes"): _Rebuilder("torch.storage._load_from_bytes", _load_from_bytes),
}
# numpy 2 moved numpy.core to numpy._core; files carry either spelling, and both read under either numpy.
for _core in ("numpy.core", "numpy._core"):
    _ALLOWED[(f"{_core}.multiarray", "_reconstruct")] = _Rebuilder(f"{_core}.multiarray._reconstruct", _reconstruct)
    _ALLOWED[(f"{_core}.multiarray", "scalar")] = _Rebuilder(f"{_core}.multiarray.scalar", _scalar)
    _ALLOWED[(f"{_core}.numeric", "_frombuffer")] = _Rebuilder(f"{_core}.numeric._frombuffer", _frombuffer)
_BUILDERS = {_PendingArray: _build_array}


def resolve(u: "SafeUnpickler", module: str, name: str) -> Any:
    """What the global `module.name` becomes: a rebuilder, a storage type, a placeholder, or a refusal."""
    dotted = f"{module}.{name}"
    if (module, name) in _ALLOWED:
        return _ALLOWED[(module, name)]
    if module == "torch" and name in STORAGE_DTYPES:
        return StorageType(name)
    root = module.split(".", 1)[0]
    function = root in _LIBRARIES_WITH_CODE and not name[:1].isupper() and (module, name) not in _TORCH_DATA
    if root in _CODE_MODULES or function or not _CLASS_NAME.match(name) or "__" in dotted:
        raise _refuse(dotted)
    return u.placeholder(dotted)

