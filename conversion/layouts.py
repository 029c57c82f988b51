"""Source layouts: who wrote the names, and how they map to canonical (official) names.

A layout is a small declarative table of anchored rename rules (source -> canonical)
with their inverse (canonical -> source), so tests can build a source dict from a
canonical one and check that the round trip is the identity.  Every mapping is
checked for collisions and for keys that no rule claims.

A checkpoint may carry its layout behind a prefix (`backbone.` in a Detectron2
file, `encoder.` or anything else a wrapper added): recognition finds the prefix
from the layout's marker key and strips it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from .errors import NotConvNeXt

Rule = Tuple[str, str]  # (anchored regex, replacement)


@dataclass(frozen=True)
class Layout:
    """One library's naming of ConvNeXt weights.

    Attributes:
        name: stable identifier used by `--from` and in reports.
        marker: a source-side key (without prefix) that only this layout has.
        to_canonical: rules applied in order; the first whose pattern matches renames the key.
        from_canonical: the inverse rules.
    """

    name: str
    marker: str
    to_canonical: Tuple[Rule, ...]
    from_canonical: Tuple[Rule, ...]

    def rename(self, key: str, inverse: bool = False) -> Optional[str]:
        for pattern, repl in self.from_canonical if inverse else self.to_canonical:
            new, n = re.subn(pattern, repl, key)
            if n:
                return new
        return None


# Official facebookresearch names *are* the canonical names: every key of the model
# (and of detection backbones derived from it: `norm{i}` output norms) maps to itself.
_OFFICIAL_KEYS = (
    r"^(downsample_layers\.[0-3]\.[01]\.(?:weight|bias))$",
    r"^(stages\.\d+\.\d+\.(?:gamma|(?:dwconv|norm|pwconv1|pwconv2)\.(?:weight|bias)|grn\.(?:gamma|beta)))$",
    r"^(norm[0-3]?\.(?:weight|bias))$",
    r"^(head\.(?:weight|bias))$",
)
OFFICIAL = Layout(
    name="official",
    marker="downsample_layers.0.0.weight",
    to_canonical=tuple((p, r"\1") for p in _OFFICIAL_KEYS),
    from_canonical=tuple((p, r"\1") for p in _OFFICIAL_KEYS),
)

LAYOUTS: Dict[str, Layout] = {layout.name: layout for layout in (OFFICIAL,)}


@dataclass(frozen=True)
class Canonical:
    """A state dict in canonical names, and where each entry came from."""

    state_dict: Dict[str, torch.Tensor]
    layout: str
    prefix: str
    source_names: Dict[str, str]  # canonical name -> name in the source dict


def _as_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    import numpy as np  # numpy arrays come only from .pkl files

    return torch.from_numpy(np.ascontiguousarray(value))


def recognise(keys: Sequence[str], forced: Optional[str] = None) -> Tuple[Layout, str]:
    """Pick the layout whose marker the keys carry, and the prefix in front of it.

    Raises:
        NotConvNeXt: no layout (or not the forced one) matches, naming what was looked for.
    """
    candidates = [LAYOUTS[forced]] if forced else list(LAYOUTS.values())
    found = []
    for layout in candidates:
        prefixes = {k[: -len(layout.marker)] for k in keys if k.endswith(layout.marker)}
        prefixes = {p for p in prefixes if p == "" or p.endswith(".")}
        if len(prefixes) == 1:
            found.append((layout, prefixes.pop()))
    if len(found) == 1:
        return found[0]
    sample = ", ".join(sorted(keys)[:5])
    if not found:
        markers = ", ".join(f"'{layout.marker}' ({layout.name})" for layout in candidates)
        raise NotConvNeXt(
            f"not a ConvNeXt checkpoint this tool knows: no key ends with {markers}; "
            f"{len(keys)} keys such as {sample}.",
            "Pass a ConvNeXt checkpoint (official names such as 'stages.0.0.dwconv.weight').",
        )
    names = ", ".join(f"{layout.name} (prefix '{prefix}')" for layout, prefix in found)
    raise NotConvNeXt(f"the keys match several layouts: {names}.", "Say which with --from LAYOUT.")


def to_canonical(state_dict: Mapping[str, Any], forced: Optional[str] = None) -> Canonical:
    """Rename a source state dict to canonical names.

    Every key must be claimed by the layout's rules; two keys may never land on one name.

    Raises:
        NotConvNeXt: listing every unclaimed or colliding key.
    """
    if forced is not None and forced not in LAYOUTS:
        raise NotConvNeXt(f"unknown layout '{forced}'.", f"Known layouts: {', '.join(sorted(LAYOUTS))}.")
    layout, prefix = recognise(list(state_dict), forced)
    out: Dict[str, torch.Tensor] = {}
    names: Dict[str, str] = {}
    unclaimed: List[str] = []
    collisions: List[str] = []
    for key, value in state_dict.items():
        new = layout.rename(key[len(prefix):]) if key.startswith(prefix) else None
        if new is None:
            unclaimed.append(key)
        elif new in out:
            collisions.append(f"{names[new]} and {key} -> {new}")
        else:
            out[new] = _as_tensor(value)
            names[new] = key
    if unclaimed or collisions:
        parts = []
        if unclaimed:
            parts.append(f"{len(unclaimed)} key(s) outside the {layout.name} layout: {', '.join(sorted(unclaimed)[:8])}")
        if collisions:
            parts.append(f"colliding keys: {'; '.join(collisions[:4])}")
        raise NotConvNeXt(
            f"mixed or unknown naming ({'; '.join(parts)}).",
            "The dict mixes naming schemes or holds non-ConvNeXt weights; convert the backbone's own state dict.",
        )
    return Canonical(state_dict=out, layout=layout.name, prefix=prefix, source_names=names)


def from_canonical(state_dict: Mapping[str, Any], layout: str, prefix: str = "") -> Dict[str, Any]:
    """Inverse of `to_canonical`: write canonical names in `layout`'s naming behind `prefix`."""
    rules = LAYOUTS[layout]
    out = {}
    for key, value in state_dict.items():
        new = rules.rename(key, inverse=True)
        if new is None:
            raise NotConvNeXt(f"'{key}' has no name in the {layout} layout.", "")
        out[prefix + new] = value
    return out
