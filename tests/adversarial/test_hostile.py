"""Hostile sources: nothing in a checkpoint runs.

Every hostile pickle here is assembled opcode by opcode (the `pickle` module's own constants), so
each asks for exactly the call it is named after: `os.system`, `exec`, `subprocess.Popen`, a
`__setstate__` with a side effect, `torch.load` re-entered with `weights_only=False`, an
extension-registry code, a persistent id... Each would create a sentinel file if it ran, and each
is tried three ways: as a plain pickle, as the `data.pkl` of a real torch zip archive (the other
members kept), and as the main pickle of a legacy (pre-1.6) torch file.  One test loads every one
of them with the *unsafe* loaders (plain `pickle`, `torch.load(weights_only=False)`) in a throwaway
process and requires the sentinel to appear: the corpus really is hostile, so its refusal means
something.

Malformed sources are in test_malformed_bytes.py (mutated bytes), test_unreadable_sources.py (special
files, absurd safetensors headers, broken torch archives) and test_foreign_dtypes.py.
The files are built by `assemble.py` (the corpus and its pickle assembler); the outcome rule and its
independent decoder are `judge.py`.
"""
from __future__ import annotations

import collections
import copyreg
import json
import os
import pickle
import pickletools
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from conversion.cli import main
from conversion.errors import ConversionError, UnsafeCheckpoint

from ..support import read_as_convert_does, require, require_weights_only_decoder

require_weights_only_decoder()

from ..support.cli import EXIT_USAGE, PROCESS_TIMEOUT_S, ROOT, assert_plain_error
from .assemble import (
    CONTAINERS, EXT_CODES, EXTRA_CONTAINERS, HERE, HOSTILE_CASES, PAYLOADS, Ctx, HostileCase, build_hostile, call,
    global_, globals_named, list_, program, small_int, text, tuple_,
)
from .judge import leftovers


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
    from ..support.cli import run_cli

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
