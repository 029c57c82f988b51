"""`convert --json`, whole: the document a script reads, for one small known file, field by field.

The source is a ConvNeXt with one block per stage and four channels (official layout, in a
training checkpoint's 'model' entry), with one float16 tensor and one bfloat16 tensor among the
float32 ones.  Every value below follows from that file: 56 tensors, of which the classifier's 4
are dropped and 52 kept (1,872 parameters); Detectron2's backbone adds the 8 output norms itself;
bfloat16 has no numpy dtype, so a .pkl stores it as float32 (exact) and a .pth keeps it.
"""
from __future__ import annotations

import json

import pytest
import torch

from conversion.architecture import Architecture
from conversion.cli import main
from conversion.synthetic import random_state_dict

from ..support import CLASSIFIER_NAMES

SMALL = Architecture(depths=(1, 1, 1, 1), dims=(4, 4, 4, 4), num_classes=2, classifier_norm=True)
CLASSIFIER = sorted(CLASSIFIER_NAMES)
CLASSIFIER_ONLY = "classifier only (a detection backbone has no pooled norm or head)"


def _source(path) -> None:
    state_dict = random_state_dict(SMALL, seed=5)
    state_dict["stages.0.0.gamma"] = state_dict["stages.0.0.gamma"].half()
    state_dict["downsample_layers.0.0.bias"] = state_dict["downsample_layers.0.0.bias"].to(torch.bfloat16)
    torch.save({"model": state_dict, "epoch": 3}, path)


def _expected(src: str, dst: str, **differences) -> dict:
    document = {
        "source": src, "destination": dst, "layout": "official", "container": "model", "source_prefix": "",
        "variant": None, "version": 1, "depths": [1, 1, 1, 1], "dims": [4, 4, 4, 4], "num_classes": 2,
        "prefix": "backbone.", "kept": 52, "parameters": 1872,
        "dropped": CLASSIFIER, "drop_reasons": {name: CLASSIFIER_ONLY for name in CLASSIFIER},
        "reshaped": {}, "renamed": {}, "detector_parts": {}, "read_past": {}, "non_finite": None, "streamed": True,
        "fresh": [f"backbone.norm{i}.{p}" for i in range(4) for p in ("weight", "bias")],
        "notes": [
            "names lack the 'backbone.' prefix: Detectron2 loads none of them; the model is handed names such as "
            "'downsample_layers.0.0.bias' (only log warnings; training starts from random init).",
            "classifier tensors head.bias, head.weight, norm.bias, norm.weight are unused by a detection backbone; "
            "under matching_heuristics the pooled 'norm.weight' suffix-matches every '*.norm.weight' in the model.",
        ],
    }
    document.update(differences)
    return document


@pytest.mark.parametrize("name, differences", [
    ("model_d2.pkl", dict(format="pickle", dtypes={"float16": 1, "float32": 51}, stored_as={"bfloat16": "float32"},
                          bytes_written=12999)),
    ("model_d2.pth", dict(format="torch", dtypes={"bfloat16": 1, "float16": 1, "float32": 50}, stored_as={},
                          bytes_written=None)),
], ids=["pkl", "pth"])
def test_convert_json_is_exactly_the_report_of_the_file(name, differences, tmp_path, capsys):
    src, dst = tmp_path / "src.pth", tmp_path / name
    _source(src)

    status = main(["convert", str(src), str(dst), "--json"])
    document = json.loads(capsys.readouterr().out)

    assert status == 0
    if differences["bytes_written"] is None:  # a torch archive's small records are what the installed torch writes
        differences["bytes_written"] = dst.stat().st_size  # (torch 2.14: 24,169 bytes; torch 1.9 has fewer records)
    assert document == _expected(str(src), str(dst), **differences)
    assert document["bytes_written"] == dst.stat().st_size
