"""Legacy torch files and plain pickles as handles: tensors and arrays are views over storages whose
bytes stay in the file, and reading them whole is the handles materialized.

Oracles: torch.load(weights_only=True) for legacy files, numpy's own unpickler for pickles, the
file's own bytes at the offsets the reader gives.
"""
from __future__ import annotations

import io
import pickle
import struct

import numpy as np
import pytest
import torch

from conversion.architecture import Architecture
from conversion.errors import UnreadableCheckpoint
from conversion.io.handles import ArrayRef, FileBytes, InMemory, TensorRef, numel
from conversion.io.safe_pickle import PAYLOAD_THRESHOLD, Payload
from conversion.read import materialize, open_source
from conversion.synthetic import random_state_dict

from ..support import bytes_at, read_as_convert_does, read_written

SD = random_state_dict(Architecture((1, 1, 2, 1), (8, 16, 24, 32), num_classes=5, classifier_norm=True), seed=5)


def _storage_bytes(t: torch.Tensor) -> bytes:
    if hasattr(t, "untyped_storage"):
        return bytes(t.untyped_storage())
    whole = torch.empty(0, dtype=t.dtype).set_(t.storage())  # torch 1.9: the storage as a flat tensor
    return whole.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]).numpy().tobytes()


def _torch_load(path):
    """torch's own reader, as the oracle: weights_only where torch has it (not torch 1.9)."""
    try:
        return torch.load(path, weights_only=True)
    except TypeError:
        return torch.load(path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_a_legacy_file_gives_tensor_refs_over_its_storages_read_whole(tmp_path, dtype):
    """Legacy files never come large (big checkpoints are zip archives): read whole, one pass."""
    path = tmp_path / "legacy.pth"
    sd = {k: v.to(dtype) for k, v in SD.items()}
    sd["stages.0.0.gamma_t"] = sd["stages.0.0.gamma"].expand(3, -1).t()  # a strided view shares its storage
    torch.save({"model": sd, "epoch": 3}, path, _use_new_zipfile_serialization=False)
    oracle = _torch_load(path)["model"]

    source = open_source(str(path))

    assert source.format == "torch-legacy" and source.objects["epoch"] == 3
    model = source.objects["model"]
    assert sorted(model) == sorted(oracle)
    for name, want in oracle.items():
        ref = model[name]
        assert type(ref) is TensorRef, name
        assert (ref.shape, ref.stride, ref.offset) == (tuple(want.shape), want.stride(), want.storage_offset()), name
        assert ref.dtype == str(want.dtype).replace("torch.", "")
        location = source.storages[ref.storage.key]
        assert isinstance(location, InMemory) and location.data == _storage_bytes(want), name
    assert source.bytes_read == path.stat().st_size


@pytest.mark.parametrize("protocol", [3, 4, 5])
def test_a_plain_pickle_gives_array_refs_over_runs_of_the_file(tmp_path, protocol):
    arrays = {k: v.numpy() for k, v in SD.items()}
    arrays["fortran"] = np.asfortranarray(np.arange(24000, dtype=np.int32).reshape(40, 600))
    arrays["bool"] = np.arange(9000) % 3 == 0
    arrays["big_endian"] = np.arange(2000).astype(">f8")
    path = tmp_path / "zoo.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": arrays, "__author__": "x", "blob": b"\x01" * 10000}, f, protocol=protocol)
    with open(path, "rb") as f:
        oracle = pickle.load(f)

    source = open_source(str(path))

    assert source.format == "pickle" and source.objects["__author__"] == "x"
    assert isinstance(source.objects["blob"], Payload) and bytes_at(path, source.objects["blob"].location) == oracle["blob"]
    for name, want in oracle["model"].items():
        ref = source.objects["model"][name]
        assert isinstance(ref, ArrayRef), name
        assert (ref.shape, ref.dtype, numel(ref)) == (want.shape, want.dtype.name, want.size), name
        location = source.storages[ref.storage.key]
        # In the other byte order, an array is swapped as the pickle is read: in memory, whatever its size.
        big = want.nbytes > PAYLOAD_THRESHOLD and arrays[name].dtype.isnative
        assert isinstance(location, FileBytes if big else InMemory), name
        assert bytes_at(path, location) == want.astype(want.dtype.newbyteorder("=")).tobytes(order="A"), name
    assert source.objects["model"]["fortran"].stride == (1, 40)
    assert source.bytes_read < 64 * 1024


def test_reading_whole_is_the_handles_materialized_and_equals_numpys_reading(tmp_path):
    arrays = {k: v.numpy() for k, v in SD.items()}
    arrays["fortran"] = np.asfortranarray(np.arange(24000, dtype=np.int32).reshape(40, 600))
    arrays["big_endian"] = np.arange(2000).astype(">f8")
    path = tmp_path / "zoo.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": arrays, "__author__": "x", "blob": bytearray(b"\x02" * 9000), "big": b"\x03" * 9000}, f, protocol=5)
    with open(path, "rb") as f:
        oracle = pickle.load(f)

    loaded = read_as_convert_does(str(path))

    assert (loaded["blob"], type(loaded["blob"]), loaded["big"], type(loaded["big"])) == (oracle["blob"], bytearray, oracle["big"], bytes)
    for name, want in oracle["model"].items():
        got = loaded["model"][name]
        assert type(got) is np.ndarray and got.dtype == want.dtype.newbyteorder("=") and got.shape == want.shape, name
        assert got.flags.f_contiguous == want.flags.f_contiguous and got.flags.writeable, name
        assert np.array_equal(got, want), name


def _py2_binstring_pickle(arrays) -> bytes:
    """A model-zoo file as Python 2 wrote it (protocol 2): each array is numpy.core.multiarray._reconstruct
    then BUILD with (1, shape, dtype, False, data), its data a BINSTRING (a Python 2 str)."""
    def string(b: bytes) -> bytes:
        return pickle.SHORT_BINSTRING + bytes([len(b)]) + b

    def minus_one() -> bytes:
        return pickle.BININT + struct.pack("<i", -1)

    dtype = (pickle.GLOBAL + b"numpy\ndtype\n" + string(b"f4") + pickle.BININT1 + b"\x00" + pickle.BININT1 + b"\x01"
             + pickle.TUPLE3 + pickle.REDUCE + pickle.MARK + pickle.BININT1 + b"\x03" + string(b"<") + pickle.NONE * 3
             + minus_one() + minus_one() + pickle.BININT1 + b"\x00" + pickle.TUPLE + pickle.BUILD)
    out = [pickle.PROTO + b"\x02", pickle.EMPTY_DICT, string(b"model"), pickle.EMPTY_DICT, pickle.MARK]
    for name, a in arrays.items():
        data = a.tobytes()
        out += [string(name.encode()),
                pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n", pickle.GLOBAL + b"numpy\nndarray\n",
                pickle.BININT1 + b"\x00", pickle.TUPLE1, string(b"b"), pickle.TUPLE3, pickle.REDUCE,
                pickle.MARK, pickle.BININT1 + b"\x01", pickle.BININT2 + struct.pack("<H", a.shape[0]), pickle.TUPLE1,
                dtype, pickle.NEWFALSE, pickle.BINSTRING + struct.pack("<i", len(data)) + data, pickle.TUPLE, pickle.BUILD]
    out += [pickle.SETITEMS, pickle.SETITEM, pickle.STOP]
    return b"".join(out)


def test_a_python_2_model_zoo_pickle_reads_as_numpy_reads_it(tmp_path):
    """Detectron2's own model zoo files were written by Python 2: array data is a latin-1 string."""
    arrays = {"small": np.arange(10, dtype="<f4"), "large": np.linspace(0, 1, 5000, dtype="<f4")}
    data = _py2_binstring_pickle(arrays)
    oracle = pickle.loads(data, encoding="latin1")["model"]  # numpy's own reading of a Python 2 pickle
    assert {k: v.tolist() for k, v in oracle.items()} == {k: v.tolist() for k, v in arrays.items()}
    path = tmp_path / "py2.pkl"
    path.write_bytes(data)

    source = open_source(str(path))
    loaded = read_as_convert_does(str(path))

    assert isinstance(source.storages[source.objects["model"]["large"].storage.key], FileBytes)
    assert isinstance(source.storages[source.objects["model"]["small"].storage.key], InMemory)
    for name, want in oracle.items():
        assert np.array_equal(loaded["model"][name], want) and loaded["model"][name].dtype == want.dtype


def test_a_payload_declared_past_the_end_is_refused_by_both_readers_alike(tmp_path):
    path = tmp_path / "cut.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {"w": np.ones((300, 300), np.float32)}, "__author__": "x"}, f, protocol=4)
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(UnreadableCheckpoint, match=r"cut\.pkl: 'w': the pickle declares 360000 bytes where fewer are left") as whole:
        read_as_convert_does(str(path))
    with pytest.raises(UnreadableCheckpoint) as handles:
        open_source(str(path))
    assert handles.value.message == whole.value.message


def test_a_legacy_storage_past_the_end_is_refused_by_both_readers_alike(tmp_path):
    path = tmp_path / "cut.pth"
    torch.save({"w": torch.ones(300, 300)}, path, _use_new_zipfile_serialization=False)
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(UnreadableCheckpoint, match=r"cut\.pth: storage \S+ is truncated or its size disagrees with the index") as whole:
        read_as_convert_does(str(path))
    with pytest.raises(UnreadableCheckpoint) as handles:
        open_source(str(path))
    assert handles.value.message == whole.value.message


def test_arrays_sharing_one_payload_still_spend_the_budget_once_each(tmp_path):
    """A payload memoised once and referenced by many arrays claims more than the file holds: refused
    in payload mode (the bytes are never read) exactly as when each array copies them."""
    n = 64 * 1024
    parts = [pickle.PROTO + b"\x04", pickle.EMPTY_LIST, pickle.MARK]
    parts += [pickle.GLOBAL + b"numpy\nndarray\n", pickle.MARK, pickle.BININT + struct.pack("<i", n // 4), pickle.TUPLE,
              pickle.SHORT_BINUNICODE + b"\x03<f4", pickle.BINBYTES + struct.pack("<I", n) + b"\0" * n, pickle.BINPUT + b"\x01",
              pickle.TUPLE3, pickle.REDUCE]
    for _ in range(40):
        parts += [pickle.GLOBAL + b"numpy\nndarray\n", pickle.MARK, pickle.BININT + struct.pack("<i", n // 4), pickle.TUPLE,
                  pickle.SHORT_BINUNICODE + b"\x03<f4", pickle.BINGET + b"\x01", pickle.TUPLE3, pickle.REDUCE]
    parts += [pickle.APPENDS, pickle.STOP]
    path = tmp_path / "shared.pkl"
    path.write_bytes(b"".join(parts))
    for read in (read_as_convert_does, lambda p: open_source(p)):
        with pytest.raises(UnreadableCheckpoint, match="builds more data than it holds"):
            read(str(path))


def test_tensors_pickled_with_plain_pickle_come_back_through_their_inner_archives(tmp_path):
    """pickle.dump of torch tensors: each storage is torch.storage._load_from_bytes(a torch file of
    that storage); the inner file is read whole by the same rules, its storage kept in memory."""
    sd = dict(SD)
    path = tmp_path / "tensors.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": sd, "__author__": "x"}, f)

    source = open_source(str(path))
    loaded = read_as_convert_does(str(path))["model"]

    for name, want in sd.items():
        ref = source.objects["model"][name]
        assert type(ref) is TensorRef and ref.shape == tuple(want.shape), name
        location = source.storages[ref.storage.key]
        assert isinstance(location, InMemory) and location.data == want.numpy().tobytes(), name
        assert loaded[name].dtype == want.dtype and torch.equal(loaded[name], want), name


def test_the_same_pickle_of_tensors_converts_to_the_same_bytes_every_time(tmp_path):
    """Its inner archives' storages are numbered per file, not per process: converting it twice in
    one process (the Python API) gives the same bytes.  (Regression: a process-wide counter.)"""
    from conversion import convert

    path = tmp_path / "tensors.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": dict(SD)}, f)
    for ext in (".pth", ".pkl"):
        convert(str(path), str(tmp_path / f"a{ext}"))
        convert(str(path), str(tmp_path / f"b{ext}"))
        assert (tmp_path / f"a{ext}").read_bytes() == (tmp_path / f"b{ext}").read_bytes(), ext


@pytest.mark.parametrize("kind", ["legacy", "pickle"])
def test_materializing_the_handles_gives_what_reading_whole_gives(tmp_path, kind):
    path = tmp_path / ("w.pth" if kind == "legacy" else "w.pkl")
    if kind == "legacy":
        torch.save({"model": SD, "epoch": 3}, path, _use_new_zipfile_serialization=False)
    else:
        with open(path, "wb") as f:
            pickle.dump({"model": {k: v.numpy() for k, v in SD.items()}, "blob": b"\x07" * 5000}, f, protocol=4)
    got, want = materialize(open_source(str(path))), read_as_convert_does(str(path))
    assert sorted(got) == sorted(want) and sorted(got["model"]) == sorted(want["model"])
    for name, value in want["model"].items():
        assert type(got["model"][name]) is type(value), name
        assert (torch.equal if kind == "legacy" else np.array_equal)(got["model"][name], value), name
    if kind == "pickle":
        assert got["blob"] == want["blob"] == b"\x07" * 5000


@pytest.mark.parametrize("dtype, storage", [("uint32", "uint32"), ("longdouble", "float128"), ("int8", "CharStorage"), ("bool", "BoolStorage")])
def test_an_array_keeps_numpys_dtype_and_one_without_a_torch_storage_type_is_refused_as_a_weight(tmp_path, dtype, storage):
    """The handle names numpy's dtype; where torch has no storage type for it (uint32, float128) the
    layouts refuse it as a weight, with the words they use for the array itself."""
    from conversion import convert
    from conversion.errors import NotConvNeXt
    from conversion.inspection import inspect_checkpoint

    path = tmp_path / "w.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {k: (v.numpy() * 10).astype(dtype) for k, v in SD.items()}, "__author__": "x"}, f, protocol=4)
    ref = open_source(str(path)).objects["model"]["downsample_layers.0.0.weight"]
    assert (ref.dtype, ref.storage.storage_type) == (np.dtype(dtype).name, storage)
    if storage in ("uint32", "float128"):
        says = rf"'downsample_layers\.0\.0\.weight' is not a weight tensor \(dtype {np.dtype(dtype).name}\)"
        with pytest.raises(NotConvNeXt, match=says):
            inspect_checkpoint(str(path))
        with pytest.raises(NotConvNeXt, match=says):
            convert(str(path), str(tmp_path / "out.pth"))


@pytest.mark.parametrize("protocol", [2, 4])
def test_long_byte_strings_anywhere_come_back_as_what_they_were(tmp_path, protocol):
    """Payloads left in the file are read back as bytes, bytearray, str or (Python 2) str wherever
    they were: values, dict keys, tuples, sets; under protocol 2, which spells bytes as latin-1
    text (`_codecs.encode`), too."""
    big = bytes(range(256)) * 20
    text = "weights \u00fc\u4e2d " * 700  # a long str: UTF-8 of 1, 2 and 3 bytes a character
    obj = {"model": {k: v.numpy() for k, v in SD.items()}, "__author__": "x",
           big: "a key", "t": (big, 1), "s": {big}, "f": frozenset([big + b"x"]), "ba": [bytearray(big)],
           "text": text, text: "a str key", "ts": (text, {text + "!"})}
    path = tmp_path / "w.pkl"
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)
    got = read_as_convert_does(str(path))
    for key in (big, "t", "s", "f", "ba", "__author__", "text", text, "ts"):
        assert got[key] == obj[key] and type(got[key]) is type(obj[key]), key
    assert type(got["ba"][0]) is bytearray
    # Read as handles, a str stays a str (only `_codecs.encode`'s argument is left in the file).
    handles = open_source(str(path)).objects
    assert type(handles["text"]) is str and handles["text"] == text and handles[text] == "a str key"
    assert handles["ts"] == obj["ts"]


def test_the_source_lists_the_modules_its_pickles_name(tmp_path):
    """What diagnose asks of a .pkl (pickled by numpy >= 2 names numpy._core) without searching its bytes."""
    legacy, zoo = tmp_path / "w.pth", tmp_path / "w.pkl"
    torch.save({"model": SD, "np": np.ones(3)}, legacy, _use_new_zipfile_serialization=False)
    with open(zoo, "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in SD.items()}, "__author__": "x"}, f)
    core = "numpy._core.multiarray" if int(np.__version__.split(".")[0]) >= 2 else "numpy.core.multiarray"
    assert {"torch._utils", core} <= open_source(str(legacy)).modules
    assert {"numpy", core} <= open_source(str(zoo)).modules and "torch._utils" not in open_source(str(zoo)).modules


@pytest.mark.parametrize("short_by", [7, 40, 1001])
def test_a_frame_shorter_than_its_contents_is_refused_as_pickle_refuses_it(tmp_path, short_by):
    """Payload mode reads no frame ahead but keeps frames' boundaries: a frame length cut short (one
    flipped byte of a real file) leaves an opcode straddling the frame's end, which pickle refuses.
    Found by the byte-flip fuzzer: the handle reader once read such a file as if it were whole."""
    arrays = {name: t.numpy() for name, t in SD.items()}
    data = bytearray(pickle.dumps({"model": arrays, "__author__": "x"}, protocol=4))
    assert data[2] == pickle.FRAME[0]
    (n,) = struct.unpack("<Q", data[3:11])
    data[3:11] = struct.pack("<Q", n - short_by)
    path = tmp_path / "cut-frame.pkl"
    path.write_bytes(bytes(data))
    with pytest.raises(pickle.UnpicklingError):  # the oracle: Python's own pure-Python reader refuses it
        pickle._Unpickler(io.BytesIO(bytes(data))).load()

    for read in (lambda: open_source(str(path)), lambda: read_as_convert_does(str(path))):
        with pytest.raises(UnreadableCheckpoint, match="frame"):
            read()



def test_a_big_endian_pickle_converts_to_its_values_in_native_order(tmp_path):
    """Arrays pickled big-endian are swapped as the pickle is read (held in memory, native order):
    both outputs hold numpy's values."""
    from conversion import convert

    arrays = {k: v.numpy().astype(">f4") for k, v in SD.items()}
    path = tmp_path / "big.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": arrays}, f, protocol=4)
    storages = open_source(str(path)).storages
    assert storages and all(isinstance(loc, InMemory) for loc in storages.values())
    convert(str(path), str(tmp_path / "w.pth"))
    convert(str(path), str(tmp_path / "w.pkl"))
    pth, pkl = read_written(tmp_path / "w.pth")["model"], read_written(tmp_path / "w.pkl")["model"]
    for name, want in arrays.items():
        if "backbone." + name in pth:
            assert np.array_equal(pth["backbone." + name].numpy(), want.astype("<f4")), name
            assert np.array_equal(pkl["backbone." + name], want) and pkl["backbone." + name].dtype == np.float32, name
