"""A small explicit pickle opcode writer: exactly what torch's `data.pkl` and the model-zoo `.pkl`
need (dicts, strings, ints, tuples, False, GLOBAL, REDUCE, BINPERSID, BINBYTES8 outside frames).

Why not `pickle.Pickler`: the writers stream tensor bytes between opcodes (a kernel copy straight
into the file) and name globals without importing their modules; the standard pickler allows
neither without subclassing its private pure-Python implementation.  The bytes are the ones that
pickler writes for the same objects: the memo is kept by object identity as pickle keeps it
(strings, tuples, dicts, globals and reduced objects are memoized when first written, written again
as a memo reference), dict items go in batches of 1000, and from protocol 4 the opcodes are framed
(frames of about 64 KiB; a large payload is written outside any frame, as pickle writes large
bytes).  Protocol 2 spells a memo entry BINPUT n, protocol 4 MEMOIZE.
"""
from __future__ import annotations

import io
import struct
from typing import Any, Dict, Iterable, List, Tuple

_FRAME_TARGET = 64 * 1024  # pickle's _FRAME_SIZE_TARGET: a frame is committed once this long
_FRAME_MIN = 4  # a frame shorter than this is written without its FRAME header, as pickle does
_BATCH = 1000  # pickle's batch size for dict items


def encode_long(value: int) -> bytes:
    """Two's complement little-endian bytes of `value`, as short as the sign allows (LONG1's argument)."""
    if value == 0:
        return b""
    data = value.to_bytes((value.bit_length() >> 3) + 1, "little", signed=True)
    if value < 0 and len(data) > 1 and data[-1] == 0xFF and data[-2] & 0x80:
        data = data[:-1]
    return data


class OpcodeWriter:
    """Writes one pickle to the binary file `f`: call `start`, write the objects' opcodes, `stop`."""

    def __init__(self, f: Any, protocol: int) -> None:
        self.f, self.protocol = f, protocol
        self.framed = protocol >= 4
        self.frame = io.BytesIO()
        self.memo: Dict[int, int] = {}
        self.entries = 0  # memo entries written (a reader's memo index for the next one)
        self.kept: List[Any] = []  # memoized objects stay alive, so their ids stay theirs

    # ---------------------------------------------------------------- framing and raw bytes

    def write(self, data: bytes) -> None:
        (self.frame if self.framed else self.f).write(data)

    def flush_frame(self, force: bool = False) -> None:
        """Write the pending frame once it is long enough (pickle checks before each object)."""
        if not self.framed or (self.frame.tell() < _FRAME_TARGET and not force):
            return
        data = self.frame.getvalue()
        if data:
            if len(data) >= _FRAME_MIN:
                self.f.write(b"\x95" + struct.pack("<Q", len(data)))
            self.f.write(data)
        self.frame = io.BytesIO()

    def large_bytes_header(self, size: int) -> None:
        """BINBYTES8 for a payload of `size` bytes that the caller writes to `f` next, outside frames."""
        self.flush_frame(force=True)
        self.f.write(b"\x8e" + struct.pack("<Q", size))

    def start(self) -> None:
        self.f.write(b"\x80" + bytes([self.protocol]))

    def stop(self) -> None:
        self.write(b".")
        self.flush_frame(force=True)

    # ---------------------------------------------------------------- the memo

    def fetch(self, obj: Any) -> bool:
        """Write a memo reference to `obj` if it was written before; whether it was."""
        self.flush_frame()
        index = self.memo.get(id(obj))
        if index is None:
            return False
        self.write(b"h" + bytes([index]) if index < 256 else b"j" + struct.pack("<I", index))
        return True

    def memoize(self, obj: Any) -> None:
        index = self.entries
        self.memo[id(obj)] = index
        self.kept.append(obj)
        self.entries += 1
        if self.framed:
            self.write(b"\x94")
        else:
            self.write(b"q" + bytes([index]) if index < 256 else b"r" + struct.pack("<I", index))

    def forget(self) -> None:
        """Drop the writer's memo (what was written stays in a reader's memo, never referred to again)."""
        self.memo.clear()
        self.kept.clear()
        self.entries = 0

    # ---------------------------------------------------------------- values

    def string(self, text: str) -> None:
        if self.fetch(text):
            return
        data = text.encode("utf-8", "surrogatepass")
        if self.protocol >= 4 and len(data) <= 0xFF:
            self.write(b"\x8c" + bytes([len(data)]) + data)
        elif self.protocol >= 4 and len(data) > 0xFFFFFFFF:
            self.write(b"\x8d" + struct.pack("<Q", len(data)) + data)
        else:
            self.write(b"X" + struct.pack("<I", len(data)) + data)
        self.memoize(text)

    def integer(self, value: int) -> None:
        self.flush_frame()
        if 0 <= value <= 0xFF:
            self.write(b"K" + bytes([value]))
        elif 0 <= value <= 0xFFFF:
            self.write(b"M" + struct.pack("<H", value))
        elif -0x80000000 <= value <= 0x7FFFFFFF:
            self.write(b"J" + struct.pack("<i", value))
        else:
            data = encode_long(value)
            self.write(b"\x8a" + bytes([len(data)]) + data if len(data) < 256 else b"\x8b" + struct.pack("<i", len(data)) + data)

    def false(self) -> None:
        self.flush_frame()
        self.write(b"\x89")

    def global_name(self, key: Any, module: str, name: str) -> None:
        """GLOBAL module.name, memoized under `key` (one object per global)."""
        if self.fetch(key):
            return
        self.write(b"c" + f"{module}\n{name}\n".encode("utf-8"))
        self.memoize(key)

    def tuple_of(self, obj: Any, items: Iterable[Any], write_item: Any, memoize: bool = True) -> None:
        """A tuple `obj` whose items `write_item` writes; small tuples use TUPLE1-3 from protocol 2."""
        if self.fetch(obj):
            return
        items = list(items)
        if not items:
            self.write(b")")
            return
        small = len(items) <= 3
        if not small:
            self.write(b"(")
        for item in items:
            write_item(item)
        self.write(b"\x85\x86\x87"[len(items) - 1:len(items)] if small else b"t")
        if memoize:
            self.memoize(obj)

    def dict_of(self, obj: Any, items: List[Tuple[Any, Any]], write_key: Any, write_value: Any) -> None:
        """A dict `obj`: EMPTY_DICT, then its items in batches (SETITEMS, or SETITEM for one)."""
        if self.fetch(obj):
            return
        self.write(b"}")
        self.memoize(obj)
        for start in range(0, len(items), _BATCH):
            batch = items[start:start + _BATCH]
            if len(batch) > 1:
                self.write(b"(")
            for key, value in batch:
                write_key(key)
                write_value(value)
            self.write(b"u" if len(batch) > 1 else b"s")

    def reduce_call(self, obj: Any, write_callable: Any, write_args: Any, memoize: bool = True) -> None:
        """REDUCE: the callable, its argument tuple, then the result memoized under `obj`."""
        if self.fetch(obj):
            return
        write_callable()
        write_args()
        self.write(b"R")
        if memoize:
            self.memoize(obj)

    def persistent_id(self, write_pid: Any) -> None:
        """BINPERSID after the id's own opcodes."""
        self.flush_frame()  # where a pickler starts the object the id stands for
        write_pid()
        self.write(b"Q")
