"""One named regression test per kind of wrong answer found against the real loader (A-G): each
builds the file, loads it with the real `DetectionCheckpointer` (the observation), and pins what
`inspect`, `verify` and `repair` now say, through their public answers only (problems, ok, repaired)."""
from __future__ import annotations

import dataclasses

import pytest

from conversion.d2_prediction import SAFETENSORS_PATHS, installed_stack
from conversion.inspection import inspect_checkpoint
from conversion.pipeline import repair

from ..support import build_d2_model, require
from .differential import ARCH, Variant, assert_prediction_matches, observe, write

pytestmark = [pytest.mark.filterwarnings("ignore")]
TRUNK = 61  # the test backbone's weights an ImageNet file gives (its 8 output norms stay fresh)


@pytest.fixture(autouse=True)
def _detectron2():
    require("detectron2")


def _answers(v: Variant, tmp_path):
    """(observation, inspect report, verify report, repair report) for the variant's file."""
    from conversion.verify import verify

    path, file_weights = write(v, str(tmp_path))
    seen = observe(build_d2_model(ARCH), path, file_weights)
    return seen, inspect_checkpoint(path), verify(path), repair(path.split("?", 1)[0], str(tmp_path / "fixed.pth"), force=True)


def _loads_nothing_said(report) -> bool:
    return any("loads none" in p for p in report.problems)


@pytest.mark.parametrize("prefix", ["_orig_mod.backbone.", "module.module.backbone.", "module._orig_mod.backbone."])
def test_kind_a_compiled_or_doubly_wrapped_names_load_nothing_and_are_repaired(tmp_path, prefix):
    seen, inspected, verified, repaired = _answers(Variant(prefix=prefix), tmp_path)
    assert seen.error is None and not seen.loaded  # fvcore strips `module.` once and never `_orig_mod.`
    assert _loads_nothing_said(inspected) and inspected.detectron2["loaded"] == {}
    assert not verified.ok and verified.loaded == 0
    assert repaired.repaired and repaired.not_repaired == []


def test_kind_b_pickle_dump_as_pth_raises_in_torch_load_and_is_repaired(tmp_path):
    seen, inspected, verified, repaired = _answers(Variant(writer=("pickle.dump", ".pth")), tmp_path)
    assert seen.error is not None
    assert inspected.detectron2["raises"] and any("pickle.dump" in p for p in inspected.problems)
    assert not verified.ok and verified.error
    assert repaired.repaired


def test_kind_c_a_safetensors_path_loads_where_torch_reads_it(tmp_path):
    require("safetensors")
    seen, inspected, verified, repaired = _answers(Variant(writer=("safetensors", ".safetensors"), container="bare"), tmp_path)
    if installed_stack().torch >= SAFETENSORS_PATHS:
        assert seen.error is None and len(seen.loaded) == TRUNK
        assert inspected.problems == [] and verified.ok and not repaired.repaired
    else:
        assert seen.error is not None and inspected.problems and not verified.ok and repaired.repaired


def test_kind_d_matching_heuristics_in_a_pth_dict_is_honoured(tmp_path):
    seen, inspected, verified, repaired = _answers(Variant(prefix="", heuristics_in_file=True), tmp_path)
    assert seen.error is None and len(seen.loaded) == TRUNK
    assert not _loads_nothing_said(inspected) and len(inspected.detectron2["loaded"]) == TRUNK
    assert inspected.detectron2["heuristics"] == "file"
    assert verified.ok and verified.loaded == TRUNK
    assert repaired.repaired  # into exact names: no heuristics needed


@pytest.mark.parametrize("prefix", ["model.", "backbone.bottom_up.", "module."])
def test_kind_e_prefixed_names_under_heuristics_load_nothing(tmp_path, prefix):
    """Heuristics match only a dotted suffix of a model key, and run before `module.` is stripped."""
    v = Variant(prefix=prefix, heuristics_in_file=True, arrays=True, container="model+author", writer=("pickle.dump", ".pkl"))
    seen, inspected, verified, repaired = _answers(v, tmp_path)
    assert seen.error is None and not seen.loaded
    assert _loads_nothing_said(inspected) and not any("matches them only through" in p for p in inspected.problems)
    assert not verified.ok and verified.loaded == 0
    assert repaired.repaired


def test_kind_f_module_prefixed_nan_is_loaded_and_fails_verify(tmp_path):
    seen, inspected, verified, repaired = _answers(Variant(prefix="module.backbone.", non_finite="nan"), tmp_path)
    assert seen.error is None and len(seen.loaded) == TRUNK  # `module.` stripped: everything loads, the NaN too
    assert len(inspected.detectron2["loaded"]) == TRUNK and inspected.detectron2["module_stripped"]
    assert not verified.ok and verified.loaded == TRUNK
    assert verified.non_finite == ["backbone.stages.0.0.pwconv1.weight"]
    assert not any("matched nothing" in p or "loads none" in p for p in verified.problems)


def test_kind_f_module_prefixed_heuristics_file_is_not_called_empty(tmp_path):
    """The same miscount gave `matching_heuristics matched nothing` for files that load cleanly."""
    seen, _, verified, _ = _answers(Variant(prefix="module.backbone.", heuristics_in_file=True), tmp_path)
    assert seen.error is None and len(seen.loaded) == TRUNK
    assert verified.ok and verified.loaded == TRUNK


def test_kind_g_pooled_norm_handed_to_a_missing_block_norm_is_a_problem(tmp_path):
    v = Variant(prefix="", classifier=True, drop="stages.3.0.norm", arrays=True, container="model+author",
                heuristics_in_file=True, writer=("pickle.dump", ".pkl"))
    seen, inspected, verified, repaired = _answers(v, tmp_path)
    assert seen.loaded["backbone.stages.3.0.norm.weight"] == ["norm.weight"]
    assert inspected.detectron2["loaded"]["backbone.stages.3.0.norm.weight"] == "norm.weight"
    assert any("pooled classifier norm" in p for p in inspected.problems)
    assert not verified.ok and verified.misplaced == {
        "backbone.stages.3.0.norm.bias": "norm.bias", "backbone.stages.3.0.norm.weight": "norm.weight"}
    assert repaired.repaired and sorted(w.split(":")[0] for w in repaired.not_repaired) == [
        "backbone.stages.3.0.norm.bias", "backbone.stages.3.0.norm.weight"]


def test_the_prediction_names_where_another_stack_answers_differently(tmp_path):
    """A URL query is read by Detectron2 0.7 only: v0.6 looks for a file named with it."""
    path, _ = write(dataclasses.replace(Variant(), heuristics_in_url=True), str(tmp_path))
    other = inspect_checkpoint(path).detectron2["other_stacks"]
    if installed_stack().detectron2 >= (0, 7):
        assert "not found" in other["torch 1.9, detectron2 0.6"]
    else:
        assert inspect_checkpoint(path).detectron2["raises"]


@pytest.mark.parametrize("container", ["model_state", "model"])
def test_a_pycls_pyth_is_read_for_its_model_state_by_heuristics(tmp_path, container):
    """`.pyth` is pycls's: `model_state` taken, matched by heuristics; without it Detectron2 asserts."""
    import torch

    from .differential import SOURCE

    weights = {k: v for k, v in SOURCE.items() if not k.startswith(("head.", "norm."))}
    path = str(tmp_path / "x.pyth")
    torch.save({container: weights}, path)
    seen = observe(build_d2_model(ARCH), path, weights)
    prediction = inspect_checkpoint(path).detectron2
    assert_prediction_matches(prediction, seen)
    assert (seen.error is None) == (container == "model_state") and prediction["heuristics"] in ("pycls", None)
