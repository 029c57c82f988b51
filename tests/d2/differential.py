"""Checkpoint variants over every axis users produce, and what the real `DetectionCheckpointer` does
with each, observed from the values in the model before and after the load (not from its logs).

Shared by the differential property test (test_prediction_differential.py), the regression tests of
kinds A-G and benchmarks/predictions.py (the 200-file corpus): one builder, one observation.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from conversion.architecture import Architecture
from conversion.layouts import from_canonical
from conversion.synthetic import random_state_dict

from ..support import CLASSIFIER_NAMES

ARCH = Architecture((1, 1, 2, 1), (8, 16, 24, 32), num_classes=3, classifier_norm=True)
SOURCE = random_state_dict(ARCH, seed=7)  # canonical (official) names, classifier included
CLASSIFIER = CLASSIFIER_NAMES
LAYOUTS = ("official", "timm", "huggingface", "torchvision")
PREFIXES = ("backbone.", "", "module.backbone.", "module.module.backbone.", "_orig_mod.backbone.",
            "module._orig_mod.backbone.", "model.", "backbone.bottom_up.", "module.")
CONTAINERS = ("bare", "model", "model+author", "state_dict")
WRITERS = (("torch.save", ".pth"), ("torch.save", ".pkl"), ("pickle.dump", ".pkl"), ("pickle.dump", ".pth"),
           ("safetensors", ".safetensors"), ("safetensors", ".pth"))
DROPS = ("none", "stages.3.0.norm", "stages.1.0.dwconv", "downsample_layers.0.0.bias")


@dataclass(frozen=True)
class Variant:
    """One checkpoint file: how its weights are named, wrapped, damaged and written."""

    layout: str = "official"
    prefix: str = "backbone."
    classifier: bool = False
    drop: str = "none"
    wrong_shape: bool = False
    non_finite: Optional[str] = None  # "nan", "inf"
    dtype: str = "float32"
    arrays: bool = False  # numpy arrays instead of tensors
    extra: bool = False  # a tensor no model has
    container: str = "model"
    heuristics_in_file: bool = False
    heuristics_in_url: bool = False
    writer: Tuple[str, str] = ("torch.save", ".pth")

    def name(self) -> str:
        return "x" + self.writer[1]


def weights(v: Variant) -> Dict[str, Any]:
    """The variant's state dict as it will be written, in canonical names first (then renamed)."""
    sd = {k: t.clone() for k, t in SOURCE.items() if v.classifier or k not in CLASSIFIER}
    if v.drop != "none":
        sd = {k: t for k, t in sd.items() if not k.startswith(v.drop + ".")}
    if v.wrong_shape:
        sd["stages.2.1.pwconv2.bias"] = torch.randn(25)
    if v.non_finite:
        sd["stages.0.0.pwconv1.weight"][0, 0] = float(v.non_finite)
    sd = {k: t.to(getattr(torch, v.dtype)) for k, t in sd.items()}
    prefix = v.prefix if v.layout == "official" else v.prefix if v.prefix in ("", "module.") else ""
    named = from_canonical(sd, v.layout, prefix=prefix) if v.layout != "official" else {prefix + k: t for k, t in sd.items()}
    if v.extra:
        named[prefix + "extra_head.weight"] = torch.randn(3, 2).to(getattr(torch, v.dtype))
    if v.arrays:
        named = {k: t.numpy() for k, t in named.items()}
    return named


def _container(v: Variant, sd: Dict[str, Any]) -> Any:
    if v.container == "bare":
        return dict(sd)
    out: Dict[str, Any] = {"state_dict": sd} if v.container == "state_dict" else {"model": sd}
    if v.container == "model+author":
        out["__author__"] = "someone"
    if v.heuristics_in_file:
        out["matching_heuristics"] = True
    return out


def write(v: Variant, directory: str) -> Tuple[str, Dict[str, Any]]:
    """Write the variant; return (the path Detectron2 is given, the file's name -> tensor as written)."""
    sd = weights(v)
    path = f"{directory}/{v.name()}"
    writer = v.writer[0]
    if writer == "safetensors":
        from safetensors.torch import save_file

        save_file({k: torch.as_tensor(t).contiguous() for k, t in sd.items()}, path)
    elif writer == "pickle.dump":
        with open(path, "wb") as f:
            pickle.dump(_container(v, sd), f)
    else:
        torch.save(_container(v, sd), path)
    return path + ("?matching_heuristics=True" if v.heuristics_in_url else ""), sd


def valid(v: Variant) -> bool:
    """Combinations that exist: safetensors holds a flat dict of tensors (no bf16 numpy)."""
    if v.writer[0] == "safetensors" and (v.arrays or v.container != "bare"):
        return False
    if v.arrays and v.dtype == "bfloat16":
        return False
    return not (v.heuristics_in_file and v.container == "bare")


def _content(value: Any) -> bytes:
    return torch.as_tensor(np.asarray(value) if isinstance(value, np.ndarray) else value).float().numpy().tobytes()


@dataclass
class Observation:
    """What the real load did: raised or not; which model key received which of the file's tensors."""

    error: Optional[BaseException]
    loaded: Dict[str, List[str]] = field(default_factory=dict)  # model key -> file names with that content
    unexpected: List[str] = field(default_factory=list)
    shape_skipped: List[str] = field(default_factory=list)
    values: Dict[str, torch.Tensor] = field(default_factory=dict)  # model key -> its value after the load


def observe(model: torch.nn.Module, path: str, file_weights: Dict[str, Any]) -> Observation:
    """Load `path` as train_net.py does and see which parameters changed, to which file tensor."""
    from conversion.d2_loading import load_observed

    before = {k: t.clone() for k, t in model.state_dict().items()}
    seen = load_observed(model, path)
    by_content: Dict[bytes, List[str]] = {}
    for name, value in file_weights.items():
        by_content.setdefault(_content(value), []).append(name)
    out = Observation(seen.error, values={k: t.clone() for k, t in model.state_dict().items()})
    for key, now in model.state_dict().items():
        if now.numpy().tobytes() != before[key].numpy().tobytes():
            out.loaded[key] = sorted(by_content.get(_content(now), []))
    if seen.incompatible is not None:
        out.unexpected = sorted(seen.unexpected)
        out.shape_skipped = sorted(k for k, *_ in seen.incorrect_shapes)
    return out


def assert_prediction_matches(prediction, seen) -> None:
    """The prediction (`predict_everywhere`) against what the real checkpointer did: the same error or
    none, each target loaded from one of the predicted source tensors, the same unused and skipped names."""
    assert (prediction["raises"] is None) == (seen.error is None), (prediction["raises"], seen.error)
    if seen.error is not None:
        return
    assert sorted(prediction["loaded"]) == sorted(seen.loaded), (prediction["loaded"], seen.loaded)
    wrong = {m: c for m, c in prediction["loaded"].items() if seen.loaded[m] and c not in seen.loaded[m]}
    assert not wrong, f"predicted the wrong source tensor: {wrong} (observed {seen.loaded})"
    assert prediction["unused"] == seen.unexpected
    assert prediction["shape_skipped"] == seen.shape_skipped
