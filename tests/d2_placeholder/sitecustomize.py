"""Test environment only: an empty `detectron2._C` where the compiled extension is absent.

Why this is sound: Detectron2 v0.6's `detectron2/layers/deform_conv.py` does `from detectron2 import _C`
at module level, so `import detectron2.modeling` fails without the compiled extension even though
nothing on the paths this suite exercises (configs, the backbone registry, `build_backbone`,
`build_model` of a model without deformable ops, `DetectionCheckpointer`) calls into `_C`.  A call
that did would fail loudly (AttributeError on the empty module), never silently.  The legacy
environment installs v0.6's pure Python package (`.ci/install_detectron2_v06.py`), which has no `_C`.

The root conftest runs this file in the pytest process and puts this directory on PYTHONPATH, so
that the suite's subprocesses (the CLI, a downstream example's pytest) get the same placeholder.
Nothing happens where `detectron2._C` exists (the full environment) or detectron2 is not installed.
"""
import importlib.util
import sys
import types


def install_placeholder() -> bool:
    """Make `detectron2._C` importable as an empty module if it is missing; True if it did."""
    if "detectron2._C" in sys.modules or importlib.util.find_spec("detectron2") is None:
        return False
    if importlib.util.find_spec("detectron2._C") is not None:
        return False
    import detectron2

    placeholder = types.ModuleType("detectron2._C", "empty placeholder: the compiled ops are not built here")
    sys.modules["detectron2._C"] = placeholder
    detectron2._C = placeholder
    return True


install_placeholder()
