"""The outcome rule of the malformed-file tests, and its independent decoder.

A malformed source may end in a `ConversionError` (nothing left behind) or in a conversion whose
output holds exactly the tensors the (mutated) source decodes to: decoded here by torch's own
`weights_only` reader, safetensors, or this module's small unpickler, never by `conversion.read`.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import io
import os
import pickle
import resource
import tempfile
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping

import numpy as np
import pytest
import torch

from conversion import convert
from conversion.architecture import Architecture
from conversion.errors import ConversionError

from ..support import random_canonical_state_dict, require
from .assemble import torch_bytes

_NP_MULTIARRAY = __import__("importlib").import_module(
    "numpy._core.multiarray" if int(np.__version__.split(".")[0]) >= 2 else "numpy.core.multiarray"
)
TINY = Architecture(depths=(1, 1, 1, 1), dims=(4, 4, 4, 4), num_classes=2, classifier_norm=True)
CLASSIFIER_PREFIXES = ("head.", "norm.")  # dropped by every conversion (docs/design.md, output formats)


def leftovers(folder: Path) -> List[str]:
    return sorted(os.listdir(folder)) if folder.exists() else []


class _IndependentUnpickler(pickle.Unpickler):
    """The test's own decoding of a plain pickle (not read.py's): arrays, pickled tensors, plain containers."""

    _ALLOWED = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("builtins", "bytearray"): bytearray,
        ("_codecs", "encode"): __import__("codecs").encode,  # protocol-2 pickles spell bytes this way
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        # numpy 2 pickles through numpy._core (the core environment); numpy 1 through numpy.core.
        ("numpy.core.multiarray", "_reconstruct"): _NP_MULTIARRAY._reconstruct,
        ("numpy.core.multiarray", "scalar"): _NP_MULTIARRAY.scalar,
        ("numpy._core.multiarray", "_reconstruct"): _NP_MULTIARRAY._reconstruct,
        ("numpy._core.multiarray", "scalar"): _NP_MULTIARRAY.scalar,
        ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return lambda data: torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        raise pickle.UnpicklingError(f"test decoder: {module}.{name} not allowed")


# The reference decoders (Python's unpickler, torch's reader) bound nothing: an 8 KB pickle found by
# the fuzzer makes Python's unpickler allocate 4.7 GB (convnext-d2 refuses nothing there and peaks at
# 34 MB).  They run with this much address space beyond what the process has mapped; past it they
# raise MemoryError, which means "no reference for this file", not a broken promise of the tool.
REFERENCE_HEADROOM_BYTES = 1 << 30


def _mapped_bytes() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))


@contextlib.contextmanager
def _bounded_address_space(headroom: int) -> Iterator[None]:
    """RLIMIT_AS at what is mapped now plus `headroom` while the block runs (Linux; elsewhere unbounded)."""
    if not os.path.exists("/proc/self/status"):
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = _mapped_bytes() + headroom
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def decode_independently(path: Path, headroom: int = REFERENCE_HEADROOM_BYTES) -> Any:
    """What the file holds, read with torch / safetensors / the test's unpickler, never with read.py.

    Raises:
        MemoryError: decoding needs more than `headroom` bytes of address space.
    """
    with warnings.catch_warnings(), _bounded_address_space(headroom):
        # A flipped byte may turn a pickle's protocol marker into another protocol; torch's reader
        # warns about that before it decides.  Its decision is what counts here, not the warning.
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        return _decode(path.read_bytes())


def _decode(data: bytes) -> Any:
    if data[:4] == b"PK\x03\x04":
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if len(data) > 8 and data[8:9] == b"{":
        from safetensors.torch import load

        return load(data)
    obj = _IndependentUnpickler(io.BytesIO(data), encoding="latin1").load()
    if obj == 0x1950A86A20F9469CFC6C:  # the first record of a legacy torch file
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    return obj


def _as_tensor(value: Any) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(value))


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and every byte (NaN payloads and -0.0 included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def expected_output(source: Any, ext: str) -> Dict[str, torch.Tensor]:
    """The target a conversion must write for an official-layout source: every non-classifier tensor, prefixed."""
    sd = source["model"] if isinstance(source, Mapping) and isinstance(source.get("model"), Mapping) else source
    out = {}
    for name, value in sd.items():
        if name.startswith(CLASSIFIER_PREFIXES) or not (isinstance(value, (torch.Tensor, np.ndarray))):
            continue
        tensor = _as_tensor(value)
        if ext == ".pkl" and tensor.dtype == torch.bfloat16:
            tensor = tensor.float()  # numpy has no bfloat16 (write.py)
        out["backbone." + name] = tensor
    return out


def read_output(path: Path) -> Dict[str, torch.Tensor]:
    if path.suffix == ".pkl":
        model = _IndependentUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()["model"]
    else:
        model = torch.load(path, map_location="cpu", weights_only=True)["model"]
    return {k: _as_tensor(v) for k, v in model.items()}


def _decodes_differently_twice(src: Path) -> bool:
    first, second = (expected_output(decode_independently(src), ".pth") for _ in range(2))
    return any(not same_bits(first[k], second[k]) for k in first)


def convert_and_judge(src: Path, out_dir: Path, ext: str = ".pth") -> str:
    """Convert `src`; the only outcomes allowed: a ConversionError leaving `out_dir` empty, or a faithful output.

    Returns the outcome's name (the error class, or "converted").
    """
    dst = out_dir / f"model_d2{ext}"
    try:
        convert(str(src), str(dst))
    except ConversionError as err:
        left = leftovers(out_dir)
        assert left == [], f"{type(err).__name__} left files behind: {left}"
        return type(err).__name__
    except Exception as err:  # noqa: BLE001 - the point: nothing else may escape
        left = leftovers(out_dir)
        pytest.fail(f"{type(err).__name__} escaped convert() (not a ConversionError): {err}"[:600])
    left = leftovers(out_dir)
    assert left == [dst.name], f"a successful conversion left {left}"
    try:
        source = decode_independently(src)
    except Exception as err:  # noqa: BLE001
        pytest.fail(f"converted a file that torch/safetensors/the test's unpickler cannot decode ({type(err).__name__}: {err})"[:600])
    want, got = expected_output(source, ext), read_output(dst)
    # A source that decodes differently twice asks for bytes it does not hold (torch fills them from
    # uninitialised memory): converting it at all is the bug.
    assert not _decodes_differently_twice(src), "converted a file whose tensors read uninitialised memory"
    assert sorted(got) == sorted(want), f"names differ: extra {sorted(set(got) - set(want))[:5]}, missing {sorted(set(want) - set(got))[:5]}"
    wrong = [k for k in want if not same_bits(got[k], want[k])]
    assert wrong == [], f"{len(wrong)} tensors differ from what the source decodes to: {wrong[:5]}"
    return "converted"


# ================================================================ valid sources to break


FUZZ_FORMATS = ("pth-zip", "pth-legacy", "pkl-numpy", "pkl-tensors", "safetensors")


@functools.lru_cache(maxsize=None)
def tiny_state_dict() -> Dict[str, torch.Tensor]:
    return random_canonical_state_dict(TINY, seed=11)


@functools.lru_cache(maxsize=None)
def valid_source(fmt: str) -> bytes:
    """A small official-layout checkpoint (classifier included) in `fmt`, as the libraries write it."""
    sd = tiny_state_dict()
    if fmt == "pth-zip":
        return torch_bytes({"model": sd})
    if fmt == "pth-legacy":
        return torch_bytes({"model": sd}, legacy=True)
    if fmt == "pkl-numpy":  # the model-zoo shape: pickle of numpy arrays
        return pickle.dumps({"model": {k: v.numpy() for k, v in sd.items()}, "__author__": "x"}, protocol=4)
    if fmt == "pkl-tensors":  # pickle.dump of tensors: storages via torch.storage._load_from_bytes
        return pickle.dumps({"model": sd}, protocol=4)
    if fmt == "safetensors":
        require("safetensors")
        from safetensors.torch import save

        return save(dict(sd))
    raise ValueError(fmt)


def suffix(fmt: str) -> str:
    return {"pkl-numpy": ".pkl", "pkl-tensors": ".pkl", "safetensors": ".safetensors"}.get(fmt, ".pth")


def judge_bytes(data: bytes, fmt: str, ext: str = ".pth") -> str:
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / f"source{suffix(fmt)}"
        src.write_bytes(data)
        (Path(tmp) / "out").mkdir()
        return convert_and_judge(src, Path(tmp) / "out", ext)
