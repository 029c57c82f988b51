"""Source layouts: who wrote the names, and how they map to canonical (official) names.

A layout is a table of *pairs*: a source-name template and the canonical template it
corresponds to, plus an optional shape fix.  Templates name their fields, so one pair
serves both directions and every layout is invertible by construction (tests build a
source dict from a canonical one with `from_canonical` and check the round trip):

    "stages.{s}.blocks.{b}.conv_dw.{p}"  <->  "stages.{s}.{b}.dwconv.{p}"

The template language (fields, codecs, shape fixes) is in `templates.py`.  Facts (names,
shapes) come from each library's code.

Recognition: each layout has marker keys only it writes; the prefix in front of the
first marker (`backbone.`, `convnext.`, `visual.trunk.`, `module.`...) is found and
stripped.  When two layouts claim a dict the more specific one (more markers, or a
fixed prefix) wins; a tie is an error naming both.

Over 400 lines on purpose: the nine layout tables are data read side by side (when a layout
is added or checked), next to the one recognise / map / invert routine they feed.
"""
from __future__ import annotations

import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

from .architecture import CLASSIFIER_KEYS, Architecture, infer_architecture
from .errors import NotConvNeXt
from .io.dtypes import REAL_DTYPES as _WEIGHT_DTYPES  # what a weight may be: a real numeric type
from .io.handles import shape_of, with_shape
from .templates import (  # noqa: F401  (Template, _CODECS, the fixes: the tables' vocabulary, re-exported)
    _CODECS,
    GRN_VECTOR,
    LAYER_SCALE_3D,
    NO_FIX,
    SQUEEZE_1X1,
    Fix,
    Layout,
    Template,
    _pairs,
)

if TYPE_CHECKING:
    import torch

# ---------------------------------------------------------------- the layouts

_OFFICIAL_PAIRS = _pairs(
    ("downsample_layers.{i}.{j}.{p}", "downsample_layers.{i}.{j}.{p}"),
    ("stages.{s}.{b}.gamma", "stages.{s}.{b}.gamma"),
    ("stages.{s}.{b}.{m=dwconv|norm|pwconv1|pwconv2}.{p}", "stages.{s}.{b}.{m}.{p}"),
    ("stages.{s}.{b}.grn.{g=gamma|beta}", "stages.{s}.{b}.grn.{g}"),
    ("norm{i}.{p}", "norm{i}.{p}"),
    ("norm.{p}", "norm.{p}"),
    ("head.{p}", "head.{p}"),
)

OFFICIAL = Layout(
    name="official",
    markers=("stages.0.0.dwconv.weight",),
    pairs=_OFFICIAL_PAIRS,
    description="facebookresearch ConvNeXt / ConvNeXt-V2 (also FCMAE dense files and Detectron2 files)",
)

_TIMM_ROWS = (
    ("stem.{j}.{p}", "downsample_layers.0.{j}.{p}"),
    # patch_size != 4 gives stage 0 a downsample; no official name holds it, so it is named for
    # what it is and the architecture check refuses it as the variant it is.
    ("stages.0.downsample.{j}.{p}", "patch_downsample.{j}.{p}"),
    ("stages.{i}.downsample.{j}.{p}", "downsample_layers.{i}.{j}.{p}"),
    ("stages.{s}.blocks.{b}.conv_dw.{p}", "stages.{s}.{b}.dwconv.{p}"),
    ("stages.{s}.blocks.{b}.norm.{p}", "stages.{s}.{b}.norm.{p}"),
    ("stages.{s}.blocks.{b}.mlp.fc1.{p}", "stages.{s}.{b}.pwconv1.{p}", SQUEEZE_1X1),
    ("stages.{s}.blocks.{b}.mlp.fc2.{p}", "stages.{s}.{b}.pwconv2.{p}", SQUEEZE_1X1),
    ("stages.{s}.blocks.{b}.gamma", "stages.{s}.{b}.gamma"),
    ("stages.{s}.blocks.{b}.mlp.grn.weight", "stages.{s}.{b}.grn.gamma", GRN_VECTOR),
    ("stages.{s}.blocks.{b}.mlp.grn.bias", "stages.{s}.{b}.grn.beta", GRN_VECTOR),
    ("head.norm.{p}", "norm.{p}"),
    ("head.fc.{p}", "head.{p}"),
)
_TIMM_DROPS = (
    (Template("norm_pre.{p}"), "classifier-side norm of a head-norm-first (_hnf) model"),
    (Template("head.pre_logits.fc.{p}"), "classifier MLP (pre-logits)"),
)

TIMM = Layout(
    name="timm",
    markers=("stages.0.blocks.0.conv_dw.weight",),
    pairs=_pairs(*_TIMM_ROWS),
    drops=_TIMM_DROPS,
    description="timm convnext_* / convnextv2_* (incl. conv-MLP models), hub and safetensors files",
)


def _features_only(text: str) -> str:
    # timm's FeatureListNet flattens top-level module names: stem.0 -> stem_0, stages.1 -> stages_1.
    return re.sub(r"^(stem|stages)\.(\{\w+\}|\d+)", r"\1_\2", text)


TIMM_FEATURES = Layout(
    name="timm-features",
    markers=("stages_0.blocks.0.conv_dw.weight",),
    pairs=_pairs(*[(_features_only(r[0]),) + tuple(r[1:]) for r in _TIMM_ROWS[:10]]),
    description="timm features_only models (stem_0, stages_0, ...)",
)

OPEN_CLIP = Layout(
    name="open_clip",
    markers=TIMM.markers,
    pairs=TIMM.pairs,
    drops=_TIMM_DROPS,
    drop_outside_prefix="OpenCLIP tensors outside the image trunk (projection head, text tower)",
    # `visual.trunk.`: a whole CLIP model; `trunk.`: the image tower saved alone (`model.visual.state_dict()`).
    prefixes=("visual.trunk.", "trunk."),
    description="OpenCLIP ConvNeXt towers (timm trunk under visual.trunk. or trunk.)",
)

HUGGINGFACE = Layout(
    name="huggingface",
    markers=("encoder.stages.0.layers.0.dwconv.weight",),
    pairs=_pairs(
        ("embeddings.patch_embeddings.{p}", "downsample_layers.0.0.{p}"),
        ("embeddings.layernorm.{p}", "downsample_layers.0.1.{p}"),
        ("encoder.stages.{i}.downsampling_layer.{j}.{p}", "downsample_layers.{i}.{j}.{p}"),
        ("encoder.stages.{s}.layers.{b}.dwconv.{p}", "stages.{s}.{b}.dwconv.{p}"),
        ("encoder.stages.{s}.layers.{b}.layernorm.{p}", "stages.{s}.{b}.norm.{p}"),
        ("encoder.stages.{s}.layers.{b}.{m=pwconv1|pwconv2}.{p}", "stages.{s}.{b}.{m}.{p}"),
        ("encoder.stages.{s}.layers.{b}.layer_scale_parameter", "stages.{s}.{b}.gamma"),
        ("encoder.stages.{s}.layers.{b}.grn.weight", "stages.{s}.{b}.grn.gamma"),
        ("encoder.stages.{s}.layers.{b}.grn.bias", "stages.{s}.{b}.grn.beta"),
        ("hidden_states_norms.stage{i|plus1}.{p}", "norm{i}.{p}"),
        ("layernorm.{p}", "norm.{p}"),
        ("classifier.{p}", "head.{p}", None, True),
    ),
    description="Hugging Face ConvNext* / ConvNextV2* (ForImageClassification, Model, Backbone)",
)

TORCHVISION = Layout(
    name="torchvision",
    markers=("features.1.0.block.0.weight",),
    pairs=_pairs(
        ("features.{i|even}.{j}.{p}", "downsample_layers.{i}.{j}.{p}"),
        ("features.{s|odd}.{b}.block.0.{p}", "stages.{s}.{b}.dwconv.{p}"),
        ("features.{s|odd}.{b}.block.2.{p}", "stages.{s}.{b}.norm.{p}"),
        ("features.{s|odd}.{b}.block.3.{p}", "stages.{s}.{b}.pwconv1.{p}"),
        ("features.{s|odd}.{b}.block.5.{p}", "stages.{s}.{b}.pwconv2.{p}"),
        ("features.{s|odd}.{b}.layer_scale", "stages.{s}.{b}.gamma", LAYER_SCALE_3D),
        ("classifier.0.{p}", "norm.{p}"),
        ("classifier.2.{p}", "head.{p}"),
    ),
    description="torchvision convnext_tiny/small/base/large",
)


def _mmpretrain_final_norm(canonical: Dict[str, "torch.Tensor"], names: Dict[str, str]) -> None:
    """mmpretrain classifiers keep the pooled norm as `norm3` (gap_before_final_norm): it is `norm`."""
    others = [k for k in canonical if re.match(r"^norm[0-2]\.", k)]
    if "head.weight" in canonical and "norm3.weight" in canonical and not others:
        for p in ("weight", "bias"):
            if f"norm3.{p}" in canonical:
                canonical[f"norm.{p}"] = canonical.pop(f"norm3.{p}")
                names[f"norm.{p}"] = names.pop(f"norm3.{p}")


MMPRETRAIN = Layout(
    name="mmpretrain",
    markers=("stages.0.0.depthwise_conv.weight",),
    pairs=_pairs(
        ("downsample_layers.{i}.{j}.{p}", "downsample_layers.{i}.{j}.{p}"),
        ("stages.{s}.{b}.depthwise_conv.{p}", "stages.{s}.{b}.dwconv.{p}"),
        ("stages.{s}.{b}.norm.{p}", "stages.{s}.{b}.norm.{p}"),
        # linear_pw_conv=False builds the pointwise layers as 1x1 convolutions ([out, in, 1, 1]).
        ("stages.{s}.{b}.pointwise_conv1.{p}", "stages.{s}.{b}.pwconv1.{p}", SQUEEZE_1X1),
        ("stages.{s}.{b}.pointwise_conv2.{p}", "stages.{s}.{b}.pwconv2.{p}", SQUEEZE_1X1),
        ("stages.{s}.{b}.gamma", "stages.{s}.{b}.gamma"),
        ("stages.{s}.{b}.grn.{g=gamma|beta}", "stages.{s}.{b}.grn.{g}", GRN_VECTOR),
        # Reading, `norm{i}` claims norm3 first and `_mmpretrain_final_norm` decides what it is;
        # writing, the classifier's `norm` goes back to `norm3` through the second row.
        ("norm{i}.{p}", "norm{i}.{p}"),
        ("norm3.{p}", "norm.{p}"),
        ("head.fc.{p}", "head.{p}", None, True),
    ),
    description="mmpretrain / mmcls ConvNeXt (backbone. prefix, state_dict container)",
    post=_mmpretrain_final_norm,
)

# DINOv3's final norm.  The original code builds `norm` and aliases it as `norms[3]` (identities for
# stages 0-2); its dense outputs (`get_intermediate_layers`, the patch tokens of `forward_features`)
# are the last stage's map normalised per position by it, and transformers' DINOv3ConvNextModel applies
# its `layer_norm` to every patch token (and to the pooled token) the same way.  A per-position
# LayerNorm on the res5 map is exactly what the backbone's output norm `norm3` computes, so the final
# norm becomes the trained `norm3` (not a classifier norm to drop): res5 then equals DINOv3's own dense
# features, and only norm0..2 are fresh.
_DINOV3_FINAL_NORM = "norm3.{p}"


def _dinov3_norms_alias(source: Dict[str, Any], prefix: str) -> None:
    """Written back, the final norm is saved twice, as the original model saves it: `norm` and its alias `norms.3`."""
    for p in ("weight", "bias"):
        if prefix + f"norm.{p}" in source:
            source[prefix + f"norms.3.{p}"] = source[prefix + f"norm.{p}"]

DINOV3 = Layout(
    name="dinov3",
    markers=OFFICIAL.markers + ("norms.3.weight",),
    pairs=_pairs(
        *[(pair.source.text, pair.canonical.text) for pair in _OFFICIAL_PAIRS if pair.source.text.startswith(("downsample", "stages"))],
        ("norm.{p}", _DINOV3_FINAL_NORM),
        ("head.{p}", "head.{p}"),
    ),
    drops=((Template("norms.{i}.{p}"), "DINOv3 alias of norm (the same tensor)"),),
    description="DINOv3 ConvNeXt, original repository (official names plus the norms.3 alias of norm -> norm3)",
    post_inverse=_dinov3_norms_alias,
)

DINOV3_HF = Layout(
    name="dinov3-hf",
    markers=("stages.0.layers.0.depthwise_conv.weight",),
    pairs=_pairs(
        # Stage 0's downsample_layers are the stem (conv, norm); later stages' are (norm, conv), as official.
        ("stages.{i}.downsample_layers.{j}.{p}", "downsample_layers.{i}.{j}.{p}"),
        ("stages.{s}.layers.{b}.gamma", "stages.{s}.{b}.gamma"),
        ("stages.{s}.layers.{b}.depthwise_conv.{p}", "stages.{s}.{b}.dwconv.{p}"),
        ("stages.{s}.layers.{b}.layer_norm.{p}", "stages.{s}.{b}.norm.{p}"),
        ("stages.{s}.layers.{b}.pointwise_conv1.{p}", "stages.{s}.{b}.pwconv1.{p}"),
        ("stages.{s}.layers.{b}.pointwise_conv2.{p}", "stages.{s}.{b}.pwconv2.{p}"),
        # DINOv3ConvNextModel keeps `layer_norm` beside its `model.` encoder (outside the prefix).
        ("layer_norm.{p}", _DINOV3_FINAL_NORM, None, True),
    ),
    description="DINOv3 ConvNeXt as transformers writes it (DINOv3ConvNextModel / Backbone, with or without model.)",
)

LAYOUTS: Dict[str, Layout] = {
    layout.name: layout
    for layout in (OFFICIAL, TIMM, TIMM_FEATURES, OPEN_CLIP, HUGGINGFACE, TORCHVISION, MMPRETRAIN, DINOV3, DINOV3_HF)
}

# `--from NAME` also accepts the layouts a user would file under NAME: transformers' DINOv3 is both
# a Hugging Face file and a DINOv3 file.
FORCED_FAMILIES: Dict[str, Tuple[str, ...]] = {
    "huggingface": ("huggingface", "dinov3-hf"),
    "dinov3": ("dinov3", "dinov3-hf"),
}


class LayoutOption(NamedTuple):
    """`--from LAYOUT[-v1|-v2]` (the Python API's `layout=`), parsed: a layout name and the ConvNeXt
    version it pins, if any."""

    name: str
    version: Optional[int] = None

    @property
    def text(self) -> str:
        """As the user writes it: `official`, `official-v1`."""
        return self.name if self.version is None else f"{self.name}-v{self.version}"


def parse_layout_option(value: Union[None, str, LayoutOption]) -> Optional[LayoutOption]:
    """The one parser of `--from` (the CLI calls it while parsing arguments; `convert(layout=...)`
    accepts the same text): a name from `LAYOUTS`, optionally `-v1`/`-v2`.  An option already
    parsed is returned as it is, so the CLI can hand the library what it parsed.

    Raises:
        NotConvNeXt: the name is no layout's (the message lists them).
    """
    if value is None or isinstance(value, LayoutOption):
        return value
    pinned = re.fullmatch(r"(.+)-v([12])", value)
    if pinned and pinned.group(1) in LAYOUTS:
        return LayoutOption(pinned.group(1), int(pinned.group(2)))
    if value not in LAYOUTS:
        raise NotConvNeXt(
            f"unknown layout '{value}'.", f"Known layouts: {', '.join(LAYOUTS)} (add -v1 or -v2 to pin the version)."
        )
    return LayoutOption(value)


def check_pinned_version(option: Optional[LayoutOption], canonical: "Canonical", version: int) -> None:
    """Refuse weights of another ConvNeXt version than `--from NAME-vN` pins (`version` is what the
    shapes say; GRN tensors are what makes a V2).

    Raises:
        NotConvNeXt: naming the evidence and the option that would fit.
    """
    if option is None or option.version is None or option.version == version:
        return
    evidence = next((canonical.source_names[k] for k in canonical.state_dict if ".grn." in k), "no GRN tensors")
    raise NotConvNeXt(
        f"--from {option.text}: the weights are ConvNeXt V{version} (evidence: {evidence}), not V{option.version}.",
        f"Use --from {option.name}-v{version}, or drop --from.",
    )


# ---------------------------------------------------------------- recognition and mapping


@dataclass(frozen=True)
class Canonical:
    """A state dict in canonical names, and where each entry came from."""

    state_dict: Dict[str, "torch.Tensor"]
    layout: str
    prefix: str
    source_names: Dict[str, str]  # canonical name -> name in the source dict
    dropped: Dict[str, str] = field(default_factory=dict)  # source name -> why it was left out
    reshaped: Dict[str, str] = field(default_factory=dict)  # canonical name -> shape fix applied
    # A detector's or segmenter's other parts (neck, heads), by top-level prefix -> tensor count.
    detector_parts: Dict[str, int] = field(default_factory=dict)


def source_name_of(canonical: "Canonical") -> Callable[[str], str]:
    """canonical name -> the file's name for it: the one read, or the one the layout would give a
    tensor the file lacks (so "missing" names a key the user can look for)."""

    def name_of(key: str) -> str:
        hit = LAYOUTS[canonical.layout].rename(key, inverse=True)
        return canonical.source_names.get(key) or (canonical.prefix + hit[0] if hit is not None else key)

    return name_of


def classifier_names(canonical: "Canonical") -> List[str]:
    """The source's names of the classifier tensors (`head.*` and the pooled `norm.*`)."""
    return sorted(canonical.source_names[k] for k in CLASSIFIER_KEYS if k in canonical.state_dict)


def _check_weight(key: str, value: Any) -> None:
    """A weight is a dense CPU array of a real numeric type; anything else (object, string or
    structured numpy arrays, complex or float8, sparse or meta tensors) is refused, naming it."""
    dtype = str(getattr(value, "dtype", "")).replace("torch.", "")
    np = sys.modules.get("numpy")  # no array exists unless numpy is imported
    if np is not None and isinstance(value, np.ndarray):
        ok = value.dtype.kind in "biuf" and value.dtype.itemsize <= 8 and not value.dtype.hasobject and value.dtype.name in _WEIGHT_DTYPES
    elif hasattr(value, "layout"):  # a torch tensor
        ok = dtype in _WEIGHT_DTYPES and str(value.layout) == "torch.strided" and value.device.type == "cpu"
    else:  # a streamed reference: its dtype comes from a known storage type
        ok = dtype in _WEIGHT_DTYPES
    if not ok:
        where = "" if not hasattr(value, "layout") else f", {str(value.layout).replace('torch.', '')} on {value.device.type}"
        raise NotConvNeXt(
            f"'{key}' is not a weight tensor (dtype {dtype or type(value).__name__}{where}).",
            "ConvNeXt weights are dense real-valued tensors; the file is corrupt or not a ConvNeXt checkpoint.",
        )


def _fixed(key: str, value: Any, shape: Tuple[int, ...], fix: Fix) -> Any:
    """`value` given the shape its fix computed; a shape the fix cannot apply to is refused by name."""
    try:
        return with_shape(value, shape)
    except ValueError:
        raise NotConvNeXt(
            f"'{key}' has shape {list(shape_of(value))}, which the shape fix {fix.name} cannot apply to.",
            "The tensor is not what this layout stores under that name; the file is corrupt or not a ConvNeXt checkpoint.",
        ) from None


def _claims(layout: Layout, keys: Sequence[str]) -> List[str]:
    """Prefixes under which all of the layout's markers appear."""
    first = layout.markers[0]
    prefixes = {k[: -len(first)] for k in keys if k.endswith(first)}
    prefixes = {p for p in prefixes if p == "" or p.endswith(".")}
    if layout.prefixes is not None:
        prefixes &= set(layout.prefixes)
    keyset = set(keys)
    return sorted(p for p in prefixes if all(p + m in keyset for m in layout.markers))


# Backbones a detection checkpoint may hold instead of a ConvNeXt: ResNet-style bottleneck names as
# torchvision / mmdet (`layer1.0.conv1`) and Detectron2 (`res2.0.conv1`, `bottom_up.res2...`) write them.
_RESNET_KEY = re.compile(r"^(.*\.)?(layer[1-4]|res[2-5])\.0\.conv1\.weight$")


def _refuse_known_non_targets(keys: Sequence[str]) -> None:
    resnet = sorted(k for k in keys if _RESNET_KEY.match(k))
    if resnet and not any(k.endswith(m) for k in keys for layout in LAYOUTS.values() for m in layout.markers[:1]):
        raise NotConvNeXt(
            f"the weights are a ResNet, not a ConvNeXt ({len(keys)} keys, ResNet blocks such as '{resnet[0]}'): "
            "no layout of this tool converts it.",
            "Convert a checkpoint whose backbone is a ConvNeXt; a ResNet loads into Detectron2's own ResNet backbone.",
        )
    kernels = sorted(k for k in keys if k.endswith(".kernel"))
    if kernels:
        raise NotConvNeXt(
            f"sparse ConvNeXt-V2 FCMAE checkpoint (MinkowskiEngine kernels such as '{kernels[0]}'): "
            "its convolutions are stored as (k*k, in, out) sparse kernels.",
            "Densify it first: load it into the official dense ConvNeXt-V2 model (the FCMAE repo's "
            "remap to dense weights), or use the released dense *_fcmae.pt file.",
        )
    if any(re.match(r"^(.*\.)?blocks\.0\.dwconv\.weight$", k) for k in keys) and not any(".stages." in "." + k for k in keys):
        raise NotConvNeXt(
            "isotropic ConvNeXt (one stage of 'blocks.N', no downsampling pyramid): it has no res2..res5 outputs.",
            "Detectron2 ConvNeXt backbones need the hierarchical ConvNeXt (stages 0-3).",
        )


def find_layout(keys: Sequence[str], forced: Optional[str] = None) -> Tuple[Layout, str]:
    """Pick the layout whose markers the keys carry, and the prefix in front of them; of several,
    the most specific (more markers, or a fixed prefix).

    Raises:
        NotConvNeXt: no layout (or not the forced one) matches, or two match equally; the
            message names the markers looked for and a sample of the keys.
    """
    family = FORCED_FAMILIES.get(forced, (forced,)) if forced is not None else tuple(LAYOUTS)
    if forced is None:
        _refuse_known_non_targets(keys)
    found = [(LAYOUTS[name], p) for name in family for p in _claims(LAYOUTS[name], keys)]
    if found:
        best = max(layout.specificity for layout, _ in found)
        found = [(layout, p) for layout, p in found if layout.specificity == best]
    if len(found) == 1:
        return found[0]
    if forced is not None:
        markers = " or ".join(f"'{LAYOUTS[name].markers[0]}'" for name in family)
        where = "under several prefixes: " + ", ".join(p for _, p in found) if found else "anywhere"
        raise NotConvNeXt(
            f"--from {forced}: the keys do not carry its marker {markers} ({where}); "
            f"keys such as {', '.join(sorted(keys)[:4])}.",
            "Drop --from to let the layout be recognised.",
        )
    if not found:
        markers = "; ".join(f"{layout.name}: '{layout.markers[0]}'" for layout in LAYOUTS.values())
        raise NotConvNeXt(
            f"not a ConvNeXt checkpoint this tool knows: no key ends with a layout marker ({markers}); "
            f"{len(keys)} keys such as {', '.join(sorted(keys)[:5])}.",
            "Pass a ConvNeXt checkpoint; `convnext-d2 inspect FILE` shows what a file holds.",
        )
    names = ", ".join(f"{layout.name} (prefix '{prefix}')" for layout, prefix in found)
    raise NotConvNeXt(f"the keys match several layouts equally: {names}.", "Say which with --from LAYOUT.")


# Where a detector keeps its ConvNeXt: `backbone.` (mmdet, mmseg, Detectron2 meta-architectures whose
# backbone is the ConvNeXt itself) or `backbone.bottom_up.` (Detectron2's FPN wrapping it).
DETECTOR_BACKBONES = ("backbone.bottom_up.", "backbone.")


def detector_outer_prefix(prefix: str) -> Optional[str]:
    """What wraps a detector's parts when the ConvNeXt sits at `backbone.` or `backbone.bottom_up.`
    ('' for mmdet, mmseg and Detectron2 models), or None when the weights are not a detector's backbone.

    Detection and segmentation checkpoints (mmdet Mask R-CNN / Cascade, mmseg UperNet, Detectron2's
    `model_final.pth`) keep the ConvNeXt there beside `neck.`, `rpn_head.`, `roi_head.`,
    `decode_head.`, `auxiliary_head.`, `sem_seg_head.`, an FPN's `backbone.fpn_*` and the like: the
    ConvNeXt is what converts, the rest is left out and counted by part.
    """
    for backbone in DETECTOR_BACKBONES:
        if prefix == backbone or prefix.endswith("." + backbone):
            return prefix[: -len(backbone)]
    return None


def _is_convnext_name(key: str) -> bool:
    """A name some layout gives a ConvNeXt tensor: outside a detector's backbone it means two dicts were mixed."""
    return any(layout.rename(key) is not None for layout in LAYOUTS.values())


def _top_level_part(key: str) -> str:
    """`neck.fpn_convs.0.conv.bias` -> `neck.`; a top-level tensor (`pixel_mean`) is its own part;
    beside an FPN's bottom-up ConvNeXt, `backbone.fpn_lateral2.weight` -> `backbone.fpn_lateral2.`."""
    head, dot, rest = key.partition(".")
    if head == "backbone" and dot:
        return head + dot + _top_level_part(rest)
    return head + dot


def to_canonical(state_dict: Mapping[str, Any], forced: Optional[str] = None, *, lenient: bool = False) -> Canonical:
    """Rename a source state dict to canonical names and shapes.

    Every key must be claimed by the layout's pairs or drops (`lenient`: an unclaimed key is left
    out, with why, as `inspect` and `repair` need of a file with a stray tensor); two keys may never
    land on one name.

    Raises:
        NotConvNeXt: listing every unclaimed or colliding key.
    """
    if forced is not None and forced not in LAYOUTS:
        raise NotConvNeXt(f"unknown layout '{forced}'.", f"Known layouts: {', '.join(LAYOUTS)}.")
    layout, prefix = find_layout(list(state_dict), forced)
    out: Dict[str, "torch.Tensor"] = {}
    names: Dict[str, str] = {}
    dropped: Dict[str, str] = {}
    reshaped: Dict[str, str] = {}
    unclaimed: List[str] = []
    collisions: List[str] = []
    parts: Dict[str, int] = Counter()
    detector = detector_outer_prefix(prefix)
    # Keys a layout writes outside its own prefix (HF `classifier`, mmpretrain `head.fc`) sit under
    # whatever wraps the whole model: `model.convnext.` -> `model.classifier`.  Outer wrappers first.
    outers = [prefix[: i + 1] for i in range(len(prefix) - 1, -1, -1) if prefix[i] == "."][1:] + [""]
    for key, value in state_dict.items():
        inside = key.startswith(prefix)
        hit = layout.rename(key[len(prefix):]) if inside else None
        for outer in outers:
            if hit is not None:
                break
            if key.startswith(outer):
                hit = layout.rename(key[len(outer):], outside=True)
        if hit is None:
            reason = layout.drop_reason(key[len(prefix):]) if inside else layout.drop_outside_prefix
            if reason:
                dropped[key] = reason
            elif not inside and detector is not None and key.startswith(detector) and not _is_convnext_name(key[len(detector):]):
                parts[_top_level_part(key[len(detector):])] += 1
            else:
                unclaimed.append(key)
            continue
        new, fix = hit
        if new in out:
            collisions.append(f"{names[new]} and {key} -> {new}")
            continue
        _check_weight(key, value)
        shape = shape_of(value)
        fixed = fix.to_canonical(shape)
        if fixed != shape:
            reshaped[new] = fix.name
        out[new] = _fixed(key, value, fixed, fix)
        names[new] = key
    if lenient:
        dropped.update({key: f"outside the {layout.name} layout" for key in unclaimed})
        unclaimed = []
    if unclaimed or collisions:
        more = f" and {len(unclaimed) - 16} more" if len(unclaimed) > 16 else ""
        found = [f"{len(unclaimed)} key(s) outside the {layout.name} layout: {', '.join(sorted(unclaimed)[:16])}{more}"] if unclaimed else []
        found += [f"colliding keys: {'; '.join(collisions[:4])}"] if collisions else []
        raise NotConvNeXt(
            f"mixed or unknown naming ({'; '.join(found)}).",
            "The dict mixes naming schemes or holds non-ConvNeXt weights; convert the backbone's own state dict.",
        )
    if layout.post is not None:
        layout.post(out, names)
    return Canonical(out, layout.name, prefix, names, dropped, reshaped, dict(sorted(parts.items())))


def recognise(
    state_dict: Mapping[str, Any], layout: Union[None, str, LayoutOption] = None, *, lenient: bool = False
) -> Tuple[Canonical, Architecture]:
    """The recognising stage, the one place convert, inspect and verify do it: the weights in
    canonical names (their layout found, or the one `layout` names), and the architecture their
    shapes give (`lenient`: without checking every tensor against it, see `infer_architecture`).
    Only names and shapes are read: handles serve as well as tensors.

    Raises:
        NotConvNeXt: not a ConvNeXt this tool knows, or not the version `layout` pins.
    """
    option = parse_layout_option(layout)
    canonical = to_canonical(state_dict, forced=option.name if option else None, lenient=lenient)
    arch = infer_architecture({k: tuple(v.shape) for k, v in canonical.state_dict.items()}, source_name_of(canonical), lenient=lenient)
    check_pinned_version(option, canonical, arch.version)
    return canonical, arch


def from_canonical(
    state_dict: Mapping[str, Any], layout: str, prefix: str = "", *, conv_mlp: bool = False
) -> Dict[str, Any]:
    """Inverse of `to_canonical`: canonical names and shapes in `layout`'s naming behind `prefix`.

    `conv_mlp` writes timm's conv-MLP form (`[out, in, 1, 1]` MLP weights).
    """
    rules = LAYOUTS[layout]
    out: Dict[str, Any] = {}
    for key, value in state_dict.items():
        hit = rules.rename(key, inverse=True)
        outside = False
        if hit is None:
            hit, outside = rules.rename(key, inverse=True, outside=True), True
        if hit is None:
            raise NotConvNeXt(f"'{key}' has no name in the {layout} layout.", "")
        new, fix = hit
        if fix is SQUEEZE_1X1 and not conv_mlp:
            fix = NO_FIX
        out[new if outside else prefix + new] = _fixed(key, value, fix.to_source(shape_of(value)), fix)
    if rules.post_inverse is not None:
        rules.post_inverse(out, prefix)
    return out
