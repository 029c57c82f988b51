"""Detectron2's `matching_heuristics`, computed ahead of loading (no detectron2 needed).

The rule (detectron2/checkpoint/c2_model_loading.py, `align_and_update_state_dicts`): each
model key takes the *longest* checkpoint key that equals it or is a dotted suffix of it
(`backbone.stages.0.0.norm.weight` takes `stages.0.0.norm.weight` over `norm.weight`).  A
pair whose shapes differ is warned about and skipped.  One checkpoint key taken by two
model keys (with equal shapes) raises `ValueError("Cannot match one checkpoint key to
multiple keys in the model.")`.

Two traps follow for ConvNeXt: the classifier's pooled `norm.weight` is a suffix of every
`*.norm.weight` in a detector (decoder norms included), so it floods the log with shape
warnings, or, where widths agree, is claimed twice and aborts the load.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Sequence, Tuple

Shape = Tuple[int, ...]


@dataclass
class Assignment:
    """What the heuristic does with each model key."""

    taken: Dict[str, str] = field(default_factory=dict)  # model key -> checkpoint key it loads from
    shape_skipped: List[Tuple[str, str]] = field(default_factory=list)  # (model key, checkpoint key)
    ambiguous: Dict[str, List[str]] = field(default_factory=dict)  # checkpoint key -> model keys claiming it

    @property
    def renamed(self) -> Dict[str, str]:
        return {m: c for m, c in self.taken.items() if m != c}


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
