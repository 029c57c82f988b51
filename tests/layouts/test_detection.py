"""A ConvNeXt inside a detector or segmenter: the backbone converts, everything else is left out by part.

Files as their users hold them:
- Detectron2's `model_final.pth` of a real `SemanticSegmentor` (the project's ConvNeXt backbone plus a
  `SemSegFPNHead`), written by Detectron2's own `DetectionCheckpointer.save` (`model`, `iteration`);
- an mmdet Mask R-CNN checkpoint with mmpretrain's real `ConvNeXt` as mmdet configures it
  (`out_indices=(0, 1, 2, 3)`, `gap_before_final_norm=False`: trained per-pixel output norms norm0..3)
  under `backbone.`, in mmengine's `meta` + `state_dict` container;
- an mmseg UperNet checkpoint with the official detection names under `backbone.` (the official
  ConvNeXt repository's segmentation backbone is not installable; Detectron2's backbone module here has
  its exact names: `downsample_layers`, `stages`, `norm{i}`).
mmdet and mmseg are not installed: their neck and head tensors are written from their modules' names
(FPN, RPNHead, StandardRoIHead, UPerHead, FCNHead) with small shapes; the converter leaves them out
whatever their shapes.  Expected target names are the literals of `names.py`; features come from the
library's own forward (mmpretrain's normed outputs, Detectron2's backbone).
"""
from __future__ import annotations

import json
import os
from typing import Dict, List

import pytest
import torch

from conversion import convert
from conversion.architecture import Architecture
from conversion.errors import NotConvNeXt

from ..support import assert_clean_load, build_d2_model, fill_with_sentinel, load_with_detectron2, require, torch_load_weights_only
from ..support.equivalence import assert_stages_close, differences, image
from ..support.tolerances import CPU_FP32_ATOL_SCALE, CPU_FP32_RTOL
from ..support.originals import MEASURED, mmpretrain_models, randomise_
from ..support.cli import EXIT_OK, convert_cli, refusal
from ..support.names import DEPTHS, DIMS, TARGET_V1, names

require("detectron2")
pytestmark = pytest.mark.detectron2

ARCH = Architecture(DEPTHS, DIMS, output_norms=(0, 1, 2, 3))
INPUT = (2, 3, 64, 64)


def _tensors(shapes: Dict[str, tuple]) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return {k: (torch.randn(s, generator=g) if s else torch.tensor(7)) for k, s in shapes.items()}


# mmdet Mask R-CNN (FPN neck, RPNHead, StandardRoIHead with Shared2FCBBoxHead and FCNMaskHead), 42 tensors.
MMDET_PARTS = _tensors({
    **{f"neck.lateral_convs.{i}.conv.{p}": ((4, DIMS[i], 1, 1) if p == "weight" else (4,)) for i in range(4) for p in ("weight", "bias")},
    **{f"neck.fpn_convs.{i}.conv.{p}": ((4, 4, 3, 3) if p == "weight" else (4,)) for i in range(4) for p in ("weight", "bias")},
    **{f"rpn_head.{m}.{p}": ((3, 4, 1, 1) if p == "weight" else (3,)) for m in ("rpn_conv", "rpn_cls", "rpn_reg") for p in ("weight", "bias")},
    **{f"roi_head.bbox_head.{m}.{p}": ((5, 4) if p == "weight" else (5,))
       for m in ("shared_fcs.0", "shared_fcs.1", "fc_cls", "fc_reg") for p in ("weight", "bias")},
    **{f"roi_head.mask_head.{m}.{p}": ((4, 4, 3, 3) if p == "weight" else (4,))
       for m in ("convs.0.conv", "convs.1.conv", "convs.2.conv", "convs.3.conv", "upsample", "conv_logits") for p in ("weight", "bias")},
})
# mmseg UperNet (UPerHead decode head, FCNHead auxiliary head), with BatchNorm statistics.
_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
MMSEG_PARTS = _tensors({
    **{f"decode_head.psp_modules.{i}.1.conv.weight": (4, DIMS[3], 1, 1) for i in range(4)},
    **{f"decode_head.psp_modules.{i}.1.bn.{p}": (() if p == "num_batches_tracked" else (4,)) for i in range(4) for p in _BN},
    "decode_head.bottleneck.conv.weight": (4, DIMS[3] + 16, 3, 3),
    **{f"decode_head.bottleneck.bn.{p}": (() if p == "num_batches_tracked" else (4,)) for p in _BN},
    "decode_head.conv_seg.weight": (3, 4, 1, 1), "decode_head.conv_seg.bias": (3,),
    "auxiliary_head.convs.0.conv.weight": (4, DIMS[2], 3, 3),
    **{f"auxiliary_head.convs.0.bn.{p}": (() if p == "num_batches_tracked" else (4,)) for p in _BN},
    "auxiliary_head.conv_seg.weight": (3, 4, 1, 1), "auxiliary_head.conv_seg.bias": (3,),
})
for _k in [k for k in MMSEG_PARTS if k.endswith("num_batches_tracked")]:
    MMSEG_PARTS[_k] = torch.tensor(1000, dtype=torch.int64)


def detectron2_segmentor(backbone: str = "convnext") -> torch.nn.Module:
    """A real Detectron2 SemanticSegmentor: the project's ConvNeXt (or Detectron2's ResNet-18) and a SemSegFPNHead."""
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from conversion.d2 import BACKBONE_NAME, add_convnext_config

    cfg = get_cfg()
    add_convnext_config(cfg)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.META_ARCHITECTURE = "SemanticSegmentor"
    if backbone == "convnext":
        cfg.MODEL.BACKBONE.NAME = BACKBONE_NAME
        cfg.MODEL.CONVNEXT.DEPTHS, cfg.MODEL.CONVNEXT.DIMS = list(DEPTHS), list(DIMS)
    else:
        cfg.MODEL.BACKBONE.NAME = "build_resnet_backbone"
        cfg.MODEL.RESNETS.DEPTH, cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 18, 64
        cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, cfg.MODEL.SEM_SEG_HEAD.NORM = 8, 3, ""
    return build_model(cfg).eval()


def save_model_final(model: torch.nn.Module, directory: str) -> str:
    """Detectron2's own training-output file: `DetectionCheckpointer(model, save_dir).save("model_final")`."""
    from detectron2.checkpoint import DetectionCheckpointer

    DetectionCheckpointer(model, save_dir=directory).save("model_final", iteration=89999)
    return os.path.join(directory, "model_final.pth")


def mmpretrain_detection_backbone() -> torch.nn.Module:
    """mmpretrain's ConvNeXt as mmdet's ConvNeXt configs build it (per-pixel output norms 0-3)."""
    models = mmpretrain_models()
    backbone = models.build_backbone(
        dict(type="ConvNeXt", arch={"depths": list(DEPTHS), "channels": list(DIMS)}, out_indices=(0, 1, 2, 3), gap_before_final_norm=False)
    )
    backbone.eval()  # mmpretrain's ConvNeXt.train() returns None, so no chaining
    return backbone


def _load_converted(path: str) -> torch.nn.Module:
    """The converted file in a fresh D2 backbone: nothing missing (the output norms are trained), nothing else."""
    model = build_d2_model(ARCH)
    fill_with_sentinel(model)
    assert_clean_load(load_with_detectron2(model, path), expected_missing=[])
    return model.backbone.eval()


def _compare(label: str, refs: List[torch.Tensor], backbone: torch.nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        outputs = backbone(x)
    gots = [outputs[f"res{i + 2}"] for i in range(4)]
    assert_stages_close(refs, gots, rtol=CPU_FP32_RTOL, atol_scale=CPU_FP32_ATOL_SCALE, case=label)
    MEASURED[label] = max(differences(r, g)[1] for r, g in zip(refs, gots))


# ---------------------------------------------------------------- Detectron2 model_final.pth


def test_detectron2_model_final_converts_its_backbone_with_trained_output_norms(tmp_path):
    segmentor = detectron2_segmentor()
    randomise_(segmentor, seed=31)
    src = save_model_final(segmentor, str(tmp_path))
    dst = str(tmp_path / "backbone_d2.pth")
    report = convert(src, dst)
    head = sorted(k for k in segmentor.state_dict() if k.startswith("sem_seg_head."))
    assert (report.layout, report.container, report.source_prefix) == ("official", "model", "backbone.")
    assert report.detector_parts == {"sem_seg_head.": len(head)} and len(head) > 0
    assert (report.fresh, report.dropped) == ([], [])
    assert sorted(torch_load_weights_only(dst)["model"]) == names(TARGET_V1)
    x = image(INPUT, seed=3)
    with torch.no_grad():
        refs = [segmentor.backbone(x)[f"res{i + 2}"] for i in range(4)]
    _compare("detectron2 model_final (SemanticSegmentor), after output norms", refs, _load_converted(dst), x)


def test_detectron2_resnet_model_final_is_refused_as_a_resnet(tmp_path, capsys):
    segmentor = detectron2_segmentor("resnet")
    err = refusal(tmp_path, {"model": segmentor.state_dict(), "iteration": 1}, NotConvNeXt)
    assert "the weights are a ResNet, not a ConvNeXt" in err and "'backbone.res2.0.conv1.weight'" in err, err


# ---------------------------------------------------------------- mmdet / mmseg


def _mmengine_checkpoint(state_dict: Dict[str, torch.Tensor], path: str) -> str:
    torch.save({"meta": {"mmdet_version": "3.3.0", "epoch": 36, "CLASSES": ["a", "b"]}, "state_dict": state_dict}, path)
    return path


def test_mmdet_mask_rcnn_with_mmpretrain_names_keeps_norm0_to_3_and_leaves_out_neck_and_heads(tmp_path):
    backbone = mmpretrain_detection_backbone()
    randomise_(backbone, seed=37)
    sd = {"backbone." + k: v for k, v in backbone.state_dict().items()}
    sd.update(MMDET_PARTS)
    src = _mmengine_checkpoint(sd, str(tmp_path / "mask_rcnn_convnext.pth"))
    dst = str(tmp_path / "backbone_d2.pth")
    report = convert(src, dst)
    assert (report.layout, report.container, report.source_prefix) == ("mmpretrain", "state_dict", "backbone.")
    assert report.detector_parts == {"neck.": 16, "roi_head.": 20, "rpn_head.": 6}
    assert (report.fresh, report.dropped) == ([], [])
    assert sorted(torch_load_weights_only(dst)["model"]) == names(TARGET_V1)
    x = image(INPUT, seed=4)
    with torch.no_grad():
        refs = list(backbone(x))  # mmpretrain's own forward: norm{i} applied per pixel to each stage output
    _compare("mmdet Mask R-CNN, mmpretrain ConvNeXt (gap_before_final_norm=False), after output norms", refs, _load_converted(dst), x)


def test_mmseg_upernet_with_official_names_keeps_norm0_to_3_and_leaves_out_its_heads(tmp_path):
    official = build_d2_model(ARCH).backbone  # the official detection names, as the official mmseg backbone writes them
    randomise_(official, seed=41)
    sd = {"backbone." + k: v for k, v in official.state_dict().items()}
    sd.update(MMSEG_PARTS)
    src = _mmengine_checkpoint(sd, str(tmp_path / "upernet_convnext.pth"))
    dst = str(tmp_path / "backbone_d2.pth")
    report = convert(src, dst)
    assert (report.layout, report.source_prefix) == ("official", "backbone.")
    assert report.detector_parts == {"auxiliary_head.": 8, "decode_head.": 32}
    assert (report.fresh, report.dropped) == ([], [])
    x = image(INPUT, seed=5)
    with torch.no_grad():
        refs = [official.eval()(x)[f"res{i + 2}"] for i in range(4)]
    _compare("mmseg UperNet, official names, after output norms", refs, _load_converted(dst), x)


@pytest.mark.parametrize("forced", ["mmpretrain", "mmpretrain-v1"])
def test_from_accepts_a_detection_checkpoint(tmp_path, capsys, forced):
    sd = {"backbone." + k: v for k, v in mmpretrain_detection_backbone().state_dict().items()}
    sd.update(MMDET_PARTS)
    status, out, err = convert_cli(tmp_path, {"state_dict": sd}, "--from", forced, "--json", capsys=capsys)
    assert status == EXIT_OK, err
    report = json.loads(out)
    assert report["detector_parts"] == {"neck.": 16, "roi_head.": 20, "rpn_head.": 6} and report["fresh"] == []


def test_summary_lists_the_left_out_parts_with_counts(tmp_path, capsys):
    sd = {"backbone." + k: v for k, v in build_d2_model(ARCH).backbone.state_dict().items()}
    sd.update(MMSEG_PARTS)
    status, out, err = convert_cli(tmp_path, {"state_dict": sd}, "--json", capsys=capsys)
    assert status == EXIT_OK, err
    report = json.loads(out)
    assert report["detector_parts"] == {"auxiliary_head.": 8, "decode_head.": 32} and report["fresh"] == [], report


def test_mmdet_checkpoint_whose_backbone_is_a_resnet_is_refused(tmp_path, capsys):
    torchvision = require("torchvision")
    resnet = torchvision.models.resnet18(weights=None).state_dict()
    sd = {"backbone." + k: v for k, v in resnet.items() if not k.startswith("fc.")}
    sd.update(MMDET_PARTS)
    err = refusal(tmp_path, {"meta": {}, "state_dict": sd}, NotConvNeXt)
    assert "the weights are a ResNet, not a ConvNeXt" in err and "'backbone.layer1.0.conv1.weight'" in err, err


def test_inspect_names_the_detector_parts_a_conversion_leaves_out(tmp_path, capsys):
    from conversion.cli import main

    sd = {"backbone." + k: v for k, v in build_d2_model(ARCH).backbone.state_dict().items()}
    sd.update(MMDET_PARTS)
    src = str(tmp_path / "mask_rcnn.pth")
    torch.save({"meta": {}, "state_dict": sd}, src)
    assert main(["inspect", src, "--json"]) == EXIT_OK
    report = json.loads(capsys.readouterr().out)
    assert (report["layout"], report["source_prefix"]) == ("official", "backbone.")
    assert report["detector_parts"] == {"neck.": 16, "roi_head.": 20, "rpn_head.": 6}
    assert main(["inspect", src]) == EXIT_OK
    assert "detector   42 tensors around the backbone, left out on conversion: neck. x16, roi_head. x20, rpn_head. x6" in capsys.readouterr().out


def test_verify_expects_nothing_missing_in_a_converted_detection_checkpoint(tmp_path, capsys):
    """The trained norm0..3 were kept, so the gate passes with no fresh key at all."""
    from conversion.cli import main

    segmentor = detectron2_segmentor()
    randomise_(segmentor, seed=43)
    src = save_model_final(segmentor, str(tmp_path))
    dst = str(tmp_path / "backbone_d2.pth")
    assert main(["convert", src, dst, "--quiet"]) == EXIT_OK
    capsys.readouterr()
    assert main(["verify", dst, "--json"]) == EXIT_OK
    result = json.loads(capsys.readouterr().out)
    assert (result["fresh"], result["missing"], result["unexpected"]) == ([], [], [])


# ---------------------------------------------------------------- Detectron2 FPN around the ConvNeXt


def _register_fpn_backbone() -> str:
    """A Detectron2 FPN whose bottom-up is the project's ConvNeXt backbone (as ResNet-FPN configs wrap ResNets)."""
    from detectron2.modeling import BACKBONE_REGISTRY
    from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool

    from conversion.d2 import build_convnext_d2_backbone

    def build_convnext_d2_test_fpn_backbone(cfg, input_shape):
        return FPN(bottom_up=build_convnext_d2_backbone(cfg, input_shape), in_features=["res2", "res3", "res4", "res5"],
                   out_channels=8, top_block=LastLevelMaxPool())

    name = build_convnext_d2_test_fpn_backbone.__name__
    if name not in BACKBONE_REGISTRY:
        BACKBONE_REGISTRY.register(build_convnext_d2_test_fpn_backbone)
    return name


def test_detectron2_fpn_rcnn_model_final_converts_its_bottom_up_convnext(tmp_path):
    """A real GeneralizedRCNN (FPN over the ConvNeXt, RPN, ROI heads): `backbone.bottom_up.` converts with its
    trained norms; the FPN's own layers and the heads are left out, counted by part."""
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from conversion.d2 import add_convnext_config

    cfg = get_cfg()
    add_convnext_config(cfg)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.BACKBONE.NAME = _register_fpn_backbone()
    cfg.MODEL.CONVNEXT.DEPTHS, cfg.MODEL.CONVNEXT.DIMS = list(DEPTHS), list(DIMS)
    cfg.MODEL.RPN.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
    cfg.MODEL.ROI_HEADS.IN_FEATURES = ["p2", "p3", "p4", "p5"]
    cfg.MODEL.ROI_HEADS.NAME = "StandardROIHeads"
    cfg.MODEL.ROI_BOX_HEAD.NAME = "FastRCNNConvFCHead"
    cfg.MODEL.ROI_BOX_HEAD.NUM_FC, cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 1, 16
    rcnn = build_model(cfg).eval()
    randomise_(rcnn, seed=47)
    src = save_model_final(rcnn, str(tmp_path))
    dst = str(tmp_path / "backbone_d2.pth")
    report = convert(src, dst)
    assert (report.layout, report.source_prefix) == ("official", "backbone.bottom_up.")
    sd = rcnn.state_dict()
    fpn = {f"backbone.{k.split('.')[1]}." for k in sd if k.startswith("backbone.") and not k.startswith("backbone.bottom_up.")}
    expected = {part: sum(k.startswith(part) for k in sd) for part in sorted(fpn | {"proposal_generator.", "roi_heads."})}
    assert report.detector_parts == expected and "backbone.fpn_lateral2." in expected
    assert (report.fresh, report.dropped) == ([], [])
    assert sorted(torch_load_weights_only(dst)["model"]) == names(TARGET_V1)
    x = image(INPUT, seed=6)
    with torch.no_grad():
        refs = [rcnn.backbone.bottom_up(x)[f"res{i + 2}"] for i in range(4)]
    _compare("detectron2 model_final (GeneralizedRCNN, FPN over the ConvNeXt), after output norms", refs, _load_converted(dst), x)
