"""CRC-32 of file ranges, the read-back check every streamed writer runs on what it wrote.

zlib.crc32 releases the GIL, so ranges are checked by a pool of threads, one per core.
"""
from __future__ import annotations

import os
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import List, Sequence, Tuple

# Each thread reads through its own 1 MiB buffer (it stays in the CPU's
# cache between the read and the CRC): measured on XXLarge's written file, 1.3 s against 2.1 s for
# memory maps, whose page faults cost more than the copy, and resident memory stays at
# workers x 1 MiB whatever the record's size (a map of XXLarge's largest record alone is 151 MB).
_CRC_WINDOW = 1 << 20
_CRC_WORKERS = os.cpu_count() or 1
_crc_buffers = threading.local()


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


def crcs_of_ranges(fd: int, ranges: Sequence[Tuple[int, int]]) -> List[int]:
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
