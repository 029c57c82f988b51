"""Will training start from the pretrained ConvNeXt weights?  Gated on every push, on a CPU runner.

The weights file and config default to the ones training uses; CI may point elsewhere with
DIMASKDINO_WEIGHTS / DIMASKDINO_CONFIG.  The backbone is given by its file, so the package's
`__init__` (which needs the CUDA-only deformable-attention op) is never imported.
"""
import os
from pathlib import Path

import pytest

from conversion.testing import assert_loads_clean

ROOT = Path(__file__).resolve().parents[1]
BACKBONE_FILE = str(ROOT / "dimaskdino_ci" / "modeling" / "backbone" / "convnext.py")
CONFIG = os.environ.get("DIMASKDINO_CONFIG", str(ROOT / "configs" / "dimaskdino_convnext_tiny.yaml"))
WEIGHTS = os.environ.get("DIMASKDINO_WEIGHTS", str(ROOT / "weights" / "convnext_tiny_22k_1k_224_d2.pth"))


def test_pretrained_weights_load_into_the_backbone():
    """Every backbone weight comes from the file; only the fresh output norms start from init."""
    report = assert_loads_clean(WEIGHTS, config=CONFIG, imports=[BACKBONE_FILE])
    assert report.loaded > 0


def test_the_gate_rejects_weights_without_the_backbone_prefix(convnext_d2_write_checkpoint):
    """The gate itself works here: an ImageNet file in official names (no `backbone.`) must fail."""
    raw = convnext_d2_write_checkpoint("raw_official.pth", layout="official", variant="convnext_tiny")
    with pytest.raises(AssertionError, match="backbone weights missing"):
        assert_loads_clean(raw, config=CONFIG, imports=[BACKBONE_FILE])
