"""Bad names: mixed naming, truncated, isotropic, not ConvNeXt, wrong version, sparse FCMAE: each refused by
`conversion.convert` with its error class and a message naming the keys, nothing written."""
from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from conversion import convert
from conversion.architecture import Architecture
from conversion.cli import main
from conversion.layouts import from_canonical
from conversion.synthetic import random_state_dict

from conversion.errors import NotConvNeXt

from ..support import require
from ..support.cli import refusal

# ---------------------------------------------------------------- bad input


SMALL = Architecture((1, 1, 2, 1), (8, 8, 16, 16), num_classes=3, classifier_norm=True)


def test_half_converted_dict_names_the_keys_of_the_other_layout(tmp_path, capsys):
    """Stages 0-1 in official names, stages 2-3 in timm names: refused, naming the timm keys."""
    canonical = random_state_dict(SMALL)
    late = {k for k in canonical if re.match(r"^(stages|downsample_layers)\.[23]\.", k)}
    mixed = {k: v for k, v in canonical.items() if k not in late}
    timm_names = from_canonical({k: canonical[k] for k in late}, "timm")
    mixed.update(timm_names)
    err = refusal(tmp_path, {"model": mixed}, NotConvNeXt)
    assert f"{len(timm_names)} key(s) outside the official layout" in err, err
    assert sorted(timm_names)[0] in err, err


def test_mostly_timm_dict_with_official_leftovers_names_the_leftovers(tmp_path, capsys):
    """The other way round: a timm dict with one official block is refused naming that block's keys."""
    canonical = random_state_dict(SMALL)
    leftover = {k for k in canonical if k.startswith("stages.2.1.")}
    mixed = from_canonical({k: v for k, v in canonical.items() if k not in leftover}, "timm")
    mixed.update({k: canonical[k] for k in leftover})
    err = refusal(tmp_path, mixed, NotConvNeXt)
    assert "outside the timm layout" in err and "stages.2.1.dwconv.weight" in err, err


def test_truncated_architecture_names_the_missing_stage(tmp_path, capsys):
    """A ConvNeXt without stage 3's blocks is refused as truncated, naming stage 3."""
    canonical = {k: v for k, v in random_state_dict(SMALL).items() if not k.startswith("stages.3.")}
    err = refusal(tmp_path, {"model": canonical}, NotConvNeXt)
    assert "truncated ConvNeXt: stage(s) [3]" in err, err


def test_isotropic_convnext_is_refused_for_having_no_pyramid(tmp_path, capsys):
    """Official isotropic ConvNeXt (stem + blocks.N) has no res2..res5: refused as such."""
    c, e = 16, 64
    isotropic = {"stem.weight": torch.zeros(c, 3, 16, 16), "stem.bias": torch.zeros(c)}
    for b in range(2):
        p = f"blocks.{b}."
        isotropic.update(
            {
                p + "gamma": torch.zeros(c),
                p + "dwconv.weight": torch.zeros(c, 1, 7, 7),
                p + "dwconv.bias": torch.zeros(c),
                p + "norm.weight": torch.ones(c),
                p + "norm.bias": torch.zeros(c),
                p + "pwconv1.weight": torch.zeros(e, c),
                p + "pwconv1.bias": torch.zeros(e),
                p + "pwconv2.weight": torch.zeros(c, e),
                p + "pwconv2.bias": torch.zeros(c),
            }
        )
    isotropic.update(
        {
            "norm.weight": torch.ones(c),
            "norm.bias": torch.zeros(c),
            "head.weight": torch.zeros(3, c),
            "head.bias": torch.zeros(3),
        }
    )
    err = refusal(tmp_path, {"model": isotropic}, NotConvNeXt)
    assert "isotropic ConvNeXt" in err and "res2..res5" in err, err


def test_timm_resnet_is_not_a_convnext(tmp_path, capsys):
    """A timm ResNet-18 state dict is refused as not a ConvNeXt, listing the markers looked for."""
    timm = require("timm")
    resnet = timm.create_model("resnet18", pretrained=False).state_dict()
    err = refusal(tmp_path, resnet, NotConvNeXt)
    assert f"the weights are a ResNet, not a ConvNeXt ({len(resnet)} keys, ResNet blocks such as 'layer1.0.conv1.weight')" in err, err


@pytest.mark.parametrize("layout", ["official", "timm"])
def test_v2_file_forced_as_v1_names_a_grn_key(tmp_path, capsys, layout):
    """`--from LAYOUT-v1` on a V2 file is refused with a GRN key (in the source's own names) as evidence."""
    arch = dataclasses.replace(SMALL, version=2)
    source = from_canonical(random_state_dict(arch), layout)
    err = refusal(tmp_path, {"model": source}, NotConvNeXt, layout=f"{layout}-v1")
    grn = (
        r"stages\.\d+\.\d+\.grn\.(gamma|beta)"
        if layout == "official"
        else r"stages\.\d+\.blocks\.\d+\.mlp\.grn\.(weight|bias)"
    )
    assert re.search(rf"ConvNeXt V2 \(evidence: {grn}\), not V1", err), err
    assert f"--from {layout}-v2" in err, err


def test_v2_file_forced_as_v2_converts(tmp_path, capsys):
    """The same V2 file with the right pin converts (the pin is a check, not a blocker)."""
    arch = dataclasses.replace(SMALL, version=2)
    src, dst = tmp_path / "v2.pth", tmp_path / "v2_d2.pth"
    torch.save({"model": random_state_dict(arch)}, src)
    assert main(["convert", str(src), str(dst), "--from", "official-v2"]) == 0
    assert dst.exists()


def test_sparse_fcmae_checkpoint_is_refused_with_densify_advice(tmp_path, capsys):
    """The in-repo FCMAE model's sparse kernels ((k*k, in, out) MinkowskiEngine) are refused, saying to densify."""
    c = 8
    sparse = {
        "encoder.downsample_layers.0.0.weight": torch.zeros(c, 3, 4, 4),
        "encoder.stages.0.0.dwconv.kernel": torch.zeros(49, 1, c),
        "encoder.stages.0.0.dwconv.bias": torch.zeros(1, c),
        "encoder.stages.0.0.pwconv1.linear.weight": torch.zeros(4 * c, c),
        "encoder.stages.0.0.grn.gamma": torch.zeros(1, 4 * c),
        "mask_token": torch.zeros(1, 16, 1, 1),
    }
    err = refusal(tmp_path, {"model": sparse}, NotConvNeXt)
    assert "encoder.stages.0.0.dwconv.kernel" in err and "densify" in err.lower(), err
