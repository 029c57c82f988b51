"""Demo: the main job end to end on an embedded default, ConvNeXt-Tiny.

1. Build a deterministic ConvNeXt-Tiny checkpoint in the official layout (random
   weights: nothing can be downloaded), saved as released files are (`{"model": ...}`).
2. Convert it to `.pth` and `.pkl`.
3. Load each through Detectron2's real `DetectionCheckpointer` into the backbone, and
   require: only the fresh output norms missing, nothing unexpected, nothing skipped.
4. Compare every stage output with timm's ConvNeXt, loaded from the same official file
   through timm's own official->timm remapping.

Run: `tox -e demo` or `python -m conversion.demo [--keep DIR]`.  Needs detectron2 and timm.
Exit 0 when every check passes, 1 otherwise.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import sys
import tempfile
import time
from typing import Dict, List, Sequence

import torch

from .architecture import RELEASED_VARIANTS, Architecture
from .summaries import format_report
from .pipeline import convert
from .synthetic import random_state_dict

VARIANT = "convnext_tiny"
IMAGE_SIZE = 224
SEED = 0
# fp32 on CPU, same operations in the same order on both sides: differences come only from
# LayerNorm implementation details, ~1e-6 of the activations' scale.  1e-4 leaves margin.
MAX_RELATIVE_DIFFERENCE = 1e-4


def _timm_model(arch: Architecture, official: Dict[str, torch.Tensor]) -> torch.nn.Module:
    from timm.models.convnext import ConvNeXt, checkpoint_filter_fn

    model = ConvNeXt(depths=arch.depths, dims=arch.dims, num_classes=arch.num_classes or 0)
    model.load_state_dict(checkpoint_filter_fn({"model": official}, model), strict=True)
    return model.eval()


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def run(workdir: str, out=sys.stdout) -> bool:
    from .d2_loading import backbone_for, load_observed  # detectron2: only once main found it installed

    started = time.perf_counter()
    depths, dims = RELEASED_VARIANTS[1][VARIANT]
    arch = Architecture(depths=depths, dims=dims, num_classes=1000, classifier_norm=True)
    official = random_state_dict(arch, seed=SEED)
    src = os.path.join(workdir, "convnext_tiny_1k_224.pth")
    torch.save({"model": official}, src)
    print(f"built {src}: {len(official)} tensors in the official layout (random weights, seed {SEED})\n", file=out)

    timm_model = _timm_model(arch, official)
    image = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(SEED))
    with torch.no_grad():
        reference: List[torch.Tensor] = timm_model.forward_intermediates(image, intermediates_only=True)

    ok = True
    for ext in (".pth", ".pkl"):
        dst = os.path.join(workdir, "convnext_tiny_1k_224_d2" + ext)
        report = convert(src, dst)
        print(format_report(report), file=out)
        model = backbone_for(arch)
        seen = load_observed(model, dst)
        if seen.error is not None:
            raise seen.error
        inc = seen.incompatible
        missing_ok = sorted(inc.missing_keys) == sorted(report.fresh)
        ok &= missing_ok and not inc.unexpected_keys and not inc.incorrect_shapes
        print(f"  detectron2 DetectionCheckpointer: {len(inc.missing_keys)} missing "
              f"({'only the fresh output norms' if missing_ok else 'UNEXPECTED: ' + str(inc.missing_keys)}), "
              f"{len(inc.unexpected_keys)} unexpected, {len(inc.incorrect_shapes)} shape-skipped", file=out)
        with torch.no_grad():
            ours = model.backbone.stage_outputs(image)
        diffs = [_relative(a, b) for a, b in zip(ours, reference)]
        ok &= max(diffs) <= MAX_RELATIVE_DIFFERENCE
        stages = ", ".join(f"res{i + 2} {d:.1e}" for i, d in enumerate(diffs))
        print(f"  features vs timm (max |diff| / max |timm|, limit {MAX_RELATIVE_DIFFERENCE:.0e}): {stages}\n", file=out)
    print(f"{'PASS' if ok else 'FAIL'}: both files load cleanly and match timm ({time.perf_counter() - started:.1f} s)", file=out)
    return ok


def main(argv: Sequence[str] = ()) -> int:
    parser = argparse.ArgumentParser(prog="python -m conversion.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--keep", metavar="DIR", help="write the files into DIR (kept) instead of a temporary directory")
    args = parser.parse_args(list(argv))
    missing = [name for name in ("detectron2", "timm") if importlib.util.find_spec(name) is None]
    if missing:
        print(f"demo: needs {' and '.join(missing)}; run it with `tox -e demo`.", file=sys.stderr)
        return 2
    if args.keep:
        os.makedirs(args.keep, exist_ok=True)
    with contextlib.nullcontext(args.keep) if args.keep else tempfile.TemporaryDirectory(prefix="convnext-d2-demo-") as workdir:
        return 0 if run(workdir) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
