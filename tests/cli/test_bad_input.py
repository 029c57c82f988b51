"""Bad input: every malformed or hostile source and every unusable destination is refused with
the project's error for it and a message naming the problem; nothing from the file runs; nothing
is written, not even half (docs/design.md, "Safety").

The cases are one table (bad_inputs.py).  Each builds its files in a fresh folder that is also the working
directory, so paths in arguments and messages are short and relative.  The table is checked at
the library level (`conversion.convert` raises the case's error class, matching its message);
the exit status each error class gives through the CLI is test_exit_statuses.py's, and a few
cases run again as a real process to prove what the shell sees and that no traceback escapes.
"""
from __future__ import annotations

import errno
import io
import os
from pathlib import Path
from typing import List, Tuple

import pytest
import torch

from conversion.cli import main

from ..support import torch_load_weights_only
from ..support.cli import EXIT_INTERRUPTED, EXIT_OK, EXIT_PROBLEM, EXIT_USAGE, assert_plain_error, run_cli
from .bad_inputs import CASES, DST, GOOD, IN_A_REAL_PROCESS, RAISES, BadInput, all_of, assert_disk_unchanged, assert_says, snapshot
from .bad_inputs import good_source as _good
from .bad_inputs import good_state_dict as _good_state_dict


@pytest.fixture(params=list(CASES), ids=list(CASES))
def case(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Tuple[str, BadInput]:
    """One case of the table (name, invocation), built in `tmp_path`, which is also the working directory."""
    monkeypatch.chdir(tmp_path)
    return request.param, CASES[request.param](tmp_path)


# ---------------------------------------------------------------- the whole table, at the library level


def test_bad_input_is_refused_with_its_error_naming_the_problem_and_leaves_the_disk_as_it_was(case, tmp_path: Path):
    name, bad = case
    before = snapshot(tmp_path)

    with pytest.raises(RAISES[name], match=all_of(bad.says)) as refused:
        bad.convert()

    assert type(refused.value) is RAISES[name], f"{type(refused.value).__name__}: {refused.value}"
    assert 1 <= len(str(refused.value).splitlines()) <= 2, str(refused.value)
    assert_disk_unchanged(tmp_path, before)


# ---------------------------------------------------------------- real processes


@pytest.mark.parametrize("case", IN_A_REAL_PROCESS)
def test_bad_input_exits_2_without_a_traceback_in_a_real_process(case: str, tmp_path: Path):
    bad = CASES[case](tmp_path)
    before = snapshot(tmp_path)

    result = run_cli("convert", *bad.args, cwd=tmp_path)

    assert result.returncode == EXIT_USAGE, f"exit status {result.returncode}, stderr:\n{result.stderr}"
    assert_plain_error(result.stderr)
    assert_says(result.stderr, bad.says)
    assert_disk_unchanged(tmp_path, before)


# ---------------------------------------------------------------- --force and failures while writing


def test_force_replaces_an_existing_destination(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _good(tmp_path)
    (tmp_path / DST).write_bytes(b"someone else's weights")

    status = main(["convert", GOOD, DST, "--force"])

    assert status == EXIT_OK, capsys.readouterr().err
    model = torch_load_weights_only(tmp_path / DST)["model"]
    assert "backbone.stages.0.0.dwconv.weight" in model, "the old file was not replaced by the conversion"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model_d2.pth"], "temporary files left behind"


@pytest.fixture(params=[False, True], ids=["new-destination", "force-over-existing"])
def destination(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> List[str]:
    """The arguments of a valid conversion, over an existing file (with --force) or not."""
    monkeypatch.chdir(tmp_path)
    _good(tmp_path)
    if request.param:
        (tmp_path / DST).write_bytes(b"someone else's weights")
        return [GOOD, DST, "--force"]
    return [GOOD, DST]


@pytest.mark.parametrize("temporary", ["unnamed", "named"])
def test_a_failed_rename_leaves_neither_the_destination_nor_a_temporary_file(destination, temporary, tmp_path, monkeypatch, capsys):
    """The last step fails: the rename of a named temporary file, or the link that names an unnamed one."""
    from conversion.io import atomic

    real_replace, real_link = os.replace, atomic._link_fd

    def disk_full(src, dst, *args, **kwargs):
        if Path(dst).name == Path(DST).name:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_replace(src, dst, *args, **kwargs)

    def link_fails(fd, target):
        if Path(target).name == Path(DST).name:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_link(fd, target)

    monkeypatch.setattr(os, "replace", disk_full)
    monkeypatch.setattr(atomic, "_link_fd", link_fails)
    if temporary == "named":
        monkeypatch.setattr(atomic, "anonymous_beside", lambda path, directory: None)
    before = snapshot(tmp_path)

    status = main(["convert", *destination])

    err = capsys.readouterr().err
    assert status == EXIT_USAGE, err
    assert_says(err, [DST, "write failed"])
    assert_disk_unchanged(tmp_path, before)


def test_an_interrupted_write_leaves_nothing_behind(destination, tmp_path, monkeypatch, capsys):
    def interrupt(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupt)
    before = snapshot(tmp_path)

    status = main(["convert", *destination])

    err = capsys.readouterr().err
    assert status == EXIT_INTERRUPTED, err
    assert_says(err, ["interrupted"])
    assert_disk_unchanged(tmp_path, before)
