"""The pytest plugin (`conversion.testing.plugin`, entry point `pytest11`): inert unless given
`--convnext-d2-checkpoint`, then it adds the gate tests (`-k roundtrip` selects them) that fail with
verify's report.  Each test runs pytest in a subprocess on a throwaway suite, as another project would."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import List, Optional

import pytest

from conversion.architecture import Architecture
from conversion.testing import write_synthetic_checkpoint

from ..support import plugin_option_names, require

ROOT = Path(__file__).resolve().parents[2]
PLUGIN = "conversion.testing.plugin"
SMALL = Architecture((1, 1, 2, 1), (8, 16, 24, 32), num_classes=5, classifier_norm=True)
# pytest + torch (+ detectron2) start in a few seconds; a hung one must not hang the suite.
PYTEST_TIMEOUT_S = 300

# Another project's suite: one passing test, one skipped, one using the plugin's builder fixture.
OTHER_SUITE = {
    "pytest.ini": "[pytest]\n",
    "test_other.py": """
        import pytest

        def test_other_project_passes():
            assert 1 + 1 == 2

        @pytest.mark.skip(reason="unrelated skip")
        def test_other_project_skips():
            pass
        """,
}


def _suite(root: Path, files=OTHER_SUITE) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (root / name).write_text(textwrap.dedent(text))
    return root


def run_pytest(cwd: Path, *args: str, plugin: Optional[bool] = True, python: str = sys.executable) -> subprocess.CompletedProcess:
    """pytest in `cwd` with this checkout importable; `plugin` loads it as an installed entry point would,
    `plugin=False` blocks it (it may be installed, as in tox, where the entry point loads it anyway), and
    `plugin=None` leaves it to the run (this checkout's conftest loads it)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.pop("PYTEST_ADDOPTS", None)
    command = [python, "-m", "pytest", "-p", "no:cacheprovider", "-rA"] + ([] if plugin is None else ["-p", PLUGIN if plugin else "no:" + PLUGIN]) + list(args)
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=PYTEST_TIMEOUT_S)


def _outcomes(output: str) -> List[str]:
    """The per-test outcome lines of `-rA` (PASSED/SKIPPED/FAILED ...), without durations."""
    lines = [line for line in output.splitlines() if re.match(r"(PASSED|FAILED|SKIPPED|ERROR) ", line)]
    # pytest shows node ids relative to where it runs; the gate's ids are not under a file (`../convnext-d2::`).
    return sorted(re.sub(r"^(\w+) (\.\./)+", r"\1 ", re.sub(r" in [0-9.]+s.*| - .*", "", line)) for line in lines)


def _summary(output: str) -> str:
    last = output.strip().splitlines()[-1]
    return re.sub(r" in [0-9.]+s.*", "", last)


def test_the_plugin_is_inert_without_its_options(tmp_path):
    """Loaded but not asked: the other suite's tests, outcomes and header are exactly as without it."""
    suite = _suite(tmp_path / "other")
    with_plugin, without = run_pytest(suite), run_pytest(suite, plugin=False)
    assert with_plugin.returncode == without.returncode == 0, with_plugin.stdout + with_plugin.stderr
    assert _outcomes(with_plugin.stdout) == _outcomes(without.stdout) != []
    assert _summary(with_plugin.stdout) == _summary(without.stdout)
    assert "1 passed, 1 skipped" in _summary(without.stdout)
    # pytest's "plugins:" line names every installed plugin's distribution (so it names convnext-d2
    # where the package is installed, as in tox); nothing else may mention it.
    shown = "\n".join(line for line in with_plugin.stdout.splitlines() if not line.startswith("plugins:"))
    assert "convnext" not in shown.lower(), with_plugin.stdout
    collected = run_pytest(suite, "--collect-only", "-q"), run_pytest(suite, "--collect-only", "-q", plugin=False)
    assert collected[0].stdout.splitlines()[:2] == collected[1].stdout.splitlines()[:2]


def test_the_options_are_namespaced():
    """Only `--convnext-d2-*` options: nothing another plugin or suite might also define."""
    names = plugin_option_names()
    assert names and all(n.startswith("--convnext-d2-") for n in names), names
    assert {"--convnext-d2-checkpoint", "--convnext-d2-config", "--convnext-d2-import", "--convnext-d2-source"} <= set(names)


@pytest.fixture
def d2():
    return require("detectron2")


def test_the_gate_tests_pass_on_a_good_file_and_k_roundtrip_selects_them(tmp_path, d2):
    suite = _suite(tmp_path / "other")
    good = write_synthetic_checkpoint(tmp_path / "good.pth", layout="detectron2", variant=SMALL)
    result = run_pytest(suite, "--convnext-d2-checkpoint", good, "-k", "roundtrip")
    assert result.returncode == 0, result.stdout + result.stderr
    assert _outcomes(result.stdout) == ["PASSED convnext-d2::test_convnext_d2_roundtrip_checkpoint_loads_clean"], result.stdout
    assert f"convnext-d2 gate: {good}" in result.stdout, "the header says what is gated"


def test_the_gate_test_fails_on_a_bad_file_with_verifys_report(tmp_path, d2):
    suite = _suite(tmp_path / "other")
    raw = write_synthetic_checkpoint(tmp_path / "raw.pth", layout="official", variant=SMALL)
    result = run_pytest(suite, "--convnext-d2-checkpoint", raw)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAILED convnext-d2::test_convnext_d2_roundtrip_checkpoint_loads_clean" in _outcomes(result.stdout)
    assert "verify: FAIL:" in result.stdout and "backbone weights missing" in result.stdout, result.stdout
    assert "PASSED test_other.py::test_other_project_passes" in _outcomes(result.stdout), "the project's own tests still run"
    assert "plugin.py" not in result.stdout, "no traceback into the plugin: the report says it all"


def test_a_missing_checkpoint_fails_the_gate_test_with_the_cli_message(tmp_path, d2):
    suite = _suite(tmp_path / "other")
    missing = str(tmp_path / "nope.pth")
    result = run_pytest(suite, "--convnext-d2-checkpoint", missing)
    assert result.returncode == 1 and "INTERNAL" not in result.stdout + result.stderr, result.stdout + result.stderr
    assert f"convnext-d2: error: {missing}: no such file." in result.stdout, result.stdout


def test_the_gate_compares_features_with_a_source(tmp_path, d2):
    suite = _suite(tmp_path / "other")
    source = write_synthetic_checkpoint(tmp_path / "source.pth", layout="timm", variant=SMALL)
    good = write_synthetic_checkpoint(tmp_path / "good.pth", layout="detectron2", variant=SMALL)
    other = write_synthetic_checkpoint(tmp_path / "other.pth", layout="timm", variant=SMALL, seed=7)
    passed = run_pytest(suite, "--convnext-d2-checkpoint", good, "--convnext-d2-source", source, "-k", "roundtrip")
    assert passed.returncode == 0, passed.stdout
    assert "PASSED convnext-d2::test_convnext_d2_roundtrip_features_equal_the_source" in _outcomes(passed.stdout), passed.stdout
    failed = run_pytest(suite, "--convnext-d2-checkpoint", good, "--convnext-d2-source", other, "-k", "features")
    assert failed.returncode == 1 and "features differ from the source" in failed.stdout, failed.stdout


def test_the_builder_fixture_writes_into_the_tests_tmp_path(tmp_path):
    suite = _suite(tmp_path / "other", {
        "pytest.ini": "[pytest]\n",
        "test_builder.py": """
            import os

            def test_builder(convnext_d2_write_checkpoint, tmp_path):
                path = convnext_d2_write_checkpoint("w.pth", layout="timm", variant="convnext_atto")
                assert os.path.dirname(path) == str(tmp_path) and os.path.getsize(path) > 1000

            def test_gate_fixture_skips_without_a_checkpoint(convnext_d2_gate):
                raise AssertionError("not reached")
            """,
    })
    result = run_pytest(suite)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PASSED test_builder.py::test_builder" in result.stdout
    assert "no --convnext-d2-checkpoint given" in result.stdout


def test_this_repositorys_old_option_names_still_work(tmp_path, d2):
    """`pytest --checkpoint FILE` in this checkout is the plugin's `--convnext-d2-checkpoint`."""
    raw = write_synthetic_checkpoint(tmp_path / "raw.pth", layout="official", variant=SMALL)
    result = run_pytest(ROOT, "tests/unit/test_architecture.py", "--checkpoint", raw, "-k", "roundtrip", plugin=None)
    assert result.returncode == 1, result.stdout
    assert "FAILED convnext-d2::test_convnext_d2_roundtrip_checkpoint_loads_clean" in _outcomes(result.stdout), result.stdout


@pytest.mark.slow
def test_installing_the_package_registers_the_plugin_and_changes_no_other_suite(tmp_path):
    """A real install (a wheel built from this checkout, installed into its own site directory): the
    entry point loads the plugin, and another project's run is the same as with the plugin disabled."""
    site, source = tmp_path / "site", tmp_path / "source"
    # Built from a copy: pip (or an old setuptools) leaves build/ and *.egg-info in the tree it builds,
    # and an egg-info in this checkout would register the entry point for every run from here.
    source.mkdir()
    shutil.copytree(ROOT / "conversion", source / "conversion", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(site), str(source)],
        cwd=tmp_path, capture_output=True, text=True, timeout=PYTEST_TIMEOUT_S,
    )
    assert install.returncode == 0, install.stderr
    assert (site / "conversion" / "testing" / "plugin.py").is_file(), "the wheel lacks conversion.testing"
    suite = _suite(tmp_path / "other")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_ADDOPTS", "PYTEST_PLUGINS")}
    # Only the installed copy is importable (not this checkout), as for another project.
    env["PYTHONPATH"] = os.pathsep.join([str(site)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", *args], cwd=suite, env=env,
                              capture_output=True, text=True, timeout=PYTEST_TIMEOUT_S)

    assert "--convnext-d2-checkpoint" in run("--help").stdout, "the pytest11 entry point did not load the plugin"
    assert "--convnext-d2-checkpoint" not in run("--help", "-p", f"no:{PLUGIN}").stdout
    installed, disabled = run(), run("-p", f"no:{PLUGIN}")
    assert installed.returncode == disabled.returncode == 0, installed.stdout + installed.stderr
    assert _outcomes(installed.stdout) == _outcomes(disabled.stdout) != []
    assert _summary(installed.stdout) == _summary(disabled.stdout)
    # pytest lists every installed plugin by its distribution; apart from that line the header is the same.
    header = [line for line in installed.stdout.splitlines()[:6] if not line.startswith("plugins:")]
    assert header == [line for line in disabled.stdout.splitlines()[:6] if not line.startswith("plugins:")]
    assert "convnext-d2-0.1.0" in next(line for line in installed.stdout.splitlines() if line.startswith("plugins:"))
