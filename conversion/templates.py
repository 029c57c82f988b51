"""The template language of layout tables: named-field name patterns, shape fixes, pairs, layouts.

A field is `{name}` (digits), `{name|codec}` (digits transformed, e.g. torchvision's stage `s`
lives at `features.{2s+1}`), or `{name=a|b}` (one of the words); `{p}` is `weight` or `bias`.
One template matches a name and formats one, so a pair of templates maps in both directions.
The tables themselves, and recognition, are in `layouts.py`.
"""
from __future__ import annotations

import re
from math import prod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, Mapping, Optional, Tuple

if TYPE_CHECKING:
    import torch  # noqa: F401  (Layout.post's annotation)

# ---------------------------------------------------------------- templates

Codec = Callable[[int, bool], Optional[int]]  # (value, to_source) -> the other side's, None: not this field's


def _codec(encode: Callable[[int], int], decode: Callable[[int], Optional[int]]) -> Codec:
    return lambda value, to_source: encode(value) if to_source else decode(value)


_CODECS: Dict[str, Codec] = {
    # torchvision: stage s is features[2s+1]; the downsample before stage i is features[2i] (i=0: the stem).
    "odd": _codec(lambda v: 2 * v + 1, lambda v: (v - 1) // 2 if v % 2 == 1 else None),
    "even": _codec(lambda v: 2 * v, lambda v: v // 2 if v % 2 == 0 else None),
    # Hugging Face Backbone: output norm i is hidden_states_norms.stage{i+1}.
    "plus1": _codec(lambda v: v + 1, lambda v: v - 1 if v >= 1 else None),
}
_FIELD = re.compile(r"\{(\w+)(?:\|(\w+)|=([\w|]+))?\}")


class Template:
    """A name pattern with named fields, matchable and formattable."""

    def __init__(self, text: str, words_of: Optional[Mapping[str, str]] = None) -> None:
        self.text = text
        self.codecs: Dict[str, Optional[str]] = {}
        self.words: Dict[str, str] = {}
        pattern, pos = "", 0
        for m in _FIELD.finditer(text):
            name, codec, words = m.group(1), m.group(2), m.group(3)
            if name == "p" and words is None:
                words = "weight|bias"
            words = words or (words_of or {}).get(name)
            if words:
                self.words[name] = words
            pattern += re.escape(text[pos:m.start()])
            pattern += f"(?P<{name}>{words})" if words else f"(?P<{name}>\\d+)"
            self.codecs[name] = codec if not words else "word"
            pos = m.end()
        self.regex = re.compile("^" + pattern + re.escape(text[pos:]) + "$")

    def match(self, key: str, to_source: bool) -> Optional[Dict[str, Any]]:
        """Field values in canonical terms (codecs undone when reading a source name)."""
        m = self.regex.match(key)
        if m is None:
            return None
        values: Dict[str, Any] = {}
        for name, raw in m.groupdict().items():
            codec = self.codecs[name]
            if codec == "word":
                values[name] = raw
            elif codec is None:
                values[name] = int(raw)
            else:
                decoded = _CODECS[codec](int(raw), False) if not to_source else int(raw)
                if decoded is None:
                    return None
                values[name] = decoded
        return values

    def format(self, values: Mapping[str, Any], to_source: bool) -> str:
        def field_value(m: "re.Match[str]") -> str:
            name, codec = m.group(1), m.group(2)
            value = values[name]
            return str(_CODECS[codec](value, True) if (codec and to_source) else value)

        return _FIELD.sub(field_value, self.text)


# ---------------------------------------------------------------- shape fixes
# Each is a pair of Shape -> Shape functions (to canonical, to source): a fix changes only the
# shape, never the elements or their C order, so values stay bit-identical and a handle can be
# fixed without reading its bytes (io.handles.with_shape applies a shape to any leaf).

Shape = Tuple[int, ...]


@dataclass(frozen=True)
class Fix:
    """A layout's shape fix: its report text and its two shape functions."""

    name: str
    to_canonical: Callable[[Shape], Shape]
    to_source: Callable[[Shape], Shape]


# timm conv-MLP models (and mmpretrain's linear_pw_conv=False) store Linear weights as 1x1 convs.
SQUEEZE_1X1 = Fix("[out,in,1,1] -> [out,in]", lambda s: s[:2] if len(s) == 4 else s, lambda s: s + (1, 1) if len(s) == 2 else s)
# Official GRN parameters are [1, 1, 1, E]; timm and mmpretrain store [E].
GRN_VECTOR = Fix("[E] -> [1,1,1,E]", lambda s: (1, 1, 1, prod(s)), lambda s: (prod(s),))
# torchvision's layer scale is [C, 1, 1]; the official `gamma` is [C].
LAYER_SCALE_3D = Fix("[C,1,1] -> [C]", lambda s: (prod(s),), lambda s: (prod(s), 1, 1))
# The conv-MLP fix is optional in the source direction: only conv-MLP models need it.
NO_FIX = Fix("", lambda s: s, lambda s: s)


@dataclass(frozen=True)
class Pair:
    """One source template and its canonical template (plus a shape fix)."""

    source: Template
    canonical: Template
    fix: Fix = NO_FIX
    outside_prefix: bool = False  # the source key carries no layout prefix (HF `classifier`)


def _pairs(*rows: Tuple[Any, ...]) -> Tuple[Pair, ...]:
    out = []
    for row in rows:
        source, canonical = row[0], row[1]
        fix = row[2] if len(row) > 2 and row[2] is not None else NO_FIX
        outside = len(row) > 3 and bool(row[3])
        source_template = Template(source)
        # The canonical side names the same word fields ({m}); it inherits their alternatives.
        out.append(Pair(source_template, Template(canonical, source_template.words), fix, outside))
    return tuple(out)


@dataclass(frozen=True)
class Layout:
    """One library's naming of ConvNeXt weights.

    Attributes:
        name: stable identifier used by `--from` and in reports.
        markers: source keys (after the prefix) that together identify the layout.
        pairs: the mapping table (first matching pair wins, in both directions).
        drops: source templates of tensors deliberately left out, with the reason.
        prefixes: the only prefixes this layout comes with (None: any).
        description: one line for reports and `--from` help.
        post: layout-specific renames after mapping to canonical names (canonical, source names).
        post_inverse: layout-specific additions after mapping back (source dict, prefix).
    """

    name: str
    markers: Tuple[str, ...]
    pairs: Tuple[Pair, ...]
    description: str
    drops: Tuple[Tuple[Template, str], ...] = ()
    drop_outside_prefix: Optional[str] = None  # reason to drop every key outside the prefix
    prefixes: Optional[Tuple[str, ...]] = None
    post: Optional[Callable[[Dict[str, "torch.Tensor"], Dict[str, str]], None]] = None
    post_inverse: Optional[Callable[[Dict[str, Any], str], None]] = None

    @property
    def specificity(self) -> int:
        return len(self.markers) + (1 if self.prefixes is not None else 0)

    def rename(self, key: str, inverse: bool = False, outside: bool = False) -> Optional[Tuple[str, Fix]]:
        """(new name, fix) for one key, or None when no pair applies."""
        for pair in self.pairs:
            if pair.outside_prefix != outside:
                continue
            frm, to = (pair.canonical, pair.source) if inverse else (pair.source, pair.canonical)
            values = frm.match(key, to_source=inverse)
            if values is not None:
                return to.format(values, to_source=inverse), pair.fix
        return None

    def drop_reason(self, key: str) -> Optional[str]:
        for template, reason in self.drops:
            if template.match(key, to_source=False) is not None:
                return reason
        return None
