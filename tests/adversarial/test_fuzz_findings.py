"""What the fuzzer (tests/fuzz) and the probes beside it found, one test per kind, each through the
real CLI: every one of these broke a promise before its fix (an internal error, a wrong exit
status, a file left behind, an output torch could not load, memory out of proportion).

The inputs are built here from valid files, changed in the one place the finding was; the minimised
inputs the fuzzer itself flagged are replayed by test_corpus.py.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import struct
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pytest
import torch

from conversion.architecture import Architecture
from conversion.cli import main
from conversion.errors import UnreadableCheckpoint
from conversion.io import safe_pickle
from conversion.read import open_source
from conversion.synthetic import random_state_dict

from ..support.cli import EXIT_OK, EXIT_USAGE, assert_plain_error, run_in_process
from ..support import require, torch_load_weights_only

SMALL = Architecture(depths=(1, 1, 1, 1), dims=(4, 4, 4, 4))
ZERO_WIDTH = Architecture(depths=(1, 1, 1, 1), dims=(4, 0, 4, 4))  # stage 1 has no channels
SURROGATE = "\ud800"  # a lone surrogate: a str Python holds, and no encoding can write


def _torch_file(obj: object, legacy: bool = False) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()


def _folders(tmp_path: Path) -> Tuple[Path, Path]:
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    return tmp_path / "in", tmp_path / "out"


class Run:
    """One run of the CLI, in this process (pytest's stdout capture encodes strictly, as a pipe does)."""

    def __init__(self, *args: object, cwd: Path, capsys: pytest.CaptureFixture) -> None:
        self.returncode, self.stdout, self.stderr = run_in_process(*args, cwd=cwd, capsys=capsys)


def _refused_leaving_nothing(result: Run, out: Path) -> None:
    assert result.returncode == EXIT_USAGE, result.stderr
    assert "internal error" not in result.stderr
    assert_plain_error(result.stderr)
    assert sorted(os.listdir(out)) == []


def _zip_members(data: bytes) -> List[Tuple[str, bytes]]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return [(info.filename, archive.read(info)) for info in archive.infolist()]


def _rezip(members: List[Tuple[str, bytes]], method: int = zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as archive:
        for name, content in members:
            archive.writestr(name, content)
    return buf.getvalue()


# ================================================================ safetensors headers


def _safetensors_with_header(change) -> bytes:
    require("safetensors")
    from safetensors.torch import save

    data = save(random_state_dict(SMALL, seed=1))
    n = int.from_bytes(data[:8], "little")
    header = change(json.loads(data[8:8 + n]))
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + data[8 + n:]


def _nested_too_deep(header: Dict) -> bytes:
    depth = 100_000  # json's C parser recurses once a level: Python's recursion limit ends it
    return json.dumps(header).encode()[:-1] + b', "x": ' + b"[" * depth + b"]" * depth + b"}"


def _dtype(value: object):
    def change(header: Dict) -> Dict:
        name = next(k for k in header if k != "__metadata__")
        header[name]["dtype"] = value
        return header

    return change


@pytest.mark.parametrize("change", [_nested_too_deep, _dtype(["F32"]), _dtype({"F32": 1}), _dtype(4)],
                         ids=["nested-100000-deep", "dtype-a-list", "dtype-an-object", "dtype-a-number"])
@pytest.mark.parametrize("command", ["inspect", "convert"])
def test_a_safetensors_header_the_reader_cannot_vouch_for_is_refused_plainly(change, command, tmp_path, capsys):
    """Before: RecursionError (the JSON parse unguarded) and TypeError: unhashable type (a dtype
    looked up in a dict before its type was checked), both as "internal error"."""
    src_dir, out = _folders(tmp_path)
    src = src_dir / "model.safetensors"
    src.write_bytes(_safetensors_with_header(change))
    args = [command, src] + ([out / "model_d2.pth"] if command == "convert" else [])
    _refused_leaving_nothing(Run(*args, cwd=tmp_path, capsys=capsys), out)


# ================================================================ torch archives


def _deflated_archive_with_flags(flags: int, where: str) -> bytes:
    """A torch archive rewritten deflated, `flags` set on its storage records' directory entries
    (or local headers): the records read only when converting, not when the index is."""
    data = bytearray(_rezip(_zip_members(_torch_file({"model": random_state_dict(SMALL, seed=2)})), zipfile.ZIP_DEFLATED))
    signature, offset = (b"PK\x01\x02", 8) if where == "directory" else (b"PK\x03\x04", 6)
    name_at = {"directory": 46, "local": 30}[where]
    at = data.find(signature)
    while at >= 0:
        name_len = struct.unpack_from("<H", data, at + name_at - 18 if where == "directory" else at + 26)[0]
        name = bytes(data[at + name_at:at + name_at + name_len])
        if b"/data/" in name:
            struct.pack_into("<H", data, at + offset, flags)
        at = data.find(signature, at + 4)
    return bytes(data)


@pytest.mark.parametrize("where", ["directory", "local"])
@pytest.mark.parametrize("flags", [0x20, 0x40], ids=["compressed-patched-data", "strong-encryption"])
@pytest.mark.parametrize("ext", [".pth", ".pkl"])
def test_zip_flags_torch_reader_refuses_are_refused_before_any_record_is_read(where, flags, ext, tmp_path, capsys):
    """Before: "internal error: NotImplementedError: compressed patched data (flag bit 5)" when a
    deflated storage record was read, after the index had been accepted."""
    src_dir, out = _folders(tmp_path)
    src = src_dir / "model.pth"
    src.write_bytes(_deflated_archive_with_flags(flags, where))
    _refused_leaving_nothing(Run("convert", src, out / f"model_d2{ext}", cwd=tmp_path, capsys=capsys), out)


def _with_directory_attribute(data: bytes, record: bytes) -> bytes:
    """`data` (a torch archive) with the MS-DOS directory bit set in `record`'s central directory entry."""
    out = bytearray(data)
    at = out.find(b"PK\x01\x02")
    while at >= 0:
        name_len = struct.unpack_from("<H", out, at + 28)[0]
        if bytes(out[at + 46:at + 46 + name_len]).endswith(record):
            struct.pack_into("<I", out, at + 38, struct.unpack_from("<I", out, at + 38)[0] | 0x10)
        at = out.find(b"PK\x01\x02", at + 4)
    return bytes(out)


@pytest.mark.parametrize("ext", [".pth", ".pkl"])
def test_a_record_torch_reads_as_a_directory_is_refused_not_copied(ext, tmp_path, capsys):
    """Before: the fuzzer's torch-mmap-and-plain-reads-differ input converted (exit 0) with the
    record's bytes, while torch's reader (miniz) takes an entry whose external attributes carry the
    MS-DOS directory bit for a directory, fills nothing, and `torch.load` gives whatever memory held
    (zeros, or bytes found nowhere in the file): the output could not equal what torch reads."""
    ones = {"w": torch.ones(64, 64)}
    src_dir, out = _folders(tmp_path)
    src = src_dir / "model.pth"
    src.write_bytes(_with_directory_attribute(_torch_file(ones), b"/data/0"))
    with zipfile.ZipFile(src) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("/data/0"))
        stored = archive.open(info).read()  # Python's zipfile reads the record regardless
    record = bytes(torch._C.PyTorchFileReader(str(src)).get_record("data/0"))
    assert len(record) == len(stored) and record != stored, "torch read the record after all: the refusal has no reason"
    _refused_leaving_nothing(Run("convert", src, out / f"model_d2{ext}", cwd=tmp_path, capsys=capsys), out)
    assert "marked as a directory" in Run("inspect", src, cwd=tmp_path, capsys=capsys).stderr


@pytest.mark.parametrize("record, value", [
    (".data/serialization_id", b"\xff\xfe not utf-8"),
    (".storage_alignment", b"6\x7f\xff\xff\xff"),
    (".storage_alignment", b"abc"),
    (".format_version", b"x"),
])
def test_the_small_records_of_a_written_archive_are_torch_own_whatever_the_source_held(record, value, tmp_path, capsys):
    """Before: the source's records were copied as they were, and torch.load of the output failed
    (ValueError: invalid literal for int(), UnicodeDecodeError) after convert had exited 0."""
    src_dir, out = _folders(tmp_path)
    members = [(name, value if name.endswith("/" + record) else content)
               for name, content in _zip_members(_torch_file({"model": random_state_dict(SMALL, seed=3)}))]
    if not any(name.endswith("/" + record) for name, _ in members):
        members.append((members[0][0].split("/")[0] + "/" + record, value))
    src = src_dir / "model.pth"
    src.write_bytes(_rezip(members))
    dst = out / "model_d2.pth"
    result = Run("convert", src, dst, cwd=tmp_path, capsys=capsys)
    assert result.returncode == EXIT_OK, result.stderr
    written = torch_load_weights_only(dst)["model"]
    assert sorted(written) == sorted("backbone." + k for k in random_state_dict(SMALL, seed=3))


# ================================================================ zero-element tensors and arrays


@pytest.fixture(scope="module")
def zero_width() -> Dict[str, torch.Tensor]:
    sd = random_state_dict(ZERO_WIDTH, seed=4)
    assert any(v.numel() == 0 for v in sd.values())
    return sd


def _written(dst: Path) -> Dict[str, torch.Tensor]:
    if dst.suffix == ".pkl":
        with open(dst, "rb") as f:
            return {k: torch.from_numpy(v) for k, v in pickle.load(f)["model"].items()}
    return torch_load_weights_only(dst)["model"]


def _zero_width_source(source: str, sd: Dict[str, torch.Tensor], folder: Path) -> Path:
    if source == "torch-zip":
        (folder / "model.pth").write_bytes(_torch_file({"model": sd}))
    elif source == "torch-legacy":
        (folder / "model.pth").write_bytes(_torch_file({"model": sd}, legacy=True))
    elif source == "model-zoo-pkl":
        (folder / "model.pkl").write_bytes(pickle.dumps({"model": {k: v.numpy() for k, v in sd.items()}, "__author__": "x"}, protocol=2))
    elif source == "pickled-tensors":
        (folder / "model.pkl").write_bytes(pickle.dumps({"model": sd}, protocol=4))
    else:
        from safetensors.torch import save

        (folder / "model.safetensors").write_bytes(save(dict(sd)))
    return next(folder.iterdir())


@pytest.mark.parametrize("source", ["torch-zip", "torch-legacy", "model-zoo-pkl", "pickled-tensors", "safetensors"])
@pytest.mark.parametrize("ext", [".pkl", ".pth"])
def test_a_zero_width_stage_converts_with_its_empty_tensors_as_they_are(zero_width, source, ext, tmp_path, capsys):
    """Before: convert to .pkl exited 1 ("written pickle does not read back ... report this as a
    bug": an empty record had no range to read back), and a .pkl source of zero-size arrays was
    refused as "larger than its data" (the element count stopped at the dimensions before the 0)."""
    if source == "safetensors":
        require("safetensors")
    src_dir, out = _folders(tmp_path)
    src = _zero_width_source(source, zero_width, src_dir)
    dst = out / f"model_d2{ext}"
    result = Run("convert", src, dst, cwd=tmp_path, capsys=capsys)
    assert result.returncode == EXIT_OK, result.stderr
    written = _written(dst)
    assert sorted(written) == sorted("backbone." + k for k in zero_width)
    for name, value in zero_width.items():
        assert written["backbone." + name].shape == value.shape and torch.equal(written["backbone." + name], value), name
    assert Run("inspect", src, cwd=tmp_path, capsys=capsys).returncode == EXIT_OK


# ================================================================ what is printed


@pytest.mark.parametrize("ext", [".pth", ".pkl"])
def test_a_lone_surrogate_in_a_detector_part_name_is_printed_escaped_and_the_file_kept(ext, tmp_path, capsys):
    """Before: convert wrote the file, then printing the report raised UnicodeEncodeError: "internal
    error", exit 2, and the destination left on disk."""
    src_dir, out = _folders(tmp_path)
    model = {"backbone." + k: v for k, v in random_state_dict(SMALL, seed=5).items()}
    model[f"roi_heads{SURROGATE}.box.weight"] = torch.zeros(2)
    src = src_dir / "model.pth"
    src.write_bytes(_torch_file({"model": model}))
    dst = out / f"model_d2{ext}"
    result = Run("convert", src, dst, cwd=tmp_path, capsys=capsys)
    assert result.returncode == EXIT_OK, result.stderr
    assert "roi_heads\\ud800" in result.stdout
    assert sorted(os.listdir(out)) == [dst.name]
    assert len(_written(dst)) == len(model) - 1


def test_a_lone_surrogate_in_a_top_level_key_is_printed_escaped_by_inspect(tmp_path, capsys):
    """Before: "internal error: UnicodeEncodeError" when inspect printed the container's keys."""
    src_dir, _ = _folders(tmp_path)
    src = src_dir / "model.pth"
    src.write_bytes(_torch_file({"model": random_state_dict(SMALL, seed=6), SURROGATE: 1}))
    result = Run("inspect", src, cwd=tmp_path, capsys=capsys)
    assert result.returncode == EXIT_OK, result.stderr
    assert "\\ud800" in result.stdout


def test_an_error_quoting_a_name_with_line_breaks_stays_two_lines(tmp_path, capsys):
    """Before: a str from the file quoted in the error (here one the pickle calls) printed its
    newlines, and the error ran to as many lines as the name had."""
    src_dir, out = _folders(tmp_path)
    name = "line one\nline two\nline three\x1b[31m"
    src = src_dir / "model.pkl"
    src.write_bytes(b"\x80\x02X" + struct.pack("<I", len(name)) + name.encode() + b")R.")
    result = Run("convert", src, out / "model_d2.pth", cwd=tmp_path, capsys=capsys)
    _refused_leaving_nothing(result, out)
    assert "line one\\nline two" in result.stderr and "\x1b" not in result.stderr


class _FailingStdout(io.TextIOWrapper):
    """A stdout whose device fails every write (a full disk, a dead terminal)."""

    def __init__(self) -> None:
        super().__init__(io.BytesIO(), encoding="utf-8")

    def write(self, text: str) -> int:
        raise OSError(5, "Input/output error")


def test_a_report_that_cannot_be_printed_leaves_no_destination(tmp_path, monkeypatch, capsys):
    """The promise behind the surrogate fix: an error exit leaves nothing, even when the file was
    already written when printing failed."""
    src_dir, out = _folders(tmp_path)
    src = src_dir / "model.pth"
    src.write_bytes(_torch_file({"model": random_state_dict(SMALL, seed=7)}))
    monkeypatch.setattr(sys, "stdout", _FailingStdout())
    status = main(["convert", str(src), str(out / "model_d2.pth")])
    monkeypatch.undo()
    assert status == EXIT_USAGE
    assert sorted(os.listdir(out)) == []
    err = capsys.readouterr().err
    assert "internal error" not in err and "could not be printed" in err


# ================================================================ special files


@pytest.mark.skipif(not os.path.exists("/proc/self/mem"), reason="Linux's /proc/self/mem: a regular file whose reads fail (EIO)")
@pytest.mark.parametrize("command", ["inspect", "convert"])
def test_a_special_file_whose_reads_fail_is_a_clear_error(command, tmp_path, capsys):
    """Before: "internal error: OSError: [Errno 5] Input/output error" (the safetensors sniff read it unguarded)."""
    _, out = _folders(tmp_path)
    args = [command, "/proc/self/mem"] + ([out / "model_d2.pth"] if command == "convert" else [])
    result = Run(*args, cwd=tmp_path, capsys=capsys)
    _refused_leaving_nothing(result, out)
    assert "cannot read (Input/output error)" in result.stderr


# ================================================================ one budget per file


# The file below, at MAX_OBJECTS scale (900,000 sets per pickle, two inner archives, 5 MB): 720 MB
# peak and 49 s before the fix (each nested unpickler counted a million objects of its own), 326 MB
# and refused after the first million objects with it (docs/design.md, safety).  Here at 1/100 scale.
OBJECTS_BOUND = 10_000
SETS_PER_PICKLE = 9_000  # under the bound: each pickle alone is within it
NESTED_ARCHIVES = 3


def _empty_sets(n: int) -> bytes:
    return b"(" + b"\x8f0" * n + b"1"  # MARK, n x (EMPTY_SET, POP), POP_MARK: builds n objects, keeps none


def _legacy_storage_with_sets(n: int) -> bytes:
    """A legacy torch file of one float storage whose main pickle builds `n` empty sets first."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage is deprecated; it is what pickling a tensor saves
        inner = _torch_file(torch.zeros(1).storage(), legacy=True)
    parts, rest = [], inner
    for _ in range(4):  # magic, protocol, sys_info: then the main pickle
        end = _pickle_end(rest)
        parts.append(rest[:end])
        rest = rest[end:]
    main_pickle = parts[3]
    parts[3] = main_pickle[:2] + _empty_sets(n) + main_pickle[2:]
    return b"".join(parts) + rest


def _pickle_end(data: bytes) -> int:
    import pickletools

    for opcode, _, pos in pickletools.genops(io.BytesIO(data)):
        if opcode.name == "STOP":
            return pos + 1
    raise ValueError("no STOP")


def _short_text(text: str) -> bytes:
    return b"\x8c" + bytes([len(text)]) + text.encode()  # SHORT_BINUNICODE


def sets_around_pickled_tensors(sets: int = SETS_PER_PICKLE, archives: int = NESTED_ARCHIVES) -> bytes:
    """A .pkl whose tensors (torch.storage._load_from_bytes) each hold an inner legacy archive of
    empty sets, the outer pickle holding as many: every unpickler alone is within the bound."""
    inner = _legacy_storage_with_sets(sets)
    out = bytearray(b"\x80\x04" + _empty_sets(sets) + b"]")  # PROTO 4, the sets, EMPTY_LIST
    for _ in range(archives):
        out += _short_text("torch.storage") + _short_text("_load_from_bytes") + b"\x93B" + struct.pack("<I", len(inner)) + inner + b"\x85Ra"
    return bytes(out) + b"."


def test_nested_unpicklers_share_the_source_file_object_budget(tmp_path, monkeypatch):
    """Before: each inner archive's unpickler had an object budget of its own, so nesting
    multiplied what a file could build (the file was read whole, then refused for holding a list)."""
    monkeypatch.setattr(safe_pickle, "MAX_OBJECTS", OBJECTS_BOUND)
    src = tmp_path / "sets.pkl"
    src.write_bytes(sets_around_pickled_tensors())
    with pytest.raises(UnreadableCheckpoint, match=f"build more than {OBJECTS_BOUND} objects"):
        open_source(str(src))
