"""Hostile and malformed sources: nothing in a checkpoint runs, and a broken one never half-converts.

Every hostile pickle here is assembled opcode by opcode (the `pickle` module's own constants), so
each asks for exactly the call it is named after: `os.system`, `exec`, `subprocess.Popen`, a
`__setstate__` with a side effect, `torch.load` re-entered with `weights_only=False`, an
extension-registry code, a persistent id... Each would create a sentinel file if it ran, and each
is tried three ways: as a plain pickle, as the `data.pkl` of a real torch zip archive (the other
members kept), and as the main pickle of a legacy (pre-1.6) torch file.  One test loads every one
of them with the *unsafe* loaders (plain `pickle`, `torch.load(weights_only=False)`) in a throwaway
process and requires the sentinel to appear: the corpus really is hostile, so its refusal means
something.

Malformed sources are derived from valid ones: truncated at a spread of offsets, bytes flipped
(seeded and hypothesis-driven), spans deleted, inserted or duplicated, special files (FIFO,
symlink loop, devices, unreadable), absurd safetensors headers, foreign dtypes.  For all of them
the only outcomes allowed are a `ConversionError`, or a conversion whose output holds exactly the
tensors the (mutated) source decodes to; never another exception, never a partial output.

Run with `pytest -s` to see how many files were tried (printed when the module finishes).
"""
from __future__ import annotations

import collections
import copyreg
import functools
import io
import json
import marshal
import os
import pickle
import pickletools
import random
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conversion import convert
from conversion.architecture import Architecture
from conversion.cli import main
from conversion.errors import ConversionError, UnreadableCheckpoint, UnsafeCheckpoint
from conversion.read import load_checkpoint

from ..support import TORCH_HAS_WEIGHTS_ONLY, random_canonical_state_dict, require

if not TORCH_HAS_WEIGHTS_ONLY:
    # The corpus's oracle decodes every file independently with torch's own weights_only reader (and
    # builds tensors of dtypes torch 1.9 lacks); on such torch the reader itself is covered by
    # tests/io/test_read.py's restricted-pickle-module cases.
    pytest.skip("the hostile corpus needs torch >= 1.13 (weights_only) as its independent decoder", allow_module_level=True)

_NP_MULTIARRAY = __import__("importlib").import_module(
    "numpy._core.multiarray" if int(np.__version__.split(".")[0]) >= 2 else "numpy.core.multiarray"
)
from ..cli.test_cli import ROOT, assert_plain_error

EXIT_USAGE = 2
TEMP_PREFIX = ".convnext-d2-"  # write.py's temporary files beside the destination
TINY = Architecture(depths=(1, 1, 1, 1), dims=(4, 4, 4, 4), num_classes=2, classifier_norm=True)
CLASSIFIER_PREFIXES = ("head.", "norm.")  # dropped by every conversion (docs/design.md, output formats)
# A real process imports torch (~2 s); a hung one must not hang the suite.
PROCESS_TIMEOUT_S = 120
# How long a reader may take on a tiny special file before it counts as hanging.
HANG_S = 2.0
# The copyreg extension registry: code -> (module, name) it stands for (EXT1 takes 1 byte, EXT2 2, EXT4 4).
# One key per code: copyreg refuses to register a (module, name) twice.
EXT_CODES = {"EXT1": (0xF1, "os", "system"), "EXT2": (0xF1F2, "posix", "system"), "EXT4": (0x7FFFFFF0, "subprocess", "getoutput")}

# What ran, for the summary printed at the end of the module (pytest -s shows it).


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


class _RunsCode:
    """What an ordinary malicious pickle carries (used to build inner archives)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


# ================================================================ assembling pickles by hand


def _str(s: str) -> bytes:
    b = s.encode("utf-8")
    return pickle.BINUNICODE + struct.pack("<I", len(b)) + b


def _bytes(b: bytes) -> bytes:
    return pickle.BINBYTES + struct.pack("<I", len(b)) + b


def _int(i: int) -> bytes:
    return pickle.BININT1 + bytes([i]) if 0 <= i < 256 else pickle.BININT + struct.pack("<i", i)


def _global(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def _stack_global(module: str, name: str) -> bytes:
    return _str(module) + _str(name) + pickle.STACK_GLOBAL


def _tuple(*items: bytes) -> bytes:
    return pickle.MARK + b"".join(items) + pickle.TUPLE


def _list(*items: bytes) -> bytes:
    return pickle.EMPTY_LIST + pickle.MARK + b"".join(items) + pickle.APPENDS


def _dict(**items: bytes) -> bytes:
    return pickle.EMPTY_DICT + pickle.MARK + b"".join(_str(k) + v for k, v in items.items()) + pickle.SETITEMS


def _call(fn: bytes, *args: bytes) -> bytes:
    """fn(*args) through REDUCE."""
    return fn + _tuple(*args) + pickle.REDUCE


def _program(obj: bytes, proto: int) -> bytes:
    """A whole pickle: `{"model": obj}`, the shape of a checkpoint."""
    return pickle.PROTO + bytes([proto]) + pickle.EMPTY_DICT + _str("model") + obj + pickle.SETITEM + pickle.STOP


def _globals_named(program: bytes) -> List[str]:
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


def _torch_bytes(obj: Any, legacy: bool = False) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()


def _os_system(c: Ctx) -> bytes:
    return _call(_global("os", "system"), _str(c.cmd))


def _import(module: str) -> bytes:
    return _call(_global("builtins", "__import__"), _str(module))


def _torch_load_unsafe(c: Ctx) -> bytes:
    """functools.partial(torch.load, weights_only=False)(io.BytesIO(inner)): kwargs smuggled in by BUILD."""
    partial = _call(_global("functools", "partial"), _global("torch", "load"))
    state = _tuple(_global("torch", "load"), pickle.EMPTY_TUPLE, _dict(weights_only=pickle.NEWFALSE), pickle.NONE)
    inner = _call(_global("io", "BytesIO"), _bytes(_torch_bytes({"x": _RunsCode(c.cmd)})))
    return _call(partial + state + pickle.BUILD, inner)


def _numpy_load_allow_pickle(c: Ctx) -> bytes:
    npy = c.aux / "inner.npy"
    np.save(npy, np.array([_RunsCode(c.cmd)], dtype=object), allow_pickle=True)
    return _call(_global("numpy", "load"), _str(str(npy)), pickle.NONE, pickle.NEWTRUE)


def _ext(kind: str) -> Callable[[Ctx], bytes]:
    code = EXT_CODES[kind][0]
    op = getattr(pickle, kind) + struct.pack({"EXT1": "<B", "EXT2": "<H", "EXT4": "<i"}[kind], code)
    return lambda c: _call(op, _str(c.cmd))


_HERE = __name__  # the module the side-effect classes live in, as find_class will be asked for it

PAYLOADS: Dict[str, Payload] = {
    # plain calls through REDUCE
    "os.system": Payload(_os_system),
    "posix.system": Payload(lambda c: _call(_global("posix", "system"), _str(c.cmd))),
    "nt.system": Payload(lambda c: _call(_global("nt", "system"), _str(c.cmd)), runs_unsafely=os.name == "nt"),
    "os.system-stack-global": Payload(lambda c: _call(_stack_global("os", "system"), _str(c.cmd)), proto=4),
    "builtins.exec": Payload(lambda c: _call(_global("builtins", "exec"), _str(c.code))),
    "builtins.eval": Payload(lambda c: _call(_global("builtins", "eval"), _str(f"__import__('os').system({c.cmd!r})"))),
    "__builtin__.eval-py2-name": Payload(lambda c: _call(_global("__builtin__", "eval"), _str(f"__import__('os').system({c.cmd!r})"))),
    "builtins.open": Payload(lambda c: _call(_global("builtins", "open"), _str(c.sentinel), _str("w"))),
    "codecs.open": Payload(lambda c: _call(_global("codecs", "open"), _str(c.sentinel), _str("w"))),
    "logging.FileHandler": Payload(lambda c: _call(_global("logging", "FileHandler"), _str(c.sentinel))),
    "subprocess.Popen": Payload(lambda c: _call(_global("subprocess", "Popen"), _list(_str("touch"), _str(c.sentinel)))),
    "subprocess.check_call": Payload(lambda c: _call(_global("subprocess", "check_call"), _list(_str("touch"), _str(c.sentinel)))),
    "torch.save": Payload(lambda c: _call(_global("torch", "save"), _int(1), _str(c.sentinel))),
    "numpy.savetxt": Payload(lambda c: _call(_global("numpy", "savetxt"), _str(c.sentinel), _list(_int(1)))),
    "numpy-testing-runstring": Payload(
        lambda c: _call(_global("numpy.testing._private.utils", "runstring"), _str(c.code), pickle.EMPTY_DICT)),
    "numpy.load-allow_pickle": Payload(_numpy_load_allow_pickle),
    # the other opcodes that call or construct
    "INST": Payload(lambda c: pickle.MARK + _str(c.cmd) + pickle.INST + b"os\nsystem\n"),
    "OBJ": Payload(lambda c: pickle.MARK + _global("os", "system") + _str(c.cmd) + pickle.OBJ),
    "NEWOBJ": Payload(lambda c: _global(_HERE, "TouchOnNew") + _tuple(_str(c.sentinel)) + pickle.NEWOBJ),
    "NEWOBJ_EX": Payload(
        lambda c: _global(_HERE, "TouchOnNew") + pickle.EMPTY_TUPLE + _dict(path=_str(c.sentinel)) + pickle.NEWOBJ_EX,
        proto=4),
    "BUILD-__setstate__": Payload(
        lambda c: _global(_HERE, "TouchOnSetstate") + pickle.EMPTY_TUPLE + pickle.NEWOBJ + _dict(path=_str(c.sentinel)) + pickle.BUILD),
    "BUILD-allowed-object-hostile-state": Payload(
        lambda c: _global("argparse", "Namespace") + pickle.EMPTY_TUPLE + pickle.NEWOBJ + _dict(x=_os_system(c)) + pickle.BUILD),
    "copyreg._reconstructor": Payload(
        lambda c: _call(_global("copyreg", "_reconstructor"), _global(_HERE, "TouchOnInit"), _global(_HERE, "TouchOnInit"), _str(c.sentinel))),
    "EXT1": Payload(_ext("EXT1")),
    "EXT2": Payload(_ext("EXT2")),
    "EXT4": Payload(_ext("EXT4")),
    # persistent ids: meaningless in a plain pickle, and torch accepts only ('storage', ...) tuples (refusal only)
    "PERSID-text": Payload(lambda c: pickle.PERSID + b"0\n", runs_unsafely=False),
    "BINPERSID-benign-tuple": Payload(lambda c: _tuple(_str("module"), _str("os"), _str("system")) + pickle.BINPERSID,
                                      runs_unsafely=False),
    "BINPERSID-with-call-inside": Payload(
        lambda c: _tuple(_str("storage"), _os_system(c), _str("0"), _str("cpu"), _int(1)) + pickle.BINPERSID),
    # indirection: reach a dangerous callable through a harmless-looking one
    "functools.partial": Payload(lambda c: _call(_call(_global("functools", "partial"), _global("os", "system"), _str(c.cmd)))),
    "operator.attrgetter": Payload(
        lambda c: _call(_call(_call(_global("operator", "attrgetter"), _str("system")), _import("os")), _str(c.cmd))),
    "builtins.getattr": Payload(lambda c: _call(_call(_global("builtins", "getattr"), _import("os"), _str("system")), _str(c.cmd))),
    "importlib.import_module": Payload(
        lambda c: _call(_call(_global("builtins", "getattr"), _call(_global("importlib", "import_module"), _str("os")), _str("system")), _str(c.cmd))),
    # protocol 4 resolves dotted names: an allow-list that checks only the module is bypassed
    "dotted-name-argparse._os.system": Payload(lambda c: _call(_stack_global("argparse", "_os.system"), _str(c.cmd)), proto=4),
    # an allowed class as the first step of a dotted name reaches a module's globals (no call: refusal only)
    "dotted-name-through-allowed-class": Payload(
        lambda c: _stack_global("collections", "OrderedDict.__init__.__globals__"), proto=4, runs_unsafely=False),
    "dotted-name-torch._utils.torch.save": Payload(
        lambda c: _call(_stack_global("torch._utils", "torch.save"), _int(1), _str(c.sentinel)), proto=4),
    "pickle.loads-inner": Payload(lambda c: _call(_global("pickle", "loads"), _bytes(pickle.dumps(_RunsCode(c.cmd))))),
    "marshal-code-object": Payload(lambda c: _call(_call(
        _global("types", "FunctionType"),
        _call(_global("marshal", "loads"), _bytes(marshal.dumps(compile(c.code, "<payload>", "exec")))),
        pickle.EMPTY_DICT))),
    # torch re-entrancy: the allowed name torch.storage._load_from_bytes is torch.load(weights_only=False) in torch
    "_load_from_bytes-inner-zip": Payload(
        lambda c: _call(_global("torch.storage", "_load_from_bytes"), _bytes(_torch_bytes({"x": _RunsCode(c.cmd)})))),
    "_load_from_bytes-inner-legacy": Payload(
        lambda c: _call(_global("torch.storage", "_load_from_bytes"), _bytes(_torch_bytes({"x": _RunsCode(c.cmd)}, legacy=True)))),
    "_load_from_bytes-inner-plain-pickle": Payload(
        lambda c: _call(_global("torch.storage", "_load_from_bytes"), _bytes(pickle.dumps({"x": _RunsCode(c.cmd)}, protocol=2)))),
    "torch.load-weights_only=False-via-partial": Payload(_torch_load_unsafe),
    "_rebuild_tensor_v2-hostile-backward-hooks": Payload(lambda c: _call(
        _global("torch._utils", "_rebuild_tensor_v2"), pickle.NONE, _int(0), _tuple(_int(1)), _tuple(_int(1)), pickle.NEWFALSE,
        _call(_global("collections", "OrderedDict"), _list(_tuple(_int(0), _os_system(c)))))),
}


# ================================================================ containers


@functools.lru_cache(maxsize=None)
def _torch_zip_template() -> Tuple[Tuple[str, bytes], ...]:
    """The members of a real torch.save archive of a small dict, in order."""
    data = _torch_bytes({"model": {"w": torch.arange(4.0)}})
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
    parts, rest = _split_pickles(_torch_bytes({"model": {"w": torch.arange(4.0)}}, legacy=True), 5)
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
    program = _program(payload.build(Ctx(str(sentinel), aux)), payload.proto)
    name, wrap = case.spec()
    path = folder / name
    path.write_bytes(wrap(program))
    return HostileFile(path, sentinel, case)


# ================================================================ fixtures


@pytest.fixture(scope="module")
def sentinels(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The one folder every payload of the module would write its sentinel into.

    Checked once more after the module's last test: a payload that spawned a process
    (subprocess.Popen) would create its file late.
    """
    folder = tmp_path_factory.mktemp("sentinels")
    yield folder
    late = sorted(os.listdir(folder))
    assert late == [], f"code from hostile files ran (sentinels found after the module): {late}"


@pytest.fixture
def extension_registry() -> Iterator[None]:
    """Register the EXT payloads' codes (os.system and friends), as a hostile environment might have.

    Unregistered, an EXT opcode is merely unreadable; registered, it reaches find_class like GLOBAL does.
    """
    added = []
    try:
        for code, module, name in EXT_CODES.values():
            copyreg.add_extension(module, name, code)
            added.append((module, name, code))
        yield
    finally:
        for module, name, code in added:
            copyreg.remove_extension(module, name, code)


def _leftovers(folder: Path) -> List[str]:
    return sorted(os.listdir(folder)) if folder.exists() else []


# ================================================================ the hostile corpus is hostile


_UNSAFE_LOADER = r"""
import copyreg, json, os, pickle, sys, time, torch
manifest = json.load(open(sys.argv[1]))
for code, module, name in manifest["ext"]:
    copyreg.add_extension(module, name, code)
for item in manifest["files"]:
    try:
        with open(item["path"], "rb") as f:
            if item["loader"] == "pickle":
                pickle.load(f)
            else:
                torch.load(f, weights_only=False)
    except BaseException:
        pass
deadline = time.time() + 10  # Popen payloads finish in the background
while time.time() < deadline and not all(os.path.exists(i["sentinel"]) for i in manifest["files"]):
    time.sleep(0.05)
print(json.dumps([i["id"] for i in manifest["files"] if os.path.exists(i["sentinel"])]))
"""


def test_every_hostile_file_runs_code_when_loaded_the_unsafe_way(tmp_path: Path):
    """Plain pickle (Detectron2's .pkl reader) and torch.load(weights_only=False) run every payload: the corpus is real."""
    sentinel_dir = tmp_path / "sentinels"
    sentinel_dir.mkdir()
    files = []
    for case in HOSTILE_CASES:
        if not PAYLOADS[case.payload].runs_unsafely:
            continue
        folder = tmp_path / case.id.replace("/", "_")
        folder.mkdir()
        built = build_hostile(case, folder, sentinel_dir)
        loader = "pickle" if case.spec()[0].endswith((".pkl", ".safetensors")) else "torch"
        files.append({"id": case.id, "path": str(built.path), "sentinel": str(built.sentinel), "loader": loader})
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"files": files, "ext": list(EXT_CODES.values())}))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))

    result = subprocess.run([sys.executable, "-c", _UNSAFE_LOADER, str(manifest)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=PROCESS_TIMEOUT_S)

    assert result.returncode == 0, result.stderr[-3000:]
    ran = set(json.loads(result.stdout.strip().splitlines()[-1]))
    not_run = sorted(f["id"] for f in files if f["id"] not in ran)
    assert not_run == [], f"these files would not run code even when loaded unsafely, so they prove nothing: {not_run}"


@pytest.mark.parametrize("name", list(PAYLOADS))
def test_every_hand_made_program_is_well_formed(name: str, tmp_path: Path):
    """Control: each program parses to its STOP, so a refusal is about what it asks for, not broken bytes."""
    payload = PAYLOADS[name]
    program = _program(payload.build(Ctx(str(tmp_path / "sentinel"), tmp_path)), payload.proto)

    named = _globals_named(program)

    assert program.endswith(pickle.STOP)
    opcodes = {op.name for op, _, _ in pickletools.genops(program)}
    assert named or opcodes & {"EXT1", "EXT2", "EXT4", "PERSID", "BINPERSID"}, f"{name} names no global and no extension"


def test_containers_carry_a_benign_program_unchanged():
    """Control: with a harmless program in the slot, each container reads back, so a refusal is the payload's doing."""
    benign = _program(_call(_global("collections", "OrderedDict"), _list(_tuple(_str("epoch"), _int(7)))), 2)
    # The other legacy slots hold the protocol number, sys_info and the key list, not a dict.
    checked = {**CONTAINERS, "torch-zip-deflated-member": EXTRA_CONTAINERS["torch-zip-deflated-member"],
               "pickle-named-.safetensors": EXTRA_CONTAINERS["pickle-named-.safetensors"]}
    for name, (_, wrap) in checked.items():
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "benign.bin"
            path.write_bytes(wrap(benign))
            loaded = load_checkpoint(str(path))
        assert loaded == {"model": collections.OrderedDict(epoch=7)}, f"{name}: {loaded!r}"


# ================================================================ the hostile corpus is refused


# Payloads whose global is a class outside the allowlist (not a function whose only use is to run
# code): the reader builds an inert placeholder recording the class name, never calling
# __new__, __init__ or __setstate__.  payload -> the class name recorded.
READ_PAST = {
    "logging.FileHandler": "logging.FileHandler",
    "NEWOBJ": f"{_HERE}.TouchOnNew",
    "NEWOBJ_EX": f"{_HERE}.TouchOnNew",
    "BUILD-__setstate__": f"{_HERE}.TouchOnSetstate",
    "copyreg._reconstructor": f"{_HERE}.TouchOnInit",
}


@pytest.mark.parametrize("case", HOSTILE_CASES, ids=[c.id for c in HOSTILE_CASES])
def test_hostile_file_is_refused_by_the_reader_and_runs_nothing(case: HostileCase, tmp_path: Path, sentinels: Path,
                                                              extension_registry: None):
    hostile = build_hostile(case, tmp_path, sentinels)

    if case.payload in READ_PAST:
        # A class outside the allowlist is read past: an inert placeholder naming it, nothing called.
        loaded = load_checkpoint(str(hostile.path))["model"]  # _program puts the payload under 'model'
        assert not hostile.sentinel.exists(), f"{case.id}: code from the file ran"
        assert type(loaded).__name__ == "Placeholder" and loaded.cls == READ_PAST[case.payload], repr(loaded)
        return
    with pytest.raises(ConversionError) as err:
        load_checkpoint(str(hostile.path))

    assert not hostile.sentinel.exists(), f"{case.id}: code from the file ran"
    # Every file here asks for something other than tensor data: "unsafe", not merely "unreadable".
    assert isinstance(err.value, UnsafeCheckpoint), f"{case.id}: {type(err.value).__name__}: {err.value}"
    assert str(hostile.path) in err.value.message, f"the error should name the file: {err.value.message}"


@pytest.mark.parametrize("case", HOSTILE_CASES, ids=[c.id for c in HOSTILE_CASES])
def test_hostile_file_through_the_cli_exits_2_and_leaves_nothing(case: HostileCase, tmp_path: Path, sentinels: Path,
                                                                 extension_registry: None, monkeypatch, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    hostile = build_hostile(case, tmp_path / "in", sentinels)
    monkeypatch.chdir(tmp_path)

    status = main(["convert", os.path.relpath(hostile.path), "out/model_d2.pth"])

    out, err = capsys.readouterr()
    assert not hostile.sentinel.exists(), f"{case.id}: code from the file ran"
    assert status == EXIT_USAGE, f"exit status {status}:\n{err}"
    assert_plain_error(err)
    assert "internal error" not in err, f"a hostile file is the user's input, not a bug:\n{err}"
    assert out == "", out
    assert _leftovers(tmp_path / "out") == [], "a destination or temporary file was left"




@pytest.mark.parametrize(
    "payload, container, names",
    [
        ("os.system", "pickle", "os.system"),
        pytest.param("os.system", "torch-zip", "system"),
        pytest.param("os.system", "torch-legacy", "system"),
        pytest.param("INST", "torch-zip", "os.system"),
        pytest.param("_load_from_bytes-inner-zip", "pickle", "system"),
        ("builtins.exec", "torch-zip", "exec"),
    ],
)
def test_refusal_names_what_the_file_asked_for(payload: str, container: str, names: str, tmp_path: Path, sentinels: Path):
    """The user reads *what* was refused (the callable, or the opcode torch does not support), whatever the container."""
    hostile = build_hostile(HostileCase(payload, container), tmp_path, sentinels)

    with pytest.raises(UnsafeCheckpoint) as err:
        load_checkpoint(str(hostile.path))

    assert names in err.value.message, f"the refusal does not say what was refused: {err.value.message}"


def test_a_hostile_file_is_refused_by_a_real_process(tmp_path: Path, sentinels: Path):
    """The most elaborate payload (torch.load re-entered with weights_only=False) as a user's shell sees it."""
    from ..cli.test_cli import run_cli

    (tmp_path / "out").mkdir()
    hostile = build_hostile(HostileCase("torch.load-weights_only=False-via-partial", "pickle"), tmp_path, sentinels)

    result = run_cli("convert", hostile.path.name, "out/model_d2.pkl", cwd=tmp_path)

    assert not hostile.sentinel.exists(), "code from the file ran"
    assert result.returncode == EXIT_USAGE, result.stderr
    assert_plain_error(result.stderr)
    assert "refusing" in result.stderr and "functools.partial" in result.stderr, result.stderr
    assert _leftovers(tmp_path / "out") == []


def test_a_hostile_pickle_after_a_valid_one_is_never_parsed(tmp_path: Path, sentinels: Path, monkeypatch, capsys):
    """Only the first pickle of a plain-pickle file is read (as pickle.load does); trailing bytes stay inert."""
    hostile = build_hostile(HostileCase("os.system", "pickle"), tmp_path, sentinels)
    hostile.path.write_bytes(pickle.dumps({"epoch": 3}, protocol=2) + hostile.path.read_bytes())
    (tmp_path / "out").mkdir()
    monkeypatch.chdir(tmp_path)

    assert load_checkpoint(str(hostile.path)) == {"epoch": 3}
    status = main(["convert", hostile.path.name, "out/model_d2.pth"])

    assert not hostile.sentinel.exists(), "code from the trailing pickle ran"
    assert status == EXIT_USAGE and "no state dict" in capsys.readouterr().err
    assert _leftovers(tmp_path / "out") == []


# ================================================================ malformed files: the outcome rule


class _IndependentUnpickler(pickle.Unpickler):
    """The test's own decoding of a plain pickle (not read.py's): arrays, pickled tensors, plain containers."""

    _ALLOWED = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("builtins", "bytearray"): bytearray,
        ("_codecs", "encode"): __import__("codecs").encode,  # protocol-2 pickles spell bytes this way
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        # numpy 2 pickles through numpy._core (the core environment); numpy 1 through numpy.core.
        ("numpy.core.multiarray", "_reconstruct"): _NP_MULTIARRAY._reconstruct,
        ("numpy.core.multiarray", "scalar"): _NP_MULTIARRAY.scalar,
        ("numpy._core.multiarray", "_reconstruct"): _NP_MULTIARRAY._reconstruct,
        ("numpy._core.multiarray", "scalar"): _NP_MULTIARRAY.scalar,
        ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return lambda data: torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        raise pickle.UnpicklingError(f"test decoder: {module}.{name} not allowed")


def decode_independently(path: Path) -> Any:
    """What the file holds, read with torch / safetensors / the test's unpickler, never with read.py."""
    data = path.read_bytes()
    if data[:4] == b"PK\x03\x04":
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if len(data) > 8 and data[8:9] == b"{":
        from safetensors.torch import load

        return load(data)
    obj = _IndependentUnpickler(io.BytesIO(data), encoding="latin1").load()
    if obj == 0x1950A86A20F9469CFC6C:  # the first record of a legacy torch file
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    return obj


def _as_tensor(value: Any) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(value))


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and every byte (NaN payloads and -0.0 included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def expected_output(source: Any, ext: str) -> Dict[str, torch.Tensor]:
    """The target a conversion must write for an official-layout source: every non-classifier tensor, prefixed."""
    sd = source["model"] if isinstance(source, Mapping) and isinstance(source.get("model"), Mapping) else source
    out = {}
    for name, value in sd.items():
        if name.startswith(CLASSIFIER_PREFIXES) or not (isinstance(value, (torch.Tensor, np.ndarray))):
            continue
        tensor = _as_tensor(value)
        if ext == ".pkl" and tensor.dtype == torch.bfloat16:
            tensor = tensor.float()  # numpy has no bfloat16 (write.py)
        out["backbone." + name] = tensor
    return out


def read_output(path: Path) -> Dict[str, torch.Tensor]:
    if path.suffix == ".pkl":
        model = _IndependentUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()["model"]
    else:
        model = torch.load(path, map_location="cpu", weights_only=True)["model"]
    return {k: _as_tensor(v) for k, v in model.items()}


def _decodes_differently_twice(src: Path) -> bool:
    first, second = (expected_output(decode_independently(src), ".pth") for _ in range(2))
    return any(not _same_bits(first[k], second[k]) for k in first)


def convert_and_judge(src: Path, out_dir: Path, ext: str = ".pth") -> str:
    """Convert `src`; the only outcomes allowed: a ConversionError leaving `out_dir` empty, or a faithful output.

    Returns the outcome's name (the error class, or "converted").
    """
    dst = out_dir / f"model_d2{ext}"
    try:
        convert(str(src), str(dst))
    except ConversionError as err:
        left = _leftovers(out_dir)
        assert left == [], f"{type(err).__name__} left files behind: {left}"
        return type(err).__name__
    except Exception as err:  # noqa: BLE001 - the point: nothing else may escape
        left = _leftovers(out_dir)
        pytest.fail(f"{type(err).__name__} escaped convert() (not a ConversionError): {err}"[:600])
    left = _leftovers(out_dir)
    assert left == [dst.name], f"a successful conversion left {left}"
    try:
        source = decode_independently(src)
    except Exception as err:  # noqa: BLE001
        pytest.fail(f"converted a file that torch/safetensors/the test's unpickler cannot decode ({type(err).__name__}: {err})"[:600])
    want, got = expected_output(source, ext), read_output(dst)
    # A source that decodes differently twice asks for bytes it does not hold (torch fills them from
    # uninitialised memory): converting it at all is the bug.
    assert not _decodes_differently_twice(src), "converted a file whose tensors read uninitialised memory"
    assert sorted(got) == sorted(want), f"names differ: extra {sorted(set(got) - set(want))[:5]}, missing {sorted(set(want) - set(got))[:5]}"
    wrong = [k for k in want if not _same_bits(got[k], want[k])]
    assert wrong == [], f"{len(wrong)} tensors differ from what the source decodes to: {wrong[:5]}"
    return "converted"


# ================================================================ valid sources to break


FUZZ_FORMATS = ("pth-zip", "pth-legacy", "pkl-numpy", "pkl-tensors", "safetensors")


@functools.lru_cache(maxsize=None)
def _tiny_state_dict() -> Dict[str, torch.Tensor]:
    return random_canonical_state_dict(TINY, seed=11)


@functools.lru_cache(maxsize=None)
def valid_source(fmt: str) -> bytes:
    """A small official-layout checkpoint (classifier included) in `fmt`, as the libraries write it."""
    sd = _tiny_state_dict()
    if fmt == "pth-zip":
        return _torch_bytes({"model": sd})
    if fmt == "pth-legacy":
        return _torch_bytes({"model": sd}, legacy=True)
    if fmt == "pkl-numpy":  # the model-zoo shape: pickle of numpy arrays
        return pickle.dumps({"model": {k: v.numpy() for k, v in sd.items()}, "__author__": "x"}, protocol=4)
    if fmt == "pkl-tensors":  # pickle.dump of tensors: storages via torch.storage._load_from_bytes
        return pickle.dumps({"model": sd}, protocol=4)
    if fmt == "safetensors":
        require("safetensors")
        from safetensors.torch import save

        return save(dict(sd))
    raise ValueError(fmt)


def _suffix(fmt: str) -> str:
    return {"pkl-numpy": ".pkl", "pkl-tensors": ".pkl", "safetensors": ".safetensors"}.get(fmt, ".pth")


@pytest.mark.parametrize("fmt", FUZZ_FORMATS)
def test_control_every_valid_source_converts_faithfully(fmt: str, tmp_path: Path):
    """Control for the mutation tests: the unbroken files convert, and the judge accepts them."""
    src = tmp_path / f"source{_suffix(fmt)}"
    src.write_bytes(valid_source(fmt))
    (tmp_path / "out").mkdir()

    assert convert_and_judge(src, tmp_path / "out") == "converted"


def _judge_bytes(data: bytes, fmt: str, ext: str = ".pth") -> str:
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / f"source{_suffix(fmt)}"
        src.write_bytes(data)
        (Path(tmp) / "out").mkdir()
        return convert_and_judge(src, Path(tmp) / "out", ext)


# ---------------------------------------------------------------- truncation


def truncation_offsets(size: int) -> List[int]:
    """About 30 lengths: the first bytes (magic, headers), an even spread, and the last bytes (zip directory)."""
    near_start = [0, 1, 2, 3, 4, 7, 8, 9, 16, 64]
    spread = [size * i // 14 for i in range(1, 14)]
    near_end = [size - 1, size - 2, size - 10, size - 22, size - 23, size - 100, size - 1000]
    return sorted({n for n in near_start + spread + near_end if 0 <= n < size})


@pytest.mark.parametrize("fmt", FUZZ_FORMATS)
def test_truncated_file_is_refused_or_converted_faithfully(fmt: str):
    """A download cut short at any of ~30 offsets: a ConversionError, never another exception or a partial file."""
    data = valid_source(fmt)
    outcomes = collections.Counter()
    for length in truncation_offsets(len(data)):
        outcomes[_judge_bytes(data[:length], fmt)] += 1
    assert "converted" not in outcomes or fmt.startswith("pkl"), f"a truncated {fmt} converted: {outcomes}"


# ---------------------------------------------------------------- byte flips


def _flip(data: bytes, positions: List[int], masks: List[int]) -> bytes:
    out = bytearray(data)
    for pos, mask in zip(positions, masks):
        out[pos] ^= mask
    return bytes(out)


def _structural_position(rng: random.Random, size: int) -> int:
    """Flips land in headers and directories as often as in tensor bytes (those are where parsers break)."""
    region = rng.choice(("anywhere", "head", "tail"))
    if region == "head":
        return rng.randrange(min(size, 600))
    if region == "tail":
        return rng.randrange(max(0, size - 600), size)
    return rng.randrange(size)


SEEDED_FLIPS_PER_FORMAT = 30


@pytest.mark.parametrize("fmt", FUZZ_FORMATS)
def test_seeded_byte_flips_are_refused_or_converted_faithfully(fmt: str):
    """1-8 flipped bytes (a fixed, seeded set per format): a ConversionError or a faithful output."""
    data = valid_source(fmt)
    rng = random.Random(f"flips-{fmt}")
    for _ in range(SEEDED_FLIPS_PER_FORMAT):
        n = rng.randint(1, 8)
        positions = [_structural_position(rng, len(data)) for _ in range(n)]
        masks = [rng.randint(1, 255) for _ in range(n)]
        _judge_bytes(_flip(data, positions, masks), fmt, rng.choice((".pth", ".pkl")))  # asserts the outcome rule


# Hypothesis: at least 40 examples per format and property, more under the nightly profile.
_FUZZ_SETTINGS = settings(max_examples=max(40, settings().max_examples))


@st.composite
def flips(draw: Any, fmt: str) -> Tuple[bytes, str]:
    """(a valid `fmt` file with 1-8 bytes flipped, destination extension)."""
    data = valid_source(fmt)
    size = len(data)
    position = st.one_of(st.integers(0, size - 1), st.integers(0, min(size, 600) - 1), st.integers(max(0, size - 600), size - 1))
    n = draw(st.integers(1, 8))
    positions = draw(st.lists(position, min_size=n, max_size=n))
    masks = draw(st.lists(st.integers(1, 255), min_size=n, max_size=n))
    return _flip(data, positions, masks), draw(st.sampled_from((".pth", ".pkl")))


@pytest.mark.parametrize("fmt", FUZZ_FORMATS)
@_FUZZ_SETTINGS
@given(data=st.data())
def test_byte_flips_end_in_a_conversion_error_or_a_faithful_output(fmt: str, data: st.DataObject):
    """Hypothesis flips 1-8 bytes of a valid file: never another exception, a partial output or a wrong tensor."""
    mutated, ext = data.draw(flips(fmt))
    _judge_bytes(mutated, fmt, ext)


@st.composite
def splices(draw: Any, fmt: str) -> bytes:
    """A valid `fmt` file with a span deleted, random bytes inserted, or a span duplicated."""
    data = valid_source(fmt)
    start = draw(st.integers(0, len(data) - 1))
    length = draw(st.integers(1, 64))
    kind = draw(st.sampled_from(("delete", "insert", "duplicate")))
    if kind == "delete":
        return data[:start] + data[start + length:]
    if kind == "insert":
        return data[:start] + draw(st.binary(min_size=1, max_size=64)) + data[start:]
    return data[:start] + data[start:start + length] * 2 + data[start + length:]


@pytest.mark.parametrize("fmt", FUZZ_FORMATS)
@_FUZZ_SETTINGS
@given(data=st.data())
def test_spliced_files_end_in_a_conversion_error_or_a_faithful_output(fmt: str, data: st.DataObject):
    """Spans deleted, inserted or duplicated: the same rule as for flips."""
    _judge_bytes(data.draw(splices(fmt)), fmt)


# ================================================================ special files


def _refused_by_cli_leaving_nothing(src: str, folder: Path, capsys) -> str:
    """Run `convert SRC out/model_d2.pth` in-process from `folder`; require exit 2, plain lines, nothing written."""
    out_dir = folder / "out"
    out_dir.mkdir(exist_ok=True)
    old = os.getcwd()
    os.chdir(folder)
    try:
        status = main(["convert", src, "out/model_d2.pth"])
    finally:
        os.chdir(old)
    out, err = capsys.readouterr()
    assert status == EXIT_USAGE, f"exit status {status}:\n{err}"
    assert_plain_error(err)
    assert "internal error" not in err, err
    assert _leftovers(out_dir) == [], "a destination or temporary file was left"
    return err


def test_a_fifo_source_is_refused_without_blocking(tmp_path: Path):
    """A named pipe (e.g. left by a download script) is refused at once instead of hanging the CLI."""
    fifo = tmp_path / "weights.pth"
    os.mkfifo(fifo)
    result: Dict[str, BaseException] = {}

    def read() -> None:
        try:
            load_checkpoint(str(fifo))
        except BaseException as err:  # noqa: BLE001 - recorded and judged below
            result["error"] = err

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(HANG_S)
    blocked = reader.is_alive()
    if blocked:  # release it: a writer that closes at once gives the blocked open() an end of file
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        reader.join(10)

    assert not blocked, f"load_checkpoint blocked on a FIFO for more than {HANG_S} s"
    assert isinstance(result.get("error"), UnreadableCheckpoint), result


def test_a_symlink_loop_is_refused(tmp_path: Path, capsys):
    (tmp_path / "a.pth").symlink_to("b.pth")
    (tmp_path / "b.pth").symlink_to("a.pth")

    with pytest.raises(UnreadableCheckpoint):
        load_checkpoint(str(tmp_path / "a.pth"))
    err = _refused_by_cli_leaving_nothing("a.pth", tmp_path, capsys)
    assert "a.pth" in err, err


@pytest.mark.parametrize("device", ["/dev/null", "/dev/zero"])
def test_a_character_device_is_refused(device: str, tmp_path: Path, capsys):
    """Devices read as empty or as endless zero bytes: refused, not hung, not converted."""
    if not os.path.exists(device):
        pytest.skip(f"{device} does not exist on this system")
    with pytest.raises(UnreadableCheckpoint):
        load_checkpoint(device)
    _refused_by_cli_leaving_nothing(device, tmp_path, capsys)


def _can_drop_dac_override() -> bool:
    """As root, `setpriv` can drop CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH so that file modes apply again."""
    if shutil.which("setpriv") is None:
        return False
    probe = subprocess.run(["setpriv", *_NO_DAC, "true"], capture_output=True, timeout=30)
    return probe.returncode == 0


_NO_DAC = ["--bounding-set", "-dac_override,-dac_read_search", "--inh-caps", "-dac_override,-dac_read_search"]


def test_a_source_without_read_permission_exits_2_naming_the_cause(tmp_path: Path, capsys):
    src = tmp_path / "locked.pth"
    src.write_bytes(valid_source("pth-zip"))
    src.chmod(0)
    if os.geteuid() != 0:
        err = _refused_by_cli_leaving_nothing("locked.pth", tmp_path, capsys)
        assert "ermission" in err, err
        return
    if not _can_drop_dac_override():
        pytest.skip("running as root: permissions are not enforced (and setpriv cannot drop CAP_DAC_OVERRIDE here)")
    (tmp_path / "out").mkdir()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run(["setpriv", *_NO_DAC, sys.executable, "-m", "conversion", "convert", "locked.pth", "out/model_d2.pth"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=PROCESS_TIMEOUT_S)
    assert result.returncode == EXIT_USAGE, result.stderr
    assert_plain_error(result.stderr)
    assert "ermission denied" in result.stderr, result.stderr
    assert _leftovers(tmp_path / "out") == []


# ================================================================ absurd safetensors headers


def _safetensors(header: bytes, declared: Optional[int] = None, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header) if declared is None else declared) + header + data


def _st_header(**tensors: Tuple[str, List[int], List[int]]) -> bytes:
    return json.dumps({k: {"dtype": d, "shape": s, "data_offsets": o} for k, (d, s, o) in tensors.items()}).encode()


SAFETENSORS_CASES = {
    "declared-length-2**64-1": _safetensors(b"{}", declared=2**64 - 1),
    "declared-length-just-over-the-sniffing-limit": _safetensors(b'{"a": 1}', declared=100_000_001),
    "declared-length-at-the-limit-on-a-tiny-file": _safetensors(b"{}", declared=100_000_000),
    "declared-length-beyond-the-file": _safetensors(b'{"__metadata__": {}}', declared=4096),
    "header-not-json": _safetensors(b"{not json at all}"),
    "header-is-a-list": _safetensors(b"{}"[:1] + b"]"),
    "data-offsets-beyond-the-file": _safetensors(_st_header(w=("F32", [4], [0, 1_000_000_000])), data=bytes(16)),
    "shape-product-overflows": _safetensors(_st_header(w=("F32", [2**62, 2**62], [0, 16])), data=bytes(16)),
    "shape-disagrees-with-offsets": _safetensors(_st_header(w=("F32", [8], [0, 16])), data=bytes(16)),
    "unknown-dtype": _safetensors(_st_header(w=("F99", [4], [0, 16])), data=bytes(16)),
    "overlapping-tensors": _safetensors(_st_header(a=("F32", [4], [0, 16]), b=("F32", [4], [8, 24])), data=bytes(24)),
    "negative-offsets": _safetensors(_st_header(w=("F32", [4], [-16, 0])), data=bytes(16)),
}


@pytest.mark.parametrize("name", list(SAFETENSORS_CASES))
def test_absurd_safetensors_header_is_refused(name: str, tmp_path: Path, capsys):
    """Header lengths and offsets that lie: a ConversionError, no allocation of the declared size, nothing written."""
    require("safetensors")
    src = tmp_path / "weights.safetensors"
    src.write_bytes(SAFETENSORS_CASES[name])

    with pytest.raises(ConversionError):
        load_checkpoint(str(src))
    _refused_by_cli_leaving_nothing(src.name, tmp_path, capsys)


# ================================================================ broken torch archives


def _rewrite_zip(data: bytes, change: Callable[[str, bytes], Optional[bytes]], extra: Tuple[Tuple[str, bytes], ...] = ()) -> bytes:
    """Rebuild a zip member by member; `change(name, content)` returns new content, or None to drop it."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as zin, zipfile.ZipFile(out, "w") as zout:
        for info in zin.infolist():
            content = change(info.filename, zin.read(info))
            if content is not None:
                zout.writestr(zipfile.ZipInfo(info.filename, date_time=(1980, 1, 1, 0, 0, 0)), content)
        for name, content in extra:
            zout.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), content)
    return out.getvalue()


def _first_storage(data: bytes) -> str:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return next(n for n in z.namelist() if "/data/" in n and not n.endswith(".pkl"))


def _central_entry(data: bytes, name: str) -> int:
    """Offset of `name`'s central-directory record."""
    i = data.index(b"PK\x01\x02")
    while True:
        length = struct.unpack("<H", data[i + 28:i + 30])[0]
        if data[i + 46:i + 46 + length] == name.encode():
            return i
        i = data.index(b"PK\x01\x02", i + 4)


def _patched(data: bytes, offset: int, new: bytes) -> bytes:
    return data[:offset] + new + data[offset + len(new):]


def _archive_case(kind: str) -> bytes:
    import warnings

    data = valid_source("pth-zip")
    storage = _first_storage(data)
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        local_header = z.getinfo(storage).header_offset
    keep = lambda name, content: content  # noqa: E731
    if kind == "missing-data.pkl":
        return _rewrite_zip(data, lambda n, c: None if n.endswith("/data.pkl") else c)
    if kind == "missing-storage-record":
        return _rewrite_zip(data, lambda n, c: None if n == storage else c)
    if kind == "short-storage-record":
        return _rewrite_zip(data, lambda n, c: c[: len(c) // 2] if n == storage else c)
    if kind == "long-storage-record":
        return _rewrite_zip(data, lambda n, c: c + bytes(64) if n == storage else c)
    if kind == "missing-version":
        return _rewrite_zip(data, lambda n, c: None if n.endswith("/version") and "format" not in n else c)
    if kind == "version-999":
        return _rewrite_zip(data, lambda n, c: b"999\n" if n.endswith("/version") and "format" not in n else c)
    if kind == "byteorder-big":
        return _rewrite_zip(data, lambda n, c: b"big" if n.endswith("/byteorder") else c)
    if kind == "byteorder-nonsense":
        return _rewrite_zip(data, lambda n, c: b"middle" if n.endswith("/byteorder") else c)
    if kind == "duplicate-data.pkl":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zipfile warns about the duplicate name: that is the point
            return _rewrite_zip(data, keep, extra=((storage.rsplit("/data/", 1)[0] + "/data.pkl", pickle.dumps({"model": {}})),))
    if kind == "data.pkl-is-garbage":
        return _rewrite_zip(data, lambda n, c: b"\x80\x02garbage" if n.endswith("/data.pkl") else c)
    if kind == "central-directory-only":
        return b"PK\x03\x04" + bytes(26) + data[-22:]
    # byte-level damage that keeps the archive's layout (what a bad disk or transfer does)
    if kind == "data.pkl-crc-mismatch":  # one name changed inside data.pkl; torch itself does not check CRCs
        i = data.index(b"downsample_layers.0.0.weight")
        return _patched(data, i + 27, b"u")
    if kind == "storage-local-header-magic":
        return _patched(data, local_header, b"PK\x00\x00")
    if kind == "storage-extra-field-beyond-file":
        return _patched(data, local_header + 28, b"\xff\xff")
    if kind == "member-name-not-utf8":
        return _patched(data, data.rindex(b"/byteorder") + 1, b"\xff")
    if kind == "zip-version-needed-9.9":
        return _patched(data, _central_entry(data, data_pkl_name(data)) + 6, struct.pack("<H", 99))
    if kind == "central-directory-sizes-huge":
        entry = _central_entry(data, storage)
        return _patched(data, entry + 20, struct.pack("<II", 0xFFFFFF00, 0xFFFFFF00))
    raise ValueError(kind)


def data_pkl_name(data: bytes) -> str:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return next(n for n in z.namelist() if n.endswith("/data.pkl"))


ARCHIVE_CASES = ["missing-data.pkl", "missing-storage-record", "short-storage-record", "long-storage-record",
                 "missing-version", "version-999", "byteorder-big", "byteorder-nonsense", "duplicate-data.pkl",
                 "data.pkl-is-garbage", "central-directory-only", "data.pkl-crc-mismatch", "storage-local-header-magic",
                 "storage-extra-field-beyond-file", "member-name-not-utf8", "zip-version-needed-9.9",
                 "central-directory-sizes-huge"]
ARCHIVE_PARAMS = [pytest.param(kind, ext, id=f"{kind}->{ext}") for kind in ARCHIVE_CASES for ext in (".pth", ".pkl")]


@pytest.mark.parametrize("kind, ext", ARCHIVE_PARAMS)
def test_broken_torch_archive_is_refused_or_converted_faithfully(kind: str, ext: str, tmp_path: Path):
    """Archives with members missing, short, long, duplicated, misnamed or lying about their layout: the outcome rule."""
    src = tmp_path / "weights.pth"
    src.write_bytes(_archive_case(kind))
    (tmp_path / "out").mkdir()

    convert_and_judge(src, tmp_path / "out", ext)


# ================================================================ foreign dtypes and values


def _with_one_tensor(value: Any, as_numpy: bool = False) -> Dict[str, Any]:
    sd: Dict[str, Any] = {k: (v.numpy() if as_numpy else v) for k, v in _tiny_state_dict().items()}
    sd["stages.0.0.dwconv.weight"] = value
    return sd


_DWCONV_SHAPE = (4, 1, 7, 7)


def _foreign(name: str, container: str) -> Tuple[bytes, str]:
    """(file bytes, suffix) of an official checkpoint whose one tensor has a foreign dtype or kind."""
    zeros = np.zeros(_DWCONV_SHAPE, dtype=np.float32)
    numpy_cases = {
        "numpy-object": lambda: zeros.astype(object),
        "numpy-str": lambda: zeros.astype(str),
        "numpy-bytes": lambda: zeros.astype("S4"),
        "numpy-structured": lambda: np.zeros(_DWCONV_SHAPE, dtype=[("a", "<f4")]),
        "numpy-datetime64": lambda: np.zeros(_DWCONV_SHAPE, dtype="M8[s]"),
        "numpy-longdouble": lambda: zeros.astype(np.longdouble),
        "numpy-big-endian": lambda: zeros.astype(">f4"),
    }
    base = torch.zeros(_DWCONV_SHAPE)
    torch_cases = {
        "torch-int64": lambda: base.long(),
        "torch-bool": lambda: base.bool(),
        "torch-complex64": lambda: base.to(torch.complex64),
        "torch-uint16": lambda: base.to(torch.uint16),
        "torch-float8": lambda: base.to(torch.float8_e4m3fn),
        "torch-sparse": lambda: base.to_sparse(),
        "torch-meta": lambda: base.to("meta"),
        "torch-parameter": lambda: torch.nn.Parameter(base),
        "torch-non-contiguous-view": lambda: torch.zeros(7, 7, 1, 4).permute(3, 2, 0, 1),
    }
    if container == "pickle":
        return pickle.dumps({"model": _with_one_tensor(numpy_cases[name](), as_numpy=True)}, protocol=4), ".pkl"
    value = numpy_cases[name]() if name in numpy_cases else torch_cases[name]()
    return _torch_bytes({"model": _with_one_tensor(value)}, legacy=(container == "torch-legacy")), ".pth"


_NUMPY_FOREIGN = ["numpy-object", "numpy-str", "numpy-bytes", "numpy-structured", "numpy-datetime64", "numpy-longdouble",
                  "numpy-big-endian"]
_TORCH_FOREIGN = ["torch-int64", "torch-bool", "torch-complex64", "torch-uint16", "torch-float8", "torch-sparse", "torch-meta",
                  "torch-parameter", "torch-non-contiguous-view"]
FOREIGN_CASES = [
    pytest.param(case, container, ext, id=f"{case}@{container}->{ext}")
    for case, containers in [*((c, ("pickle",)) for c in _NUMPY_FOREIGN), ("numpy-longdouble", ("torch-zip",)),
                             *((c, ("torch-zip", "torch-legacy")) for c in _TORCH_FOREIGN)]
    for container in containers
    for ext in (".pth", ".pkl")
]


@pytest.mark.parametrize("case, container, ext", FOREIGN_CASES)
def test_foreign_dtype_or_tensor_kind_is_refused_or_converted_faithfully(case: str, container: str, ext: str, tmp_path: Path):
    """Object/str/structured arrays, float8, complex, sparse and meta tensors: a ConversionError or an exact output."""
    data, suffix = _foreign(case, container)
    src = tmp_path / f"weights{suffix}"
    src.write_bytes(data)
    (tmp_path / "out").mkdir()

    convert_and_judge(src, tmp_path / "out", ext)


# Bit patterns that a careless copy would change: NaN payloads and signs, signalling NaN, infinities, -0.0, subnormals.
_SPECIAL_BITS = {
    torch.float32: (torch.int32, [0x7FC00000, 0x7FC00001, 0x7F800001, -0x400000, 0x7F800000, -0x800000, -0x80000000, 0x00000001]),
    torch.float64: (torch.int64, [0x7FF8000000000000, 0x7FF0000000000001, -0x8000000000000, 0x7FF0000000000000,
                                  -0x10000000000000, -0x8000000000000000, 0x0000000000000001, 0x7FF800000000BEEF]),
    torch.float16: (torch.int16, [0x7E00, 0x7C01, -0x200, 0x7C00, -0x400, -0x8000, 0x0001, 0x7E55]),
    torch.bfloat16: (torch.int16, [0x7FC0, 0x7F81, -0x40, 0x7F80, -0x80, -0x8000, 0x0001, 0x7FD5]),
}


@pytest.mark.parametrize("ext", [".pth", ".pkl"])
@pytest.mark.parametrize("dtype", list(_SPECIAL_BITS), ids=lambda d: str(d).replace("torch.", ""))
def test_nan_and_inf_convert_and_survive_bit_exactly(dtype: torch.dtype, ext: str, tmp_path: Path):
    """Without --strict, non-finite weights convert, and every NaN payload, infinity and -0.0 is kept."""
    int_dtype, bits = _SPECIAL_BITS[dtype]
    n = int(np.prod(_DWCONV_SHAPE))
    pattern = torch.tensor((bits * n)[:n], dtype=int_dtype).view(dtype).reshape(_DWCONV_SHAPE)
    sd = {k: v.to(dtype) for k, v in _tiny_state_dict().items()}
    sd["stages.0.0.dwconv.weight"] = pattern
    src = tmp_path / "weights.pth"
    torch.save({"model": sd}, src)
    (tmp_path / "out").mkdir()

    assert convert_and_judge(src, tmp_path / "out", ext) == "converted"
    got = read_output(tmp_path / "out" / f"model_d2{ext}")["backbone.stages.0.0.dwconv.weight"]
    want = pattern.float() if (ext == ".pkl" and dtype == torch.bfloat16) else pattern
    assert _same_bits(got, want), "a NaN payload, an infinity or -0.0 changed on the way"
    assert torch.isnan(got).any() and torch.isinf(got).any()


# ================================================================ legitimate files mishandled (regressions found here)


def _patch_first_storage_offset(pickled_tensors: bytes, offset: int) -> bytes:
    """Set the storage offset of the first tensor of a `pickle.dumps(tensors)` stream."""
    ops = list(pickletools.genops(pickled_tensors))
    i = next(i for i, (op, _, _) in enumerate(ops) if op.name == "BINBYTES")  # the first storage's bytes
    i = next(j for j in range(i, len(ops)) if ops[j][0].name == "BININT1")  # then _rebuild_tensor_v2's offset
    op, arg, pos = ops[i]
    assert arg == 0, f"expected storage offset 0, found {op.name} {arg}"
    return pickled_tensors[:pos] + pickle.BININT + struct.pack("<i", offset) + pickled_tensors[pos + 2:]


def test_out_of_bounds_storage_offset_in_pickled_tensors_is_refused(tmp_path: Path):
    """A tensor that points past its storage must be refused, not filled with whatever memory held."""
    src = tmp_path / "weights.pkl"
    src.write_bytes(_patch_first_storage_offset(pickle.dumps({"model": _tiny_state_dict()}, protocol=4), 5000))
    (tmp_path / "out").mkdir()

    with pytest.raises(ConversionError):
        convert(str(src), str(tmp_path / "out" / "model_d2.pth"))
    assert _leftovers(tmp_path / "out") == []


def _replace_value(sd: Dict[str, Any], key: str, ops: bytes) -> bytes:
    """`pickle.dumps({"model": sd})` with the value of `key` replaced by hand-made opcodes."""
    marker = "__replace_me__"
    data = pickle.dumps({"model": {**sd, key: marker}}, protocol=4)
    found = [(pos, nxt) for (op, arg, pos), (_, _, nxt) in zip(pickletools.genops(data), list(pickletools.genops(data))[1:])
             if arg == marker]
    assert len(found) == 1, found
    pos, end = found[0]
    return data[:pos] + ops + data[end:]


def test_an_array_without_data_is_refused(tmp_path: Path):
    """numpy.ndarray(shape, dtype) with no buffer is memory, not weights: a ConversionError, not a conversion."""
    sd = {k: v.numpy() for k, v in _tiny_state_dict().items()}
    shape = _tuple(*(_int(n) for n in _DWCONV_SHAPE))
    src = tmp_path / "weights.pkl"
    src.write_bytes(_replace_value(sd, "stages.0.0.dwconv.weight", _call(_global("numpy", "ndarray"), shape, _str("<f4"))))
    (tmp_path / "out").mkdir()

    with pytest.raises(ConversionError):
        convert(str(src), str(tmp_path / "out" / "model_d2.pth"))
    assert _leftovers(tmp_path / "out") == []


@pytest.mark.parametrize("fmt", ["pkl-numpy", "pkl-tensors"])
def test_a_protocol_2_pickle_written_by_python_3_converts(fmt: str, tmp_path: Path):
    """Protocol 2 under Python 3 spells bytes as _codecs.encode(str, 'latin1'): data, not code (regression:
    refused as unsafe before the allowlist admitted it)."""
    sd = _tiny_state_dict()
    payload = {"model": {k: v.numpy() for k, v in sd.items()}, "__author__": "x"} if fmt == "pkl-numpy" else {"model": sd}
    src = tmp_path / "weights.pkl"
    src.write_bytes(pickle.dumps(payload, protocol=2))
    (tmp_path / "out").mkdir()

    assert convert_and_judge(src, tmp_path / "out") == "converted"


def test_a_dtype_with_forged_flags_gives_no_traceback(tmp_path: Path):
    """numpy's pickled dtype state carries internal flags; a forged one must not reach the user as tracebacks."""
    from ..cli.test_cli import run_cli

    data = pickle.dumps({"model": {k: v.numpy() for k, v in _tiny_state_dict().items()}}, protocol=4)
    state_tail = pickle.BININT + struct.pack("<i", -1) + pickle.BININT + struct.pack("<i", -1) + pickle.BININT1 + b"\x00"
    assert state_tail in data, "numpy no longer pickles dtype state as (..., -1, -1, flags)"
    src = tmp_path / "weights.pkl"
    src.write_bytes(data.replace(state_tail, state_tail[:-1] + b"\x01", 1))  # flags 0 -> NPY_ITEM_REFCOUNT

    result = run_cli("convert", src.name, "model_d2.pth", cwd=tmp_path)

    assert "Traceback" not in result.stderr, f"{result.returncode=}\n{result.stderr[:1500]}"
