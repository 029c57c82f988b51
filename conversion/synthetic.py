"""Synthetic checkpoints: random weights in the official layout, deterministic by seed.

Nothing can be downloaded on the machines this project is built on, and a real
checkpoint differs from one of these only in its values: the demo, the benchmarks and
the tests all build their sources here.
"""
from __future__ import annotations

import re
from typing import Dict

import torch

from .architecture import Architecture, canonical_shapes

_LAYER_NORM_WEIGHT = re.compile(
    r"(\.norm|^norm\d?|^downsample_layers\.0\.1|^downsample_layers\.[1-3]\.0)\.weight$"
)


def random_state_dict(arch: Architecture, seed: int = 0, dtype: torch.dtype = torch.float32) -> Dict[str, torch.Tensor]:
    """Random weights in canonical (official) names, every tensor distinct.

    Scaled so that a forward pass stays finite through any depth: LayerNorm weights
    near 1, convolutions and linears small, and layer scale and GRN clearly non-zero,
    so that a dropped or swapped one changes the output.
    """
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in canonical_shapes(arch).items():
        # float32 noise: what checkpoints hold, and twice as quick to draw as float64 (a ConvNeXt-Tiny
        # takes 0.2 s); narrower dtypes are this value rounded once.
        noise = torch.randn(shape, generator=g, dtype=torch.float32)
        if _LAYER_NORM_WEIGHT.search(name):
            value = 1.0 + 0.1 * noise
        elif name.endswith(".gamma") and ".grn." not in name:
            value = 0.5 + 0.1 * noise  # V1 layer scale
        elif ".grn." in name:
            value = 0.2 * noise
        else:
            value = 0.05 * noise
        out[name] = value.to(dtype)
    return out
