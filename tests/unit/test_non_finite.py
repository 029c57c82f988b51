"""NaN and Inf weights: converted with a warning (where the tensors are read anyway), refused with
--strict on every path before anything is written."""
from __future__ import annotations

import json

import pytest
import torch

from conversion.architecture import Architecture
from conversion.cli import main
from conversion.synthetic import random_state_dict

ARCH = Architecture((1, 1, 1, 1), (8, 8, 8, 8), num_classes=2, classifier_norm=True)


@pytest.fixture(params=["zip", "legacy", "loaded"])
def path_taken(request):
    """Whether the bytes are read follows from the leaves: a torch zip's records and a legacy torch
    file's storages are handles, copied without being read ("zip", "legacy"); numpy arrays pickled
    inside a torch zip's index are in memory already ("loaded")."""
    return request.param


def _source(tmp_path, dtype, poison, path_taken):
    sd = random_state_dict(ARCH, dtype=dtype)
    if poison is not None:
        sd["stages.2.0.pwconv1.weight"][3, 1] = poison
    if path_taken == "loaded":
        torch.save({"model": {k: v.numpy() for k, v in sd.items()}}, tmp_path / "src.pth")
    else:
        torch.save({"model": sd}, tmp_path / "src.pth", _use_new_zipfile_serialization=path_taken == "zip")
    return str(tmp_path / "src.pth")


# numpy has no bfloat16 array to pickle: bf16 weights come only as torch tensors.
_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
_PATHS_AND_DTYPES = [(p, d) for p in ("zip", "legacy", "loaded") for d in _DTYPES if not (p == "loaded" and d == torch.bfloat16)]


@pytest.mark.parametrize("path_taken,dtype", _PATHS_AND_DTYPES, ids=[f"{p}-{str(d).replace('torch.', '')}" for p, d in _PATHS_AND_DTYPES])
@pytest.mark.parametrize("poison", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("ext", [".pth", ".pkl"])
def test_strict_refuses_non_finite_weights_and_writes_nothing(tmp_path, capsys, path_taken, dtype, poison, ext):
    src = _source(tmp_path, dtype, poison, path_taken)
    assert main(["convert", src, str(tmp_path / f"out{ext}"), "--strict"]) == 2
    err = capsys.readouterr().err
    assert "NaN or Inf" in err and "backbone.stages.2.0.pwconv1.weight" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.pth"]


@pytest.mark.parametrize("ext", [".pth", ".pkl"])
def test_without_strict_non_finite_weights_convert_and_are_reported(tmp_path, capsys, path_taken, ext):
    src = _source(tmp_path, torch.float32, float("nan"), path_taken)
    assert main(["convert", src, str(tmp_path / f"out{ext}"), "--json"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    if path_taken == "loaded":
        assert "warning: 1 tensor(s) hold NaN or Inf: backbone.stages.2.0.pwconv1.weight" in captured.err
        assert report["non_finite"] == ["backbone.stages.2.0.pwconv1.weight"]
    else:  # a copy from handles never reads the bytes: the report says it did not check
        assert report["non_finite"] is None and captured.err == ""
    assert (tmp_path / f"out{ext}").exists()


_FINITE_CASES = [(p, d) for p, d in _PATHS_AND_DTYPES if d in (torch.float32, torch.bfloat16)]


@pytest.mark.parametrize("path_taken,dtype", _FINITE_CASES, ids=[f"{p}-{str(d).replace('torch.', '')}" for p, d in _FINITE_CASES])
def test_strict_accepts_finite_weights(tmp_path, capsys, path_taken, dtype):
    src = _source(tmp_path, dtype, None, path_taken)
    assert main(["convert", src, str(tmp_path / "out.pth"), "--strict", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["non_finite"] == []
