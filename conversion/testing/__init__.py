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

Importing this package imports torch only (never detectron2 or hypothesis).
"""
from __future__ import annotations

from .gate import assert_loads_clean
from .synthetic import in_layout, resolve_architecture, synthetic_layouts, synthetic_state_dict, wrap, write_synthetic_checkpoint

__all__ = [
    "assert_loads_clean",
    "in_layout",
    "resolve_architecture",
    "synthetic_layouts",
    "synthetic_state_dict",
    "wrap",
    "write_synthetic_checkpoint",
]
