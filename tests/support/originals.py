"""The originals: each library's own ConvNeXt (random seeded weights, saved through the library's own
path) and what its converted file must say, for the forward-equivalence tests of tests/layouts/
(`ORIGINALS`, `prepare`).  A registry of builders, one per layout and form a library writes; the
tests themselves are in tests/layouts/test_layout_equivalence.py, which says what each original is.

Over 400 lines on purpose: one builder per library form (timm, OpenCLIP, mmpretrain, Hugging Face,
torchvision, DINOv3), each a few lines of that library's own API, read side by side.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from conversion import ConversionReport, convert
from conversion.architecture import Architecture
from conversion.layouts import from_canonical
from conversion.synthetic import random_state_dict

from . import assert_clean_load, build_d2_model, fill_with_sentinel, load_with_detectron2, require
from .equivalence import timm_original

require("detectron2")
timm = require("timm")
transformers = require("transformers")
torchvision = require("torchvision")

from timm.models.convnext import ConvNeXt as TimmConvNeXt  # noqa: E402

# ---------------------------------------------------------------- sizes

DEPTHS = (2, 1, 2, 1)
DIMS = (8, 16, 24, 32)
CLASSES = 5


# Worst relative difference (to max|ref|) seen per layout: filled by the equivalence tests of
# tests/layouts/, printed as a table when tests/layouts/test_layout_equivalence.py ends.
MEASURED: Dict[str, float] = {}


# ---------------------------------------------------------------- seeded random weights


_LAYER_SCALE_NAMES = ("gamma", "layer_scale", "layer_scale_parameter")  # timm, torchvision, Hugging Face


def randomise_(model: nn.Module, seed: int) -> Dict[str, int]:
    """Give every parameter a seeded random value, scaled as conversion/synthetic.py scales them.

    LayerNorm weights near 1 and biases small, V1 layer scale near 0.5, GRN weight and bias
    clearly non-zero (libraries initialise GRN to 0 and layer scale to 1e-6, which would hide a
    dropped or swapped one), convolutions and linears small, so a forward stays finite.
    Returns how many tensors of each kind were set, so callers can check the kinds exist.
    """
    g = torch.Generator().manual_seed(seed)
    counts = {"layer_norm": 0, "layer_scale": 0, "grn": 0, "other": 0}
    with torch.no_grad():
        for _, module in model.named_modules():
            for leaf, p in module.named_parameters(recurse=False):
                noise = torch.randn(p.shape, generator=g, dtype=torch.float64)
                if isinstance(module, nn.LayerNorm):
                    value, kind = (1.0 + 0.1 * noise if leaf == "weight" else 0.1 * noise), "layer_norm"
                elif "grn" in type(module).__name__.lower() or "globalresponsenorm" in type(module).__name__.lower():
                    value, kind = 0.2 * noise, "grn"  # before layer scale: mmpretrain's GRN names its weight `gamma`
                elif leaf in _LAYER_SCALE_NAMES:
                    value, kind = 0.5 + 0.1 * noise, "layer_scale"
                else:
                    value, kind = 0.05 * noise, "other"
                p.copy_(value.to(p.dtype))
                counts[kind] += 1
    return counts


# ---------------------------------------------------------------- the originals


@dataclass
class Original:
    """A library's model, how to get its stage outputs, and what the converted file must say."""

    label: str  # the layout row of the printed table
    model: nn.Module
    stage_outputs: Callable[[nn.Module, torch.Tensor], List[torch.Tensor]]
    arch: Architecture  # what the D2 backbone is built as (independent of the converter's reading)
    layout: str
    prefix: str
    save: Callable[[nn.Module, str], str]  # writes the model the library's way into a folder, returns the file
    dropped: Sequence[str] = ()  # source keys the conversion must drop (at least these)
    fresh: Sequence[str] = ()  # target keys the D2 backbone initialises itself (set below: FRESH_ALL)

    def __post_init__(self) -> None:
        if self.fresh == ():
            self.fresh = FRESH_ALL


# The D2 backbone's output norms, as Detectron2 names them: fresh unless the file trains them.
FRESH_ALL = (
    "backbone.norm0.weight", "backbone.norm0.bias", "backbone.norm1.weight", "backbone.norm1.bias",
    "backbone.norm2.weight", "backbone.norm2.bias", "backbone.norm3.weight", "backbone.norm3.bias",
)
FRESH_BUT_RES5 = FRESH_ALL[:6]


def torch_save(model: nn.Module, directory: str) -> str:
    path = os.path.join(directory, "original.pth")
    torch.save(model.state_dict(), path)
    return path


def hf_save_pretrained(model: nn.Module, directory: str) -> str:
    """Hugging Face's own saving path: `save_pretrained` writes `model.safetensors` (and config.json)."""
    transformers.utils.logging.disable_progress_bar()  # its tqdm bar would clutter `pytest -s`
    model.save_pretrained(directory)
    return os.path.join(directory, "model.safetensors")


def v1(layer_scale: bool = True, classes: Optional[int] = CLASSES, classifier_norm: bool = True) -> Architecture:
    return Architecture(DEPTHS, DIMS, 1, layer_scale, classes, classifier_norm)


def v2(classes: Optional[int] = CLASSES, classifier_norm: bool = True) -> Architecture:
    return Architecture(DEPTHS, DIMS, 2, False, classes, classifier_norm)


def _timm_intermediates(model: nn.Module, x: torch.Tensor) -> List[torch.Tensor]:
    return list(model.forward_intermediates(x, intermediates_only=True))


def timm_v1() -> Original:
    return Original(
        label="timm V1",
        model=TimmConvNeXt(depths=DEPTHS, dims=DIMS, num_classes=CLASSES),
        stage_outputs=_timm_intermediates,
        arch=v1(),
        layout="timm",
        prefix="",
        save=torch_save,
        dropped=("head.fc.weight", "head.norm.weight"),
    )


def timm_v1_without_layer_scale() -> Original:
    return Original(
        label="timm V1 (no layer scale)",
        model=TimmConvNeXt(depths=DEPTHS, dims=DIMS, num_classes=CLASSES, ls_init_value=None),
        stage_outputs=_timm_intermediates,
        arch=v1(layer_scale=False),
        layout="timm",
        prefix="",
        save=torch_save,
    )


def timm_v2() -> Original:
    return Original(
        label="timm V2",
        model=TimmConvNeXt(depths=DEPTHS, dims=DIMS, num_classes=CLASSES, use_grn=True, ls_init_value=None),
        stage_outputs=_timm_intermediates,
        arch=v2(),
        layout="timm",
        prefix="",
        save=torch_save,
    )


def timm_conv_mlp() -> Original:
    return Original(
        label="timm V1 conv-MLP",
        model=TimmConvNeXt(depths=DEPTHS, dims=DIMS, num_classes=CLASSES, conv_mlp=True),
        stage_outputs=_timm_intermediates,
        arch=v1(),
        layout="timm",
        prefix="",
        save=torch_save,
    )


def timm_head_norm_first() -> Original:
    """`*_hnf` models: `norm_pre` on the last map instead of `head.norm`; dropped (classifier side)."""
    return Original(
        label="timm V1 head-norm-first",
        model=TimmConvNeXt(depths=DEPTHS, dims=DIMS, num_classes=CLASSES, head_norm_first=True),
        stage_outputs=_timm_intermediates,
        arch=v1(classifier_norm=False),
        layout="timm",
        prefix="",
        save=torch_save,
        dropped=("norm_pre.weight",),
    )


def timm_head_mlp() -> Original:
    """`convnext_large_mlp` proportions: a pre-logits MLP as wide as the last stage; dropped."""
    return Original(
        label="timm V1 pre-logits MLP head",
        model=TimmConvNeXt(depths=DEPTHS, dims=DIMS, num_classes=CLASSES, head_hidden_size=DIMS[-1]),
        stage_outputs=_timm_intermediates,
        arch=v1(),
        layout="timm",
        prefix="",
        save=torch_save,
        dropped=("head.pre_logits.fc.weight", "head.fc.weight"),
    )


def _features(model: nn.Module, x: torch.Tensor) -> List[torch.Tensor]:
    return list(model(x))


def timm_features(name: str, version: int) -> Callable[[], Original]:
    """timm's features_only wrapper (FeatureListNet) of a registered variant, resized to DEPTHS/DIMS.

    convnext_atto and convnextv2_atto are conv-MLP models, so this also covers the 1x1-conv MLP in
    the features layout.  create_model with pretrained=False builds offline; depths/dims override
    the variant's.
    """

    def build() -> Original:
        return Original(
            label=f"timm-features V{version}",
            model=timm.create_model(name, pretrained=False, features_only=True, depths=DEPTHS, dims=DIMS),
            stage_outputs=_features,
            arch=(v1 if version == 1 else v2)(classes=None, classifier_norm=False),
            layout="timm-features",
            prefix="",
            save=torch_save,
        )

    return build


# ---------------------------------------------------------------- OpenCLIP (real open_clip, random init)

# open_clip builds its ConvNeXt towers from timm models by name; a registered config keeps the text
# tower tiny (the conversion drops it whole) and the image tower timm's convnext_atto (depths and dims
# cannot be overridden through open_clip).  pretrained=None: random init, nothing downloaded.
OPEN_CLIP_MODEL = "convnext-d2-test-atto"
OPEN_CLIP_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {
        "timm_model_name": "convnext_atto",
        "timm_model_pretrained": False,
        "timm_pool": "",
        "timm_proj": "linear",
        "timm_drop": 0.0,
        "timm_drop_path": 0.0,
        "image_size": 64,
    },
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
}
ATTO = Architecture((2, 2, 6, 2), (40, 80, 160, 320), 1, True, None, True)


def create_open_clip_model(directory: str) -> nn.Module:
    """A real `open_clip.create_model(...)` CLIP model with a ConvNeXt image tower."""
    open_clip = require("open_clip")
    import json

    with open(os.path.join(directory, f"{OPEN_CLIP_MODEL}.json"), "w") as f:
        json.dump(OPEN_CLIP_CONFIG, f)
    open_clip.add_model_config(directory)
    return open_clip.create_model(OPEN_CLIP_MODEL, pretrained=None)


def _open_clip_trunk_outputs(model: nn.Module, x: torch.Tensor) -> List[torch.Tensor]:
    return _timm_intermediates(model.visual.trunk, x)


def _save_tower(prefix: str) -> Callable[[nn.Module, str], str]:
    """`model.visual.state_dict()` as users save the image tower alone, optionally re-prefixed `visual.`."""

    def save(model: nn.Module, directory: str) -> str:
        path = os.path.join(directory, "tower.pth")
        torch.save({prefix + k: v for k, v in model.visual.state_dict().items()}, path)
        return path

    return save


def open_clip_model(which: str) -> Callable[[], Original]:
    """The whole CLIP model (`visual.trunk.`), or its image tower alone with and without `visual.`."""
    prefix, save, dropped = {
        "clip": ("visual.trunk.", torch_save, ("visual.head.proj.weight", "token_embedding.weight", "logit_scale")),
        "tower": ("trunk.", _save_tower(""), ("head.proj.weight", "trunk.head.norm.weight")),
        "visual-tower": ("visual.trunk.", _save_tower("visual."), ("visual.head.proj.weight",)),
    }[which]

    def build() -> Original:
        import tempfile

        with tempfile.TemporaryDirectory() as directory:
            model = create_open_clip_model(directory)
        return Original(
            label=f"open_clip V1 ({which}, open_clip.create_model)",
            model=model,
            stage_outputs=_open_clip_trunk_outputs,
            arch=ATTO,
            layout="open_clip",
            prefix=prefix,
            save=save,
            dropped=dropped,
        )

    return build


# ---------------------------------------------------------------- mmpretrain (real, random init)


def mmpretrain_models():
    """mmpretrain's model registry.  Under transformers 5 `import mmpretrain.models` fails on its
    multimodal BERT ("NoneType takes no arguments") unless WITH_MULTIMODAL is off first."""
    dependency = require("mmpretrain.utils.dependency")
    dependency.WITH_MULTIMODAL = False
    return require("mmpretrain.models")


MM_ARCH = {"depths": list(DEPTHS), "channels": list(DIMS)}


def mmpretrain_classifier(version: int, linear_pw_conv: bool = True) -> nn.Module:
    """mmpretrain's ImageClassifier with its ConvNeXt (V2: GRN, no layer scale) and a linear head;
    linear_pw_conv=False builds the pointwise layers as 1x1 convolutions."""
    models = mmpretrain_models()
    backbone = dict(type="ConvNeXt", arch=MM_ARCH, linear_pw_conv=linear_pw_conv)
    if version == 2:
        backbone.update(use_grn=True, layer_scale_init_value=0.0)
    return models.build_classifier(
        dict(type="ImageClassifier", backbone=backbone, neck=dict(type="GlobalAveragePooling"),
             head=dict(type="LinearClsHead", num_classes=CLASSES, in_channels=DIMS[-1]))
    )


def mmpretrain_stage_outputs(backbone: nn.Module, x: torch.Tensor) -> List[torch.Tensor]:
    """The raw stage outputs through mmpretrain's own modules (its forward returns normed or pooled ones)."""
    outs = []
    for downsample, stage in zip(backbone.downsample_layers, backbone.stages):
        x = stage(downsample(x))
        outs.append(x)
    return outs


def mmengine_save(model: nn.Module, directory: str) -> str:
    """A published mmpretrain checkpoint as mmengine writes it: `meta` plus `state_dict`."""
    require("mmengine")
    from mmengine.runner.checkpoint import get_state_dict, save_checkpoint, weights_to_cpu

    path = os.path.join(directory, "epoch_300.pth")
    meta = {"mmengine_version": "0.10.7", "epoch": 300, "iter": 1200, "seed": 0, "dataset_meta": {"classes": ["a"] * CLASSES}}
    save_checkpoint({"meta": meta, "state_dict": weights_to_cpu(get_state_dict(model))}, path)
    return path


def mmpretrain_original(version: int, linear_pw_conv: bool = True) -> Callable[[], Original]:
    def build() -> Original:
        return Original(
            label=f"mmpretrain V{version} (ImageClassifier, mmengine checkpoint)" + ("" if linear_pw_conv else ", 1x1-conv pointwise"),
            model=mmpretrain_classifier(version, linear_pw_conv),
            stage_outputs=lambda m, x: mmpretrain_stage_outputs(m.backbone, x),
            arch=(v1 if version == 1 else v2)(),
            layout="mmpretrain",
            prefix="backbone.",
            save=mmengine_save,
            dropped=("head.fc.weight", "head.fc.bias", "backbone.norm3.weight", "backbone.norm3.bias"),
        )

    return build


def _hf_hidden_states(model: nn.Module, x: torch.Tensor) -> List[torch.Tensor]:
    # hidden_states = (stem output, stage 0 output, ..., stage 3 output): the raw stage outputs are [1:].
    hidden = model(pixel_values=x, output_hidden_states=True).hidden_states
    assert len(hidden) == 5, f"expected the stem output plus 4 stage outputs, got {len(hidden)}"
    return list(hidden[1:])


def hf_config(version: int, **kwargs):
    cls = transformers.ConvNextConfig if version == 1 else transformers.ConvNextV2Config
    return cls(depths=list(DEPTHS), hidden_sizes=list(DIMS), **kwargs)


def hf_classification_v1() -> Original:
    return Original(
        label="huggingface V1 (ForImageClassification)",
        model=transformers.ConvNextForImageClassification(hf_config(1, num_labels=CLASSES)),
        stage_outputs=_hf_hidden_states,
        arch=v1(),
        layout="huggingface",
        prefix="convnext.",
        save=torch_save,
        dropped=("classifier.weight", "convnext.layernorm.weight"),
    )


def hf_model_v1() -> Original:
    return Original(
        label="huggingface V1 (ConvNextModel)",
        model=transformers.ConvNextModel(hf_config(1)),
        stage_outputs=_hf_hidden_states,
        arch=v1(classes=None),
        layout="huggingface",
        prefix="",
        save=torch_save,
        dropped=("layernorm.weight",),
    )


HF_STAGES = ["stage1", "stage2", "stage3", "stage4"]


def hf_backbone_v1() -> Original:
    return Original(
        label="huggingface V1 (ConvNextBackbone)",
        model=transformers.ConvNextBackbone(hf_config(1, out_features=HF_STAGES)),
        stage_outputs=_hf_hidden_states,
        arch=Architecture(DEPTHS, DIMS, output_norms=(0, 1, 2, 3)),  # hidden_states_norms.stage{k} -> norm{k-1}
        layout="huggingface",
        prefix="",
        save=torch_save,
        fresh=[],
    )


def hf_classification_v2() -> Original:
    return Original(
        label="huggingface V2 (ForImageClassification, safetensors)",
        model=transformers.ConvNextV2ForImageClassification(hf_config(2, num_labels=CLASSES)),
        stage_outputs=_hf_hidden_states,
        arch=v2(),
        layout="huggingface",
        prefix="convnextv2.",
        save=hf_save_pretrained,
        dropped=("classifier.weight", "convnextv2.layernorm.weight"),
    )


def _torchvision_stages(model: nn.Module, x: torch.Tensor) -> List[torch.Tensor]:
    # features = [stem, stage 0, downsample 1, stage 1, downsample 2, stage 2, downsample 3, stage 3].
    outs = []
    for s in range(4):
        x = model.features[2 * s + 1](model.features[2 * s](x))
        outs.append(x)
    return outs


def torchvision_v1() -> Original:
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    # CNBlockConfig(input_channels, out_channels, num_layers); the last stage has no downsample after it.
    settings = [CNBlockConfig(DIMS[i], DIMS[i + 1] if i < 3 else None, DEPTHS[i]) for i in range(4)]
    return Original(
        label="torchvision V1",
        model=ConvNeXt(block_setting=settings, num_classes=CLASSES),
        stage_outputs=_torchvision_stages,
        arch=v1(),
        layout="torchvision",
        prefix="",
        save=torch_save,
        dropped=("classifier.0.weight", "classifier.2.weight"),
    )


# ---------------------------------------------------------------- DINOv3 as transformers writes it


def _dinov3_config(**kwargs):
    return transformers.DINOv3ConvNextConfig(depths=list(DEPTHS), hidden_sizes=list(DIMS), **kwargs)


def dinov3_hf_model(save: str) -> Callable[[], Original]:
    """transformers' DINOv3ConvNextModel: its final `layer_norm` becomes the trained output norm 3."""

    def build() -> Original:
        return Original(
            label=f"dinov3-hf V1 (DINOv3ConvNextModel, {save})",
            model=transformers.DINOv3ConvNextModel(_dinov3_config()),
            stage_outputs=_hf_hidden_states,
            arch=Architecture(DEPTHS, DIMS, output_norms=(3,)),
            layout="dinov3-hf",
            # save_pretrained writes the hub's names (`stages.*`, `layer_norm.*`); the module's own
            # state_dict() has the encoder under `model.`.
            prefix={"save_pretrained": "", "state_dict": "model."}[save],
            save={"save_pretrained": hf_save_pretrained, "state_dict": torch_save}[save],
            fresh=FRESH_BUT_RES5,
        )

    return build


def dinov3_hf_backbone() -> Original:
    return Original(
        label="dinov3-hf V1 (DINOv3ConvNextBackbone)",
        model=transformers.DINOv3ConvNextBackbone(_dinov3_config(out_features=HF_STAGES)),
        stage_outputs=lambda m, x: list(m(pixel_values=x).feature_maps),
        arch=Architecture(DEPTHS, DIMS),
        layout="dinov3-hf",
        prefix="model.",
        save=torch_save,
    )


class CanonicalThroughTimm(nn.Module):
    """For layouts without an installable library: timm's ConvNeXt holding given canonical weights."""

    def __init__(self, arch: Architecture, canonical: Dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.canonical = canonical
        # timm has no detection output norms (DINOv3's final norm is read as norm3): its trunk alone.
        trunk = {k: v for k, v in canonical.items() if not (k.startswith("norm") and k[4:5].isdigit())}
        self.timm = timm_original(dataclasses.replace(arch, output_norms=()), trunk)


def from_canonical_layout(layout: str, version: int, prefix: str, container: str) -> Callable[[], Original]:
    """A file in `layout` built with from_canonical; the original is timm on the same canonical weights."""

    def build() -> Original:
        # DINOv3 keeps its final norm (and its norms.3 alias), read as output norm 3, and no head.
        arch = Architecture(DEPTHS, DIMS, output_norms=(3,)) if layout == "dinov3" else (v1() if version == 1 else v2())
        canonical = random_state_dict(arch, seed=17 + version)

        def save(model: nn.Module, directory: str) -> str:
            path = os.path.join(directory, f"{layout}.pth")
            source = from_canonical(model.canonical, layout, prefix)
            torch.save({container: source} if container else source, path)
            return path

        return Original(
            label=f"{layout} V{version} (from_canonical; timm reference)",
            model=CanonicalThroughTimm(arch, canonical),
            stage_outputs=lambda m, x: _timm_intermediates(m.timm, x),
            arch=arch,
            layout=layout,
            prefix=prefix,
            save=save,
            fresh=FRESH_BUT_RES5 if layout == "dinov3" else FRESH_ALL,
        )

    return build


ORIGINALS: Dict[str, Callable[[], Original]] = {
    "timm-v1": timm_v1,
    "timm-v1-no-layer-scale": timm_v1_without_layer_scale,
    "timm-v2": timm_v2,
    "timm-v1-conv-mlp": timm_conv_mlp,
    "timm-v1-head-norm-first": timm_head_norm_first,
    "timm-v1-head-mlp": timm_head_mlp,
    "timm-features-v1": timm_features("convnext_atto", 1),
    "timm-features-v2": timm_features("convnextv2_atto", 2),
    "open_clip-v1-clip": open_clip_model("clip"),
    "open_clip-v1-tower": open_clip_model("tower"),
    "open_clip-v1-visual-tower": open_clip_model("visual-tower"),
    "huggingface-v1-classification": hf_classification_v1,
    "huggingface-v1-model": hf_model_v1,
    "huggingface-v1-backbone": hf_backbone_v1,
    "huggingface-v2-classification": hf_classification_v2,
    "torchvision-v1": torchvision_v1,
    "mmpretrain-v1": mmpretrain_original(1),
    "mmpretrain-v2": mmpretrain_original(2),
    "mmpretrain-v2-conv-pw": mmpretrain_original(2, linear_pw_conv=False),
    "dinov3-v1": from_canonical_layout("dinov3", 1, "", ""),
    "dinov3-hf-v1-model": dinov3_hf_model("save_pretrained"),
    "dinov3-hf-v1-model-state-dict": dinov3_hf_model("state_dict"),
    "dinov3-hf-v1-backbone": dinov3_hf_backbone,
}


@dataclass
class Prepared:
    original: Original
    backbone: nn.Module
    report: ConversionReport


def prepare(name: str, directory: str) -> Prepared:
    """The original (random weights, eval mode) and the D2 backbone loaded from its converted file."""
    original = ORIGINALS[name]()
    if not isinstance(original.model, CanonicalThroughTimm):
        counts = randomise_(original.model, seed=sum(map(ord, name)))
        # The values that would hide a dropped tensor really were made non-trivial.
        if original.arch.version == 2:
            assert counts["grn"] == 2 * sum(original.arch.depths), counts
        elif original.arch.layer_scale:
            assert counts["layer_scale"] == sum(original.arch.depths), counts
    original.model.eval()
    src = original.save(original.model, directory)
    dst = os.path.join(directory, "converted.pth")
    report = convert(src, dst)
    model = build_d2_model(original.arch)
    fill_with_sentinel(model)  # a load that does nothing cannot pass
    assert_clean_load(load_with_detectron2(model, dst), expected_missing=original.fresh)
    return Prepared(original, model.backbone.eval(), report)
