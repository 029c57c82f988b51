"""The Detectron2 backbone's contract: registry name, config keys, outputs, parameter names, freezing.

The key test here ties the converter to the backbone: the backbone's state-dict names and
shapes are exactly `canonical_shapes` of the architecture (classifier removed, output norms
added for the requested outputs), which is what the converter writes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path
from typing import Dict, Sequence, Tuple

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from conversion.architecture import Architecture, canonical_shapes
from conversion.target import ALL_OUTPUTS, fresh_output_norms, to_target
from tests.strategies import architectures
from tests.support import build_d2_model, random_canonical_state_dict, require

require("detectron2")

from detectron2.config import CfgNode, get_cfg  # noqa: E402
from detectron2.modeling import BACKBONE_REGISTRY, build_backbone  # noqa: E402

from conversion.d2 import BACKBONE_NAME, ConvNeXtBackbone, add_convnext_config  # noqa: E402

pytestmark = pytest.mark.detectron2

REPO_ROOT = Path(__file__).resolve().parents[2]
FORK_NAME = "D2ConvNeXt"  # registered by the DI-MaskDINO fork and by OneFormer
STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
SMALL = Architecture(depths=(1, 2, 1, 1), dims=(8, 12, 16, 20))
TINY = Architecture(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768))
CONFIG_KEYS = {"DEPTHS", "DIMS", "DROP_PATH_RATE", "LAYER_SCALE_INIT_VALUE", "OUT_FEATURES", "USE_GRN", "LN_EPS"}

# The DI-MaskDINO fork's backbone YAML, verbatim (configs/.../maskdino_convnext_tiny.yaml).
FORK_YAML = """\
MODEL:
  BACKBONE: {NAME: "D2ConvNeXt", FREEZE_AT: 0}
  WEIGHTS: "tools/convnext_tiny_22k_1k_224_d2.pth"
  PIXEL_MEAN: [123.675, 116.280, 103.530]
  PIXEL_STD: [58.395, 57.120, 57.375]
  CONVNEXT:
    DEPTHS: [3, 3, 9, 3]
    DIMS: [96, 192, 384, 768]
    DROP_PATH_RATE: 0.2
    LAYER_SCALE_INIT_VALUE: 1.0e-6
    OUT_FEATURES: ["res2", "res3", "res4", "res5"]
"""


def convnext_cfg(arch: Architecture = SMALL, **convnext: object) -> CfgNode:
    """A Detectron2 config naming this project's backbone, `MODEL.CONVNEXT` from `arch` then `convnext`."""
    cfg = get_cfg()
    add_convnext_config(cfg)
    cfg.MODEL.BACKBONE.NAME = BACKBONE_NAME
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.CONVNEXT.DEPTHS = list(arch.depths)
    cfg.MODEL.CONVNEXT.DIMS = list(arch.dims)
    for key, value in convnext.items():
        cfg.MODEL.CONVNEXT[key] = value
    return cfg


def build(arch: Architecture = SMALL, freeze_at: int = 0, **convnext: object) -> ConvNeXtBackbone:
    cfg = convnext_cfg(arch, **convnext)
    cfg.MODEL.BACKBONE.FREEZE_AT = freeze_at
    return build_backbone(cfg)


def run_python(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def expected_backbone_shapes(arch: Architecture, out_features: Sequence[str]) -> Dict[str, Tuple[int, ...]]:
    """What the converter targets: canonical names without the classifier, plus norm{i} per requested output."""
    indices = tuple(sorted(ALL_OUTPUTS.index(f) for f in out_features))
    return canonical_shapes(replace(arch, num_classes=None, classifier_norm=False, output_norms=indices))


# ---------------------------------------------------------------- registry and imports


def test_backbone_is_registered_under_its_own_name() -> None:
    """`BACKBONE_NAME` resolves in Detectron2's registry, and is not the fork's and OneFormer's "D2ConvNeXt"."""
    assert BACKBONE_NAME != FORK_NAME
    assert BACKBONE_NAME in BACKBONE_REGISTRY, f"{BACKBONE_NAME!r} is not in BACKBONE_REGISTRY"
    assert isinstance(build_backbone(convnext_cfg()), ConvNeXtBackbone)


def test_backbone_coexists_with_the_forks_registration() -> None:
    """After importing conversion.d2, code like the fork's can still register "D2ConvNeXt"; both names resolve."""
    code = textwrap.dedent(f"""
        from detectron2.modeling import BACKBONE_REGISTRY, Backbone
        import conversion.d2
        @BACKBONE_REGISTRY.register()
        class {FORK_NAME}(Backbone):
            pass
        assert BACKBONE_REGISTRY.get("{FORK_NAME}") is {FORK_NAME}
        assert BACKBONE_REGISTRY.get(conversion.d2.BACKBONE_NAME) is conversion.d2.build_convnext_d2_backbone
        print("ok")
        """)
    done = run_python(code)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


@pytest.mark.parametrize("module", ["conversion", "conversion.cli"])
def test_importing_the_package_imports_no_model_library(module: str) -> None:
    """`import conversion` (and its CLI) leaves detectron2, timm and transformers unimported: the core is torch only."""
    code = (
        f"import sys, {module}; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('detectron2', 'timm', 'transformers', 'fvcore')))"
    )
    done = run_python(code)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]", f"importing {module} imported {done.stdout.strip()}"


# ---------------------------------------------------------------- config


def test_add_convnext_config_adds_the_fork_keys_and_use_grn() -> None:
    """MODEL.CONVNEXT gets exactly the fork's keys plus USE_GRN and LN_EPS, with the official Tiny defaults."""
    cfg = get_cfg()
    add_convnext_config(cfg)
    c = cfg.MODEL.CONVNEXT
    assert set(c) == CONFIG_KEYS
    assert (list(c.DEPTHS), list(c.DIMS)) == ([3, 3, 9, 3], [96, 192, 384, 768])
    assert list(c.OUT_FEATURES) == ["res2", "res3", "res4", "res5"]
    assert c.LAYER_SCALE_INIT_VALUE == 1e-6 and c.USE_GRN is False and c.LN_EPS == 1e-6
    assert isinstance(c.DROP_PATH_RATE, float), "an int default would refuse a YAML float on merge"


def test_add_convnext_config_keeps_values_already_set() -> None:
    """Keys a project already set (e.g. the fork's own add_convnext_config) are kept; missing ones are added."""
    cfg = get_cfg()
    cfg.MODEL.CONVNEXT = CfgNode({"DEPTHS": [2, 2, 6, 2], "DROP_PATH_RATE": 0.3})
    add_convnext_config(cfg)
    assert list(cfg.MODEL.CONVNEXT.DEPTHS) == [2, 2, 6, 2]
    assert cfg.MODEL.CONVNEXT.DROP_PATH_RATE == 0.3
    assert set(cfg.MODEL.CONVNEXT) == CONFIG_KEYS

    cfg.MODEL.CONVNEXT.DIMS = [40, 80, 160, 320]
    cfg.MODEL.CONVNEXT.USE_GRN = True
    add_convnext_config(cfg)  # calling it again changes nothing
    assert list(cfg.MODEL.CONVNEXT.DIMS) == [40, 80, 160, 320] and cfg.MODEL.CONVNEXT.USE_GRN is True


def test_the_forks_yaml_works_unchanged(tmp_path: Path) -> None:
    """The DI-MaskDINO fork's YAML merges as is; with NAME = BACKBONE_NAME it builds the Tiny backbone it describes."""
    path = tmp_path / "maskdino_convnext_tiny.yaml"
    path.write_text(FORK_YAML)
    cfg = get_cfg()
    add_convnext_config(cfg)
    cfg.merge_from_file(str(path))
    c = cfg.MODEL.CONVNEXT
    assert (list(c.DEPTHS), list(c.DIMS), c.DROP_PATH_RATE, c.LAYER_SCALE_INIT_VALUE) == (
        [3, 3, 9, 3],
        [96, 192, 384, 768],
        0.2,
        1e-6,
    )
    assert cfg.MODEL.BACKBONE.NAME == FORK_NAME and cfg.MODEL.BACKBONE.FREEZE_AT == 0

    cfg.MODEL.BACKBONE.NAME = BACKBONE_NAME
    backbone = build_backbone(cfg)
    assert isinstance(backbone, ConvNeXtBackbone)
    shapes = {k: tuple(v.shape) for k, v in backbone.state_dict().items()}
    assert shapes == expected_backbone_shapes(TINY, ALL_OUTPUTS)
    assert all(p.requires_grad for p in backbone.parameters()), "FREEZE_AT 0 froze something"
    rates = [block.drop_path_rate for stage in backbone.stages for block in stage]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.2), "DROP_PATH_RATE did not reach the blocks"
    gammas = [v for k, v in backbone.state_dict().items() if k.endswith(".gamma")]
    assert len(gammas) == sum(TINY.depths), "LAYER_SCALE_INIT_VALUE 1e-6 should give every block a layer scale"
    assert all(torch.all(g == torch.tensor(1e-6)) for g in gammas), "layer scale not initialised to 1e-6"


# ---------------------------------------------------------------- outputs


def test_output_norms_exist_only_for_requested_outputs() -> None:
    """OUT_FEATURES res3,res5: norm1 and norm3 only; forward and output_shape give exactly those keys."""
    backbone = build(OUT_FEATURES=["res3", "res5"]).eval()
    norms = sorted(n for n, _ in backbone.named_children() if n.startswith("norm"))
    assert norms == ["norm1", "norm3"]
    with torch.no_grad():
        outputs = backbone(torch.randn(1, 3, 64, 64))
    assert sorted(outputs) == sorted(backbone.output_shape()) == ["res3", "res5"]


def test_requested_outputs_in_any_order_give_the_same_backbone() -> None:
    """OUT_FEATURES is a set: res5,res3 builds what res3,res5 builds."""
    a, b = build(OUT_FEATURES=["res5", "res3"]), build(OUT_FEATURES=["res3", "res5"])
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    assert list(a.output_shape()) == list(b.output_shape()) == ["res3", "res5"]


@pytest.mark.parametrize("arch", [SMALL, TINY], ids=["small", "tiny"])
def test_output_shape_has_channels_dims_and_strides_4_to_32(arch: Architecture) -> None:
    """output_shape(): channels DIMS, strides 4/8/16/32; the tensors forward returns agree with it."""
    backbone = build(arch).eval()
    specs = backbone.output_shape()
    assert {k: (s.channels, s.stride) for k, s in specs.items()} == {
        name: (arch.dims[i], STRIDES[name]) for i, name in enumerate(ALL_OUTPUTS)
    }
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        outputs = backbone(x)
    for name, spec in specs.items():
        expected = (2, spec.channels, 64 // spec.stride, 96 // spec.stride)
        assert tuple(outputs[name].shape) == expected, f"{name}: {tuple(outputs[name].shape)}, expected {expected}"


def test_every_layer_norm_uses_the_official_eps() -> None:
    """Stem, downsampling, block and output LayerNorms all use eps 1e-6 (facebookresearch/ConvNeXt)."""
    eps = {name: m.eps for name, m in build().named_modules() if isinstance(m, torch.nn.LayerNorm)}
    assert len(eps) == 4 + sum(SMALL.depths) + 4, f"unexpected LayerNorms: {sorted(eps)}"
    assert {k: v for k, v in eps.items() if v != 1e-6} == {}


def test_size_divisibility_is_32() -> None:
    """Detectron2 pads inputs to a multiple of the coarsest stride."""
    assert build().size_divisibility == 32


def test_stage_outputs_are_the_outputs_before_the_norms() -> None:
    """forward(x)[res{i+2}] is norm{i} applied to stage_outputs(x)[i]."""
    backbone = build().eval()
    with torch.no_grad():
        for i in range(4):
            getattr(backbone, f"norm{i}").weight.normal_(1.0, 0.3)
            getattr(backbone, f"norm{i}").bias.normal_(0.0, 0.3)
        x = torch.randn(2, 3, 32, 32)
        raw, outputs = backbone.stage_outputs(x), backbone(x)
    for i, name in enumerate(ALL_OUTPUTS):
        torch.testing.assert_close(outputs[name], getattr(backbone, f"norm{i}")(raw[i]), rtol=0, atol=0)


# ---------------------------------------------------------------- names: the converter's target


out_feature_sets = st.sets(st.sampled_from(ALL_OUTPUTS), min_size=1).map(sorted)


@settings(max_examples=15)
@given(arch=architectures(), out_features=out_feature_sets)
@example(arch=replace(TINY, num_classes=1000, classifier_norm=True), out_features=list(ALL_OUTPUTS))
@example(arch=replace(TINY, version=2, layer_scale=False), out_features=["res2", "res4"])
def test_backbone_names_are_the_canonical_names_plus_requested_output_norms(
    arch: Architecture, out_features: Sequence[str]
) -> None:
    """State-dict names and shapes are canonical_shapes(arch) minus the classifier plus norm{i} per requested output."""
    model = build_d2_model(arch, out_features)
    got = {k: tuple(v.shape) for k, v in model.backbone.state_dict().items()}
    want = expected_backbone_shapes(arch, out_features)
    assert set(got) - set(want) == set(), f"backbone names the converter never writes: {sorted(set(got) - set(want))}"
    assert set(want) - set(got) == set(), f"canonical names the backbone lacks: {sorted(set(want) - set(got))}"
    wrong = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
    assert wrong == {}, f"shapes differ (backbone, canonical): {wrong}"


@settings(max_examples=10)
@given(arch=architectures(), out_features=out_feature_sets)
def test_converted_names_plus_fresh_norms_are_exactly_the_backbone_names(
    arch: Architecture, out_features: Sequence[str]
) -> None:
    """What to_target writes, plus what fresh_output_norms reports missing, is the model's state dict, name for name."""
    target = to_target(random_canonical_state_dict(arch, seed=0))
    fresh = fresh_output_norms(arch, out_features)
    model = build_d2_model(arch, out_features)
    expected = set(model.state_dict())
    assert not set(fresh) & set(target.state_dict), "a key reported fresh is also written"
    assert set(target.state_dict) | set(fresh) == expected, (
        f"extra {sorted(set(target.state_dict) | set(fresh) - expected)}, "
        f"missing {sorted(expected - set(target.state_dict) - set(fresh))}"
    )


# ---------------------------------------------------------------- freezing, validation, blocks


FROZEN_PREFIXES = {
    0: (),
    1: ("downsample_layers.0.",),
    2: ("downsample_layers.0.", "stages.0."),
    3: ("downsample_layers.0.", "stages.0.", "downsample_layers.1.", "stages.1."),
    5: ("downsample_layers.", "stages."),  # everything but the output norms
}


@pytest.mark.parametrize("freeze_at", sorted(FROZEN_PREFIXES))
def test_freeze_at_follows_detectron2_resnet(freeze_at: int) -> None:
    """FREEZE_AT 0 freezes nothing, 1 the stem, k >= 2 the stem and res2..res{k}; output norms always train."""
    backbone = build(freeze_at=freeze_at)
    frozen = sorted(n for n, p in backbone.named_parameters() if not p.requires_grad)
    expected = sorted(n for n, _ in backbone.named_parameters() if n.startswith(FROZEN_PREFIXES[freeze_at]))
    assert frozen == expected


@pytest.mark.parametrize(
    "key, value",
    [
        ("OUT_FEATURES", ["res6"]),
        ("OUT_FEATURES", ["res1", "res2"]),
        ("OUT_FEATURES", ["p2"]),
        ("OUT_FEATURES", []),
        ("DEPTHS", [3, 3, 9]),
        ("DEPTHS", [3, 3, 9, 3, 3]),
        ("DIMS", [96, 192, 384]),
    ],
)
def test_invalid_config_raises_value_error_naming_the_key(key: str, value: list) -> None:
    """A wrong OUT_FEATURES, or DEPTHS/DIMS without 4 entries, is refused with a ValueError naming the key."""
    with pytest.raises(ValueError, match=f"MODEL.CONVNEXT.*{key}"):
        build(**{key: value})


def test_use_grn_builds_v2_blocks_without_layer_scale() -> None:
    """USE_GRN: every block has grn.gamma/beta [1,1,1,4C] (zero at init) and no gamma, whatever the layer scale says."""
    backbone = build(USE_GRN=True, LAYER_SCALE_INIT_VALUE=1e-6)
    state = backbone.state_dict()
    assert not [k for k in state if k.endswith(".gamma") and ".grn." not in k], "V2 blocks have a layer scale"
    for s, depth in enumerate(SMALL.depths):
        for b in range(depth):
            for leaf in ("gamma", "beta"):
                t = state[f"stages.{s}.{b}.grn.{leaf}"]
                assert tuple(t.shape) == (1, 1, 1, 4 * SMALL.dims[s])
                assert not t.any(), "GRN must start as the identity (official init 0)"


@pytest.mark.parametrize("value, has_gamma", [(1e-6, True), (0.5, True), (0.0, False)])
def test_layer_scale_follows_layer_scale_init_value(value: float, has_gamma: bool) -> None:
    """V1 blocks carry gamma [C] filled with LAYER_SCALE_INIT_VALUE; 0 means no layer scale (official code)."""
    state = build(LAYER_SCALE_INIT_VALUE=value).state_dict()
    gammas = {k: v for k, v in state.items() if k.endswith(".gamma")}
    assert bool(gammas) == has_gamma
    for k, v in gammas.items():
        s = int(k.split(".")[1])
        assert tuple(v.shape) == (SMALL.dims[s],) and torch.all(v == torch.tensor(value)), k


def _pair_with_drop_path(rate: float) -> Tuple[ConvNeXtBackbone, ConvNeXtBackbone]:
    """Backbones with drop path `rate` and 0, holding the same weights."""
    plain, dropping = build(DROP_PATH_RATE=0.0), build(DROP_PATH_RATE=rate)
    dropping.load_state_dict(plain.state_dict())
    return plain, dropping


def test_drop_path_is_the_identity_in_eval_mode() -> None:
    """At inference stochastic depth does nothing: rate 0.5 gives the outputs of rate 0."""
    plain, dropping = _pair_with_drop_path(0.5)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want, got = plain.eval()(x), dropping.eval()(x)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)


def test_drop_path_is_random_per_sample_in_training_mode() -> None:
    """In training, rate > 0 drops residual branches at random, per sample; rate 0 stays deterministic."""
    plain, dropping = _pair_with_drop_path(0.5)
    x = torch.randn(1, 3, 32, 32).expand(8, 3, 32, 32).contiguous()  # 8 copies of one image
    with torch.no_grad():
        torch.manual_seed(0)
        first = dropping.train()(x)["res5"]
        torch.manual_seed(1)
        second = dropping(x)["res5"]
        reference = plain.eval()(x)["res5"]
        torch.testing.assert_close(plain.train()(x)["res5"], reference, rtol=0, atol=0)
    assert not torch.equal(first, second), "two training passes with different seeds agree"
    assert not torch.equal(first, reference), "training with drop path equals inference"
    same_as_first = [torch.equal(first[0], first[i]) for i in range(1, 8)]
    assert not all(same_as_first), "the same branches were dropped for every sample"
