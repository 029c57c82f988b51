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
from conversion.architecture import RELEASED_VARIANTS, Architecture
from conversion.synthetic import random_state_dict

from .. import strategies as S
from ..support import (
    CLASSIFIER_NAMES,
    assert_clean_load,
    assert_loaded_equal,
    build_d2_model,
    fill_with_sentinel,
    load_with_detectron2,
    output_norm_names,
    output_norms_for,
    require,
)

require("detectron2")


@pytest.fixture(scope="module", params=["zip", "legacy"])
def source_kind(request):
    """Every round trip runs on both kinds of torch file: a zip archive and a legacy pre-1.6 file,
    each read as handles (its records / storages copied into the output by the one writer)."""
    return request.param

SMALL = Architecture((2, 1, 3, 1), (8, 16, 24, 32), num_classes=5, classifier_norm=True)
FORMATS = (".pth", ".pkl", ".pt")


def _expected_model_state(sd, prefix="backbone."):
    return {prefix + k: v for k, v in sd.items() if k not in CLASSIFIER_NAMES}


def _save_source(tmpdir, container_obj, kind):
    src = os.path.join(tmpdir, "source.pth")
    torch.save(container_obj, src, _use_new_zipfile_serialization=kind == "zip")
    return src


def _convert_and_load(src, dst, arch, source_weights, kind, *, ema=False, out_features=None, model=None):
    """Convert `src` to `dst`, load it into the backbone (`model`, or a new one) pre-filled with a sentinel, check both."""
    report = convert(src, dst, ema=ema)
    assert report.streamed, "both kinds are written from their handles, never loaded"
    model = build_d2_model(arch, out_features) if model is None else model
    fill_with_sentinel(model)
    result = load_with_detectron2(model, dst)
    # the output norms of the requested outputs, less those the source already holds
    expected_missing = [k for k in output_norms_for(out_features or ("res2", "res3", "res4", "res5"))
                        if k[len("backbone."):] not in source_weights]
    assert_clean_load(result, expected_missing)
    assert_loaded_equal(model, _expected_model_state(source_weights))
    # convert reports every output norm the file lacks, whatever a given config requests
    assert sorted(report.fresh) == sorted(k for k in output_norm_names() if k[len("backbone."):] not in source_weights)
    return report, model


def _roundtrip(tmpdir, arch, container_obj, source_weights, ext, kind, *, ema=False, out_features=None):
    src = _save_source(tmpdir, container_obj, kind)
    dst = os.path.join(tmpdir, "converted" + ext)
    return _convert_and_load(src, dst, arch, source_weights, kind, ema=ema, out_features=out_features)


@pytest.fixture(scope="module")
def tiny():
    """(architecture, weights, backbone) of ConvNeXt-Tiny, built once for the module: every file below is
    loaded into the same backbone, re-filled with the sentinel before each load."""
    depths, dims = RELEASED_VARIANTS[1]["convnext_tiny"]
    arch = Architecture(depths, dims, num_classes=1000, classifier_norm=True)
    return arch, random_state_dict(arch), build_d2_model(arch)


@pytest.fixture(scope="module")
def released_tiny_file(source_kind, tiny, tmp_path_factory):
    """A released-style `{"model": ...}` ConvNeXt-Tiny file of each kind of torch file."""
    return _save_source(str(tmp_path_factory.mktemp("tiny")), {"model": tiny[1]}, source_kind)


@pytest.mark.parametrize("ext", [".pth", ".pkl"])  # .pt is the same writer as .pth: small tests cover it
def test_roundtrip_convnext_tiny_released_file(source_kind, tiny, released_tiny_file, tmp_path, ext):
    """A released-style `{"model": ...}` ConvNeXt-Tiny file loads cleanly in every output format."""
    (arch, sd, model), src = tiny, released_tiny_file
    report, _ = _convert_and_load(src, str(tmp_path / ("converted" + ext)), arch, sd, source_kind, model=model)
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
        assert_clean_load(result, output_norm_names())
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
