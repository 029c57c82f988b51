"""`verify` where Detectron2 is not installed: a plain usage error (exit 2), not an internal error.

The interpreter runs with Detectron2 made unimportable (the core environment's situation,
reproduced wherever the suite runs), so this runs in every environment."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from conversion.architecture import Architecture
from conversion.synthetic import random_state_dict

REPO_ROOT = Path(__file__).resolve().parents[2]
SMALL = Architecture(depths=(1, 1, 2, 1), dims=(8, 16, 24, 32), num_classes=5, classifier_norm=True)

# `sys.modules[name] = None` is Python's own spelling of "this module cannot be imported".
_WITHOUT_DETECTRON2 = """
import sys
sys.modules["detectron2"] = None
from conversion.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_verify_without_detectron2_exits_2_saying_what_it_needs(tmp_path: Path):
    ckpt = tmp_path / "weights.pth"
    torch.save({"model": {f"backbone.{k}": v for k, v in random_state_dict(SMALL).items()}}, ckpt)

    proc = subprocess.run(
        [sys.executable, "-c", _WITHOUT_DETECTRON2, "verify", str(ckpt)], cwd=REPO_ROOT, capture_output=True, text=True
    )

    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Detectron2 is not installed" in proc.stderr, proc.stderr
    assert "internal error" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 2, proc.stderr
