"""Read a checkpoint file without running code from it, and find the state dict inside.

Which reader applies is decided by the file's bytes, not its name: a torch zip archive, a
legacy (pre-1.6) torch file and a plain pickle are all unpickled by the one bounded unpickler
(`conversion.io.safe_pickle`), on every torch version; torch's own `torch.load` is never called.
Tensors are rebuilt here from their storages' bytes, after checking each lies inside its storage.
Detectron2 itself decides by extension, which is why a torch archive named `.pkl` breaks it
(see `diagnose`).
"""
from __future__ import annotations

import collections
import io
import itertools
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple, Union

from .errors import UnreadableCheckpoint
from .formats import ZIP_MAGIC, check_source, is_torch_zip
from .io.handles import ITEM_SIZE, STORAGE_DTYPES, ArrayRef, FileBytes, Inflated, InMemory, Location, StorageRef, TensorRef, contiguous_stride
from .io.legacy_torch import LEGACY_TORCH_MAGIC, read_inner_file, read_inner_in_file, read_legacy
from .io.tensor_bytes import read_run
from .io.safe_pickle import BUDGET_SLACK, Budget, Payload, Placeholder, SafeUnpickler

_NUMPY_OF = {
    "float32": "<f4", "float16": "<f2", "float64": "<f8", "int64": "<i8", "int32": "<i4", "int16": "<i2",
    "int8": "|i1", "uint8": "|u1", "bool": "|b1", "bfloat16": "<i2", "complex64": "<c8", "complex128": "<c16",
}
# Reading a pickle's metadata: a small read-ahead, so that stepping over a payload wastes little.
_METADATA_BUFFER = 1024
# What `_tensors` is given per storage key: raw bytes (a torch archive's records) or a location.
StorageBytes = Union[bytes, bytearray, FileBytes, Inflated, InMemory]


def read_location(fd: Optional[int], location: Location) -> bytearray:
    """The bytes at `location`: `FileBytes` of the file open as `fd` (io.tensor_bytes.read_run),
    a copy for `InMemory`.  A torch archive's records, deflated ones included, are read whole by
    its own reader (`ArchiveIndex.storage_bytes`), so no `Inflated` location reaches this.

    Raises:
        UnreadableCheckpoint: the file ends inside the location.
    """
    if isinstance(location, InMemory):
        return bytearray(location.data)
    if isinstance(location, Inflated):
        raise NotImplementedError("Inflated locations are read by the torch archive reader (io.torchzip), not here.")
    if fd is None:
        raise ValueError("a location in the file needs the source file open")
    try:
        return read_run(fd, location.offset, location.nbytes)
    except EOFError as short:
        raise UnreadableCheckpoint(
            f"the file ends {short.args[0]} bytes into a {location.nbytes}-byte storage at offset {location.offset}.",
            "The file is truncated (or changed while being read); re-download or re-save it.",
        ) from None


def _tensors(storages: Dict[str, StorageBytes], fd: Optional[int] = None) -> Callable[[Any], Any]:
    """Handle -> value: a TensorRef becomes a torch tensor over its storage's bytes (one storage
    tensor per key, views shared), an ArrayRef the numpy array it was, a Payload its bytes or string.
    torch is imported on the first tensor only: a file of numpy arrays is read without it."""
    flat: Dict[str, Any] = {}

    def raw(key: str) -> Any:
        data = storages.get(key)
        return read_location(fd, data) if isinstance(data, (FileBytes, Inflated, InMemory)) else data

    def build(ref: Any) -> Any:
        import numpy as np

        if isinstance(ref, Payload):
            data = read_location(fd, ref.location)
            return data if ref.stands_for == "bytearray" else bytes(data) if ref.stands_for == "bytes" else data.decode("latin1")
        if isinstance(ref, ArrayRef):  # its own storage: arrays never share bytes
            array = np.frombuffer(raw(ref.storage.key), ref.array_dtype)
            fortran = len(ref.shape) > 1 and ref.stride != contiguous_stride(ref.shape)
            return array.reshape(ref.shape, order="F" if fortran else "C")
        import torch

        key = ref.storage.key
        if key not in flat:
            data = raw(key)
            dtype = STORAGE_DTYPES[ref.storage.storage_type]
            want = ref.storage.numel * ITEM_SIZE[dtype]
            if data is None or len(data) != want:  # a view past the bytes would read other memory
                raise UnreadableCheckpoint(
                    f"storage {key} holds {'no record' if data is None else f'{len(data)} bytes'}, its index says {want}.",
                    "The file is truncated, corrupt or crafted; re-download or re-save it.",
                )
            array = np.frombuffer(data if isinstance(data, bytearray) else bytearray(data), _NUMPY_OF[dtype])
            t = torch.from_numpy(array)
            flat[key] = t.view(torch.bfloat16) if dtype == "bfloat16" else t
        return flat[key].as_strided(ref.shape, ref.stride, ref.offset)

    return build


def materialize(obj: Any, build: Callable[[Any], Any], name: str = "") -> Any:
    """The same objects with every handle (TensorRef, ArrayRef, Payload) replaced by what it stands
    for (depth is bounded by the reader); a tensor that cannot be built is named by its key."""
    if isinstance(obj, (TensorRef, Payload)):
        try:
            return build(obj)
        except UnreadableCheckpoint as err:
            raise UnreadableCheckpoint(f"tensor '{name}': {err.message}", err.hint) from None
    if isinstance(obj, dict):
        out: Dict[Any, Any] = collections.OrderedDict() if isinstance(obj, collections.OrderedDict) else {}
        for k, v in obj.items():
            key = materialize(k, build, name) if isinstance(k, (Payload, tuple)) else k  # a long bytes key
            out[key] = materialize(v, build, str(k))
        return out
    if isinstance(obj, list):
        return [materialize(v, build, f"{name}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        return tuple(materialize(v, build, f"{name}[{i}]") for i, v in enumerate(obj))
    if isinstance(obj, (set, frozenset)):
        return type(obj)(materialize(v, build, name) for v in obj)
    return obj


def _inner_archive(storages: Dict[str, Location], f: Any, budget: Budget) -> Callable[[Any], Any]:
    """torch.storage._load_from_bytes(b) inside a plain pickle: `b` is a torch file holding one
    storage, read with the same rules (no further nesting) under a fresh key.  Left in the file (a
    `Payload`), it is read there for its pickles only and its storage stays a run of the source
    file; given as bytes (a short one, or spelled as text), its storage is kept in memory.  Its
    pickles spend the source file's `budget`: nesting does not multiply what a file may build."""
    name = "<tensor inside pickle>"
    keys = itertools.count()  # numbered per file: the same file gives the same keys (and output bytes)

    def counted(n: int) -> None:  # bytes read in place count as the source's own
        if isinstance(getattr(f, "raw", None), _CountingFile):
            f.raw.bytes_read += n

    def load(data: Any) -> Any:
        if isinstance(data, Payload):
            ref, location = read_inner_in_file(f.fileno(), data.location, name, counted, budget)
        else:
            ref, raw = read_inner_file(data, name, budget)
            location = InMemory(bytes(raw)) if raw is not None else None
        if not isinstance(ref, StorageRef) or location is None:
            raise UnreadableCheckpoint("a pickled tensor's inner archive holds no storage.", "Re-save the weights.")
        key = f"inner-{next(keys)}"
        storages[key] = location
        return StorageRef(key, ref.storage_type, ref.numel)

    return load


class _CountingFile(io.FileIO):
    """The source file, counting the bytes read from it (a handle reader's `bytes_read`)."""

    bytes_read = 0

    def readinto(self, buffer: Any) -> Any:
        n = super().readinto(buffer)
        self.bytes_read += n or 0
        return n


@dataclass
class _Pickled:
    """A legacy torch file or a plain pickle read as handles."""

    format: str  # torch-legacy or pickle
    objects: Any
    storages: Dict[str, Location]
    modules: frozenset  # modules the pickles' globals name


def _read_pickled(f: Any, path: str, size: int) -> _Pickled:
    """A legacy torch file or a plain pickle from `f` (the source file, at 0): objects whose tensors
    and arrays are handles, large payloads left in the file, every bound of the unpickler kept."""
    storages: Dict[str, Location] = {}
    budget = Budget(2 * size + BUDGET_SLACK)  # the file's one budget, for all its pickles
    u = SafeUnpickler(f, size=size, budget=budget, load_from_bytes=_inner_archive(storages, f, budget), skip_payloads=True)
    obj = u.load()
    if isinstance(obj, int) and obj == LEGACY_TORCH_MAGIC:
        modules: set = set()
        objects, legacy = read_legacy(f, path, size, modules=modules, budget=budget)
        return _Pickled("torch-legacy", objects, legacy, frozenset(modules))
    storages.update(u.storages)
    return _Pickled("pickle", obj, storages, frozenset(u.modules))


def _open_pickled(path: str) -> Tuple[_Pickled, int]:
    """`_read_pickled` of the file at `path`, and how many bytes of it were read."""
    raw = _CountingFile(path, "rb")
    with io.BufferedReader(raw, _METADATA_BUFFER) as f:  # closes `raw` too
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise UnreadableCheckpoint(f"{path}: file is empty (0 bytes).", "Re-download or re-save the checkpoint.")
        return _read_pickled(f, path, size), raw.bytes_read


def _looks_like_safetensors(f: Any) -> bool:
    """safetensors: an 8-byte little-endian header length, then a JSON object."""
    start = f.read(9)
    f.seek(0)
    if len(start) < 9 or start[8:9] != b"{":
        return False
    size = int.from_bytes(start[:8], "little")
    return 2 <= size <= 100_000_000


def _load_safetensors(path: str) -> Dict[str, Any]:
    try:
        from safetensors import safe_open

        with safe_open(path, framework="numpy"):  # safetensors' own header check, before importing torch to refuse
            pass
        from safetensors.torch import load_file
    except ImportError:
        raise UnreadableCheckpoint(
            f"{path}: a safetensors file, and the safetensors package is not installed.",
            "pip install safetensors",
        ) from None
    return dict(load_file(path, device="cpu"))


def load_checkpoint(path: str) -> Any:
    """Read the file at `path` into Python objects, never executing code from it."""
    return read_checkpoint(path)[0]


def _read(path: str, f: Any, size: int) -> Tuple[Any, str]:
    if _looks_like_safetensors(f):
        return _load_safetensors(path), "safetensors"
    if f.read(4) == ZIP_MAGIC:
        from .io.torchzip import read_index

        f.seek(0)
        index = read_index(f, path)
        return materialize(index.objects, _tensors(index.storage_bytes())), "torch-zip"
    f.seek(0)
    pickled = _read_pickled(f, path, size)
    return materialize(pickled.objects, _tensors(pickled.storages, f.fileno())), pickled.format


def read_checkpoint(path: str) -> Tuple[Any, str]:
    """Read the file at `path`, never executing code from it; return (objects, format).

    The format is decided by the bytes: "safetensors", "torch-zip", "torch-legacy" or "pickle".
    Objects of classes outside the allowlist in non-weight parts come back as `Placeholder`s.

    Raises:
        UnreadableCheckpoint: missing, a directory, empty, not a pickle/torch file, or out of bounds.
        UnsafeCheckpoint: the file names something whose only use is to run code.
    """
    def read() -> Tuple[Any, str]:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise UnreadableCheckpoint(f"{path}: file is empty (0 bytes).", "Re-download or re-save the checkpoint.")
            return _read(path, f, size)

    check_source(path)
    return _guarded(path, read)


def _guarded(path: str, read: Callable[[], Any]) -> Any:
    """`read()`, its failures as the project's errors naming `path` once (never a traceback)."""
    try:
        return read()
    except UnreadableCheckpoint as err:  # UnsafeCheckpoint included: name the file once
        if err.message.startswith(path):
            raise
        raise type(err)(f"{path}: {err.message}", err.hint) from None
    except OSError as err:
        raise UnreadableCheckpoint(f"{path}: cannot read ({err.strerror or err}).", "Check the path and permissions, and pass a checkpoint file (not a device or /proc file).") from None
    except (Exception, RecursionError) as err:  # any parse failure of foreign bytes is the same user-facing fact
        raise UnreadableCheckpoint(
            f"{path}: not a readable checkpoint ({type(err).__name__}: {str(err)[:160]}).",
            "Expected a torch.save file (.pth/.pt) or a Detectron2 .pkl; the file may be truncated or corrupt.",
        ) from None


def placeholders_in(obj: Any, path: str = "") -> Dict[str, str]:
    """Where the objects read past are (dotted path -> class name), for the report."""
    found: Dict[str, str] = {}
    if isinstance(obj, Placeholder):
        found[path or "(top level)"] = obj.cls
    elif isinstance(obj, dict):
        for k, v in obj.items():
            found.update(placeholders_in(v, f"{path}.{k}" if path else str(k)))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            found.update(placeholders_in(v, f"{path}[{i}]"))
    return found



@dataclass
class Source:
    """An opened checkpoint: its objects (plain containers whose leaves are tensor handles or
    tensors and arrays in memory), the format its bytes are in, and for a torch archive read by its
    index the index itself (the byte-copy writers need its records)."""

    path: str
    format: str  # torch-zip, torch-legacy, pickle, safetensors
    objects: Any
    index: Any = None  # an io.torchzip.ArchiveIndex when the leaves are TensorRefs into its records
    bytes_read: Optional[int] = None  # of the file, where only metadata was read
    # Storage key -> where its bytes are, for every storage the leaves' TensorRefs name (being
    # filled in format by format; empty where the leaves are tensors in memory).
    storages: Dict[str, Location] = field(default_factory=dict)
    # Modules the file's pickles name in globals, where a handle reader read them (diagnose: numpy._core).
    modules: Optional[frozenset] = None


def open_source(path: str) -> Source:
    """Open `path` reading as little as its format allows, into handles: a torch archive by its
    index, a safetensors file by its header, a legacy torch file or a plain pickle by its pickles
    (`open_pickled`); tensor bytes stay in the file, as `TensorRef`s (`ArrayRef`s for a pickle's
    numpy arrays) whose storages `Source.storages` locates.  A safetensors header this reader
    cannot vouch for is read whole (`load_source`), so the refusal is safetensors' own.
    `inspect` and `convert` open files the same way.

    Raises:
        UnreadableCheckpoint, UnsafeCheckpoint: as `read_checkpoint`.
    """
    check_source(path)
    return _guarded(path, lambda: _open_source(path))  # a read that fails (EIO on a special file) included


def _open_source(path: str) -> Source:
    if is_torch_zip(path):
        from .io.torchzip import read_index

        index = read_index(path)
        return Source(path, "torch-zip", index.objects, index, index.bytes_read, index.storages())
    from .io.safetensors_header import read_header

    header = read_header(path)
    if header is not None:
        return Source(path, "safetensors", header.tensors, None, header.bytes_read, header.storages)
    if not _is_safetensors(path):
        return open_pickled(path)
    return load_source(path)


def _is_safetensors(path: str) -> bool:
    with open(path, "rb", buffering=0) as f:
        return _looks_like_safetensors(f)


def open_pickled(path: str) -> Source:
    """A legacy torch file or a plain pickle as handles: its objects with `TensorRef` (torch
    tensors) and `ArrayRef` (numpy arrays) leaves, large byte strings as `Payload`s, and
    `storages` saying where each storage's bytes are (`FileBytes` in the file, `InMemory` for small
    arrays and inner archives).  Only the pickles are read, never a payload (`bytes_read` says how
    much); every declared size is checked against the file.

    Raises:
        UnreadableCheckpoint, UnsafeCheckpoint: as `read_checkpoint`.
    """
    check_source(path)
    pickled, bytes_read = _guarded(path, lambda: _open_pickled(path))
    return Source(path, pickled.format, pickled.objects, None, bytes_read, pickled.storages, pickled.modules)


def materialize_source(source: Source) -> Any:
    """A handle source's objects with every handle replaced by its tensor, array or bytes, reading
    each storage once from `source.storages` (what `load_source` gives for the same file).

    Raises:
        UnreadableCheckpoint: a storage no longer in the file (it changed since it was opened).
    """
    with open(source.path, "rb", buffering=0) as f:
        return _guarded(source.path, lambda: materialize(source.objects, _tensors(dict(source.storages), f.fileno())))


def load_source(path: str) -> Source:
    """`path` read whole: every tensor in memory (what the buffered writer needs)."""
    loaded, fmt = read_checkpoint(path)
    return Source(path, fmt, loaded)
