"""A model-zoo `.pkl` (Detectron2's plain pickle of numpy arrays) read for its arrays' payloads only.

The `.pkl` writers check what they wrote by reading it back: every array's shape and dtype from
the pickle, and its bytes by CRC-32 of where they lie in the file.  Parsing goes through the one
safe unpickler in payload mode with no size threshold, so no payload is read while parsing; the
CRCs are then computed in parallel over the file ranges (`crc.crcs_of_ranges`).
"""
from __future__ import annotations

import io
import os
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Sequence, Tuple, Union

from .crc import crcs_of_ranges
from .handles import ArrayRef, FileBytes, InMemory, Location
from .safe_pickle import BUDGET_SLACK, Budget, SafeUnpickler

__all__ = ["ArrayPayload", "read_array_payloads", "array_digests"]


@dataclass(frozen=True)
class ArrayPayload:
    """One array of the pickle: its shape, numpy dtype string (e.g. "<f4") and where its bytes are:
    a run of the file, or (a payload opcode too short to skip, e.g. SHORT_BINBYTES) its bytes."""

    shape: Tuple[int, ...]
    dtype: str
    payload: Union[FileBytes, InMemory]


def _payloads(obj: Any, storages: Dict[str, Location]) -> Any:
    """The pickle's objects with each array as an `ArrayPayload` (plain containers only: the
    writers' pickles hold dicts of arrays and strings).  An array whose bytes protocol 2 spelled
    as text, or in the other byte order (never in the writers' pickles), is already decoded, in memory."""
    if isinstance(obj, ArrayRef):
        return ArrayPayload(obj.shape, obj.array_dtype, storages[obj.storage.key])
    if isinstance(obj, dict):
        return {k: _payloads(v, storages) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_payloads(v, storages) for v in obj]
    return obj


def read_array_payloads(path: str) -> Any:
    """The model-zoo pickle at `path` with each numpy array as an `ArrayPayload`; no payload is read.

    Every array's payload is checked to lie inside the file and to hold exactly shape x itemsize
    bytes (as when the file is read whole).  An array stored in the other byte order comes back
    swapped, in memory (the writers never write one).

    Raises:
        UnreadableCheckpoint, UnsafeCheckpoint: the file does not parse, or names what the safe
            unpickler refuses.
    """
    with open(path, "rb", buffering=io.DEFAULT_BUFFER_SIZE) as f:
        size = os.fstat(f.fileno()).st_size
        u = SafeUnpickler(f, size=size, budget=Budget(2 * size + BUDGET_SLACK), skip_payloads=True, payload_threshold=0)
        obj = u.load()
        return _payloads(obj, dict(u.storages))


def _walk_payloads(obj: Any, found: List[ArrayPayload]) -> None:
    if isinstance(obj, ArrayPayload):
        found.append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _walk_payloads(v, found)
    elif isinstance(obj, list):
        for v in obj:
            _walk_payloads(v, found)


def array_digests(path: str, crcs: Callable[[int, Sequence[Tuple[int, int]]], List[int]] = crcs_of_ranges) -> Any:
    """The model-zoo pickle at `path` with each array as (shape, dtype, CRC-32 of its bytes, size):
    what a writer compares with what it meant to write.  CRCs are computed by `crcs` (fd, ranges),
    in parallel by default; a writer passes the one it uses for its own checks.

    Raises:
        UnreadableCheckpoint, UnsafeCheckpoint: as `read_array_payloads`.
    """
    obj = read_array_payloads(path)
    arrays: List[ArrayPayload] = []
    _walk_payloads(obj, arrays)
    in_file = [a for a in arrays if isinstance(a.payload, FileBytes)]
    with open(path, "rb", buffering=0) as f:
        found = crcs(f.fileno(), [(a.payload.offset, a.payload.nbytes) for a in in_file])
    digest = {id(a): (a.shape, a.dtype, crc, a.payload.nbytes) for a, crc in zip(in_file, found)}
    for a in arrays:
        if isinstance(a.payload, InMemory):
            digest[id(a)] = (a.shape, a.dtype, zlib.crc32(a.payload.data), len(a.payload.data))
    return _digested(obj, digest)


def _digested(obj: Any, digest: Dict[int, Any]) -> Any:
    if isinstance(obj, ArrayPayload):
        return digest[id(obj)]
    if isinstance(obj, dict):
        return {k: _digested(v, digest) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_digested(v, digest) for v in obj]
    return obj
