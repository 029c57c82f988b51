"""Writing tensors held in memory (`conversion.write.encode`, what `conversion.testing` writes its
Detectron2 files with): the extension picks the format, and the bytes load anywhere Detectron2
runs.  (Atomicity and the read-back are the converter's: tests/io/test_read_back.py,
test_atomic_fallbacks.py, test_faults.py.)"""
from __future__ import annotations

import os
import pickle
import pickletools

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conversion import convert
from conversion.architecture import Architecture
from conversion.errors import DestinationError
from conversion.synthetic import random_state_dict
from conversion.write import AUTHOR, encode, output_format

from .. import strategies as S
from ..support import TORCH_HAS_WEIGHTS_ONLY, torch_load_weights_only, written_tensors

SMALL = Architecture((1, 1, 2, 1), (4, 8, 4, 8))
SD = {"backbone." + k: v for k, v in random_state_dict(SMALL, seed=5).items()}


def _globals_in_pickle(data: bytes):
    """Every (module, name) a pickle asks the unpickler to import."""
    found, strings = set(), []
    for op, arg, _ in pickletools.genops(data):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            strings.append(arg)
        elif op.name == "STACK_GLOBAL":
            found.add((strings[-2], strings[-1]))
        elif op.name == "GLOBAL":
            found.add(tuple(arg.split(" ", 1)))
    return found


@pytest.mark.parametrize("path,fmt", [("a.pth", "torch"), ("a.pt", "torch"), ("A.PTH", "torch"), ("a.pkl", "pickle")])
def test_extension_picks_the_format(path, fmt):
    assert output_format(path) == fmt


@pytest.mark.parametrize("path", ["a.bin", "a.safetensors", "a", "a.pyth", "a.pkl.tmp"])
def test_other_extensions_are_refused_with_the_choices(path):
    with pytest.raises(DestinationError, match="unsupported destination extension") as err:
        output_format(path)
    assert ".pth" in err.value.hint and ".pkl" in err.value.hint


def test_pkl_names_only_numpy_ndarray_and_bytearray():
    """The .pkl spells arrays as numpy.ndarray(shape, dtype, bytearray): readable by numpy 1.x and 2.x alike."""
    assert _globals_in_pickle(encode(SD, "pickle")) == {("numpy", "ndarray"), ("builtins", "bytearray")}


def test_pkl_loads_with_plain_pickle_into_writable_arrays():
    data = pickle.loads(encode(SD, "pickle"), encoding="latin1")
    assert data["__author__"] == AUTHOR and list(data["model"]) == list(SD)
    for name, arr in data["model"].items():
        assert isinstance(arr, np.ndarray) and arr.flags.writeable, name
        assert torch.equal(torch.from_numpy(arr), SD[name]), name


@pytest.mark.skipif(not TORCH_HAS_WEIGHTS_ONLY, reason="this torch has no weights_only mode (torch < 1.13)")
def test_pth_loads_under_weights_only_with_no_allowlist(tmp_path):
    """Only tensors and plain containers: torch >= 2.6 defaults (what Detectron2 gets) read it."""
    (tmp_path / "a.pth").write_bytes(encode(SD, "torch"))
    data = torch.load(tmp_path / "a.pth", weights_only=True)
    assert set(data) == {"model", "__author__"} and all(torch.equal(data["model"][k], SD[k]) for k in SD)


@given(S.dtypes(), st.sampled_from([".pth", ".pkl"]))
def test_dtypes_are_kept_except_bfloat16_in_pkl(dtype, ext):
    """fp32/fp16/fp64 survive both formats bit for bit; bf16 survives .pth and becomes exact fp32 in .pkl."""
    import tempfile

    sd = {k: v.to(dtype) for k, v in SD.items()}
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(sd, os.path.join(tmp, "src.pth"))
        report = convert(os.path.join(tmp, "src.pth"), os.path.join(tmp, "out" + ext))
        model = written_tensors(os.path.join(tmp, "out" + ext))  # decoded by torch / pickle, not conversion.read
    expect = torch.float32 if (dtype == torch.bfloat16 and ext == ".pkl") else dtype
    for name, tensor in sd.items():
        got = model[name]
        assert got.dtype == expect and torch.equal(got, tensor.to(expect)), name
    assert report.stored_as == ({"bfloat16": "float32"} if expect != dtype else {})


@pytest.mark.parametrize("fmt", ["torch", "pickle"])
def test_same_input_gives_the_same_bytes(fmt):
    assert encode(SD, fmt) == encode(dict(SD), fmt)


def test_views_are_written_compactly():
    """A tensor that is a view into a larger storage is written as its own bytes only."""
    big = torch.randn(1000, 1000)
    assert len(encode({"w": big[0, :4]}, "torch")) < 10_000


def test_nan_weights_are_written(tmp_path):
    """NaN is data too: written as it is, in both formats."""
    sd = dict(SD)
    name = next(iter(sd))
    sd[name] = torch.full_like(sd[name], float("nan"))
    (tmp_path / "nan.pth").write_bytes(encode(sd, "torch"))
    assert torch.isnan(torch_load_weights_only(tmp_path / "nan.pth")["model"][name]).all()
    assert np.isnan(pickle.loads(encode(sd, "pickle"), encoding="latin1")["model"][name]).all()
