"""The `.pkl` writer: handles -> a Detectron2 model-zoo pickle (`{"model": {name: numpy array},
"__author__": ...}`), one array at a time, without importing torch or numpy.

Each array is `numpy.ndarray(shape, dtype, bytearray(<bytes>))` (protocol 4, the payload outside
any frame, as a pickler writes large bytes), so a tensor that is one run of the source file is
copied into the pickle in the kernel (conversion/io/output.py); only bfloat16 tensors (widened to
float32, numpy has no bfloat16) and tensors built in memory pass through Python.
"""
from __future__ import annotations

import zlib
from typing import Any, Dict, Optional

from ..errors import UnreadableCheckpoint
from .crc import ReadBack
from .dtypes import ITEM_SIZE, widened
from .dtypes import PICKLED_NUMPY as NUMPY_DTYPES  # numpy spellings of what a .pkl stores (bfloat16 widened)
from .handles import TensorRef, numel
from .output import Output, Progress, expected_crcs, write_checked
from .pickle_writer import OpcodeWriter
from .tensor_bytes import Tensors

_NDARRAY, _BYTEARRAY = object(), object()  # memo keys of the globals the pickle names


class _Array:
    """A tensor to be pickled as a numpy array: its bytes are pulled from its handle when written."""

    def __init__(self, ref: TensorRef, tensors: Tensors) -> None:
        self.ref, self.tensors = ref, tensors
        run = tensors.run(ref)  # its bytes as one run of the source file, if they are
        # Copied file to file (in the kernel) when one run stored as it is; a bfloat16 tensor is
        # widened, so it goes through Python (its whole record still checked against its CRC).
        self.run, self.copied = run, run is not None and ref.dtype != "bfloat16"
        self.nbytes = numel(ref) * ITEM_SIZE[ref.dtype]
        self.expected = 0  # the CRC-32 a copied run must read back with

    def stored_bytes(self) -> bytes:
        """The tensor's bytes as they are to be stored (bfloat16 widened)."""
        raw = self.tensors.tensor_bytes(self.ref)
        if self.run is not None and self.run.crc is not None and zlib.crc32(raw) != self.run.crc:
            raise UnreadableCheckpoint(
                f"{self.tensors.path}: storage record of a tensor ({self.ref.storage.key}) fails its CRC-32: the archive is corrupt.",
                "Re-download or re-save it.",
            )
        return widened(raw) if self.ref.dtype == "bfloat16" else raw


def write_pkl_to(
    f: Any, tensors: Tensors, model: Dict[str, TensorRef], author: str, progress: Progress = None, read_back: Optional[ReadBack] = None
) -> None:
    """Write the model-zoo pickle of `model` to the open binary file `f`, every byte declared to
    `read_back`, holding no more than one tensor's bytes."""
    out = Output(f, tensors, read_back, "written pickle")
    w = OpcodeWriter(out, protocol=4)
    arrays = {name: _Array(ref, tensors) for name, ref in model.items()}
    copied = [a for a in arrays.values() if a.copied]
    for array, crc in zip(copied, expected_crcs(tensors, [a.run for a in copied])):  # type: ignore[misc]
        array.expected = crc
    total, done = sum(a.nbytes for a in arrays.values()), 0

    def value(obj: Any) -> None:
        nonlocal done
        if isinstance(obj, dict):
            w.dict_of(obj, list(obj.items()), value, value)
        elif isinstance(obj, str):
            w.string(obj)
        elif isinstance(obj, _Array):
            # numpy.ndarray(shape, dtype, bytearray(<bytes>)), opcode by opcode, so the bytes go
            # from the source (or one buffer) to the file; nothing per tensor stays in memory.
            w.flush_frame()  # where a pickler starts each object
            w.global_name(_NDARRAY, "numpy", "ndarray")
            w.tuple_of(obj.ref.shape, obj.ref.shape, value, memoize=False)  # shapes are never shared
            w.string(NUMPY_DTYPES[obj.ref.dtype])
            w.global_name(_BYTEARRAY, "builtins", "bytearray")
            if obj.copied:
                w.large_bytes_header(obj.nbytes)
                out.copy(obj.run, obj.expected, out.label, obj.ref.storage.key)  # type: ignore[arg-type]
            else:
                data = obj.stored_bytes()
                w.large_bytes_header(len(data))
                out.write(data)
            w.write(b"\x85R\x87R")  # TUPLE1 REDUCE TUPLE3 REDUCE
            w.forget()  # arrays are never shared: no memo entry is referred to again
            done += obj.nbytes
            if progress is not None:
                progress(done, total)
        elif isinstance(obj, int) and not isinstance(obj, bool):
            w.integer(obj)
        else:
            raise TypeError(f"a model-zoo pickle holds dicts, strings, ints and arrays, not {type(obj).__name__}")

    w.start()
    value({"model": arrays, "__author__": author})
    w.stop()


def write_pkl(
    dst: str, tensors: Tensors, model: Dict[str, TensorRef], author: str, *, force: bool, source: str, progress: Progress = None
) -> int:
    """Atomically write a Detectron2 model-zoo .pkl (write_pkl_to), checked by its read-back once
    synced: every byte reads back with the CRC meant, a copied array with its source's CRC."""
    fill = lambda f, read_back: write_pkl_to(f, tensors, model, author, progress, read_back)  # noqa: E731
    return write_checked(dst, tensors, fill, "pickle", force=force, source=source)
