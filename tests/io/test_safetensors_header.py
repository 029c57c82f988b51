"""The safetensors header reader against safetensors' own reader: same names, shapes and dtypes,
no tensor byte read; a header it cannot vouch for gives None (the whole-file reader then decides)."""
from __future__ import annotations

import json
import os
import struct

import pytest
import torch

from conversion.io.safetensors_header import read_header
from conversion.read import open_source

from ..support import require

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool]


def _header(path):
    with open(path, "rb") as f:
        return read_header(f, os.fstat(f.fileno()).st_size)


def test_every_tensor_is_described_as_safetensors_itself_describes_it(tmp_path):
    st = require("safetensors")
    tensors = {f"t{i}.{str(d)[6:]}": torch.zeros((i % 3 + 1, 2 * i + 1), dtype=d) for i, d in enumerate(DTYPES)}
    tensors["empty"] = torch.zeros((0, 4))
    require("safetensors.torch").save_file(tensors, str(tmp_path / "w.safetensors"), metadata={"format": "pt"})
    header = _header(tmp_path / "w.safetensors")
    assert header is not None and list(header.tensors) == sorted(tensors)
    with st.safe_open(str(tmp_path / "w.safetensors"), "pt") as f:
        for name in f.keys():
            ref = header.tensors[name]
            assert ref.shape == tuple(f.get_slice(name).get_shape()) == tuple(tensors[name].shape), name
            assert ref.dtype == str(tensors[name].dtype)[len("torch."):], name


def _raw(tmp_path, header, data=b"") -> str:
    text = json.dumps(header).encode()
    path = tmp_path / "raw.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return str(path)


@pytest.mark.parametrize(
    "entry",
    [
        {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]},  # a dtype the weights cannot have
        {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]},  # fewer bytes than the shape needs
        {"dtype": "F32", "shape": [2], "data_offsets": [0, 16]},  # past the end of the file
        {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]},
        {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]},
        {"dtype": "F32", "shape": [2]},
    ],
    ids=["float8", "short", "past-the-end", "negative", "not-a-list", "no-offsets"],
)
def test_a_header_it_cannot_vouch_for_gives_none(tmp_path, entry):
    assert _header(_raw(tmp_path, {"w": entry}, b"\0" * 8)) is None


def test_a_plain_header_is_read_without_the_safetensors_package(tmp_path):
    header = {"__metadata__": {"a": "b"}, "w": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, 8]}}
    source = open_source(_raw(tmp_path, header, b"\0" * 8))
    assert (source.format, list(source.objects)) == ("safetensors", ["w"])
    assert source.objects["w"].shape == (2, 2) and source.objects["w"].dtype == "bfloat16"
    assert source.bytes_read == 8 + len(json.dumps(header))  # the header, not a tensor byte
