"""Record the sha256 of every output for a fixed set of sources, to show a refactor changes no byte.

Usage: python benchmarks/output_hashes.py OUT.json [SOURCES_DIR]   (run before and after; compare the files)

With SOURCES_DIR the sources are kept there and reused when present, so that the runs to compare
convert the very same files: a legacy torch file names its storages by their memory addresses
(`torch.save(..., _use_new_zipfile_serialization=False)`), so it differs from run to run, and so
does a `.pth` written from it (which keeps the file's storage names).

Sources: every layout (V1 and V2, a small architecture and the Tiny variant), fp32/fp16/bf16,
bare and under 'model', saved as a torch zip, a legacy torch file, a numpy .pkl and safetensors;
each converted to .pth and .pkl through `conversion.convert`.  The report (minus paths) is
hashed too, so a changed report shows up as well.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from conversion import convert  # noqa: E402
from conversion.architecture import Architecture  # noqa: E402
from conversion.errors import ConversionError  # noqa: E402
from conversion.layouts import LAYOUTS, from_canonical  # noqa: E402
from conversion.synthetic import random_state_dict  # noqa: E402

ARCHES = {
    "small-v1": Architecture(depths=(1, 1, 2, 1), dims=(8, 16, 24, 32), num_classes=5, classifier_norm=True),
    "small-v2": Architecture(depths=(1, 1, 2, 1), dims=(8, 16, 24, 32), num_classes=5, classifier_norm=True, version=2),
    "tiny-v1": Architecture(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768), num_classes=1000, classifier_norm=True),
}


def _save(obj, path: str, how: str) -> None:
    if how == "zip":
        torch.save(obj, path)
    elif how == "legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    elif how == "pkl":
        with open(path, "wb") as f:
            pickle.dump(_numpy(obj), f, protocol=2)
    else:
        from safetensors.torch import save_file

        save_file({k: v.clone().contiguous() for k, v in obj.items()}, path)


def _numpy(obj):
    if isinstance(obj, dict):
        return {k: _numpy(v) for k, v in obj.items()}
    if isinstance(obj, torch.Tensor):
        return obj.float().numpy() if obj.dtype == torch.bfloat16 else obj.numpy()
    return obj


def main(out: str, sources: str = "") -> int:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        kept = sources or tmp
        os.makedirs(kept, exist_ok=True)
        for arch_name, arch in ARCHES.items():
            try:
                canonical = random_state_dict(arch, seed=1)
            except Exception as err:  # an architecture this generator does not support
                print(f"skip {arch_name}: {err}")
                continue
            for layout in sorted(LAYOUTS):
                if arch_name == "tiny-v1" and layout not in ("official", "timm"):
                    continue
                try:
                    sd = from_canonical(canonical, layout)
                except ConversionError as err:
                    results[f"{arch_name}/{layout}"] = f"no source: {err.message}"
                    continue
                for dtype in (torch.float32, torch.float16, torch.bfloat16):
                    typed = {k: v.to(dtype) for k, v in sd.items()}
                    for container in ("bare", "model"):
                        obj = typed if container == "bare" else {"model": typed, "epoch": 3}
                        for how, ext in (("zip", ".pth"), ("legacy", ".pth"), ("pkl", ".pkl"), ("safetensors", ".safetensors")):
                            if how == "safetensors" and container != "bare":
                                continue
                            if arch_name == "tiny-v1" and (how != "zip" or dtype == torch.float16):
                                continue
                            case = f"{arch_name}/{layout}/{str(dtype)[6:]}/{container}/{how}"
                            src = os.path.join(kept, case.replace("/", "_") + ext)
                            if not os.path.exists(src):
                                _save(obj, src, how)
                            for out_ext in (".pth", ".pkl"):
                                name = f"{case}->{out_ext}"
                                dst = os.path.join(tmp, "out" + out_ext)
                                try:
                                    report = convert(src, dst, force=True).to_dict()
                                except ConversionError as err:
                                    results[name] = f"refused: {err.message.replace(kept + os.sep, '<tmp>/')}"
                                    continue
                                with open(dst, "rb") as f:
                                    digest = hashlib.sha256(f.read()).hexdigest()
                                report.pop("source"), report.pop("destination")
                                report.pop("read_past", None)  # added by the reader redesign (empty for these sources)
                                rep = hashlib.sha256(json.dumps(report, sort_keys=True, default=str).encode()).hexdigest()
                                results[name] = f"{digest} report {rep[:16]}"
    with open(out, "w") as f:
        json.dump(results, f, indent=1, sort_keys=True)
    print(f"{len(results)} outputs recorded in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
