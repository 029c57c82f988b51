"""Peak memory and time of converting a large safetensors file, against `cp` of the same file.

The converter reads a safetensors file by its header and copies the tensors in the kernel, so its
peak resident memory must not grow with the file (before this, the file was loaded whole: about
the file's size plus torch).  Each command runs in its own process, in turns, as bench.py runs them
(peak RSS is the child's VmHWM); the page cache is warm for every command alike.

    python benchmarks/safetensors_memory.py [--variant large] [--repeat 3] [--before DIR]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from typing import Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.bench import VARIANTS, _git_head, run_in_turns  # noqa: E402
from conversion.architecture import RELEASED_VARIANTS, Architecture, canonical_shapes  # noqa: E402


def make_safetensors(variant: str, path: str) -> int:
    import torch
    from safetensors.torch import save_file

    depths, dims = RELEASED_VARIANTS[1][VARIANTS[variant]]
    arch = Architecture(depths, dims, num_classes=1000, classifier_norm=True)
    g = torch.Generator().manual_seed(0)
    save_file({name: torch.randn(shape, generator=g) * 0.02 for name, shape in canonical_shapes(arch).items()}, path)
    return os.path.getsize(path)


def main(argv: Sequence[str] = ()) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variant", default="large", choices=sorted(VARIANTS))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--before", default=None, help="another checkout whose convert runs in the same turns")
    args = ap.parse_args(list(argv))
    work = tempfile.mkdtemp(prefix="convnext-d2-st-")
    try:
        src = os.path.join(work, "w.safetensors")
        size = make_safetensors(args.variant, src)
        with open(src, "rb") as f:
            while f.read(1 << 24):
                pass
        out = lambda name: os.path.join(work, name)  # noqa: E731
        contenders = [{"name": "cp", "argv": ["cp", src, out("cp.bin")], "probe": False, "cleanup": [out("cp.bin")]}]
        trees = [("", ROOT)] + ([(f" (before: {_git_head(args.before)})", os.path.abspath(args.before))] if args.before else [])
        for label, root in trees:
            for ext in (".pth", ".pkl"):
                dst = out(f"{'b' if label else 'o'}{ext}")
                contenders.append({"name": f"convert -> {ext}{label}", "argv": ["-m", "conversion", "convert", src, dst], "cleanup": [dst], "root": root})
        load = os.getloadavg()
        medians = run_in_turns(contenders, args.repeat)
        cp = medians["cp"]["wall"]
        print(f"{VARIANTS[args.variant]} safetensors, {size / 1e6:.0f} MB; load {load[0]:.2f}; medians of {args.repeat}")
        print("| command | wall s | x cp | peak RSS MB | RSS / file |")
        print("|---|---|---|---|---|")
        for name, r in medians.items():
            print(f"| {name} | {r['wall']:.2f} | {r['wall'] / cp:.2f} | {r['rss'] / 1e6:.0f} | {r['rss'] / size:.3f} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
