"""The conversion pipeline: open -> plan (weights, canonical names, architecture, target names,
writer) -> report -> write, one path for every source format.

`read.open_source` gives plain containers whose leaves are tensor handles (records of a torch zip)
or tensors and arrays in memory; `plan` maps them once and chooses the writer by what the leaves
are; the report is built from the plan before the destination is touched.  `convert` and `repair`
are the public entries; each step is a pure function in its own module, so tests can exercise any
step alone and the CLI only formats the report.
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Union

from .architecture import CLASSIFIER_KEYS, Architecture, canonical_shapes
from .diagnose import diagnose
from .errors import NonFiniteWeights, UnreadableCheckpoint
from .layouts import Canonical, LayoutOption, recognise
from .containers import check_weight_types, select_state_dict
from .formats import AUTHOR, output_format
from .io.dtypes import ITEM_SIZE, PICKLE_WIDENS
from .io.handles import TensorRef, check_references, location_bytes, numel
from .io.safe_pickle import allowance
from .read import Source, open_source, placeholders_in
from .target import ALL_OUTPUTS, BACKBONE_PREFIX, Target, fresh_output_norms, to_target

# Nothing on this path imports torch (~640 MB resident just to import): handles are written by
# byte copies and numpy.


@dataclass
class ConversionReport:
    """What a conversion did, for people (CLI summary) and machines (`--json`)."""

    source: str
    destination: str
    layout: str
    container: Optional[str]
    source_prefix: str
    variant: Optional[str]
    version: int
    depths: List[int]
    dims: List[int]
    num_classes: Optional[int]
    prefix: str
    format: str
    kept: int
    parameters: int
    dropped: List[str]  # source names left out: the classifier, and layout-specific extras
    drop_reasons: Dict[str, str]  # source name -> why it was left out
    reshaped: Dict[str, str]  # target name -> shape fix applied (e.g. torchvision layer scale [C,1,1] -> [C])
    renamed: Dict[str, str]  # target name -> source name, where the layout renamed (not just prefixed)
    fresh: List[str]  # target keys the backbone initialises itself
    dtypes: Dict[str, int]  # dtype -> tensor count, as written
    stored_as: Dict[str, str] = field(default_factory=dict)  # source dtype -> dtype written (bfloat16 -> float32 in .pkl)
    bytes_written: int = 0
    notes: List[str] = field(default_factory=list)  # what Detectron2 would have made of the source as it was
    # Target names of tensors holding NaN or Inf; None when not checked (a streamed conversion without strict).
    non_finite: Optional[List[str]] = None
    # Every written tensor was a handle: its bytes went from the source file into the output, never loaded
    # (False: some tensor was in memory, e.g. numpy arrays pickled inside a torch archive's index).
    streamed: bool = False
    # A detection / segmentation checkpoint's parts besides the backbone (neck., roi_head., sem_seg_head., ...):
    # top-level prefix -> tensor count, left out of the file.
    detector_parts: Dict[str, int] = field(default_factory=dict)
    # Objects of classes outside the allowlist, read past as inert placeholders: path in the file -> class.
    read_past: Dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def _dtype_name(dtype: Any) -> str:
    return str(dtype).replace("torch.", "")


def _stored_dtype(dtype: Any, fmt: str) -> Any:
    """The dtype written: as is, except bfloat16 in a .pkl (numpy has none), widened to float32."""
    return PICKLE_WIDENS.get(_dtype_name(dtype), dtype) if fmt == "pickle" else dtype


class Prepared(NamedTuple):
    """The pure part of a conversion, for weights in memory."""

    arch: Architecture
    canonical: Canonical
    target: Target


def prepare(
    state_dict: Mapping[str, Any], *, prefix: str = BACKBONE_PREFIX, layout: Union[None, str, LayoutOption] = None,
    lenient: bool = False,
) -> Prepared:
    """The architecture, canonical weights and target of an in-memory state dict.

    The target is ordered as the official model orders its parameters, whatever the
    source order, so the same weights always give the same bytes.  `lenient` (repair) keeps what
    fits the architecture and leaves out a tensor the file lacks or has in another shape.
    """
    canonical, arch = recognise(state_dict, layout, lenient=lenient)
    ordered = {name: canonical.state_dict[name] for name, shape in canonical_shapes(arch).items()
               if name in canonical.state_dict and tuple(canonical.state_dict[name].shape) == shape}
    return Prepared(arch, canonical, to_target(ordered, prefix=prefix))


@dataclass
class Plan:
    """Everything decided about a conversion before the destination is touched."""

    source: Source
    container: Optional[str]
    arch: Architecture
    canonical: Canonical
    target: Target
    streamed: bool  # every written tensor is a handle: its bytes are pulled from the file when written


def plan(
    source: Source, fmt: str, *, ema: bool = False, prefix: str = BACKBONE_PREFIX, layout: Union[None, str, LayoutOption] = None,
    lenient: bool = False,
) -> Plan:
    """Select the weights, check every handle fits its storage, and map them to target names.

    One writer per format serves every plan: handles are written from where their bytes are
    (copied in the kernel where they are one run of the file), tensors and arrays in memory
    (the Python API, formats read whole) from memory.
    """
    state_dict, container = select_state_dict(source.objects, ema=ema)
    check_weight_types(state_dict)
    check_references(source.path, source.storages, state_dict)  # every tensor, dropped ones too: a broken file is refused whole
    arch, canonical, target = prepare(state_dict, prefix=prefix, layout=layout, lenient=lenient)
    check_output_bound(source, target.state_dict)
    streamed = all(isinstance(v, TensorRef) for v in target.state_dict.values())
    return Plan(source, container, arch, canonical, target, streamed)


def _leaf_bytes(value: Any) -> int:
    """Bytes a leaf takes when written out on its own (a handle, a torch tensor or a numpy array)."""
    if isinstance(value, TensorRef):
        return numel(value) * ITEM_SIZE[value.dtype]
    size = value.element_size() if hasattr(value, "element_size") else value.itemsize
    return numel(value) * int(size)


def check_output_bound(source: Source, target: Mapping[str, Any]) -> None:
    """Refuse to write more tensor data than the file holds (twice over, plus a slack: `allowance`).

    The reader charges a shared storage once, so a crafted file can name one storage under every
    backbone key; a `.pkl` writes each array out in full, so the output would be many times the
    file.  The bytes written, each tensor counted in full whatever it shares, must fit twice what
    the file holds (its size, or its storages' bytes where a deflated zip holds more) plus
    slack (`io.safe_pickle.allowance`): the reader's own budget.  An honest file's backbone shares nothing, so its kept
    tensors are at most its own bytes (twice, where a `.pkl` widens bfloat16 to float32).
    """
    held = max(os.path.getsize(source.path), sum(location_bytes(loc) for loc in source.storages.values()))
    wanted = sum(_leaf_bytes(v) for v in target.values())
    if wanted > allowance(held):
        raise UnreadableCheckpoint(
            f"{source.path}: the backbone's tensors would write {wanted} bytes from a file holding {held} "
            "(its weights are views of the same storage: crafted references).",
            "The file is corrupt or crafted; re-save the weights.",
        )


def convert(
    src: str,
    dst: str,
    *,
    ema: bool = False,
    prefix: str = BACKBONE_PREFIX,
    layout: Union[None, str, LayoutOption] = None,
    force: bool = False,
    progress: Optional[Callable[[int, int], None]] = None,
    strict: bool = False,
) -> ConversionReport:
    """Convert the ConvNeXt checkpoint at `src` into a Detectron2 file at `dst`.

    Args:
        src: any checkpoint file holding ConvNeXt weights (bare or in a container).
        dst: output path; `.pth`/`.pt` writes a torch file, `.pkl` a Detectron2 model-zoo pickle.
        ema: take the EMA weights (`model_ema`) of a training checkpoint.
        prefix: prepended to every name; `backbone.` matches Detectron2 meta-architectures.
        layout: skip recognition and read names as this layout (e.g. "official").
        force: overwrite an existing `dst`.
        progress: called with (bytes written, bytes in all) while a large file streams.
        strict: refuse weights holding NaN or Inf (otherwise they are reported in `non_finite`).

    Returns:
        A ConversionReport: what was kept, dropped and renamed, and what was written.

    Raises:
        ConversionError: any unusable input or destination (nothing is written).

    Example:
        >>> report = convert("convnext_tiny_22k_1k_224.pth", "convnext_tiny_d2.pth")  # doctest: +SKIP
        >>> report.kept, report.dropped  # doctest: +SKIP
        (178, ['head.bias', 'head.weight', 'norm.bias', 'norm.weight'])
    """
    fmt = output_format(dst)  # refuse a bad extension before reading a large file
    planned = plan(open_source(src), fmt, ema=ema, prefix=prefix, layout=layout)
    return _convert(planned, dst, fmt, prefix=prefix, force=force, progress=progress, strict=strict)


def _convert(
    planned: Plan, dst: str, fmt: str, *, prefix: str, force: bool, progress: Optional[Callable[[int, int], None]] = None, strict: bool = False
) -> ConversionReport:
    """Check the values, build the report, then write: everything that can fail about the input
    happens before the destination is written."""
    bad = _non_finite(planned, strict)
    if strict and bad:
        raise NonFiniteWeights(
            f"{len(bad)} tensor(s) hold NaN or Inf: {', '.join(bad[:5])}; nothing was written (--strict).",
            "Fix or re-export the checkpoint; without --strict it converts with a warning.",
        )
    report = _report(planned, dst, fmt, prefix)
    report.non_finite = bad
    report.bytes_written = _write(planned, dst, fmt, force=force, progress=progress)
    return report


def _non_finite(planned: Plan, strict: bool) -> Optional[List[str]]:
    """Target names holding NaN or Inf.  Handles' bytes are otherwise never read by Python, so they
    are checked only when asked (None: not checked); tensors in memory are always checked."""
    if planned.streamed and not strict:
        return None
    from .io.tensor_bytes import non_finite, writable

    tensors, model = writable(planned.source.path, planned.source.storages, planned.target.state_dict, gather=False)
    with tensors:
        return non_finite(tensors, model)


def _write(planned: Plan, dst: str, fmt: str, *, force: bool, progress: Optional[Callable[[int, int], None]]) -> int:
    """The one writer per format, for every source; returns the bytes written."""
    from .io.tensor_bytes import writable
    from .io.modelzoo_writer import write_pkl
    from .io.torch_writer import TORCH_SMALL_RECORDS, write_pth

    source = planned.source
    tensors, model = writable(source.path, source.storages, planned.target.state_dict, gather=fmt == "torch")
    if fmt == "torch":
        keep = sorted({ref.storage.key for ref in model.values()})
        # The small records are written anew, never copied: a source's are whatever its writer put there, and
        # torch's reader parses them (an alignment that is not a number fails torch.load of the output).
        return write_pth(dst, tensors, {"model": model, "__author__": AUTHOR}, keep, list(TORCH_SMALL_RECORDS),
                         force=force, source=source.path, progress=progress)
    return write_pkl(dst, tensors, model, AUTHOR, force=force, source=source.path, progress=progress)


def _report(planned: Plan, dst: str, fmt: str, prefix: str) -> ConversionReport:
    source, arch, canonical, target = planned.source, planned.arch, planned.canonical, planned.target
    dtypes = [tensor.dtype for tensor in target.state_dict.values()]
    drop_reasons = {canonical.source_names[c]: "classifier only (a detection backbone has no pooled norm or head)" for c in target.dropped}
    drop_reasons.update(canonical.dropped)
    return ConversionReport(
        source=os.path.abspath(source.path),
        destination=os.path.abspath(dst),
        layout=canonical.layout,
        container=planned.container,
        source_prefix=canonical.prefix,
        **arch.report_fields(),
        prefix=prefix,
        format=fmt,
        kept=len(target.state_dict),
        parameters=sum(numel(t) for t in target.state_dict.values()),
        dropped=sorted(drop_reasons),
        drop_reasons=drop_reasons,
        reshaped={prefix + c: fix for c, fix in canonical.reshaped.items()},
        # target name -> source name where the layout renamed: a prefix alone is not a rename
        renamed={t: canonical.source_names[c] for t, c in target.canonical_names.items() if canonical.source_names[c] != canonical.prefix + c},
        fresh=fresh_output_norms(arch, ALL_OUTPUTS, prefix),
        dtypes=dict(Counter(_dtype_name(_stored_dtype(d, fmt)) for d in dtypes)),
        stored_as={_dtype_name(d): _dtype_name(_stored_dtype(d, fmt)) for d in dtypes if _stored_dtype(d, fmt) != d},
        notes=_problems(planned),
        streamed=planned.streamed,
        detector_parts=dict(canonical.detector_parts),
        read_past=placeholders_in(source.objects),
    )


def _problems(planned: Plan) -> List[str]:
    """What Detectron2 would have made of the source as it was (names and containers only)."""
    return diagnose(planned.source.path, planned.source, planned.canonical, planned.arch)[1]


def _not_repaired(planned: Plan) -> List[str]:
    """Backbone weights a repaired file cannot give: the source lacks them, or has them in another shape."""
    expected = canonical_shapes(planned.arch)
    have = planned.canonical.state_dict
    out = []
    for name in sorted(set(expected) - set(CLASSIFIER_KEYS)):
        if name not in have:
            out.append(f"{BACKBONE_PREFIX}{name}: not in the file; Detectron2 leaves it as the backbone initialises it")
        elif tuple(have[name].shape) != expected[name]:
            out.append(f"{BACKBONE_PREFIX}{name}: shape {list(have[name].shape)} in the file, {list(expected[name])} "
                       "in the backbone; left out (Detectron2 would skip it)")
    return out


@dataclass
class RepairReport:
    """What `repair` found wrong with a Detectron2 file, and what it wrote."""

    source: str
    destination: str
    causes: List[str]  # empty: the file already loads cleanly, nothing was written
    conversion: Optional[ConversionReport] = None
    not_repaired: List[str] = field(default_factory=list)  # backbone weights no file made from this one can give

    @property
    def repaired(self) -> bool:
        return self.conversion is not None

    def to_dict(self) -> Dict[str, Any]:
        out = asdict(self)
        out["repaired"] = self.repaired
        return out


def repair(src: str, dst: str, *, force: bool = False) -> RepairReport:
    """Diagnose why Detectron2 cannot (or silently does not) load `src`, and write a fixed `dst`.

    Each documented failure (docs/troubleshooting.md) is named as a cause; the fix is a conversion, so the
    output has exact `backbone.` names, no classifier, and the format its extension names.  A file
    that already loads cleanly is reported fine and nothing is written.

    Raises:
        ConversionError: unusable input or destination (nothing is written).
    """
    fmt = output_format(dst)
    # Opened as `convert` opens it (a torch archive by its index, its records copied), so that repairing
    # a 3.4 GB XXLarge costs what converting it costs (~20 MB), not three times the file in memory.
    planned = plan(open_source(src), fmt, lenient=True)
    causes = _problems(planned)
    report = _convert(planned, dst, fmt, prefix=BACKBONE_PREFIX, force=force) if causes else None
    return RepairReport(os.path.abspath(src), os.path.abspath(dst), causes, report, _not_repaired(planned))
