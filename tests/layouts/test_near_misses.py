"""Refusals that tell the truth: variants the backbone cannot represent, and bad input per new layout.

Sources are the libraries' own models (`state_dict()` of a real timm / transformers / open_clip /
mmpretrain object, random init); expected messages name the file's keys literally.  Every refusal
is the library's error (`refusal` checks its class), names each offending key, and writes nothing.
"""
from __future__ import annotations

from typing import Dict

import pytest
import torch

from ..support import require
from conversion.errors import NotConvNeXt

from ..support.cli import convert_cli, refusal

timm = require("timm")

# ---------------------------------------------------------------- timm variants the backbone cannot hold

# (timm model, its kwargs, what the message must say was found, timm's name as the message spells it)
UNREPRESENTABLE = {
    "rmsnorm-atto": ("convnext_atto_rms", {}, "RMSNorm (norm weights without bias, e.g. 'stages.0.blocks.0.norm.weight')",
                     "timm's convnext_atto_rms"),
    "rmsnorm-zepto": ("convnext_zepto_rms", {}, "RMSNorm (norm weights without bias", "timm's convnext_zepto_rms"),
    "overlapping-stem": ("convnext_atto_ols", {}, "an overlapping convolution stem ('stem.0.weight' [24, 3, 3, 3], "
                         "then 'stem.1.weight' [40, 24, 3, 3])", "timm's convnext_atto_ols"),
    "rms-and-overlapping-stem": ("convnext_zepto_rms_ols", {}, "an overlapping convolution stem ('stem.0.weight' [32, 3, 3, 3], "
                                 "then 'stem.2.weight' [32, 32, 3, 3])", "timm's convnext_zepto_rms_ols"),
    "kernel-5": ("convnext_atto", {"kernel_sizes": 5}, "a 5x5 depthwise kernel ('stages.0.blocks.0.conv_dw.weight' "
                 "[40, 1, 5, 5]; the backbone's is 7x7)", "timm's convnext_atto, built with kernel_sizes=5"),
    "no-conv-bias": ("convnext_atto", {"conv_bias": False}, "convolutions without bias ('stem.0.weight' and "
                     "'stages.0.blocks.0.conv_dw.weight' have no bias)", "timm's convnext_atto, built with conv_bias=False"),
    "patch-2": ("convnext_atto", {"patch_size": 2}, "a 2x2 patch stem ('stem.0.weight' [40, 3, 2, 2], with a downsample "
                "before stage 0 ('stages.0.downsample.1.weight')", "timm's convnext_atto, built with patch_size=2"),
}


@pytest.mark.parametrize("case", sorted(UNREPRESENTABLE))
def test_timm_variant_the_backbone_cannot_represent_is_named_for_what_it_is(tmp_path, capsys, case):
    """Refused: what was found (the file's key and shape), timm's name for the variant, and what to do; no
    "damaged" / "re-export" (the weights are intact and re-exporting cannot help), no collision talk."""
    name, kwargs, found, spelled = UNREPRESENTABLE[case]
    model = timm.create_model(name, pretrained=False, **kwargs)
    err = refusal(tmp_path, model.state_dict(), NotConvNeXt)
    assert "a ConvNeXt variant the Detectron2 backbone cannot represent" in err, err
    assert found in err, err
    assert spelled in err, err
    assert "use a standard variant such as convnext_atto" in err, err
    for wrong in ("damaged", "re-export", "colliding", "mixed or unknown"):
        assert wrong not in err, err


def test_standard_atto_next_to_its_refused_variants_converts(tmp_path, capsys):
    """The control: timm's convnext_atto itself (the variant the refusals point to) converts."""
    status, _, err = convert_cli(tmp_path, timm.create_model("convnext_atto", pretrained=False).state_dict(), capsys=capsys)
    assert status == 0, err


# ---------------------------------------------------------------- bad input in the new layouts

DEPTHS, DIMS = [1, 2, 1, 1], [8, 16, 24, 32]


def _dinov3_hf() -> Dict[str, torch.Tensor]:
    transformers = require("transformers")
    config = transformers.DINOv3ConvNextConfig(depths=DEPTHS, hidden_sizes=DIMS)
    return transformers.DINOv3ConvNextModel(config).state_dict()


def _open_clip_tower() -> Dict[str, torch.Tensor]:
    """`model.visual.state_dict()` of a real open_clip tower (timm convnext_atto trunk)."""
    from ..support.originals import create_open_clip_model
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        return create_open_clip_model(directory).visual.state_dict()


def _mmdet_style() -> Dict[str, torch.Tensor]:
    """mmpretrain's ConvNeXt as mmdet uses it (out_indices 0-3, per-pixel norms) under `backbone.`, plus a neck."""
    from ..support.originals import mmpretrain_models

    models = mmpretrain_models()
    backbone = models.build_backbone(
        dict(type="ConvNeXt", arch={"depths": DEPTHS, "channels": DIMS}, out_indices=(0, 1, 2, 3), gap_before_final_norm=False)
    )
    sd = {"backbone." + k: v for k, v in backbone.state_dict().items()}
    sd.update({f"neck.lateral_convs.{i}.conv.weight": torch.zeros(4, DIMS[i], 1, 1) for i in range(4)})
    return sd


# (source builder, a key to reshape, a middle block's key prefix to delete, a key -> its name in another layout)
NEW_LAYOUTS = {
    "dinov3-hf": (_dinov3_hf, "model.stages.1.layers.0.pointwise_conv1.weight", "model.stages.1.layers.0.",
                  ("model.stages.2.layers.0.depthwise_conv.weight", "model.stages.2.0.dwconv.weight")),
    "open_clip-tower": (_open_clip_tower, "trunk.stages.1.blocks.0.mlp.fc1.weight", "trunk.stages.2.blocks.2.",
                        ("trunk.stages.2.blocks.0.conv_dw.weight", "trunk.stages.2.0.dwconv.weight")),
    "mmdet-mmpretrain-names": (_mmdet_style, "backbone.stages.1.0.pointwise_conv1.weight", "backbone.stages.1.0.",
                               ("backbone.stages.2.0.depthwise_conv.weight", "backbone.stages.2.0.dwconv.weight")),
}


@pytest.mark.parametrize("layout", sorted(NEW_LAYOUTS))
def test_wrong_shape_is_refused_naming_the_key(tmp_path, capsys, layout):
    build, key, _, _ = NEW_LAYOUTS[layout]
    sd = build()
    shape = list(sd[key].shape)
    sd[key] = torch.zeros(shape[0] + 1, *shape[1:])
    err = refusal(tmp_path, sd, NotConvNeXt)
    assert f"{key} has shape [{shape[0] + 1}, " in err, err


@pytest.mark.parametrize("layout", sorted(NEW_LAYOUTS))
def test_missing_block_is_refused_naming_every_key_of_it(tmp_path, capsys, layout):
    build, _, block, _ = NEW_LAYOUTS[layout]
    sd = build()
    removed = sorted(k for k in sd if k.startswith(block))
    assert len(removed) >= 9, removed
    err = refusal(tmp_path, {k: v for k, v in sd.items() if not k.startswith(block)}, NotConvNeXt)
    assert [k for k in removed if f"missing {k} " not in err] == [], err


@pytest.mark.parametrize("layout", sorted(NEW_LAYOUTS))
def test_two_layouts_mixed_is_refused_naming_the_foreign_key(tmp_path, capsys, layout):
    build, _, _, (key, foreign) = NEW_LAYOUTS[layout]
    sd = build()
    sd[foreign] = sd.pop(key)
    err = refusal(tmp_path, sd, NotConvNeXt)
    assert "mixed or unknown naming" in err and foreign in err, err


def test_detection_checkpoint_with_a_convnext_tensor_outside_its_backbone_is_mixed_not_left_out(tmp_path, capsys):
    """A ConvNeXt name beside `backbone.` is two dicts mixed: refused, not counted as a detector part."""
    sd = _mmdet_style()
    sd["stages.1.0.dwconv.weight"] = sd["backbone.stages.1.0.depthwise_conv.weight"].clone()
    err = refusal(tmp_path, {"state_dict": sd}, NotConvNeXt)
    assert "1 key(s) outside the mmpretrain layout: stages.1.0.dwconv.weight" in err, err


def _mmpretrain_patch_2() -> Dict[str, torch.Tensor]:
    from ..support.originals import mmpretrain_models

    backbone = mmpretrain_models().build_backbone(dict(type="ConvNeXt", arch={"depths": DEPTHS, "channels": DIMS}, stem_patch_size=2))
    return {"backbone." + k: v for k, v in backbone.state_dict().items()}


def _huggingface_patch_2() -> Dict[str, torch.Tensor]:
    transformers = require("transformers")
    return transformers.ConvNextModel(transformers.ConvNextConfig(depths=DEPTHS, hidden_sizes=DIMS, patch_size=2)).state_dict()


@pytest.mark.parametrize(
    "build, stem",
    [(_mmpretrain_patch_2, "backbone.downsample_layers.0.0.weight"), (_huggingface_patch_2, "embeddings.patch_embeddings.weight")],
    ids=["mmpretrain-stem_patch_size-2", "huggingface-patch_size-2"],
)
def test_other_layouts_near_miss_is_named_for_what_it_is(tmp_path, capsys, build, stem):
    """The same truth for other libraries' options the backbone cannot hold: a 2x2 patch stem, named by the file's key."""
    err = refusal(tmp_path, build(), NotConvNeXt)
    assert f"a 2x2 patch stem ('{stem}' [8, 3, 2, 2]; the backbone's is 4x4)" in err, err
    assert "damaged" not in err and "re-export" not in err, err
