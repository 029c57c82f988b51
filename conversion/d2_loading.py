"""Loading as Detectron2's train_net.py does, observed from outside: the harness `verify`, the demo
and the tests share.

train_net.py builds the model with `build_model(cfg)` and loads `MODEL.WEIGHTS` with
`DetectionCheckpointer(model).resume_or_load(path, resume=False)`.  `load_observed` runs exactly
that and records what happened (the state dict Detectron2 read, fvcore's incompatible keys, every
log record, the exception if one was raised) without changing the load itself.  This is the one
place in the package that wraps `DetectionCheckpointer._load_model`.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Tuple

import torch
from detectron2.config import CfgNode
from detectron2.modeling import Backbone
from torch import nn

from .d2 import BACKBONE_NAME, add_convnext_config

# Every Detectron2 meta-architecture keeps its backbone here, so checkpoint names are `backbone.*`.
BACKBONE_ATTRIBUTE = "backbone"


class BackboneHolder(nn.Module):
    """The smallest Detectron2-style model: the backbone at `.backbone`, so names are `backbone.*`
    as in every meta-architecture (GeneralizedRCNN, MaskFormer, MaskDINO, ...)."""

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.backbone = backbone


def config_for(config_file: Optional[str] = None, **convnext: object) -> CfgNode:
    """A config for the backbone: the user's YAML (unknown keys allowed, as their project adds its
    own) or this project's backbone with `convnext` overrides (DEPTHS=..., DIMS=..., USE_GRN=...)."""
    from detectron2.config import get_cfg

    cfg = get_cfg()
    add_convnext_config(cfg)
    if config_file:
        cfg.set_new_allowed(True)  # DI-MaskDINO/MaskDINO YAMLs carry their own sections
        compat = logging.getLogger("detectron2.config.compat")
        was = compat.disabled
        compat.disabled = True  # "has no VERSION": true of most project YAMLs, and noise on a gate's console
        try:
            cfg.merge_from_file(config_file)
        finally:
            compat.disabled = was
    else:
        cfg.MODEL.BACKBONE.NAME = BACKBONE_NAME
        cfg.MODEL.BACKBONE.FREEZE_AT = 0
        for key, value in convnext.items():
            cfg.MODEL.CONVNEXT[key] = value
    return cfg


def names_a_backbone(config_file: str) -> bool:
    """Whether the YAML (with its `_BASE_` chain) sets `MODEL.BACKBONE.NAME`: without it Detectron2
    silently builds its default backbone (a ResNet), whatever the checkpoint holds."""
    raw = CfgNode.load_yaml_with_base(config_file, allow_unsafe=True)
    model = raw.get("MODEL") if isinstance(raw, dict) else None
    backbone = model.get("BACKBONE") if isinstance(model, dict) else None
    return isinstance(backbone, dict) and "NAME" in backbone


def build_holder(cfg: CfgNode) -> BackboneHolder:
    """Build the backbone `cfg.MODEL.BACKBONE.NAME` names, in eval mode, at `.backbone`."""
    from detectron2.modeling import build_backbone

    return BackboneHolder(build_backbone(cfg)).eval()


def build_whole_model(cfg: CfgNode) -> nn.Module:
    """`build_model(cfg)` as train_net.py calls it, but on the CPU (a CI runner has no GPU; where the
    weights go does not change which names load), in eval mode."""
    from detectron2.modeling import build_model

    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.DEVICE = "cpu"
    return build_model(cfg).eval()


class LoadObservation:
    """What `DetectionCheckpointer.resume_or_load` did, seen from the outside.

    Attributes:
        checkpoint_shapes / checkpoint_dtypes: of the state dict Detectron2 read from the file.
        heuristics: whether the file (or a `?matching_heuristics=True` path) asked for them.
        incompatible: fvcore's (missing_keys, unexpected_keys, incorrect_shapes).
        records: every record the fvcore/detectron2 loggers emitted.
        error: the exception Detectron2 raised, if any.
    """

    def __init__(self) -> None:
        self.checkpoint_shapes: Dict[str, Tuple[int, ...]] = {}
        self.checkpoint_dtypes: Dict[str, str] = {}
        self.heuristics = False
        self.incompatible: Any = None
        self.records: List[logging.LogRecord] = []
        self.error: Optional[BaseException] = None


class _Collect(logging.Handler):
    def __init__(self, into: List[logging.LogRecord]) -> None:
        super().__init__(level=logging.DEBUG)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append(record)


def load_observed(model: nn.Module, path: str) -> LoadObservation:
    """Load `path` into `model` exactly as Detectron2's train_net.py does (`resume_or_load(path,
    resume=False)`), recording what happened; nothing about the load itself is changed.  Detectron2's
    own exceptions are findings: they are recorded in `error`, not raised."""
    from detectron2.checkpoint import DetectionCheckpointer

    seen = LoadObservation()
    checkpointer = DetectionCheckpointer(model)
    real_load_model = checkpointer._load_model

    def observe(checkpoint: Dict[str, Any]) -> Any:
        # Shapes are taken before Detectron2 renames anything (matching_heuristics rewrites the dict).
        for k, v in checkpoint.get("model", {}).items():
            if hasattr(v, "shape"):
                seen.checkpoint_shapes[k] = tuple(v.shape)
                seen.checkpoint_dtypes[k] = str(v.dtype).replace("torch.", "")
        seen.heuristics = bool(checkpoint.get("matching_heuristics", False))
        seen.incompatible = real_load_model(checkpoint)
        return seen.incompatible

    handler = _Collect(seen.records)
    loggers = [logging.getLogger(n) for n in ("fvcore", "detectron2")]
    levels = [lg.level for lg in loggers]
    propagate = [lg.propagate for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.DEBUG)
        lg.propagate = False  # the report says what happened; keep the console clean
    checkpointer._load_model = observe  # type: ignore[method-assign]
    try:
        checkpointer.resume_or_load(path, resume=False)
    except Exception as err:  # Detectron2's own failures are findings, reported by the caller
        seen.error = err
    finally:
        for lg, level, prop in zip(loggers, levels, propagate):
            lg.removeHandler(handler)
            lg.setLevel(level)
            lg.propagate = prop
    return seen


def non_finite(model: nn.Module, names: List[str]) -> List[str]:
    """Which of `names` (state-dict keys) hold NaN or Inf after loading."""
    state = model.state_dict()
    return sorted(n for n in names if n in state and state[n].is_floating_point() and not bool(torch.isfinite(state[n]).all()))
