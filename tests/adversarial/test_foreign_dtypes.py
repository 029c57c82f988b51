"""Foreign dtypes and tensor kinds (numpy object, string, structured and datetime arrays; torch
integer, boolean, complex, float8, sparse and meta tensors), NaN and Inf bit patterns, and legitimate
files this suite once found mishandled (its regressions).

For all of them the only outcomes allowed are a `ConversionError`, or a conversion whose output holds
exactly the tensors the (mutated) source decodes to; never another exception, never a partial output.

The files are built by `assemble.py` (the corpus and its pickle assembler); the outcome rule and its
independent decoder are `judge.py`.
"""
from __future__ import annotations

import pickle
import pickletools
import struct
from pathlib import Path
from typing import Any, Dict, Tuple

import numpy as np
import pytest
import torch

from conversion import convert
from conversion.errors import ConversionError, UnreadableCheckpoint

from ..support import require_weights_only_decoder

require_weights_only_decoder()

from .assemble import call, global_, small_int, text, torch_bytes, tuple_
from .judge import convert_and_judge, leftovers, read_output, same_bits, suffix, tiny_state_dict


# ================================================================ foreign dtypes and values


def _with_one_tensor(value: Any, as_numpy: bool = False) -> Dict[str, Any]:
    sd: Dict[str, Any] = {k: (v.numpy() if as_numpy else v) for k, v in tiny_state_dict().items()}
    sd["stages.0.0.dwconv.weight"] = value
    return sd


_DWCONV_SHAPE = (4, 1, 7, 7)


def _foreign(name: str, container: str) -> Tuple[bytes, str]:
    """(file bytes, suffix) of an official checkpoint whose one tensor has a foreign dtype or kind."""
    zeros = np.zeros(_DWCONV_SHAPE, dtype=np.float32)
    numpy_cases = {
        "numpy-object": lambda: zeros.astype(object),
        "numpy-str": lambda: zeros.astype(str),
        "numpy-bytes": lambda: zeros.astype("S4"),
        "numpy-structured": lambda: np.zeros(_DWCONV_SHAPE, dtype=[("a", "<f4")]),
        "numpy-datetime64": lambda: np.zeros(_DWCONV_SHAPE, dtype="M8[s]"),
        "numpy-longdouble": lambda: zeros.astype(np.longdouble),
        "numpy-big-endian": lambda: zeros.astype(">f4"),
    }
    base = torch.zeros(_DWCONV_SHAPE)
    torch_cases = {
        "torch-int64": lambda: base.long(),
        "torch-bool": lambda: base.bool(),
        "torch-complex64": lambda: base.to(torch.complex64),
        "torch-uint16": lambda: base.to(torch.uint16),
        "torch-float8": lambda: base.to(torch.float8_e4m3fn),
        "torch-sparse": lambda: base.to_sparse(),
        "torch-meta": lambda: base.to("meta"),
        "torch-parameter": lambda: torch.nn.Parameter(base),
        "torch-non-contiguous-view": lambda: torch.zeros(7, 7, 1, 4).permute(3, 2, 0, 1),
    }
    if container == "pickle":
        return pickle.dumps({"model": _with_one_tensor(numpy_cases[name](), as_numpy=True)}, protocol=4), ".pkl"
    value = numpy_cases[name]() if name in numpy_cases else torch_cases[name]()
    return torch_bytes({"model": _with_one_tensor(value)}, legacy=(container == "torch-legacy")), ".pth"


_NUMPY_FOREIGN = ["numpy-object", "numpy-str", "numpy-bytes", "numpy-structured", "numpy-datetime64", "numpy-longdouble",
                  "numpy-big-endian"]
_TORCH_FOREIGN = ["torch-int64", "torch-bool", "torch-complex64", "torch-uint16", "torch-float8", "torch-sparse", "torch-meta",
                  "torch-parameter", "torch-non-contiguous-view"]
FOREIGN_CASES = [
    pytest.param(case, container, ext, id=f"{case}@{container}->{ext}")
    for case, containers in [*((c, ("pickle",)) for c in _NUMPY_FOREIGN), ("numpy-longdouble", ("torch-zip",)),
                             *((c, ("torch-zip", "torch-legacy")) for c in _TORCH_FOREIGN)]
    for container in containers
    for ext in (".pth", ".pkl")
]


@pytest.mark.parametrize("case, container, ext", FOREIGN_CASES)
def test_foreign_dtype_or_tensor_kind_is_refused_or_converted_faithfully(case: str, container: str, ext: str, tmp_path: Path):
    """Object/str/structured arrays, float8, complex, sparse and meta tensors: a ConversionError or an exact output."""
    data, suffix = _foreign(case, container)
    src = tmp_path / f"weights{suffix}"
    src.write_bytes(data)
    (tmp_path / "out").mkdir()

    convert_and_judge(src, tmp_path / "out", ext)


# Bit patterns that a careless copy would change: NaN payloads and signs, signalling NaN, infinities, -0.0, subnormals.
_SPECIAL_BITS = {
    torch.float32: (torch.int32, [0x7FC00000, 0x7FC00001, 0x7F800001, -0x400000, 0x7F800000, -0x800000, -0x80000000, 0x00000001]),
    torch.float64: (torch.int64, [0x7FF8000000000000, 0x7FF0000000000001, -0x8000000000000, 0x7FF0000000000000,
                                  -0x10000000000000, -0x8000000000000000, 0x0000000000000001, 0x7FF800000000BEEF]),
    torch.float16: (torch.int16, [0x7E00, 0x7C01, -0x200, 0x7C00, -0x400, -0x8000, 0x0001, 0x7E55]),
    torch.bfloat16: (torch.int16, [0x7FC0, 0x7F81, -0x40, 0x7F80, -0x80, -0x8000, 0x0001, 0x7FD5]),
}


@pytest.mark.parametrize("ext", [".pth", ".pkl"])
@pytest.mark.parametrize("dtype", list(_SPECIAL_BITS), ids=lambda d: str(d).replace("torch.", ""))
def test_nan_and_inf_convert_and_survive_bit_exactly(dtype: torch.dtype, ext: str, tmp_path: Path):
    """Without --strict, non-finite weights convert, and every NaN payload, infinity and -0.0 is kept."""
    int_dtype, bits = _SPECIAL_BITS[dtype]
    n = int(np.prod(_DWCONV_SHAPE))
    pattern = torch.tensor((bits * n)[:n], dtype=int_dtype).view(dtype).reshape(_DWCONV_SHAPE)
    sd = {k: v.to(dtype) for k, v in tiny_state_dict().items()}
    sd["stages.0.0.dwconv.weight"] = pattern
    src = tmp_path / "weights.pth"
    torch.save({"model": sd}, src)
    (tmp_path / "out").mkdir()

    assert convert_and_judge(src, tmp_path / "out", ext) == "converted"
    got = read_output(tmp_path / "out" / f"model_d2{ext}")["backbone.stages.0.0.dwconv.weight"]
    want = pattern.float() if (ext == ".pkl" and dtype == torch.bfloat16) else pattern
    assert same_bits(got, want), "a NaN payload, an infinity or -0.0 changed on the way"
    assert torch.isnan(got).any() and torch.isinf(got).any()


# ================================================================ legitimate files mishandled (regressions found here)


def _patch_first_storage_offset(pickled_tensors: bytes, offset: int) -> bytes:
    """Set the storage offset of the first tensor of a `pickle.dumps(tensors)` stream."""
    ops = list(pickletools.genops(pickled_tensors))
    i = next(i for i, (op, _, _) in enumerate(ops) if op.name == "BINBYTES")  # the first storage's bytes
    i = next(j for j in range(i, len(ops)) if ops[j][0].name == "BININT1")  # then _rebuild_tensor_v2's offset
    op, arg, pos = ops[i]
    assert arg == 0, f"expected storage offset 0, found {op.name} {arg}"
    return pickled_tensors[:pos] + pickle.BININT + struct.pack("<i", offset) + pickled_tensors[pos + 2:]


def test_out_of_bounds_storage_offset_in_pickled_tensors_is_refused(tmp_path: Path):
    """A tensor that points past its storage must be refused, not filled with whatever memory held."""
    src = tmp_path / "weights.pkl"
    src.write_bytes(_patch_first_storage_offset(pickle.dumps({"model": tiny_state_dict()}, protocol=4), 5000))
    (tmp_path / "out").mkdir()

    with pytest.raises(ConversionError):
        convert(str(src), str(tmp_path / "out" / "model_d2.pth"))
    assert leftovers(tmp_path / "out") == []


def _replace_value(sd: Dict[str, Any], key: str, ops: bytes) -> bytes:
    """`pickle.dumps({"model": sd})` with the value of `key` replaced by hand-made opcodes."""
    marker = "__replace_me__"
    data = pickle.dumps({"model": {**sd, key: marker}}, protocol=4)
    found = [(pos, nxt) for (op, arg, pos), (_, _, nxt) in zip(pickletools.genops(data), list(pickletools.genops(data))[1:])
             if arg == marker]
    assert len(found) == 1, found
    pos, end = found[0]
    return data[:pos] + ops + data[end:]


def test_an_array_without_data_is_refused(tmp_path: Path):
    """numpy.ndarray(shape, dtype) with no buffer is memory, not weights: a ConversionError, not a conversion."""
    sd = {k: v.numpy() for k, v in tiny_state_dict().items()}
    shape = tuple_(*(small_int(n) for n in _DWCONV_SHAPE))
    src = tmp_path / "weights.pkl"
    src.write_bytes(_replace_value(sd, "stages.0.0.dwconv.weight", call(global_("numpy", "ndarray"), shape, text("<f4"))))
    (tmp_path / "out").mkdir()

    with pytest.raises(ConversionError):
        convert(str(src), str(tmp_path / "out" / "model_d2.pth"))
    assert leftovers(tmp_path / "out") == []


@pytest.mark.parametrize("fmt", ["pkl-numpy", "pkl-tensors"])
def test_a_protocol_2_pickle_written_by_python_3_converts(fmt: str, tmp_path: Path):
    """Protocol 2 under Python 3 spells bytes as _codecs.encode(str, 'latin1'): data, not code (regression:
    refused as unsafe before the allowlist admitted it)."""
    sd = tiny_state_dict()
    payload = {"model": {k: v.numpy() for k, v in sd.items()}, "__author__": "x"} if fmt == "pkl-numpy" else {"model": sd}
    src = tmp_path / "weights.pkl"
    src.write_bytes(pickle.dumps(payload, protocol=2))
    (tmp_path / "out").mkdir()

    assert convert_and_judge(src, tmp_path / "out") == "converted"


def test_a_dtype_with_forged_flags_gives_no_traceback(tmp_path: Path):
    """numpy's pickled dtype state carries internal flags; a forged one must not reach the user as tracebacks."""
    from ..support.cli import run_cli

    data = pickle.dumps({"model": {k: v.numpy() for k, v in tiny_state_dict().items()}}, protocol=4)
    state_tail = pickle.BININT + struct.pack("<i", -1) + pickle.BININT + struct.pack("<i", -1) + pickle.BININT1 + b"\x00"
    assert state_tail in data, "numpy no longer pickles dtype state as (..., -1, -1, flags)"
    src = tmp_path / "weights.pkl"
    src.write_bytes(data.replace(state_tail, state_tail[:-1] + b"\x01", 1))  # flags 0 -> NPY_ITEM_REFCOUNT

    result = run_cli("convert", src.name, "model_d2.pth", cwd=tmp_path)

    assert "Traceback" not in result.stderr, f"{result.returncode=}\n{result.stderr[:1500]}"


def test_an_array_state_of_a_version_numpy_refuses_is_refused(tmp_path: Path):
    """Found by the byte-flip fuzzer: an ndarray's pickled state (version, shape, dtype, fortran, data) with
    version 3 was read as if it were 1; numpy itself refuses it, so the converter must too (regression)."""
    data = pickle.dumps({"model": {k: v.numpy() for k, v in tiny_state_dict().items()}}, protocol=4)
    state_head = pickle.MARK + pickle.BININT1 + b"\x01"  # (1, shape, ...) opens every array's state
    assert state_head in data, "numpy no longer pickles an array's state as (1, shape, dtype, fortran, data)"
    src = tmp_path / "weights.pkl"
    src.write_bytes(data.replace(state_head, pickle.MARK + pickle.BININT1 + b"\x03", 1))
    with pytest.raises(ValueError, match="version 3"):  # the independent decoder's verdict
        pickle.loads(src.read_bytes())
    (tmp_path / "out").mkdir()

    with pytest.raises(UnreadableCheckpoint, match="version 3"):
        convert(str(src), str(tmp_path / "out" / "model_d2.pth"))
    assert leftovers(tmp_path / "out") == []
