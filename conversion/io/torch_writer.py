"""The `.pth` writer: handles -> a torch zip archive, pulling each storage's bytes from where it is
(conversion/io/tensor_bytes.py), for every source format, without importing torch (importing it
alone costs ~640 MB of resident memory); memory stays at the size of the index plus one tensor.

An archive is `archive/data.pkl` (the pickled dict, each tensor a reference to a storage record)
plus one stored record per storage, `archive/data/<key>`.  Renaming keys and dropping the
classifier changes only `data.pkl`, so a storage that is a run of the source file (a stored zip
record, a safetensors tensor, a legacy storage, a pickled payload) is copied byte for byte in the
kernel; anything else (bytes in memory, a deflated record, a non-contiguous view gathered in C
order) is written from a buffer.  The index has the opcodes torch uses (protocol 2,
`torch._utils._rebuild_tensor_v2`, typed-storage persistent ids; conversion/io/pickle_writer.py),
records are 64-byte aligned as torch aligns them, and the zip headers, central directory and end
records are laid out here, field by field as Python's `zipfile` lays them out (the bytes earlier
versions wrote through it, but for zip64 fields, written only where 32 bits do not hold a value);
torch's reader (1.9 to 2.x) and `zipfile` read them.
"""
from __future__ import annotations

import collections
import io
import struct
import zlib
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .crc import ReadBack
from .dtypes import ITEM_SIZE
from .handles import FileBytes, StorageRef, TensorRef, location_bytes, numel
from .output import Output, Progress, expected_crcs, write_checked
from .pickle_writer import OpcodeWriter
from .tensor_bytes import Gathered, Tensors

# What a written archive holds besides data.pkl and the storages, where the source is no torch
# archive to take them from: torch.save's own values.
TORCH_SMALL_RECORDS = ((".format_version", b"1"), (".storage_alignment", b"64"), ("byteorder", b"little"), ("version", b"3\n"))
ALIGNMENT = 64  # torch's PyTorchStreamWriter aligns record data to 64 bytes (mmap-able)
# A size or offset goes in a zip64 field only where 32 bits cannot hold it (0xFFFFFFFF is the
# field's "see zip64" mark), a count where 16 bits cannot.  Not at 2 GiB as Python's `zipfile`
# does (what versions up to 0.x wrote): torch 1.9's reader refuses an archive whose directory
# has zip64 offsets below 4 GiB (tests/io/test_writers.py).
_ZIP64_LIMIT, _ZIP_COUNT_LIMIT = 0xFFFFFFFE, 0xFFFE
_DOS_DATE = (1 << 5) | 1  # 1980-01-01, 00:00:00: a fixed date, so that the same input gives the same bytes

_STORAGE, _CPU = "storage", "cpu"  # one object each: the memo writes them once per index, as torch.save does
_REBUILD, _ORDERED_DICT = object(), object()  # memo keys of the globals the index names


def encode_index(payload: Any) -> bytes:
    """A torch archive's data.pkl for `payload` (dicts, strings, ints and TensorRef leaves), with
    the opcodes torch.save uses (protocol 2): each tensor is `torch._utils._rebuild_tensor_v2(
    <storage persistent id>, offset, shape, stride, False, OrderedDict())`, each storage
    `("storage", torch.<Type>Storage, key, "cpu", numel)`."""
    buf = io.BytesIO()
    w = OpcodeWriter(buf, protocol=2)
    kinds: Dict[str, object] = {}

    def value(obj: Any) -> None:
        if isinstance(obj, dict):
            w.dict_of(obj, list(obj.items()), value, value)
        elif isinstance(obj, str):
            w.string(obj)
        elif isinstance(obj, TensorRef):
            tensor(obj)
        elif isinstance(obj, bool) or not isinstance(obj, (int, tuple)):
            raise TypeError(f"an index holds dicts, strings, ints, tuples and tensors, not {type(obj).__name__}")
        elif isinstance(obj, int):
            w.integer(obj)
        else:
            w.tuple_of(obj, obj, value)

    def tensor(ref: TensorRef) -> None:
        hooks: Any = collections.OrderedDict()
        args = (ref.storage, ref.offset, ref.shape, ref.stride, False, hooks)
        w.reduce_call(ref, lambda: w.global_name(_REBUILD, "torch._utils", "_rebuild_tensor_v2"), lambda: w.tuple_of(args, args, argument))

    def argument(obj: Any) -> None:
        if isinstance(obj, StorageRef):
            kind = kinds.setdefault(obj.storage_type, object())
            pid = (_STORAGE, kind, obj.key, _CPU, obj.numel)
            w.persistent_id(lambda: w.tuple_of(pid, pid, lambda item: w.global_name(kind, "torch", obj.storage_type) if item is kind else value(item)))
        elif obj is False:
            w.false()
        elif isinstance(obj, collections.OrderedDict):
            w.reduce_call(obj, lambda: w.global_name(_ORDERED_DICT, "collections", "OrderedDict"), lambda: w.tuple_of((), (), value))
        else:
            value(obj)

    w.start()
    value(payload)
    w.stop()
    return buf.getvalue()


class _Entry:
    """A stored record as the directory describes it: name, where its local header starts, size, CRC."""

    def __init__(self, name: str, offset: int, size: int, crc: int) -> None:
        self.name, self.offset, self.size, self.crc = name, offset, size, crc
        ascii_name = name.isascii()
        self.encoded, self.flags = name.encode("ascii" if ascii_name else "utf-8"), 0 if ascii_name else 0x800
        # The extra field pads the local header so that the data starts on a 64-byte boundary
        # (torch's id "FB"); a record over the zip64 limit carries its sizes in a zip64 field first.
        self.zip64 = struct.pack("<HHQQ", 1, 16, size, size) if size > _ZIP64_LIMIT else b""
        pad = -(offset + 30 + len(self.encoded) + len(self.zip64) + 4) % ALIGNMENT
        self.extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad

    def local_header(self) -> bytes:
        size = 0xFFFFFFFF if self.zip64 else self.size
        extra = self.zip64 + self.extra
        return struct.pack("<4s2B4HL2L2H", b"PK\x03\x04", 45 if self.zip64 else 20, 0, self.flags, 0, 0, _DOS_DATE,
                           self.crc, size, size, len(self.encoded), len(extra)) + self.encoded + extra

    def directory_record(self) -> bytes:
        wide = [self.size, self.size] if self.size > _ZIP64_LIMIT else []
        wide += [self.offset] if self.offset > _ZIP64_LIMIT else []
        extra = (struct.pack(f"<HH{len(wide)}Q", 1, 8 * len(wide), *wide) if wide else b"") + self.extra
        size = 0xFFFFFFFF if self.size > _ZIP64_LIMIT else self.size
        version = 45 if wide else 20
        return struct.pack("<4s4B4HL2L5H2L", b"PK\x01\x02", version, 0, version, 0, self.flags, 0, 0, _DOS_DATE, self.crc, size, size,
                           len(self.encoded), len(extra), 0, 0, 0, 0, 0xFFFFFFFF if self.offset > _ZIP64_LIMIT else self.offset) + self.encoded + extra


def central_directory(entries: Sequence[_Entry], start: int) -> bytes:
    """The central directory of `entries`, written at `start`, and the end records (zip64 ones
    when the count, the directory's offset or its size needs them)."""
    directory = b"".join(entry.directory_record() for entry in entries)
    count, size = len(entries), len(directory)
    end = b""
    if count > _ZIP_COUNT_LIMIT or start > _ZIP64_LIMIT or size > _ZIP64_LIMIT:
        end = struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, count, count, size, start)
        end += struct.pack("<4sLQL", b"PK\x06\x07", 0, start + size, 1)
        count, size, start = min(count, 0xFFFF), min(size, 0xFFFFFFFF), min(start, 0xFFFFFFFF)
    return directory + end + struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, count, count, size, start, 0)


def write_pth_to(
    dst_file: Any,
    tensors: Tensors,
    payload: Any,
    keep: List[str],
    small: Sequence[Tuple[str, bytes]],
    progress: Progress = None,
    read_back: Optional[ReadBack] = None,
) -> None:
    """Write a torch archive to the open binary file `dst_file`: the new index `payload`, the
    `small` records, and the storages named in `keep`, each pulled from its location (a file run
    copied in the kernel, anything else from a buffer), every byte declared to `read_back`."""
    out = Output(dst_file, tensors, read_back)
    runs = {key: loc for key in keep for loc in [tensors.storages.get(key)] if isinstance(loc, FileBytes)}
    crcs = dict(zip(runs, expected_crcs(tensors, list(runs.values()))))
    sizes = {key: _storage_size(tensors, key) for key in keep}
    total, done = sum(sizes.values()), 0
    entries: List[_Entry] = []
    for name, item in [("data.pkl", encode_index(payload))] + list(small) + [(f"data/{key}", key) for key in keep]:
        label = f"record {name}"
        if isinstance(item, bytes) or item not in runs:
            data = item if isinstance(item, bytes) else tensors.storage_bytes(item)
            entries.append(_Entry(f"archive/{name}", out.at, len(data), zlib.crc32(data)))
            out.write(entries[-1].local_header(), label)
            out.write(data, label)
        else:
            entries.append(_Entry(f"archive/{name}", out.at, runs[item].nbytes, crcs[item]))
            out.write(entries[-1].local_header(), label)
            out.copy(runs[item], crcs[item], label, item)
        if not isinstance(item, bytes):
            done += sizes[item]
            if progress is not None:
                progress(done, total)
    out.write(central_directory(entries, out.at), "the zip directory")


def _storage_size(tensors: Tensors, key: str) -> int:
    loc = tensors.storages[key]
    return numel(loc.ref) * ITEM_SIZE[loc.ref.dtype] if isinstance(loc, Gathered) else location_bytes(loc)


def write_pth(
    dst: str, tensors: Tensors, payload: Any, keep: List[str], small: Sequence[Tuple[str, bytes]], *, force: bool, source: str, progress: Progress = None
) -> int:
    """Atomically write the archive to `dst` (write_pth_to), checked by its read-back once synced."""
    fill = lambda f, read_back: write_pth_to(f, tensors, payload, keep, small, progress, read_back)  # noqa: E731
    return write_checked(dst, tensors, fill, "archive", force=force, source=source)
