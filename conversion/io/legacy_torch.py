"""Legacy (pre-1.6, non-zip) torch files, read whole: the pickles and the storage table, then every
storage's bytes into memory (about the file's size; big checkpoints come as zip archives, which are
streamed).

`torch.save(obj, f, _use_new_zipfile_serialization=False)` writes five pickles and then the
storages: the magic number, the protocol version, `sys_info` (byte order, type sizes), the objects
(tensors as persistent ids naming a storage key, type and element count), the list of storage keys,
and then per key, in that order, an 8-byte little-endian element count and the elements.  Each
storage's declared size is checked against the index and against the file before it is read; the
objects' tensors are `TensorRef`s into those storages.  A pickled tensor's inner archive
(`torch.storage._load_from_bytes`) is such a file, or a torch zip archive, held in memory.
"""
from __future__ import annotations

import io
from typing import Any, Callable, Dict, Optional, Tuple

from ..errors import UnreadableCheckpoint, UnsafeCheckpoint
from ..formats import ZIP_MAGIC
from .allowlist import StorageType
from .dtypes import ITEM_SIZE, STORAGE_DTYPES
from .handles import InMemory, Location, StorageRef
from .safe_pickle import Budget, SafeUnpickler, safe_load

__all__ = ["LEGACY_TORCH_MAGIC", "read_legacy", "read_inner_file"]

# First record of a legacy torch.save file: this pickled int.
LEGACY_TORCH_MAGIC = 0x1950A86A20F9469CFC6C


def _storage_type(value: Any) -> str:
    if not isinstance(value, StorageType):
        raise UnreadableCheckpoint("a persistent id names no torch storage type.", "The file is corrupt or crafted; re-save it.")
    return value.name


def _persistent_ids(declared: Dict[str, StorageRef]) -> Callable[[Any], Any]:
    """What a legacy persistent id means: a storage (declared on first sight), or a view into one."""

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

    return persistent


def read_legacy(
    f: Any, path: str, size: int, *, modules: Optional[set] = None, budget: Optional[Budget] = None
) -> Tuple[Any, Dict[str, Location]]:
    """The rest of a legacy torch file after its magic number, read whole: (objects with `TensorRef`
    leaves, storage key -> its bytes `InMemory`).  `f` is positioned after the magic; `size` is the
    whole file's size.  `modules`, if given, gets the modules the objects' globals name.  Every
    pickle spends `budget` (the source file's, where this file is nested in it; else one for this file).

    Raises:
        UnreadableCheckpoint: a big-endian file, a storage list that disagrees with the objects,
            a storage truncated or whose size disagrees with its index.
    """
    declared: Dict[str, StorageRef] = {}
    budget = budget or Budget.for_file(size)

    def left() -> int:
        return size - f.tell()

    for _ in range(2):  # protocol version, sys_info
        info, _ = safe_load(f, size=left(), budget=budget)
    if isinstance(info, dict) and info.get("little_endian") is False:
        raise UnreadableCheckpoint(f"{path}: a big-endian legacy torch file.", "Re-save it on a little-endian machine.")
    u = SafeUnpickler(f, size=left(), budget=budget, persistent_load=_persistent_ids(declared))
    objects = u.load()
    if modules is not None:
        modules.update(u.modules)
    storages: Dict[str, Location] = {}
    keys, _ = safe_load(f, size=left(), budget=budget)
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys) or set(keys) != set(declared):
        raise UnreadableCheckpoint(f"{path}: corrupt legacy torch file (storage list).", "Re-download or re-save it.")
    for key in keys:
        ref = declared[key]
        head = f.read(8)
        count = int.from_bytes(head, "little") if len(head) == 8 else -1
        nbytes = ref.numel * ITEM_SIZE[STORAGE_DTYPES[ref.storage_type]]
        if count != ref.numel or nbytes > left():
            raise UnreadableCheckpoint(f"{path}: storage {key} is truncated or its size disagrees with the index.", "Re-download or re-save it.")
        storages[key] = InMemory(f.read(nbytes))
    return objects, storages


def read_inner_file(data: bytes, name: str, budget: Optional[Budget] = None) -> Tuple[Any, Optional[bytes]]:
    """A pickled tensor's inner archive (`torch.storage._load_from_bytes`), a torch file of one
    storage read by the same rules (no further nesting), spending the source file's `budget`: (its
    object, that storage's bytes when the object is a storage).

    Raises:
        UnsafeCheckpoint: the inner data is not a torch file.
        UnreadableCheckpoint: as `read_legacy` or the archive reader.
    """
    f = io.BytesIO(data)
    if data[:4] == ZIP_MAGIC:
        from .torchzip import read_index

        index = read_index(f, name, budget)
        obj = index.objects
        return obj, (index.record_bytes(f, obj.key) if isinstance(obj, StorageRef) else None)
    magic, _ = safe_load(f, size=len(data), budget=budget)
    if magic != LEGACY_TORCH_MAGIC:
        raise UnsafeCheckpoint(f"{name}: a pickled tensor whose inner data is not a torch file.", "Re-save the weights with torch.save.")
    obj, storages = read_legacy(f, name, len(data), budget=budget)
    if not isinstance(obj, StorageRef):
        return obj, None
    location = storages[obj.key]
    return obj, location.data if isinstance(location, InMemory) else None
