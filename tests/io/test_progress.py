"""The progress bar: shown for a large conversion to a person at a terminal, never in logs; --quiet."""
from __future__ import annotations

import io
import sys

import pytest
import torch

from conversion import cli
from conversion.architecture import Architecture
from conversion.synthetic import random_state_dict

ARCH = Architecture((1, 1, 2, 1), (8, 16, 8, 16), num_classes=3, classifier_norm=True)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def src(tmp_path):
    path = tmp_path / "src.pth"
    torch.save({"model": random_state_dict(ARCH)}, path)
    return path


@pytest.mark.parametrize("ext", [".pth", ".pkl"])
def test_a_terminal_sees_a_progress_bar_for_a_large_file(src, tmp_path, monkeypatch, capsys, ext):
    pytest.importorskip("tqdm", reason="tqdm is a dependency of the package; absent only outside its environments")
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setattr(cli, "PROGRESS_MIN_BYTES", 0)  # "large" for the test's small file
    assert cli.main(["convert", str(src), str(tmp_path / f"out{ext}")]) == 0
    assert "convert" in terminal.getvalue() and "B" in terminal.getvalue(), terminal.getvalue()


def test_no_bar_when_stderr_is_not_a_terminal(src, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "PROGRESS_MIN_BYTES", 0)
    assert cli.main(["convert", str(src), str(tmp_path / "out.pth")]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and "converted" in captured.out


def test_no_bar_for_a_small_file_even_at_a_terminal(src, tmp_path, monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert cli.main(["convert", str(src), str(tmp_path / "out.pth")]) == 0
    assert terminal.getvalue() == ""


def test_quiet_prints_nothing_on_success_but_still_reports_errors(src, tmp_path, monkeypatch, capsys):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setattr(cli, "PROGRESS_MIN_BYTES", 0)
    assert cli.main(["convert", str(src), str(tmp_path / "out.pth"), "--quiet"]) == 0
    assert capsys.readouterr().out == "" and terminal.getvalue() == ""
    assert cli.main(["convert", str(src), str(tmp_path / "out.pth"), "--quiet"]) == 2  # exists
    assert "destination exists" in terminal.getvalue()
