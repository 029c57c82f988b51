"""Hostile and malformed sources: nothing in a checkpoint runs, and a broken one never half-converts.

Every hostile pickle here is assembled opcode by opcode (the `pickle` module's own constants), so
each asks for exactly the call it is named after: `os.system`, `exec`, `subprocess.Popen`, a
`__setstate__` with a side effect, `torch.load` re-entered with `weights_only=False`, an
extension-registry code, a persistent id... Each would create a sentinel file if it ran, and each
is tried three ways: as a plain pickle, as the `data.pkl` of a real torch zip archive (the other
members kept), and as the main pickle of a legacy (pre-1.6) torch file.  One test loads every one
of them with the *unsafe* loaders (plain `pickle`, `torch.load(weights_only=False)`) in a throwaway
process and requires the sentinel to appear: the corpus really is hostile, so its refusal means
something.

Malformed sources are derived from valid ones: truncated at a spread of offsets, bytes flipped
(seeded and hypothesis-driven), spans deleted, inserted or duplicated, special files (FIFO,
symlink loop, devices, unreadable), absurd safetensors headers, foreign dtypes.  For all of them
the only outcomes allowed are a `ConversionError`, or a conversion whose output holds exactly the
tensors the (mutated) source decodes to; never another exception, never a partial output.

The files are built by `assemble.py` (the corpus and its pickle assembler); the outcome rule and its
independent decoder are `judge.py`.
"""
from __future__ import annotations

import collections
import copyreg
import io
import json
import os
import pickle
import pickletools
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conversion import convert
from conversion.cli import main
from conversion.errors import ConversionError, UnreadableCheckpoint, UnsafeCheckpoint

from ..support import TORCH_HAS_WEIGHTS_ONLY, read_as_convert_does, require

if not TORCH_HAS_WEIGHTS_ONLY:
    # The corpus's oracle decodes every file independently with torch's own weights_only reader (and
    # builds tensors of dtypes torch 1.9 lacks); on such torch the reader itself is covered by
    # tests/io/test_read.py's restricted-pickle-module cases.
    pytest.skip("the hostile corpus needs torch >= 1.13 (weights_only) as its independent decoder", allow_module_level=True)

from ..cli.test_cli import ROOT, assert_plain_error
from .assemble import (
    CONTAINERS, EXT_CODES, EXTRA_CONTAINERS, HERE, HOSTILE_CASES, PAYLOADS, Ctx, HostileCase, build_hostile, call,
    global_, globals_named, list_, program, small_int, text, torch_bytes, tuple_,
)
from .judge import (
    FUZZ_FORMATS, convert_and_judge, judge_bytes, leftovers, read_output, same_bits, suffix, tiny_state_dict, valid_source,
)

EXIT_USAGE = 2
TEMP_PREFIX = ".convnext-d2-"  # write.py's temporary files beside the destination
# A real process imports torch (~2 s); a hung one must not hang the suite.
PROCESS_TIMEOUT_S = 120
# How long a reader may take on a tiny special file before it counts as hanging.
HANG_S = 2.0


# ================================================================ fixtures


@pytest.fixture(scope="module")
def sentinels(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The one folder every payload of the module would write its sentinel into.

    Checked once more after the module's last test: a payload that spawned a process
    (subprocess.Popen) would create its file late.
    """
    folder = tmp_path_factory.mktemp("sentinels")
    yield folder
    late = sorted(os.listdir(folder))
    assert late == [], f"code from hostile files ran (sentinels found after the module): {late}"


@pytest.fixture
def extension_registry() -> Iterator[None]:
    """Register the EXT payloads' codes (os.system and friends), as a hostile environment might have.

    Unregistered, an EXT opcode is merely unreadable; registered, it reaches find_class like GLOBAL does.
    """
    added = []
    try:
        for code, module, name in EXT_CODES.values():
            copyreg.add_extension(module, name, code)
            added.append((module, name, code))
        yield
    finally:
        for module, name, code in added:
            copyreg.remove_extension(module, name, code)


# ================================================================ the hostile corpus is hostile


_UNSAFE_LOADER = r"""
import copyreg, json, os, pickle, sys, time, torch
manifest = json.load(open(sys.argv[1]))
for code, module, name in manifest["ext"]:
    copyreg.add_extension(module, name, code)
for item in manifest["files"]:
    try:
        with open(item["path"], "rb") as f:
            if item["loader"] == "pickle":
                pickle.load(f)
            else:
                torch.load(f, weights_only=False)
    except BaseException:
        pass
deadline = time.time() + 10  # Popen payloads finish in the background
while time.time() < deadline and not all(os.path.exists(i["sentinel"]) for i in manifest["files"]):
    time.sleep(0.05)
print(json.dumps([i["id"] for i in manifest["files"] if os.path.exists(i["sentinel"])]))
"""


def test_every_hostile_file_runs_code_when_loaded_the_unsafe_way(tmp_path: Path):
    """Plain pickle (Detectron2's .pkl reader) and torch.load(weights_only=False) run every payload: the corpus is real."""
    sentinel_dir = tmp_path / "sentinels"
    sentinel_dir.mkdir()
    files = []
    for case in HOSTILE_CASES:
        if not PAYLOADS[case.payload].runs_unsafely:
            continue
        folder = tmp_path / case.id.replace("/", "_")
        folder.mkdir()
        built = build_hostile(case, folder, sentinel_dir)
        loader = "pickle" if case.spec()[0].endswith((".pkl", ".safetensors")) else "torch"
        files.append({"id": case.id, "path": str(built.path), "sentinel": str(built.sentinel), "loader": loader})
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"files": files, "ext": list(EXT_CODES.values())}))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))

    result = subprocess.run([sys.executable, "-c", _UNSAFE_LOADER, str(manifest)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=PROCESS_TIMEOUT_S)

    assert result.returncode == 0, result.stderr[-3000:]
    ran = set(json.loads(result.stdout.strip().splitlines()[-1]))
    not_run = sorted(f["id"] for f in files if f["id"] not in ran)
    assert not_run == [], f"these files would not run code even when loaded unsafely, so they prove nothing: {not_run}"


@pytest.mark.parametrize("name", list(PAYLOADS))
def test_every_hand_made_program_is_well_formed(name: str, tmp_path: Path):
    """Control: each program parses to its STOP, so a refusal is about what it asks for, not broken bytes."""
    payload = PAYLOADS[name]
    whole = program(payload.build(Ctx(str(tmp_path / "sentinel"), tmp_path)), payload.proto)

    named = globals_named(whole)

    assert whole.endswith(pickle.STOP)
    opcodes = {op.name for op, _, _ in pickletools.genops(whole)}
    assert named or opcodes & {"EXT1", "EXT2", "EXT4", "PERSID", "BINPERSID"}, f"{name} names no global and no extension"


def test_containers_carry_a_benign_program_unchanged():
    """Control: with a harmless program in the slot, each container reads back, so a refusal is the payload's doing."""
    benign = program(call(global_("collections", "OrderedDict"), list_(tuple_(text("epoch"), small_int(7)))), 2)
    # The other legacy slots hold the protocol number, sys_info and the key list, not a dict.
    checked = {**CONTAINERS, "torch-zip-deflated-member": EXTRA_CONTAINERS["torch-zip-deflated-member"],
               "pickle-named-.safetensors": EXTRA_CONTAINERS["pickle-named-.safetensors"]}
    for name, (_, wrap) in checked.items():
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "benign.bin"
            path.write_bytes(wrap(benign))
            loaded = read_as_convert_does(str(path))
        assert loaded == {"model": collections.OrderedDict(epoch=7)}, f"{name}: {loaded!r}"


# ================================================================ the hostile corpus is refused


# Payloads whose global is a class outside the allowlist (not a function whose only use is to run
# code): the reader builds an inert placeholder recording the class name, never calling
# __new__, __init__ or __setstate__.  payload -> the class name recorded.
READ_PAST = {
    "logging.FileHandler": "logging.FileHandler",
    "NEWOBJ": f"{HERE}.TouchOnNew",
    "NEWOBJ_EX": f"{HERE}.TouchOnNew",
    "BUILD-__setstate__": f"{HERE}.TouchOnSetstate",
    "copyreg._reconstructor": f"{HERE}.TouchOnInit",
}


@pytest.mark.parametrize("case", HOSTILE_CASES, ids=[c.id for c in HOSTILE_CASES])
def test_hostile_file_is_refused_by_the_reader_and_runs_nothing(case: HostileCase, tmp_path: Path, sentinels: Path,
                                                              extension_registry: None):
    hostile = build_hostile(case, tmp_path, sentinels)

    if case.payload in READ_PAST:
        # A class outside the allowlist is read past: an inert placeholder naming it, nothing called.
        loaded = read_as_convert_does(str(hostile.path))["model"]  # program puts the payload under 'model'
        assert not hostile.sentinel.exists(), f"{case.id}: code from the file ran"
        assert type(loaded).__name__ == "Placeholder" and loaded.cls == READ_PAST[case.payload], repr(loaded)
        return
    with pytest.raises(ConversionError) as err:
        read_as_convert_does(str(hostile.path))

    assert not hostile.sentinel.exists(), f"{case.id}: code from the file ran"
    # Every file here asks for something other than tensor data: "unsafe", not merely "unreadable".
    assert isinstance(err.value, UnsafeCheckpoint), f"{case.id}: {type(err.value).__name__}: {err.value}"
    assert str(hostile.path) in err.value.message, f"the error should name the file: {err.value.message}"


@pytest.mark.parametrize("case", HOSTILE_CASES, ids=[c.id for c in HOSTILE_CASES])
def test_hostile_file_through_the_cli_exits_2_and_leaves_nothing(case: HostileCase, tmp_path: Path, sentinels: Path,
                                                                 extension_registry: None, monkeypatch, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    hostile = build_hostile(case, tmp_path / "in", sentinels)
    monkeypatch.chdir(tmp_path)

    status = main(["convert", os.path.relpath(hostile.path), "out/model_d2.pth"])

    out, err = capsys.readouterr()
    assert not hostile.sentinel.exists(), f"{case.id}: code from the file ran"
    assert status == EXIT_USAGE, f"exit status {status}:\n{err}"
    assert_plain_error(err)
    assert "internal error" not in err, f"a hostile file is the user's input, not a bug:\n{err}"
    assert out == "", out
    assert leftovers(tmp_path / "out") == [], "a destination or temporary file was left"




@pytest.mark.parametrize(
    "payload, container, names",
    [
        ("os.system", "pickle", "os.system"),
        pytest.param("os.system", "torch-zip", "system"),
        pytest.param("os.system", "torch-legacy", "system"),
        pytest.param("INST", "torch-zip", "os.system"),
        pytest.param("_load_from_bytes-inner-zip", "pickle", "system"),
        ("builtins.exec", "torch-zip", "exec"),
    ],
)
def test_refusal_names_what_the_file_asked_for(payload: str, container: str, names: str, tmp_path: Path, sentinels: Path):
    """The user reads *what* was refused (the callable, or the opcode torch does not support), whatever the container."""
    hostile = build_hostile(HostileCase(payload, container), tmp_path, sentinels)

    with pytest.raises(UnsafeCheckpoint) as err:
        read_as_convert_does(str(hostile.path))

    assert names in err.value.message, f"the refusal does not say what was refused: {err.value.message}"


def test_a_hostile_file_is_refused_by_a_real_process(tmp_path: Path, sentinels: Path):
    """The most elaborate payload (torch.load re-entered with weights_only=False) as a user's shell sees it."""
    from ..cli.test_cli import run_cli

    (tmp_path / "out").mkdir()
    hostile = build_hostile(HostileCase("torch.load-weights_only=False-via-partial", "pickle"), tmp_path, sentinels)

    result = run_cli("convert", hostile.path.name, "out/model_d2.pkl", cwd=tmp_path)

    assert not hostile.sentinel.exists(), "code from the file ran"
    assert result.returncode == EXIT_USAGE, result.stderr
    assert_plain_error(result.stderr)
    assert "refusing" in result.stderr and "functools.partial" in result.stderr, result.stderr
    assert leftovers(tmp_path / "out") == []


def test_a_hostile_pickle_after_a_valid_one_is_never_parsed(tmp_path: Path, sentinels: Path, monkeypatch, capsys):
    """Only the first pickle of a plain-pickle file is read (as pickle.load does); trailing bytes stay inert."""
    hostile = build_hostile(HostileCase("os.system", "pickle"), tmp_path, sentinels)
    hostile.path.write_bytes(pickle.dumps({"epoch": 3}, protocol=2) + hostile.path.read_bytes())
    (tmp_path / "out").mkdir()
    monkeypatch.chdir(tmp_path)

    assert read_as_convert_does(str(hostile.path)) == {"epoch": 3}
    status = main(["convert", hostile.path.name, "out/model_d2.pth"])

    assert not hostile.sentinel.exists(), "code from the trailing pickle ran"
    assert status == EXIT_USAGE and "no state dict" in capsys.readouterr().err
    assert leftovers(tmp_path / "out") == []


# ================================================================ malformed files: the outcome rule (judge.py)


@pytest.mark.parametrize("fmt", FUZZ_FORMATS)
def test_control_every_valid_source_converts_faithfully(fmt: str, tmp_path: Path):
    """Control for the mutation tests: the unbroken files convert, and the judge accepts them."""
    src = tmp_path / f"source{suffix(fmt)}"
    src.write_bytes(valid_source(fmt))
    (tmp_path / "out").mkdir()

    assert convert_and_judge(src, tmp_path / "out") == "converted"


# ---------------------------------------------------------------- truncation


def truncation_offsets(size: int) -> List[int]:
    """About 30 lengths: the first bytes (magic, headers), an even spread, and the last bytes (zip directory)."""
    near_start = [0, 1, 2, 3, 4, 7, 8, 9, 16, 64]
    spread = [size * i // 14 for i in range(1, 14)]
    near_end = [size - 1, size - 2, size - 10, size - 22, size - 23, size - 100, size - 1000]
    return sorted({n for n in near_start + spread + near_end if 0 <= n < size})


@pytest.mark.parametrize("fmt", FUZZ_FORMATS)
def test_truncated_file_is_refused_or_converted_faithfully(fmt: str):
    """A download cut short at any of ~30 offsets: a ConversionError, never another exception, a partial file or a
    conversion (every cut loses at least the last byte: a pickle's STOP, a zip's directory, safetensors' data)."""
    data = valid_source(fmt)
    offsets = truncation_offsets(len(data))
    outcomes = {length: judge_bytes(data[:length], fmt) for length in offsets}
    assert len(offsets) >= 20, offsets
    converted = sorted(length for length, outcome in outcomes.items() if outcome == "converted")
    assert converted == [], f"a {fmt} file cut to these lengths (of {len(data)}) converted: {converted}"


# ---------------------------------------------------------------- byte flips


def _flip(data: bytes, positions: List[int], masks: List[int]) -> bytes:
    out = bytearray(data)
    for pos, mask in zip(positions, masks):
        out[pos] ^= mask
    return bytes(out)


def _structural_position(rng: random.Random, size: int) -> int:
    """Flips land in headers and directories as often as in tensor bytes (those are where parsers break)."""
    region = rng.choice(("anywhere", "head", "tail"))
    if region == "head":
        return rng.randrange(min(size, 600))
    if region == "tail":
        return rng.randrange(max(0, size - 600), size)
    return rng.randrange(size)


SEEDED_FLIPS_PER_FORMAT = 30


@pytest.mark.parametrize("fmt", FUZZ_FORMATS)
def test_seeded_byte_flips_are_refused_or_converted_faithfully(fmt: str):
    """1-8 flipped bytes (a fixed, seeded set per format): a ConversionError or a faithful output."""
    data = valid_source(fmt)
    rng = random.Random(f"flips-{fmt}")
    for _ in range(SEEDED_FLIPS_PER_FORMAT):
        n = rng.randint(1, 8)
        positions = [_structural_position(rng, len(data)) for _ in range(n)]
        masks = [rng.randint(1, 255) for _ in range(n)]
        judge_bytes(_flip(data, positions, masks), fmt, rng.choice((".pth", ".pkl")))  # asserts the outcome rule


# Hypothesis: at least 40 examples per format and property, more under the nightly profile.
_FUZZ_SETTINGS = settings(max_examples=max(40, settings().max_examples))


@st.composite
def flips(draw: Any, fmt: str) -> Tuple[bytes, str]:
    """(a valid `fmt` file with 1-8 bytes flipped, destination extension)."""
    data = valid_source(fmt)
    size = len(data)
    position = st.one_of(st.integers(0, size - 1), st.integers(0, min(size, 600) - 1), st.integers(max(0, size - 600), size - 1))
    n = draw(st.integers(1, 8))
    positions = draw(st.lists(position, min_size=n, max_size=n))
    masks = draw(st.lists(st.integers(1, 255), min_size=n, max_size=n))
    return _flip(data, positions, masks), draw(st.sampled_from((".pth", ".pkl")))


@pytest.mark.parametrize("fmt", FUZZ_FORMATS)
@_FUZZ_SETTINGS
@given(data=st.data())
def test_byte_flips_end_in_a_conversion_error_or_a_faithful_output(fmt: str, data: st.DataObject):
    """Hypothesis flips 1-8 bytes of a valid file: never another exception, a partial output or a wrong tensor."""
    mutated, ext = data.draw(flips(fmt))
    judge_bytes(mutated, fmt, ext)


@st.composite
def splices(draw: Any, fmt: str) -> bytes:
    """A valid `fmt` file with a span deleted, random bytes inserted, or a span duplicated."""
    data = valid_source(fmt)
    start = draw(st.integers(0, len(data) - 1))
    length = draw(st.integers(1, 64))
    kind = draw(st.sampled_from(("delete", "insert", "duplicate")))
    if kind == "delete":
        return data[:start] + data[start + length:]
    if kind == "insert":
        return data[:start] + draw(st.binary(min_size=1, max_size=64)) + data[start:]
    return data[:start] + data[start:start + length] * 2 + data[start + length:]


@pytest.mark.parametrize("fmt", FUZZ_FORMATS)
@_FUZZ_SETTINGS
@given(data=st.data())
def test_spliced_files_end_in_a_conversion_error_or_a_faithful_output(fmt: str, data: st.DataObject):
    """Spans deleted, inserted or duplicated: the same rule as for flips."""
    judge_bytes(data.draw(splices(fmt)), fmt)


# ================================================================ special files


def _refused_by_cli_leaving_nothing(src: str, folder: Path, capsys) -> str:
    """Run `convert SRC out/model_d2.pth` in-process from `folder`; require exit 2, plain lines, nothing written."""
    out_dir = folder / "out"
    out_dir.mkdir(exist_ok=True)
    old = os.getcwd()
    os.chdir(folder)
    try:
        status = main(["convert", src, "out/model_d2.pth"])
    finally:
        os.chdir(old)
    out, err = capsys.readouterr()
    assert status == EXIT_USAGE, f"exit status {status}:\n{err}"
    assert_plain_error(err)
    assert "internal error" not in err, err
    assert leftovers(out_dir) == [], "a destination or temporary file was left"
    return err


def test_a_fifo_source_is_refused_without_blocking(tmp_path: Path):
    """A named pipe (e.g. left by a download script) is refused at once instead of hanging the CLI."""
    fifo = tmp_path / "weights.pth"
    os.mkfifo(fifo)
    result: Dict[str, BaseException] = {}

    def read() -> None:
        try:
            read_as_convert_does(str(fifo))
        except BaseException as err:  # noqa: BLE001 - recorded and judged below
            result["error"] = err

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(HANG_S)
    blocked = reader.is_alive()
    if blocked:  # release it: a writer that closes at once gives the blocked open() an end of file
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        reader.join(10)

    assert not blocked, f"reading blocked on a FIFO for more than {HANG_S} s"
    assert isinstance(result.get("error"), UnreadableCheckpoint), result


def test_a_symlink_loop_is_refused(tmp_path: Path, capsys):
    (tmp_path / "a.pth").symlink_to("b.pth")
    (tmp_path / "b.pth").symlink_to("a.pth")

    with pytest.raises(UnreadableCheckpoint):
        read_as_convert_does(str(tmp_path / "a.pth"))
    err = _refused_by_cli_leaving_nothing("a.pth", tmp_path, capsys)
    assert "a.pth" in err, err


@pytest.mark.parametrize("device", ["/dev/null", "/dev/zero"])
def test_a_character_device_is_refused(device: str, tmp_path: Path, capsys):
    """Devices read as empty or as endless zero bytes: refused, not hung, not converted."""
    if not os.path.exists(device):
        pytest.skip(f"{device} does not exist on this system")
    with pytest.raises(UnreadableCheckpoint):
        read_as_convert_does(device)
    _refused_by_cli_leaving_nothing(device, tmp_path, capsys)


def _can_drop_dac_override() -> bool:
    """As root, `setpriv` can drop CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH so that file modes apply again."""
    if shutil.which("setpriv") is None:
        return False
    probe = subprocess.run(["setpriv", *_NO_DAC, "true"], capture_output=True, timeout=30)
    return probe.returncode == 0


_NO_DAC = ["--bounding-set", "-dac_override,-dac_read_search", "--inh-caps", "-dac_override,-dac_read_search"]


def test_a_source_without_read_permission_exits_2_naming_the_cause(tmp_path: Path, capsys):
    src = tmp_path / "locked.pth"
    src.write_bytes(valid_source("pth-zip"))
    src.chmod(0)
    if os.geteuid() != 0:
        err = _refused_by_cli_leaving_nothing("locked.pth", tmp_path, capsys)
        assert "ermission" in err, err
        return
    if not _can_drop_dac_override():
        pytest.skip("running as root: permissions are not enforced (and setpriv cannot drop CAP_DAC_OVERRIDE here)")
    (tmp_path / "out").mkdir()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run(["setpriv", *_NO_DAC, sys.executable, "-m", "conversion", "convert", "locked.pth", "out/model_d2.pth"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=PROCESS_TIMEOUT_S)
    assert result.returncode == EXIT_USAGE, result.stderr
    assert_plain_error(result.stderr)
    assert "ermission denied" in result.stderr, result.stderr
    assert leftovers(tmp_path / "out") == []


# ================================================================ absurd safetensors headers


def _safetensors(header: bytes, declared: Optional[int] = None, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header) if declared is None else declared) + header + data


def _st_header(**tensors: Tuple[str, List[int], List[int]]) -> bytes:
    return json.dumps({k: {"dtype": d, "shape": s, "data_offsets": o} for k, (d, s, o) in tensors.items()}).encode()


SAFETENSORS_CASES = {
    "declared-length-2**64-1": _safetensors(b"{}", declared=2**64 - 1),
    "declared-length-just-over-the-sniffing-limit": _safetensors(b'{"a": 1}', declared=100_000_001),
    "declared-length-at-the-limit-on-a-tiny-file": _safetensors(b"{}", declared=100_000_000),
    "declared-length-beyond-the-file": _safetensors(b'{"__metadata__": {}}', declared=4096),
    "header-not-json": _safetensors(b"{not json at all}"),
    "header-is-a-list": _safetensors(b"{}"[:1] + b"]"),
    "data-offsets-beyond-the-file": _safetensors(_st_header(w=("F32", [4], [0, 1_000_000_000])), data=bytes(16)),
    "shape-product-overflows": _safetensors(_st_header(w=("F32", [2**62, 2**62], [0, 16])), data=bytes(16)),
    "shape-disagrees-with-offsets": _safetensors(_st_header(w=("F32", [8], [0, 16])), data=bytes(16)),
    "unknown-dtype": _safetensors(_st_header(w=("F99", [4], [0, 16])), data=bytes(16)),
    "overlapping-tensors": _safetensors(_st_header(a=("F32", [4], [0, 16]), b=("F32", [4], [8, 24])), data=bytes(24)),
    "negative-offsets": _safetensors(_st_header(w=("F32", [4], [-16, 0])), data=bytes(16)),
}


@pytest.mark.parametrize("name", list(SAFETENSORS_CASES))
def test_absurd_safetensors_header_is_refused(name: str, tmp_path: Path, capsys):
    """Header lengths and offsets that lie: a ConversionError, no allocation of the declared size, nothing written."""
    require("safetensors")
    src = tmp_path / "weights.safetensors"
    src.write_bytes(SAFETENSORS_CASES[name])

    with pytest.raises(ConversionError):
        read_as_convert_does(str(src))
    _refused_by_cli_leaving_nothing(src.name, tmp_path, capsys)


# ================================================================ broken torch archives


def _rewrite_zip(data: bytes, change: Callable[[str, bytes], Optional[bytes]], extra: Tuple[Tuple[str, bytes], ...] = ()) -> bytes:
    """Rebuild a zip member by member; `change(name, content)` returns new content, or None to drop it."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as zin, zipfile.ZipFile(out, "w") as zout:
        for info in zin.infolist():
            content = change(info.filename, zin.read(info))
            if content is not None:
                zout.writestr(zipfile.ZipInfo(info.filename, date_time=(1980, 1, 1, 0, 0, 0)), content)
        for name, content in extra:
            zout.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), content)
    return out.getvalue()


def _first_storage(data: bytes) -> str:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return next(n for n in z.namelist() if "/data/" in n and not n.endswith(".pkl"))


def _central_entry(data: bytes, name: str) -> int:
    """Offset of `name`'s central-directory record."""
    i = data.index(b"PK\x01\x02")
    while True:
        length = struct.unpack("<H", data[i + 28:i + 30])[0]
        if data[i + 46:i + 46 + length] == name.encode():
            return i
        i = data.index(b"PK\x01\x02", i + 4)


def _patched(data: bytes, offset: int, new: bytes) -> bytes:
    return data[:offset] + new + data[offset + len(new):]


def _archive_case(kind: str) -> bytes:
    import warnings

    data = valid_source("pth-zip")
    storage = _first_storage(data)
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        local_header = z.getinfo(storage).header_offset
    keep = lambda name, content: content  # noqa: E731
    if kind == "missing-data.pkl":
        return _rewrite_zip(data, lambda n, c: None if n.endswith("/data.pkl") else c)
    if kind == "missing-storage-record":
        return _rewrite_zip(data, lambda n, c: None if n == storage else c)
    if kind == "short-storage-record":
        return _rewrite_zip(data, lambda n, c: c[: len(c) // 2] if n == storage else c)
    if kind == "long-storage-record":
        return _rewrite_zip(data, lambda n, c: c + bytes(64) if n == storage else c)
    if kind == "missing-version":
        return _rewrite_zip(data, lambda n, c: None if n.endswith("/version") and "format" not in n else c)
    if kind == "version-999":
        return _rewrite_zip(data, lambda n, c: b"999\n" if n.endswith("/version") and "format" not in n else c)
    if kind == "byteorder-big":
        return _rewrite_zip(data, lambda n, c: b"big" if n.endswith("/byteorder") else c)
    if kind == "byteorder-nonsense":
        return _rewrite_zip(data, lambda n, c: b"middle" if n.endswith("/byteorder") else c)
    if kind == "duplicate-data.pkl":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zipfile warns about the duplicate name: that is the point
            return _rewrite_zip(data, keep, extra=((storage.rsplit("/data/", 1)[0] + "/data.pkl", pickle.dumps({"model": {}})),))
    if kind == "data.pkl-is-garbage":
        return _rewrite_zip(data, lambda n, c: b"\x80\x02garbage" if n.endswith("/data.pkl") else c)
    if kind == "central-directory-only":
        return b"PK\x03\x04" + bytes(26) + data[-22:]
    # byte-level damage that keeps the archive's layout (what a bad disk or transfer does)
    if kind == "data.pkl-crc-mismatch":  # one name changed inside data.pkl; torch itself does not check CRCs
        i = data.index(b"downsample_layers.0.0.weight")
        return _patched(data, i + 27, b"u")
    if kind == "storage-local-header-magic":
        return _patched(data, local_header, b"PK\x00\x00")
    if kind == "storage-extra-field-beyond-file":
        return _patched(data, local_header + 28, b"\xff\xff")
    if kind == "member-name-not-utf8":
        return _patched(data, data.rindex(b"/byteorder") + 1, b"\xff")
    if kind == "zip-version-needed-9.9":
        return _patched(data, _central_entry(data, data_pkl_name(data)) + 6, struct.pack("<H", 99))
    if kind == "central-directory-sizes-huge":
        entry = _central_entry(data, storage)
        return _patched(data, entry + 20, struct.pack("<II", 0xFFFFFF00, 0xFFFFFF00))
    raise ValueError(kind)


def data_pkl_name(data: bytes) -> str:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return next(n for n in z.namelist() if n.endswith("/data.pkl"))


ARCHIVE_CASES = ["missing-data.pkl", "missing-storage-record", "short-storage-record", "long-storage-record",
                 "missing-version", "version-999", "byteorder-big", "byteorder-nonsense", "duplicate-data.pkl",
                 "data.pkl-is-garbage", "central-directory-only", "data.pkl-crc-mismatch", "storage-local-header-magic",
                 "storage-extra-field-beyond-file", "member-name-not-utf8", "zip-version-needed-9.9",
                 "central-directory-sizes-huge"]
ARCHIVE_PARAMS = [pytest.param(kind, ext, id=f"{kind}->{ext}") for kind in ARCHIVE_CASES for ext in (".pth", ".pkl")]


@pytest.mark.parametrize("kind, ext", ARCHIVE_PARAMS)
def test_broken_torch_archive_is_refused_or_converted_faithfully(kind: str, ext: str, tmp_path: Path):
    """Archives with members missing, short, long, duplicated, misnamed or lying about their layout: the outcome rule."""
    src = tmp_path / "weights.pth"
    src.write_bytes(_archive_case(kind))
    (tmp_path / "out").mkdir()

    convert_and_judge(src, tmp_path / "out", ext)


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
    from ..cli.test_cli import run_cli

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
