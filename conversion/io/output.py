"""The file a writer fills, as both writers (conversion/io/torch_writer.py, modelzoo_writer.py)
see it: bytes written from memory, and runs of the source copied file to file in the kernel
(`os.copy_file_range`), each declared to the read-back (`crc.ReadBack`) with the CRC-32 it must
read back with; and the verdict once the file is synced.

The copy goes through one seam, `copy_range`, replaceable for the length of a `with
copies_through(copier):` block: the suite makes a copy go wrong there (a flipped byte, a disk
that fills up) to prove that the read-back catches it and nothing is installed.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Iterator, List, Optional

from ..errors import UnreadableCheckpoint, VerificationFailed
from . import crc as _crc
from .atomic import write_atomically
from .crc import ReadBack
from .handles import FileBytes
from .tensor_bytes import Tensors

_COPY_CHUNK = 1 << 24
Copier = Callable[[int, int, int, int], None]  # (source fd, destination fd, source offset, count)
Progress = Optional[Callable[[int, int], None]]  # (bytes done, bytes in all), for a progress display


def copy_range(src_fd: int, dst_fd: int, src_offset: int, count: int) -> None:
    """Copy `count` bytes from src at src_offset to dst's current position, in the kernel when possible.

    Raises:
        EOFError: the source ends inside the range.
    """
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


_copier: Copier = copy_range


@contextlib.contextmanager
def copies_through(copier: Copier) -> Iterator[None]:
    """Every writer copies through `copier` instead of `copy_range` inside the block (the seam
    where the suite makes a copy go wrong)."""
    global _copier
    previous, _copier = _copier, copier
    try:
        yield
    finally:
        _copier = previous


class Output:
    """The open binary file `f` being written from its current position, every byte declared to
    `read_back` (None: nothing is checked, as for bytes built in memory by `write.encode`) under
    `label` unless the write names another (what a failure is reported as)."""

    def __init__(self, f: Any, tensors: Tensors, read_back: Optional[ReadBack], label: str = "") -> None:
        self.f, self.tensors, self.read_back, self.at, self.label = f, tensors, read_back, f.tell(), label

    def write(self, data: bytes, label: str = "") -> None:
        self.f.write(data)
        if self.read_back is not None:
            self.read_back.wrote(self.at, data, label or self.label)
        self.at += len(data)

    def copy(self, run: FileBytes, expected: int, label: str, key: str) -> None:
        """Copy the source's run here in the kernel; it must read back with CRC `expected` (a source
        that ends inside the run is named)."""
        self.f.flush()  # hand over to the fd: the copy happens in the kernel
        try:
            _copier(self.tensors.fd, self.f.fileno(), run.offset, run.nbytes)
        except EOFError:
            raise self.tensors.ends_inside_a_tensor() from None
        self.f.seek(self.at + run.nbytes)
        if self.read_back is not None:
            self.read_back.copied(self.at, run.nbytes, expected, label, key)
        self.at += run.nbytes


def expected_crcs(tensors: Tensors, runs: List[FileBytes]) -> List[int]:
    """Each run's CRC-32: the source's recorded one, or (safetensors, legacy storages, payloads
    record none) computed in parallel from the source before it is copied."""
    unrecorded = [run for run in runs if run.crc is None]
    try:
        computed = iter(_crc.crcs_of_ranges(tensors.fd, [(run.offset, run.nbytes) for run in unrecorded]) if unrecorded else [])
    except EOFError:
        raise tensors.ends_inside_a_tensor() from None
    return [run.crc if run.crc is not None else next(computed) for run in runs]


def write_checked(dst: str, tensors: Tensors, fill: Callable[[Any, ReadBack], None], what: str, *, force: bool, source: str) -> int:
    """Atomically write `dst` with `fill(file, read_back)`; the verdict, once the file is synced:
    every declared stretch reads back with its CRC.  A copied record that fails is blamed on the
    source if the source's own record fails its recorded CRC too (exit 2, re-download), otherwise
    on the writing (exit 1).  Errors name `dst`, not the temporary file.  Returns the size."""
    read_back = ReadBack()

    def verify(tmp: str) -> None:
        try:
            with open(tmp, "rb") as f:
                bad = read_back.failure(f.fileno())
        except (EOFError, OSError) as err:
            raise VerificationFailed(f"{dst}: written {what} does not read back ({err}).", "Report this as a bug.") from None
        if bad is None:
            return
        loc = tensors.storages.get(bad.key) if bad.key is not None else None
        if isinstance(loc, FileBytes) and loc.crc is not None:
            try:
                intact = _crc.crc_of_range(tensors.fd, loc.offset, loc.nbytes) == loc.crc
            except EOFError:
                intact = False
            if not intact:
                raise UnreadableCheckpoint(f"{tensors.path}: record data/{bad.key} fails its CRC-32: the archive is corrupt.", "Re-download or re-save it.")
        raise VerificationFailed(f"{dst}: {bad.label} does not read back as written.", "Report this as a bug.")

    with tensors:
        return write_atomically(dst, force=force, source=source, write=lambda f: fill(f, read_back), verify=verify, read_back=read_back)
