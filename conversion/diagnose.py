"""What Detectron2 would make of a file as it is (LAYOUTS.md, "How Detectron2 reads MODEL.WEIGHTS").

Detectron2 picks its reader by extension: `.pkl` goes through plain `pickle.load`
and needs `model` *and* `__author__` to be taken as-is; anything else goes through
`torch.load`.  These notes explain the two documented failures of hand-made files
(BACKGROUND.md) when such a file is given to us as a source.
"""
from __future__ import annotations

import os
from typing import Any, List

from .read import ZIP_MAGIC


def d2_reader_problems(path: str, loaded: Any) -> List[str]:
    """Problems Detectron2's `DetectionCheckpointer` would hit reading `path` directly."""
    if not path.lower().endswith(".pkl"):
        return []
    with open(path, "rb") as f:
        is_torch_archive = f.read(4) == ZIP_MAGIC
    name = os.path.basename(path)
    if is_torch_archive:
        return [
            f"{name} is a torch.save archive under a .pkl name: Detectron2 reads .pkl with pickle.load and fails "
            "('UnpicklingError: A load persistent id instruction was encountered...')."
        ]
    if isinstance(loaded, dict) and "model" in loaded and "__author__" not in loaded:
        return [
            f"{name} has 'model' but no '__author__': Detectron2 takes it for Caffe2 blobs and fails "
            "('ValueError: Unsupported type found in checkpoint! model: <class 'dict'>')."
        ]
    return []
