"""Writing a file so that it appears whole or not at all (every writer of this tool uses this).

The bytes go to a temporary file in the destination's directory, are synced and read back by the
caller's check, and only then get the destination's name.  A writer that copies large records
reports each one as it is written (`ReadBack`, conversion/io/crc.py): its read-back CRC runs on
another core while the next record is copied and while the file is synced, and the kernel is
asked to start writing it to disk at once, so that the final sync has little left to do.

On Linux the temporary file is unnamed (`O_TMPFILE`), linked in with `linkat` once verified, so a
killed process (even SIGKILL) leaves nothing; where a filesystem has no unnamed files (or cannot
link them in) it is a hidden `.convnext-d2-*` file, renamed over the destination, that every
failure except SIGKILL removes.
"""
from __future__ import annotations

import contextlib
import errno
import os
import queue
import signal
import sys
import threading
import tempfile
from typing import BinaryIO, Callable, Dict, Iterator, List, Optional, Tuple

from ..errors import DestinationError
from ..formats import check_destination  # the destination rules live with the formats
from .crc import ReadBack


_NO_ANONYMOUS_FILES = {errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOTSUP}
_AT_FDCWD, _AT_EMPTY_PATH = -100, 0x1000
_publishable: Dict[int, bool] = {}  # st_dev -> whether unnamed files there can be given a name


def _link_fd(fd: int, target: str) -> None:
    """Give the unnamed file `fd` the name `target`: linkat(fd, "", AT_EMPTY_PATH) (needs
    CAP_DAC_READ_SEARCH), else linkat through /proc/self/fd (some kernels and sandboxes refuse one)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.linkat(fd, b"", _AT_FDCWD, os.fsencode(target), _AT_EMPTY_PATH) == 0:
            return
        first = ctypes.get_errno()
    except (OSError, AttributeError, ImportError):
        first = errno.ENOSYS
    try:
        os.link(f"/proc/self/fd/{fd}", target, follow_symlinks=True)
    except OSError as err:
        if err.errno == errno.EEXIST or first == errno.EEXIST:
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), target) from None
        raise


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Defer SIGTERM and SIGINT to the end of the block, then deliver them to the handlers in place.

    Python runs signal handlers in the main thread between bytecodes, whichever thread the kernel
    picked, so masking the signal in this thread would not do (torch starts threads of its own):
    the handlers themselves are swapped for one that only records.  Outside the main thread no
    handler can be set, and nothing of ours raises on a signal there, so there is nothing to hold.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: List[int] = []
    held = (signal.SIGTERM, signal.SIGINT)
    previous = {signum: signal.signal(signum, lambda signum, frame: arrived.append(signum)) for signum in held}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(arrived):
            signal.raise_signal(signum)


def _can_publish(directory: str) -> bool:
    """Whether an unnamed file in `directory` can later be linked in (tried once per filesystem)."""
    device = os.stat(directory).st_dev
    if device not in _publishable:
        probe = os.path.join(directory, f".convnext-d2-probe-{os.getpid()}-{os.urandom(4).hex()}")
        fd = os.open(directory, os.O_TMPFILE | os.O_RDWR, 0o600)
        # The probe has a name for a moment: hold SIGTERM and Ctrl-C (the CLI turns both into an
        # exception) until it is gone, so an interrupted conversion cannot leave it behind
        # (SIGKILL in those microseconds still can: nothing catches it).
        with _signals_held():
            try:
                _link_fd(fd, probe)
                unlink_quietly(probe)
                _publishable[device] = True
            except OSError:
                _publishable[device] = False
            finally:
                os.close(fd)
    return _publishable[device]


def anonymous_beside(path: str, directory: str) -> Optional[int]:
    """An unnamed file in the destination's directory (Linux `O_TMPFILE`): if the process is killed,
    even by SIGKILL, the kernel frees it and nothing is left.  None where the platform or the
    filesystem has no such files, or cannot link them in (then a named temporary file is used,
    which only SIGKILL leaves behind)."""
    flag = getattr(os, "O_TMPFILE", 0)
    if not flag:
        return None
    try:
        if not _can_publish(directory):
            return None
        return os.open(directory, flag | os.O_RDWR, 0o666)  # the umask applies, as to any new file
    except OSError as err:
        if err.errno in _NO_ANONYMOUS_FILES:
            return None
        raise DestinationError(f"{path}: cannot write in {directory} ({err.strerror}).", "Choose a writable directory.") from None


def _publish(fd: int, path: str, directory: str, force: bool) -> None:
    """Give the finished unnamed file its name: linked at `path` directly when nothing is there
    (atomic, and refused if something appeared meanwhile), else linked beside it and renamed over it."""
    if not force:
        try:
            _link_fd(fd, path)
            return
        except FileExistsError:
            raise DestinationError(f"{path}: destination exists.", "Pass --force to overwrite it, or choose another name.") from None
    name = os.path.join(directory, f".convnext-d2-{os.getpid()}-{fd}-{os.urandom(4).hex()}{os.path.splitext(path)[1]}")
    _link_fd(fd, name)
    try:
        os.replace(name, path)
    except BaseException:
        unlink_quietly(name)
        raise


def write_atomically(
    path: str,
    *,
    force: bool,
    source: str,
    write: Callable[[BinaryIO], None],
    verify: Callable[[str], None],
    read_back: Optional[ReadBack] = None,
) -> int:
    """Write a file the one safe way every writer here uses; return its size.

    `write` fills a temporary file in `path`'s directory; it is flushed and synced, `verify` reads
    it back (raising if it differs from what was meant), and only then does it get `path`'s name.
    With `read_back`, the records `write` reports to it are checksummed on other threads from the
    moment they are written, through the same sync, and `verify` collects their CRCs; every
    thread has finished before the file is closed, whatever happens.
    On Linux the temporary file is unnamed (`O_TMPFILE`) until then, so no failure, not even
    SIGKILL, leaves anything behind; elsewhere (or on a filesystem without unnamed files) it is a
    hidden `.convnext-d2-*` file that every failure except SIGKILL removes.  `path` is never
    touched before the file is complete and verified.

    Raises:
        DestinationError: a destination that must not be written, or an OSError while writing.
    """
    directory = check_destination(path, force=force, source=source)
    fd, tmp = anonymous_beside(path, directory), ""
    try:
        if fd is None:
            try:  # a named file in the destination's directory, so that the final rename is atomic
                fd, tmp = tempfile.mkstemp(prefix=".convnext-d2-", suffix=os.path.splitext(path)[1], dir=directory)
            except OSError as err:
                raise DestinationError(f"{path}: cannot write in {directory} ({err.strerror}).", "Choose a writable directory.") from None
            mask = os.umask(0)
            os.umask(mask)
            with contextlib.suppress(OSError):  # mkstemp makes 0600; a checkpoint is an ordinary file (some filesystems refuse chmod: fine)
                os.chmod(tmp, 0o666 & ~mask)
        with os.fdopen(fd, "w+b") as f:
            size = _fill(f, write, lambda: verify(tmp or f"/proc/self/fd/{f.fileno()}"), read_back)
            if not tmp:
                _publish(f.fileno(), path, directory, force)
        if tmp:
            os.replace(tmp, path)
    except BaseException as err:
        if tmp:
            unlink_quietly(tmp)
        if isinstance(err, OSError):
            raise DestinationError(f"{path}: write failed ({err.strerror or err}).", "Check free space and permissions.") from None
        raise
    return size


def _fill(f: BinaryIO, write: Callable[[BinaryIO], None], verify: Callable[[], None], read_back: Optional[ReadBack]) -> int:
    """Write, flush, sync, verify; return the size.  The file is on disk (fsync'd) before `verify`
    passes it, so nothing unsynced is ever published.  The read-back threads of `read_back` go on
    checksumming while fsync waits for the disk (neither needs the GIL); `verify` then waits for
    their CRCs and checks the file's structure, after the sync, so that the structure it checks
    is the one on disk."""
    writeback = _Writeback(f.fileno())
    if read_back is not None:
        read_back.attach(f.fileno(), then=writeback)
    try:
        write(f)
        f.flush()
        writeback.stop()  # fsync syncs what is left
        os.fsync(f.fileno())
        size = f.tell()
        verify()
    finally:
        # No thread may touch the descriptor after it is closed (its number may be reused at once).
        # Were this wait itself interrupted (Ctrl-C), a thread left behind would only read, or ask
        # for writeback: neither changes any file.
        writeback.stop()
        writeback.join()
        if read_back is not None:
            read_back.close()
    return size


_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writeback of the range's dirty pages, do not wait
_WRITEBACK_STEP = 8 << 20  # one call per 8 MiB written at least: a call per small record costs more than it saves


def _sync_file_range() -> Optional[Callable[[int, int, int, int], int]]:
    """libc's sync_file_range (Linux), or None where there is none."""
    try:
        import ctypes

        call = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError, ImportError):
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    call.restype = ctypes.c_int
    return call


class _Writeback:
    """Asks the kernel to start writing each finished stretch of the file to disk (Linux
    `sync_file_range(SYNC_FILE_RANGE_WRITE)`), so that the fsync before publishing, which still
    runs and still decides, finds most of the file on its way already.  The requests are made on
    a thread of their own: the call blocks while the disk's queue is full (measured here: up to a
    third of a second on a 0.8 GB file), and the copy must not wait for it.  Where the call is
    missing or fails, nothing is done and fsync does it all."""

    def __init__(self, fd: int) -> None:
        self.fd, self.done, self.stopped, self.ended = fd, 0, False, False
        self.call = _sync_file_range() if sys.platform.startswith("linux") else None
        self._requests: "queue.SimpleQueue[Optional[Tuple[int, int]]]" = queue.SimpleQueue()
        self._thread: Optional[threading.Thread] = None

    def __call__(self, start: int, size: int) -> None:
        """The file is written up to start + size: ask for its writeback once 8 MiB are waiting."""
        end = start + size
        if self.call is None or self.ended or end - self.done < _WRITEBACK_STEP:
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="convnext-d2-writeback", daemon=True)
            self._thread.start()
        self._requests.put((self.done, end - self.done))
        self.done = end

    def _run(self) -> None:
        while True:
            request = self._requests.get()
            call = self.call
            if request is None:
                return
            if self.stopped or call is None:
                continue
            if call(self.fd, request[0], request[1], _SYNC_FILE_RANGE_WRITE) != 0:
                self.call = None  # advice only: fsync still syncs everything

    def stop(self, drop_queued: bool = True) -> None:
        """Take no more requests; those still queued are dropped unless `drop_queued` is false."""
        self.stopped = self.stopped or drop_queued
        if not self.ended:
            self.ended = True
            self._requests.put(None)

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None


def unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
