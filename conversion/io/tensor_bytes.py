"""A handle's bytes, pulled from where its storage is: the one reading side of every writer.

`Tensors` pairs the handles to write with the `Location` of each storage they name (a run of the
source file, a deflated zip member, bytes in memory) and gives, per handle, either the file run a
kernel copy can write (`run`) or the elements themselves in C order (`array`, `tensor_bytes`).
Tensors and arrays handed in through the Python API become handles over `InMemory` storages
(`writable`), so the writers see one kind of leaf.  numpy only: nothing here imports torch.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Set, Tuple, Union

from ..errors import UnreadableCheckpoint
from .dtypes import DTYPES, ITEM_SIZE, STORAGE_OF
from .handles import (
    FileBytes,
    Inflated,
    InMemory,
    StorageRef,
    TensorRef,
    contiguous_stride,
    extent,
    is_contiguous,
    numel,
    view_shape,
)

FLOATING = ("float32", "float16", "float64", "bfloat16")


@dataclass(frozen=True)
class Gathered:
    """A storage the writer makes: a non-contiguous handle's elements in C order (a torch archive
    cannot express a reshape of a strided view as a view, so its elements get a record of their own)."""

    ref: TensorRef


WriteLocation = Union[FileBytes, Inflated, InMemory, Gathered]


class Tensors:
    """The handles' bytes, read from the source file at `path` (opened once) or from memory."""

    def __init__(self, path: Optional[str], storages: Mapping[str, WriteLocation]) -> None:
        self.path, self.storages = path, dict(storages)
        self._file: Any = None
        self._inflated: Tuple[str, bytes] = ("", b"")  # the last member inflated: its tensors share it

    def __enter__(self) -> "Tensors":
        if self.path is not None and any(isinstance(loc, FileBytes) for loc in self.storages.values()):
            self._file = open(self.path, "rb")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    @property
    def fd(self) -> int:
        return self._file.fileno()

    def run(self, ref: TensorRef) -> Optional[FileBytes]:
        """The file bytes of a handle that is one contiguous run of a `FileBytes` storage (what a
        kernel copy writes), with the storage's CRC when the handle spans all of it; else None."""
        loc = self.storages[ref.storage.key]
        if not isinstance(loc, FileBytes) or not is_contiguous(ref):
            return None
        size = ITEM_SIZE[ref.dtype]
        whole = ref.offset == 0 and numel(ref) * size == loc.nbytes
        return FileBytes(loc.offset + ref.offset * size, numel(ref) * size, loc.crc if whole else None)

    def storage_bytes(self, key: str) -> bytes:
        """A whole storage's bytes (a record to write)."""
        loc = self.storages[key]
        if isinstance(loc, InMemory):
            return loc.data
        if isinstance(loc, Gathered):
            return self.tensor_bytes(loc.ref)
        if isinstance(loc, Inflated):
            if self._inflated[0] != loc.member:
                from .torchzip import inflate

                self._inflated = (loc.member, inflate(str(self.path), loc))
            return self._inflated[1]
        return self._pread(loc.offset, loc.nbytes)

    def array(self, ref: TensorRef) -> Any:
        """The handle's elements as a C-ordered numpy array of its shape (bfloat16 as its raw bits, `DTYPES`)."""
        import numpy as np

        dtype, size = ref.dtype, ITEM_SIZE[ref.dtype]
        if numel(ref) == 0:
            return np.zeros(ref.shape, DTYPES[dtype].numpy)
        loc = self.storages[ref.storage.key]
        span = extent(0, view_shape(ref), ref.stride)
        if isinstance(loc, FileBytes):  # only the bytes the view reaches are read
            data, first = self._pread(loc.offset + ref.offset * size, span * size), 0
        else:
            data, first = self.storage_bytes(ref.storage.key), ref.offset
        flat = np.frombuffer(data, DTYPES[dtype].numpy, count=span, offset=first * size)
        view = np.lib.stride_tricks.as_strided(flat, view_shape(ref), [st * size for st in ref.stride], writeable=False)
        return np.ascontiguousarray(view).reshape(ref.shape)

    def tensor_bytes(self, ref: TensorRef) -> bytes:
        """The handle's elements in C order, as stored (bfloat16 as its own 16 bits)."""
        run = self.run(ref)
        if run is not None:
            return self._pread(run.offset, run.nbytes)
        return self.array(ref).tobytes()

    def _pread(self, offset: int, count: int) -> bytes:
        try:
            return read_run(self.fd, offset, count)
        except EOFError:
            raise self.ends_inside_a_tensor() from None

    def ends_inside_a_tensor(self) -> UnreadableCheckpoint:
        """The error for a source that ends inside a range its index or header declared (truncated,
        or cut short by another process while it converts)."""
        return UnreadableCheckpoint(f"{self.path}: the file ends inside a tensor (truncated).", "Re-download or re-save it.")


def read_run(fd: int, offset: int, count: int) -> bytearray:
    """`count` bytes of the file open as `fd` from `offset`: the one loop that reads a storage's
    bytes (pread may return short reads on some filesystems).

    Raises:
        EOFError: the file ends inside the run; its argument is how many bytes were missing (each
            caller names what it was reading).
    """
    out = bytearray(count)
    view, done = memoryview(out), 0
    while done < count:
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise EOFError(count - done)
        done += n
    return out




def non_finite(tensors: Tensors, model: Mapping[str, TensorRef]) -> list:
    """Names of floating tensors holding NaN or Inf, one tensor's bytes in memory at a time."""
    import numpy as np

    bad = []
    for name, ref in model.items():
        if ref.dtype not in FLOATING or numel(ref) == 0:
            continue
        values = tensors.array(ref)
        if ref.dtype == "bfloat16":  # an all-ones exponent means NaN or Inf
            finite = not bool(((values & 0x7F80) == 0x7F80).any())
        else:
            finite = bool(np.isfinite(values).all())
        if not finite:
            bad.append(name)
    return bad


def _in_memory(value: Any) -> Tuple[str, bytes]:
    """(dtype name, C-ordered little-endian bytes) of a torch tensor or numpy array in memory."""
    import numpy as np

    if isinstance(value, np.ndarray):
        arr = np.ascontiguousarray(value.astype(value.dtype.newbyteorder("<"), copy=False))
        return arr.dtype.name, arr.tobytes()
    t = value.detach().cpu().contiguous()
    dtype = str(t.dtype).replace("torch.", "")
    if dtype == "bfloat16":
        import torch

        t = t.view(torch.int16)
    return dtype, t.numpy().tobytes()


def writable(
    path: Optional[str], storages: Mapping[str, WriteLocation], model: Mapping[str, Any], *, gather: bool
) -> Tuple[Tensors, Dict[str, TensorRef]]:
    """The weights to write as handles over located storages: tensors and arrays in memory get an
    `InMemory` storage each, and with `gather` (a torch archive) a non-contiguous handle with a
    shape fix gets a `Gathered` record.  New storage keys are the first free numbers, in order."""
    located: Dict[str, WriteLocation] = dict(storages)
    used: Set[str] = set(located)
    free = (str(i) for i in itertools.count() if str(i) not in used)
    out: Dict[str, TensorRef] = {}
    for name, value in model.items():
        if isinstance(value, TensorRef):
            if not (gather and value.strided_shape is not None):
                # A plain handle (a reader's subclass, e.g. of a numpy array, is written as the
                # tensor it is a view of, and compared with the plain handle read back).
                out[name] = value if type(value) is TensorRef else TensorRef(value.storage, value.offset, value.shape, value.stride, value.strided_shape)
                continue
            key = next(free)
            located[key] = Gathered(value)
            dtype = value.dtype
        else:
            dtype, data = _in_memory(value)
            key = next(free)
            located[key] = InMemory(data)
        shape = tuple(int(d) for d in value.shape)
        out[name] = TensorRef(StorageRef(key, STORAGE_OF[dtype], numel(shape)), 0, shape, contiguous_stride(shape))
    return Tensors(path, located), out
