"""Tensor handles: what a reader knows about a tensor before (or instead of) reading its bytes.

A `StorageRef` names a run of bytes (a torch archive's storage record, a safetensors file's data
section, a legacy file's storage, an inner archive's bytes); a `TensorRef` is a strided view into one.
Readers hand out containers whose leaves are these handles or tensors and arrays already in memory;
the layouts, the report and the writers work on either, through the same few members (`shape`,
`dtype`, `ndim`, `numel()`, `reshape()`).  Which writer runs is decided by what the leaves are: zip
records are copied byte for byte, anything else is built in memory and written buffered.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional, Tuple, Union

# Storage class names in persistent ids -> dtype names (torch/storage.py, _utils.py).
STORAGE_DTYPES = {
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "DoubleStorage": "float64",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
}
ITEM_SIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint8": 1, "bool": 1, "complex64": 8, "complex128": 16}


@dataclass(frozen=True)
class FileBytes:
    """A storage's bytes as one run of the source file, stored as they are (a stored zip record, a
    safetensors tensor, a legacy torch storage, a pickled payload outside any frame)."""

    offset: int  # absolute offset in the source file of the storage's first byte
    nbytes: int
    crc: Optional[int] = None  # CRC-32 of exactly these bytes, where the format records one (zip)


@dataclass(frozen=True)
class Inflated:
    """A storage's bytes in a deflated zip member: inflated (bounded, CRC-checked) when read."""

    member: str  # the member's full name in the archive
    nbytes: int  # inflated size
    crc: int


@dataclass(frozen=True)
class InMemory:
    """A storage's bytes already in memory (an inner archive's storage, a payload inside a frame)."""

    data: bytes


# Where one storage's bytes are; a `Source` maps storage keys to these (see read.Source.storages).
Location = Union[FileBytes, Inflated, InMemory]


@dataclass(frozen=True)
class StorageRef:
    """One storage record of the archive: its key, element type and length."""

    key: str
    storage_type: str  # e.g. "FloatStorage"
    numel: int


@dataclass(frozen=True)
class TensorRef:
    """A tensor as the index describes it: where its elements are, never the elements."""

    storage: StorageRef
    offset: int
    shape: Tuple[int, ...]
    stride: Tuple[int, ...]

    @property
    def dtype(self) -> str:
        return STORAGE_DTYPES[self.storage.storage_type]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def is_contiguous(self) -> bool:
        return self.stride == contiguous_stride(self.shape)

    def reshape(self, *shape: int) -> "Any":
        """The layouts' shape fixes: a strided view of the same record when the elements are in
        order; otherwise a `ReshapedRef`, which no byte copy can express (the buffered writer builds it)."""
        new = _resolved_shape(shape, self.numel())
        if not self.is_contiguous():
            return ReshapedRef(self, new)
        return replace(self, shape=new, stride=contiguous_stride(new))


@dataclass(frozen=True)
class ArrayRef(TensorRef):
    """A numpy array of a pickle as a handle: the same view over a storage, plus the array's own
    dtype (numpy's spelling, native byte order), so that reading it gives back that numpy array.
    Its dtype may have no torch storage type (uint32, float128): the storage type is then numpy's
    name, and the layouts refuse it as a weight as they refuse the array itself."""

    array_dtype: str = "<f4"  # numpy's dtype string, e.g. "<f4", "|u1"
    array_name: str = "float32"  # numpy's dtype name, e.g. "float32", "uint32"

    @property
    def dtype(self) -> str:
        return self.array_name

    stands_for = "ndarray"  # what it is read as (what Detectron2's and torch's readers see)


@dataclass(frozen=True)
class ReshapedRef:
    """A shape fix applied to a non-contiguous tensor: its elements are not one run of the record
    in the new order, so only a writer that builds tensors in memory can write it."""

    base: TensorRef
    shape: Tuple[int, ...]

    @property
    def dtype(self) -> str:
        return self.base.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        return self.base.numel()

    def is_contiguous(self) -> bool:
        return False

    def reshape(self, *shape: int) -> "ReshapedRef":
        return ReshapedRef(self.base, _resolved_shape(shape, self.numel()))


def _resolved_shape(shape: Tuple[Any, ...], numel: int) -> Tuple[int, ...]:
    """`reshape`'s argument forms (`reshape(2, 3)`, `reshape((2, 3))`, one `-1`) as a plain shape."""
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    if -1 in shape:
        known = 1
        for d in shape:
            known *= d if d != -1 else 1
        shape = tuple(numel // known if d == -1 else d for d in shape)
    return tuple(shape)


def is_record(value: Any) -> bool:
    """A tensor whose bytes are one strided view of a storage record (what a byte copy can write)."""
    return type(value) is TensorRef


def contiguous_stride(shape: Tuple[int, ...]) -> Tuple[int, ...]:
    stride, acc = [], 1
    for d in reversed(shape):
        stride.append(acc)
        acc *= d
    return tuple(reversed(stride))


def extent(offset: int, shape: Tuple[int, ...], stride: Tuple[int, ...]) -> int:
    """Elements of storage a strided view needs (offset included); 0-sized views need only the offset."""
    if any(n == 0 for n in shape):
        return offset
    return offset + sum((n - 1) * st for n, st in zip(shape, stride)) + 1
