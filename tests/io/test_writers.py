"""What the writers write, from the handles of a torch archive: once loaded, the same as the
same weights read whole from a legacy file; deterministic; 64-byte aligned records torch maps;
the index torch reads; bfloat16 widened exactly for a .pkl; non-contiguous views gathered; no
torch import on the way.  (The round-trip and property suites run on every kind of source.)"""
from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conversion import convert
from conversion.architecture import Architecture
from conversion.synthetic import random_state_dict

from .. import strategies as S
from ..support import written_tensors

ROOT = Path(__file__).resolve().parents[2]
ARCH = Architecture((1, 2, 1, 1), (8, 16, 8, 16), num_classes=5, classifier_norm=True)


def _loaded(path):
    """A written file's tensors, decoded by torch / the standard unpickler (not by conversion.read)."""
    return written_tensors(path)


def _both_sources(tmp, obj, ext):
    """`obj` saved as a torch zip and as a legacy torch file, each converted from its handles (the
    records / storages copied into the output): {zip: (destination, report)}."""
    out = {}
    for zipped in (True, False):
        src = os.path.join(tmp, f"src-{'zip' if zipped else 'legacy'}.pth")
        torch.save(obj, src, _use_new_zipfile_serialization=zipped)
        dst = os.path.join(tmp, f"{'s' if zipped else 'l'}{ext}")
        report = convert(src, dst)
        assert report.streamed, "both formats are read as handles"
        out[zipped] = (dst, report)
    return out




@given(S.official_state_dicts(), st.sampled_from([".pth", ".pkl"]))
@settings(max_examples=10)
def test_streamed_output_equals_the_load_and_save_output_once_loaded(drawn, ext):
    """Same names in the same order, same dtypes, same values, same report, whichever path ran."""
    import tempfile

    _, sd = drawn
    with tempfile.TemporaryDirectory() as tmp:
        out = _both_sources(tmp, {"model": sd}, ext)
        streamed, loaded = _loaded(out[True][0]), _loaded(out[False][0])
        assert list(streamed) == list(loaded)
        for name in loaded:
            assert streamed[name].dtype == loaded[name].dtype and torch.equal(streamed[name], loaded[name]), name
        a, b = out[True][1].to_dict(), out[False][1].to_dict()
        for key in ("streamed", "bytes_written", "source", "destination", "non_finite"):  # non_finite: checked only when loaded
            a.pop(key), b.pop(key)
        assert a == b


@pytest.mark.parametrize("ext", [".pth", ".pkl"])
def test_streamed_output_is_deterministic(tmp_path, ext):
    torch.save({"model": random_state_dict(ARCH)}, tmp_path / "src.pth")
    convert(str(tmp_path / "src.pth"), str(tmp_path / f"a{ext}"))
    convert(str(tmp_path / "src.pth"), str(tmp_path / f"b{ext}"))
    assert (tmp_path / f"a{ext}").read_bytes() == (tmp_path / f"b{ext}").read_bytes()


def test_streamed_pth_records_are_64_byte_aligned_and_mmap_loadable(tmp_path):
    torch.save({"model": random_state_dict(ARCH)}, tmp_path / "src.pth")
    convert(str(tmp_path / "src.pth"), str(tmp_path / "out.pth"))
    data = (tmp_path / "out.pth").read_bytes()
    with zipfile.ZipFile(tmp_path / "out.pth") as zf:  # each record's bytes start after its local header (parsed here)
        offsets = [info.header_offset + 30 + sum(struct.unpack_from("<HH", data, info.header_offset + 26)) for info in zf.infolist()]
    assert offsets and all(o % 64 == 0 for o in offsets), offsets
    if "mmap" in __import__("inspect").signature(torch.load).parameters:
        model = torch.load(tmp_path / "out.pth", mmap=True, map_location="cpu")["model"]
        assert model["backbone.stages.0.0.gamma"].shape == (8,)


def test_a_written_index_is_what_torch_reads(tmp_path):
    """The index is written with torch's own opcodes: torch.load rebuilds exactly the referenced tensors."""
    sd = random_state_dict(ARCH, dtype=torch.float16)
    torch.save({"model": sd}, tmp_path / "src.pth")
    convert(str(tmp_path / "src.pth"), str(tmp_path / "out.pth"), prefix="")
    loaded = torch.load(tmp_path / "out.pth", map_location="cpu")
    assert loaded["__author__"] == "convnext-d2"
    for name, tensor in loaded["model"].items():
        assert tensor.dtype == torch.float16 and torch.equal(tensor, sd[name]) and tensor.is_contiguous(), name


def test_streamed_pkl_widens_bfloat16_exactly(tmp_path):
    sd = random_state_dict(ARCH, dtype=torch.bfloat16)
    torch.save({"model": sd}, tmp_path / "src.pth")
    report = convert(str(tmp_path / "src.pth"), str(tmp_path / "out.pkl"))
    assert report.streamed and report.stored_as == {"bfloat16": "float32"}
    with open(tmp_path / "out.pkl", "rb") as f:
        data = pickle.load(f, encoding="latin1")
    got = data["model"]["backbone.stages.0.0.gamma"]
    assert got.dtype == np.float32 and torch.equal(torch.from_numpy(got), sd["stages.0.0.gamma"].float())


def test_numpy_arrays_in_the_index_are_written_from_memory_and_deflated_records_from_their_handles(tmp_path):
    """numpy arrays inside the index are in memory already (not streamed); a deflated archive's
    records are inflated (bounded, CRC-checked) and written from their handles (streamed)."""
    sd = random_state_dict(ARCH)
    torch.save({"model": {k: v.numpy() for k, v in sd.items()}}, tmp_path / "numpy.pth")
    report = convert(str(tmp_path / "numpy.pth"), str(tmp_path / "a.pth"))
    assert not report.streamed and report.kept == len(sd) - 4
    torch.save({"model": sd}, tmp_path / "plain.pth")
    with zipfile.ZipFile(tmp_path / "plain.pth") as zin, zipfile.ZipFile(tmp_path / "deflated.pth", "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info))
    for ext in (".pth", ".pkl"):
        report = convert(str(tmp_path / "deflated.pth"), str(tmp_path / f"b{ext}"))
        assert report.streamed
        assert all(torch.equal(_loaded(tmp_path / f"b{ext}")["backbone." + k], v) for k, v in sd.items() if not k.startswith(("head", "norm.")))
    convert(str(tmp_path / "plain.pth"), str(tmp_path / "c.pth"))
    assert (tmp_path / "b.pth").read_bytes() == (tmp_path / "c.pth").read_bytes(), "same records, same bytes: only the source's compression differs"


def test_a_deflated_record_that_fails_its_crc_is_refused(tmp_path):
    """A deflated record's bytes are checked against its CRC when inflated: nothing is written."""
    from conversion.errors import UnreadableCheckpoint

    torch.save({"model": random_state_dict(ARCH)}, tmp_path / "plain.pth")
    with zipfile.ZipFile(tmp_path / "plain.pth") as zin, zipfile.ZipFile(tmp_path / "deflated.pth", "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            zout.writestr(info.filename, data)
    data = bytearray((tmp_path / "deflated.pth").read_bytes())
    with zipfile.ZipFile(tmp_path / "deflated.pth") as zf:
        info = zf.getinfo(next(n for n in zf.namelist() if n.endswith("/data/3")))
    wrong = struct.pack("<I", info.CRC ^ 1)  # the CRC changed in the local header and the directory alike
    data[info.header_offset + 14:info.header_offset + 18] = wrong
    at = bytes(data).index(b"PK\x01\x02")
    while bytes(data[at + 46:at + 46 + struct.unpack_from("<H", data, at + 28)[0]]).decode() != info.filename:
        at = bytes(data).index(b"PK\x01\x02", at + 46)
    data[at + 16:at + 20] = wrong
    (tmp_path / "deflated.pth").write_bytes(bytes(data))
    for ext in (".pth", ".pkl"):
        with pytest.raises(UnreadableCheckpoint, match="data/3 (does not inflate|fails its size or CRC-32)"):
            convert(str(tmp_path / "deflated.pth"), str(tmp_path / f"out{ext}"))
    assert sorted(os.listdir(tmp_path)) == ["deflated.pth", "plain.pth"]


@pytest.mark.parametrize("ext", [".pth", ".pkl"])
def test_a_streamed_conversion_never_imports_torch(tmp_path, ext):
    """Importing torch alone costs ~640 MB resident; the streamed path must not need it."""
    torch.save({"model": random_state_dict(ARCH)}, tmp_path / "src.pth")
    code = (
        "import json, sys; from conversion.cli import main; "
        f"status = main(['convert', {str(tmp_path / 'src.pth')!r}, {str(tmp_path / ('out' + ext))!r}, '--json']); "
        "print(json.dumps({'status': status, 'torch': 'torch' in sys.modules}), file=sys.stderr)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    result = json.loads(proc.stderr.strip().splitlines()[-1])
    assert result == {"status": 0, "torch": False}, proc.stderr
    assert json.loads(proc.stdout)["streamed"] is True


@pytest.mark.parametrize("ext", [".pth", ".pkl"])
def test_a_shape_fix_of_a_non_contiguous_tensor_is_gathered_from_its_handle(tmp_path, ext):
    """torchvision's layer scale [C, 1, 1] saved as a permuted view: its reshape to [C] is no run of
    the record, so its elements are gathered in C order (a record of its own in a .pth), the rest
    still copied; the values are the reshaped tensor's, and torch reads the .pth with weights_only."""
    from conversion.layouts import from_canonical

    sd = from_canonical(random_state_dict(ARCH), "torchvision")
    name = "features.1.0.layer_scale"
    sd[name] = sd[name].reshape(1, 1, -1).permute(2, 0, 1)  # same values, strides (1, C, C)
    assert sd[name].stride() != (1, 1, 1)
    torch.save(sd, tmp_path / "src.pth")
    dst = tmp_path / f"out{ext}"
    report = convert(str(tmp_path / "src.pth"), str(dst))
    assert report.streamed is True and report.reshaped["backbone.stages.0.0.gamma"] == "[C,1,1] -> [C]"
    got = _loaded(dst)
    assert torch.equal(got["backbone.stages.0.0.gamma"], sd[name].reshape(-1))
    assert torch.equal(got["backbone.stages.1.1.gamma"], sd["features.3.1.layer_scale"].reshape(-1))
    if ext == ".pth":
        from ..support import TORCH_HAS_WEIGHTS_ONLY

        loaded = torch.load(dst, weights_only=True) if TORCH_HAS_WEIGHTS_ONLY else torch.load(dst)
        assert torch.equal(loaded["model"]["backbone.stages.0.0.gamma"], sd[name].reshape(-1))
        assert loaded["model"]["backbone.stages.0.0.gamma"].is_contiguous()


@pytest.mark.parametrize("ext", [".pth", ".pkl"])
def test_a_non_contiguous_tensor_keeps_its_strides_in_a_pth_and_is_gathered_for_a_pkl(tmp_path, ext):
    """A transposed view keeps its strides in a torch archive (the record copies as is); a
    model-zoo array is written in element order, gathered from the handle (no torch on the way)."""
    sd = random_state_dict(ARCH)
    name = "stages.1.0.pwconv1.weight"
    sd[name] = sd[name].t().contiguous().t()  # same values and shape, column-major
    assert not sd[name].is_contiguous()
    torch.save(sd, tmp_path / "src.pth")
    report = convert(str(tmp_path / "src.pth"), str(tmp_path / f"out{ext}"))
    assert report.streamed is True
    assert torch.equal(_loaded(tmp_path / f"out{ext}")["backbone." + name], sd[name])


def test_streamed_pkl_writes_slices_of_a_shared_record_exactly(tmp_path):
    """Two tensors viewing one storage (offsets 0 and n): neither is a whole record, so their bytes
    go through Python, not the kernel copy; the pickle, read by the standard unpickler, holds each
    tensor's own values."""
    sd = random_state_dict(ARCH)
    a, b = "stages.0.0.pwconv1.weight", "stages.0.0.pwconv2.weight"
    shared = torch.cat([sd[a].flatten(), sd[b].flatten()])
    sd[a], sd[b] = shared[: sd[a].numel()].view(sd[a].shape), shared[sd[a].numel():].view(sd[b].shape)
    torch.save({"model": sd}, tmp_path / "src.pth")
    report = convert(str(tmp_path / "src.pth"), str(tmp_path / "out.pkl"))
    assert report.streamed
    with open(tmp_path / "out.pkl", "rb") as f:
        got = pickle.load(f, encoding="latin1")["model"]
    for name in (a, b, "stages.1.0.pwconv1.weight"):
        assert np.array_equal(got["backbone." + name], sd[name].numpy()), name



@pytest.mark.parametrize("hole", [(1 << 31) + 100, (1 << 32) + 100], ids=["past-2-GiB", "past-4-GiB"])
def test_an_archive_past_2_and_4_gib_is_read_by_torch_and_zipfile(tmp_path, hole):
    """A first record of `hole` zero bytes (a hole in a sparse file; never read, so its CRC is left
    0): past 4 GiB its local header, the directory entries after it and the end records need zip64
    fields, past 2 GiB none (torch 1.9 refuses zip64 offsets below 4 GiB); all laid out by the
    writer's own code, and torch, zipfile and the project's reader read the tensors back."""
    import zlib

    from conversion.io.tensor_bytes import writable
    from conversion.io.torch_writer import TORCH_SMALL_RECORDS, _Entry, central_directory, encode_index
    from conversion.io.torchzip import read_index

    sd = {"backbone." + k: v for k, v in random_state_dict(ARCH).items()}
    tensors, model = writable(None, {}, sd, gather=True)
    records = [("data/unreferenced", None), ("data.pkl", encode_index({"model": model, "__author__": "x"}))]
    records += list(TORCH_SMALL_RECORDS) + [(f"data/{key}", tensors.storage_bytes(key)) for key in sorted(tensors.storages)]
    entries = []
    with open(tmp_path / "far.pth", "wb") as f:
        for name, data in records:
            entries.append(_Entry(f"archive/{name}", f.tell(), hole if data is None else len(data), 0 if data is None else zlib.crc32(data)))
            f.write(entries[-1].local_header())
            f.seek(hole, os.SEEK_CUR) if data is None else f.write(data)
        f.write(central_directory(entries, f.tell()))
    with zipfile.ZipFile(tmp_path / "far.pth") as zf:
        infos = zf.infolist()
        assert infos[0].file_size == hole and min(i.header_offset for i in infos[1:]) > hole
        assert all(zf.read(i) == dict(records)[i.filename[len("archive/"):]] for i in infos[1:])
    with open(tmp_path / "far.pth", "rb") as f:
        f.seek(-200, os.SEEK_END)
        assert (b"PK\x06\x06" in f.read()) == (hole > 1 << 32), "zip64 end records exactly where 32 bits do not hold the offset"
        f.seek(infos[0].header_offset)
        needed = struct.unpack("<4sH", f.read(6))[1]  # the local header's "version needed to extract"
    assert needed == (zipfile.ZIP64_VERSION if hole > 1 << 32 else zipfile.DEFAULT_VERSION), "the version zipfile writes"
    loaded = torch.load(tmp_path / "far.pth", map_location="cpu")["model"]
    assert list(loaded) == list(sd) and all(torch.equal(loaded[k], sd[k]) for k in sd)
    assert set(read_index(str(tmp_path / "far.pth")).objects["model"]) == set(sd)
