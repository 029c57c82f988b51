"""What Detectron2's `DetectionCheckpointer` will do with a file, predicted from its metadata alone:
the one model `inspect`, `repair`, `verify` and `convert`'s notes share.  `predict` runs the steps in
the order the real code does (reader, container rule, `matching_heuristics`, the heuristics, fvcore's
`module.` stripping, exact names), each described in docs/design.md, "How Detectron2 reads a file".
Model keys are given as name -> shape, so a prediction needs neither detectron2 nor the file's bytes.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import re
import sys
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Tuple
from urllib.parse import parse_qs, urlsplit

from .containers import is_array, walk
from .errors import PredictedRaise
from .heuristics import caffe2_names, heuristic_assignment
from .io.allowlist import Placeholder
from .io.handles import ArrayRef, shape_of

if TYPE_CHECKING:
    from .architecture import Architecture

Shape = Tuple[int, ...]
Version = Tuple[int, int]

WEIGHTS_ONLY_DEFAULT = (2, 6)  # torch.load's weights_only default became True
# torch.load reads a path ending in .safetensors through safetensors.torch.load_file: pytorch/pytorch
# PR #170592 (commit 5d300e8), merged to main on 2026-05-01, after the 2.12 branch cut (April 13-15)
# and before 2.13's (June 8-10); torch 2.14.1's serialization.py has it.
SAFETENSORS_PATHS = (2, 13)
NUMPY_CORE = (1, 26)  # numpy gained the `numpy._core` alias numpy 2's pickles name
URL_QUERY = (0, 7)  # DetectionCheckpointer parses `?matching_heuristics=True` from 0.7 on
MODULE_PREFIX = "module."
HEURISTICS_QUERY = "matching_heuristics"
# Output norms a ConvNeXt detection backbone adds: no ImageNet file has them, the backbone initialises them.
FRESH_OUTPUT_NORM = re.compile(r"^backbone\.norm\d+\.(weight|bias)$")
# A classifier's pooled norm as a file names it (official `norm.*`, timm `head.norm.*`, `fc_norm.*`),
# behind any wrapper prefix: a tensor for a pooled vector, never a block's or an output's norm.
POOLED_NORM = re.compile(r"^(?:(?:module|_orig_mod|model)\.)*(?:head\.)?(?:fc_)?norm\.(?:weight|bias)$")


@dataclass(frozen=True)
class Stack:
    """The libraries a prediction is for."""

    torch: Version
    detectron2: Version
    safetensors: bool = True
    numpy: Version = (1, 26)  # numpy < 1.26 cannot unpickle arrays numpy 2 pickled (no numpy._core)

    def describe(self) -> str:
        extra = ", safetensors" if self.safetensors else ""
        return f"torch {self.torch[0]}.{self.torch[1]}, detectron2 {self.detectron2[0]}.{self.detectron2[1]}{extra}"


# The stacks a prediction is compared with, to name where the answer depends on the stack.
REFERENCE_STACKS = (Stack((1, 9), (0, 6), False, (1, 24)), Stack((2, 5), (0, 7)), Stack((2, 14), (0, 7)))


def _version(text: str) -> Version:
    parts = (text.split("+")[0].split(".") + ["0"])[:2]
    return tuple(int("".join(ch for ch in p if ch.isdigit()) or 0) for p in parts)  # type: ignore[return-value]


def _detectron2_version() -> Optional[Version]:
    """Detectron2's `__version__`, read from its `__init__.py` without importing it (a source
    install, as v0.6 often is, has no distribution metadata)."""
    spec = importlib.util.find_spec("detectron2")
    if spec is None or not spec.origin:
        return None
    with open(spec.origin, encoding="utf-8") as f:
        found = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", f.read(), re.M)
    return _version(found.group(1)) if found else None


def installed_stack() -> Stack:
    """The stack installed here (detectron2 taken as 0.7, the current release, where it is absent)."""
    import importlib.metadata as metadata  # versions without importing torch (~640 MB resident)

    d2 = _detectron2_version() or (0, 7)
    try:
        numpy = _version(metadata.version("numpy"))
    except metadata.PackageNotFoundError:
        numpy = NUMPY_CORE
    return Stack(_version(metadata.version("torch")), d2, importlib.util.find_spec("safetensors") is not None, numpy)


@dataclass
class Prediction:
    """What Detectron2 does with one file on one stack (also `inspect --json`'s `detectron2`)."""

    stack: str
    reader: str
    raises: Optional[str] = None  # what Detectron2 raises; None: the load completes
    heuristics: Optional[str] = None  # None, "file", "url", "caffe2" or "pycls": what turned them on
    module_stripped: bool = False
    loaded: Dict[str, str] = field(default_factory=dict)  # model key -> the file's name for it
    missing: List[str] = field(default_factory=list)  # model keys left as the model built them
    unused: List[str] = field(default_factory=list)  # names (as handed to the model) nothing took
    shape_skipped: List[str] = field(default_factory=list)  # model keys whose tensor had another shape
    other_stacks: Dict[str, str] = field(default_factory=dict)  # stack -> its different outcome

    @property
    def renamed(self) -> Dict[str, str]:
        return {m: c for m, c in self.loaded.items() if m != c}

    def outcome(self) -> str:
        """One line: raises, or how many model tensors load."""
        if self.raises is not None:
            return f"raises ({self.raises.splitlines()[0]})"
        return f"loads {len(self.loaded)} of {len(self.loaded) + len(self.missing)} model tensors"

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def split_query(path: str) -> Tuple[str, Dict[str, List[str]]]:
    """`file?matching_heuristics=True` -> (file, its query), as Detectron2 reads the path it is given."""
    if "?" not in path:
        return path, {}
    parts = urlsplit(path)
    return path.split("?", 1)[0], parse_qs(parts.query)


def _unsafe_for_weights_only(objects: Any) -> List[str]:
    """What torch's weights-only unpickler refuses: objects read past, arrays (handles or numpy's; a
    numpy array exists only where numpy is imported), argparse namespaces."""
    numpy = sys.modules.get("numpy")
    found = set()
    for _, v in walk(objects):
        if isinstance(v, Placeholder):
            found.add(v.cls.rsplit(".", 1)[-1])
        elif isinstance(v, ArrayRef) or (numpy is not None and isinstance(v, numpy.ndarray)):
            found.add("ndarray")
        elif isinstance(v, argparse.Namespace):
            found.add("Namespace")
    return sorted(found)


def _read(name: str, fmt: str, objects: Any, stack: Stack, modules: Optional[frozenset]) -> Tuple[str, Any]:
    """(reader, what it returns) for the file as Detectron2 opens it."""
    if name.endswith(".pkl"):
        reader = "pickle.load (a .pkl name)"
        if fmt in ("torch-zip", "torch-legacy", "safetensors"):
            raise PredictedRaise(f"{reader} of a {fmt} file: UnpicklingError")
        if stack.numpy < NUMPY_CORE and modules is not None and any(m.startswith("numpy._core") for m in modules):
            raise PredictedRaise(f"{reader}: No module named 'numpy._core' (pickled by numpy >= 2, read by numpy 1)")
        return reader, objects
    if name.endswith(".safetensors") and stack.torch >= SAFETENSORS_PATHS and stack.safetensors:
        reader = "torch.load -> safetensors.torch.load_file (a .safetensors path)"
        if fmt != "safetensors":
            raise PredictedRaise(f"{reader}: not a safetensors file")
        return reader, objects
    weights_only = stack.torch >= WEIGHTS_ONLY_DEFAULT
    reader = f"torch.load (weights_only={weights_only})"
    if fmt in ("pickle", "safetensors"):
        raise PredictedRaise(f"{reader} of a {'plain pickle' if fmt == 'pickle' else 'safetensors'} file: "
                      f"{'Weights only load failed' if weights_only else 'Invalid magic number; corrupt file?'}")
    unsafe = _unsafe_for_weights_only(objects) if weights_only else []
    if unsafe:
        raise PredictedRaise(f"{reader}: Weights only load failed (it holds {', '.join(unsafe)})")
    return reader, objects


def _container(name: str, loaded: Any, query: Mapping[str, List[str]]) -> Tuple[Mapping[str, Any], Optional[str]]:
    """(the checkpoint dict `_load_model` gets, what turned heuristics on)."""
    if not isinstance(loaded, Mapping):
        raise PredictedRaise(f"a {type(loaded).__name__}, not a dict: TypeError")
    if name.endswith(".pkl"):
        if "model" in loaded and "__author__" in loaded:
            return loaded, "file" if loaded.get(HEURISTICS_QUERY) else None
        blobs = loaded["blobs"] if "blobs" in loaded else loaded
        if not isinstance(blobs, Mapping):
            raise PredictedRaise("Caffe2 'blobs' is not a dict: AttributeError")
        kept = {k: v for k, v in blobs.items() if not str(k).endswith("_momentum")}
        return {"model": kept, "__author__": "Caffe2", HEURISTICS_QUERY: True}, "caffe2"
    if name.endswith(".pyth"):  # pycls: its `model_state`, matched by heuristics
        state = loaded.get("model_state")
        if not isinstance(state, Mapping):
            raise PredictedRaise("AssertionError: Cannot load .pyth file; pycls checkpoints must contain 'model_state'")
        kept = {k: v for k, v in state.items() if not str(k).endswith("num_batches_tracked")}
        return {"model": kept, "__author__": "pycls", HEURISTICS_QUERY: True}, "pycls"
    checkpoint = dict(loaded) if "model" in loaded else {"model": loaded}
    via = "file" if checkpoint.get(HEURISTICS_QUERY) else None
    rest = {k: v for k, v in query.items() if k != HEURISTICS_QUERY}
    if query.get(HEURISTICS_QUERY) == ["True"]:
        checkpoint[HEURISTICS_QUERY], via = True, via or "url"
    if rest:
        raise PredictedRaise(f"ValueError: Unsupported query remaining: {rest}")
    return checkpoint, via


def _shapes(weights: Any) -> Dict[str, Shape]:
    if not isinstance(weights, Mapping):
        raise PredictedRaise(f"'model' is a {type(weights).__name__}: Detectron2 expects a dict of weights")
    shapes = {}
    for k, v in weights.items():
        if not is_array(v):
            kind = v.cls if isinstance(v, Placeholder) else getattr(v, "stands_for", None) or type(v).__name__
            raise PredictedRaise(f"ValueError: Unsupported type found in checkpoint! {k}: {kind}")
        shapes[str(k)] = shape_of(v)
    return shapes


def _strip_module(names: Dict[str, str]) -> Tuple[Dict[str, str], bool]:
    """fvcore's `_strip_prefix_if_present(state_dict, "module.")`: once, only when every key has it."""
    if not names or not all(k.startswith(MODULE_PREFIX) or not k for k in names):
        return names, False
    return {k[len(MODULE_PREFIX):]: c for k, c in names.items()}, True


def predict(
    path: str, fmt: str, objects: Any, model: Mapping[str, Shape], stack: Stack, modules: Optional[frozenset] = None
) -> Prediction:
    """What `DetectionCheckpointer(model).resume_or_load(path, resume=False)` does on `stack`.

    `path` may end in `?matching_heuristics=True`; `fmt` and `objects` are what this project's
    reader made of the file (handles suffice: only names, shapes and types are looked at).
    """
    file, query = split_query(path)
    name = os.path.basename(file)
    out = Prediction(stack=stack.describe(), reader="")
    try:
        if query and stack.detectron2 < URL_QUERY:
            raise PredictedRaise(f"AssertionError: Checkpoint {os.path.basename(path)} not found (detectron2 < 0.7 reads no query)")
        out.reader, loaded = _read(name, fmt, objects, stack, modules)
        checkpoint, out.heuristics = _container(name, loaded, query)
        shapes = _shapes(checkpoint["model"])
        names = {k: k for k in shapes}  # the name handed on -> the file's name
        if out.heuristics:
            if checkpoint.get("__author__") == "Caffe2":
                names = caffe2_names(list(shapes))  # renamed -> the file's name
                shapes = {r: shapes[o] for r, o in names.items()}
            assignment = heuristic_assignment(model, shapes)
            if assignment.ambiguous:
                key, keys = next(iter(sorted(assignment.ambiguous.items())))
                raise PredictedRaise(f"ValueError: Cannot match one checkpoint key to multiple keys in the model "
                                         f"('{names[key]}' matches {', '.join(keys)})")
            handed_on = assignment.handed_on(list(shapes))
            names, shapes = {h: names[c] for h, c in handed_on.items()}, {h: shapes[c] for h, c in handed_on.items()}
        stripped, out.module_stripped = _strip_module(names)
        shapes = {k[len(MODULE_PREFIX):] if out.module_stripped else k: s for k, s in shapes.items()}
    except PredictedRaise as err:
        out.raises = str(err)
        out.missing = sorted(model)
        return out
    for key, source in sorted(stripped.items()):
        if key not in model:
            out.unused.append(key)
        elif tuple(model[key]) != shapes[key]:
            out.shape_skipped.append(key)
        else:
            out.loaded[key] = source
    out.missing = sorted(k for k in model if k not in out.loaded)
    return out


def predict_everywhere(
    path: str, fmt: str, objects: Any, model: Mapping[str, Shape], stack: Optional[Stack] = None,
    modules: Optional[frozenset] = None,
) -> Prediction:
    """The prediction for `stack` (the installed one by default), with `other_stacks` naming each
    reference stack whose outcome differs."""
    stack = stack or installed_stack()
    main = predict(path, fmt, objects, model, stack, modules)
    for other in REFERENCE_STACKS:
        if (other.torch, other.detectron2) == (stack.torch, stack.detectron2):
            continue
        theirs = predict(path, fmt, objects, model, other, modules)
        if theirs.outcome() != main.outcome():
            main.other_stacks[other.describe()] = theirs.outcome()
    return main


def misplaced(loaded: Mapping[str, str]) -> Dict[str, str]:
    """model key -> file name, where matching_heuristics gave a model tensor the pooled classifier
    norm (the file's name means another module: `norm.weight` suffix-matches a block's `*.norm.weight`)."""
    return {m: c for m, c in loaded.items() if m != c and POOLED_NORM.match(c) and not POOLED_NORM.match(m)}


def loads_nothing(prediction: Prediction, prefix: str) -> bool:
    """Whether not one model tensor under `prefix` (the backbone) takes a value from the file."""
    return not any(k.startswith(prefix) for k in prediction.loaded)


def backbone_keys(arch: "Architecture", prefix: str) -> Dict[str, Shape]:
    """The state-dict keys and shapes of this project's Detectron2 backbone shaped like `arch`, at
    `prefix`: the trunk's official names, an output norm per stage, no classifier."""
    from .architecture import NUM_STAGES, canonical_shapes

    model = replace(arch, output_norms=tuple(range(NUM_STAGES)), classifier_norm=False, num_classes=None)
    return {prefix + k: tuple(s) for k, s in canonical_shapes(model).items()}
