"""`--import FILE.py` that cannot run as a file is refused with its own reason: a relative import
needs its package, and the user is told to import the module by name instead (a generic "running
it raised ImportError" would leave them guessing)."""
from __future__ import annotations

from conversion.cli import main

from ..support import require
from ..support.cli import EXIT_USAGE


def test_an_import_file_with_a_relative_import_is_refused_saying_so(tmp_path, capsys):
    require("detectron2")
    (tmp_path / "styles.py").write_text("from .sibling import BACKBONE\n")
    (tmp_path / "model_d2.pth").write_bytes(b"")  # the imports run before the file is read

    status = main(["verify", str(tmp_path / "model_d2.pth"), "--import", str(tmp_path / "styles.py")])
    err = capsys.readouterr().err

    assert status == EXIT_USAGE
    assert f"--import {tmp_path / 'styles.py'}: it uses a relative import, which needs its package" in err, err
    assert "Import the module by name instead" in err and "Traceback" not in err
