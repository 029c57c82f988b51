"""The atomic writer on every platform it meets, driven deterministically on this Linux machine.

`write_atomically` prefers an unnamed file (`O_TMPFILE`) linked in with `linkat(AT_EMPTY_PATH)`;
where that call is refused (it needs CAP_DAC_READ_SEARCH, and some sandboxes block it) it links
through /proc/self/fd; where neither links, or the platform has no `O_TMPFILE` (macOS, Windows),
it writes a hidden named temporary file and renames it.  Each way must give the user the same
file, with the same permissions, and leave nothing behind when verification fails.  The ways the
machine does not take by itself are reached by taking away what the preceding way needs (the
flag, the C library's linkat, the /proc link), as those platforms lack them.
"""
from __future__ import annotations

import errno
import os
import stat

import pytest

from conversion.errors import DestinationError
from conversion.io import atomic

PAYLOAD = b"weights" * 1000
USER_UMASK = 0o027


def _no_c_library(*args, **kwargs):
    raise OSError(errno.ENOSYS, "no C library here")


def _no_proc_link(*args, **kwargs):
    raise PermissionError(errno.EPERM, "linking through /proc refused")


WAYS = {
    # way -> what the platform lacks, and whether the file is unnamed while written
    "unnamed-linkat": ((), True),
    "unnamed-proc-link": (("c-library",), True),
    "named-no-link": (("c-library", "proc-link"), False),
    "named-no-o-tmpfile": (("o-tmpfile",), False),
}


def _proc_link_refused(directory) -> str:
    """Why this kernel will not link an unnamed file through /proc/self/fd ('' when it will): some
    refuse (EXDEV here, in a sandboxed kernel), and then the writer falls back to a named file."""
    fd = os.open(directory, os.O_TMPFILE | os.O_RDWR, 0o600)
    probe = os.path.join(directory, "probe")
    try:
        os.link(f"/proc/self/fd/{fd}", probe, follow_symlinks=True)
        os.unlink(probe)
        return ""
    except OSError as err:
        return f"this kernel refuses linking an unnamed file through /proc ({err.strerror}); the named way covers it"
    finally:
        os.close(fd)


@pytest.fixture(params=sorted(WAYS))
def way(request, monkeypatch):
    import ctypes

    if not hasattr(os, "O_TMPFILE"):
        pytest.skip("this machine has no unnamed files to take away")
    lacks, unnamed = WAYS[request.param]
    if lacks == ("c-library",) and _proc_link_refused(request.getfixturevalue("tmp_path")):
        pytest.skip(_proc_link_refused(request.getfixturevalue("tmp_path")))
    monkeypatch.setattr(atomic, "_publishable", {})  # probe each filesystem again
    if "c-library" in lacks:
        monkeypatch.setattr(ctypes, "CDLL", _no_c_library)
    if "proc-link" in lacks:
        monkeypatch.setattr(os, "link", _no_proc_link)
    if "o-tmpfile" in lacks:
        monkeypatch.delattr(os, "O_TMPFILE")
    old = os.umask(USER_UMASK)
    yield unnamed
    os.umask(old)


def _write(path, seen_while_writing, verify=lambda written: None):
    def write(f):
        f.write(PAYLOAD)
        seen_while_writing.extend(sorted(os.listdir(os.path.dirname(path))))

    return atomic.write_atomically(str(path), force=False, source="", write=write, verify=verify)


def test_each_way_gives_the_file_its_name_its_bytes_and_the_users_permissions(way, tmp_path):
    seen = []

    size = _write(tmp_path / "model_d2.pkl", seen)

    assert size == len(PAYLOAD) and (tmp_path / "model_d2.pkl").read_bytes() == PAYLOAD
    assert stat.S_IMODE((tmp_path / "model_d2.pkl").stat().st_mode) == 0o666 & ~USER_UMASK
    assert os.listdir(tmp_path) == ["model_d2.pkl"]
    if way:  # unnamed: nothing in the folder until the file is verified
        assert seen == []
    else:
        assert len(seen) == 1 and seen[0].startswith(".convnext-d2-") and seen[0].endswith(".pkl"), seen


def test_each_way_leaves_nothing_when_the_written_file_fails_verification(way, tmp_path):
    class Differs(Exception):
        pass

    def verify(written):
        assert open(written, "rb").read() == PAYLOAD  # the verifier reads the temporary file itself
        raise Differs

    with pytest.raises(Differs):
        _write(tmp_path / "model_d2.pkl", [], verify)

    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("lacks", [(), ("c-library",)], ids=["linkat", "proc-link"])
def test_a_destination_that_appears_while_writing_is_not_overwritten(lacks, tmp_path, monkeypatch):
    """Linked in, the unnamed file cannot replace a file that appeared after the destination check."""
    import ctypes

    if not hasattr(os, "O_TMPFILE"):
        pytest.skip("unnamed files only")
    if lacks and _proc_link_refused(tmp_path):
        pytest.skip(_proc_link_refused(tmp_path))
    monkeypatch.setattr(atomic, "_publishable", {})
    if lacks:
        monkeypatch.setattr(ctypes, "CDLL", _no_c_library)
    path = tmp_path / "model_d2.pkl"

    def write(f):
        f.write(PAYLOAD)
        path.write_bytes(b"someone else's")

    with pytest.raises(DestinationError, match="destination exists"):
        atomic.write_atomically(str(path), force=False, source="", write=write, verify=lambda written: None)

    assert path.read_bytes() == b"someone else's" and os.listdir(tmp_path) == ["model_d2.pkl"]


def test_each_way_refuses_an_existing_destination_without_force_and_leaves_it_as_it_was(way, tmp_path):
    """Without --force an existing file is never replaced, whichever way the file is written: the
    named ways end in a rename, which would replace it, so the refusal must come before writing."""
    path = tmp_path / "model_d2.pkl"
    path.write_bytes(b"the user's file")

    with pytest.raises(DestinationError, match="destination exists"):
        _write(path, [])

    assert path.read_bytes() == b"the user's file" and os.listdir(tmp_path) == ["model_d2.pkl"]
