"""Write tensors held in memory (the Python API) as a Detectron2 checkpoint, atomically, in the
format its extension names, through the same writers `convert` uses (conversion/stream.py):

- `.pth` / `.pt`: a torch archive of `{"model": tensors, "__author__": ...}`.  Only tensors and
  plain containers, so `torch.load(weights_only=True)` (Detectron2 on torch >= 2.6) reads it.
- `.pkl`: Detectron2 model-zoo format, a plain pickle of numpy arrays with `__author__`
  (without it Detectron2 takes the dict for Caffe2 blobs and wraps it again; docs/troubleshooting.md).

The bytes go to a temporary file beside the destination, are synced, read back and compared
tensor by tensor with the tensors given (read by the project's reader, decoded by torch), and
only then renamed over the destination: a failure at any point leaves the destination as it was.
`convert` never comes here (it imports torch); its writers check CRCs instead.
"""
from __future__ import annotations

import io
from typing import Mapping, Tuple

import torch

from .errors import VerificationFailed
from .formats import AUTHOR, output_format  # noqa: F401  (AUTHOR, output_format re-exported)
from .io.atomic import write_atomically

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
    from .stream import TORCH_SMALL_RECORDS, write_pth_to, write_pkl_to

    tensors, model = writable(None, {}, state_dict, gather=True)
    buf = io.BytesIO()
    if fmt == "torch":
        payload = {"model": model, "__author__": AUTHOR}
        write_pth_to(buf, tensors, payload, sorted({ref.storage.key for ref in model.values()}), TORCH_SMALL_RECORDS)
    else:
        write_pkl_to(buf, tensors, model, AUTHOR)
    return buf.getvalue()


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Exact equality in which NaN equals NaN (a checkpoint may legitimately hold NaN)."""
    if torch.equal(a, b):
        return True
    return a.is_floating_point() and bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())


def _check_written(path: str, state_dict: Mapping[str, torch.Tensor], fmt: str, shown_as: str = "") -> None:
    from .errors import ConversionError
    from .read import materialize, open_source  # read back exactly as a user's file would be read

    try:
        data = materialize(open_source(path))
    except ConversionError as err:  # the file just written does not read: a verification failure
        shown = shown_as or path
        cause = err.message.replace(path + ": ", "").replace(path, shown)  # name the destination, not the temp file
        raise VerificationFailed(f"{shown}: written file does not read back ({cause})", "Report this as a bug.") from None
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or data.get("__author__") != AUTHOR or set(model) != set(state_dict):
        raise VerificationFailed(f"{shown_as or path}: written file does not read back with the expected keys.", "Report this as a bug.")
    bad = []
    for name, src in state_dict.items():
        got = model[name] if isinstance(model[name], torch.Tensor) else torch.from_numpy(model[name])
        want = src.detach().cpu().to(stored_dtype(src.dtype, fmt))
        if got.dtype != want.dtype or got.shape != want.shape or not _same_values(got, want):
            bad.append(name)
    if bad:
        raise VerificationFailed(f"{shown_as or path}: {len(bad)} tensor(s) differ after reading back: {', '.join(sorted(bad)[:5])}.", "Report this as a bug.")


def write_checkpoint(path: str, state_dict: Mapping[str, torch.Tensor], *, force: bool = False, source: str = "") -> Tuple[str, int]:
    """Write `state_dict` to `path` atomically; return (format, bytes written).

    Raises:
        DestinationError: bad extension, destination exists (without `force`), is the
            source, or its directory is missing or not writable.
        VerificationFailed: the file did not read back equal (nothing is left behind).
    """
    fmt = output_format(path)
    data = encode(state_dict, fmt)
    size = write_atomically(
        path,
        force=force,
        source=source,
        write=lambda f: f.write(data),
        verify=lambda tmp: _check_written(tmp, state_dict, fmt, shown_as=path),
    )
    return fmt, size
