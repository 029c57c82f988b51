"""The streamed path (torch archive -> .pth/.pkl without loading tensors): same result once loaded
as the same weights read whole from a legacy file, torch-free, small reads, 64-byte aligned
records, and a read-back that catches corruption.  (The round-trip and property suites run on
both kinds of source as well.)"""
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
from conversion.errors import VerificationFailed
from conversion.inspection import inspect_checkpoint
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
    with open(tmp_path / "out.pth", "rb") as f, zipfile.ZipFile(f) as zf:
        from conversion.stream import _data_offset

        offsets = [_data_offset(f, info) for info in zf.infolist()]
    assert offsets and all(o % 64 == 0 for o in offsets), offsets
    if "mmap" in __import__("inspect").signature(torch.load).parameters:
        model = torch.load(tmp_path / "out.pth", mmap=True, map_location="cpu")["model"]
        assert model["backbone.stages.0.0.gamma"].shape == (8,)


def test_streamed_pkl_widens_bfloat16_exactly(tmp_path):
    sd = random_state_dict(ARCH, dtype=torch.bfloat16)
    torch.save({"model": sd}, tmp_path / "src.pth")
    report = convert(str(tmp_path / "src.pth"), str(tmp_path / "out.pkl"))
    assert report.streamed and report.stored_as == {"bfloat16": "float32"}
    with open(tmp_path / "out.pkl", "rb") as f:
        data = pickle.load(f, encoding="latin1")
    got = data["model"]["backbone.stages.0.0.gamma"]
    assert got.dtype == np.float32 and torch.equal(torch.from_numpy(got), sd["stages.0.0.gamma"].float())


@pytest.mark.parametrize("ext", [".pth", ".pkl"])
def test_a_streamed_file_that_reads_back_different_is_never_installed(tmp_path, monkeypatch, ext):
    from conversion.io import crc

    torch.save({"model": random_state_dict(ARCH)}, tmp_path / "src.pth")
    real = crc.ReadBack.crcs  # the read-back of the written file (the source's own check is left alone)
    monkeypatch.setattr(crc.ReadBack, "crcs", lambda self, fd, ranges: [c ^ 1 for c in real(self, fd, ranges)])  # as if one byte differed on disk
    with pytest.raises(VerificationFailed, match="does not read back as written"):
        convert(str(tmp_path / "src.pth"), str(tmp_path / f"out{ext}"))
    assert sorted(os.listdir(tmp_path)) == ["src.pth"]


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


def test_inspect_reads_only_the_index(tmp_path):
    """A 100 MB file is inspected by reading well under 1 MiB of it."""
    arch = Architecture((3, 3, 9, 3), (96, 192, 384, 768), num_classes=1000, classifier_norm=True)
    torch.save({"model": random_state_dict(arch)}, tmp_path / "tiny.pth")
    report = inspect_checkpoint(str(tmp_path / "tiny.pth"))
    assert report.file_bytes > 100e6 and report.bytes_read is not None and report.bytes_read < 1 << 20, report.bytes_read


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


def test_a_shape_applied_to_a_handle_is_data_a_new_stride_or_a_recorded_reshape():
    """Contiguous views get the new shape and its C-order strides; a non-contiguous view keeps its
    strides and records the reshape (read later in C order); tensors and arrays are reshaped."""
    from conversion.io.handles import StorageRef, TensorRef, is_contiguous, numel, with_shape

    ref = TensorRef(StorageRef("0", "FloatStorage", 24), 0, (2, 3, 4), (12, 4, 1))
    assert with_shape(ref, (6, 4)) == TensorRef(ref.storage, 0, (6, 4), (4, 1))
    assert with_shape(ref, (1, 1, 1, 24)).stride == (24, 24, 24, 1)
    assert numel(ref) == 24 and ref.dtype == "float32" and is_contiguous(with_shape(ref, (24,)))
    assert not any(hasattr(ref, m) for m in ("reshape", "numel", "ndim", "is_contiguous"))
    transposed = TensorRef(ref.storage, 0, (4, 3, 2), (1, 4, 12))
    fixed = with_shape(transposed, (24,))
    assert fixed == TensorRef(ref.storage, 0, (24,), (1, 4, 12), strided_shape=(4, 3, 2)) and not is_contiguous(fixed)
    assert with_shape(fixed, (4, 6)) == TensorRef(ref.storage, 0, (4, 6), (1, 4, 12), strided_shape=(4, 3, 2))
    assert with_shape(fixed, (4, 3, 2)).shape == (4, 3, 2) and numel(fixed) == 24
    with pytest.raises(ValueError, match="24 elements"):
        with_shape(ref, (5, 5))
    assert with_shape(np.arange(6), (2, 3)).shape == (2, 3) and with_shape(torch.zeros(6), (3, 2)).shape == (3, 2)


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


def test_the_index_refuses_anything_but_tensor_data(tmp_path):
    """The streamed reader's allowlist: a global outside it is refused, naming the file."""
    from conversion.errors import UnsafeCheckpoint
    from conversion.stream import read_index

    torch.save({"model": random_state_dict(ARCH), "hook": print}, tmp_path / "x.pth")
    with pytest.raises(UnsafeCheckpoint, match=r"x\.pth: refusing to load: the file asks to build '(__builtin__|builtins).print'"):  # protocol 2 spells builtins the Python 2 way
        read_index(str(tmp_path / "x.pth"))


def test_a_written_index_is_what_torch_reads(tmp_path):
    """The index is written with torch's own opcodes: torch.load rebuilds exactly the referenced tensors."""
    sd = random_state_dict(ARCH, dtype=torch.float16)
    torch.save({"model": sd}, tmp_path / "src.pth")
    convert(str(tmp_path / "src.pth"), str(tmp_path / "out.pth"), prefix="")
    loaded = torch.load(tmp_path / "out.pth", map_location="cpu")
    assert loaded["__author__"] == "convnext-d2"
    for name, tensor in loaded["model"].items():
        assert tensor.dtype == torch.float16 and torch.equal(tensor, sd[name]) and tensor.is_contiguous(), name


def _record_data_start(data: bytes, member: str) -> int:
    """Where a stored member's bytes start, from its local header (parsed here, not by the project)."""
    at = data.index(b"PK\x03\x04")  # the first local header; torch writes them in order, stored
    while True:
        name_len, extra_len = struct.unpack_from("<HH", data, at + 26)
        name = data[at + 30:at + 30 + name_len].decode()
        size = struct.unpack_from("<I", data, at + 22)[0]
        if name == member:
            return at + 30 + name_len + extra_len
        at = data.index(b"PK\x03\x04", at + 30 + name_len + extra_len + size)


@pytest.mark.parametrize("ext", [".pth", ".pkl"])
def test_a_source_record_that_fails_its_crc_is_refused_as_a_corrupt_source(tmp_path, ext):
    """One byte of a kept tensor's record flipped on disk, the directory's CRC left as it was (what a
    bad disk or transfer does): the bytes are copied in the kernel without being read, so the one
    read-back pass must catch it, and blame the source (exit 2 class), leaving nothing."""
    from conversion.errors import UnreadableCheckpoint

    sd = random_state_dict(ARCH)
    torch.save({"model": sd}, tmp_path / "src.pth")
    with zipfile.ZipFile(tmp_path / "src.pth") as zf:
        members = [n for n in zf.namelist() if "/data/" in n]
    data = bytearray((tmp_path / "src.pth").read_bytes())
    member = members[len(members) // 2]  # a record in the middle: not the first one the threads finish
    at = _record_data_start(bytes(data), member) + 5
    data[at] ^= 0x40
    (tmp_path / "src.pth").write_bytes(bytes(data))
    with pytest.raises(UnreadableCheckpoint, match=r"src\.pth: record data/\d+ fails its CRC-32: the archive is corrupt"):
        convert(str(tmp_path / "src.pth"), str(tmp_path / f"out{ext}"))
    assert sorted(os.listdir(tmp_path)) == ["src.pth"]


@pytest.mark.parametrize("ext", [".pth", ".pkl"])
def test_one_copied_record_gone_wrong_among_many_is_caught(tmp_path, monkeypatch, ext):
    """The read-back runs on a pool of threads while later records are still copied: a single
    record gone wrong in its copy (one byte flipped in the written file), with ten records before it
    already being read back and more after it, still fails the conversion."""
    from conversion import stream

    torch.save({"model": random_state_dict(ARCH)}, tmp_path / "src.pth")
    real_copy, copied = stream._copy_range, []

    def copy_and_remember(src_fd, dst_fd, src_offset, count):  # where each copied record landed
        real_copy(src_fd, dst_fd, src_offset, count)
        start = os.lseek(dst_fd, 0, os.SEEK_CUR) - count
        copied.append((start, count))
        if len(copied) == 11:  # the eleventh record: a bad copy, before the writer reports it
            os.pwrite(dst_fd, bytes([os.pread(dst_fd, 1, start + count // 2)[0] ^ 0x01]), start + count // 2)

    monkeypatch.setattr(stream, "_copy_range", copy_and_remember)
    with pytest.raises(VerificationFailed, match="does not read back as written"):
        convert(str(tmp_path / "src.pth"), str(tmp_path / f"out{ext}"))
    assert len(copied) > 20, "every kept record is copied in the kernel, for .pkl too"
    assert sorted(os.listdir(tmp_path)) == ["src.pth"]


@pytest.mark.parametrize("workers", [1, 2, 7])
def test_crcs_of_ranges_equal_zlib_over_each_slice(tmp_path, monkeypatch, workers):
    """Ranges of every size around the read window (empty, one byte, window +- 1, several windows),
    at unaligned starts, in any number of threads: each CRC equals zlib's over that slice."""
    import zlib

    from conversion.io import crc

    monkeypatch.setattr(crc, "_CRC_WORKERS", workers)
    window = crc._CRC_WINDOW
    blob = np.random.default_rng(0).integers(0, 256, 3 * window + 1000, dtype=np.uint8).tobytes()
    (tmp_path / "blob").write_bytes(blob)
    ranges = [(0, 0), (3, 1), (17, window - 1), (1, window), (5, window + 1), (999, 3 * window), (len(blob) - 10, 10)]
    with open(tmp_path / "blob", "rb") as f:
        got = crc.crcs_of_ranges(f.fileno(), ranges)
        with pytest.raises(EOFError):
            crc.crcs_of_ranges(f.fileno(), [(0, 1), (len(blob) - 5, 10)])
    assert got == [zlib.crc32(blob[s:s + n]) for s, n in ranges]


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
