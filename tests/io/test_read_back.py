"""The streamed writers' read-back, started while the file is written (conversion/io/crc.py's
`ReadBack`) and the atomic writer's early writeback (conversion/io/atomic.py): every CRC is of the
written file's bytes, every record is still checked, the file is synced before its structure is
checked and before it gets its name, and no read-back thread outlives the file it reads."""
from __future__ import annotations

import errno
import os
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
from conversion.synthetic import random_state_dict

ARCH = Architecture((1, 2, 1, 1), (8, 16, 8, 16), num_classes=5, classifier_norm=True)
CLASSIFIER = 4  # head.weight, head.bias, norm.weight, norm.bias: dropped, so not written
THREAD_PREFIX = "convnext-d2-"  # the read-back pool and the writeback thread


def _blob(tmp_path: Path, size: int) -> Tuple[Path, bytes]:
    data = np.random.default_rng(1).integers(0, 256, size, dtype=np.uint8).tobytes()
    (tmp_path / "blob").write_bytes(data)
    return tmp_path / "blob", data


def _read_back_threads() -> List[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX)]


def test_reported_and_unreported_ranges_get_zlibs_crc_of_the_files_bytes(tmp_path):
    """Reported ranges are read in the background, the others when asked: each CRC equals zlib's
    over that slice of the file (sizes around the 1 MiB read window, unaligned starts)."""
    window = crc._CRC_WINDOW
    path, data = _blob(tmp_path, 3 * window + 4096)
    reported = [(0, 0), (3, window + 1), (window + 4, window - 1), (2 * window + 3, window + 7)]
    others = [(1, 2), (len(data) - 50, 50)]
    with open(path, "rb") as f:
        read_back = crc.ReadBack()
        read_back.attach(f.fileno())
        try:
            for start, size in reported:
                read_back.written(start, size)
            ranges = sorted(reported + others)
            got = read_back.crcs(f.fileno(), ranges)
        finally:
            read_back.close()
    assert got == [zlib.crc32(data[s:s + n]) for s, n in ranges]


def test_a_record_reported_where_the_finished_file_has_none_is_refused(tmp_path):
    """The verify step's parse of the finished file must find every reported record where it was
    reported: a record it does not find (or finds one byte shorter) is a writer bug, not a pass."""
    path, _ = _blob(tmp_path, 4096)
    with open(path, "rb") as f:
        read_back = crc.ReadBack()
        read_back.attach(f.fileno())
        try:
            read_back.written(100, 1000)
            with pytest.raises(ValueError, match=r"the record written at 100 \(1000 bytes\) is not where the file's structure puts one"):
                read_back.crcs(f.fileno(), [(0, 100), (100, 999)])
        finally:
            read_back.close()


def test_records_must_be_reported_in_file_order_without_overlap():
    """A record reported before the end of the previous one means the writer wrote behind a
    record already being read back: refused at once."""
    read_back = crc.ReadBack()
    read_back.written(0, 100)
    read_back.written(100, 10)
    with pytest.raises(ValueError, match="reported before the end of the previous one"):
        read_back.written(105, 10)


def test_close_waits_for_every_read_back_thread(tmp_path):
    path, _ = _blob(tmp_path, 8 << 20)
    with open(path, "rb") as f:
        read_back = crc.ReadBack()
        read_back.attach(f.fileno())
        for i in range(8):
            read_back.written(i << 20, 1 << 20)
        read_back.close()
        assert _read_back_threads() == [], "a read-back thread outlived close()"


@pytest.mark.parametrize("ext", [".pth", ".pkl"])
def test_no_read_back_thread_outlives_a_write_that_fails_midway(tmp_path, monkeypatch, ext):
    """The disk fills up at the twelfth record, with eleven being read back: the error is the
    destination's, nothing is left, and every thread has stopped before the file was closed."""
    from conversion import stream

    torch.save({"model": random_state_dict(ARCH)}, tmp_path / "src.pth")
    real_copy, copies = stream._copy_range, []

    def copy_until_full(src_fd, dst_fd, src_offset, count):
        copies.append(count)
        if len(copies) == 12:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_copy(src_fd, dst_fd, src_offset, count)

    monkeypatch.setattr(stream, "_copy_range", copy_until_full)
    with pytest.raises(DestinationError, match="write failed"):
        convert(str(tmp_path / "src.pth"), str(tmp_path / f"out{ext}"))
    assert _read_back_threads() == []
    assert sorted(os.listdir(tmp_path)) == ["src.pth"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the writeback is requested on Linux only")
def test_no_writeback_thread_outlives_a_write_that_fails_after_it_started(tmp_path, monkeypatch):
    """A 14 MB source: the writeback thread is running (checked), inside a slow request, when the
    disk fills up; it has stopped by the time the error reaches the caller (it must not touch the
    descriptor once closed), and nothing is left."""
    import time

    from conversion import stream

    real_sync_file_range = atomic._sync_file_range()

    def slow_request(fd, start, size, flags):  # a disk with a full queue: each request blocks a while
        time.sleep(0.3)
        return real_sync_file_range(fd, start, size, flags) if real_sync_file_range else 0

    monkeypatch.setattr(atomic, "_sync_file_range", lambda: slow_request)

    wide = Architecture((1, 1, 1, 1), (64, 128, 256, 512), num_classes=5, classifier_norm=True)
    torch.save({"model": random_state_dict(wide)}, tmp_path / "src.pth")
    real_copy, seen, written = stream._copy_range, [], []

    def copy_until_full(src_fd, dst_fd, src_offset, count):
        if sum(written) > 10 << 20:
            seen.extend(_read_back_threads())
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_copy(src_fd, dst_fd, src_offset, count)
        written.append(count)

    monkeypatch.setattr(stream, "_copy_range", copy_until_full)
    with pytest.raises(DestinationError, match="write failed"):
        convert(str(tmp_path / "src.pth"), str(tmp_path / "out.pth"))
    assert "convnext-d2-writeback" in seen, f"the writeback thread never started: {seen}"
    assert _read_back_threads() == []
    assert sorted(os.listdir(tmp_path)) == ["src.pth"]


@pytest.mark.parametrize("ext", [".pth", ".pkl"])
def test_records_are_reported_while_writing_and_the_structure_is_checked_after_the_sync(tmp_path, monkeypatch, ext):
    """Every copied record (for a .pth also the archive's small records, .format_version and the
    like: all but the new data.pkl) is handed to the read-back before the sync (so its CRC runs during the
    copy of the next ones and during the sync); the finished file's structure is read after the
    sync; the destination's name exists only after both."""
    from conversion import stream

    sd = random_state_dict(ARCH)
    torch.save({"model": sd}, tmp_path / "src.pth")
    dst = tmp_path / f"out{ext}"
    events: List[str] = []
    real_written, real_fsync = crc.ReadBack.written, os.fsync

    def written(self, start, size):
        events.append("record")
        real_written(self, start, size)

    def fsync(fd):
        events.append(f"fsync (destination exists: {dst.exists()})")
        real_fsync(fd)

    if ext == ".pth":
        real_index = stream.read_index
        monkeypatch.setattr(stream, "read_index", lambda path: events.append("structure") or real_index(path))
    else:
        real_digests = stream.array_digests
        monkeypatch.setattr(stream, "array_digests", lambda path, crcs: events.append("structure") or real_digests(path, crcs))
    monkeypatch.setattr(crc.ReadBack, "written", written)
    monkeypatch.setattr(os, "fsync", fsync)

    convert(str(tmp_path / "src.pth"), str(dst))

    with zipfile.ZipFile(tmp_path / "src.pth") as zf:  # the source's records, by the standard library's reader
        records = len([n for n in zf.namelist() if "/data/" in n])  # the storage records (small ones are written, not copied)
    assert events == ["record"] * (records - CLASSIFIER) + ["fsync (destination exists: False)", "structure"], events
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
def test_through_a_named_temporary_file_the_read_back_is_the_same(tmp_path, monkeypatch, ext):
    """Where unnamed files are unavailable (a named hidden file instead), the records are still
    read back while written: the same bytes come out, and a bad copy is still refused."""
    from conversion import stream
    from conversion.errors import VerificationFailed

    torch.save({"model": random_state_dict(ARCH)}, tmp_path / "src.pth")
    convert(str(tmp_path / "src.pth"), str(tmp_path / f"unnamed{ext}"))
    monkeypatch.setattr(atomic, "anonymous_beside", lambda path, directory: None)
    convert(str(tmp_path / "src.pth"), str(tmp_path / f"named{ext}"))
    assert (tmp_path / f"unnamed{ext}").read_bytes() == (tmp_path / f"named{ext}").read_bytes()

    real_copy = stream._copy_range

    def bad_copy(src_fd, dst_fd, src_offset, count):  # the last byte of every record flipped
        real_copy(src_fd, dst_fd, src_offset, count)
        last = os.lseek(dst_fd, 0, os.SEEK_CUR) - 1
        if count:
            os.pwrite(dst_fd, bytes([os.pread(dst_fd, 1, last)[0] ^ 0xFF]), last)

    monkeypatch.setattr(stream, "_copy_range", bad_copy)
    with pytest.raises(VerificationFailed, match="does not read back as written"):
        convert(str(tmp_path / "src.pth"), str(tmp_path / f"bad{ext}"))
    assert sorted(os.listdir(tmp_path)) == sorted(["src.pth", f"unnamed{ext}", f"named{ext}"])
    assert _read_back_threads() == []
