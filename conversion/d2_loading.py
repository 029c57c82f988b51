"""Loading as Detectron2's train_net.py does, observed from outside: the one harness `verify`, the
demo, `conversion.testing` and the suite share.

train_net.py builds the model with `build_model(cfg)` and loads `MODEL.WEIGHTS` with
`DetectionCheckpointer(model).resume_or_load(path, resume=False)`; `load_observed` runs exactly that
and records what happened without changing the load.  The one place that wraps
`DetectionCheckpointer._load_model` and listens to the fvcore and detectron2 loggers (the same
`resume_or_load -> load -> _load_model` path on Detectron2 0.7 and v0.6).  Detectron2 is imported
on first use, so the test API's asserts and types import without it.
"""
from __future__ import annotations

import logging
import logging.handlers
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Set, Tuple

import torch
from torch import nn

from .architecture import Architecture
from .errors import describe_exception, plain_text
from .target import BACKBONE_PREFIX

if TYPE_CHECKING:
    from detectron2.config import CfgNode

# Where every Detectron2 meta-architecture keeps its backbone (so checkpoint names are `backbone.*`).
BACKBONE_ATTRIBUTE = BACKBONE_PREFIX.rstrip(".")
# The loggers DetectionCheckpointer and fvcore's Checkpointer report through.
CHECKPOINTER_LOGGERS = ("fvcore", "detectron2")


def import_modeling() -> None:
    """Import Detectron2's modeling package (its registries).  Detectron2 0.7 scripts helpers at
    import, which torch 2.x answers with a FutureWarning each, noise on a gate's console: silenced.

    Raises:
        ImportError: Detectron2 does not import here.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import detectron2.modeling  # noqa: F401


def registered_names() -> Set[str]:
    """Names in the registries a config can name: `backbone:NAME`, `meta_arch:NAME`."""
    import_modeling()
    from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY

    return {f"backbone:{name}" for name, _ in BACKBONE_REGISTRY} | {f"meta_arch:{name}" for name, _ in META_ARCH_REGISTRY}


def _d2() -> Any:
    """`conversion.d2`, imported on first use (importing it registers the backbone)."""
    import_modeling()
    from . import d2

    return d2


class BackboneHolder(nn.Module):
    """The smallest Detectron2-style model: the backbone at `.backbone`, so names are `backbone.*`
    as in every meta-architecture (GeneralizedRCNN, MaskFormer, MaskDINO, ...)."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone


def convnext_options(arch: Architecture) -> Dict[str, Any]:
    """`MODEL.CONVNEXT` values that shape this project's backbone like `arch`'s weights."""
    return {
        "DEPTHS": list(arch.depths),
        "DIMS": list(arch.dims),
        "USE_GRN": arch.version == 2,
        "LAYER_SCALE_INIT_VALUE": 1e-6 if arch.layer_scale else 0.0,
        # Only timm's XXLarge (OpenCLIP) exists at that size, and it was trained with eps 1e-5.
        "LN_EPS": 1e-5 if arch.variant == "convnext_xxlarge" else 1e-6,
    }


def config_for(config_file: Optional[str] = None, **convnext: object) -> "CfgNode":
    """A config for the backbone: the user's YAML (unknown keys allowed, as their project adds its
    own) or this project's backbone with `convnext` overrides (DEPTHS=..., DIMS=..., USE_GRN=...)."""
    d2 = _d2()
    from detectron2.config import get_cfg

    cfg = get_cfg()
    d2.add_convnext_config(cfg)
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
        cfg.MODEL.BACKBONE.NAME = d2.BACKBONE_NAME
        cfg.MODEL.BACKBONE.FREEZE_AT = 0
        for key, value in convnext.items():
            cfg.MODEL.CONVNEXT[key] = value
    return cfg


def names_a_backbone(config_file: str) -> bool:
    """Whether the YAML (with its `_BASE_` chain) sets `MODEL.BACKBONE.NAME`: without it Detectron2
    silently builds its default backbone (a ResNet), whatever the checkpoint holds."""
    from detectron2.config import CfgNode

    raw = CfgNode.load_yaml_with_base(config_file, allow_unsafe=True)
    model = raw.get("MODEL") if isinstance(raw, dict) else None
    backbone = model.get("BACKBONE") if isinstance(model, dict) else None
    return isinstance(backbone, dict) and "NAME" in backbone


def build_holder(cfg: "CfgNode") -> BackboneHolder:
    """Build the backbone `cfg.MODEL.BACKBONE.NAME` names, in eval mode, at `.backbone`."""
    _d2()
    from detectron2.modeling import build_backbone

    return BackboneHolder(build_backbone(cfg)).eval()


def backbone_for(arch: Architecture, **convnext: object) -> BackboneHolder:
    """This project's backbone shaped like `arch` (more `MODEL.CONVNEXT` overrides in `convnext`,
    e.g. OUT_FEATURES), at `.backbone`, in eval mode."""
    return build_holder(config_for(None, **{**convnext_options(arch), **convnext}))


def build_whole_model(cfg: "CfgNode") -> nn.Module:
    """`build_model(cfg)` as train_net.py calls it, but on the CPU (a CI runner has no GPU; where the
    weights go does not change which names load), in eval mode."""
    _d2()
    from detectron2.modeling import build_model

    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.DEVICE = "cpu"
    return build_model(cfg).eval()


def whole_model(build: Callable[[], nn.Module], name: str, verb: str = "building") -> Tuple[Optional[nn.Module], Optional[str]]:
    """(the model `build` makes, None), or (None, why not): it raised (a missing dataset, a compiled
    op, the user's bug) or holds no backbone module.  The caller then loads the backbone alone."""
    try:
        model = build()
    except Exception as err:
        return None, f"{verb} {name} failed ({describe_exception(err)})"
    if isinstance(getattr(model, BACKBONE_ATTRIBUTE, None), nn.Module):
        return model.eval(), None
    return None, f"{name} has no .{BACKBONE_ATTRIBUTE} module"


@dataclass
class LoadObservation:
    """What `DetectionCheckpointer.resume_or_load` did, seen from the outside."""

    checkpoint_shapes: Dict[str, Tuple[int, ...]] = field(default_factory=dict)  # of the dict read from the file
    checkpoint_dtypes: Dict[str, str] = field(default_factory=dict)
    heuristics: bool = False  # the file (or a `?matching_heuristics=True` path) asked for them
    # fvcore's (missing_keys, unexpected_keys, incorrect_shapes); None: no model state was loaded.
    incompatible: Any = None
    records: List[logging.LogRecord] = field(default_factory=list)  # of the fvcore/detectron2 loggers
    error: Optional[BaseException] = None  # what Detectron2 raised
    # model key -> the file's name of the tensor it received: what really loaded, read from the dict
    # fvcore hands to `model.load_state_dict` (after renames, `module.` stripping, the shape check).
    loaded_from: Dict[str, str] = field(default_factory=dict)

    @property
    def missing(self) -> List[str]:
        return list(self.incompatible.missing_keys) if self.incompatible is not None else []

    @property
    def unexpected(self) -> List[str]:
        return list(self.incompatible.unexpected_keys) if self.incompatible is not None else []

    @property
    def incorrect_shapes(self) -> List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]]:
        return list(self.incompatible.incorrect_shapes) if self.incompatible is not None else []

    def warnings(self) -> List[str]:
        """The messages logged at WARNING or above, without terminal colours."""
        return [plain_text(r.getMessage()) for r in self.records if r.levelno >= logging.WARNING]


@contextmanager
def capture_checkpointer_logs() -> Iterator[List[logging.LogRecord]]:
    """Collect every record of the fvcore and detectron2 loggers, at every level, and keep them off
    the console (the caller reports what happened); the loggers are restored afterwards."""
    handler = logging.handlers.BufferingHandler(capacity=sys.maxsize)  # never flushed: keeps every record
    loggers = [logging.getLogger(name) for name in CHECKPOINTER_LOGGERS]
    saved = [(lg.level, lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.DEBUG)
        lg.propagate = False
    try:
        yield handler.buffer
    finally:
        for lg, (level, propagate) in zip(loggers, saved):
            lg.removeHandler(handler)
            lg.setLevel(level)
            lg.propagate = propagate


def load_observed(model: nn.Module, path: str) -> LoadObservation:
    """Load `path` into `model` exactly as Detectron2's train_net.py does (`resume_or_load(path,
    resume=False)`), recording what happened; nothing about the load itself is changed.  Detectron2's
    own exceptions are findings: they are recorded in `error`, not raised."""
    from detectron2.checkpoint import DetectionCheckpointer

    seen = LoadObservation()
    checkpointer = DetectionCheckpointer(model)
    real_load_model = checkpointer._load_model
    real_to_tensors = checkpointer._convert_ndarray_to_tensor
    real_load_state_dict = model.load_state_dict
    file_name_of: Dict[int, str] = {}  # id of each tensor of the file's weights (once tensors) -> its name

    def to_tensors(state_dict: Dict[str, Any]) -> None:
        real_to_tensors(state_dict)
        if not file_name_of:  # the first call sees the file's own names (before any renaming)
            file_name_of.update({id(v): k for k, v in state_dict.items()})

    def load_state_dict(state_dict: Any, strict: bool = True) -> Any:
        model_state = model.state_dict()
        seen.loaded_from = {k: file_name_of.get(id(v), k) for k, v in state_dict.items()
                            if k in model_state and tuple(v.shape) == tuple(model_state[k].shape)}
        return real_load_state_dict(state_dict, strict=strict)

    def observe(checkpoint: Dict[str, Any]) -> Any:
        # Shapes are taken before Detectron2 renames anything (matching_heuristics rewrites the dict).
        for k, v in checkpoint.get("model", {}).items():
            if hasattr(v, "shape"):
                seen.checkpoint_shapes[k] = tuple(v.shape)
                seen.checkpoint_dtypes[k] = str(v.dtype).replace("torch.", "")
        seen.heuristics = bool(checkpoint.get("matching_heuristics", False))
        seen.incompatible = real_load_model(checkpoint)
        return seen.incompatible

    checkpointer._load_model = observe  # type: ignore[method-assign]
    checkpointer._convert_ndarray_to_tensor = to_tensors  # type: ignore[method-assign]
    model.load_state_dict = load_state_dict  # type: ignore[method-assign]
    with capture_checkpointer_logs() as records:
        try:
            checkpointer.resume_or_load(path, resume=False)
        except Exception as err:  # Detectron2's own failures are findings, reported by the caller
            seen.error = err
        finally:
            del model.load_state_dict  # the instance attribute: the class's method again
    seen.records = records
    return seen


def non_finite(model: nn.Module, names: List[str]) -> List[str]:
    """Which of `names` (state-dict keys) hold NaN or Inf after loading."""
    state = model.state_dict()
    return sorted(n for n in names if n in state and state[n].is_floating_point() and not _all_finite(state[n]))


def _all_finite(tensor: torch.Tensor) -> bool:
    """Whether every element is finite.  A NaN or Inf element makes a floating sum NaN or Inf, so a
    finite sum proves it in one reduction (torch's elementwise `isfinite(...).all()` is about 100x
    slower on CPU: 2 s for a ConvNeXt-Tiny); only a sum that is not finite (a non-finite element, or
    finite elements overflowing the dtype) is checked element by element."""
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())
