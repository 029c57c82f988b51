"""The writers' read-back (conversion/io/crc.py's `ReadBack`, started while the file is written)
and the atomic writer's early writeback (conversion/io/atomic.py): every byte of the file is
declared with the CRC it must read back with, copied records are read back while the next are
copied, the verdict comes after the sync and before the name, a file that reads back different is
never installed, and no read-back thread outlives the file it reads."""
from __future__ import annotations

import errno
import os
import pickle
import struct
import sys
import threading
import zipfile
import zlib
from pathlib import Path
from typing import List, Tuple

import numpy as np
import pytest
import torch

from conversion import convert
from conversion.architecture import Architecture
from conversion.errors import DestinationError
from conversion.io import atomic, crc
from conversion.io.output import copies_through, copy_range
from conversion.synthetic import random_state_dict

ARCH = Architecture((1, 2, 1, 1), (8, 16, 8, 16), num_classes=5, classifier_norm=True)
# Wide enough that a float64 pickle of it has over ten arrays past the size a reader leaves in the file.
WIDE = Architecture((1, 2, 1, 1), (32, 64, 32, 64), num_classes=5, classifier_norm=True)
CLASSIFIER = 4  # head.weight, head.bias, norm.weight, norm.bias: dropped, so not written
THREAD_PREFIX = "convnext-d2-"  # the read-back pool and the writeback thread


def _blob(tmp_path: Path, size: int) -> Tuple[Path, bytes]:
    data = np.random.default_rng(1).integers(0, 256, size, dtype=np.uint8).tobytes()
    (tmp_path / "blob").write_bytes(data)
    return tmp_path / "blob", data


def _read_back_threads() -> List[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX)]


def test_declared_stretches_read_back_with_zlibs_crc_whether_copied_or_written(tmp_path):
    """Copied runs are read in the background, stretches written from memory when asked (joined
    while they follow each other under one label); sizes around the 1 MiB read window, an empty run."""
    window = crc._CRC_WINDOW
    path, data = _blob(tmp_path, 3 * window + 4096)
    stretches = [("memory", 0, 3), ("memory", 3, 10), ("run", 10, window + 4), ("memory", window + 4, window + 9),
                 ("run", window + 9, window + 9), ("run", window + 9, 3 * window), ("memory", 3 * window, len(data))]
    with open(path, "rb") as f:
        read_back = crc.ReadBack()
        read_back.attach(f.fileno())
        try:
            for kind, start, end in stretches:
                if kind == "run":
                    read_back.copied(start, end - start, zlib.crc32(data[start:end]), kind, key="k")
                else:
                    read_back.wrote(start, data[start:end], kind)
            assert read_back.failure(f.fileno()) is None
        finally:
            read_back.close()
    assert [(s.label, s.start, s.size) for s in read_back.spans] == [
        ("memory", 0, 10), ("run", 10, window - 6), ("memory", window + 4, 5), ("run", window + 9, 2 * window - 9), ("memory", 3 * window, 4096)]


@pytest.mark.parametrize("flipped", ["copied", "written"])
def test_the_first_stretch_that_reads_back_different_is_named(tmp_path, flipped):
    path, data = _blob(tmp_path, 3000)
    at = 1500 if flipped == "copied" else 2500
    with open(path, "r+b") as f:
        os.pwrite(f.fileno(), bytes([data[at] ^ 1]), at)  # on disk, before the writer declares what it meant
        read_back = crc.ReadBack()
        read_back.attach(f.fileno())
        try:
            read_back.wrote(0, data[:1000], "header")
            read_back.copied(1000, 1000, zlib.crc32(data[1000:2000]), "record 0", key="0")
            read_back.wrote(2000, data[2000:], "directory")
            bad = read_back.failure(f.fileno())
        finally:
            read_back.close()
    assert bad is not None and (bad.label, bad.key) == (("record 0", "0") if flipped == "copied" else ("directory", None))


def test_a_file_of_another_size_than_was_declared_fails(tmp_path):
    """Every byte of the file must be declared: a tail lost (or added) on the way to disk fails."""
    path, data = _blob(tmp_path, 4096)
    with open(path, "rb") as f:
        read_back = crc.ReadBack()
        read_back.wrote(0, data[:4000], "all but the tail")
        with pytest.raises(EOFError, match="the file has 4096 bytes, 4000 were written"):
            read_back.failure(f.fileno())


def test_stretches_must_be_declared_end_to_end():
    """The writers only append: a stretch declared anywhere but where the previous one ended is a
    writer bug, refused at once."""
    read_back = crc.ReadBack()
    read_back.copied(0, 100, 0, "run")
    read_back.wrote(100, b"x" * 10, "memory")
    with pytest.raises(ValueError, match="not where the previous ones end"):
        read_back.copied(105, 10, 0, "run")


def test_close_waits_for_every_read_back_thread(tmp_path):
    path, _ = _blob(tmp_path, 8 << 20)
    with open(path, "rb") as f:
        read_back = crc.ReadBack()
        read_back.attach(f.fileno())
        for i in range(8):
            read_back.copied(i << 20, 1 << 20, 0, "run")
        read_back.close()
        assert _read_back_threads() == [], "a read-back thread outlived close()"


@pytest.mark.parametrize("workers", [1, 2, 7])
def test_crcs_of_ranges_equal_zlib_over_each_slice(tmp_path, monkeypatch, workers):
    """Ranges of every size around the read window (empty, one byte, window +- 1, several windows),
    at unaligned starts, in any number of threads: each CRC equals zlib's over that slice."""
    monkeypatch.setattr(crc, "_CRC_WORKERS", workers)
    window = crc._CRC_WINDOW
    path, blob = _blob(tmp_path, 3 * window + 1000)
    ranges = [(0, 0), (3, 1), (17, window - 1), (1, window), (5, window + 1), (999, 3 * window), (len(blob) - 10, 10)]
    with open(path, "rb") as f:
        got = crc.crcs_of_ranges(f.fileno(), ranges)
        with pytest.raises(EOFError):
            crc.crcs_of_ranges(f.fileno(), [(0, 1), (len(blob) - 5, 10)])
    assert got == [zlib.crc32(blob[s:s + n]) for s, n in ranges]


@pytest.mark.parametrize("ext", [".pth", ".pkl"])
def test_no_read_back_thread_outlives_a_write_that_fails_midway(tmp_path, monkeypatch, ext):
    """The disk fills up at the twelfth record, with eleven being read back: the error is the
    destination's, nothing is left, and every thread has stopped before the file was closed."""
    torch.save({"model": random_state_dict(ARCH)}, tmp_path / "src.pth")
    copies = []

    def copy_until_full(src_fd, dst_fd, src_offset, count):
        copies.append(count)
        if len(copies) == 12:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        copy_range(src_fd, dst_fd, src_offset, count)

    with copies_through(copy_until_full), pytest.raises(DestinationError, match="write failed"):
        convert(str(tmp_path / "src.pth"), str(tmp_path / f"out{ext}"))
    assert _read_back_threads() == []
    assert sorted(os.listdir(tmp_path)) == ["src.pth"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the writeback is requested on Linux only")
def test_no_writeback_thread_outlives_a_write_that_fails_after_it_started(tmp_path, monkeypatch):
    """A 14 MB source: the writeback thread is running (checked), inside a slow request, when the
    disk fills up; it has stopped by the time the error reaches the caller (it must not touch the
    descriptor once closed), and nothing is left."""
    import time

    real_sync_file_range = atomic._sync_file_range()

    def slow_request(fd, start, size, flags):  # a disk with a full queue: each request blocks a while
        time.sleep(0.3)
        return real_sync_file_range(fd, start, size, flags) if real_sync_file_range else 0

    monkeypatch.setattr(atomic, "_sync_file_range", lambda: slow_request)

    wide = Architecture((1, 1, 1, 1), (64, 128, 256, 512), num_classes=5, classifier_norm=True)
    torch.save({"model": random_state_dict(wide)}, tmp_path / "src.pth")
    seen, written = [], []

    def copy_until_full(src_fd, dst_fd, src_offset, count):
        if sum(written) > 10 << 20:
            seen.extend(_read_back_threads())
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        copy_range(src_fd, dst_fd, src_offset, count)
        written.append(count)

    with copies_through(copy_until_full), pytest.raises(DestinationError, match="write failed"):
        convert(str(tmp_path / "src.pth"), str(tmp_path / "out.pth"))
    assert "convnext-d2-writeback" in seen, f"the writeback thread never started: {seen}"
    assert _read_back_threads() == []
    assert sorted(os.listdir(tmp_path)) == ["src.pth"]


@pytest.mark.parametrize("ext", [".pth", ".pkl"])
def test_copied_records_are_read_back_while_writing_and_the_verdict_comes_after_the_sync(tmp_path, monkeypatch, ext):
    """Every copied record is handed to the read-back as it is copied (its CRC runs during the copy
    of the next ones and during the sync); the verdict on the whole file comes after the sync; the
    destination's name exists only after both."""
    sd = random_state_dict(ARCH)
    torch.save({"model": sd}, tmp_path / "src.pth")
    dst = tmp_path / f"out{ext}"
    events: List[str] = []
    real_copied, real_failure, real_fsync = crc.ReadBack.copied, crc.ReadBack.failure, os.fsync

    def copied(self, *args, **kwargs):
        events.append("record")
        real_copied(self, *args, **kwargs)

    def failure(self, fd):
        events.append("verdict")
        return real_failure(self, fd)

    def fsync(fd):
        events.append(f"fsync (destination exists: {dst.exists()})")
        real_fsync(fd)

    monkeypatch.setattr(crc.ReadBack, "copied", copied)
    monkeypatch.setattr(crc.ReadBack, "failure", failure)
    monkeypatch.setattr(os, "fsync", fsync)

    convert(str(tmp_path / "src.pth"), str(dst))

    with zipfile.ZipFile(tmp_path / "src.pth") as zf:  # the source's records, by the standard library's reader
        records = len([n for n in zf.namelist() if "/data/" in n])  # the storage records (small ones are written, not copied)
    assert events == ["record"] * (records - CLASSIFIER) + ["fsync (destination exists: False)", "verdict"], events
    assert dst.exists()


def test_writeback_is_asked_for_every_8_mib_written_in_order():
    """One request per 8 MiB at least, covering the file from its start without gaps."""
    calls: List[Tuple[int, int, int]] = []
    writeback = atomic._Writeback(-1)
    writeback.call = lambda fd, start, size, flags: calls.append((start, size, flags)) or 0
    mib = 1 << 20
    for start, size in [(100, 3 * mib), (3 * mib + 200, 6 * mib), (9 * mib + 300, 20 * mib), (29 * mib + 400, mib)]:
        writeback(start, size)
    writeback.stop(drop_queued=False)
    writeback.join()
    assert calls == [(0, 9 * mib + 200, 2), (9 * mib + 200, 20 * mib + 100, 2)]


def test_a_refused_writeback_request_is_dropped_silently():
    """sync_file_range is advice: if it fails once, it is not asked again and nothing is raised
    (the fsync before publishing syncs the whole file either way)."""
    calls: List[int] = []
    writeback = atomic._Writeback(-1)
    writeback.call = lambda fd, start, size, flags: calls.append(start) or -1
    writeback(0, 16 << 20)
    writeback(16 << 20, 16 << 20)
    writeback.stop(drop_queued=False)
    writeback.join()
    assert calls == [0] and writeback.call is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux's")
def test_linux_has_sync_file_range_and_it_accepts_a_written_file(tmp_path):
    call = atomic._sync_file_range()
    assert call is not None
    with open(tmp_path / "f", "wb") as f:
        f.write(b"x" * (1 << 20))
        f.flush()
        assert call(f.fileno(), 0, 1 << 20, atomic._SYNC_FILE_RANGE_WRITE) == 0


@pytest.mark.parametrize("ext", [".pth", ".pkl"])
def test_without_sync_file_range_the_output_is_the_same(tmp_path, monkeypatch, ext):
    """Where the platform has no sync_file_range, conversion works and writes the same bytes."""
    torch.save({"model": random_state_dict(ARCH)}, tmp_path / "src.pth")
    convert(str(tmp_path / "src.pth"), str(tmp_path / f"with{ext}"))
    monkeypatch.setattr(atomic, "_sync_file_range", lambda: None)
    convert(str(tmp_path / "src.pth"), str(tmp_path / f"without{ext}"))
    assert (tmp_path / f"with{ext}").read_bytes() == (tmp_path / f"without{ext}").read_bytes()


@pytest.mark.parametrize("ext", [".pth", ".pkl"])
def test_through_a_named_temporary_file_the_output_is_the_same(tmp_path, monkeypatch, ext):
    """Where unnamed files are unavailable (a named hidden file instead), the same bytes come out."""
    torch.save({"model": random_state_dict(ARCH)}, tmp_path / "src.pth")
    convert(str(tmp_path / "src.pth"), str(tmp_path / f"unnamed{ext}"))
    monkeypatch.setattr(atomic, "anonymous_beside", lambda path, directory: None)
    convert(str(tmp_path / "src.pth"), str(tmp_path / f"named{ext}"))
    assert (tmp_path / f"unnamed{ext}").read_bytes() == (tmp_path / f"named{ext}").read_bytes()


def _flip_in_the_eleventh_copy():
    """A copier whose eleventh copy goes wrong: one byte in its middle flipped in the written file,
    with ten records before it already being read back and more after it."""
    copies = []

    def copy(src_fd, dst_fd, src_offset, count):
        copy_range(src_fd, dst_fd, src_offset, count)
        copies.append(count)
        if len(copies) == 11:
            at = os.lseek(dst_fd, 0, os.SEEK_CUR) - count // 2 - 1
            os.pwrite(dst_fd, bytes([os.pread(dst_fd, 1, at)[0] ^ 0x01]), at)

    return copy


def _flip_at_sync(offset: int):
    """An fsync after which the byte at `offset` (written from memory: a header, the index, the
    pickle's opcodes) reads back different, as a bad disk might return it."""
    real_fsync = os.fsync

    def fsync(fd):
        real_fsync(fd)
        os.pwrite(fd, bytes([os.pread(fd, 1, offset)[0] ^ 0x01]), offset)

    return fsync


def _lose_the_tail_with(fsync, fd):
    """An fsync after which the file's last 100 bytes are gone."""
    os.ftruncate(fd, os.fstat(fd).st_size - 100)
    fsync(fd)


@pytest.mark.parametrize("source, ext, fault, named", [
    ("zip", ".pth", "copy", False), ("zip", ".pkl", "copy", False), ("pickle", ".pth", "copy", False),
    ("pickle", ".pkl", "copy", True), ("zip", ".pth", "memory", False), ("zip", ".pkl", "memory", True),
    ("zip", ".pth", "tail", False), ("pickle", ".pkl", "tail", False),
])
def test_a_file_that_reads_back_different_is_never_installed(tmp_path, monkeypatch, capsys, source, ext, fault, named):
    """A copy gone wrong (a torch zip's records carry their CRC; a plain pickle's arrays none, so
    the writer computes it from the source), a byte written from memory that reads back different,
    or a tail lost on the way to disk: exit 1 naming the destination (not the temporary file, not
    blaming the source), the existing destination kept as it was, nothing else left, no thread."""
    from conversion.cli import main

    src = tmp_path / ("src.pth" if source == "zip" else "src.pkl")
    if source == "zip":
        torch.save({"model": random_state_dict(ARCH)}, src)
    else:  # float64 arrays: each over the size the reader leaves in the file, so they are copied as runs
        src.write_bytes(pickle.dumps({"model": {k: v.double().numpy() for k, v in random_state_dict(WIDE).items()}}, protocol=4))
    dst = tmp_path / f"out{ext}"
    dst.write_bytes(b"previous")
    if named:
        monkeypatch.setattr(atomic, "anonymous_beside", lambda path, directory: None)
    if fault == "memory":
        monkeypatch.setattr(os, "fsync", _flip_at_sync(40))
    if fault == "tail":
        monkeypatch.setattr(os, "fsync", lambda fd, fsync=os.fsync: _lose_the_tail_with(fsync, fd))
    copier = _flip_in_the_eleventh_copy() if fault == "copy" else copy_range

    with copies_through(copier):
        status = main(["convert", str(src), str(dst), "--force"])

    err = capsys.readouterr().err
    assert status == 1, f"a failed read-back is a verification problem (exit 1), got {status}:\n{err}"
    assert f"{dst}: " in err and "does not read back" in err and ".convnext-d2-" not in err, err
    assert "re-download" not in err.lower(), f"the source is fine; the hint blames it:\n{err}"
    assert dst.read_bytes() == b"previous"
    assert sorted(os.listdir(tmp_path)) == sorted([src.name, dst.name])
    assert _read_back_threads() == []


def _record_data_start(data: bytes, member: str) -> int:
    """Where a stored member's bytes start, from its local header (parsed here, not by the project)."""
    at = data.index(b"PK\x03\x04")  # the first local header; torch writes them in order, stored
    while True:
        name_len, extra_len = struct.unpack_from("<HH", data, at + 26)
        name = data[at + 30:at + 30 + name_len].decode()
        size = struct.unpack_from("<I", data, at + 22)[0]
        if name == member:
            return at + 30 + name_len + extra_len
        at = data.index(b"PK\x03\x04", at + 30 + name_len + extra_len + size)


@pytest.mark.parametrize("ext", [".pth", ".pkl"])
def test_a_source_record_that_fails_its_crc_is_refused_as_a_corrupt_source(tmp_path, ext):
    """One byte of a kept tensor's record flipped on disk, the directory's CRC left as it was (what a
    bad disk or transfer does): the bytes are copied in the kernel without being read, so the one
    read-back pass must catch it, and blame the source (exit 2 class), leaving nothing."""
    from conversion.errors import UnreadableCheckpoint

    sd = random_state_dict(ARCH)
    torch.save({"model": sd}, tmp_path / "src.pth")
    with zipfile.ZipFile(tmp_path / "src.pth") as zf:
        members = [n for n in zf.namelist() if "/data/" in n]
    data = bytearray((tmp_path / "src.pth").read_bytes())
    member = members[len(members) // 2]  # a record in the middle: not the first one the threads finish
    at = _record_data_start(bytes(data), member) + 5
    data[at] ^= 0x40
    (tmp_path / "src.pth").write_bytes(bytes(data))
    with pytest.raises(UnreadableCheckpoint, match=r"src\.pth: record data/\d+ fails its CRC-32: the archive is corrupt"):
        convert(str(tmp_path / "src.pth"), str(tmp_path / f"out{ext}"))
    assert sorted(os.listdir(tmp_path)) == ["src.pth"]
