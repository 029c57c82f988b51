"""Test environment only: an empty `detectron2._C` where the compiled extension is absent.

Why this is sound: Detectron2 v0.6's `detectron2/layers/deform_conv.py` does `from detectron2 import _C`
at module level, so `import detectron2.modeling` fails without the compiled extension even though
nothing on the paths this suite exercises (configs, the backbone registry, `build_backbone`,
`DetectionCheckpointer`) calls into `_C`.  A call that did would fail loudly (AttributeError on the
empty module), never silently.  The legacy environment installs v0.6's pure Python package
(`.ci/install_detectron2_v06.py`), which has no `_C`.

A finder placed last on `sys.meta_path` answers only for `detectron2._C`, only after every real
finder missed it, and imports nothing itself: a compiled `_C` always wins, and an interpreter that
never imports detectron2 is unaffected.  The root conftest installs it in the pytest process and
puts this directory on PYTHONPATH where detectron2 has no compiled `_C`, so that the suite's
subprocesses (the CLI, a downstream example's pytest) get the same placeholder.  Being named
`sitecustomize`, it would shadow another one on the path; the project's environments have none.
"""
import importlib.abc
import importlib.machinery
import sys

PLACEHOLDER = "detectron2._C"


class _EmptyModuleLoader(importlib.abc.Loader):
    def create_module(self, spec):
        return None  # the default: an empty module

    def exec_module(self, module):
        module.__doc__ = "empty placeholder for Detectron2's compiled ops (not built here; tests only)"


class PlaceholderFinder(importlib.abc.MetaPathFinder):
    """Finds `detectron2._C` as an empty module, and nothing else."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != PLACEHOLDER:
            return None
        return importlib.machinery.ModuleSpec(fullname, _EmptyModuleLoader(), origin="convnext-d2 test placeholder")


def install_placeholder():
    if not any(isinstance(f, PlaceholderFinder) for f in sys.meta_path):
        sys.meta_path.append(PlaceholderFinder())


install_placeholder()
