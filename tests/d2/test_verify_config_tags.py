"""A project's YAML config with Python tags (`!!python/tuple`, as Detectron2's own configs and
`CfgNode.dump` writes tuples) is read by verify as Detectron2 reads it (it falls back to
yaml.unsafe_load for such files and says so in its log): the file verifies."""
from __future__ import annotations

import torch

from conversion import convert
from conversion.architecture import Architecture
from conversion.cli import main
from conversion.synthetic import random_state_dict

from ..support import require

require("detectron2")

ARCH = Architecture((1, 1, 1, 1), (8, 8, 8, 8), num_classes=2, classifier_norm=True)
CONFIG = """\
MODEL:
  BACKBONE: {NAME: "D2ConvNeXt", FREEZE_AT: 0}
  WEIGHTS: ""
  PIXEL_MEAN: !!python/tuple [103.53, 116.28, 123.675]
  CONVNEXT:
    DEPTHS: [1, 1, 1, 1]
    DIMS: [8, 8, 8, 8]
    USE_GRN: false
    OUT_FEATURES: !!python/tuple ["res2", "res3", "res4", "res5"]
"""


def test_a_config_with_python_tuple_tags_verifies(tmp_path, capsys):
    torch.save({"model": random_state_dict(ARCH, seed=2)}, tmp_path / "src.pth")
    convert(str(tmp_path / "src.pth"), str(tmp_path / "model_d2.pth"))
    (tmp_path / "tagged.yaml").write_text(CONFIG)

    status = main(["verify", str(tmp_path / "model_d2.pth"), "--config", str(tmp_path / "tagged.yaml"),
                   "--import", "tests.d2_styles", "--json"])
    captured = capsys.readouterr()

    assert status == 0, captured.out + captured.err
    assert '"ok": true' in captured.out and "Traceback" not in captured.err
