"""The allowlist of the safe unpickler: what each global a checkpoint may name becomes.

Every entry is a rebuilder written here that checks its arguments and builds plain data (a
container, a numpy array of exactly its bytes, a tensor *reference* checked against its storage);
nothing from the file is ever imported or called.  Classes outside the list become inert
`Placeholder`s; names whose only use in a pickle is to run code are refused.  `safe_pickle` applies
these rules with its bounds (it imports this module, not the other way: `Unpickling` is what a
rebuilder may ask of it); in its payload mode arrays become `ArrayRef` handles, after the same checks."""
from __future__ import annotations

import collections
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Protocol, Tuple

from ..errors import UnreadableCheckpoint, UnsafeCheckpoint
from .dtypes import ITEM_SIZE, STORAGE_DTYPES
from .dtypes import STORAGE_OF as _STORAGE_OF  # numpy has no bfloat16: an array never names its row
from .handles import ArrayRef, FileBytes, InMemory, Location, StorageRef, TensorRef, contiguous_stride, extent, numel

# Modules whose globals a checkpoint has no use for except running code: refused outright
# (the message names them), rather than read past as placeholders.  Python 2 spellings included.
_CODE_MODULES = frozenset(
    "os posix nt subprocess builtins __builtin__ sys importlib pickle _pickle cPickle marshal types ctypes shutil socket code "
    "codeop runpy functools operator copyreg copy_reg codecs _codecs io _io pty webbrowser platform multiprocessing asyncio "
    "threading _thread thread commands signal pathlib tempfile glob inspect gc weakref site pydoc timeit cProfile profile pdb "
    "bdb zipimport pip setuptools distutils urllib http ftplib smtplib telnetlib xmlrpc ssl select selectors mmap resource "
    "fcntl posixpath ntpath genericpath sqlite3 dbm shelve zipfile tarfile".split()
)
# torch and numpy: their functions are refused (torch.load, numpy.load...), their classes read past.
_LIBRARIES_WITH_CODE = frozenset(("torch", "numpy"))
# torch names that are values, not code (a dtype in training arguments): read past like classes.
_TORCH_DATA = frozenset(("torch", n) for n in (
    "float32 float16 bfloat16 float64 int64 int32 int16 int8 uint8 bool complex64 complex128 float half double long int".split()))
_CLASS_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*(\.[A-Z][A-Za-z0-9_]*)*\Z")
_NUMPY_CODE = re.compile(r"(\?|[biufc](1|2|4|8|16))\Z")
# What a refused file can do instead (the hint of every refusal of what no checkpoint needs).
ONLY_DATA = "Only checkpoints made of tensors, arrays and plain containers are read; re-save the weights"


@dataclass(frozen=True)
class Placeholder:
    """An object of a class outside the allowlist, read past: only its dotted class name is kept."""

    cls: str

    def __repr__(self) -> str:
        return f"<{self.cls} (read past, not built)>"


@dataclass(frozen=True)
class StorageType:
    """A torch storage class named in a persistent id (e.g. FloatStorage); never torch's class."""

    name: str


@dataclass(frozen=True)
class Payload:
    """A large byte string of the pickle left in the file (the unpickler's payload mode): where it
    is, and what it stands for: "bytes", "bytearray" or "str" (a Python 2 string: its bytes as they are)."""

    location: FileBytes
    stands_for: str

    def __len__(self) -> int:  # the length of the byte string it stands for
        return self.location.nbytes

    def __repr__(self) -> str:
        return f"<{self.stands_for} of {len(self)} bytes at offset {self.location.offset} (not read)>"


class Unpickling(Protocol):
    """What a rebuilder may ask of the unpickler running it (`safe_pickle.SafeUnpickler`)."""

    skip_payloads: bool  # payload mode: arrays become `ArrayRef`s
    load_from_bytes: Optional[Callable[[Any], Any]]  # what a pickled tensor's inner archive becomes
    def spend(self, nbytes: int) -> None: ...
    def spend_storage(self, key: str, nbytes: int) -> None: ...
    def placeholder(self, cls: str) -> Placeholder: ...
    def payload_bytes(self, payload: Payload) -> bytes: ...
    def add_storage(self, location: Location) -> str: ...


@dataclass(frozen=True)
class Rebuilder:
    """An allowlisted global: calling it in the pickle runs `build(unpickler, args)` written here."""

    dotted: str
    build: Callable[[Unpickling, tuple], Any]


class Pending:
    """An allowlisted object whose BUILD opcode is still to come; `built` gives what it becomes."""

    def built(self, u: Unpickling, state: Any) -> Any:
        raise NotImplementedError


class _PendingDtype(Pending):
    """numpy.dtype(code, ...) before its BUILD sets the byte order."""

    def __init__(self, code: str) -> None:
        self.code, self.order = code, "="

    def built(self, u: Unpickling, state: Any) -> Any:
        if isinstance(state, tuple) and len(state) > 1 and isinstance(state[1], str):
            self.order = state[1]
        return _dtype(self, "a numpy dtype")


class _PendingArray(Pending):
    """numpy's _reconstruct(ndarray, ...) before its BUILD supplies shape, dtype and bytes."""

    def built(self, u: Unpickling, state: Any) -> Any:
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise corrupt("a numpy array's state is malformed.")
        version, shape, dtype, fortran, data = state if len(state) == 5 else (1,) + state
        if version not in (0, 1):  # numpy itself reads no other (its __setstate__ raises ValueError)
            raise corrupt(f"a numpy array's state has version {version!r}; numpy writes and reads only 0 and 1.")
        return _array_from(u, data, dtype, shape, bool(fortran), "an array")


def corrupt(message: str) -> UnreadableCheckpoint:
    """The refusal of a pickle that breaks a bound or builds what no honest file builds."""
    return UnreadableCheckpoint(message, "The file is corrupt or crafted; re-save the weights.")


def _refuse(dotted: str) -> UnsafeCheckpoint:
    hint = ONLY_DATA + " with torch.save(model.state_dict())."
    return UnsafeCheckpoint(f"refusing to load: the file asks to build '{dotted}', which is not tensor data.", hint)



# ---------------------------------------------------------------- rebuilders (the allowlist)


def _ints(value: Any, what: str) -> Tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    if not isinstance(value, (tuple, list)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise corrupt(f"{what} is not a tuple of integers ({type(value).__name__}).")
    return tuple(value)


def _count(shape: Tuple[int, ...], limit: int, what: str) -> int:
    """Elements of `shape`, refusing negative sizes and products beyond `limit` (no overflow).
    A zero anywhere makes it empty, however large the dimensions before it (a zero-width stage)."""
    if any(d < 0 for d in shape):
        raise corrupt(f"{what} has a negative size {list(shape)}.")
    if 0 in shape:
        return 0
    n = 1
    for d in shape:
        n *= d
        if n > limit:
            raise corrupt(f"{what} of shape {list(shape)} is larger than its data.")
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
        raise corrupt(f"{what} has no plain numeric dtype ({type(value).__name__}).")
    if not _NUMPY_CODE.match(code) or order not in "<>|=":
        raise corrupt(f"{what} has dtype {order}{code}, which is not plain numeric data.")
    dt = np.dtype(code)
    return dt.newbyteorder(order) if order in "<>" and dt.itemsize > 1 else dt


def _array_from(u: Unpickling, data: Any, dtype: Any, shape: Any, fortran: bool, what: str) -> Any:
    """An array of exactly `data`'s bytes (a copy, writable), or a refusal naming what is wrong.
    In payload mode an `ArrayRef` over the same bytes instead, after the same checks: a payload
    stays in the file; short data, and an array in the other byte order (swapped here, in memory:
    torch takes native order only, and such files are rare and small), are held in memory."""
    dt = _dtype(dtype, what)
    shape = _ints(shape, f"{what}'s shape")
    if isinstance(data, str):  # a Python 2 pickle's string (read as latin-1): its bytes, as numpy reads it
        data = data.encode("latin1")
    if not isinstance(data, (bytes, bytearray, Payload)):
        raise corrupt(f"{what} ({dt.str}, shape {list(shape)}) has no data of its own (no buffer).")
    nbytes = len(data)
    count = _count(shape, nbytes, what)
    if nbytes != count * dt.itemsize:
        raise corrupt(f"{what} ({dt.str}, shape {list(shape)}) needs {count * dt.itemsize} bytes, its data has {nbytes}.")
    u.spend(nbytes)
    if not dt.isnative:  # same values, swapped once here
        u.spend(nbytes)
        swapped = _np().frombuffer(u.payload_bytes(data) if isinstance(data, Payload) else data, dt)
        dt = dt.newbyteorder("=")
        data = swapped.astype(dt).tobytes()
    if not u.skip_payloads:
        return _np().frombuffer(data if isinstance(data, bytearray) else bytearray(data), dt).reshape(shape, order="F" if fortran else "C")
    location = data.location if isinstance(data, Payload) else InMemory(bytes(data))
    storage = StorageRef(u.add_storage(location), _STORAGE_OF.get(dt.name, dt.name), numel(shape))
    stride = tuple(reversed(contiguous_stride(tuple(reversed(shape))))) if fortran else contiguous_stride(shape)
    return ArrayRef(storage, 0, shape, stride, array_dtype=dt.str, array_name=dt.name)


def _ndarray(u: Unpickling, args: tuple) -> Any:
    """numpy.ndarray(shape, dtype, buffer): how Detectron2's model-zoo .pkl spells arrays."""
    if len(args) != 3:
        raise corrupt(f"an array (numpy.ndarray with {len(args)} arguments) has no data of its own (no buffer).")
    return _array_from(u, args[2], args[1], args[0], False, "an array")


def _reconstruct(u: Unpickling, args: tuple) -> Any:
    """numpy's own array pickles: _reconstruct(ndarray, (0,), b'b'), then BUILD with the data."""
    if not args or args[0] is not _ALLOWED[("numpy", "ndarray")]:
        raise corrupt("numpy _reconstruct called for something other than an array.")
    return _PendingArray()


def _frombuffer(u: Unpickling, args: tuple) -> Any:
    """numpy's protocol-5 spelling: _frombuffer(buffer, dtype, shape, order)."""
    if len(args) != 4:
        raise corrupt("numpy _frombuffer with the wrong arguments.")
    return _array_from(u, args[0], args[1], args[2], args[3] == "F", "an array")


def _np_dtype(u: Unpickling, args: tuple) -> Any:
    if not args or not isinstance(args[0], str):
        raise corrupt("numpy.dtype without a type code.")
    return _PendingDtype(args[0])


def _scalar(u: Unpickling, args: tuple) -> Any:
    """numpy.core.multiarray.scalar(dtype, bytes): a numpy number (epochs, metrics)."""
    if len(args) != 2 or not isinstance(args[1], (bytes, bytearray, Payload)):
        raise corrupt("a numpy scalar without its bytes.")
    dt = _dtype(args[0], "a numpy scalar")
    if len(args[1]) != dt.itemsize:
        raise corrupt(f"a numpy scalar ({dt.str}) has {len(args[1])} bytes.")
    return _np().frombuffer(u.payload_bytes(args[1]) if isinstance(args[1], Payload) else bytes(args[1]), dt)[0]


def _ordered_dict(u: Unpickling, args: tuple) -> Any:
    pairs = args[0] if len(args) == 1 else [] if args == () else None
    if not isinstance(pairs, list) or not all(isinstance(pair, (tuple, list)) and len(pair) == 2 for pair in pairs):
        raise corrupt("OrderedDict built from something other than pairs.")
    return collections.OrderedDict(pairs)


def _latin1(args: tuple) -> Any:
    """The bytes of `(text, 'latin1')`: how protocol 2 spells bytes in Python 3, each character one
    byte.  The text is in memory already (the unpickler read it), so are its bytes: memory about
    the file's size, for a format nobody converts at gigabyte size.  None for any other arguments."""
    if len(args) == 2 and args[1] in ("latin1", "latin-1"):
        if isinstance(args[0], str):
            try:
                return args[0].encode("latin1")
            except UnicodeEncodeError:
                raise corrupt(f"a {len(args[0])}-character text spelling bytes (pickle protocol 2) is not latin-1 text.") from None
        if isinstance(args[0], Payload) and args[0].stands_for == "str":  # a Python 2 string left in the file
            return Payload(args[0].location, "bytes")
    return None


def _bytearray(u: Unpickling, args: tuple) -> Any:
    """bytearray(bytes) or bytearray(str, 'latin-1') only: bytearray(N) would build N bytes from nothing."""
    if args == ():
        return bytearray()
    data = _latin1(args) if len(args) == 2 else args[0] if len(args) == 1 else None
    if not isinstance(data, (bytes, bytearray, Payload)):
        raise corrupt(f"bytearray({type(args[0]).__name__ if args else ''}) would build bytes the file does not hold.")
    u.spend(len(data))
    return Payload(data.location, "bytearray") if isinstance(data, Payload) else bytearray(data)


def _empty_bytes(u: Unpickling, args: tuple) -> Any:
    """bytes(): how protocol 2 spells b'' (an empty array's data); bytes(N) would build N bytes from nothing."""
    if args != ():
        raise _refuse("builtins.bytes")
    return b""


def _encode(u: Unpickling, args: tuple) -> Any:
    """_codecs.encode(str, 'latin1'): how protocol 2 spells bytes; any other codec is refused."""
    data = _latin1(args)
    if data is None:
        raise corrupt("_codecs.encode with a codec other than latin1 (a codec chain builds data out of proportion).")
    u.spend(len(data))
    return data


def _set(kind: type) -> Callable[[Unpickling, tuple], Any]:
    def build(u: Unpickling, args: tuple) -> Any:
        if args and not (len(args) == 1 and isinstance(args[0], (list, tuple))):
            raise corrupt(f"{kind.__name__} built from something other than a list.")
        return kind(args[0]) if args else kind()

    return build


def _reconstructor(u: Unpickling, args: tuple) -> Any:
    """copyreg._reconstructor(cls, base, state): protocol 0/1 objects; only a placeholder comes out."""
    if len(args) == 3 and isinstance(args[0], Placeholder):
        return u.placeholder(args[0].cls)
    raise _refuse("copyreg._reconstructor")


def _getattr(u: Unpickling, args: tuple) -> Any:
    """getattr(cls, name): how a method reference pickles (mmengine's HistoryBuffer keeps its
    statistics methods so).  Only on a placeholder, giving another: getattr on anything real is the
    classic way to reach os.system, and is refused."""
    if len(args) == 2 and isinstance(args[0], Placeholder) and isinstance(args[1], str) and _CLASS_NAME.match(args[1]) and "__" not in args[1]:
        return u.placeholder(f"{args[0].cls}.{args[1]}")
    raise _refuse("builtins.getattr")


def _rebuild_tensor(u: Unpickling, args: tuple) -> Any:
    """torch._utils._rebuild_tensor(_v2)(storage, offset, size, stride, ...): a reference, checked
    to lie inside its storage (otherwise torch would grow the storage with uninitialised memory).
    The storage's bytes are spent once per storage, not per view (`SafeUnpickler.spend_storage`)."""
    if len(args) < 4:
        raise corrupt("a tensor rebuild with too few arguments.")
    storage, offset, size, stride = args[:4]
    if isinstance(storage, tuple) and len(storage) == 3 and isinstance(storage[0], StorageRef):  # legacy view
        storage, base, view_numel = storage
    else:
        base, view_numel = 0, getattr(storage, "numel", 0)
    if not isinstance(storage, StorageRef) or not isinstance(offset, int):
        raise corrupt("a tensor refers to something other than a storage.")
    size, stride = _ints(size, "a tensor's size"), _ints(stride, "a tensor's stride")
    _count(size, 1 << 62, "a tensor")
    if offset < 0 or len(size) != len(stride) or any(st < 0 for st in stride) or extent(offset, size, stride) > view_numel:
        raise corrupt(f"a tensor (shape {list(size)}, offset {offset}) reaches past its storage of {view_numel} elements.")
    if args[5:6] not in ((), (None,), ({},)):  # an empty OrderedDict equals {}
        raise corrupt("a tensor carries backward hooks.")
    u.spend_storage(storage.key, storage.numel * ITEM_SIZE[STORAGE_DTYPES[storage.storage_type]])
    return TensorRef(StorageRef(storage.key, storage.storage_type, storage.numel), base + offset, size, stride)


def _rebuild_parameter(u: Unpickling, args: tuple) -> Any:
    if not args or not isinstance(args[0], TensorRef):
        raise corrupt("a parameter that holds no tensor.")
    return args[0]


def _load_from_bytes(u: Unpickling, args: tuple) -> Any:
    if u.load_from_bytes is None or len(args) != 1 or not (isinstance(args[0], bytes) or (isinstance(args[0], Payload) and args[0].stands_for == "bytes")):
        raise _refuse("torch.storage._load_from_bytes")
    # A payload of raw bytes goes as it is (the caller reads the inner archive whole, counted).
    return u.load_from_bytes(args[0])


_BUILDERS: Dict[Tuple[str, str], Callable[[Unpickling, tuple], Any]] = {
    ("numpy", "ndarray"): _ndarray,
    ("numpy", "dtype"): _np_dtype,
    ("collections", "OrderedDict"): _ordered_dict,
    ("builtins", "bytearray"): _bytearray,
    ("builtins", "bytes"): _empty_bytes,
    ("builtins", "set"): _set(set),
    ("builtins", "frozenset"): _set(frozenset),
    ("_codecs", "encode"): _encode,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("builtins", "getattr"): _getattr,
    ("builtins", "object"): lambda u, a: u.placeholder("builtins.object"),
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_from_bytes,
}
# numpy 2 moved numpy.core to numpy._core; files carry either spelling, and both read under either numpy.
for _core in ("numpy.core", "numpy._core"):
    _BUILDERS.update({(f"{_core}.multiarray", "_reconstruct"): _reconstruct, (f"{_core}.multiarray", "scalar"): _scalar,
                      (f"{_core}.numeric", "_frombuffer"): _frombuffer})
_ALLOWED = {key: Rebuilder(".".join(key), build) for key, build in _BUILDERS.items()}


def resolve(u: Unpickling, module: str, name: str) -> Any:
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
