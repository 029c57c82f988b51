"""Forward equivalence: the original network and the Detectron2 backbone compute the same numbers.

The *original* is timm's ConvNeXt given the official weights through timm's own loading
path (`checkpoint_filter_fn`, then a strict `load_state_dict`).  The Detectron2 side is the
converted file (.pth and .pkl) loaded by the real `DetectionCheckpointer` into the backbone
built from config.  Every stage output is compared twice: before the output norms
(`stage_outputs` against timm's `forward_intermediates`) and after them (`forward` against a
channels-first LayerNorm with the backbone's own `norm{i}` parameters applied to timm's output).

Measured differences are printed: run `pytest tests/d2/test_equivalence.py -s` to see them.
"""

from __future__ import annotations

import copy
import os
import tempfile
from typing import Dict, List, Sequence, Tuple

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from conversion import ConversionReport, convert
from conversion.architecture import Architecture
from tests.strategies import architectures, official_state_dicts, seeds
from tests.support import (
    assert_clean_load,
    build_d2_model,
    fill_with_sentinel,
    load_with_detectron2,
    output_norm_names,
    random_canonical_state_dict,
    require,
)
from tests.support.equivalence import assert_stages_close, image, timm_original
from tests.support.tolerances import (
    CPU_FP32_ATOL_SCALE,
    CPU_FP32_RTOL,
    CUDA_DTYPES,
    CUDA_SAME_DTYPE_REL,
    CUDA_VS_FP32_REFERENCE_REL,
    NO_WORSE_THAN_ORIGINAL_FACTOR,
    NORM_MOVES_OUTPUTS_ATOL,
    UNIT_ROUNDOFF,
)

require("timm")
require("detectron2")

from timm.models.convnext import ConvNeXt, checkpoint_filter_fn  # noqa: E402

pytestmark = pytest.mark.detectron2

# The official LayerNorm eps (facebookresearch/ConvNeXt models/convnext.py), written out
# here rather than imported from conversion.d2 so that a wrong eps there fails this file.
OFFICIAL_LAYER_NORM_EPS = 1e-6

# ---------------------------------------------------------------- inputs and sizes

TINY = Architecture(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768), num_classes=1000, classifier_norm=True)
# convnext_atto's shape (small, released) trained without layer scale.
ATTO_NO_LAYER_SCALE = Architecture(
    depths=(2, 2, 6, 2), dims=(40, 80, 160, 320), layer_scale=False, num_classes=1000, classifier_norm=True
)
TINY_INPUT = (1, 3, 64, 64)
PROPERTY_INPUT = (2, 3, 32, 32)  # the smallest size the stride-32 stage accepts, batch 2
CUDA_INPUT = (2, 3, 128, 128)
FORMATS = ("pth", "pkl")
STRIDES = (4, 8, 16, 32)
PROPERTY_EXAMPLES = 10  # each builds two models and writes two files: ~0.3 s


# ---------------------------------------------------------------- the two sides


def converted_backbone(
    arch: Architecture, official: Dict[str, torch.Tensor], directory: str, fmt: str
) -> torch.nn.Module:
    """Convert an official file to `fmt`, build the backbone from config, load it with the real checkpointer."""
    src = os.path.join(directory, "official.pth")
    dst = os.path.join(directory, f"converted.{fmt}")
    torch.save({"model": official}, src)
    report: ConversionReport = convert(src, dst, force=True)
    model = build_d2_model(arch)
    fill_with_sentinel(model)  # a load that does nothing cannot pass
    # The official file has no output norms: all four are fresh (written out, not taken from the report).
    fresh = [f"backbone.norm{i}.{p}" for i in range(4) for p in ("weight", "bias")]
    assert sorted(report.fresh) == sorted(fresh)
    assert_clean_load(load_with_detectron2(model, dst), expected_missing=fresh)
    randomise_output_norms(model.backbone, seed=len(arch.depths) + sum(arch.dims))
    return model.backbone.eval()


def randomise_output_norms(backbone: torch.nn.Module, seed: int) -> None:
    """Give the fresh output norms non-trivial values, so the after-norm comparison tests them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in backbone.output_shape():
            norm = getattr(backbone, f"norm{int(name[3:]) - 2}")
            norm.weight.copy_(1.0 + 0.3 * torch.randn(norm.weight.shape, generator=g))
            norm.bias.copy_(0.3 * torch.randn(norm.bias.shape, generator=g))


def output_norm_params(backbone: torch.nn.Module, stage: int) -> Tuple[torch.Tensor, torch.Tensor]:
    norm = getattr(backbone, f"norm{stage}")
    return norm.weight.detach(), norm.bias.detach()


def channels_first_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The official detection output norm: LayerNorm over C of an NCHW map, eps 1e-6."""
    y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), weight.to(x), bias.to(x), OFFICIAL_LAYER_NORM_EPS)
    return y.permute(0, 3, 1, 2)


# ---------------------------------------------------------------- comparing


def after_output_norms(backbone: torch.nn.Module, refs: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """timm's stage outputs through the official output norm with the backbone's norm{i} parameters."""
    return [channels_first_layer_norm(ref, *output_norm_params(backbone, i)) for i, ref in enumerate(refs)]


def assert_output_shapes(
    backbone: torch.nn.Module, arch: Architecture, outputs: Dict[str, torch.Tensor], x: torch.Tensor
) -> None:
    """Keys res2..res5, channels DIMS, strides 4/8/16/32, each as `output_shape()` declares."""
    specs = backbone.output_shape()
    assert sorted(outputs) == sorted(specs) == ["res2", "res3", "res4", "res5"]
    for i, name in enumerate(["res2", "res3", "res4", "res5"]):
        assert (specs[name].channels, specs[name].stride) == (arch.dims[i], STRIDES[i]), f"{name}: {specs[name]}"
        expected = (x.shape[0], arch.dims[i], x.shape[2] // STRIDES[i], x.shape[3] // STRIDES[i])
        assert (
            tuple(outputs[name].shape) == expected
        ), f"{name}: shape {tuple(outputs[name].shape)}, expected {expected}"


def assert_equivalent(
    arch: Architecture, original: ConvNeXt, backbone: torch.nn.Module, x: torch.Tensor, case: str
) -> None:
    """Before and after the output norms, fp32 CPU, plus the declared output shapes."""
    with torch.no_grad():
        refs = original.forward_intermediates(x, intermediates_only=True)
        raw = backbone.stage_outputs(x)
        outputs = backbone(x)
    assert_stages_close(
        refs, raw, rtol=CPU_FP32_RTOL, atol_scale=CPU_FP32_ATOL_SCALE, case=f"{case}, before output norms"
    )
    assert_stages_close(
        after_output_norms(backbone, refs),
        [outputs[f"res{i + 2}"] for i in range(len(refs))],
        rtol=CPU_FP32_RTOL,
        atol_scale=CPU_FP32_ATOL_SCALE,
        case=f"{case}, after output norms",
    )
    assert_output_shapes(backbone, arch, outputs, x)


# ---------------------------------------------------------------- ConvNeXt-Tiny, real shapes


@pytest.fixture(scope="module")
def tiny_official() -> Dict[str, torch.Tensor]:
    return random_canonical_state_dict(TINY, seed=0)


@pytest.fixture(scope="module")
def tiny_original(tiny_official: Dict[str, torch.Tensor]) -> ConvNeXt:
    return timm_original(TINY, tiny_official)


@pytest.fixture(scope="module", params=FORMATS)
def tiny_backbone(
    request: pytest.FixtureRequest, tiny_official: Dict[str, torch.Tensor], tmp_path_factory: pytest.TempPathFactory
) -> torch.nn.Module:
    return converted_backbone(TINY, tiny_official, str(tmp_path_factory.mktemp(request.param)), request.param)


def test_tiny_stage_outputs_match_timm_before_output_norms(
    tiny_original: ConvNeXt, tiny_backbone: torch.nn.Module
) -> None:
    """ConvNeXt-Tiny (real shapes, 1000 classes): every raw stage output equals timm's, fp32 CPU."""
    x = image(TINY_INPUT, seed=1)
    with torch.no_grad():
        refs = tiny_original.forward_intermediates(x, intermediates_only=True)
        got = tiny_backbone.stage_outputs(x)
    assert_stages_close(refs, got, rtol=CPU_FP32_RTOL, atol_scale=CPU_FP32_ATOL_SCALE, case="tiny, before output norms")


def test_tiny_outputs_match_timm_after_output_norms(tiny_original: ConvNeXt, tiny_backbone: torch.nn.Module) -> None:
    """`forward` equals timm's stage outputs through a channels-first LayerNorm with the same norm{i} parameters."""
    x = image(TINY_INPUT, seed=2)
    with torch.no_grad():
        refs = after_output_norms(tiny_backbone, tiny_original.forward_intermediates(x, intermediates_only=True))
        outputs = tiny_backbone(x)
    got = [outputs[f"res{i + 2}"] for i in range(4)]
    assert_stages_close(refs, got, rtol=CPU_FP32_RTOL, atol_scale=CPU_FP32_ATOL_SCALE, case="tiny, after output norms")


def test_tiny_output_norms_are_not_the_identity(tiny_backbone: torch.nn.Module) -> None:
    """The after-norm comparison is meaningful: the output norms really transform the stage outputs."""
    x = image(TINY_INPUT, seed=3)
    with torch.no_grad():
        raw = tiny_backbone.stage_outputs(x)
        outputs = tiny_backbone(x)
    for i in range(4):
        moved = not torch.allclose(raw[i], outputs[f"res{i + 2}"], atol=NORM_MOVES_OUTPUTS_ATOL)
        assert moved, f"norm{i} left res{i + 2} unchanged"


def test_tiny_outputs_have_the_declared_shapes_and_strides(tiny_backbone: torch.nn.Module) -> None:
    """res2..res5 have channels DIMS and strides 4/8/16/32, as `output_shape()` declares."""
    x = image(TINY_INPUT, seed=4)
    with torch.no_grad():
        outputs = tiny_backbone(x)
    assert_output_shapes(tiny_backbone, TINY, outputs, x)


def test_v1_without_layer_scale_matches_timm(tmp_path) -> None:
    """A V1 network trained without layer scale (no `gamma`; timm `ls_init_value=None`) converts faithfully."""
    official = random_canonical_state_dict(ATTO_NO_LAYER_SCALE, seed=5)
    assert not any(k.endswith(".gamma") for k in official)
    original = timm_original(ATTO_NO_LAYER_SCALE, official)
    for fmt in FORMATS:
        backbone = converted_backbone(ATTO_NO_LAYER_SCALE, official, str(tmp_path), fmt)
        assert not any(n.endswith(".gamma") for n, _ in backbone.named_parameters()), "backbone built a layer scale"
        assert_equivalent(
            ATTO_NO_LAYER_SCALE, original, backbone, image(TINY_INPUT, seed=6), case=f"atto without layer scale, .{fmt}"
        )


# ---------------------------------------------------------------- any small architecture


def _v1_cases() -> st.SearchStrategy:
    return architectures(version=1).flatmap(lambda a: official_state_dicts(arch=a, dtype=torch.float32))


@settings(max_examples=PROPERTY_EXAMPLES)
@given(case=_v1_cases(), fmt=st.sampled_from(FORMATS), input_seed=seeds())
def test_any_v1_architecture_matches_timm(
    case: Tuple[Architecture, Dict[str, torch.Tensor]], fmt: str, input_seed: int
) -> None:
    """Any small V1 network (depths 1..4, with or without layer scale and classifier) matches timm."""
    arch, official = case
    original = timm_original(arch, official)
    with tempfile.TemporaryDirectory() as directory:
        backbone = converted_backbone(arch, official, directory, fmt)
    assert_equivalent(arch, original, backbone, image(PROPERTY_INPUT, input_seed), case=f"{arch.description}, .{fmt}")


@settings(max_examples=PROPERTY_EXAMPLES // 2)
@given(
    case=architectures(version=2).flatmap(lambda a: official_state_dicts(arch=a, dtype=torch.float32)),
    input_seed=seeds(),
)
def test_any_v2_architecture_matches_timm(case: Tuple[Architecture, Dict[str, torch.Tensor]], input_seed: int) -> None:
    """For any small V2 network (GRN, no layer scale), stage outputs equal timm's (`use_grn=True`)."""
    arch, official = case
    original = timm_original(arch, official)
    with tempfile.TemporaryDirectory() as directory:
        backbone = converted_backbone(arch, official, directory, "pth")
    assert_equivalent(arch, original, backbone, image(PROPERTY_INPUT, input_seed), case=f"{arch.description}, .pth")


# ---------------------------------------------------------------- CUDA: fp32, bf16, fp16


def _stage_outputs_on(
    model: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype, timm_side: bool
) -> List[torch.Tensor]:
    m = copy.deepcopy(model).to("cuda", dtype)
    xd = x.to("cuda", dtype)
    with torch.no_grad():
        outs = m.forward_intermediates(xd, intermediates_only=True) if timm_side else m.stage_outputs(xd)
    return [o.float().cpu() for o in outs]


def _forward_on(backbone: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype) -> List[torch.Tensor]:
    m = copy.deepcopy(backbone).to("cuda", dtype)
    with torch.no_grad():
        outputs = m(x.to("cuda", dtype))
    return [outputs[f"res{i + 2}"].float().cpu() for i in range(4)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_tiny_matches_timm_on_cuda(tiny_original: ConvNeXt, tiny_backbone: torch.nn.Module, dtype: torch.dtype) -> None:
    """On CUDA (fp32/bf16/fp16) D2 agrees with timm in that dtype, and is as accurate as timm against fp32 CPU."""
    x = image(CUDA_INPUT, seed=7)
    with torch.no_grad():
        reference = tiny_original.forward_intermediates(x, intermediates_only=True)  # fp32 CPU
    name = str(dtype).replace("torch.", "")
    timm_low = _stage_outputs_on(tiny_original, x, dtype, timm_side=True)
    d2_low = _stage_outputs_on(tiny_backbone, x, dtype, timm_side=False)

    # 1. D2 against timm, both on CUDA in this dtype.
    assert_stages_close(
        timm_low, d2_low, rtol=0.0, atol_scale=CUDA_SAME_DTYPE_REL[dtype], case=f"tiny cuda {name}, D2 vs timm"
    )
    # 2. D2 against the fp32 CPU reference, before and after the output norms.
    rel = CUDA_VS_FP32_REFERENCE_REL[dtype]
    assert_stages_close(
        reference, d2_low, rtol=0.0, atol_scale=rel, case=f"tiny cuda {name} vs fp32 cpu, before output norms"
    )
    assert_stages_close(
        after_output_norms(tiny_backbone, reference),
        _forward_on(tiny_backbone, x, dtype),
        rtol=0.0,
        atol_scale=rel,
        case=f"tiny cuda {name} vs fp32 cpu, after output norms",
    )
    # 3. No less accurate than the original in the same dtype.
    for i, (ref, t, d) in enumerate(zip(reference, timm_low, d2_low)):
        timm_err, d2_err = differences(ref, t)[0], differences(ref, d)[0]
        allowed = NO_WORSE_THAN_ORIGINAL_FACTOR * timm_err + UNIT_ROUNDOFF[dtype] * ref.abs().max().item()
        assert (
            d2_err <= allowed
        ), f"stage {i} in {name}: D2 error {d2_err:.3e} vs timm's {timm_err:.3e} (allowed {allowed:.3e})"


def test_ln_eps_key_matches_timms_xxlarge_norm_eps(tmp_path):
    """timm builds convnext_xxlarge with LayerNorm eps 1e-5: with MODEL.CONVNEXT.LN_EPS = 1e-5 the backbone
    equals it exactly, with the default 1e-6 it does not (so the key is what makes XXLarge weights exact)."""
    from conversion.d2_loading import build_holder, config_for

    arch = Architecture((1, 1, 2, 1), (16, 16, 32, 32), num_classes=3, classifier_norm=True)
    official = random_canonical_state_dict(arch, seed=5)
    torch.save({"model": official}, tmp_path / "src.pth")
    convert(str(tmp_path / "src.pth"), str(tmp_path / "out.pth"))
    timm_model = ConvNeXt(depths=arch.depths, dims=arch.dims, num_classes=3, norm_eps=1e-5)
    timm_model.load_state_dict(checkpoint_filter_fn(official, timm_model), strict=True)
    image = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 1e-2  # small activations: eps matters
    with torch.no_grad():
        reference = timm_model.eval().forward_intermediates(image, intermediates_only=True)
    differences = {}
    for eps in (1e-5, 1e-6):
        holder = build_holder(config_for(None, DEPTHS=list(arch.depths), DIMS=list(arch.dims), LN_EPS=eps))
        assert_clean_load(load_with_detectron2(holder, str(tmp_path / "out.pth")), output_norm_names())
        with torch.no_grad():
            ours = holder.backbone.stage_outputs(image)
        differences[eps] = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(ours, reference))
    assert differences[1e-5] <= CPU_FP32_RTOL, differences
    assert differences[1e-6] > 100 * CPU_FP32_RTOL, f"eps should matter at this input scale: {differences}"
