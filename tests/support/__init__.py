"""Helpers the tests share: optional libraries, and (re-exported) the builders and Detectron2 loading
of `conversion.testing`, which downstream suites use too (one implementation).
"""
from __future__ import annotations

import importlib
import os
import pickle
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import pytest
import torch

from conversion.architecture import Architecture
from conversion.synthetic import random_state_dict
from conversion.testing import loading as _loading
from conversion.testing.loading import (  # noqa: F401  (re-exported for the tests)
    TORCH_HAS_WEIGHTS_ONLY,
    LoadResult,
    assert_clean_load,
    assert_loaded_equal,
    capture_checkpointer_logs,
    fill_with_sentinel,
    load_with_detectron2,
    torch_load_weights_only,
)

FULL_ENVIRONMENT = bool(os.environ.get("CONVNEXT_D2_FULL"))


def require(module: str) -> Any:
    """Import an optional library; skip without it, except in the full environment where it must exist."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        if FULL_ENVIRONMENT:
            pytest.fail(f"{module} is missing from the full environment ({err}); fix the tox deps", pytrace=False)
        pytest.skip(f"{module} is not installed here (only the full environment has every library)", allow_module_level=True)


def require_weights_only_decoder() -> None:
    """Skip the calling module where torch has no weights_only reader: the adversarial tests' oracle
    (tests/adversarial/judge.py) decodes every file independently with it, and builds tensors of dtypes
    torch 1.9 lacks; on such torch the reader itself is covered by tests/io/test_read.py's
    restricted-pickle-module cases."""
    if not TORCH_HAS_WEIGHTS_ONLY:
        pytest.skip("the hostile corpus needs torch >= 1.13 (weights_only) as its independent decoder", allow_module_level=True)


# ---------------------------------------------------------------- version facts
# Facts that differ between the environments (full: torch 2.14 + Detectron2 0.7; legacy: torch 1.9 +
# Detectron2 v0.6 + torchvision 0.10), stated once; each test says what holds on either side.


def _version(text: str) -> tuple:
    parts = []
    for piece in text.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


# torch 2.6 made weights_only=True the default of torch.load, which Detectron2 calls without it: from
# then on a .pth holding numpy arrays or an argparse.Namespace no longer loads; before, it loads.
TORCH_LOADS_WEIGHTS_ONLY_BY_DEFAULT = _version(torch.__version__) >= (2, 6)


def detectron2_reads_path_query() -> bool:
    """Whether Detectron2 honours `?matching_heuristics=True` on MODEL.WEIGHTS (added after v0.6)."""
    import inspect

    from detectron2.checkpoint import DetectionCheckpointer

    return "urlparse" in inspect.getsource(DetectionCheckpointer.load)


def torchvision_model(name: str, **kwargs: Any) -> torch.nn.Module:
    """A randomly initialised torchvision model: `weights=None` since 0.13, `pretrained=False` before."""
    import inspect

    models = require("torchvision").models
    build = getattr(models, name)
    takes_weights = "weights" in inspect.signature(build).parameters or _version(require("torchvision").__version__) >= (0, 13)
    return build(weights=None, **kwargs) if takes_weights else build(pretrained=False, **kwargs)


def require_torchvision_convnext() -> Any:
    """torchvision's ConvNeXt module (torchvision >= 0.12; the legacy environment's 0.10 has none)."""
    require("torchvision")
    try:
        return importlib.import_module("torchvision.models.convnext")
    except ImportError:
        if FULL_ENVIRONMENT:
            pytest.fail("torchvision in the full environment has no ConvNeXt; fix the tox deps", pytrace=False)
        pytest.skip("torchvision < 0.12 has no ConvNeXt (legacy environment)")


# Tests build their sources with the package's own generator (also used by the demo).
random_canonical_state_dict = random_state_dict


def build_d2_model(arch: Architecture, out_features: Optional[Sequence[str]] = None) -> torch.nn.Module:
    """`conversion.testing.loading.build_d2_model`, skipping where Detectron2 is absent (core)."""
    require("detectron2")
    return _loading.build_d2_model(arch, out_features)


def plugin_option_names() -> List[str]:
    """The options the convnext-d2 pytest plugin adds, read off its `pytest_addoption` hook."""
    from conversion.testing import plugin

    class Recorder:
        def __init__(self) -> None:
            self.names: List[str] = []

        def getgroup(self, *args: Any, **kwargs: Any) -> "Recorder":
            return self

        def addoption(self, *names: str, **kwargs: Any) -> None:
            self.names += names

    recorder = Recorder()
    plugin.pytest_addoption(recorder)  # type: ignore[arg-type]
    return recorder.names


# ---------------------------------------------------------------- independent oracles
# Expected names and decoded files, written out here rather than taken from conversion/ (the code
# under test): a test comparing the converter with its own constants or its own reader proves nothing.

# The official layout's classifier: the pooled norm and the head (dropped by every conversion).
CLASSIFIER_NAMES = ("norm.weight", "norm.bias", "head.weight", "head.bias")


def output_norm_names(stages: Iterable[int] = (0, 1, 2, 3), prefix: str = "backbone.") -> List[str]:
    """`norm{i}.weight` and `.bias` for each stage i (output res{i+2}): the norms a Detectron2 backbone
    adds for its outputs, which no ImageNet file holds."""
    return [f"{prefix}norm{i}.{p}" for i in stages for p in ("weight", "bias")]


def output_norms_for(out_features: Iterable[str], prefix: str = "backbone.") -> List[str]:
    """output_norm_names of the stages behind `res2`..`res5` outputs."""
    return output_norm_names(sorted(int(name[len("res"):]) - 2 for name in out_features), prefix)


def bytes_at(path: Any, location: Any) -> bytes:
    """The raw bytes a reader's location names (an `InMemory`'s own, or a run of the file at
    `path`), read with plain file calls: the oracle side of a handle test."""
    from conversion.io.handles import InMemory

    if isinstance(location, InMemory):
        return location.data
    with open(path, "rb") as f:
        f.seek(location.offset)
        return f.read(location.nbytes)


def read_as_convert_does(path: Any) -> Any:
    """The file at `path` read whole by the path `convert` takes: opened once by `open_source` (the
    one way in) and its handles materialized.  The tests that read files whole go through here, so
    a change to that path is one edit."""
    from conversion.read import materialize, open_source

    return materialize(open_source(str(path)))


def read_written(path: Any) -> Dict[str, Any]:
    """A file the converter wrote, decoded without conversion/: `torch.load(weights_only=True)` for a
    torch file, the standard unpickler for a `.pkl` (numpy arrays; the file is the test's own output)."""
    if str(path).endswith(".pkl"):
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
    return torch_load_weights_only(path)


def written_tensors(path: Any) -> Dict[str, torch.Tensor]:
    """The `model` dict of a written file as tensors (a `.pkl` holds numpy arrays)."""
    return {k: v if isinstance(v, torch.Tensor) else torch.from_numpy(v) for k, v in read_written(path)["model"].items()}


def verify_json(capsys: Any, *args: str) -> Tuple[int, Any, str]:
    """`convnext-d2 verify ARGS --json` in this process: (exit status, the parsed report or None, stderr);
    never a traceback."""
    import json

    from conversion.cli import main

    status = main(["verify", *args, "--json"])
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    return status, json.loads(out) if out.strip() else None, err
