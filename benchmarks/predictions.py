"""Benchmark: how often `inspect`, `verify` and `repair` say what Detectron2 really does, on a corpus of
checkpoint files built with the real libraries (torch.save, pickle.dump, safetensors; official, timm,
Hugging Face and torchvision names; wrapper prefixes; containers; numpy arrays; dropped keys, wrong
shapes, NaN/Inf, fp16/bf16; `matching_heuristics` in the file and in the URL; the pooled norm), each
loaded by the real `DetectionCheckpointer` into this project's backbone, every value compared before
and after the load (tests/d2/differential.py: the same builder and observation the suite uses).

Each command's answer is read from its public report only, so the same script measures an older
checkout (`--code DIR` puts DIR's `conversion` first on the path):

- inspect agrees when its (raises, loads nothing, loads every backbone weight its own value) matches
  the observation; where the report has no `detectron2` prediction (older code), those three are
  read from its problems' words ("fails"/"cannot read"/"refuses" ..., "loads none", none at all);
- verify agrees when `ok` equals the rule applied to the observation (no raise, every backbone weight
  but the fresh output norms loaded, none given the pooled classifier norm, all finite); exit 2 counts
  as not OK;
- repair agrees when it writes a file exactly when the source needs one (Detectron2 raises, leaves a
  backbone weight without its own value, matches names only by heuristics, or keeps classifier
  tensors) and what it writes loads clean with the source's values, or when it refuses with a reason
  a file that needs one.

    python benchmarks/predictions.py [--files 230] [--code DIR] [--list]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import random
import sys
import tempfile
import warnings
from collections import Counter
from typing import Any, Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAISE_WORDS = ("fails", "cannot read", "refuses", "UnpicklingError", "Unsupported type", "Weights only", "raises",
               "cannot unpickle", "cannot import")


def _load_differential() -> Any:
    """tests/d2/differential.py of this checkout, by path (the code measured may be another checkout's)."""
    spec = importlib.util.spec_from_file_location("differential", os.path.join(ROOT, "tests", "d2", "differential.py"))
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules["differential"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def corpus(d: Any, n: int) -> List[Any]:
    """The A-G kinds first, then a seeded sample over every axis (valid combinations, no repeats)."""
    V = d.Variant
    kinds = [
        V(prefix="_orig_mod.backbone."), V(prefix="module.module.backbone."), V(prefix="module._orig_mod.backbone."),
        V(writer=("pickle.dump", ".pth")), V(writer=("safetensors", ".safetensors"), container="bare"),
        V(prefix="", heuristics_in_file=True),
        *[V(prefix=p, heuristics_in_file=True, arrays=True, container="model+author", writer=("pickle.dump", ".pkl"))
          for p in ("model.", "backbone.bottom_up.", "module.")],
        V(prefix="module.backbone.", non_finite="nan"), V(prefix="module.backbone.", heuristics_in_file=True),
        V(prefix="", classifier=True, drop="stages.3.0.norm", arrays=True, container="model+author",
          heuristics_in_file=True, writer=("pickle.dump", ".pkl")),
    ]
    rng = random.Random(18)
    seen = set(kinds)
    out = list(kinds)
    while len(out) < n:
        v = V(layout=rng.choice(d.LAYOUTS), prefix=rng.choice(d.PREFIXES), classifier=rng.random() < 0.4,
              drop=rng.choice(d.DROPS) if rng.random() < 0.3 else "none", wrong_shape=rng.random() < 0.15,
              non_finite=rng.choice(["nan", "inf"]) if rng.random() < 0.2 else None,
              dtype=rng.choice(["float32", "float32", "float16", "bfloat16"]), arrays=rng.random() < 0.25,
              extra=rng.random() < 0.2, container=rng.choice(d.CONTAINERS), heuristics_in_file=rng.random() < 0.25,
              heuristics_in_url=rng.random() < 0.15, writer=rng.choice(d.WRITERS))
        if d.valid(v) and v not in seen:
            seen.add(v)
            out.append(v)
    return out


def truth(d: Any, seen: Any) -> Dict[str, bool]:
    """What the real load did, as the three questions the commands answer."""
    from conversion.target import BACKBONE_PREFIX

    wanted = [k for k in _backbone_keys(d) if not d_fresh(k)]
    backbone_loaded = [k for k in seen.loaded if k.startswith(BACKBONE_PREFIX)]
    misplaced = any(names and all(_pooled(c) for c in names) and not _pooled(m) for m, names in seen.loaded.items())
    complete = seen.error is None and all(k in seen.loaded for k in wanted) and not seen.shape_skipped and not misplaced
    exact = complete and all(any(c in (m, "module." + m) for c in seen.loaded[m]) for m in wanted)
    finite = all(bool(__import__("torch").isfinite(seen.values[k]).all()) for k in seen.loaded)
    return {"raises": seen.error is not None, "nothing": seen.error is None and not backbone_loaded,
            "complete": complete, "exact": exact, "ok": complete and finite}


def _pooled(name: str) -> bool:
    import re

    return re.match(r"^(?:(?:module|_orig_mod|model)\.)*(?:head\.)?(?:fc_)?norm\.(?:weight|bias)$", name) is not None


def d_fresh(key: str) -> bool:
    import re

    return re.match(r"^backbone\.norm\d+\.(weight|bias)$", key) is not None


def _backbone_keys(d: Any) -> List[str]:
    from conversion.architecture import NUM_STAGES, canonical_shapes
    import dataclasses

    arch = dataclasses.replace(d.ARCH, output_norms=tuple(range(NUM_STAGES)), classifier_norm=False, num_classes=None)
    return ["backbone." + k for k in canonical_shapes(arch)]


def inspect_answer(d: Any, path: str) -> Optional[Dict[str, bool]]:
    from conversion.errors import ConversionError
    from conversion.inspection import inspect_checkpoint

    try:
        report = inspect_checkpoint(path)
    except ConversionError:
        return None
    p = getattr(report, "detectron2", None)
    if p:
        wanted = [k for k in _backbone_keys(d) if not d_fresh(k)]
        misplaced = any(_pooled(c) and not _pooled(m) for m, c in p["loaded"].items())
        return {"raises": p["raises"] is not None,
                "nothing": p["raises"] is None and not any(k.startswith("backbone.") for k in p["loaded"]),
                "complete": p["raises"] is None and all(k in p["loaded"] for k in wanted) and not p["shape_skipped"] and not misplaced}
    raises = any(w in problem for problem in report.problems for w in RAISE_WORDS)
    nothing = not raises and any("loads none" in problem for problem in report.problems)
    return {"raises": raises, "nothing": nothing, "complete": not raises and not nothing}


def verify_answer(path: str) -> bool:
    from conversion.errors import ConversionError
    from conversion.verify import verify

    try:
        return verify(path).ok
    except ConversionError:
        return False


def repair_agrees(d: Any, path: str, needs: bool, directory: str, file_weights: Dict[str, Any]) -> bool:
    from conversion.errors import ConversionError
    from conversion.pipeline import repair
    from conversion.testing.loading import build_d2_model

    fixed = os.path.join(directory, "fixed.pth")
    try:
        report = repair(path.split("?", 1)[0], fixed, force=True)
    except ConversionError:
        return needs  # refused, saying why: right only for a file that needs repairing
    if not report.repaired:
        return not needs
    if not needs:
        return False
    seen = d.observe(build_d2_model(d.ARCH), fixed, {})
    not_given = {why.split(":")[0] for why in getattr(report, "not_repaired", [])}
    wanted = [k for k in _backbone_keys(d) if not d_fresh(k) and k not in not_given]
    return seen.error is None and not seen.unexpected and not seen.shape_skipped and all(k in seen.loaded for k in wanted)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=230)
    parser.add_argument("--code", help="a checkout whose `conversion` to measure (default: this one)")
    parser.add_argument("--list", action="store_true", help="print each disagreement")
    args = parser.parse_args()
    sys.path.insert(0, os.path.abspath(args.code) if args.code else ROOT)
    warnings.simplefilter("ignore")
    import logging

    logging.disable(logging.WARNING)
    from conversion.testing.loading import build_d2_model

    d = _load_differential()
    variants = corpus(d, args.files)
    agree: Counter = Counter()
    wrong: Dict[str, List[str]] = {"inspect": [], "verify": [], "repair": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i, v in enumerate(variants):
            directory = os.path.join(tmp, str(i))
            os.makedirs(directory)
            path, file_weights = d.write(v, directory)
            seen = d.observe(build_d2_model(d.ARCH), path, file_weights)
            t = truth(d, seen)
            said = inspect_answer(d, path)
            checks = {
                "inspect": said is not None and all(said[k] == t[k] for k in ("raises", "nothing", "complete")),
                "verify": verify_answer(path) == t["ok"],
                "repair": repair_agrees(d, path, not t["exact"] or v.classifier, directory, file_weights),
            }
            for command, ok in checks.items():
                agree[command] += ok
                if not ok:
                    wrong[command].append(f"{v} truth={t} inspect={said}")
    print(f"corpus: {len(variants)} files; code: {args.code or ROOT}")
    for command in ("inspect", "verify", "repair"):
        print(f"{command:8s} agrees on {agree[command]} of {len(variants)}")
        if args.list:
            for line in wrong[command]:
                print("   ", line)


if __name__ == "__main__":
    main()
