"""`inspect` reads metadata only for legacy torch files and plain pickles too: the pickles, never the
tensors' or arrays' bytes (counted by Linux's own /proc/self/io), and it tells what it tells of the
same weights in a torch archive."""
from __future__ import annotations

import os
import pickle

import pytest
import torch

from conversion import convert
from conversion.architecture import Architecture
from conversion.inspection import inspect_checkpoint
from conversion.synthetic import random_state_dict

TINY = Architecture((3, 3, 9, 3), (96, 192, 384, 768), num_classes=1000, classifier_norm=True)


def _rchar() -> int:
    """Bytes this process has read through read system calls so far (Linux's own count)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def _numpy(sd):
    return {k: v.numpy() for k, v in sd.items()}


def _save(sd, directory, kind: str) -> str:
    """`sd` in one of the handle readers' formats, as its own tools write it."""
    if kind == "torch-legacy":
        path = os.path.join(directory, "legacy.pth")
        torch.save({"model": sd, "epoch": 3}, path, _use_new_zipfile_serialization=False)
    elif kind == "numpy-pickle":  # numpy's own array pickles (_reconstruct + BUILD), pickle's default protocol
        path = os.path.join(directory, "numpy.pkl")
        with open(path, "wb") as f:
            pickle.dump({"model": _numpy(sd), "__author__": "someone"}, f)
    else:  # the model-zoo file this project writes: numpy.ndarray(shape, dtype, bytearray(payload))
        src, path = os.path.join(directory, "src.pth"), os.path.join(directory, "zoo.pkl")
        torch.save(sd, src)
        convert(src, path)
        os.remove(src)
    return path


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="counts reads through Linux's /proc/self/io")
@pytest.mark.parametrize("kind", ["torch-legacy", "numpy-pickle", "model-zoo-pkl"])
def test_inspect_reads_under_a_mebibyte_of_a_100_mb_file(tmp_path, kind):
    sd = random_state_dict(TINY)
    path = _save(sd, str(tmp_path), kind)
    del sd
    inspect_checkpoint(path)  # first call: imports happen now, not inside the measured one
    before = _rchar()
    report = inspect_checkpoint(path)
    read = _rchar() - before
    assert report.file_bytes > 100e6 and report.format == ("torch-legacy" if kind == "torch-legacy" else "pickle")
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
    for key in ("path", "file_bytes", "format", "bytes_read", "problems"):
        got.pop(key), want.pop(key)
    assert got == want
