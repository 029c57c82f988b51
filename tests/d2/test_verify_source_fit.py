"""`verify --source` with a source that is not the checkpoint's architecture: a problem that says
so (exit 1), as for a source whose names do not fit, never an internal error.  A user passes the
wrong original (ConvNeXt-Small for a Tiny conversion) more often than a corrupt one."""
from __future__ import annotations

import torch

from conversion import convert
from conversion.architecture import Architecture
from conversion.cli import main
from conversion.synthetic import random_state_dict

from ..support import require

require("detectron2")
from conversion.verify import verify  # noqa: E402

CONVERTED = Architecture((1, 1, 1, 1), (4, 4, 4, 4), num_classes=2, classifier_norm=True)
WIDER = Architecture((1, 1, 1, 1), (8, 8, 8, 8), num_classes=2, classifier_norm=True)


def _files(tmp_path):
    torch.save({"model": random_state_dict(CONVERTED, seed=1)}, tmp_path / "src.pth")
    convert(str(tmp_path / "src.pth"), str(tmp_path / "model_d2.pth"))
    torch.save({"model": random_state_dict(WIDER, seed=1)}, tmp_path / "wider.pth")
    return str(tmp_path / "model_d2.pth"), str(tmp_path / "wider.pth")


def test_a_source_of_another_width_is_a_problem_naming_a_tensor_of_another_shape(tmp_path):
    converted, wider = _files(tmp_path)

    report = verify(converted, source=wider)

    assert not report.ok and report.feature_difference is None  # every one of the 52 kept tensors is wider
    assert report.problems == [
        "--source does not fit this backbone: 52 tensors of another shape "
        "(e.g. downsample_layers.0.0.weight: [8, 3, 4, 4] in the source, [4, 3, 4, 4] in the backbone)."
    ]


def test_the_cli_fails_such_a_source_with_exit_1_and_no_traceback(tmp_path, capsys):
    converted, wider = _files(tmp_path)

    status = main(["verify", converted, "--source", wider])
    captured = capsys.readouterr()

    assert status == 1
    assert "--source does not fit this backbone" in captured.out + captured.err
    assert "Traceback" not in captured.err and "internal error" not in captured.err
