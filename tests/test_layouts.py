"""Every source layout (LAYOUTS.md): what each library writes, and that the converter reads all of it.

A *capability table* (`SPECS`) says, per layout, which ConvNeXt versions the library writes,
whether V1 layer scale may be absent, which classifier parts it keeps, the prefixes it comes
under, and whether it has timm's conv-MLP form.  Sources are built from canonical dicts with
`from_canonical` (the layout tables are invertible), drawn by hypothesis within the table, and:

- read back by `to_canonical` to exactly the canonical dict (names, shapes, bit-identical values),
  reporting that layout and prefix (the mapping composed with its inverse is the identity);
- recognised through the file-level reader (`inspect_checkpoint`) in every container and wrapper;
- claimed by one layout only: forcing any other with `--from` is refused (one documented exception);
- converted and loaded by Detectron2's real `DetectionCheckpointer` with nothing missing but the
  fresh output norms, nothing unexpected, every tensor equal (`roundtrip` tests).

Bad inputs (mixed naming, truncated, isotropic, not ConvNeXt, wrong version, sparse FCMAE) and the
`inspect` command (facts and Detectron2 problems of each layout's files) close the file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import tempfile
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conversion import convert
from conversion.architecture import CLASSIFIER_KEYS, RELEASED_VARIANTS, Architecture
from conversion.cli import main
from conversion.convert import prepare
from conversion.errors import NotConvNeXt
from conversion.inspection import inspect_checkpoint
from conversion.layouts import LAYOUTS, from_canonical, recognise, to_canonical
from conversion.synthetic import random_state_dict

from . import strategies as S
from .support import (
    assert_clean_load,
    assert_loaded_equal,
    build_d2_model,
    fill_with_sentinel,
    load_with_detectron2,
    require,
    require_torchvision_convnext,
)

EXIT_USAGE = 2

# ---------------------------------------------------------------- the capability table

# What a library keeps after the trunk (LAYOUTS.md):
CLASSIFIER = "classifier"  # pooled `norm` + `head` (num_classes K)
POOLED_NORM = "pooled-norm"  # pooled `norm` only (timm num_classes=0, HF ConvNextModel, DINOv3)
NO_HEAD = "none"  # the trunk alone
OUTPUT_NORMS = "output-norms"  # detection output norms norm0..3 (official detection, HF Backbone, mmdet)
HEADS = (CLASSIFIER, POOLED_NORM, NO_HEAD, OUTPUT_NORMS)


@dataclass(frozen=True)
class LayoutSpec:
    """What one library writes.

    Attributes:
        versions: ConvNeXt versions the library has (torchvision and DINOv3: V1 only).
        layer_scale_optional: V1 files may lack `gamma` (trained with layer scale 0); torchvision's
            CNBlock always creates it, and DINOv3 files are modelled with it.
        heads: which of HEADS the library's files carry.
        prefixes: per version, the prefixes its files come under.
        conv_mlp: timm's conv-MLP form (`mlp.fc{1,2}.weight` as `[out, in, 1, 1]`) exists.
        unnamed: canonical parts the layout has no name for (from_canonical must refuse them).
    """

    name: str
    versions: Tuple[int, ...]
    layer_scale_optional: bool
    heads: Tuple[str, ...]
    prefixes: Mapping[int, Tuple[str, ...]]
    conv_mlp: bool = False
    unnamed: Tuple[str, ...] = ()


def _both(*prefixes: str) -> Dict[int, Tuple[str, ...]]:
    return {1: prefixes, 2: prefixes}


V1_ONLY, V1_V2 = (1,), (1, 2)
_SPECS = (
    LayoutSpec("official", V1_V2, layer_scale_optional=True, heads=HEADS, prefixes=_both("", "backbone.")),
    LayoutSpec(
        "timm",
        V1_V2,
        layer_scale_optional=True,
        heads=(CLASSIFIER, POOLED_NORM, NO_HEAD),
        prefixes=_both("", "model."),
        conv_mlp=True,
        unnamed=(OUTPUT_NORMS,),
    ),
    LayoutSpec(
        "timm-features",
        V1_V2,
        layer_scale_optional=True,
        heads=(NO_HEAD,),
        prefixes=_both(""),
        conv_mlp=True,
        unnamed=(CLASSIFIER, POOLED_NORM, OUTPUT_NORMS),
    ),
    # OpenCLIP builds its trunk with num_classes=0 (pooled norm only); a head is possible.
    LayoutSpec(
        "open_clip",
        V1_V2,
        layer_scale_optional=True,
        heads=(POOLED_NORM, CLASSIFIER),
        prefixes=_both("visual.trunk."),
        conv_mlp=True,
        unnamed=(OUTPUT_NORMS,),
    ),
    # ForImageClassification (prefix convnext./convnextv2.), ConvNextModel and ConvNextBackbone (no prefix).
    LayoutSpec(
        "huggingface",
        V1_V2,
        layer_scale_optional=True,
        heads=(CLASSIFIER, POOLED_NORM, OUTPUT_NORMS),
        prefixes={1: ("", "convnext."), 2: ("", "convnextv2.")},
    ),
    LayoutSpec(
        "torchvision",
        V1_ONLY,
        layer_scale_optional=False,
        heads=(CLASSIFIER,),
        prefixes={1: ("",)},
        unnamed=(OUTPUT_NORMS, "v2"),
    ),
    # mmpretrain's pooled norm is `norm3`: without a head it is read as the output norm 3, so a
    # pooled norm alone is not a form mmpretrain files take (see the test below).
    LayoutSpec(
        "mmpretrain",
        V1_V2,
        layer_scale_optional=True,
        heads=(CLASSIFIER, NO_HEAD, OUTPUT_NORMS),
        prefixes=_both("backbone."),
    ),
    # DINOv3: the pooled `norm` (and its `norms.3` alias), no head (LAYOUTS.md; conversion/layouts.py).
    LayoutSpec("dinov3", V1_ONLY, layer_scale_optional=False, heads=(POOLED_NORM,), prefixes={1: ("",)}),
)
SPECS: Dict[str, LayoutSpec] = {spec.name: spec for spec in _SPECS}

# Pairs (true layout, forced layout) where `--from forced` legitimately reads the same dict: an
# OpenCLIP trunk *is* a timm model under `visual.trunk.`, so `--from timm` finds the timm marker
# under that prefix and reads it identically -- unless tower tensors outside the prefix exist
# (only open_clip drops those).  Every other forced layout must refuse.
SHARED_NAMES = {("open_clip", "timm")}

# Tensors OpenCLIP keeps outside the image trunk (a fake text tower and the projection head).
OPEN_CLIP_EXTRAS = ("token_embedding.weight", "positional_embedding", "logit_scale", "visual.head.proj.weight")


def _with_head(arch: Architecture, head: str, num_classes: int) -> Architecture:
    return dataclasses.replace(
        arch,
        num_classes=num_classes if head == CLASSIFIER else None,
        classifier_norm=head in (CLASSIFIER, POOLED_NORM),
        output_norms=(0, 1, 2, 3) if head == OUTPUT_NORMS else (),
    )


def open_clip_extras(arch: Architecture, dtype: torch.dtype = torch.float32) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "token_embedding.weight": torch.randn(11, 6, generator=g).to(dtype),
        "positional_embedding": torch.randn(5, 6, generator=g).to(dtype),
        "logit_scale": torch.tensor(4.6).to(dtype),
        "visual.head.proj.weight": torch.randn(6, arch.dims[-1], generator=g).to(dtype),
    }


class LayoutCase:
    """One source dict in one layout, and the canonical dict it was built from.

    A plain class, not a dataclass: hypothesis pretty-prints dataclasses field by field, tensors included.
    """

    def __init__(
        self,
        spec: LayoutSpec,
        arch: Architecture,
        head: str,
        prefix: str,
        conv_mlp: bool,
        canonical: Dict[str, torch.Tensor],
        source: Dict[str, Any],
        extras: Tuple[str, ...] = (),
    ) -> None:
        self.spec, self.arch, self.head, self.prefix, self.conv_mlp = spec, arch, head, prefix, conv_mlp
        self.canonical, self.source, self.extras = canonical, source, extras

    @property
    def dropped_while_reading(self) -> List[str]:
        """Source keys `to_canonical` leaves out: OpenCLIP's tower, DINOv3's `norms.3` alias of `norm`."""
        aliases = [k for k in self.source if self.spec.name == "dinov3" and k.startswith(self.prefix + "norms.")]
        return sorted(list(self.extras) + aliases)

    def __repr__(self) -> str:  # hypothesis prints this on failure
        return (
            f"LayoutCase({self.spec.name}, V{self.arch.version}, head={self.head}, prefix={self.prefix!r}, "
            f"conv_mlp={self.conv_mlp}, extras={bool(self.extras)}, {self.arch})"
        )


def build_case(
    spec: LayoutSpec,
    arch: Architecture,
    head: str,
    prefix: str,
    conv_mlp: bool = False,
    extras: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    canonical: Optional[Dict[str, torch.Tensor]] = None,
) -> LayoutCase:
    canonical = canonical if canonical is not None else random_state_dict(arch, seed=seed, dtype=dtype)
    source = from_canonical(canonical, spec.name, prefix, conv_mlp=conv_mlp)
    extra = open_clip_extras(arch, dtype) if extras else {}
    source.update(extra)
    return LayoutCase(spec, arch, head, prefix, conv_mlp, canonical, source, tuple(extra))


@st.composite
def layout_cases(draw: Any, layout: Optional[str] = None, dtype: Optional[torch.dtype] = None) -> LayoutCase:
    """A source dict in a layout the table allows: version, architecture, head, prefix, conv-MLP, dtype."""
    spec = SPECS[layout] if layout is not None else SPECS[draw(st.sampled_from(sorted(SPECS)))]
    version = draw(st.sampled_from(spec.versions))
    arch = draw(
        S.architectures(version=version, layer_scale=None if spec.layer_scale_optional else True, classifier=False)
    )
    head = draw(st.sampled_from(spec.heads))
    arch = _with_head(arch, head, draw(st.integers(1, 7)))
    _, canonical = draw(S.official_state_dicts(arch=arch, dtype=dtype if dtype is not None else draw(S.dtypes())))
    return build_case(
        spec,
        arch,
        head,
        prefix=draw(st.sampled_from(spec.prefixes[version])),
        conv_mlp=spec.conv_mlp and draw(st.booleans()),
        extras=spec.name == "open_clip" and draw(st.booleans()),
        canonical=canonical,
    )


def assert_same_tensors(got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor], what: str) -> None:
    """Same names; each tensor with the same shape and dtype and bit-identical values."""
    extra, missing = sorted(set(got) - set(want)), sorted(set(want) - set(got))
    assert (extra, missing) == ([], []), f"{what}: names differ: extra {extra[:5]}, missing {missing[:5]}"
    wrong = [
        k
        for k in want
        if got[k].shape != want[k].shape or got[k].dtype != want[k].dtype or not torch.equal(got[k], want[k])
    ]
    assert wrong == [], f"{what}: {len(wrong)} tensors differ in shape, dtype or value: {wrong[:5]}"


# ---------------------------------------------------------------- the table itself


def test_capability_table_covers_every_layout():
    """Every layout the converter knows has a row, and every row is a known layout."""
    assert sorted(SPECS) == sorted(LAYOUTS)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_declared_layout_prefixes_agree_with_the_table(name):
    """A layout that pins its prefixes (OpenCLIP's `visual.trunk.`) pins exactly the table's."""
    declared = LAYOUTS[name].prefixes
    table = sorted({p for v in SPECS[name].versions for p in SPECS[name].prefixes[v]})
    if declared is not None:
        assert sorted(declared) == table


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
    layout, prefix = recognise(list(case.source))
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


# ---------------------------------------------------------------- round trips through Detectron2


@dataclass(frozen=True)
class Trip:
    """One library-typical file for a round trip."""

    layout: str
    version: int
    head: str
    prefix: str
    conv_mlp: bool = False
    extras: bool = False
    container: str = "bare"

    @property
    def id(self) -> str:
        parts = [self.layout, f"v{self.version}", self.head, self.prefix.rstrip(".") or "no-prefix"]
        return "-".join(parts + (["conv-mlp"] if self.conv_mlp else []) + (["tower"] if self.extras else []))


ROUNDTRIPS = (
    Trip("official", 1, CLASSIFIER, "", container="model"),
    Trip("official", 2, CLASSIFIER, "", container="model"),
    Trip("official", 1, OUTPUT_NORMS, "backbone.", container="model"),
    Trip("timm", 1, CLASSIFIER, ""),
    Trip("timm", 2, CLASSIFIER, "", conv_mlp=True),
    Trip("timm", 1, POOLED_NORM, "model.", conv_mlp=True, container="state_dict"),
    Trip("timm-features", 1, NO_HEAD, "", conv_mlp=True),
    Trip("timm-features", 2, NO_HEAD, ""),
    Trip("open_clip", 1, POOLED_NORM, "visual.trunk.", extras=True, container="state_dict"),
    Trip("open_clip", 2, POOLED_NORM, "visual.trunk.", conv_mlp=True, extras=True, container="state_dict"),
    Trip("huggingface", 1, CLASSIFIER, "convnext."),
    Trip("huggingface", 2, CLASSIFIER, "convnextv2."),
    Trip("huggingface", 1, POOLED_NORM, ""),
    Trip("huggingface", 1, OUTPUT_NORMS, ""),
    Trip("torchvision", 1, CLASSIFIER, ""),
    Trip("mmpretrain", 1, CLASSIFIER, "backbone.", container="state_dict"),
    Trip("mmpretrain", 2, CLASSIFIER, "backbone.", container="state_dict"),
    Trip("mmpretrain", 1, OUTPUT_NORMS, "backbone.", container="state_dict"),
    Trip("dinov3", 1, POOLED_NORM, ""),
)
ROUNDTRIP_ARCH = Architecture((1, 2, 1, 1), (8, 16, 8, 16))
D2_PREFIX = "backbone."


def _roundtrip(directory: str, case: LayoutCase, ext: str, container: str = "bare", saver: str = "torch"):
    """Convert `case.source` to `ext`, load it with the real DetectionCheckpointer, compare every tensor."""
    if saver == "safetensors":
        from safetensors.torch import save_file

        src = os.path.join(directory, "source.safetensors")
        save_file({k: v.contiguous() for k, v in case.source.items()}, src)
    else:
        src = os.path.join(directory, "source.pth")
        torch.save(S.wrap(case.source, container), src)
    dst = os.path.join(directory, "converted" + ext)
    report = convert(src, dst)
    model = build_d2_model(case.arch)
    fill_with_sentinel(model)
    assert_clean_load(load_with_detectron2(model, dst), expected_missing=report.fresh)
    expected = {D2_PREFIX + k: v for k, v in case.canonical.items() if k not in CLASSIFIER_KEYS}
    assert_loaded_equal(model, expected)
    # Every backbone tensor of the model came from the file, except the fresh output norms.
    assert sorted(set(model.state_dict()) - set(expected)) == sorted(report.fresh)
    return report


@pytest.mark.detectron2
@pytest.mark.parametrize("ext", [".pth", ".pkl"])
@pytest.mark.parametrize("trip", ROUNDTRIPS, ids=lambda t: t.id)
def test_roundtrip_every_layout(tmp_path, trip: Trip, ext: str):
    """Each layout's typical file converts and loads into the D2 backbone: only fresh norms missing, all equal."""
    require("detectron2")
    arch = _with_head(dataclasses.replace(ROUNDTRIP_ARCH, version=trip.version), trip.head, 5)
    case = build_case(SPECS[trip.layout], arch, trip.head, trip.prefix, trip.conv_mlp, trip.extras, seed=3)
    report = _roundtrip(str(tmp_path), case, ext, trip.container)
    assert (report.layout, report.source_prefix, report.version) == (trip.layout, trip.prefix, trip.version)
    all_norms = [f"{D2_PREFIX}norm{i}.{p}" for i in range(4) for p in ("weight", "bias")]
    assert sorted(report.fresh) == ([] if trip.head == OUTPUT_NORMS else sorted(all_norms))
    accounted = report.kept + len(report.dropped)
    assert accounted == len(case.source), "every source tensor is either kept or reported dropped"
    assert set(case.extras) <= set(report.dropped)


@pytest.mark.detectron2
@pytest.mark.parametrize("layout", [name for name, spec in SPECS.items() if 2 in spec.versions])
def test_roundtrip_v2_grn_parameters_land_as_1x1x1xE(tmp_path, layout: str):
    """V2 from every layout that has it: GRN gamma/beta load into the USE_GRN backbone as [1,1,1,E], values equal."""
    require("detectron2")
    spec = SPECS[layout]
    arch = Architecture((2, 1, 1, 1), (8, 16, 16, 8), version=2)
    head = spec.heads[0]
    case = build_case(spec, _with_head(arch, head, 4), head, spec.prefixes[2][-1], conv_mlp=spec.conv_mlp, seed=4)
    report = _roundtrip(str(tmp_path), case, ".pth")
    assert report.version == 2
    assert sum(".grn." in k for k in case.canonical) == 2 * sum(arch.depths)
    model_grn = {k: v.shape for k, v in build_d2_model(arch).state_dict().items() if ".grn." in k}
    assert set(model_grn.values()) == {torch.Size([1, 1, 1, 4 * d]) for d in set(arch.dims)}
    if layout in ("timm", "timm-features", "open_clip", "mmpretrain"):
        assert sum(fix == "[E] -> [1,1,1,E]" for fix in report.reshaped.values()) == 2 * sum(arch.depths)


@pytest.mark.detectron2
@pytest.mark.parametrize("ext", [".pth", ".pkl"])
def test_roundtrip_safetensors_timm_file(tmp_path, ext):
    """A timm dict saved with safetensors.save_file (the hub format) converts and round-trips (V2, conv-MLP)."""
    require("safetensors")
    arch = Architecture((1, 2, 1, 1), (8, 16, 8, 16), version=2, num_classes=3, classifier_norm=True)
    case = build_case(SPECS["timm"], arch, CLASSIFIER, "", conv_mlp=True, seed=5)
    report = _roundtrip(str(tmp_path), case, ext, saver="safetensors")
    assert report.layout == "timm" and report.container is None
    assert any("safetensors" in note for note in report.notes), report.notes


# ---------------------------------------------------------------- bad input


SMALL = Architecture((1, 1, 2, 1), (8, 8, 16, 16), num_classes=3, classifier_norm=True)


def _cli_convert(tmp_path, obj: Any, *extra: str, capsys) -> Tuple[int, str]:
    src = tmp_path / "source.pth"
    torch.save(obj, src)
    dst = tmp_path / "out.pth"
    status = main(["convert", str(src), str(dst), *extra])
    err = capsys.readouterr().err
    assert not dst.exists(), "a refused conversion wrote its destination"
    return status, err


def test_half_converted_dict_names_the_keys_of_the_other_layout(tmp_path, capsys):
    """Stages 0-1 in official names, stages 2-3 in timm names: refused, naming the timm keys."""
    canonical = random_state_dict(SMALL)
    late = {k for k in canonical if re.match(r"^(stages|downsample_layers)\.[23]\.", k)}
    mixed = {k: v for k, v in canonical.items() if k not in late}
    timm_names = from_canonical({k: canonical[k] for k in late}, "timm")
    mixed.update(timm_names)
    status, err = _cli_convert(tmp_path, {"model": mixed}, capsys=capsys)
    assert status == EXIT_USAGE
    assert f"{len(timm_names)} key(s) outside the official layout" in err, err
    assert sorted(timm_names)[0] in err, err


def test_mostly_timm_dict_with_official_leftovers_names_the_leftovers(tmp_path, capsys):
    """The other way round: a timm dict with one official block is refused naming that block's keys."""
    canonical = random_state_dict(SMALL)
    leftover = {k for k in canonical if k.startswith("stages.2.1.")}
    mixed = from_canonical({k: v for k, v in canonical.items() if k not in leftover}, "timm")
    mixed.update({k: canonical[k] for k in leftover})
    status, err = _cli_convert(tmp_path, mixed, capsys=capsys)
    assert status == EXIT_USAGE
    assert "outside the timm layout" in err and "stages.2.1.dwconv.weight" in err, err


def test_truncated_architecture_names_the_missing_stage(tmp_path, capsys):
    """A ConvNeXt without stage 3's blocks is refused as truncated, naming stage 3."""
    canonical = {k: v for k, v in random_state_dict(SMALL).items() if not k.startswith("stages.3.")}
    status, err = _cli_convert(tmp_path, {"model": canonical}, capsys=capsys)
    assert status == EXIT_USAGE
    assert "truncated ConvNeXt: stage(s) [3]" in err, err


def test_isotropic_convnext_is_refused_for_having_no_pyramid(tmp_path, capsys):
    """Official isotropic ConvNeXt (stem + blocks.N) has no res2..res5: refused as such."""
    c, e = 16, 64
    isotropic = {"stem.weight": torch.zeros(c, 3, 16, 16), "stem.bias": torch.zeros(c)}
    for b in range(2):
        p = f"blocks.{b}."
        isotropic.update(
            {
                p + "gamma": torch.zeros(c),
                p + "dwconv.weight": torch.zeros(c, 1, 7, 7),
                p + "dwconv.bias": torch.zeros(c),
                p + "norm.weight": torch.ones(c),
                p + "norm.bias": torch.zeros(c),
                p + "pwconv1.weight": torch.zeros(e, c),
                p + "pwconv1.bias": torch.zeros(e),
                p + "pwconv2.weight": torch.zeros(c, e),
                p + "pwconv2.bias": torch.zeros(c),
            }
        )
    isotropic.update(
        {
            "norm.weight": torch.ones(c),
            "norm.bias": torch.zeros(c),
            "head.weight": torch.zeros(3, c),
            "head.bias": torch.zeros(3),
        }
    )
    status, err = _cli_convert(tmp_path, {"model": isotropic}, capsys=capsys)
    assert status == EXIT_USAGE
    assert "isotropic ConvNeXt" in err and "res2..res5" in err, err


def test_timm_resnet_is_not_a_convnext(tmp_path, capsys):
    """A timm ResNet-18 state dict is refused as not a ConvNeXt, listing the markers looked for."""
    timm = require("timm")
    resnet = timm.create_model("resnet18", pretrained=False).state_dict()
    status, err = _cli_convert(tmp_path, resnet, capsys=capsys)
    assert status == EXIT_USAGE
    assert "not a ConvNeXt checkpoint this tool knows" in err and f"{len(resnet)} keys such as bn1." in err, err


@pytest.mark.parametrize("layout", ["official", "timm"])
def test_v2_file_forced_as_v1_names_a_grn_key(tmp_path, capsys, layout):
    """`--from LAYOUT-v1` on a V2 file is refused with a GRN key (in the source's own names) as evidence."""
    arch = dataclasses.replace(SMALL, version=2)
    source = from_canonical(random_state_dict(arch), layout)
    status, err = _cli_convert(tmp_path, {"model": source}, "--from", f"{layout}-v1", capsys=capsys)
    assert status == EXIT_USAGE
    grn = (
        r"stages\.\d+\.\d+\.grn\.(gamma|beta)"
        if layout == "official"
        else r"stages\.\d+\.blocks\.\d+\.mlp\.grn\.(weight|bias)"
    )
    assert re.search(rf"ConvNeXt V2 \(evidence: {grn}\), not V1", err), err
    assert f"--from {layout}-v2" in err, err


def test_v2_file_forced_as_v2_converts(tmp_path, capsys):
    """The same V2 file with the right pin converts (the pin is a check, not a blocker)."""
    arch = dataclasses.replace(SMALL, version=2)
    src, dst = tmp_path / "v2.pth", tmp_path / "v2_d2.pth"
    torch.save({"model": random_state_dict(arch)}, src)
    assert main(["convert", str(src), str(dst), "--from", "official-v2"]) == 0
    assert dst.exists()


def test_sparse_fcmae_checkpoint_is_refused_with_densify_advice(tmp_path, capsys):
    """The in-repo FCMAE model's sparse kernels ((k*k, in, out) MinkowskiEngine) are refused, saying to densify."""
    c = 8
    sparse = {
        "encoder.downsample_layers.0.0.weight": torch.zeros(c, 3, 4, 4),
        "encoder.stages.0.0.dwconv.kernel": torch.zeros(49, 1, c),
        "encoder.stages.0.0.dwconv.bias": torch.zeros(1, c),
        "encoder.stages.0.0.pwconv1.linear.weight": torch.zeros(4 * c, c),
        "encoder.stages.0.0.grn.gamma": torch.zeros(1, 4 * c),
        "mask_token": torch.zeros(1, 16, 1, 1),
    }
    status, err = _cli_convert(tmp_path, {"model": sparse}, capsys=capsys)
    assert status == EXIT_USAGE
    assert "encoder.stages.0.0.dwconv.kernel" in err and "densify" in err.lower(), err


# ---------------------------------------------------------------- inspect


ATTO_DEPTHS, ATTO_DIMS = RELEASED_VARIANTS[1]["convnext_atto"]
assert RELEASED_VARIANTS[2]["convnextv2_atto"] == (ATTO_DEPTHS, ATTO_DIMS)
ATTO_CLASSES = 10


def _inspect_cli(path: str, capsys, *extra: str) -> Tuple[str, Dict[str, Any]]:
    assert main(["inspect", path, *extra]) == 0
    human = capsys.readouterr().out
    assert main(["inspect", path, "--json", *extra]) == 0
    return human, json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(
    "layout, version", [(name, v) for name, spec in SPECS.items() for v in spec.versions], ids=lambda v: str(v)
)
def test_inspect_reports_the_facts_of_each_layouts_file(tmp_path, capsys, layout, version):
    """layout, version, released variant, depths, dims, classes, dtypes, counts, size and container keys."""
    spec = SPECS[layout]
    head = spec.heads[0]
    arch = _with_head(Architecture(ATTO_DEPTHS, ATTO_DIMS, version=version), head, ATTO_CLASSES)
    prefix = spec.prefixes[version][-1]
    case = build_case(spec, arch, head, prefix, conv_mlp=spec.conv_mlp, extras=layout == "open_clip", seed=version)
    path = str(tmp_path / "checkpoint.pth")
    torch.save({"state_dict": case.source, "epoch": 3}, path)

    human, report = _inspect_cli(path, capsys)

    variant = "convnext_atto" if version == 1 else "convnextv2_atto"
    parameters = sum(t.numel() for t in case.canonical.values())
    facts = {
        "layout": layout,
        "version": version,
        "variant": variant,
        "depths": list(ATTO_DEPTHS),
        "dims": list(ATTO_DIMS),
        "num_classes": arch.num_classes,
        "source_prefix": case.prefix,
        "container": "state_dict",
        "container_keys": ["epoch", "state_dict"],
        "tensors": len(case.source),
        "parameters": parameters,
        "dtypes": {"float32": len(case.canonical)},
        "file_bytes": os.path.getsize(path),
        "format": "torch-zip",
    }
    assert {k: report[k] for k in facts} == facts
    assert f"layout     {layout}: " in human
    classes = f", classifier {ATTO_CLASSES} classes" if arch.num_classes else ", no classifier"
    lines = [
        f"variant    {variant}, ConvNeXt V{version}, depths {list(ATTO_DEPTHS)}, dims {list(ATTO_DIMS)}{classes}",
        f"tensors    {len(case.source)} ({parameters / 1e6:.2f} M parameters); dtypes float32 x{len(case.canonical)}",
        f"{report['file_bytes'] / 1e6:.1f} MB, torch-zip; weights under 'state_dict'; top-level keys epoch, state_dict",
    ]
    assert [line for line in lines if line not in human] == [], human


@pytest.mark.parametrize("name, variant", [("convnext_atto", "convnext_atto"), ("convnextv2_atto", "convnextv2_atto")])
def test_inspect_names_a_real_timm_model_by_its_variant(tmp_path, capsys, name, variant):
    """timm's own convnext_atto / convnextv2_atto (conv-MLP) dicts: variant, classes, reshapes, the timm problem."""
    timm = require("timm")
    model = timm.create_model(name, pretrained=False)
    path = str(tmp_path / f"{name}.pth")
    torch.save(model.state_dict(), path)
    human, report = _inspect_cli(path, capsys)
    assert (report["layout"], report["variant"], report["num_classes"]) == ("timm", variant, 1000)
    assert (report["tensors"], report["container"], report["container_keys"]) == (len(model.state_dict()), None, [])
    assert report["parameters"] == sum(p.numel() for p in model.state_dict().values())
    assert set(report["reshaped"].values()) >= {"[out,in,1,1] -> [out,in]"}
    assert report["problems"][0].startswith("names are in the timm layout"), report["problems"]
    assert any("head.fc.weight" in p and "matching_heuristics" in p for p in report["problems"]), report["problems"]
    assert f"variant    {variant}, ConvNeXt V{report['version']}" in human and "names are in the timm layout" in human


# The problems Detectron2 would hit with a file as it is (conversion/diagnose.py), one per case.
NO_PREFIX = "lack the 'backbone.' prefix"
NO_AUTHOR = "a .pkl with 'model' but no '__author__'"
TORCH_AS_PKL = "a torch.save archive under a .pkl name"
WEIGHTS_ONLY = "holds Namespace objects: torch >= 2.6 loads with weights_only=True"
HEURISTICS = "matching_heuristics"
TIMM_NAMES = "names are in the timm layout"

PROBLEM_ARCH = Architecture((1, 1, 2, 1), (8, 8, 16, 16))


def _backbone_names(canonical: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {D2_PREFIX + k: v for k, v in canonical.items()}


def _write_problem_file(directory, case: str) -> str:
    trunk = random_state_dict(PROBLEM_ARCH, seed=9)
    with_head = random_state_dict(dataclasses.replace(PROBLEM_ARCH, num_classes=3, classifier_norm=True), seed=9)
    if case == "timm":
        path = os.path.join(directory, "timm.pth")
        torch.save(from_canonical(trunk, "timm"), path)
    elif case == "official-bare":
        path = os.path.join(directory, "official.pth")
        torch.save(trunk, path)
    elif case == "pkl-without-author":
        path = os.path.join(directory, "d2.pkl")
        with open(path, "wb") as f:
            pickle.dump({"model": {k: v.numpy() for k, v in _backbone_names(trunk).items()}}, f)
    elif case == "torch-archive-as-pkl":
        path = os.path.join(directory, "d2.pkl")
        torch.save({"model": _backbone_names(trunk)}, path)
    elif case == "training-namespace":
        path = os.path.join(directory, "checkpoint-299.pth")
        torch.save(S.wrap(_backbone_names(trunk), "training"), path)
    elif case == "classifier":
        path = os.path.join(directory, "with_head.pth")
        torch.save({"model": _backbone_names(with_head)}, path)
    else:
        raise ValueError(case)
    return path


@pytest.mark.parametrize(
    "case, problem",
    [
        ("timm", TIMM_NAMES),
        ("official-bare", NO_PREFIX),
        ("pkl-without-author", NO_AUTHOR),
        ("torch-archive-as-pkl", TORCH_AS_PKL),
        ("training-namespace", WEIGHTS_ONLY),
        ("classifier", HEURISTICS),
    ],
)
def test_inspect_lists_exactly_the_problem_detectron2_would_hit(tmp_path, capsys, case, problem):
    """Each broken form is diagnosed with its own problem, and nothing else."""
    path = _write_problem_file(str(tmp_path), case)
    human, report = _inspect_cli(path, capsys)
    assert len(report["problems"]) == 1 and problem in report["problems"][0], report["problems"]
    assert f"    - {report['problems'][0]}" in human
    assert "Detectron2 loading this file as it is:" in human and "fix: convnext-d2 convert SRC DST.pth" in human
    if case == "classifier":
        assert "backbone.head.weight" in report["problems"][0] and "backbone.norm.weight" in report["problems"][0]


@pytest.mark.parametrize("ext", [".pth", ".pkl"])
@pytest.mark.parametrize("layout", sorted(SPECS))
def test_inspect_finds_no_problem_in_a_converted_file(tmp_path, capsys, layout, ext):
    """Whatever the source layout, the converted file is official names behind `backbone.`: problems == []."""
    spec = SPECS[layout]
    head = spec.heads[0]
    arch = _with_head(PROBLEM_ARCH, head, 3)
    case = build_case(spec, arch, head, spec.prefixes[1][-1], extras=layout == "open_clip", seed=2)
    src, dst = str(tmp_path / "source.pth"), str(tmp_path / f"converted{ext}")
    torch.save(case.source, src)
    convert(src, dst)
    human, report = _inspect_cli(dst, capsys)
    assert report["problems"] == [], report["problems"]
    assert (report["layout"], report["source_prefix"], report["container"]) == ("official", D2_PREFIX, "model")
    assert report["num_classes"] is None
    assert "Detectron2 loading this file as it is: no problem found" in human
