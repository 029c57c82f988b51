"""Detectron2 target names written out, the way Detectron2's own test_checkpoint.py spells its names.

For a ConvNeXt V1 with depths [1, 2, 1, 1] (dims [8, 16, 24, 32]) under `backbone.`: the official
detection names (`downsample_layers.{i}.{j}`, `stages.{s}.{b}.{gamma, dwconv, norm, pwconv1,
pwconv2}`, output norms `norm{i}`), in the order the backbone's `state_dict()` lists them.  Not
derived from the converter's tables: a wrong rule in a layout table cannot also fix these.
"""
from __future__ import annotations

from typing import List

DEPTHS = (1, 2, 1, 1)
DIMS = (8, 16, 24, 32)

TARGET_V1 = [
    "backbone.downsample_layers.0.0.weight", "backbone.downsample_layers.0.0.bias",
    "backbone.downsample_layers.0.1.weight", "backbone.downsample_layers.0.1.bias",
    "backbone.downsample_layers.1.0.weight", "backbone.downsample_layers.1.0.bias",
    "backbone.downsample_layers.1.1.weight", "backbone.downsample_layers.1.1.bias",
    "backbone.downsample_layers.2.0.weight", "backbone.downsample_layers.2.0.bias",
    "backbone.downsample_layers.2.1.weight", "backbone.downsample_layers.2.1.bias",
    "backbone.downsample_layers.3.0.weight", "backbone.downsample_layers.3.0.bias",
    "backbone.downsample_layers.3.1.weight", "backbone.downsample_layers.3.1.bias",
    "backbone.stages.0.0.gamma", "backbone.stages.0.0.dwconv.weight",
    "backbone.stages.0.0.dwconv.bias", "backbone.stages.0.0.norm.weight",
    "backbone.stages.0.0.norm.bias", "backbone.stages.0.0.pwconv1.weight",
    "backbone.stages.0.0.pwconv1.bias", "backbone.stages.0.0.pwconv2.weight",
    "backbone.stages.0.0.pwconv2.bias", "backbone.stages.1.0.gamma",
    "backbone.stages.1.0.dwconv.weight", "backbone.stages.1.0.dwconv.bias",
    "backbone.stages.1.0.norm.weight", "backbone.stages.1.0.norm.bias",
    "backbone.stages.1.0.pwconv1.weight", "backbone.stages.1.0.pwconv1.bias",
    "backbone.stages.1.0.pwconv2.weight", "backbone.stages.1.0.pwconv2.bias",
    "backbone.stages.1.1.gamma", "backbone.stages.1.1.dwconv.weight",
    "backbone.stages.1.1.dwconv.bias", "backbone.stages.1.1.norm.weight",
    "backbone.stages.1.1.norm.bias", "backbone.stages.1.1.pwconv1.weight",
    "backbone.stages.1.1.pwconv1.bias", "backbone.stages.1.1.pwconv2.weight",
    "backbone.stages.1.1.pwconv2.bias", "backbone.stages.2.0.gamma",
    "backbone.stages.2.0.dwconv.weight", "backbone.stages.2.0.dwconv.bias",
    "backbone.stages.2.0.norm.weight", "backbone.stages.2.0.norm.bias",
    "backbone.stages.2.0.pwconv1.weight", "backbone.stages.2.0.pwconv1.bias",
    "backbone.stages.2.0.pwconv2.weight", "backbone.stages.2.0.pwconv2.bias",
    "backbone.stages.3.0.gamma", "backbone.stages.3.0.dwconv.weight",
    "backbone.stages.3.0.dwconv.bias", "backbone.stages.3.0.norm.weight",
    "backbone.stages.3.0.norm.bias", "backbone.stages.3.0.pwconv1.weight",
    "backbone.stages.3.0.pwconv1.bias", "backbone.stages.3.0.pwconv2.weight",
    "backbone.stages.3.0.pwconv2.bias", "backbone.norm0.weight", "backbone.norm0.bias",
    "backbone.norm1.weight", "backbone.norm1.bias", "backbone.norm2.weight", "backbone.norm2.bias",
    "backbone.norm3.weight", "backbone.norm3.bias",]

OUTPUT_NORMS = [
    "backbone.norm0.weight", "backbone.norm0.bias", "backbone.norm1.weight", "backbone.norm1.bias",
    "backbone.norm2.weight", "backbone.norm2.bias", "backbone.norm3.weight", "backbone.norm3.bias",
]
TRUNK_V1 = [n for n in TARGET_V1 if n not in OUTPUT_NORMS]

# V2 blocks: GRN (`grn.gamma`, `grn.beta`, after pwconv1) and no layer scale `gamma`.
GRN_V2 = [
    "backbone.stages.0.0.grn.gamma", "backbone.stages.0.0.grn.beta",
    "backbone.stages.1.0.grn.gamma", "backbone.stages.1.0.grn.beta",
    "backbone.stages.1.1.grn.gamma", "backbone.stages.1.1.grn.beta",
    "backbone.stages.2.0.grn.gamma", "backbone.stages.2.0.grn.beta",
    "backbone.stages.3.0.grn.gamma", "backbone.stages.3.0.grn.beta",
]
TRUNK_V2 = sorted([n for n in TRUNK_V1 if not n.endswith(".gamma")] + GRN_V2)


def names(*groups: List[str]) -> List[str]:
    return sorted(n for group in groups for n in group)
