"""verify's `log_warnings`: what Detectron2's checkpointer logged at WARNING while loading the file,
less the routine line every converted file causes (the backbone's own output norms, which no
classification checkpoint has, are "not found in the checkpoint").  A user reads this list to
learn what Detectron2 said; the routine line in it would drown the rest, and a real warning left
out of it would hide a file Detectron2 only partly used."""
from __future__ import annotations

import torch

from conversion.architecture import Architecture
from conversion.pipeline import convert
from conversion.synthetic import random_state_dict
from ..support import require

require("detectron2")
from conversion.verify import verify  # noqa: E402

ARCH = Architecture((1, 1, 1, 1), (8, 8, 8, 8), num_classes=3, classifier_norm=True)
OFFICIAL = random_state_dict(ARCH, seed=7)
# The first line of Detectron2's warning for checkpoint tensors the model has no place for
# (the same words in v0.6 and 0.7).
UNUSED_KEYS_WARNING = "The checkpoint state_dict contains keys that are not used by the model:"


def test_a_converted_file_shows_no_log_warning_although_detectron2_logs_its_fresh_norms(tmp_path):
    torch.save({"model": OFFICIAL}, tmp_path / "src.pth")
    convert(str(tmp_path / "src.pth"), str(tmp_path / "ok.pth"))

    report = verify(str(tmp_path / "ok.pth"))

    assert report.ok and len(report.fresh) == 8  # Detectron2 did log them as not found
    assert report.log_warnings == []


def test_a_file_with_tensors_the_model_does_not_use_shows_detectron2s_warning(tmp_path):
    kept_norm = {"backbone." + k: v for k, v in OFFICIAL.items() if not k.startswith("head.")}  # keeps backbone.norm.*
    torch.save({"model": kept_norm}, tmp_path / "fork.pth")

    report = verify(str(tmp_path / "fork.pth"))

    assert report.unexpected == ["backbone.norm.bias", "backbone.norm.weight"]
    assert report.log_warnings == [UNUSED_KEYS_WARNING]
