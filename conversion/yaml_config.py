"""YAML training configs (Detectron2's `train_net.py --config-file X.yaml`), read and built as
training reads and builds them.

`load` merges the user's YAML over Detectron2's defaults and this project's `MODEL.CONVNEXT`
(unknown keys allowed: projects add their own sections), then train_net-style `KEY VALUE`
overrides.  `build` makes the whole model `build_model(cfg)` makes, on the CPU, when the config's
meta-architecture is registered; otherwise (or when building it fails: a dataset lookup, a compiled
op, the user's bug) the backbone the config names, alone, and says why.
"""
from __future__ import annotations

import os
from typing import Any, Optional, Sequence, Tuple

from . import d2_loading as d2l
from .errors import UnusableVerifyInput, describe_exception
from .training_weights import apply_yaml_overrides

NO_CONFIG = "no --config given"


def load(config: str, overrides: Sequence[str] = ()) -> Any:
    """The config train_net.py would build from `config` with `overrides` applied.

    Raises:
        UnusableVerifyInput: no such file, not a usable YAML, or an override that does not apply.
    """
    if not os.path.isfile(config):
        raise UnusableVerifyInput(f"--config {config}: no such file.",
                                  "Pass the training config (a Detectron2 YAML or a LazyConfig .py).")
    try:
        cfg = d2l.config_for(config)
    except Exception as err:  # YAML syntax, not a mapping, a key of the wrong type: all unusable
        raise UnusableVerifyInput(
            f"--config {config}: not a usable Detectron2 YAML config ({describe_exception(err)}).",
            "Pass the YAML file train_net.py is given with --config-file (or a LazyConfig .py).",
        ) from None
    apply_yaml_overrides(cfg, config, overrides)
    return cfg


def _backbone_only(cfg: Any) -> Any:
    try:
        return d2l.build_holder(cfg)
    except Exception as err:  # the user's backbone code: nothing can be verified without it
        raise UnusableVerifyInput(
            f"backbone '{cfg.MODEL.BACKBONE.NAME}' cannot be built from this config ({describe_exception(err)}).",
            "Check MODEL.CONVNEXT (or your backbone's section) in the config.",
        ) from None


def build(cfg: Any, config: Optional[str]) -> Tuple[Any, Optional[str]]:
    """(model, None) for the whole model train_net.py builds, else (backbone holder, why not)."""
    from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY

    if cfg.MODEL.BACKBONE.NAME not in BACKBONE_REGISTRY:
        raise UnusableVerifyInput(
            f"backbone '{cfg.MODEL.BACKBONE.NAME}' is not registered in Detectron2's BACKBONE_REGISTRY.",
            "Pass --import MODULE for the module that registers it (e.g. your project's backbone module).",
        )
    if not config:
        return _backbone_only(cfg), NO_CONFIG
    meta = cfg.MODEL.META_ARCHITECTURE
    if meta not in META_ARCH_REGISTRY:
        why = f"MODEL.META_ARCHITECTURE '{meta}' is not registered (--import the module that registers it)"
    else:
        model, why = d2l.whole_model(lambda: d2l.build_whole_model(cfg), meta)
        if model is not None:
            return model, None
    return _backbone_only(cfg), why
