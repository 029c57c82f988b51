"""The human output, checked once: one snapshot per command and verdict, a literal text with the
temporary folder written `<tmp>` and file sizes `<size>` (a size depends on torch's own zip writer
for a source; every size and count is checked exactly through `--json` elsewhere).  Every other
CLI test reads `--json`, so the wording and spacing here can change in one place."""
from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import torch

from conversion.architecture import Architecture
from conversion.cli import main
from conversion.synthetic import random_state_dict

ARCH = Architecture((1, 2, 1, 1), (8, 16, 8, 16), num_classes=4, classifier_norm=True)

WHOLE_MODEL_YAML = """\
MODEL:
  META_ARCHITECTURE: "DIMaskDINOLike"
  BACKBONE: {NAME: "D2ConvNeXt", FREEZE_AT: 0}
  CONVNEXT: {DEPTHS: [1, 2, 1, 1], DIMS: [8, 16, 8, 16]}
  DIMASKDINO_LIKE: {HIDDEN_DIM: 32, ENC_LAYERS: 1, DEC_LAYERS: 1, ENC_FFN: 32, DEC_FFN: 32, NUM_QUERIES: 4}
"""

SNAPSHOTS = {
    "convert-streamed": """\
converted <tmp>/official.pth
  layout     official (container 'model')
  variant    custom variant, ConvNeXt V1, depths [1, 2, 1, 1], dims [8, 16, 8, 16]
  kept       61 tensors, 0.01 M parameters, names prefixed 'backbone.'
  dropped    4 tensors, classifier only (a detection backbone has no pooled norm or head): head.bias, head.weight, norm.bias, norm.weight
  fresh      8 output-norm tensors not in any ImageNet file, initialised by the backbone: backbone.norm0, backbone.norm1, backbone.norm2, backbone.norm3
  wrote      <tmp>/out.pth (<size>, torch file)
  finite     not checked: streamed conversion (--strict reads every tensor and checks it)
  note       the source as given: names lack the 'backbone.' prefix: Detectron2 loads none of them; the model is handed names such as 'downsample_layers.0.0.bias' (only log warnings; training starts from random init).
  note       the source as given: classifier tensors head.bias, head.weight, norm.bias, norm.weight are unused by a detection backbone; under matching_heuristics the pooled 'norm.weight' suffix-matches every '*.norm.weight' in the model.
""",
    "convert-legacy-source-to-pkl": """\
converted <tmp>/legacy.pth
  layout     official (container 'model')
  variant    custom variant, ConvNeXt V1, depths [1, 2, 1, 1], dims [8, 16, 8, 16]
  kept       61 tensors, 0.01 M parameters, names prefixed 'backbone.'
  dropped    4 tensors, classifier only (a detection backbone has no pooled norm or head): head.bias, head.weight, norm.bias, norm.weight
  fresh      8 output-norm tensors not in any ImageNet file, initialised by the backbone: backbone.norm0, backbone.norm1, backbone.norm2, backbone.norm3
  wrote      <tmp>/out.pkl (<size>, Detectron2 model-zoo pickle)
  finite     not checked: streamed conversion (--strict reads every tensor and checks it)
  note       the source as given: names lack the 'backbone.' prefix: Detectron2 loads none of them; the model is handed names such as 'downsample_layers.0.0.bias' (only log warnings; training starts from random init).
  note       the source as given: classifier tensors head.bias, head.weight, norm.bias, norm.weight are unused by a detection backbone; under matching_heuristics the pooled 'norm.weight' suffix-matches every '*.norm.weight' in the model.
""",
    "inspect-source": """\
<tmp>/official.pth
  file       <size>, torch-zip; weights under 'model'; top-level keys model
  layout     official: facebookresearch ConvNeXt / ConvNeXt-V2 (also FCMAE dense files and Detectron2 files)
  variant    custom variant, ConvNeXt V1, depths [1, 2, 1, 1], dims [8, 16, 8, 16], classifier 4 classes
  tensors    65 (0.01 M parameters); dtypes float32 x65
  detectron2 <stack>: torch.load (weights_only=<stack's>); loads 0 of 61 backbone weights, 8 output norms fresh (exact names); 0 shape-skipped, 65 unused
  Detectron2 loading this file as it is:
    - names lack the 'backbone.' prefix: Detectron2 loads none of them; the model is handed names such as 'downsample_layers.0.0.bias' (only log warnings; training starts from random init).
    - classifier tensors head.bias, head.weight, norm.bias, norm.weight are unused by a detection backbone; under matching_heuristics the pooled 'norm.weight' suffix-matches every '*.norm.weight' in the model.
  fix: convnext-d2 repair SRC DST.pth
""",
    "inspect-converted": """\
<tmp>/out.pkl
  file       <size>, pickle; weights under 'model'; top-level keys __author__, model
  layout     official: facebookresearch ConvNeXt / ConvNeXt-V2 (also FCMAE dense files and Detectron2 files); prefix 'backbone.'
  variant    custom variant, ConvNeXt V1, depths [1, 2, 1, 1], dims [8, 16, 8, 16], no classifier
  tensors    61 (0.01 M parameters); dtypes float32 x61
  detectron2 <stack>: pickle.load (a .pkl name); loads 61 of 61 backbone weights, 8 output norms fresh (exact names); 0 shape-skipped, 0 unused
  Detectron2 loading this file as it is: no problem found
""",
    "repair-fixed": """\
<tmp>/broken.pkl
  1 cause(s) found:
    - a .pkl with 'model' but no '__author__': Detectron2 takes it for Caffe2 blobs and fails ('ValueError: Unsupported type found in checkpoint! ...: <class 'dict'>') or renames by heuristics.
  repaired by converting:
    layout     official (container 'model'), source prefix 'backbone.' removed
    variant    custom variant, ConvNeXt V1, depths [1, 2, 1, 1], dims [8, 16, 8, 16]
    kept       61 tensors, 0.01 M parameters, names prefixed 'backbone.'
    dropped    2 tensors, classifier only (a detection backbone has no pooled norm or head): backbone.norm.bias, backbone.norm.weight
    fresh      8 output-norm tensors not in any ImageNet file, initialised by the backbone: backbone.norm0, backbone.norm1, backbone.norm2, backbone.norm3
    wrote      <tmp>/fixed.pkl (<size>, Detectron2 model-zoo pickle)
    finite     not checked: streamed conversion (--strict reads every tensor and checks it)
""",
    "repair-nothing-to-do": """\
<tmp>/good.pth
  fine: Detectron2 loads every backbone weight of it as it is; nothing to repair, <tmp>/again.pth not written
  (names, containers and shapes only: `verify` also checks the values for NaN/Inf)
""",
    "verify-ok-with-warnings-backbone-only": """\
verify: OK with warnings (1)
  checkpoint <tmp>/fork.pth
  backbone   D2ConvNeXt from <tmp>/D2ConvNeXt.yaml
  model      backbone only: whole model not built: MODEL.META_ARCHITECTURE 'MaskDINO' is not registered (--import the module that registers it); checkpoint keys that could match outside the backbone were not checked
  loaded     61 backbone tensors (exact names)
  fresh      8 output-norm tensors initialised by the backbone (expected): backbone.norm0, backbone.norm1, backbone.norm2, backbone.norm3
  missing    0; unused 2; shape-skipped 0
  warning    2 checkpoint tensors unused by the model: backbone.norm.bias, backbone.norm.weight (training ignores them; convnext-d2 repair CKPT FIXED.pth writes the file without them)
""",
    "verify-strict-whole-model": """\
verify: FAIL: --strict: 2 checkpoint tensors unused by the model: backbone.norm.bias, backbone.norm.weight (training ignores them; convnext-d2 repair CKPT FIXED.pth writes the file without them)
  checkpoint <tmp>/fork.pth
  backbone   D2ConvNeXt from <tmp>/whole.yaml
  model      DIMaskDINOLike, built whole on CPU as train_net.py builds it
  loaded     61 backbone tensors (exact names)
  fresh      8 output-norm tensors initialised by the backbone (expected): backbone.norm0, backbone.norm1, backbone.norm2, backbone.norm3
  missing    0; unused 2; shape-skipped 0
  outside    0 tensors loaded outside the backbone; 97 keep the model's initialisation
""",
    "verify-fail": """\
verify: FAIL: 61 backbone weights missing (they would train from random init): backbone.downsample_layers.0.0.bias, backbone.downsample_layers.0.0.weight, backbone.downsample_layers.0.1.bias, backbone.downsample_layers.0.1.weight and 57 more
  checkpoint <tmp>/x.pth
  backbone   build_convnext_d2_backbone (this project's, shaped like the checkpoint)
  model      backbone only: whole model not built: no --config given; checkpoint keys that could match outside the backbone were not checked
  loaded     0 backbone tensors (exact names)
  fresh      8 output-norm tensors initialised by the backbone (expected): backbone.norm0, backbone.norm1, backbone.norm2, backbone.norm3
  missing    61; unused 61; shape-skipped 0
  problem    Detectron2 loads none of the backbone's weights (no name in the file is a backbone key; after its 'module.' stripping)
  warning    61 checkpoint tensors unused by the model: downsample_layers.0.0.bias, downsample_layers.0.0.weight, downsample_layers.0.1.bias, downsample_layers.0.1.weight, downsample_layers.1.0.bias, downsample_layers.1.0.weight, downsample_layers.1.1.bias, downsample_layers.1.1.weight and 53 more (training ignores them; convnext-d2 repair CKPT FIXED.pth writes the file without them)
  fix        convnext-d2 repair CKPT FIXED.pth (or convert the original checkpoint again)
""",
}


def _sources(tmp: Path) -> None:
    """The files the commands read: an official-layout source (zip and legacy torch files), the .pkl a
    converter wrote without `__author__`, and a correct Detectron2 file."""
    sd = random_state_dict(ARCH, seed=11)
    torch.save({"model": sd}, tmp / "official.pth")
    torch.save({"model": sd}, tmp / "legacy.pth", _use_new_zipfile_serialization=False)
    with open(tmp / "broken.pkl", "wb") as f:
        pickle.dump({"model": {"backbone." + k: v for k, v in sd.items() if not k.startswith("head.")}}, f)
    torch.save({"model": {"backbone." + k: v for k, v in sd.items() if not k.startswith(("head.", "norm."))}}, tmp / "good.pth")


def _verify_args(case: str, tmp: Path) -> Tuple[List[object], int]:
    """verify's arguments and exit status for each verdict (the cases of d2/test_verify.py)."""
    from ..support import require

    require("detectron2")
    from ..d2.verify_cases import OFFICIAL, STYLES
    from ..d2.verify_cases import broken_source as _broken
    from ..d2.verify_cases import project_yaml as _yaml

    fork = {"backbone." + k: v for k, v in OFFICIAL.items() if not k.startswith("head.")}
    torch.save({"model": fork}, tmp / "fork.pth")
    (tmp / "whole.yaml").write_text(WHOLE_MODEL_YAML)
    return {
        "verify-ok-with-warnings-backbone-only": (
            [tmp / "fork.pth", "--config", _yaml(tmp, "D2ConvNeXt", meta="MaskDINO"), "--import", STYLES], 0),
        "verify-strict-whole-model": (
            [tmp / "fork.pth", "--config", tmp / "whole.yaml", "--import", "tests.dimaskdino_like", "--strict"], 1),
        "verify-fail": ([_broken(tmp, "missing-prefix")[0]], 1),
    }[case]


COMMANDS: Dict[str, Tuple[List[object], int]] = {
    "convert-streamed": (["convert", "official.pth", "out.pth"], 0),
    "convert-legacy-source-to-pkl": (["convert", "legacy.pth", "out.pkl"], 0),
    "inspect-source": (["inspect", "official.pth"], 0),
    "inspect-converted": (["convert", "legacy.pth", "out.pkl", "--quiet"], 0),  # then inspect out.pkl
    "repair-fixed": (["repair", "broken.pkl", "fixed.pkl"], 0),
    "repair-nothing-to-do": (["repair", "good.pth", "again.pth"], 0),
}


def _normalised(text: str, tmp: Path) -> str:
    """Sizes and the folder as placeholders; the installed stack as `<stack>`, without the lines naming
    how other stacks differ (both depend on the environment; `--json` tests check them)."""
    text = re.sub(r"\n {13}on torch [^\n]*", "", text)
    text = re.sub(r"torch \d+\.\d+, detectron2 \d+\.\d+(, safetensors)?", "<stack>", text)
    text = re.sub(r"weights_only=(True|False)", "weights_only=<stack's>", text)
    return re.sub(r"\b\d+(\.\d)? (B|KB|MB|GB)\b", "<size>", text.replace(str(tmp), "<tmp>"))


@pytest.mark.parametrize("case", list(SNAPSHOTS))
def test_human_output_snapshot(tmp_path, capsys, monkeypatch, case):
    """The one check of the human layout of convert, inspect, repair and verify."""
    monkeypatch.chdir(tmp_path)
    _sources(tmp_path)
    if case.startswith("verify-"):
        args, status = _verify_args(case, tmp_path)
        args = ["verify", *args]
    else:
        args, status = COMMANDS[case]
        if case == "inspect-converted":
            assert main([str(a) for a in args]) == 0
            args = ["inspect", "out.pkl"]
    # paths given relative, printed absolute: <tmp> stands for the folder
    args = [str(tmp_path / a) if isinstance(a, str) and os.path.exists(a) else str(a) for a in args]

    assert main(args) == status
    got = _normalised(capsys.readouterr().out, tmp_path)
    if os.environ.get("DUMP_SNAPSHOTS"):
        Path(os.environ["DUMP_SNAPSHOTS"], case).write_text(got)
    assert got == SNAPSHOTS[case]
