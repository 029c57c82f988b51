"""Writing: the extension picks the format, the file loads anywhere Detectron2 runs, and a failed
write leaves nothing behind."""
from __future__ import annotations

import os
import pickle
import pickletools
import stat

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conversion import convert
from conversion.architecture import Architecture
from conversion.errors import DestinationError, VerificationFailed
from conversion.synthetic import random_state_dict
from conversion.write import AUTHOR, encode, output_format, write_checkpoint

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
    write_checkpoint(str(tmp_path / "a.pth"), SD)
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


def test_views_are_written_compactly(tmp_path):
    """A tensor that is a view into a larger storage is written as its own bytes only."""
    big = torch.randn(1000, 1000)
    write_checkpoint(str(tmp_path / "a.pth"), {"w": big[0, :4]})
    assert os.path.getsize(tmp_path / "a.pth") < 10_000


def test_written_file_has_ordinary_permissions(tmp_path):
    write_checkpoint(str(tmp_path / "a.pth"), SD)
    mode = stat.S_IMODE(os.stat(tmp_path / "a.pth").st_mode)
    assert mode & stat.S_IRGRP, f"mode {oct(mode)}: a temp file's 0600 leaked into the output"


def test_existing_destination_needs_force(tmp_path):
    dst = tmp_path / "a.pth"
    dst.write_bytes(b"keep me")
    with pytest.raises(DestinationError, match="exists"):
        write_checkpoint(str(dst), SD)
    assert dst.read_bytes() == b"keep me"
    write_checkpoint(str(dst), SD, force=True)
    assert torch_load_weights_only(dst)["__author__"] == AUTHOR


def test_a_failed_read_back_leaves_no_file_at_all(tmp_path, monkeypatch):
    """If the read-back check fails, neither the destination nor a temporary file remains."""
    import conversion.write as write

    def corrupt(path, *args, **kwargs):
        raise VerificationFailed(f"{path}: simulated mismatch", "")

    monkeypatch.setattr(write, "_check_written", corrupt)
    with pytest.raises(VerificationFailed):
        write_checkpoint(str(tmp_path / "a.pth"), SD)
    assert os.listdir(tmp_path) == []


def test_a_failed_read_back_leaves_an_existing_destination_untouched(tmp_path, monkeypatch):
    import conversion.write as write

    dst = tmp_path / "a.pkl"
    dst.write_bytes(b"previous")
    monkeypatch.setattr(write, "_check_written", lambda *a, **k: (_ for _ in ()).throw(VerificationFailed("x", "")))
    with pytest.raises(VerificationFailed):
        write_checkpoint(str(dst), SD, force=True)
    assert dst.read_bytes() == b"previous" and os.listdir(tmp_path) == ["a.pkl"]


def test_read_back_catches_a_changed_tensor(tmp_path, monkeypatch):
    """The read-back is a real comparison: bytes that decode to other values are caught."""
    import conversion.write as write

    real_encode = write.encode

    def flip_one_value(state_dict, fmt):
        changed = dict(state_dict)
        name = next(iter(changed))
        changed[name] = changed[name] + 1
        return real_encode(changed, fmt)

    monkeypatch.setattr(write, "encode", flip_one_value)
    with pytest.raises(VerificationFailed, match="differ after reading back"):
        write_checkpoint(str(tmp_path / "a.pth"), SD)
    assert os.listdir(tmp_path) == []


def test_nan_weights_are_written_and_verified(tmp_path):
    """NaN is data too: the read-back treats NaN as equal to NaN instead of failing the conversion."""
    sd = dict(SD)
    name = next(iter(sd))
    sd[name] = torch.full_like(sd[name], float("nan"))
    write_checkpoint(str(tmp_path / "nan.pth"), sd)
    assert torch.isnan(torch_load_weights_only(tmp_path / "nan.pth")["model"][name]).all()
