"""Every command the user documentation shows exists, with those options: each `convnext-d2 ...`
line (code blocks and inline code) is parsed by the real parser (`conversion.cli.build_parser`), and
each `pytest --convnext-d2-...` option is one the plugin defines.  docs/zh-CN.md, the Chinese
quickstart, is checked like the English pages."""
from __future__ import annotations

import re
import shlex
from typing import List

import pytest

from conversion.cli import build_parser

from ..support import plugin_option_names
from ..support.cli import ROOT

DOCS = ["docs/zh-CN.md", "docs/ci-gate.md", "README.md", "examples/dimaskdino-ci/README.md"]
_FENCE = re.compile(r"```(?:bash|sh|console)\n(.*?)```", re.S)
_INLINE = re.compile(r"`((?:convnext-d2|python -m conversion) [^`]+)`")


def shown_commands(text: str, program: str) -> List[str]:
    """Commands starting with `program` in shell code blocks (continuation lines joined, comments cut)
    and in inline code."""
    commands = []
    for block in _FENCE.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith(program + " "):
                commands.append(" ".join(line.split()))
    # Inline code is a command when it has arguments (`convnext-d2 verify` alone names the command).
    commands += [c for c in _INLINE.findall(text) if c.startswith(program + " ") and len(c.split()) > len(program.split()) + 1]
    return commands


def _parse(command: str) -> None:
    argv = shlex.split(command)
    argv = argv[1:] if argv[0] == "convnext-d2" else argv[3:]  # `python -m conversion`
    try:
        build_parser().parse_args(argv)
    except SystemExit as exit_:
        raise AssertionError(f"the documented command does not parse (exit {exit_.code}): {command}") from None


@pytest.mark.parametrize("doc", DOCS)
def test_every_documented_convnext_d2_command_parses(doc, capsys):
    commands = shown_commands((ROOT / doc).read_text(encoding="utf-8"), "convnext-d2")
    commands += shown_commands((ROOT / doc).read_text(encoding="utf-8"), "python -m conversion")
    assert commands, f"{doc} shows no convnext-d2 command"
    for command in commands:
        _parse(command)


@pytest.mark.parametrize("doc", DOCS)
def test_every_documented_plugin_option_exists(doc):
    options = set(plugin_option_names())
    for command in shown_commands((ROOT / doc).read_text(encoding="utf-8"), "pytest"):
        used = [a.split("=", 1)[0] for a in shlex.split(command) if a.startswith("--convnext-d2-")]
        assert set(used) <= options, f"{doc}: unknown plugin options {sorted(set(used) - options)} in: {command}"


def test_the_chinese_quickstart_covers_convert_verify_repair_the_gate_and_the_verdicts():
    text = (ROOT / "docs" / "zh-CN.md").read_text(encoding="utf-8")
    commands = shown_commands(text, "convnext-d2")
    for sub in ("convert", "verify", "repair"):
        assert any(c.split()[1] == sub for c in commands), f"docs/zh-CN.md shows no `convnext-d2 {sub}`"
    assert any("--import" in c and c.split("--import", 1)[1].split()[0].endswith(".py") for c in commands), \
        "the CPU-runner gate (--import path/to/backbone.py) is missing"
    for verdict in ("verify: OK", "verify: OK with warnings (N)", "verify: FAIL", "--strict", "assert_loads_clean"):
        assert verdict in text, f"docs/zh-CN.md does not mention {verdict!r}"
    # The fork's converter .pth and the MaskDINO-style .pkl: training starts from every weight (exit 0), --strict fails.
    for verdict in ("`OK with warnings (1)`", "`OK with warnings (N)`"):
        rows = [line for line in text.splitlines() if line.startswith("|") and verdict in line]
        assert rows and all("退出码 0" in r and "加 `--strict` 时退出码 1" in r for r in rows), f"no table row with {verdict}"
    prose = re.sub(r"```.*?```|`[^`]*`", "", text, flags=re.S)
    cjk = sum(1 for ch in prose if "\u4e00" <= ch <= "\u9fff")
    assert cjk > 0.5 * len(re.sub(r"\s", "", prose)), "docs/zh-CN.md should be written in Chinese (most of its prose is CJK)"


def test_a_wrong_command_in_a_doc_would_be_caught():
    """The check itself can fail: a misspelt option does not parse."""
    with pytest.raises(AssertionError, match="does not parse"):
        _parse("convnext-d2 verify W.pth --imports backbone.py")
    assert shown_commands("```bash\nconvnext-d2 verify a \\\n    --config b.yaml  # note\n```", "convnext-d2") == [
        "convnext-d2 verify a --config b.yaml"
    ]
