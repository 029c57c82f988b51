"""The command line as a user meets it: its exit status, its stdout and its stderr (docs/design.md,
"Public contract").

Most checks run `conversion.cli.main` in-process (the same parser and the same code path as
`python -m conversion`, without a second start of torch) and read the report through `--json`.
A few start a real `python -m conversion` process, for what only a real process shows: the exit
status the shell sees for a success, an argument error and --debug, and that no traceback
escapes.  Bad inputs in bulk are tested in test_bad_input.py; the human report's layout has one
snapshot test (test_human_output.py).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Dict, List, Sequence

import pytest
import torch

from conversion import __version__, convert
from conversion.architecture import RELEASED_VARIANTS, Architecture
from conversion.cli import main
from conversion.errors import ContainerError
from conversion.layouts import LAYOUTS

from ..strategies import wrap
from ..support import CLASSIFIER_NAMES, output_norm_names, random_canonical_state_dict, torch_load_weights_only
from ..support.cli import EXIT_OK, EXIT_USAGE, assert_plain_error, run_cli, run_in_process

CLASSIFIER = sorted(CLASSIFIER_NAMES)
FRESH = output_norm_names()
# The smallest released variant, so the summary has a real variant name to print.
ATTO = Architecture(*RELEASED_VARIANTS[1]["convnext_atto"], num_classes=10, classifier_norm=True)
# A tiny custom network for tests that do not care about the variant's name.
SMALL = Architecture(depths=(1, 1, 2, 1), dims=(8, 8, 16, 16), num_classes=3, classifier_norm=True)


# ---------------------------------------------------------------- helpers


def kept_names(sd: Dict[str, torch.Tensor], prefix: str = "backbone.") -> List[str]:
    """The names a conversion writes: every non-classifier tensor, behind `prefix`."""
    return sorted(prefix + k for k in sd if k not in CLASSIFIER)


def written_model(path: Path) -> Dict[str, torch.Tensor]:
    """The `model` dict of a written .pth, read the way Detectron2 on torch >= 2.6 reads it."""
    return torch_load_weights_only(path)["model"]


# ---------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def atto(tmp_path_factory: pytest.TempPathFactory):
    """(path, state dict) of an official-layout convnext_atto file, classifier included, under 'model'."""
    sd = random_canonical_state_dict(ATTO)
    path = tmp_path_factory.mktemp("src") / "convnext_atto_1k_224.pth"
    torch.save({"model": sd}, path)
    return path, sd


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory):
    """(path, state dict) of a tiny official-layout file under 'model', without EMA weights."""
    sd = random_canonical_state_dict(SMALL)
    path = tmp_path_factory.mktemp("src") / "small.pth"
    torch.save({"model": sd}, path)
    return path, sd


@pytest.fixture(scope="module")
def training(tmp_path_factory: pytest.TempPathFactory):
    """(path, model weights, EMA weights) of a training checkpoint whose EMA differs from its model."""
    model = random_canonical_state_dict(SMALL, seed=1)
    ema = random_canonical_state_dict(SMALL, seed=2)
    path = tmp_path_factory.mktemp("src") / "checkpoint-299.pth"
    torch.save(wrap(model, "training", ema=ema), path)
    return path, model, ema


# ---------------------------------------------------------------- success


def test_convert_in_a_real_process_exits_0_silent_on_stderr_and_writes_the_file(atto, tmp_path):
    src, sd = atto
    dst = tmp_path / "convnext_atto_d2.pth"

    result = run_cli("convert", src, dst.name, cwd=tmp_path)

    assert result.returncode == EXIT_OK, result.stderr
    assert result.stderr == "", f"a successful run should be silent on stderr:\n{result.stderr}"
    assert result.stdout.startswith(f"converted {src}\n"), result.stdout
    assert sorted(written_model(dst)) == kept_names(sd)


@pytest.mark.parametrize("extension, fmt", [(".pth", "torch"), (".pkl", "pickle")], ids=["torch-file", "model-zoo-pickle"])
def test_json_report_is_the_whole_stdout_and_describes_the_written_file(atto, tmp_path, capsys, extension, fmt):
    src, sd = atto
    dst = tmp_path / f"out{extension}"

    status, out, err = run_in_process("convert", src, dst.name, "--json", cwd=tmp_path, capsys=capsys)

    assert status == EXIT_OK and err == "", err
    report = json.loads(out)  # the whole stdout: nothing printed around the JSON
    assert {"layout", "variant", "kept", "dropped", "fresh", "prefix", "format", "bytes_written"} <= set(report)
    assert report["layout"] == "official"
    assert report["variant"] == "convnext_atto"
    assert report["kept"] == len(kept_names(sd)) == 124  # convnext_atto: 20 + 9 * 12 tensors, less the classifier's 4
    assert sorted(report["dropped"]) == CLASSIFIER
    assert sorted(report["fresh"]) == sorted(FRESH), "the four output norms are the only fresh keys"
    assert len(report["fresh"]) == len(FRESH), f"fresh keys repeated: {report['fresh']}"
    assert report["prefix"] == "backbone."
    assert report["format"] == fmt
    assert report["destination"] == str(dst)
    assert report["bytes_written"] == os.path.getsize(dst), "bytes_written must be the size of the file on disk"


@pytest.mark.parametrize(
    "args, prefix",
    [([], "backbone."), (["--prefix", ""], ""), (["--prefix", "model.backbone."], "model.backbone.")],
    ids=["default-backbone", "empty", "model.backbone"],
)
def test_prefix_option_sets_the_prefix_of_every_written_name(small, tmp_path, capsys, args, prefix):
    src, sd = small
    dst = tmp_path / "out.pth"

    status, _, err = run_in_process("convert", src, dst, *args, cwd=tmp_path, capsys=capsys)

    assert status == EXIT_OK, err
    model = written_model(dst)
    assert sorted(model) == kept_names(sd, prefix)
    for name in sd:
        if name not in CLASSIFIER:
            assert torch.equal(model[prefix + name], sd[name]), f"{prefix + name} differs from {name}"


@pytest.mark.parametrize("use_ema", [True, False], ids=["--ema-takes-model_ema", "default-takes-model"])
def test_ema_option_chooses_between_the_ema_and_the_model_weights_of_a_training_checkpoint(training, tmp_path, capsys, use_ema):
    src, model, ema = training
    expected = ema if use_ema else model
    dst = tmp_path / "out.pth"

    status, _, err = run_in_process("convert", src, dst, *(["--ema"] if use_ema else []), cwd=tmp_path, capsys=capsys)

    assert status == EXIT_OK, err
    written = written_model(dst)
    assert sorted(written) == kept_names(expected)
    wrong = [k for k in expected if k not in CLASSIFIER and not torch.equal(written["backbone." + k], expected[k])]
    assert wrong == [], f"{len(wrong)} tensors are not the {'EMA' if use_ema else 'model'} weights: {wrong[:5]}"


def test_ema_option_on_a_file_without_ema_weights_is_refused_saying_so(small, tmp_path):
    src, _ = small
    dst = tmp_path / "out.pth"

    with pytest.raises(ContainerError, match="EMA"):
        convert(str(src), str(dst), ema=True)

    assert not dst.exists()


def test_from_official_reads_the_file_as_the_official_layout(small, tmp_path, capsys):
    src, sd = small
    dst = tmp_path / "out.pth"

    status, out, err = run_in_process("convert", src, dst, "--from", "official", "--json", cwd=tmp_path, capsys=capsys)

    assert status == EXIT_OK, err
    assert json.loads(out)["layout"] == "official"
    assert sorted(written_model(dst)) == kept_names(sd)


def test_from_an_unknown_layout_exits_2_naming_the_known_layouts(small, tmp_path, capsys):
    src, _ = small

    status, out, err = run_in_process("convert", src, tmp_path / "out.pth", "--from", "nosuchlayout", cwd=tmp_path, capsys=capsys)

    assert status == EXIT_USAGE, out + err
    assert "nosuchlayout" in err, err
    missing = [name for name in LAYOUTS if name not in err]
    assert missing == [], f"the error should name every known layout, lacks {missing}:\n{err}"
    assert_plain_error(err, usage=True)  # refused while parsing the arguments
    assert not (tmp_path / "out.pth").exists()


def test_version_option_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])

    assert done.value.code in (0, None)
    assert __version__ in capsys.readouterr().out


@pytest.mark.parametrize(
    "args",
    [[], ["frobnicate"], ["convert", "only-a-source.pth"]],
    ids=["no-arguments", "unknown-command", "convert-without-destination"],
)
def test_argument_errors_exit_2_with_the_usage_line(capsys, args: Sequence[str]):
    with pytest.raises(SystemExit) as done:
        main(list(args))

    out, err = capsys.readouterr()
    assert done.value.code == EXIT_USAGE, out + err
    assert_plain_error(err, usage=True)
    assert out == ""


def test_an_argument_error_in_a_real_process_exits_2_with_the_usage_line(tmp_path):
    result = run_cli("convert", "only-a-source.pth", cwd=tmp_path)

    assert result.returncode == EXIT_USAGE, result.stdout + result.stderr
    assert_plain_error(result.stderr, usage=True)
    assert result.stdout == ""


def test_debug_option_shows_the_traceback_of_an_error(tmp_path):
    result = run_cli("convert", "--debug", "missing.pth", "out.pth", cwd=tmp_path)

    assert result.returncode != EXIT_OK
    assert "Traceback" in result.stderr, f"--debug should show the traceback:\n{result.stderr}"
    assert "missing.pth: no such file" in result.stderr, result.stderr
    assert not (tmp_path / "out.pth").exists()
