"""Variant inference: depths, dims and version read off shapes; every inconsistency named."""
from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conversion.architecture import RELEASED_VARIANTS, Architecture, canonical_shapes, infer_architecture
from conversion.errors import NotConvNeXt

from .. import strategies as S

RELEASED = [(v, name, depths, dims) for v, table in RELEASED_VARIANTS.items() for name, (depths, dims) in table.items()]


@pytest.mark.parametrize("version,name,depths,dims", RELEASED, ids=[r[1] for r in RELEASED])
def test_released_variants_are_named(version, name, depths, dims):
    """Shapes of every released variant (with its classifier) are recognised under the released name."""
    arch = Architecture(depths, dims, version=version, layer_scale=version == 1, num_classes=1000, classifier_norm=True)
    got = infer_architecture(canonical_shapes(arch))
    assert got == arch and got.variant == name


def test_convnext_tiny_22k_classifier_width_is_read():
    arch = Architecture((3, 3, 9, 3), (96, 192, 384, 768), num_classes=21841, classifier_norm=True)
    assert infer_architecture(canonical_shapes(arch)).num_classes == 21841


@given(S.architectures())
def test_any_architecture_is_recovered_from_its_shapes(arch):
    """infer_architecture(canonical_shapes(a)) == a for every drawn architecture."""
    assert infer_architecture(canonical_shapes(arch)) == arch


def test_custom_shapes_have_no_released_name():
    assert Architecture((1, 2, 3, 4), (8, 16, 32, 64)).variant is None


def test_detection_output_norms_are_recognised():
    """A detection checkpoint's own `norm{i}` (trained output norms) are part of the architecture."""
    arch = Architecture((1, 1, 1, 1), (4, 8, 4, 8), output_norms=(0, 2))
    assert infer_architecture(canonical_shapes(arch)).output_norms == (0, 2)


@given(S.architectures(), st.data())
def test_one_wrongly_shaped_tensor_is_named_with_both_shapes(arch, data):
    """Changing any single tensor's shape is refused, naming the tensor, its shape and the expected one."""
    shapes = canonical_shapes(arch)
    # The stem conv and the first dwconv define dims: a change there redefines the architecture
    # (and is caught as many mismatches elsewhere); every other tensor must be named itself.
    candidates = [k for k in shapes if k not in ("downsample_layers.0.0.weight",) and not re.match(r"stages\.\d\.0\.dwconv\.weight", k)]
    name = data.draw(st.sampled_from(candidates))
    broken = dict(shapes)
    broken[name] = tuple(shapes[name]) + (2,)
    with pytest.raises(NotConvNeXt) as err:
        infer_architecture(broken)
    assert f"{name} has shape {list(broken[name])}, expected {list(shapes[name])}" in err.value.message


@given(S.architectures(), st.data())
def test_one_missing_tensor_is_named(arch, data):
    shapes = canonical_shapes(arch)
    candidates = [k for k in shapes if not k.endswith("dwconv.weight") and k != "downsample_layers.0.0.weight" and k not in ("norm.weight", "norm.bias", "head.weight")]
    name = data.draw(st.sampled_from(candidates))
    broken = {k: v for k, v in shapes.items() if k != name}
    with pytest.raises(NotConvNeXt, match=re.escape(f"missing {name}")):
        infer_architecture(broken)


def test_a_missing_stage_is_reported_as_truncated():
    shapes = {k: v for k, v in canonical_shapes(Architecture((1, 1, 1, 1), (4, 4, 4, 4))).items() if not k.startswith("stages.3.")}
    with pytest.raises(NotConvNeXt, match=r"truncated ConvNeXt: stage\(s\) \[3\]"):
        infer_architecture(shapes)


def test_a_dict_without_a_stem_is_not_a_convnext():
    with pytest.raises(NotConvNeXt, match="downsample_layers.0.0.weight"):
        infer_architecture({"conv1.weight": (64, 3, 7, 7)})


def test_layer_scale_on_some_blocks_only_is_inconsistent():
    shapes = canonical_shapes(Architecture((2, 1, 1, 1), (4, 4, 4, 4)))
    del shapes["stages.0.1.gamma"]
    with pytest.raises(NotConvNeXt, match=r"missing stages\.0\.1\.gamma"):
        infer_architecture(shapes)


def test_many_problems_are_all_counted_in_one_message():
    """One message lists the problems (sorted), and says how many more there are."""
    shapes = canonical_shapes(Architecture((4, 4, 4, 4), (8, 8, 8, 8)))  # 16 problems, 12 named
    for name in [k for k in shapes if k.endswith("pwconv1.bias")]:
        shapes[name] = (1,)
    with pytest.raises(NotConvNeXt, match=r"and 4 more"):
        infer_architecture(shapes)
