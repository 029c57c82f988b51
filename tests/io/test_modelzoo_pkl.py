"""The model-zoo .pkl read-back helper: each array's shape, dtype and where its bytes lie, never its bytes.

Oracles: numpy's own unpickler (pickle.load) for the arrays, zlib for the CRCs, the file's bytes at
the offsets the helper gives.
"""
from __future__ import annotations

import pickle
import zlib

import numpy as np
import pytest

from conversion import convert
from conversion.architecture import Architecture
from conversion.errors import UnreadableCheckpoint
from conversion.io.handles import FileBytes
from conversion.io.modelzoo_pkl import ArrayPayload, array_digests, read_array_payloads
from conversion.synthetic import random_state_dict

from ..support import bytes_at

ARCH = Architecture((1, 1, 2, 1), (8, 16, 24, 32))


def _arrays():
    """Arrays of every size class: empty, tiny (SHORT_BINBYTES), inside a frame (< 64 KiB), outside frames."""
    rng = np.random.default_rng(0)
    return {
        "empty": np.zeros((0, 3), np.float32),
        "tiny": rng.standard_normal(5).astype(np.float16),
        "framed": rng.standard_normal((32, 40)).astype(np.float32),  # 5 KiB: written inside a frame
        "large": rng.standard_normal((300, 300)).astype(np.float64),  # 720 KB: written outside frames
        "ints": np.arange(2000, dtype=np.int64).reshape(40, 50),
        "mask": rng.standard_normal(7000) > 0,
    }


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_every_array_is_described_by_shape_dtype_and_the_file_run_of_its_bytes(tmp_path, protocol):
    arrays = _arrays()
    path = tmp_path / "m.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": arrays, "__author__": "someone", "matching_heuristics": True}, f, protocol=protocol)
    with open(path, "rb") as f:
        oracle = pickle.load(f)["model"]  # numpy's own unpickler

    got = read_array_payloads(str(path))

    assert got["__author__"] == "someone" and got["matching_heuristics"] is True
    assert sorted(got["model"]) == sorted(oracle)
    for name, want in oracle.items():
        a = got["model"][name]
        assert isinstance(a, ArrayPayload)
        assert (a.shape, np.dtype(a.dtype)) == (want.shape, want.dtype), name
        assert bytes_at(path, a.payload) == want.tobytes(), name
    if protocol >= 3:  # bytes are raw runs of the file from protocol 3 on (protocol 2 spells them as latin-1 text)
        assert isinstance(got["model"]["large"].payload, FileBytes)
        assert isinstance(got["model"]["framed"].payload, FileBytes)


def test_digests_are_the_crcs_of_the_arrays_bytes(tmp_path):
    arrays = _arrays()
    path = tmp_path / "m.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": arrays, "__author__": "x"}, f, protocol=4)
    got = array_digests(str(path))
    want = {k: (v.shape, v.dtype.str, zlib.crc32(v.tobytes()), v.nbytes) for k, v in arrays.items()}
    assert got == {"model": want, "__author__": "x"}


def test_a_converted_pkl_reads_back_through_the_helper_as_numpy_reads_it(tmp_path):
    """The project's own model-zoo writer's output: numpy.ndarray(shape, dtype, bytearray(payload))."""
    import torch

    src, dst = tmp_path / "src.pth", tmp_path / "out.pkl"
    torch.save(random_state_dict(ARCH, seed=2), src)
    convert(str(src), str(dst))
    with open(dst, "rb") as f:
        oracle = pickle.load(f)
    got = array_digests(str(dst))
    assert got["__author__"] == oracle["__author__"]
    assert got["model"] == {k: (v.shape, v.dtype.str, zlib.crc32(v.tobytes()), v.nbytes) for k, v in oracle["model"].items()}


def test_a_file_cut_inside_an_array_is_refused(tmp_path):
    path = tmp_path / "m.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {"w": np.ones((200, 200), np.float32)}, "__author__": "x"}, f, protocol=4)  # 160 KB: outside frames
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UnreadableCheckpoint, match="declares 160000 bytes where fewer are left"):
        read_array_payloads(str(path))
