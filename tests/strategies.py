"""Hypothesis strategies: small building blocks, then composites whose optional arguments pin
one dimension (None means "draw it").  Each has a test of its own in test_strategies.py.
"""
from __future__ import annotations

import argparse
from typing import Any, Dict, Optional, Tuple

import torch
from hypothesis import strategies as st

from conversion.architecture import Architecture

from .support import random_canonical_state_dict

# Small enough that a forward pass and a Detectron2 load take milliseconds.
MAX_DEPTH = 4
DIM_CHOICES = (4, 8, 12, 16)
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
CONTAINERS = ("bare", "model", "state_dict", "training")
WRAPPER_PREFIXES = ("", "module.", "_orig_mod.", "module._orig_mod.")
TARGET_PREFIXES = ("backbone.", "", "model.backbone.", "encoder.")


def architectures(
    version: Optional[int] = None,
    layer_scale: Optional[bool] = None,
    classifier: Optional[bool] = None,
) -> st.SearchStrategy[Architecture]:
    """Random ConvNeXt architectures: depths 1..4 per stage, small dims, optional classifier."""

    @st.composite
    def build(draw: Any) -> Architecture:
        v = version if version is not None else draw(st.sampled_from((1, 2)))
        depths = tuple(draw(st.lists(st.integers(1, MAX_DEPTH), min_size=4, max_size=4)))
        dims = tuple(draw(st.lists(st.sampled_from(DIM_CHOICES), min_size=4, max_size=4)))
        has_classifier = classifier if classifier is not None else draw(st.booleans())
        return Architecture(
            depths=depths,
            dims=dims,
            version=v,
            layer_scale=(layer_scale if layer_scale is not None else draw(st.booleans())) if v == 1 else False,
            num_classes=draw(st.integers(1, 7)) if has_classifier else None,
            classifier_norm=has_classifier,
        )

    return build()


def dtypes() -> st.SearchStrategy[torch.dtype]:
    return st.sampled_from(DTYPES)


def seeds() -> st.SearchStrategy[int]:
    return st.integers(0, 2**31 - 1)


@st.composite
def official_state_dicts(
    draw: Any,
    arch: Optional[Architecture] = None,
    dtype: Optional[torch.dtype] = None,
    shuffle: bool = True,
) -> Tuple[Architecture, Dict[str, torch.Tensor]]:
    """(architecture, state dict in official names), random values, optionally in a random key order."""
    a = arch if arch is not None else draw(architectures())
    d = dtype if dtype is not None else draw(dtypes())
    sd = random_canonical_state_dict(a, seed=draw(seeds()), dtype=d)
    if shuffle:
        keys = draw(st.permutations(list(sd)))
        sd = {k: sd[k] for k in keys}
    return a, sd


def wrap(sd: Dict[str, torch.Tensor], container: str, wrapper_prefix: str = "", ema: Optional[Dict[str, torch.Tensor]] = None) -> Any:
    """Put a state dict into a checkpoint container the way training code does."""
    sd = {wrapper_prefix + k: v for k, v in sd.items()}
    if container == "bare":
        return sd
    if container in ("model", "state_dict"):
        return {container: sd}
    if container == "training":
        return {
            "model": sd,
            "model_ema": {wrapper_prefix + k: v for k, v in (ema or sd).items()},
            "optimizer": {"state": {}, "param_groups": [{"lr": 4e-3, "params": [0, 1]}]},
            "epoch": 299,
            "scaler": {"scale": 65536.0},
            "args": argparse.Namespace(model="convnext_tiny", lr=4e-3, drop_path=0.1, input_size=224),
        }
    raise ValueError(container)


def containers() -> st.SearchStrategy[str]:
    return st.sampled_from(CONTAINERS)


def wrapper_prefixes() -> st.SearchStrategy[str]:
    return st.sampled_from(WRAPPER_PREFIXES)


def target_prefixes() -> st.SearchStrategy[str]:
    return st.sampled_from(TARGET_PREFIXES)
