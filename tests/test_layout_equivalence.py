"""Forward equivalence per source layout: each library's own ConvNeXt against the Detectron2 backbone.

For every layout with an installable library, the *original* is that library's model with random
weights (LayerNorm weights near 1, layer scale and GRN clearly non-zero, everything seeded), saved
through the library's own path (`torch.save(model.state_dict())`, or Hugging Face's
`save_pretrained` safetensors file), converted by `conversion.convert` to `.pth`, loaded into the
D2 backbone by the real `DetectionCheckpointer` (`assert_clean_load`), and every raw stage output
(`backbone.stage_outputs`) is compared with the library's own intermediate outputs:

- timm `ConvNeXt` V1, V2 (`use_grn=True`), conv-MLP: `forward_intermediates(x, intermediates_only=True)`;
- timm `features_only` models (`stem_0`, `stages_0`...): their outputs are the stage outputs;
- OpenCLIP: a CLIP-shaped module holding the timm trunk at `visual.trunk` (see `FakeCLIP`);
- Hugging Face `ConvNextForImageClassification`, `ConvNextModel`, `ConvNextBackbone` (also its
  normed `feature_maps` against the D2 forward), `ConvNextV2ForImageClassification`:
  `hidden_states[1:]` of `output_hidden_states=True` (entry 0 is the stem output);
- torchvision `ConvNeXt`: the `features` slices `[0:2]`, `[2:4]`, `[4:6]`, `[6:8]`.

mmpretrain and DINOv3 have no installable library here, so their files are built from canonical
weights with `from_canonical` and the original is timm's `ConvNeXt` given the same canonical weights
through timm's own `checkpoint_filter_fn` (test_equivalence's `timm_original`).

The largest relative difference per layout is printed (`pytest -s`), with a table at the end.
"""

from __future__ import annotations

import copy
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import pytest
import torch
from torch import nn

from conversion import ConversionReport, convert
from conversion.architecture import Architecture
from conversion.layouts import from_canonical
from conversion.synthetic import random_state_dict
from tests.support import assert_clean_load, build_d2_model, fill_with_sentinel, load_with_detectron2, require
from tests.test_equivalence import (
    CPU_FP32_ATOL_SCALE,
    CPU_FP32_RTOL,
    CUDA_VS_FP32_REFERENCE_REL,
    NO_WORSE_THAN_ORIGINAL_FACTOR,
    UNIT_ROUNDOFF,
    assert_stages_close,
    differences,
    image,
    timm_original,
)

require("detectron2")
timm = require("timm")
transformers = require("transformers")
torchvision = require("torchvision")

from timm.models.convnext import ConvNeXt as TimmConvNeXt  # noqa: E402

pytestmark = pytest.mark.detectron2

# ---------------------------------------------------------------- sizes and tolerances

DEPTHS = (2, 1, 2, 1)
DIMS = (8, 16, 24, 32)
CLASSES = 5
# 64x64 leaves a 2x2 map at stride 32, so GRN's spatial statistics are not those of one pixel.
INPUT = (2, 3, 64, 64)
INPUT_SEED = 1

# fp32 CPU, every layout.  The libraries compute the same functions with the same torch ops, and
# where they differ the difference is one of op order, each worth a few fp32 ulp (1.2e-7) per op:
# - timm conv-MLP and features_only atto models run the MLP as 1x1 convolutions (a GEMM with
#   another blocking than nn.Linear) and their block LayerNorm channels-first;
# - timm's GRN adds in another order (`x + addcmul(bias, weight, x * n)` against the official
#   `gamma * (x * n) + beta + x`);
# - Hugging Face (torch.linalg.vector_norm in GRN) and torchvision (layer scale after the permute
#   back to NCHW) compute the same ops in the same order and are bit-identical here;
# - both sides use F.layer_norm / F.gelu / conv2d for everything else.
# test_equivalence.py's fp32 bound (1e-5 of max|ref| plus 1e-5 relative, ~80 ulp) covers that for
# all layouts with margin; a real mistake (a wrong eps, a dropped layer scale or GRN, swapped
# weights) moves outputs by 5e-5 of max|ref| or (much) more.  The measured values are printed.
RTOL = CPU_FP32_RTOL
ATOL_SCALE = CPU_FP32_ATOL_SCALE

# Worst relative difference (to max|ref|) seen per layout, printed as a table at module teardown.
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
                elif leaf in _LAYER_SCALE_NAMES:
                    value, kind = 0.5 + 0.1 * noise, "layer_scale"
                elif "grn" in type(module).__name__.lower() or "globalresponsenorm" in type(module).__name__.lower():
                    value, kind = 0.2 * noise, "grn"
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
    fresh: bool = True  # the file has no output norms: the D2 backbone's norm{i} are fresh


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


class FakeOpenCLIPVisual(nn.Module):
    """The structure of open_clip's `TimmModel` (open_clip/timm_model.py): the timm model is `trunk`
    (built with num_classes=0, so it keeps `head.norm` and has no `head.fc`), followed by `head`, a
    Sequential whose Linear `proj` maps the pooled features to the joint embedding."""

    def __init__(self, trunk: nn.Module, embed_dim: int) -> None:
        super().__init__()
        self.trunk = trunk
        proj = nn.Linear(trunk.num_features, embed_dim, bias=False)
        self.head = nn.Sequential(OrderedDict(drop=nn.Dropout(0.0), proj=proj))


class FakeCLIP(nn.Module):
    """open_clip's `CLIP` attribute names (open_clip/model.py): `visual` plus a (here tiny) text tower.

    open_clip itself is not installed; its state dict differs from this one only in the size of
    the text tower, which the converter must drop whole (everything outside `visual.trunk.`).
    """

    def __init__(self, trunk: nn.Module, embed_dim: int = 12, vocab: int = 20, context: int = 7) -> None:
        super().__init__()
        self.visual = FakeOpenCLIPVisual(trunk, embed_dim)
        self.token_embedding = nn.Embedding(vocab, embed_dim)
        self.positional_embedding = nn.Parameter(torch.zeros(context, embed_dim))
        self.ln_final = nn.LayerNorm(embed_dim)
        self.text_projection = nn.Parameter(torch.zeros(embed_dim, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(4.6))


def open_clip_trunk() -> Original:
    return Original(
        label="open_clip V1",
        model=FakeCLIP(TimmConvNeXt(depths=DEPTHS, dims=DIMS, num_classes=0)),
        stage_outputs=lambda m, x: _timm_intermediates(m.visual.trunk, x),
        arch=v1(classes=None),
        layout="open_clip",
        prefix="visual.trunk.",
        save=torch_save,
        dropped=(
            "visual.trunk.head.norm.weight",
            "visual.head.proj.weight",
            "token_embedding.weight",
            "positional_embedding",
            "ln_final.weight",
            "text_projection",
            "logit_scale",
        ),
    )


def _hf_hidden_states(model: nn.Module, x: torch.Tensor) -> List[torch.Tensor]:
    # hidden_states = (stem output, stage 0 output, ..., stage 3 output): the raw stage outputs are [1:].
    hidden = model(pixel_values=x, output_hidden_states=True).hidden_states
    assert len(hidden) == 5, f"expected the stem output plus 4 stage outputs, got {len(hidden)}"
    return list(hidden[1:])


def _hf_config(version: int, **kwargs):
    cls = transformers.ConvNextConfig if version == 1 else transformers.ConvNextV2Config
    return cls(depths=list(DEPTHS), hidden_sizes=list(DIMS), **kwargs)


def hf_classification_v1() -> Original:
    return Original(
        label="huggingface V1 (ForImageClassification)",
        model=transformers.ConvNextForImageClassification(_hf_config(1, num_labels=CLASSES)),
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
        model=transformers.ConvNextModel(_hf_config(1)),
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
        model=transformers.ConvNextBackbone(_hf_config(1, out_features=HF_STAGES)),
        stage_outputs=_hf_hidden_states,
        arch=Architecture(DEPTHS, DIMS, output_norms=(0, 1, 2, 3)),  # hidden_states_norms.stage{k} -> norm{k-1}
        layout="huggingface",
        prefix="",
        save=torch_save,
        fresh=False,
    )


def hf_classification_v2() -> Original:
    return Original(
        label="huggingface V2 (ForImageClassification, safetensors)",
        model=transformers.ConvNextV2ForImageClassification(_hf_config(2, num_labels=CLASSES)),
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


class CanonicalThroughTimm(nn.Module):
    """For layouts without an installable library: timm's ConvNeXt holding given canonical weights."""

    def __init__(self, arch: Architecture, canonical: Dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.canonical = canonical
        self.timm = timm_original(arch, canonical)


def from_canonical_layout(layout: str, version: int, prefix: str, container: str) -> Callable[[], Original]:
    """A file in `layout` built with from_canonical; the original is timm on the same canonical weights."""

    def build() -> Original:
        # DINOv3 keeps the pooled norm (and its norms.3 alias) but no head.
        arch = v1(classes=None) if layout == "dinov3" else (v1() if version == 1 else v2())
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
    "open_clip-v1": open_clip_trunk,
    "huggingface-v1-classification": hf_classification_v1,
    "huggingface-v1-model": hf_model_v1,
    "huggingface-v1-backbone": hf_backbone_v1,
    "huggingface-v2-classification": hf_classification_v2,
    "torchvision-v1": torchvision_v1,
    "mmpretrain-v1": from_canonical_layout("mmpretrain", 1, "backbone.", "state_dict"),
    "mmpretrain-v2": from_canonical_layout("mmpretrain", 2, "backbone.", "state_dict"),
    "dinov3-v1": from_canonical_layout("dinov3", 1, "", ""),
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
            assert counts["grn"] == 2 * sum(DEPTHS), counts
        elif original.arch.layer_scale:
            assert counts["layer_scale"] == sum(DEPTHS), counts
    original.model.eval()
    src = original.save(original.model, directory)
    dst = os.path.join(directory, "converted.pth")
    report = convert(src, dst)
    model = build_d2_model(original.arch)
    fill_with_sentinel(model)  # a load that does nothing cannot pass
    assert_clean_load(load_with_detectron2(model, dst), expected_missing=report.fresh)
    return Prepared(original, model.backbone.eval(), report)


@pytest.fixture(scope="module", params=sorted(ORIGINALS))
def prepared(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Prepared:
    return prepare(request.param, str(tmp_path_factory.mktemp(request.param)))


@pytest.fixture(scope="module", autouse=True)
def print_measured_table():
    """After the module: the table of the largest relative difference per layout (see with -s)."""
    yield
    if MEASURED:
        width = max(map(len, MEASURED))
        lines = [f"{'layout'.ljust(width)}  max |D2 - original| / max|original| (fp32 CPU, stage outputs)"]
        lines += [f"{label.ljust(width)}  {value:.3e}" for label, value in sorted(MEASURED.items())]
        print("\n[layout-equivalence]\n" + "\n".join(lines))


def _record(label: str, refs: Sequence[torch.Tensor], gots: Sequence[torch.Tensor]) -> None:
    worst = max(differences(r, g)[1] for r, g in zip(refs, gots))
    MEASURED[label] = max(MEASURED.get(label, 0.0), worst)


# ---------------------------------------------------------------- tests


def test_converted_file_reports_the_librarys_layout(prepared: Prepared):
    """The conversion recognised the library's layout and prefix, the architecture, and dropped what it must."""
    o, r = prepared.original, prepared.report
    assert (r.layout, r.source_prefix) == (o.layout, o.prefix)
    assert (tuple(r.depths), tuple(r.dims), r.version) == (o.arch.depths, o.arch.dims, o.arch.version)
    assert set(o.dropped) <= set(r.dropped), f"not dropped: {sorted(set(o.dropped) - set(r.dropped))}"
    assert (r.fresh != []) == o.fresh


def test_stage_outputs_equal_the_librarys_own(prepared: Prepared):
    """Every raw stage output of the D2 backbone equals the library's own intermediate output (fp32 CPU)."""
    o = prepared.original
    x = image(INPUT, seed=INPUT_SEED)
    with torch.no_grad():
        refs = o.stage_outputs(o.model, x)
        gots = prepared.backbone.stage_outputs(x)
    assert_stages_close(refs, gots, rtol=RTOL, atol_scale=ATOL_SCALE, case=o.label)
    _record(o.label, refs, gots)


def test_hf_backbone_feature_maps_equal_the_d2_forward(tmp_path):
    """ConvNextBackbone's normed `feature_maps` equal the D2 forward: hidden_states_norms.stage{k} became norm{k-1}."""
    hf = prepare("huggingface-v1-backbone", str(tmp_path))
    x = image(INPUT, seed=INPUT_SEED + 1)
    with torch.no_grad():
        refs = list(hf.original.model(pixel_values=x).feature_maps)
        outputs = hf.backbone(x)
        raw = hf.backbone.stage_outputs(x)
    gots = [outputs[f"res{i + 2}"] for i in range(4)]
    label = "huggingface V1 (ConvNextBackbone feature_maps, after output norms)"
    assert_stages_close(refs, gots, rtol=RTOL, atol_scale=ATOL_SCALE, case=label)
    _record(label, refs, gots)
    # The randomised norms are not the identity: this compares something the raw-output test does not.
    assert all(not torch.allclose(r, g, atol=1e-3) for r, g in zip(raw, gots)), "output norms changed nothing"


def test_hf_layer_norm_eps_is_the_official_1e6_except_the_pooled_norm():
    """The equivalence rests on HF's eps: every LayerNorm on the stage path uses 1e-6; only the
    classifier's pooled `layernorm` takes config.layer_norm_eps (1e-12 by default), and it is dropped."""
    for cls, config in (
        (transformers.ConvNextForImageClassification, _hf_config(1, num_labels=CLASSES)),
        (transformers.ConvNextV2ForImageClassification, _hf_config(2, num_labels=CLASSES)),
    ):
        model = cls(config)
        eps = {name: m.eps for name, m in model.named_modules() if isinstance(m, nn.LayerNorm)}
        pooled = {n for n in eps if n.endswith(".layernorm") and ".encoder." not in n and ".embeddings." not in n}
        assert pooled == {f"{model.base_model_prefix}.layernorm"}, pooled
        assert {eps[n] for n in pooled} == {config.layer_norm_eps}
        assert {e for n, e in eps.items() if n not in pooled} == {1e-6}


# ---------------------------------------------------------------- CUDA (skips without a GPU)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).replace("torch.", ""))
def test_stage_outputs_equal_the_librarys_own_on_cuda(prepared: Prepared, dtype: torch.dtype):
    """On CUDA both sides in `dtype` stay within the CUDA budget of the fp32 CPU original, and D2 is no worse than it.

    Budgets from test_equivalence.py: fp32 runs TF32 convolutions (u = 2^-11), bf16 u = 2^-8; 16 u of max|ref|.
    """
    o = prepared.original
    x = image(INPUT, seed=INPUT_SEED)
    with torch.no_grad():
        reference = o.stage_outputs(o.model, x)  # fp32 CPU
        lib = copy.deepcopy(o.model).to("cuda", dtype)
        d2 = copy.deepcopy(prepared.backbone).to("cuda", dtype)
        xd = x.to("cuda", dtype)
        lib_out = [t.float().cpu() for t in o.stage_outputs(lib, xd)]
        d2_out = [t.float().cpu() for t in d2.stage_outputs(xd)]
    name = str(dtype).replace("torch.", "")
    assert_stages_close(
        reference, d2_out, rtol=0.0, atol_scale=CUDA_VS_FP32_REFERENCE_REL[dtype], case=f"{o.label} cuda {name}"
    )
    for i, (ref, lib_t, d2_t) in enumerate(zip(reference, lib_out, d2_out)):
        lib_err, d2_err = differences(ref, lib_t)[0], differences(ref, d2_t)[0]
        allowed = NO_WORSE_THAN_ORIGINAL_FACTOR * lib_err + UNIT_ROUNDOFF[dtype] * ref.abs().max().item()
        assert d2_err <= allowed, f"stage {i} in {name}: D2 error {d2_err:.3e} vs the library's {lib_err:.3e}"
