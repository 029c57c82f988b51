"""The fuzz harness's seed corpus: small valid checkpoints of every format the tool reads.

`python -m tests.fuzz.seeds DIR` writes them.  Each seed is one command byte (which command runs
on it, see `oracle.command_of`) and the file's bytes.  The checkpoints are synthetic (random weights
in the official layout, a ConvNeXt with four channels a stage so that a file is a few KB): torch zip
archives and legacy torch files as `torch.save` writes them, plain pickles of numpy arrays and of
torch tensors at protocols 2 to 5, safetensors, Detectron2 model-zoo `.pkl`s, and small variants
(zero-valued, a zero-width stage, half precision, ConvNeXt V2, deeper stages) so that every reader's branches have a
valid starting point to mutate from.
"""
from __future__ import annotations

import hashlib
import io
import pickle
import sys
from pathlib import Path
from typing import Dict, Iterator, Tuple

import torch

from conversion.architecture import Architecture
from conversion.synthetic import random_state_dict

# ConvNeXt shapes, four channels a stage: every tensor kind a real file has, at a few KB.
TINY = Architecture(depths=(1, 1, 1, 1), dims=(4, 4, 4, 4), num_classes=2, classifier_norm=True)
# Atto's depths (2, 2, 6, 2) at two channels: more blocks, the same kinds.
ATTO_SHAPED = Architecture(depths=(2, 2, 6, 2), dims=(2, 2, 2, 2))
ZERO_WIDTH = Architecture(depths=(1, 1, 1, 1), dims=(4, 0, 4, 4))
V2 = Architecture(depths=(1, 1, 1, 1), dims=(4, 4, 4, 4), version=2, layer_scale=False)
PICKLE_PROTOCOLS = (2, 3, 4, 5)


def _variants() -> Iterator[Tuple[str, Dict[str, torch.Tensor]]]:
    yield "tiny", random_state_dict(TINY, seed=1)
    yield "atto-shaped", random_state_dict(ATTO_SHAPED, seed=2)
    yield "v2", random_state_dict(V2, seed=3)
    yield "zero", {k: torch.zeros_like(v) for k, v in random_state_dict(TINY, seed=4).items()}
    yield "zero-width", random_state_dict(ZERO_WIDTH, seed=8)  # a stage without channels: empty tensors
    yield "half", random_state_dict(TINY, seed=5, dtype=torch.float16)
    yield "bf16", random_state_dict(TINY, seed=6, dtype=torch.bfloat16)


def _torch_file(obj: object, legacy: bool) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()


def seed_files() -> Iterator[Tuple[str, bytes]]:
    """(name, file bytes) of every seed checkpoint (safetensors ones where the package is installed:
    the fuzz environment has it, the core one does not)."""
    try:
        from safetensors.torch import save as safetensors_bytes
    except ImportError:
        safetensors_bytes = None

    for name, sd in _variants():
        yield f"{name}.zip.pth", _torch_file({"model": sd}, legacy=False)
        yield f"{name}.legacy.pth", _torch_file({"state_dict": sd}, legacy=True)
        if sd and next(iter(sd.values())).dtype != torch.bfloat16:  # numpy has no bfloat16
            arrays = {k: v.numpy() for k, v in sd.items()}
            yield f"{name}.modelzoo.pkl", pickle.dumps({"model": arrays, "__author__": "seed", "matching_heuristics": True}, protocol=2)
            for protocol in PICKLE_PROTOCOLS:
                yield f"{name}.numpy-p{protocol}.pkl", pickle.dumps({"model": arrays}, protocol=protocol)
        if safetensors_bytes is not None:
            yield f"{name}.safetensors", safetensors_bytes(dict(sd))
    sd = random_state_dict(TINY, seed=7)
    for protocol in PICKLE_PROTOCOLS:
        yield f"tensors-p{protocol}.pkl", pickle.dumps({"model": sd}, protocol=protocol)
    yield "training.zip.pth", _torch_file({"model": sd, "model_ema": sd, "epoch": 3, "optimizer": {"lr": 0.1}}, legacy=False)


def write_seeds(folder: Path) -> int:
    """Write every seed once per command into `folder`, named by its own suffix; return how many."""
    from .oracle import COMMANDS, selector_for

    folder.mkdir(parents=True, exist_ok=True)
    count = 0
    for name, data in seed_files():
        suffix = "." + name.rsplit(".", 1)[1]
        for command in range(len(COMMANDS)):
            seed = bytes([selector_for(command, suffix)]) + data
            (folder / f"{name}.{command}.{hashlib.sha1(seed).hexdigest()[:8]}").write_bytes(seed)
            count += 1
    return count


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else ".fuzz/corpus")
    print(f"{write_seeds(target)} seeds written to {target}")
