"""examples/dimaskdino-ci, the worked downstream project: its own pytest (written with
`conversion.testing`) passes with good weights and fails, naming the problem, with each broken kind;
`convnext-d2 verify --import path/to/backbone.py` gates it without importing its package, whose
`__init__` needs a compiled op that does not exist."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Tuple

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


# The example's own pytest, once per weights file, all in one interpreter: each session is a fresh
# `pytest.main` (its test module imported anew, so it reads DIMASKDINO_WEIGHTS again), and the
# interpreter's start (torch, Detectron2: seconds) is paid once instead of once per file.
_SESSIONS = r"""
import contextlib, io, json, os, sys
import pytest
results = []
for weights in json.loads(sys.argv[1]):
    os.environ["DIMASKDINO_WEIGHTS"] = weights
    sys.modules.pop("test_pretrained_weights", None)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = pytest.main(["-p", "no:cacheprovider", "-p", "conversion.testing.plugin", "-rA"])
    results.append({"status": int(status), "stdout": out.getvalue()})
print(json.dumps(results))
"""


def run_example_pytest(project: Path, *weights: str) -> List[Tuple[int, str]]:
    """(exit status, stdout) of the example's own `pytest` for each weights file, with convnext-d2
    importable and its plugin loaded as an install would."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.pop("PYTEST_ADDOPTS", None)
    done = subprocess.run([sys.executable, "-c", _SESSIONS, json.dumps(list(weights))], cwd=project, env=env,
                          capture_output=True, text=True, timeout=PYTEST_TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [(r["status"], r["stdout"]) for r in json.loads(done.stdout.strip().splitlines()[-1])]


@pytest.fixture(scope="module")
def example_runs(project: Path, good_weights: str, tmp_path_factory) -> Dict[str, Tuple[int, str]]:
    """The example's pytest on the good weights and on each broken kind: kind -> (exit status, stdout)."""
    folder = tmp_path_factory.mktemp("broken")
    files = {"good": good_weights}
    files.update({kind: write_synthetic_checkpoint(folder / f"{kind}.pth", **options) for kind, (options, _) in BROKEN.items()})
    return dict(zip(files, run_example_pytest(project, *files.values())))


def test_the_packages_init_really_cannot_be_imported_here(project):
    """The premise: importing the example's package fails for want of its compiled op."""
    code = "import dimaskdino_ci.modeling.backbone.convnext"
    out = subprocess.run([sys.executable, "-c", code], cwd=project, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])))
    assert out.returncode != 0 and "Please compile MultiScaleDeformableAttention" in out.stderr, out.stderr


def test_the_examples_pytest_passes_with_good_weights(example_runs):
    status, stdout = example_runs["good"]
    assert status == 0, stdout
    assert "2 passed" in stdout.splitlines()[-1], stdout


@pytest.mark.parametrize("kind", list(BROKEN))
def test_the_examples_pytest_fails_on_each_broken_kind_naming_the_problem(example_runs, kind):
    _, problem = BROKEN[kind]
    status, stdout = example_runs[kind]
    assert status == 1, stdout
    assert "FAILED tests/test_pretrained_weights.py::test_pretrained_weights_load_into_the_backbone" in stdout
    assert "verify: FAIL:" in stdout and problem in stdout, stdout
    assert "PASSED tests/test_pretrained_weights.py::test_the_gate_rejects_weights_without_the_backbone_prefix" in stdout


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
