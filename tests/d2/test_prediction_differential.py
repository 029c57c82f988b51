"""The real loader is the oracle: for checkpoint variants over every axis (writers, extensions,
containers, wrapper prefixes incl. `_orig_mod.` and doubled `module.`, names of every layout, dropped
keys, wrong shapes, NaN/Inf, fp16/bf16, numpy arrays, extra keys, `__author__`, `matching_heuristics`
in the file and in the URL, the pooled classifier norm), `inspect`'s prediction equals what the real
`DetectionCheckpointer` did to the model's values, `verify`'s verdict follows from that observation,
and `repair`'s output loads clean with the source's values.  Runs wherever Detectron2 is installed
(0.7.2 with torch 2.14 in `full`, v0.6 with torch 1.9 in `legacy`, where the answers differ); the
`ci` hypothesis profile bounds it, `nightly` goes deeper.
"""
from __future__ import annotations

import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conversion.d2_prediction import FRESH_OUTPUT_NORM, POOLED_NORM, backbone_keys, predict_everywhere
from conversion.errors import ConversionError
from conversion.inspection import inspect_checkpoint
from conversion.pipeline import repair
from conversion.read import open_source

from ..support import FULL_ENVIRONMENT, build_d2_model, require
from .differential import (
    ARCH, CONTAINERS, DROPS, LAYOUTS, PREFIXES, WRITERS, Variant, assert_prediction_matches, observe, valid, write,
)

pytestmark = pytest.mark.filterwarnings("ignore")


def _variants() -> st.SearchStrategy[Variant]:
    writers = [w for w in WRITERS if w[0] != "safetensors" or _has_safetensors()]
    return st.builds(
        Variant,
        layout=st.sampled_from(LAYOUTS),
        prefix=st.sampled_from(PREFIXES),
        classifier=st.booleans(),
        drop=st.sampled_from(DROPS),
        wrong_shape=st.booleans(),
        non_finite=st.sampled_from([None, "nan", "inf"]),
        dtype=st.sampled_from(["float32", "float16", "bfloat16"]),
        arrays=st.booleans(),
        extra=st.booleans(),
        container=st.sampled_from(CONTAINERS),
        heuristics_in_file=st.booleans(),
        heuristics_in_url=st.booleans(),
        writer=st.sampled_from(writers),
    ).filter(valid)


def _has_safetensors() -> bool:
    """Installed, or the full environment (where a missing safetensors must fail, not shrink the axes)."""
    try:
        import safetensors.torch  # noqa: F401
    except ImportError:
        return FULL_ENVIRONMENT
    return True


def predicted(path: str):
    """inspect's prediction; where inspect refuses the file (not a ConvNeXt it recognises), the same
    model run on the file as read, for the backbone the variants are made from."""
    try:
        return inspect_checkpoint(path).detectron2
    except ConversionError:
        file = path.split("?", 1)[0]
        try:
            source = open_source(file)
        except ConversionError:
            return None
        return predict_everywhere(path, source.format, source.objects, backbone_keys(ARCH, "backbone."),
                                  modules=source.modules).to_dict()


def verdict_from(seen) -> bool:
    """verify's rule, applied to what really happened: OK only when no error, every backbone weight but
    the fresh output norms took a value, none of them the pooled classifier norm, all finite."""
    if seen.error is not None:
        return False
    wanted = [k for k in backbone_keys(ARCH, "backbone.") if not FRESH_OUTPUT_NORM.match(k)]
    if any(k not in seen.loaded for k in wanted) or seen.shape_skipped:
        return False
    if any(all(POOLED_NORM.match(c) for c in names) and names and not POOLED_NORM.match(m) for m, names in seen.loaded.items()):
        return False
    return all(bool(torch.isfinite(seen.values[k]).all()) for k in seen.loaded)


def check_variant(v: Variant, directory: str) -> None:
    from conversion.verify import verify

    path, file_weights = write(v, directory)
    prediction = predicted(path)
    seen = observe(build_d2_model(ARCH), path, file_weights)
    if prediction is not None:
        assert_prediction_matches(prediction, seen)
    try:
        report = verify(path)
    except ConversionError:  # exit 2: only for a file inspect cannot recognise either
        assert not _recognised(path), path
    else:
        assert report.ok == verdict_from(seen), (report.problems, report.warnings)
        assert report.ok is False or report.loaded > 0
        if seen.error is None:
            assert report.loaded == sum(1 for k in seen.loaded if k.startswith("backbone."))
    check_repair(path, directory, file_weights)


def _recognised(path: str) -> bool:
    try:
        inspect_checkpoint(path)
    except ConversionError:
        return False
    return True


def check_repair(path: str, directory: str, file_weights) -> None:
    """Where repair writes a file, Detectron2 loads it clean, each weight the source's value."""
    fixed = f"{directory}/fixed.pth"
    try:
        report = repair(path.split("?", 1)[0], fixed, force=True)
    except ConversionError as err:  # says why, exit 2
        assert str(err)
        return
    if not report.repaired:
        return
    model = build_d2_model(ARCH)
    seen = observe(model, fixed, {"backbone." + k: v for k, v in weights_in_canonical(file_weights).items()})
    assert seen.error is None and seen.unexpected == [] and seen.shape_skipped == []
    not_given = {re.match(r"^(\S+):", why).group(1) for why in report.not_repaired}
    wanted = {k for k in backbone_keys(ARCH, "backbone.") if not FRESH_OUTPUT_NORM.match(k)} - not_given
    assert wanted <= set(seen.loaded), sorted(wanted - set(seen.loaded))
    assert all(seen.loaded[k] == [k] for k in wanted), {k: seen.loaded[k] for k in wanted if seen.loaded[k] != [k]}


def weights_in_canonical(file_weights):
    from conversion.containers import strip_wrapper_prefixes
    from conversion.layouts import to_canonical

    return to_canonical(strip_wrapper_prefixes(file_weights), lenient=True).state_dict


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow], deadline=None)
@given(v=_variants())
def test_inspect_verify_and_repair_agree_with_the_real_detectron2_load(tmp_path_factory, v):
    require("detectron2")
    check_variant(v, str(tmp_path_factory.mktemp("variant")))
