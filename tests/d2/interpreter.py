"""Several steps run in one interpreter (`Interpreter`, `run_in_one_interpreter`, `shared_interpreter`):
the plugin's tests (test_gate.py) and the worked example's (test_example.py) run another project's
pytest, `convnext-d2` commands and imports in a child interpreter that starts torch and Detectron2 once."""
from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ..support.cli import ROOT

PLUGIN = "conversion.testing.plugin"
# pytest + torch (+ detectron2) start in a few seconds; a hung one must not hang the suite.
PYTEST_TIMEOUT_S = 300


# Several steps in one interpreter, its start (torch, Detectron2: seconds) paid once: each step a fresh
# `pytest.main` in its own folder, a `convnext-d2 ...` command (`conversion.cli.main`, which is all
# that `python -m conversion` runs), or a module imported by name.  Each step's stdout and stderr
# are captured at the file descriptors, so that whatever a real process would print (logging
# handlers, warnings, C code) is in them.  Steps run in order and share the interpreter: where a
# step needs a fresh interpreter (the plugin's inertness, an import's side effects), it gets its own.
_STEPS = r"""
import contextlib, json, os, sys, tempfile, traceback


@contextlib.contextmanager
def captured(result):
    sys.stdout.flush(); sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    files = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    os.dup2(files[0].fileno(), 1); os.dup2(files[1].fileno(), 2)
    try:
        yield
    finally:
        sys.stdout.flush(); sys.stderr.flush()
        os.dup2(saved[0], 1); os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        for name, f in zip(("stdout", "stderr"), files):
            f.seek(0); result[name] = f.read().decode("utf-8", "replace"); f.close()


def run(step):
    if step["kind"] == "pytest":
        import pytest
        return int(pytest.main(step["args"]))
    if step["kind"] == "cli":
        from conversion.cli import main
        return main(step["args"])
    try:  # "import": as `python -c "import NAME"` would
        __import__(step["args"][0])
    except BaseException:
        traceback.print_exc()
        return 1
    return 0


def run_plan(plan, answer):
    with open(plan) as f:
        steps = json.load(f)
    results = []
    for step in steps:
        os.chdir(step["cwd"])
        os.environ.update(step["env"])
        for name in step["fresh_modules"]:
            sys.modules.pop(name, None)  # a test module imported anew reads its environment again
        result = {"status": None}
        with captured(result):
            try:
                result["status"] = run(step)
            except SystemExit as stop:
                result["status"] = stop.code
            except BaseException:
                traceback.print_exc()  # escaped: the step's stderr shows it, its status stays None
        results.append(result)
    with open(answer, "w") as f:
        json.dump(results, f)


for line in sys.stdin:  # one plan a line, [steps file, results file]; each answered "done" when written
    run_plan(*json.loads(line))
    print("done", flush=True)
"""


@dataclass(frozen=True)
class Step:
    """One step of `run_in_one_interpreter`: `kind` "pytest" (ARGS after `-p no:cacheprovider -rA`, the
    plugin loaded as an installed entry point would unless `plugin` is False), "cli" (`convnext-d2
    ARGS`) or "import" (ARGS[0], a module name), run in `cwd` with `env` set (and left set), the modules
    `fresh_modules` dropped first."""

    kind: str
    cwd: Path
    args: Tuple[str, ...]
    env: Tuple[Tuple[str, str], ...] = ()
    fresh_modules: Tuple[str, ...] = ()
    plugin: bool = True

    def as_plan(self) -> Dict[str, Any]:
        args = [str(a) for a in self.args]
        if self.kind == "pytest":
            args = ["-p", "no:cacheprovider", "-rA"] + (["-p", PLUGIN] if self.plugin else []) + args
        return {"kind": self.kind, "cwd": str(self.cwd), "args": args, "env": dict(self.env),
                "fresh_modules": list(self.fresh_modules)}


@dataclass(frozen=True)
class Outcome:
    status: Optional[int]  # None: an exception escaped the step (its traceback is in stderr)
    stdout: str
    stderr: str


def child_environment() -> Dict[str, str]:
    """This process's environment with this checkout importable, no PYTEST_ADDOPTS, and no pytest
    plugin loaded from entry points: each run loads the convnext-d2 plugin itself (`-p`) or not at
    all, so that what it shows is that plugin's doing (an installed copy's entry point, beside
    every other installed plugin, is the wheel test's subject)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_ADDOPTS", "PYTEST_PLUGINS")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    return env


class Interpreter:
    """A fresh interpreter that runs plans of steps as they come (`_STEPS`), in order, until closed."""

    def __init__(self) -> None:
        self._log = tempfile.TemporaryFile(mode="w+")  # its own stderr, outside any step: shown if it dies
        self._process = subprocess.Popen([sys.executable, "-c", _STEPS], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=self._log, text=True, env=child_environment())

    def run(self, steps: Dict[str, Step], folder: Path) -> Dict[str, Outcome]:
        """name -> Outcome of each step (the plan and the results are files in `folder`)."""
        plan, results = folder / "steps.json", folder / "outcomes.json"
        plan.write_text(json.dumps([step.as_plan() for step in steps.values()]))
        assert self._process.stdin is not None and self._process.stdout is not None
        self._process.stdin.write(json.dumps([str(plan), str(results)]) + "\n")
        self._process.stdin.flush()
        answer: List[str] = []
        reader = threading.Thread(target=lambda: answer.append(self._process.stdout.readline()), daemon=True)  # type: ignore[union-attr]
        reader.start()
        reader.join(PYTEST_TIMEOUT_S)
        if answer != ["done\n"]:
            what = f"hung (over {PYTEST_TIMEOUT_S} s)" if not answer else "died"
            self._log.seek(0)
            log = self._log.read()[-3000:]
            self.close(kill=True)
            raise AssertionError(f"the steps' interpreter {what} running {[step.kind for step in steps.values()]}:\n{log}")
        outcomes = json.loads(results.read_text())
        return {name: Outcome(r["status"], r["stdout"], r["stderr"]) for name, r in zip(steps, outcomes)}

    @property
    def alive(self) -> bool:
        return self._process.poll() is None

    def close(self, kill: bool = False) -> None:
        if self.alive:
            if kill:
                self._process.kill()
            else:
                self._process.stdin.close()  # type: ignore[union-attr]  (its loop ends: it exits)
            try:
                self._process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        if not self._log.closed:
            self._log.close()


def run_in_one_interpreter(steps: Dict[str, Step], folder: Path) -> Dict[str, Outcome]:
    """name -> Outcome of each step, all run in order by one fresh interpreter."""
    interpreter = Interpreter()
    try:
        return interpreter.run(steps, folder)
    finally:
        interpreter.close()


_SHARED: List[Interpreter] = []


def shared_interpreter() -> Interpreter:
    """One interpreter for this test process, started on first use and shared by the test files that
    ask for it (each start of torch and Detectron2 costs seconds).  What runs in it: the gate's runs on
    another project's suite, and the example's package import by name; never the example's backbone
    loaded from its file, which the package import would then register a second time."""
    if not _SHARED or not _SHARED[0].alive:
        _SHARED[:] = [Interpreter()]
        atexit.register(_SHARED[0].close)
    return _SHARED[0]
