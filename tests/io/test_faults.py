"""Faults while writing: a killed process, a full disk, a file-size limit, a read-only or vanishing
directory.  The destination is never left half-written: it is absent (or, with --force, exactly the
old file) unless the conversion finished (docs/design.md, "Safety": nothing half-written).

The process-level faults are real: a conversion child is killed with a signal at a named moment
of its write (held there by tests/io/held_convert.py, so the signal cannot come too late), or runs
under `RLIMIT_FSIZE`, or writes into a tmpfs that fills up or a read-only bind mount (each in a private mount namespace that vanishes with the child).
On Linux the temporary file is unnamed (O_TMPFILE) until it is complete and verified, so even
SIGKILL leaves nothing; on a filesystem without unnamed files the writer falls back to a hidden
`.convnext-d2-*` file beside the destination, which every fault but SIGKILL removes (Ctrl-C and
SIGTERM are tried in both modes here).
"""
from __future__ import annotations

import errno
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import pytest
import torch

from conversion.io import atomic
from conversion.architecture import Architecture
from conversion.cli import main

from ..support import TORCH_HAS_WEIGHTS_ONLY, random_canonical_state_dict

if not TORCH_HAS_WEIGHTS_ONLY:
    # The fault tests read outputs back with torch's weights_only loader, which torch 1.9 lacks.
    pytest.skip("the fault tests need torch >= 1.13 (weights_only) to read outputs back", allow_module_level=True)
from ..support.cli import PROCESS_TIMEOUT_S, ROOT, assert_plain_error

EXIT_OK, EXIT_PROBLEM, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
TEMP_PREFIX = ".convnext-d2-"  # write.py's temporary files beside the destination
SMALL = Architecture(depths=(1, 1, 2, 1), dims=(8, 8, 16, 16), num_classes=3, classifier_norm=True)
POLL_S = 0.001


def _env() -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def _cli(*args: str) -> List[str]:
    return [sys.executable, "-m", "conversion", *args]


def temporaries(folder: Path) -> List[Path]:
    return sorted(p for p in folder.iterdir() if p.name.startswith(TEMP_PREFIX))


# ================================================================ killed while writing
# The child is held at a named moment (tests/io/held_convert.py), so the signal arrives exactly
# there however fast the disk is; the conversion itself runs unchanged.

HELD = Path(__file__).with_name("held_convert.py")
COPYING, SYNCING = "copying", "syncing"  # bytes are in and more are to come / every byte is in, syncing


class Held:
    """A conversion child held at `moment`, writing `dst` (in a folder of its own, where nothing else is)."""

    def __init__(self, src: Path, dst: Path, moment: str, *extra: str, named: bool = False) -> None:
        self.dst, self.folder = dst, dst.parent
        self.marker = dst.parent.parent / f"held-{moment}"
        command = [sys.executable, str(HELD), moment, str(self.marker)] + (["--named"] if named else [])
        self.proc = subprocess.Popen(command + ["--", "convert", str(src), str(dst), *extra], cwd=dst.parent, env=_env(),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self._wait()

    def _wait(self) -> None:
        deadline = time.monotonic() + PROCESS_TIMEOUT_S
        while not self.marker.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                out, err = self.proc.communicate()
                pytest.fail(f"the conversion ended (status {self.proc.returncode}) before reaching its moment:\n{err}")
            time.sleep(POLL_S)

    def temporary_sizes(self) -> List[int]:
        """The sizes of the child's temporary files in its folder: named ones, and unnamed (O_TMPFILE) ones it holds open."""
        return [p.stat().st_size for p in temporaries(self.folder) + _unnamed_temporaries(self.proc, self.folder)]

    def signal(self, sig: int) -> subprocess.CompletedProcess:
        self.proc.send_signal(sig)
        out, err = self.proc.communicate(timeout=PROCESS_TIMEOUT_S)
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, out, err)


def _unnamed_temporaries(proc: subprocess.Popen, folder: Path) -> List[Path]:
    """The child's open unnamed (O_TMPFILE) files in `folder`, as /proc/<pid>/fd paths (stat-able while it lives)."""
    found = []
    try:
        fds = os.listdir(f"/proc/{proc.pid}/fd")
    except OSError:
        return []
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{proc.pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(folder) + "/") and target.endswith("(deleted)"):
            found.append(Path(f"/proc/{proc.pid}/fd/{fd}"))
    return found


@pytest.fixture
def out(tmp_path: Path) -> Path:
    """The destination folder: the held child's marker lives beside it, so the folder holds only what convert leaves."""
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


def _converted_size(src: Path, folder: Path) -> int:
    """The size of `src`'s output, from a conversion elsewhere (the bytes are deterministic)."""
    folder.mkdir()
    done = subprocess.run(_cli("convert", str(src), str(folder / "model_d2.pth")), env=_env(),
                          capture_output=True, text=True, timeout=PROCESS_TIMEOUT_S)
    assert done.returncode == EXIT_OK, done.stderr
    size = (folder / "model_d2.pth").stat().st_size
    shutil.rmtree(folder)
    return size


@pytest.mark.parametrize("moment", [COPYING, SYNCING])
def test_sigkill_while_writing_leaves_nothing(small_source: Path, out: Path, tmp_path: Path, moment: str):
    """SIGKILL cannot be cleaned up after, so the temporary file is unnamed (O_TMPFILE): the kernel frees it
    with the process, and the folder is exactly as it was.  The next run converts normally."""
    dst = out / "model_d2.pth"
    final_size = _converted_size(small_source, tmp_path / "elsewhere")
    held = Held(small_source, dst, moment)
    sizes = held.temporary_sizes()
    assert temporaries(out) == [], "the temporary file should have no name (O_TMPFILE) on this filesystem"
    assert len(sizes) == 1 and (0 < sizes[0] < final_size if moment == COPYING else sizes[0] == final_size), (sizes, final_size)

    result = held.signal(signal.SIGKILL)

    assert result.returncode == -signal.SIGKILL
    assert sorted(p.name for p in out.iterdir()) == [], "a killed conversion left something behind"

    again = subprocess.run(_cli("convert", str(small_source), str(dst)), cwd=out, env=_env(),
                           capture_output=True, text=True, timeout=PROCESS_TIMEOUT_S)

    assert again.returncode == EXIT_OK, again.stderr
    assert sorted(p.name for p in out.iterdir()) == [dst.name]


def test_sigkill_while_forcing_over_an_existing_destination_keeps_the_old_file(small_source: Path, out: Path):
    dst = out / "model_d2.pth"
    dst.write_bytes(b"the previous conversion")
    held = Held(small_source, dst, SYNCING, "--force")

    held.signal(signal.SIGKILL)

    assert dst.read_bytes() == b"the previous conversion", "--force replaced the old file before the new one was complete"
    assert sorted(p.name for p in out.iterdir()) == [dst.name], "nothing else may be left"


@pytest.mark.parametrize("named", [False, True], ids=["unnamed-temporary", "named-temporary"])
@pytest.mark.parametrize("moment", [COPYING, SYNCING])
def test_sigint_while_writing_removes_the_temporary_file_and_says_so(small_source: Path, out: Path, moment: str, named: bool):
    """Ctrl-C once bytes are being written: exit 130, 'nothing was written', and truly nothing is left,
    whichever kind of temporary file the writer had.

    (Ctrl-C in the instant between creating the temporary file and writing to it is
    test_a_fault_right_after_the_temporary_file_is_created_leaves_nothing.)
    """
    held = Held(small_source, out / "model_d2.pth", moment, named=named)
    assert len(held.temporary_sizes()) == 1 and len(temporaries(out)) == int(named)

    result = held.signal(signal.SIGINT)

    assert result.returncode == EXIT_INTERRUPTED, result.stderr
    assert "interrupted; nothing was written" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert sorted(p.name for p in out.iterdir()) == [], "Ctrl-C left files behind"


@pytest.mark.parametrize("named", [False, True], ids=["unnamed-temporary", "named-temporary"])
@pytest.mark.parametrize("moment", [COPYING, SYNCING])
def test_sigterm_while_writing_leaves_nothing_and_exits_143(small_source: Path, out: Path, moment: str, named: bool):
    """SIGTERM (what `kill`, timeouts and job schedulers send) is cleaned up after like Ctrl-C:
    exit 143, 'terminated; nothing was written', no destination and no temporary file."""
    held = Held(small_source, out / "model_d2.pth", moment, named=named)
    assert len(held.temporary_sizes()) == 1 and len(temporaries(out)) == int(named)

    result = held.signal(signal.SIGTERM)

    assert result.returncode == 128 + signal.SIGTERM, "the CLI turns SIGTERM into a clean stop (exit 143)"
    assert "terminated; nothing was written" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert sorted(p.name for p in out.iterdir()) == [], "SIGTERM left files behind"


# ================================================================ the disk refuses


@pytest.fixture
def small_source(tmp_path: Path) -> Path:
    src = tmp_path / "in" / "small.pth"
    src.parent.mkdir()
    torch.save({"model": random_canonical_state_dict(SMALL)}, src)
    return src


def _limit_file_size(limit: int) -> Callable[[], None]:
    def preexec() -> None:  # runs in the child between fork and exec
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of killing the child

    return preexec


@pytest.mark.parametrize("ext", [".pth", ".pkl"])
def test_file_size_limit_mid_write_exits_2_and_leaves_nothing(small_source: Path, tmp_path: Path, ext: str):
    """RLIMIT_FSIZE below the output's size: the write fails with EFBIG part-way, as on a full disk."""
    out = tmp_path / "out"
    out.mkdir()
    limit = 4096  # the SMALL output is ~60 KB: the temporary file is cut off part-way

    # Not measured under `tox -e coverage`: the limit would cut coverage's own data file short too.
    unmeasured = {k: v for k, v in _env().items() if not k.startswith("COVERAGE_")}
    result = subprocess.run(_cli("convert", str(small_source), f"out/model_d2{ext}"), cwd=tmp_path, env=unmeasured,
                            preexec_fn=_limit_file_size(limit), capture_output=True, text=True, timeout=PROCESS_TIMEOUT_S)

    assert result.returncode == EXIT_USAGE, result.stderr
    assert_plain_error(result.stderr)
    assert f"out/model_d2{ext}: write failed (File too large)" in result.stderr, result.stderr
    assert "free space" in result.stderr, "the hint should point at space"
    assert sorted(os.listdir(out)) == [], "a destination or temporary file was left"


def _mount_namespaces_work() -> bool:
    if sys.platform != "linux" or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", "mount -t tmpfs -o size=4k tmpfs /mnt"],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


# Runs the CLI inside a private mount namespace, then lists the folder from inside (the mount vanishes with it).
_IN_NAMESPACE = 'set -e; {mount}; set +e; cd "$1"; "$2" -m conversion convert "$3" out/model_d2.pth; rc=$?; ' \
                'echo "--listing--"; ls -A out; exit $rc'


def _run_in_mount_namespace(mount: str, folder: Path, src: Path) -> subprocess.CompletedProcess:
    script = _IN_NAMESPACE.format(mount=mount)
    return subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", str(folder), sys.executable, str(src)],
                          env=_env(), capture_output=True, text=True, timeout=PROCESS_TIMEOUT_S)


def _listing(stdout: str) -> List[str]:
    return stdout.split("--listing--", 1)[1].split()


def test_no_space_left_exits_2_and_leaves_nothing(small_source: Path, tmp_path: Path):
    """A real ENOSPC: an 8 KB tmpfs mounted over the destination folder (private mount namespace)."""
    if not _mount_namespaces_work():
        pytest.skip("cannot mount a private tmpfs here (needs unshare -m and CAP_SYS_ADMIN)")
    (tmp_path / "out").mkdir()

    result = _run_in_mount_namespace('mount -t tmpfs -o size=8k tmpfs "$1/out"', tmp_path, small_source)

    assert result.returncode == EXIT_USAGE, result.stderr
    assert_plain_error(result.stderr)
    assert "write failed (No space left on device)" in result.stderr, result.stderr
    assert _listing(result.stdout) == [], f"left on the full disk: {_listing(result.stdout)}"


def test_read_only_filesystem_exits_2_and_leaves_nothing(small_source: Path, tmp_path: Path):
    """A real EROFS: the destination folder bind-mounted read-only (private mount namespace)."""
    if not _mount_namespaces_work():
        pytest.skip("cannot bind-mount read-only here (needs unshare -m and CAP_SYS_ADMIN)")
    (tmp_path / "out").mkdir()

    result = _run_in_mount_namespace('mount --bind "$1/out" "$1/out"; mount -o remount,bind,ro "$1/out"', tmp_path, small_source)

    assert result.returncode == EXIT_USAGE, result.stderr
    assert_plain_error(result.stderr)
    assert "Read-only file system" in result.stderr and "writable directory" in result.stderr, result.stderr
    assert os.listdir(tmp_path / "out") == []


_NO_DAC = ["--bounding-set", "-dac_override,-dac_read_search", "--inh-caps", "-dac_override,-dac_read_search"]


def test_destination_folder_without_write_permission_exits_2(small_source: Path, tmp_path: Path, monkeypatch, capsys):
    """chmod 555 on the folder: refused with the folder named; as root, run the CLI without CAP_DAC_OVERRIDE."""
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    try:
        if os.geteuid() != 0:
            monkeypatch.chdir(tmp_path)
            status = main(["convert", str(small_source), "out/model_d2.pth"])
            err = capsys.readouterr().err
        else:
            if shutil.which("setpriv") is None or subprocess.run(["setpriv", *_NO_DAC, "true"], capture_output=True).returncode:
                pytest.skip("running as root: permissions are not enforced (and setpriv cannot drop CAP_DAC_OVERRIDE here)")
            result = subprocess.run(["setpriv", *_NO_DAC, *_cli("convert", str(small_source), "out/model_d2.pth")],
                                    cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=PROCESS_TIMEOUT_S)
            status, err = result.returncode, result.stderr
        assert status == EXIT_USAGE, err
        assert_plain_error(err)
        assert "cannot write in" in err and "Permission denied" in err, err
        assert os.listdir(out) == []
    finally:
        out.chmod(0o755)


# ================================================================ the folder is not there (beyond test_bad_input's plain missing folder)


@pytest.mark.parametrize("kind", ["parent-is-a-file", "parent-is-a-dangling-symlink"])
def test_destination_folder_that_is_not_a_folder_exits_2(small_source: Path, tmp_path: Path, kind: str, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    if kind == "parent-is-a-file":
        (tmp_path / "notes.txt").write_text("not a folder")
        dst = "notes.txt/model_d2.pth"
    else:
        (tmp_path / "gone").symlink_to(tmp_path / "nowhere")
        dst = "gone/model_d2.pth"

    status = main(["convert", str(small_source), dst])

    err = capsys.readouterr().err
    assert status == EXIT_USAGE, err
    assert_plain_error(err)
    assert "does not exist" in err and dst in err, err
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("source_kind", ["torch-archive", "legacy-torch-file"])
def test_destination_folder_removed_after_the_checks_exits_2(source_kind: str, small_source: Path, tmp_path: Path, monkeypatch, capsys):
    """The folder disappears between the checks and the temporary file (another process cleaning up).

    Both kinds of source (handles copied from the file, tensors read whole and written from memory)
    reach the writer's temporary file through atomic.anonymous_beside (O_TMPFILE), falling back to tempfile.mkstemp; the folder is
    removed just before the first of them.
    """
    if source_kind == "legacy-torch-file":  # read whole (tensors in memory), written by the same writers from memory
        torch.save(torch.load(small_source, weights_only=True), small_source, _use_new_zipfile_serialization=False)
    out = tmp_path / "out"
    out.mkdir()
    real_mkstemp = tempfile.mkstemp

    def remove_folder_then_mkstemp(*args, **kwargs):
        if kwargs.get("dir") and Path(kwargs["dir"]) == out and out.exists():
            out.rmdir()
        return real_mkstemp(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", remove_folder_then_mkstemp)
    real_anonymous = atomic.anonymous_beside

    def remove_folder_then_open(path, directory):
        if Path(directory) == out and out.exists():
            out.rmdir()
        return real_anonymous(path, directory)

    monkeypatch.setattr(atomic, "anonymous_beside", remove_folder_then_open)

    status = main(["convert", str(small_source), str(out / "model_d2.pth")])

    err = capsys.readouterr().err
    assert status == EXIT_USAGE, err
    assert_plain_error(err)
    assert "cannot write in" in err and "No such file or directory" in err, err
    assert not out.exists()


# ================================================================ the disk fails during the write


def test_an_io_error_on_fsync_exits_2_and_removes_the_temporary_file(small_source: Path, tmp_path: Path, monkeypatch, capsys):
    """EIO from fsync (a failing disk): 'write failed', nothing left; test_bad_input covers Ctrl-C at the same point."""
    out = tmp_path / "out"
    out.mkdir()

    def failing_fsync(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", failing_fsync)

    status = main(["convert", str(small_source), str(out / "model_d2.pth")])

    err = capsys.readouterr().err
    assert status == EXIT_USAGE, err
    assert_plain_error(err)
    assert "write failed (Input/output error)" in err, err
    assert os.listdir(out) == []


@pytest.mark.parametrize("source_kind, ext", [
    pytest.param(k, e, id=f"{k}->{e}") for k in ("torch-archive", "legacy-torch-file") for e in (".pth", ".pkl")
])
def test_a_written_file_that_does_not_read_back_is_a_verification_failure_naming_the_destination(
        small_source: Path, tmp_path: Path, source_kind: str, ext: str, monkeypatch, capsys):
    """Bytes that reach the disk corrupted (here: the last 100 bytes lost at fsync) are a verification problem about DST: exit 1."""
    if source_kind == "legacy-torch-file":  # read whole (tensors in memory), written by the same writers from memory
        torch.save(torch.load(small_source, weights_only=True), small_source, _use_new_zipfile_serialization=False)
    out = tmp_path / "out"
    out.mkdir()
    real_fsync = os.fsync

    def lose_the_tail(fd: int) -> None:  # every writer syncs its temporary file before reading it back
        size = os.fstat(fd).st_size
        if size > 100:
            os.ftruncate(fd, size - 100)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", lose_the_tail)
    dst = out / f"model_d2{ext}"

    status = main(["convert", str(small_source), str(dst)])

    err = capsys.readouterr().err
    assert os.listdir(out) == [], "nothing may be left"
    assert status == EXIT_PROBLEM, f"exit {status}:\n{err}"
    assert str(dst) in err and TEMP_PREFIX not in err, f"the message should name the destination:\n{err}"
    assert "re-download" not in err.lower(), f"the source is fine; the hint blames it:\n{err}"


@pytest.mark.parametrize("source_kind", ["torch-archive", "legacy-torch-file"])
@pytest.mark.parametrize("fault", ["ctrl-c", "chmod-not-permitted"])
def test_a_fault_right_after_the_temporary_file_is_created_leaves_nothing(
        fault: str, source_kind: str, small_source: Path, tmp_path: Path, monkeypatch, capsys):
    """The first thing done to a new *named* temporary file (setting its mode) fails: no temporary file may
    remain.  (Named: the fallback where unnamed files are unavailable, forced here; an unnamed file has
    its mode from creation and needs no chmod.)

    Ctrl-C there ends the run with 130 and nothing written.  A filesystem that refuses chmod (EPERM on
    FAT/CIFS/some FUSE mounts) may either be tolerated (the file keeps mkstemp's mode) or refused with
    a plain error; never an 'internal error', never a leftover.  (Regression: before 68fe37e the chmod
    ran outside the writers' cleanup guard and both faults left the temporary file behind.)
    """
    if source_kind == "legacy-torch-file":  # read whole (tensors in memory), written by the same writers from memory
        torch.save(torch.load(small_source, weights_only=True), small_source, _use_new_zipfile_serialization=False)
    out = tmp_path / "out"
    out.mkdir()
    dst = out / "model_d2.pth"
    real_chmod = os.chmod

    def failing_chmod(path, mode, *args, **kwargs):
        if Path(path).name.startswith(TEMP_PREFIX):
            if fault == "ctrl-c":
                raise KeyboardInterrupt
            raise OSError(errno.EPERM, os.strerror(errno.EPERM))
        return real_chmod(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "chmod", failing_chmod)
    monkeypatch.setattr(atomic, "anonymous_beside", lambda path, directory: None)

    status = main(["convert", str(small_source), str(dst)])

    err = capsys.readouterr().err
    assert temporaries(out) == [], f"left behind: {os.listdir(out)}\n{err}"
    if fault == "ctrl-c":
        assert status == EXIT_INTERRUPTED and os.listdir(out) == [], err
    elif status == EXIT_OK:
        assert torch.load(dst, map_location="cpu", weights_only=True)["model"], "tolerated chmod error, but no weights"
    else:
        assert status == EXIT_USAGE and "internal error" not in err, err
        assert_plain_error(err)
        assert os.listdir(out) == []


class _Interrupted(Exception):
    """What the CLI's SIGTERM handler raises, in miniature."""


@pytest.mark.skipif(not hasattr(os, "O_TMPFILE") or not hasattr(signal, "pthread_sigmask"), reason="Linux unnamed files only")
def test_a_signal_while_the_unnamed_file_probe_has_a_name_leaves_no_probe(tmp_path: Path, monkeypatch):
    """The one-off probe of whether unnamed files can be linked in gives a file a name for a moment; a
    SIGTERM arriving right then (the CLI raises on it) is held until the probe is gone, then delivered."""
    real_link = atomic._link_fd
    seen: List[List[str]] = []

    def link_then_signal(fd: int, target: str) -> None:
        real_link(fd, target)
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while the probe has its name
        seen.append(sorted(os.listdir(tmp_path)))

    def raise_interrupted(signum, frame):
        raise _Interrupted()

    monkeypatch.setattr(atomic, "_link_fd", link_then_signal)
    monkeypatch.setattr(atomic, "_publishable", {})
    previous = signal.signal(signal.SIGTERM, raise_interrupted)
    try:
        with pytest.raises(_Interrupted):
            atomic.anonymous_beside(str(tmp_path / "x.pth"), str(tmp_path))
    finally:
        signal.signal(signal.SIGTERM, previous)

    assert seen and seen[0] and seen[0][0].startswith(".convnext-d2-probe-"), f"the probe was not linked: {seen}"
    assert os.listdir(tmp_path) == [], f"left behind: {os.listdir(tmp_path)}"
