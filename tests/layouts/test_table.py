"""The capability table, pinned to the libraries, and its properties.

- every layout has a row; parts a library never writes have no name in its layout;
- `from_canonical` writes exactly each library model's own `state_dict()` names and shapes;
- read back by `to_canonical` to exactly the canonical dict (names, shapes, bit-identical values),
  reporting that layout and prefix (the mapping composed with its inverse is the identity);
- recognised through the file-level reader (`inspect_checkpoint`) in every container and wrapper;
- claimed by one layout only: forcing any other with `--from` is refused (documented exceptions in
  `SHARED_NAMES`).
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import List, Tuple

import pytest
import torch
from hypothesis import given

from conversion.architecture import Architecture
from conversion.pipeline import prepare
from conversion.errors import NotConvNeXt
from conversion.inspection import inspect_checkpoint
from conversion.layouts import LAYOUTS, find_layout, from_canonical, to_canonical
from conversion.synthetic import random_state_dict

from .. import strategies as S
from ..support import require, require_torchvision_convnext
from ..support.table import CLASSIFIER, POOLED_NORM, NO_HEAD, OUTPUT_NORMS, FINAL_NORM, SPECS, SHARED_NAMES, OPEN_CLIP_EXTRAS, _with_head, LayoutCase, build_case, layout_cases, assert_same_tensors

# ---------------------------------------------------------------- the table itself


def test_capability_table_covers_every_layout():
    """Every layout the converter knows has a row, and every row is a known layout."""
    assert sorted(SPECS) == sorted(LAYOUTS)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_declared_layout_prefixes_agree_with_the_table(name):
    """The layout finds its files under every prefix the table says its library writes them under, and a
    layout that pins its prefixes (OpenCLIP's `visual.trunk.`) pins exactly the table's."""
    spec, declared = SPECS[name], LAYOUTS[name].prefixes
    table = sorted({p for v in spec.versions for p in spec.prefixes[v]})
    assert declared is None or sorted(declared) == table
    head = NO_HEAD if NO_HEAD in spec.heads else spec.heads[0]
    for version in spec.versions:
        arch = _with_head(Architecture((1, 1, 1, 1), (8, 8, 8, 8), version=version), head, 3)
        for prefix in spec.prefixes[version]:
            layout, found = find_layout(list(build_case(spec, arch, head, prefix).source), name)
            assert (layout.name, found) == (name, prefix), f"{name} V{version} under {prefix!r}"


@pytest.mark.parametrize(
    "name, part",
    [(spec.name, part) for spec in SPECS.values() for part in spec.unnamed],
    ids=lambda v: str(v),
)
def test_parts_a_library_never_writes_have_no_name_in_its_layout(name, part):
    """from_canonical refuses what the layout cannot express (torchvision GRN, timm output norms...), naming the key."""
    arch = Architecture((1, 1, 1, 1), (8, 8, 8, 8), version=2 if part == "v2" else 1)
    if part != "v2":
        arch = _with_head(arch, part, 3)
    canonical = random_state_dict(arch)
    with pytest.raises(
        NotConvNeXt,
        match=rf"'(norm\d?\.weight|norm\.bias|head\.\w+|stages\.\d+\.\d+\.grn\.\w+)' has no name in the {name} layout",
    ):
        from_canonical(canonical, name)


# The properties below are self-consistent (a source is written by the same table that reads it),
# so a rule wrong in both directions would pass them.  These pin the table to the libraries: for
# each library model, from_canonical must write exactly its state_dict's names and shapes.
LIBRARY_ARCH = Architecture((2, 1, 2, 1), (8, 16, 24, 32))


def _library_model(which: str):
    """(library model, layout, prefix, conv_mlp, head) for one library class, built offline at LIBRARY_ARCH."""
    depths, dims = LIBRARY_ARCH.depths, LIBRARY_ARCH.dims
    if which.startswith("timm"):
        timm = require("timm")
        from timm.models.convnext import ConvNeXt

        if which == "timm-v1":
            return ConvNeXt(depths=depths, dims=dims, num_classes=3), "timm", "", False, CLASSIFIER
        if which == "timm-v2-conv-mlp":
            return (
                ConvNeXt(depths=depths, dims=dims, num_classes=3, use_grn=True, ls_init_value=None, conv_mlp=True),
                "timm",
                "",
                True,
                CLASSIFIER,
            )
        if which == "timm-v1-num-classes-0":
            return ConvNeXt(depths=depths, dims=dims, num_classes=0), "timm", "", False, POOLED_NORM
        if which == "timm-features-atto":
            model = timm.create_model("convnext_atto", pretrained=False, features_only=True, depths=depths, dims=dims)
            return model, "timm-features", "", True, NO_HEAD
        if which == "timm-features-v2-tiny":
            model = timm.create_model("convnextv2_tiny", pretrained=False, features_only=True, depths=depths, dims=dims)
            return model, "timm-features", "", False, NO_HEAD
    if which.startswith("hf"):
        transformers = require("transformers")
        config = dict(depths=list(depths), hidden_sizes=list(dims))
        if which == "hf-v1-classification":
            return (
                transformers.ConvNextForImageClassification(transformers.ConvNextConfig(num_labels=3, **config)),
                "huggingface",
                "convnext.",
                False,
                CLASSIFIER,
            )
        if which == "hf-v1-model":
            return (
                transformers.ConvNextModel(transformers.ConvNextConfig(**config)),
                "huggingface",
                "",
                False,
                POOLED_NORM,
            )
        if which == "hf-v1-backbone":
            stages = ["stage1", "stage2", "stage3", "stage4"]
            return (
                transformers.ConvNextBackbone(transformers.ConvNextConfig(out_features=stages, **config)),
                "huggingface",
                "",
                False,
                OUTPUT_NORMS,
            )
        if which == "hf-v2-classification":
            return (
                transformers.ConvNextV2ForImageClassification(transformers.ConvNextV2Config(num_labels=3, **config)),
                "huggingface",
                "convnextv2.",
                False,
                CLASSIFIER,
            )
    if which.startswith("dinov3-hf"):
        transformers = require("transformers")
        config = transformers.DINOv3ConvNextConfig(
            depths=list(depths), hidden_sizes=list(dims), out_features=["stage1", "stage2", "stage3", "stage4"]
        )
        if which == "dinov3-hf-model":
            return transformers.DINOv3ConvNextModel(config), "dinov3-hf", "model.", False, FINAL_NORM
        return transformers.DINOv3ConvNextBackbone(config), "dinov3-hf", "model.", False, NO_HEAD
    if which.startswith("mmpretrain"):
        from ..support.originals import mmpretrain_models

        models = mmpretrain_models()
        arch = {"depths": list(depths), "channels": list(dims)}
        if which == "mmpretrain-v1-classifier":
            model = models.build_classifier(dict(
                type="ImageClassifier", backbone=dict(type="ConvNeXt", arch=arch), neck=dict(type="GlobalAveragePooling"),
                head=dict(type="LinearClsHead", num_classes=3, in_channels=dims[-1])))
            return model, "mmpretrain", "backbone.", False, CLASSIFIER
        # mmdet's use: V2, per-pixel output norms 0-3, the pointwise layers as 1x1 convolutions.
        backbone = models.build_backbone(dict(
            type="ConvNeXt", arch=arch, use_grn=True, layer_scale_init_value=0.0, linear_pw_conv=False,
            out_indices=(0, 1, 2, 3), gap_before_final_norm=False))
        holder = torch.nn.Module()
        holder.backbone = backbone
        return holder, "mmpretrain", "backbone.", True, OUTPUT_NORMS
    if which == "torchvision-v1":
        convnext = require_torchvision_convnext()
        CNBlockConfig, TorchvisionConvNeXt = convnext.CNBlockConfig, convnext.ConvNeXt

        settings = [CNBlockConfig(dims[i], dims[i + 1] if i < 3 else None, depths[i]) for i in range(4)]
        return TorchvisionConvNeXt(block_setting=settings, num_classes=3), "torchvision", "", False, CLASSIFIER
    raise ValueError(which)


LIBRARY_MODELS = (
    "timm-v1",
    "timm-v2-conv-mlp",
    "timm-v1-num-classes-0",
    "timm-features-atto",
    "timm-features-v2-tiny",
    "hf-v1-classification",
    "hf-v1-model",
    "hf-v1-backbone",
    "hf-v2-classification",
    "torchvision-v1",
    "dinov3-hf-model",
    "dinov3-hf-backbone",
    "mmpretrain-v1-classifier",
    "mmpretrain-v2-detection-conv-pw",
)


@pytest.mark.parametrize("which", LIBRARY_MODELS)
def test_from_canonical_writes_exactly_the_librarys_own_names_and_shapes(which):
    """from_canonical(layout) == the library model's own state_dict, name for name and shape for shape."""
    model, layout, prefix, conv_mlp, head = _library_model(which)
    version = 2 if "v2" in which else 1
    arch = _with_head(dataclasses.replace(LIBRARY_ARCH, version=version, layer_scale=version == 1), head, 3)
    written = from_canonical(random_state_dict(arch), layout, prefix, conv_mlp=conv_mlp)
    library = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ours = {k: tuple(v.shape) for k, v in written.items()}
    only_ours, only_library = sorted(set(ours) - set(library)), sorted(set(library) - set(ours))
    assert (only_ours, only_library) == (
        [],
        [],
    ), f"names only we write: {only_ours[:6]}; only the library's: {only_library[:6]}"
    assert [k for k in library if ours[k] != library[k]] == [], "shapes differ"
    # ... and the library's own dict reads back as that layout and prefix.
    canonical = to_canonical(model.state_dict())
    assert (canonical.layout, canonical.prefix) == (layout, prefix)


def test_timm_pre_logits_head_of_any_width_is_dropped():
    """head.pre_logits.fc and head.fc are classifier-only whatever the MLP width: the trunk converts."""
    timm = require("timm")
    model = timm.models.convnext.ConvNeXt(depths=(1, 1, 1, 1), dims=(8, 8, 8, 16), num_classes=3, head_hidden_size=12)
    arch, _, target = prepare(model.state_dict())
    assert arch.dims == (8, 8, 8, 16)
    assert not any("head" in k for k in target.state_dict)


@pytest.mark.parametrize("layout, prefix", [("huggingface", "convnext."), ("mmpretrain", "backbone.")])
def test_classifier_outside_the_layout_prefix_may_sit_under_an_outer_wrapper(layout, prefix):
    """`model.` + an HF ForImageClassification / mmpretrain ImageClassifier dict reads like the bare one."""
    arch = Architecture((1, 1, 1, 1), (8, 8, 8, 8), num_classes=3, classifier_norm=True)
    canonical = random_state_dict(arch)
    wrapped = {"model." + k: v for k, v in from_canonical(canonical, layout, prefix).items()}
    read = to_canonical(wrapped)
    assert (read.layout, read.prefix) == (layout, "model." + prefix)
    assert_same_tensors(read.state_dict, canonical, f"model.-wrapped {layout}")


def test_mmpretrain_norm3_without_a_head_is_the_output_norm_of_stage_3():
    """mmpretrain writes the pooled norm as `norm3`; only a head makes it the classifier's, else it is norm3."""
    arch = Architecture((1, 1, 1, 1), (8, 8, 8, 8), num_classes=3, classifier_norm=True)
    source = from_canonical(random_state_dict(arch), "mmpretrain", "backbone.")
    assert "backbone.norm3.weight" in source and "head.fc.weight" in source
    assert "norm.weight" in to_canonical(source).state_dict
    headless = {k: v for k, v in source.items() if not k.startswith("head.")}
    canonical = to_canonical(headless).state_dict
    assert "norm3.weight" in canonical and "norm.weight" not in canonical


# ---------------------------------------------------------------- properties


@given(case=layout_cases())
def test_to_canonical_inverts_from_canonical(case: LayoutCase):
    """Reading a layout's dict gives back exactly the canonical dict it was written from, with its layout and prefix."""
    canonical = to_canonical(case.source)
    assert (canonical.layout, canonical.prefix) == (case.spec.name, case.prefix)
    assert_same_tensors(canonical.state_dict, case.canonical, f"{case.spec.name} -> canonical")
    assert sorted(canonical.dropped) == case.dropped_while_reading


@given(case=layout_cases())
def test_from_canonical_inverts_to_canonical(case: LayoutCase):
    """Writing the canonical dict read from a source gives back the source (less the dropped tower)."""
    canonical = to_canonical(case.source)
    back = from_canonical(canonical.state_dict, canonical.layout, canonical.prefix, conv_mlp=case.conv_mlp)
    expected = {k: v for k, v in case.source.items() if k not in case.extras}  # DINOv3's alias is written again
    assert_same_tensors(back, expected, f"canonical -> {case.spec.name}")


@given(case=layout_cases(dtype=torch.float32), container=S.containers(), wrapper=S.wrapper_prefixes())
def test_inspect_recognises_every_layout_in_every_container(case: LayoutCase, container: str, wrapper: str):
    """Through the file reader: the right layout, prefix, version, depths, dims and classes, whatever the wrapping."""
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "checkpoint.pth")
        torch.save(S.wrap(case.source, container, wrapper), path)
        report = inspect_checkpoint(path)
    got = (report.layout, report.source_prefix, report.version, report.depths, report.dims, report.num_classes)
    want = (
        case.spec.name,
        case.prefix,
        case.arch.version,
        list(case.arch.depths),
        list(case.arch.dims),
        case.arch.num_classes,
    )
    assert got == want
    assert report.container == {"bare": None, "training": "model"}.get(container, container)
    assert report.tensors == len(case.source)


@given(case=layout_cases(dtype=torch.float32))
def test_exactly_one_layout_claims_each_dict(case: LayoutCase):
    """Recognition picks the true layout; any other forced with --from refuses (or, sharing the spelling, agrees)."""
    layout, prefix = find_layout(list(case.source))
    assert (layout.name, prefix) == (case.spec.name, case.prefix)
    for other in sorted(LAYOUTS):
        if other == case.spec.name:
            continue
        try:
            forced = to_canonical(case.source, forced=other)
        except NotConvNeXt:
            continue
        assert (case.spec.name, other) in SHARED_NAMES, f"--from {other} also reads a {case.spec.name} dict"
        assert_same_tensors(forced.state_dict, case.canonical, f"{case.spec.name} read as {other}")


def _table_entries() -> List[Tuple[str, int, str, str, bool, bool]]:
    """Every (layout, version, head, prefix, conv_mlp, tower) combination the table allows."""
    entries = []
    for spec in SPECS.values():
        for version in spec.versions:
            for head in spec.heads:
                for prefix in spec.prefixes[version]:
                    for conv_mlp in (False, True) if spec.conv_mlp else (False,):
                        for tower in (False, True) if spec.name == "open_clip" else (False,):
                            entries.append((spec.name, version, head, prefix, conv_mlp, tower))
    return entries


TABLE_ARCH = Architecture((1, 2, 1, 1), (4, 8, 12, 16), layer_scale=True)


@pytest.mark.parametrize(
    "layout, version, head, prefix, conv_mlp, tower",
    _table_entries(),
    ids=lambda v: repr(v) if isinstance(v, str) and not v else str(v),
)
def test_every_table_entry_reads_back_and_is_claimed_by_its_layout_alone(
    layout, version, head, prefix, conv_mlp, tower
):
    """The whole table, exhaustively (the properties sample it): exact read-back, its layout only, others refuse."""
    arch = _with_head(dataclasses.replace(TABLE_ARCH, version=version, layer_scale=version == 1), head, 3)
    case = build_case(SPECS[layout], arch, head, prefix, conv_mlp, tower, seed=11)
    canonical = to_canonical(case.source)
    assert (canonical.layout, canonical.prefix) == (layout, prefix)
    assert_same_tensors(canonical.state_dict, case.canonical, layout)
    readers = []
    for other in sorted(LAYOUTS):
        try:
            to_canonical(case.source, forced=other)
            readers.append(other)
        except NotConvNeXt:
            pass
    shared = sorted(o for (true, o) in SHARED_NAMES if true == layout and not tower)
    assert readers == sorted([layout] + shared)


def test_open_clip_tower_keys_make_forced_timm_refuse():
    """The shared spelling ends where OpenCLIP's own tensors start: with a text tower, --from timm names them."""
    arch = Architecture((1, 1, 1, 1), (8, 8, 8, 8), classifier_norm=True)
    case = build_case(SPECS["open_clip"], arch, POOLED_NORM, "visual.trunk.", extras=True)
    with pytest.raises(NotConvNeXt, match=r"outside the timm layout: .*token_embedding\.weight"):
        to_canonical(case.source, forced="timm")
    assert sorted(to_canonical(case.source).dropped) == sorted(OPEN_CLIP_EXTRAS)
