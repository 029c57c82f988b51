"""examples/dimaskdino-ci, the worked downstream project: its own pytest (written with
`conversion.testing`) passes with good weights and fails, naming the problem, with each broken kind;
`convnext-d2 verify --import path/to/backbone.py` gates it without importing its package, whose
`__init__` needs a compiled op that does not exist."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conversion.testing import write_synthetic_checkpoint

from ..support import require
from ..cli.test_cli import assert_plain_error, run_cli

require("detectron2")

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "dimaskdino-ci"
BACKBONE_FILE = Path("dimaskdino_ci") / "modeling" / "backbone" / "convnext.py"
CONFIG = Path("configs") / "dimaskdino_convnext_tiny.yaml"
PYTEST_TIMEOUT_S = 600

# Each broken kind, and what the example's failing test must say about it (verify's first line).
BROKEN = {
    "official-names-without-prefix": (dict(layout="official"), "backbone weights missing"),
    "timm-names": (dict(layout="timm", prefix="backbone."), "backbone weights missing"),
    "another-variant": (dict(layout="detectron2", variant="convnext_base"), "skipped for a shape mismatch"),
    "v2-file-for-the-v1-config": (dict(layout="detectron2", version=2), "backbone.stages.0.0.gamma"),
}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A copy of the example, so that its runs write nothing into this checkout."""
    copy = tmp_path_factory.mktemp("example") / "dimaskdino-ci"
    shutil.copytree(EXAMPLE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


@pytest.fixture(scope="module")
def good_weights(tmp_path_factory) -> str:
    """What `convnext-d2 convert convnext_tiny_22k_1k_224.pth ...` writes (ConvNeXt-Tiny)."""
    return write_synthetic_checkpoint(tmp_path_factory.mktemp("weights") / "convnext_tiny_d2.pth", layout="detectron2")


def run_example_pytest(project: Path, weights: str) -> subprocess.CompletedProcess:
    """The example's own `pytest`, with convnext-d2 importable and its plugin loaded as an install would."""
    env = dict(os.environ, DIMASKDINO_WEIGHTS=weights)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.pop("PYTEST_ADDOPTS", None)
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "conversion.testing.plugin", "-rA"]
    return subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, timeout=PYTEST_TIMEOUT_S)


def test_the_packages_init_really_cannot_be_imported_here(project):
    """The premise: importing the example's package fails for want of its compiled op."""
    code = "import dimaskdino_ci.modeling.backbone.convnext"
    out = subprocess.run([sys.executable, "-c", code], cwd=project, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])))
    assert out.returncode != 0 and "Please compile MultiScaleDeformableAttention" in out.stderr, out.stderr


def test_the_examples_pytest_passes_with_good_weights(project, good_weights):
    result = run_example_pytest(project, good_weights)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout.splitlines()[-1], result.stdout


@pytest.mark.parametrize("kind", list(BROKEN))
def test_the_examples_pytest_fails_on_each_broken_kind_naming_the_problem(project, tmp_path, kind):
    options, problem = BROKEN[kind]
    broken = write_synthetic_checkpoint(tmp_path / f"{kind}.pth", **options)
    result = run_example_pytest(project, broken)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAILED tests/test_pretrained_weights.py::test_pretrained_weights_load_into_the_backbone" in result.stdout
    assert "verify: FAIL:" in result.stdout and problem in result.stdout, result.stdout
    assert "PASSED tests/test_pretrained_weights.py::test_the_gate_rejects_weights_without_the_backbone_prefix" in result.stdout


def test_cli_verify_gates_the_example_through_the_backbone_file(project, good_weights, tmp_path):
    """The one line of the CPU-runner workflow: exit 0 for good weights, 1 for broken ones."""
    good = run_cli("verify", good_weights, "--config", CONFIG, "--import", BACKBONE_FILE, cwd=project)
    assert good.returncode == 0, good.stdout + good.stderr
    assert good.stdout.startswith("verify: OK") and "D2ConvNeXt" in good.stdout, good.stdout
    raw = write_synthetic_checkpoint(tmp_path / "raw.pth", layout="official")
    bad = run_cli("verify", raw, "--config", CONFIG, "--import", BACKBONE_FILE, cwd=project)
    assert bad.returncode == 1 and bad.stdout.startswith("verify: FAIL:"), bad.stdout + bad.stderr


def test_cli_verify_with_the_module_name_names_the_missing_op_and_the_way_out(project, good_weights):
    result = run_cli("verify", good_weights, "--config", CONFIG, "--import", "dimaskdino_ci.modeling.backbone.convnext",
                     cwd=project)
    assert result.returncode == 2, result.stdout + result.stderr
    assert_plain_error(result.stderr)
    assert "'DIMaskDINOMSDeformAttn'" in result.stderr and str(BACKBONE_FILE).endswith("convnext.py")
    assert "pass the backbone's own .py file" in result.stderr.lower(), result.stderr
