"""Detectron2's `matching_heuristics`, computed ahead of loading (no detectron2 needed).

The rule (detectron2/checkpoint/c2_model_loading.py, `align_and_update_state_dicts`): each model
key takes the *longest* checkpoint key that equals it or is a dotted suffix of it; a pair of other
shapes is skipped with a warning; one checkpoint key taken by two model keys raises.  Caffe2 blobs
(a `.pkl` without `model` and `__author__`) are renamed first (`caffe2_names`).  The trap for
ConvNeXt: the classifier's pooled `norm.weight` is a suffix of every `*.norm.weight` in a detector,
so it floods the log with shape warnings, or fills a block norm the file lacks where widths agree,
or is claimed twice and aborts the load.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Sequence, Tuple

from .errors import PredictedRaise

Shape = Tuple[int, ...]

# Detectron2's Caffe2 renames, in the order it applies them (c2_model_loading.py: convert_basic_c2_names,
# then convert_c2_detectron_names); each is (regular expression, replacement), applied to every name.
_CAFFE2_RENAMES: Tuple[Tuple[str, str], ...] = (
    ("_", "."),
    (r"\.b$", ".bias"),
    (r"\.w$", ".weight"),
    (r"bn\.s$", "norm.weight"),
    (r"bn\.bias$", "norm.bias"),
    (r"bn\.rm", "norm.running_mean"),
    (r"bn\.running\.mean$", "norm.running_mean"),
    (r"bn\.riv$", "norm.running_var"),
    (r"bn\.running\.var$", "norm.running_var"),
    (r"bn\.gamma$", "norm.weight"),
    (r"bn\.beta$", "norm.bias"),
    (r"gn\.s$", "norm.weight"),
    (r"gn\.bias$", "norm.bias"),
    (r"^res\.conv1\.norm\.", "conv1.norm."),
    (r"^conv1\.", "stem.conv1."),
    (r"\.branch1\.", ".shortcut."),
    (r"\.branch2a\.", ".conv1."),
    (r"\.branch2b\.", ".conv2."),
    (r"\.branch2c\.", ".conv3."),
    (r"^body\.conv\.fcn", "body_conv_fcn"),
    (r"AnnIndex\.lowres", "ann_index_lowres"),
    (r"Index\.UV\.lowres", "index_uv_lowres"),
    (r"U\.lowres", "u_lowres"),
    (r"V\.lowres", "v_lowres"),
    (r"conv\.rpn\.fpn2", "proposal_generator.rpn_head.conv"),
    (r"conv\.rpn", "proposal_generator.rpn_head.conv"),
    (r"rpn\.bbox\.pred\.fpn2", "proposal_generator.rpn_head.anchor_deltas"),
    (r"rpn\.cls\.logits\.fpn2", "proposal_generator.rpn_head.objectness_logits"),
    (r"rpn\.bbox\.pred", "proposal_generator.rpn_head.anchor_deltas"),
    (r"rpn\.cls\.logits", "proposal_generator.rpn_head.objectness_logits"),
    (r"^bbox\.pred", "bbox_pred"),
    (r"^cls\.score", "cls_score"),
    (r"^fc6\.", "box_head.fc1."),
    (r"^fc7\.", "box_head.fc2."),
    (r"^head\.conv", "box_head.conv"),
)
_CAFFE2_LATE_RENAMES: Tuple[Tuple[str, str], ...] = (  # after the FPN names
    (r"\.\[mask\]\.fcn", "mask_head.mask_fcn"),
    (r"^\.mask\.fcn", "mask_head.mask_fcn"),
    (r"mask\.fcn\.logits", "mask_head.predictor"),
    (r"conv5\.mask", "mask_head.deconv"),
    (r"conv\.fcn", "roi_heads.keypoint_head.conv_fcn"),
    (r"kps\.score\.lowres", "roi_heads.keypoint_head.score_lowres"),
    (r"kps\.score\.", "roi_heads.keypoint_head.score."),
)
_CAFFE2_FIXED = {"pred_b": "linear_b", "pred_w": "linear_w"}


def _fpn_name(name: str) -> str:
    parts = name.split(".")
    norm = ".norm" if "norm" in parts else ""
    if name.startswith("fpn.inner.") and parts[2][3:].isdigit():
        return f"fpn_lateral{int(parts[2][3:])}{norm}.{parts[-1]}"
    if name.startswith("fpn.res") and parts[1][3:].isdigit():
        return f"fpn_output{int(parts[1][3:])}{norm}.{parts[-1]}"
    return name


def caffe2_name(name: str) -> str:
    """The name Detectron2 gives a Caffe2 blob before matching (its basic and detection renames)."""
    name = _CAFFE2_FIXED.get(name, name)
    for pattern, replacement in _CAFFE2_RENAMES:
        name = re.sub(pattern, replacement, name)
    name = _fpn_name(name)
    for pattern, replacement in _CAFFE2_LATE_RENAMES:
        name = re.sub(pattern, replacement, name)
    return name


def caffe2_names(keys: Sequence[str]) -> Dict[str, str]:
    """renamed -> original for every key.

    Raises:
        PredictedRaise: two names become one (Detectron2 asserts they do not).
    """
    renamed = {caffe2_name(k): k for k in keys}
    if len(renamed) != len(set(keys)):
        raise PredictedRaise("AssertionError: two Caffe2 names are renamed to the same Detectron2 name")
    return renamed


@dataclass
class Assignment:
    """What the heuristic does with each model key."""

    taken: Dict[str, str] = field(default_factory=dict)  # model key -> checkpoint key it loads from
    shape_skipped: List[Tuple[str, str]] = field(default_factory=list)  # (model key, checkpoint key)
    ambiguous: Dict[str, List[str]] = field(default_factory=dict)  # checkpoint key -> model keys claiming it

    @property
    def renamed(self) -> Dict[str, str]:
        return {m: c for m, c in self.taken.items() if m != c}

    def handed_on(self, checkpoint: Sequence[str]) -> Dict[str, str]:
        """The dict Detectron2 hands on to fvcore, as name -> checkpoint key: matched tensors under
        their model key, every other checkpoint key under its own name (all of them unchanged when
        nothing matched)."""
        if not self.taken:
            return {k: k for k in checkpoint}
        out = {m: c for m, c in self.taken.items()}
        claimed = set(self.taken.values())
        out.update({k: k for k in checkpoint if k not in claimed})
        return out


def _matches(model_key: str, ckpt_key: str) -> bool:
    return model_key == ckpt_key or model_key.endswith("." + ckpt_key)


def heuristic_assignment(model: Mapping[str, Sequence[int]], checkpoint: Mapping[str, Sequence[int]]) -> Assignment:
    """Apply Detectron2's longest-suffix rule to key -> shape maps of a model and a checkpoint."""
    out = Assignment()
    claimed: Dict[str, List[str]] = {}
    # Index checkpoint keys by their last component: a suffix match must share it.
    by_leaf: Dict[str, List[str]] = {}
    for key in checkpoint:
        by_leaf.setdefault(key.rsplit(".", 1)[-1], []).append(key)
    for model_key in sorted(model):
        candidates = [c for c in by_leaf.get(model_key.rsplit(".", 1)[-1], []) if _matches(model_key, c)]
        if not candidates:
            continue
        best = max(candidates, key=len)
        if tuple(model[model_key]) != tuple(checkpoint[best]):
            out.shape_skipped.append((model_key, best))
            continue
        out.taken[model_key] = best
        claimed.setdefault(best, []).append(model_key)
    out.ambiguous = {c: keys for c, keys in claimed.items() if len(keys) > 1}
    return out
