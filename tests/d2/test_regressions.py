"""Each real-world failure of docs/troubleshooting.md, rebuilt exactly as the failing tool built it.

Two kinds of assertion per failure: the *fact* (Detectron2's real checkpointer really
fails, or silently loads nothing, on the broken file), so the test would notice if a
Detectron2 release changed the rule; and the *fix* (our converter never produces the
broken form, reads the broken file as a source, and its output loads cleanly).
"""
from __future__ import annotations

import argparse
import pickle

import numpy as np
import pytest
import torch

from conversion import convert
from conversion.architecture import CLASSIFIER_KEYS, Architecture
from conversion.read import ZIP_MAGIC
from conversion.synthetic import random_state_dict
from conversion.target import fresh_output_norms

from ..support import (
    TORCH_LOADS_WEIGHTS_ONLY_BY_DEFAULT,
    assert_clean_load,
    assert_loaded_equal,
    build_d2_model,
    load_with_detectron2,
    require,
    torch_load_weights_only,
)

require("detectron2")

ARCH = Architecture((1, 2, 1, 1), (8, 16, 8, 16), num_classes=4, classifier_norm=True)


@pytest.fixture
def official():
    return random_state_dict(ARCH, seed=7)


def _d2_names(sd, keep_classifier_norm=False):
    """What the user's scripts wrote: every name prefixed `backbone.`, `head.*` dropped."""
    return {"backbone." + k: v for k, v in sd.items() if not k.startswith("head.") and (keep_classifier_norm or k not in CLASSIFIER_KEYS)}


def _assert_our_conversion_loads(tmp_path, src, official, ext=".pth"):
    dst = tmp_path / f"fixed{ext}"
    report = convert(str(src), str(dst))
    model = build_d2_model(ARCH)
    assert_clean_load(load_with_detectron2(model, str(dst)), fresh_output_norms(ARCH))
    assert_loaded_equal(model, _d2_names(official))
    return report


def test_pkl_without_author_fails_in_detectron2_and_converts_with_a_note(tmp_path, official):
    """`pickle.dump({"model": tensors})` to .pkl: Detectron2 wraps it as Caffe2 blobs -> ValueError."""
    broken = tmp_path / "convnext_tiny_1k_224_d2.pkl"
    with open(broken, "wb") as f:
        pickle.dump({"model": _d2_names(official)}, f)
    with pytest.raises(ValueError, match=r"Unsupported type found in checkpoint! model: <class 'dict'>"):
        load_with_detectron2(build_d2_model(ARCH), str(broken))
    report = _assert_our_conversion_loads(tmp_path, broken, official, ".pkl")
    assert any("no '__author__'" in note for note in report.notes), report.notes


def test_torch_save_under_pkl_name_fails_in_detectron2_and_converts_with_a_note(tmp_path, official):
    """The documented "fix": torch.save output named .pkl -> UnpicklingError (persistent id)."""
    broken = tmp_path / "convnext_tiny_1k_224_d2_new.pkl"
    torch.save({"model": _d2_names(official)}, broken)
    with pytest.raises(pickle.UnpicklingError, match="persistent id"):
        load_with_detectron2(build_d2_model(ARCH), str(broken))
    report = _assert_our_conversion_loads(tmp_path, broken, official, ".pkl")
    assert any("torch.save archive under a .pkl name" in note for note in report.notes), report.notes


@pytest.mark.parametrize("ext", [".pkl", ".pth", ".pt"])
def test_converter_never_writes_a_torch_archive_under_pkl(tmp_path, official, ext):
    """Our .pkl is a plain pickle with `__author__` (never a zip); our .pth is a torch archive."""
    torch.save({"model": official}, tmp_path / "src.pth")
    dst = tmp_path / f"out{ext}"
    convert(str(tmp_path / "src.pth"), str(dst))
    is_zip = dst.read_bytes()[:4] == ZIP_MAGIC
    assert is_zip == (ext != ".pkl")
    if ext == ".pkl":
        with open(dst, "rb") as f:
            data = pickle.load(f, encoding="latin1")  # exactly how Detectron2 reads it
        assert data["__author__"] and "matching_heuristics" not in data
        assert all(isinstance(v, np.ndarray) for v in data["model"].values())


def test_pkl_with_author_loads_in_detectron2_with_exact_names(tmp_path, official):
    """The fact behind the diagnosis: pickled tensors are fine once `__author__` is there."""
    path = tmp_path / "with_author.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": _d2_names(official), "__author__": "x"}, f)
    model = build_d2_model(ARCH)
    assert_clean_load(load_with_detectron2(model, str(path)), fresh_output_norms(ARCH))
    assert_loaded_equal(model, _d2_names(official))


def test_pth_without_backbone_prefix_loads_nothing_silently(tmp_path, official):
    """Names without `backbone.`: Detectron2 loads nothing and only warns; training would start from random."""
    path = tmp_path / "no_prefix.pth"
    torch.save({"model": {k: v for k, v in official.items() if k not in CLASSIFIER_KEYS}}, path)
    result = load_with_detectron2(build_d2_model(ARCH), str(path))  # no exception: that is the danger
    backbone_keys = [k for k in build_d2_model(ARCH).state_dict()]
    assert sorted(result.missing) == sorted(backbone_keys), "every backbone weight stays random"
    _assert_our_conversion_loads(tmp_path, path, official)


def test_classifier_norm_kept_by_the_users_converter_is_unused_and_output_norms_missing(tmp_path, official):
    """The "180 kept" file: `backbone.norm.*` is unexpected; our output drops it."""
    path = tmp_path / "convnext_tiny_22k_1k_224_d2.pth"
    torch.save({"model": _d2_names(official, keep_classifier_norm=True)}, path)
    result = load_with_detectron2(build_d2_model(ARCH), str(path))
    assert sorted(result.unexpected) == ["backbone.norm.bias", "backbone.norm.weight"]
    report = _assert_our_conversion_loads(tmp_path, path, official)
    assert sorted(report.dropped) == ["backbone.norm.bias", "backbone.norm.weight"]


def test_namespace_in_pth_breaks_detectron2_on_torch_2_6_but_converts(tmp_path, official):
    """torch >= 2.6 loads with weights_only=True; a training checkpoint with `args` no longer loads as is."""
    path = tmp_path / "checkpoint-best.pth"
    torch.save({"model": official, "epoch": 299, "args": argparse.Namespace(model="convnext_tiny")}, path)
    if TORCH_LOADS_WEIGHTS_ONLY_BY_DEFAULT:
        with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
            load_with_detectron2(build_d2_model(ARCH), str(path))
    else:  # torch < 2.6 unpickles anything: the file loads (with nothing matching, official names)
        assert load_with_detectron2(build_d2_model(ARCH), str(path)).unexpected
    _assert_our_conversion_loads(tmp_path, path, official)


def test_numpy_arrays_in_pth_break_detectron2_on_torch_2_6_but_convert(tmp_path, official):
    """A .pth of numpy arrays is refused by weights_only loading; we read it and write tensors only."""
    path = tmp_path / "numpy.pth"
    torch.save({"model": {k: v.numpy() for k, v in _d2_names(official).items()}}, path)
    if TORCH_LOADS_WEIGHTS_ONLY_BY_DEFAULT:
        with pytest.raises(pickle.UnpicklingError):
            load_with_detectron2(build_d2_model(ARCH), str(path))
    else:  # torch < 2.6 reads numpy arrays in a .pth, and Detectron2 converts them
        assert sorted(load_with_detectron2(build_d2_model(ARCH), str(path)).missing) == sorted(fresh_output_norms(ARCH))
    _assert_our_conversion_loads(tmp_path, path, official)
    data = torch_load_weights_only(tmp_path / "fixed.pth")
    assert all(type(v) is torch.Tensor for v in data["model"].values())
