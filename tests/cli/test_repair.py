"""`repair`: one regression test per documented broken Detectron2 file, each built exactly as the
failing tool built it (the failures of docs/troubleshooting.md).  For each: Detectron2's real checkpointer fails (or silently
loads nothing) on the broken file, `repair` names the cause, and the repaired file loads through
`DetectionCheckpointer` with nothing unexpected and every tensor equal to the source.
"""
from __future__ import annotations

import json
import pickle
import re
import sys
import types

import numpy as np
import pytest
import torch

from conversion.architecture import Architecture
from conversion.cli import main
from conversion.d2_prediction import NUMPY_CORE, installed_stack
from conversion.pipeline import repair
from conversion.synthetic import random_state_dict

from ..support import (
    CLASSIFIER_NAMES,
    TORCH_LOADS_WEIGHTS_ONLY_BY_DEFAULT,
    assert_clean_load,
    assert_loaded_equal,
    build_d2_model,
    load_with_detectron2,
    output_norm_names,
    require,
)

require("detectron2")

ARCH = Architecture((1, 2, 1, 1), (8, 16, 8, 16), num_classes=4, classifier_norm=True)
OFFICIAL = random_state_dict(ARCH, seed=11)
# What the user's converter wrote: `backbone.` names, head dropped, the pooled norm kept (the "180 kept").
USER_NAMES = {"backbone." + k: v for k, v in OFFICIAL.items() if not k.startswith("head.")}
BACKBONE = {"backbone." + k: v for k, v in OFFICIAL.items() if k not in CLASSIFIER_NAMES}


def _numpy(sd):
    return {k: v.numpy() for k, v in sd.items()}


def _pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def _numpy2_pickle(path, obj):
    """Pickle arrays the way numpy >= 2 does: through `numpy._core.multiarray._reconstruct`.

    numpy 1.26 (the full environment) pickles through `numpy.core...`; a stand-in module under
    the numpy 2 name makes the standard pickler write numpy 2's global, byte for byte.
    """
    real = np.core.multiarray._reconstruct

    def _reconstruct(*args):
        return real(*args)

    _reconstruct.__module__, _reconstruct.__qualname__ = "numpy._core.multiarray", "_reconstruct"
    fake = types.ModuleType("numpy._core.multiarray")
    fake._reconstruct = _reconstruct
    saved = sys.modules.get("numpy._core.multiarray")
    sys.modules["numpy._core.multiarray"] = fake

    class Numpy2Pickler(pickle.Pickler):
        def reducer_override(self, o):
            if type(o) is np.ndarray:
                fn, args, state = o.__reduce__()
                return (_reconstruct, args, state)
            return NotImplemented

    try:
        with open(path, "wb") as f:
            Numpy2Pickler(f, protocol=4).dump(obj)
    finally:
        if saved is not None:
            sys.modules["numpy._core.multiarray"] = saved
        else:
            del sys.modules["numpy._core.multiarray"]


# (id, file name, how the failing tool wrote it, the error Detectron2 raises (None: loads nothing silently), cause fragment)
BROKEN = [
    ("pkl-without-author", "convnext_tiny_1k_224_d2.pkl", lambda p: _pickle(p, {"model": USER_NAMES}),
     (ValueError, "Unsupported type found in checkpoint! model: <class 'dict'>"), "no '__author__'"),
    ("torch-archive-named-pkl", "convnext_tiny_1k_224_d2_new.pkl", lambda p: torch.save({"model": USER_NAMES}, p),
     (pickle.UnpicklingError, "persistent id"), "torch.save archive under a .pkl name"),
    ("model-nested-in-model", "nested.pth", lambda p: torch.save({"model": {"model": USER_NAMES}}, p),
     (ValueError, "Unsupported type found in checkpoint! model: <class 'dict'>"), "'model' holds another container"),
    ("training-dict-without-model", "checkpoint.pth",
     lambda p: torch.save({"epoch": 12, "state_dict": USER_NAMES, "optimizer": {"state": {}}}, p),
     (ValueError, "Unsupported type found in checkpoint! epoch: <class 'int'>"), "no top-level 'model'"),
    ("names-without-backbone-prefix", "no_prefix.pth",
     lambda p: torch.save({"model": {k: v for k, v in OFFICIAL.items() if not k.startswith("head.")}}, p),
     None, "lack the 'backbone.' prefix"),
    ("classifier-keys-kept", "convnext_tiny_22k_1k_224_d2.pth", lambda p: torch.save({"model": USER_NAMES}, p),
     None, "classifier tensors backbone.norm.bias, backbone.norm.weight"),
    ("numpy-arrays-in-pth", "numpy.pth", lambda p: torch.save({"model": _numpy(BACKBONE)}, p),
     (pickle.UnpicklingError, "Weights only load failed"), "holds ndarray objects"),
    ("pkl-pickled-by-numpy-2", "numpy2.pkl", lambda p: _numpy2_pickle(p, {"model": _numpy(BACKBONE), "__author__": "someone"}),
     None, "pickled by numpy >= 2"),
]


@pytest.mark.parametrize("case,name,build,d2_error,cause", BROKEN, ids=[b[0] for b in BROKEN])
def test_repair_fixes_each_documented_failure(tmp_path, case, name, build, d2_error, cause):
    broken = tmp_path / name
    build(broken)
    if case == "numpy-arrays-in-pth" and not TORCH_LOADS_WEIGHTS_ONLY_BY_DEFAULT:
        # torch < 2.6 unpickles numpy arrays: Detectron2 loads the file as it is, so nothing is repaired here
        load_with_detectron2(build_d2_model(ARCH), str(broken))
        assert not repair(str(broken), str(tmp_path / "fixed.pth")).repaired
        return
    if d2_error is not None:  # the fact: Detectron2 really fails on the broken file
        with pytest.raises(d2_error[0], match=re.escape(d2_error[1])):
            load_with_detectron2(build_d2_model(ARCH), str(broken))
    elif case not in ("pkl-pickled-by-numpy-2", "numpy-arrays-in-pth"):  # the silent kind: it loads, but not cleanly
        result = load_with_detectron2(build_d2_model(ARCH), str(broken))
        assert result.unexpected, "the broken file should leave keys unused"
    if case == "pkl-pickled-by-numpy-2" and installed_stack().numpy >= NUMPY_CORE:
        # numpy >= 1.26 reads numpy 2's pickles: the file loads as it is here, so nothing is repaired
        assert not repair(str(broken), str(tmp_path / "fixed.pth")).repaired
        return
    for ext in (".pth", ".pkl"):
        fixed = tmp_path / f"fixed{ext}"
        report = repair(str(broken), str(fixed))
        assert report.repaired and any(cause in c for c in report.causes), report.causes
        model = build_d2_model(ARCH)
        result = load_with_detectron2(model, str(fixed))
        assert_clean_load(result, output_norm_names())
        assert_loaded_equal(model, BACKBONE)
        assert b"numpy._core" not in fixed.read_bytes()


def test_a_file_that_is_already_fine_is_reported_fine_and_left_alone(tmp_path, capsys):
    good = tmp_path / "good.pth"
    torch.save({"model": OFFICIAL}, tmp_path / "src.pth")
    assert main(["convert", str(tmp_path / "src.pth"), str(good)]) == 0
    before = good.read_bytes()
    capsys.readouterr()
    assert main(["repair", str(good), str(tmp_path / "out.pth"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["repaired"], data["causes"], data["conversion"]) == (False, [], None), data
    assert not (tmp_path / "out.pth").exists() and good.read_bytes() == before


def test_repair_cli_names_the_cause_and_exits_0(tmp_path, capsys):
    broken = tmp_path / "broken.pkl"
    _pickle(broken, {"model": USER_NAMES})
    assert main(["repair", str(broken), str(tmp_path / "fixed.pkl"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["repaired"] is True and any("no '__author__'" in c for c in data["causes"]), data["causes"]
    assert data["conversion"]["destination"] == str(tmp_path / "fixed.pkl") and (tmp_path / "fixed.pkl").is_file()


def test_repair_refuses_to_overwrite_without_force(tmp_path, capsys):
    broken = tmp_path / "broken.pkl"
    _pickle(broken, {"model": USER_NAMES})
    (tmp_path / "fixed.pth").write_bytes(b"keep")
    assert main(["repair", str(broken), str(tmp_path / "fixed.pth")]) == 2
    assert (tmp_path / "fixed.pth").read_bytes() == b"keep"
    assert main(["repair", str(broken), str(tmp_path / "fixed.pth"), "--force"]) == 0


def test_repair_json_report(tmp_path, capsys):
    broken = tmp_path / "broken.pkl"
    _pickle(broken, {"model": USER_NAMES})
    assert main(["repair", str(broken), str(tmp_path / "fixed.pth"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["repaired"] is True and data["causes"] and data["conversion"]["kept"] == len(BACKBONE)


@pytest.mark.parametrize("ext", [".pth", ".pkl"])
def test_repairing_a_torch_archive_streams_it_as_convert_does(tmp_path, ext):
    """A torch archive is repaired the way `convert` converts it (index rewritten, records copied), so
    repairing a multi-GB file costs what converting it costs: the two outputs are the same bytes."""
    from conversion import convert

    broken = tmp_path / "no_prefix.pth"
    torch.save({"model": OFFICIAL}, broken)

    repaired = repair(str(broken), str(tmp_path / f"repaired{ext}"))
    converted = convert(str(broken), str(tmp_path / f"converted{ext}"))

    assert repaired.causes and repaired.conversion is not None
    assert repaired.conversion.streamed and converted.streamed
    assert (tmp_path / f"repaired{ext}").read_bytes() == (tmp_path / f"converted{ext}").read_bytes()
