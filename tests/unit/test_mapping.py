"""Properties of the name mapping, in memory: official source -> Detectron2 target.

Every backbone tensor lands exactly once under its expected name, bit-identical, with
its dtype and shape; nothing else lands; the classifier is dropped and reported; the
mapping composed with its inverse is the identity; the output does not depend on key order.
"""
from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conversion.architecture import Architecture
from conversion.pipeline import prepare
from conversion.errors import NotConvNeXt
from conversion.layouts import from_canonical, to_canonical
from conversion.containers import select_state_dict
from conversion.write import encode

from .. import strategies as S
from ..support import CLASSIFIER_NAMES

TINY = Architecture((1, 1, 1, 1), (4, 8, 4, 8), num_classes=3, classifier_norm=True)
# The classifier of an official file, written out (not the converter's own list).
CLASSIFIER_KEYS = CLASSIFIER_NAMES


@given(S.official_state_dicts(), S.target_prefixes())
def test_every_backbone_tensor_lands_once_under_its_name(drawn, prefix):
    """Target = {prefix + name: the same tensor} for every non-classifier name, and nothing else."""
    arch, sd = drawn
    _, _, target = prepare(sd, prefix=prefix)
    expected = {prefix + k for k in sd if k not in CLASSIFIER_KEYS}
    assert set(target.state_dict) == expected
    assert len(target.state_dict) == len(sd) - sum(k in sd for k in CLASSIFIER_KEYS)
    for name, tensor in target.state_dict.items():
        source = sd[name[len(prefix):]]
        assert tensor.dtype == source.dtype and tensor.shape == source.shape, name
        assert torch.equal(tensor, source), f"{name} values changed"


@given(S.official_state_dicts(arch=TINY))
def test_classifier_tensors_are_dropped_and_reported(drawn):
    """`head.*` and the pooled `norm.*` never reach the target (not even renamed), and are listed."""
    _, sd = drawn
    _, _, target = prepare(sd)
    assert sorted(target.dropped) == sorted(CLASSIFIER_KEYS)
    landed = list(target.state_dict.values())
    for key in CLASSIFIER_KEYS:
        assert not any(t is sd[key] for t in landed), f"{key} landed under another name"


@given(S.official_state_dicts(), S.wrapper_prefixes(), S.containers())
def test_wrapper_prefixes_and_containers_do_not_change_the_target(drawn, wrapper, container):
    """DDP's `module.`, torch.compile's `_orig_mod.` and any container give the same target."""
    _, sd = drawn
    unwrapped, _ = select_state_dict(S.wrap(sd, container, wrapper))
    assert list(prepare(unwrapped)[2].state_dict) == list(prepare(sd)[2].state_dict)


@given(S.official_state_dicts(shuffle=False), st.randoms(use_true_random=False), st.sampled_from(["torch", "pickle"]))
def test_key_order_does_not_change_the_bytes(drawn, rnd, fmt):
    """The same weights in any key order encode to the same bytes."""
    _, sd = drawn
    keys = list(sd)
    rnd.shuffle(keys)
    shuffled = {k: sd[k] for k in keys}
    assert encode(prepare(sd)[2].state_dict, fmt) == encode(prepare(shuffled)[2].state_dict, fmt)


@given(S.official_state_dicts(), S.target_prefixes())
def test_mapping_then_inverse_is_the_identity(drawn, prefix):
    """from_canonical(to_canonical(x)) == x, names and tensors (the layout table is invertible)."""
    _, sd = drawn
    source = {prefix + k: v for k, v in sd.items()}
    canonical = to_canonical(source)
    assert canonical.prefix == prefix and canonical.layout == "official"
    back = from_canonical(canonical.state_dict, canonical.layout, canonical.prefix)
    assert list(back) == list(source) and all(back[k] is source[k] for k in source)


@given(S.official_state_dicts(), S.target_prefixes())
def test_converting_a_converted_dict_changes_nothing(drawn, prefix):
    """The target, read as a source, maps to itself (prefix recognised, nothing dropped)."""
    _, sd = drawn
    once = prepare(sd, prefix=prefix)[2]
    twice = prepare(once.state_dict, prefix=prefix)[2]
    assert list(twice.state_dict) == list(once.state_dict) and twice.dropped == ()
    assert all(twice.state_dict[k] is once.state_dict[k] for k in once.state_dict)


@given(S.official_state_dicts(arch=TINY), st.sampled_from(["backbone.stages.0.0.dwconv.weight", "stages.0.0.conv_dw.weight", "fc.weight"]))
def test_a_key_outside_the_layout_is_refused_not_dropped(drawn, stray):
    """A dict mixing spellings (one key prefixed, renamed or foreign) is refused, naming the key or its prefix."""
    _, sd = drawn
    mixed = dict(sd)
    mixed[stray] = sd["stages.0.0.dwconv.weight"]
    with pytest.raises(NotConvNeXt, match=re.escape(stray) + "|" + re.escape("official (prefix 'backbone.')")):
        prepare(mixed)


@pytest.mark.parametrize("dtype", S.DTYPES, ids=str)
def test_every_dtype_is_kept_in_memory(dtype):
    """fp32, fp16, bf16 and fp64 tensors map without a cast."""
    from conversion.synthetic import random_state_dict

    sd = random_state_dict(TINY, dtype=dtype)
    assert {t.dtype for t in prepare(sd)[2].state_dict.values()} == {dtype}


def test_the_report_names_as_renamed_only_what_the_layout_renamed(tmp_path):
    """A prefix alone (the official names behind `module.`, then `backbone.`) is no rename; timm's
    names are, each listed with the name the file had."""
    from conversion import convert
    from conversion.synthetic import random_state_dict

    arch = Architecture((1, 1, 1, 1), (8, 8, 8, 8), num_classes=3, classifier_norm=True)
    official = random_state_dict(arch)
    torch.save({"model": {"module." + k: v for k, v in official.items()}}, tmp_path / "official.pth")
    torch.save(from_canonical(official, "timm"), tmp_path / "timm.pth")

    assert convert(str(tmp_path / "official.pth"), str(tmp_path / "a.pth")).renamed == {}
    renamed = convert(str(tmp_path / "timm.pth"), str(tmp_path / "b.pth")).renamed
    assert renamed["backbone.downsample_layers.0.0.weight"] == "stem.0.weight"
    assert renamed["backbone.stages.2.0.dwconv.weight"] == "stages.2.blocks.0.conv_dw.weight"
    # every backbone tensor: the stem (4), three downsamples (4 each), four blocks (9 each, gamma too)
    assert "backbone.stages.0.0.gamma" in renamed and len(renamed) == 4 + 3 * 4 + 4 * 9, sorted(renamed)
