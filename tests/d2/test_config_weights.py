"""The gate checks the file training loads: without CKPT, `verify --config X.yaml` checks the config's
`MODEL.WEIGHTS`, resolved from the working directory as Detectron2's checkpointer opens it, with
train_net-style `KEY VALUE` overrides after the options; a CKPT other than the config's own
weights is a warning (`--strict` fails it); several configs give one verdict each.  The LazyConfig
side of the same rules is in test_lazy_config.py."""
from __future__ import annotations

from pathlib import Path

import pytest

from conversion.architecture import Architecture
from conversion.cli import main
from conversion.testing import write_synthetic_checkpoint

from ..support.cli import EXIT_OK, EXIT_PROBLEM, EXIT_USAGE, assert_plain_error
from ..support import require, verify_json

require("detectron2")
from conversion.d2 import BACKBONE_NAME  # noqa: E402

SMALL = Architecture((1, 1, 2, 1), (8, 16, 24, 32), num_classes=5, classifier_norm=True)
LAZY_ATTO = str(Path(__file__).resolve().parents[1] / "detrex_like_configs" / "dino_convnext_atto.py")


def _yaml(folder: Path, weights: str) -> str:
    path = folder / "train.yaml"
    path.write_text(
        "MODEL:\n"
        f"  BACKBONE: {{NAME: {BACKBONE_NAME}, FREEZE_AT: 0}}\n"
        f"  WEIGHTS: \"{weights}\"\n"
        f"  CONVNEXT: {{DEPTHS: {list(SMALL.depths)}, DIMS: {list(SMALL.dims)}}}\n"
    )
    return str(path)


@pytest.fixture
def training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A training folder (the working directory): converted and raw weights, a YAML naming the converted
    file by a relative path."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights").mkdir()
    write_synthetic_checkpoint(tmp_path / "weights" / "good.pth", layout="detectron2", variant=SMALL)
    write_synthetic_checkpoint(tmp_path / "raw.pth", layout="official", variant=SMALL)
    _yaml(tmp_path, "weights/good.pth")
    return tmp_path


def test_without_ckpt_model_weights_is_checked_relative_to_the_working_directory(training, capsys):
    status, report, _ = verify_json(capsys, "--config", "train.yaml")
    assert status == EXIT_OK and report["weights_from"] == "MODEL.WEIGHTS"
    assert report["checkpoint"] == str(training / "weights" / "good.pth") and report["loaded"] > 0


def test_a_model_weights_override_after_the_options_is_what_is_checked(training, capsys):
    status, report, _ = verify_json(capsys, "--config", "train.yaml", "MODEL.WEIGHTS", "raw.pth")
    assert status == EXIT_PROBLEM and report["checkpoint"] == str(training / "raw.pth") and report["loaded"] == 0


def test_ckpt_may_come_before_or_after_the_options(training, capsys):
    before, _, _ = verify_json(capsys, "weights/good.pth", "--config", "train.yaml")
    after, report, _ = verify_json(capsys, "--config", "train.yaml", "weights/good.pth")
    assert before == after == EXIT_OK and report["weights_from"] is None


def test_a_ckpt_other_than_model_weights_is_a_warning_and_strict_fails_it(training, capsys):
    write_synthetic_checkpoint(training / "other.pth", layout="detectron2", variant=SMALL)
    status, report, _ = verify_json(capsys, "other.pth", "--config", "train.yaml")
    assert status == EXIT_OK and report["warnings"] == [report["weights_warning"]]
    assert "training loads MODEL.WEIGHTS = weights/good.pth" in report["weights_warning"]
    status, _, _ = verify_json(capsys, "other.pth", "--config", "train.yaml", "--strict")
    assert status == EXIT_PROBLEM
    status, _, _ = verify_json(capsys, "./weights/../weights/good.pth", "--config", "train.yaml", "--strict")
    assert status == EXIT_OK, "the config's own file, spelled another way, is no warning"


def test_yaml_and_lazy_configs_in_one_call_each_take_their_own_overrides(training, capsys):
    status = main(["verify", "--config", "train.yaml", "--config", LAZY_ATTO, "MODEL.WEIGHTS", "weights/good.pth",
                   "train.init_checkpoint=raw.pth"])
    out = capsys.readouterr().out
    verdicts = [line for line in out.splitlines() if line.startswith("verify:")]
    assert len(verdicts) == 2 and verdicts[0] == "verify: OK" and verdicts[1].startswith("verify: FAIL")
    assert status == EXIT_PROBLEM, "the exit status is the worst of the verdicts"


BAD = {
    "unknown-key": (["--config", "train.yaml", "MODEL.WEIGTHS", "raw.pth"], "override MODEL.WEIGTHS names no key"),
    "no-value": (["--config", "train.yaml", "MODEL.WEIGHTS"], "override MODEL.WEIGHTS has no value"),
    "missing": (["--config", "train.yaml", "MODEL.WEIGHTS", "weights/nope.pth"], "no such file (relative to the working directory"),
    "empty-string": (["--config", "train.yaml", "MODEL.WEIGHTS", ""], "names no weights (MODEL.WEIGHTS is empty)"),
    "empty-file": (["--config", "train.yaml", "MODEL.WEIGHTS", "empty.pth"], "the file is empty"),
    "remote": (["--config", "train.yaml", "MODEL.WEIGHTS", "detectron2://ImageNetPretrained/MSRA/R-50.pkl"], "Download it first"),
    "lazy-style-for-a-yaml": (["--config", "train.yaml", "MODEL.WEIGHTS=raw.pth"], "needs a LazyConfig .py --config"),
    "two-checkpoints": (["raw.pth", "weights/good.pth", "--config", "train.yaml"], "is neither the checkpoint"),
    "nothing-named": ([], "no CKPT and no --config"),
    "empty-ckpt": (["empty.pth"], "empty.pth: the file is empty"),
}


@pytest.mark.parametrize("kind", list(BAD))
def test_unusable_weights_or_overrides_are_a_plain_error_and_exit_2(training, capsys, kind):
    (training / "empty.pth").write_bytes(b"")
    args, says = BAD[kind]
    status = main(["verify", *args])
    out, err = capsys.readouterr()
    assert status == EXIT_USAGE and out == "", err
    assert_plain_error(err)
    assert says in err
