"""Running `convnext-d2 convert` in-process on a dict saved as a user would save it."""
from __future__ import annotations

import os
from typing import Any, Tuple

import torch

from conversion.cli import main

EXIT_OK, EXIT_USAGE = 0, 2


def convert_cli(directory: Any, obj: Any, *extra: str, capsys: Any) -> Tuple[int, str, str]:
    """(exit status, stdout, stderr) of converting `obj` saved with torch.save; a refusal must write nothing."""
    src = os.path.join(str(directory), "source.pth")
    torch.save(obj, src)
    dst = os.path.join(str(directory), "out.pth")
    before = set(os.listdir(str(directory)))
    status = main(["convert", src, dst, *extra])
    out, err = capsys.readouterr()
    if status != EXIT_OK:
        assert not os.path.exists(dst), "a refused conversion wrote its destination"
        assert set(os.listdir(str(directory))) == before, "a refused conversion left a file behind"
    return status, out, err
