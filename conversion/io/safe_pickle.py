"""The one unpickler every reader uses: builds data, never runs code, and stays bounded.

Every pickle this tool reads (a plain `.pkl`, a torch archive's `data.pkl`, the pickles of a
legacy torch file, a tensor's inner archive) goes through `SafeUnpickler`, written here opcode by
opcode with no part of Python's own unpickler.  It is default-deny: `OPCODES` is the table of the
opcodes it accepts (what `torch.save`, `pickle.dump` of arrays and containers, and Python 2 write,
protocols 0-5), each with its handler; any other (out-of-band buffers, the copyreg extension
registry, whatever a future Python adds) is refused by name.  So that:

- **nothing from the file runs**: a global resolves to a rebuilder written in `allowlist`, to an
  inert `Placeholder` (classes of non-weight parts: its module is never imported, nothing of it is
  called or kept), or is refused (names whose only use in a pickle is to run code);
- **depth is bounded** (`MAX_DEPTH`): every container's depth is known when it is built, before
  anything hashes, compares or prints it (C code recurses there and crashes the process); a
  container changed after it was put inside another is refused, so cycles cannot be built;
- **memory is proportional to the input**: at most `MAX_OBJECTS` containers and objects; every
  declared length is checked against the bytes left before reading; what the rebuilders produce is
  spent from the file's `Budget` (`bytearray(10**10)`, codec chains and shared buffers repeated are
  refused), a tensor storage once however many tensors view it;
- **no uninitialised memory**: every array takes exactly its bytes from the file, and every
  tensor reference must lie inside its storage.

Frames (protocol 4) are never read ahead, only held to their boundaries as pickle holds them.
**Payload mode** (`skip_payloads`, what the handle readers use): byte strings longer than
`payload_threshold` (BINBYTES, BINBYTES8, BYTEARRAY8; BINSTRING, a Python 2 string) are stepped
over, not read, and become `Payload`s (offset and size in the file), and numpy arrays become
`ArrayRef`s over `storages`; every check and bound is the same.  A str is always read: protocol 2
spells an array's bytes as latin-1 text, decoded in memory (such a file takes memory about its size:
a format nobody converts at gigabyte size).  What a persistent id or a pickled tensor's inner
archive means belongs to the caller (`persistent_load`, `load_from_bytes`).  (Over 400 lines: the
opcode table with every handler and bound in one module, so that all a file can make this code do
is read in one place.)
"""
from __future__ import annotations

import codecs
import collections
import io
import pickle
import struct
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..errors import UnreadableCheckpoint, UnsafeCheckpoint
from .allowlist import ONLY_DATA, Payload, Pending, Placeholder, Rebuilder, StorageType, corrupt, resolve
from .handles import FileBytes, Location

__all__ = ["MAX_DEPTH", "MAX_OBJECTS", "BUDGET_SLACK", "Budget", "allowance", "OPCODES", "PAYLOAD_THRESHOLD", "Payload", "Placeholder",
           "StorageType", "SafeUnpickler", "safe_load"]

MAX_DEPTH = 100  # a state dict is 2-4 levels deep; a training checkpoint rarely more than 10
MAX_OBJECTS = 1_000_000  # containers and objects built by one source file's pickles (a `Budget`)
BUDGET_SLACK = 1 << 20  # bytes any file may build beyond its own size (small files, headers)
# Payload mode: byte strings longer than this are left in the file (a `Payload`: offset and size).
PAYLOAD_THRESHOLD = 4096
HIGHEST_PROTOCOL = 5  # the protocols whose opcodes `OPCODES` covers
# Python 2's names of the modules the allowlist names (protocols 0-2 written by Python 2).
_PYTHON_2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


class Budget:
    """One source file's allowance: the bytes its rebuilders may still produce, and the objects its
    pickles have built (at most `MAX_OBJECTS`), shared by every unpickler reading from that file (a
    legacy file's five pickles, each pickled tensor's inner archive), so that nesting cannot
    multiply it."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes, self.objects = nbytes, 0

    @classmethod
    def for_file(cls, size: int) -> "Budget":
        """The allowance of a file of `size` bytes (`allowance`)."""
        return cls(allowance(size))


def allowance(size: int) -> int:
    """The bytes a file of `size` bytes may build or have written from it: twice itself, plus
    `BUDGET_SLACK` (the one rule; the reader's budget and convert's output bound both use it)."""
    return 2 * size + BUDGET_SLACK


class SafeUnpickler:
    """Unpickle `file` (positioned at a pickle) under the rules in this module's docstring.

    Args:
        file: a binary file; `size` bytes from its current position belong to this input.
        budget: the source file's `Budget` (the caller sets it from the file's size), shared with
            the other unpicklers reading from that file.
        persistent_load: what a persistent id means (torch archives); None refuses them.
        load_from_bytes: what a pickled tensor's inner archive (torch.storage._load_from_bytes) becomes.
        skip_payloads: payload mode: byte strings over `payload_threshold` bytes are not read but
            become `Payload`s (where they are in `file`, which must be the source file itself), and
            numpy arrays become `ArrayRef`s over `storages`; every check and bound is the same.
    """

    def __init__(self, file: Any, *, size: int, budget: Budget, persistent_load: Optional[Callable[[Any], Any]] = None,
                 load_from_bytes: Optional[Callable[[Any], Any]] = None, skip_payloads: bool = False,
                 payload_threshold: int = PAYLOAD_THRESHOLD) -> None:
        self._file = file
        self._pos = file.tell()  # where the next byte of the pickle is (every read and skip goes through here)
        self._end = self._pos + size
        self._frame_end: Optional[int] = None  # where the open frame ends
        self.budget = budget
        self._charged: Dict[str, int] = {}  # storage key -> bytes already spent for it (views share them)
        self._persistent = persistent_load
        self.load_from_bytes = load_from_bytes
        self.skip_payloads, self.payload_threshold = skip_payloads, payload_threshold
        self.proto, self.stack, self.metastack, self.memo = 0, [], [], {}  # as pickle's own unpickler keeps them
        self._result: Tuple[Any, ...] = ()  # (the object STOP returns,) once read
        self._depth: Dict[int, int] = {}  # id -> nesting depth, for every container built
        self._frozen: set = set()  # ids of containers already placed inside another
        self._alive: List[Any] = []  # keeps tracked objects alive, so their ids stay unique
        self._pending_slots: Dict[int, List[Any]] = {}  # id of a pending object -> its memo keys
        self.placeholders: List[str] = []  # dotted class names read past, in order of appearance
        self.storages: Dict[str, Location] = {}  # payload mode: the arrays' storages, by key
        self.modules: set = set()  # modules the pickle's globals name (e.g. numpy._core: pickled by numpy 2)

    def load(self) -> Any:
        """The pickle's object, read opcode by opcode up to its STOP."""
        try:
            while not self._result:
                code = self.read(1)
                handler = OPCODES.get(code)
                if handler is None:
                    raise _refused(code)
                handler(self)
            return self._result[0]
        except RecursionError:  # cannot happen with the depth bound; kept as the last line of defence
            raise corrupt(f"the pickle nests containers more than {MAX_DEPTH} deep.") from None
        except UnreadableCheckpoint as err:
            key = self._key_being_built()
            if key is None or isinstance(err, UnsafeCheckpoint):
                raise
            raise type(err)(f"'{key[:120]}': {err.message}", err.hint) from None

    # -- reading: every byte of the pickle, in frames or not

    def _advance(self, n: int) -> None:
        """Past `n` more bytes, which lie inside the open frame or after it, never across its end
        (what pickle's own reader refuses)."""
        start, self._pos = self._pos, self._pos + n
        if self._frame_end is not None:
            if start >= self._frame_end:
                self._frame_end = None  # that frame is done; the next opcode may open another
            elif self._pos > self._frame_end:
                raise pickle.UnpicklingError("pickle exhausted before end of frame")

    def read(self, n: int) -> bytes:
        data = self._file.read(n)
        if len(data) != n:
            raise pickle.UnpicklingError("pickle data was truncated")
        self._advance(n)
        return data

    def readline(self) -> bytes:
        """The next line's text, without its newline (the arguments of protocol 0's opcodes), never
        longer than the bytes left."""
        line = self._file.readline(max(0, self._end - self._pos))
        if not line.endswith(b"\n"):
            raise pickle.UnpicklingError("pickle data was truncated")
        self._advance(len(line))
        return line[:-1]

    def skip(self, n: int) -> FileBytes:
        """Step over `n` bytes (already checked against what is left) without reading them; where they are."""
        start = self._pos
        self._advance(n)
        self._file.seek(n, io.SEEK_CUR)
        return FileBytes(start, n)

    def check_left(self, n: int) -> None:
        if n < 0 or n > self._end - self._pos:
            raise corrupt(f"the pickle declares {n} bytes where fewer are left.")

    def sized(self, fmt: str, make: Callable[[bytes], Any] = bytes, kind: Optional[str] = None) -> None:
        """Push `make` of a length (struct `fmt`) checked against the bytes left, then that many bytes;
        in payload mode a byte string of `kind` over the threshold is left in the file as a `Payload`."""
        (n,) = struct.unpack(fmt, self.read(struct.calcsize(fmt)))
        self.check_left(n)
        if kind is not None and self.skip_payloads and n > self.payload_threshold:
            self.push(Payload(self.skip(n), kind))
        else:
            self.push(make(self.read(n)))

    def payload_bytes(self, payload: Payload) -> bytes:
        """A payload's bytes, read now (an array in the other byte order, a numpy scalar)."""
        loc = payload.location
        self._file.seek(loc.offset)
        data = self._file.read(loc.nbytes)
        self._file.seek(self._pos)
        if len(data) != loc.nbytes:
            raise corrupt(f"the file ends inside a {loc.nbytes}-byte string at offset {loc.offset}.")
        return data

    def add_storage(self, location: Location) -> str:
        key = f"array-{len(self.storages)}"
        self.storages[key] = location
        return key

    # -- bounds

    def spend(self, nbytes: int) -> None:
        self.budget.nbytes -= nbytes
        if self.budget.nbytes < 0:
            raise corrupt("the file builds more data than it holds (an allocation bomb or crafted references).")

    def spend_storage(self, key: str, nbytes: int) -> None:
        """A tensor's storage costs its bytes once, however many tensors view it: tied modules
        (DETR's shared `bbox_embed`) save as many views of one storage.  A later reference that
        declares the storage larger pays only the difference."""
        extra = nbytes - self._charged.get(key, 0)
        if extra > 0:
            self.spend(extra)
            self._charged[key] = nbytes

    def _depth_of(self, items: Any, depth: int = 1) -> int:
        """Depth of a container about to hold `items` (checked before it exists: building a set or
        a dict hashes its keys, which recurses in C)."""
        for item in items:
            d = self._depth.get(id(item))
            if d is not None:
                self._frozen.add(id(item))
                depth = max(depth, d + 1)
        if depth > MAX_DEPTH:
            raise corrupt(f"the pickle nests containers more than {MAX_DEPTH} deep.")
        return depth

    def _register(self, obj: Any, depth: int) -> Any:
        self.budget.objects += 1
        if self.budget.objects > MAX_OBJECTS:
            raise corrupt(f"the file's pickles build more than {MAX_OBJECTS} objects.")
        self._depth[id(obj)] = depth
        self._alive.append(obj)
        return obj

    def _track(self, obj: Any, items: Any = ()) -> Any:
        return self._register(obj, self._depth_of(items))

    def placeholder(self, cls: str) -> Placeholder:
        self.placeholders.append(cls)
        return self._track(Placeholder(cls))

    # -- the stack

    def push(self, value: Any) -> None:
        self.stack.append(value)

    def mark(self) -> None:
        self.metastack.append(self.stack)
        self.stack = []

    def pop_mark(self) -> List[Any]:
        items, self.stack = self.stack, self.metastack.pop()
        return items

    def _key_being_built(self) -> Optional[str]:
        """The dict key whose value was being built when a refusal happened (the tensor's name)."""
        for stack in [self.stack] + self.metastack[::-1]:
            for item in reversed(stack):
                if isinstance(item, str):
                    return item
        return None

    # -- opcodes that read a value, a global or a persistent id

    def proto_(self) -> None:
        self.proto = self.read(1)[0]
        if self.proto > HIGHEST_PROTOCOL:
            raise ValueError(f"unsupported pickle protocol: {self.proto}")

    def frame(self) -> None:
        (n,) = struct.unpack("<Q", self.read(8))
        self.check_left(n)
        if self._frame_end is not None and self._pos - 9 < self._frame_end:
            raise pickle.UnpicklingError("beginning of a new frame before end of current frame")
        self._frame_end = self._pos + n

    def string(self) -> None:
        """STRING: protocol 0's quoted, escaped Python 2 `str`."""
        data = self.readline()
        if len(data) < 2 or data[0] != data[-1] or data[:1] not in (b'"', b"'"):
            raise pickle.UnpicklingError("the STRING opcode argument must be quoted")
        self.push(_latin1(codecs.escape_decode(data[1:-1])[0]))

    def global_(self, module: str, name: str) -> None:
        self.modules.add(module)
        if self.proto < 3:  # protocols 0-2 may spell Python 2 names (__builtin__, copy_reg)
            module = _PYTHON_2_MODULES.get(module, module)
        self.push(resolve(self, module, name))

    def stack_global(self) -> None:
        name, module = self.stack.pop(), self.stack.pop()
        if type(name) is not str or type(module) is not str:
            raise pickle.UnpicklingError("STACK_GLOBAL requires str")
        self.global_(module, name)

    def persistent(self, pid: Any) -> None:
        if self._persistent is None:
            raise UnsafeCheckpoint(
                "refusing to load: a plain pickle refers to external storage (persistent id).",
                "Re-save the weights with torch.save or as numpy arrays.",
            )
        self.push(self._persistent(pid))

    # -- opcodes that build containers

    def _tuple_of(self, items: List[Any]) -> tuple:
        return self._track(tuple(items), items) if items else ()

    def tuple_n(self, n: int) -> None:
        if len(self.stack) < n:  # a slice would quietly take fewer: refused as CPython's unpickler refuses it
            raise pickle.UnpicklingError("unpickling stack underflow")
        items = self.stack[len(self.stack) - n:]
        del self.stack[len(self.stack) - n:]
        self.push(self._tuple_of(items))

    def container(self, kind: Callable[[List[Any]], Any], items: List[Any]) -> None:
        """A list, set, frozenset or dict (`_dict`) of `items`, its depth checked before it exists."""
        depth = self._depth_of(items)
        self.push(self._register(kind(items), depth))

    # -- opcodes that change containers

    def add(self, items: List[Any], kind: type, opcode: str) -> None:
        """APPEND(S), SETITEM(S) (`items` in pairs), ADDITEMS: `items` into the `kind` under them on
        the stack, checked before they go in (no cycles, no change after it was placed inside
        another).  A placeholder's items are read past."""
        target = self.stack[-1]
        if isinstance(target, Placeholder):
            return
        key = id(target)
        if key not in self._depth:
            raise corrupt(f"the pickle adds items to a {type(target).__name__}.")
        if key in self._frozen:
            raise corrupt("the pickle changes a container after placing it inside another (a cycle or a crafted pickle).")
        if any(item is target for item in items):
            raise corrupt("a container that contains itself.")
        if not isinstance(target, kind):
            raise corrupt(f"{opcode} {'to' if kind is list else 'on'} a {type(target).__name__}.")
        self._depth[key] = self._depth_of(items, self._depth[key])
        if kind is list:
            target.extend(items)
        else:
            target.update(_dict(items) if kind is dict else items)

    def build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, Placeholder):
            return  # a foreign object's state is read past, never handed to it
        if isinstance(inst, collections.OrderedDict) and isinstance(state, dict):
            return  # a module's state_dict() carries `_metadata` (versions) as instance state: not weights
        if id(inst) in self._frozen:
            raise corrupt("the pickle changes an object after placing it inside another.")
        if not isinstance(inst, Pending):
            raise corrupt(f"the pickle sets the state of a {type(inst).__name__}.")
        value = inst.built(self, state)
        self.stack[-1] = value
        for key in self._pending_slots.pop(id(inst), []):
            self.memo[key] = value

    # -- opcodes that call

    def call(self, func: Any, args: Any, kwargs: Any = None) -> Any:
        """What calling `func` in the pickle gives: only a rebuilder is called, a placeholder gives another."""
        if isinstance(func, Placeholder):
            return self.placeholder(func.cls)
        if not isinstance(func, Rebuilder) or kwargs:
            raise corrupt(f"the pickle calls a {type(func).__name__}, which cannot be called.")
        if not isinstance(args, tuple):
            raise corrupt("the pickle calls with arguments that are not a tuple.")
        obj = func.build(self, args)
        if isinstance(obj, (dict, list, set, frozenset)):
            return self._track(obj, list(obj.keys()) + list(obj.values()) if isinstance(obj, dict) else list(obj))
        if isinstance(obj, Pending):
            return self._register(obj, 0)  # depth 0: tracked, so placing it before its BUILD freezes it
        return obj

    def reduce(self) -> None:
        args = self.stack.pop()
        self.stack[-1] = self.call(self.stack[-1], args)

    def newobj_ex(self) -> None:
        kwargs, args = self.stack.pop(), self.stack.pop()
        self.stack[-1] = self.call(self.stack[-1], args, kwargs)

    def obj(self) -> None:
        args = self.pop_mark()
        cls = args.pop(0)
        self.push(self.call(cls, tuple(args)))

    def inst(self) -> None:
        module, name = self.readline().decode("ascii"), self.readline().decode("ascii")
        self.global_(module, name)
        cls = self.stack.pop()
        self.push(self.call(cls, tuple(self.pop_mark())))

    # -- the memo: a pending array or dtype is replaced by its value where the memo holds it

    def get(self, key: int) -> None:
        if key not in self.memo:
            raise pickle.UnpicklingError(f"Memo value not found at index {key}")
        self.push(self.memo[key])

    def put(self, key: int) -> None:
        value = self.stack[-1]
        self.memo[key] = value
        if isinstance(value, Pending):
            self._pending_slots.setdefault(id(value), []).append(key)

    def stop(self) -> None:
        self._result = (self.stack.pop(),)


def _int(text: bytes) -> Any:
    """INT's argument: protocol 0 spells True and False as 01 and 00."""
    return text == b"01" if text in (b"00", b"01") else int(text, 0)


def _long(text: bytes) -> int:
    """LONG's argument: Python 2 ends it with an L."""
    return int(text[:-1] if text.endswith(b"L") else text, 0)


def _utf8(data: bytes) -> str:
    return str(data, "utf-8", "surrogatepass")


def _latin1(data: bytes) -> str:
    """A Python 2 `str` (protocols 0-2): its bytes, read as latin-1 (numpy reads arrays' data so)."""
    return data.decode("latin1")


def _dict(items: List[Any]) -> dict:
    """DICT's items: keys and values in turn."""
    return dict(zip(items[::2], items[1::2]))


def _signed(data: bytes) -> int:
    return int.from_bytes(data, "little", signed=True)


# The opcodes the unpickler accepts, each with its handler: every other opcode is refused by name.
OPCODES: Dict[bytes, Callable[[SafeUnpickler], None]] = {
    # framing and the end
    pickle.PROTO: SafeUnpickler.proto_,
    pickle.FRAME: SafeUnpickler.frame,
    pickle.STOP: SafeUnpickler.stop,
    # constants and numbers
    pickle.NONE: lambda u: u.push(None),
    pickle.NEWTRUE: lambda u: u.push(True),
    pickle.NEWFALSE: lambda u: u.push(False),
    pickle.INT: lambda u: u.push(_int(u.readline())),
    pickle.BININT: lambda u: u.push(struct.unpack("<i", u.read(4))[0]),
    pickle.BININT1: lambda u: u.push(u.read(1)[0]),
    pickle.BININT2: lambda u: u.push(struct.unpack("<H", u.read(2))[0]),
    pickle.LONG: lambda u: u.push(_long(u.readline())),
    pickle.LONG1: lambda u: u.push(_signed(u.read(u.read(1)[0]))),
    pickle.LONG4: lambda u: u.sized("<i", _signed),
    pickle.FLOAT: lambda u: u.push(float(u.readline())),
    pickle.BINFLOAT: lambda u: u.push(struct.unpack(">d", u.read(8))[0]),
    # strings: str, Python 2 str (latin-1), bytes and bytearray (payloads in payload mode)
    pickle.UNICODE: lambda u: u.push(str(u.readline(), "raw-unicode-escape")),
    pickle.SHORT_BINUNICODE: lambda u: u.push(_utf8(u.read(u.read(1)[0]))),
    pickle.BINUNICODE: lambda u: u.sized("<I", _utf8),
    pickle.BINUNICODE8: lambda u: u.sized("<Q", _utf8),
    pickle.STRING: SafeUnpickler.string,
    pickle.SHORT_BINSTRING: lambda u: u.push(_latin1(u.read(u.read(1)[0]))),
    pickle.BINSTRING: lambda u: u.sized("<i", _latin1, "str"),
    pickle.SHORT_BINBYTES: lambda u: u.push(u.read(u.read(1)[0])),
    pickle.BINBYTES: lambda u: u.sized("<I", bytes, "bytes"),
    pickle.BINBYTES8: lambda u: u.sized("<Q", bytes, "bytes"),
    pickle.BYTEARRAY8: lambda u: u.sized("<Q", bytearray, "bytearray"),
    # the stack
    pickle.MARK: SafeUnpickler.mark,
    pickle.POP: lambda u: u.stack.pop() if u.stack else u.pop_mark(),
    pickle.POP_MARK: SafeUnpickler.pop_mark,
    pickle.DUP: lambda u: u.push(u.stack[-1]),
    # containers
    pickle.EMPTY_TUPLE: lambda u: u.push(()),
    pickle.TUPLE1: lambda u: u.tuple_n(1),
    pickle.TUPLE2: lambda u: u.tuple_n(2),
    pickle.TUPLE3: lambda u: u.tuple_n(3),
    pickle.TUPLE: lambda u: u.push(u._tuple_of(u.pop_mark())),
    pickle.EMPTY_LIST: lambda u: u.container(list, []),
    pickle.LIST: lambda u: u.container(list, u.pop_mark()),
    pickle.EMPTY_SET: lambda u: u.container(set, []),
    pickle.FROZENSET: lambda u: u.container(frozenset, u.pop_mark()),
    pickle.EMPTY_DICT: lambda u: u.push(u._track({})),
    pickle.DICT: lambda u: u.container(_dict, u.pop_mark()),
    pickle.APPEND: lambda u: u.add([u.stack.pop()], list, "APPEND"),
    pickle.APPENDS: lambda u: u.add(u.pop_mark(), list, "APPENDS"),
    pickle.SETITEM: lambda u: u.add([u.stack.pop(-2), u.stack.pop()], dict, "SETITEM"),
    pickle.SETITEMS: lambda u: u.add(u.pop_mark(), dict, "SETITEM"),
    pickle.ADDITEMS: lambda u: u.add(u.pop_mark(), set, "ADDITEMS"),
    # globals, calls and object state (see `allowlist`)
    pickle.GLOBAL: lambda u: u.global_(u.readline().decode("utf-8"), u.readline().decode("utf-8")),
    pickle.STACK_GLOBAL: SafeUnpickler.stack_global,
    pickle.REDUCE: SafeUnpickler.reduce,
    pickle.NEWOBJ: SafeUnpickler.reduce,  # cls.__new__(cls, *args): the same call of a rebuilder or placeholder
    pickle.NEWOBJ_EX: SafeUnpickler.newobj_ex,
    pickle.OBJ: SafeUnpickler.obj,
    pickle.INST: SafeUnpickler.inst,
    pickle.BUILD: SafeUnpickler.build,
    pickle.PERSID: lambda u: u.persistent(u.readline().decode("ascii")),
    pickle.BINPERSID: lambda u: u.persistent(u.stack.pop()),
    # the memo
    pickle.PUT: lambda u: u.put(int(u.readline())),
    pickle.BINPUT: lambda u: u.put(u.read(1)[0]),
    pickle.LONG_BINPUT: lambda u: u.put(struct.unpack("<I", u.read(4))[0]),
    pickle.MEMOIZE: lambda u: u.put(len(u.memo)),
    pickle.GET: lambda u: u.get(int(u.readline())),
    pickle.BINGET: lambda u: u.get(u.read(1)[0]),
    pickle.LONG_BINGET: lambda u: u.get(struct.unpack("<I", u.read(4))[0]),
}
# Every opcode's name, for the refusal of one outside the table (pickle's module constants: MARK, EXT1...).
_OPCODE_NAMES = {getattr(pickle, n): n for n in dir(pickle) if n.isupper() and isinstance(getattr(pickle, n), bytes) and len(getattr(pickle, n)) == 1}


def _refused(code: bytes) -> Exception:
    """The refusal of an opcode outside `OPCODES`, naming it (a byte that is no opcode at all is corruption)."""
    name = _OPCODE_NAMES.get(code)
    if name is None:
        return pickle.UnpicklingError(f"invalid load key, {code!r}.")
    if name.startswith("EXT"):
        return UnsafeCheckpoint("refusing to load: the file names a global through the copyreg extension registry (EXT opcode).", ONLY_DATA + ".")
    return UnsafeCheckpoint(f"refusing to load: the pickle uses the {name} opcode, which no checkpoint needs.", ONLY_DATA + ".")


def safe_load(file: Any, *, size: int, budget: Optional[Budget] = None, **hooks: Any) -> Tuple[Any, List[str]]:
    """Unpickle one pickle from `file` (its next `size` bytes); return (objects, placeholders read past).
    (`SafeUnpickler` itself, for payload mode: its `storages` and `modules` come with the objects.)

    Raises:
        UnsafeCheckpoint: the pickle names something that can only run code.
        UnreadableCheckpoint: malformed, out of bounds, or building more than it holds.
    """
    u = SafeUnpickler(file, size=size, budget=Budget.for_file(size) if budget is None else budget, **hooks)
    obj = u.load()
    return obj, u.placeholders
