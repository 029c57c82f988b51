"""The command line as a user meets it: a real `python -m conversion` process, its exit status,
its stdout and its stderr (docs/design.md, "Public contract").

Each test here starts a Python process (about two seconds: it imports torch), so each one checks
something only a real process shows: the exit status the shell sees, what reaches stdout and
stderr, and that no traceback escapes.  Bad inputs in bulk are tested in-process in
test_bad_input.py.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Sequence

import pytest
import torch

from conversion import __version__
from conversion.architecture import RELEASED_VARIANTS, Architecture
from conversion.layouts import LAYOUTS

from ..strategies import wrap
from ..support import random_canonical_state_dict, torch_load_weights_only

ROOT = Path(__file__).resolve().parents[2]
PROG = "convnext-d2:"
EXIT_OK, EXIT_USAGE = 0, 2
# A process that imports torch takes ~2 s; a hung one must not hang the suite.
PROCESS_TIMEOUT_S = 120

CLASSIFIER = ["head.bias", "head.weight", "norm.bias", "norm.weight"]
FRESH = [f"backbone.norm{i}.{p}" for i in range(4) for p in ("weight", "bias")]
# The smallest released variant, so the summary has a real variant name to print.
ATTO = Architecture(*RELEASED_VARIANTS[1]["convnext_atto"], num_classes=10, classifier_norm=True)
# A tiny custom network for tests that do not care about the variant's name.
SMALL = Architecture(depths=(1, 1, 2, 1), dims=(8, 8, 16, 16), num_classes=3, classifier_norm=True)


# ---------------------------------------------------------------- helpers (test_bad_input.py uses them too)


def run_cli(*args: object, cwd: Path) -> subprocess.CompletedProcess:
    """Run `python -m conversion ARGS` in `cwd` with this checkout importable, as a user would."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return subprocess.run(
        [sys.executable, "-m", "conversion", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT_S,
    )


def error_lines(stderr: str, usage: bool = False) -> List[str]:
    """The lines of an error a user reads; with `usage`, argparse's usage block must lead and is set aside."""
    lines = stderr.splitlines()
    if usage:
        assert lines and lines[0].startswith("usage: convnext-d2"), f"expected argparse usage first:\n{stderr}"
        lines = [line for line in lines if not (line.startswith("usage:") or line.startswith(" "))]
    return lines


def assert_plain_error(stderr: str, usage: bool = False) -> None:
    """The contract (docs/design.md): errors are one or two plain lines on stderr, never a traceback (unless --debug)."""
    assert "Traceback" not in stderr, f"a traceback escaped:\n{stderr}"
    lines = error_lines(stderr, usage)
    assert 1 <= len(lines) <= 2, f"expected one or two error lines, got {len(lines)}:\n{stderr}"
    # argparse names a subcommand's parser "convnext-d2 convert"; our own errors always say "convnext-d2:".
    start = re.compile(r"convnext-d2( [a-z]+)?: ") if usage else re.compile(re.escape(PROG) + " ")
    assert all(start.match(line) for line in lines), f"every error line should start with {PROG!r}:\n{stderr}"


def kept_names(sd: Dict[str, torch.Tensor], prefix: str = "backbone.") -> List[str]:
    """The names a conversion writes: every non-classifier tensor, behind `prefix`."""
    return sorted(prefix + k for k in sd if k not in CLASSIFIER)


def written_model(path: Path) -> Dict[str, torch.Tensor]:
    """The `model` dict of a written .pth, read the way Detectron2 on torch >= 2.6 reads it."""
    return torch_load_weights_only(path)["model"]


def summary_field(stdout: str, label: str) -> str:
    """The value of one `  label    value` line of the human summary."""
    m = re.search(rf"^\s*{label}\s+(.*)$", stdout, re.MULTILINE)
    assert m, f"the summary has no '{label}' line:\n{stdout}"
    return m.group(1)


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


@pytest.mark.parametrize("extension", [".pth", ".pkl"], ids=["torch-file", "model-zoo-pickle"])
def test_convert_writes_the_file_and_summarises_layout_variant_kept_and_dropped(atto, tmp_path, extension):
    src, sd = atto
    dst = tmp_path / f"convnext_atto_d2{extension}"

    result = run_cli("convert", src, dst.name, cwd=tmp_path)

    assert result.returncode == EXIT_OK, result.stderr
    assert result.stderr == "", f"a successful run should be silent on stderr:\n{result.stderr}"
    assert dst.is_file() and dst.stat().st_size > 0, f"{dst} was not written"
    out = result.stdout
    assert summary_field(out, "layout").startswith("official"), out
    assert summary_field(out, "variant").startswith("convnext_atto,"), out
    kept = re.match(r"(\d+) tensors", summary_field(out, "kept"))
    assert kept and int(kept.group(1)) == len(kept_names(sd)), f"kept should count every non-classifier tensor:\n{out}"
    dropped = re.fullmatch(r"(\d+) tensors, classifier only [^:]*: (.*)", summary_field(out, "dropped"))
    assert dropped, out
    assert int(dropped.group(1)) == len(CLASSIFIER)
    assert sorted(dropped.group(2).split(", ")) == CLASSIFIER
    assert str(dst) in summary_field(out, "wrote"), out


def test_json_report_is_the_whole_stdout_and_describes_the_written_file(atto, tmp_path):
    src, sd = atto
    dst = tmp_path / "out.pkl"

    result = run_cli("convert", src, dst.name, "--json", cwd=tmp_path)

    assert result.returncode == EXIT_OK, result.stderr
    report = json.loads(result.stdout)  # the whole stdout: nothing printed around the JSON
    assert {"layout", "variant", "kept", "dropped", "fresh", "prefix", "format", "bytes_written"} <= set(report)
    assert report["layout"] == "official"
    assert report["variant"] == "convnext_atto"
    assert report["kept"] == len(kept_names(sd))
    assert sorted(report["dropped"]) == CLASSIFIER
    assert sorted(report["fresh"]) == sorted(FRESH), "the four output norms are the only fresh keys"
    assert len(report["fresh"]) == len(FRESH), f"fresh keys repeated: {report['fresh']}"
    assert report["prefix"] == "backbone."
    assert report["format"] == "pickle"
    assert report["bytes_written"] == os.path.getsize(dst), "bytes_written must be the size of the file on disk"


@pytest.mark.parametrize(
    "args, prefix",
    [([], "backbone."), (["--prefix", ""], ""), (["--prefix", "model.backbone."], "model.backbone.")],
    ids=["default-backbone", "empty", "model.backbone"],
)
def test_prefix_option_sets_the_prefix_of_every_written_name(small, tmp_path, args, prefix):
    src, sd = small
    dst = tmp_path / "out.pth"

    result = run_cli("convert", src, dst, *args, cwd=tmp_path)

    assert result.returncode == EXIT_OK, result.stderr
    model = written_model(dst)
    assert sorted(model) == kept_names(sd, prefix)
    for name in sd:
        if name not in CLASSIFIER:
            assert torch.equal(model[prefix + name], sd[name]), f"{prefix + name} differs from {name}"


@pytest.mark.parametrize("use_ema", [True, False], ids=["--ema-takes-model_ema", "default-takes-model"])
def test_ema_option_chooses_between_the_ema_and_the_model_weights_of_a_training_checkpoint(training, tmp_path, use_ema):
    src, model, ema = training
    expected = ema if use_ema else model
    dst = tmp_path / "out.pth"

    result = run_cli("convert", src, dst, *(["--ema"] if use_ema else []), cwd=tmp_path)

    assert result.returncode == EXIT_OK, result.stderr
    written = written_model(dst)
    assert sorted(written) == kept_names(expected)
    wrong = [k for k in expected if k not in CLASSIFIER and not torch.equal(written["backbone." + k], expected[k])]
    assert wrong == [], f"{len(wrong)} tensors are not the {'EMA' if use_ema else 'model'} weights: {wrong[:5]}"


def test_ema_option_on_a_file_without_ema_weights_exits_2_saying_so(small, tmp_path):
    src, _ = small
    dst = tmp_path / "out.pth"

    result = run_cli("convert", src, dst, "--ema", cwd=tmp_path)

    assert result.returncode == EXIT_USAGE, result.stdout + result.stderr
    assert "EMA" in result.stderr, result.stderr
    assert_plain_error(result.stderr)
    assert not dst.exists()


def test_from_official_reads_the_file_as_the_official_layout(small, tmp_path):
    src, sd = small
    dst = tmp_path / "out.pth"

    result = run_cli("convert", src, dst, "--from", "official", "--json", cwd=tmp_path)

    assert result.returncode == EXIT_OK, result.stderr
    assert json.loads(result.stdout)["layout"] == "official"
    assert sorted(written_model(dst)) == kept_names(sd)


def test_from_an_unknown_layout_exits_2_naming_the_known_layouts(small, tmp_path):
    src, _ = small

    result = run_cli("convert", src, tmp_path / "out.pth", "--from", "nosuchlayout", cwd=tmp_path)

    assert result.returncode == EXIT_USAGE, result.stdout + result.stderr
    assert "nosuchlayout" in result.stderr, result.stderr
    missing = [name for name in LAYOUTS if name not in result.stderr]
    assert missing == [], f"the error should name every known layout, lacks {missing}:\n{result.stderr}"
    assert_plain_error(result.stderr, usage=True)  # refused while parsing the arguments
    assert not (tmp_path / "out.pth").exists()


def test_version_option_prints_the_package_version(tmp_path):
    result = run_cli("--version", cwd=tmp_path)

    assert result.returncode == EXIT_OK, result.stderr
    assert __version__ in result.stdout, result.stdout


@pytest.mark.parametrize(
    "args",
    [[], ["frobnicate"], ["convert", "only-a-source.pth"]],
    ids=["no-arguments", "unknown-command", "convert-without-destination"],
)
def test_argument_errors_exit_2_with_the_usage_line(tmp_path, args: Sequence[str]):
    result = run_cli(*args, cwd=tmp_path)

    assert result.returncode == EXIT_USAGE, result.stdout + result.stderr
    assert_plain_error(result.stderr, usage=True)
    assert result.stdout == ""


def test_debug_option_shows_the_traceback_of_an_error(tmp_path):
    result = run_cli("convert", "--debug", "missing.pth", "out.pth", cwd=tmp_path)

    assert result.returncode != EXIT_OK
    assert "Traceback" in result.stderr, f"--debug should show the traceback:\n{result.stderr}"
    assert "missing.pth: no such file" in result.stderr, result.stderr
    assert not (tmp_path / "out.pth").exists()
