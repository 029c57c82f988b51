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
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from .architecture import Architecture, canonical_shapes, infer_architecture
from .diagnose import d2_problems
from .errors import NonFiniteWeights, NotConvNeXt
from .layouts import LAYOUTS, Canonical, classifier_names, source_name_of, to_canonical
from .containers import check_weight_types, select_state_dict
from .formats import AUTHOR, output_format
from .io.handles import TensorRef, is_contiguous, numel
from .read import Source, load_source, open_source, placeholders_in
from .target import ALL_OUTPUTS, DEFAULT_PREFIX, Target, fresh_output_norms, to_target

# Reading and writing tensors needs torch (~640 MB resident just to import); they are imported
# only on the paths that need them, so a streamed conversion runs without torch at all.


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
    dtype_changes: Dict[str, str] = field(default_factory=dict)  # e.g. bfloat16 -> float32 in .pkl
    bytes_written: int = 0
    notes: List[str] = field(default_factory=list)  # what Detectron2 would have made of the source as it was
    # Target names of tensors holding NaN or Inf; None when not checked (streamed .pth without strict).
    non_finite: Optional[List[str]] = None
    streamed: bool = False  # a torch archive converted without loading it (tensor bytes copied or written one at a time)
    # A detection / segmentation checkpoint's parts besides the backbone (neck., roi_head., sem_seg_head., ...):
    # top-level prefix -> tensor count, left out of the file.
    left_out: Dict[str, int] = field(default_factory=dict)
    # Objects of classes outside the allowlist, read past as inert placeholders: path in the file -> class.
    read_past: Dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def _dtype_name(dtype: Any) -> str:
    return str(dtype).replace("torch.", "")


def _stored_dtype(dtype: Any, fmt: str) -> Any:
    """The dtype written: as is, except bfloat16 in a .pkl (numpy has none), widened to float32."""
    if fmt == "pickle" and _dtype_name(dtype) == "bfloat16":
        return "float32"
    return dtype


def _parse_forced_layout(layout: Optional[str]) -> Tuple[Optional[str], Optional[int]]:
    """`--from` accepts a layout name, optionally pinned to a version: `official-v1`, `timm-v2`."""
    if layout is None:
        return None, None
    m = re.fullmatch(r"(.+)-v([12])", layout)
    return (m.group(1), int(m.group(2))) if m and m.group(1) in LAYOUTS else (layout, None)


def prepare(
    state_dict: Mapping[str, Any], *, prefix: str = DEFAULT_PREFIX, layout: Optional[str] = None
) -> Tuple[Architecture, Any, Any]:
    """Pure part of the pipeline: (architecture, canonical, target) for an in-memory state dict.

    The target is ordered as the official model orders its parameters, whatever the
    source order, so the same weights always give the same bytes.
    """
    name, version = _parse_forced_layout(layout)
    canonical = to_canonical(state_dict, forced=name)
    arch = infer_architecture({k: tuple(v.shape) for k, v in canonical.state_dict.items()}, source_name_of(canonical))
    if version is not None and arch.version != version:
        evidence = next((canonical.source_names[k] for k in canonical.state_dict if ".grn." in k), "no GRN tensors")
        raise NotConvNeXt(
            f"--from {layout}: the weights are ConvNeXt V{arch.version} (evidence: {evidence}), not V{version}.",
            f"Use --from {name}-v{arch.version}, or drop --from.",
        )
    ordered = {name: canonical.state_dict[name] for name in canonical_shapes(arch)}
    return arch, canonical, to_target(ordered, prefix=prefix)


@dataclass
class Plan:
    """Everything decided about a conversion before the destination is touched."""

    source: Source
    container: Optional[str]
    arch: Architecture
    canonical: Canonical
    target: Target
    copies_bytes: bool  # every written tensor is a stored zip record: the writer copies its bytes


def plan(source: Source, fmt: str, *, ema: bool = False, prefix: str = DEFAULT_PREFIX, layout: Optional[str] = None) -> Plan:
    """Select the weights, map them to target names and choose the writer, from the source's handles.

    The writer follows from the leaves: stored zip records (and, for `.pkl`, elements in storage
    order) are copied byte for byte; anything else (deflated records, numpy arrays among the
    weights, a shape fix of a non-contiguous tensor) is written buffered, from the same file read
    whole, so the output is what torch.save / pickle make of those tensors.
    """
    state_dict, container = select_state_dict(source.objects, ema=ema)
    check_weight_types(state_dict)
    if source.index is not None:
        if not (source.index.streamable and all(_is_view(v) for v in state_dict.values())):
            return _read_whole(source, fmt, ema=ema, prefix=prefix, layout=layout)
        from .io.torchzip import check_references

        check_references(source.index, state_dict)  # every tensor, dropped ones too: a broken archive is refused whole
    arch, canonical, target = prepare(state_dict, prefix=prefix, layout=layout)
    if source.index is not None:
        if all(_is_view(v) and (fmt == "torch" or is_contiguous(v)) for v in target.state_dict.values()):
            return Plan(source, container, arch, canonical, target, copies_bytes=True)
        return _read_whole(source, fmt, ema=ema, prefix=prefix, layout=layout)
    return Plan(source, container, arch, canonical, target, copies_bytes=False)


def _is_view(value: Any) -> bool:
    """A handle whose bytes are one strided view of a storage record (what a byte copy can write)."""
    return isinstance(value, TensorRef) and value.strided_shape is None


def _read_whole(source: Source, fmt: str, **options: Any) -> Plan:
    """The plan for handles no byte copy can write: the same file read whole, its tensors in memory."""
    return plan(load_source(source.path), fmt, **options)


def convert(
    src: str,
    dst: str,
    *,
    ema: bool = False,
    prefix: str = DEFAULT_PREFIX,
    layout: Optional[str] = None,
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
    """Target names holding NaN or Inf.  A byte copy never reads the bytes otherwise, so it checks
    only when asked (None: not checked); tensors in memory are always checked."""
    if planned.copies_bytes:
        from .stream import non_finite

        return non_finite(planned.source.index, planned.target.state_dict) if strict else None
    import torch

    return [k for k, t in _in_memory(planned.target.state_dict).items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def _in_memory(model: Mapping[str, Any]) -> Dict[str, Any]:
    """The weights as torch tensors (numpy arrays from a pickle converted), for the buffered writer."""
    import numpy as np
    import torch

    return {k: torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v for k, v in model.items()}


def _write(planned: Plan, dst: str, fmt: str, *, force: bool, progress: Optional[Callable[[int, int], None]]) -> int:
    """The one writer the handles call for; returns the bytes written."""
    src, model = planned.source.path, dict(planned.target.state_dict)
    if not planned.copies_bytes:
        from .write import write_checkpoint

        return write_checkpoint(dst, _in_memory(model), force=force, source=src)[1]
    from .stream import write_streamed, write_streamed_pickle

    index = planned.source.index
    if fmt == "torch":
        keep = sorted({ref.storage.key for ref in model.values()})
        return write_streamed(dst, index, {"model": model, "__author__": AUTHOR}, keep, force=force, source=src, progress=progress)
    return write_streamed_pickle(dst, index, model, AUTHOR, force=force, source=src, progress=progress)


def _report(planned: Plan, dst: str, fmt: str, prefix: str) -> ConversionReport:
    source, arch, canonical, target = planned.source, planned.arch, planned.canonical, planned.target
    dtypes: Dict[str, int] = {}
    changes: Dict[str, str] = {}
    for tensor in target.state_dict.values():
        written = _stored_dtype(tensor.dtype, fmt)
        dtypes[_dtype_name(written)] = dtypes.get(_dtype_name(written), 0) + 1
        if written != tensor.dtype:
            changes[_dtype_name(tensor.dtype)] = _dtype_name(written)
    renamed = {
        t: canonical.source_names[c]
        for t, c in target.renamed.items()
        if canonical.source_names[c] != canonical.prefix + c  # a prefix alone is not a rename
    }
    return ConversionReport(
        source=os.path.abspath(source.path),
        destination=os.path.abspath(dst),
        layout=canonical.layout,
        container=planned.container,
        source_prefix=canonical.prefix,
        variant=arch.variant,
        version=arch.version,
        depths=list(arch.depths),
        dims=list(arch.dims),
        num_classes=arch.num_classes,
        prefix=prefix,
        format=fmt,
        kept=len(target.state_dict),
        parameters=sum(numel(t) for t in target.state_dict.values()),
        dropped=sorted([canonical.source_names[c] for c in target.dropped] + list(canonical.dropped)),
        drop_reasons={
            **{canonical.source_names[c]: "classifier only (a detection backbone has no pooled norm or head)" for c in target.dropped},
            **canonical.dropped,
        },
        reshaped={prefix + c: fix for c, fix in canonical.reshaped.items()},
        renamed=renamed,
        fresh=fresh_output_norms(arch, ALL_OUTPUTS, prefix),
        dtypes=dtypes,
        dtype_changes=changes,
        bytes_written=0,
        notes=_problems(planned),
        streamed=planned.copies_bytes,
        left_out=dict(canonical.left_out),
        read_past=placeholders_in(source.objects),
    )


def _problems(planned: Plan) -> List[str]:
    """What Detectron2 would have made of the source as it was (names and containers only)."""
    source, canonical = planned.source, planned.canonical
    return d2_problems(source.path, source.format, source.objects, canonical.layout, canonical.prefix, classifier_names(canonical))


@dataclass
class RepairReport:
    """What `repair` found wrong with a Detectron2 file, and what it wrote."""

    source: str
    destination: str
    causes: List[str]  # empty: the file already loads cleanly, nothing was written
    conversion: Optional[ConversionReport] = None

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
    planned = plan(open_source(src), fmt)
    causes = _problems(planned)
    if not causes:
        return RepairReport(os.path.abspath(src), os.path.abspath(dst), [])
    report = _convert(planned, dst, fmt, prefix=DEFAULT_PREFIX, force=force)
    return RepairReport(os.path.abspath(src), os.path.abspath(dst), causes, report)
