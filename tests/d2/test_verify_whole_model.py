"""`verify` answers what training would do: it loads into the whole model train_net.py builds when the
config's meta-architecture is registered, and only what would change training is a problem.

The model is a DI-MaskDINO-like detector of our own writing (`tests/dimaskdino_like.py`): the fork-style
`D2ConvNeXt` backbone plus a MaskDINO-shaped decoder whose final `decoder.norm` is a `*.norm.weight`
of width HIDDEN.  Everything goes through Detectron2's real `DetectionCheckpointer`; the expected
names are written out here.  Exit statuses and fields are read through `--json`; the human report
has its one snapshot test in tests/cli/test_human_output.py.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import torch

from conversion import convert
from conversion.architecture import Architecture
from conversion.cli import main
from conversion.synthetic import random_state_dict

from ..support import CLASSIFIER_NAMES, output_norm_names, require

require("detectron2")
from conversion.d2_loading import build_whole_model, config_for, load_observed  # noqa: E402
from conversion.verify import verify  # noqa: E402

IMPORTS = ["tests.dimaskdino_like"]
HIDDEN = 32  # the decoder's width (GroupNorm(32, .) needs a multiple of 32)
# The backbone's last width decides the trap: equal to HIDDEN, the pooled norm.weight fits decoder.norm.
APART = Architecture((1, 2, 1, 1), (8, 16, 32, 48), num_classes=5, classifier_norm=True)
EQUAL = Architecture((1, 2, 1, 1), (8, 16, 32, HIDDEN), num_classes=5, classifier_norm=True)
CLASSIFIER = sorted(CLASSIFIER_NAMES)
FRESH = sorted(output_norm_names())
DECODER_NORM = ["sem_seg_head.predictor.decoder.norm.bias", "sem_seg_head.predictor.decoder.norm.weight"]
REFINE_NORM = ["sem_seg_head.predictor.refine_decoder.norm.bias", "sem_seg_head.predictor.refine_decoder.norm.weight"]


def _yaml(tmp_path: Path, arch: Architecture, meta: str = "DIMaskDINOLike", decoder_norms: int = 1) -> str:
    path = tmp_path / f"{meta}-{arch.dims[-1]}-{decoder_norms}.yaml"
    path.write_text(
        "MODEL:\n"
        f"  META_ARCHITECTURE: \"{meta}\"\n"
        "  BACKBONE: {NAME: \"D2ConvNeXt\", FREEZE_AT: 0}\n"
        "  WEIGHTS: \"\"\n"
        "  CONVNEXT:\n"
        f"    DEPTHS: {list(arch.depths)}\n"
        f"    DIMS: {list(arch.dims)}\n"
        "    OUT_FEATURES: [\"res2\", \"res3\", \"res4\", \"res5\"]\n"
        "  DIMASKDINO_LIKE:\n"
        f"    HIDDEN_DIM: {HIDDEN}\n"
        "    ENC_LAYERS: 1\n    DEC_LAYERS: 2\n    ENC_FFN: 64\n    DEC_FFN: 64\n    NUM_QUERIES: 10\n    NUM_CLASSES: 3\n"
        f"    DECODER_NORMS: {decoder_norms}\n"
        "DATASETS:\n"
        "  TRAIN: [\"medical_instruments_train\"]  # not registered: NeedsItsDataset fails on it\n"
    )
    return str(path)


def _converted(tmp_path: Path, official: Dict[str, torch.Tensor]) -> str:
    torch.save({"model": official}, tmp_path / "src.pth")
    convert(str(tmp_path / "src.pth"), str(tmp_path / "converted.pth"))
    return str(tmp_path / "converted.pth")


def _fork_converter_pth(tmp_path: Path, official: Dict[str, torch.Tensor]) -> str:
    """The fork's own converter: every name but `head.*` prefixed, so the pooled `backbone.norm.*` stays."""
    path = tmp_path / "fork.pth"
    torch.save({"model": {"backbone." + k: v for k, v in official.items() if not k.startswith("head.")}}, path)
    return str(path)


def _maskdino_converter_pkl(tmp_path: Path, official: Dict[str, torch.Tensor]) -> str:
    """The Mask2Former/MaskDINO converters: raw official names, numpy arrays, `matching_heuristics: True`."""
    path = tmp_path / "maskdino.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in official.items()}, "__author__": "third_party",
                     "matching_heuristics": True}, f)
    return str(path)


FILES = {"converted": _converted, "fork-converter-pth": _fork_converter_pth, "maskdino-converter-pkl": _maskdino_converter_pkl}


def _verify_json(capsys: pytest.CaptureFixture, *args: str) -> Tuple[int, dict]:
    status = main(["verify", *args, "--json"])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err, captured.err
    return status, json.loads(captured.out)


def _backbone_keys(official: Dict[str, torch.Tensor]) -> List[str]:
    return sorted("backbone." + k for k in official if k not in CLASSIFIER)


# ---------------------------------------------------------------- the table, with the whole model


# file -> (unused tensors, heuristic near-misses outside the backbone); exit 0 for all three.
TABLE = {
    "converted": ([], {}),
    "fork-converter-pth": (["backbone.norm.bias", "backbone.norm.weight"], {}),
    "maskdino-converter-pkl": (CLASSIFIER, {DECODER_NORM[0]: "norm.bias", DECODER_NORM[1]: "norm.weight"}),
}


@pytest.mark.parametrize("kind", list(TABLE))
def test_the_three_files_load_every_backbone_weight_into_the_whole_model_and_exit_0(tmp_path, capsys, kind):
    """Training starts from every pretrained weight for each file: exit 0; what it ignores is a warning."""
    official = random_state_dict(APART, seed=3)
    path = FILES[kind](tmp_path, official)
    status, report = _verify_json(capsys, path, "--config", _yaml(tmp_path, APART), *sum((["--import", m] for m in IMPORTS), []))
    unused, near_misses = TABLE[kind]
    assert status == 0 and report["ok"] and report["problems"] == [], report["problems"]
    assert report["whole_model"] is True and report["meta_architecture"] == "DIMaskDINOLike"
    assert report["loaded"] == len(_backbone_keys(official)) and report["missing"] == [] and report["fresh"] == sorted(FRESH)
    assert report["unexpected"] == unused and report["heuristic_shape_misses"] == near_misses
    assert report["loaded_outside"] == 0, "no ImageNet tensor lands in the decoder"
    assert len(report["warnings"]) == bool(unused) + len({c for c in near_misses.values()}), report["warnings"]
    if unused:
        assert report["warnings"][0].startswith(f"{len(unused)} checkpoint tensors unused by the model: {', '.join(unused)}")
        assert "convnext-d2 repair" in report["warnings"][0], "a warning says how to get rid of it"


@pytest.mark.parametrize("kind", list(TABLE))
def test_the_three_files_really_give_the_whole_model_every_pretrained_backbone_weight(tmp_path, kind):
    """The fact behind the exit-0 verdicts, through the real DetectionCheckpointer: after loading, every
    backbone tensor equals the original's (the model is first filled with a sentinel, so a load that
    does nothing fails), and no decoder tensor changed."""
    official = random_state_dict(APART, seed=3)
    path = FILES[kind](tmp_path, official)
    model = _whole_model(tmp_path, APART)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.fill_(12345.0)
    seen = load_observed(model, path)
    assert seen.error is None
    state = model.state_dict()
    differ = [k for k in official if k not in CLASSIFIER and not torch.equal(state["backbone." + k], official[k])]
    assert differ == [], differ
    touched = [k for k, v in state.items() if not k.startswith("backbone.") and v.is_floating_point() and (v != 12345.0).any()]
    assert touched == [], f"decoder tensors changed by the load: {touched}"


@pytest.mark.parametrize("kind,status", [("converted", 0), ("fork-converter-pth", 1), ("maskdino-converter-pkl", 1)])
def test_strict_turns_the_warnings_into_exit_1(tmp_path, capsys, kind, status):
    official = random_state_dict(APART, seed=3)
    path = FILES[kind](tmp_path, official)
    got, report = _verify_json(capsys, path, "--config", _yaml(tmp_path, APART), "--import", IMPORTS[0], "--strict")
    assert got == status and report["strict"] is True and report["ok"] is (status == 0), report
    assert report["problems"] == [], "--strict changes the verdict, not what was found"


# ---------------------------------------------------------------- what only the whole model shows


def _whole_model(tmp_path: Path, arch: Architecture, decoder_norms: int = 1) -> torch.nn.Module:
    __import__(IMPORTS[0])
    return build_whole_model(config_for(_yaml(tmp_path, arch, decoder_norms=decoder_norms)))


def test_detectron2_silently_replaces_the_decoder_norm_with_the_pooled_norm(tmp_path):
    """The fact, through the real DetectionCheckpointer: with the backbone's last width equal to the
    decoder's, `decoder.norm` takes the classifier's pooled `norm.*`, and nothing is raised."""
    official = random_state_dict(EQUAL, seed=5)
    path = _maskdino_converter_pkl(tmp_path, official)
    model = _whole_model(tmp_path, EQUAL)
    seen = load_observed(model, path)
    assert seen.error is None and seen.heuristics
    state = model.state_dict()
    assert torch.equal(state[DECODER_NORM[1]], official["norm.weight"]), "decoder.norm.weight now holds ImageNet's norm.weight"
    assert torch.equal(state[DECODER_NORM[0]], official["norm.bias"])
    assert "norm.weight" not in seen.incompatible.unexpected_keys, "the pooled norm was used: nothing says so"


def test_verify_fails_the_silent_replacement_naming_the_module(tmp_path, capsys):
    path = _maskdino_converter_pkl(tmp_path, random_state_dict(EQUAL, seed=5))
    status, report = _verify_json(capsys, path, "--config", _yaml(tmp_path, EQUAL), "--import", IMPORTS[0])
    assert status == 1 and report["whole_model"] is True
    assert report["outside_backbone"] == {DECODER_NORM[0]: "norm.bias", DECODER_NORM[1]: "norm.weight"}
    assert report["problems"][0] == (
        "matching_heuristics loads 2 checkpoint tensors into modules outside the backbone, silently replacing their "
        f"initialisation: 'norm.bias' into {DECODER_NORM[0]}, 'norm.weight' into {DECODER_NORM[1]}"
    ), report["problems"]
    assert report["unexpected"] == ["head.bias", "head.weight"], "only the linear head is left over"
    assert report["loaded_outside"] == 2


def test_detectron2_raises_when_two_decoder_norms_fit_the_pooled_norm(tmp_path):
    """The fact: two `*.norm.weight` of the backbone's last width claim `norm.weight`, and Detectron2 raises."""
    path = _maskdino_converter_pkl(tmp_path, random_state_dict(EQUAL, seed=5))
    seen = load_observed(_whole_model(tmp_path, EQUAL, decoder_norms=2), path)
    assert isinstance(seen.error, ValueError) and "Cannot match one checkpoint key to multiple keys" in str(seen.error)


def test_verify_fails_the_raising_case_with_the_ambiguity_first(tmp_path, capsys):
    path = _maskdino_converter_pkl(tmp_path, random_state_dict(EQUAL, seed=5))
    status, report = _verify_json(capsys, path, "--config", _yaml(tmp_path, EQUAL, decoder_norms=2), "--import", IMPORTS[0])
    assert status == 1
    assert report["ambiguous"] == {"norm.bias": [DECODER_NORM[0], REFINE_NORM[0]], "norm.weight": [DECODER_NORM[1], REFINE_NORM[1]]}
    assert report["problems"][0].startswith("matching_heuristics: checkpoint key 'norm.bias' matches 2 model keys"), report["problems"]
    assert any(p == "Detectron2 cannot load it: ValueError: Cannot match one checkpoint key to multiple keys in the model."
               for p in report["problems"]), report["problems"]


def test_a_converted_file_is_exact_whatever_the_decoder_widths(tmp_path, capsys):
    """Exact names never reach a decoder module: the converted file is clean where the raw one is not."""
    official = random_state_dict(EQUAL, seed=5)
    status, report = _verify_json(capsys, _converted(tmp_path, official), "--config", _yaml(tmp_path, EQUAL, decoder_norms=2),
                                  "--import", IMPORTS[0], "--strict")
    assert status == 0 and report["warnings"] == [] and report["loaded"] == len(_backbone_keys(official))


def test_source_comparison_runs_on_the_whole_models_backbone(tmp_path, capsys):
    official = random_state_dict(APART, seed=3)
    path = _converted(tmp_path, official)
    status, report = _verify_json(capsys, path, "--config", _yaml(tmp_path, APART), "--import", IMPORTS[0],
                                  "--source", str(tmp_path / "src.pth"))
    assert status == 0 and report["whole_model"] is True and report["feature_difference"] == 0.0


# ---------------------------------------------------------------- the backbone alone, and saying so


def test_unregistered_meta_architecture_loads_the_backbone_and_says_what_was_not_checked(tmp_path, capsys):
    """On a CPU-only runner the meta-architecture may not import: the silent replacement cannot be seen;
    the report says so (a warning for a heuristics file) instead of passing quietly."""
    path = _maskdino_converter_pkl(tmp_path, random_state_dict(EQUAL, seed=5))
    config = _yaml(tmp_path, EQUAL, meta="MaskDINO")
    status, report = _verify_json(capsys, path, "--config", config, "--import", "tests.d2_styles")
    assert status == 0 and report["whole_model"] is False and report["outside_backbone"] == {}
    reason = "MODEL.META_ARCHITECTURE 'MaskDINO' is not registered (--import the module that registers it)"
    assert report["whole_model_reason"] == reason
    assert report["warnings"][-1] == (
        f"whole model not built: {reason}; checkpoint keys that could match outside the backbone were not checked "
        "(the file uses matching_heuristics)"
    )
    strict, _ = _verify_json(capsys, path, "--config", config, "--import", "tests.d2_styles", "--strict")
    assert strict == 1


def test_meta_architecture_failing_to_build_falls_back_to_the_backbone_with_the_cause(tmp_path, capsys):
    """A project whose model reads an unregistered dataset in __init__: no traceback, the cause in the report."""
    path = _converted(tmp_path, random_state_dict(APART, seed=3))
    status, report = _verify_json(capsys, path, "--config", _yaml(tmp_path, APART, meta="NeedsItsDataset"), "--import", IMPORTS[0])
    assert status == 0 and report["whole_model"] is False
    assert report["whole_model_reason"].startswith("building NeedsItsDataset failed (KeyError: ")
    assert "medical_instruments_train" in report["whole_model_reason"]
    assert report["loaded"] == len(_backbone_keys(random_state_dict(APART, seed=3)))


def test_meta_architecture_failing_to_build_in_a_real_process_prints_no_traceback(tmp_path):
    from ..support.cli import ROOT, run_cli

    path = _converted(tmp_path, random_state_dict(APART, seed=3))
    done = run_cli("verify", path, "--config", _yaml(tmp_path, APART, meta="NeedsItsDataset"), "--import", IMPORTS[0], "--json",
                   cwd=ROOT)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["whole_model"] is False and report["whole_model_reason"].startswith("building NeedsItsDataset failed (KeyError:")


def test_a_whole_model_final_pth_with_tied_box_heads_converts_with_its_trained_backbone_bit_equal(tmp_path):
    """The user's own trained DI-MaskDINO-like model, saved as Detectron2's trainer saves it: its box
    head is one module under every `bbox_embed.{i}` and `decoder.bbox_embed.{i}` (one storage, many
    names).  The backbone converts with its trained output norms; the rest is listed as left out."""
    from .. import dimaskdino_like  # noqa: F401  (registers the meta-architecture)

    model = build_whole_model(config_for(_yaml(tmp_path, APART)))
    torch.manual_seed(0)
    for p in model.parameters():
        torch.nn.init.normal_(p)
    state = model.state_dict()
    head = "sem_seg_head.predictor."
    assert state[head + "_bbox_embed.2.weight"].data_ptr() == state[head + "decoder.bbox_embed.1.2.weight"].data_ptr()
    torch.save({"model": state, "iteration": 368749}, tmp_path / "model_final.pth")
    report = convert(str(tmp_path / "model_final.pth"), str(tmp_path / "backbone.pkl"))
    with open(tmp_path / "backbone.pkl", "rb") as f:
        written = pickle.load(f)["model"]
    assert sorted(written) == sorted(k for k in state if k.startswith("backbone."))
    for name, value in written.items():
        assert torch.equal(torch.from_numpy(value), state[name]), name
    assert report.detector_parts["sem_seg_head."] == sum(1 for k in state if k.startswith("sem_seg_head."))
