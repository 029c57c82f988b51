"""`inspect` reads metadata only, in every format: a torch archive's index, a safetensors header, the
pickles of legacy torch files and plain pickles, never the tensors' or arrays' bytes (counted by
Linux's own /proc/self/io); and of handles it tells what it tells of the same weights in a torch archive."""
from __future__ import annotations

import os
import pickle

import pytest
import torch

from conversion import convert
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


FORMAT = {"torch-zip": "torch-zip", "safetensors": "safetensors", "torch-legacy": "torch-legacy",
          "numpy-pickle": "pickle", "numpy-pickle-protocol-2": "pickle", "numpy-pickle-big-endian": "pickle",
          "tensors-pickle": "pickle", "model-zoo-pkl": "pickle"}


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="counts reads through Linux's /proc/self/io")
@pytest.mark.parametrize("kind", list(FORMAT))
def test_inspect_reads_under_a_mebibyte_of_a_100_mb_file(tmp_path, monkeypatch, kind):
    """ConvNeXt-Tiny (182 tensors, 110 MB): the metadata is what scales with the tensor count, so the
    file is a real Tiny; its values do not matter to inspect (zeros: quick to build)."""
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
    assert read < 1 << 20, f"inspect read {read} bytes of a {report.file_bytes}-byte {kind} file"
    assert report.bytes_read is not None and report.bytes_read <= read


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
