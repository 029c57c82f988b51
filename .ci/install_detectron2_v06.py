"""Install Detectron2 v0.6's Python package into the running environment without compiling it.

Why: DI-MaskDINO documents Detectron2 v0.6.  The registry's `pb1-detectron2==0.6` sdist carries
upstream v0.6's Python code unchanged but not the C++/CUDA sources (`layers/csrc`), so it cannot
build `detectron2._C`.  Nothing convnext-d2 exercises needs `_C` (checkpoint loading, configs,
the backbone registry and `build_backbone` are pure Python), so the pure package is copied into
site-packages as it is.  The test suite's conftest supplies an empty `detectron2._C` where the
compiled one is absent (see the comment there for why that is sound).

Run by tox's legacy environment (`commands_pre`); idempotent.  Needs pip, setuptools, wheel and
torch already installed (the sdist's setup.py imports torch just to describe itself).
"""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from pathlib import Path

REQUIREMENT = "pb1-detectron2==0.6"
VERSION = "0.6"


def installed_version() -> str:
    """The version of the detectron2 already importable here ('' if none); reads the file, imports nothing."""
    spec = importlib.util.find_spec("detectron2")
    if spec is None or spec.origin is None:
        return ""
    for line in Path(spec.origin).read_text().splitlines():
        if line.startswith("__version__"):
            return line.split("=", 1)[1].strip().strip("\"'")
    return "unknown"


def download_sdist(into: Path) -> Path:
    # --no-build-isolation: pip still asks the sdist for its metadata, and its setup.py imports torch.
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-binary", ":all:", REQUIREMENT, "-d", str(into)],
        check=True,
    )
    return next(into.glob("pb1-detectron2-*.tar.gz"))


def unpack_package(sdist: Path, into: Path) -> Path:
    """The sdist's `detectron2/` directory (only that member is extracted)."""
    with tarfile.open(sdist) as archive:
        members = [m for m in archive.getmembers() if "/detectron2/" in m.name and m.isfile()]
        for member in members:
            if member.name.startswith("/") or ".." in Path(member.name).parts:
                raise SystemExit(f"refusing unsafe path in {sdist.name}: {member.name}")
        archive.extractall(into, members=members)
    return next(into.glob("*/detectron2"))


def main() -> int:
    found = installed_version()
    if found == VERSION:
        print(f"detectron2 {VERSION} already installed")
        return 0
    if found:
        print(f"detectron2 {found} is installed here; refusing to overwrite it with {VERSION}", file=sys.stderr)
        return 2
    destination = Path(sysconfig.get_paths()["purelib"]) / "detectron2"
    with tempfile.TemporaryDirectory() as tmp:
        package = unpack_package(download_sdist(Path(tmp)), Path(tmp))
        shutil.copytree(package, destination)
    print(f"installed detectron2 {installed_version()} (pure Python, no _C) into {destination}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
