"""The pytest plugin (`conversion.testing.plugin`, entry point `pytest11`): inert unless given
`--convnext-d2-checkpoint` or `--convnext-d2-config`, then it adds the gate tests (`-k roundtrip` selects them) that fail with
verify's report.  Each test runs pytest in another process on a throwaway suite, as another project
would: the inertness and the wheel install in processes of their own, the rest as steps of one
interpreter (tests/d2/interpreter.py, which tests/d2/test_example.py uses too)."""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Dict, List

import pytest

from conversion.architecture import Architecture
from conversion.testing import write_synthetic_checkpoint

from ..support import plugin_option_names, require
from .interpreter import PLUGIN, PYTEST_TIMEOUT_S, ROOT, Step, child_environment, shared_interpreter

SMALL = Architecture((1, 1, 2, 1), (8, 16, 24, 32), num_classes=5, classifier_norm=True)

# Another project's suite: one passing test, one skipped.
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

# A suite using the plugin's fixtures without its options.
BUILDER_SUITE = {
    "pytest.ini": "[pytest]\n",
    "test_builder.py": """
        import os

        def test_builder(convnext_d2_write_checkpoint, tmp_path):
            path = convnext_d2_write_checkpoint("w.pth", layout="timm", variant="convnext_atto")
            assert os.path.dirname(path) == str(tmp_path) and os.path.getsize(path) > 1000

        def test_gate_fixture_skips_without_a_checkpoint(convnext_d2_gate):
            raise AssertionError("not reached")
        """,
}


def _suite(root: Path, files=OTHER_SUITE) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (root / name).write_text(textwrap.dedent(text))
    return root


def run_pytest(cwd: Path, *args: str, plugin: bool = True) -> subprocess.CompletedProcess:
    """pytest in a process of its own, in `cwd` with this checkout importable; `plugin` loads it (`-p`) as an
    installed entry point would, `plugin=False` blocks it (`-p no:`: tox installs the package)."""
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", "-p", PLUGIN if plugin else "no:" + PLUGIN] + list(args)
    return subprocess.run(command, cwd=cwd, env=child_environment(), capture_output=True, text=True, timeout=PYTEST_TIMEOUT_S)


def _outcomes(output: str) -> List[str]:
    """The per-test outcome lines of `-rA` (PASSED/SKIPPED/FAILED ...), without durations."""
    lines = [line for line in output.splitlines() if re.match(r"(PASSED|FAILED|SKIPPED|ERROR) ", line)]
    # pytest shows node ids relative to where it runs; the gate's ids are not under a file (`../convnext-d2::`).
    return sorted(re.sub(r"^(\w+) (\.\./)+", r"\1 ", re.sub(r" in [0-9.]+s.*| - .*", "", line)) for line in lines)


def _summary(output: str) -> str:
    last = output.strip().splitlines()[-1]
    return re.sub(r" in [0-9.]+s.*", "", last)


def test_the_plugin_is_inert_without_its_options(tmp_path):
    """Loaded but not asked: the other suite's tests, outcomes and header are exactly as without it.
    Each run is a process of its own: after another session in the same interpreter, an import's side
    effect (a hook, a module pytest then finds loaded) could make both runs look alike."""
    suite = _suite(tmp_path / "other")
    with_plugin, without = run_pytest(suite), run_pytest(suite, plugin=False)
    assert with_plugin.returncode == without.returncode == 0, with_plugin.stdout + with_plugin.stderr
    assert _outcomes(with_plugin.stdout) == _outcomes(without.stdout) != []
    assert _summary(with_plugin.stdout) == _summary(without.stdout)
    assert "1 passed, 1 skipped" in _summary(without.stdout)
    # pytest's "plugins:" line names the distributions of entry-point plugins (convnext-d2's where the
    # package is installed and entry points load, as in the wheel test); nothing else may mention it.
    shown = "\n".join(line for line in with_plugin.stdout.splitlines() if not line.startswith("plugins:"))
    assert "convnext" not in shown.lower(), with_plugin.stdout
    collected = run_pytest(suite, "--collect-only", "-q"), run_pytest(suite, "--collect-only", "-q", plugin=False)
    assert collected[0].stdout.splitlines()[:2] == collected[1].stdout.splitlines()[:2]


def test_the_options_are_namespaced():
    """Only `--convnext-d2-*` options: nothing another plugin or suite might also define."""
    names = plugin_option_names()
    assert names and all(n.startswith("--convnext-d2-") for n in names), names
    assert {"--convnext-d2-checkpoint", "--convnext-d2-config", "--convnext-d2-import", "--convnext-d2-source"} <= set(names)


@pytest.fixture(scope="module")
def sessions(tmp_path_factory) -> Dict[str, Any]:
    """Another project's suite run with the plugin, each run a `pytest` session in one interpreter:
    the builder fixture's run, and (where Detectron2 imports) the gate on the files given and this
    checkout's own run with its old option names.  The files, and name -> Outcome."""
    tmp = tmp_path_factory.mktemp("gate")
    other, builder = _suite(tmp / "other"), _suite(tmp / "builder", BUILDER_SUITE)
    steps = {"builder": Step("pytest", builder, ())}
    files: Dict[str, str] = {}
    if importlib.util.find_spec("detectron2") is not None:
        files = {
            "good": write_synthetic_checkpoint(tmp / "good.pth", layout="detectron2", variant=SMALL),
            "raw": write_synthetic_checkpoint(tmp / "raw.pth", layout="official", variant=SMALL),
            "missing": str(tmp / "nope.pth"),
            "source": write_synthetic_checkpoint(tmp / "source.pth", layout="timm", variant=SMALL),
            "other": write_synthetic_checkpoint(tmp / "other.pth", layout="timm", variant=SMALL, seed=7),
        }
        files["atto"] = write_synthetic_checkpoint(tmp / "atto.pth", layout="detectron2", variant="convnext_atto")
        # Every backbone weight behind `backbone.`, and the classifier too: unused tensors, warnings only.
        files["warned"] = write_synthetic_checkpoint(tmp / "warned.pth", layout="official", variant=SMALL, prefix="backbone.")
        files["lazy"] = str(_lazy_config(tmp, files["atto"]))
        gate_runs = {
            "lazy": ["--convnext-d2-config", files["lazy"], "-k", "roundtrip"],
            "good": ["--convnext-d2-checkpoint", files["good"], "-k", "roundtrip"],
            "raw": ["--convnext-d2-checkpoint", files["raw"]],
            "missing": ["--convnext-d2-checkpoint", files["missing"]],
            "features-equal": ["--convnext-d2-checkpoint", files["good"], "--convnext-d2-source", files["source"], "-k", "roundtrip"],
            "features-differ": ["--convnext-d2-checkpoint", files["good"], "--convnext-d2-source", files["other"], "-k", "features"],
            "warned": ["--convnext-d2-checkpoint", files["warned"], "-k", "roundtrip"],
            "warned-strict": ["--convnext-d2-checkpoint", files["warned"], "--convnext-d2-strict", "-k", "roundtrip"],
        }
        steps.update({name: Step("pytest", other, tuple(args)) for name, args in gate_runs.items()})
        # Last, in this checkout, whose conftest loads the plugin (no `-p`) and defines the old names.
        steps["old-names"] = Step("pytest", ROOT, ("tests/unit/test_architecture.py", "--checkpoint", files["raw"], "-k", "roundtrip"),
                                  plugin=False)
    runs = shared_interpreter().run(steps, tmp)
    # The last of its users in file order (test_example.py runs first): its memory (torch, Detectron2)
    # is not held through the rest of the suite.  A later user would start a fresh one.
    shared_interpreter().close()
    return {"files": files, "runs": runs}


def _lazy_config(folder: Path, weights: str) -> Path:
    """A LazyConfig of the detrex-like project (tests/detrex_like_configs) whose init_checkpoint is `weights`."""
    path = folder / "dino_atto.py"
    base = ROOT / "tests" / "detrex_like_configs" / "dino_convnext_atto.py"
    path.write_text(f"from detectron2.config import LazyConfig\n_cfg = LazyConfig.load({str(base)!r})\n"
                    f"model, train = _cfg.model, _cfg.train\ntrain.init_checkpoint = {weights!r}\n")
    return path


@pytest.fixture(scope="module")
def gate(sessions) -> Dict[str, Any]:
    """The gate on another project's suite: the files it is given, and each run's (exit status, stdout)."""
    require("detectron2")
    return {"files": sessions["files"], "runs": {name: (r.status, r.stdout) for name, r in sessions["runs"].items()}}


def test_the_gate_tests_pass_on_a_good_file_and_are_selected_by_their_keyword(gate):
    """`-k roundtrip` selects the gate tests (the run asks for it and they run); this test itself is not a round trip."""
    status, stdout = gate["runs"]["good"]
    assert status == 0, stdout
    assert _outcomes(stdout) == ["PASSED convnext-d2::test_convnext_d2_roundtrip_checkpoint_loads_clean"], stdout
    assert f"convnext-d2 gate: {gate['files']['good']}" in stdout, "the header says what is gated"


def test_a_lazy_config_alone_gates_its_own_init_checkpoint(gate):
    status, stdout = gate["runs"]["lazy"]
    assert status == 0, stdout
    assert _outcomes(stdout) == ["PASSED convnext-d2::test_convnext_d2_roundtrip_checkpoint_loads_clean"], stdout
    assert f"convnext-d2 gate: the config's own weights with {gate['files']['lazy']}" in stdout


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


def test_the_strict_option_makes_warnings_fail_the_gate(gate):
    """Unused checkpoint tensors are warnings: the gate passes on them, and fails with `--convnext-d2-strict`."""
    status, stdout = gate["runs"]["warned"]
    assert status == 0 and "PASSED convnext-d2::test_convnext_d2_roundtrip_checkpoint_loads_clean" in _outcomes(stdout), stdout
    status, stdout = gate["runs"]["warned-strict"]
    assert status == 1, stdout
    assert "FAILED convnext-d2::test_convnext_d2_roundtrip_checkpoint_loads_clean" in _outcomes(stdout), stdout
    assert "checkpoint tensors unused by the model" in stdout, stdout


def test_the_builder_fixture_writes_into_the_tests_tmp_path(sessions):
    result = sessions["runs"]["builder"]
    assert result.status == 0, result.stdout + result.stderr
    assert "PASSED test_builder.py::test_builder" in result.stdout
    assert "no --convnext-d2-checkpoint or --convnext-d2-config given" in result.stdout


def test_this_repositorys_old_option_names_still_work(gate):
    """`pytest --checkpoint FILE` in this checkout is the plugin's `--convnext-d2-checkpoint`."""
    status, stdout = gate["runs"]["old-names"]
    assert status == 1, stdout
    assert "FAILED convnext-d2::test_convnext_d2_roundtrip_checkpoint_loads_clean" in _outcomes(stdout), stdout


def _plugins_line(output: str) -> str:
    """pytest's header line naming the distributions whose entry-point plugins it loaded ("" if none)."""
    return next((line for line in output.splitlines() if line.startswith("plugins:")), "")


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
    installed, disabled = run(), run("-p", f"no:{PLUGIN}")
    assert installed.returncode == disabled.returncode == 0, installed.stdout + installed.stderr
    assert _outcomes(installed.stdout) == _outcomes(disabled.stdout) != []
    assert _summary(installed.stdout) == _summary(disabled.stdout)
    # pytest lists every plugin its entry points loaded by distribution; apart from that line the header
    # is the same.  That line also shows that `-p no:` kept the entry point from loading the plugin at
    # all (a `--help -p no:` run without the options would show no more), so the comparison is real.
    header = [line for line in installed.stdout.splitlines()[:6] if not line.startswith("plugins:")]
    assert header == [line for line in disabled.stdout.splitlines()[:6] if not line.startswith("plugins:")]
    assert "convnext-d2-0.1.0" in _plugins_line(installed.stdout)
    assert "convnext-d2" not in _plugins_line(disabled.stdout), disabled.stdout
