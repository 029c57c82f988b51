"""`--import MODULE|FILE.py`: a file is loaded without its package's `__init__` (the CPU-only CI case),
and every way an import can be unusable is one or two lines naming the spec and the cause (exit 2)."""
from __future__ import annotations

import itertools
import re
import sys
import textwrap
from pathlib import Path

import pytest

from conversion.errors import ConversionError, UnusableImport
from conversion.imports import is_file_spec, load_imports

from ..support import require

require("detectron2")
from detectron2.modeling import BACKBONE_REGISTRY  # noqa: E402

from conversion import cli  # noqa: E402

_serial = itertools.count()

# A minimal registered backbone: what a fork's backbone file does at import time.
BACKBONE_SOURCE = """
from detectron2.modeling import BACKBONE_REGISTRY, Backbone


@BACKBONE_REGISTRY.register()
class {name}(Backbone):
    pass
"""


def _unique(prefix: str) -> str:
    """Registry names are global to the process: every test registers its own."""
    return f"{prefix}{next(_serial)}_{id(_serial)}"


def _write(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return str(path)


def _package_with_broken_init(root: Path, name: str) -> Path:
    """A package whose __init__ needs a compiled op that is not there (MaskDINO's way of saying so)."""
    pkg = root / f"pkg_{name.lower()}"
    _write(pkg / "__init__.py", """
        try:
            import NoSuchCompiledOp_for_tests
        except ModuleNotFoundError:
            raise ModuleNotFoundError("\\n\\nPlease compile MultiScaleDeformableAttention CUDA op with the following commands:")
        """)
    _write(pkg / "modeling" / "__init__.py", "")
    _write(pkg / "modeling" / "backbone.py", BACKBONE_SOURCE.format(name=name))
    return pkg


def _directory(path: Path) -> str:
    path.mkdir()
    return str(path) + "/"


def _error_of(specs) -> UnusableImport:
    with pytest.raises(UnusableImport) as info:
        load_imports(specs)
    return info.value


def test_a_file_is_loaded_without_running_its_packages_init(tmp_path):
    """The backbone registers although importing its package would fail."""
    name = _unique("FileBackbone")
    pkg = _package_with_broken_init(tmp_path, name)
    load_imports([str(pkg / "modeling" / "backbone.py")])
    assert name in dict(BACKBONE_REGISTRY), "the file's @BACKBONE_REGISTRY.register() did not take effect"
    assert pkg.name not in sys.modules, "the package's __init__ ran"


def test_loading_the_same_file_twice_registers_once(tmp_path):
    """A suite calls the gate many times in one process: the second load must not re-register (Detectron2 would raise)."""
    path = _write(tmp_path / "twice.py", BACKBONE_SOURCE.format(name=_unique("TwiceBackbone")))
    load_imports([path])
    load_imports([path, path])


def test_specs_load_in_order(tmp_path):
    """A later file may use what an earlier one registered (repeatable, in order)."""
    first = _unique("First")
    a = _write(tmp_path / "a.py", BACKBONE_SOURCE.format(name=first))
    b = _write(tmp_path / "b.py", f"""
        from detectron2.modeling import BACKBONE_REGISTRY
        base = BACKBONE_REGISTRY.get("{first}")

        @BACKBONE_REGISTRY.register()
        class {first}Child(base):
            pass
        """)
    load_imports([a, b])
    assert f"{first}Child" in dict(BACKBONE_REGISTRY)


def test_module_names_and_paths_are_told_apart():
    assert is_file_spec("pkg/modeling/backbone.py") and is_file_spec("backbone.py") and is_file_spec("./dir/x")
    assert not is_file_spec("dimaskdino.modeling.backbone.convnext") and not is_file_spec("tests.d2_styles")


def test_a_module_name_still_imports_as_python_does():
    load_imports(["tests.d2_styles"])  # registers D2ConvNeXt-style backbones used by the verify tests


@pytest.mark.parametrize(
    "case, build, expected",
    [
        ("missing-file", lambda root: str(root / "nope" / "backbone.py"), r"backbone\.py: no such file"),
        ("directory", lambda root: _directory(root / "adir"), "is a directory"),
        ("syntax-error", lambda root: _write(root / "syntax.py", "def broken(:\n    pass\n"), "syntax error on line 1"),
        ("raises", lambda root: _write(root / "raises.py", "raise RuntimeError('boom at import')\n"),
         "running it raised RuntimeError: boom at import"),
        ("registers-nothing", lambda root: _write(root / "nothing.py", "import torch\nX = 1\n"), "registers no backbone"),
        ("needs-a-missing-module", lambda root: _write(root / "needs.py", "import NoSuchModule_xyz\n"),
         "imports 'NoSuchModule_xyz', which is not installed"),
        ("relative-import", lambda root: _write(root / "rel.py", "from .sibling import x\n"), "relative import"),
    ],
)
def test_unusable_files_name_the_file_and_the_cause(tmp_path, case, build, expected):
    spec = build(tmp_path)
    err = _error_of([spec])
    assert spec.rstrip("/") in err.message and err.hint, str(err)
    assert re.search(expected, err.message), err.message
    assert isinstance(err, ConversionError) and err.exit_status == 2


def test_a_module_whose_package_needs_a_missing_compiled_op_says_to_pass_the_file(tmp_path, monkeypatch):
    """The CPU-runner failure of the issue: name the missing module, and the way out."""
    name = _unique("ModBackbone")
    pkg = _package_with_broken_init(tmp_path, name)
    monkeypatch.syspath_prepend(str(tmp_path))
    err = _error_of([f"{pkg.name}.modeling.backbone"])
    assert "'NoSuchCompiledOp_for_tests'" in err.message and "cannot import" in err.message, err.message
    assert ".py file" in err.hint, err.hint
    assert name not in dict(BACKBONE_REGISTRY)


def test_a_module_that_does_not_exist_says_where_to_run(monkeypatch):
    err = _error_of(["no_such_package_xyz.backbone"])
    assert "no module named 'no_such_package_xyz'" in err.message and "PYTHONPATH" in err.hint, str(err)


@pytest.mark.parametrize("spec", ["missing_dir/backbone.py", "no_such_package_xyz.backbone"])
def test_cli_verify_with_an_unusable_import_exits_2_in_two_plain_lines(tmp_path, capsys, spec, monkeypatch):
    from conversion.testing import write_synthetic_checkpoint

    from ..support.cli import assert_plain_error

    ckpt = write_synthetic_checkpoint(tmp_path / "w.pth", layout="detectron2", variant="convnext_atto")
    monkeypatch.chdir(tmp_path)
    status = cli.main(["verify", ckpt, "--import", spec])
    err = capsys.readouterr().err
    assert status == 2, err
    assert_plain_error(err)
    assert spec in err


# ---------------------------------------------------------------- the config half of the same bad input


@pytest.mark.parametrize(
    "case, text, expected",
    [
        ("not-yaml", "MODEL: [unclosed\n  : : :\n", "not a usable Detectron2 YAML config (ParserError"),
        ("not-a-mapping", "just text, not a mapping\n", "not a usable Detectron2 YAML config"),
        ("unregistered-backbone", "MODEL:\n  BACKBONE:\n    NAME: NoSuchBackbone_xyz\n", "'NoSuchBackbone_xyz' is not registered"),
    ],
)
def test_cli_verify_with_an_unusable_config_exits_2_in_two_plain_lines(tmp_path, capsys, case, text, expected):
    from conversion.testing import write_synthetic_checkpoint

    from ..support.cli import assert_plain_error

    ckpt = write_synthetic_checkpoint(tmp_path / "w.pth", layout="detectron2", variant="convnext_atto")
    config = tmp_path / f"{case}.yaml"
    config.write_text(text)
    status = cli.main(["verify", ckpt, "--config", str(config)])
    err = capsys.readouterr().err
    assert status == 2, err
    assert_plain_error(err)
    assert expected in err, err
