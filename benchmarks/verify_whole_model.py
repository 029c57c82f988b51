"""Benchmark: how long `verify` takes to build a Tiny DI-MaskDINO-like whole model on CPU and load a
checkpoint into it, next to the backbone alone (the suite's `tests/dimaskdino_like.py` at MaskDINO's
sizes: hidden 256, 6 encoder and 9 decoder layers, ConvNeXt-Tiny backbone).

Each phase is timed in this process, `--repeat` times, after one warm-up (imports and the page cache
are warm); the table gives medians of wall time and of CPU time (all threads; steadier when other
work shares the machine).  `verify (whole)` is the whole `verify()` call, reading the
converted file and the config, building, loading and checking.

    python benchmarks/verify_whole_model.py [--repeat 5]
"""
from __future__ import annotations

import argparse
import gc
import os
import pickle
import statistics
import sys
import tempfile
import time
import warnings
from typing import Callable, Dict, List, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from conversion import convert  # noqa: E402
from conversion.architecture import RELEASED_VARIANTS, Architecture  # noqa: E402
from conversion.synthetic import random_state_dict  # noqa: E402

YAML = """\
MODEL:
  META_ARCHITECTURE: "{meta}"
  BACKBONE: {{NAME: "D2ConvNeXt", FREEZE_AT: 0}}
  WEIGHTS: ""
  CONVNEXT: {{DEPTHS: [3, 3, 9, 3], DIMS: [96, 192, 384, 768], OUT_FEATURES: ["res2", "res3", "res4", "res5"]}}
"""


def median_s(run: Callable[[], object], repeat: int) -> Tuple[float, float]:
    """Median wall and CPU seconds (CPU time, all threads, is steadier on a shared machine)."""
    run()  # warm-up
    wall, cpu = [], []
    for _ in range(repeat):
        gc.collect()  # free the previous model outside the timed region
        started, started_cpu = time.perf_counter(), time.process_time()
        result = run()
        wall.append(time.perf_counter() - started)
        cpu.append(time.process_time() - started_cpu)
        del result
    return statistics.median(wall), statistics.median(cpu)


def parse_repeat(argv: List[str], doc: str) -> int:
    """The `--repeat N` option the gate benchmarks share."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    return parser.parse_args(argv).repeat


def print_rows(rows: Dict[str, Tuple[float, float]]) -> None:
    """The load average now, then the phases as a markdown table (what docs/benchmarks.md holds)."""
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    print("| phase | wall s | CPU s |\n|---|---|---|")
    for name, (wall, cpu) in rows.items():
        print(f"| {name} | {wall:.2f} | {cpu:.2f} |")


def main(argv: List[str]) -> int:
    repeat = parse_repeat(argv, __doc__)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import tests.dimaskdino_like  # noqa: F401  (registers DIMaskDINOLike and D2ConvNeXt)
        from conversion.d2_loading import build_holder, build_whole_model, config_for, load_observed
        from conversion.verify import verify
    torch.set_num_threads(os.cpu_count() or 1)
    depths, dims = RELEASED_VARIANTS[1]["convnext_tiny"]
    official = random_state_dict(Architecture(depths, dims, num_classes=1000, classifier_norm=True), seed=0)
    with tempfile.TemporaryDirectory(prefix="convnext-d2-bench-verify-") as tmp:
        src, converted, raw = (os.path.join(tmp, n) for n in ("src.pth", "tiny_d2.pth", "tiny_maskdino.pkl"))
        torch.save({"model": official}, src)
        convert(src, converted)
        with open(raw, "wb") as f:
            pickle.dump({"model": {k: v.numpy() for k, v in official.items()}, "__author__": "x", "matching_heuristics": True}, f)
        whole_yaml, alone_yaml = os.path.join(tmp, "whole.yaml"), os.path.join(tmp, "alone.yaml")
        with open(whole_yaml, "w") as f:
            f.write(YAML.format(meta="DIMaskDINOLike"))
        with open(alone_yaml, "w") as f:
            f.write(YAML.format(meta="NotRegistered"))
        cfg = config_for(whole_yaml)
        model = build_whole_model(cfg)
        state = model.state_dict()
        distinct = {v.data_ptr(): v.numel() for v in state.values()}  # the tied box head once
        size = (sum(distinct.values()) / 1e6, len(state))
        rows: Dict[str, Tuple[float, float]] = {
            "build whole model (build_model, CPU)": median_s(lambda: build_whole_model(cfg), repeat),
            "load converted .pth into it (resume_or_load)": median_s(lambda: load_observed(model, converted), repeat),
            "load MaskDINO-style .pkl into it (heuristics)": median_s(lambda: load_observed(model, raw), repeat),
            "build backbone alone": median_s(lambda: build_holder(cfg), repeat),
            "verify (whole), converted .pth": median_s(lambda: verify(converted, config=whole_yaml), repeat),
            "verify (backbone only), converted .pth": median_s(lambda: verify(converted, config=alone_yaml), repeat),
        }
    print(f"DI-MaskDINO-like Tiny: {size[0]:.1f} M parameters, {size[1]} state-dict keys; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {repeat}")
    print_rows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
