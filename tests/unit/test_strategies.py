"""The strategies are code too: check they produce what they promise."""
from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from conversion.architecture import CLASSIFIER_KEYS, canonical_shapes, infer_architecture
from conversion.containers import select_state_dict

from .. import strategies as S


@given(S.architectures())
def test_architectures_have_four_stages_of_small_blocks(arch):
    """Every drawn architecture is a ConvNeXt the suite can run quickly."""
    assert len(arch.depths) == len(arch.dims) == 4
    assert all(1 <= d <= S.MAX_DEPTH for d in arch.depths)
    assert all(c in S.DIM_CHOICES for c in arch.dims)
    assert arch.version in (1, 2)
    assert not (arch.version == 2 and arch.layer_scale), "V2 blocks have no layer scale"


@given(S.architectures(version=2, classifier=False))
def test_pinned_arguments_pin_the_dimension(arch):
    """An argument given to a strategy is respected, not redrawn."""
    assert arch.version == 2 and arch.num_classes is None and not arch.classifier_norm


@given(S.official_state_dicts())
def test_official_state_dicts_match_their_architecture(drawn):
    """A drawn dict has exactly the canonical names and shapes of its architecture, and is recognised as it."""
    arch, sd = drawn
    assert {k: tuple(v.shape) for k, v in sd.items()} == canonical_shapes(arch)
    assert infer_architecture({k: v.shape for k, v in sd.items()}) == arch


@given(S.official_state_dicts(dtype=torch.bfloat16))
def test_state_dicts_use_the_pinned_dtype_and_distinct_values(drawn):
    """Every tensor has the asked dtype, and no two same-shaped tensors are equal (swaps are detectable)."""
    _, sd = drawn
    assert {v.dtype for v in sd.values()} == {torch.bfloat16}
    names = list(sd)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            same = sd[a].shape == sd[b].shape and torch.equal(sd[a], sd[b])
            assert not same, f"{a} equals {b}"


@given(S.official_state_dicts(), S.containers(), S.wrapper_prefixes())
def test_wrapped_checkpoints_unwrap_to_the_same_dict(drawn, container, prefix):
    """`wrap` builds containers that the reader unwraps back to the original weights."""
    _, sd = drawn
    got, _ = select_state_dict(S.wrap(sd, container, prefix))
    assert list(got) == list(sd) and all(got[k] is sd[k] for k in sd)


@given(S.architectures(classifier=True))
def test_classifier_architectures_carry_head_and_pooled_norm(arch):
    """With a classifier, the official dict holds `head.*` and the pooled `norm.*` (what a released file has)."""
    assert set(CLASSIFIER_KEYS) <= set(canonical_shapes(arch))


@given(st.data())
def test_released_tiny_has_182_tensors(data):
    """Sanity anchor to the released files: official V1 files hold 20 + 9*D tensors (Tiny: 182)."""
    from conversion.architecture import Architecture

    arch = Architecture((3, 3, 9, 3), (96, 192, 384, 768), num_classes=data.draw(st.sampled_from([1000, 21841])), classifier_norm=True)
    assert len(canonical_shapes(arch)) == 20 + 9 * sum(arch.depths) == 182


@given(S.layouts())
def test_layouts_come_from_the_layout_tables(layout):
    """Drawn layouts are the converter's own (a layout added to the tables is drawn too)."""
    from conversion.layouts import LAYOUTS

    assert layout in LAYOUTS


@given(S.layout_state_dicts())
def test_layout_state_dicts_are_recognised_as_their_layout_with_the_same_weights(drawn):
    """The converter reads a drawn source back as its layout, to exactly the canonical weights drawn with it."""
    from conversion.layouts import to_canonical
    from conversion.testing import in_layout

    layout, arch, canonical, source = drawn
    back = to_canonical(source)
    # Or a layout that writes the very same names (DINOv3 without the classifier's norm is an official file).
    assert back.layout == layout or set(in_layout(canonical, back.layout)) == set(source), (layout, back.layout)
    classifier_free = {k: v for k, v in canonical.items() if k in back.state_dict}
    assert set(canonical) - set(back.state_dict) <= set(CLASSIFIER_KEYS), "only a classifier may be absent (timm features_only)"
    assert all(torch.equal(back.state_dict[k], v) for k, v in classifier_free.items())
    assert infer_architecture({k: tuple(v.shape) for k, v in canonical.items()}) == arch


@given(S.layout_state_dicts(layout="torchvision"))
def test_a_pinned_layout_draws_only_what_that_library_can_express(drawn):
    """torchvision has no ConvNeXt V2: its drawn sources are all V1."""
    layout, arch, _, source = drawn
    assert layout == "torchvision" and arch.version == 1 and not any(".grn." in k for k in source)
