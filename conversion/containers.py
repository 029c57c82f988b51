"""Where the weights are inside a loaded checkpoint (containers, nesting, wrapper prefixes).

Torch-free: it works on anything tensor-like, so the streaming path can use it on tensor
references without importing torch.
"""
from __future__ import annotations

import sys
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

from .errors import ContainerError, UnreadableCheckpoint

# Container keys, in the order tried.  Released official files use `model` (EMA files
# too); training checkpoints add `model_ema`; mmpretrain and others use `state_dict`.
_WEIGHT_CONTAINERS = ("model", "state_dict", "module", "model_state")  # model_state: pycls (.pyth)
_EMA_CONTAINERS = ("model_ema", "state_dict_ema")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / DataParallel, torch.compile


def walk(obj: Any, path: str = "") -> Iterator[Tuple[str, Any]]:
    """Every object inside a loaded checkpoint with its dotted path (`model.stages.0`, `args[1]`),
    the containers themselves included, outermost first."""
    yield path, obj
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from walk(v, f"{path}.{k}" if path else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from walk(v, f"{path}[{i}]")


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(k, str) for k in obj) and any(
        is_array(v) for v in obj.values()
    )


def is_array(v: Any) -> bool:
    """Tensor-like: a torch tensor, a numpy array, or a streamed tensor reference (shape and dtype)."""
    return hasattr(v, "shape") and hasattr(v, "dtype") and not isinstance(v, Mapping)


# Hand-made files sometimes nest the container: {"model": {"model": state_dict}}.
_MAX_NESTING = 3


def _find_in_container(obj: Any, depth: int) -> Optional[Tuple[Mapping[str, Any], List[str]]]:
    """The state dict at `obj`, or under its own `model`/`state_dict` key (nested containers)."""
    if _is_state_dict(obj):
        return obj, []
    if depth == 0 or not isinstance(obj, Mapping):
        return None
    for key in _WEIGHT_CONTAINERS:
        found = _find_in_container(obj.get(key), depth - 1)
        if found is not None:
            return found[0], [key] + found[1]
    return None


def select_state_dict(obj: Any, ema: bool = False) -> Tuple[Dict[str, Any], Optional[str]]:
    """Find the weights inside a loaded checkpoint.

    Returns the state dict (wrapper prefixes stripped, non-array entries dropped) and
    the container key it came from (None for a bare state dict; "model.model" when nested).

    Raises:
        ContainerError: no state dict, or `ema` asked for and none present.
    """
    if not isinstance(obj, Mapping):
        from .io.safe_pickle import Placeholder

        what = obj.cls if isinstance(obj, Placeholder) else None
        raise ContainerError(
            f"checkpoint holds {f'an object of class {what} (read past, not built)' if what else 'a ' + type(obj).__name__}, not a dict of weights.",
            "Save the weights with torch.save(model.state_dict()) or {'model': state_dict}.",
        )
    keys = _EMA_CONTAINERS if ema else _WEIGHT_CONTAINERS
    for key in keys:
        found = _find_in_container(obj.get(key), depth=_MAX_NESTING)
        if found is not None:
            sd, path = found
            return strip_wrapper_prefixes(sd), ".".join([key] + path)
    if ema:
        raise ContainerError(
            f"--ema asked for EMA weights but the checkpoint has none (top-level keys: {sorted(map(str, obj))[:10]}).",
            "Released '_ema' files keep their EMA weights under 'model': convert without --ema.",
        )
    if _is_state_dict(obj):
        return strip_wrapper_prefixes(obj), None
    raise ContainerError(
        f"no state dict found; top-level keys: {sorted(map(str, obj))[:10]}.",
        "Expected a bare state dict or one under 'model', 'state_dict' or 'model_ema' (with --ema).",
    )


def strip_wrapper_prefixes(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
    """Drop non-array entries and any wrapper prefix that every key carries."""
    from .io.safe_pickle import Placeholder  # kept, so the weight check names it (it is not data)

    sd = {k: v for k, v in state_dict.items() if is_array(v) or isinstance(v, Placeholder)}
    for prefix in _WRAPPER_PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):  # wrappers nest (DDP around torch.compile): strip again
            return strip_wrapper_prefixes({k[len(prefix):]: v for k, v in sd.items()})
    return sd


def check_weight_types(state_dict: Mapping[str, Any], tensors_only: bool = False) -> None:
    """Every weight must be a real tensor, array or tensor reference before anything is written
    (an object with `shape` and `dtype` attributes is not one; torch.load(weights_only=True) and so
    Detectron2 would refuse the file it made).

    Raises:
        UnreadableCheckpoint: naming the first entry that is not tensor data (a placeholder by its class).
    """
    from .io.handles import TensorRef
    from .io.safe_pickle import Placeholder

    torch, np = sys.modules.get("torch"), sys.modules.get("numpy")  # no tensor exists unless torch is imported
    for name, value in state_dict.items():
        ok = torch is not None and isinstance(value, torch.Tensor)
        if not tensors_only:
            ok = ok or isinstance(value, TensorRef) or (np is not None and type(value) is np.ndarray)
        if not ok:
            kind = type(value)
            what = f"an object of class {value.cls} (read past, not built)" if isinstance(value, Placeholder) else f"a {kind.__module__}.{kind.__qualname__}"
            raise UnreadableCheckpoint(
                f"weight '{name}' is {what}, not a tensor; nothing was written.",
                "Only tensors and arrays can be weights; re-save the weights with torch.save(model.state_dict()).",
            )
