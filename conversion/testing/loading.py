"""Loading a file through the real Detectron2 `DetectionCheckpointer`, observed, and the asserts on it.

Nothing here is mocked: `load_with_detectron2` runs the real `DetectionCheckpointer.load` and only
*observes* it (the incompatible-keys result and the records its loggers emit).  Detectron2 is
imported inside the functions that need it, so importing this module needs torch only.
"""
from __future__ import annotations

import inspect
import logging
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch

from ..architecture import Architecture

TORCH_HAS_WEIGHTS_ONLY = "weights_only" in inspect.signature(torch.load).parameters


def torch_load_weights_only(path: Any) -> Any:
    """Read a written .pth as Detectron2 does on torch >= 2.6 (`weights_only=True`); older torch
    (the legacy environment) has no such mode and reads it plainly."""
    if TORCH_HAS_WEIGHTS_ONLY:
        return torch.load(path, map_location="cpu", weights_only=True)
    return torch.load(path, map_location="cpu")




@dataclass
class LoadResult:
    """What the real DetectionCheckpointer did with a file."""

    missing: List[str]
    unexpected: List[str]
    incorrect_shapes: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]]
    records: List[logging.LogRecord] = field(default_factory=list)

    def warnings(self) -> List[str]:
        return [_plain(r.getMessage()) for r in self.records if r.levelno >= logging.WARNING]


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_MISSING_HEADER = "Some model parameters or buffers are not found in the checkpoint:"


def _plain(message: str) -> str:
    return _ANSI.sub("", message)


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.records: List[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def capture_checkpointer_logs() -> Iterator[List[logging.LogRecord]]:
    """Collect every record of the fvcore and detectron2 loggers (whatever propagation says)."""
    handler = _Collect()
    loggers = [logging.getLogger(name) for name in ("fvcore", "detectron2")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.DEBUG)
    try:
        yield handler.records
    finally:
        for lg, level in zip(loggers, levels):
            lg.removeHandler(handler)
            lg.setLevel(level)


def load_with_detectron2(model: torch.nn.Module, path: str) -> LoadResult:
    """Load `path` into `model` with the real `DetectionCheckpointer.load`, observing what it did."""
    from detectron2.checkpoint import DetectionCheckpointer

    checkpointer = DetectionCheckpointer(model)
    seen: Dict[str, Any] = {}
    real_load_model = checkpointer._load_model

    def observe(checkpoint: Any) -> Any:
        seen["incompatible"] = real_load_model(checkpoint)
        return seen["incompatible"]

    checkpointer._load_model = observe  # type: ignore[method-assign]
    with capture_checkpointer_logs() as records:
        checkpointer.load(path)
    assert "incompatible" in seen, f"DetectionCheckpointer.load({path}) did not load a model state at all"
    inc = seen["incompatible"]
    return LoadResult(list(inc.missing_keys), list(inc.unexpected_keys), list(inc.incorrect_shapes), list(records))


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
    """A Detectron2-style model holding the real backbone at `.backbone`, built from config."""
    from detectron2.config import get_cfg
    from detectron2.modeling import build_backbone

    from conversion.d2 import BACKBONE_NAME, add_convnext_config

    cfg = get_cfg()
    add_convnext_config(cfg)
    cfg.MODEL.BACKBONE.NAME = BACKBONE_NAME
    cfg.MODEL.CONVNEXT.DEPTHS = list(arch.depths)
    cfg.MODEL.CONVNEXT.DIMS = list(arch.dims)
    cfg.MODEL.CONVNEXT.LAYER_SCALE_INIT_VALUE = 1e-6 if arch.layer_scale else 0.0
    cfg.MODEL.CONVNEXT.USE_GRN = arch.version == 2
    if out_features is not None:
        cfg.MODEL.CONVNEXT.OUT_FEATURES = list(out_features)
    model = torch.nn.Module()
    model.backbone = build_backbone(cfg)
    return model.eval()
