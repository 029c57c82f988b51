"""The bad-input table of tests/cli/test_bad_input.py: one builder per bad invocation (malformed or
hostile sources, unusable destinations), the error class each raises, and how the disk is observed
(a snapshot before, the same after: nothing written, nothing half-written, no code run)."""
from __future__ import annotations

import functools
import hashlib
import io
import os
import pickle
import random
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Sequence, Tuple, Type

import torch

from conversion import convert
from conversion.architecture import Architecture
from conversion.errors import ContainerError, ConversionError, DestinationError, NotConvNeXt, UnreadableCheckpoint, UnsafeCheckpoint

from ..support import random_canonical_state_dict, torchvision_model

TEMP_PREFIX = ".convnext-d2-"  # write.py's temporary files beside the destination
SMALL = Architecture(depths=(1, 1, 2, 1), dims=(8, 8, 16, 16), num_classes=3, classifier_norm=True)
GOOD = "in/good.pth"  # a valid source every destination case converts
DST = "out/model_d2.pth"  # the default destination; `out/` exists and is empty
SENTINEL = "SENTINEL"  # what a hostile pickle would create if its code ran


# ---------------------------------------------------------------- the table


@dataclass(frozen=True)
class BadInput:
    """One bad invocation: the arguments after `convert`, and what the error must name."""

    args: Tuple[str, ...]
    says: Tuple[str, ...]

    def convert(self) -> None:
        """The same conversion through the library: `--force` is the only option the table uses."""
        paths = [a for a in self.args if a != "--force"]
        convert(paths[0], paths[1], force="--force" in self.args)


Maker = Callable[[Path], BadInput]  # builds the case's files under the folder, returns the invocation


def _folders(root: Path) -> None:
    (root / "in").mkdir(exist_ok=True)
    (root / "out").mkdir(exist_ok=True)


@functools.lru_cache(maxsize=None)
def good_state_dict() -> Dict[str, torch.Tensor]:
    """The weights of the valid source (`GOOD`), built once."""
    return random_canonical_state_dict(SMALL)


def _good_bytes() -> bytes:
    buf = io.BytesIO()
    torch.save({"model": good_state_dict()}, buf)
    return buf.getvalue()


def _source(root: Path, name: str, data: bytes) -> str:
    _folders(root)
    (root / "in" / name).write_bytes(data)
    return f"in/{name}"


def _saved(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@functools.lru_cache(maxsize=None)
def _resnet50_bytes() -> bytes:
    return _saved(torchvision_model("resnet50").state_dict())


class _RunsCode:
    """Pickles as a call to os.system: what a hostile checkpoint carries."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _touch_sentinel(root: Path) -> _RunsCode:
    return _RunsCode(f"touch {shlex.quote(str(root / SENTINEL))}")


# Sources -----------------------------------------------------------------------------


def missing_source(root: Path) -> BadInput:
    _folders(root)
    return BadInput(("in/missing.pth", DST), ("in/missing.pth", "no such file"))


def directory_source(root: Path) -> BadInput:
    _folders(root)
    (root / "in" / "checkpoints").mkdir()
    return BadInput(("in/checkpoints", DST), ("in/checkpoints", "directory"))


def empty_source(root: Path) -> BadInput:
    return BadInput((_source(root, "empty.pth", b""), DST), ("in/empty.pth", "empty"))


def random_bytes_source(root: Path) -> BadInput:
    src = _source(root, "noise.pth", bytes(random.Random(0).getrandbits(8) for _ in range(4096)))
    return BadInput((src, DST), (src, "not a readable checkpoint"))


def truncated_torch_file(root: Path) -> BadInput:
    data = _good_bytes()
    src = _source(root, "half.pth", data[: len(data) // 2])
    return BadInput((src, DST), (src, "truncated"))


def list_instead_of_dict(root: Path) -> BadInput:
    src = _source(root, "list.pth", _saved([torch.zeros(2), torch.ones(2)]))
    return BadInput((src, DST), ("list", "not a dict of weights"))


def dict_without_tensors(root: Path) -> BadInput:
    src = _source(root, "meta.pth", _saved({"epoch": 299, "best_acc": 82.1}))
    return BadInput((src, DST), ("no state dict", "epoch"))


def resnet50_state_dict(root: Path) -> BadInput:
    src = _source(root, "resnet50.pth", _resnet50_bytes())
    return BadInput((src, DST), ("not a ConvNeXt",))


def one_tensor_transposed(root: Path) -> BadInput:
    sd = dict(good_state_dict())
    sd["stages.2.1.pwconv1.weight"] = sd["stages.2.1.pwconv1.weight"].t().contiguous()
    src = _source(root, "transposed.pth", _saved({"model": sd}))
    return BadInput((src, DST), ("stages.2.1.pwconv1.weight", "shape"))


def stage_3_removed(root: Path) -> BadInput:
    sd = {k: v for k, v in good_state_dict().items() if not k.startswith("stages.3.")}
    src = _source(root, "three_stages.pth", _saved({"model": sd}))
    return BadInput((src, DST), ("truncated ConvNeXt", "[3]"))


def official_keys_plus_foreign_ones(root: Path) -> BadInput:
    sd = dict(good_state_dict(), **{"foo.weight": torch.zeros(3), "fc.bias": torch.zeros(5)})
    src = _source(root, "mixed.pth", _saved({"model": sd}))
    return BadInput((src, DST), ("foo.weight", "fc.bias"))  # every foreign key named, at once


def pickle_that_runs_code(root: Path) -> BadInput:
    src = _source(root, "evil.pkl", pickle.dumps({"model": _touch_sentinel(root)}))
    return BadInput((src, DST), ("refusing", "system"))


def torch_file_that_runs_code(root: Path) -> BadInput:
    src = _source(root, "evil.pth", _saved({"model": good_state_dict(), "extra": _touch_sentinel(root)}))
    return BadInput((src, DST), ("refusing", src))


# Destinations ------------------------------------------------------------------------


def good_source(root: Path) -> str:
    """The valid source every destination case converts, written under `root`."""
    return _source(root, "good.pth", _good_bytes())


def destination_exists(root: Path) -> BadInput:
    good_source(root)
    (root / DST).write_bytes(b"someone else's weights")
    return BadInput((GOOD, DST), (DST, "exists", "--force"))


# Each spelling of "the source itself" is tried with --force: without the check, --force would overwrite it.
def destination_is_the_source(root: Path) -> BadInput:
    return BadInput((good_source(root), GOOD, "--force"), (GOOD, "destination is the source"))


def destination_is_the_source_by_absolute_path(root: Path) -> BadInput:
    return BadInput((good_source(root), str(root / GOOD), "--force"), ("destination is the source",))


def destination_is_the_source_through_dot_dot(root: Path) -> BadInput:
    return BadInput((good_source(root), "./out/../in/good.pth", "--force"), ("destination is the source",))


def destination_is_a_symlink_to_the_source(root: Path) -> BadInput:
    good_source(root)
    (root / "out" / "link.pth").symlink_to(Path("..") / GOOD)
    return BadInput((GOOD, "out/link.pth", "--force"), ("out/link.pth", "destination is the source"))


def destination_is_a_hard_link_to_the_source(root: Path) -> BadInput:
    good_source(root)
    os.link(root / GOOD, root / "out" / "hard.pth")
    return BadInput((GOOD, "out/hard.pth", "--force"), ("out/hard.pth", "destination is the source"))


def unsupported_extension(name: str) -> Maker:
    def make(root: Path) -> BadInput:
        return BadInput((good_source(root), f"out/{name}"), (f"out/{name}", ".pth", ".pkl"))

    return make


def destination_folder_missing(root: Path) -> BadInput:
    return BadInput((good_source(root), "out/nowhere/model.pth"), ("out/nowhere", "does not exist"))


def destination_is_a_directory(root: Path) -> BadInput:
    good_source(root)
    (root / DST).mkdir()
    return BadInput((GOOD, DST), (DST, "directory"))


CASES: Dict[str, Maker] = {
    "missing-source": missing_source,
    "directory-as-source": directory_source,
    "empty-file": empty_source,
    "random-bytes": random_bytes_source,
    "truncated-torch-file": truncated_torch_file,
    "list-not-dict": list_instead_of_dict,
    "dict-without-tensors": dict_without_tensors,
    "resnet50": resnet50_state_dict,
    "tensor-transposed": one_tensor_transposed,
    "stage-3-removed": stage_3_removed,
    "foreign-keys": official_keys_plus_foreign_ones,
    "pickle-runs-code": pickle_that_runs_code,
    "torch-file-runs-code": torch_file_that_runs_code,
    "destination-exists": destination_exists,
    "destination-is-source": destination_is_the_source,
    "destination-is-source-absolute": destination_is_the_source_by_absolute_path,
    "destination-is-source-dot-dot": destination_is_the_source_through_dot_dot,
    "destination-symlink-to-source": destination_is_a_symlink_to_the_source,
    "destination-hard-link-to-source": destination_is_a_hard_link_to_the_source,
    "extension-.bin": unsupported_extension("model.bin"),
    "extension-.safetensors": unsupported_extension("model.safetensors"),
    "no-extension": unsupported_extension("model"),
    "destination-folder-missing": destination_folder_missing,
    "destination-is-directory": destination_is_a_directory,
}
# The error each case raises (errors.py), written out.
RAISES: Dict[str, Type[ConversionError]] = {
    **dict.fromkeys(["missing-source", "directory-as-source", "empty-file", "random-bytes", "truncated-torch-file"],
                    UnreadableCheckpoint),
    **dict.fromkeys(["list-not-dict", "dict-without-tensors"], ContainerError),
    **dict.fromkeys(["resnet50", "tensor-transposed", "stage-3-removed", "foreign-keys"], NotConvNeXt),
    **dict.fromkeys(["pickle-runs-code", "torch-file-runs-code"], UnsafeCheckpoint),
    **dict.fromkeys([name for name in CASES if name.startswith(("destination-", "extension-", "no-extension"))],
                    DestinationError),
}
assert sorted(RAISES) == sorted(CASES), "every case says which error it raises"
# Run again as real processes: a source the reader refuses, a hostile one (its code must not run in the
# shell's process either) and a destination refused.
IN_A_REAL_PROCESS = [
    "random-bytes",
    "pickle-runs-code",
    "destination-symlink-to-source",
]


# ---------------------------------------------------------------- observing the disk


def snapshot(root: Path) -> Dict[str, str]:
    """Every path under `root` with what it is: file content hash, directory, or link target."""
    seen = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                seen[rel] = f"link to {os.readlink(path)}"
            elif path.is_dir():
                seen[rel] = "directory"
            else:
                seen[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return seen


def assert_disk_unchanged(root: Path, before: Dict[str, str]) -> None:
    """Nothing written, nothing half-written, nothing replaced, no code run."""
    after = snapshot(root)
    assert not (root / SENTINEL).exists(), "code from the checkpoint ran: the sentinel file exists"
    temporaries = sorted(p for p in after if Path(p).name.startswith(TEMP_PREFIX))
    assert temporaries == [], f"temporary files left behind: {temporaries}"
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(p for p in set(before) & set(after) if before[p] != after[p])
    assert (added, removed, changed) == ([], [], []), f"disk changed: added {added}, removed {removed}, changed {changed}"


def assert_says(stderr: str, fragments: Sequence[str]) -> None:
    missing = [f for f in fragments if f not in stderr]
    assert missing == [], f"the error should name {missing}:\n{stderr}"


def all_of(fragments: Sequence[str]) -> str:
    """A regex (for `pytest.raises(match=...)`) that finds every fragment, in any order."""
    return "(?s)" + "".join(f"(?=.*{re.escape(f)})" for f in fragments)
