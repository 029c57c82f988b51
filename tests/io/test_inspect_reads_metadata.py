"""`inspect` opens a file once, and reads metadata only where big files come: a torch archive's index, a
safetensors header, the pickles of plain pickles, never the tensors' or arrays' bytes (counted by
Linux's own /proc/self/io); and of handles it tells what it tells of the same weights in a torch archive."""
from __future__ import annotations

import contextlib
import os
import pickle
import sys
from typing import Iterator, List

import pytest
import torch

from conversion import convert, read
from conversion.architecture import Architecture, canonical_shapes
from conversion.inspection import inspect_checkpoint
from conversion.synthetic import random_state_dict

from ..support.safetensors_files import refuse_mapped_safetensors_reads as _no_whole_file_reads
from ..support.safetensors_files import write_safetensors as _safetensors_file

TINY = Architecture((3, 3, 9, 3), (96, 192, 384, 768), num_classes=1000, classifier_norm=True)


def _rchar() -> int:
    """Bytes this process has read through read system calls so far (Linux's own count)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def _numpy(sd):
    return {k: v.numpy() for k, v in sd.items()}


def _save(sd, directory, kind: str) -> str:
    """`sd` in one of the readers' formats, as its own tools write it."""
    if kind == "torch-zip":
        path = os.path.join(directory, "tiny.pth")
        torch.save(sd, path)
    elif kind == "safetensors":
        path = os.path.join(directory, "tiny.safetensors")
        _safetensors_file(path, sd)
    elif kind == "torch-legacy":
        path = os.path.join(directory, "legacy.pth")
        torch.save({"model": sd, "epoch": 3}, path, _use_new_zipfile_serialization=False)
    elif kind == "tensors-pickle":  # torch tensors through plain pickle: each storage an inner legacy torch file
        path = os.path.join(directory, "tensors.pkl")
        with open(path, "wb") as f:
            pickle.dump({"model": sd, "__author__": "someone"}, f)
    elif kind.startswith("numpy-pickle"):  # numpy's own array pickles (_reconstruct + BUILD)
        path = os.path.join(directory, "numpy.pkl")
        arrays = {k: v.astype(v.dtype.newbyteorder(">")) for k, v in _numpy(sd).items()} if kind.endswith("big-endian") else _numpy(sd)
        with open(path, "wb") as f:  # pickle's default protocol, or 2 (bytes spelled as latin-1 text)
            pickle.dump({"model": arrays, "__author__": "someone"}, f, protocol=2 if kind.endswith("-2") else None)
    else:  # the model-zoo file this project writes: numpy.ndarray(shape, dtype, bytearray(payload))
        src, path = os.path.join(directory, "src.pth"), os.path.join(directory, "zoo.pkl")
        torch.save(sd, src)
        convert(src, path)
        os.remove(src)
    return path


# The path whose opens are counted, and the count: Python's audit events see every open (builtins.open,
# io.FileIO, os.open), and an audit hook cannot be removed, so one is installed, on first use.
_WATCHED: List[tuple] = []


def _audit(event: str, args: tuple) -> None:
    if event == "open" and _WATCHED and isinstance(args[0], (str, bytes, os.PathLike)) and os.fsdecode(args[0]) == _WATCHED[0][0]:
        _WATCHED[0][1].append(args[1])


@contextlib.contextmanager
def _opens_of(path: str) -> Iterator[List[str]]:
    """The modes `path` is opened with inside the block."""
    if not getattr(sys, "_convnext_d2_audit", False):
        sys.addaudithook(_audit)
        sys._convnext_d2_audit = True  # type: ignore[attr-defined]
    opens: List[str] = []
    _WATCHED.append((path, opens))
    try:
        yield opens
    finally:
        _WATCHED.clear()


FORMAT = {"torch-zip": "torch-zip", "safetensors": "safetensors", "torch-legacy": "torch-legacy",
          "numpy-pickle": "pickle", "numpy-pickle-protocol-2": "pickle", "numpy-pickle-big-endian": "pickle",
          "tensors-pickle": "pickle", "model-zoo-pkl": "pickle"}


# Read whole by design, formats nobody converts at gigabyte size (big checkpoints are zip archives,
# safetensors files or model-zoo pickles written by Python 3): legacy torch files and pickled
# tensors' inner archives; protocol 2, which spells each array's bytes as text the unpickler decodes
# as it reads the pickle; arrays in the other byte order, swapped in memory.  Memory and reads about
# the file's size, once.
READ_WHOLE = ("torch-legacy", "tensors-pickle", "numpy-pickle-protocol-2", "numpy-pickle-big-endian")


def _inspect_a_tiny_file(tmp_path, monkeypatch, kind):
    """ConvNeXt-Tiny (182 tensors, 110 MB): the metadata is what scales with the tensor count, so the
    file is a real Tiny; its values do not matter to inspect (zeros: quick to build).  Returns
    (the report, the bytes the second inspect read)."""
    sd = {name: torch.zeros(shape) for name, shape in canonical_shapes(TINY).items()}
    path = _save(sd, str(tmp_path), kind)
    del sd
    if kind == "safetensors":
        _no_whole_file_reads(monkeypatch)  # safetensors' own readers map the file, which rchar would not count
    inspect_checkpoint(path)  # first call: imports happen now, not inside the measured one
    before = _rchar()
    report = inspect_checkpoint(path)
    read = _rchar() - before
    assert report.file_bytes > 100e6 and report.format == FORMAT[kind]
    assert report.variant == "convnext_tiny" and report.parameters > 27e6
    return report, read


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="counts reads through Linux's /proc/self/io")
@pytest.mark.parametrize("kind", [kind for kind in FORMAT if kind not in READ_WHOLE])
def test_inspect_reads_under_a_mebibyte_of_a_100_mb_file(tmp_path, monkeypatch, kind):
    report, read = _inspect_a_tiny_file(tmp_path, monkeypatch, kind)
    assert read < 1 << 20, f"inspect read {read} bytes of a {report.file_bytes}-byte {kind} file"
    assert report.bytes_read is not None and report.bytes_read <= read


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="counts reads through Linux's /proc/self/io")
@pytest.mark.parametrize("kind", READ_WHOLE)
def test_inspect_reads_a_format_read_whole_once_and_says_so(tmp_path, monkeypatch, kind):
    report, read = _inspect_a_tiny_file(tmp_path, monkeypatch, kind)
    assert report.file_bytes <= read < report.file_bytes + (1 << 20), f"inspect read {read} bytes of a {report.file_bytes}-byte {kind} file"
    assert 0.9 * report.file_bytes < report.bytes_read <= read, "bytes_read counts the arrays read with the pickle"


@pytest.mark.parametrize("kind", ["torch-legacy", "numpy-pickle", "model-zoo-pkl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_inspect_of_handles_tells_what_it_tells_of_a_torch_archive(tmp_path, kind, dtype):
    sd = {k: v.to(dtype) for k, v in random_state_dict(Architecture((1, 1, 2, 1), (8, 16, 24, 32), num_classes=5, classifier_norm=True)).items()}
    path = _save(sd, str(tmp_path), kind)
    archive = str(tmp_path / "same.pth")
    if kind == "model-zoo-pkl":
        convert(path, archive)  # the same weights and names, as a torch archive
    else:
        torch.save({"model": sd, "epoch": 3} if kind == "torch-legacy" else {"model": sd, "__author__": "someone"}, archive)
    got, want = inspect_checkpoint(path).to_dict(), inspect_checkpoint(archive).to_dict()
    # What the file is read as: the same; what Detectron2's reader does with each format differs.
    for key in ("path", "file_bytes", "format", "bytes_read", "problems", "detectron2"):
        got.pop(key), want.pop(key)
    assert got == want


@pytest.mark.parametrize("kind", ["torch-zip", "safetensors", "torch-legacy", "numpy-pickle", "tensors-pickle"])
def test_inspect_opens_the_file_once_and_checks_it_once(tmp_path, monkeypatch, kind):
    """One way in: the format is sniffed from the bytes the reader opened the file for, not by
    opening it again to guess (inspect once opened a file 3-4 times and checked it 3 times)."""
    sd = random_state_dict(Architecture((1, 1, 2, 1), (8, 16, 24, 32), num_classes=5, classifier_norm=True))
    path = _save(sd, str(tmp_path), kind)
    checks: List[str] = []
    check_source = read.check_source
    monkeypatch.setattr(read, "check_source", lambda p: checks.append(p) or check_source(p))
    with _opens_of(path) as opens:
        inspect_checkpoint(path)
    assert (len(opens), len(checks)) == (1, 1), f"inspect opened the {kind} file {len(opens)} times and checked it {len(checks)} times"
