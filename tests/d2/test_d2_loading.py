"""The loading harness (`conversion.d2_loading`), the one place that observes Detectron2's
`DetectionCheckpointer`: what it records, that it changes nothing around the load (loggers come
back as they were), and that the test API (`conversion.testing.loading`) is the same observation.
Runs against Detectron2 0.7 (full) and v0.6 (legacy) alike; skips in core."""
from __future__ import annotations

import logging
import pickle

import pytest
import torch

from conversion.architecture import RELEASED_VARIANTS, Architecture
from conversion.errors import describe_exception, plain_text
from conversion.testing import loading

from ..support import output_norm_names, require

ATTO = Architecture(*RELEASED_VARIANTS[1]["convnext_atto"])
ATTO_V2 = Architecture(*RELEASED_VARIANTS[2]["convnextv2_atto"], version=2, layer_scale=False)
XXLARGE = Architecture(*RELEASED_VARIANTS[1]["convnext_xxlarge"])
FRESH = output_norm_names()


# ---------------------------------------------------------------- pure parts (every environment)


@pytest.mark.parametrize(
    "arch, expected",
    [
        (ATTO, {"DEPTHS": [2, 2, 6, 2], "DIMS": [40, 80, 160, 320], "USE_GRN": False,
                "LAYER_SCALE_INIT_VALUE": 1e-6, "LN_EPS": 1e-6}),
        (ATTO_V2, {"DEPTHS": [2, 2, 6, 2], "DIMS": [40, 80, 160, 320], "USE_GRN": True,
                   "LAYER_SCALE_INIT_VALUE": 0.0, "LN_EPS": 1e-6}),
        (XXLARGE, {"DEPTHS": [3, 4, 30, 3], "DIMS": [384, 768, 1536, 3072], "USE_GRN": False,
                   "LAYER_SCALE_INIT_VALUE": 1e-6, "LN_EPS": 1e-5}),
    ],
)
def test_convnext_options_shape_the_backbone_like_the_weights(arch, expected):
    from conversion.d2_loading import convnext_options

    assert convnext_options(arch) == expected


def test_plain_text_drops_terminal_colours():
    assert plain_text("\x1b[35mbackbone.norm0.{bias, weight}\x1b[0m") == "backbone.norm0.{bias, weight}"


@pytest.mark.parametrize(
    "err, expected",
    [
        (ValueError("bad value\nmore detail"), "ValueError: bad value"),
        (RuntimeError(""), "RuntimeError"),
        (pickle.UnpicklingError("Weights only load failed.\n\x1b[1mWeightsUnpickler error: Unsupported global\x1b[0m"),
         "UnpicklingError: WeightsUnpickler error: Unsupported global"),
        (KeyError("x" * 300), "KeyError: '" + "x" * 239),
    ],
)
def test_a_foreign_exception_becomes_one_line_naming_its_cause(err, expected):
    assert describe_exception(err) == expected


# ---------------------------------------------------------------- the load itself (Detectron2)


def _logger_state():
    return [(lg.level, lg.propagate, list(lg.handlers)) for lg in map(logging.getLogger, ("fvcore", "detectron2"))]


def _write_official(path, arch):
    from conversion.synthetic import random_state_dict
    from conversion.target import to_target

    state = to_target(random_state_dict(arch)).state_dict
    torch.save({"model": state, "__author__": "test"}, path)
    return state


def test_a_clean_load_is_observed_and_the_loggers_come_back_as_they_were(tmp_path):
    require("detectron2")
    from conversion.d2_loading import backbone_for, load_observed

    path = tmp_path / "ok.pth"
    state = _write_official(path, ATTO)
    before = _logger_state()

    seen = load_observed(backbone_for(ATTO), str(path))

    assert _logger_state() == before
    assert seen.error is None and seen.heuristics is False
    assert sorted(seen.missing) == sorted(FRESH) and seen.unexpected == [] and seen.incorrect_shapes == []
    assert seen.checkpoint_shapes == {k: tuple(v.shape) for k, v in state.items()}
    assert set(seen.checkpoint_dtypes.values()) == {"float32"}
    assert any("not found in the checkpoint" in w for w in seen.warnings())


def test_detectron2s_own_failure_is_recorded_by_the_harness_and_raised_by_the_test_api(tmp_path):
    require("detectron2")
    from conversion.d2_loading import backbone_for, load_observed

    path = tmp_path / "official.pkl"  # a torch archive under a .pkl name: Detectron2 unpickles it plainly
    torch.save({"model": {"x": torch.zeros(1)}}, path)
    before = _logger_state()

    seen = load_observed(backbone_for(ATTO), str(path))

    assert _logger_state() == before
    assert isinstance(seen.error, pickle.UnpicklingError) and seen.incompatible is None
    assert (seen.missing, seen.unexpected, seen.incorrect_shapes) == ([], [], [])
    with pytest.raises(pickle.UnpicklingError):
        loading.load_with_detectron2(backbone_for(ATTO), str(path))
    assert _logger_state() == before


def test_the_test_api_returns_the_harness_observation(tmp_path):
    require("detectron2")
    from conversion.d2_loading import LoadObservation

    path = tmp_path / "ok.pth"
    _write_official(path, ATTO)

    result = loading.load_with_detectron2(loading.build_d2_model(ATTO, out_features=["res5"]), str(path))

    assert isinstance(result, LoadObservation) and loading.LoadResult is LoadObservation
    # Only res5 asked for: the backbone has norm3 alone, the one fresh pair.
    assert sorted(result.missing) == ["backbone.norm3.bias", "backbone.norm3.weight"]
    assert result.unexpected == [] and result.incorrect_shapes == []


@pytest.mark.parametrize("values, dtype, finite", [
    ([], torch.float32, True),
    ([1.0, -2.0], torch.float32, True),
    ([60000.0] * 4, torch.float16, True),  # the sum overflows float16; every element is finite
    ([3e38, 3e38], torch.float32, True),  # the sum overflows float32
    ([1.0, float("nan")], torch.float32, False),
    ([float("inf"), -float("inf")], torch.float32, False),  # their sum is NaN
    ([1.0, float("inf")], torch.bfloat16, False),
], ids=["empty", "finite", "fp16-sum-overflows", "fp32-sum-overflows", "nan", "inf-and-minus-inf", "bf16-inf"])
def test_non_finite_names_exactly_the_tensors_holding_nan_or_inf(values, dtype, finite):
    from conversion.d2_loading import non_finite

    model = torch.nn.Module()
    model.weight = torch.nn.Parameter(torch.tensor(values, dtype=dtype))
    assert non_finite(model, ["weight", "not-in-the-model"]) == ([] if finite else ["weight"])
