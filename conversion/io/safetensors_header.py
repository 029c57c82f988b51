"""safetensors files by their header: every tensor's name, dtype, shape and byte range, without
reading a tensor byte (what `inspect` reads, and what `convert` copies from).

The format: an 8-byte little-endian header length N, N bytes of JSON
(`{name: {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {..}}`,
offsets counted from the end of the header), then the data.  A header this reader does not
fully understand (an unknown dtype, offsets that disagree with the shape or the file) gives None,
and the caller reads the file whole, so its refusal is the full reader's.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

from .dtypes import SAFETENSORS
from .handles import FileBytes, StorageRef, TensorRef, contiguous_stride, numel

# The longest header read (safetensors' own bound); `read.sniff` takes a longer one for no header.
MAX_HEADER_BYTES = 100_000_000


@dataclass
class Header:
    tensors: Dict[str, TensorRef]  # in name order, as safetensors' own loader returns them
    storages: Dict[str, FileBytes]  # each tensor is its own storage: its run of the file (no CRC recorded)


def read_header(f: Any, size: int) -> Optional[Header]:
    """The tensors the safetensors file open as `f` (at its start, `size` bytes) declares, as
    handles; None where the header is not one this reader can vouch for (safetensors' own reader
    then decides)."""
    head = f.read(8)
    if len(head) < 8:
        return None
    length = int.from_bytes(head, "little")
    if not 2 <= length <= min(MAX_HEADER_BYTES, size - 8):
        return None
    raw = f.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):  # not JSON, or nested deeper than the parser recurses
        return None
    found = _handles(header, size - 8 - length, 8 + length) if isinstance(header, dict) else None
    return None if found is None else Header(found[0], found[1])


def _handles(header: Dict[str, Any], data_bytes: int, data_start: int) -> Optional[Tuple[Dict[str, TensorRef], Dict[str, FileBytes]]]:
    out: Dict[str, TensorRef] = {}
    storages: Dict[str, FileBytes] = {}
    for name in sorted(k for k in header if k != "__metadata__"):
        entry = header[name]
        if not isinstance(entry, dict) or not isinstance(entry.get("dtype"), str) or entry["dtype"] not in SAFETENSORS:
            return None
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            return None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            return None
        dtype, shape, (begin, end) = SAFETENSORS[entry["dtype"]], tuple(shape), offsets
        if not 0 <= begin <= end <= data_bytes or end - begin != numel(shape) * dtype.itemsize:
            return None
        out[name] = TensorRef(StorageRef(name, dtype.storage, numel(shape)), 0, shape, contiguous_stride(shape))
        storages[name] = FileBytes(data_start + begin, end - begin)
    # As safetensors' own reader requires: the tensors' byte ranges tile the data section exactly
    # (no gap, no overlap, nothing after), so no byte of the file is read twice or not at all.
    covered = 0
    for run in sorted(storages.values(), key=lambda r: (r.offset, r.nbytes)):
        if run.offset - data_start != covered:
            return None
        covered += run.nbytes
    if covered != data_bytes:
        return None
    return out, storages
