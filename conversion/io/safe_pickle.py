"""The one unpickler every reader uses: builds data, never runs code, and stays bounded.

Every pickle this tool reads (a plain `.pkl`, a torch archive's `data.pkl`, the pickles of a
legacy torch file, a tensor's inner archive) goes through `SafeUnpickler`.  It is Python's
pure-Python unpickler with the opcodes that build or call replaced, so that:

- **nothing from the file runs**: a global resolves to one of a few rebuilders written here
  (containers, numpy arrays and dtypes, torch tensor references), to an inert `Placeholder`
  (classes of non-weight parts: training arguments, loggers, callbacks), or is refused (names
  whose only use in a pickle is to run code: `os`, `builtins`, `subprocess`, `torch.load`...).
  A placeholder records the dotted class name; its module is never imported, its constructor,
  `__setstate__` and items are never called or kept;
- **depth is bounded** (`MAX_DEPTH`): every container's nesting depth is known when it is built,
  before anything hashes, compares or prints it (C code recurses there and crashes the process);
  a container changed after it was put inside another is refused, so cycles cannot be built;
- **memory is proportional to the input**: at most `MAX_OBJECTS` containers and objects; every
  length read from the stream is checked against the bytes left before reading; what the
  rebuilders produce (bytes, arrays, tensors) is counted against a budget the reader sets from
  the file's size (`bytearray(10**10)`, codec chains and shared buffers repeated are refused);
- **no uninitialised memory**: every array takes exactly its bytes from the file, and every
  tensor reference must lie inside its storage.

The tensor side (which storages exist, what a persistent id means) belongs to the caller, given
as `persistent_load` and, for pickled tensors, `load_from_bytes`.
"""
from __future__ import annotations

import _compat_pickle
import collections
import pickle
import re
import struct
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..errors import UnreadableCheckpoint, UnsafeCheckpoint
from .handles import ITEM_SIZE, STORAGE_DTYPES, StorageRef, TensorRef, extent

MAX_DEPTH = 100  # a state dict is 2-4 levels deep; a training checkpoint rarely more than 10
MAX_OBJECTS = 1_000_000  # containers and objects built by one pickle
BUDGET_SLACK = 1 << 20  # bytes any file may build beyond its own size (small files, headers)

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
    """Elements of `shape`, refusing negative sizes and products beyond `limit` (no overflow)."""
    n = 1
    for d in shape:
        if d < 0:
            raise _corrupt(f"{what} has a negative size {list(shape)}.")
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
    """An array of exactly `data`'s bytes (a copy, writable), or a refusal naming what is wrong."""
    dt = _dtype(dtype, what)
    shape = _ints(shape, f"{what}'s shape")
    if not isinstance(data, (bytes, bytearray)):
        raise _corrupt(f"{what} ({dt.str}, shape {list(shape)}) has no data of its own (no buffer).")
    count = _count(shape, len(data), what)
    if len(data) != count * dt.itemsize:
        raise _corrupt(f"{what} ({dt.str}, shape {list(shape)}) needs {count * dt.itemsize} bytes, its data has {len(data)}.")
    u.spend(len(data))
    buffer = data if isinstance(data, bytearray) else bytearray(data)
    array = _np().frombuffer(buffer, dt).reshape(shape, order="F" if fortran else "C")
    if not dt.isnative:  # torch takes native byte order only: same values, swapped once here
        u.spend(len(data))
        array = array.astype(dt.newbyteorder("="))
    return array


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
    _version, shape, dtype, fortran, data = state if len(state) == 5 else (1,) + state
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
    if len(args) != 2 or not isinstance(args[1], (bytes, bytearray)):
        raise _corrupt("a numpy scalar without its bytes.")
    dt = _dtype(args[0], "a numpy scalar")
    if len(args[1]) != dt.itemsize:
        raise _corrupt(f"a numpy scalar ({dt.str}) has {len(args[1])} bytes.")
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
    if not isinstance(data, (bytes, bytearray)):
        raise _corrupt(f"bytearray({type(args[0]).__name__ if args else ''}) would build bytes the file does not hold.")
    u.spend(len(data))
    return bytearray(data)


def _latin1(args: tuple) -> Any:
    if len(args) == 2 and isinstance(args[0], str) and args[1] in ("latin1", "latin-1"):
        return args[0].encode("latin1")
    return None


def _encode(u: "SafeUnpickler", args: tuple) -> Any:
    """_codecs.encode(str, 'latin1'): how protocol 2 spells bytes; any other codec is refused."""
    data = _latin1(args)
    if data is None:
        raise _corrupt("_codecs.encode with a codec other than latin1 (a codec chain builds data out of proportion).")
    u.spend(len(data))
    return data


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
    to lie inside its storage (otherwise torch would grow the storage with uninitialised memory)."""
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
    count = _count(size, 1 << 62, "a tensor")
    if offset < 0 or len(size) != len(stride) or any(st < 0 for st in stride) or extent(offset, size, stride) > view_numel:
        raise _corrupt(f"a tensor (shape {list(size)}, offset {offset}) reaches past its storage of {view_numel} elements.")
    hooks = args[5] if len(args) > 5 else None
    if hooks not in (None, {}) and not (isinstance(hooks, dict) and not hooks):
        raise _corrupt("a tensor carries backward hooks.")
    u.spend(count * ITEM_SIZE[STORAGE_DTYPES[storage.storage_type]])
    return TensorRef(StorageRef(storage.key, storage.storage_type, storage.numel), base + offset, size, stride)


def _rebuild_parameter(u: "SafeUnpickler", args: tuple) -> Any:
    if not args or not isinstance(args[0], TensorRef):
        raise _corrupt("a parameter that holds no tensor.")
    return args[0]


def _load_from_bytes(u: "SafeUnpickler", args: tuple) -> Any:
    if u.load_from_bytes is None or len(args) != 1 or not isinstance(args[0], bytes):
        raise _refuse("torch.storage._load_from_bytes")
    return u.load_from_bytes(args[0])


_NDARRAY = _Rebuilder("numpy.ndarray", _ndarray)
_ALLOWED: Dict[Tuple[str, str], _Rebuilder] = {
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _Rebuilder("numpy.dtype", _np_dtype),
    ("collections", "OrderedDict"): _Rebuilder("collections.OrderedDict", _ordered_dict),
    ("builtins", "bytearray"): _Rebuilder("builtins.bytearray", _bytearray),
    ("builtins", "set"): _Rebuilder("builtins.set", _set(set)),
    ("builtins", "frozenset"): _Rebuilder("builtins.frozenset", _set(frozenset)),
    ("_codecs", "encode"): _Rebuilder("_codecs.encode", _encode),
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


# ---------------------------------------------------------------- the unpickler


def _length_checked(fmt: str, size: int, make: Callable[[bytes], Any]) -> Callable[["SafeUnpickler"], None]:
    """An opcode handler reading a length then that many bytes, checked against what is left."""

    def load(self: "SafeUnpickler") -> None:
        (n,) = struct.unpack(fmt, self.read(size))
        self.check_left(n)
        data = self.read(n)
        if len(data) != n:
            raise pickle.UnpicklingError("pickle data was truncated")
        self.append(make(data))

    return load


class SafeUnpickler(pickle._Unpickler):  # the pure-Python unpickler: its opcode table can be replaced
    """Unpickle `file` (positioned at a pickle) under the rules in this module's docstring.

    Args:
        file: a binary file; `size` bytes from its current position belong to this input.
        budget: bytes the rebuilders may produce in all (the caller sets it from the file's size).
        persistent_load: what a persistent id means (torch archives); None refuses them.
        load_from_bytes: torch.storage._load_from_bytes (a pickled tensor's inner archive).
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(
        self,
        file: Any,
        *,
        size: int,
        budget: int,
        persistent_load: Optional[Callable[[Any], Any]] = None,
        load_from_bytes: Optional[Callable[[bytes], Any]] = None,
    ) -> None:
        super().__init__(file, encoding="latin1")
        self._file, self._end = file, file.tell() + size
        self._budget = budget
        self._persistent = persistent_load
        self.load_from_bytes = load_from_bytes
        self._depth: Dict[int, int] = {}  # id -> nesting depth, for every container built
        self._frozen: set = set()  # ids of containers already placed inside another
        self._alive: List[Any] = []  # keeps tracked objects alive, so their ids stay unique
        self._pending_slots: Dict[int, List[Any]] = {}  # id of a pending object -> its memo keys
        self.placeholders: List[str] = []  # dotted class names read past, in order of appearance
        self._objects = 0

    # -- bounds

    def spend(self, nbytes: int) -> None:
        self._budget -= nbytes
        if self._budget < 0:
            raise _corrupt("the file builds more data than it holds (an allocation bomb or crafted references).")

    def check_left(self, n: int) -> None:
        if n < 0 or n > self._end - self._file.tell() + (self._frame_left()):
            raise _corrupt(f"the pickle declares {n} bytes where fewer are left.")

    def _frame_left(self) -> int:
        frame = getattr(self._unframer, "current_frame", None)
        return len(frame.getbuffer()) - frame.tell() if frame is not None else 0

    def _depth_of(self, items: Any, depth: int = 1) -> int:
        """Depth of a container about to hold `items` (checked before it exists: building a set or
        a dict hashes its keys, which recurses in C)."""
        for item in items:
            d = self._depth.get(id(item))
            if d is not None:
                self._frozen.add(id(item))
                depth = max(depth, d + 1)
        if depth > MAX_DEPTH:
            raise _corrupt(f"the pickle nests containers more than {MAX_DEPTH} deep.")
        return depth

    def _register(self, obj: Any, depth: int) -> Any:
        self._objects += 1
        if self._objects > MAX_OBJECTS:
            raise _corrupt(f"the pickle builds more than {MAX_OBJECTS} objects.")
        self._depth[id(obj)] = depth
        self._alive.append(obj)
        return obj

    def _track(self, obj: Any, items: Any = ()) -> Any:
        return self._register(obj, self._depth_of(items))

    def _grow(self, container: Any, items: List[Any]) -> None:
        """Before items go into an existing container: refuse cycles and late changes, update depth."""
        key = id(container)
        if key not in self._depth:
            raise _corrupt(f"the pickle adds items to a {type(container).__name__}.")
        if key in self._frozen:
            raise _corrupt("the pickle changes a container after placing it inside another (a cycle or a crafted pickle).")
        if any(item is container for item in items):
            raise _corrupt("a container that contains itself.")
        self._depth[key] = self._depth_of(items, self._depth[key])

    def placeholder(self, cls: str) -> Placeholder:
        self.placeholders.append(cls)
        return self._track(Placeholder(cls))

    # -- globals and persistent ids

    def find_class(self, module: str, name: str) -> Any:
        if self.proto < 3:  # protocol 2 spells Python 2 names (__builtin__, copy_reg)
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        dotted = f"{module}.{name}"
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in STORAGE_DTYPES:
            return StorageType(name)
        root = module.split(".", 1)[0]
        function = root in _LIBRARIES_WITH_CODE and not name[:1].isupper() and (module, name) not in _TORCH_DATA
        if root in _CODE_MODULES or function or not _CLASS_NAME.match(name) or "__" in dotted:
            raise _refuse(dotted)
        return self.placeholder(dotted)

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent is None:
            raise UnsafeCheckpoint(
                "refusing to load: a plain pickle refers to external storage (persistent id).",
                "Re-save the weights with torch.save or as numpy arrays.",
            )
        return self._persistent(pid)

    # -- opcodes that build containers

    def _empty(kind: Any) -> Callable[["SafeUnpickler"], None]:  # type: ignore[misc]
        def load(self: "SafeUnpickler") -> None:
            self.append(self._track(kind()))

        return load

    dispatch[pickle.EMPTY_LIST[0]] = _empty(list)
    dispatch[pickle.EMPTY_DICT[0]] = _empty(dict)
    dispatch[pickle.EMPTY_SET[0]] = _empty(set)

    def load_empty_tuple(self) -> None:
        self.append(())

    dispatch[pickle.EMPTY_TUPLE[0]] = load_empty_tuple

    def _tuple_of(self, items: List[Any]) -> tuple:
        return self._track(tuple(items), items) if items else ()

    def load_tuple(self) -> None:
        items = self.pop_mark()  # first: pop_mark rebinds self.append
        self.append(self._tuple_of(items))

    def load_tuple_n(n: int) -> Callable[["SafeUnpickler"], None]:  # type: ignore[misc]
        def load(self: "SafeUnpickler") -> None:
            items = self.stack[-n:]
            del self.stack[-n:]
            self.append(self._tuple_of(items))

        return load

    dispatch[pickle.TUPLE[0]] = load_tuple
    dispatch[pickle.TUPLE1[0]] = load_tuple_n(1)
    dispatch[pickle.TUPLE2[0]] = load_tuple_n(2)
    dispatch[pickle.TUPLE3[0]] = load_tuple_n(3)

    def load_list(self) -> None:
        items = self.pop_mark()
        self.append(self._track(list(items), items))

    def load_dict(self) -> None:
        items = self.pop_mark()
        obj = self._track({}, items)
        for i in range(0, len(items) - 1, 2):
            obj[items[i]] = items[i + 1]
        self.append(obj)

    def load_frozenset(self) -> None:
        items = self.pop_mark()
        depth = self._depth_of(items)
        self.append(self._register(frozenset(items), depth))

    dispatch[pickle.LIST[0]] = load_list
    dispatch[pickle.DICT[0]] = load_dict
    dispatch[pickle.FROZENSET[0]] = load_frozenset

    # -- opcodes that change containers

    def _target(self, items: List[Any]) -> Any:
        target = self.stack[-1]
        if isinstance(target, Placeholder):
            return None  # a foreign object's items are read past
        self._grow(target, items)
        return target

    def load_append(self) -> None:
        value = self.stack.pop()
        target = self._target([value])
        if target is not None:
            if not isinstance(target, list):
                raise _corrupt(f"APPEND to a {type(target).__name__}.")
            target.append(value)

    def load_appends(self) -> None:
        items = self.pop_mark()
        target = self._target(items)
        if target is not None:
            if not isinstance(target, list):
                raise _corrupt(f"APPENDS to a {type(target).__name__}.")
            target.extend(items)

    def load_setitem(self) -> None:
        value, key = self.stack.pop(), self.stack.pop()
        self._setitems([key, value])

    def load_setitems(self) -> None:
        self._setitems(self.pop_mark())

    def _setitems(self, items: List[Any]) -> None:
        target = self._target(items)
        if target is None:
            return
        if not isinstance(target, dict):
            raise _corrupt(f"SETITEM on a {type(target).__name__}.")
        for i in range(0, len(items) - 1, 2):
            target[items[i]] = items[i + 1]

    def load_additems(self) -> None:
        items = self.pop_mark()
        target = self._target(items)
        if target is not None:
            if not isinstance(target, set):
                raise _corrupt(f"ADDITEMS on a {type(target).__name__}.")
            target.update(items)

    dispatch[pickle.APPEND[0]] = load_append
    dispatch[pickle.APPENDS[0]] = load_appends
    dispatch[pickle.SETITEM[0]] = load_setitem
    dispatch[pickle.SETITEMS[0]] = load_setitems
    dispatch[pickle.ADDITEMS[0]] = load_additems

    def load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, Placeholder):
            return  # a foreign object's state is read past, never handed to it
        if isinstance(inst, collections.OrderedDict) and isinstance(state, dict):
            return  # a module's state_dict() carries `_metadata` (versions) as instance state: not weights
        if id(inst) in self._frozen:
            raise _corrupt("the pickle changes an object after placing it inside another.")
        if isinstance(inst, _PendingDtype):
            if isinstance(state, tuple) and len(state) > 1 and isinstance(state[1], str):
                inst.order = state[1]
            value = _dtype(inst, "a numpy dtype")
        elif type(inst) in _BUILDERS:
            value = _BUILDERS[type(inst)](self, state)
        else:
            raise _corrupt(f"the pickle sets the state of a {type(inst).__name__}.")
        self.stack[-1] = value
        for key in self._pending_slots.pop(id(inst), []):
            self.memo[key] = value

    dispatch[pickle.BUILD[0]] = load_build

    # -- opcodes that call

    def _call(self, func: Any, args: Any, kwargs: Any = None) -> Any:
        if isinstance(func, Placeholder):
            return self.placeholder(func.cls)
        if not isinstance(func, _Rebuilder) or kwargs:
            raise _corrupt(f"the pickle calls a {type(func).__name__}, which cannot be called.")
        if not isinstance(args, tuple):
            raise _corrupt("the pickle calls with arguments that are not a tuple.")
        obj = func.build(self, args)
        if isinstance(obj, (dict, list, set, frozenset)):
            return self._track(obj, list(obj.keys()) + list(obj.values()) if isinstance(obj, dict) else list(obj))
        if isinstance(obj, (_PendingArray, _PendingDtype)):
            return self._register(obj, 0)  # depth 0: tracked, so placing it before its BUILD freezes it
        return obj

    def load_reduce(self) -> None:
        args = self.stack.pop()
        self.stack[-1] = self._call(self.stack[-1], args)

    def load_newobj(self) -> None:
        args = self.stack.pop()
        self.stack[-1] = self._call(self.stack[-1], args)

    def load_newobj_ex(self) -> None:
        kwargs, args = self.stack.pop(), self.stack.pop()
        self.stack[-1] = self._call(self.stack[-1], args, kwargs)

    def load_obj(self) -> None:
        args = self.pop_mark()
        cls = args.pop(0)
        self.append(self._call(cls, tuple(args)))

    def load_inst(self) -> None:
        module = self.readline()[:-1].decode("ascii")
        name = self.readline()[:-1].decode("ascii")
        cls = self.find_class(module, name)
        args = tuple(self.pop_mark())
        self.append(self._call(cls, args))

    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.NEWOBJ[0]] = load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex
    dispatch[pickle.OBJ[0]] = load_obj
    dispatch[pickle.INST[0]] = load_inst

    def load_ext(self) -> None:
        raise UnsafeCheckpoint(
            "refusing to load: the file names a global through the copyreg extension registry (EXT opcode).",
            "Only checkpoints made of tensors, arrays and plain containers are read; re-save the weights.",
        )

    dispatch[pickle.EXT1[0]] = load_ext
    dispatch[pickle.EXT2[0]] = load_ext
    dispatch[pickle.EXT4[0]] = load_ext

    # -- memo: a pending array or dtype is replaced by its value where the memo holds it

    def _remember(self, key: Any) -> None:
        value = self.stack[-1]
        self.memo[key] = value
        if isinstance(value, (_PendingArray, _PendingDtype)):
            self._pending_slots.setdefault(id(value), []).append(key)

    def load_put(self) -> None:
        self._remember(int(self.readline()[:-1]))

    def load_binput(self) -> None:
        self._remember(self.read(1)[0])

    def load_long_binput(self) -> None:
        (key,) = struct.unpack("<I", self.read(4))
        self._remember(key)

    def load_memoize(self) -> None:
        self._remember(len(self.memo))

    dispatch[pickle.PUT[0]] = load_put
    dispatch[pickle.BINPUT[0]] = load_binput
    dispatch[pickle.LONG_BINPUT[0]] = load_long_binput
    dispatch[pickle.MEMOIZE[0]] = load_memoize

    # -- opcodes that read a declared number of bytes

    dispatch[pickle.BINBYTES[0]] = _length_checked("<I", 4, bytes)
    dispatch[pickle.BINBYTES8[0]] = _length_checked("<Q", 8, bytes)
    dispatch[pickle.BYTEARRAY8[0]] = _length_checked("<Q", 8, bytearray)
    dispatch[pickle.BINUNICODE[0]] = _length_checked("<I", 4, lambda b: str(b, "utf-8", "surrogatepass"))
    dispatch[pickle.BINUNICODE8[0]] = _length_checked("<Q", 8, lambda b: str(b, "utf-8", "surrogatepass"))
    dispatch[pickle.LONG4[0]] = _length_checked("<i", 4, lambda b: int.from_bytes(b, "little", signed=True))

    def load_binstring(self) -> None:
        (n,) = struct.unpack("<i", self.read(4))
        self.check_left(n)
        self.append(self._decode_string(self.read(n)))

    dispatch[pickle.BINSTRING[0]] = load_binstring

    def load_frame(self) -> None:
        (n,) = struct.unpack("<Q", self.read(8))
        self.check_left(n)
        self._unframer.load_frame(n)

    dispatch[pickle.FRAME[0]] = load_frame

    def _key_being_built(self) -> Optional[str]:
        """The dict key whose value was being built when a refusal happened (the tensor's name)."""
        for stack in [self.stack] + self.metastack[::-1]:
            for item in reversed(stack):
                if isinstance(item, str):
                    return item
        return None

    def load(self) -> Any:
        try:
            return super().load()
        except RecursionError:  # cannot happen with the depth bound; kept as the last line of defence
            raise _corrupt(f"the pickle nests containers more than {MAX_DEPTH} deep.") from None
        except UnreadableCheckpoint as err:
            key = self._key_being_built()
            if key is None or isinstance(err, UnsafeCheckpoint):
                raise
            raise type(err)(f"'{key[:120]}': {err.message}", err.hint) from None


def safe_load(file: Any, *, size: int, budget: Optional[int] = None, **hooks: Any) -> Tuple[Any, List[str]]:
    """Unpickle one pickle from `file` (its next `size` bytes); return (objects, placeholders read past).

    Raises:
        UnsafeCheckpoint: the pickle names something that can only run code.
        UnreadableCheckpoint: malformed, out of bounds, or building more than it holds.
    """
    u = SafeUnpickler(file, size=size, budget=2 * size + BUDGET_SLACK if budget is None else budget, **hooks)
    obj = u.load()
    return obj, u.placeholders
