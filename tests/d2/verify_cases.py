"""The files and configs of `verify`'s cases (tests/d2/test_verify.py), also used by the human
report's snapshot test (tests/cli/test_human_output.py): one source per broken kind, built as the tool
that produced it did, and a project's YAML."""
from __future__ import annotations

import torch

from conversion import convert
from conversion.architecture import Architecture
from conversion.layouts import from_canonical
from conversion.synthetic import random_state_dict

from ..support import CLASSIFIER_NAMES

ARCH = Architecture((1, 2, 1, 1), (8, 16, 8, 16), num_classes=5, classifier_norm=True)
V2 = Architecture((1, 2, 1, 1), (8, 16, 8, 16), version=2, layer_scale=False, num_classes=5, classifier_norm=True)
OFFICIAL = random_state_dict(ARCH, seed=21)
STYLES = "tests.d2_styles"


def project_yaml(tmp_path, name="D2ConvNeXt", arch=ARCH, out=("res2", "res3", "res4", "res5"), meta=None):
    """A project's YAML; without `meta`, Detectron2's default meta-architecture (GeneralizedRCNN) is built."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        "MODEL:\n"
        + (f"  META_ARCHITECTURE: \"{meta}\"\n" if meta else "")
        +
        f"  BACKBONE: {{NAME: \"{name}\", FREEZE_AT: 0}}\n"
        "  WEIGHTS: \"\"\n"
        "  MaskDINO: {HIDDEN_DIM: 256}  # a project's own section: must not break the merge\n"
        "  CONVNEXT:\n"
        f"    DEPTHS: {list(arch.depths)}\n"
        f"    DIMS: {list(arch.dims)}\n"
        f"    USE_GRN: {arch.version == 2}\n"
        f"    OUT_FEATURES: {list(out)}\n"
    )
    return str(path)


def broken_source(tmp_path, kind):
    """Each broken kind, built as the tool that produced it did."""
    backbone = {k: v for k, v in OFFICIAL.items() if k not in CLASSIFIER_NAMES}
    if kind == "missing-prefix":
        torch.save({"model": backbone}, tmp_path / "x.pth")
        return str(tmp_path / "x.pth"), None
    if kind == "timm-names":
        torch.save({"model": {"backbone." + k: v for k, v in from_canonical(backbone, "timm").items()}}, tmp_path / "x.pth")
        return str(tmp_path / "x.pth"), None
    if kind == "wrong-variant-for-config":
        other = Architecture((1, 2, 1, 1), (8, 16, 8, 24))
        torch.save({"model": random_state_dict(other)}, tmp_path / "o.pth")
        convert(str(tmp_path / "o.pth"), str(tmp_path / "x.pth"))
        return str(tmp_path / "x.pth"), ARCH
    if kind == "v2-file-for-v1-config":
        torch.save({"model": random_state_dict(V2)}, tmp_path / "o.pth")
        convert(str(tmp_path / "o.pth"), str(tmp_path / "x.pth"))
        return str(tmp_path / "x.pth"), ARCH
    if kind == "nan-in-a-weight":
        poisoned = {"backbone." + k: v.clone() for k, v in backbone.items()}
        poisoned["backbone.stages.1.0.pwconv1.weight"][0, 0] = float("nan")
        poisoned["backbone.downsample_layers.0.0.bias"][1] = float("inf")
        torch.save({"model": poisoned}, tmp_path / "x.pth")
        return str(tmp_path / "x.pth"), None
    raise ValueError(kind)
