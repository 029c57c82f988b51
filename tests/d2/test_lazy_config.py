"""`verify --config X.py`: a detrex-like LazyConfig project (tests/detrex_like.py and the configs in
tests/detrex_like_configs/), built and loaded as detrex's train_net.py builds and loads it, through
Detectron2's real `LazyConfig`, `instantiate` and `DetectionCheckpointer`.

The trap of detrex's own DINO-ConvNeXt config: `train.init_checkpoint` is the raw official ConvNeXt
file, whose names lack `backbone.`; not one backbone weight loads.  The converted file loads every
one; the model's fresh norms are its own (`norm1..3` for `out_indices` [1, 2, 3]).  Runs in `full`
and in `legacy` (Detectron2 v0.6 has `detectron2.config.LazyConfig` and `instantiate`; omegaconf
2.3 in both).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import pytest
import torch

from ..support import require, verify_json

require("detectron2")
require("omegaconf")
from conversion.cli import main  # noqa: E402
from conversion.pipeline import convert  # noqa: E402
from conversion.testing.synthetic import synthetic_state_dict  # noqa: E402

from ..support.cli import EXIT_OK, EXIT_PROBLEM, EXIT_USAGE, assert_plain_error  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "detrex_like_configs"
ATTO = str(CONFIGS / "dino_convnext_atto.py")
DETREX_TINY = str(CONFIGS / "dino_convnext_tiny_384_4scale_12ep.py")
WEIGHTS = "weights/convnext_atto_d2.pth"  # what dino_convnext_atto.py's train.init_checkpoint names
FRESH = [f"backbone.norm{i}.{p}" for i in (1, 2, 3) for p in ("bias", "weight")]


def _official() -> Dict[str, torch.Tensor]:
    return synthetic_state_dict("official", "convnext_atto")


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A training folder: the raw official file, its conversion where the config's init_checkpoint
    points (relative to the working directory, which is this folder)."""
    monkeypatch.chdir(tmp_path)
    torch.save({"model": _official()}, tmp_path / "convnext_atto_1k_224.pth")
    (tmp_path / "weights").mkdir()
    convert(str(tmp_path / "convnext_atto_1k_224.pth"), str(tmp_path / WEIGHTS))
    return tmp_path


def _backbone_trunk() -> List[str]:
    return sorted("backbone." + k for k in _official() if not k.startswith(("head.", "norm.")))


# ---------------------------------------------------------------- the trap and its fix


def test_the_raw_official_file_exits_1_naming_every_backbone_weight_missing(project, capsys):
    status, report, _ = verify_json(capsys, "convnext_atto_1k_224.pth", "--config", ATTO)
    assert status == EXIT_PROBLEM and report["loaded"] == 0
    assert report["missing"] == _backbone_trunk(), "every trunk weight of the backbone is named missing"
    assert report["whole_model"] and report["meta_architecture"] == "DINOLike" and report["backbone"] == "ConvNeXtLike"


def test_the_converted_file_exits_0_with_the_models_own_fresh_norms(project, capsys):
    status, report, _ = verify_json(capsys, WEIGHTS, "--config", ATTO, "--source", "convnext_atto_1k_224.pth")
    assert status == EXIT_OK and report["problems"] == [] and report["warnings"] == []
    assert report["loaded"] == len(_backbone_trunk()) and report["missing"] == []
    assert report["fresh"] == FRESH, "detrex's ConvNeXt has norm1..3 only (out_indices [1, 2, 3]), no norm0"
    assert report["feature_difference"] == 0.0, "the loaded backbone's features are bit-equal to the source's"


def test_without_ckpt_the_gate_checks_train_init_checkpoint_from_the_working_directory(project, capsys):
    status, report, _ = verify_json(capsys, "--config", ATTO)
    assert status == EXIT_OK and report["weights_from"] == "train.init_checkpoint"
    assert report["checkpoint"] == str(project / WEIGHTS)


def test_the_config_trains_from_the_raw_file_and_the_ckpt_less_gate_says_so(project, capsys):
    """detrex's own config: its init_checkpoint overridden to the raw file, as train_net.py takes it."""
    status, report, _ = verify_json(capsys, "--config", ATTO, "train.init_checkpoint=convnext_atto_1k_224.pth")
    assert status == EXIT_PROBLEM and report["checkpoint"] == str(project / "convnext_atto_1k_224.pth")
    assert report["missing"] == _backbone_trunk()


def test_a_ckpt_other_than_the_configs_weights_is_a_warning_and_strict_fails_it(project, capsys):
    (project / "other.pth").write_bytes((project / WEIGHTS).read_bytes())
    status, report, _ = verify_json(capsys, "other.pth", "--config", ATTO)
    assert status == EXIT_OK and len(report["warnings"]) == 1
    assert "training loads train.init_checkpoint = weights/convnext_atto_d2.pth" in report["warnings"][0]
    status, report, _ = verify_json(capsys, "other.pth", "--config", ATTO, "--strict")
    assert status == EXIT_PROBLEM and not report["ok"]
    status, report, _ = verify_json(capsys, str(project / WEIGHTS), "--config", ATTO, "--strict")
    assert status == EXIT_OK, "the same file named another way is the config's own weights"


def test_a_model_that_cannot_be_instantiated_falls_back_to_its_backbone_and_says_what_was_not_checked(project, capsys):
    status, report, _ = verify_json(capsys, "--config", ATTO, "model.transformer.use_compiled_op=True")
    assert status == EXIT_OK and report["whole_model"] is False and report["loaded"] == len(_backbone_trunk())
    assert "instantiating DINOLike failed (ModuleNotFoundError" in report["whole_model_reason"]
    main(["verify", "--config", ATTO, "model.transformer.use_compiled_op=True"])
    out = capsys.readouterr().out
    assert "backbone only: whole model not built" in out and "were not checked" in out
    assert "(expected): backbone.norm1, backbone.norm2, backbone.norm3\n" in out, "the built backbone's own norms"
    assert f"checkpoint {project / WEIGHTS} (the config's train.init_checkpoint)" in out


def test_every_device_under_the_model_is_set_to_cpu(project, capsys):
    """The config says device="cuda" (detrex's models move themselves there); no GPU is needed to verify."""
    from conversion import lazy_config

    cfg = lazy_config.load(ATTO)
    cfg.model.backbone.device = "cuda"  # a part that takes a device of its own, one level down
    cfg.model.heads = [{"device": "cuda"}]  # and one inside a list
    assert cfg.model.device == "cuda" and cfg.train.device == "cuda"
    lazy_config.on_cpu(cfg.model)
    assert cfg.model.device == "cpu" and cfg.train.device == "cuda", "only the model's devices change"
    assert cfg.model.backbone.device == "cpu" and cfg.model.heads[0].device == "cpu", "every device under the model"


def test_several_configs_give_one_verdict_line_each_and_the_worst_exit_status(project, capsys):
    status = main(["verify", "--config", ATTO, "--config", ATTO, "train.init_checkpoint=convnext_atto_1k_224.pth"])
    out = capsys.readouterr().out
    assert status == EXIT_PROBLEM
    assert [line.split(":")[0] for line in out.splitlines() if line.startswith("verify:")] == ["verify", "verify"]
    status = main(["verify", "--config", ATTO, "--config", DETREX_TINY])
    out, err = capsys.readouterr()
    assert status == EXIT_USAGE, "detrex's own config names /path/to/...: unusable, the worst status"
    assert out.startswith("verify: OK") and "/path/to/convnext_tiny_22k_1k_384.pth: no such file" in err


def test_the_whole_model_checkpoint_with_tied_heads_converts_with_its_trained_norms_bit_equal(project, tmp_path):
    """A detrex-like model_final.pth: every tied bbox_embed/class_embed a view of one storage."""
    from conversion import lazy_config

    cfg = lazy_config.load(ATTO)
    model, why = lazy_config.build(cfg, ATTO)
    assert why is None
    torch.manual_seed(0)
    for p in model.parameters():
        torch.nn.init.normal_(p)
    state = model.state_dict()
    assert state["class_embed.0.weight"].data_ptr() == state["transformer.decoder.class_embed.5.weight"].data_ptr()
    torch.save({"model": state, "iteration": 90000}, tmp_path / "model_final.pth")
    report = convert(str(tmp_path / "model_final.pth"), str(tmp_path / "backbone.pth"))
    written = torch.load(tmp_path / "backbone.pth", map_location="cpu")["model"]
    assert sorted(written) == sorted(k for k in state if k.startswith("backbone."))
    for name, value in written.items():
        assert torch.equal(value, state[name]), name
    assert report.detector_parts["class_embed."] == 2 * 6 and report.detector_parts["transformer."] > 0


def test_assert_loads_clean_takes_a_lazy_config_and_checks_its_own_weights(project):
    from conversion.testing import assert_loads_clean

    assert assert_loads_clean(config=ATTO).weights_from == "train.init_checkpoint"
    with pytest.raises(AssertionError, match="124 backbone weights missing"):
        assert_loads_clean(config=ATTO, overrides=["train.init_checkpoint=convnext_atto_1k_224.pth"])
    with pytest.raises(AssertionError, match="is not the config's own weights"):
        assert_loads_clean("convnext_atto_1k_224.pth", config=ATTO, strict=True)


# ---------------------------------------------------------------- bad input: one or two lines, exit 2


BAD_CONFIGS = {
    "syntax": ("model = L(\n", "a syntax error at line"),
    "raises": ("raise RuntimeError('needs the cluster')\n", "loading it raised RuntimeError: needs the cluster"),
    "missing-module": ("import detrex_not_installed_here\n", "ModuleNotFoundError"),
    "no-model": ("train = dict(init_checkpoint='x.pth')\n", "defines no `model`"),
    "no-backbone": ("from detectron2.config import LazyCall as L\nfrom torch import nn\n"
                    "model = L(nn.Identity)()\ntrain = dict(init_checkpoint='weights/convnext_atto_d2.pth')\n",
                    "no backbone node"),
}


@pytest.mark.parametrize("kind", list(BAD_CONFIGS))
def test_an_unusable_lazy_config_is_a_plain_error_and_exit_2(project, capsys, kind):
    text, says = BAD_CONFIGS[kind]
    (project / f"{kind}.py").write_text(text)
    status = main(["verify", WEIGHTS, "--config", f"{kind}.py"])
    _, err = capsys.readouterr()
    assert status == EXIT_USAGE, err
    assert_plain_error(err)
    assert says in err


BAD_WEIGHTS = {
    "missing": (["train.init_checkpoint=weights/nope.pth"], "no such file (relative to the working directory"),
    "empty-string": (["train.init_checkpoint="], "names no weights (train.init_checkpoint is empty)"),
    "empty-file": (["train.init_checkpoint=empty.pth"], "the file is empty"),
    "remote": (["train.init_checkpoint=detectron2://ImageNetPretrained/MSRA/R-50.pkl"], "Download it first"),
    "unknown-key": (["train.init_chekpoint=x.pth"], "override 'train.init_chekpoint' names no key of this config"),
    "yaml-style-for-a-lazy-config": (["MODEL.WEIGHTS", WEIGHTS], "needs a YAML --config"),
}


@pytest.mark.parametrize("kind", list(BAD_WEIGHTS))
def test_unusable_weights_or_overrides_are_a_plain_error_and_exit_2(project, capsys, kind):
    (project / "empty.pth").write_bytes(b"")
    overrides, says = BAD_WEIGHTS[kind]
    status = main(["verify", "--config", ATTO, *overrides])
    _, err = capsys.readouterr()
    assert status == EXIT_USAGE, err
    assert_plain_error(err)
    assert says in err


def test_a_py_file_is_only_run_when_config_names_it(project, capsys):
    """A LazyConfig runs code; a .py given as CKPT is read as a checkpoint (and refused), never run."""
    (project / "payload.py").write_text("open('ran', 'w').write('ran')\n")
    status = main(["verify", "payload.py"])
    _, err = capsys.readouterr()
    assert status == EXIT_USAGE and not (project / "ran").exists(), err
