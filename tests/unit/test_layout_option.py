"""`--from LAYOUT[-v1|-v2]`: one parser (`layouts.parse_layout_option`) for the CLI and the Python
API's `layout=`; the CLI parses it with the arguments, so a wrong name is refused before any file
is read; a pinned version that the weights contradict is refused naming the evidence."""
from __future__ import annotations

import pytest

from conversion import convert
from conversion.architecture import RELEASED_VARIANTS, Architecture
from conversion.cli import build_parser
from conversion.errors import NotConvNeXt
from conversion.inspection import inspect_checkpoint
from conversion.layouts import LayoutOption, check_pinned_version, parse_layout_option, to_canonical
from conversion.testing import write_synthetic_checkpoint

from ..support import random_canonical_state_dict

# The layout names `--from` accepts, written out (not read from the table under test).
LAYOUT_NAMES = [
    "official", "timm", "timm-features", "open_clip", "huggingface", "torchvision", "mmpretrain", "dinov3", "dinov3-hf",
]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("official", ("official", None)),
        ("official-v1", ("official", 1)),
        ("timm-v2", ("timm", 2)),
        ("timm-features", ("timm-features", None)),
        ("timm-features-v2", ("timm-features", 2)),
        ("dinov3-hf", ("dinov3-hf", None)),  # a name with a dash is not a version pin
        ("dinov3-hf-v1", ("dinov3-hf", 1)),
        ("open_clip-v1", ("open_clip", 1)),
    ],
)
def test_a_layout_name_and_an_optional_version_pin_parse(text, expected):
    option = parse_layout_option(text)

    assert option == LayoutOption(*expected)
    assert option.text == text


@pytest.mark.parametrize("name", LAYOUT_NAMES)
def test_every_layout_name_parses_bare_and_pinned(name):
    assert parse_layout_option(name) == (name, None)
    assert parse_layout_option(f"{name}-v1") == (name, 1)
    assert parse_layout_option(f"{name}-v2") == (name, 2)


@pytest.mark.parametrize("text", ["bogus", "official-v3", "official-v", "-v1", "Official", "timm_v1", "bogus-v1", ""])
def test_a_name_no_layout_has_is_refused_listing_the_known_ones(text):
    with pytest.raises(NotConvNeXt, match=f"unknown layout '{text}'") as caught:
        parse_layout_option(text)

    assert [name for name in LAYOUT_NAMES if name not in caught.value.hint] == []


def test_nothing_or_an_option_already_parsed_passes_through():
    parsed = LayoutOption("timm", 2)

    assert parse_layout_option(None) is None
    assert parse_layout_option(parsed) is parsed


def test_the_cli_hands_on_the_parsed_option():
    args = build_parser().parse_args(["convert", "a.pth", "b.pth", "--from", "official-v2"])

    assert args.layout == LayoutOption("official", 2)
    assert build_parser().parse_args(["inspect", "a.pth"]).layout is None


@pytest.mark.parametrize("command", [["convert", "SRC", "DST.pth"], ["inspect", "SRC"]])
def test_the_cli_refuses_a_wrong_name_while_parsing_before_reading_any_file(command, capsys):
    # SRC does not exist: the refusal must be about --from, so it came before any file was opened.
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(command + ["--from", "official-v3"])

    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "argument --from: unknown layout 'official-v3'" in err and "SRC" not in err.splitlines()[-1]


V1 = Architecture(*RELEASED_VARIANTS[1]["convnext_atto"])
V2 = Architecture(*RELEASED_VARIANTS[2]["convnextv2_atto"], version=2, layer_scale=False)


@pytest.mark.parametrize("arch, pinned, refused", [(V1, 1, False), (V1, 2, True), (V2, 2, False), (V2, 1, True)])
def test_a_pinned_version_the_weights_contradict_is_refused_naming_the_evidence(arch, pinned, refused):
    canonical = to_canonical(random_canonical_state_dict(arch))
    option = LayoutOption("official", pinned)

    if not refused:
        check_pinned_version(option, canonical, arch.version)
        return
    evidence = "no GRN tensors" if arch.version == 1 else "stages.0.0.grn."
    with pytest.raises(NotConvNeXt, match=f"--from official-v{pinned}: the weights are ConvNeXt V{arch.version} "
                                          f"\\(evidence: {evidence}") as caught:
        check_pinned_version(option, canonical, arch.version)
    assert caught.value.hint == f"Use --from official-v{arch.version}, or drop --from."


def test_without_a_pin_any_version_passes():
    canonical = to_canonical(random_canonical_state_dict(V2))

    check_pinned_version(None, canonical, 2)
    check_pinned_version(LayoutOption("official"), canonical, 2)


# The library's verbs take `--from` through the same parser as the CLI (text or a parsed option).


@pytest.fixture
def atto_file(tmp_path):
    """An official ConvNeXt-Atto (V1) file."""
    path = str(tmp_path / "atto.pth")
    write_synthetic_checkpoint(path, variant="convnext_atto")
    return path


def test_inspect_takes_a_pinned_layout_as_convert_does(atto_file):
    report = inspect_checkpoint(atto_file, layout="official-v1")

    assert (report.layout, report.version) == ("official", 1)
    with pytest.raises(NotConvNeXt, match=r"--from official-v2: the weights are ConvNeXt V1 \(evidence: no GRN"):
        inspect_checkpoint(atto_file, layout="official-v2")


def test_convert_takes_the_option_the_cli_parsed(atto_file, tmp_path):
    report = convert(atto_file, str(tmp_path / "out.pth"), layout=LayoutOption("official", 1))

    assert (report.layout, report.version) == ("official", 1)


def test_convert_takes_the_text_the_python_api_documents(atto_file, tmp_path):
    assert convert(atto_file, str(tmp_path / "out.pth"), layout="official-v1").layout == "official"
    with pytest.raises(NotConvNeXt, match=r"--from official-v2: the weights are ConvNeXt V1 \(evidence: no GRN"):
        convert(atto_file, str(tmp_path / "out2.pth"), layout="official-v2")
    assert not (tmp_path / "out2.pth").exists()
