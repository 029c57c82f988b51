"""Read a checkpoint file without running code from it: `open_source` is the one way in, and
reading whole is `materialize(open_source(path))`.

The format is decided once, by the file's first bytes (`sniff`), not its name: a torch zip
archive is read by its index, a safetensors file by its header, and a legacy (pre-1.6) torch file
or a plain pickle by its pickles, all through the one bounded unpickler (`conversion.io.safe_pickle`)
on every torch version; torch's own `torch.load` is never called.  Tensors are handles until
materialized, after checking each lies inside its storage.  Detectron2 itself decides by extension,
which is why a torch archive named `.pkl` breaks it (see `diagnose`).
"""
from __future__ import annotations

import collections
import io
import itertools
import os
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional

from .errors import UnreadableCheckpoint
from .formats import ZIP_MAGIC, check_source
from .io.dtypes import DTYPES, ITEM_SIZE
from .io.handles import ArrayRef, FileBytes, Inflated, InMemory, Location, StorageRef, TensorRef, contiguous_stride
from .io.legacy_torch import LEGACY_TORCH_MAGIC, read_inner_file, read_legacy
from .io.safe_pickle import Budget, Payload, Placeholder, SafeUnpickler
from .io.safetensors_header import MAX_HEADER_BYTES, read_header
from .io.tensor_bytes import read_run
from .io.torchzip import inflate, read_index

# Reading a pickle's metadata: a small read-ahead, so that stepping over a payload wastes little.
_METADATA_BUFFER = 1024


def sniff(head: bytes) -> str:
    """The format a file's first nine bytes say it is, the one rule every reader follows:
    "torch-zip" (a zip's first local header), "safetensors" (an 8-byte little-endian header length
    within bounds, then a JSON object), else "pickle" (a legacy torch file is a pickle whose first
    object is its magic number: told once that pickle is read)."""
    if head[:4] == ZIP_MAGIC:
        return "torch-zip"
    if len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= MAX_HEADER_BYTES:
        return "safetensors"
    return "pickle"


class CountingFile(io.FileIO):
    """The source file, counting the bytes read from it (a `Source`'s `bytes_read`): the one
    counting reader, under every format's reader."""

    bytes_read = 0

    def readinto(self, buffer: Any) -> Any:  # what a BufferedReader over it calls
        n = super().readinto(buffer)
        self.bytes_read += n or 0
        return n

    def read(self, size: int = -1) -> Any:  # what zipfile and the header reader call
        data = super().read(size)
        self.bytes_read += len(data or b"")
        return data

    def read_at(self, location: FileBytes) -> bytearray:
        """The bytes at `location`, read without moving the file's position (a payload left in the
        file that is wanted after all: a pickled tensor's inner archive)."""
        data = read_run(self.fileno(), location.offset, location.nbytes)
        self.bytes_read += len(data)
        return data


@dataclass
class Source:
    """An opened checkpoint: its objects (plain containers whose leaves are tensor handles, or
    tensors and arrays in memory), the format its bytes are in, and for a torch archive its index
    (the byte-copy writers need its records)."""

    path: str
    format: str  # torch-zip, torch-legacy, pickle, safetensors
    objects: Any
    index: Any = None  # an io.torchzip.ArchiveIndex when the leaves are TensorRefs into its records
    bytes_read: Optional[int] = None  # of the file, where only metadata was read
    # Storage key -> where its bytes are, for every storage the leaves' handles name (empty where
    # the leaves are tensors in memory).
    storages: Dict[str, Location] = field(default_factory=dict)
    # Modules the file's pickles name in globals, where a handle reader read them (diagnose: numpy._core).
    modules: Optional[frozenset] = None


def open_source(path: str) -> Source:
    """Open `path`, once, reading as little as its format allows: a torch archive's index, a
    safetensors header, the pickles of a plain pickle (tensors and arrays as handles whose bytes
    stay in the file, `Source.storages` saying where).  A legacy torch file, and a pickled tensor's
    inner archive, are read whole (their storages in memory: about the file's size).  A safetensors
    header this reader cannot vouch for is read whole by safetensors itself, so the refusal is its own.
    `inspect` and `convert` open files this way; every declared size is checked against the file.
    Objects of classes outside the allowlist in non-weight parts come back as `Placeholder`s.

    Raises:
        UnreadableCheckpoint: missing, a directory, empty, not a pickle/torch file, or out of bounds.
        UnsafeCheckpoint: the file names something whose only use is to run code.
    """
    check_source(path)
    return _guarded(path, lambda: _open(path))  # a read that fails (EIO on a special file) included


def _open(path: str) -> Source:
    with CountingFile(path, "rb") as raw:
        head = os.pread(raw.fileno(), 9, 0)  # bytes every reader reads again: counted once, then
        size = os.fstat(raw.fileno()).st_size
        if size == 0:
            raise UnreadableCheckpoint(f"{path}: file is empty (0 bytes).", "Re-download or re-save the checkpoint.")
        fmt = sniff(head)
        if fmt == "torch-zip":
            index = read_index(raw, path)
            return Source(path, fmt, index.objects, index, raw.bytes_read, index.storages())
        if fmt == "safetensors":
            header = read_header(raw, size)
            if header is None:
                return Source(path, fmt, _load_safetensors(path))
            return Source(path, fmt, header.tensors, None, raw.bytes_read, header.storages)
        with io.BufferedReader(raw, _METADATA_BUFFER) as buffered:  # closed here, not by the collector
            return _read_pickled(buffered, path, size, raw)


def _read_pickled(f: Any, path: str, size: int, raw: CountingFile) -> Source:
    """A legacy torch file or a plain pickle from `f` (the source file, at 0), every bound of the
    unpickler kept under the file's one budget: a plain pickle's large payloads stay in the file; a
    legacy torch file is read on after its magic number, whole."""
    storages: Dict[str, Location] = {}
    budget = Budget.for_file(size)  # the file's one budget, for all its pickles
    u = SafeUnpickler(f, size=size, budget=budget, load_from_bytes=_inner_archive(storages, raw, budget), skip_payloads=True)
    obj = u.load()
    if isinstance(obj, int) and obj == LEGACY_TORCH_MAGIC:
        modules: set = set()
        objects, legacy = read_legacy(f, path, size, modules=modules, budget=budget)
        return Source(path, "torch-legacy", objects, None, raw.bytes_read, legacy, frozenset(modules))
    storages.update(u.storages)
    return Source(path, "pickle", obj, None, raw.bytes_read, storages, frozenset(u.modules))


def _inner_archive(storages: Dict[str, Location], source: CountingFile, budget: Budget) -> Callable[[Any], StorageRef]:
    """torch.storage._load_from_bytes(b) inside a plain pickle: `b` (read whole, however long: a
    payload left in the `source` file is read now) is a torch file holding one storage, read by the
    same rules (no further nesting); its storage is kept in memory under a fresh key.  Its pickles
    spend the source file's `budget`: nesting does not multiply what a file may build."""
    keys = itertools.count()  # numbered per file: the same file gives the same keys (and output bytes)

    def load(data: Any) -> StorageRef:
        inner = bytes(source.read_at(data.location)) if isinstance(data, Payload) else data
        ref, stored = read_inner_file(inner, "<tensor inside pickle>", budget)
        if not isinstance(ref, StorageRef) or stored is None:
            raise UnreadableCheckpoint("a pickled tensor's inner archive holds no storage.", "Re-save the weights.")
        key = f"inner-{next(keys)}"
        storages[key] = InMemory(bytes(stored))
        return StorageRef(key, ref.storage_type, ref.numel)

    return load


def _load_safetensors(path: str) -> Dict[str, Any]:
    """A safetensors file read whole by safetensors itself (tensors in memory)."""
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


# ---------------------------------------------------------------- reading whole


def materialize(source: Source) -> Any:
    """Reading whole: the source's objects with every handle replaced by what it stands for (a
    TensorRef by a torch tensor, an ArrayRef by its numpy array, a Payload by its bytes or string),
    each storage read once from `source.storages` (a stored zip record checked against its CRC).

    Raises:
        UnreadableCheckpoint: a storage that does not fit its handles, or no longer in the file.
    """
    with open(source.path, "rb", buffering=0) as f:
        build = _builder(source.path, dict(source.storages), f.fileno())
        return _guarded(source.path, lambda: _replace(source.objects, build))


def _location_bytes(path: str, fd: int, location: Location) -> Any:
    """The bytes at `location` (a run of the file open as `fd`, a deflated member, memory).

    Raises:
        UnreadableCheckpoint: the file ends inside the location, or a record fails its CRC-32.
    """
    if isinstance(location, InMemory):
        return bytearray(location.data)
    if isinstance(location, Inflated):
        return bytearray(inflate(path, location))
    try:
        data = read_run(fd, location.offset, location.nbytes)
    except EOFError as short:
        raise UnreadableCheckpoint(
            f"the file ends {short.args[0]} bytes into a {location.nbytes}-byte storage at offset {location.offset}.",
            "The file is truncated (or changed while being read); re-download or re-save it.",
        ) from None
    if location.crc is not None and zlib.crc32(data) != location.crc:
        raise UnreadableCheckpoint("its storage record fails its CRC-32: the archive is corrupt.", "Re-download or re-save it.")
    return data


def _builder(path: str, storages: Dict[str, Location], fd: int) -> Callable[[Any], Any]:
    """Handle -> value: a TensorRef becomes a torch tensor over its storage's bytes (one storage
    tensor per key, views shared), an ArrayRef the numpy array it was, a Payload its bytes or string.
    torch is imported on the first tensor only: a file of numpy arrays is read without it."""
    flat: Dict[str, Any] = {}

    def build(ref: Any) -> Any:
        import numpy as np

        if isinstance(ref, Payload):
            data = _location_bytes(path, fd, ref.location)
            return data if ref.stands_for == "bytearray" else bytes(data) if ref.stands_for == "bytes" else data.decode("latin1")
        location = storages.get(ref.storage.key)
        if isinstance(ref, ArrayRef):  # its own storage: arrays never share bytes
            array = np.frombuffer(_location_bytes(path, fd, location), ref.array_dtype)
            fortran = len(ref.shape) > 1 and ref.stride != contiguous_stride(ref.shape)
            return array.reshape(ref.shape, order="F" if fortran else "C")
        import torch

        key = ref.storage.key
        if key not in flat:
            data = None if location is None else _location_bytes(path, fd, location)
            want = ref.storage.numel * ITEM_SIZE[ref.dtype]
            if data is None or len(data) != want:  # a view past the bytes would read other memory
                raise UnreadableCheckpoint(
                    f"storage {key} holds {'no record' if data is None else f'{len(data)} bytes'}, its index says {want}.",
                    "The file is truncated, corrupt or crafted; re-download or re-save it.",
                )
            t = torch.from_numpy(np.frombuffer(data, DTYPES[ref.dtype].numpy))
            flat[key] = t.view(torch.bfloat16) if ref.dtype == "bfloat16" else t
        return flat[key].as_strided(ref.shape, ref.stride, ref.offset)

    return build


def _replace(obj: Any, build: Callable[[Any], Any], name: str = "") -> Any:
    """The same objects with every handle replaced by `build` of it (depth is bounded by the
    reader); a tensor that cannot be built is named by its key."""
    if isinstance(obj, (TensorRef, Payload)):
        try:
            return build(obj)
        except UnreadableCheckpoint as err:
            raise UnreadableCheckpoint(f"tensor '{name}': {err.message}", err.hint) from None
    if isinstance(obj, dict):
        out: Dict[Any, Any] = collections.OrderedDict() if isinstance(obj, collections.OrderedDict) else {}
        for k, v in obj.items():
            key = _replace(k, build, name) if isinstance(k, (Payload, tuple)) else k  # a long bytes key
            out[key] = _replace(v, build, str(k))
        return out
    if isinstance(obj, list):
        return [_replace(v, build, f"{name}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        return tuple(_replace(v, build, f"{name}[{i}]") for i, v in enumerate(obj))
    if isinstance(obj, (set, frozenset)):
        return type(obj)(_replace(v, build, name) for v in obj)
    return obj


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
