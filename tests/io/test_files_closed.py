"""Every file the readers open by path is closed again, whether the read succeeds or is refused.

A long-running process (a training script that converts, or inspects, many checkpoints; a test
session) would otherwise hold one descriptor per file it looked at, and on some systems a file
held open cannot be replaced or deleted.  CPython closes a file object nobody refers to any more,
saying so with a ResourceWarning ("unclosed file"), so the check is twofold: no such warning for
any file of the read (the reader closed it itself), and no descriptor of this process still on
it (/proc/self/fd), after each read, for every source format and for refused files.
"""
from __future__ import annotations

import contextlib
import gc
import os
import pickle
import warnings
from pathlib import Path
from typing import Callable, List

import pytest
import torch

from conversion import convert
from conversion.architecture import Architecture
from conversion.errors import ConversionError
from conversion.inspection import inspect_checkpoint
from conversion.io.torchzip import read_index
from conversion.synthetic import random_state_dict

from ..support import read_as_convert_does

SMALL = Architecture(depths=(1, 1, 1, 1), dims=(4, 4, 4, 4), num_classes=2, classifier_norm=True)

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="reads this process's descriptors from /proc")


def _held_open(path: Path) -> List[str]:
    """This process's descriptors open on `path`."""
    target = os.path.realpath(path)
    held = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == target:
                held.append(fd)
        except OSError:  # the descriptor listdir itself used, closed by now
            pass
    return held


@contextlib.contextmanager
def _no_file_left_to_the_collector(folder: Path):
    """Fails if a file under `folder` was closed by the garbage collector instead of its reader."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        yield
        gc.collect()
    unclosed = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning) and str(folder) in str(w.message)]
    assert unclosed == [], unclosed


def _sources(folder: Path) -> dict:
    state_dict = random_state_dict(SMALL, seed=3)
    files = {
        "torch-zip": folder / "zip.pth",
        "torch-legacy": folder / "legacy.pth",
        "pkl": folder / "model.pkl",
    }
    torch.save({"model": state_dict}, files["torch-zip"])
    torch.save({"model": state_dict}, files["torch-legacy"], _use_new_zipfile_serialization=False)
    with open(files["pkl"], "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in state_dict.items()}}, f)
    truncated = folder / "truncated.pth"
    truncated.write_bytes(files["torch-zip"].read_bytes()[:-100])
    files["truncated-zip"] = truncated
    hostile = folder / "hostile.pth"
    torch.save({"model": state_dict, "hook": print}, hostile)
    files["refused-zip"] = hostile
    return files


READS: dict = {
    "load": lambda src, out: read_as_convert_does(str(src)),
    "inspect": lambda src, out: inspect_checkpoint(str(src)),
    "convert-pth": lambda src, out: convert(str(src), str(out / "model_d2.pth")),
    "convert-pkl": lambda src, out: convert(str(src), str(out / "model_d2.pkl")),
}


@pytest.mark.parametrize("read", sorted(READS))
def test_every_source_file_is_closed_after_each_read_or_refusal(read, tmp_path):
    files = _sources(tmp_path)
    for kind, src in sorted(files.items()):
        out = tmp_path / f"out-{read}-{kind}"
        out.mkdir()
        try:
            with _no_file_left_to_the_collector(tmp_path):
                READS[read](src, out)
        except ConversionError:
            assert kind in ("truncated-zip", "refused-zip"), f"{kind} should read"
        else:
            assert kind not in ("truncated-zip", "refused-zip"), f"{kind} should be refused"
        assert _held_open(src) == [], f"{read} left {kind} open"
        for written in out.iterdir():
            assert _held_open(written) == [], f"{read} left its output {written.name} open"


@pytest.mark.parametrize("kind", ["torch-zip", "truncated-zip", "refused-zip"])
def test_the_archive_index_reader_closes_the_archive_it_opened_by_path(kind, tmp_path):
    src = _sources(tmp_path)[kind]
    with _no_file_left_to_the_collector(tmp_path):
        try:
            index = read_index(str(src))
        except ConversionError:
            assert kind != "torch-zip"
        else:
            assert index.storages()  # located, with the file closed
    assert _held_open(src) == []
