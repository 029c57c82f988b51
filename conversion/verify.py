"""`verify`: will training start from these weights?  Load the checkpoint training loads as its
train_net.py does and report every way it falls short, separating what matters from what does not.

The file is CKPT or the config's own weights (`training_weights`); the model is the one the config
builds on the CPU, else the backbone it names, alone (`yaml_config`, `lazy_config`; the report says
what the backbone alone could not check), else this project's backbone shaped like the checkpoint.
Problems (exit 1) would make training not start from the pretrained weights, or change something
silently; warnings (exit 0; 1 with `strict`) change nothing in training.  With a source checkpoint,
the backbone's features are also compared with the same backbone given the source's weights.
"""
from __future__ import annotations

import copy
import importlib.util
import os
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from . import d2_loading as d2l
from . import lazy_config as lazy
from . import training_weights as tw
from . import yaml_config
from .d2_prediction import FRESH_OUTPUT_NORM, misplaced
from .architecture import Architecture
from .containers import select_state_dict
from .errors import ConversionError, UnusableVerifyInput, describe_exception
from .heuristics import heuristic_assignment
from .imports import load_imports
from .layouts import Canonical, to_canonical
from .layouts import recognise
from .read import materialize, open_source
from .summaries import summarise_names
from .target import BACKBONE_PREFIX, to_target

# Features are compared in fp32 on CPU; both sides run the same modules, so any difference
# beyond round-off means different weights.  1e-4 of the output's scale leaves wide margin.
FEATURE_TOLERANCE = 1e-4
FEATURE_INPUT = (1, 3, 64, 64)  # divisible by the backbone's stride 32
LISTED = 8  # names spelled out in one report line; --json has them all
REPAIR_FIX = "convnext-d2 repair CKPT FIXED.pth (or convert the original checkpoint again)"


@dataclass
class VerifyReport:
    """Everything `verify` found (also its `--json` output).

    `problems` decide the exit status; `warnings` do too under `strict`.  `whole_model` says
    whether the load went into the model train_net.py builds (else `whole_model_reason` says why
    not, and the backbone alone was loaded).
    """

    checkpoint: str
    config: Optional[str]
    backbone: str
    strict: bool = False
    weights_from: Optional[str] = None  # "MODEL.WEIGHTS" / "train.init_checkpoint" when CKPT came from the config
    weights_warning: Optional[str] = None  # CKPT given, and not the file the config trains from
    meta_architecture: Optional[str] = None
    whole_model: bool = False
    whole_model_reason: Optional[str] = None
    load_attempted: bool = True  # False when the config names no backbone: nothing was built or loaded
    heuristics: bool = False
    loaded: int = 0  # backbone tensors that took a checkpoint value
    loaded_outside: int = 0  # tensors outside the backbone that did
    initialised_outside: int = 0  # tensors outside the backbone left as the model built them
    fresh: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    shape_skipped: List[str] = field(default_factory=list)
    renamed: Dict[str, str] = field(default_factory=dict)  # model key -> checkpoint key (heuristics)
    ambiguous: Dict[str, List[str]] = field(default_factory=dict)  # checkpoint key -> model keys
    outside_backbone: Dict[str, str] = field(default_factory=dict)  # model key -> checkpoint key (heuristics)
    misplaced: Dict[str, str] = field(default_factory=dict)  # backbone key -> the pooled classifier norm it took
    heuristic_shape_misses: Dict[str, str] = field(default_factory=dict)  # model key -> checkpoint key
    non_finite: List[str] = field(default_factory=list)
    dtype_changes: Dict[str, str] = field(default_factory=dict)  # "float16 -> float32": count as str
    log_warnings: List[str] = field(default_factory=list)
    error: Optional[str] = None
    feature_difference: Optional[float] = None
    problems: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    fix: Optional[str] = None

    @property
    def ok(self) -> bool:
        return not self.problems and not (self.strict and self.warnings)

    def to_dict(self) -> Dict[str, Any]:
        out = asdict(self)
        out["ok"] = self.ok
        return out


def _canonical_of(path: str) -> Canonical:
    """A checkpoint's weights in canonical names, read as `convert` reads them."""
    return to_canonical(select_state_dict(materialize(open_source(path)))[0])


def _architecture_of(path: str) -> Architecture:
    """The architecture of the checkpoint's weights (this project's backbone is shaped to fit it):
    recognised as `convert` recognises it, from the file's metadata only."""
    return recognise(select_state_dict(open_source(path).objects)[0], lenient=True)[1]


# ---------------------------------------------------------------- config and model


def _no_backbone_report(report: VerifyReport, cfg: Any) -> VerifyReport:
    """The config names no backbone: Detectron2 would build its default, so nothing is loaded."""
    default = cfg.MODEL.BACKBONE.NAME
    what = f"{default}, a ResNet-{cfg.MODEL.RESNETS.DEPTH}" if default == "build_resnet_backbone" else default
    report.backbone = default
    report.whole_model_reason = "the config names no backbone"
    report.load_attempted = False
    report.problems.append(
        f"MODEL.BACKBONE.NAME is not set in {report.config}: Detectron2 builds its default backbone "
        f"instead ({what}), into which no ConvNeXt weight loads"
    )
    report.fix = "set MODEL.BACKBONE.NAME to your ConvNeXt backbone's registered name (e.g. D2ConvNeXt, with --import)"
    return report


# ---------------------------------------------------------------- what the load did


def _in_backbone(key: str) -> bool:
    return key.startswith(BACKBONE_PREFIX)


def _classify_load(
    report: VerifyReport, inc: Any, model_shapes: Mapping[str, Tuple[int, ...]], loaded_from: Mapping[str, str]
) -> List[str]:
    """Fill the key lists from fvcore's incompatible keys, and the counts from what really loaded
    (`loaded_from`: model key -> the file's name of the tensor it received, observed after the
    heuristics' renames and fvcore's `module.` stripping); return the model keys that took a value."""
    report.shape_skipped = sorted(k for k, *_ in inc.incorrect_shapes)
    # fvcore drops shape-mismatched tensors before loading, so they reappear as missing: count them once.
    missing = {k for k in inc.missing_keys if k not in report.shape_skipped}
    report.fresh = sorted(k for k in missing if FRESH_OUTPUT_NORM.match(k))
    report.missing = sorted(k for k in missing if _in_backbone(k) and not FRESH_OUTPUT_NORM.match(k))
    report.unexpected = sorted(inc.unexpected_keys)
    # Not missing is not the same as loaded: Detectron2 forgives pixel_mean/std, and FrozenBatchNorm2d
    # fills absent running statistics itself; only a key handed a tensor of the file took a value.
    loaded = [k for k in model_shapes if k in loaded_from]
    report.loaded = sum(1 for k in loaded if _in_backbone(k))
    report.loaded_outside = len(loaded) - report.loaded
    report.initialised_outside = sum(1 for k in model_shapes if not _in_backbone(k)) - report.loaded_outside
    report.misplaced = {m: c for m, c in misplaced(loaded_from).items() if _in_backbone(m)}
    return loaded


Shapes = Mapping[str, Tuple[int, ...]]


def _heuristic_findings(report: VerifyReport, model_shapes: Shapes, ckpt: Shapes) -> None:
    """Detectron2's longest-suffix rule, computed ahead: what it renames, where it lands, what it skips."""
    assignment = heuristic_assignment(model_shapes, ckpt)
    report.renamed = assignment.renamed
    report.ambiguous = assignment.ambiguous
    # A suffix match outside the backbone puts an ImageNet tensor into a decoder module of equal shape.
    report.outside_backbone = {m: c for m, c in assignment.renamed.items() if not _in_backbone(m)}
    report.heuristic_shape_misses = {m: c for m, c in assignment.shape_skipped if not _in_backbone(m)}


def _dtype_changes(
    report: VerifyReport, source_of: Mapping[str, str], model_dtypes: Mapping[str, str], ckpt_dtypes: Mapping[str, str]
) -> None:
    for key, src in source_of.items():
        if src in ckpt_dtypes and ckpt_dtypes[src] != model_dtypes[key]:
            change = f"{ckpt_dtypes[src]} -> {model_dtypes[key]}"
            report.dtype_changes[change] = str(int(report.dtype_changes.get(change, "0")) + 1)


def _problems(report: VerifyReport, loaded_nothing: bool) -> List[str]:
    """Most telling first: what Detectron2 refuses, what it changes silently, what cannot fit, what stays random."""
    out = []
    for key, models in report.ambiguous.items():
        out.append(f"matching_heuristics: checkpoint key '{key}' matches {len(models)} model keys "
                   f"({summarise_names(models, 3)}); Detectron2 raises on it")
    if report.error is not None:
        out.append(f"Detectron2 cannot load it: {report.error}")
    if report.outside_backbone and not report.ambiguous and report.error is None:
        pairs = [f"'{c}' into {m}" for m, c in sorted(report.outside_backbone.items())]
        out.append(f"matching_heuristics loads {len(pairs)} checkpoint tensors into modules outside the backbone, "
                   f"silently replacing their initialisation: {summarise_names(pairs, 3)}")
    if report.shape_skipped:
        out.append(f"{len(report.shape_skipped)} tensors skipped for a shape mismatch (wrong variant?): "
                   f"{summarise_names(report.shape_skipped, 4)}")
    if report.missing:
        out.append(f"{len(report.missing)} backbone weights missing (they would train from random init): "
                   f"{summarise_names(report.missing, 4)}")
    if report.non_finite:
        out.append(f"{len(report.non_finite)} loaded weights hold NaN or Inf: {summarise_names(report.non_finite, 4)}")
    if report.misplaced:
        pairs = [f"'{c}' into {m}" for m, c in sorted(report.misplaced.items())]
        out.append(f"matching_heuristics gives {len(pairs)} backbone weight(s) the pooled classifier norm, a tensor "
                   f"of another module: {summarise_names(pairs, 3)}")
    if loaded_nothing:  # OK with no backbone weight loaded is impossible, whatever else was found
        why = "matching_heuristics matched nothing" if report.heuristics else "no name in the file is a backbone key"
        out.append(f"Detectron2 loads none of the backbone's weights ({why}; after its 'module.' stripping)")
    return out


def _warnings(report: VerifyReport) -> List[str]:
    """What training ignores: said, and fatal only under --strict."""
    out = []
    if report.unexpected:
        out.append(f"{len(report.unexpected)} checkpoint tensors unused by the model: "
                   f"{summarise_names(report.unexpected, LISTED)} (training ignores them; convnext-d2 repair CKPT FIXED.pth writes the file without them)")
    by_ckpt: Dict[str, List[str]] = {}
    for m, c in sorted(report.heuristic_shape_misses.items()):
        by_ckpt.setdefault(c, []).append(m)
    for c, models in by_ckpt.items():
        out.append(f"matching_heuristics: checkpoint key '{c}' suffix-matches {len(models)} model key(s) of another shape "
                   f"outside the backbone ({summarise_names(models, 3)}); Detectron2 skips each with a log warning")
    if report.heuristics and not report.whole_model:
        out.append(f"whole model not built: {report.whole_model_reason}; checkpoint keys that could match outside "
                   "the backbone were not checked (the file uses matching_heuristics)")
    return out


def _compare_with_source(backbone: torch.nn.Module, source: str, report: VerifyReport) -> None:
    target = to_target(_canonical_of(source).state_dict, prefix="").state_dict
    reference = copy.deepcopy(backbone)
    # A source of another architecture: said as a misfit (load_state_dict would raise on the first shape).
    shapes = {k: list(v.shape) for k, v in reference.state_dict().items()}
    misfits = [k for k, v in target.items() if k in shapes and list(v.shape) != shapes[k]]
    if misfits:
        first = misfits[0]
        report.problems.append(
            f"--source does not fit this backbone: {len(misfits)} tensors of another shape "
            f"(e.g. {first}: {list(target[first].shape)} in the source, {shapes[first]} in the backbone)."
        )
        return
    result = reference.load_state_dict(target, strict=False)
    stray = [k for k in result.missing_keys if not FRESH_OUTPUT_NORM.match(BACKBONE_PREFIX + k)]
    if stray or result.unexpected_keys:
        report.problems.append(
            f"--source does not fit this backbone: {len(stray)} missing, {len(result.unexpected_keys)} unused "
            f"(e.g. {(stray + result.unexpected_keys)[0]})."
        )
        return
    image = torch.randn(*FEATURE_INPUT, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = backbone.eval()(image), reference.eval()(image)
    worst = 0.0
    for name, tensor in theirs.items():
        scale = tensor.abs().max().clamp_min(1e-12)
        worst = max(worst, ((ours[name] - tensor).abs().max() / scale).item())
    report.feature_difference = worst
    if worst > FEATURE_TOLERANCE:
        report.problems.append(
            f"features differ from the source's: max relative difference {worst:.2e} > {FEATURE_TOLERANCE:.0e}."
        )


def _setup_yaml(checkpoint: Optional[str], config: Optional[str], overrides: Sequence[str], strict: bool) -> Tuple[VerifyReport, Any]:
    """The report and the model (None: the config names no backbone, nothing to load) for a YAML config or none."""
    if config:
        cfg = yaml_config.load(config, overrides)
        resolved = tw.resolve(checkpoint, config, "MODEL.WEIGHTS", cfg.MODEL.WEIGHTS)
    else:  # this project's backbone, shaped like the checkpoint: it is checked, then read, first
        resolved = tw.resolve(checkpoint, None, "", None)
        cfg = d2l.config_for(None, **d2l.convnext_options(_architecture_of(resolved[0].split("?", 1)[0])))
    report = _report(resolved, config, cfg.MODEL.BACKBONE.NAME, strict)
    if config and not d2l.names_a_backbone(config):
        return _no_backbone_report(report, cfg), None
    model, report.whole_model_reason = yaml_config.build(cfg, config)
    report.meta_architecture = cfg.MODEL.META_ARCHITECTURE if report.whole_model_reason is None else None
    return report, model


def _setup_lazy(checkpoint: Optional[str], config: str, overrides: Sequence[str], strict: bool) -> Tuple[VerifyReport, Any]:
    """The report and the model for a LazyConfig: its `model` instantiated on CPU, or its backbone alone."""
    cfg = lazy.load(config, overrides)
    resolved = tw.resolve(checkpoint, config, lazy.INIT_CHECKPOINT, lazy.init_checkpoint(cfg))
    backbone = lazy.target_name(cfg.model.backbone) if lazy.has_backbone_node(cfg) else "?"
    report = _report(resolved, config, backbone, strict)
    model, report.whole_model_reason = lazy.build(cfg, config)
    report.meta_architecture = lazy.target_name(cfg.model) if report.whole_model_reason is None else None
    return report, model


def _report(resolved: Tuple[str, Optional[str], Optional[str]], config: Optional[str], backbone: str, strict: bool) -> VerifyReport:
    path, weights_from, differs = resolved
    return VerifyReport(checkpoint=os.path.abspath(path), config=config, backbone=backbone, strict=strict,
                        weights_from=weights_from, weights_warning=differs)


def verify(
    checkpoint: Optional[str] = None,
    *,
    config: Optional[str] = None,
    imports: Sequence[str] = (),
    source: Optional[str] = None,
    strict: bool = False,
    overrides: Sequence[str] = (),
) -> VerifyReport:
    """Load the weights training loads, as its train_net.py would, and report problems and warnings
    (see the module docstring).

    Args:
        checkpoint: the Detectron2 file (a `?matching_heuristics=True` suffix is honoured, as Detectron2
            does); None: the config's own weights (`MODEL.WEIGHTS`, or a LazyConfig's
            `train.init_checkpoint`), resolved from the working directory as training resolves them.
        config: the training config: a YAML (its meta-architecture is built whole when registered) or
            a LazyConfig `.py` (its `model` instantiated on CPU; this runs the config's code).
        imports: modules to import first (they register the user's backbone and meta-architecture).
        source: the original checkpoint, to compare the backbone's features with.
        strict: warnings count as failures (`report.ok` is False when there are any).
        overrides: train_net-style overrides: `KEY VALUE` items for a YAML, `key=value` for a LazyConfig.

    Raises:
        ConversionError: unusable input (missing file, import or config failure), exit 2.
    """
    if importlib.util.find_spec("detectron2") is None:
        raise UnusableVerifyInput(
            f"verify loads the file with Detectron2's own checkpointer, and Detectron2 is not installed for {sys.executable}.",
            "Run verify in the environment you train in (convert, inspect and repair work without Detectron2).",
        )
    load_imports(imports)
    if config and lazy.is_lazy_config(config):
        report, model = _setup_lazy(checkpoint, config, overrides, strict)
    else:
        report, model = _setup_yaml(checkpoint, config, overrides, strict)
    if model is None:
        return report
    checkpoint = report.checkpoint  # resolved as training resolves it (a query suffix kept)
    report.whole_model = report.whole_model_reason is None
    state = model.state_dict()
    model_shapes = {k: tuple(v.shape) for k, v in state.items()}
    model_dtypes = {k: str(v.dtype).replace("torch.", "") for k, v in state.items()}
    seen = d2l.load_observed(model, checkpoint)
    report.heuristics = seen.heuristics
    if seen.heuristics and seen.checkpoint_shapes:
        _heuristic_findings(report, model_shapes, seen.checkpoint_shapes)
    if seen.error is not None:
        report.error = describe_exception(seen.error)
    if seen.incompatible is not None:
        loaded = _classify_load(report, seen.incompatible, model_shapes, seen.loaded_from)
        _dtype_changes(report, seen.loaded_from, model_dtypes, seen.checkpoint_dtypes)
        report.non_finite = d2l.non_finite(model, loaded)
    report.log_warnings = [w.splitlines()[0] for w in seen.warnings() if "not found in the checkpoint" not in w]
    report.problems = _problems(report, report.load_attempted and report.error is None and report.loaded == 0)
    report.warnings = ([report.weights_warning] if report.weights_warning else []) + _warnings(report)
    if source is not None and report.error is None and not report.problems:
        _compare_with_source(model.backbone, source, report)
    if report.problems:
        report.fix = REPAIR_FIX
    return report


def verify_all(
    arguments: Sequence[str],
    *,
    configs: Sequence[str] = (),
    imports: Sequence[str] = (),
    source: Optional[str] = None,
    strict: bool = False,
) -> List[Union[VerifyReport, ConversionError]]:
    """`verify` once per config (or once without one), as the CLI calls it: `arguments` are its
    positional items, the CKPT (optional) and train_net-style overrides (`KEY VALUE` pairs go to
    the YAML configs, `key=value` to the LazyConfigs).  An unusable config is its error, in order;
    the others are still verified.

    Raises:
        ConversionError: the arguments themselves are unusable (two CKPTs, an override no config takes).
    """
    checkpoint, yaml_overrides, lazy_overrides = tw.split_arguments(arguments)
    kinds = {lazy.is_lazy_config(c) for c in configs}
    for given, lazy_kind, example in ((yaml_overrides, False, "KEY VALUE"), (lazy_overrides, True, "key=value")):
        if given and lazy_kind not in kinds:
            wanted = "a LazyConfig .py" if lazy_kind else "a YAML"
            raise UnusableVerifyInput(f"override {given[0]} ({example}) needs {wanted} --config, and none was given.",
                                      "YAML configs take KEY VALUE overrides; LazyConfigs take key=value.")
    results: List[Union[VerifyReport, ConversionError]] = []
    for config in list(configs) or [None]:
        overrides = lazy_overrides if config and lazy.is_lazy_config(config) else yaml_overrides
        try:
            results.append(verify(checkpoint, config=config, imports=imports, source=source, strict=strict, overrides=overrides))
        except ConversionError as err:
            results.append(err)
    return results
