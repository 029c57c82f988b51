"""The names each library writes, read off its own model, and the target names written as literals.

Sources are `state_dict()` (or `save_pretrained`, or mmengine's checkpoint) of the real library
object at depths [1, 2, 1, 1], dims [8, 16, 24, 32]; the converted file's names must be exactly the
literals of `names.py`.  Where a library cannot be installed (the original DINOv3 repository), its
key list is written out below from that repository's code.
"""
from __future__ import annotations

import json
from typing import List

import pytest
import torch

from conversion import convert
from conversion.architecture import Architecture
from conversion.layouts import from_canonical
from conversion.synthetic import random_state_dict

from ..support import require, torch_load_weights_only
from ..support.cli import EXIT_OK, convert_cli
from ..support.names import DEPTHS, DIMS, OUTPUT_NORMS, TRUNK_V1, TRUNK_V2, names

NORM3 = ["backbone.norm3.weight", "backbone.norm3.bias"]
FRESH_ALL = sorted(OUTPUT_NORMS)
FRESH_BUT_NORM3 = sorted(n for n in OUTPUT_NORMS if n not in NORM3)


def _converted_names(tmp_path, sd_or_path, *, forced=None) -> tuple:
    """(report, sorted target names) of converting a dict (saved with torch.save) or a file."""
    src = sd_or_path if isinstance(sd_or_path, str) else str(tmp_path / "source.pth")
    if not isinstance(sd_or_path, str):
        torch.save(sd_or_path, src)
    dst = str(tmp_path / "converted.pth")
    report = convert(src, dst, layout=forced)
    return report, sorted(torch_load_weights_only(dst)["model"])


# ---------------------------------------------------------------- transformers' DINOv3 ConvNeXt


def _dinov3_config(**kwargs):
    transformers = require("transformers")
    return transformers.DINOv3ConvNextConfig(depths=list(DEPTHS), hidden_sizes=list(DIMS), **kwargs)


def test_dinov3_model_save_pretrained_gives_the_trunk_and_norm3(tmp_path):
    """The hub's file (save_pretrained: `stages.*`, `layer_norm.*`): its final norm lands as norm3."""
    transformers = require("transformers")
    model = transformers.DINOv3ConvNextModel(_dinov3_config())
    model.save_pretrained(str(tmp_path / "hub"))
    report, got = _converted_names(tmp_path, str(tmp_path / "hub" / "model.safetensors"))
    assert (report.layout, report.source_prefix) == ("dinov3-hf", "")
    assert got == names(TRUNK_V1, NORM3)
    assert sorted(report.fresh) == FRESH_BUT_NORM3
    assert report.renamed["backbone.norm3.weight"] == "layer_norm.weight"


def test_dinov3_model_state_dict_has_the_encoder_under_model(tmp_path):
    transformers = require("transformers")
    sd = transformers.DINOv3ConvNextModel(_dinov3_config()).state_dict()
    assert "model.stages.0.layers.0.depthwise_conv.weight" in sd and "layer_norm.weight" in sd
    report, got = _converted_names(tmp_path, sd)
    assert (report.layout, report.source_prefix) == ("dinov3-hf", "model.")
    assert got == names(TRUNK_V1, NORM3)


def test_dinov3_backbone_has_no_final_norm(tmp_path):
    transformers = require("transformers")
    sd = transformers.DINOv3ConvNextBackbone(_dinov3_config(out_features=["stage1", "stage2", "stage3", "stage4"])).state_dict()
    report, got = _converted_names(tmp_path, sd)
    assert (report.layout, report.source_prefix) == ("dinov3-hf", "model.")
    assert got == names(TRUNK_V1) and sorted(report.fresh) == FRESH_ALL


@pytest.mark.parametrize("forced", ["dinov3", "huggingface", "dinov3-hf", "dinov3-v1", "huggingface-v1"])
def test_from_dinov3_and_from_huggingface_accept_transformers_dinov3(tmp_path, capsys, forced):
    transformers = require("transformers")
    sd = transformers.DINOv3ConvNextModel(_dinov3_config()).state_dict()
    status, out, err = convert_cli(tmp_path, sd, "--from", forced, "--json", capsys=capsys)
    assert status == EXIT_OK, err
    assert json.loads(out)["layout"] == "dinov3-hf"


# ---------------------------------------------------------------- the original DINOv3 repository

# facebookresearch/dinov3 cannot be installed here (no package on the index this project may use, and
# nothing can be downloaded), so its names are written out from its dinov3/models/convnext.py: the
# official ConvNeXt modules (`downsample_layers`, `stages.{s}.{b}.{gamma, dwconv, norm, pwconv1,
# pwconv2}`), the final `norm`, `head = nn.Identity()` (no tensors), and `norms`, a ModuleList of
# three nn.Identity and `norm` itself: `norm`'s tensors appear a second time as `norms.3.*`.
DINOV3_ORIGINAL_KEYS = [n[len("backbone."):] for n in TRUNK_V1] + ["norm.weight", "norm.bias", "norms.3.weight", "norms.3.bias"]


def test_dinov3_original_names_are_the_repositorys(tmp_path):
    """The names the dinov3 layout writes are the repository's (literal list above); read back, `norm`
    (and its alias) becomes norm3, and the alias is reported as the same tensor."""
    arch = Architecture(DEPTHS, DIMS, output_norms=(3,))
    source = from_canonical(random_state_dict(arch), "dinov3")
    assert sorted(source) == sorted(DINOV3_ORIGINAL_KEYS)
    report, got = _converted_names(tmp_path, {"model": source})
    assert report.layout == "dinov3" and got == names(TRUNK_V1, NORM3)
    assert sorted(report.dropped) == ["norms.3.bias", "norms.3.weight"]


# ---------------------------------------------------------------- OpenCLIP towers


@pytest.fixture(scope="module")
def clip_model(tmp_path_factory):
    from ..support.originals import create_open_clip_model

    return create_open_clip_model(str(tmp_path_factory.mktemp("open_clip")))


def _d2_backbone_names(arch: Architecture) -> List[str]:
    """The names the real Detectron2 model built for `arch` has (the oracle where no literal fits)."""
    from ..support import build_d2_model

    return sorted(build_d2_model(arch).state_dict())


@pytest.mark.parametrize("saved", ["tower", "visual-tower", "clip"])
def test_open_clip_tower_alone_and_whole_give_the_trunk(tmp_path, clip_model, saved):
    """`model.visual.state_dict()` (`trunk.*` + `head.proj.weight`), re-prefixed `visual.`, and the whole CLIP."""
    require("detectron2")
    visual = clip_model.visual.state_dict()
    sd = {"tower": visual, "visual-tower": {"visual." + k: v for k, v in visual.items()}, "clip": clip_model.state_dict()}[saved]
    report, got = _converted_names(tmp_path, sd)
    prefix = "trunk." if saved == "tower" else "visual.trunk."
    assert (report.layout, report.source_prefix) == ("open_clip", prefix)
    atto = Architecture((2, 2, 6, 2), (40, 80, 160, 320))
    assert got == sorted(set(_d2_backbone_names(atto)) - set(OUTPUT_NORMS))
    projection = "head.proj.weight" if saved == "tower" else "visual.head.proj.weight"
    assert projection in report.dropped and prefix + "head.norm.weight" in report.dropped


def test_from_open_clip_reads_the_tower_alone(tmp_path, capsys, clip_model):
    status, out, err = convert_cli(tmp_path, clip_model.visual.state_dict(), "--from", "open_clip", "--json", capsys=capsys)
    assert status == EXIT_OK, err
    assert json.loads(out)["source_prefix"] == "trunk."


# ---------------------------------------------------------------- mmpretrain


def _mm_backbone(**kwargs) -> torch.nn.Module:
    from ..support.originals import mmpretrain_models

    return mmpretrain_models().build_backbone(dict(type="ConvNeXt", arch={"depths": list(DEPTHS), "channels": list(DIMS)}, **kwargs))


def _mm_classifier(**backbone) -> torch.nn.Module:
    from ..support.originals import mmpretrain_models

    return mmpretrain_models().build_classifier(dict(
        type="ImageClassifier", backbone=dict(type="ConvNeXt", arch={"depths": list(DEPTHS), "channels": list(DIMS)}, **backbone),
        neck=dict(type="GlobalAveragePooling"), head=dict(type="LinearClsHead", num_classes=3, in_channels=DIMS[-1])))


@pytest.mark.parametrize("version", [1, 2])
def test_mmpretrain_classifier_gives_the_trunk_its_pooled_norm3_dropped(tmp_path, version):
    """ImageClassifier (gap_before_final_norm=True): norm3 normalises the pooled vector: the classifier's, dropped."""
    extra = {"use_grn": True, "layer_scale_init_value": 0.0} if version == 2 else {}
    model = _mm_classifier(**extra)
    report, got = _converted_names(tmp_path, {"meta": {}, "state_dict": model.state_dict()})
    assert (report.layout, report.version) == ("mmpretrain", version)
    assert got == names(TRUNK_V1 if version == 1 else TRUNK_V2)
    assert sorted(report.dropped) == ["backbone.norm3.bias", "backbone.norm3.weight", "head.fc.bias", "head.fc.weight"]


def test_mmpretrain_per_pixel_norm3_is_kept_as_res5s_output_norm(tmp_path):
    """gap_before_final_norm=False: norm3 is applied to the res5 map per pixel, i.e. it is the output norm norm3."""
    backbone = _mm_backbone(gap_before_final_norm=False, out_indices=(3,))
    report, got = _converted_names(tmp_path, {"state_dict": {"backbone." + k: v for k, v in backbone.state_dict().items()}})
    assert got == names(TRUNK_V1, NORM3) and sorted(report.fresh) == FRESH_BUT_NORM3


def _mmengine_training_checkpoint(model: torch.nn.Module, path: str) -> None:
    """What mmengine's Runner.save_checkpoint writes mid-training: meta, state_dict, message_hub (with
    HistoryBuffer objects), optimizer and param_schedulers."""
    require("mmengine")
    from mmengine.logging import MessageHub
    from mmengine.runner.checkpoint import get_state_dict, weights_to_cpu

    hub = MessageHub.get_instance("convnext-d2-training-checkpoint")
    hub.update_scalar("train/loss", 0.75)
    hub.update_scalar("train/lr", 4e-3)
    hub.update_info("iter", 120)
    optimizer = torch.optim.AdamW(model.parameters(), lr=4e-3)
    checkpoint = {
        "meta": {"epoch": 3, "iter": 120, "mmengine_version": "0.10.7"},
        "state_dict": weights_to_cpu(get_state_dict(model)),
        "message_hub": hub.state_dict(),
        "optimizer": optimizer.state_dict(),
        "param_schedulers": [],
    }
    torch.save(checkpoint, path)


def test_mmengine_training_checkpoint_holds_history_buffers():
    """The fixture is what the issue describes: message_hub holds mmengine HistoryBuffer objects."""
    require("mmengine")
    from mmengine.logging import HistoryBuffer, MessageHub

    hub = MessageHub.get_instance("convnext-d2-history-check")
    hub.update_scalar("train/loss", 1.0)
    assert any(isinstance(v, HistoryBuffer) for v in hub.state_dict()["log_scalars"].values())


def test_mmengine_training_checkpoint_converts(tmp_path):
    """The HistoryBuffer objects are read past (placeholders, nothing imported); the weights convert."""
    model = _mm_classifier()
    path = str(tmp_path / "epoch_3.pth")
    _mmengine_training_checkpoint(model, path)
    report, got = _converted_names(tmp_path, path)
    assert report.layout == "mmpretrain" and got == names(TRUNK_V1)
    read_past = set(report.read_past.values())
    assert "mmengine.logging.history_buffer.HistoryBuffer" in read_past, report.read_past


@pytest.mark.slow  # a fresh interpreter importing mmpretrain (~4 s on 2 cores)
def test_mmpretrain_models_import_needs_multimodal_off_under_transformers_5():
    """Why the tests set WITH_MULTIMODAL = False first: in a fresh interpreter, `import mmpretrain.models`
    fails under transformers 5 ("NoneType takes no arguments").  (That it imports with the flag off is
    what every mmpretrain test here does first: tests/layouts/test_layout_equivalence.py `mmpretrain_models`.)"""
    require("mmpretrain")
    import subprocess
    import sys

    plain = subprocess.run([sys.executable, "-c", "import mmpretrain.models"], capture_output=True, text=True)
    assert plain.returncode != 0 and "NoneType takes no arguments" in plain.stderr, plain.stderr[-500:]
