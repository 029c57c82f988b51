"""Read a checkpoint file without running code from it, and find the state dict inside.

Which reader applies is decided by the file's bytes, not its name: a torch zip
archive is read by `torch.load(weights_only=True)` whatever it is called, and a
plain pickle by a restricted unpickler that rebuilds only arrays, tensors and
plain containers.  Detectron2 itself decides by extension (LAYOUTS.md), which is
why a torch archive named `.pkl` breaks it; `describe_d2_reader` says what it would do.
"""
from __future__ import annotations

import argparse
import codecs
import collections
import importlib
import inspect
import io
import pickle
import zipfile
from typing import Any, Dict, Tuple

import torch

from .errors import UnreadableCheckpoint, UnsafeCheckpoint
from .formats import ZIP_MAGIC, check_source

# First record of a legacy (pre-1.6, non-zip) torch.save file: this pickled int.
_LEGACY_TORCH_MAGIC = 0x1950A86A20F9469CFC6C
_TORCH_HAS_WEIGHTS_ONLY = "weights_only" in inspect.signature(torch.load).parameters

# Globals a plain-pickle checkpoint may name.  Anything else stops the read.
# numpy moved its internals to numpy._core in 2.0; both spellings appear in files.
_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}
_PLAIN_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "bytearray"): bytearray,
    ("argparse", "Namespace"): argparse.Namespace,  # training args: inert attribute bag
    # Protocol-2 pickles (torch.save's default) spell bytes as codecs.encode(str, "latin1").
    ("_codecs", "encode"): codecs.encode,
}


def _safe_bytes_to_storage(data: bytes) -> Any:
    """Replacement for torch.storage._load_from_bytes: the inner archive is read safely too."""
    return _torch_load(io.BytesIO(data), "<tensor inside pickle>")


def _numpy_multiarray() -> Any:
    """numpy's multiarray module under its current name (numpy 2 moved numpy.core to numpy._core)."""
    import numpy as np  # only files that hold arrays need numpy

    major = int(np.__version__.split(".")[0])
    return importlib.import_module("numpy._core.multiarray" if major >= 2 else "numpy.core.multiarray")


def _numpy_global(module: str, name: str) -> Any:
    """Resolve an allowed numpy global; both spellings of multiarray map to the installed one."""
    import numpy as np

    if (module, name) == ("numpy", "ndarray"):
        return _ndarray_over_buffer
    if name == "_reconstruct":  # numpy's own pickles: _reconstruct(ndarray, ...) then the data as state
        reconstruct = _numpy_multiarray()._reconstruct
        return lambda subtype, *args: reconstruct(np.ndarray if subtype is _ndarray_over_buffer else subtype, *args)
    return getattr(np if module == "numpy" else _numpy_multiarray(), name)


def _ndarray_over_buffer(shape: Any, dtype: Any, buffer: Any = None, offset: int = 0, strides: Any = None, order: Any = None) -> Any:
    """`numpy.ndarray(shape, dtype, buffer)` as our .pkl spells arrays; without a buffer of exactly the
    right size numpy would hand out uninitialised memory, so that is refused."""
    import numpy as np

    dt = np.dtype(dtype)
    count = 1
    for d in shape if isinstance(shape, (tuple, list)) else (shape,):
        count *= int(d)
    if not isinstance(buffer, (bytes, bytearray)) or offset or strides is not None or dt.hasobject or len(buffer) != count * dt.itemsize:
        raise UnreadableCheckpoint(
            f"an array ({dtype}, shape {shape}) has no data of its own size ({len(buffer) if isinstance(buffer, (bytes, bytearray)) else 'none'} bytes).",
            "The file is corrupt or crafted; re-save the weights.",
        )
    return np.ndarray(shape, dt, buffer)


def _rebuild_tensor_checked(storage: Any, offset: int, size: Any, stride: Any, *rest: Any) -> Any:
    """torch's tensor rebuild, after checking the tensor lies inside its storage (otherwise torch grows
    the storage and the tensor reads uninitialised memory)."""
    size, stride = tuple(size), tuple(stride)
    # TypedStorage.size() warns of its deprecation in torch 2.x; _size() is the same count, silent.
    elements = (getattr(storage, "_size", None) or storage.size)()
    extent = offset + sum((n - 1) * st for n, st in zip(size, stride)) + 1 if all(n > 0 for n in size) else offset
    if offset < 0 or any(n < 0 for n in size) or any(st < 0 for st in stride) or len(size) != len(stride) or extent > elements:
        raise UnreadableCheckpoint(
            f"a tensor (shape {list(size)}, offset {offset}) reaches past its storage of {elements} elements.",
            "The file is corrupt or crafted; re-save the weights.",
        )
    return torch._utils._rebuild_tensor_v2(storage, offset, size, stride, *rest)


class _AllowlistUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays, pickled torch tensors and plain containers; refuses every other global."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _PLAIN_GLOBALS:
            return _PLAIN_GLOBALS[(module, name)]
        if (module, name) in _NUMPY_GLOBALS:
            return _numpy_global(module, name)
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return _safe_bytes_to_storage
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor_checked
        if module == "torch._utils" and name == "_rebuild_parameter":
            return torch._utils._rebuild_parameter
        raise UnsafeCheckpoint(
            f"refusing to load: the file asks to build '{module}.{name}', which is not tensor data.",
            "Only checkpoints made of tensors, arrays and plain containers are read; "
            "re-save the weights with torch.save(model.state_dict()).",
        )


class _RestrictedUnpickler(_AllowlistUnpickler):
    """For plain pickles: a persistent id has no meaning there, so it is refused too."""

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpoint(
            "refusing to load: a plain pickle refers to external storage (persistent id).",
            "Re-save the weights with torch.save or as numpy arrays.",
        )


def _torch_safe_globals() -> list:
    """What a weights_only read may build beyond tensors: training args and numpy arrays.

    Some tools save numpy arrays inside .pth files; torch >= 2.6 refuses them by default
    (and so does Detectron2 on it), but they are data, so we read them.
    """
    allowed: list = [argparse.Namespace]
    try:
        import numpy as np
    except ImportError:
        return allowed
    allowed += [np.ndarray, np.dtype]
    allowed += [type(np.dtype(c)) for c in "?bBhHiIlLqQefdgFDG"]  # numpy >= 1.25 pickles dtype classes
    allowed.append(_numpy_multiarray()._reconstruct)
    return allowed


# Storage classes a torch archive names in its persistent ids (torch 1.x and 2.x alike).
_TORCH_STORAGES = {
    f"{kind}Storage"
    for kind in ("Float", "Half", "BFloat16", "Double", "Long", "Int", "Short", "Char", "Byte", "Bool", "ComplexFloat", "ComplexDouble", "Untyped")
}
_TORCH_REBUILDERS = {"_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_parameter"}


class _TorchArchiveUnpickler(_AllowlistUnpickler):
    """The restricted unpickler plus what torch.load's own records need: storages and tensor rebuilders.

    Used where torch has no usable `weights_only` (torch < 2.4 cannot allowlist training `args`):
    torch.load then unpickles with this class and supplies storages through its persistent_load.
    """

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in _TORCH_STORAGES and hasattr(torch, name):
            return getattr(torch, name)
        if module == "torch.storage" and name == "UntypedStorage" and hasattr(torch.storage, name):
            return torch.storage.UntypedStorage
        if module == "torch._utils" and name in _TORCH_REBUILDERS and hasattr(torch._utils, name):
            return _rebuild_tensor_checked if name == "_rebuild_tensor_v2" else getattr(torch._utils, name)
        return super().find_class(module, name)
    # No persistent_load here: torch.load assigns its own (storages), which a method would shadow.


class _TorchArchivePickleModule:
    """The `pickle_module` torch.load is given on old torch: only `Unpickler` and `load` are used."""

    __name__ = "convnext_d2_restricted_pickle"
    Unpickler = _TorchArchiveUnpickler

    @staticmethod
    def load(f: Any, **kwargs: Any) -> Any:
        return _TorchArchiveUnpickler(f, **kwargs).load()


# torch >= 2.4 can allowlist globals for weights_only; older torch uses the restricted pickle module.
_TORCH_HAS_SAFE_GLOBALS = _TORCH_HAS_WEIGHTS_ONLY and hasattr(torch.serialization, "safe_globals")


def _torch_load(f: Any, name: str) -> Any:
    try:
        if _TORCH_HAS_SAFE_GLOBALS:
            with torch.serialization.safe_globals(_torch_safe_globals()):
                return torch.load(f, map_location="cpu", weights_only=True)
        extra = {"weights_only": False} if _TORCH_HAS_WEIGHTS_ONLY else {}
        return torch.load(f, map_location="cpu", pickle_module=_TorchArchivePickleModule, **extra)
    except pickle.UnpicklingError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
        # torch's message ends with generic advice; the line naming the refused global is the cause.
        cause = [line for line in lines if "unsupported" in line.lower() and line.rstrip(":") != "WeightsUnpickler error"]
        first = next(iter(cause + [line for line in lines if "WeightsUnpickler" in line]), lines[-1])
        raise UnsafeCheckpoint(
            f"{name}: refusing to load objects that are not tensor data ({first[:200]}).",
            "Only tensors, arrays and plain containers are read; re-save with torch.save(state_dict).",
        ) from None


def _looks_like_safetensors(f: Any) -> bool:
    """safetensors: an 8-byte little-endian header length, then a JSON object."""
    start = f.read(9)
    f.seek(0)
    if len(start) < 9 or start[8:9] != b"{":
        return False
    size = int.from_bytes(start[:8], "little")
    return 2 <= size <= 100_000_000


def _load_safetensors(path: str) -> Dict[str, Any]:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise UnreadableCheckpoint(
            f"{path}: a safetensors file, and the safetensors package is not installed.",
            "pip install safetensors",
        ) from None
    return dict(load_file(path, device="cpu"))


def load_checkpoint(path: str) -> Any:
    """Read the file at `path` into Python objects, never executing code from it."""
    return read_checkpoint(path)[0]


def read_checkpoint(path: str) -> Tuple[Any, str]:
    """Read the file at `path`, never executing code from it; return (objects, format).

    The format is decided by the bytes: "safetensors", "torch-zip", "torch-legacy" or "pickle".

    Raises:
        UnreadableCheckpoint: missing, a directory, empty, or not a pickle/torch file.
        UnsafeCheckpoint: the file names something other than tensor data.
    """
    check_source(path)
    try:
        with open(path, "rb") as f:
            head = f.read(4)
            f.seek(0)
            if not head:
                raise UnreadableCheckpoint(f"{path}: file is empty (0 bytes).", "Re-download or re-save the checkpoint.")
            if _looks_like_safetensors(f):
                return _load_safetensors(path), "safetensors"
            if head == ZIP_MAGIC:
                if not zipfile.is_zipfile(path):
                    raise UnreadableCheckpoint(f"{path}: truncated or corrupt torch archive.", "Re-download or re-save it.")
                return _torch_load(f, path), "torch-zip"
            obj = _RestrictedUnpickler(f, encoding="latin1").load()
            if isinstance(obj, int) and obj == _LEGACY_TORCH_MAGIC:
                f.seek(0)
                return _torch_load(f, path), "torch-legacy"
            return obj, "pickle"
    except UnsafeCheckpoint as err:
        if err.message.startswith(path):
            raise
        raise UnsafeCheckpoint(f"{path}: {err.message}", err.hint) from None
    except (UnreadableCheckpoint, OSError) as err:
        if isinstance(err, UnreadableCheckpoint):
            raise
        raise UnreadableCheckpoint(f"{path}: cannot read ({err.strerror or err}).", "Check the path and permissions.") from None
    except Exception as err:  # any parse failure of foreign bytes is the same user-facing fact
        raise UnreadableCheckpoint(
            f"{path}: not a readable checkpoint ({type(err).__name__}: {str(err)[:160]}).",
            "Expected a torch.save file (.pth/.pt) or a Detectron2 .pkl; the file may be truncated or corrupt.",
        ) from None
