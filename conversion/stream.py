"""Streaming conversion of torch archives: rewrite the small pickled index, copy the tensor bytes.

A `torch.save` file is a zip archive: `<folder>/data.pkl` (the pickled dict, where each tensor
is a reference to a storage record) plus one stored (uncompressed) record per storage,
`<folder>/data/<key>`.  Renaming keys and dropping the classifier changes only `data.pkl`, so
the storages are copied byte for byte (`os.copy_file_range`, in the kernel) and only the index
is rebuilt.  Nothing here imports torch (importing it alone costs ~640 MB of resident memory);
memory stays at the size of the index whatever the checkpoint's size.

The index is read by the one safe unpickler (conversion/io/torchzip.py, conversion/io/safe_pickle.py)
with storages as references, so nothing in the file executes and no tensor byte is read.  The new
index is written with the same opcodes torch uses (protocol 2, `torch._utils._rebuild_tensor_v2`,
typed-storage persistent ids), records are 64-byte aligned as torch aligns them, and the result is
read back: every record's CRC-32 is computed once, by one thread per core (conversion/io/crc.py;
a copied record's as soon as it is in the file, while the next one is copied), and checked against
the source's, and the new index is parsed and compared.  The `.pkl` writer
copies whole records in the kernel as well (only bfloat16 tensors and slices of a record pass
through Python) and reads its output back the same way.

(Over 400 lines: both writers and their read-backs stay together, because each read-back mirrors
its writer opcode for opcode.)

Only archives whose weights are all plain stored references reach these writers: the pipeline
(conversion/pipeline.py) sends deflated records, numpy arrays among the weights and shape fixes of
non-contiguous tensors to the buffered writer instead.
"""
from __future__ import annotations

import collections
import io
import mmap
import os
import pickle
import struct
import zipfile
import zlib
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .errors import UnreadableCheckpoint, VerificationFailed
from .formats import write_atomically
from .io.crc import ReadBack, crc_of_range as _crc_of_range
from .io.handles import ITEM_SIZE, STORAGE_DTYPES, StorageRef, TensorRef, contiguous_stride  # noqa: F401
from .io.torchzip import (  # noqa: F401  (read_index, check_references, ArchiveIndex: this module's readers)
    ALIGNMENT,
    COMPRESSION_BOUND,
    ArchiveIndex,
    _aligned_info,
    _data_offset,
    add_entry,
    local_header,
    check_references,
    read_index,
)

_COPY_CHUNK = 1 << 24
_ITEM_SIZE = ITEM_SIZE


# ---------------------------------------------------------------- writing


class _Global:
    """A global the new index names (written as a GLOBAL opcode without importing its module)."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    def __call__(self, *args: Any) -> Any:  # the pickler requires a callable in a reduce tuple
        raise TypeError(f"{self.module}.{self.name} is only a name to write")


_REBUILD = _Global("torch._utils", "_rebuild_tensor_v2")


class _IndexPickler(pickle._Pickler):  # the pure-Python pickler: its dispatch table can be extended
    """Writes the new index with the opcodes torch.save uses for a state dict (protocol 2)."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_global_ref(self, obj: _Global) -> None:
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode("utf-8"))
        self.memoize(obj)

    dispatch[_Global] = _save_global_ref

    def __init__(self, f: Any) -> None:
        super().__init__(f, protocol=2)
        self._types: Dict[str, _Global] = {}

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, StorageRef):
            kind = self._types.setdefault(obj.storage_type, _Global("torch", obj.storage_type))
            return ("storage", kind, obj.key, "cpu", obj.numel)
        return None

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, TensorRef):
            return _REBUILD, (obj.storage, obj.offset, obj.shape, obj.stride, False, collections.OrderedDict())
        return NotImplemented


def encode_index(payload: Any) -> bytes:
    buf = io.BytesIO()
    _IndexPickler(buf).dump(payload)
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
                raise UnreadableCheckpoint("source archive is truncated", "Re-download or re-save it.")
            os.pwrite(dst_fd, block, dst_offset + done)
            copied = len(block)
        done += copied
    os.lseek(dst_fd, dst_offset + count, os.SEEK_SET)


Progress = Optional[Callable[[int, int], None]]  # (bytes done, bytes in all), for a progress display


def write_archive(
    dst_file: Any, index: ArchiveIndex, payload: Any, keep: List[str], progress: Progress = None, read_back: Optional[ReadBack] = None
) -> None:
    """Write a torch archive: the new index `payload`, the source's small records, and the storage
    records named in `keep` copied byte for byte.  `dst_file` is an open binary file; each copied
    record is reported to `read_back` as soon as it is in the file."""
    small = [n for n in (".format_version", ".storage_alignment", "byteorder", "version", ".data/serialization_id") if n in index.records]
    with open(index.path, "rb") as src, zipfile.ZipFile(dst_file, "w") as zf:
        entries: List[Tuple[str, Optional[bytes], Optional[zipfile.ZipInfo]]] = [("data.pkl", encode_index(payload), None)]
        for name in small:
            entries.append((name, None, index.records[name]))
        for key in keep:
            entries.append((f"data/{key}", None, index.records[f"data/{key}"]))
        total, done = sum(index.records[f"data/{k}"].file_size for k in keep), 0
        for name, data, source in entries:
            full = f"archive/{name}"
            offset = dst_file.tell()
            if data is not None:
                info = _aligned_info(full, offset, len(data), zlib.crc32(data))
            else:
                assert source is not None
                info = _aligned_info(full, offset, source.file_size, source.CRC)
            dst_file.write(local_header(info))
            if data is not None:
                dst_file.write(data)
            else:
                dst_file.flush()  # hand over to the fd: the copy happens in the kernel
                _copy_range(src.fileno(), dst_file.fileno(), _data_offset(src, source), source.file_size)
                dst_file.seek(offset + len(local_header(info)) + source.file_size)
                if read_back is not None:
                    read_back.written(offset + len(local_header(info)), source.file_size)
            add_entry(zf, info, dst_file.tell())
            if source is not None and name.startswith("data/"):
                done += source.file_size
                if progress is not None:
                    progress(done, total)


def check_archive(
    path: str,
    expected: Any,
    copied_crcs: Dict[str, int],
    shown_as: str = "",
    source: Optional[ArchiveIndex] = None,
    read_back: Optional[ReadBack] = None,
) -> None:
    """Read the written archive back: every record's bytes against its stored CRC-32, copied
    records' CRCs against the source's, and the index against what was meant to be written.

    Each record is checksummed once, in parallel (the copied ones already while they were written,
    by `read_back`; the rest here).  A copied record's stored CRC
    is the source record's, so that one pass proves both that the copy is faithful and that the
    source's bytes were intact; only when a record fails is the source record checked, to say
    which file is at fault.  Errors name `shown_as` (the destination), not the temporary file."""
    shown = shown_as or path
    try:
        with open(path, "rb") as f, zipfile.ZipFile(f) as zf:
            infos = zf.infolist()
            ranges = [(_data_offset(f, info), info.file_size) for info in infos]
            crcs = (read_back or ReadBack()).crcs(f.fileno(), ranges)
            for info, crc in zip(infos, crcs):
                key = info.filename[len("archive/"):]
                if crc != info.CRC or (key in copied_crcs and copied_crcs[key] != crc):
                    _blame_source(source, key)
                    raise VerificationFailed(f"{shown}: record {key} does not read back as written.", "Report this as a bug.")
        got = read_index(path).objects
    except (VerificationFailed, UnreadableCheckpoint):
        raise
    except Exception as err:  # the file we just wrote does not even parse: same verdict
        raise VerificationFailed(f"{shown}: written archive does not read back ({type(err).__name__}: {err}).", "Report this as a bug.") from None
    if got != expected:
        raise VerificationFailed(f"{shown}: written index does not read back as written.", "Report this as a bug.")


def _blame_source(source: Optional[ArchiveIndex], key: str) -> None:
    """A written record failed its CRC: if the source's record fails its own CRC too, the source is
    corrupt (exit 2, re-download), not the writing (exit 1)."""
    if source is None or key not in source.records:
        return
    with open(source.path, "rb") as src:
        original = source.records[key]
        try:
            intact = _crc_of_range(src.fileno(), _data_offset(src, original), original.file_size) == original.CRC
        except EOFError:
            intact = False
        if not intact:
            raise UnreadableCheckpoint(f"{source.path}: record {key} fails its CRC-32: the archive is corrupt.", "Re-download or re-save it.")


def write_streamed(
    dst: str, index: ArchiveIndex, payload: Any, keep: List[str], *, force: bool, source: str, progress: Progress = None
) -> int:
    """Atomically write the streamed archive to `dst` (same rules as write.write_checkpoint)."""
    read_back = ReadBack()
    copied = {f"data/{k}": index.records[f"data/{k}"].CRC for k in keep}
    return write_atomically(
        dst,
        force=force,
        source=source,
        write=lambda f: write_archive(f, index, payload, keep, progress, read_back),
        verify=lambda tmp: check_archive(tmp, payload, copied, shown_as=dst, source=index, read_back=read_back),
        read_back=read_back,
    )


# ---------------------------------------------------------------- torch archive -> Detectron2 .pkl

# numpy spellings of the storage dtypes (little-endian, as torch archives are); bfloat16 has none
# and is widened to float32 exactly (a bf16 value is the top half of the float32 with that value).
NUMPY_DTYPES = {
    "float32": "<f4", "float16": "<f2", "float64": "<f8", "int64": "<i8", "int32": "<i4",
    "int16": "<i2", "int8": "|i1", "uint8": "|u1", "bool": "|b1", "bfloat16": "<f4",
}
_NDARRAY = _Global("numpy", "ndarray")
_BYTEARRAY = _Global("builtins", "bytearray")


class _RecordArray:
    """A tensor to be pickled as a numpy array: its bytes come from the archive when written."""

    def __init__(self, ref: TensorRef, fd: int, data_offset: int, record_crc: Optional[int] = None) -> None:
        if not ref.is_contiguous():
            raise ValueError("a non-contiguous tensor cannot be copied as one run of bytes (the pipeline writes it buffered)")
        self.ref, self.fd = ref, fd
        self.start = data_offset + ref.offset * _ITEM_SIZE[ref.dtype]
        # A tensor spanning its whole storage is the whole record: its bytes must match the record's CRC.
        whole = ref.offset == 0 and ref.numel() == ref.storage.numel
        self.record_crc = record_crc if whole else None

    @property
    def nbytes(self) -> int:
        return self.ref.numel() * _ITEM_SIZE[self.ref.dtype]

    @property
    def copied(self) -> bool:
        """Whether the bytes are copied file to file (in the kernel): the whole record, stored as it
        is.  Its CRC is the record's, checked when the written file is read back; a slice of a
        record, or a bfloat16 tensor (widened), goes through Python instead."""
        return self.record_crc is not None and self.ref.dtype != "bfloat16"

    def read_into(self, buffer: bytearray) -> memoryview:
        """The tensor's bytes, read into `buffer` (reused: fresh allocations per tensor cost more
        in page faults than the copy itself), as they are to be stored (bfloat16 widened)."""
        count = self.nbytes
        view = memoryview(buffer)[:count]
        done = 0
        while done < count:
            n = os.preadv(self.fd, [view[done:]], self.start + done)
            if n == 0:
                raise UnreadableCheckpoint("source archive is truncated", "Re-download or re-save it.")
            done += n
        if self.record_crc is not None and zlib.crc32(view) != self.record_crc:
            raise UnreadableCheckpoint(
                f"storage record of a tensor ({self.ref.storage.key}) fails its CRC-32: the archive is corrupt.", "Re-download or re-save it."
            )
        if self.ref.dtype == "bfloat16":
            import numpy as np

            return memoryview((np.frombuffer(view, "<u2").astype("<u4") << 16).tobytes())
        return view


class _ModelZooStreamPickler(pickle._Pickler):
    """Writes the model-zoo pickle one array at a time: `numpy.ndarray(shape, dtype, bytearray)`,
    the same spelling as write.py's, without holding more than one tensor's bytes."""

    dispatch = dict(_IndexPickler.dispatch)

    def __init__(self, f: Any, largest: int, total: int = 0, progress: Progress = None, read_back: Optional[ReadBack] = None) -> None:
        super().__init__(f, protocol=4)
        self.f, self.read_back = f, read_back
        self.digests: Dict[int, Tuple[int, int]] = {}
        self.buffer = bytearray(largest)  # for the arrays that go through Python only
        self.total, self.done, self.progress = total, 0, progress

    def _save_record_array(self, obj: _RecordArray) -> None:
        # numpy.ndarray(shape, dtype, bytearray(<bytes>)), spelled out opcode by opcode so the bytes
        # go from the source (or the read buffer) to the file (BINBYTES8 outside any frame, as
        # pickle does for large payloads); nothing per tensor stays in memory.
        self.save(_NDARRAY)
        self.save(obj.ref.shape)
        self.save(NUMPY_DTYPES[obj.ref.dtype])
        self.save(_BYTEARRAY)
        if obj.copied:
            assert obj.record_crc is not None
            self.framer.write_large_bytes(pickle.BINBYTES8 + struct.pack("<Q", obj.nbytes), b"")
            self.f.flush()  # hand over to the fd: the copy happens in the kernel
            at = self.f.tell()
            _copy_range(obj.fd, self.f.fileno(), obj.start, obj.nbytes)
            self.f.seek(at + obj.nbytes)
            if self.read_back is not None:
                self.read_back.written(at, obj.nbytes)
            self.digests[id(obj)] = (obj.record_crc, obj.nbytes)
        else:
            data = obj.read_into(self.buffer)
            self.digests[id(obj)] = (zlib.crc32(data), len(data))
            self.framer.write_large_bytes(pickle.BINBYTES8 + struct.pack("<Q", len(data)), data)
        self.write(pickle.TUPLE1 + pickle.REDUCE + pickle.TUPLE3 + pickle.REDUCE)
        self.memo.clear()  # arrays are never shared
        self.done += obj.nbytes
        if self.progress is not None:
            self.progress(self.done, self.total)

    dispatch[_RecordArray] = _save_record_array

    def memoize(self, obj: Any) -> None:
        if isinstance(obj, tuple):
            return  # shapes and argument tuples are never shared; no MEMOIZE keeps readers' memos small
        super().memoize(obj)


class _Digest:
    """An array's payload in the written pickle: where it lies, and (once computed) its CRC-32."""

    def __init__(self, size: int, start: int = -1, crc: Optional[int] = None) -> None:
        self.size, self.start, self.crc = size, start, crc


class _DigestUnpickler(pickle._Unpickler):  # pure Python: its opcode table can be extended
    """Reads a written model-zoo pickle back as (shape, dtype, digest) per array without reading
    the arrays' bytes: large payloads (outside frames) are skipped and listed in `pending`, to be
    checksummed afterwards in parallel (`ReadBack.crcs`: those copied in the kernel were already read
    back while the file was written)."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, f: Any, read_back: Optional[ReadBack] = None) -> None:
        super().__init__(f)
        self._file, self._read_back = f, read_back or ReadBack()
        self.pending: List[_Digest] = []

    def _load_binbytes8(self) -> None:
        (size,) = struct.unpack("<Q", self.read(8))
        if self._unframer.current_frame is None:  # a large payload, written outside frames
            start = self._file.tell()
            digest = _Digest(size, start)
            self.pending.append(digest)
            self._file.seek(start + size)
        else:
            data = self.read(size)
            digest = _Digest(len(data), crc=zlib.crc32(data))
        self.append(digest)

    dispatch[pickle.BINBYTES8[0]] = _load_binbytes8

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("numpy", "ndarray"):
            return lambda shape, dtype, buf: (tuple(shape), dtype, buf)
        if (module, name) == ("builtins", "bytearray"):
            return lambda digest: digest
        raise VerificationFailed(f"written pickle names {module}.{name}", "Report this as a bug.")

    def load_digests(self) -> Any:
        """The pickle, each array as (shape, dtype, crc, size)."""
        got = self.load()
        if self._file.seek(0, os.SEEK_END) < max((d.start + d.size for d in self.pending), default=0):
            raise EOFError("the file ends inside an array")
        for digest, crc in zip(self.pending, self._read_back.crcs(self._file.fileno(), [(d.start, d.size) for d in self.pending])):
            digest.crc = crc
        model = got.get("model") if isinstance(got, dict) else None
        if isinstance(model, dict):
            got["model"] = {k: v[:2] + (v[2].crc, v[2].size) if isinstance(v, tuple) and len(v) == 3 else v for k, v in model.items()}
        return got


def write_streamed_pickle(
    dst: str, index: ArchiveIndex, model: Dict[str, TensorRef], author: str, *, force: bool, source: str, progress: Progress = None
) -> int:
    """Atomically write a Detectron2 model-zoo .pkl from a torch archive, one tensor in memory at a time,
    then read it back comparing every array's shape, dtype and bytes (CRC-32) with what was meant.

    Whole records are copied in the kernel and their expected CRC is the source record's, so the
    one read-back pass also proves the source's bytes intact; a failing array whose source record
    fails its own CRC is blamed on the source (UnreadableCheckpoint), otherwise on the writing."""
    expected: Dict[str, Any] = {}
    read_back = ReadBack()

    def write(f: Any) -> None:
        with open(index.path, "rb") as src:
            offsets = {key[len("data/"):]: _data_offset(src, info) for key, info in index.records.items() if key.startswith("data/")}
            crcs = {key[len("data/"):]: info.CRC for key, info in index.records.items() if key.startswith("data/")}
            arrays = {name: _RecordArray(ref, src.fileno(), offsets[ref.storage.key], crcs[ref.storage.key]) for name, ref in model.items()}
            largest = max((arr.nbytes for arr in arrays.values() if not arr.copied), default=0)
            pickler = _ModelZooStreamPickler(f, largest, sum(a.nbytes for a in arrays.values()), progress, read_back)
            pickler.dump({"model": arrays, "__author__": author})
            for name, arr in arrays.items():
                expected[name] = (arr.ref.shape, NUMPY_DTYPES[arr.ref.dtype]) + pickler.digests[id(arr)]

    def verify(tmp: str) -> None:
        try:
            with open(tmp, "rb") as f:
                got = _DigestUnpickler(f, read_back).load_digests()
        except Exception as err:  # a pickle we just wrote that does not parse back
            raise VerificationFailed(f"{dst}: written pickle does not read back ({type(err).__name__}: {err}).", "Report this as a bug.") from None
        if not isinstance(got, dict) or got.get("__author__") != author or got.get("model") != expected:
            written = got.get("model") if isinstance(got, dict) and isinstance(got.get("model"), dict) else {}
            for name, want in expected.items():
                if written.get(name) != want:
                    _blame_source(index, f"data/{model[name].storage.key}")
            raise VerificationFailed(f"{dst}: written pickle does not read back as written.", "Report this as a bug.")

    return write_atomically(dst, force=force, source=source, write=write, verify=verify, read_back=read_back)


def non_finite(index: ArchiveIndex, model: Dict[str, TensorRef]) -> List[str]:
    """Names of floating tensors holding NaN or Inf, checked in place through memory maps."""
    import numpy as np

    with open(index.path, "rb") as f:
        offsets = {key[len("data/"):]: _data_offset(f, info) for key, info in index.records.items() if key.startswith("data/")}
        bad = []
        for name, ref in model.items():
            if ref.dtype not in ("float32", "float16", "float64", "bfloat16") or ref.numel() == 0:
                continue
            size = _ITEM_SIZE[ref.dtype]
            start, count = offsets[ref.storage.key] + ref.offset * size, ref.numel() * size
            base = start - start % mmap.ALLOCATIONGRANULARITY
            with mmap.mmap(f.fileno(), count + start - base, access=mmap.ACCESS_READ, offset=base) as mm:
                if ref.dtype == "bfloat16":  # no numpy bfloat16: an all-ones exponent means NaN or Inf
                    values = np.frombuffer(mm, "<u2", ref.numel(), start - base)
                    finite = not bool(((values & 0x7F80) == 0x7F80).any())
                else:
                    values = np.frombuffer(mm, NUMPY_DTYPES[ref.dtype], ref.numel(), start - base)
                    finite = bool(np.isfinite(values).all())
                del values  # the map cannot close while an array views it
            if not finite:
                bad.append(name)
        return bad
