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
from typing import Any, Callable, Dict, Optional, Tuple

from .errors import UnreadableCheckpoint, UnsafeCheckpoint
from .formats import ZIP_MAGIC, check_source, is_torch_zip
from .io.handles import ITEM_SIZE, STORAGE_DTYPES, Location, StorageRef, TensorRef
from .io.safe_pickle import Placeholder, StorageType, safe_load

# First record of a legacy (pre-1.6, non-zip) torch.save file: this pickled int.
_LEGACY_TORCH_MAGIC = 0x1950A86A20F9469CFC6C
_NUMPY_OF = {
    "float32": "<f4", "float16": "<f2", "float64": "<f8", "int64": "<i8", "int32": "<i4", "int16": "<i2",
    "int8": "|i1", "uint8": "|u1", "bool": "|b1", "bfloat16": "<i2", "complex64": "<c8", "complex128": "<c16",
}
_inner_keys = itertools.count()


def _tensors(storages: Dict[str, Any]) -> Callable[[TensorRef], Any]:
    """TensorRef -> torch tensor over the storage's bytes (one storage tensor per key, views shared).
    torch is imported on the first tensor only: a file of numpy arrays is read without it."""
    flat: Dict[str, Any] = {}

    def build(ref: TensorRef) -> Any:
        import numpy as np
        import torch

        key = ref.storage.key
        if key not in flat:
            data = storages.get(key)
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


def materialize(obj: Any, build: Callable[[TensorRef], Any], name: str = "") -> Any:
    """The same objects with every TensorRef replaced by its tensor (depth is bounded by the reader);
    a tensor that cannot be built is named by its key."""
    if isinstance(obj, TensorRef):
        try:
            return build(obj)
        except UnreadableCheckpoint as err:
            raise UnreadableCheckpoint(f"tensor '{name}': {err.message}", err.hint) from None
    if isinstance(obj, dict):
        out: Dict[Any, Any] = collections.OrderedDict() if isinstance(obj, collections.OrderedDict) else {}
        for k, v in obj.items():
            out[k] = materialize(v, build, str(k))
        return out
    if isinstance(obj, list):
        return [materialize(v, build, f"{name}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        return tuple(materialize(v, build, f"{name}[{i}]") for i, v in enumerate(obj))
    return obj


def _inner_archive(storages: Dict[str, Any]) -> Callable[[bytes], Any]:
    """torch.storage._load_from_bytes(b) inside a plain pickle: `b` is a torch file holding one
    storage; read with the same rules (no further nesting), its bytes kept under a fresh key."""

    def load(data: bytes) -> Any:
        inner, _ = _read_bytes(data, "<tensor inside pickle>", nested=True)
        if not isinstance(inner, tuple) or len(inner) != 2 or not isinstance(inner[0], StorageRef):
            raise UnreadableCheckpoint("a pickled tensor's inner archive holds no storage.", "Re-save the weights.")
        ref, raw = inner
        key = f"inner-{next(_inner_keys)}"
        storages[key] = raw
        return StorageRef(key, ref.storage_type, ref.numel)

    return load


def _storage_type(value: Any) -> str:
    if not isinstance(value, StorageType):
        raise UnreadableCheckpoint("a persistent id names no torch storage type.", "The file is corrupt or crafted; re-save it.")
    return value.name


def _read_legacy(f: Any, path: str, size: int) -> Tuple[Any, Dict[str, Any]]:
    """A pre-1.6 torch file: magic, protocol, sys_info, the objects, storage keys, then per storage
    an 8-byte element count and its bytes.  Every declared size is checked against the file."""
    declared: Dict[str, StorageRef] = {}

    def persistent(pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage" and isinstance(pid[2], str) and isinstance(pid[4], int)):
            raise UnsafeCheckpoint("refusing to load: a persistent id that is not a torch storage.", "Re-save the weights with torch.save.")
        ref = declared.setdefault(pid[2], StorageRef(pid[2], _storage_type(pid[1]), pid[4]))
        view = pid[5]
        if view is None:
            return ref
        if not (isinstance(view, tuple) and len(view) == 3 and all(isinstance(v, int) for v in view[1:])):
            raise UnreadableCheckpoint("a storage view that is malformed.", "The file is corrupt or crafted; re-save it.")
        if view[1] < 0 or view[2] < 0 or view[1] + view[2] > ref.numel:
            raise UnreadableCheckpoint("a storage view reaches past its storage.", "The file is corrupt or crafted; re-save it.")
        return (ref, view[1], view[2])

    def left() -> int:
        return size - f.tell()

    for _ in range(2):  # protocol version, sys_info
        info, _ = safe_load(f, size=left())
    if isinstance(info, dict) and info.get("little_endian") is False:
        raise UnreadableCheckpoint(f"{path}: a big-endian legacy torch file.", "Re-save it on a little-endian machine.")
    objects, _ = safe_load(f, size=left(), persistent_load=persistent)
    keys, _ = safe_load(f, size=left())
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys) or set(keys) != set(declared):
        raise UnreadableCheckpoint(f"{path}: corrupt legacy torch file (storage list).", "Re-download or re-save it.")
    storages: Dict[str, Any] = {}
    for key in keys:
        ref = declared[key]
        head = f.read(8)
        count = int.from_bytes(head, "little") if len(head) == 8 else -1
        nbytes = ref.numel * ITEM_SIZE[STORAGE_DTYPES[ref.storage_type]]
        if count != ref.numel or nbytes > left():
            raise UnreadableCheckpoint(f"{path}: storage {key} is truncated or its size disagrees with the index.", "Re-download or re-save it.")
        storages[key] = bytearray(f.read(nbytes))
    return objects, storages


def _read_bytes(data: bytes, name: str, nested: bool) -> Tuple[Any, str]:
    """An inner torch file (a pickled tensor's storage): the storage reference and its bytes."""
    f = io.BytesIO(data)
    if data[:4] == ZIP_MAGIC:
        from .stream import read_index

        index = read_index(f, name)
        raws = index.storage_bytes()
        obj = index.objects
        return ((obj, raws[obj.key]) if isinstance(obj, StorageRef) else obj), "torch-zip"
    magic, _ = safe_load(f, size=len(data))
    if magic != _LEGACY_TORCH_MAGIC:
        raise UnsafeCheckpoint(f"{name}: a pickled tensor whose inner data is not a torch file.", "Re-save the weights with torch.save.")
    obj, storages = _read_legacy(f, name, len(data))
    return ((obj, storages[obj.key]) if isinstance(obj, StorageRef) else obj), "torch-legacy"


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
        from .stream import read_index

        f.seek(0)
        index = read_index(f, path)
        return materialize(index.objects, _tensors(index.storage_bytes())), "torch-zip"
    f.seek(0)
    storages: Dict[str, Any] = {}
    obj, _ = safe_load(f, size=size, load_from_bytes=_inner_archive(storages))
    if isinstance(obj, int) and obj == _LEGACY_TORCH_MAGIC:
        objects, storages = _read_legacy(f, path, size)
        return materialize(objects, _tensors(storages)), "torch-legacy"
    return materialize(obj, _tensors(storages)), "pickle"


def read_checkpoint(path: str) -> Tuple[Any, str]:
    """Read the file at `path`, never executing code from it; return (objects, format).

    The format is decided by the bytes: "safetensors", "torch-zip", "torch-legacy" or "pickle".
    Objects of classes outside the allowlist in non-weight parts come back as `Placeholder`s.

    Raises:
        UnreadableCheckpoint: missing, a directory, empty, not a pickle/torch file, or out of bounds.
        UnsafeCheckpoint: the file names something whose only use is to run code.
    """
    check_source(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise UnreadableCheckpoint(f"{path}: file is empty (0 bytes).", "Re-download or re-save the checkpoint.")
            return _read(path, f, size)
    except UnreadableCheckpoint as err:  # UnsafeCheckpoint included: name the file once
        if err.message.startswith(path):
            raise
        raise type(err)(f"{path}: {err.message}", err.hint) from None
    except OSError as err:
        raise UnreadableCheckpoint(f"{path}: cannot read ({err.strerror or err}).", "Check the path and permissions.") from None
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


def open_source(path: str, *, metadata_only: bool = False) -> Source:
    """Open `path` reading as little as its format allows: a torch archive by its index and a
    safetensors file by its header (tensor bytes stay in the file, as `TensorRef`s whose storages
    `Source.storages` locates); everything else is read whole, into tensors and arrays.
    `metadata_only` (what `inspect` asks for) changes nothing for these formats any more: convert
    opens them the same way.

    Raises:
        UnreadableCheckpoint, UnsafeCheckpoint: as `read_checkpoint`.
    """
    check_source(path)
    if is_torch_zip(path):
        from .io.torchzip import read_index

        index = read_index(path)
        return Source(path, "torch-zip", index.objects, index, index.bytes_read, index.storages())
    from .io.safetensors_header import read_header

    header = read_header(path)
    if header is not None:
        return Source(path, "safetensors", header.tensors, None, header.bytes_read, header.storages)
    return load_source(path)


def load_source(path: str) -> Source:
    """`path` read whole: every tensor in memory (what the buffered writer needs)."""
    loaded, fmt = read_checkpoint(path)
    return Source(path, fmt, loaded)
