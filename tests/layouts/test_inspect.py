"""`inspect` on each layout's files: the facts, and exactly the problems Detectron2 would hit."""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
from typing import Any, Dict, Mapping

import pytest
import torch

from conversion import convert
from conversion.architecture import RELEASED_VARIANTS, Architecture
from conversion.cli import main
from conversion.layouts import from_canonical
from conversion.synthetic import random_state_dict

from .. import strategies as S
from ..support import TORCH_LOADS_WEIGHTS_ONLY_BY_DEFAULT, read_as_convert_does, require
from ..support.safetensors_files import write_safetensors as _safetensors_file
from ..support.table import SPECS, _with_head, build_case

D2_PREFIX = "backbone."

# ---------------------------------------------------------------- inspect


ATTO_DEPTHS, ATTO_DIMS = RELEASED_VARIANTS[1]["convnext_atto"]
assert RELEASED_VARIANTS[2]["convnextv2_atto"] == (ATTO_DEPTHS, ATTO_DIMS)
ATTO_CLASSES = 10


def _inspect_cli(path: str, capsys, *extra: str) -> Dict[str, Any]:
    """inspect's `--json` report (its human layout has one snapshot test, tests/cli/test_human_output.py)."""
    assert main(["inspect", path, "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(
    "layout, version", [(name, v) for name, spec in SPECS.items() for v in spec.versions], ids=lambda v: str(v)
)
def test_inspect_reports_the_facts_of_each_layouts_file(tmp_path, capsys, layout, version):
    """layout, version, released variant, depths, dims, classes, dtypes, counts, size and container keys."""
    spec = SPECS[layout]
    head = spec.heads[0]
    arch = _with_head(Architecture(ATTO_DEPTHS, ATTO_DIMS, version=version), head, ATTO_CLASSES)
    prefix = spec.prefixes[version][-1]
    case = build_case(spec, arch, head, prefix, conv_mlp=spec.conv_mlp, extras=layout == "open_clip", seed=version)
    path = str(tmp_path / "checkpoint.pth")
    torch.save({"state_dict": case.source, "epoch": 3}, path)

    report = _inspect_cli(path, capsys)

    variant = "convnext_atto" if version == 1 else "convnextv2_atto"
    # Every tensor of the file, the extras too; one saved under two names (a view of one storage) once.
    views = {(t.data_ptr(), t.shape, t.stride()): t.numel() for t in case.source.values()}
    parameters = sum(views.values())
    facts = {
        "layout": layout,
        "version": version,
        "variant": variant,
        "depths": list(ATTO_DEPTHS),
        "dims": list(ATTO_DIMS),
        "num_classes": arch.num_classes,
        "source_prefix": case.prefix,
        "container": "state_dict",
        "container_keys": ["epoch", "state_dict"],
        "tensors": len(case.source),
        "parameters": parameters,
        "dtypes": {"float32": len(case.canonical)},
        "file_bytes": os.path.getsize(path),
        "format": "torch-zip",
    }
    assert {k: report[k] for k in facts} == facts


@pytest.mark.parametrize("name, variant", [("convnext_atto", "convnext_atto"), ("convnextv2_atto", "convnextv2_atto")])
def test_inspect_names_a_real_timm_model_by_its_variant(tmp_path, capsys, name, variant):
    """timm's own convnext_atto / convnextv2_atto (conv-MLP) dicts: variant, classes, reshapes, the timm problem."""
    timm = require("timm")
    model = timm.create_model(name, pretrained=False)
    path = str(tmp_path / f"{name}.pth")
    torch.save(model.state_dict(), path)
    report = _inspect_cli(path, capsys)
    assert (report["layout"], report["variant"], report["num_classes"]) == ("timm", variant, 1000)
    assert (report["tensors"], report["container"], report["container_keys"]) == (len(model.state_dict()), None, [])
    assert report["parameters"] == sum(p.numel() for p in model.state_dict().values())
    assert set(report["reshaped"].values()) >= {"[out,in,1,1] -> [out,in]"}
    assert report["problems"][0].startswith("names are in the timm layout"), report["problems"]
    assert any("head.fc.weight" in p and "matching_heuristics" in p for p in report["problems"]), report["problems"]
    assert report["version"] == (1 if name == "convnext_atto" else 2)


# The problems Detectron2 would hit with a file as it is (conversion/diagnose.py), one per case.
NO_PREFIX = "lack the 'backbone.' prefix"
NO_AUTHOR = "a .pkl with 'model' but no '__author__'"
TORCH_AS_PKL = "a torch.save archive under a .pkl name"
WEIGHTS_ONLY = "holds Namespace objects: torch >= 2.6 loads with weights_only=True"
HEURISTICS = "matching_heuristics"
TIMM_NAMES = "names are in the timm layout"

PROBLEM_ARCH = Architecture((1, 1, 2, 1), (8, 8, 16, 16))


def _backbone_names(canonical: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {D2_PREFIX + k: v for k, v in canonical.items()}


def _write_problem_file(directory, case: str) -> str:
    trunk = random_state_dict(PROBLEM_ARCH, seed=9)
    with_head = random_state_dict(dataclasses.replace(PROBLEM_ARCH, num_classes=3, classifier_norm=True), seed=9)
    if case == "timm":
        path = os.path.join(directory, "timm.pth")
        torch.save(from_canonical(trunk, "timm"), path)
    elif case == "official-bare":
        path = os.path.join(directory, "official.pth")
        torch.save(trunk, path)
    elif case == "pkl-without-author":
        path = os.path.join(directory, "d2.pkl")
        with open(path, "wb") as f:
            pickle.dump({"model": {k: v.numpy() for k, v in _backbone_names(trunk).items()}}, f)
    elif case == "torch-archive-as-pkl":
        path = os.path.join(directory, "d2.pkl")
        torch.save({"model": _backbone_names(trunk)}, path)
    elif case == "training-namespace":
        path = os.path.join(directory, "checkpoint-299.pth")
        torch.save(S.wrap(_backbone_names(trunk), "training"), path)
    elif case == "classifier":
        path = os.path.join(directory, "with_head.pth")
        torch.save({"model": _backbone_names(with_head)}, path)
    else:
        raise ValueError(case)
    return path


@pytest.mark.parametrize(
    "case, problem",
    [
        ("timm", TIMM_NAMES),
        ("official-bare", NO_PREFIX),
        ("pkl-without-author", NO_AUTHOR),
        ("torch-archive-as-pkl", TORCH_AS_PKL),
        ("training-namespace", WEIGHTS_ONLY),
        ("classifier", HEURISTICS),
    ],
)
def test_inspect_lists_exactly_the_problem_detectron2_would_hit(tmp_path, capsys, case, problem):
    """Each broken form is diagnosed with its own problem, and nothing else."""
    path = _write_problem_file(str(tmp_path), case)
    report = _inspect_cli(path, capsys)
    if case == "training-namespace" and not TORCH_LOADS_WEIGHTS_ONLY_BY_DEFAULT:  # torch < 2.6 unpickles it
        assert report["problems"] == [] and "Namespace" in report["detectron2"]["other_stacks"]["torch 2.14, detectron2 0.7, safetensors"]
        return
    assert len(report["problems"]) == 1 and problem in report["problems"][0], report["problems"]
    if case == "classifier":
        assert "backbone.head.weight" in report["problems"][0] and "backbone.norm.weight" in report["problems"][0]


@pytest.mark.parametrize("ext", [".pth", ".pkl"])
@pytest.mark.parametrize("layout", sorted(SPECS))
def test_inspect_finds_no_problem_in_a_converted_file(tmp_path, capsys, layout, ext):
    """Whatever the source layout, the converted file is official names behind `backbone.`: problems == []."""
    spec = SPECS[layout]
    head = spec.heads[0]
    arch = _with_head(PROBLEM_ARCH, head, 3)
    case = build_case(spec, arch, head, spec.prefixes[1][-1], extras=layout == "open_clip", seed=2)
    src, dst = str(tmp_path / "source.pth"), str(tmp_path / f"converted{ext}")
    torch.save(case.source, src)
    convert(src, dst)
    report = _inspect_cli(dst, capsys)
    assert report["problems"] == [], report["problems"]
    assert (report["layout"], report["source_prefix"], report["container"]) == ("official", D2_PREFIX, "model")
    assert report["num_classes"] is None


# ---------------------------------------------------------------- inspect reads metadata only


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_inspect_of_a_safetensors_file_reads_its_header_and_tells_what_a_torch_file_tells(tmp_path, dtype):
    from conversion.inspection import inspect_checkpoint

    sd = {k: v.to(dtype) for k, v in random_state_dict(Architecture((1, 1, 2, 1), (8, 16, 24, 32), num_classes=5, classifier_norm=True)).items()}
    header = _safetensors_file(tmp_path / "w.safetensors", sd)
    torch.save(sd, tmp_path / "w.pth")
    got = inspect_checkpoint(str(tmp_path / "w.safetensors")).to_dict()
    want = inspect_checkpoint(str(tmp_path / "w.pth")).to_dict()
    assert got["format"] == "safetensors" and got["bytes_read"] == 8 + header
    # The same names: the same answer where torch reads .safetensors paths (torch >= 2.13 with safetensors).
    assert got["problems"] == want["problems"] or [p for p in got["problems"] if "safetensors" in p], got["problems"]
    assert got["detectron2"]["loaded"] == want["detectron2"]["loaded"] or got["detectron2"]["raises"], got["detectron2"]
    for key in ("path", "file_bytes", "format", "bytes_read", "problems", "detectron2"):
        got.pop(key), want.pop(key)
    assert got == want


def test_a_safetensors_file_whose_header_overruns_it_is_refused_as_the_whole_reader_refuses_it(tmp_path):
    from conversion.errors import UnreadableCheckpoint
    from conversion.inspection import inspect_checkpoint
    
    _safetensors_file(tmp_path / "w.safetensors", random_state_dict(Architecture((1, 1, 1, 1), (8, 8, 8, 8))))
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 100])  # tensors declared past the end
    with pytest.raises(UnreadableCheckpoint) as whole:
        read_as_convert_does(str(tmp_path / "cut.safetensors"))
    with pytest.raises(UnreadableCheckpoint, match="cut.safetensors") as inspected:
        inspect_checkpoint(str(tmp_path / "cut.safetensors"))
    assert inspected.value.message == whole.value.message
