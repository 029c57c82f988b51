"""Run the convnext-d2 CLI, held at one moment of writing until a signal ends it.

    python tests/io/held_convert.py MOMENT MARKER [--named] -- convert SRC DST [options]

The fault tests signal a conversion while it writes.  Watching for its temporary file and then
signalling races the writer: on a fast disk the rest of the file is written, synced and published
in the gap (a CI machine under load lost that race).  Here the child says where it is instead: at
MOMENT it creates MARKER and sleeps, so the signal arrives exactly there, however fast the disk.
The conversion runs unchanged; only the os call that marks the moment is wrapped.

MOMENT:
  copying  just after the first `os.copy_file_range` of a storage into the output: bytes are in,
           more are to come.
  syncing  at the `os.fsync` of the complete temporary file: every byte is written, the
           read-back threads are checksumming, nothing is published yet.

`--named` makes the writer use its fallback, a named `.convnext-d2-*` temporary file (as on a
filesystem without unnamed files), so that the cleanup of both kinds is tried.
"""
from __future__ import annotations

import os
import runpy
import signal
import stat
import sys
import time
from typing import Any, Callable, List

HOLD_S = 300  # far longer than any test waits: the signal ends the sleep


def _hold(marker: str) -> None:
    with open(marker, "w"):
        pass
    time.sleep(HOLD_S)


def _hold_after_first_copy(marker: str) -> None:
    real: Callable[..., int] = os.copy_file_range

    def copy_then_hold(*args: Any, **kwargs: Any) -> int:
        copied = real(*args, **kwargs)
        os.copy_file_range = real
        _hold(marker)
        return copied

    os.copy_file_range = copy_then_hold


def _hold_at_the_files_fsync(marker: str) -> None:
    real: Callable[[int], None] = os.fsync

    def hold_then_sync(fd: int) -> None:
        if stat.S_ISREG(os.fstat(fd).st_mode):  # the output, not its directory
            os.fsync = real
            _hold(marker)
        real(fd)

    os.fsync = hold_then_sync


MOMENTS = {"copying": _hold_after_first_copy, "syncing": _hold_at_the_files_fsync}


def main(argv: List[str]) -> None:
    moment, marker, *rest = argv
    named = rest[:1] == ["--named"]
    cli_args = rest[rest.index("--") + 1:]
    if named:
        from conversion.io import atomic

        atomic.anonymous_beside = lambda path, directory: None
    MOMENTS[moment](marker)
    # Ctrl-C as a terminal delivers it: a suite started as a background job hands its children
    # SIGINT ignored (POSIX shells do that without job control), and the SIGINT tests would wait out.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.argv = ["convnext-d2", *cli_args]
    runpy.run_module("conversion", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
