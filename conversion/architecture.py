"""ConvNeXt architectures: what a variant is, and how to read one off a state dict.

A *variant* is data (depths and dims), never a code path.  All shape knowledge of
the canonical (official facebookresearch) names lives in `canonical_shapes`; the
recogniser, the validator and the test strategies all derive from it, so they
cannot disagree.  Facts from facebookresearch/ConvNeXt models/convnext.py.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from .errors import NotConvNeXt

Shape = Tuple[int, ...]

NUM_STAGES = 4
# Depthwise kernel 7, stem patch 4, downsample 2 (official ConvNeXt V1 and V2).
DWCONV_KERNEL = 7
STEM_PATCH = 4
DOWNSAMPLE_KERNEL = 2
MLP_RATIO = 4

# Released variants as (depths, dims).  V1 names from the official repo plus timm's
# small ones; V2 from facebookresearch/ConvNeXt-V2.
_V1_VARIANTS: Dict[str, Tuple[Tuple[int, ...], Tuple[int, ...]]] = {
    "convnext_atto": ((2, 2, 6, 2), (40, 80, 160, 320)),
    "convnext_femto": ((2, 2, 6, 2), (48, 96, 192, 384)),
    "convnext_pico": ((2, 2, 6, 2), (64, 128, 256, 512)),
    "convnext_nano": ((2, 2, 8, 2), (80, 160, 320, 640)),
    "convnext_tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "convnext_small": ((3, 3, 27, 3), (96, 192, 384, 768)),
    "convnext_base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
    "convnext_large": ((3, 3, 27, 3), (192, 384, 768, 1536)),
    "convnext_xlarge": ((3, 3, 27, 3), (256, 512, 1024, 2048)),
    "convnext_xxlarge": ((3, 4, 30, 3), (384, 768, 1536, 3072)),
}
# V2 has V1's sizes but small, xlarge and xxlarge, plus huge.
_V2_VARIANTS: Dict[str, Tuple[Tuple[int, ...], Tuple[int, ...]]] = {
    **{name.replace("convnext_", "convnextv2_"): size for name, size in _V1_VARIANTS.items() if name[9:] not in ("small", "xlarge", "xxlarge")},
    "convnextv2_huge": ((3, 3, 27, 3), (352, 704, 1408, 2816)),
}
RELEASED_VARIANTS = {1: _V1_VARIANTS, 2: _V2_VARIANTS}


@dataclass(frozen=True)
class Architecture:
    """One ConvNeXt network, as far as its weights tell.

    Attributes:
        depths: blocks per stage (4 stages).
        dims: channels per stage.
        version: 1 (layer scale `gamma`) or 2 (GRN).
        layer_scale: whether V1 blocks carry `gamma` (absent when trained with scale 0).
        num_classes: classifier width, or None when the dict has no `head`.
        output_norms: stages whose detection output norm `norm{i}` the dict already holds.
    """

    depths: Tuple[int, ...]
    dims: Tuple[int, ...]
    version: int = 1
    layer_scale: bool = True
    num_classes: Optional[int] = None
    classifier_norm: bool = False
    output_norms: Tuple[int, ...] = field(default_factory=tuple)
    # Input width of `head` when it differs from dims[-1]: timm's pre-logits MLP heads
    # (head_hidden_size).  The classifier is dropped anyway; this only keeps the check exact.
    head_width: Optional[int] = None

    @property
    def variant(self) -> Optional[str]:
        """The released name (e.g. `convnext_tiny`) when depths and dims match one."""
        for name, (depths, dims) in RELEASED_VARIANTS[self.version].items():
            if depths == self.depths and dims == self.dims:
                return name
        return None

    def report_fields(self) -> Dict[str, Any]:
        """What the convert and inspect reports say of the architecture (their common fields)."""
        return {
            "variant": self.variant, "version": self.version, "depths": list(self.depths), "dims": list(self.dims),
            "num_classes": self.num_classes,
        }

    @property
    def description(self) -> str:
        """One line for messages: `convnext_tiny (V1, depths [...], dims [...])`."""
        name = self.variant or "custom"
        return f"{name} (V{self.version}, depths {list(self.depths)}, dims {list(self.dims)})"


def canonical_shapes(arch: Architecture) -> Dict[str, Shape]:
    """Every canonical (official) name the architecture's weights have, with its shape.

    Ordered as the official model's `state_dict()` orders them.  Classifier entries
    (`norm.*`, `head.*`) and detection output norms appear only when `arch` says so.
    """
    d = arch.dims
    shapes: Dict[str, Shape] = {
        "downsample_layers.0.0.weight": (d[0], 3, STEM_PATCH, STEM_PATCH),
        "downsample_layers.0.0.bias": (d[0],),
        "downsample_layers.0.1.weight": (d[0],),
        "downsample_layers.0.1.bias": (d[0],),
    }
    for i in range(1, NUM_STAGES):
        shapes[f"downsample_layers.{i}.0.weight"] = (d[i - 1],)
        shapes[f"downsample_layers.{i}.0.bias"] = (d[i - 1],)
        shapes[f"downsample_layers.{i}.1.weight"] = (d[i], d[i - 1], DOWNSAMPLE_KERNEL, DOWNSAMPLE_KERNEL)
        shapes[f"downsample_layers.{i}.1.bias"] = (d[i],)
    for s, depth in enumerate(arch.depths):
        c, e = d[s], MLP_RATIO * d[s]
        for b in range(depth):
            p = f"stages.{s}.{b}."
            if arch.version == 1 and arch.layer_scale:
                shapes[p + "gamma"] = (c,)
            shapes[p + "dwconv.weight"] = (c, 1, DWCONV_KERNEL, DWCONV_KERNEL)
            shapes[p + "dwconv.bias"] = (c,)
            shapes[p + "norm.weight"] = (c,)
            shapes[p + "norm.bias"] = (c,)
            shapes[p + "pwconv1.weight"] = (e, c)
            shapes[p + "pwconv1.bias"] = (e,)
            if arch.version == 2:
                shapes[p + "grn.gamma"] = (1, 1, 1, e)
                shapes[p + "grn.beta"] = (1, 1, 1, e)
            shapes[p + "pwconv2.weight"] = (c, e)
            shapes[p + "pwconv2.bias"] = (c,)
    for i in arch.output_norms:
        shapes[f"norm{i}.weight"] = (d[i],)
        shapes[f"norm{i}.bias"] = (d[i],)
    if arch.classifier_norm:
        shapes["norm.weight"] = (d[-1],)
        shapes["norm.bias"] = (d[-1],)
    if arch.num_classes is not None:
        shapes["head.weight"] = (arch.num_classes, arch.head_width or d[-1])
        shapes["head.bias"] = (arch.num_classes,)
    return shapes


CLASSIFIER_KEYS = ("norm.weight", "norm.bias", "head.weight", "head.bias")

_BLOCK_KEY = re.compile(r"^stages\.(\d+)\.(\d+)\.")
_OUTPUT_NORM_KEY = re.compile(r"^norm(\d)\.(weight|bias)$")


NameOf = Callable[[str], str]


def infer_architecture(shapes: Mapping[str, Sequence[int]], name_of: Optional[NameOf] = None, *, lenient: bool = False) -> Architecture:
    """Read depths, dims and version off canonical names and shapes, then check every tensor.

    `name_of` (canonical name -> the file's name for it, present or not) only makes messages name
    the file's own keys; without it they use canonical names.  `lenient` skips the check of every
    tensor against the architecture: what a file with a tensor dropped or misshapen is meant to be,
    for predicting its load (`inspect`, `verify`, `repair`); `convert` is never lenient.

    Raises:
        NotConvNeXt: a variant the backbone cannot represent (what was found, timm's name for it),
            or naming every missing, unexpected or wrongly shaped tensor, sorted.
    """
    stem = shapes.get("downsample_layers.0.0.weight")
    if stem is None or len(stem) != 4:
        raise NotConvNeXt(
            "not a ConvNeXt state dict: no stem convolution 'downsample_layers.0.0.weight' "
            "(a 4-d [C, 3, 4, 4] tensor).",
            "Pass a ConvNeXt checkpoint; see `python -m conversion inspect` for what a file holds.",
        )
    # A stage is as deep as its last block: a block missing before it is then named as missing
    # (a missing last block cannot be told from a shallower model).
    depths = [0] * NUM_STAGES
    for key in shapes:
        m = _BLOCK_KEY.match(key)
        if m and int(m.group(1)) < NUM_STAGES:
            depths[int(m.group(1))] = max(depths[int(m.group(1))], int(m.group(2)) + 1)
    missing_stages = [s for s, n in enumerate(depths) if n == 0]
    if missing_stages:
        raise NotConvNeXt(
            f"truncated ConvNeXt: stage(s) {missing_stages} have no blocks "
            f"('stages.S.0.dwconv.weight' missing); a ConvNeXt has {NUM_STAGES} stages.",
            "The file is incomplete or not a hierarchical ConvNeXt; convert the full checkpoint.",
        )
    dims = tuple(_stage_width(shapes, s, depths[s]) for s in range(NUM_STAGES))
    version = 2 if any(k.endswith(".grn.gamma") for k in shapes) else 1
    layer_scale = any(k.endswith(".gamma") and ".grn." not in k for k in shapes)
    head = shapes.get("head.weight")
    output_norms = tuple(
        sorted({int(m.group(1)) for m in map(_OUTPUT_NORM_KEY.match, shapes) if m and int(m.group(1)) < NUM_STAGES})
    )
    arch = Architecture(
        depths=tuple(depths),
        dims=dims,
        version=version,
        layer_scale=layer_scale,
        num_classes=int(head[0]) if head is not None and len(head) >= 1 else None,
        head_width=int(head[1]) if head is not None and len(head) == 2 and int(head[1]) != dims[-1] else None,
        classifier_norm="norm.weight" in shapes or "norm.bias" in shapes,
        output_norms=output_norms,
    )
    name_of = name_of or (lambda key: key)
    refuse_unrepresentable(shapes, arch, name_of)
    if not lenient:
        check_shapes(shapes, arch, name_of)
    return arch


def _stage_width(shapes: Mapping[str, Sequence[int]], stage: int, depth: int) -> int:
    """Channels of a stage: its blocks' depthwise kernels, else their norms (a block may be missing)."""
    for b in range(depth):
        for leaf, dim in (("dwconv.weight", 0), ("norm.weight", 0), ("pwconv2.weight", 0)):
            shape = shapes.get(f"stages.{stage}.{b}.{leaf}")
            if shape:
                return int(shape[dim])
    return 0


# ---------------------------------------------------------------- variants the backbone cannot hold
# timm builds ConvNeXts the official block cannot express: RMSNorm instead of LayerNorm
# (`convnext_*_rms`), an overlapping 3x3-conv stem (`*_ols`, stem_type='overlap'), other depthwise
# kernels (`kernel_sizes`), convolutions without bias (`conv_bias=False`) and other patch sizes
# (`patch_size`).  Their weights are intact, so "damaged" would be a lie: they are named for what
# they are, with timm's name, and refused (no renaming or reshaping turns one into the other).

# timm sizes with no official release, used only to name a refused variant (`convnext_zepto_rms`).
_TIMM_ONLY_SIZES: Dict[str, Tuple[Tuple[int, ...], Tuple[int, ...]]] = {
    "convnext_zepto": ((2, 2, 4, 2), (32, 64, 128, 256)),
}


def _size_name(arch: Architecture) -> Optional[str]:
    if arch.variant is not None:
        return arch.variant
    for name, (depths, dims) in _TIMM_ONLY_SIZES.items():
        if (arch.depths, arch.dims, arch.version) == (depths, dims, 1):
            return name
    return None


def _nearest_released(arch: Architecture) -> str:
    """The released variant of the same version closest in depths and widths (the one to pick instead)."""
    def distance(item: Tuple[str, Tuple[Tuple[int, ...], Tuple[int, ...]]]) -> Tuple[int, str]:
        depths, dims = item[1]
        return sum(abs(a - b) for a, b in zip(depths + dims, arch.depths + arch.dims)), item[0]

    return min(RELEASED_VARIANTS[arch.version].items(), key=distance)[0]


def _findings(shapes: Mapping[str, Sequence[int]], arch: Architecture, named: NameOf) -> List[Tuple[str, str]]:
    """(what was found, how timm spells it) for each departure from the official block."""
    found: List[Tuple[str, str]] = []
    stem = tuple(shapes["downsample_layers.0.0.weight"])
    stem_convs = sorted(k for k, v in shapes.items() if re.match(r"^downsample_layers\.0\.[1-9]\.weight$", k) and len(v) == 4)
    overlap = bool(stem_convs) or any(re.match(r"^downsample_layers\.0\.[2-9]\.", k) for k in shapes)
    patch_downsample = sorted(k for k in shapes if k.startswith("patch_downsample."))
    block_norms = [k for k in shapes if re.match(r"^stages\.\d+\.\d+\.norm\.weight$", k)]
    if block_norms and not any(k[: -len("weight")] + "bias" in shapes for k in block_norms):
        found.append((f"RMSNorm (norm weights without bias, e.g. '{named(sorted(block_norms)[0])}')", "_rms"))
    if overlap:
        then = f", then '{named(stem_convs[0])}' {list(shapes[stem_convs[0]])}" if stem_convs else ""
        found.append((f"an overlapping convolution stem ('{named('downsample_layers.0.0.weight')}' {list(stem)}{then})", "_ols"))
    elif stem[2:] != (STEM_PATCH, STEM_PATCH) or patch_downsample:
        extra = f", with a downsample before stage 0 ('{named(patch_downsample[-1])}')" if patch_downsample else ""
        found.append((f"a {stem[2]}x{stem[3]} patch stem ('{named('downsample_layers.0.0.weight')}' {list(stem)}{extra}; "
                      f"the backbone's is {STEM_PATCH}x{STEM_PATCH})", f" built with patch_size={stem[2]}"))
    kernels = sorted({tuple(v[2:]) for k, v in shapes.items() if k.endswith(".dwconv.weight") and len(v) == 4})
    odd = [k for k in kernels if k != (DWCONV_KERNEL, DWCONV_KERNEL)]
    if odd:
        first = next(k for k in sorted(shapes) if k.endswith(".dwconv.weight") and tuple(shapes[k][2:]) == odd[0])
        found.append((f"a {odd[0][0]}x{odd[0][1]} depthwise kernel ('{named(first)}' {list(shapes[first])}; the backbone's is "
                      f"{DWCONV_KERNEL}x{DWCONV_KERNEL})", f" built with kernel_sizes={odd[0][0]}"))
    dwconvs = [k for k in shapes if k.endswith(".dwconv.weight")]
    if dwconvs and not any(k[: -len("weight")] + "bias" in shapes for k in dwconvs) and "downsample_layers.0.0.bias" not in shapes:
        found.append((f"convolutions without bias ('{named('downsample_layers.0.0.weight')}' and "
                      f"'{named(sorted(dwconvs)[0])}' have no bias)", " built with conv_bias=False"))
    return found


def refuse_unrepresentable(shapes: Mapping[str, Sequence[int]], arch: Architecture, name_of: NameOf) -> None:
    """Raise NotConvNeXt naming a variant the backbone cannot represent, timm's name for it, and what to do."""
    found = _findings(shapes, arch, name_of)
    if not found:
        return
    size = _size_name(arch)
    suffixes = "".join(s for _, s in found if s.startswith("_"))
    options = [s for _, s in found if not s.startswith("_")]
    if size is None:
        spelled = f"a custom timm ConvNeXt (depths {list(arch.depths)}, dims {list(arch.dims)})" + "".join(options)
    else:
        spelled = f"timm's {size}{suffixes}" + ("," if options else "") + " and".join(options)
    standard = _nearest_released(arch)
    raise NotConvNeXt(
        f"a ConvNeXt variant the Detectron2 backbone cannot represent: {'; '.join(what for what, _ in found)} "
        f"-- {spelled}.",
        f"No conversion makes it fit (the backbone has LayerNorm with bias, a {STEM_PATCH}x{STEM_PATCH} patch stem, "
        f"{DWCONV_KERNEL}x{DWCONV_KERNEL} depthwise kernels and biased convolutions): use a standard variant such as {standard}.",
    )


# Problems named in one message before "and N more" (a block is 9 to 11 tensors).
_SHOWN_PROBLEMS = 12


def check_shapes(shapes: Mapping[str, Sequence[int]], arch: Architecture, name_of: Optional[NameOf] = None) -> None:
    """Raise NotConvNeXt listing every difference between `shapes` and what `arch` needs."""
    expected = canonical_shapes(arch)
    named = name_of or (lambda key: key)
    problems = [f"missing {named(name)} {list(expected[name])}" for name in sorted(set(expected) - set(shapes))]
    problems += [f"unexpected {named(name)} {list(shapes[name])}" for name in sorted(set(shapes) - set(expected))]
    problems += [f"{named(name)} has shape {list(shapes[name])}, expected {list(expected[name])}"
                 for name in sorted(set(shapes) & set(expected)) if tuple(shapes[name]) != expected[name]]
    if problems:
        more = len(problems) - _SHOWN_PROBLEMS
        shown = "; ".join(problems[:_SHOWN_PROBLEMS]) + (f"; and {more} more" if more > 0 else "")
        raise NotConvNeXt(
            f"inconsistent ConvNeXt ({arch.description}): {shown}.",
            "The file is damaged or mixes architectures; re-export it from the model that trained it.",
        )
