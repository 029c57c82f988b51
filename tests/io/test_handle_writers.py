"""The one writer per format, fed by handles from any source: a safetensors file is converted from
its header (its tensors copied in the kernel, never read by Python or torch), its output is
deterministic, loads equal to the torch-zip source's output in torch (weights_only) and in
Detectron2's real checkpointer, and every record's CRC-32 is right (checked by zipfile, not by the
project).  The gather of non-contiguous views is checked against torch's own reshape."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conversion import convert
from conversion.architecture import Architecture
from conversion.synthetic import random_state_dict

from ..support import require, torch_load_weights_only

ROOT = Path(__file__).resolve().parents[2]
ARCH = Architecture((1, 2, 1, 1), (8, 16, 8, 16), num_classes=5, classifier_norm=True)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _sources(tmp_path: Path, dtype: torch.dtype):
    """The same weights as a safetensors file and as a torch zip; returns (safetensors, zip, weights)."""
    save_file = require("safetensors.torch").save_file
    sd = {k: v.to(dtype) for k, v in random_state_dict(ARCH, seed=3).items()}
    save_file(sd, str(tmp_path / "src.safetensors"))
    torch.save(sd, tmp_path / "src.pth")
    return tmp_path / "src.safetensors", tmp_path / "src.pth", sd


def _pkl_model(path: Path):
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")["model"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("ext", [".pth", ".pkl"])
def test_a_safetensors_source_is_streamed_deterministic_and_loads_equal_to_the_zip_sources_output(tmp_path, dtype, ext):
    st, zp, sd = _sources(tmp_path, dtype)
    a, b, z = (tmp_path / f"{n}{ext}" for n in ("a", "b", "z"))
    report = convert(str(st), str(a))
    convert(str(st), str(b))
    zreport = convert(str(zp), str(z))
    assert report.streamed and report.kept == zreport.kept == len(sd) - 4
    assert a.read_bytes() == b.read_bytes(), "the same source must give the same bytes"
    if ext == ".pth":
        got, want = torch_load_weights_only(a)["model"], torch_load_weights_only(z)["model"]
        with zipfile.ZipFile(a) as zf:
            assert zf.testzip() is None, "a record whose CRC-32 (computed from the source, patched in) is wrong"
    else:
        got = {k: torch.from_numpy(v) for k, v in _pkl_model(a).items()}
        want = {k: torch.from_numpy(v) for k, v in _pkl_model(z).items()}
    assert list(got) == list(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name
        source = sd[name[len("backbone."):]]
        assert torch.equal(got[name], source.float() if ext == ".pkl" and dtype == torch.bfloat16 else source), name


@pytest.mark.parametrize("ext", [".pth", ".pkl"])
def test_a_safetensors_conversion_loads_cleanly_in_detectron2(tmp_path, ext):
    """The real DetectionCheckpointer: nothing missing but the fresh output norms, nothing unused."""
    require("detectron2")
    from ..support import assert_clean_load, assert_loaded_equal, build_d2_model, fill_with_sentinel, load_with_detectron2

    st, _, sd = _sources(tmp_path, torch.float32)
    dst = tmp_path / f"out{ext}"
    report = convert(str(st), str(dst))
    model = build_d2_model(ARCH)
    fill_with_sentinel(model)
    result = load_with_detectron2(model, str(dst))
    fresh = [f"backbone.norm{i}.{p}" for i in range(4) for p in ("weight", "bias")]
    assert_clean_load(result, expected_missing=fresh)
    assert sorted(report.fresh) == sorted(fresh)
    assert_loaded_equal(model, {"backbone." + k: v for k, v in sd.items() if not k.startswith(("head.", "norm."))})


@pytest.mark.parametrize("ext", [".pth", ".pkl"])
def test_a_safetensors_conversion_reads_its_tensors_in_the_kernel_and_never_imports_torch(tmp_path, ext):
    """The file's bytes pass three times, no more: the kernel copy, the CRC-32 of the source's runs
    (safetensors records none) and the read-back of the output (Linux's /proc/self/io counts every
    thread's reads, copy_file_range's included); a tensor read by Python would be a fourth.
    Neither torch nor safetensors is imported."""
    if not os.path.exists("/proc/self/io"):
        pytest.skip("counts reads through Linux's /proc/self/io")
    arch = Architecture((3, 3, 9, 3), (96, 192, 384, 768), num_classes=1000, classifier_norm=True)
    require("safetensors.torch").save_file(random_state_dict(arch), str(tmp_path / "tiny.safetensors"))
    src, dst = str(tmp_path / "tiny.safetensors"), str(tmp_path / f"out{ext}")
    code = (
        "import json, sys\n"
        "from conversion import convert\n"
        "def rchar():\n"
        "    return next(int(l.split()[1]) for l in open('/proc/self/io') if l.startswith('rchar:'))\n"
        f"before = rchar(); report = convert({src!r}, {dst!r}); after = rchar()\n"
        "print(json.dumps({'streamed': report.streamed, 'torch': 'torch' in sys.modules, 'safetensors': 'safetensors' in sys.modules, 'read': after - before}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    size = os.path.getsize(src)
    assert result["streamed"] and not result["torch"] and not result["safetensors"], result
    assert result["read"] < 3 * size + (4 << 20), f"read {result['read']} bytes of a {size}-byte file"


@pytest.mark.parametrize("ext", [".pth", ".pkl"])
def test_strided_views_with_a_shape_fix_are_gathered_as_torch_reshapes_them(tmp_path, ext):
    """Transposed and sliced views given a new shape by a layout (timm conv-MLP [out, in, 1, 1] ->
    [out, in]): the written values equal torch's own `reshape` of the view (the oracle)."""
    from conversion.layouts import from_canonical

    sd = from_canonical(random_state_dict(ARCH), "timm", conv_mlp=True)
    name = "stages.1.blocks.0.mlp.fc1.weight"  # [64, 16, 1, 1]
    w = sd[name]
    sd[name] = w.permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3)  # same values, strides (1, 64, 1, 1)
    other = "stages.0.blocks.0.mlp.fc2.weight"  # [8, 32, 1, 1]: every other row of a larger storage
    big = torch.randn(16, 32, 1, 1)
    sd[other] = big[::2]
    assert not sd[name].is_contiguous() and not sd[other].is_contiguous()
    torch.save(sd, tmp_path / "src.pth")
    dst = tmp_path / f"out{ext}"
    report = convert(str(tmp_path / "src.pth"), str(dst))
    assert report.streamed
    if ext == ".pth":
        got = torch_load_weights_only(dst)["model"]
    else:
        got = {k: torch.from_numpy(v) for k, v in _pkl_model(dst).items()}
    assert torch.equal(got["backbone.stages.1.0.pwconv1.weight"], sd[name].reshape(64, 16))
    assert torch.equal(got["backbone.stages.0.0.pwconv2.weight"], big[::2].reshape(8, 32))


def test_non_finite_values_are_found_in_every_kind_of_handle(tmp_path):
    """--strict reads each handle's bytes with numpy: NaN in a safetensors tensor, Inf in a
    deflated zip record, NaN in a gathered view, and an all-ones bf16 exponent are all found."""
    from conversion.errors import NonFiniteWeights

    save_file = require("safetensors.torch").save_file
    sd = random_state_dict(ARCH)
    sd["stages.0.0.gamma"][1] = float("nan")
    save_file(sd, str(tmp_path / "nan.safetensors"))
    with pytest.raises(NonFiniteWeights, match=r"backbone\.stages\.0\.0\.gamma"):
        convert(str(tmp_path / "nan.safetensors"), str(tmp_path / "a.pth"), strict=True)
    report = convert(str(tmp_path / "nan.safetensors"), str(tmp_path / "a.pkl"))
    assert report.non_finite is None, "not checked without --strict: the bytes are copied, never read"

    bf = {k: v.to(torch.bfloat16) for k, v in random_state_dict(ARCH).items()}
    bf["stages.1.1.pwconv1.bias"][0] = float("inf")
    torch.save(bf, tmp_path / "plain.pth")
    with zipfile.ZipFile(tmp_path / "plain.pth") as zin, zipfile.ZipFile(tmp_path / "inf.pth", "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info))
    with pytest.raises(NonFiniteWeights, match=r"backbone\.stages\.1\.1\.pwconv1\.bias"):
        convert(str(tmp_path / "inf.pth"), str(tmp_path / "b.pkl"), strict=True)


def test_tensors_in_memory_are_written_by_the_same_writer(tmp_path):
    """The Python API's tensors and numpy arrays become handles over bytes in memory: the .pkl of a
    numpy state dict equals the .pkl of the same torch state dict, byte for byte."""
    from conversion.write import encode

    sd = {"backbone." + k: v for k, v in random_state_dict(ARCH).items()}
    assert encode(sd, "pickle") == encode({k: v.numpy() for k, v in sd.items()}, "pickle")
    data = pickle.loads(encode(sd, "pickle"), encoding="latin1")["model"]
    assert all(np.array_equal(data[k], v.numpy()) for k, v in sd.items())


def _index_by_the_standard_pickler(payload) -> bytes:
    """The oracle for the index writer: CPython's own pickler (protocol 2), told what torch.save
    tells it: a storage is a persistent id naming torch's storage class, a tensor reduces to
    torch._utils._rebuild_tensor_v2."""
    import collections
    import io

    import torch._utils

    from conversion.io.handles import StorageRef, TensorRef

    class Oracle(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, StorageRef):
                return ("storage", getattr(torch, obj.storage_type), obj.key, "cpu", obj.numel)
            return None

        def reducer_override(self, obj):
            if isinstance(obj, TensorRef):
                return torch._utils._rebuild_tensor_v2, (obj.storage, obj.offset, obj.shape, obj.stride, False, collections.OrderedDict())
            return NotImplemented

    buf = io.BytesIO()
    Oracle(buf, protocol=2).dump(payload)
    return buf.getvalue()


def test_the_index_writer_writes_what_the_standard_pickler_writes():
    """Shared shapes and storage keys (memo references), over 256 memo entries (LONG_BINPUT),
    over 1000 items (two SETITEMS batches), large offsets and numels (BININT, LONG1): byte for byte."""
    from conversion.io.handles import StorageRef, TensorRef, contiguous_stride
    from conversion.io.torch_writer import encode_index

    shared_shape = (3, 4)
    big = StorageRef("big", "FloatStorage", 3 << 31)
    model = {}
    for i in range(1200):
        key = str(i % 7)  # one string object per key, as a reader's memo gives them
        storage = StorageRef(key, ("FloatStorage", "HalfStorage", "BFloat16Storage")[i % 3], 12)
        shape = shared_shape if i % 2 else (12,)
        model[f"backbone.t{i}"] = TensorRef(storage, 0, shape, contiguous_stride(shape))
    model["backbone.far"] = TensorRef(big, (1 << 31) + 5, (2, 2, 2, 2), (8, 4, 2, 1))
    model["backbone.scalar"] = TensorRef(StorageRef("s", "LongStorage", 1), 0, (), ())
    payload = {"model": model, "__author__": "convnext-d2"}
    assert encode_index(payload) == _index_by_the_standard_pickler(payload)


def test_a_readers_handle_subclass_is_written_as_the_plain_handle_it_is(tmp_path):
    """A reader may hand out a TensorRef subclass (more fields about the source): the writers write,
    and the read-back compares, the plain view it stands for."""
    from dataclasses import dataclass

    from conversion.io.handles import InMemory, StorageRef, TensorRef
    from conversion.io.tensor_bytes import writable
    from conversion.io.torch_writer import TORCH_SMALL_RECORDS, write_pth

    @dataclass(frozen=True)
    class NoteRef(TensorRef):
        note: str = "from a pickle"

    values = np.arange(6, dtype="<f4")
    ref = NoteRef(StorageRef("k", "FloatStorage", 6), 0, (2, 3), (3, 1))
    tensors, model = writable(None, {"k": InMemory(values.tobytes())}, {"backbone.w": ref}, gather=True)
    assert type(model["backbone.w"]) is TensorRef and model["backbone.w"] == TensorRef(ref.storage, 0, (2, 3), (3, 1))
    payload = {"model": model, "__author__": "convnext-d2"}
    write_pth(str(tmp_path / "a.pth"), tensors, payload, ["k"], TORCH_SMALL_RECORDS, force=False, source="")
    assert torch.equal(torch_load_weights_only(tmp_path / "a.pth")["model"]["backbone.w"], torch.arange(6.0).reshape(2, 3))


@pytest.mark.parametrize("ext", [".pth", ".pkl"])
def test_a_source_that_shrinks_while_it_converts_is_refused_and_nothing_is_left(tmp_path, ext):
    """The safetensors file is cut short after its first tensor was copied (another process
    rewriting it): the next copy meets its end; a clear error, exit-2 class, nothing written."""
    from conversion.errors import UnreadableCheckpoint
    from conversion.io.output import copies_through, copy_range

    st, _, _ = _sources(tmp_path, torch.float32)

    def copy_then_cut_the_source(src_fd, dst_fd, src_offset, count):
        copy_range(src_fd, dst_fd, src_offset, count)
        os.truncate(st, 1000)

    with copies_through(copy_then_cut_the_source), pytest.raises(UnreadableCheckpoint, match=r"src\.safetensors: the file ends inside a tensor"):
        convert(str(st), str(tmp_path / f"out{ext}"))
    assert not (tmp_path / f"out{ext}").exists() and sorted(os.listdir(tmp_path)) == ["src.pth", "src.safetensors"]


@pytest.mark.parametrize("kind", ["legacy", "pickle"])
@pytest.mark.parametrize("ext", [".pth", ".pkl"])
def test_legacy_and_pickle_sources_are_written_from_their_handles_without_torch(tmp_path, kind, ext):
    """A legacy torch file's storages and a numpy pickle's payloads are handles too: converted in a
    fresh process without importing torch, deterministic, and equal once loaded to the torch-zip
    source's output."""
    sd = random_state_dict(ARCH, seed=4)
    src = tmp_path / f"src.{kind}"
    if kind == "legacy":
        torch.save({"model": sd}, src, _use_new_zipfile_serialization=False)
    else:
        with open(src, "wb") as f:
            pickle.dump({"model": {k: v.numpy() for k, v in sd.items()}}, f, protocol=4)
    torch.save({"model": sd}, tmp_path / "zip.pth")
    convert(str(tmp_path / "zip.pth"), str(tmp_path / f"z{ext}"))
    code = (
        "import json, sys; from conversion import convert; "
        f"r = convert({str(src)!r}, {str(tmp_path / ('a' + ext))!r}); "
        "print(json.dumps({'streamed': r.streamed, 'torch': 'torch' in sys.modules}))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"streamed": True, "torch": False}
    convert(str(src), str(tmp_path / f"b{ext}"))
    assert (tmp_path / f"a{ext}").read_bytes() == (tmp_path / f"b{ext}").read_bytes()
    if ext == ".pth":
        got, want = torch_load_weights_only(tmp_path / f"a{ext}")["model"], torch_load_weights_only(tmp_path / f"z{ext}")["model"]
    else:
        got, want = ({k: torch.from_numpy(v) for k, v in _pkl_model(tmp_path / f"{n}{ext}").items()} for n in ("a", "z"))
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
