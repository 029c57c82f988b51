"""Malformed sources derived from valid ones: truncated at a spread of offsets, bytes flipped (seeded
and hypothesis-driven), spans deleted, inserted or duplicated.

For all of them the only outcomes allowed are a `ConversionError`, or a conversion whose output holds
exactly the tensors the (mutated) source decodes to; never another exception, never a partial output.

The files are built by `assemble.py` (the corpus and its pickle assembler); the outcome rule and its
independent decoder are `judge.py`.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, List, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ..support import require_weights_only_decoder

require_weights_only_decoder()

from .judge import FUZZ_FORMATS, convert_and_judge, judge_bytes, suffix, valid_source


# ================================================================ malformed files: the outcome rule (judge.py)


@pytest.mark.parametrize("fmt", FUZZ_FORMATS)
def test_control_every_valid_source_converts_faithfully(fmt: str, tmp_path: Path):
    """Control for the mutation tests: the unbroken files convert, and the judge accepts them."""
    src = tmp_path / f"source{suffix(fmt)}"
    src.write_bytes(valid_source(fmt))
    (tmp_path / "out").mkdir()

    assert convert_and_judge(src, tmp_path / "out") == "converted"


# ---------------------------------------------------------------- truncation


def truncation_offsets(size: int) -> List[int]:
    """About 30 lengths: the first bytes (magic, headers), an even spread, and the last bytes (zip directory)."""
    near_start = [0, 1, 2, 3, 4, 7, 8, 9, 16, 64]
    spread = [size * i // 14 for i in range(1, 14)]
    near_end = [size - 1, size - 2, size - 10, size - 22, size - 23, size - 100, size - 1000]
    return sorted({n for n in near_start + spread + near_end if 0 <= n < size})


@pytest.mark.parametrize("fmt", FUZZ_FORMATS)
def test_truncated_file_is_refused_or_converted_faithfully(fmt: str):
    """A download cut short at any of ~30 offsets: a ConversionError, never another exception, a partial file or a
    conversion (every cut loses at least the last byte: a pickle's STOP, a zip's directory, safetensors' data)."""
    data = valid_source(fmt)
    offsets = truncation_offsets(len(data))
    outcomes = {length: judge_bytes(data[:length], fmt) for length in offsets}
    assert len(offsets) >= 20, offsets
    converted = sorted(length for length, outcome in outcomes.items() if outcome == "converted")
    assert converted == [], f"a {fmt} file cut to these lengths (of {len(data)}) converted: {converted}"


# ---------------------------------------------------------------- byte flips


def _flip(data: bytes, positions: List[int], masks: List[int]) -> bytes:
    out = bytearray(data)
    for pos, mask in zip(positions, masks):
        out[pos] ^= mask
    return bytes(out)


def _structural_position(rng: random.Random, size: int) -> int:
    """Flips land in headers and directories as often as in tensor bytes (those are where parsers break)."""
    region = rng.choice(("anywhere", "head", "tail"))
    if region == "head":
        return rng.randrange(min(size, 600))
    if region == "tail":
        return rng.randrange(max(0, size - 600), size)
    return rng.randrange(size)


SEEDED_FLIPS_PER_FORMAT = 30


@pytest.mark.parametrize("fmt", FUZZ_FORMATS)
def test_seeded_byte_flips_are_refused_or_converted_faithfully(fmt: str):
    """1-8 flipped bytes (a fixed, seeded set per format): a ConversionError or a faithful output."""
    data = valid_source(fmt)
    rng = random.Random(f"flips-{fmt}")
    for _ in range(SEEDED_FLIPS_PER_FORMAT):
        n = rng.randint(1, 8)
        positions = [_structural_position(rng, len(data)) for _ in range(n)]
        masks = [rng.randint(1, 255) for _ in range(n)]
        judge_bytes(_flip(data, positions, masks), fmt, rng.choice((".pth", ".pkl")))  # asserts the outcome rule


# Hypothesis: at least 40 examples per format and property, more under the nightly profile.
_FUZZ_SETTINGS = settings(max_examples=max(40, settings().max_examples))


@st.composite
def flips(draw: Any, fmt: str) -> Tuple[bytes, str]:
    """(a valid `fmt` file with 1-8 bytes flipped, destination extension)."""
    data = valid_source(fmt)
    size = len(data)
    position = st.one_of(st.integers(0, size - 1), st.integers(0, min(size, 600) - 1), st.integers(max(0, size - 600), size - 1))
    n = draw(st.integers(1, 8))
    positions = draw(st.lists(position, min_size=n, max_size=n))
    masks = draw(st.lists(st.integers(1, 255), min_size=n, max_size=n))
    return _flip(data, positions, masks), draw(st.sampled_from((".pth", ".pkl")))


@pytest.mark.parametrize("fmt", FUZZ_FORMATS)
@_FUZZ_SETTINGS
@given(data=st.data())
def test_byte_flips_end_in_a_conversion_error_or_a_faithful_output(fmt: str, data: st.DataObject):
    """Hypothesis flips 1-8 bytes of a valid file: never another exception, a partial output or a wrong tensor."""
    mutated, ext = data.draw(flips(fmt))
    judge_bytes(mutated, fmt, ext)


@st.composite
def splices(draw: Any, fmt: str) -> bytes:
    """A valid `fmt` file with a span deleted, random bytes inserted, or a span duplicated."""
    data = valid_source(fmt)
    start = draw(st.integers(0, len(data) - 1))
    length = draw(st.integers(1, 64))
    kind = draw(st.sampled_from(("delete", "insert", "duplicate")))
    if kind == "delete":
        return data[:start] + data[start + length:]
    if kind == "insert":
        return data[:start] + draw(st.binary(min_size=1, max_size=64)) + data[start:]
    return data[:start] + data[start:start + length] * 2 + data[start + length:]


@pytest.mark.parametrize("fmt", FUZZ_FORMATS)
@_FUZZ_SETTINGS
@given(data=st.data())
def test_spliced_files_end_in_a_conversion_error_or_a_faithful_output(fmt: str, data: st.DataObject):
    """Spans deleted, inserted or duplicated: the same rule as for flips."""
    judge_bytes(data.draw(splices(fmt)), fmt)
