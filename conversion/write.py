"""The exact bytes of a Detectron2 checkpoint for tensors held in memory (`encode`), in the format
its extension names, made by the same writers `convert` uses (conversion/io/torch_writer.py,
conversion/io/modelzoo_writer.py); `conversion.testing` writes its `detectron2` files with it.

- `.pth` / `.pt`: a torch archive of `{"model": tensors, "__author__": ...}`.  Only tensors and
  plain containers, so `torch.load(weights_only=True)` (Detectron2 on torch >= 2.6) reads it.
- `.pkl`: Detectron2 model-zoo format, a plain pickle of numpy arrays with `__author__`
  (without it Detectron2 takes the dict for Caffe2 blobs and wraps it again; docs/troubleshooting.md).
"""
from __future__ import annotations

import io
from typing import Mapping

import torch

from .formats import AUTHOR, output_format  # noqa: F401  (AUTHOR, output_format re-exported)

# numpy has no bfloat16: a .pkl stores bf16 tensors as float32 (exact, every bf16 is a float32).
# Protocol 4 reads on every Python 3 Detectron2 supports (3.4+) and stores large arrays (the model-zoo
# writer writes it; conversion.testing writes plain pickles with it too).
PICKLE_PROTOCOL = 4
_PKL_UPCAST = {torch.bfloat16: torch.float32}


def stored_dtype(dtype: torch.dtype, fmt: str) -> torch.dtype:
    """The dtype a tensor of `dtype` has once written in `fmt`."""
    return _PKL_UPCAST.get(dtype, dtype) if fmt == "pickle" else dtype


def encode(state_dict: Mapping[str, torch.Tensor], fmt: str) -> bytes:
    """The exact bytes of the checkpoint file, as the one writer of each format makes them
    (deterministic: same input, same bytes); tensors and arrays in memory become handles."""
    from .io.tensor_bytes import writable
    from .io.modelzoo_writer import write_pkl_to
    from .io.torch_writer import TORCH_SMALL_RECORDS, write_pth_to

    tensors, model = writable(None, {}, state_dict, gather=True)
    buf = io.BytesIO()
    if fmt == "torch":
        payload = {"model": model, "__author__": AUTHOR}
        write_pth_to(buf, tensors, payload, sorted({ref.storage.key for ref in model.values()}), TORCH_SMALL_RECORDS)
    else:
        write_pkl_to(buf, tensors, model, AUTHOR)
    return buf.getvalue()
