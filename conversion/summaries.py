"""The human summaries of the reports: what the CLI prints without `--json`, and the message of a
failing `conversion.testing.assert_loads_clean`.  Pure functions of a report; nothing here reads,
writes or prints.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List

from .d2_prediction import FRESH_OUTPUT_NORM

if TYPE_CHECKING:
    from .inspection import InspectReport
    from .pipeline import ConversionReport, RepairReport


def human_size(n: float) -> str:
    """Bytes in decimal units, as a file manager shows them (`168.2 MB`)."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def summarise_names(names: List[str], limit: int = 6) -> str:
    """The first `limit` names, then how many more (a report line stays one line; --json has them all)."""
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _by_part(counts: Dict[str, int]) -> str:
    """`neck. x8, roi_head. x4`: a detector's parts (top-level prefixes) and their tensor counts."""
    return ", ".join(f"{part} x{count}" for part, count in counts.items())


def format_report(r: "ConversionReport") -> str:
    """`convert`'s summary: what was kept, dropped, renamed, reshaped and written."""
    name = r.variant or "custom variant"
    lines = [
        f"converted {r.source}",
        f"  layout     {r.layout}" + (f" (container '{r.container}')" if r.container else " (bare state dict)")
        + (f", source prefix '{r.source_prefix}' removed" if r.source_prefix else ""),
        f"  variant    {name}, ConvNeXt V{r.version}, depths {r.depths}, dims {r.dims}",
        f"  kept       {r.kept} tensors, {r.parameters / 1e6:.2f} M parameters, names prefixed '{r.prefix}'",
    ]
    if r.dropped:
        reasons: Dict[str, List[str]] = {}
        for key in r.dropped:
            reasons.setdefault(r.drop_reasons.get(key, "left out"), []).append(key)
        for reason, keys in reasons.items():
            lines.append(f"  dropped    {len(keys)} tensors, {reason}: {summarise_names(keys)}")
    if r.detector_parts:
        lines.append(f"  left out   {sum(r.detector_parts.values())} tensors of the detector around the backbone: {_by_part(r.detector_parts)}")
    if r.read_past:
        classes = sorted(set(r.read_past.values()))
        lines.append(f"  read past  {len(r.read_past)} non-weight objects, not built (nothing imported or run): {summarise_names(classes)}")
    if r.renamed:
        lines.append(f"  renamed    {len(r.renamed)} tensors from {r.layout} names to official names")
    fixes = sorted(set(r.reshaped.values()))
    if fixes:
        lines.append(f"  reshaped   {len(r.reshaped)} tensors ({'; '.join(fixes)}), values unchanged")
    for old, new in r.stored_as.items():
        lines.append(f"  dtype      {old} stored as {new} (numpy has no {old}; exact)")
    if r.fresh:
        modules = sorted({key.rsplit(".", 1)[0] for key in r.fresh})
        lines.append(f"  fresh      {len(r.fresh)} output-norm tensors not in any ImageNet file, "
                     f"initialised by the backbone: {', '.join(modules)}")
    fmt = "torch file" if r.format == "torch" else "Detectron2 model-zoo pickle"
    lines.append(f"  wrote      {r.destination} ({human_size(r.bytes_written)}, {fmt})")
    if r.non_finite is None:
        lines.append("  finite     not checked: streamed conversion (--strict reads every tensor and checks it)")
    elif r.non_finite:
        lines.append(f"  finite     NO: {len(r.non_finite)} tensors hold NaN or Inf: {summarise_names(r.non_finite, 4)}")
    lines += [f"  note       the source as given: {note}" for note in r.notes]
    return "\n".join(lines)


def format_inspection(r: "InspectReport") -> str:
    """`inspect`'s summary: what the file holds and what Detectron2 would make of it as it is."""
    where = f"under '{r.container}'" if r.container else "bare state dict"
    lines = [
        f"{r.path}",
        f"  file       {human_size(r.file_bytes)}, {r.format}; weights {where}"
        + (f"; top-level keys {', '.join(r.container_keys)}" if r.container_keys else "")
        + ("; has EMA weights (--ema)" if r.has_ema else ""),
        f"  layout     {r.layout}: {r.layout_description}" + (f"; prefix '{r.source_prefix}'" if r.source_prefix else ""),
        f"  variant    {r.variant or 'custom variant'}, ConvNeXt V{r.version}, depths {r.depths}, dims {r.dims}"
        + (f", classifier {r.num_classes} classes" if r.num_classes else ", no classifier"),
        f"  tensors    {r.tensors} ({r.parameters / 1e6:.2f} M parameters); dtypes "
        + ", ".join(f"{k} x{v}" for k, v in sorted(r.dtypes.items())),
    ]
    if r.reshaped:
        lines.append(f"  reshaped   {len(r.reshaped)} tensors on conversion ({'; '.join(sorted(set(r.reshaped.values())))})")
    if r.drop_reasons:
        lines.append(f"  left out   {len(r.drop_reasons)} tensors on conversion: {summarise_names(sorted(r.drop_reasons))}")
    if r.detector_parts:
        total = sum(r.detector_parts.values())
        lines.append(f"  detector   {total} tensors around the backbone, left out on conversion: {_by_part(r.detector_parts)}")
    lines += _prediction_lines(r.detectron2)
    if r.problems:
        lines.append("  Detectron2 loading this file as it is:")
        lines += [f"    - {p}" for p in r.problems]
        lines.append("  fix: convnext-d2 repair SRC DST.pth")
    elif r.detectron2.get("loaded"):  # never "no problem" for a file nothing loads from
        lines.append("  Detectron2 loading this file as it is: no problem found")
    return "\n".join(lines)


def _prediction_lines(p: Dict[str, Any]) -> List[str]:
    """What Detectron2 does with the file (inspect's `detectron2` data), in words."""
    if not p:
        return []
    if p["raises"] is not None:
        outcome = f"raises: {p['raises']}"
    else:
        fresh = sum(1 for k in p["missing"] if FRESH_OUTPUT_NORM.match(k))
        total = len(p["loaded"]) + len(p["missing"]) - fresh
        how = {None: "exact names", "file": "matching_heuristics from the file", "url": "matching_heuristics from the URL",
               "caffe2": "Caffe2 renames and matching_heuristics", "pycls": "pycls .pyth, matching_heuristics"}[p["heuristics"]]
        outcome = (f"loads {len(p['loaded'])} of {total} backbone weights, {fresh} output norms fresh ({how}"
                   + ("; 'module.' stripped" if p["module_stripped"] else "")
                   + f"); {len(p['shape_skipped'])} shape-skipped, {len(p['unused'])} unused")
    lines = [f"  detectron2 {p['stack']}: {p['reader']}{'; ' if p['reader'] else ''}{outcome}"]
    lines += [f"             on {stack}: {other}" for stack, other in sorted(p["other_stacks"].items())]
    return lines


def format_repair(r: "RepairReport") -> str:
    """`repair`'s summary: the causes found, then the conversion that fixed them."""
    if not r.repaired:
        return (f"{r.source}\n  fine: Detectron2 loads every backbone weight of it as it is; nothing to repair, "
                f"{r.destination} not written\n  (names, containers and shapes only: `verify` also checks the values for NaN/Inf)")
    lines = [f"{r.source}", f"  {len(r.causes)} cause(s) found:"]
    lines += [f"    - {cause}" for cause in r.causes]
    assert r.conversion is not None
    lines.append("  repaired by converting:")
    lines += ["  " + line for line in format_report(r.conversion).splitlines()[1:] if "note " not in line]
    if r.not_repaired:
        lines.append(f"  not repairable ({len(r.not_repaired)}): no file made from this one holds them")
        lines += [f"    - {why}" for why in r.not_repaired]
    return "\n".join(lines)


def _verdict(r: Any) -> str:
    """The first line: what a CI log shows."""
    if r.problems:
        return f"verify: FAIL: {r.problems[0]}"
    if r.warnings and r.strict:
        return f"verify: FAIL: --strict: {r.warnings[0]}"
    return f"verify: OK with warnings ({len(r.warnings)})" if r.warnings else "verify: OK"


def format_verification(r: Any) -> str:
    """The human report of `verify`: the verdict line, then what was loaded into what."""
    source = f" from {r.config}" if r.config else " (this project's, shaped like the checkpoint)"
    whence = f" (the config's {r.weights_from})" if r.weights_from else ""
    lines = [_verdict(r), f"  checkpoint {r.checkpoint}{whence}", f"  backbone   {r.backbone}{source}"]
    if not r.load_attempted:
        lines.append(f"  model      not built, nothing loaded: {r.whole_model_reason}")
    elif r.whole_model:
        lines.append(f"  model      {r.meta_architecture}, built whole on CPU as train_net.py builds it")
    else:
        lines.append(f"  model      backbone only: whole model not built: {r.whole_model_reason}; "
                     "checkpoint keys that could match outside the backbone were not checked")
    if r.error is None and r.load_attempted:
        how = " (names matched by matching_heuristics)" if r.heuristics else " (exact names)"
        lines.append(f"  loaded     {r.loaded} backbone tensors{how}")
        modules = sorted({name.rsplit(".", 1)[0] for name in r.fresh})  # the built model's own norms
        named = f": {', '.join(modules)}" if modules else ""
        lines.append(f"  fresh      {len(r.fresh)} output-norm tensors initialised by the backbone (expected){named}")
        lines.append(f"  missing    {len(r.missing)}; unused {len(r.unexpected)}; shape-skipped {len(r.shape_skipped)}")
        if r.whole_model:
            lines.append(f"  outside    {r.loaded_outside} tensors loaded outside the backbone; "
                         f"{r.initialised_outside} keep the model's initialisation")
    if r.renamed:
        lines.append(f"  renamed    {len(r.renamed)} by matching_heuristics")
    for change, count in r.dtype_changes.items():
        lines.append(f"  dtype      {count} tensors cast {change} on load")
    if r.feature_difference is not None:
        lines.append(f"  features   max relative difference to --source {r.feature_difference:.1e}")
    shown = 1 if r.problems else 0
    lines += [f"  problem    {p}" for p in r.problems[shown:]]
    shown = 1 if not r.problems and r.strict else 0
    lines += [f"  warning    {w}" for w in r.warnings[shown:]]
    if r.fix and not r.ok:
        lines.append(f"  fix        {r.fix}")
    return "\n".join(lines)
