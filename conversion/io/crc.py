"""CRC-32 of file ranges, the read-back check every streamed writer runs on what it wrote.

zlib.crc32 releases the GIL, so ranges are checked by a pool of threads, one per core.  A writer
that copies large records reports each one to a `ReadBack` as soon as it is in the file, so the
record is read back on another core while the next one is copied (and while the file is synced);
the writer's verify step then collects those CRCs and checks the rest of the file itself.
"""
from __future__ import annotations

import os
import threading
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Dict, List, Optional, Sequence, Tuple

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


class ReadBack:
    """The read-back of one file being written, started record by record while it is written.

    The writer calls `written(start, size)` once a record's bytes are in the file; its CRC-32 is
    then read from the file (the written bytes, through the file's own descriptor, not the source)
    on a pool thread while the writer goes on.  The writer's verify step asks `crcs(fd, ranges)`
    for every range it finds when it parses the finished file: a range reported while writing is
    answered by the CRC already computed, any other (the small records the writer does not
    report) is read then.  Reported ranges must come in file order without overlapping: the
    writers here only append, so a reported record is never written again (the order is checked,
    and the verify step's parse of the finished file must find each record where it was reported).

    The object is bound to the file by `write_atomically` (`attach`), which also `close`s it, so
    that no thread still reads the descriptor when it is closed, on every path out.
    """

    def __init__(self) -> None:
        self._fd: Optional[int] = None
        self._pool: Optional[ThreadPoolExecutor] = None
        self._started: Dict[Range, "Future[int]"] = {}
        self._end = 0
        self._then: Optional[Callable[[int, int], None]] = None

    def attach(self, fd: int, then: Optional[Callable[[int, int], None]] = None) -> None:
        """Bind to the written file's descriptor; `then(start, size)` runs after each reported
        record is handed to the pool (the atomic writer starts its writeback there)."""
        self._fd, self._then = fd, then
        self._pool = ThreadPoolExecutor(max_workers=_CRC_WORKERS, thread_name_prefix="convnext-d2-crc")

    def written(self, start: int, size: int) -> None:
        """The record at [start, start + size) is complete: read it back in the background.

        Raises:
            ValueError: a record reported before the end of the previous one (a writer bug).
        """
        if start < self._end:
            raise ValueError(f"record at {start} reported before the end of the previous one ({self._end})")
        self._end = start + size
        if size == 0:  # an empty array's record: nothing to read back, and no range to find (its CRC is 0)
            return
        if self._pool is None or self._fd is None:  # not bound to a file: the verify step reads it all
            return
        self._started[(start, size)] = self._pool.submit(crc_of_range, self._fd, start, size)
        if self._then is not None:
            self._then(start, size)

    def crcs(self, fd: int, ranges: Sequence[Range]) -> List[int]:
        """The CRC-32 of each range: the background result for a reported range, the rest read
        now from `fd` (in parallel).  `ranges` are all the records the verify step found in the
        finished file, so every reported record must be among them.

        Raises:
            EOFError: the file ends inside a range.
            ValueError: a reported record is not where the finished file's structure puts one.
        """
        lost = set(self._started).difference(ranges)
        if lost:
            start, size = min(lost)
            raise ValueError(f"the record written at {start} ({size} bytes) is not where the file's structure puts one")
        rest = [r for r in ranges if r not in self._started]
        read_now = dict(zip(rest, crcs_of_ranges(fd, rest)))
        return [self._started[r].result() if r in self._started else read_now[r] for r in ranges]

    def close(self) -> None:
        """Stop: drop the records not yet begun, wait for those being read."""
        if self._pool is not None:
            for future in self._started.values():
                future.cancel()
            self._pool.shutdown(wait=True)
            self._pool = None
        self._fd = None
