"""safetensors files written by the real library, and inspect's reads of them made countable: shared by
the inspect tests (tests/layouts/test_inspect.py) and the metadata-only read tests
(tests/io/test_inspect_reads_metadata.py)."""
from __future__ import annotations

from . import require


def write_safetensors(path, sd) -> int:
    """Save `sd` with the real safetensors writer; return the header's length from the file's first 8 bytes."""
    require("safetensors.torch").save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    with open(path, "rb") as f:
        return int.from_bytes(f.read(8), "little")


def refuse_mapped_safetensors_reads(monkeypatch) -> None:
    """safetensors' own readers map the file (bytes read through a map are not in rchar): make them
    unusable, so every byte inspect reads goes through a read call and is counted."""
    st = require("safetensors")
    st_torch = require("safetensors.torch")

    def refuse(*args, **kwargs):
        raise AssertionError("inspect read the tensors of a safetensors file")

    monkeypatch.setattr(st_torch, "load_file", refuse)
    monkeypatch.setattr(st_torch, "safe_open", refuse, raising=False)
    monkeypatch.setattr(st, "safe_open", refuse)
