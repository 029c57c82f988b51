"""Tensor handles: what a reader knows about a tensor before (or instead of) reading its bytes.

A `StorageRef` names a run of bytes (a torch archive's storage record, a safetensors file's data
section, a legacy file's storage read whole); a `TensorRef` is a strided view into one.
Readers hand out containers whose leaves are these handles (or, through the Python API, tensors and
arrays already in memory); a handle is plain data (`shape`, `dtype`, where its elements are), and the
module functions below (`numel`, `is_contiguous`, `with_shape`) work on every kind of leaf, so nothing
has to imitate a tensor.  The writers pull each handle's bytes from its `Location`.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Dict, Optional, Tuple, Union

from .dtypes import ITEM_SIZE, STORAGE_DTYPES


@dataclass(frozen=True)
class FileBytes:
    """A storage's bytes as one run of the source file, stored as they are (a stored zip record, a
    safetensors tensor, a pickled payload outside any frame)."""

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
    """A storage's bytes already in memory (a legacy file's or an inner archive's storage, a small
    array, a payload inside a frame)."""

    data: bytes


# Where one storage's bytes are; a `Source` maps storage keys to these (see read.Source.storages).
Location = Union[FileBytes, Inflated, InMemory]


@dataclass(frozen=True)
class StorageRef:
    """One storage record of the archive: its key, element type and length."""

    key: str
    storage_type: str  # e.g. "FloatStorage"
    numel: int


Shape = Tuple[int, ...]


@dataclass(frozen=True)
class TensorRef:
    """A tensor as the index describes it: where its elements are, never the elements.

    `shape` and `dtype` are what the tensor is.  Its elements are the strided view (`shape`,
    `stride`) at `offset` of the storage, except after a shape fix of a non-contiguous view:
    then `strided_shape` is the view's own shape, its elements are read in C order, and `shape`
    is the shape they are given (what `reshape` of a tensor does, recorded as data)."""

    storage: StorageRef
    offset: int
    shape: Shape
    stride: Shape
    strided_shape: Optional[Shape] = None

    @property
    def dtype(self) -> str:
        return STORAGE_DTYPES[self.storage.storage_type]


def shape_of(value: Any) -> Shape:
    """A leaf's shape as a plain tuple (a handle, a torch tensor or a numpy array)."""
    return tuple(int(d) for d in value.shape)


def numel(value: Any) -> int:
    """Elements of a leaf (or of a shape)."""
    n = 1
    for d in value if isinstance(value, tuple) else shape_of(value):
        n *= d
    return n


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


def view_shape(ref: TensorRef) -> Shape:
    """The shape the handle's strides apply to."""
    return ref.shape if ref.strided_shape is None else ref.strided_shape


def is_contiguous(ref: TensorRef) -> bool:
    """Whether the elements are one run of the storage, in C order."""
    return ref.strided_shape is None and ref.stride == contiguous_stride(ref.shape)


def with_shape(value: Any, shape: Shape) -> Any:
    """`value` with the same elements in C order and the given shape: a layout's shape fix.

    A contiguous handle gets the new shape and its strides; a non-contiguous one keeps its view and
    records the new shape (the writers gather its elements in C order); a tensor or array in memory
    is reshaped.

    Raises:
        ValueError: the shape holds another number of elements.
    """
    shape = tuple(shape)
    if numel(shape) != numel(value):
        raise ValueError(f"cannot give {numel(value)} elements the shape {list(shape)}")
    if not isinstance(value, TensorRef):
        return value if shape_of(value) == shape else value.reshape(shape)
    if shape == value.shape:
        return value
    if is_contiguous(value):
        return replace(value, shape=shape, stride=contiguous_stride(shape))
    return replace(value, shape=shape, strided_shape=view_shape(value))


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


def location_bytes(loc: Location) -> int:
    """How many bytes a storage's location holds."""
    return len(loc.data) if isinstance(loc, InMemory) else loc.nbytes


def check_references(path: str, storages: Dict[str, Location], refs: Dict[str, Any]) -> None:
    """Every tensor handle must lie inside a located storage of exactly its declared size; otherwise
    the output would hold bytes from outside the tensor (or torch would refuse it).  Leaves that are
    tensors in memory are their own bytes and pass.

    Raises:
        UnreadableCheckpoint: naming the first tensor that does not fit its storage.
    """
    from ..errors import UnreadableCheckpoint

    for name, ref in refs.items():
        if not isinstance(ref, TensorRef):
            continue
        loc = storages.get(ref.storage.key)
        size = ITEM_SIZE.get(ref.dtype)
        if size is None:  # an element type no weight has (a pickle's uint32 array): the weight check refuses it by name
            continue
        if loc is None:
            raise UnreadableCheckpoint(f"{path}: tensor '{name}' refers to a missing storage record.", "Re-download or re-save it.")
        if location_bytes(loc) != ref.storage.numel * size:
            raise UnreadableCheckpoint(
                f"{path}: storage record of '{name}' holds {location_bytes(loc)} bytes, its index says {ref.storage.numel * size}.",
                "The file is truncated or corrupt; re-download or re-save it.",
            )
        shape = view_shape(ref)
        if ref.offset < 0 or any(n < 0 for n in shape) or any(st < 0 for st in ref.stride) or extent(ref.offset, shape, ref.stride) > ref.storage.numel:
            raise UnreadableCheckpoint(
                f"{path}: tensor '{name}' (shape {list(ref.shape)}, offset {ref.offset}) reaches past its storage.",
                "The file is corrupt or crafted; re-save the weights.",
            )
