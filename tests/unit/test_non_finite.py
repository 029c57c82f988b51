"""NaN and Inf weights: converted with a warning (where the tensors are read anyway), refused with
--strict on every path before anything is written."""
from __future__ import annotations

import pytest
import torch

from conversion.architecture import Architecture
from conversion.cli import main
from conversion.synthetic import random_state_dict

ARCH = Architecture((1, 1, 1, 1), (8, 8, 8, 8), num_classes=2, classifier_norm=True)


@pytest.fixture(params=["streamed", "loaded"])
def path_taken(request):
    """Which writer runs follows from the source: a torch zip's records are copied ("streamed"), a
    legacy torch file is read whole ("loaded")."""
    return request.param


def _source(tmp_path, dtype, poison, path_taken):
    sd = random_state_dict(ARCH, dtype=dtype)
    if poison is not None:
        sd["stages.2.0.pwconv1.weight"][3, 1] = poison
    torch.save({"model": sd}, tmp_path / "src.pth", _use_new_zipfile_serialization=path_taken == "streamed")
    return str(tmp_path / "src.pth")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
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
    assert main(["convert", src, str(tmp_path / f"out{ext}")]) == 0
    captured = capsys.readouterr()
    if path_taken == "loaded":
        assert "warning: 1 tensor(s) hold NaN or Inf: backbone.stages.2.0.pwconv1.weight" in captured.err
    else:  # a streamed copy never reads the bytes: the summary says it did not check
        assert "finite     not checked" in captured.out
    assert (tmp_path / f"out{ext}").exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_strict_accepts_finite_weights(tmp_path, capsys, path_taken, dtype):
    src = _source(tmp_path, dtype, None, path_taken)
    assert main(["convert", src, str(tmp_path / "out.pth"), "--strict", "--json"]) == 0
    assert '"non_finite": []' in capsys.readouterr().out
