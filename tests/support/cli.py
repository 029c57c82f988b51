"""Running the command line as a user meets it, and the contract's exit statuses and error form
(docs/design.md, "Public contract"): shared by every test of a refusal or an exit status.  Also
converting a dict saved as a user would save it: in-process through `convnext-d2 convert`, or through
the library where a refusal is the point (its error class and message, `pytest.raises`)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, List, Optional, Tuple, Type

import pytest
import torch

from conversion import convert
from conversion.cli import main
from conversion.errors import ConversionError

ROOT = Path(__file__).resolve().parents[2]
PROG = "convnext-d2:"
# The contract's exit statuses: done, a problem found (verify), unusable input.
EXIT_OK, EXIT_PROBLEM, EXIT_USAGE = 0, 1, 2
# What the shell sees of a command stopped by SIGINT (Ctrl-C): 128 + 2.
EXIT_INTERRUPTED = 130
# A process that imports torch takes ~2 s; a hung one must not hang the suite.
PROCESS_TIMEOUT_S = 120


def run_cli(*args: object, cwd: Path) -> subprocess.CompletedProcess:
    """Run `python -m conversion ARGS` in `cwd` with this checkout importable, as a user would."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return subprocess.run(
        [sys.executable, "-m", "conversion", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT_S,
    )


def error_lines(stderr: str, usage: bool = False) -> List[str]:
    """The lines of an error a user reads; with `usage`, argparse's usage block must lead and is set aside."""
    lines = stderr.splitlines()
    if usage:
        assert lines and lines[0].startswith("usage: convnext-d2"), f"expected argparse usage first:\n{stderr}"
        lines = [line for line in lines if not (line.startswith("usage:") or line.startswith(" "))]
    return lines


def assert_plain_error(stderr: str, usage: bool = False) -> None:
    """The contract (docs/design.md): errors are one or two plain lines on stderr, never a traceback (unless --debug)."""
    assert "Traceback" not in stderr, f"a traceback escaped:\n{stderr}"
    lines = error_lines(stderr, usage)
    assert 1 <= len(lines) <= 2, f"expected one or two error lines, got {len(lines)}:\n{stderr}"
    # argparse names a subcommand's parser "convnext-d2 convert"; our own errors always say "convnext-d2:".
    start = re.compile(r"convnext-d2( [a-z]+)?: ") if usage else re.compile(re.escape(PROG) + " ")
    assert all(start.match(line) for line in lines), f"every error line should start with {PROG!r}:\n{stderr}"


def run_in_process(*args: object, cwd: Path, capsys: pytest.CaptureFixture) -> Tuple[int, str, str]:
    """(exit status, stdout, stderr) of `convnext-d2 ARGS` run in-process from `cwd`."""
    old = os.getcwd()
    os.chdir(cwd)
    try:
        status = main([str(a) for a in args])
    except SystemExit as done:  # argparse refuses arguments by exiting, as the installed command does
        status = done.code if isinstance(done.code, int) else 2
    finally:
        os.chdir(old)
    out, err = capsys.readouterr()
    return status, out, err


def convert_cli(directory: Any, obj: Any, *extra: str, capsys: Any) -> Tuple[int, str, str]:
    """(exit status, stdout, stderr) of converting `obj` saved with torch.save; a refusal must write nothing."""
    src = os.path.join(str(directory), "source.pth")
    torch.save(obj, src)
    dst = os.path.join(str(directory), "out.pth")
    before = set(os.listdir(str(directory)))
    status = main(["convert", src, dst, *extra])
    out, err = capsys.readouterr()
    if status != EXIT_OK:
        assert not os.path.exists(dst), "a refused conversion wrote its destination"
        assert set(os.listdir(str(directory))) == before, "a refused conversion left a file behind"
    return status, out, err


def refusal(directory: Any, obj: Any, error: Type[ConversionError], layout: Optional[str] = None, match: Optional[str] = None) -> str:
    """`conversion.convert` on `obj` saved with torch.save raises exactly `error` (matching `match`) and
    writes nothing; returns the error's text (message and hint) for the test's own checks."""
    src = os.path.join(str(directory), "source.pth")
    torch.save(obj, src)
    before = set(os.listdir(str(directory)))
    with pytest.raises(error, match=match) as refused:
        convert(src, os.path.join(str(directory), "out.pth"), layout=layout)
    assert type(refused.value) is error, f"{type(refused.value).__name__}: {refused.value}"
    assert set(os.listdir(str(directory))) == before, "a refused conversion wrote or left a file"
    return str(refused.value)
