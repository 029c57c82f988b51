"""examples/dimaskdino-ci, the worked downstream project: its own pytest (written with
`conversion.testing`) passes with good weights and fails, naming the problem, with each broken kind;
`convnext-d2 verify --import path/to/backbone.py` gates it without importing its package, whose
`__init__` needs a compiled op that does not exist."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Dict, Tuple

import pytest

from conversion.testing import write_synthetic_checkpoint

from ..support import require
from ..support.cli import ROOT, assert_plain_error
from .interpreter import Outcome, Step, run_in_one_interpreter, shared_interpreter

require("detectron2")

EXAMPLE = ROOT / "examples" / "dimaskdino-ci"
BACKBONE_FILE = Path("dimaskdino_ci") / "modeling" / "backbone" / "convnext.py"
CONFIG = Path("configs") / "dimaskdino_convnext_tiny.yaml"

# Each broken kind, and what the example's failing test must say about it (verify's first line).
# Each is ConvNeXt-Tiny broken in one way, but for the other variant: ConvNeXt-Atto (other widths and
# depths, an eighth of Tiny's bytes) mismatches the Tiny config as much as a larger one would.
BROKEN = {
    "official-names-without-prefix": (dict(layout="official"), "backbone weights missing"),
    "timm-names": (dict(layout="timm", prefix="backbone."), "backbone weights missing"),
    "another-variant": (dict(layout="detectron2", variant="convnext_atto"), "skipped for a shape mismatch"),
    "v2-file-for-the-v1-config": (dict(layout="detectron2", version=2), "backbone.stages.0.0.gamma"),
}
TEST_FILE = "tests/test_pretrained_weights.py"
LOADS_TEST = f"{TEST_FILE}::test_pretrained_weights_load_into_the_backbone"
REJECTS_TEST = f"{TEST_FILE}::test_the_gate_rejects_weights_without_the_backbone_prefix"
MODULE = "dimaskdino_ci.modeling.backbone.convnext"


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A copy of the example, so that its runs write nothing into this checkout."""
    copy = tmp_path_factory.mktemp("example") / "dimaskdino-ci"
    shutil.copytree(EXAMPLE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Dict[str, str]:
    """The good file (what `convnext-d2 convert convnext_tiny_22k_1k_224.pth ...` writes, ConvNeXt-Tiny)
    and each broken kind: kind -> path."""
    folder = tmp_path_factory.mktemp("weights")
    files = {"good": write_synthetic_checkpoint(folder / "convnext_tiny_d2.pth", layout="detectron2")}
    files.update({kind: write_synthetic_checkpoint(folder / f"{kind}.pth", **options) for kind, (options, _) in BROKEN.items()})
    return files


def _verify(weights_file: str, backbone: object) -> Tuple[str, ...]:
    return ("verify", weights_file, "--config", str(CONFIG), "--import", str(backbone))


@pytest.fixture(scope="module")
def runs(project: Path, weights: Dict[str, str], tmp_path_factory) -> Dict[str, Outcome]:
    """The CPU-runner workflow's two steps, in one interpreter (CI starts a process for each; here a
    start of torch and Detectron2 is paid once): the one-line `convnext-d2 verify` (first, so that it
    loads the backbone file itself) on the good and on a raw file, then the example's own pytest (a fresh `pytest.main` per weights file, its test module
    imported anew so that it reads DIMASKDINO_WEIGHTS again).  The example's second test does not read
    the weights: it runs in the good file's session only, the broken kinds' sessions run the first."""
    steps = {
        "cli-good": Step("cli", project, _verify(weights["good"], BACKBONE_FILE)),
        "cli-raw": Step("cli", project, _verify(weights["official-names-without-prefix"], BACKBONE_FILE)),
    }
    for kind in ["good"] + list(BROKEN):
        selected = () if kind == "good" else (LOADS_TEST,)
        steps[kind] = Step("pytest", project, selected, env=(("DIMASKDINO_WEIGHTS", weights[kind]),),
                           fresh_modules=("test_pretrained_weights",))
    return run_in_one_interpreter(steps, tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def package_import(project: Path, weights: Dict[str, str], tmp_path_factory) -> Dict[str, Outcome]:
    """Importing the example's package by name, not where `runs` loaded the backbone file: the package's
    `__init__` imports (and so registers) the backbone before it fails, which would be a second
    registration there.  It runs in the interpreter the gate's tests share, which never loads that
    file: first `convnext-d2 verify --import MODULE` as a user runs it, then the plain `import MODULE`
    (which runs the package's `__init__` again: it fails again)."""
    steps = {
        "cli": Step("cli", project, _verify(weights["good"], MODULE)),
        "import": Step("import", project, (MODULE,)),
    }
    return shared_interpreter().run(steps, tmp_path_factory.mktemp("package"))


def test_the_packages_init_really_cannot_be_imported_here(package_import):
    """The premise: importing the example's package fails for want of its compiled op."""
    out = package_import["import"]
    assert out.status == 1 and "Please compile MultiScaleDeformableAttention" in out.stderr, out.stderr


def test_the_examples_pytest_passes_with_good_weights(runs):
    result = runs["good"]
    assert result.status == 0, result.stdout + result.stderr
    assert f"PASSED {LOADS_TEST}" in result.stdout and f"PASSED {REJECTS_TEST}" in result.stdout, result.stdout
    assert "2 passed" in result.stdout.splitlines()[-1], result.stdout


@pytest.mark.parametrize("kind", list(BROKEN))
def test_the_examples_pytest_fails_on_each_broken_kind_naming_the_problem(runs, kind):
    _, problem = BROKEN[kind]
    result = runs[kind]
    assert result.status == 1, result.stdout + result.stderr
    assert f"FAILED {LOADS_TEST}" in result.stdout, result.stdout
    assert "verify: FAIL:" in result.stdout and problem in result.stdout, result.stdout


def test_cli_verify_gates_the_example_through_the_backbone_file(runs):
    """The one line of the CPU-runner workflow: exit 0 for good weights, 1 for broken ones."""
    good = runs["cli-good"]
    assert good.status == 0, good.stdout + good.stderr
    assert good.stdout.startswith("verify: OK") and "D2ConvNeXt" in good.stdout, good.stdout
    bad = runs["cli-raw"]
    assert bad.status == 1 and bad.stdout.startswith("verify: FAIL:"), bad.stdout + bad.stderr


def test_cli_verify_with_the_module_name_names_the_missing_op_and_the_way_out(package_import):
    result = package_import["cli"]
    assert result.status == 2, result.stdout + result.stderr
    assert_plain_error(result.stderr)
    assert "'DIMaskDINOMSDeformAttn'" in result.stderr and str(BACKBONE_FILE).endswith("convnext.py")
    assert "pass the backbone's own .py file" in result.stderr.lower(), result.stderr
