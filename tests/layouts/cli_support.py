"""Converting a dict saved as a user would save it: in-process through `convnext-d2 convert`, or through
the library where a refusal is the point (its error class and message, `pytest.raises`)."""
from __future__ import annotations

import os
from typing import Any, Optional, Tuple, Type

import pytest
import torch

from conversion import convert
from conversion.cli import main
from conversion.errors import ConversionError

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


def refusal(directory: Any, obj: Any, error: Type[ConversionError], layout: Optional[str] = None, match: Optional[str] = None) -> str:
    """`conversion.convert` on `obj` saved with torch.save raises exactly `error` (matching `match`) and
    writes nothing; returns the error's text (message and hint) for the test's own checks."""
    src = os.path.join(str(directory), "source.pth")
    torch.save(obj, src)
    before = set(os.listdir(str(directory)))
    with pytest.raises(error, match=match) as refused:
        convert(src, os.path.join(str(directory), "out.pth"), layout=layout)
    assert type(refused.value) is error, f"{type(refused.value).__name__}: {refused.value}"
    assert set(os.listdir(str(directory))) == before, "a refused conversion wrote or left a file"
    return str(refused.value)
