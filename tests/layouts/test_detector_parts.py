"""Properties of reading a detector's checkpoint (torch only: runs in every environment).

Any ConvNeXt in official or mmpretrain names under `backbone.`, with trained output norms, beside any
mix of detector parts (names as mmdet, mmseg and Detectron2 write them): the backbone reads back
exactly, and every other tensor is counted under its top-level part.  Counts are the drawn ones.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict

import torch
from hypothesis import given
from hypothesis import strategies as st

from conversion.layouts import from_canonical, to_canonical
from conversion.synthetic import random_state_dict

from .. import strategies as S

# Top-level parts of mmdet (Mask R-CNN, Cascade), mmseg (UperNet) and Detectron2 (Mask2Former,
# SemanticSegmentor) models, with a leaf name each writes under it.
PARTS = {
    "neck.": "lateral_convs.{i}.conv.weight",
    "rpn_head.": "rpn_conv.{i}.weight",
    "roi_head.": "bbox_head.{i}.fc_cls.weight",
    "decode_head.": "psp_modules.{i}.1.bn.running_mean",
    "auxiliary_head.": "convs.{i}.conv.weight",
    "sem_seg_head.": "predictor.transformer_ffn_layers.{i}.linear1.weight",
    "criterion.": "empty_weight_{i}",
}


@st.composite
def detector_checkpoints(draw: Any) -> Any:
    arch = draw(S.architectures(classifier=False))
    arch = dataclasses.replace(arch, output_norms=(0, 1, 2, 3))
    layout = draw(st.sampled_from(["official", "mmpretrain"]))
    canonical = random_state_dict(arch, seed=draw(S.seeds()))
    sd: Dict[str, Any] = from_canonical(canonical, layout, "backbone.")
    counts = draw(st.dictionaries(st.sampled_from(sorted(PARTS)), st.integers(1, 6), min_size=1))
    for part, n in counts.items():
        for i in range(n):
            sd[part + PARTS[part].format(i=i)] = torch.zeros(2)
    keys = draw(st.permutations(sorted(sd)))
    return layout, canonical, {k: sd[k] for k in keys}, counts


@given(case=detector_checkpoints())
def test_backbone_reads_back_exactly_and_every_part_is_counted(case):
    layout, canonical, sd, counts = case
    read = to_canonical(sd)
    assert (read.layout, read.prefix) == (layout, "backbone.")
    assert read.detector_parts == dict(sorted(counts.items()))
    assert sorted(read.state_dict) == sorted(canonical)
    assert all(torch.equal(read.state_dict[k], canonical[k]) for k in canonical)
    assert read.dropped == {}
