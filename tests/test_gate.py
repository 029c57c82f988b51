"""Gate mode: `pytest --checkpoint PATH [--d2-config YAML] [--import MODULE] [--source SRC] -k roundtrip`
runs the round trip against a user's real files (the DI-MaskDINO CI use).  Without --checkpoint these
tests skip: the synthetic round trips in test_roundtrip.py are the gate then."""
from __future__ import annotations

import pytest

from .support import require


@pytest.fixture
def gate(request):
    path = request.config.getoption("--checkpoint")
    if not path:
        pytest.skip("gate mode off: pass --checkpoint PATH (and --d2-config / --import / --source) to gate your own files")
    require("detectron2")
    return path, request.config.getoption("--d2-config"), request.config.getoption("d2_import"), request.config.getoption("--source")


def test_roundtrip_user_checkpoint_loads_with_only_fresh_output_norms_missing(gate):
    from conversion.verify import verify

    path, config, imports, _ = gate
    report = verify(path, config=config, imports=imports)
    assert report.ok, "\n".join(report.problems)
    assert report.loaded > 0 and report.missing == [] and report.unexpected == [] and report.shape_skipped == []


def test_roundtrip_user_checkpoint_features_equal_the_source(gate):
    from conversion.verify import verify

    path, config, imports, source = gate
    if not source:
        pytest.skip("pass --source ORIGINAL to compare features with the original checkpoint")
    report = verify(path, config=config, imports=imports, source=source)
    assert report.ok, "\n".join(report.problems)
    assert report.feature_difference is not None and report.feature_difference <= 1e-4
