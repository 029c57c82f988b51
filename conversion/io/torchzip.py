"""Torch zip archives as torch's own reader sees them (the writer is conversion/io/torch_writer.py).

Reading: the central directory, every local header and data descriptor, and the end records are
checked against each other the way torch's reader checks them (Python's `zipfile` trusts the
directory and reads past disagreements); `data.pkl` is unpickled by the one safe unpickler with
storages as references, so no tensor byte is read.
"""
from __future__ import annotations

import io
import os
import struct
import zipfile
import zlib
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from ..errors import UnreadableCheckpoint, UnsafeCheckpoint, printable
from .handles import FileBytes, Inflated, Location, StorageRef
from .safe_pickle import Budget, StorageType, safe_load

# A deflated member may inflate to at most this many times its stored size (plus 64 KiB): torch
# writes stored members, and a pickled index compresses ~5x; zip bombs reach ~1000x.
COMPRESSION_BOUND = 20
# General-purpose flag bits torch's reader (miniz) refuses in a directory entry: encrypted (0),
# compressed patched data (5), strong encryption (6), masked local headers (13).  Python's zipfile
# raises NotImplementedError for some only when the member is read, so they are refused up front;
# a local header claiming one (torch reads past it) is refused too, as a header that disagrees.
UNSUPPORTED_FLAGS = 0x0001 | 0x0020 | 0x0040 | 0x2000
# The MS-DOS directory attribute in a central directory entry's external attributes (miniz honours it).
DOS_DIRECTORY = 0x10

@dataclass
class ArchiveIndex:
    """What an archive holds, read without its tensor bytes."""

    path: str
    folder: str  # the archive's top folder ("archive" for files torch.save wrote to a handle)
    objects: Any  # the unpickled index (dicts with TensorRef leaves)
    records: Dict[str, zipfile.ZipInfo]  # name inside the folder -> zip entry
    data_offsets: Dict[str, int] = field(default_factory=dict)  # name inside the folder -> where its bytes start

    def storages(self) -> Dict[str, Location]:
        """Storage key -> where its bytes are: a stored record as its run of the file (with the
        record's CRC), a deflated one as its member (inflated, bounded and CRC-checked, when read)."""
        out: Dict[str, Location] = {}
        for name, info in self.records.items():
            if not name.startswith("data/"):
                continue
            if info.compress_type == zipfile.ZIP_STORED:
                out[name[len("data/"):]] = FileBytes(self.data_offsets[name], info.file_size, info.CRC)
            else:
                out[name[len("data/"):]] = Inflated(info.filename, info.file_size, info.CRC)
        return out

    def record_bytes(self, f: Any, key: str) -> bytes:
        """One storage record's bytes, read from the archive open as `f` (a pickled tensor's inner
        archive, in memory), CRC-checked and inflated where deflated."""
        info = self.records["data/" + key]
        try:
            with zipfile.ZipFile(f) as zf:
                return zf.read(info)
        except Exception as err:  # noqa: BLE001 - any failure to parse the file's bytes is the same fact
            raise UnreadableCheckpoint(f"{self.path}: corrupt torch archive ({type(err).__name__}: {str(err)[:120]}).", "Re-download or re-save it.") from None


@dataclass(frozen=True)
class _EndRecord:
    """The archive's end records (the zip64 one where present), parsed once."""

    entries_here: int
    entries: int
    directory_size: int
    directory_offset: int
    malformed: bool  # a comment length that disagrees with the file's end, or a zip64 record of another size
    zip64_misplaced: bool  # a zip64 locator that points at no zip64 record just before it


def _end_record(f: Any, path: str) -> Optional[_EndRecord]:
    """The end records, found from the file's end; None where there is none (zipfile reports that).
    Single-disk, as torch's reader requires: the disk numbers must be 0 (Python's zipfile ignores
    them, so a damaged one would otherwise go unnoticed)."""
    size = f.seek(0, os.SEEK_END)
    base = f.seek(max(0, size - (1 << 16) - 22))
    tail = f.read()
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) < at + 22:
        return None
    disk, cd_disk, here, total, cd_size, cd_offset, comment = struct.unpack("<HHHHIIH", tail[at + 4:at + 22])
    multi_disk = (disk, cd_disk) != (0, 0) or here != total
    malformed, misplaced = comment != len(tail) - at - 22, False
    loc = at - 20
    if loc >= 0 and tail[loc:loc + 4] == b"PK\x06\x07":
        z64_disk, z64_at, disks = struct.unpack("<IQI", tail[loc + 4:loc + 20])
        multi_disk = multi_disk or z64_disk != 0 or disks != 1
        f.seek(z64_at)
        rec = f.read(56)
        misplaced = len(rec) < 56 or rec[:4] != b"PK\x06\x06" or z64_at + 56 != base + loc
        if not misplaced:
            rec_size, _made, _needed, disk, cd_disk, here, total, cd_size, cd_offset = struct.unpack("<QHHIIQQQQ", rec[4:56])
            malformed = malformed or rec_size != 44 or bool(disk) or bool(cd_disk)
    if multi_disk:
        raise UnreadableCheckpoint(f"{path}: corrupt torch archive (multi-disk end record).", "Re-download or re-save it.")
    f.seek(0)
    return _EndRecord(here, total, cd_size, cd_offset, malformed, misplaced)


def _check_directory(path: str, records: Dict[str, zipfile.ZipInfo]) -> None:
    """Refuse entries torch's reader would refuse (or that would inflate out of proportion)."""
    for info in records.values():
        if info.compress_type == zipfile.ZIP_STORED:
            bad = info.compress_size != info.file_size
        else:
            bad = info.compress_type != zipfile.ZIP_DEFLATED
            if info.file_size > COMPRESSION_BOUND * info.compress_size + (1 << 16):
                raise UnreadableCheckpoint(
                    f"{path}: member {info.filename} would inflate {info.compress_size} bytes to {info.file_size} "
                    f"(more than {COMPRESSION_BOUND}x): refused before inflating.",
                    "A torch archive stores its records uncompressed; re-save it with torch.save.",
                )
        if bad or info.flag_bits & UNSUPPORTED_FLAGS or info.volume > 1:
            raise UnreadableCheckpoint(f"{path}: corrupt torch archive (inconsistent directory entry).", "Re-download or re-save it.")
        if info.external_attr & DOS_DIRECTORY or info.filename.endswith("/") or (info.file_size and not info.compress_size):
            # torch's reader (miniz) takes such an entry for a directory or an empty file and hands
            # back a buffer it never filled: its tensors would be whatever memory held.
            raise UnreadableCheckpoint(
                f"{path}: corrupt torch archive (member {printable(info.filename)} is marked as a directory or empty, "
                "so torch reads none of its bytes).",
                "Re-download or re-save it.",
            )


def _storage_of(pid: Any) -> StorageRef:
    """A zip archive's persistent id: ('storage', <storage type>, key, location, element count)."""
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], StorageType)
            and isinstance(pid[2], str) and isinstance(pid[4], int) and not isinstance(pid[4], bool) and pid[4] >= 0):
        raise UnsafeCheckpoint("refusing to load: a persistent id that is not a torch storage.", "Re-save the weights with torch.save.")
    return StorageRef(pid[2], pid[1].name, pid[4])


def _check_totals(f: Any, path: str, zf: zipfile.ZipFile, end: Optional[_EndRecord]) -> None:
    """The end records must describe the directory exactly (entries, size, offset; the zip64 record
    well-formed where present), as torch's reader requires; Python's zipfile reads past a mismatch."""
    if end is None:
        raise UnreadableCheckpoint(f"{path}: corrupt torch archive (no end record).", "Re-download or re-save it.")
    if end.zip64_misplaced:
        raise UnreadableCheckpoint(f"{path}: corrupt torch archive (zip64 end record).", "Re-download or re-save it.")
    f.seek(zf.start_dir)
    directory = f.read(end.directory_size)  # walked by its own length fields (zipfile truncates a name that overruns)
    pos = count = 0
    while pos + 46 <= len(directory) and directory[pos:pos + 4] == b"PK\x01\x02":
        n, e, c = struct.unpack_from("<HHH", directory, pos + 28)
        pos, count = pos + 46 + n + e + c, count + 1
    if (end.malformed or end.entries_here != end.entries or end.entries != len(zf.infolist()) or count != end.entries
            or pos != end.directory_size or end.directory_offset != zf.start_dir):
        raise UnreadableCheckpoint(f"{path}: corrupt torch archive (end record disagrees with the directory).", "Re-download or re-save it.")
    f.seek(0)


def read_index(source: Any, name: str = "", budget: Optional[Budget] = None) -> ArchiveIndex:
    """Parse a torch zip archive's central directory and `data.pkl`; tensor bytes are not read.

    `source` is a path or an open binary file (a pickled tensor's inner archive); `name` names it
    in errors.  The index is unpickled by the one safe unpickler, with storages as references,
    spending `budget` where the archive is nested in a source file (a pickled tensor's).

    Raises:
        UnsafeCheckpoint: the index names something whose only use is to run code.
        UnreadableCheckpoint: not a readable torch archive, or one torch's reader would refuse.
    """
    path = name or str(source)
    f = open(source, "rb") if isinstance(source, str) else source
    try:
        try:
            end = _end_record(f, path)
            with zipfile.ZipFile(f) as zf:
                _check_totals(f, path, zf, end)
                names = [i.filename for i in zf.infolist()]
                pkl = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
                if len(pkl) != 1:
                    raise UnreadableCheckpoint(f"{path}: a zip archive without one <folder>/data.pkl: not a torch.save file.", "Re-save it with torch.save.")
                folder = pkl[0].split("/", 1)[0]
                records = {i.filename[len(folder) + 1:]: i for i in zf.infolist() if i.filename.startswith(folder + "/")}
                if len(records) != len(names):  # torch.save writes every member under one folder, once
                    raise UnreadableCheckpoint(f"{path}: corrupt torch archive (members outside {folder}/ or named twice).", "Re-download or re-save it.")
                _check_directory(path, records)
                for key, info in records.items():  # the small records' CRCs, as torch's reader checks them
                    if not key.startswith("data/") and key != "data.pkl":
                        zf.read(info)
                offsets = {}
                for key, info in records.items():  # local headers must agree with the directory, as torch checks
                    try:
                        offsets[key] = _data_offset(f, info)
                    except UnreadableCheckpoint as err:
                        raise UnreadableCheckpoint(f"{path}: {err.message}", err.hint) from None
                if "byteorder" in records and zf.read(folder + "/byteorder").strip() != b"little":
                    raise UnreadableCheckpoint(f"{path}: a big-endian torch archive.", "Re-save it with torch.save on a little-endian machine.")
                version = zf.read(folder + "/version").strip() if "version" in records else b"(none)"
                if version not in (b"1", b"2", b"3"):
                    raise UnreadableCheckpoint(f"{path}: torch archive format version {version[:20]!r} is not one torch writes.", "Re-save it with torch.save.")
                data = zf.read(pkl[0])
        except UnreadableCheckpoint:
            raise
        except Exception as err:  # BadZipFile, bad CRC, odd names or versions: one fact for the user
            raise UnreadableCheckpoint(
                f"{path}: truncated or corrupt torch archive ({type(err).__name__}: {str(err)[:120]}).", "Re-download or re-save it."
            ) from None
        held = sum(i.file_size for k, i in records.items() if k.startswith("data/"))
        try:
            allowance = budget or Budget(2 * len(data) + held + (1 << 20))
            objects, _ = safe_load(io.BytesIO(data), size=len(data), budget=allowance, persistent_load=_storage_of)
        except UnreadableCheckpoint as err:
            raise type(err)(f"{path}: {err.message}", err.hint) from None
        except Exception as err:
            raise UnreadableCheckpoint(f"{path}: corrupt index ({type(err).__name__}: {str(err)[:160]}).", "Re-download or re-save it.") from None
        return ArchiveIndex(path, folder, objects, records, offsets)
    finally:
        if isinstance(source, str):
            f.close()


def inflate(path: str, member: Inflated) -> bytes:
    """A deflated member's bytes: at most its declared size (which `read_index` bounded to
    COMPRESSION_BOUND times its stored size) and checked against its CRC-32.

    Raises:
        UnreadableCheckpoint: the member does not inflate to its size and CRC.
    """
    try:
        with zipfile.ZipFile(path) as zf:
            with zf.open(member.member) as f:  # zipfile stops at the declared size and checks the CRC at the end
                data = f.read(member.nbytes + 1)
    except Exception as err:  # noqa: BLE001 - any failure to parse the file's bytes is the same fact
        raise UnreadableCheckpoint(f"{path}: member {member.member} does not inflate ({type(err).__name__}: {str(err)[:120]}).", "Re-download or re-save it.") from None
    if len(data) != member.nbytes or zlib.crc32(data) != member.crc:
        raise UnreadableCheckpoint(f"{path}: member {member.member} fails its size or CRC-32: the archive is corrupt.", "Re-download or re-save it.")
    return data


def _data_offset(f: Any, info: zipfile.ZipInfo) -> int:
    """Where an entry's bytes start: after its *local* header (whose extra field may differ).

    The local header must agree with the central directory (name, sizes, CRC), as torch's reader
    requires; a disagreement means a damaged archive.
    """
    f.seek(info.header_offset)
    header = f.read(30)
    if len(header) < 30 or header[:4] != b"PK\x03\x04":
        raise UnreadableCheckpoint(f"corrupt archive entry {info.filename} (bad local header)", "Re-download or re-save it.")
    flags, method = struct.unpack("<HH", header[6:10])
    crc, csize, usize, name_len, extra_len = struct.unpack("<IIIHH", header[14:30])
    name = f.read(name_len)
    described_later = flags & 0x08  # sizes and CRC in a data descriptor after the data
    if name != info.filename.encode("utf-8") or method != info.compress_type or flags & UNSUPPORTED_FLAGS or (
        not described_later and (crc, csize, usize) != (info.CRC, info.compress_size, info.file_size) and usize != 0xFFFFFFFF
    ):
        raise UnreadableCheckpoint(f"corrupt archive entry {info.filename} (local header disagrees with the directory)", "Re-download or re-save it.")
    start = info.header_offset + 30 + name_len + extra_len
    if described_later and not _descriptor_agrees(f, start + info.compress_size, info):
        raise UnreadableCheckpoint(f"corrupt archive entry {info.filename} (data descriptor disagrees with the directory)", "Re-download or re-save it.")
    return start


def _descriptor_agrees(f: Any, at: int, info: zipfile.ZipInfo) -> bool:
    """The data descriptor after an entry's bytes (torch writes one per record) holds the CRC and
    sizes the directory has; torch's reader checks it, Python's zipfile never reads it."""
    f.seek(at)
    tail = f.read(24)
    if tail[:4] == b"PK\x07\x08":
        tail = tail[4:]
    want = (info.CRC, info.compress_size, info.file_size)
    short = struct.unpack("<III", tail[:12]) if len(tail) >= 12 else None
    wide = struct.unpack("<IQQ", tail[:20]) if len(tail) >= 20 else None  # zip64 descriptors
    return want in (short, wide)
