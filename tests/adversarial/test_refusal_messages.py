"""Each malformed file is refused for its own reason, and says so.

The other adversarial tests accept any refusal, which is what a user needs from a hostile file;
but then removing one specific check goes unnoticed whenever a later, more generic one still
refuses the file.  Here every case is a file (or a reader's handle) that only one check can
refuse, and the test pins that check's message: what a user reads to learn what is wrong with
their file.  The files are built by hand (tests/adversarial/assemble.py's opcodes, and a legacy
torch file written field by field below), each differing from a valid one in one place.
"""
from __future__ import annotations

import io
import pickle
import struct
from pathlib import Path
from typing import Any, Dict, Tuple

import pytest

from conversion.errors import ConversionError, UnreadableCheckpoint, UnsafeCheckpoint
from conversion.io.handles import FileBytes, StorageRef, TensorRef, check_references, contiguous_stride
from conversion.io.legacy_torch import LEGACY_TORCH_MAGIC

from ..support import read_as_convert_does, torch_load_weights_only
from . import assemble as A

NDARRAY = A.global_("numpy", "ndarray")
RECONSTRUCT = A.global_("numpy.core.multiarray", "_reconstruct")


def _array(shape: bytes, dtype: bytes, data: bytes) -> bytes:
    """numpy.ndarray(shape, dtype, buffer): the model-zoo .pkl spelling of an array."""
    return A.call(NDARRAY, shape, dtype, data)


def _array_state(state: bytes) -> bytes:
    """numpy's own pickle of an array: _reconstruct(ndarray, (0,), b'b'), then BUILD with `state`."""
    return A.call(RECONSTRUCT, NDARRAY, A.tuple_(A.integer(0)), A.bytes_(b"b")) + state + pickle.BUILD


FLOAT_STORAGE = A.tuple_(A.text("storage"), A.global_("torch", "FloatStorage"), A.text("0"), A.text("cpu"), A.integer(4))

# fragment (spliced where a valid checkpoint holds a junk entry) -> the refusal it alone gets
FRAGMENTS: Dict[str, Tuple[bytes, str]] = {
    "ordered-dict-of-a-number": (A.call(A.global_("collections", "OrderedDict"), A.integer(3)),
                                 "OrderedDict built from something other than pairs."),
    "ordered-dict-of-single-items": (A.call(A.global_("collections", "OrderedDict"), A.list_(A.integer(1))),
                                     "OrderedDict built from something other than pairs."),
    "bytearray-of-a-size": (A.call(A.global_("builtins", "bytearray"), A.integer(8)),
                            "bytearray(int) would build bytes the file does not hold."),
    "bytes-of-a-size": (A.call(A.global_("builtins", "bytes"), A.integer(8)),
                        "the file asks to build 'builtins.bytes', which is not tensor data."),
    "codec-other-than-latin1": (A.call(A.global_("_codecs", "encode"), A.text("x"), A.text("rot13")),
                                "_codecs.encode with a codec other than latin1"),
    "set-of-a-number": (A.call(A.global_("builtins", "set"), A.integer(1)), "set built from something other than a list."),
    "frozenset-of-a-number": (A.call(A.global_("builtins", "frozenset"), A.integer(1)),
                              "frozenset built from something other than a list."),
    "scalar-without-bytes": (A.call(A.global_("numpy.core.multiarray", "scalar"), A.text("<f4")),
                             "a numpy scalar without its bytes."),
    "scalar-of-the-wrong-size": (A.call(A.global_("numpy.core.multiarray", "scalar"), A.text("<f4"), A.bytes_(b"\0\0")),
                                 "a numpy scalar (<f4) has 2 bytes."),
    "dtype-without-a-code": (A.call(A.global_("numpy", "dtype"), A.integer(1)), "numpy.dtype without a type code."),
    "array-with-two-arguments": (A.call(NDARRAY, A.tuple_(A.integer(2)), A.text("<f4")),
                                 "an array (numpy.ndarray with 2 arguments) has no data of its own (no buffer)."),
    "array-without-a-buffer": (_array(A.tuple_(A.integer(2)), A.text("<f4"), A.integer(0)),
                               "an array (<f4, shape [2]) has no data of its own (no buffer)."),
    "array-shorter-than-its-shape": (_array(A.tuple_(A.integer(2)), A.text("<f4"), A.bytes_(b"\0" * 4)),
                                     "an array (<f4, shape [2]) needs 8 bytes, its data has 4."),
    "array-of-negative-size": (_array(A.tuple_(A.integer(-1)), A.text("<f4"), A.bytes_(b"")),
                               "an array has a negative size [-1]."),
    "array-of-objects": (_array(A.tuple_(A.integer(2)), A.text("|O"), A.bytes_(b"\0" * 16)),
                         "an array has dtype |O, which is not plain numeric data."),
    "array-shape-of-text": (_array(A.tuple_(A.text("2")), A.text("<f4"), A.bytes_(b"\0" * 8)),
                            "an array's shape is not a tuple of integers (tuple)."),
    "array-dtype-of-a-number": (_array(A.tuple_(A.integer(2)), A.integer(5), A.bytes_(b"\0" * 8)),
                                "an array has no plain numeric dtype (int)."),
    "reconstruct-of-something-else": (A.call(RECONSTRUCT, A.integer(1)),
                                      "numpy _reconstruct called for something other than an array."),
    "array-state-malformed": (_array_state(A.tuple_(A.integer(1))), "a numpy array's state is malformed."),
    "array-state-of-another-version": (
        _array_state(A.tuple_(A.integer(7), A.tuple_(A.integer(1)), A.text("<f4"), pickle.NEWFALSE, A.bytes_(b"\0" * 4))),
        "a numpy array's state has version 7; numpy writes and reads only 0 and 1."),
    "frombuffer-with-two-arguments": (A.call(A.global_("numpy.core.numeric", "_frombuffer"), A.bytes_(b"\0" * 4), A.text("<f4")),
                                      "numpy _frombuffer with the wrong arguments."),
    "tensor-rebuild-with-two-arguments": (A.call(A.global_("torch._utils", "_rebuild_tensor_v2"), A.integer(0), A.integer(0)),
                                          "a tensor rebuild with too few arguments."),
    "tensor-over-a-number": (A.call(A.global_("torch._utils", "_rebuild_tensor_v2"), A.integer(0), A.integer(0),
                                    A.tuple_(A.integer(1)), A.tuple_(A.integer(1))),
                             "a tensor refers to something other than a storage."),
    "parameter-of-a-number": (A.call(A.global_("torch._utils", "_rebuild_parameter"), A.integer(0)),
                              "a parameter that holds no tensor."),
    "reconstructor-of-a-real-class": (A.call(A.global_("copyreg", "_reconstructor"), A.integer(0)),
                                      "the file asks to build 'copyreg._reconstructor', which is not tensor data."),
}


@pytest.mark.parametrize("case", sorted(FRAGMENTS))
def test_a_malformed_object_is_refused_with_its_own_reason(case, tmp_path):
    fragment, says = FRAGMENTS[case]
    path = tmp_path / "malformed.pth"
    path.write_bytes(A.spliced(fragment, "torch-zip"))

    with pytest.raises(ConversionError) as err:
        read_as_convert_does(str(path))

    assert says in err.value.message, f"{case}: refused for another reason: {err.value.message}"


# ---------------------------------------------------------------- legacy torch files, field by field


class _Storage:
    """A storage as the legacy format names it: a persistent id the test chooses whole."""

    def __init__(self, pid: Any) -> None:
        self.pid = pid


class _Tensor:
    """A tensor as torch.save pickles it: _rebuild_tensor_v2 over a storage."""

    def __init__(self, storage: _Storage, numel: int) -> None:
        self.storage, self.numel = storage, numel

    def __reduce__(self) -> Any:
        import collections

        import torch

        return torch._utils._rebuild_tensor_v2, (self.storage, 0, (self.numel,), (1,), False, collections.OrderedDict())


class _LegacyPickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> Any:
        return obj.pid if isinstance(obj, _Storage) else None


def _legacy_file(pid: Any, *, tensor: bool = False, keys: Any = ("0",), count: int = 4, little_endian: bool = True, payload: bytes = b"\0" * 16) -> bytes:
    """A legacy torch.save file: magic, protocol, sys_info, {'w': storage}, storage keys, then each
    storage as its element count and its bytes; every field given by the caller."""
    out = io.BytesIO()
    for obj in (LEGACY_TORCH_MAGIC, 1001, {"protocol_version": 1001, "little_endian": little_endian,
                                           "type_sizes": {"short": 2, "int": 4, "long": 4}}):
        pickle.dump(obj, out, protocol=2)
    _LegacyPickler(out, protocol=2).dump({"w": _Tensor(_Storage(pid), pid[4]) if tensor else _Storage(pid)})
    pickle.dump(list(keys), out, protocol=2)
    out.write(struct.pack("<q", count) + payload)
    return out.getvalue()


def _pid(storage_type: Any = None, view: Any = None, numel: int = 4) -> tuple:
    import torch

    return ("storage", torch.FloatStorage if storage_type is None else storage_type, "0", "cpu", numel, view)


def _legacy_cases() -> Dict[str, Tuple[dict, type, str]]:
    return {
        "persistent-id-not-a-storage": (dict(pid=("module", "x")), UnsafeCheckpoint,
                                        "refusing to load: a persistent id that is not a torch storage."),
        "storage-type-not-a-storage": (dict(pid=_pid(storage_type="FloatStorage")), UnreadableCheckpoint,
                                       "a persistent id names no torch storage type."),
        "view-malformed": (dict(pid=_pid(view=("0", 1))), UnreadableCheckpoint, "a storage view that is malformed."),
        "view-past-its-storage": (dict(pid=_pid(view=("0", 2, 4))), UnreadableCheckpoint,
                                  "a storage view reaches past its storage."),
        "view-before-its-storage": (dict(pid=_pid(view=("0", -1, 2))), UnreadableCheckpoint,
                                    "a storage view reaches past its storage."),
        "big-endian": (dict(pid=_pid(), little_endian=False), UnreadableCheckpoint, "a big-endian legacy torch file."),
        "storage-list-names-another": (dict(pid=_pid(), keys=("1",)), UnreadableCheckpoint,
                                       "corrupt legacy torch file (storage list)."),
        "storage-list-not-text": (dict(pid=_pid(), keys=(0,)), UnreadableCheckpoint,
                                  "corrupt legacy torch file (storage list)."),
        "storage-count-disagrees": (dict(pid=_pid(), count=3), UnreadableCheckpoint,
                                    "storage 0 is truncated or its size disagrees with the index."),
        "storage-truncated": (dict(pid=_pid(), payload=b"\0" * 15), UnreadableCheckpoint,
                              "storage 0 is truncated or its size disagrees with the index."),
    }


@pytest.mark.parametrize("case", sorted(_legacy_cases()))
def test_a_malformed_legacy_torch_file_is_refused_with_its_own_reason(case, tmp_path):
    fields, kind, says = _legacy_cases()[case]
    path = tmp_path / "legacy.pth"
    path.write_bytes(_legacy_file(**fields))

    with pytest.raises(kind) as err:
        read_as_convert_does(str(path))

    assert says in err.value.message, f"{case}: refused for another reason: {err.value.message}"


def test_the_legacy_file_builder_makes_files_torch_reads(tmp_path):
    """Control for the table above: with every field as torch writes it, torch and this reader agree."""
    path = tmp_path / "legacy.pth"
    path.write_bytes(_legacy_file(_pid(), tensor=True, payload=struct.pack("<4f", 1, 2, 3, 4)))

    ours = read_as_convert_does(str(path))["w"]
    theirs = torch_load_weights_only(path)["w"]
    assert ours.tolist() == theirs.tolist() == [1.0, 2.0, 3.0, 4.0]


# ---------------------------------------------------------------- the last check before writing


def _ref(shape, stride, offset: int, storage_numel: int) -> TensorRef:
    return TensorRef(StorageRef("0", "FloatStorage", storage_numel), offset, tuple(shape), tuple(stride))


@pytest.mark.parametrize("ref, says", [
    (_ref((2, 3), contiguous_stride((2, 3)), 0, 4), "tensor 'w' (shape [2, 3], offset 0) reaches past its storage."),
    (_ref((2, 2), (2, 1), 1, 4), "tensor 'w' (shape [2, 2], offset 1) reaches past its storage."),
    (_ref((2, 2), (2, 1), -1, 4), "tensor 'w' (shape [2, 2], offset -1) reaches past its storage."),
    (_ref((2, 2), (-2, 1), 2, 4), "tensor 'w' (shape [2, 2], offset 2) reaches past its storage."),
    (_ref((-2, 2), (2, 1), 0, 4), "tensor 'w' (shape [-2, 2], offset 0) reaches past its storage."),
], ids=["larger-than-storage", "offset-past-end", "negative-offset", "negative-stride", "negative-size"])
def test_a_handle_reaching_past_its_storage_is_refused_before_anything_is_written(ref, says):
    """Every reader checks its tensors as it builds them; this is the check the pipeline makes on
    every handle, from any reader, just before writing (a reader that let one through would copy
    bytes from outside the tensor into the output)."""
    storages = {"0": FileBytes(0, 16)}

    with pytest.raises(UnreadableCheckpoint) as err:
        check_references("src.pth", storages, {"w": ref})

    assert err.value.message == f"src.pth: {says}"


def test_a_handle_inside_its_storage_passes_the_last_check():
    """Control: the same storage holds a [2, 2] view at offset 0, or a [3] run at offset 1."""
    storages = {"0": FileBytes(0, 16)}

    check_references("src.pth", storages, {"a": _ref((2, 2), (2, 1), 0, 4), "b": _ref((3,), (1,), 1, 4)})
