"""Hostile files that attack the reader's bounds rather than run code: deep or cyclic structures,
uninitialised memory, allocation bombs, objects standing in for weights, inconsistent zip headers.

Every file is built here (tests/adversarial/assemble.py).  The outcome rule for each, on every
path that reads it (convert to .pth and .pkl, inspect, repair): exit 2 with a plain one/two-line
error naming the problem, no "internal error", no traceback, and nothing left in the output
folder (no destination, no temporary file).  Deep structures that once crashed the interpreter
(hashing a deep key recurses in C) run in a child process, so a regression fails one test
instead of killing the run.
"""
from __future__ import annotations

import argparse
import io
import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import List

import pytest
import torch

from conversion.cli import main
from conversion.errors import ConversionError, UnreadableCheckpoint

from ..support import read_as_convert_does, torch_load_weights_only

from ..support.cli import EXIT_USAGE, assert_plain_error, run_cli
from . import assemble as A

CONTAINERS = ("pkl", "torch-zip", "torch-legacy")
_SUFFIX = {"pkl": ".pkl", "torch-zip": ".pth", "torch-legacy": ".pth"}


def _write(tmp_path: Path, data: bytes, container: str, name: str = "hostile") -> Path:
    (tmp_path / "in").mkdir(exist_ok=True)
    (tmp_path / "out").mkdir(exist_ok=True)
    path = tmp_path / "in" / f"{name}{_SUFFIX[container]}"
    path.write_bytes(data)
    return path


def _every_command(src: Path) -> List[List[str]]:
    out = src.parent.parent / "out"
    return [["convert", str(src), str(out / "d2.pth")], ["convert", str(src), str(out / "d2.pkl")],
            ["inspect", str(src)], ["repair", str(src), str(out / "fixed.pth")]]


def _assert_refused_everywhere(src: Path, capsys, says: str) -> None:
    for argv in _every_command(src):
        status = main(argv)
        out, err = capsys.readouterr()
        assert status == EXIT_USAGE, f"{argv[0]}: exit {status}\n{out}{err}"
        assert_plain_error(err)
        assert "internal error" not in err, err
        assert says in err, f"{argv[0]}: the error should say {says!r}:\n{err}"
        assert os.listdir(src.parent.parent / "out") == [], f"{argv[0]} left {os.listdir(src.parent.parent / 'out')}"


# ---------------------------------------------------------------- depth and cycles


@pytest.mark.parametrize("container", CONTAINERS)
@pytest.mark.parametrize("depth", [101, 5000])
def test_a_junk_entry_nested_beyond_the_depth_limit_is_refused_before_anything_is_written(container, depth, tmp_path, capsys):
    src = _write(tmp_path, A.spliced(A.nested_lists(depth), container), container)
    _assert_refused_everywhere(src, capsys, "more than 100 deep")


def test_nesting_at_the_depth_limit_is_read(tmp_path):
    """100 levels in all (the junk list is 99 deep under the top-level dict) is data: read, not refused."""
    src = _write(tmp_path, A.spliced(A.nested_lists(99), "pkl"), "pkl")
    junk = read_as_convert_does(str(src))["junk"]
    depth = 0
    while isinstance(junk, list):
        junk, depth = (junk[0] if junk else None), depth + 1
    assert depth == 99


@pytest.mark.parametrize("fragment", [A.nested_lists_top_down(5000), A.deep_frozenset(5000)], ids=["top-down-lists", "frozensets"])
@pytest.mark.parametrize("container", CONTAINERS)
def test_other_ways_to_nest_deeply_are_refused(fragment, container, tmp_path, capsys):
    src = _write(tmp_path, A.spliced(fragment, container), container)
    _assert_refused_everywhere(src, capsys, "deep")


@pytest.mark.parametrize("fragment, says", [
    (A.self_containing_list(), "contains itself"),
    (A.self_containing_dict(), "contains itself"),
    (A.mutual_cycle(), "after placing it inside another"),
], ids=["list", "dict", "two-lists"])
@pytest.mark.parametrize("container", CONTAINERS)
def test_a_structure_that_contains_itself_is_refused(fragment, says, container, tmp_path, capsys):
    src = _write(tmp_path, A.spliced(fragment, container), container)
    _assert_refused_everywhere(src, capsys, says)


@pytest.mark.parametrize("container", ["pkl", "torch-zip"])
@pytest.mark.parametrize("command", ["convert", "inspect"])
def test_a_key_nested_a_million_deep_is_refused_without_crashing(container, command, tmp_path):
    """Hashing such a key recursed in C and killed the process (exit 139, nothing on stderr)."""
    src = _write(tmp_path, A.spliced(A.deep_tuple_key(1_000_000), container), container)
    args = ["convert", src, tmp_path / "out" / "d2.pth"] if command == "convert" else ["inspect", src]

    result = run_cli(*args, cwd=tmp_path)

    assert result.returncode == EXIT_USAGE, f"exit {result.returncode}:\n{result.stderr}"
    assert_plain_error(result.stderr)
    assert "more than 100 deep" in result.stderr
    assert os.listdir(tmp_path / "out") == []


def test_a_list_nested_a_million_deep_is_refused_in_a_real_process(tmp_path):
    src = _write(tmp_path, A.spliced(A.nested_lists(1_000_000), "torch-zip"), "torch-zip")

    result = run_cli("convert", src, tmp_path / "out" / "d2.pkl", cwd=tmp_path)

    assert result.returncode == EXIT_USAGE, result.stderr
    assert_plain_error(result.stderr)
    assert os.listdir(tmp_path / "out") == []


# ---------------------------------------------------------------- objects standing in for weights


@pytest.mark.parametrize("container", ["pth", "legacy", "pkl"])
def test_a_namespace_with_shape_and_dtype_where_a_weight_should_be_is_refused_naming_it(container, tmp_path, capsys):
    """It has `shape` and `dtype` attributes; written out, torch.load(weights_only=True) would refuse the file."""
    sd = dict(A.tiny_state_dict())
    sd[A.A_WEIGHT] = argparse.Namespace(shape=(4, 3, 4, 4), dtype=torch.float32)
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    src = tmp_path / "in" / ("w.pkl" if container == "pkl" else "w.pth")
    if container == "pkl":
        src.write_bytes(pickle.dumps({"model": {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in sd.items()}}, protocol=2))
    else:
        torch.save({"model": sd}, src, _use_new_zipfile_serialization=container == "pth")

    for argv in _every_command(src):
        status = main(argv)
        err = capsys.readouterr().err
        assert status == EXIT_USAGE, err
        assert_plain_error(err)
        assert f"weight '{A.A_WEIGHT}'" in err and "argparse.Namespace" in err, err
        assert os.listdir(tmp_path / "out") == []


# ---------------------------------------------------------------- uninitialised memory


@pytest.mark.parametrize("fragment", [A.array_without_buffer(), A.reconstruct_without_state("numpy.core"),
                                      A.reconstruct_without_state("numpy._core")],
                         ids=["ndarray-no-buffer", "reconstruct-no-state-numpy1", "reconstruct-no-state-numpy2"])
@pytest.mark.parametrize("container", CONTAINERS)
def test_an_array_without_its_own_bytes_in_place_of_a_weight_is_refused(fragment, container, tmp_path, capsys):
    """torch's own weights_only allowlist accepts numpy.ndarray(shape, dtype): the output would hold heap bytes."""
    src = _write(tmp_path, A.spliced(fragment, container, where="weight"), container)
    for argv in _every_command(src):
        status = main(argv)
        err = capsys.readouterr().err
        assert status == EXIT_USAGE, f"{argv[0]}: {err}"
        assert_plain_error(err)
        assert A.A_WEIGHT in err, f"the error should name the tensor:\n{err}"
        assert os.listdir(tmp_path / "out") == []


@pytest.mark.parametrize("size, stride, offset, numel, record, says", [
    ((2, 3), (3, 1), 0, 4, 16, "reaches past its storage"),  # view larger than its storage
    ((2, 2), (2, 1), 1, 4, 16, "reaches past its storage"),  # offset pushes it past
    ((2 ** 40, 2 ** 40), (2 ** 40, 1), 0, 4, 16, "larger than"),  # a size whose product overflows 64 bits
    ((2, 2), (2, 1), 0, 4, 8, "8 bytes"),  # the record is shorter than the storage declared
    ((2, 2), (2, 1), 0, 4, 32, "32 bytes"),  # ... or longer
], ids=["view-past-storage", "offset-past-storage", "overflowing-size", "short-record", "long-record"])
def test_a_tensor_outside_its_storage_is_refused_on_the_loaded_path_too(size, stride, offset, numel, record, says, tmp_path):
    path = tmp_path / "t.pth"
    path.write_bytes(A.tensor_archive(size, stride, offset, numel, record))

    with pytest.raises(UnreadableCheckpoint, match=r"'w'") as err:
        read_as_convert_does(str(path))

    assert says in err.value.message


def test_a_well_formed_minimal_archive_reads(tmp_path):
    """Control for the cases above: the same archive with a consistent geometry reads as zeros."""
    path = tmp_path / "t.pth"
    path.write_bytes(A.tensor_archive((2, 2), (2, 1), 0, 4, 16))

    assert torch.equal(read_as_convert_does(str(path))["w"], torch.zeros(2, 2))
    assert torch.equal(torch_load_weights_only(path)["w"], torch.zeros(2, 2))  # torch agrees it is valid


# ---------------------------------------------------------------- memory out of proportion


@pytest.mark.parametrize("fragment, says", [
    (A.bytearray_of(2_500_000_000), "bytearray"),
    (A.codec_chain(22), "codec"),
], ids=["bytearray-2.5e9", "hex-codec-chain"])
@pytest.mark.parametrize("container", CONTAINERS)
def test_allocation_bombs_are_refused_before_allocating(fragment, says, container, tmp_path, capsys):
    src = _write(tmp_path, A.spliced(fragment, container), container)
    assert src.stat().st_size < 40_000
    _assert_refused_everywhere(src, capsys, says)


def test_a_shared_buffer_referenced_many_times_is_refused(tmp_path, capsys):
    """One 64 KiB bytes object turned into a bytearray 100 times over: 100x the file, refused."""
    payload = pickle.BINBYTES + struct.pack("<I", 1 << 16) + b"\0" * (1 << 16) + A.put(3)
    payload += pickle.POP + pickle.MARK + b"".join(A.call(A.global_("__builtin__", "bytearray"), A.get(3)) for _ in range(100)) + pickle.LIST
    src = _write(tmp_path, A.spliced(payload, "pkl"), "pkl")
    _assert_refused_everywhere(src, capsys, "more data than it holds")


def test_a_deflated_index_that_would_inflate_out_of_proportion_is_refused_before_inflating(tmp_path, capsys):
    src = _write(tmp_path, A.torch_zip({"model": A.tiny_state_dict()}, compress_pickle=True, pad=40 << 20), "torch-zip")
    assert src.stat().st_size < 1 << 20
    _assert_refused_everywhere(src, capsys, "inflate")


def test_a_deflated_index_within_the_bound_converts(tmp_path, capsys):
    """Control: a deflated data.pkl (not what torch writes, but valid zip) inside the stated bound converts."""
    obj = {"model": A.tiny_state_dict()}
    src = _write(tmp_path, A.torch_zip(obj, compress_pickle=True), "torch-zip")

    status = main(["convert", str(src), str(tmp_path / "out" / "d2.pth")])

    assert status == 0, capsys.readouterr().err
    written = torch_load_weights_only(tmp_path / "out" / "d2.pth")["model"]
    assert written and all(k.startswith("backbone.") for k in written)


# ---------------------------------------------------------------- zip headers as torch reads them


@pytest.mark.parametrize("field, offset, value", [
    ("method", 8, 8),  # the local header says deflated, the directory says stored
    ("flags", 6, 0),  # no data descriptor: the local header's zero CRC and sizes now claim to be real
])
@pytest.mark.parametrize("command", ["convert", "inspect"])
def test_a_local_header_that_disagrees_with_the_directory_is_refused(field, offset, value, command, tmp_path, capsys):
    """Python's zipfile reads such a file (it trusts the central directory), and so does torch 2.14's reader
    (tried when this test was written); this tool refuses the disagreement as damage, on both paths."""
    data = bytearray(A.torch_zip({"model": A.tiny_state_dict()}))
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as z:
        info = next(i for i in z.infolist() if "/data/" in i.filename)
    struct.pack_into("<H", data, info.header_offset + offset, value)
    src = _write(tmp_path, bytes(data), "torch-zip")
    with zipfile.ZipFile(src) as z:
        assert z.testzip() is None, "Python's zipfile should accept this file (else the case tests nothing)"

    argv = _every_command(src)[0] if command == "convert" else _every_command(src)[2]
    status = main(argv)
    err = capsys.readouterr().err
    assert status == EXIT_USAGE, err
    assert_plain_error(err)
    assert "local header disagrees" in err, err
    assert os.listdir(tmp_path / "out") == []


# ---------------------------------------------------------------- errors of the reader, as a library


def test_every_refusal_here_is_a_conversion_error():
    """Library level: the reader raises the project's exception types, never RecursionError or MemoryError."""
    for fragment in (A.nested_lists(5000), A.self_containing_list(), A.bytearray_of(10 ** 10), A.codec_chain(5)):
        data = A.spliced(fragment, "pkl")
        with pytest.raises(ConversionError):
            from conversion.io.safe_pickle import safe_load

            safe_load(io.BytesIO(data), size=len(data))


# ---------------------------------------------------------------- zip damage the fuzzer found


def _entries(data: bytes):
    """(name, central-directory offset, local-header offset) of every member, read structurally."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        pos, out = z.start_dir, []
        while data[pos:pos + 4] == b"PK\x01\x02":
            n, e, c = struct.unpack_from("<HHH", data, pos + 28)
            (local,) = struct.unpack_from("<I", data, pos + 42)
            out.append((data[pos + 46:pos + 46 + n].decode(), pos, local))
            pos += 46 + n + e + c
    return out


def _flip(data: bytes, at: int, mask: int = 1) -> bytes:
    b = bytearray(data)
    b[at] ^= mask
    return bytes(b)


def _member(data: bytes, suffix: str):
    return next(e for e in _entries(data) if e[0].endswith(suffix))


def _record_data(data: bytes, suffix: str) -> int:
    """Offset of a member's first data byte (after its local header)."""
    name, _, local = _member(data, suffix)
    n, e = struct.unpack_from("<HH", data, local + 26)
    return local + 30 + n + e


_ZIP_DAMAGE = {
    # found by test_hostile.py's byte-flip fuzzer (seeded and hypothesis runs): torch refuses each, zipfile reads each
    # (members every torch version writes: data.pkl, version, data/<key>; torch 2 adds .format_version...)
    "directory-name-outside-the-folder": lambda d: _flip(d, _member(d, "/version")[1] + 46),
    "small-record-local-extra-length": lambda d: _flip(d, _member(d, "/version")[2] + 29, 0x80),
    "small-record-bytes": lambda d: _flip(d, _record_data(d, "/version"), 0x80),  # "3": not a version
    "zip64-locator-disk-count": lambda d: _flip(d, d.rfind(b"PK\x06\x07") + 16),
    "directory-comment-length": lambda d: _flip(d, _member(d, "/version")[1] + 32),
    # the last entry's name length one past the directory's end: zipfile silently truncates the name
    "last-directory-name-length": lambda d: _flip(d, _entries(d)[-1][1] + 28),
}


@pytest.mark.parametrize("damage", sorted(_ZIP_DAMAGE))
def test_zip_damage_torch_refuses_is_refused(damage: str, tmp_path, capsys):
    data = _ZIP_DAMAGE[damage](A.torch_zip({"model": A.tiny_state_dict()}))
    src = _write(tmp_path, data, "torch-zip")
    with pytest.raises(Exception):  # the independent oracle: torch's own reader refuses the file
        torch_load_weights_only(src)

    for argv in _every_command(src):
        status = main(argv)
        err = capsys.readouterr().err
        assert status == EXIT_USAGE, f"{argv[0]}: exit {status}\n{err}"
        assert_plain_error(err)
        assert "corrupt" in err, err
        assert os.listdir(tmp_path / "out") == []
