"""Helpers the tests share: optional libraries, and (re-exported) the builders and Detectron2 loading
of `conversion.testing`, which downstream suites use too (one implementation).
"""
from __future__ import annotations

import importlib
import os
from typing import Any, Optional, Sequence

import pytest
import torch

from conversion.architecture import Architecture
from conversion.synthetic import random_state_dict
from conversion.testing import loading as _loading
from conversion.testing.loading import (  # noqa: F401  (re-exported for the tests)
    TORCH_HAS_WEIGHTS_ONLY,
    LoadResult,
    assert_clean_load,
    assert_loaded_equal,
    capture_checkpointer_logs,
    fill_with_sentinel,
    load_with_detectron2,
    torch_load_weights_only,
)

FULL_ENVIRONMENT = bool(os.environ.get("CONVNEXT_D2_FULL"))


def require(module: str) -> Any:
    """Import an optional library; skip without it, except in the full environment where it must exist."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        if FULL_ENVIRONMENT:
            pytest.fail(f"{module} is missing from the full environment ({err}); fix the tox deps", pytrace=False)
        pytest.skip(f"{module} is not installed here (core environment)", allow_module_level=True)


# Tests build their sources with the package's own generator (also used by the demo).
random_canonical_state_dict = random_state_dict


def build_d2_model(arch: Architecture, out_features: Optional[Sequence[str]] = None) -> torch.nn.Module:
    """`conversion.testing.loading.build_d2_model`, skipping where Detectron2 is absent (core)."""
    require("detectron2")
    return _loading.build_d2_model(arch, out_features)
