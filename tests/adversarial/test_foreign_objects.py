"""Training checkpoints whose non-weight parts hold objects of foreign classes, and numpy arrays
pickled under either numpy.

The safe reader replaces every object of a class outside the allowlist by an inert placeholder
that records the dotted class name; the module is never imported, nothing of the class is
called.  The conversion then goes on, and the report lists what was read past.  A placeholder
where a weight should be is refused naming the weight.  Files are written the way each library's
users save them (torch.save of the training dict), with the real classes where they install here.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import sys
import types
from pathlib import Path

import pytest
import torch

from conversion import convert
from conversion.cli import main
from conversion.errors import UnreadableCheckpoint

from ..support import read_as_convert_does, require, torch_load_weights_only
from ..support.cli import EXIT_USAGE, assert_plain_error
from . import assemble as A



class TrainingConfig:
    """A custom config class, as projects keep their hyper-parameters (lives only in this test module)."""

    def __init__(self, lr: float) -> None:
        self.lr = lr


class AttributeDict(dict):
    """Lightning's hyper_parameters type is a dict subclass like this one (Lightning does not install here)."""


def _importable_only_here(module: str, *classes: type) -> None:
    """Register `classes` under a module name that exists only in this process while saving."""
    fake = types.ModuleType(module)
    for cls in classes:
        cls.__module__, cls.__qualname__ = module, cls.__name__
        setattr(fake, cls.__name__, cls)
    parts = module.split(".")
    for i in range(1, len(parts)):  # the parent packages, for the pickler's import of the module
        sys.modules.setdefault(".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    sys.modules[module] = fake


def _forget(module: str) -> None:
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        sys.modules.pop(".".join(parts[:i]), None)


def _training_checkpoint() -> dict:
    """A checkpoint as an mmengine / Lightning training run saves it, with foreign objects beside the weights."""
    mmengine = require("mmengine")
    from mmengine.logging import HistoryBuffer

    buffer = HistoryBuffer()
    buffer.update(0.5)
    _importable_only_here("lightning_like.callbacks", TrainingConfig, AttributeDict)
    return {
        "meta": {"epoch": 3, "mmengine_version": mmengine.__version__},
        "state_dict": A.tiny_state_dict(),
        "message_hub": {"log_scalars": {"train/loss": buffer}},
        "hyper_parameters": AttributeDict(lr=0.004, config=TrainingConfig(0.004)),
        "callbacks": {"ModelCheckpoint": TrainingConfig(1.0)},
        "args": argparse.Namespace(model="convnext_tiny", lr=0.004),
    }


READ_PAST = {
    "message_hub.log_scalars.train/loss": "mmengine.logging.history_buffer.HistoryBuffer",
    "hyper_parameters": "lightning_like.callbacks.AttributeDict",
    "callbacks.ModelCheckpoint": "lightning_like.callbacks.TrainingConfig",
    "args": "argparse.Namespace",
}


@pytest.fixture
def training_file(tmp_path: Path, request) -> Path:
    path = tmp_path / "epoch_3.pth"
    legacy = getattr(request, "param", "zip") == "legacy"
    try:
        torch.save(_training_checkpoint(), path, _use_new_zipfile_serialization=not legacy)
    finally:
        _forget("lightning_like.callbacks")  # reading must not find the classes
    return path


@pytest.mark.parametrize("training_file", ["zip", "legacy"], indirect=True)
@pytest.mark.parametrize("ext", [".pth", ".pkl"])
def test_a_training_checkpoint_with_foreign_objects_converts_and_lists_them(training_file: Path, ext: str, tmp_path: Path):
    modules_before = set(sys.modules)

    report = convert(str(training_file), str(tmp_path / f"d2{ext}"))

    assert report.read_past == READ_PAST
    assert not {m for m in set(sys.modules) - modules_before if m.startswith(("lightning_like", "mmengine"))}, "a foreign module was imported"
    assert report.container == "state_dict" and report.kept > 0
    if ext == ".pth":  # what Detectron2 on torch >= 2.6 does with the output
        written = torch_load_weights_only(tmp_path / "d2.pth")
        assert set(written) == {"model", "__author__"}


def test_read_past_objects_appear_in_the_json_report(training_file: Path, tmp_path: Path, capsys):
    status = main(["convert", str(training_file), str(tmp_path / "d2.pth"), "--json"])

    out = capsys.readouterr().out
    assert status == 0
    assert json.loads(out)["read_past"] == READ_PAST


def test_the_human_summary_names_the_classes_read_past(training_file: Path, tmp_path: Path, capsys):
    status = main(["convert", str(training_file), str(tmp_path / "d2.pth")])

    out = capsys.readouterr().out
    line = next((l for l in out.splitlines() if l.strip().startswith("read past")), "")
    assert status == 0
    assert f"{len(READ_PAST)} non-weight objects" in line, out
    for dotted in sorted(set(READ_PAST.values()))[:6]:
        assert dotted in line, (dotted, line)


def test_nothing_of_a_foreign_class_is_called(tmp_path: Path):
    """__new__, __init__, __setstate__ and __reduce__ of the saved classes are never reached."""
    calls = []

    class Loud:
        def __init__(self) -> None:
            self.x = 1

        def __setstate__(self, state):  # would run on an ordinary unpickle
            calls.append("setstate")
            self.__dict__.update(state)

    _importable_only_here("loud_module", Loud)
    try:
        data = pickle.dumps({"model": {k: v.numpy() for k, v in A.tiny_state_dict().items()}, "extra": Loud()}, protocol=2)
        pickle.loads(data)
        assert calls == ["setstate"], "control: an ordinary unpickle calls it"
        calls.clear()
        src = tmp_path / "w.pkl"
        src.write_bytes(data)
        loaded = read_as_convert_does(str(src))
    finally:
        _forget("loud_module")

    assert calls == []
    assert type(loaded["extra"]).__name__ == "Placeholder" and loaded["extra"].cls == "loud_module.Loud"


@pytest.mark.parametrize("container", ["pkl", "torch-zip", "torch-legacy"])
def test_a_placeholder_where_a_weight_should_be_is_refused_naming_the_weight(container: str, tmp_path: Path, capsys):
    fragment = A.call(A.global_("mmengine.logging.history_buffer", "HistoryBuffer"))
    src = tmp_path / f"w{'.pkl' if container == 'pkl' else '.pth'}"
    src.write_bytes(A.spliced(fragment, container, where="weight"))

    status = main(["convert", str(src), str(tmp_path / "d2.pth")])

    err = capsys.readouterr().err
    assert status == EXIT_USAGE, err
    assert_plain_error(err)
    assert f"weight '{A.A_WEIGHT}'" in err and "mmengine.logging.history_buffer.HistoryBuffer" in err, err
    assert not (tmp_path / "d2.pth").exists()


# ---------------------------------------------------------------- using a placeholder to run code


_ROUTES = {
    # a placeholder class as the callable of REDUCE whose arguments run code
    "placeholder-call-with-code-in-args": A.call(A.global_("foreign", "Thing"), A.call(A.global_("os", "system"), A.text("touch SENTINEL"))),
    # BUILD on a placeholder with a state that would run code
    "placeholder-build-with-code-in-state": A.call(A.global_("foreign", "Thing")) + A.call(A.global_("builtins", "exec"), A.text("open('SENTINEL','w')")) + b"b",
    # a placeholder as a storage's type, as the storage of a tensor, and as an array's dtype
    "placeholder-as-storage-type": A.call(A.global_("torch._utils", "_rebuild_tensor_v2"),
                                           b"(" + A.text("storage") + A.global_("foreign", "Storage") + A.text("0") + A.text("cpu") + A.integer(4) + b"tQ",
                                           A.integer(0), b"(" + A.integer(4) + b"t", b"(" + A.integer(1) + b"t", b"\x89", A.call(A.global_("collections", "OrderedDict"))),
    "placeholder-as-tensor-storage": A.call(A.global_("torch._utils", "_rebuild_tensor_v2"), A.call(A.global_("foreign", "Thing")),
                                             A.integer(0), b"(" + A.integer(4) + b"t", b"(" + A.integer(1) + b"t"),
    "placeholder-as-array-dtype": A.call(A.global_("numpy", "ndarray"), b"(" + A.integer(2) + b"t", A.call(A.global_("foreign", "Dtype")),
                                          pickle.SHORT_BINBYTES + b"\x08" + b"\0" * 8),
    # a dotted name that walks from a class to a module's globals
    "placeholder-dotted-to-globals": A.global_("foreign", "Thing.__init__.__globals__"),
    # a placeholder standing in for copyreg's reconstructor base that is really a function
    "reconstructor-with-function-base": A.call(A.global_("copyreg", "_reconstructor"), A.global_("foreign", "Thing"),
                                               A.global_("os", "system"), A.text("touch SENTINEL")),
}


@pytest.mark.parametrize("route", sorted(_ROUTES))
@pytest.mark.parametrize("container", ["pkl", "torch-zip", "torch-legacy"])
def test_routes_through_a_placeholder_run_no_code(route: str, container: str, tmp_path: Path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = tmp_path / f"w{'.pkl' if container == 'pkl' else '.pth'}"
    src.write_bytes(A.spliced(_ROUTES[route], container, where="weight"))
    (tmp_path / "out").mkdir()

    status = main(["convert", str(src), str(tmp_path / "out" / "d2.pth")])

    err = capsys.readouterr().err
    assert not (tmp_path / "SENTINEL").exists(), "code from the file ran"
    assert status == EXIT_USAGE, err
    assert_plain_error(err)
    assert "internal error" not in err
    assert os.listdir(tmp_path / "out") == []


# ---------------------------------------------------------------- numpy 1 and numpy 2 spellings


def _numpy_pickle(core: str, protocol: int) -> bytes:
    """{'model': arrays, '__author__', a numpy scalar} pickled by numpy itself, its multiarray module spelled `core`."""
    np = require("numpy")
    payload = {"model": {k: v.numpy() for k, v in A.tiny_state_dict().items()}, "__author__": "x", "mean": np.float64(0.5)}
    return _respell(pickle.dumps(payload, protocol=protocol), core)


@pytest.mark.parametrize("core", ["numpy.core", "numpy._core"])
@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("container", ["pkl", "torch-zip", "torch-legacy"])
def test_numpy_arrays_pickled_under_numpy_1_or_2_read_under_the_installed_numpy(core, protocol, container, tmp_path):
    np = require("numpy")
    sd = A.tiny_state_dict()
    if container == "pkl":
        data = _numpy_pickle(core, protocol)
    else:  # a .pth holding numpy arrays (some tools save them), on both torch container formats
        buf = io.BytesIO()
        torch.save({"model": {k: v.numpy() for k, v in sd.items()}, "mean": np.float64(0.5)}, buf,
                   _use_new_zipfile_serialization=container == "torch-zip")
        raw = buf.getvalue()
        if container == "torch-zip":
            data = A.rezip(raw, lambda name, d: _respell(d, core) if name.endswith("/data.pkl") else d)
        else:
            data = _respell(raw, core)
    src = tmp_path / ("w.pkl" if container == "pkl" else "w.pth")
    src.write_bytes(data)
    assert (core + ".multiarray").encode() in data

    loaded = read_as_convert_does(str(src))

    assert set(loaded["model"]) == set(sd)
    for k, v in sd.items():
        assert np.array_equal(np.asarray(loaded["model"][k]), v.numpy()), k
    assert float(loaded["mean"]) == 0.5
    for ext in (".pth", ".pkl"):
        report = convert(str(src), str(tmp_path / f"d2{ext}"), force=True)
        assert report.kept > 0


def _respell(data: bytes, core: str) -> bytes:
    """The pickle(s) with numpy's multiarray module named as numpy 1 (numpy.core) or numpy 2
    (numpy._core) names it, whichever numpy wrote them.  Frames are dropped first (a protocol-4
    pickle is valid without them), so names may change length; torch files keep no offsets into
    their pickles."""
    import pickletools

    out, start = bytearray(), 0
    for opcode, _arg, pos in pickletools.genops(io.BytesIO(data)) if data[:1] == pickle.PROTO and data[1:2] == b"\x04" else ():
        if opcode.name == "FRAME":
            out += data[start:pos]
            start = pos + 9
    data = bytes(out + data[start:])
    other = "numpy._core" if core == "numpy.core" else "numpy.core"
    old, new = f"{other}.multiarray", f"{core}.multiarray"
    data = data.replace(f"{old}\n".encode(), f"{new}\n".encode())
    return data.replace(b"\x8c" + bytes([len(old)]) + old.encode(), b"\x8c" + bytes([len(new)]) + new.encode())


def test_an_array_that_numpy_would_refuse_is_an_unreadable_checkpoint(tmp_path):
    """A numpy spelling with an object dtype (numpy would run arbitrary __reduce__ for its items)."""
    src = tmp_path / "w.pkl"
    src.write_bytes(A.spliced(A.call(A.global_("numpy", "ndarray"), b"(" + A.integer(1) + b"t", A.text("|O"),
                                     pickle.SHORT_BINBYTES + b"\x08" + b"\0" * 8), "pkl", where="weight"))

    with pytest.raises(UnreadableCheckpoint, match="not plain numeric data"):
        read_as_convert_does(str(src))
