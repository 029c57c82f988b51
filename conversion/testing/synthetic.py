"""Synthetic checkpoints in a library's real layout: the builders this project's suite uses, public.

Values are random but deterministic by seed (`conversion.synthetic.random_state_dict`); names and
shapes come from the layout tables' inverse (`conversion.layouts.from_canonical`), so every layout
the converter reads can be written, and a layout added to the tables is available here at once.
"""
from __future__ import annotations

import argparse
import io
import os
import pickle
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch

from ..architecture import CLASSIFIER_KEYS, RELEASED_VARIANTS, Architecture
from ..errors import NotConvNeXt
from ..layouts import LAYOUTS, from_canonical
from ..synthetic import random_state_dict
from ..target import BACKBONE_PREFIX, to_target
from ..write import PICKLE_PROTOCOL, encode, stored_dtype

# "detectron2": what `convnext-d2 convert` writes (backbone names behind `backbone.`, classifier dropped).
DETECTRON2 = "detectron2"
CONTAINERS = ("bare", "model", "state_dict", "training")


def synthetic_layouts() -> Tuple[str, ...]:
    """Every layout `write_synthetic_checkpoint` writes: the converter's tables, then `detectron2`.
    (A function, so that a layout added to the tables is listed without a list of its own here.)"""
    return tuple(LAYOUTS) + (DETECTRON2,)


def resolve_architecture(variant: Union[str, Architecture], version: int = 1, num_classes: Optional[int] = 1000) -> Architecture:
    """A released variant by name (`convnext_tiny`; with version 2 or a `convnextv2_` name, ConvNeXt V2),
    or an `Architecture` as it is.  `num_classes=None` leaves out the classifier (`head`, pooled `norm`)."""
    if isinstance(variant, Architecture):
        return variant
    if variant.startswith("convnextv2_"):
        version = 2
    elif version == 2 and variant.startswith("convnext_"):
        variant = "convnextv2_" + variant[len("convnext_"):]
    table = RELEASED_VARIANTS.get(version)
    if table is None or variant not in table:
        known = ", ".join(sorted(table or {}))
        raise ValueError(f"unknown ConvNeXt V{version} variant {variant!r}; known: {known} (or pass an Architecture)")
    depths, dims = table[variant]
    with_classifier = num_classes is not None
    return Architecture(depths, dims, version=version, layer_scale=version == 1,
                        num_classes=num_classes, classifier_norm=with_classifier)


def synthetic_state_dict(
    layout: str = "official",
    variant: Union[str, Architecture] = "convnext_tiny",
    version: int = 1,
    dtype: torch.dtype = torch.float32,
    *,
    seed: int = 0,
    num_classes: Optional[int] = 1000,
    prefix: Optional[str] = None,
) -> Dict[str, torch.Tensor]:
    """The state dict a `layout` file of `variant` holds (random values), behind `prefix`.

    `prefix` defaults to the layout's only prefix where it has one (OpenCLIP's `visual.trunk.`),
    else none; `detectron2` means the converter's output names (default prefix `backbone.`).
    """
    arch = resolve_architecture(variant, version, num_classes)
    canonical = random_state_dict(arch, seed=seed, dtype=dtype)
    if layout == DETECTRON2:
        return dict(to_target(canonical, prefix=BACKBONE_PREFIX if prefix is None else prefix).state_dict)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; known: {', '.join(synthetic_layouts())}")
    return in_layout(canonical, layout, prefix)


def in_layout(canonical: Mapping[str, torch.Tensor], layout: str, prefix: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """Canonical weights in `layout`'s names behind `prefix` (default: the layout's only prefix, if any).

    Raises:
        ValueError: the layout cannot express these weights (e.g. torchvision has no ConvNeXt V2).
    """
    rules = LAYOUTS[layout]
    if prefix is None:
        prefix = rules.prefixes[0] if rules.prefixes else ""
    canonical = _final_norm_as_output_norm(canonical, rules)
    # A library without a classifier (timm features_only) has no name for `head`/`norm`: its files lack them.
    nameless = [k for k in CLASSIFIER_KEYS if k in canonical and not _has_name(rules, k)]
    try:
        return from_canonical({k: v for k, v in canonical.items() if k not in nameless}, layout, prefix)
    except NotConvNeXt as err:
        raise ValueError(f"these weights cannot be written in the {layout} layout: {err.message}") from None


def _has_name(rules: Any, canonical_key: str) -> bool:
    return rules.rename(canonical_key, inverse=True) is not None or rules.rename(canonical_key, inverse=True, outside=True) is not None


def _final_norm_as_output_norm(canonical: Mapping[str, torch.Tensor], rules: Any) -> Dict[str, torch.Tensor]:
    """Where a library's final `norm` is res5's trained output norm (the tables name `norm3` but not
    the pooled `norm`: DINOv3), the generated final norm is written as that: same shape, same values."""
    if "norm.weight" not in canonical or "norm3.weight" in canonical:
        return dict(canonical)
    if _has_name(rules, "norm.weight") or not _has_name(rules, "norm3.weight"):
        return dict(canonical)
    return {("norm3." + k[len("norm."):] if k.startswith("norm.") else k): v for k, v in canonical.items()}


def wrap(state_dict: Mapping[str, Any], container: str, wrapper_prefix: str = "", ema: Optional[Mapping[str, Any]] = None) -> Any:
    """Put a state dict into a checkpoint container the way training code does.

    `bare` (the dict itself), `model` / `state_dict` (under that key), or `training`: a training
    checkpoint with `model`, `model_ema`, optimizer state, epoch, AMP scaler and the argparse
    namespace the official training script saves.  `wrapper_prefix` is DDP's `module.` etc.
    """
    sd = {wrapper_prefix + k: v for k, v in state_dict.items()}
    if container == "bare":
        return sd
    if container in ("model", "state_dict"):
        return {container: sd}
    if container == "training":
        return {
            "model": sd,
            "model_ema": {wrapper_prefix + k: v for k, v in (ema or state_dict).items()},
            # A frozen parameter's momentum is an empty tensor: zero-element tensors are read past too.
            "optimizer": {"state": {1: {"momentum_buffer": torch.zeros(0)}}, "param_groups": [{"lr": 4e-3, "params": [0, 1]}]},
            "epoch": 299,
            "scaler": {"scale": 65536.0},
            "args": argparse.Namespace(model="convnext_tiny", lr=4e-3, drop_path=0.1, input_size=224),
        }
    raise ValueError(f"unknown container {container!r}; known: {', '.join(CONTAINERS)}")


def _as_numpy(value: Any, converted: Optional[Dict[int, Any]] = None) -> Any:
    """Tensors as numpy arrays; one tensor under two names (a training checkpoint's `model_ema`
    without an EMA of its own, tied weights) becomes one array, which pickle writes once and
    names twice, as numpy users' files do."""
    converted = {} if converted is None else converted
    if isinstance(value, torch.Tensor):
        if id(value) not in converted:
            converted[id(value)] = value.detach().cpu().to(stored_dtype(value.dtype, "pickle")).contiguous().numpy()
        return converted[id(value)]
    if isinstance(value, dict):
        return {k: _as_numpy(v, converted) for k, v in value.items()}
    return value


def _file_bytes(path: str, payload: Any) -> bytes:
    ext = os.path.splitext(path)[1].lower()
    buf = io.BytesIO()
    if ext in (".pth", ".pt", ".bin", ".ckpt"):
        torch.save(payload, buf)  # a buffer keeps torch's archive name fixed: same input, same bytes
    elif ext == ".pkl":
        pickle.dump(_as_numpy(payload), buf, protocol=PICKLE_PROTOCOL)
    elif ext == ".safetensors":
        from safetensors.torch import save

        if not isinstance(payload, dict) or not all(isinstance(v, torch.Tensor) for v in payload.values()):
            raise ValueError("a .safetensors file holds a bare state dict: use container='bare'")
        return save({k: v.contiguous() for k, v in payload.items()})
    else:
        raise ValueError(f"{path}: unknown extension {ext!r} (.pth, .pt, .bin, .ckpt, .pkl, .safetensors)")
    return buf.getvalue()


def write_synthetic_checkpoint(
    path: Union[str, "os.PathLike[str]"],
    layout: str = "official",
    variant: Union[str, Architecture] = "convnext_tiny",
    version: int = 1,
    container: str = "model",
    dtype: torch.dtype = torch.float32,
    *,
    seed: int = 0,
    num_classes: Optional[int] = 1000,
    prefix: Optional[str] = None,
    wrapper_prefix: str = "",
    extra: Optional[Mapping[str, Any]] = None,
) -> str:
    """Write a deterministic checkpoint file in `layout`'s real names and return its path.

    Args:
        path: destination; the extension picks the format (`.pth`/`.pt`/`.bin`/`.ckpt`: torch.save;
            `.pkl`: a pickle of numpy arrays, as Detectron2's model zoo and MaskDINO's converters
            write; `.safetensors`: a bare dict).
        layout: a layout name of the converter's tables (`official`, `timm`, `huggingface`, ...) or
            `detectron2`, the converter's own output (then exactly the bytes `convnext-d2 convert`
            writes for `.pth`/`.pkl`, and `container` must be `model`).
        variant: a released variant name or an `Architecture` (small ones keep tests fast).
        version: 1 or 2 (ConvNeXt V2 for a `convnext_*` name).
        container: `bare`, `model`, `state_dict` or `training` (see `wrap`).
        dtype: of every tensor (`.pkl` stores bfloat16 as float32, numpy having none).
        seed: the values' seed: same arguments, same bytes.
        num_classes: classifier width (`None`: no `head` and no pooled `norm`, as in a backbone-only file).
        prefix: before every name (default: the layout's own, see `synthetic_state_dict`).
        wrapper_prefix: DDP/torch.compile wrapper prefix (`module.`, `_orig_mod.`).
        extra: top-level entries added beside the container (e.g. `{"matching_heuristics": True}`).

    Example:
        >>> write_synthetic_checkpoint(tmp_path / "w.pth", layout="timm", variant="convnext_tiny")  # doctest: +SKIP
    """
    target = os.fspath(path)
    state_dict = synthetic_state_dict(layout, variant, version, dtype, seed=seed, num_classes=num_classes, prefix=prefix)
    if layout == DETECTRON2:
        if container != "model" or wrapper_prefix or extra:
            raise ValueError("layout='detectron2' is the converter's own file: container='model', no wrapper_prefix or extra")
        ext = os.path.splitext(target)[1].lower()
        fmt = {".pth": "torch", ".pt": "torch", ".pkl": "pickle"}.get(ext)
        if fmt is None:
            raise ValueError(f"{target}: the converter writes .pth, .pt or .pkl")
        data = encode(state_dict, fmt)
    else:
        payload = wrap(state_dict, container, wrapper_prefix)
        if extra:
            if not isinstance(payload, dict) or container == "bare":
                raise ValueError("extra entries need a container (model, state_dict, training)")
            payload = dict(payload, **dict(extra))
        data = _file_bytes(target, payload)
    with open(target, "wb") as f:
        f.write(data)
    return target
