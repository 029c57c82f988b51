"""`verify`: will training start from these weights?  Load a checkpoint into the backbone a
config names, exactly as Detectron2's train_net.py does, and report every way it falls short.

Only the fresh output norms (`backbone.norm{i}`, which no ImageNet file has) may be missing;
anything else missing, unused, shape-skipped, claimed twice by `matching_heuristics`, or raised
by Detectron2 is a problem (exit 1).  With a source checkpoint, the backbone's features are also
compared with the same backbone given the source's weights through the converter's mapping.
"""
from __future__ import annotations

import copy
import os
import re
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch

from .architecture import infer_architecture
from .errors import ConversionError
from .heuristics import heuristic_assignment
from .imports import load_imports
from .layouts import to_canonical
from .containers import select_state_dict
from .read import read_checkpoint
from .target import to_target

FRESH_OUTPUT_NORM = re.compile(r"^backbone\.norm\d+\.(weight|bias)$")
# Features are compared in fp32 on CPU; both sides run the same modules, so any difference
# beyond round-off means different weights.  1e-4 of the output's scale leaves wide margin.
FEATURE_TOLERANCE = 1e-4
FEATURE_INPUT = (1, 3, 64, 64)  # divisible by the backbone's stride 32


@dataclass
class VerifyReport:
    """Everything `verify` found (also its `--json` output)."""

    checkpoint: str
    config: Optional[str]
    backbone: str
    heuristics: bool = False
    loaded: int = 0
    fresh: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    shape_skipped: List[str] = field(default_factory=list)
    renamed: Dict[str, str] = field(default_factory=dict)  # model key -> checkpoint key (heuristics)
    ambiguous: Dict[str, List[str]] = field(default_factory=dict)
    dtype_changes: Dict[str, str] = field(default_factory=dict)  # "float16 -> float32": count as str
    warnings: List[str] = field(default_factory=list)
    error: Optional[str] = None
    feature_difference: Optional[float] = None
    problems: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> Dict[str, Any]:
        out = asdict(self)
        out["ok"] = self.ok
        return out


class UnusableVerifyInput(ConversionError):
    """A module to import, a config or a backbone name that cannot be used (exit 2)."""


def _short_error(err: BaseException) -> str:
    """One line: torch's long messages put the cause on a later line (the refused global)."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(err).splitlines() if line.strip()] or [""]
    cause = next((line for line in lines if "WeightsUnpickler" in line or "persistent id" in line), lines[0])
    return f"{type(err).__name__}: {cause[:240]}"


def _architecture_of(path: str) -> Dict[str, Any]:
    """MODEL.CONVNEXT overrides that make this project's backbone fit the checkpoint's weights."""
    loaded, _ = read_checkpoint(path)
    canonical = to_canonical(select_state_dict(loaded)[0])
    arch = infer_architecture({k: tuple(v.shape) for k, v in canonical.state_dict.items()})
    return {
        "DEPTHS": list(arch.depths),
        "DIMS": list(arch.dims),
        "USE_GRN": arch.version == 2,
        "LAYER_SCALE_INIT_VALUE": 1e-6 if arch.layer_scale else 0.0,
        # Only timm's XXLarge (OpenCLIP) exists at that size, and it was trained with eps 1e-5.
        "LN_EPS": 1e-5 if arch.variant == "convnext_xxlarge" else 1e-6,
    }


def _build(d2: Any, config: Optional[str], checkpoint: str) -> Any:
    try:
        cfg = d2.config_for(config) if config else d2.config_for(None, **_architecture_of(checkpoint.split("?", 1)[0]))
    except ConversionError:
        raise
    except Exception as err:
        raise UnusableVerifyInput(f"--config {config}: cannot read it ({_short_error(err)}).", "Check the YAML.") from None
    try:
        return cfg, d2.build_holder(cfg)
    except KeyError as err:
        raise UnusableVerifyInput(
            f"backbone '{cfg.MODEL.BACKBONE.NAME}' is not registered ({err}).",
            "Pass --import MODULE for the module that registers it (e.g. your project's backbone module).",
        ) from None


def _compare_with_source(holder: Any, source: str, report: VerifyReport) -> None:
    loaded, _ = read_checkpoint(source)
    canonical = to_canonical(select_state_dict(loaded)[0])
    target = to_target(canonical.state_dict, prefix="").state_dict
    reference = copy.deepcopy(holder.backbone)
    result = reference.load_state_dict(target, strict=False)
    stray = [k for k in result.missing_keys if not FRESH_OUTPUT_NORM.match("backbone." + k)]
    if stray or result.unexpected_keys:
        report.problems.append(
            f"--source does not fit this backbone: {len(stray)} missing, {len(result.unexpected_keys)} unused "
            f"(e.g. {(stray + result.unexpected_keys)[0]})."
        )
        return
    image = torch.randn(*FEATURE_INPUT, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = holder.backbone(image), reference(image)
    worst = 0.0
    for name, tensor in theirs.items():
        scale = tensor.abs().max().clamp_min(1e-12)
        worst = max(worst, ((ours[name] - tensor).abs().max() / scale).item())
    report.feature_difference = worst
    if worst > FEATURE_TOLERANCE:
        report.problems.append(
            f"features differ from the source's: max relative difference {worst:.2e} > {FEATURE_TOLERANCE:.0e}."
        )


def verify(
    checkpoint: str,
    *,
    config: Optional[str] = None,
    imports: Sequence[str] = (),
    source: Optional[str] = None,
) -> VerifyReport:
    """Load `checkpoint` as train_net.py would and list every problem (see the module docstring).

    Raises:
        ConversionError: unusable input (missing file, import or config failure), exit 2.
    """
    if not os.path.isfile(checkpoint.split("?", 1)[0]):
        raise UnusableVerifyInput(f"{checkpoint}: no such file.", "Check the path.")
    load_imports(imports)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # detectron2 0.7 scripts helpers at import
        from . import d2
    cfg, holder = _build(d2, config, checkpoint)
    model_shapes = {k: tuple(v.shape) for k, v in holder.state_dict().items()}
    model_dtypes = {k: str(v.dtype).replace("torch.", "") for k, v in holder.state_dict().items()}
    seen = d2.load_observed(holder, checkpoint)
    report = VerifyReport(
        checkpoint=os.path.abspath(checkpoint), config=config, backbone=cfg.MODEL.BACKBONE.NAME, heuristics=seen.heuristics
    )
    if seen.heuristics and seen.checkpoint_shapes:
        assignment = heuristic_assignment(model_shapes, seen.checkpoint_shapes)
        report.renamed = assignment.renamed
        report.ambiguous = assignment.ambiguous
    if seen.error is not None:
        report.error = _short_error(seen.error)
        report.problems.append(f"Detectron2 cannot load it: {report.error}")
    if seen.incompatible is not None:
        inc = seen.incompatible
        report.shape_skipped = sorted(k for k, *_ in inc.incorrect_shapes)
        # fvcore drops shape-mismatched tensors before loading, so they reappear as missing: count them once.
        missing = [k for k in inc.missing_keys if k not in report.shape_skipped]
        report.fresh = sorted(k for k in missing if FRESH_OUTPUT_NORM.match(k))
        report.missing = sorted(k for k in missing if not FRESH_OUTPUT_NORM.match(k))
        report.unexpected = sorted(inc.unexpected_keys)
        report.loaded = len(model_shapes) - len(missing) - len(report.shape_skipped)
        names = {v: k for k, v in report.renamed.items()} if report.renamed else {}
        for key in model_shapes:
            src = names.get(key, key)
            if key not in inc.missing_keys and src in seen.checkpoint_dtypes and seen.checkpoint_dtypes[src] != model_dtypes[key]:
                change = f"{seen.checkpoint_dtypes[src]} -> {model_dtypes[key]}"
                report.dtype_changes[change] = str(int(report.dtype_changes.get(change, "0")) + 1)
    report.warnings = [
        r.getMessage().splitlines()[0] for r in seen.records if r.levelno >= 30 and "not found in the checkpoint" not in r.getMessage()
    ]
    # Most telling first: what cannot fit, then what stays random, then what is left over.
    if report.shape_skipped:
        report.problems.append(f"{len(report.shape_skipped)} tensors skipped for a shape mismatch (wrong variant?): {', '.join(report.shape_skipped[:4])}")
    if report.missing:
        report.problems.append(f"{len(report.missing)} backbone weights missing (they would train from random init): {', '.join(report.missing[:4])}")
    if report.unexpected:
        report.problems.append(f"{len(report.unexpected)} checkpoint tensors unused by the model: {', '.join(report.unexpected[:4])}")
    if report.ambiguous:
        key, models = next(iter(report.ambiguous.items()))
        report.problems.append(f"matching_heuristics: checkpoint key '{key}' matches {len(models)} model keys ({', '.join(models[:3])})")
    if seen.heuristics and report.error is None and report.loaded == 0:
        report.problems.append("matching_heuristics matched nothing")
    if source is not None and report.error is None and not report.problems:
        _compare_with_source(holder, source, report)
    return report
