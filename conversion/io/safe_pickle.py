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
  the file's size (`bytearray(10**10)`, codec chains and shared buffers repeated are refused); a
  tensor storage is counted once, however many tensors view it (tied weights are data, and a view
  costs nothing beyond the check that it lies inside its storage);
- **no uninitialised memory**: every array takes exactly its bytes from the file, and every
  tensor reference must lie inside its storage.

**Payload mode** (`skip_payloads`, what the handle readers use): byte strings longer than
`PAYLOAD_THRESHOLD` (BINBYTES, BINBYTES8, BYTEARRAY8, BINSTRING, and a BINUNICODE / BINUNICODE8
str that `_codecs.encode` spells bytes with) are stepped over, not read, and become `Payload`s
(offset and size in the file); numpy arrays become `ArrayRef`s over storages
listed in `storages`.  No frame is read ahead (frames are only a hint), so every payload is one
run of the file.  Every length is still checked against the bytes left and every array still
spends its bytes from the budget, so a payload never claims more than the file holds.

The tensor side (which storages exist, what a persistent id means) belongs to the caller, given
as `persistent_load` and, for pickled tensors, `load_from_bytes`.  What each global becomes is
`allowlist`.  (About 480 lines: one handler per opcode that builds, changes, calls or reads a
length, and payload mode's, kept in one class so that every bound is visible in one place.)
"""
from __future__ import annotations

import _compat_pickle
import collections
import os
import pickle
import struct
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..errors import UnreadableCheckpoint, UnsafeCheckpoint
from .allowlist import _BUILDERS, CODECS_ENCODE, Payload, Placeholder, StorageType, _corrupt, _dtype, _PendingArray, _PendingDtype, _Rebuilder, resolve
from .handles import FileBytes, Location
from .tensor_bytes import spelled_bytes

__all__ = ["MAX_DEPTH", "MAX_OBJECTS", "BUDGET_SLACK", "Budget", "PAYLOAD_THRESHOLD", "Payload", "Placeholder", "StorageType", "SafeUnpickler", "safe_load"]

MAX_DEPTH = 100  # a state dict is 2-4 levels deep; a training checkpoint rarely more than 10
MAX_OBJECTS = 1_000_000  # containers and objects built by one source file's pickles (a `Budget`)
BUDGET_SLACK = 1 << 20  # bytes any file may build beyond its own size (small files, headers)
# Payload mode: byte strings longer than this are left in the file (a `Payload`: offset and size).
PAYLOAD_THRESHOLD = 4096


class Budget:
    """One source file's allowance: the bytes its rebuilders may produce and the objects its pickles
    may build, shared by every unpickler reading from that file (a legacy file's five pickles, each
    pickled tensor's inner archive), so that nesting cannot multiply it."""

    def __init__(self, nbytes: int, objects: Optional[int] = None) -> None:
        self.nbytes, self.objects = nbytes, MAX_OBJECTS if objects is None else objects
        self.limit = self.objects


# ---------------------------------------------------------------- the unpickler


def _length_checked(fmt: str, size: int, make: Callable[[bytes], Any], kind: Optional[str] = None) -> Callable[["SafeUnpickler"], None]:
    """An opcode handler reading a length then that many bytes, checked against what is left.
    With `kind` (byte strings), payload mode leaves a long one in the file as a `Payload`."""

    def load(self: "SafeUnpickler") -> None:
        (n,) = struct.unpack(fmt, self.read(size))
        self.check_left(n)
        # A str is left in the file only as the argument of `_codecs.encode` (pushed right after it:
        # protocol 2's spelling of bytes) and only when long, whatever the threshold for bytes:
        # every other str (keys, names) is read, and stays a str.
        if kind == "text":
            threshold = max(self.payload_threshold, PAYLOAD_THRESHOLD)
            leave = bool(self.stack) and self.stack[-1] is CODECS_ENCODE
        else:
            threshold, leave = self.payload_threshold, kind is not None
        if leave and self.skip_payloads and n > threshold:
            self.append(Payload(self.skip(n), str(kind)))
            return
        data = self.read(n)
        if len(data) != n:
            raise pickle.UnpicklingError("pickle data was truncated")
        self.append(make(data))

    return load


class SafeUnpickler(pickle._Unpickler):  # the pure-Python unpickler: its opcode table can be replaced
    """Unpickle `file` (positioned at a pickle) under the rules in this module's docstring.

    Args:
        file: a binary file; `size` bytes from its current position belong to this input.
        budget: bytes the rebuilders may produce in all (the caller sets it from the file's size), or
            the source file's `Budget`, shared with the other unpicklers reading from that file.
        persistent_load: what a persistent id means (torch archives); None refuses them.
        load_from_bytes: torch.storage._load_from_bytes (a pickled tensor's inner archive).
        skip_payloads: payload mode: byte strings over `payload_threshold` bytes are not read but
            become `Payload`s (where they are in `file`, which must be the source file itself), and
            numpy arrays become `ArrayRef`s over `storages`; every check and bound is the same.
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(
        self,
        file: Any,
        *,
        size: int,
        budget: "int | Budget",
        persistent_load: Optional[Callable[[Any], Any]] = None,
        load_from_bytes: Optional[Callable[[bytes], Any]] = None,
        skip_payloads: bool = False,
        payload_threshold: int = PAYLOAD_THRESHOLD,
    ) -> None:
        super().__init__(file, encoding="latin1")
        self._file, self._end = file, file.tell() + size
        self.budget = budget if isinstance(budget, Budget) else Budget(budget)
        self._charged: Dict[str, int] = {}  # storage key -> bytes already spent for it (views share them)
        self._persistent = persistent_load
        self.load_from_bytes = load_from_bytes
        self._depth: Dict[int, int] = {}  # id -> nesting depth, for every container built
        self._frozen: set = set()  # ids of containers already placed inside another
        self._alive: List[Any] = []  # keeps tracked objects alive, so their ids stay unique
        self._pending_slots: Dict[int, List[Any]] = {}  # id of a pending object -> its memo keys
        self.placeholders: List[str] = []  # dotted class names read past, in order of appearance
        self.skip_payloads, self.payload_threshold = skip_payloads, payload_threshold
        self.storages: Dict[str, Location] = {}  # payload mode: the arrays' storages, by key
        self.modules: set = set()  # modules the pickle's globals name (e.g. numpy._core: pickled by numpy 2)
        # Payload mode reads no frame ahead, but holds the file to the frames' boundaries as pickle's
        # own reader does (a read straddling a frame's end is corruption): where the open frame ends.
        self._frame_end: Optional[int] = None
        if skip_payloads:
            self._file_read, self._file_readline = self._framed_read, self._framed_readline

    # -- bounds

    def spend(self, nbytes: int) -> None:
        self.budget.nbytes -= nbytes
        if self.budget.nbytes < 0:
            raise _corrupt("the file builds more data than it holds (an allocation bomb or crafted references).")

    def spend_storage(self, key: str, nbytes: int) -> None:
        """A tensor's storage costs its bytes once, however many tensors view it: tied modules
        (DETR's shared `bbox_embed`) save as many views of one storage.  A later reference that
        declares the storage larger pays only the difference."""
        extra = nbytes - self._charged.get(key, 0)
        if extra > 0:
            self.spend(extra)
            self._charged[key] = nbytes

    def check_left(self, n: int) -> None:
        if n < 0 or n > self._end - self._file.tell() + (self._frame_left()):
            raise _corrupt(f"the pickle declares {n} bytes where fewer are left.")

    def _frame_left(self) -> int:
        frame = getattr(self._unframer, "current_frame", None)
        return len(frame.getbuffer()) - frame.tell() if frame is not None else 0

    # -- payload mode

    def _within_frame(self, start: int, n: int) -> None:
        """`n` bytes from `start` lie inside the open frame or after it, never across its end (what
        pickle's reader refuses as "pickle exhausted before end of frame")."""
        if self._frame_end is None:
            return
        if start >= self._frame_end:
            self._frame_end = None  # that frame is done; the next opcode may open another
        elif start + n > self._frame_end:
            raise pickle.UnpicklingError("pickle exhausted before end of frame")

    def _framed_read(self, n: int) -> bytes:
        start = self._file.tell()
        data = self._file.read(n)
        self._within_frame(start, len(data))
        return data

    def _framed_readline(self) -> bytes:
        start = self._file.tell()
        line = self._file.readline()
        self._within_frame(start, len(line))
        return line

    def skip(self, n: int) -> FileBytes:
        """Step over `n` bytes (already checked against what is left) without reading them; where they
        are.  Payload mode reads no frame ahead, so every payload, in a frame or not, is a run of the file."""
        start = self._file.tell()
        self._within_frame(start, n)
        self._file.seek(n, os.SEEK_CUR)
        return FileBytes(start, n)

    def payload_bytes(self, payload: Payload) -> bytes:
        """A payload's bytes, read now (an inner archive, an array whose byte order is swapped);
        those of a protocol-2 `bytes` spelled as text are what the text spells."""
        loc = payload.location
        data = os.pread(self._file.fileno(), loc.nbytes, loc.offset)
        if len(data) != loc.nbytes:
            raise _corrupt(f"the file ends inside a {loc.nbytes}-byte string at offset {loc.offset}.")
        if payload.kind == "latin1":
            try:
                return spelled_bytes(data, f"the {loc.nbytes}-byte text at offset {loc.offset}")
            except UnreadableCheckpoint as err:
                raise _corrupt(err.message) from None
        return data

    def add_storage(self, location: Location) -> str:
        key = f"array-{len(self.storages)}"
        self.storages[key] = location
        return key

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
        self.budget.objects -= 1
        if self.budget.objects < 0:
            raise _corrupt(f"the file's pickles build more than {self.budget.limit} objects.")
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
        self.modules.add(module)
        if self.proto < 3:  # protocol 2 spells Python 2 names (__builtin__, copy_reg)
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        return resolve(self, module, name)

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

    dispatch[pickle.BINBYTES[0]] = _length_checked("<I", 4, bytes, "bytes")
    dispatch[pickle.BINBYTES8[0]] = _length_checked("<Q", 8, bytes, "bytes")
    dispatch[pickle.BYTEARRAY8[0]] = _length_checked("<Q", 8, bytearray, "bytearray")
    # A long str that `_codecs.encode` is about to turn into bytes (protocol 2's `bytes`, an array's
    # data: allowlist._latin1) is left in the file in payload mode; any other str is read.
    dispatch[pickle.BINUNICODE[0]] = _length_checked("<I", 4, lambda b: str(b, "utf-8", "surrogatepass"), "text")
    dispatch[pickle.BINUNICODE8[0]] = _length_checked("<Q", 8, lambda b: str(b, "utf-8", "surrogatepass"), "text")
    dispatch[pickle.LONG4[0]] = _length_checked("<i", 4, lambda b: int.from_bytes(b, "little", signed=True))

    def load_binstring(self) -> None:
        (n,) = struct.unpack("<i", self.read(4))
        self.check_left(n)
        if self.skip_payloads and n > self.payload_threshold:  # a Python 2 string: its bytes as they are (latin-1)
            self.append(Payload(self.skip(n), "str"))
            return
        self.append(self._decode_string(self.read(n)))

    dispatch[pickle.BINSTRING[0]] = load_binstring

    def load_frame(self) -> None:
        (n,) = struct.unpack("<Q", self.read(8))
        self.check_left(n)
        if self.skip_payloads:  # not read ahead (payloads stay in the file), but its end is held to
            at = self._file.tell()
            if self._frame_end is not None and at - 9 < self._frame_end:
                raise pickle.UnpicklingError("beginning of a new frame before end of current frame")
            self._frame_end = at + n
            return
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


def safe_load(file: Any, *, size: int, budget: "int | Budget | None" = None, **hooks: Any) -> Tuple[Any, List[str]]:
    """Unpickle one pickle from `file` (its next `size` bytes); return (objects, placeholders read past).
    (`SafeUnpickler` itself, for payload mode: its `storages` and `modules` come with the objects.)

    Raises:
        UnsafeCheckpoint: the pickle names something that can only run code.
        UnreadableCheckpoint: malformed, out of bounds, or building more than it holds.
    """
    u = SafeUnpickler(file, size=size, budget=2 * size + BUDGET_SLACK if budget is None else budget, **hooks)
    obj = u.load()
    return obj, u.placeholders
