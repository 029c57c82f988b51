"""`verify`: passes on a correct file, fails (exit 1) with the right reason on each broken kind,
for each style of target backbone; exit 2 for unusable input.  Verdicts are read through `--json`
(or the Python API); the human report has one snapshot test (tests/cli/test_human_output.py).  The whole-model cases
(a DI-MaskDINO-like detector) are in test_verify_whole_model.py."""
from __future__ import annotations

import json
import pickle

import pytest
import torch

from conversion import convert
from conversion.cli import main
from conversion.synthetic import random_state_dict

from ..support import CLASSIFIER_NAMES, detectron2_reads_path_query, output_norm_names, require
from .verify_cases import ARCH, OFFICIAL, STYLES
from .verify_cases import broken_source as _broken
from .verify_cases import project_yaml as _yaml

require("detectron2")
from conversion.verify import verify  # noqa: E402


@pytest.fixture
def converted(tmp_path):
    torch.save({"model": OFFICIAL}, tmp_path / "src.pth")
    report = convert(str(tmp_path / "src.pth"), str(tmp_path / "ok.pth"))
    return str(tmp_path / "ok.pth"), str(tmp_path / "src.pth"), report


def test_verify_passes_a_converted_file_and_agrees_with_the_converter_on_fresh_keys(converted):
    path, src, report = converted
    result = verify(path, source=src)
    assert result.ok, result.problems
    assert result.fresh == sorted(report.fresh) == sorted(output_norm_names())
    assert result.missing == [] and result.unexpected == []
    # ARCH (depths 1, 2, 1, 1): the stem and 3 downsamples hold 4 tensors each, each of 5 blocks 9
    assert result.loaded == report.kept == 4 * 4 + 9 * 5 and result.feature_difference == 0.0


@pytest.mark.parametrize(
    "style,out,fresh",
    [
        ("D2ConvNeXt", ("res2", "res3", "res4", "res5"), [0, 1, 2, 3]),
        ("D2ConvNeXt", ("res3", "res5"), [1, 3]),
        ("OneFormerStyleConvNeXt", ("res3", "res5"), [0, 1, 2, 3]),
        ("NoNormConvNeXt", ("res2", "res3", "res4", "res5"), []),
    ],
    ids=["fork-all-outputs", "fork-two-outputs", "oneformer-style", "no-output-norms"],
)
def test_verify_each_target_style_expects_exactly_its_own_fresh_norms(tmp_path, converted, style, out, fresh):
    path, src, _ = converted
    result = verify(path, config=_yaml(tmp_path, style, out=out), imports=[STYLES], source=src)
    assert result.ok, result.problems
    # Built whole (GeneralizedRCNN, the default) where its heads fit these outputs: its FrozenBatchNorm2d
    # fills its own running statistics, which is not loading anything from the file.
    assert result.loaded_outside == 0 and (result.whole_model or "res4" not in out), result.whole_model_reason
    assert result.fresh == sorted(f"backbone.norm{i}.{p}" for i in fresh for p in ("weight", "bias"))


BROKEN_KINDS = [
    ("missing-prefix", "backbone weights missing"),
    ("timm-names", "backbone weights missing"),
    ("wrong-variant-for-config", "skipped for a shape mismatch"),
    ("v2-file-for-v1-config", "backbone weights missing (they would train from random init): backbone.stages.0.0.gamma"),
    ("nan-in-a-weight", "2 loaded weights hold NaN or Inf: backbone.downsample_layers.0.0.bias, backbone.stages.1.0.pwconv1.weight"),
]


def _verify_json(capsys, *args):
    status = main(["verify", *map(str, args), "--json"])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err, captured.err
    return status, json.loads(captured.out)


@pytest.mark.parametrize("kind,reason", BROKEN_KINDS, ids=[k for k, _ in BROKEN_KINDS])
def test_verify_fails_each_broken_kind_with_its_reason(tmp_path, capsys, kind, reason):
    path, config_arch = _broken(tmp_path, kind)
    args = [path]
    if config_arch is not None:
        args += ["--config", _yaml(tmp_path, "D2ConvNeXt", arch=config_arch), "--import", STYLES]
    status, report = _verify_json(capsys, *args)
    assert status == 1 and not report["ok"], report
    assert reason in report["problems"][0], report["problems"]


def test_verify_raw_official_dict_under_heuristics_loads_every_backbone_weight_with_warnings(tmp_path, capsys):
    """The Mask2Former/MaskDINO converters' output: every backbone weight found by the heuristics; the
    classifier is left over (a warning, exit 0), and each backbone key took its own official name."""
    with open(tmp_path / "x.pkl", "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in OFFICIAL.items()}, "__author__": "third_party", "matching_heuristics": True}, f)
    status, report = _verify_json(capsys, tmp_path / "x.pkl", "--config", _yaml(tmp_path, "D2ConvNeXt", meta="MaskDINO"), "--import", STYLES)
    assert status == 0 and report["heuristics"] and report["problems"] == [], report["problems"]
    assert report["unexpected"] == ["head.bias", "head.weight", "norm.bias", "norm.weight"]
    backbone = sorted(k for k in OFFICIAL if k not in CLASSIFIER_NAMES)
    assert report["renamed"] == {"backbone." + k: k for k in backbone}
    assert report["warnings"][0].startswith("4 checkpoint tensors unused by the model: head.bias, head.weight, norm.bias, norm.weight")


def test_verify_honours_a_matching_heuristics_query_on_the_path(converted):
    """As Detectron2 does: since 0.7 the query turns heuristics on; v0.6 takes it as part of the file name."""
    path, _, _ = converted
    result = verify(path + "?matching_heuristics=True")
    if detectron2_reads_path_query():
        assert result.heuristics and result.ok, result.problems
    else:
        assert not result.ok and result.problems[0].startswith("Detectron2 cannot load it:") and "not found" in result.problems[0]


def test_verify_reports_a_detectron2_load_error_as_a_problem(tmp_path):
    with open(tmp_path / "bad.pkl", "wb") as f:
        pickle.dump({"model": {"backbone." + k: v for k, v in OFFICIAL.items()}}, f)
    result = verify(str(tmp_path / "bad.pkl"), config=_yaml(tmp_path), imports=[STYLES])
    assert not result.ok and "Unsupported type found in checkpoint! model" in result.problems[0]


def test_verify_source_comparison_catches_different_weights(tmp_path, converted):
    path, _, _ = converted
    torch.save({"model": random_state_dict(ARCH, seed=99)}, tmp_path / "other.pth")
    result = verify(path, source=str(tmp_path / "other.pth"))
    assert not result.ok and result.feature_difference > 1e-2 and "features differ" in result.problems[0]


def test_verify_config_naming_no_backbone_says_so_instead_of_listing_resnet_keys(tmp_path, capsys, converted):
    """Without MODEL.BACKBONE.NAME Detectron2 builds its default ResNet: that is the finding (exit 1)."""
    (tmp_path / "nobackbone.yaml").write_text("MODEL:\n  META_ARCHITECTURE: \"GeneralizedRCNN\"\n  CONVNEXT: {DIMS: [8, 16, 8, 16]}\n")
    status, report = _verify_json(capsys, converted[0], "--config", tmp_path / "nobackbone.yaml")
    assert status == 1 and report["missing"] == [] and report["loaded"] == 0 and report["load_attempted"] is False
    assert report["problems"] == [
        f"MODEL.BACKBONE.NAME is not set in {tmp_path / 'nobackbone.yaml'}: Detectron2 builds its default backbone "
        "instead (build_resnet_backbone, a ResNet-50), into which no ConvNeXt weight loads"
    ]
    assert report["fix"].startswith("set MODEL.BACKBONE.NAME to your ConvNeXt backbone's registered name")


def test_verify_backbone_name_from_a_base_config_counts_as_set(tmp_path, capsys, converted):
    (tmp_path / "base.yaml").write_text("MODEL:\n  BACKBONE: {NAME: \"build_convnext_d2_backbone\"}\n  CONVNEXT: {DEPTHS: [1, 2, 1, 1], DIMS: [8, 16, 8, 16]}\n")
    (tmp_path / "child.yaml").write_text("_BASE_: base.yaml\nMODEL:\n  META_ARCHITECTURE: \"NotHere\"\n")
    status, report = _verify_json(capsys, converted[0], "--config", tmp_path / "child.yaml")
    assert status == 0 and report["backbone"] == "build_convnext_d2_backbone" and report["loaded"] == converted[2].kept


def test_verify_strict_fails_on_warnings_only(tmp_path, capsys):
    sd = {"backbone." + k: v for k, v in OFFICIAL.items() if not k.startswith("head.")}  # keeps backbone.norm.*
    torch.save({"model": sd}, tmp_path / "fork.pth")
    relaxed, report = _verify_json(capsys, tmp_path / "fork.pth")
    strict, strict_report = _verify_json(capsys, tmp_path / "fork.pth", "--strict")
    assert (relaxed, strict) == (0, 1)
    assert report["warnings"] == strict_report["warnings"] and len(report["warnings"]) == 1
    assert report["unexpected"] == ["backbone.norm.bias", "backbone.norm.weight"] and report["problems"] == []


def test_verify_python_api_strict_matches_the_cli(tmp_path):
    sd = {"backbone." + k: v for k, v in OFFICIAL.items() if not k.startswith("head.")}
    torch.save({"model": sd}, tmp_path / "fork.pth")
    assert verify(str(tmp_path / "fork.pth")).ok is True
    strict = verify(str(tmp_path / "fork.pth"), strict=True)
    assert strict.ok is False and strict.strict is True and strict.problems == [] and strict.warnings


UNUSABLE = [
    (["verify", "nope.pth"], "no such file"),
    (["verify", "{ok}", "--import", "no_such_module_xyz"], "cannot import"),
    (["verify", "{ok}", "--config", "{unregistered}"], "backbone 'NoSuchBackbone' is not registered"),
    (["verify", "{ok}", "--config", "{ok}"], "not a usable Detectron2 YAML config"),
    (["verify", "{ok}", "--config", "{a_list}"], "not a usable Detectron2 YAML config"),
    (["verify", "{ok}", "--config", "{bad_yaml}"], "not a usable Detectron2 YAML config"),
    (["verify", "{ok}", "--config", "missing.yaml"], "--config missing.yaml: no such file"),
    (["verify", "{ok}", "--config", "{bad_depths}"], "cannot be built from this config (ValueError: MODEL.CONVNEXT.DEPTHS"),
]


@pytest.mark.parametrize("args,fragment", UNUSABLE,
                         ids=["missing-file", "bad-import", "unregistered-backbone", "binary-config", "yaml-list",
                              "yaml-syntax", "missing-config", "backbone-raises"])
def test_verify_unusable_input_exits_2(tmp_path, capsys, converted, args, fragment, monkeypatch):
    monkeypatch.chdir(tmp_path)
    files = {
        "unregistered": "MODEL:\n  BACKBONE: {NAME: \"NoSuchBackbone\"}\n",
        "a_list": "- MODEL\n- BACKBONE\n",
        "bad_yaml": "MODEL: {BACKBONE: [unclosed\n",
        "bad_depths": "MODEL:\n  BACKBONE: {NAME: \"build_convnext_d2_backbone\"}\n  CONVNEXT: {DEPTHS: [1, 1]}\n",
    }
    for name, text in files.items():
        (tmp_path / f"{name}.yaml").write_text(text)
    args = [a.format(ok=converted[0], **{n: tmp_path / f"{n}.yaml" for n in files}) for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err and 1 <= len(err.splitlines()) <= 2, err


def test_verify_json(converted, capsys):
    status, data = _verify_json(capsys, converted[0])
    assert status == 0 and data["ok"] is True and len(data["fresh"]) == 8 and data["missing"] == []
    assert data["problems"] == [] and data["warnings"] == [] and data["whole_model"] is False
    assert data["whole_model_reason"] == "no --config given"


def test_verify_reports_dtype_casts_on_load(tmp_path):
    """An fp16 file loads into an fp32 model: fine, but said (a bf16/fp16 file is not bit-identical in fp32 use)."""
    torch.save({"model": {k: v.half() for k, v in OFFICIAL.items()}}, tmp_path / "src.pth")
    convert(str(tmp_path / "src.pth"), str(tmp_path / "half.pth"))
    result = verify(str(tmp_path / "half.pth"))
    assert result.ok and result.dtype_changes == {"float16 -> float32": str(result.loaded)}
