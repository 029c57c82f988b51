"""The pytest plugin (`conversion.testing.plugin`, entry point `pytest11`): inert unless given
`--convnext-d2-checkpoint`, then it adds the gate tests (`-k roundtrip` selects them) that fail with
verify's report.  Each test runs pytest in a subprocess on a throwaway suite, as another project would."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

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


# Several pytest sessions in one interpreter: each a fresh `pytest.main` in its own folder, the
# interpreter's start (torch, Detectron2: seconds) paid once.  Used for the gate's verdicts; the plugin's
# inertness is checked in separate processes (a session after another could hide an import side effect).
_SESSIONS = r"""
import contextlib, io, json, os, sys
import pytest
results = []
for cwd, args in json.loads(sys.argv[1]):
    os.chdir(cwd)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = pytest.main(["-p", "no:cacheprovider", "-rA", "-p", "conversion.testing.plugin", *args])
    results.append({"status": int(status), "stdout": out.getvalue()})
print(json.dumps(results))
"""


def run_pytest_sessions(sessions: Dict[str, Tuple[Path, List[str]]]) -> Dict[str, Tuple[int, str]]:
    """name -> (exit status, stdout) of `pytest ARGS` in each folder, the plugin loaded as an installed entry point would."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.pop("PYTEST_ADDOPTS", None)
    plan = [(str(cwd), [str(a) for a in args]) for cwd, args in sessions.values()]
    done = subprocess.run([sys.executable, "-c", _SESSIONS, json.dumps(plan)], env=env, capture_output=True, text=True,
                          timeout=PYTEST_TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    return {name: (r["status"], r["stdout"]) for name, r in zip(sessions, results)}


@pytest.fixture(scope="module")
def gate(tmp_path_factory) -> Dict[str, Any]:
    """The gate on another project's suite: the files it is given, and each run's (exit status, stdout)."""
    require("detectron2")
    tmp = tmp_path_factory.mktemp("gate")
    suite = _suite(tmp / "other")
    files = {
        "good": write_synthetic_checkpoint(tmp / "good.pth", layout="detectron2", variant=SMALL),
        "raw": write_synthetic_checkpoint(tmp / "raw.pth", layout="official", variant=SMALL),
        "missing": str(tmp / "nope.pth"),
        "source": write_synthetic_checkpoint(tmp / "source.pth", layout="timm", variant=SMALL),
        "other": write_synthetic_checkpoint(tmp / "other.pth", layout="timm", variant=SMALL, seed=7),
    }
    runs = run_pytest_sessions({
        "good": (suite, ["--convnext-d2-checkpoint", files["good"], "-k", "roundtrip"]),
        "raw": (suite, ["--convnext-d2-checkpoint", files["raw"]]),
        "missing": (suite, ["--convnext-d2-checkpoint", files["missing"]]),
        "features-equal": (suite, ["--convnext-d2-checkpoint", files["good"], "--convnext-d2-source", files["source"], "-k", "roundtrip"]),
        "features-differ": (suite, ["--convnext-d2-checkpoint", files["good"], "--convnext-d2-source", files["other"], "-k", "features"]),
    })
    return {"files": files, "runs": runs}


def test_the_gate_tests_pass_on_a_good_file_and_are_selected_by_their_keyword(gate):
    """`-k roundtrip` selects the gate tests (the run asks for it and they run); this test itself is not a round trip."""
    status, stdout = gate["runs"]["good"]
    assert status == 0, stdout
    assert _outcomes(stdout) == ["PASSED convnext-d2::test_convnext_d2_roundtrip_checkpoint_loads_clean"], stdout
    assert f"convnext-d2 gate: {gate['files']['good']}" in stdout, "the header says what is gated"


def test_the_gate_test_fails_on_a_bad_file_with_verifys_report(gate):
    status, stdout = gate["runs"]["raw"]
    assert status == 1, stdout
    assert "FAILED convnext-d2::test_convnext_d2_roundtrip_checkpoint_loads_clean" in _outcomes(stdout)
    assert "verify: FAIL:" in stdout and "backbone weights missing" in stdout, stdout
    assert "PASSED test_other.py::test_other_project_passes" in _outcomes(stdout), "the project's own tests still run"
    assert "plugin.py" not in stdout, "no traceback into the plugin: the report says it all"


def test_a_missing_checkpoint_fails_the_gate_test_with_the_cli_message(gate):
    status, stdout = gate["runs"]["missing"]
    assert status == 1 and "INTERNAL" not in stdout, stdout
    assert f"convnext-d2: error: {gate['files']['missing']}: no such file." in stdout, stdout


def test_the_gate_compares_features_with_a_source(gate):
    status, stdout = gate["runs"]["features-equal"]
    assert status == 0, stdout
    assert "PASSED convnext-d2::test_convnext_d2_roundtrip_features_equal_the_source" in _outcomes(stdout), stdout
    status, stdout = gate["runs"]["features-differ"]
    assert status == 1 and "features differ from the source" in stdout, stdout


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


def test_this_repositorys_old_option_names_still_work(gate):
    """`pytest --checkpoint FILE` in this checkout is the plugin's `--convnext-d2-checkpoint`."""
    raw = gate["files"]["raw"]
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
