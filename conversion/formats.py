"""File formats and destinations, without torch: which format a name asks for, what a file's
bytes are, and whether a destination may be written (both writers share these rules)."""
from __future__ import annotations

import os
import stat

from .errors import DestinationError, UnreadableCheckpoint

AUTHOR = "convnext-d2"  # the `__author__` of every file written (Detectron2 needs one in a .pkl)
ZIP_MAGIC = b"PK\x03\x04"
TORCH_EXTENSIONS = (".pth", ".pt")
PICKLE_EXTENSIONS = (".pkl",)


def output_format(path: str) -> str:
    """'torch' or 'pickle' by extension (as Detectron2 picks its reader); anything else is refused."""
    ext = os.path.splitext(path)[1].lower()
    if ext in TORCH_EXTENSIONS:
        return "torch"
    if ext in PICKLE_EXTENSIONS:
        return "pickle"
    raise DestinationError(
        f"{path}: unsupported destination extension '{ext or '(none)'}'.",
        "Detectron2 picks its reader by extension: name the output .pth (torch) or .pkl (model zoo).",
    )


def check_source(path: str) -> None:
    """Refuse, before opening it, a source that is not a regular file (opening a FIFO blocks forever).

    Raises:
        UnreadableCheckpoint: missing, a directory, a FIFO/socket/device, or unreachable (symlink loop).
    """
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise UnreadableCheckpoint(f"{path}: no such file.", "Check the path.") from None
    except OSError as err:
        raise UnreadableCheckpoint(f"{path}: cannot open it ({err.strerror}).", "Check the path (a symlink loop?) and permissions.") from None
    if stat.S_ISDIR(info.st_mode):
        raise UnreadableCheckpoint(f"{path}: is a directory, not a checkpoint file.", "Pass the .pth/.pkl file inside it.")
    if not stat.S_ISREG(info.st_mode):
        raise UnreadableCheckpoint(f"{path}: not a regular file (a FIFO, socket or device).", "Pass the checkpoint file itself.")


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_destination(path: str, *, force: bool, source: str = "") -> str:
    """Refuse a destination that must not be written; return its directory.

    Raises:
        DestinationError: the source itself, a directory, an existing file without `force`,
            or a missing directory.
    """
    directory = os.path.dirname(os.path.abspath(path))
    if source and (os.path.abspath(source) == os.path.abspath(path) or _same_file(source, path)):
        raise DestinationError(f"{path}: destination is the source file.", "Write to a new file name.")
    if os.path.isdir(path):
        raise DestinationError(f"{path}: destination is a directory.", "Give a file name ending in .pth or .pkl.")
    if os.path.exists(path) and not force:
        raise DestinationError(f"{path}: destination exists.", "Pass --force to overwrite it, or choose another name.")
    if not os.path.isdir(directory):
        raise DestinationError(f"{path}: directory {directory} does not exist.", "Create it first.")
    return directory
