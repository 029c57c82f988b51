"""`verify`: passes on a correct file, fails (exit 1) with the right reason on each broken kind,
for each style of target backbone; exit 2 for unusable input."""
from __future__ import annotations

import json
import pickle

import pytest
import torch

from conversion import convert
from conversion.architecture import CLASSIFIER_KEYS, Architecture
from conversion.cli import main
from conversion.layouts import from_canonical
from conversion.synthetic import random_state_dict

from .support import detectron2_reads_path_query, require

require("detectron2")
from conversion.verify import verify  # noqa: E402

ARCH = Architecture((1, 2, 1, 1), (8, 16, 8, 16), num_classes=5, classifier_norm=True)
V2 = Architecture((1, 2, 1, 1), (8, 16, 8, 16), version=2, layer_scale=False, num_classes=5, classifier_norm=True)
OFFICIAL = random_state_dict(ARCH, seed=21)
STYLES = "tests.d2_styles"


def _yaml(tmp_path, name="D2ConvNeXt", arch=ARCH, out=("res2", "res3", "res4", "res5")):
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        "MODEL:\n"
        f"  BACKBONE: {{NAME: \"{name}\", FREEZE_AT: 0}}\n"
        "  WEIGHTS: \"\"\n"
        "  MaskDINO: {HIDDEN_DIM: 256}  # a project's own section: must not break the merge\n"
        "  CONVNEXT:\n"
        f"    DEPTHS: {list(arch.depths)}\n"
        f"    DIMS: {list(arch.dims)}\n"
        f"    USE_GRN: {arch.version == 2}\n"
        f"    OUT_FEATURES: {list(out)}\n"
    )
    return str(path)


@pytest.fixture
def converted(tmp_path):
    torch.save({"model": OFFICIAL}, tmp_path / "src.pth")
    report = convert(str(tmp_path / "src.pth"), str(tmp_path / "ok.pth"))
    return str(tmp_path / "ok.pth"), str(tmp_path / "src.pth"), report


def test_verify_passes_a_converted_file_and_agrees_with_the_converter_on_fresh_keys(converted):
    path, src, report = converted
    result = verify(path, source=src)
    assert result.ok, result.problems
    assert result.fresh == sorted(report.fresh) and result.missing == [] and result.unexpected == []
    assert result.loaded == report.kept and result.feature_difference == 0.0


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
    assert result.fresh == sorted(f"backbone.norm{i}.{p}" for i in fresh for p in ("weight", "bias"))


def _broken(tmp_path, kind):
    """Each broken kind, built as the tool that produced it did."""
    backbone = {k: v for k, v in OFFICIAL.items() if k not in CLASSIFIER_KEYS}
    if kind == "missing-prefix":
        torch.save({"model": backbone}, tmp_path / "x.pth")
        return str(tmp_path / "x.pth"), None
    if kind == "timm-names":
        torch.save({"model": {"backbone." + k: v for k, v in from_canonical(backbone, "timm").items()}}, tmp_path / "x.pth")
        return str(tmp_path / "x.pth"), None
    if kind == "classifier-norm-under-heuristics":  # Mask2Former/MaskDINO converter: raw official dict
        with open(tmp_path / "x.pkl", "wb") as f:
            pickle.dump({"model": {k: v.numpy() for k, v in OFFICIAL.items()}, "__author__": "third_party", "matching_heuristics": True}, f)
        return str(tmp_path / "x.pkl"), None
    if kind == "wrong-variant-for-config":
        other = Architecture((1, 2, 1, 1), (8, 16, 8, 24))
        torch.save({"model": random_state_dict(other)}, tmp_path / "o.pth")
        convert(str(tmp_path / "o.pth"), str(tmp_path / "x.pth"))
        return str(tmp_path / "x.pth"), ARCH
    if kind == "v2-file-for-v1-config":
        torch.save({"model": random_state_dict(V2)}, tmp_path / "o.pth")
        convert(str(tmp_path / "o.pth"), str(tmp_path / "x.pth"))
        return str(tmp_path / "x.pth"), ARCH
    raise ValueError(kind)


BROKEN_KINDS = [
    ("missing-prefix", "backbone weights missing"),
    ("timm-names", "backbone weights missing"),
    ("classifier-norm-under-heuristics", "unused by the model: head.bias, head.weight, norm.bias, norm.weight"),
    ("wrong-variant-for-config", "skipped for a shape mismatch"),
    ("v2-file-for-v1-config", "backbone weights missing (they would train from random init): backbone.stages.0.0.gamma"),
]


@pytest.mark.parametrize("kind,reason", BROKEN_KINDS, ids=[k for k, _ in BROKEN_KINDS])
def test_verify_fails_each_broken_kind_with_its_reason(tmp_path, capsys, kind, reason):
    path, config_arch = _broken(tmp_path, kind)
    args = ["verify", path]
    if config_arch is not None or kind == "classifier-norm-under-heuristics":
        args += ["--config", _yaml(tmp_path, "D2ConvNeXt", arch=config_arch or ARCH), "--import", STYLES]
    status = main(args)
    out = capsys.readouterr().out
    assert status == 1, out
    first = out.splitlines()[0]
    assert first.startswith("verify: FAIL:") and reason in first, out
    print(f"{kind}: exit {status}: {first}")


def test_verify_heuristics_classifier_norm_is_detected_as_the_cause(tmp_path):
    """Under matching_heuristics the pooled norm.weight is what fails to fit (a shape skip)."""
    path, _ = _broken(tmp_path, "classifier-norm-under-heuristics")
    result = verify(path, config=_yaml(tmp_path, "D2ConvNeXt"), imports=[STYLES])
    assert result.heuristics and not result.ok
    assert result.renamed and all(result.renamed[m] == m[len("backbone."):] for m in result.renamed if m.startswith("backbone.stages"))


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


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["verify", "nope.pth"], "no such file"),
        (["verify", "{ok}", "--import", "no_such_module_xyz"], "cannot import"),
        (["verify", "{ok}", "--config", "{yaml_unregistered}"], "not registered"),
    ],
    ids=["missing-file", "bad-import", "unregistered-backbone"],
)
def test_verify_unusable_input_exits_2(tmp_path, capsys, converted, args, fragment):
    (tmp_path / "u.yaml").write_text("MODEL:\n  BACKBONE: {NAME: \"NoSuchBackbone\"}\n")
    args = [a.format(ok=converted[0], yaml_unregistered=tmp_path / "u.yaml") for a in args]
    assert main(args) == 2
    assert fragment in capsys.readouterr().err


def test_verify_json(converted, capsys):
    assert main(["verify", converted[0], "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is True and len(data["fresh"]) == 8 and data["missing"] == []


def test_verify_reports_dtype_casts_on_load(tmp_path):
    """An fp16 file loads into an fp32 model: fine, but said (a bf16/fp16 file is not bit-identical in fp32 use)."""
    torch.save({"model": {k: v.half() for k, v in OFFICIAL.items()}}, tmp_path / "src.pth")
    convert(str(tmp_path / "src.pth"), str(tmp_path / "half.pth"))
    result = verify(str(tmp_path / "half.pth"))
    assert result.ok and result.dtype_changes == {"float16 -> float32": str(result.loaded)}


def test_verify_human_report_first_line_says_ok_or_the_first_problem(tmp_path, converted, capsys):
    assert main(["verify", converted[0]]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "verify: OK" and any(line.strip().startswith("fresh      8") for line in out)
