"""Hypothesis strategies for ConvNeXt checkpoints: small building blocks, then composites whose
optional arguments pin one dimension (None means "draw it").  This project's suite tests each of
them (tests/unit/test_strategies.py); downstream suites use them for their own properties.

Needs hypothesis (`pip install convnext-d2[testing]`); the rest of `conversion.testing` does not.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch

try:
    from hypothesis import reject
    from hypothesis import strategies as st
except ImportError as err:  # an optional dependency: say which extra brings it
    raise ImportError(
        "conversion.testing.strategies needs hypothesis: pip install 'convnext-d2[testing]' (or hypothesis)"
    ) from err

from ..architecture import Architecture
from ..layouts import LAYOUTS
from ..synthetic import random_state_dict as random_canonical_state_dict
from .synthetic import CONTAINERS, in_layout, wrap

# Small enough that a forward pass and a Detectron2 load take milliseconds.
MAX_DEPTH = 4
DIM_CHOICES = (4, 8, 12, 16)
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
WRAPPER_PREFIXES = ("", "module.", "_orig_mod.", "module._orig_mod.")
TARGET_PREFIXES = ("backbone.", "", "model.backbone.", "encoder.")


@st.composite
def architectures(
    draw: Any, version: Optional[int] = None, layer_scale: Optional[bool] = None, classifier: Optional[bool] = None
) -> Architecture:
    """Random ConvNeXt architectures: depths 1..4 per stage, small dims, optional classifier."""
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


def containers() -> st.SearchStrategy[str]:
    return st.sampled_from(CONTAINERS)


def wrapper_prefixes() -> st.SearchStrategy[str]:
    return st.sampled_from(WRAPPER_PREFIXES)


def target_prefixes() -> st.SearchStrategy[str]:
    return st.sampled_from(TARGET_PREFIXES)


def layouts() -> st.SearchStrategy[str]:
    """Names of the converter's source layouts (the layout tables' own list, so new ones are drawn too)."""
    return st.sampled_from(sorted(LAYOUTS))


@st.composite
def layout_state_dicts(
    draw: Any,
    layout: Optional[str] = None,
    arch: Optional[Architecture] = None,
    dtype: Optional[torch.dtype] = None,
    prefix: Optional[str] = None,
) -> Tuple[str, Architecture, Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """(layout, architecture, canonical dict, the same weights in the layout's names).

    Built with the layout tables' inverse (`in_layout`; `prefix` None: the layout's own).  Combinations
    a library cannot express (torchvision has no ConvNeXt V2) are not drawn.
    """
    name = layout if layout is not None else draw(layouts())
    a, canonical = draw(official_state_dicts(arch=arch, dtype=dtype))
    try:
        source = in_layout(canonical, name, prefix)
    except ValueError:
        reject()
    return name, a, canonical, source
