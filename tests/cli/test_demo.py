"""The demo is the README's first command: it must pass, and its verdict must be able to fail."""
from __future__ import annotations

import io

import pytest

from ..support import require

require("detectron2")
require("timm")

from conversion import demo  # noqa: E402  (imports detectron2 lazily, but only makes sense with it)


@pytest.mark.slow
def test_demo_passes_on_the_embedded_convnext_tiny(tmp_path):
    out = io.StringIO()
    assert demo.run(str(tmp_path), out=out), out.getvalue()
    text = out.getvalue()
    assert text.count("0 unexpected, 0 shape-skipped") == 2, text
    assert "PASS" in text and sorted(p.name for p in tmp_path.iterdir()) == [
        "convnext_tiny_1k_224.pth",
        "convnext_tiny_1k_224_d2.pkl",
        "convnext_tiny_1k_224_d2.pth",
    ]


@pytest.mark.slow
def test_demo_fails_when_the_features_differ(tmp_path, monkeypatch):
    """A zero tolerance the fp32 round-off cannot meet would not prove anything; a broken block does fail.
    (On ConvNeXt-Atto, the same path as Tiny at an eighth of the cost: the verdict is what is tested.)"""
    from conversion import d2

    monkeypatch.setattr(demo, "VARIANT", "convnext_atto")

    real_forward = d2.Block.forward
    monkeypatch.setattr(d2.Block, "forward", lambda self, x: real_forward(self, x) * 1.001)
    out = io.StringIO()
    assert not demo.run(str(tmp_path), out=out)
    text = out.getvalue()
    assert "FAIL" in text and text.count("(only the fresh output norms), 0 unexpected, 0 shape-skipped") == 2, text
