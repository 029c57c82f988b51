"""CRC-32 of file ranges, the read-back check every streamed writer runs on what it wrote.

zlib.crc32 releases the GIL, so ranges are checked by a pool of threads, one per core.  A writer
declares every stretch it writes to a `ReadBack`, with the CRC it must read back with; a record
copied from the source is read back on another core while the next one is copied (and while the
file is synced), the rest when the file is finished.
"""
from __future__ import annotations

import os
import threading
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

# Each thread reads through its own 1 MiB buffer (it stays in the CPU's
# cache between the read and the CRC): measured on XXLarge's written file, 1.3 s against 2.1 s for
# memory maps, whose page faults cost more than the copy, and resident memory stays at
# workers x 1 MiB whatever the record's size (a map of XXLarge's largest record alone is 151 MB).
_CRC_WINDOW = 1 << 20
_CRC_WORKERS = os.cpu_count() or 1
_crc_buffers = threading.local()

Range = Tuple[int, int]  # (start, size) of a run of bytes in a file


def crc_of_range(fd: int, start: int, size: int) -> int:
    """CRC-32 of a file range, read `_CRC_WINDOW` bytes at a time into this thread's buffer.

    Raises:
        EOFError: the file ends inside the range.
    """
    buffer = getattr(_crc_buffers, "buffer", None)
    if buffer is None:
        buffer = _crc_buffers.buffer = memoryview(bytearray(_CRC_WINDOW))
    crc = zlib.crc32(b"")
    end = start + size
    while start < end:
        n = os.preadv(fd, [buffer[:min(_CRC_WINDOW, end - start)]], start)
        if n == 0:
            raise EOFError(f"file ends {end - start} bytes short of a record's end")
        crc = zlib.crc32(buffer[:n], crc)
        start += n
    return crc


def crcs_of_ranges(fd: int, ranges: Sequence[Range]) -> List[int]:
    """CRC-32 of each (start, size) range of `fd`, in order, computed by `_CRC_WORKERS` threads.

    The largest ranges are handed out first so that the threads finish together; one range, or one
    core, is checked in this thread."""
    if _CRC_WORKERS < 2 or len(ranges) < 2:
        return [crc_of_range(fd, start, size) for start, size in ranges]
    order = sorted(range(len(ranges)), key=lambda i: -ranges[i][1])
    crcs = [0] * len(ranges)
    with ThreadPoolExecutor(max_workers=min(_CRC_WORKERS, len(ranges))) as pool:
        for i, crc in zip(order, pool.map(lambda i: crc_of_range(fd, *ranges[i]), order)):
            crcs[i] = crc
    return crcs


@dataclass
class Span:
    """A stretch of the written file and the CRC-32 it must read back with; `key` names the source
    storage a copied span came from (to blame the source when it fails), `label` what it is."""

    start: int
    size: int
    expected: int
    label: str
    key: Optional[str] = None
    started: "Optional[Future[int]]" = None  # its read-back, begun while the writer went on


class ReadBack:
    """Every byte of one file being written, declared with the CRC-32 it must read back with.

    The writers only append: a stretch written from memory (`wrote`) expects the CRC of those
    bytes; a run copied from the source in the kernel (`copied`) expects the source's CRC (the
    record's own, or computed from the source before the copy), and is read back at once on a pool
    thread while the writer goes on (and while the file is synced).  `failure` then reads the rest
    and compares: the file is exactly the declared stretches, end to end, each reading back with
    its CRC, so every byte on disk is what the writer meant, and a copied record is also proven
    equal to the source's recorded bytes.  No structure is parsed back: that what the writer means
    is a valid archive or pickle is its own tests' business (read by torch, zipfile and pickle).

    The object is bound to the file by `write_atomically` (`attach`), which also `close`s it, so
    that no thread still reads the descriptor when it is closed, on every path out.
    """

    def __init__(self) -> None:
        self._fd: Optional[int] = None
        self._pool: Optional[ThreadPoolExecutor] = None
        self.spans: List[Span] = []
        self._from_memory: Optional[Span] = None  # the last span, while it grows by `wrote`
        self._end = 0
        self._then: Optional[Callable[[int, int], None]] = None

    def attach(self, fd: int, then: Optional[Callable[[int, int], None]] = None) -> None:
        """Bind to the written file's descriptor; `then(start, size)` runs after each copied run is
        handed to the pool (the atomic writer starts its writeback there)."""
        self._fd, self._then = fd, then
        self._pool = ThreadPoolExecutor(max_workers=_CRC_WORKERS, thread_name_prefix="convnext-d2-crc")

    def _append(self, start: int, size: int) -> None:
        if start != self._end:
            raise ValueError(f"bytes declared at {start}, not where the previous ones end ({self._end}): the writers only append")
        self._end = start + size

    def wrote(self, start: int, data: bytes, label: str) -> None:
        """`data` was written from memory at `start` (joined to the previous stretch of the same label)."""
        self._append(start, len(data))
        last = self._from_memory
        if last is not None and last.label == label:
            last.size, last.expected = last.size + len(data), zlib.crc32(data, last.expected)
        elif data:
            self._from_memory = Span(start, len(data), zlib.crc32(data), label)
            self.spans.append(self._from_memory)

    def copied(self, start: int, size: int, expected: int, label: str, key: Optional[str] = None) -> None:
        """A run of `size` bytes was copied to `start`: read it back in the background."""
        self._append(start, size)
        self._from_memory = None
        if size == 0:  # an empty array's record: nothing to read back
            return
        span = Span(start, size, expected, label, key)
        self.spans.append(span)
        if self._pool is not None and self._fd is not None:
            span.started = self._pool.submit(crc_of_range, self._fd, start, size)
            if self._then is not None:
                self._then(start, size)

    def failure(self, fd: int) -> Optional[Span]:
        """The first declared stretch that does not read back with its CRC (the rest read now, in
        parallel), or None when the whole file does.

        Raises:
            EOFError: the file is shorter or longer than what was declared.
        """
        size = os.fstat(fd).st_size
        if size != self._end:
            raise EOFError(f"the file has {size} bytes, {self._end} were written")
        rest = [s for s in self.spans if s.started is None]
        read_now = dict(zip(map(id, rest), crcs_of_ranges(fd, [(s.start, s.size) for s in rest])))
        for span in self.spans:
            if (span.started.result() if span.started is not None else read_now[id(span)]) != span.expected:
                return span
        return None

    def close(self) -> None:
        """Stop: drop the runs not yet begun, wait for those being read."""
        if self._pool is not None:
            for span in self.spans:
                if span.started is not None:
                    span.started.cancel()
            self._pool.shutdown(wait=True)
            self._pool = None
        self._fd = None
