"""Canonical names -> the Detectron2 target: the backbone's own names behind a prefix.

The project's backbone (and the DI-MaskDINO fork's, OneFormer's and the official
detection code's) keeps the official names for the trunk and adds channels-first
LayerNorms `norm{i}` on the stage outputs.  The classifier's pooled `norm` and
`head` have no place in a detection backbone: they are dropped and reported, and
never renamed onto the output norms (they normalise a pooled vector, not a map).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Sequence, Tuple

from .architecture import CLASSIFIER_KEYS, NUM_STAGES, Architecture

# Every Detectron2 meta-architecture (GeneralizedRCNN, MaskFormer, MaskDINO, ...) keeps its backbone
# at `.backbone`, so its state dict names the backbone's tensors `backbone.*`: what a converted file's
# names start with unless `--prefix` says otherwise, and where verify looks for the backbone.
BACKBONE_PREFIX = "backbone."
ALL_OUTPUTS = tuple(f"res{i + 2}" for i in range(NUM_STAGES))


@dataclass(frozen=True)
class Target:
    """The state dict to write, and what the mapping did."""

    state_dict: Dict[str, Any]
    canonical_names: Dict[str, str]  # target name -> canonical name, for every kept tensor
    dropped: Tuple[str, ...]  # canonical names left out (classifier only)


def to_target(canonical: Mapping[str, Any], prefix: str = BACKBONE_PREFIX) -> Target:
    """Prefix every backbone tensor; drop the classifier's `norm.*` and `head.*`."""
    kept = [name for name in canonical if name not in CLASSIFIER_KEYS]
    return Target(
        state_dict={prefix + name: canonical[name] for name in kept},
        canonical_names={prefix + name: name for name in kept},
        dropped=tuple(sorted(name for name in canonical if name in CLASSIFIER_KEYS)),
    )


def fresh_output_norms(arch: Architecture, out_features: Sequence[str] = ALL_OUTPUTS, prefix: str = BACKBONE_PREFIX) -> List[str]:
    """Target keys a backbone with `out_features` has that the file will not hold.

    These are the output norms `norm{i}` for each requested `res{i+2}` that the source
    did not already carry; the backbone initialises them itself (weight 1, bias 0).
    """
    stages = sorted(int(f[3:]) - 2 for f in out_features)
    return [f"{prefix}norm{i}.{p}" for i in stages if i not in arch.output_norms for p in ("weight", "bias")]
