"""The template language of the layout tables: anchored, dots literal, codecs invertible, and every
layout's rows unambiguous (no source name claimed by two rows with different meanings)."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conversion.layouts import LAYOUTS, Template, _CODECS


@pytest.mark.parametrize(
    "text,key",
    [
        ("stages.{s}.{b}.gamma", "stagesX0Y1Zgamma"),  # dots are literal, not "any character"
        ("stages.{s}.{b}.gamma", "x.stages.0.1.gamma"),  # anchored at the start
        ("stages.{s}.{b}.gamma", "stages.0.1.gamma.extra"),  # anchored at the end
        ("norm{i}.{p}", "norm.weight"),  # a digit field needs digits
        ("head.{p}", "head.scale"),  # {p} is weight or bias only
    ],
)
def test_templates_match_whole_names_only(text, key):
    assert Template(text).match(key, to_source=False) is None


@pytest.mark.parametrize("codec", sorted(_CODECS))
@given(value=st.integers(0, 10_000))
def test_each_codec_decodes_what_it_encodes(codec, value):
    encode = _CODECS[codec]
    assert encode(encode(value, True), False) == value


def test_codecs_refuse_values_of_the_wrong_parity():
    """torchvision: odd indices are stages, even ones downsamples; the wrong one is no match at all."""
    assert _CODECS["odd"](4, False) is None and _CODECS["even"](3, False) is None and _CODECS["plus1"](0, False) is None


def test_word_fields_carry_their_alternatives_to_the_canonical_side():
    layout = LAYOUTS["official"]
    assert layout.rename("stages.1.2.pwconv2.bias")[0] == "stages.1.2.pwconv2.bias"
    assert layout.rename("stages.1.2.pwconv2.bias", inverse=True)[0] == "stages.1.2.pwconv2.bias"
    assert layout.rename("stages.1.2.pwconv3.bias") is None and layout.rename("stages.1.2.pwconv3.bias", inverse=True) is None


@given(s=st.integers(0, 3), b=st.integers(0, 40), p=st.sampled_from(["weight", "bias"]))
def test_torchvision_stage_indices_round_trip(s, b, p):
    layout = LAYOUTS["torchvision"]
    source, _ = layout.rename(f"stages.{s}.{b}.dwconv.{p}", inverse=True)
    assert source == f"features.{2 * s + 1}.{b}.block.0.{p}"
    assert layout.rename(source)[0] == f"stages.{s}.{b}.dwconv.{p}"


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_no_source_name_is_claimed_by_two_rows_with_different_meanings(name):
    """For every canonical name the layout can write, reading it back gives that same canonical name
    (the first matching row wins in both directions, so a shadowing row would break this)."""
    from conversion.architecture import Architecture, canonical_shapes

    layout = LAYOUTS[name]
    versions = (1,) if name in ("torchvision", "dinov3") else (1, 2)
    for version in versions:
        arch = Architecture((2, 1, 1, 1), (8, 8, 8, 8), version=version, layer_scale=version == 1, num_classes=3,
                            classifier_norm=True, output_norms=(0, 1, 2, 3) if name not in ("timm-features", "torchvision", "timm", "open_clip", "dinov3") else ())
        for canonical in canonical_shapes(arch):
            if name == "timm-features" and canonical in ("norm.weight", "norm.bias", "head.weight", "head.bias"):
                continue  # features_only models have no classifier
            if name == "mmpretrain" and canonical in ("norm.weight", "norm.bias"):
                continue  # written as norm3, told apart from output norm 3 by the head (see _mmpretrain_final_norm)
            hit = layout.rename(canonical, inverse=True) or layout.rename(canonical, inverse=True, outside=True)
            if hit is None:
                continue  # a name the layout has none for (e.g. torchvision GRN): tests/layouts/test_table.py pins those
            source, _ = hit
            back = layout.rename(source) or layout.rename(source, outside=True)
            assert back is not None and back[0] == canonical, f"{name}: {canonical} -> {source} -> {back}"
