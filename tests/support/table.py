"""The layout capability table: what each library writes, and source dicts built within it.

A *capability table* (`SPECS`) says, per layout, which ConvNeXt versions the library writes,
whether V1 layer scale may be absent, which classifier parts it keeps, the prefixes it comes
under, and whether it has timm's conv-MLP form.  Sources are built from canonical dicts with
`from_canonical` (the layout tables are invertible) and drawn by hypothesis within the table
(`layout_cases`).  The tests pinning the table to the libraries' own models are in tests/layouts/test_table.py.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from hypothesis import strategies as st

from conversion.architecture import Architecture
from conversion.layouts import LAYOUTS, from_canonical, to_canonical
from conversion.synthetic import random_state_dict

from .. import strategies as S

# ---------------------------------------------------------------- the capability table

# What a library keeps after the trunk:
CLASSIFIER = "classifier"  # pooled `norm` + `head` (num_classes K)
POOLED_NORM = "pooled-norm"  # pooled `norm` only (timm num_classes=0, HF ConvNextModel, DINOv3)
NO_HEAD = "none"  # the trunk alone
OUTPUT_NORMS = "output-norms"  # detection output norms norm0..3 (official detection, HF Backbone, mmdet)
FINAL_NORM = "final-norm"  # DINOv3's final norm, a per-position norm of the last map: output norm 3 only
HEADS = (CLASSIFIER, POOLED_NORM, NO_HEAD, OUTPUT_NORMS)


@dataclass(frozen=True)
class LayoutSpec:
    """What one library writes.

    Attributes:
        versions: ConvNeXt versions the library has (torchvision and DINOv3: V1 only).
        layer_scale_optional: V1 files may lack `gamma` (trained with layer scale 0); torchvision's
            CNBlock always creates it, and DINOv3 files are modelled with it.
        heads: which of HEADS the library's files carry.
        prefixes: per version, the prefixes its files come under.
        conv_mlp: timm's conv-MLP form (`mlp.fc{1,2}.weight` as `[out, in, 1, 1]`) exists.
        unnamed: canonical parts the layout has no name for (from_canonical must refuse them).
    """

    name: str
    versions: Tuple[int, ...]
    layer_scale_optional: bool
    heads: Tuple[str, ...]
    prefixes: Mapping[int, Tuple[str, ...]]
    conv_mlp: bool = False
    unnamed: Tuple[str, ...] = ()


def _both(*prefixes: str) -> Dict[int, Tuple[str, ...]]:
    return {1: prefixes, 2: prefixes}


V1_ONLY, V1_V2 = (1,), (1, 2)
_SPECS = (
    LayoutSpec("official", V1_V2, layer_scale_optional=True, heads=HEADS, prefixes=_both("", "backbone.")),
    LayoutSpec(
        "timm",
        V1_V2,
        layer_scale_optional=True,
        heads=(CLASSIFIER, POOLED_NORM, NO_HEAD),
        prefixes=_both("", "model."),
        conv_mlp=True,
        unnamed=(OUTPUT_NORMS,),
    ),
    LayoutSpec(
        "timm-features",
        V1_V2,
        layer_scale_optional=True,
        heads=(NO_HEAD,),
        prefixes=_both(""),
        conv_mlp=True,
        unnamed=(CLASSIFIER, POOLED_NORM, OUTPUT_NORMS),
    ),
    # OpenCLIP builds its trunk with num_classes=0 (pooled norm only); a head is possible.
    LayoutSpec(
        "open_clip",
        V1_V2,
        layer_scale_optional=True,
        heads=(POOLED_NORM, CLASSIFIER),
        prefixes=_both("visual.trunk.", "trunk."),
        conv_mlp=True,
        unnamed=(OUTPUT_NORMS,),
    ),
    # ForImageClassification (prefix convnext./convnextv2.), ConvNextModel and ConvNextBackbone (no prefix).
    LayoutSpec(
        "huggingface",
        V1_V2,
        layer_scale_optional=True,
        heads=(CLASSIFIER, POOLED_NORM, OUTPUT_NORMS),
        prefixes={1: ("", "convnext."), 2: ("", "convnextv2.")},
    ),
    LayoutSpec(
        "torchvision",
        V1_ONLY,
        layer_scale_optional=False,
        heads=(CLASSIFIER,),
        prefixes={1: ("",)},
        unnamed=(OUTPUT_NORMS, "v2"),
    ),
    # mmpretrain's pooled norm is `norm3`: without a head it is read as the output norm 3, so a
    # pooled norm alone is not a form mmpretrain files take (see the test below).
    # linear_pw_conv=False: pointwise layers as 1x1 convolutions, timm's conv-MLP form.
    LayoutSpec(
        "mmpretrain",
        V1_V2,
        layer_scale_optional=True,
        heads=(CLASSIFIER, NO_HEAD, OUTPUT_NORMS),
        prefixes=_both("backbone."),
        conv_mlp=True,
    ),
    # DINOv3 (original repository): `norm` (and its `norms.3` alias), read as output norm 3; no head.
    LayoutSpec(
        "dinov3",
        V1_ONLY,
        layer_scale_optional=False,
        heads=(FINAL_NORM,),
        prefixes={1: ("",)},
        unnamed=(POOLED_NORM, OUTPUT_NORMS),
    ),
    # transformers' DINOv3ConvNextModel (`layer_norm`, read as output norm 3) and Backbone (no norm),
    # with or without the `model.` prefix of the encoder.
    LayoutSpec(
        "dinov3-hf",
        V1_ONLY,
        layer_scale_optional=False,
        heads=(FINAL_NORM, NO_HEAD),
        prefixes={1: ("", "model.")},
        unnamed=(CLASSIFIER, POOLED_NORM, OUTPUT_NORMS, "v2"),
    ),
)
SPECS: Dict[str, LayoutSpec] = {spec.name: spec for spec in _SPECS}

# Pairs (true layout, forced layout) where `--from forced` legitimately reads the same dict: an
# OpenCLIP trunk *is* a timm model under `visual.trunk.`, so `--from timm` finds the timm marker
# under that prefix and reads it identically -- unless tower tensors outside the prefix exist
# (only open_clip drops those).  Every other forced layout must refuse.
SHARED_NAMES = {("open_clip", "timm"), ("dinov3-hf", "huggingface"), ("dinov3-hf", "dinov3")}

# Tensors OpenCLIP keeps outside the image trunk (a fake text tower and the projection head).
OPEN_CLIP_EXTRAS = ("token_embedding.weight", "positional_embedding", "logit_scale", "visual.head.proj.weight")


def _with_head(arch: Architecture, head: str, num_classes: int) -> Architecture:
    return dataclasses.replace(
        arch,
        num_classes=num_classes if head == CLASSIFIER else None,
        classifier_norm=head in (CLASSIFIER, POOLED_NORM),
        output_norms=(0, 1, 2, 3) if head == OUTPUT_NORMS else (3,) if head == FINAL_NORM else (),
    )


def open_clip_extras(arch: Architecture, dtype: torch.dtype = torch.float32, prefix: str = "visual.trunk.") -> Dict[str, torch.Tensor]:
    """A tower saved alone (`trunk.`) carries only its projection; a whole CLIP model a text tower too."""
    g = torch.Generator().manual_seed(0)
    if prefix == "trunk.":
        return {"head.proj.weight": torch.randn(6, arch.dims[-1], generator=g).to(dtype)}
    return {
        "token_embedding.weight": torch.randn(11, 6, generator=g).to(dtype),
        "positional_embedding": torch.randn(5, 6, generator=g).to(dtype),
        "logit_scale": torch.tensor(4.6).to(dtype),
        "visual.head.proj.weight": torch.randn(6, arch.dims[-1], generator=g).to(dtype),
    }


class LayoutCase:
    """One source dict in one layout, and the canonical dict it was built from.

    A plain class, not a dataclass: hypothesis pretty-prints dataclasses field by field, tensors included.
    """

    def __init__(
        self,
        spec: LayoutSpec,
        arch: Architecture,
        head: str,
        prefix: str,
        conv_mlp: bool,
        canonical: Dict[str, torch.Tensor],
        source: Dict[str, Any],
        extras: Tuple[str, ...] = (),
    ) -> None:
        self.spec, self.arch, self.head, self.prefix, self.conv_mlp = spec, arch, head, prefix, conv_mlp
        self.canonical, self.source, self.extras = canonical, source, extras

    @property
    def dropped_while_reading(self) -> List[str]:
        """Source keys `to_canonical` leaves out: OpenCLIP's tower, DINOv3's `norms.3` alias of `norm`."""
        aliases = [k for k in self.source if self.spec.name == "dinov3" and k.startswith(self.prefix + "norms.")]
        return sorted(list(self.extras) + aliases)

    def __repr__(self) -> str:  # hypothesis prints this on failure
        return (
            f"LayoutCase({self.spec.name}, V{self.arch.version}, head={self.head}, prefix={self.prefix!r}, "
            f"conv_mlp={self.conv_mlp}, extras={bool(self.extras)}, {self.arch})"
        )


def build_case(
    spec: LayoutSpec,
    arch: Architecture,
    head: str,
    prefix: str,
    conv_mlp: bool = False,
    extras: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    canonical: Optional[Dict[str, torch.Tensor]] = None,
) -> LayoutCase:
    canonical = canonical if canonical is not None else random_state_dict(arch, seed=seed, dtype=dtype)
    source = from_canonical(canonical, spec.name, prefix, conv_mlp=conv_mlp)
    extra = open_clip_extras(arch, dtype, prefix) if extras else {}
    source.update(extra)
    return LayoutCase(spec, arch, head, prefix, conv_mlp, canonical, source, tuple(extra))


@st.composite
def layout_cases(draw: Any, layout: Optional[str] = None, dtype: Optional[torch.dtype] = None) -> LayoutCase:
    """A source dict in a layout the table allows: version, architecture, head, prefix, conv-MLP, dtype."""
    spec = SPECS[layout] if layout is not None else SPECS[draw(st.sampled_from(sorted(SPECS)))]
    version = draw(st.sampled_from(spec.versions))
    arch = draw(
        S.architectures(version=version, layer_scale=None if spec.layer_scale_optional else True, classifier=False)
    )
    head = draw(st.sampled_from(spec.heads))
    arch = _with_head(arch, head, draw(st.integers(1, 7)))
    _, canonical = draw(S.official_state_dicts(arch=arch, dtype=dtype if dtype is not None else draw(S.dtypes())))
    return build_case(
        spec,
        arch,
        head,
        prefix=draw(st.sampled_from(spec.prefixes[version])),
        conv_mlp=spec.conv_mlp and draw(st.booleans()),
        extras=spec.name == "open_clip" and draw(st.booleans()),
        canonical=canonical,
    )


def assert_same_tensors(got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor], what: str) -> None:
    """Same names; each tensor with the same shape and dtype and bit-identical values."""
    extra, missing = sorted(set(got) - set(want)), sorted(set(want) - set(got))
    assert (extra, missing) == ([], []), f"{what}: names differ: extra {extra[:5]}, missing {missing[:5]}"
    wrong = [
        k
        for k in want
        if got[k].shape != want[k].shape or got[k].dtype != want[k].dtype or not torch.equal(got[k], want[k])
    ]
    assert wrong == [], f"{what}: {len(wrong)} tensors differ in shape, dtype or value: {wrong[:5]}"
