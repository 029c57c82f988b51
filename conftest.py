"""Root conftest: hypothesis profiles, the gpu marker's skip, and the full-environment rule.

Profiles (pick with HYPOTHESIS_PROFILE; tox sets `ci`):
- dev: quick local runs, random examples.
- ci (the default): derandomized and bounded, so the suite is repeatable and fits its time budget.
- nightly: many more examples, random seeds.
"""
from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

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
    group = parser.getgroup("convnext-d2 gate", "run the round-trip gate against your own files")
    group.addoption("--checkpoint", metavar="PATH", help="a converted Detectron2 checkpoint to gate (enables the gate tests)")
    group.addoption("--d2-config", metavar="YAML", help="the training config whose backbone the checkpoint is for")
    group.addoption("--import", dest="d2_import", metavar="MODULE", action="append", default=[],
                    help="module that registers your backbone (e.g. DI-MaskDINO's); repeatable")
    group.addoption("--source", metavar="PATH", help="the original checkpoint: also compare features")


def pytest_report_header(config: pytest.Config) -> str:
    import torch

    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA (gpu tests skip)"
    full = "full environment (missing libraries fail)" if os.environ.get("CONVNEXT_D2_FULL") else "partial environment"
    return f"convnext-d2: torch {torch.__version__}, {cuda}, hypothesis profile {settings._current_profile}, {full}"


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA: torch.cuda.is_available() is False on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
