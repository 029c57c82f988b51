"""Structure-aware mutations of checkpoint bytes, so that the fuzzer gets past the first check.

A byte flip in a zip member fails its CRC and a flip inside a pickle usually ends it at the first
unknown opcode: both stop at the outermost guard.  These mutators change one thing a layer down
and keep the rest valid: a torch archive is rewritten with every member's CRC right (a member
changed, dropped, duplicated, a small record replaced, a local header's flags or method changed);
a pickle is changed opcode by opcode (an opcode dropped, repeated, moved or inserted, an argument
replaced by an extreme value, a string argument changed with its length prefix kept right, a lone
surrogate put into a name); a safetensors header is parsed and changed field by field (dtype,
shape, offsets, nesting, names) and written back with its length prefix right.  Anything else, and
a share of the time anyway, gets the fuzzer's own byte mutation (`raw`).
"""
from __future__ import annotations

import io
import json
import pickle
import pickletools
import random
import struct
import warnings
import zipfile
from typing import Any, Callable, List, Optional, Tuple

Raw = Callable[[bytes, int], bytes]  # the fuzzer's byte mutator: (data, max_size) -> data

ZIP_MAGIC = b"PK\x03\x04"
LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")  # torch's reader checks these as zip's APPNOTE says
EXTREME_INTS = (0, 1, -1, 2, 255, 256, 65535, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**64 - 1)
# Opcodes worth inserting: containers (empty sets/dicts/lists and their fillers), stack and memo moves.
INSERTABLE = (b"\x8f", b"}", b"]", b")", b"(", b"0", b"1", b"2", b"\x94", b"h\x00", b"\x85", b"\x86", b"t",
              b"R", b"b", b"s", b"u", b"e", b"\x90", b"a", b"N", b"\x88", b"K\x00", b"X\x01\x00\x00\x00x")
# Records torch writes beside data.pkl, and values its reader refuses or accepts at the edge.
SMALL_RECORDS = (".data/serialization_id", ".data/version", "byteorder", ".storage_alignment", ".format_version", "version")
RECORD_VALUES = (b"", b"0", b"1", b"3", b"64", b"-1", b"big", b"little", b"abc", b"\xff" * 8, b"9" * 40, b"0" * 41)
SAFETENSORS_DTYPES: Tuple[Any, ...] = ("F32", "F16", "BF16", "F64", "I64", "I8", "U8", "BOOL", "F8_E4M3", "C64", "XX",
                                      ["F32"], {"F32": 1}, 4, None, "")
SURROGATE = "\ud800"


# ================================================================ entry point


def mutate(data: bytes, max_size: int, rng: random.Random, raw: Raw) -> bytes:
    """One mutation of a seed (command byte + file bytes), structure-aware where the format allows."""
    if len(data) < 2 or rng.random() < 0.15:
        return raw(data, max_size)[:max_size]
    command, body = data[:1], data[1:]
    if rng.random() < 0.03:
        command = bytes([rng.randrange(256)])
    for looks_like, mutator in ((is_zip, mutate_zip), (is_safetensors, mutate_safetensors), (is_pickle, mutate_pickles)):
        if looks_like(body):
            try:
                body = mutator(body, rng, raw)
            except Exception:  # noqa: BLE001 - an input its own parser refuses: mutate its bytes instead
                body = raw(body, max_size)
            return (command + body)[:max_size]
    return command + raw(body, max_size - 1)


def is_zip(body: bytes) -> bool:
    return body[:4] == ZIP_MAGIC


def is_safetensors(body: bytes) -> bool:
    return len(body) > 9 and body[8:9] == b"{"


def is_pickle(body: bytes) -> bool:
    return body[:1] == b"\x80" or body[:1] in (b"}", b"(", b"]", b"c")


# ================================================================ zip archives (torch zip)


def mutate_zip(body: bytes, rng: random.Random, raw: Raw) -> bytes:
    """Rewrite the archive with one member changed; CRCs stay right unless a header is the target."""
    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        members = [(info.filename, archive.read(info)) for info in archive.infolist()]
    if not members:
        return raw(body, len(body) + 64)
    choice = rng.random()
    i = rng.randrange(len(members))
    name, content = members[i]
    if choice < 0.35 and name.endswith(".pkl"):
        members[i] = (name, mutate_pickles(content, rng, raw))
    elif choice < 0.5:
        record = rng.choice(SMALL_RECORDS)
        prefix = members[0][0].split("/", 1)[0]
        members = [m for m in members if m[0] != f"{prefix}/{record}"] + [(f"{prefix}/{record}", rng.choice(RECORD_VALUES))]
    elif choice < 0.6:
        members.pop(i) if rng.random() < 0.5 else members.insert(i, members[i])
    elif choice < 0.7:
        members[i] = (raw(name.encode(), 200).decode("utf-8", "replace"), content)
    else:
        members[i] = (name, raw(content, max(len(content) * 2, 16)))
    out = _write_zip(members, deflate=rng.random() < 0.1)
    if rng.random() < 0.15:
        out = _mutate_local_header(out, rng)
    return out


def _write_zip(members: List[Tuple[str, bytes]], deflate: bool) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED) as archive:
        warnings.simplefilter("ignore")  # a member named twice is one of the mutations
        for name, content in members:
            info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED
            archive.writestr(info, content)
    return buf.getvalue()


def _mutate_local_header(body: bytes, rng: random.Random) -> bytes:
    """One local header's flags, method or sizes changed (what torch's reader checks before reading)."""
    starts = [i for i in range(len(body) - LOCAL_HEADER.size) if body[i:i + 4] == ZIP_MAGIC]
    if not starts:
        return body
    at = rng.choice(starts)
    fields = list(LOCAL_HEADER.unpack_from(body, at))
    which = rng.choice((2, 3, 7, 8, 10))  # flags, method, compressed size, size, extra length
    fields[which] = rng.choice((0, 1, 8, 0x20, 0x41, 0x0808, 0xFFFF, 0xFFFFFFFF)) & (0xFFFF if which in (2, 3, 10) else 0xFFFFFFFF)
    out = bytearray(body)
    LOCAL_HEADER.pack_into(out, at, *fields)
    return bytes(out)


# ================================================================ pickles (opcode level)


def _ops(data: bytes) -> Tuple[List[bytes], int]:
    """The first pickle of `data` as a list of raw opcodes (each with its argument), and where it ends."""
    ops, positions = [], []
    end = 0
    for opcode, _arg, pos in pickletools.genops(io.BytesIO(data)):
        positions.append(pos)
        if opcode.name == "STOP":
            end = pos + 1
            break
    positions.append(end)
    ops = [data[a:b] for a, b in zip(positions, positions[1:])]
    return ops, end


def mutate_pickles(data: bytes, rng: random.Random, raw: Raw) -> bytes:
    """Mutate one of the (up to five) pickles at the start of `data` (a legacy torch file has five)."""
    pickles, rest, at = [], data, 0
    while rest and len(pickles) < 5:
        try:
            ops, end = _ops(rest)
        except Exception:  # noqa: BLE001 - the raw storage bytes after the last pickle
            break
        if end == 0:
            break
        pickles.append(ops)
        rest = rest[end:]
    if not pickles:
        return raw(data, len(data) + 64)
    i = rng.randrange(len(pickles))
    pickles[i] = mutate_ops(pickles[i], rng, raw)
    return b"".join(b"".join(ops) for ops in pickles) + rest


def mutate_ops(ops: List[bytes], rng: random.Random, raw: Raw) -> List[bytes]:
    ops = list(ops)
    if len(ops) < 2:
        return ops
    body = range(1, len(ops) - 1) if len(ops) > 2 else range(len(ops))  # keep PROTO and STOP mostly
    i = rng.choice(body)
    choice = rng.random()
    if choice < 0.15:
        del ops[i]
    elif choice < 0.3:
        ops[i:i] = [ops[i]] * rng.choice((1, 2, 16, 200))
    elif choice < 0.4:
        j = rng.choice(body)
        ops[i], ops[j] = ops[j], ops[i]
    elif choice < 0.55:
        ops.insert(i, rng.choice(INSERTABLE))
    elif choice < 0.6:  # a run of containers: the object budget's case
        ops[i:i] = [rng.choice((b"\x8f", b"}", b"]", b")")), b"0"] * rng.choice((100, 1000))
    else:
        ops[i] = mutate_argument(ops[i], rng, raw)
    return ops


_INT_FORMATS = {"uint1": "<B", "uint2": "<H", "uint4": "<I", "uint8": "<Q", "int4": "<i"}
_LENGTH_PREFIXED = {"string1": "<B", "bytes1": "<B", "unicodestring1": "<B", "string4": "<i", "bytes4": "<I",
                    "unicodestring4": "<I", "bytes8": "<Q", "unicodestring8": "<Q", "bytearray8": "<Q"}


def mutate_argument(op: bytes, rng: random.Random, raw: Raw) -> bytes:
    """`op` with its argument changed: an extreme int, or a string's bytes with its length right."""
    code = pickletools.code2op.get(chr(op[0]))
    if code is None or code.arg is None:
        return op
    kind = code.arg.name
    if kind in _INT_FORMATS:
        fmt = _INT_FORMATS[kind]
        limit = 2 ** (8 * struct.calcsize(fmt))
        value = rng.choice(EXTREME_INTS) % limit
        if fmt == "<i" and value >= 2**31:
            value -= limit
        return op[:1] + struct.pack(fmt, value)
    if kind in _LENGTH_PREFIXED:
        fmt = _LENGTH_PREFIXED[kind]
        payload = op[1 + struct.calcsize(fmt):]
        if kind.startswith("unicode") and rng.random() < 0.3:
            text = payload.decode("utf-8", "surrogatepass")
            at = rng.randrange(len(text) + 1)
            payload = (text[:at] + SURROGATE + text[at:]).encode("utf-8", "surrogatepass")
        else:
            payload = raw(payload, max(2 * len(payload), 16))
        limit = 2 ** (8 * struct.calcsize(fmt)) - 1
        if len(payload) > limit:
            payload = payload[:limit]
        return op[:1] + struct.pack(fmt, len(payload)) + payload
    if kind in ("long1", "long4"):
        value = rng.choice(EXTREME_INTS) * rng.choice((1, -1))
        encoded = pickle.encode_long(value) if hasattr(pickle, "encode_long") else _encode_long(value)
        return op[:1] + (struct.pack("<B", len(encoded)) if kind == "long1" else struct.pack("<i", len(encoded))) + encoded
    return op[:1] + raw(op[1:], max(2 * len(op), 16))


def _encode_long(value: int) -> bytes:
    if value == 0:
        return b""
    n = (value.bit_length() >> 3) + 1
    out = value.to_bytes(n, "little", signed=True)
    if value < 0 and n > 1 and out[-1] == 0xFF and out[-2] & 0x80:
        out = out[:-1]
    return out


# ================================================================ safetensors headers


def mutate_safetensors(body: bytes, rng: random.Random, raw: Raw) -> bytes:
    """Parse the header, change one field (or wrap it in nesting), write it back with its length right."""
    n = int.from_bytes(body[:8], "little")
    header_bytes, data = body[8:8 + n], body[8 + n:]
    choice = rng.random()
    if choice < 0.2:
        new_header = raw(header_bytes, max(2 * len(header_bytes), 64))
    else:
        header = json.loads(header_bytes)
        names = [k for k in header if k != "__metadata__"]
        name = rng.choice(names) if names else None
        if choice < 0.3 or name is None:
            depth = rng.choice((10, 1000, 5000, 100000))
            header[rng.choice(("__metadata__", name or "x"))] = json.loads("[" * depth + "]" * depth) if depth < 2000 else None
            new_header = json.dumps(header).encode()
            if depth >= 2000:  # json.dumps itself recurses: spell deep nesting directly
                new_header = new_header.replace(b"null", b"[" * depth + b"]" * depth, 1)
        else:
            entry = header[name]
            if choice < 0.45:
                entry["dtype"] = rng.choice(SAFETENSORS_DTYPES)
            elif choice < 0.6:
                shape = list(entry.get("shape", [])) if isinstance(entry, dict) else []
                mutation = rng.randrange(5)
                if mutation == 0 or not shape:
                    shape.append(rng.choice((0, 1, 2, -1, 2**40)))
                elif mutation == 1:
                    shape[rng.randrange(len(shape))] = rng.choice((0, -1, 2**63, "4", None, [2], 1.5))
                elif mutation == 2:
                    shape.pop()
                else:
                    shape = [0] + shape
                entry["shape"] = shape
            elif choice < 0.75:
                offsets = list(entry.get("data_offsets", [0, 0]))
                offsets[rng.randrange(2)] = rng.choice((0, 1, -1, len(data), len(data) + 1, 2**64, "0", None, 1.0))
                entry["data_offsets"] = offsets
            elif choice < 0.85:
                new = rng.choice((name + SURROGATE, SURROGATE, name + "\x00", name + "\u202e", "", name.upper()))
                header[new] = header.pop(name)
            elif choice < 0.92:
                header["__metadata__"] = rng.choice(({"a": 1}, {"a": ["b"]}, [], "x", {"format": "pt"}))
            else:
                entry[rng.choice(("extra", "dtype", "shape"))] = rng.choice(({}, [], 0, "x"))
            new_header = json.dumps(header).encode()
    return len(new_header).to_bytes(8, "little") + new_header + data
