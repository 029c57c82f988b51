"""What Detectron2 would make of a file as it is, in words (docs/design.md, "How Detectron2 reads a file").

The facts come from one place, `d2_prediction.predict` (reader, container, heuristics, `module.`,
exact names); this module turns a prediction into the problems `inspect`, `convert`'s notes and
`repair` print.  A problem is stated only where the prediction says Detectron2 raises, renames by
heuristics, or leaves backbone weights without their value; each is one documented way a file fails
loudly or, worse, silently (each listed in docs/troubleshooting.md).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Dict, List, Mapping, Optional, Tuple

from .containers import is_array, walk
from .architecture import Architecture
from .d2_prediction import FRESH_OUTPUT_NORM, SAFETENSORS_PATHS, Prediction, backbone_keys, loads_nothing, misplaced, predict_everywhere
from .io.handles import ArrayRef
from .io.safe_pickle import Placeholder
from .layouts import Canonical, classifier_names
from .target import BACKBONE_PREFIX


def _type_name(v: Any) -> str:
    """What a value is read as: a handle (a numpy array or a byte string left in the file) names
    the type it stands for."""
    return getattr(v, "stands_for", None) or type(v).__name__


def _is_ndarray(v: Any) -> bool:
    """A numpy array, in memory or as a handle (what torch's weights-only reader refuses)."""
    np = sys.modules.get("numpy")  # no array exists unless numpy is imported
    return isinstance(v, ArrayRef) or (np is not None and isinstance(v, np.ndarray))


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
    if fmt == "safetensors" and not name.endswith(".safetensors"):
        return [f"a safetensors file under a {os.path.splitext(name)[1] or 'bare'} name: torch.load reads safetensors "
                f"only from a path ending in .safetensors (torch >= {'.'.join(map(str, SAFETENSORS_PATHS))}, safetensors installed)."]
    if fmt == "safetensors":
        return [f"a safetensors file: Detectron2's checkpointer reads it only through torch >= "
                f"{'.'.join(map(str, SAFETENSORS_PATHS))} with safetensors installed (torch.load then calls safetensors.torch.load_file)."]
    problems = []
    if not is_pkl and fmt == "pickle":
        problems.append("written by pickle.dump, not torch.save, under a name that is not .pkl: torch.load, which "
                        "Detectron2 calls for every name but .pkl, cannot read it ('Weights only load failed' or "
                        "'Invalid magic number; corrupt file?').")
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
        odd = next((f"{k}: {_type_name(v)}" for k, v in loaded.items() if not is_array(v) or _is_ndarray(v)), None)
        if odd:
            problems.append(
                f"no top-level 'model': Detectron2 wraps the whole dict as the model and fails "
                f"('Unsupported type found in checkpoint! {odd}')."
            )
    if not is_pkl and fmt != "pickle":
        # Objects read past (placeholders: Namespace, loggers, configs) and arrays: torch's allowlist has neither.
        unsafe = sorted(
            {v.cls.rsplit(".", 1)[-1] if isinstance(v, Placeholder) else _type_name(v)
             for _, v in walk(loaded) if isinstance(v, (Placeholder, argparse.Namespace)) or _is_ndarray(v)}
        )
        if unsafe:
            problems.append(
                f"holds {', '.join(unsafe)} objects: torch >= 2.6 loads with weights_only=True, as Detectron2 "
                "calls it, and refuses them ('Weights only load failed')."
            )
    return problems


def _names_problem(prediction: Prediction, layout: Optional[str], source_prefix: Optional[str]) -> List[str]:
    """Why the backbone's names do not load, or load only through the heuristics."""
    if loads_nothing(prediction, BACKBONE_PREFIX):
        if layout is not None and layout != "official":
            return [f"names are in the {layout} layout: a Detectron2 ConvNeXt with official names loads none of them "
                    "(every weight missing, training starts from random init)."]
        spelled = ""
        if source_prefix is not None and source_prefix != BACKBONE_PREFIX:
            spelled = (f"names start with '{source_prefix}' instead of '{BACKBONE_PREFIX}'" if source_prefix
                       else f"names lack the '{BACKBONE_PREFIX}' prefix")
        handed = sorted(prediction.unused)[:1]
        how = ", matching_heuristics matching none of them" if prediction.heuristics else ""
        what = f"; the model is handed names such as '{handed[0]}'{how}" if handed else how
        return [f"{spelled or 'names do not match the backbone'}: Detectron2 loads none of them{what} "
                "(only log warnings; training starts from random init)."]
    if prediction.renamed and source_prefix is not None and source_prefix != BACKBONE_PREFIX:
        spelled = f"start with '{source_prefix}' instead of '{BACKBONE_PREFIX}'" if source_prefix else f"lack the '{BACKBONE_PREFIX}' prefix"
        return [f"names {spelled}: Detectron2 matches them only through matching_heuristics "
                f"({'the URL' if prediction.heuristics == 'url' else 'the file'}: longest name suffix), "
                "which can also hand them to modules outside the backbone."]
    return []


def _load_problems(prediction: Prediction) -> List[str]:
    """Backbone weights left without their value, or given the wrong one."""
    out = []
    wrong: Dict[str, str] = misplaced(prediction.loaded)
    if wrong:
        pairs = [f"'{c}' into {m}" for m, c in sorted(wrong.items())]
        out.append(f"matching_heuristics gives {len(pairs)} backbone weight(s) the pooled classifier norm: "
                   f"{', '.join(pairs)} (each has a value, the wrong one).")
    if prediction.shape_skipped:
        out.append(f"{len(prediction.shape_skipped)} backbone tensors skipped for a shape mismatch: "
                   f"{', '.join(prediction.shape_skipped[:4])}.")
    missing = [k for k in prediction.missing if k.startswith(BACKBONE_PREFIX) and not FRESH_OUTPUT_NORM.match(k)
               and k not in prediction.shape_skipped]
    if missing and not loads_nothing(prediction, BACKBONE_PREFIX):
        out.append(f"{len(missing)} backbone weights get no value from the file (they train from random init): "
                   f"{', '.join(missing[:4])}.")
    return out


def d2_problems(
    prediction: Prediction,
    path: str,
    fmt: str,
    loaded: Any,
    layout: Optional[str] = None,
    source_prefix: Optional[str] = None,
    classifier_names: Optional[List[str]] = None,
    modules: Optional[frozenset] = None,
) -> List[str]:
    """Problems Detectron2's `DetectionCheckpointer` would hit loading `path` into a ConvNeXt backbone as it is.

    `prediction` is what it does (d2_prediction.predict); `fmt`, `loaded` and `modules` are the file
    as this project read it, for naming the cause of a raise; `classifier_names` are the source's
    names of the classifier tensors (`head.*`, pooled `norm.*`).
    """
    problems = []
    if prediction.raises is not None or prediction.heuristics == "caffe2":
        problems = _reader_problems(path.split("?", 1)[0], fmt, loaded, modules)
    if prediction.raises is not None:
        return problems or [f"Detectron2 raises: {prediction.raises}."]
    problems += _names_problem(prediction, layout, source_prefix) + _load_problems(prediction)
    classifier = sorted(classifier_names or [])
    if classifier:
        problems.append(
            f"classifier tensors {', '.join(classifier)} are unused by a detection backbone; under "
            "matching_heuristics the pooled 'norm.weight' suffix-matches every '*.norm.weight' in the model."
        )
    return problems


def diagnose(path: str, source: Any, canonical: Canonical, arch: Architecture) -> Tuple[Prediction, List[str]]:
    """What Detectron2 does with the file as it is (`path`: with a `?matching_heuristics=True` query, as
    asked), and the problems it would hit: the one recipe of `inspect`, `convert`'s notes and `repair`."""
    prediction = predict_everywhere(path, source.format, source.objects, backbone_keys(arch, BACKBONE_PREFIX), modules=source.modules)
    return prediction, d2_problems(prediction, path, source.format, source.objects, canonical.layout, canonical.prefix,
                                   classifier_names(canonical), source.modules)
