"""LazyConfig `.py` training configs (detrex and Detectron2's new-style configs), read as training reads them.

detrex's `train_net.py` does `cfg = LazyConfig.load(path)`, applies `key=value` overrides, builds
`instantiate(cfg.model)` and loads `cfg.train.init_checkpoint` with `DetectionCheckpointer`.  The
same steps here, but on the CPU (every `device` under `cfg.model`) and in eval mode, which do not
change which names load.  Loading a LazyConfig runs the user's code, as training does: only ever
when `--config` names it (never found or guessed), and every failure is an `UnusableVerifyInput`.
"""
from __future__ import annotations

import ast
import os
from typing import Any, Optional, Sequence, Tuple

from torch import nn

from .errors import UnusableVerifyInput, describe_exception
from .training_weights import LAZY_OVERRIDE

LAZY_SUFFIX = ".py"
INIT_CHECKPOINT = "train.init_checkpoint"
_MISSING = object()


def is_lazy_config(path: str) -> bool:
    """A LazyConfig is a `.py` file (a YAML config is anything else)."""
    return path.endswith(LAZY_SUFFIX)


def _unusable(path: str, what: str, hint: str) -> UnusableVerifyInput:
    return UnusableVerifyInput(f"--config {path}: {what}", hint)


def load(path: str, overrides: Sequence[str] = ()) -> Any:
    """`LazyConfig.load(path)` with `overrides` applied; the user's code runs here.

    Raises:
        UnusableVerifyInput: the file does not load, has no `model`, or an override is unusable.
    """
    from detectron2.config import LazyConfig

    if not os.path.isfile(path):
        raise _unusable(path, "no such file.", "Pass the LazyConfig .py file train_net.py is given with --config-file.")
    try:
        cfg = LazyConfig.load(path)
    except SyntaxError as err:
        raise _unusable(path, f"a syntax error at line {err.lineno} ({err.msg}).",
                        "Fix the config; training could not load it either.") from None
    except (Exception, SystemExit) as err:  # the user's code raised (or imported a missing module, or exited)
        raise _unusable(path, f"loading it raised {describe_exception(err)}.",
                        "Fix the config or install what it imports; training could not load it either.") from None
    if "model" not in cfg:
        raise _unusable(path, "defines no `model`.",
                        "Pass the LazyConfig that defines the model train_net.py instantiates.")
    apply_overrides(cfg, path, overrides)
    return cfg


def _parse_value(text: str) -> Any:
    """A command-line value as detrex's overrides take it: a Python literal, else the text itself (a path)."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(cfg: Any, path: str, overrides: Sequence[str]) -> None:
    """Apply `key=value` overrides; a key the config does not have is refused (omegaconf would add it
    silently, and the override would then change nothing)."""
    from omegaconf import OmegaConf

    for override in overrides:
        key, _, text = override.partition("=")
        if not LAZY_OVERRIDE.match(override):
            raise _unusable(path, f"override '{override}' is not key=value.",
                            "Write overrides as train.init_checkpoint=path/to.pth.")
        if OmegaConf.select(cfg, key, default=_MISSING) is _MISSING:
            raise _unusable(path, f"override '{key}' names no key of this config.",
                            "Check the key's spelling against the config.")
        OmegaConf.update(cfg, key, _parse_value(text), merge=True)


def init_checkpoint(cfg: Any) -> Optional[str]:
    """`train.init_checkpoint`: the weights training loads (None or "" when the config sets none)."""
    from omegaconf import OmegaConf

    value = OmegaConf.select(cfg, INIT_CHECKPOINT, default=None)
    return None if value is None else str(value)


def on_cpu(node: Any) -> None:
    """Set every `device` under `node` (a config subtree) to `cpu`: detrex's models take one."""
    from omegaconf import DictConfig, ListConfig

    if isinstance(node, DictConfig):
        for key in list(node.keys()):
            if key == "device" and isinstance(node[key], str):
                node[key] = "cpu"
            else:
                on_cpu(node[key])
    elif isinstance(node, ListConfig):
        for item in node:
            on_cpu(item)


def target_name(node: Any) -> str:
    """What a config node instantiates (`DINO`, `ConvNeXt`), for the report."""
    target = node.get("_target_") if hasattr(node, "get") else None
    if target is None:
        return "?"
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def has_backbone_node(cfg: Any) -> bool:
    return hasattr(cfg.model, "get") and cfg.model.get("backbone") is not None


def build(cfg: Any, path: str) -> Tuple[nn.Module, Optional[str]]:
    """(the whole model, None), or (the backbone alone at `.backbone`, why the whole model was not built).

    Raises:
        UnusableVerifyInput: not even `cfg.model.backbone` can be built (or the config has none).
    """
    from detectron2.config import instantiate

    from .d2_loading import BackboneHolder, whole_model

    on_cpu(cfg.model)
    model, why = whole_model(lambda: instantiate(cfg.model), target_name(cfg.model), "instantiating")
    if model is not None:
        return model, None
    if not has_backbone_node(cfg):
        raise _unusable(path, f"{why}, and cfg.model has no backbone node to check alone.",
                        "Make cfg.model (or cfg.model.backbone) instantiable on CPU.")
    try:
        backbone = instantiate(cfg.model.backbone)
    except Exception as err:
        raise _unusable(path, f"{why}; cfg.model.backbone cannot be built either ({describe_exception(err)}).",
                        "Make cfg.model.backbone instantiable on CPU (nothing can be verified without it).") from None
    if not isinstance(backbone, nn.Module):
        raise _unusable(path, f"{why}; cfg.model.backbone builds a {type(backbone).__name__}, not a module.",
                        "Point cfg.model.backbone at the backbone's class.")
    return BackboneHolder(backbone).eval(), why

