"""Sources that cannot be read: special files (FIFO, symlink loop, devices, unreadable), absurd
safetensors headers, torch archives with broken records.  A special file or an absurd header is refused
with exit 2 in plain lines, without blocking, and nothing is written; a broken archive is refused or
converted faithfully.

For all of them the only outcomes allowed are a `ConversionError`, or a conversion whose output holds
exactly the tensors the (mutated) source decodes to; never another exception, never a partial output.

The files are built by `assemble.py` (the corpus and its pickle assembler); the outcome rule and its
independent decoder are `judge.py`.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import threading
import zipfile
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import pytest

from conversion.cli import main
from conversion.errors import ConversionError, UnreadableCheckpoint

from ..support import read_as_convert_does, require, require_weights_only_decoder

require_weights_only_decoder()

from ..support.cli import EXIT_USAGE, PROCESS_TIMEOUT_S, ROOT, assert_plain_error
from .judge import convert_and_judge, leftovers, valid_source


# How long a reader may take on a tiny special file before it counts as hanging.
HANG_S = 2.0


# ================================================================ special files


def _refused_by_cli_leaving_nothing(src: str, folder: Path, capsys) -> str:
    """Run `convert SRC out/model_d2.pth` in-process from `folder`; require exit 2, plain lines, nothing written."""
    out_dir = folder / "out"
    out_dir.mkdir(exist_ok=True)
    old = os.getcwd()
    os.chdir(folder)
    try:
        status = main(["convert", src, "out/model_d2.pth"])
    finally:
        os.chdir(old)
    out, err = capsys.readouterr()
    assert status == EXIT_USAGE, f"exit status {status}:\n{err}"
    assert_plain_error(err)
    assert "internal error" not in err, err
    assert leftovers(out_dir) == [], "a destination or temporary file was left"
    return err


def test_a_fifo_source_is_refused_without_blocking(tmp_path: Path):
    """A named pipe (e.g. left by a download script) is refused at once instead of hanging the CLI."""
    fifo = tmp_path / "weights.pth"
    os.mkfifo(fifo)
    result: Dict[str, BaseException] = {}

    def read() -> None:
        try:
            read_as_convert_does(str(fifo))
        except BaseException as err:  # noqa: BLE001 - recorded and judged below
            result["error"] = err

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(HANG_S)
    blocked = reader.is_alive()
    if blocked:  # release it: a writer that closes at once gives the blocked open() an end of file
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        reader.join(10)

    assert not blocked, f"reading blocked on a FIFO for more than {HANG_S} s"
    assert isinstance(result.get("error"), UnreadableCheckpoint), result


def test_a_symlink_loop_is_refused(tmp_path: Path, capsys):
    (tmp_path / "a.pth").symlink_to("b.pth")
    (tmp_path / "b.pth").symlink_to("a.pth")

    with pytest.raises(UnreadableCheckpoint):
        read_as_convert_does(str(tmp_path / "a.pth"))
    err = _refused_by_cli_leaving_nothing("a.pth", tmp_path, capsys)
    assert "a.pth" in err, err


@pytest.mark.parametrize("device", ["/dev/null", "/dev/zero"])
def test_a_character_device_is_refused(device: str, tmp_path: Path, capsys):
    """Devices read as empty or as endless zero bytes: refused, not hung, not converted."""
    if not os.path.exists(device):
        pytest.skip(f"{device} does not exist on this system")
    with pytest.raises(UnreadableCheckpoint):
        read_as_convert_does(device)
    _refused_by_cli_leaving_nothing(device, tmp_path, capsys)


def _can_drop_dac_override() -> bool:
    """As root, `setpriv` can drop CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH so that file modes apply again."""
    if shutil.which("setpriv") is None:
        return False
    probe = subprocess.run(["setpriv", *_NO_DAC, "true"], capture_output=True, timeout=30)
    return probe.returncode == 0


_NO_DAC = ["--bounding-set", "-dac_override,-dac_read_search", "--inh-caps", "-dac_override,-dac_read_search"]


def test_a_source_without_read_permission_exits_2_naming_the_cause(tmp_path: Path, capsys):
    src = tmp_path / "locked.pth"
    src.write_bytes(valid_source("pth-zip"))
    src.chmod(0)
    if os.geteuid() != 0:
        err = _refused_by_cli_leaving_nothing("locked.pth", tmp_path, capsys)
        assert "ermission" in err, err
        return
    if not _can_drop_dac_override():
        pytest.skip("running as root: permissions are not enforced (and setpriv cannot drop CAP_DAC_OVERRIDE here)")
    (tmp_path / "out").mkdir()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run(["setpriv", *_NO_DAC, sys.executable, "-m", "conversion", "convert", "locked.pth", "out/model_d2.pth"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=PROCESS_TIMEOUT_S)
    assert result.returncode == EXIT_USAGE, result.stderr
    assert_plain_error(result.stderr)
    assert "ermission denied" in result.stderr, result.stderr
    assert leftovers(tmp_path / "out") == []


# ================================================================ absurd safetensors headers


def _safetensors(header: bytes, declared: Optional[int] = None, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header) if declared is None else declared) + header + data


def _st_header(**tensors: Tuple[str, List[int], List[int]]) -> bytes:
    return json.dumps({k: {"dtype": d, "shape": s, "data_offsets": o} for k, (d, s, o) in tensors.items()}).encode()


SAFETENSORS_CASES = {
    "declared-length-2**64-1": _safetensors(b"{}", declared=2**64 - 1),
    "declared-length-just-over-the-sniffing-limit": _safetensors(b'{"a": 1}', declared=100_000_001),
    "declared-length-at-the-limit-on-a-tiny-file": _safetensors(b"{}", declared=100_000_000),
    "declared-length-beyond-the-file": _safetensors(b'{"__metadata__": {}}', declared=4096),
    "header-not-json": _safetensors(b"{not json at all}"),
    "header-is-a-list": _safetensors(b"{}"[:1] + b"]"),
    "data-offsets-beyond-the-file": _safetensors(_st_header(w=("F32", [4], [0, 1_000_000_000])), data=bytes(16)),
    "shape-product-overflows": _safetensors(_st_header(w=("F32", [2**62, 2**62], [0, 16])), data=bytes(16)),
    "shape-disagrees-with-offsets": _safetensors(_st_header(w=("F32", [8], [0, 16])), data=bytes(16)),
    "unknown-dtype": _safetensors(_st_header(w=("F99", [4], [0, 16])), data=bytes(16)),
    "overlapping-tensors": _safetensors(_st_header(a=("F32", [4], [0, 16]), b=("F32", [4], [8, 24])), data=bytes(24)),
    "negative-offsets": _safetensors(_st_header(w=("F32", [4], [-16, 0])), data=bytes(16)),
}


@pytest.mark.parametrize("name", list(SAFETENSORS_CASES))
def test_absurd_safetensors_header_is_refused(name: str, tmp_path: Path, capsys):
    """Header lengths and offsets that lie: a ConversionError, no allocation of the declared size, nothing written."""
    require("safetensors")
    src = tmp_path / "weights.safetensors"
    src.write_bytes(SAFETENSORS_CASES[name])

    with pytest.raises(ConversionError):
        read_as_convert_does(str(src))
    _refused_by_cli_leaving_nothing(src.name, tmp_path, capsys)


# ================================================================ broken torch archives


def _rewrite_zip(data: bytes, change: Callable[[str, bytes], Optional[bytes]], extra: Tuple[Tuple[str, bytes], ...] = ()) -> bytes:
    """Rebuild a zip member by member; `change(name, content)` returns new content, or None to drop it."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as zin, zipfile.ZipFile(out, "w") as zout:
        for info in zin.infolist():
            content = change(info.filename, zin.read(info))
            if content is not None:
                zout.writestr(zipfile.ZipInfo(info.filename, date_time=(1980, 1, 1, 0, 0, 0)), content)
        for name, content in extra:
            zout.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), content)
    return out.getvalue()


def _first_storage(data: bytes) -> str:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return next(n for n in z.namelist() if "/data/" in n and not n.endswith(".pkl"))


def _central_entry(data: bytes, name: str) -> int:
    """Offset of `name`'s central-directory record."""
    i = data.index(b"PK\x01\x02")
    while True:
        length = struct.unpack("<H", data[i + 28:i + 30])[0]
        if data[i + 46:i + 46 + length] == name.encode():
            return i
        i = data.index(b"PK\x01\x02", i + 4)


def _patched(data: bytes, offset: int, new: bytes) -> bytes:
    return data[:offset] + new + data[offset + len(new):]


def _archive_case(kind: str) -> bytes:
    import warnings

    data = valid_source("pth-zip")
    storage = _first_storage(data)
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        local_header = z.getinfo(storage).header_offset
    keep = lambda name, content: content  # noqa: E731
    if kind == "missing-data.pkl":
        return _rewrite_zip(data, lambda n, c: None if n.endswith("/data.pkl") else c)
    if kind == "missing-storage-record":
        return _rewrite_zip(data, lambda n, c: None if n == storage else c)
    if kind == "short-storage-record":
        return _rewrite_zip(data, lambda n, c: c[: len(c) // 2] if n == storage else c)
    if kind == "long-storage-record":
        return _rewrite_zip(data, lambda n, c: c + bytes(64) if n == storage else c)
    if kind == "missing-version":
        return _rewrite_zip(data, lambda n, c: None if n.endswith("/version") and "format" not in n else c)
    if kind == "version-999":
        return _rewrite_zip(data, lambda n, c: b"999\n" if n.endswith("/version") and "format" not in n else c)
    if kind == "byteorder-big":
        return _rewrite_zip(data, lambda n, c: b"big" if n.endswith("/byteorder") else c)
    if kind == "byteorder-nonsense":
        return _rewrite_zip(data, lambda n, c: b"middle" if n.endswith("/byteorder") else c)
    if kind == "duplicate-data.pkl":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zipfile warns about the duplicate name: that is the point
            return _rewrite_zip(data, keep, extra=((storage.rsplit("/data/", 1)[0] + "/data.pkl", pickle.dumps({"model": {}})),))
    if kind == "data.pkl-is-garbage":
        return _rewrite_zip(data, lambda n, c: b"\x80\x02garbage" if n.endswith("/data.pkl") else c)
    if kind == "central-directory-only":
        return b"PK\x03\x04" + bytes(26) + data[-22:]
    # byte-level damage that keeps the archive's layout (what a bad disk or transfer does)
    if kind == "data.pkl-crc-mismatch":  # one name changed inside data.pkl; torch itself does not check CRCs
        i = data.index(b"downsample_layers.0.0.weight")
        return _patched(data, i + 27, b"u")
    if kind == "storage-local-header-magic":
        return _patched(data, local_header, b"PK\x00\x00")
    if kind == "storage-extra-field-beyond-file":
        return _patched(data, local_header + 28, b"\xff\xff")
    if kind == "member-name-not-utf8":
        return _patched(data, data.rindex(b"/byteorder") + 1, b"\xff")
    if kind == "zip-version-needed-9.9":
        return _patched(data, _central_entry(data, data_pkl_name(data)) + 6, struct.pack("<H", 99))
    if kind == "central-directory-sizes-huge":
        entry = _central_entry(data, storage)
        return _patched(data, entry + 20, struct.pack("<II", 0xFFFFFF00, 0xFFFFFF00))
    raise ValueError(kind)


def data_pkl_name(data: bytes) -> str:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return next(n for n in z.namelist() if n.endswith("/data.pkl"))


ARCHIVE_CASES = ["missing-data.pkl", "missing-storage-record", "short-storage-record", "long-storage-record",
                 "missing-version", "version-999", "byteorder-big", "byteorder-nonsense", "duplicate-data.pkl",
                 "data.pkl-is-garbage", "central-directory-only", "data.pkl-crc-mismatch", "storage-local-header-magic",
                 "storage-extra-field-beyond-file", "member-name-not-utf8", "zip-version-needed-9.9",
                 "central-directory-sizes-huge"]
ARCHIVE_PARAMS = [pytest.param(kind, ext, id=f"{kind}->{ext}") for kind in ARCHIVE_CASES for ext in (".pth", ".pkl")]


@pytest.mark.parametrize("kind, ext", ARCHIVE_PARAMS)
def test_broken_torch_archive_is_refused_or_converted_faithfully(kind: str, ext: str, tmp_path: Path):
    """Archives with members missing, short, long, duplicated, misnamed or lying about their layout: the outcome rule."""
    src = tmp_path / "weights.pth"
    src.write_bytes(_archive_case(kind))
    (tmp_path / "out").mkdir()

    convert_and_judge(src, tmp_path / "out", ext)
