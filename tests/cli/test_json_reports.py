"""`inspect --json` and `verify --json` of one small known file, each whole document compared with ==:
every field, including those no other test reads, is pinned here (a new field must be added here)."""
from __future__ import annotations

import json

from conversion.architecture import Architecture
from conversion.cli import main
from conversion.d2_prediction import installed_stack
from conversion.synthetic import random_state_dict
from conversion.write import encode

from ..support import output_norm_names, require

ARCH = Architecture((1, 1, 1, 1), (8, 8, 8, 8))
BLOCK = ("dwconv.bias", "dwconv.weight", "gamma", "norm.bias", "norm.weight", "pwconv1.bias", "pwconv1.weight",
         "pwconv2.bias", "pwconv2.weight")
TRUNK = sorted([f"backbone.downsample_layers.{i}.{j}.{p}" for i in range(4) for j in (0, 1) for p in ("bias", "weight")]
               + [f"backbone.stages.{s}.0.{p}" for s in range(4) for p in BLOCK])
OUTPUT_NORMS = sorted(output_norm_names())
FILE_BYTES = 26127  # this project's own model-zoo pickle writer: the same bytes in every environment


def _small_pkl(tmp_path) -> str:
    path = tmp_path / "small.pkl"
    path.write_bytes(encode({"backbone." + k: v for k, v in random_state_dict(ARCH).items()}, "pickle"))
    return str(path)


def _json(capsys, args) -> dict:
    assert main(args) == 0
    return json.loads(capsys.readouterr().out)


def test_inspect_json_of_a_small_converted_pkl_is_exactly_this(tmp_path, capsys):
    path = _small_pkl(tmp_path)
    assert _json(capsys, ["inspect", path, "--json"]) == {
        "path": path, "file_bytes": FILE_BYTES, "bytes_read": FILE_BYTES, "format": "pickle",
        "container": "model", "container_keys": ["__author__", "model"], "has_ema": False,
        "layout": "official",
        "layout_description": "facebookresearch ConvNeXt / ConvNeXt-V2 (also FCMAE dense files and Detectron2 files)",
        "source_prefix": "backbone.", "version": 1, "variant": None, "depths": [1, 1, 1, 1], "dims": [8, 8, 8, 8],
        "num_classes": None, "tensors": 52, "parameters": 5152, "dtypes": {"float32": 52},
        "reshaped": {}, "drop_reasons": {}, "detector_parts": {}, "problems": [],
        "detectron2": {
            "stack": installed_stack().describe(), "reader": "pickle.load (a .pkl name)", "raises": None,
            "heuristics": None, "module_stripped": False, "loaded": {k: k for k in TRUNK}, "missing": OUTPUT_NORMS,
            "unused": [], "shape_skipped": [], "other_stacks": {},
        },
    }


def test_verify_json_of_a_small_converted_pkl_is_exactly_this(tmp_path, capsys):
    require("detectron2")
    path = _small_pkl(tmp_path)
    assert _json(capsys, ["verify", path, "--json"]) == {
        "checkpoint": path, "config": None, "backbone": "build_convnext_d2_backbone", "strict": False,
        "meta_architecture": None, "whole_model": False, "whole_model_reason": "no --config given",
        "load_attempted": True, "heuristics": False, "loaded": 52, "loaded_outside": 0, "initialised_outside": 0,
        "fresh": OUTPUT_NORMS, "missing": [], "unexpected": [], "shape_skipped": [], "renamed": {}, "ambiguous": {},
        "outside_backbone": {}, "misplaced": {}, "heuristic_shape_misses": {}, "non_finite": [], "dtype_changes": {},
        "log_warnings": [], "error": None, "feature_difference": None, "problems": [], "warnings": [], "fix": None,
        "weights_from": None, "weights_warning": None, "ok": True,
    }
