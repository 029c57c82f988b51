"""Benchmark: the gate on a Tiny DINO-like LazyConfig model (the suite's detrex-like project,
`tests/detrex_like.py` with `tests/detrex_like_configs/dino_convnext_tiny_384_4scale_12ep.py`:
ConvNeXt-Tiny with out_indices [1, 2, 3], a 6-layer decoder of width 256, 900 queries, tied
`class_embed`/`bbox_embed`).

Phases, each timed in this process `--repeat` times after one warm-up (imports and the page cache
warm), medians of wall and CPU time (all threads): loading the config (`LazyConfig.load` and an
override), instantiating `cfg.model` on CPU, loading the converted checkpoint as detrex's
train_net.py does (`DetectionCheckpointer(model).resume_or_load`), and the whole CKPT-less
`verify` (all of the above plus the checks).  Also: converting the model's own whole-model
`model_final.pth` (tied heads: many views of one storage) to the backbone alone.

    python benchmarks/verify_lazy_config.py [--repeat 5]
"""
from __future__ import annotations

import os
import sys
import tempfile
import warnings
from typing import Dict, List, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from conversion import convert  # noqa: E402
from conversion.testing.synthetic import synthetic_state_dict  # noqa: E402

from verify_whole_model import median_s, parse_repeat, print_rows  # noqa: E402  (this folder is the script's sys.path[0])

CONFIG = os.path.join(ROOT, "tests", "detrex_like_configs", "dino_convnext_tiny_384_4scale_12ep.py")


def main(argv: List[str]) -> int:
    repeat = parse_repeat(argv, __doc__)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        from conversion import lazy_config
        from conversion.d2_loading import load_observed
        from conversion.verify import verify
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(prefix="convnext-d2-bench-lazy-") as tmp:
        raw, converted, whole = (os.path.join(tmp, n) for n in ("tiny.pth", "tiny_d2.pth", "model_final.pth"))
        torch.save({"model": synthetic_state_dict("official", "convnext_tiny")}, raw)
        convert(raw, converted)
        override = [f"train.init_checkpoint={converted}"]
        cfg = lazy_config.load(CONFIG, override)
        model, why = lazy_config.build(cfg, CONFIG)
        assert why is None, why
        state = model.state_dict()
        distinct = {v.data_ptr(): v.numel() for v in state.values()}
        torch.save({"model": state, "iteration": 90000}, whole)
        report = verify(None, config=CONFIG, overrides=override)
        assert report.ok and report.loaded == 178 and len(report.fresh) == 6, report.problems
        rows: Dict[str, Tuple[float, float]] = {
            "load config (LazyConfig.load + override)": median_s(lambda: lazy_config.load(CONFIG, override), repeat),
            "instantiate cfg.model (CPU)": median_s(lambda: lazy_config.build(lazy_config.load(CONFIG, override), CONFIG), repeat),
            "load converted checkpoint (resume_or_load)": median_s(lambda: load_observed(model, converted), repeat),
            "verify --config X.py (whole, CKPT-less)": median_s(lambda: verify(None, config=CONFIG, overrides=override), repeat),
            "convert the tied model_final.pth (.pth)": median_s(lambda: convert(whole, os.path.join(tmp, "b.pth"), force=True), repeat),
            "convert the tied model_final.pth (.pkl)": median_s(lambda: convert(whole, os.path.join(tmp, "b.pkl"), force=True), repeat),
        }
    print(f"DINO-like Tiny: {sum(distinct.values()) / 1e6:.1f} M parameters, {len(state)} state-dict keys "
          f"({len(state) - len(distinct)} of them views of a shared storage); torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {repeat}")
    print_rows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
