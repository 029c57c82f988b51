"""Round trips through Detectron2's real DetectionCheckpointer (`pytest -k roundtrip` is the quick gate).

Each test: build an official-layout checkpoint, convert it, pre-fill the real backbone
with a sentinel, load with `DetectionCheckpointer.load`, then require (a) only the fresh
output norms missing, nothing unexpected, nothing shape-skipped, no other checkpointer
warning, and (b) every tensor of the model equal to the source.
"""
from __future__ import annotations

import os
import tempfile

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conversion import convert
from conversion.architecture import CLASSIFIER_KEYS, RELEASED_VARIANTS, Architecture
from conversion.synthetic import random_state_dict
from conversion.target import fresh_output_norms

from .. import strategies as S
from ..support import (
    assert_clean_load,
    assert_loaded_equal,
    build_d2_model,
    fill_with_sentinel,
    load_with_detectron2,
    require,
)

require("detectron2")


@pytest.fixture(scope="module", params=["zip", "legacy"])
def source_kind(request):
    """Every round trip runs on both kinds of torch file: a zip archive (its storage bytes copied into
    the output) and a legacy pre-1.6 file (read whole, tensors written with torch.save / pickle)."""
    return request.param

SMALL = Architecture((2, 1, 3, 1), (8, 16, 24, 32), num_classes=5, classifier_norm=True)
FORMATS = (".pth", ".pkl", ".pt")


def _expected_model_state(sd, prefix="backbone."):
    return {prefix + k: v for k, v in sd.items() if k not in CLASSIFIER_KEYS}


def _roundtrip(tmpdir, arch, container_obj, source_weights, ext, kind, *, ema=False, out_features=None):
    src = os.path.join(tmpdir, "source.pth")
    torch.save(container_obj, src, _use_new_zipfile_serialization=kind == "zip")
    dst = os.path.join(tmpdir, "converted" + ext)
    report = convert(src, dst, ema=ema)
    assert report.streamed == (kind == "zip"), "the writer under test was not the one taken"
    model = build_d2_model(arch, out_features)
    fill_with_sentinel(model)
    result = load_with_detectron2(model, dst)
    expected_missing = fresh_output_norms(arch, out_features or ("res2", "res3", "res4", "res5"))
    assert_clean_load(result, expected_missing)
    assert_loaded_equal(model, _expected_model_state(source_weights))
    return report, model


@pytest.mark.parametrize("ext", [".pth", ".pkl"])  # .pt is the same writer as .pth: small tests cover it
def test_roundtrip_convnext_tiny_released_file(source_kind, tmp_path, ext):
    """A released-style `{"model": ...}` ConvNeXt-Tiny file loads cleanly in every output format."""
    depths, dims = RELEASED_VARIANTS[1]["convnext_tiny"]
    arch = Architecture(depths, dims, num_classes=1000, classifier_norm=True)
    sd = random_state_dict(arch)
    report, _ = _roundtrip(str(tmp_path), arch, {"model": sd}, sd, ext, source_kind)
    assert report.variant == "convnext_tiny" and report.kept == 178 and len(report.dropped) == 4


@pytest.mark.parametrize("ext", FORMATS)
@pytest.mark.parametrize("container", S.CONTAINERS)
@pytest.mark.parametrize("wrapper", ["", "module."])
def test_roundtrip_every_container(source_kind, tmp_path, ext, container, wrapper):
    """Bare, `model`, `state_dict` and training checkpoints (optimizer, epoch, args...), DDP-wrapped or not."""
    sd = random_state_dict(SMALL, seed=1)
    _roundtrip(str(tmp_path), SMALL, S.wrap(sd, container, wrapper), sd, ext, source_kind)


@pytest.mark.parametrize("ext", [".pth", ".pkl"])
def test_roundtrip_ema_weights_of_a_training_checkpoint(source_kind, tmp_path, ext):
    """`ema=True` loads `model_ema`, not `model` (their values differ)."""
    sd, ema = random_state_dict(SMALL, seed=1), random_state_dict(SMALL, seed=2)
    _roundtrip(str(tmp_path), SMALL, S.wrap(sd, "training", ema=ema), ema, ext, source_kind, ema=True)


@pytest.mark.parametrize("out_features", [["res5"], ["res3", "res5"], ["res2", "res3", "res4"]])
def test_roundtrip_only_requested_output_norms_are_fresh(source_kind, tmp_path, out_features):
    """With the DI-MaskDINO fork's rule (norm{i} only for requested outputs) exactly those are missing."""
    sd = random_state_dict(SMALL)
    _roundtrip(str(tmp_path), SMALL, {"model": sd}, sd, ".pth", source_kind, out_features=out_features)


def test_roundtrip_detection_checkpoint_with_trained_output_norms(source_kind, tmp_path):
    """A detection backbone's own trained `norm{i}` are kept: nothing is missing at all."""
    arch = Architecture(SMALL.depths, SMALL.dims, output_norms=(0, 1, 2, 3))
    sd = random_state_dict(arch)
    report, _ = _roundtrip(str(tmp_path), arch, {"model": sd}, sd, ".pkl", source_kind)
    assert report.fresh == []


@given(
    S.official_state_dicts(arch=None, shuffle=True),
    st.sampled_from(FORMATS),
    S.containers(),
    S.wrapper_prefixes(),
)
@settings(max_examples=15)
def test_roundtrip_property_any_architecture_dtype_container(source_kind, drawn, ext, container, wrapper):
    """Any small V1/V2 architecture, dtype, key order and container round-trips exactly."""
    arch, sd = drawn
    with tempfile.TemporaryDirectory() as tmp:
        _roundtrip(tmp, arch, S.wrap(sd, container, wrapper), sd, ext, source_kind)


def test_roundtrip_gate_fails_on_a_file_without_the_backbone_prefix(tmp_path):
    """The gate itself can fail: a prefix-less file (loads nothing, only warnings) is caught."""
    sd = random_state_dict(SMALL)
    torch.save({"model": sd}, tmp_path / "src.pth")
    convert(str(tmp_path / "src.pth"), str(tmp_path / "bare.pth"), prefix="")
    model = build_d2_model(SMALL)
    result = load_with_detectron2(model, str(tmp_path / "bare.pth"))
    with pytest.raises(AssertionError, match="missing keys differ"):
        assert_clean_load(result, fresh_output_norms(SMALL))
    assert result.unexpected, "Detectron2 should report every prefix-less key as unused"


def test_roundtrip_gate_fails_on_a_shape_skip(tmp_path):
    """A file for another variant: Detectron2 skips mismatched shapes with a warning; the gate fails."""
    other = Architecture(SMALL.depths, (8, 16, 24, 40))
    sd = random_state_dict(other)
    torch.save(sd, tmp_path / "src.pth")
    convert(str(tmp_path / "src.pth"), str(tmp_path / "other.pth"))
    result = load_with_detectron2(build_d2_model(SMALL), str(tmp_path / "other.pth"))
    assert result.incorrect_shapes
    with pytest.raises(AssertionError, match="shape-skipped"):
        assert_clean_load(result, result.missing)  # missing keys accepted, so the shape check must fire
