"""Test helpers for suites that use convnext-d2 (the way `numpy.testing` and `torch.testing` serve theirs).

- `assert_loads_clean(checkpoint, config=None, imports=(), source=None, strict=False)`: the `verify`
  gate as an assertion; the AssertionError's message is verify's human report.
- `write_synthetic_checkpoint(path, layout="official", variant="convnext_tiny", ...)`: a deterministic
  file in a library's real layout, built through the layout tables' inverse.
- `conversion.testing.strategies`: hypothesis strategies (needs hypothesis: `pip install convnext-d2[testing]`).
- `conversion.testing.plugin`: the pytest plugin (installed as the `pytest11` entry point); inert
  unless given `--convnext-d2-checkpoint`.
- `conversion.testing.loading`: load a file through the real `DetectionCheckpointer` (the harness
  `verify` uses, `conversion.d2_loading`) and assert on what it did.

Importing this package imports nothing heavy: its names are loaded on first use (PEP 562), so
that the pytest plugin, a submodule, costs another project's run no torch import while it is not
asked for anything.  Using a name imports torch (never detectron2 or hypothesis).
"""
from __future__ import annotations

from importlib import import_module
from typing import Any

# public name -> the submodule that defines it
_EXPORTS = {
    "assert_loads_clean": "gate",
    "in_layout": "synthetic",
    "resolve_architecture": "synthetic",
    "synthetic_layouts": "synthetic",
    "synthetic_state_dict": "synthetic",
    "wrap": "synthetic",
    "write_synthetic_checkpoint": "synthetic",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list:
    return sorted(set(globals()) | set(_EXPORTS))
