"""`--import`: make the user's backbone registered before a config is built.

A spec is a module name (`dimaskdino.modeling.backbone.convnext`) or a path to a `.py` file
(`dimaskdino/modeling/backbone/convnext.py`).  A file is loaded as a module of its own, so its
package's `__init__` does not run.  That is the CPU-only CI case: DI-MaskDINO's `__init__` imports
the whole model, including CUDA-only compiled ops a runner without a GPU cannot have, while the
backbone file needs only torch, timm and `detectron2.modeling`.

Every failure is an `UnusableImport` (exit 2) whose two lines name the spec and the cause.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from types import ModuleType
from typing import Optional, Sequence, Set

from .errors import UnusableImport, describe_exception

# A file already loaded (by resolved path) is not executed again: a second
# `@BACKBONE_REGISTRY.register()` of the same class would make Detectron2's registry raise, and
# a test suite calls the gate many times in one process.
_LOADED_FILES: Set[str] = set()

_FILE_HINT = "Pass the backbone's own .py file instead (e.g. --import path/to/backbone.py): it is loaded without its package."


def is_file_spec(spec: str) -> bool:
    """A path (ends in .py or names a directory separator), not a dotted module name."""
    return spec.endswith(".py") or os.sep in spec or (os.altsep is not None and os.altsep in spec)


def _import_detectron2() -> None:
    """Import Detectron2's modeling first, as verify does: the user's module then finds it imported."""
    from .d2_loading import import_modeling

    try:
        import_modeling()
    except ImportError as err:
        raise UnusableImport(
            f"--import needs Detectron2, which does not import here ({describe_exception(err)}).",
            "Install Detectron2 in this environment (its registry is what --import fills).",
        ) from None


def _missing_module(err: BaseException) -> Optional[str]:
    """The module whose absence caused `err`, looking through re-raised errors.

    MaskDINO-style code catches the ModuleNotFoundError of its compiled op and raises a new one
    with build instructions and no `.name`; the original is its `__context__`.
    """
    seen = 0
    current: Optional[BaseException] = err
    while current is not None and seen < 20:
        if isinstance(current, ModuleNotFoundError) and current.name:
            return current.name
        current = current.__cause__ or current.__context__
        seen += 1
    return None


def _module_name_for(path: str) -> str:
    """A name of its own for a loaded file: its stem plus a digest of its path, never a real package's."""
    stem = os.path.splitext(os.path.basename(path))[0]
    digest = hashlib.sha1(path.encode("utf-8")).hexdigest()[:10]
    return f"convnext_d2_import_{stem}_{digest}"


def load_file(path: str) -> None:
    """Execute one `.py` file as its own module (its package's `__init__` is not run); it must register
    something new in Detectron2's BACKBONE_REGISTRY (or META_ARCH_REGISTRY), or it is the wrong file."""
    from .d2_loading import registered_names  # torch and Detectron2 are imported by now

    if not os.path.exists(path):
        raise UnusableImport(f"--import {path}: no such file.", "Check the path (relative to the current directory).")
    if os.path.isdir(path):
        raise UnusableImport(f"--import {path}: is a directory, not a .py file.", "Pass the backbone's .py file itself.")
    resolved = os.path.realpath(path)
    if resolved in _LOADED_FILES:
        return
    before = registered_names()
    name = _module_name_for(resolved)
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None:
        raise UnusableImport(f"--import {path}: not a Python source file.", "Pass the backbone's .py file.")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses, pickling and typing look the module up while it runs
    try:
        spec.loader.exec_module(module)
    except SyntaxError as err:
        sys.modules.pop(name, None)
        raise UnusableImport(
            f"--import {path}: syntax error on line {err.lineno}: {err.msg}.", "Fix the file (or pass the right one)."
        ) from None
    except Exception as err:  # the user's code raising anything is the same fact for them
        sys.modules.pop(name, None)
        missing = _missing_module(err)
        if missing is not None:
            raise UnusableImport(
                f"--import {path}: it imports '{missing}', which is not installed here ({describe_exception(err)}).",
                f"Install {missing}, or pass a file that does not need it.",
            ) from None
        if isinstance(err, ImportError) and "relative import" in str(err):
            raise UnusableImport(
                f"--import {path}: it uses a relative import, which needs its package ({describe_exception(err)}).",
                "Import the module by name instead (its package's __init__ then runs), or make its imports absolute.",
            ) from None
        raise UnusableImport(f"--import {path}: running it raised {describe_exception(err)}.", "Fix the file (or pass the right one).") from None
    if not registered_names() - before:
        raise UnusableImport(
            f"--import {path}: the file registers no backbone (nothing new in Detectron2's BACKBONE_REGISTRY).",
            "Pass the file that holds the @BACKBONE_REGISTRY.register() of your backbone.",
        )
    _LOADED_FILES.add(resolved)


def import_module_spec(name: str) -> ModuleType:
    """Import a module by name; a missing dependency is named, with the file-path way out."""
    try:
        return importlib.import_module(name)
    except Exception as err:
        missing = _missing_module(err)
        if missing is not None and (missing == name or name.startswith(missing + ".")):
            raise UnusableImport(
                f"--import {name}: cannot import it: no module named '{missing}' here.",
                "Run from the directory that makes it importable (or set PYTHONPATH), or pass the backbone's .py file.",
            ) from None
        if missing is not None:
            raise UnusableImport(
                f"--import {name}: cannot import it: it needs module '{missing}', which is missing here "
                f"(a compiled extension that is not built?).",
                _FILE_HINT,
            ) from None
        raise UnusableImport(f"--import {name}: cannot import it: it raised {describe_exception(err)}.", _FILE_HINT) from None


def load_imports(specs: Sequence[str]) -> None:
    """Import every spec in order so that its `@BACKBONE_REGISTRY.register()` takes effect.

    A module name is imported as Python does (its packages' `__init__` run); a path to a `.py`
    file is executed as a module of its own (`load_file`).

    Raises:
        UnusableImport: a spec that cannot be used (exit 2), naming it and the cause.
    """
    if specs:
        _import_detectron2()
    for spec in specs:
        if is_file_spec(spec):
            load_file(spec)
        else:
            import_module_spec(spec)
