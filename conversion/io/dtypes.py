"""Element types: the one table of what each reader and writer needs to know about one.

A tensor's element type has a name in each format that carries it: torch's dtype name (what the
handles and reports use), the storage class a torch file's persistent ids name, numpy's spelling (a
`.pkl`'s arrays), and safetensors' dtype code.  They are one row each here, so that a new type, or
a fact about one, is written once.  numpy only: nothing here imports torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional


@dataclass(frozen=True)
class DType:
    name: str  # torch's dtype name: torch.float32 -> "float32"
    storage: str  # the storage class a torch file's persistent ids name
    itemsize: int
    # numpy's little-endian spelling.  numpy has no bfloat16: its raw 16 bits as int16 (torch >= 1.9
    # views int16 as bfloat16; it has no uint16 before 2.3).
    numpy: str
    safetensors: Optional[str]  # the header's dtype code, where the header reader reads one


_TABLE = (
    DType("float32", "FloatStorage", 4, "<f4", "F32"),
    DType("float16", "HalfStorage", 2, "<f2", "F16"),
    DType("bfloat16", "BFloat16Storage", 2, "<i2", "BF16"),
    DType("float64", "DoubleStorage", 8, "<f8", "F64"),
    DType("int64", "LongStorage", 8, "<i8", "I64"),
    DType("int32", "IntStorage", 4, "<i4", "I32"),
    DType("int16", "ShortStorage", 2, "<i2", "I16"),
    DType("int8", "CharStorage", 1, "|i1", "I8"),
    DType("uint8", "ByteStorage", 1, "|u1", "U8"),
    DType("bool", "BoolStorage", 1, "|b1", "BOOL"),
    DType("complex64", "ComplexFloatStorage", 8, "<c8", None),
    DType("complex128", "ComplexDoubleStorage", 16, "<c16", None),
)
DTYPES: Dict[str, DType] = {row.name: row for row in _TABLE}
ITEM_SIZE = {row.name: row.itemsize for row in _TABLE}
STORAGE_DTYPES = {row.storage: row.name for row in _TABLE}  # storage class -> dtype name
STORAGE_OF = {row.name: row.storage for row in _TABLE}  # dtype name -> storage class
SAFETENSORS = {row.safetensors: row for row in _TABLE if row.safetensors}  # header dtype code -> row
REAL_DTYPES = tuple(row.name for row in _TABLE if not row.name.startswith("complex"))  # what a weight may be

# A `.pkl` holds numpy arrays, and numpy has no bfloat16: a bfloat16 tensor is stored as float32,
# exactly (a bfloat16 value is the top half of the float32 with that value; `widened`).
PICKLE_WIDENS = {"bfloat16": "float32"}
PICKLED_NUMPY = {row.name: DTYPES[PICKLE_WIDENS.get(row.name, row.name)].numpy for row in _TABLE}


def widened(raw: bytes) -> bytes:
    """bfloat16 bits -> the float32 bytes of the same values (`PICKLE_WIDENS`)."""
    import numpy as np

    return (np.frombuffer(raw, "<u2").astype("<u4") << 16).tobytes()
