"""Legacy (pre-1.6, non-zip) torch files as handles: the pickles and the storage table are read,
the storage bytes are not.

`torch.save(obj, f, _use_new_zipfile_serialization=False)` writes five pickles and then the
storages: the magic number, the protocol version, `sys_info` (byte order, type sizes), the objects
(tensors as persistent ids naming a storage key, type and element count), the list of storage keys,
and then per key, in that order, an 8-byte little-endian element count and the elements.  Each
storage becomes a `FileBytes` (the run after its count), after its declared size is checked against
the index and against the file; the objects' tensors are `TensorRef`s into those storages.
"""
from __future__ import annotations

import io
import os
from typing import Any, Callable, Dict, Optional, Tuple

from ..errors import UnreadableCheckpoint, UnsafeCheckpoint
from ..formats import ZIP_MAGIC
from .allowlist import StorageType
from .handles import ITEM_SIZE, STORAGE_DTYPES, FileBytes, InMemory, Location, StorageRef
from .safe_pickle import BUDGET_SLACK, Budget, SafeUnpickler, safe_load

__all__ = ["LEGACY_TORCH_MAGIC", "read_legacy", "read_inner_file", "read_inner_in_file"]

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
    f: Any, path: str, size: int, *, in_file: bool = True, modules: Optional[set] = None, budget: Optional[Budget] = None
) -> Tuple[Any, Dict[str, Location]]:
    """The rest of a legacy torch file after its magic number: (objects with `TensorRef` leaves,
    storage key -> location).  `f` is positioned after the magic; `size` is the whole file's size.

    With `in_file` (f is the source file itself) storages and large array payloads stay in the file
    as `FileBytes`; otherwise (`f` is an inner archive in memory) they are `InMemory` copies.
    `modules`, if given, gets the modules the objects' globals name.  Every pickle spends `budget`
    (the source file's, where this file is nested in it; else one for this file).

    Raises:
        UnreadableCheckpoint: a big-endian file, a storage list that disagrees with the objects,
            a storage truncated or whose size disagrees with its index.
    """
    declared: Dict[str, StorageRef] = {}
    budget = budget or Budget(2 * size + BUDGET_SLACK)

    def left() -> int:
        return size - f.tell()

    for _ in range(2):  # protocol version, sys_info
        info, _ = safe_load(f, size=left(), budget=budget)
    if isinstance(info, dict) and info.get("little_endian") is False:
        raise UnreadableCheckpoint(f"{path}: a big-endian legacy torch file.", "Re-save it on a little-endian machine.")
    u = SafeUnpickler(f, size=left(), budget=budget, persistent_load=_persistent_ids(declared), skip_payloads=in_file)
    objects = u.load()
    if modules is not None:
        modules.update(u.modules)
    storages: Dict[str, Location] = dict(u.storages)
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
        start = f.tell()
        if in_file:
            storages[key] = FileBytes(start, nbytes)
            f.seek(nbytes, io.SEEK_CUR)
        else:
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
        return obj, (index.storage_bytes()[obj.key] if isinstance(obj, StorageRef) else None)
    magic, _ = safe_load(f, size=len(data), budget=budget)
    if magic != LEGACY_TORCH_MAGIC:
        raise UnsafeCheckpoint(f"{name}: a pickled tensor whose inner data is not a torch file.", "Re-save the weights with torch.save.")
    obj, storages = read_legacy(f, name, len(data), in_file=False, budget=budget)
    if not isinstance(obj, StorageRef):
        return obj, None
    location = storages[obj.key]
    return obj, location.data if isinstance(location, InMemory) else None


class _Window(io.RawIOBase):
    """Bytes [start, start + length) of the file open as `fd`, as a file of their own (positions
    relative to `start`), read with pread and unbuffered: only what the pickles ask for is read,
    and counted in `counted` (the source's bytes_read)."""

    def __init__(self, fd: int, start: int, length: int, counted: Callable[[int], None]) -> None:
        super().__init__()
        self._fd, self._start, self._length, self._pos, self._counted = fd, start, length, 0, counted

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = max(0, min(len(buffer), self._length - self._pos))
        data = os.pread(self._fd, n, self._start + self._pos) if n else b""
        buffer[: len(data)] = data
        self._pos += len(data)
        self._counted(len(data))
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos


def read_inner_in_file(
    fd: int, location: FileBytes, name: str, counted: Callable[[int], None], budget: Optional[Budget] = None
) -> Tuple[Any, Optional[Location]]:
    """`read_inner_file` of an inner archive that is a run of the source file (a pickled tensor's
    bytes left in the file): a legacy torch file (what `torch.storage._load_from_bytes` is given)
    is read for its pickles only, its storage staying a run of the source file; any other (a torch
    zip) is read into memory as `read_inner_file` reads it.  Returns (its object, where that
    storage's bytes are, when the object is a storage).
    """
    window = _Window(fd, location.offset, location.nbytes, counted)
    if window.read(4) == ZIP_MAGIC:
        window.seek(0)
        obj, raw = read_inner_file(window.read(), name, budget)
        return obj, (InMemory(bytes(raw)) if raw is not None else None)
    window.seek(0)
    magic, _ = safe_load(window, size=location.nbytes, budget=budget)
    if magic != LEGACY_TORCH_MAGIC:
        raise UnsafeCheckpoint(f"{name}: a pickled tensor whose inner data is not a torch file.", "Re-save the weights with torch.save.")
    obj, storages = read_legacy(window, name, location.nbytes, budget=budget)
    if not isinstance(obj, StorageRef):
        return obj, None
    inner = storages[obj.key]
    return obj, FileBytes(location.offset + inner.offset, inner.nbytes) if isinstance(inner, FileBytes) else inner
