"""Root conftest: hypothesis profiles, the gpu marker's skip, the full-environment rule, the
`detectron2._C` placeholder of the legacy environment, and the old names of the gate options.

Profiles (pick with HYPOTHESIS_PROFILE; tox sets `ci`):
- dev: quick local runs, random examples.
- ci (the default): derandomized and bounded, so the suite is repeatable and fits its time budget.
- nightly: many more examples, random seeds.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# The gate tests, fixtures and namespaced options are the package's pytest plugin, the one a
# downstream suite gets by installing convnext-d2 (entry point named like the module, so that an
# installed copy and this line are the same plugin, registered once).
pytest_plugins = ["conversion.testing.plugin"]

# Detectron2 v0.6 (legacy environment) has no compiled `detectron2._C`; an empty placeholder, for
# this process and (through PYTHONPATH) its subprocesses.  Why that is sound: the file's docstring.
_PLACEHOLDER_SITE = Path(__file__).resolve().parent / "tests" / "d2_placeholder"


def _detectron2_lacks_compiled_ops() -> bool:
    """Detectron2 is installed without a built `_C` (looked up on disk: nothing is imported)."""
    spec = importlib.util.find_spec("detectron2")
    if spec is None or not spec.submodule_search_locations:
        return False
    return not any(any(Path(p).glob("_C*")) for p in spec.submodule_search_locations)


def _install_d2_placeholder() -> None:
    if not _detectron2_lacks_compiled_ops():
        return
    spec = importlib.util.spec_from_file_location("convnext_d2_placeholder", _PLACEHOLDER_SITE / "sitecustomize.py")
    assert spec is not None and spec.loader is not None
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    paths = [str(_PLACEHOLDER_SITE)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))


_install_d2_placeholder()

# Building state dicts and writing files makes examples slower than hypothesis expects:
# deadlines would flake on a loaded 2-core CI machine, so they are off everywhere.
# too_slow is suppressed for the same reason (the data generation includes torch tensors).
_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=10, **_COMMON)
settings.register_profile("ci", max_examples=25, derandomize=True, print_blob=True, **_COMMON)
settings.register_profile("nightly", max_examples=400, **_COMMON)
# Deterministic unless asked otherwise: a plain `pytest` gives the same verdict as CI.
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_addoption(parser: pytest.Parser) -> None:
    # This repository's earlier names of the plugin's options, kept working: same destinations.
    group = parser.getgroup("convnext-d2 gate (this repository's short names)")
    group.addoption("--checkpoint", dest="convnext_d2_checkpoint", metavar="PATH", help="= --convnext-d2-checkpoint")
    group.addoption("--d2-config", dest="convnext_d2_config", metavar="YAML", help="= --convnext-d2-config")
    group.addoption("--import", dest="convnext_d2_import", metavar="MODULE|FILE.py", action="append", help="= --convnext-d2-import")
    group.addoption("--source", dest="convnext_d2_source", metavar="PATH", help="= --convnext-d2-source")


def _detectron2_version() -> str:
    if importlib.util.find_spec("detectron2") is None:
        return "detectron2 not installed (its tests skip)"
    import detectron2

    placeholder = " (no compiled _C: empty placeholder, tests only)" if _detectron2_lacks_compiled_ops() else ""
    return f"detectron2 {detectron2.__version__}{placeholder}"


def pytest_report_header(config: pytest.Config) -> str:
    import torch

    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA (gpu tests skip)"
    full = "full environment (missing libraries fail)" if os.environ.get("CONVNEXT_D2_FULL") else "partial environment"
    return (f"convnext-d2: torch {torch.__version__}, {_detectron2_version()}, {cuda}, "
            f"hypothesis profile {settings._current_profile}, {full}")


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA: torch.cuda.is_available() is False on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
