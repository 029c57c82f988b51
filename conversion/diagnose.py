"""What Detectron2 would make of a file as it is (docs/design.md, "How Detectron2 reads a file").

Detectron2 picks its reader by extension: `.pkl` goes through plain `pickle.load` and
needs `model` *and* `__author__` to be taken as-is; anything else goes through
`torch.load` (with `weights_only=True` from torch 2.6), and a dict without `model` is
wrapped whole.  Then names must equal the model's (`backbone.` + official names for a
ConvNeXt backbone), or they are skipped with a warning.  Each problem below is one
documented way a file fails loudly or, worse, silently (each listed in docs/troubleshooting.md).
"""
from __future__ import annotations

import argparse
import os
from typing import Any, List, Mapping, Optional

from .containers import is_array, walk
from .target import BACKBONE_PREFIX


def _type_name(v: Any) -> str:
    """What a value is read as: a handle (a numpy array or a byte string left in the file) names
    the type it stands for."""
    return getattr(v, "stands_for", None) or type(v).__name__


def _has_arrays(obj: Any) -> bool:
    return isinstance(obj, Mapping) and any(is_array(v) for v in obj.values())


def _mentions(path: str, needle: bytes, chunk: int = 1 << 20) -> bool:
    """Whether the file's bytes contain `needle` (read in chunks: files can be gigabytes)."""
    tail = b""
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                return False
            if needle in tail + block:
                return True
            tail = block[-len(needle):]


def _names_numpy_core(path: str, modules: Optional[frozenset]) -> bool:
    """Pickled by numpy >= 2: the reader's record of the modules named, else a search of the bytes."""
    return any(m.startswith("numpy._core") for m in modules) if modules is not None else _mentions(path, b"numpy._core")


def _reader_problems(path: str, fmt: str, loaded: Any, modules: Optional[frozenset] = None) -> List[str]:
    name = os.path.basename(path)
    is_pkl = name.lower().endswith(".pkl")
    if is_pkl and fmt in ("torch-zip", "torch-legacy"):
        return [
            "a torch.save archive under a .pkl name: Detectron2 reads .pkl with pickle.load and fails "
            "('UnpicklingError: A load persistent id instruction was encountered...')."
        ]
    if is_pkl and isinstance(loaded, Mapping) and not ("model" in loaded and "__author__" in loaded):
        what = "'model' but no '__author__'" if "model" in loaded else "no 'model' and '__author__'"
        return [
            f"a .pkl with {what}: Detectron2 takes it for Caffe2 blobs and fails "
            f"('ValueError: Unsupported type found in checkpoint! ...: <class 'dict'>') or renames by heuristics."
        ]
    if fmt == "safetensors":
        return ["a safetensors file: Detectron2's checkpointer cannot read it (it calls torch.load)."]
    problems = []
    if is_pkl and fmt == "pickle" and _names_numpy_core(path, modules):
        problems.append(
            "pickled by numpy >= 2 (it names numpy._core): numpy < 1.26, as in older Detectron2 stacks, "
            "cannot read it ('No module named numpy._core')."
        )
    if isinstance(loaded, Mapping) and isinstance(loaded.get("model"), Mapping) and not _has_arrays(loaded["model"]):
        problems.append(
            "'model' holds another container, not the weights (e.g. {'model': {'model': ...}}): Detectron2 fails "
            "('Unsupported type found in checkpoint! model: <class 'dict'>')."
        )
    if not is_pkl and isinstance(loaded, Mapping) and "model" not in loaded:
        odd = next((f"{k}: {_type_name(v)}" for k, v in loaded.items() if not (is_array(v) and _type_name(v) != "ndarray")), None)
        if odd:
            problems.append(
                f"no top-level 'model': Detectron2 wraps the whole dict as the model and fails "
                f"('Unsupported type found in checkpoint! {odd}')."
            )
    if not is_pkl:
        # Objects read past (placeholders: Namespace, loggers, configs) and arrays: torch's allowlist has neither.
        unsafe = sorted(
            {v.cls.rsplit(".", 1)[-1] if type(v).__name__ == "Placeholder" else _type_name(v)
             for _, v in walk(loaded) if _type_name(v) in ("Placeholder", "ndarray") or isinstance(v, argparse.Namespace)}
        )
        if unsafe:
            problems.append(
                f"holds {', '.join(unsafe)} objects: torch >= 2.6 loads with weights_only=True, as Detectron2 "
                "calls it, and refuses them ('Weights only load failed')."
            )
    return problems


def _asks_for_heuristics(fmt: str, loaded: Any) -> bool:
    """A model-zoo `.pkl` whose dict sets `matching_heuristics`: Detectron2 then matches names by suffix."""
    return fmt == "pickle" and isinstance(loaded, dict) and bool(loaded.get("matching_heuristics") is True)


def d2_problems(
    path: str,
    fmt: str,
    loaded: Any,
    layout: Optional[str] = None,
    source_prefix: Optional[str] = None,
    classifier_names: Optional[List[str]] = None,
    modules: Optional[frozenset] = None,
) -> List[str]:
    """Problems Detectron2's `DetectionCheckpointer` would hit loading `path` into a ConvNeXt backbone as it is.

    `classifier_names` are the source's names of the classifier tensors (`head.*`, pooled `norm.*`).
    `modules` are the modules the file's globals name, where the reader recorded them (otherwise the
    file's bytes are searched for `numpy._core`).
    """
    problems = _reader_problems(path, fmt, loaded, modules)
    if layout is not None and layout != "official":
        problems.append(
            f"names are in the {layout} layout: a Detectron2 ConvNeXt with official names loads none of them "
            "(every weight missing, training starts from random init)."
        )
    elif source_prefix is not None and source_prefix != BACKBONE_PREFIX:
        spelled = f"start with '{source_prefix}' instead of '{BACKBONE_PREFIX}'" if source_prefix else f"lack the '{BACKBONE_PREFIX}' prefix"
        if _asks_for_heuristics(fmt, loaded):
            problems.append(
                f"names {spelled}: Detectron2 matches them only through the file's matching_heuristics "
                "(longest name suffix), which can also hand them to modules outside the backbone."
            )
        else:
            problems.append(
                f"names {spelled}: Detectron2 loads none of them (only log warnings; training starts from random init)."
            )
    classifier = sorted(classifier_names or [])
    if classifier:
        problems.append(
            f"classifier tensors {', '.join(classifier)} are unused by a detection backbone; under "
            "matching_heuristics the pooled 'norm.weight' suffix-matches every '*.norm.weight' in the model."
        )
    return problems
