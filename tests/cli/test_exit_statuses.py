"""One exit-status test per error class: each of the project's errors, caused once through the CLI,
gives its documented exit status (1: a verification problem, 2: unusable input or arguments) and
one or two plain lines on stderr.  What each refusal says is tested at the library level, where it
is raised (`pytest.raises(..., match=...)` in the tests of each module and test_bad_input.py)."""
from __future__ import annotations

import inspect
import os
import pickle
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import pytest
import torch

from conversion import errors
from conversion.architecture import Architecture
from conversion.cli import main
from conversion.synthetic import random_state_dict

from ..support import require
from ..support.cli import EXIT_PROBLEM, EXIT_USAGE, assert_plain_error

SMALL = Architecture((1, 1, 2, 1), (8, 8, 16, 16), num_classes=3, classifier_norm=True)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("true",))


def _source(tmp: Path, obj: object = None) -> str:
    torch.save({"model": random_state_dict(SMALL)} if obj is None else obj, tmp / "src.pth")
    return "src.pth"


def _unreadable(tmp: Path, monkeypatch) -> List[str]:
    return ["convert", "missing.pth", "out.pth"]


def _unsafe(tmp: Path, monkeypatch) -> List[str]:
    (tmp / "evil.pkl").write_bytes(pickle.dumps({"model": _RunsCode()}))
    return ["convert", "evil.pkl", "out.pth"]


def _container(tmp: Path, monkeypatch) -> List[str]:
    return ["convert", _source(tmp, [torch.zeros(2)]), "out.pth"]


def _not_convnext(tmp: Path, monkeypatch) -> List[str]:
    return ["convert", _source(tmp, {"model": {"fc.weight": torch.zeros(3, 4), "fc.bias": torch.zeros(3)}}), "out.pth"]


def _destination(tmp: Path, monkeypatch) -> List[str]:
    (tmp / "out.pth").write_bytes(b"someone else's weights")
    return ["convert", _source(tmp), "out.pth"]


def _verification_failed(tmp: Path, monkeypatch) -> List[str]:
    real_fsync = os.fsync

    def lose_the_tail(fd: int) -> None:  # the written file's last byte lost on the way to disk
        os.ftruncate(fd, os.fstat(fd).st_size - 1)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", lose_the_tail)
    torch.save({"model": random_state_dict(SMALL)}, tmp / "src.pth")
    return ["convert", "src.pth", "out.pth"]


def _non_finite(tmp: Path, monkeypatch) -> List[str]:
    sd = random_state_dict(SMALL)
    sd["stages.2.0.pwconv1.weight"][0, 0] = float("nan")
    return ["convert", _source(tmp, {"model": sd}), "out.pth", "--strict"]


def _unusable_import(tmp: Path, monkeypatch) -> List[str]:
    require("detectron2")  # --import registers into Detectron2's registries
    (tmp / "plain.py").write_text("X = 1  # registers nothing\n")
    return ["verify", _source(tmp), "--import", "plain.py"]


def _unusable_verify_input(tmp: Path, monkeypatch) -> List[str]:
    require("detectron2")  # verify builds the backbone with Detectron2
    return ["verify", _source(tmp), "--config", "missing.yaml"]


# class name -> (how to cause it through the CLI, the exit status it gives)
CAUSES: Dict[str, Tuple[Callable[[Path, pytest.MonkeyPatch], List[str]], int]] = {
    "UnreadableCheckpoint": (_unreadable, EXIT_USAGE),
    "UnsafeCheckpoint": (_unsafe, EXIT_USAGE),
    "ContainerError": (_container, EXIT_USAGE),
    "NotConvNeXt": (_not_convnext, EXIT_USAGE),
    "DestinationError": (_destination, EXIT_USAGE),
    "VerificationFailed": (_verification_failed, EXIT_PROBLEM),
    "NonFiniteWeights": (_non_finite, EXIT_USAGE),
    "UnusableImport": (_unusable_import, EXIT_USAGE),
    "UnusableVerifyInput": (_unusable_verify_input, EXIT_USAGE),
}


def _error_classes() -> Dict[str, type]:
    """Every ConversionError subclass the package defines (errors.py, and verify's own)."""
    from conversion import verify

    found = {}
    for module in (errors, verify):
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, errors.ConversionError) and cls is not errors.ConversionError and cls.__module__ == module.__name__:
                found[name] = cls
    return found


def test_every_error_class_has_its_exit_status_test():
    assert sorted(_error_classes()) == sorted(CAUSES)


@pytest.mark.parametrize("name", list(CAUSES))
def test_each_error_class_exits_with_its_status_and_plain_lines(name, tmp_path, monkeypatch, capsys):
    cause, status = CAUSES[name]
    monkeypatch.chdir(tmp_path)
    args = cause(tmp_path, monkeypatch)
    raised: List[BaseException] = []
    real_as_printed = errors.ConversionError.as_printed

    def record(self, *a, **k):  # which class the CLI caught: the test is about that class
        raised.append(self)
        return real_as_printed(self, *a, **k)

    monkeypatch.setattr(errors.ConversionError, "as_printed", record)

    assert main(args) == status
    out, err = capsys.readouterr()
    assert [type(e).__name__ for e in raised] == [name], err
    assert raised[0].exit_status == status
    assert_plain_error(err)
    assert out == "", out
    assert not (tmp_path / "out.pth").exists() or name == "DestinationError"
