"""Building hostile files by hand: pickle fragments and the containers they are spliced into.

A fragment is a run of pickle opcodes that leaves exactly one object on the stack.  `spliced`
puts it where a valid checkpoint holds the string MARKER (a weight, or a 'junk' entry), so the
rest of the file is what torch.save / pickle.dump wrote.  Memo slots used by fragments are far
above anything a small real pickle uses.
"""
from __future__ import annotations

import io
import pickle
import struct
import zipfile
from typing import Any, Dict

import torch

from conversion.architecture import Architecture
from conversion.synthetic import random_state_dict

MARKER = "MARKER-FOR-A-HOSTILE-FRAGMENT"
TINY = Architecture(depths=(1, 1, 1, 1), dims=(4, 4, 4, 4), num_classes=2, classifier_norm=True)
A_WEIGHT = "downsample_layers.0.0.weight"  # the stem convolution, [4, 3, 4, 4] in TINY
_SLOT = 0x7FFFFF00  # memo index for fragments


def tiny_state_dict() -> Dict[str, torch.Tensor]:
    return random_state_dict(TINY, seed=5)


def put(slot: int = 0) -> bytes:
    return pickle.LONG_BINPUT + struct.pack("<I", _SLOT + slot)


def get(slot: int = 0) -> bytes:
    return pickle.LONG_BINGET + struct.pack("<I", _SLOT + slot)


def text(s: str) -> bytes:
    data = s.encode("utf-8")
    return pickle.BINUNICODE + struct.pack("<I", len(data)) + data


def integer(i: int) -> bytes:
    data = i.to_bytes((i.bit_length() + 8) // 8, "little", signed=True)
    return pickle.LONG1 + bytes([len(data)]) + data


def global_(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def call(fn: bytes, *args: bytes) -> bytes:
    return fn + pickle.MARK + b"".join(args) + pickle.TUPLE + pickle.REDUCE


# ---------------------------------------------------------------- fragments


def nested_lists(depth: int) -> bytes:
    """[[[...]]] `depth` deep, built bottom-up with constant pickle stack use per level."""
    return pickle.EMPTY_LIST * depth + pickle.APPEND * (depth - 1)


def nested_lists_top_down(depth: int) -> bytes:
    """The same nesting built top-down through the memo (each new list appended to the previous one)."""
    out = pickle.EMPTY_LIST + put(1)
    for _ in range(depth - 1):
        out += get(1) + pickle.EMPTY_LIST + put(1) + pickle.APPEND + pickle.POP
    return out


def self_containing_list() -> bytes:
    return pickle.EMPTY_LIST + put() + get() + pickle.APPEND


def self_containing_dict() -> bytes:
    return pickle.EMPTY_DICT + put() + text("self") + get() + pickle.SETITEM


def mutual_cycle() -> bytes:
    """a = []; b = [a]; a.append(b)."""
    return (pickle.EMPTY_LIST + put(0) + pickle.EMPTY_LIST + put(1) + get(0) + pickle.APPEND + pickle.POP
            + get(1) + pickle.APPEND)


def deep_tuple_key(depth: int) -> bytes:
    """{((((),),),): None} with the key `depth` tuples deep (hashing it recurses in C)."""
    return pickle.EMPTY_DICT + pickle.EMPTY_TUPLE + pickle.TUPLE1 * depth + pickle.NONE + pickle.SETITEM


def deep_frozenset(depth: int) -> bytes:
    out = pickle.EMPTY_TUPLE
    for _ in range(depth):
        out = pickle.MARK + out + pickle.FROZENSET
    return out


def array_without_buffer(shape=(4, 3, 4, 4), dtype: str = "<f4") -> bytes:
    """numpy.ndarray(shape, dtype): numpy hands out uninitialised memory of that size."""
    return call(global_("numpy", "ndarray"), pickle.MARK + b"".join(integer(d) for d in shape) + pickle.TUPLE, text(dtype))


def reconstruct_without_state(core: str = "numpy.core") -> bytes:
    """numpy's _reconstruct(ndarray, (4,3,4,4), b'b') with no BUILD: an array of uninitialised memory."""
    shape = pickle.MARK + b"".join(integer(d) for d in (4, 3, 4, 4)) + pickle.TUPLE
    return call(global_(f"{core}.multiarray", "_reconstruct"), global_("numpy", "ndarray"), shape,
                pickle.SHORT_BINBYTES + b"\x01b")


def bytearray_of(n: int) -> bytes:
    return call(global_("__builtin__", "bytearray"), integer(n))


def codec_chain(steps: int, seed: int = 1000) -> bytes:
    """_codecs.encode(... _codecs.encode(b'\\0' * seed, 'hex') ..., 'hex'): doubles at every step."""
    out = global_("_codecs", "encode") * steps + pickle.SHORT_BINBYTES + bytes([min(seed, 255)]) + b"\0" * min(seed, 255)
    return out + (text("hex") + pickle.TUPLE2 + pickle.REDUCE) * steps


# ---------------------------------------------------------------- containers


def _replace_marker(data: bytes, fragment: bytes) -> bytes:
    literal = text(MARKER)
    assert data.count(literal) == 1, "the template must name the marker exactly once"
    return data.replace(literal, fragment)


def template(where: str) -> Dict[str, Any]:
    """A valid checkpoint with MARKER as one weight ('weight') or as a 'junk' entry ('junk')."""
    sd: Dict[str, Any] = dict(tiny_state_dict())
    if where == "weight":
        sd[A_WEIGHT] = MARKER
        return {"model": sd}
    return {"model": sd, "junk": MARKER}


def torch_zip(obj: Any, compress_pickle: bool = False, pad: int = 0) -> bytes:
    """torch.save(obj) as bytes, optionally with data.pkl deflated and padded after its STOP opcode."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    if not compress_pickle and not pad:
        return buf.getvalue()
    return rezip(buf.getvalue(), lambda name, data: data + b"\0" * pad if name.endswith("/data.pkl") else data,
                 deflate=("data.pkl",) if compress_pickle else ())


def rezip(data: bytes, change, deflate=()) -> bytes:
    """The archive with each member's bytes passed through `change(name, bytes)` (CRCs recomputed)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            kind = zipfile.ZIP_DEFLATED if info.filename.endswith(tuple(deflate)) else zipfile.ZIP_STORED
            dst.writestr(zipfile.ZipInfo(info.filename, date_time=(1980, 1, 1, 0, 0, 0)), change(info.filename, src.read(info)), kind)
    return out.getvalue()


def spliced(fragment: bytes, container: str, where: str = "junk") -> bytes:
    """A checkpoint file whose MARKER is replaced by `fragment`: 'pkl' (numpy arrays, protocol 2),
    'torch-zip' (data.pkl), 'torch-legacy' (the main pickle)."""
    obj = template(where)
    if container == "pkl":
        plain = {"model": {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in obj["model"].items()}}
        plain.update({k: v for k, v in obj.items() if k != "model"})
        return _replace_marker(pickle.dumps(plain, protocol=2), fragment)
    if container == "torch-legacy":
        buf = io.BytesIO()
        torch.save(obj, buf, _use_new_zipfile_serialization=False)
        return _replace_marker(buf.getvalue(), fragment)
    return rezip(torch_zip(obj), lambda name, data: _replace_marker(data, fragment) if name.endswith("/data.pkl") else data)


def tensor_archive(size, stride, offset: int, numel: int, record_bytes: int) -> bytes:
    """A minimal torch archive {'w': tensor} whose one tensor has the given geometry over a float
    storage declared `numel` long, stored in a record of `record_bytes` bytes."""
    storage = pickle.MARK + text("storage") + global_("torch", "FloatStorage") + text("0") + text("cpu") + integer(numel) + pickle.TUPLE
    tensor = call(
        global_("torch._utils", "_rebuild_tensor_v2"),
        storage + pickle.BINPERSID,
        integer(offset),
        pickle.MARK + b"".join(integer(d) for d in size) + pickle.TUPLE,
        pickle.MARK + b"".join(integer(d) for d in stride) + pickle.TUPLE,
        pickle.NEWFALSE,
        call(global_("collections", "OrderedDict")),
    )
    program = pickle.PROTO + b"\x02" + pickle.EMPTY_DICT + text("w") + tensor + pickle.SETITEM + pickle.STOP
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for name, data in (("archive/data.pkl", program), ("archive/byteorder", b"little"), ("archive/version", b"3"),
                           ("archive/data/0", b"\0" * record_bytes)):
            z.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data)
    return out.getvalue()
