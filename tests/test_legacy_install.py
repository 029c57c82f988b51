"""`.ci/install_detectron2_v06.py`, the legacy environment's documented install step: it takes only
the sdist's `detectron2/` package, refuses unsafe archive paths, and reads versions without importing."""
from __future__ import annotations

import importlib.util
import io
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installer():
    spec = importlib.util.spec_from_file_location("install_detectron2_v06", ROOT / ".ci" / "install_detectron2_v06.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sdist(path: Path, members: dict) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for name, text in members.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def test_only_the_detectron2_package_is_taken_from_the_sdist(tmp_path, installer):
    sdist = _sdist(tmp_path / "pb1-detectron2-0.6.tar.gz", {
        "pb1-detectron2-0.6/setup.py": "raise SystemExit('never run')\n",
        "pb1-detectron2-0.6/detectron2/__init__.py": '__version__ = "0.6"\n',
        "pb1-detectron2-0.6/detectron2/checkpoint/__init__.py": "",
        "pb1-detectron2-0.6/tools/train_net.py": "",
    })
    package = installer.unpack_package(sdist, tmp_path / "out")
    files = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert package.name == "detectron2" and files == [
        "pb1-detectron2-0.6/detectron2/__init__.py",
        "pb1-detectron2-0.6/detectron2/checkpoint/__init__.py",
    ]


def test_an_archive_path_leaving_the_directory_is_refused(tmp_path, installer):
    sdist = _sdist(tmp_path / "evil.tar.gz", {"pb1-detectron2-0.6/detectron2/../../../escaped.py": "x = 1\n"})
    with pytest.raises(SystemExit, match="refusing unsafe path"):
        installer.unpack_package(sdist, tmp_path / "out")
    assert not (tmp_path / "escaped.py").exists(), "nothing is extracted from an archive with an unsafe path"


def test_the_installed_version_is_read_from_the_file_not_imported(installer):
    """In the legacy environment it reads 0.6; elsewhere whatever Detectron2's __init__ says (or '' without one)."""
    found = installer.installed_version()
    if importlib.util.find_spec("detectron2") is None:
        assert found == ""
    else:
        import detectron2

        assert found == detectron2.__version__
