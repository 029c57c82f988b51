"""The writers: handles -> `.pth` (a torch archive) or `.pkl` (a model-zoo pickle), pulling each
handle's bytes from where its storage is (conversion/io/tensor_bytes.py), for every source format.
One writer per format, in two layers: `write_pth` / `write_pkl` write a destination path
atomically and verify it; `write_pth_to` / `write_pkl_to` write into an open file (what the first
pair, and `conversion.write.encode` for tensors in memory, run).

A torch archive is `<folder>/data.pkl` (the pickled dict, each tensor a reference to a storage
record) plus one stored record per storage, `<folder>/data/<key>`.  Renaming keys and dropping the
classifier changes only `data.pkl`, so a storage that is a run of the source file (a stored zip
record, a safetensors tensor, a legacy storage, a pickled payload) is copied byte for byte
(`os.copy_file_range`, in the kernel); anything else (bytes in memory, a deflated record, a
non-contiguous view given a new shape, gathered in C order) is written from a buffer.  Nothing
here imports torch (importing it alone costs ~640 MB of resident memory); memory stays at the
size of the index plus one tensor whatever the checkpoint's size.

The index is written with the same opcodes torch uses (protocol 2, `torch._utils._rebuild_tensor_v2`,
typed-storage persistent ids) by the explicit opcode writer of conversion/io/pickle_writer.py, records are 64-byte aligned as torch aligns them, and the result is
read back: every record's CRC-32 is computed once, by one thread per core (conversion/io/crc.py),
and checked against the source's (where the source has none, it is computed from the source's
bytes and patched into the local header), and the new index is parsed and compared.  The `.pkl`
writer copies whole runs in the kernel as well (only bfloat16 tensors, widened, and built
tensors pass through Python) and reads its output back the same way, through the one safe
unpickler in payload mode (conversion/io/modelzoo_pkl.py: no payload read while parsing).

(About 400 lines: both writers and their read-backs stay together, each read-back next to what
it checks.)
"""
from __future__ import annotations

import collections
import io
import os
import struct
import zipfile
import zlib
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .errors import UnreadableCheckpoint, VerificationFailed
from .io.atomic import write_atomically
from .io import crc as _crc
from .io.crc import ReadBack
from .io.modelzoo_pkl import array_digests
from .io.pickle_writer import OpcodeWriter
from .io.dtypes import ITEM_SIZE, widened
from .io.dtypes import PICKLED_NUMPY as NUMPY_DTYPES  # numpy spellings of what a .pkl stores (bfloat16 widened)
from .io.handles import FileBytes, StorageRef, TensorRef, location_bytes, numel
from .io.tensor_bytes import Gathered, Tensors
from .io.torchzip import (  # noqa: F401  (read_index, _data_offset: this module's readers, used by tests)
    _aligned_info,
    _data_offset,
    add_entry,
    local_header,
    read_index,
)

_COPY_CHUNK = 1 << 24
# What a written archive holds besides data.pkl and the storages, where the source is no torch
# archive to take them from: torch.save's own values.
TORCH_SMALL_RECORDS = ((".format_version", b"1"), (".storage_alignment", b"64"), ("byteorder", b"little"), ("version", b"3\n"))


# ---------------------------------------------------------------- writing


_STORAGE, _CPU = "storage", "cpu"  # one object each: the memo writes them once per index, as torch.save does
_REBUILD, _ORDERED_DICT = object(), object()  # memo keys of the globals the index names
_NDARRAY, _BYTEARRAY = object(), object()  # and those the model-zoo pickle names


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


def _copy_range(src_fd: int, dst_fd: int, src_offset: int, count: int) -> None:
    """Copy `count` bytes from src at src_offset to dst's current position, in the kernel when possible."""
    dst_offset = os.lseek(dst_fd, 0, os.SEEK_CUR)
    done = 0
    use_kernel = hasattr(os, "copy_file_range")
    while done < count:
        n = min(_COPY_CHUNK, count - done)
        copied = 0
        if use_kernel:
            try:
                copied = os.copy_file_range(src_fd, dst_fd, n, src_offset + done, dst_offset + done)
            except OSError:
                use_kernel = False
        if not use_kernel or copied == 0:
            block = os.pread(src_fd, n, src_offset + done)
            if not block:
                raise EOFError("the source ends inside the range")
            os.pwrite(dst_fd, block, dst_offset + done)
            copied = len(block)
        done += copied
    os.lseek(dst_fd, dst_offset + count, os.SEEK_SET)


Progress = Optional[Callable[[int, int], None]]  # (bytes done, bytes in all), for a progress display


def _copy_from_source(tensors: Tensors, dst_fd: int, offset: int, count: int) -> None:
    """`_copy_range` from the source file; a source that ends inside the range is named."""
    try:
        _copy_range(tensors.fd, dst_fd, offset, count)
    except EOFError:
        raise tensors.ends_inside_a_tensor() from None


def _source_crcs(tensors: Tensors, runs: List[FileBytes]) -> List[int]:
    """CRC-32 of source runs whose format records none (safetensors, legacy storages, payloads),
    computed in parallel from the source: the expected value the read-back checks the copy against."""
    try:
        return _crc.crcs_of_ranges(tensors.fd, [(run.offset, run.nbytes) for run in runs]) if runs else []
    except EOFError:
        raise tensors.ends_inside_a_tensor() from None


def write_pth_to(
    dst_file: Any,
    tensors: Tensors,
    payload: Any,
    keep: List[str],
    small: Sequence[Tuple[str, bytes]],
    progress: Progress = None,
    read_back: Optional[ReadBack] = None,
) -> Dict[str, int]:
    """Write a torch archive: the new index `payload`, the `small` records, and the storages named
    in `keep`, each pulled from its location (a file run copied in the kernel, anything else from a
    buffer).  `dst_file` is an open binary file; each record copied in the kernel is reported to
    `read_back` as soon as it is in the file (its CRC is read back while the next one is copied).
    Returns each storage record's expected CRC-32."""
    crcs: Dict[str, int] = {}
    pending: List[Tuple[zipfile.ZipInfo, str, FileBytes]] = []  # copied runs whose CRC the source does not record
    with zipfile.ZipFile(dst_file, "w") as zf:
        entries: List[Tuple[str, Any]] = [("data.pkl", encode_index(payload))] + list(small) + [(f"data/{key}", key) for key in keep]
        sizes = {key: _storage_size(tensors, key) for key in keep}
        total, done = sum(sizes.values()), 0
        for name, item in entries:
            full = f"archive/{name}"
            offset = dst_file.tell()
            run = tensors.storages.get(item) if not isinstance(item, bytes) else None
            if isinstance(run, FileBytes):
                info = _aligned_info(full, offset, run.nbytes, run.crc or 0)
                dst_file.write(local_header(info))
                dst_file.flush()  # hand over to the fd: the copy happens in the kernel
                _copy_from_source(tensors, dst_file.fileno(), run.offset, run.nbytes)
                dst_file.seek(offset + len(local_header(info)) + run.nbytes)
                if read_back is not None:
                    read_back.written(offset + len(local_header(info)), run.nbytes)
                if run.crc is None:
                    pending.append((info, name, run))
                else:
                    crcs[name] = run.crc
            else:
                data = item if isinstance(item, bytes) else tensors.storage_bytes(item)
                info = _aligned_info(full, offset, len(data), zlib.crc32(data))
                dst_file.write(local_header(info))
                dst_file.write(data)
                if not isinstance(item, bytes):
                    crcs[name] = info.CRC
            add_entry(zf, info, dst_file.tell())
            if not isinstance(item, bytes):
                done += sizes[item]
                if progress is not None:
                    progress(done, total)
        end = dst_file.tell()
        for (info, name, run), crc in zip(pending, _source_crcs(tensors, [run for _, _, run in pending])):
            info.CRC = crcs[name] = crc
            dst_file.seek(info.header_offset + 14)  # the local header's CRC field
            dst_file.write(struct.pack("<I", crc))
        dst_file.seek(end)
    return crcs


def _storage_size(tensors: Tensors, key: str) -> int:
    loc = tensors.storages[key]
    return numel(loc.ref) * ITEM_SIZE[loc.ref.dtype] if isinstance(loc, Gathered) else location_bytes(loc)


def check_archive(
    path: str,
    expected: Any,
    copied_crcs: Dict[str, int],
    shown_as: str = "",
    source: Optional[Tensors] = None,
    read_back: Optional[ReadBack] = None,
) -> None:
    """Read the written archive back: every record's bytes against its stored CRC-32, storage
    records' CRCs against the source's, and the index against what was meant to be written.

    Each record is checksummed once, in parallel (the copied ones already while they were written,
    by `read_back`; the rest here).  A copied record's stored CRC
    is the source's, so that one pass proves both that the copy is faithful and that the source's
    bytes were intact; only when a record fails is the source checked, to say which file is at
    fault.  Errors name `shown_as` (the destination), not the temporary file."""
    shown = shown_as or path
    try:
        with open(path, "rb") as f, zipfile.ZipFile(f) as zf:
            infos = zf.infolist()
            ranges = [(_data_offset(f, info), info.file_size) for info in infos]
            crcs = (read_back or ReadBack()).crcs(f.fileno(), ranges)
            for info, crc in zip(infos, crcs):
                key = info.filename[len("archive/"):]
                if crc != info.CRC or (key in copied_crcs and copied_crcs[key] != crc):
                    _blame_source(source, key[len("data/"):] if key.startswith("data/") else None)
                    raise VerificationFailed(f"{shown}: record {key} does not read back as written.", "Report this as a bug.")
        got = read_index(path).objects
    except (VerificationFailed, UnreadableCheckpoint):
        raise
    except Exception as err:  # the file we just wrote does not even parse: same verdict
        raise VerificationFailed(f"{shown}: written archive does not read back ({type(err).__name__}: {err}).", "Report this as a bug.") from None
    if got != expected:
        raise VerificationFailed(f"{shown}: written index does not read back as written.", "Report this as a bug.")


def _blame_source(source: Optional[Tensors], key: Optional[str]) -> None:
    """A written record failed its CRC: if the source's storage fails its own recorded CRC too, the
    source is corrupt (exit 2, re-download), not the writing (exit 1)."""
    loc = source.storages.get(key) if source is not None and key is not None else None
    if not isinstance(loc, FileBytes) or loc.crc is None:
        return
    try:
        intact = _crc.crc_of_range(source.fd, loc.offset, loc.nbytes) == loc.crc
    except EOFError:
        intact = False
    if not intact:
        raise UnreadableCheckpoint(f"{source.path}: record data/{key} fails its CRC-32: the archive is corrupt.", "Re-download or re-save it.")


def write_pth(
    dst: str, tensors: Tensors, payload: Any, keep: List[str], small: Sequence[Tuple[str, bytes]], *, force: bool, source: str, progress: Progress = None
) -> int:
    """Atomically write the archive to `dst` (write_pth_to, then check_archive on the temporary file)."""
    crcs: Dict[str, int] = {}
    read_back = ReadBack()
    with tensors:
        return write_atomically(
            dst,
            force=force,
            source=source,
            write=lambda f: crcs.update(write_pth_to(f, tensors, payload, keep, small, progress, read_back)),
            verify=lambda tmp: check_archive(tmp, payload, crcs, shown_as=dst, source=tensors, read_back=read_back),
            read_back=read_back,
        )


# ---------------------------------------------------------------- torch archive -> Detectron2 .pkl


class _Array:
    """A tensor to be pickled as a numpy array: its bytes are pulled from its handle when written."""

    def __init__(self, ref: TensorRef, tensors: Tensors) -> None:
        self.ref, self.tensors = ref, tensors
        self.run = tensors.run(ref)  # its bytes as one run of the source file, if they are

    @property
    def nbytes(self) -> int:
        return numel(self.ref) * ITEM_SIZE[self.ref.dtype]

    @property
    def copied(self) -> bool:
        """Whether the bytes are copied file to file (in the kernel): one run of the source, stored
        as it is (a bfloat16 tensor is widened, so it goes through Python)."""
        return self.run is not None and self.ref.dtype != "bfloat16"

    def stored_bytes(self) -> bytes:
        """The tensor's bytes as they are to be stored (bfloat16 widened); a whole record's bytes
        are checked against the record's CRC on the way."""
        raw = self.tensors.tensor_bytes(self.ref)
        if self.run is not None and self.run.crc is not None and zlib.crc32(raw) != self.run.crc:
            raise UnreadableCheckpoint(
                f"{self.tensors.path}: storage record of a tensor ({self.ref.storage.key}) fails its CRC-32: the archive is corrupt.",
                "Re-download or re-save it.",
            )
        return widened(raw) if self.ref.dtype == "bfloat16" else raw


class _ModelZooWriter:
    """Writes the model-zoo pickle one array at a time: `numpy.ndarray(shape, dtype, bytearray)`,
    without holding more than one tensor's bytes (protocol 4, each payload outside any frame)."""

    def __init__(self, f: Any, total: int = 0, progress: Progress = None, read_back: Optional[ReadBack] = None) -> None:
        self.f, self.w, self.read_back = f, OpcodeWriter(f, protocol=4), read_back
        self.digests: Dict[int, Tuple[int, int]] = {}
        self.pending: List[Tuple[int, FileBytes]] = []  # copied runs whose CRC the source does not record
        self.total, self.done, self.progress = total, 0, progress

    def dump(self, payload: Dict[str, Any]) -> None:
        self.w.start()
        self.value(payload)
        self.w.stop()

    def value(self, obj: Any) -> None:
        if isinstance(obj, dict):
            self.w.dict_of(obj, list(obj.items()), self.value, self.value)
        elif isinstance(obj, str):
            self.w.string(obj)
        elif isinstance(obj, _Array):
            self.array(obj)
        elif isinstance(obj, int) and not isinstance(obj, bool):
            self.w.integer(obj)
        else:
            raise TypeError(f"a model-zoo pickle holds dicts, strings, ints and arrays, not {type(obj).__name__}")

    def array(self, obj: _Array) -> None:
        # numpy.ndarray(shape, dtype, bytearray(<bytes>)), opcode by opcode, so the bytes go from
        # the source (or one buffer) to the file; nothing per tensor stays in memory.
        w = self.w
        w.flush_frame()  # where a pickler starts each object
        w.global_name(_NDARRAY, "numpy", "ndarray")
        w.tuple_of(obj.ref.shape, obj.ref.shape, self.value, memoize=False)  # shapes are never shared
        w.string(NUMPY_DTYPES[obj.ref.dtype])
        w.global_name(_BYTEARRAY, "builtins", "bytearray")
        if obj.copied:
            assert obj.run is not None
            w.large_bytes_header(obj.nbytes)
            self.f.flush()  # hand over to the fd: the copy happens in the kernel
            at = self.f.tell()
            _copy_from_source(obj.tensors, self.f.fileno(), obj.run.offset, obj.nbytes)
            self.f.seek(at + obj.nbytes)
            if self.read_back is not None:
                self.read_back.written(at, obj.nbytes)
            if obj.run.crc is None:
                self.pending.append((id(obj), obj.run))
            self.digests[id(obj)] = (obj.run.crc or 0, obj.nbytes)
        else:
            data = obj.stored_bytes()
            self.digests[id(obj)] = (zlib.crc32(data), len(data))
            w.large_bytes_header(len(data))
            self.f.write(data)
        w.write(b"\x85R\x87R")  # TUPLE1 REDUCE TUPLE3 REDUCE
        w.forget()  # arrays are never shared: no memo entry is referred to again
        self.done += obj.nbytes
        if self.progress is not None:
            self.progress(self.done, self.total)


def write_pkl_to(
    f: Any, tensors: Tensors, model: Dict[str, TensorRef], author: str, progress: Progress = None, read_back: Optional[ReadBack] = None
) -> Dict[str, Any]:
    """Write the model-zoo pickle of `model` to the open binary file `f`; return each array's
    expected (shape, dtype, CRC-32, size), what the read-back compares (payloads copied in the
    kernel are reported to `read_back` as they are written)."""
    arrays = {name: _Array(ref, tensors) for name, ref in model.items()}
    pickler = _ModelZooWriter(f, sum(a.nbytes for a in arrays.values()), progress, read_back)
    pickler.dump({"model": arrays, "__author__": author})
    for (key, run), crc in zip(pickler.pending, _source_crcs(tensors, [run for _, run in pickler.pending])):
        pickler.digests[key] = (crc, run.nbytes)
    return {name: (arr.ref.shape, NUMPY_DTYPES[arr.ref.dtype]) + pickler.digests[id(arr)] for name, arr in arrays.items()}


def write_pkl(
    dst: str, tensors: Tensors, model: Dict[str, TensorRef], author: str, *, force: bool, source: str, progress: Progress = None
) -> int:
    """Atomically write a Detectron2 model-zoo .pkl, one tensor in memory at a time, then read it
    back comparing every array's shape, dtype and bytes (CRC-32) with what was meant.

    Whole runs are copied in the kernel and their expected CRC is the source's (a zip record's own,
    or computed from the source where the format records none), so the one read-back pass also
    proves the copy; a failing array whose source record fails its own CRC is blamed on the source
    (UnreadableCheckpoint), otherwise on the writing."""
    expected: Dict[str, Any] = {}
    read_back = ReadBack()

    def write(f: Any) -> None:
        expected.update(write_pkl_to(f, tensors, model, author, progress, read_back))

    def verify(tmp: str) -> None:
        try:
            # The one safe unpickler in payload mode: shapes and dtypes parsed, no payload read; the
            # payloads' CRCs from `read_back` (those copied in the kernel were read back as they were
            # written, the rest now, in parallel).
            got = array_digests(tmp, crcs=read_back.crcs)
        except Exception as err:  # a pickle we just wrote that does not parse back
            raise VerificationFailed(f"{dst}: written pickle does not read back ({type(err).__name__}: {err}).", "Report this as a bug.") from None
        if not isinstance(got, dict) or got.get("__author__") != author or got.get("model") != expected:
            written = got.get("model") if isinstance(got, dict) and isinstance(got.get("model"), dict) else {}
            for name, want in expected.items():
                if written.get(name) != want:
                    _blame_source(tensors, model[name].storage.key)
            raise VerificationFailed(f"{dst}: written pickle does not read back as written.", "Report this as a bug.")

    with tensors:
        return write_atomically(dst, force=force, source=source, write=write, verify=verify, read_back=read_back)
