"""Each layout's typical file through the real Detectron2 `DetectionCheckpointer` (`roundtrip` tests).

Converted and loaded with nothing missing but the fresh output norms, nothing unexpected, every
tensor equal to the canonical dict the source was built from.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import List

import pytest
import torch

from conversion import convert
from conversion.architecture import Architecture
from conversion.d2_prediction import SAFETENSORS_PATHS, installed_stack

from .. import strategies as S
from ..support import CLASSIFIER_NAMES, assert_clean_load, assert_loaded_equal, build_d2_model, fill_with_sentinel, load_with_detectron2, require
from ..support.table import CLASSIFIER, POOLED_NORM, NO_HEAD, OUTPUT_NORMS, FINAL_NORM, SPECS, _with_head, LayoutCase, build_case

# ---------------------------------------------------------------- round trips through Detectron2


@dataclass(frozen=True)
class Trip:
    """One library-typical file for a round trip."""

    layout: str
    version: int
    head: str
    prefix: str
    conv_mlp: bool = False
    extras: bool = False
    container: str = "bare"

    @property
    def id(self) -> str:
        parts = [self.layout, f"v{self.version}", self.head, self.prefix.rstrip(".") or "no-prefix"]
        return "-".join(parts + (["conv-mlp"] if self.conv_mlp else []) + (["tower"] if self.extras else []))


ROUNDTRIPS = (
    Trip("official", 1, CLASSIFIER, "", container="model"),
    Trip("official", 2, CLASSIFIER, "", container="model"),
    Trip("official", 1, OUTPUT_NORMS, "backbone.", container="model"),
    Trip("timm", 1, CLASSIFIER, ""),
    Trip("timm", 2, CLASSIFIER, "", conv_mlp=True),
    Trip("timm", 1, POOLED_NORM, "model.", conv_mlp=True, container="state_dict"),
    Trip("timm-features", 1, NO_HEAD, "", conv_mlp=True),
    Trip("timm-features", 2, NO_HEAD, ""),
    Trip("open_clip", 1, POOLED_NORM, "visual.trunk.", extras=True, container="state_dict"),
    Trip("open_clip", 2, POOLED_NORM, "visual.trunk.", conv_mlp=True, extras=True, container="state_dict"),
    Trip("huggingface", 1, CLASSIFIER, "convnext."),
    Trip("huggingface", 2, CLASSIFIER, "convnextv2."),
    Trip("huggingface", 1, POOLED_NORM, ""),
    Trip("huggingface", 1, OUTPUT_NORMS, ""),
    Trip("torchvision", 1, CLASSIFIER, ""),
    Trip("mmpretrain", 1, CLASSIFIER, "backbone.", container="state_dict"),
    Trip("mmpretrain", 2, CLASSIFIER, "backbone.", container="state_dict"),
    Trip("mmpretrain", 1, OUTPUT_NORMS, "backbone.", container="state_dict"),
    Trip("dinov3", 1, FINAL_NORM, ""),
    Trip("dinov3-hf", 1, FINAL_NORM, "model."),
    Trip("dinov3-hf", 1, NO_HEAD, "model."),
)
ROUNDTRIP_ARCH = Architecture((1, 2, 1, 1), (8, 16, 8, 16))
D2_PREFIX = "backbone."
# Written out, not taken from the converter: the output norms it may keep (the classifier it must drop is
# tests/support's CLASSIFIER_NAMES).
OUTPUT_NORM_NAMES = {
    i: (f"backbone.norm{i}.weight", f"backbone.norm{i}.bias") for i in range(4)
}


def _fresh(arch: Architecture) -> List[str]:
    """The output norms the built case does not carry: the only keys Detectron2 may report missing."""
    return sorted(name for i, names in OUTPUT_NORM_NAMES.items() if i not in arch.output_norms for name in names)


def _roundtrip(directory: str, case: LayoutCase, ext: str, container: str = "bare", saver: str = "torch"):
    """Convert `case.source` to `ext`, load it with the real DetectionCheckpointer, compare every tensor."""
    if saver == "safetensors":
        from safetensors.torch import save_file

        src = os.path.join(directory, "source.safetensors")
        save_file({k: v.contiguous() for k, v in case.source.items()}, src)
    else:
        src = os.path.join(directory, "source.pth")
        torch.save(S.wrap(case.source, container), src)
    dst = os.path.join(directory, "converted" + ext)
    report = convert(src, dst)
    model = build_d2_model(case.arch)
    fill_with_sentinel(model)
    assert_clean_load(load_with_detectron2(model, dst), expected_missing=_fresh(case.arch))
    expected = {D2_PREFIX + k: v for k, v in case.canonical.items() if k not in CLASSIFIER_NAMES}
    assert_loaded_equal(model, expected)
    # Every backbone tensor of the model came from the file, except the fresh output norms.
    assert sorted(set(model.state_dict()) - set(expected)) == _fresh(case.arch) == sorted(report.fresh)
    return report


@pytest.mark.detectron2
@pytest.mark.parametrize("ext", [".pth", ".pkl"])
@pytest.mark.parametrize("trip", ROUNDTRIPS, ids=lambda t: t.id)
def test_roundtrip_every_layout(tmp_path, trip: Trip, ext: str):
    """Each layout's typical file converts and loads into the D2 backbone: only fresh norms missing, all equal."""
    require("detectron2")
    arch = _with_head(dataclasses.replace(ROUNDTRIP_ARCH, version=trip.version), trip.head, 5)
    case = build_case(SPECS[trip.layout], arch, trip.head, trip.prefix, trip.conv_mlp, trip.extras, seed=3)
    report = _roundtrip(str(tmp_path), case, ext, trip.container)
    assert (report.layout, report.source_prefix, report.version) == (trip.layout, trip.prefix, trip.version)
    all_norms = [f"{D2_PREFIX}norm{i}.{p}" for i in range(4) for p in ("weight", "bias")]
    kept_norms = {OUTPUT_NORMS: all_norms, FINAL_NORM: [f"{D2_PREFIX}norm3.weight", f"{D2_PREFIX}norm3.bias"]}
    assert sorted(report.fresh) == sorted(set(all_norms) - set(kept_norms.get(trip.head, [])))
    accounted = report.kept + len(report.dropped)
    assert accounted == len(case.source), "every source tensor is either kept or reported dropped"
    assert set(case.extras) <= set(report.dropped)


@pytest.mark.detectron2
@pytest.mark.parametrize("layout", [name for name, spec in SPECS.items() if 2 in spec.versions])
def test_roundtrip_v2_grn_parameters_land_as_1x1x1xE(tmp_path, layout: str):
    """V2 from every layout that has it: GRN gamma/beta load into the USE_GRN backbone as [1,1,1,E], values equal."""
    require("detectron2")
    spec = SPECS[layout]
    arch = Architecture((2, 1, 1, 1), (8, 16, 16, 8), version=2)
    head = spec.heads[0]
    case = build_case(spec, _with_head(arch, head, 4), head, spec.prefixes[2][-1], conv_mlp=spec.conv_mlp, seed=4)
    report = _roundtrip(str(tmp_path), case, ".pth")
    assert report.version == 2
    assert sum(".grn." in k for k in case.canonical) == 2 * sum(arch.depths)
    model_grn = {k: v.shape for k, v in build_d2_model(arch).state_dict().items() if ".grn." in k}
    assert set(model_grn.values()) == {torch.Size([1, 1, 1, 4 * d]) for d in set(arch.dims)}
    if layout in ("timm", "timm-features", "open_clip", "mmpretrain"):
        assert sum(fix == "[E] -> [1,1,1,E]" for fix in report.reshaped.values()) == 2 * sum(arch.depths)


@pytest.mark.detectron2
@pytest.mark.parametrize("ext", [".pth", ".pkl"])
def test_roundtrip_safetensors_timm_file(tmp_path, ext):
    """A timm dict saved with safetensors.save_file (the hub format) converts and round-trips (V2, conv-MLP)."""
    require("safetensors")
    arch = Architecture((1, 2, 1, 1), (8, 16, 8, 16), version=2, num_classes=3, classifier_norm=True)
    case = build_case(SPECS["timm"], arch, CLASSIFIER, "", conv_mlp=True, seed=5)
    report = _roundtrip(str(tmp_path), case, ext, saver="safetensors")
    assert report.layout == "timm" and report.container is None
    # Detectron2 reads a .safetensors path where torch >= 2.13 hands it to safetensors; there only the names fail.
    expected = "timm layout" if installed_stack().torch >= SAFETENSORS_PATHS else "safetensors"
    assert any(expected in note for note in report.notes), report.notes
