"""`.ci/install_detectron2_v06.py`, the legacy environment's documented install step: it takes only
the sdist's `detectron2/` package, refuses unsafe archive paths, and reads versions without importing."""
from __future__ import annotations

import importlib.util
import io
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


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


def _placeholder_module():
    path = ROOT / "tests" / "d2_placeholder" / "sitecustomize.py"
    spec = importlib.util.spec_from_file_location("convnext_d2_placeholder_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_placeholder_answers_only_for_detectron2s_compiled_ops():
    finder = _placeholder_module().PlaceholderFinder()
    assert finder.find_spec("detectron2._C") is not None
    assert finder.find_spec("detectron2") is None and finder.find_spec("detectron2._C.sub") is None
    assert finder.find_spec("torch._C") is None


def test_the_placeholder_comes_last_and_imports_nothing_at_startup():
    """Installed at the end of sys.meta_path (a compiled `_C` found by the normal finders wins), and
    an interpreter that loads it imports no detectron2."""
    import subprocess
    import sys

    code = (
        "import sys, importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('p', {str(ROOT / 'tests' / 'd2_placeholder' / 'sitecustomize.py')!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "assert isinstance(sys.meta_path[-1], m.PlaceholderFinder), sys.meta_path\n"
        "assert not any(n == 'detectron2' or n.startswith('detectron2.') for n in sys.modules), 'detectron2 imported'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
