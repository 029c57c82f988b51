"""The unpickler is default-deny: it reads the opcodes of its table (`safe_pickle.OPCODES`), as
Python's own unpickler reads them, at every protocol checkpoints are written with (0-5), and refuses
any other opcode by name.  Oracle: `pickle.loads` on the same bytes."""
from __future__ import annotations

import collections
import io
import pickle
import pickletools
import re

import numpy as np
import pytest

from conversion.errors import UnreadableCheckpoint, UnsafeCheckpoint
from conversion.io.safe_pickle import BUDGET_SLACK, OPCODES, Budget, Placeholder, SafeUnpickler
from conversion.read import open_source

from ..support import read_as_convert_does

PROTOCOLS = range(pickle.HIGHEST_PROTOCOL + 1)
# Opcodes no checkpoint needs: out-of-band buffers (protocol 5 with a buffer_callback) and the
# copyreg extension registry (a global by number: whatever the running process registered).
REFUSED = {"NEXT_BUFFER", "READONLY_BUFFER", "EXT1", "EXT2", "EXT4"}


def _training_checkpoint() -> dict:
    """Every kind of value a checkpoint's non-tensor parts hold, in sizes that take each opcode's
    short and long spelling (BININT1/2/BININT/LONG1/LONG4, SHORT_BINUNICODE/BINUNICODE, frames)."""
    shared = [1, 2]
    return {
        "ints": [0, 255, 256, 65535, 65536, -1, 2**31 - 1, -2**31, 2**31, 2**64, -2**2100],
        "floats": [0.0, -1.5, 1e308, float("inf")],
        "flags": (None, True, False),
        "text": ["", "epoch", "ünïcode \u20ac", "x" * 300, "long" * 30_000],
        "bytes": [b"", b"\x00\xff", b"\x01" * 300, bytearray(b"\x02" * 9)],
        "tuples": [(), (1,), (1, 2), (1, 2, 3), (1, 2, 3, 4)],
        "sets": [set(), {1, 2}, frozenset(), frozenset({"a"})],
        "ordered": collections.OrderedDict([("b", 1), ("a", [2.5])]),
        "shared": [shared, shared, {"again": shared}],
        "nested": {"a": {"b": {"c": [{"d": ()}]}}},
    }


@pytest.mark.parametrize("skip_payloads", [False, True], ids=["whole", "payload-mode"])
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_every_protocol_reads_as_pickle_reads_it(protocol, skip_payloads):
    obj = _training_checkpoint()
    if protocol < 2:
        obj.pop("ordered")  # before protocol 2 a copyreg._reconstructor over builtins.dict: refused, as before
    data = pickle.dumps(obj, protocol=protocol)
    assert pickle.loads(data) == obj  # the oracle

    u = SafeUnpickler(io.BytesIO(data), size=len(data), budget=Budget(2 * len(data) + BUDGET_SLACK),
                      skip_payloads=skip_payloads, payload_threshold=1 << 40)
    got = u.load()

    assert got == obj and u.placeholders == []
    assert type(got["bytes"][3]) is bytearray and type(got["sets"][2]) is frozenset
    assert got["shared"][0] is got["shared"][1] is got["shared"][2]["again"], "the memo shares what pickle shares"
    if protocol >= 2:
        assert type(got["ordered"]) is collections.OrderedDict


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_every_protocol_reads_numpy_arrays_and_scalars_as_numpy_does(tmp_path, protocol):
    arrays = {"f4": np.arange(6, dtype="<f4").reshape(2, 3), "big": np.linspace(0, 1, 3000), "fortran": np.asfortranarray(np.eye(3)),
              "u1": np.arange(5, dtype=np.uint8), "scalar": np.float32(2.5), "empty": np.zeros((0, 4), np.float16)}
    path = tmp_path / "arrays.pkl"
    path.write_bytes(pickle.dumps({"model": arrays}, protocol=protocol))

    got = read_as_convert_does(str(path))["model"]

    for name, want in arrays.items():
        assert type(got[name]) is type(want) and got[name].dtype == want.dtype and np.array_equal(got[name], want), name


def test_protocol_0_and_1_objects_of_foreign_classes_are_placeholders():
    """INST (protocol 0) and OBJ (protocol 1) build an object of a named class: read past, as any
    class outside the allowlist, its state never handed to it."""
    inst = pickle.MARK + pickle.INST + b"trainer.hooks\nLoggerHook\n" + pickle.EMPTY_DICT + pickle.BUILD
    obj = pickle.MARK + pickle.GLOBAL + b"trainer.hooks\nCheckpointHook\n" + pickle.BININT1 + b"\x03" + pickle.OBJ
    data = pickle.PROTO + b"\x02" + pickle.MARK + inst + obj + pickle.LIST + pickle.STOP

    u = SafeUnpickler(io.BytesIO(data), size=len(data), budget=Budget(BUDGET_SLACK))

    assert u.load() == [Placeholder("trainer.hooks.LoggerHook"), Placeholder("trainer.hooks.CheckpointHook")]


def test_the_table_is_every_opcode_but_those_no_checkpoint_needs():
    """A new opcode (a future protocol's) is refused until it is added here, with its handler."""
    known = {op.name: op.code.encode("latin1") for op in pickletools.opcodes}

    accepted = {name for name, code in known.items() if code in OPCODES}

    assert set(known) - accepted == REFUSED
    assert set(OPCODES) <= set(known.values()), "the table holds only opcodes pickle defines"


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_an_opcode_outside_the_table_is_refused_by_name(tmp_path, name):
    path = tmp_path / "refused.pkl"
    path.write_bytes(pickle.PROTO + b"\x05" + pickle.EMPTY_DICT + getattr(pickle, name) + b"\x01\x00\x00\x00" + pickle.STOP)
    says = "the copyreg extension registry (EXT opcode)" if name.startswith("EXT") else f"the pickle uses the {name} opcode"

    for read in (open_source, read_as_convert_does):
        with pytest.raises(UnsafeCheckpoint, match=f"refused.pkl: refusing to load: .*{re.escape(says)}"):
            read(str(path))


def test_out_of_band_buffers_are_refused_naming_the_opcode(tmp_path):
    """Protocol 5 pickled with a buffer_callback, as `pickle` writes it: the data is not in the file."""
    buffers: list = []
    data = pickle.dumps({"model": {"w": pickle.PickleBuffer(bytearray(16))}}, protocol=5, buffer_callback=buffers.append)
    assert buffers, "the premise: the buffer went out of band"
    path = tmp_path / "out-of-band.pkl"
    path.write_bytes(data)

    with pytest.raises(UnsafeCheckpoint, match="out-of-band.pkl: refusing to load: the pickle uses the NEXT_BUFFER opcode"):
        open_source(str(path))


def test_a_byte_that_is_no_opcode_is_refused_as_unreadable(tmp_path):
    path = tmp_path / "garbage.pkl"
    path.write_bytes(pickle.PROTO + b"\x04" + b"\xff" + pickle.STOP)

    with pytest.raises(UnreadableCheckpoint, match=r"not a readable checkpoint .*invalid load key, b'\\xff'") as err:
        open_source(str(path))
    assert not isinstance(err.value, UnsafeCheckpoint)


# Opcodes that take N items off the stack, each given a stack one short (a MARK keeps the items
# below it out of reach, as pickle's own unpickler keeps them).
SHORT_STACKS = {
    "TUPLE1": pickle.TUPLE1, "TUPLE2": pickle.BININT1 + b"\x01" + pickle.TUPLE2,
    "TUPLE3": pickle.BININT1 + b"\x01" + pickle.BININT1 + b"\x02" + pickle.TUPLE3,
    "TUPLE2-above-a-mark": pickle.BININT1 + b"\x01" + pickle.MARK + pickle.BININT1 + b"\x02" + pickle.TUPLE2,
}


@pytest.mark.parametrize("name", sorted(SHORT_STACKS))
def test_an_opcode_given_too_few_items_is_refused_as_pickle_refuses_it(tmp_path, name):
    """A fuzz finding after the opcode table replaced CPython's dispatch: TUPLE1 on an empty stack
    took what the stack had (nothing) and built an empty tuple, so a file pickle refuses converted."""
    data = pickle.PROTO + b"\x04" + SHORT_STACKS[name] + pickle.STOP
    with pytest.raises(pickle.UnpicklingError):  # "stack underflow", or "unexpected MARK found"
        pickle.loads(data)
    path = tmp_path / "short.pkl"
    path.write_bytes(data)

    with pytest.raises(UnreadableCheckpoint, match="stack underflow"):
        open_source(str(path))
