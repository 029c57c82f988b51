"""Loading a file through the real Detectron2 `DetectionCheckpointer`, observed, and the asserts on it.

Nothing here is mocked, and nothing here wraps Detectron2: loading, building and listening to its
loggers are `conversion.d2_loading`'s (the harness `verify` uses too); this module adds what a test
asserts on the result.  Importing it needs torch only (Detectron2 is imported when a load runs).
"""
from __future__ import annotations

import inspect
import re
from typing import Any, List, Mapping, Optional, Sequence

import torch

from ..architecture import Architecture
from ..d2_loading import LoadObservation, backbone_for, capture_checkpointer_logs, load_observed  # noqa: F401

TORCH_HAS_WEIGHTS_ONLY = "weights_only" in inspect.signature(torch.load).parameters


def torch_load_weights_only(path: Any) -> Any:
    """Read a written .pth as Detectron2 does on torch >= 2.6 (`weights_only=True`); older torch
    (the legacy environment) has no such mode and reads it plainly."""
    return torch.load(path, map_location="cpu", **({"weights_only": True} if TORCH_HAS_WEIGHTS_ONLY else {}))


# What the real DetectionCheckpointer did with a file: the harness's observation (one type for
# `verify` and the tests): `.missing`, `.unexpected`, `.incorrect_shapes`, `.records`, `.warnings()`.
LoadResult = LoadObservation
_MISSING_HEADER = "Some model parameters or buffers are not found in the checkpoint:"


def load_with_detectron2(model: torch.nn.Module, path: str) -> LoadResult:
    """Load `path` into `model` as train_net.py does (`conversion.d2_loading.load_observed`); unlike
    `verify`, a test wants Detectron2's own exception raised, and a load that loaded nothing failed."""
    seen = load_observed(model, path)
    if seen.error is not None:
        raise seen.error
    assert seen.incompatible is not None, f"DetectionCheckpointer.load({path}) did not load a model state at all"
    return seen


def _expand_grouped(lines: Sequence[str]) -> List[str]:
    """Undo fvcore's grouping `a.b.{bias, weight}` -> a.b.bias, a.b.weight."""
    keys = []
    for line in lines:
        line = line.strip()
        m = re.fullmatch(r"(.*)\.\{(.*)\}", line)
        if m:
            keys += [f"{m.group(1)}.{leaf.strip()}" for leaf in m.group(2).split(",")]
        elif line:
            keys.append(line)
    return keys


def assert_clean_load(result: LoadResult, expected_missing: Sequence[str]) -> None:
    """The strict gate: only the expected fresh keys missing, nothing unexpected or skipped, no other warning."""
    assert sorted(result.missing) == sorted(expected_missing), (
        f"missing keys differ: extra {sorted(set(result.missing) - set(expected_missing))}, "
        f"not missing {sorted(set(expected_missing) - set(result.missing))}"
    )
    assert result.unexpected == [], f"checkpoint keys the model did not use: {result.unexpected}"
    assert result.incorrect_shapes == [], f"shape-skipped keys: {result.incorrect_shapes}"
    other = []
    for message in result.warnings():
        if message.startswith(_MISSING_HEADER):
            listed = _expand_grouped(message.splitlines()[1:])
            assert sorted(listed) == sorted(expected_missing), f"checkpointer reported missing {listed}"
        else:
            other.append(message)
    assert other == [], f"checkpointer warnings: {other}"


def fill_with_sentinel(model: torch.nn.Module, value: float = 12345.0) -> None:
    """Overwrite every parameter so that a load that does nothing cannot pass."""
    with torch.no_grad():
        for p in model.state_dict().values():
            if p.is_floating_point():
                p.fill_(value)


def assert_loaded_equal(model: torch.nn.Module, expected: Mapping[str, torch.Tensor]) -> None:
    """Every expected tensor is in the model, bit-identical after casting to the model's dtype."""
    state = model.state_dict()
    wrong = []
    for name, tensor in expected.items():
        assert name in state, f"{name} not in model"
        got = state[name]
        want = tensor.to(got.dtype)
        if got.shape != want.shape or not torch.equal(got, want):
            wrong.append(name)
    assert wrong == [], f"{len(wrong)} tensors differ from the source after loading: {wrong[:5]}"


def build_d2_model(arch: Architecture, out_features: Optional[Sequence[str]] = None) -> torch.nn.Module:
    """A Detectron2-style model holding the real backbone at `.backbone`, built from config as
    `verify` builds it (`conversion.d2_loading.backbone_for`)."""
    return backbone_for(arch, **({} if out_features is None else {"OUT_FEATURES": list(out_features)}))
