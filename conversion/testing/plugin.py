"""The convnext-d2 pytest plugin (entry point `pytest11`, installed with the package).

Inert unless asked: it adds namespaced options and two fixtures, and only when
`--convnext-d2-checkpoint PATH` or `--convnext-d2-config CONFIG` is given (without a checkpoint,
the config's own weights are gated) does it add the gate tests `test_convnext_d2_roundtrip_*`
(`-k roundtrip` selects them), which fail with verify's report or, for unusable input, the CLI's
error lines (docs/ci-gate.md).  Importing this module imports neither detectron2 nor hypothesis.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Tuple

import pytest

CHECKPOINT = "convnext_d2_checkpoint"
CONFIG = "convnext_d2_config"
IMPORTS = "convnext_d2_import"
SOURCE = "convnext_d2_source"
STRICT = "convnext_d2_strict"


@dataclass(frozen=True)
class GateOptions:
    """What the command line asked the gate to check."""

    checkpoint: Optional[str]
    config: Optional[str]
    imports: Tuple[str, ...]
    source: Optional[str]
    strict: bool

    @property
    def active(self) -> bool:
        """A checkpoint or a config (whose own weights are then checked) turns the gate on."""
        return bool(self.checkpoint or self.config)

    @classmethod
    def from_config(cls, config: pytest.Config) -> "GateOptions":
        return cls(
            checkpoint=config.getoption(CHECKPOINT, None),
            config=config.getoption(CONFIG, None),
            imports=tuple(config.getoption(IMPORTS, None) or ()),
            source=config.getoption(SOURCE, None),
            strict=bool(config.getoption(STRICT, False)),
        )


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("convnext-d2", "convnext-d2 weights gate (adds gate tests only when a checkpoint is given)")
    group.addoption("--convnext-d2-checkpoint", dest=CHECKPOINT, metavar="PATH",
                    help="a Detectron2 checkpoint to gate (default: the config's own weights); adds the test_convnext_d2_roundtrip_* tests")
    group.addoption("--convnext-d2-config", dest=CONFIG, metavar="YAML|LAZY.py",
                    help="the training config (a YAML or a LazyConfig .py, whose code runs); alone, gates the config's own weights")
    group.addoption("--convnext-d2-import", dest=IMPORTS, metavar="MODULE|FILE.py", action="append",
                    help="module or .py file that registers the config's backbone; repeatable, in order")
    group.addoption("--convnext-d2-source", dest=SOURCE, metavar="PATH",
                    help="the original checkpoint: also compare the backbone's features with it")
    group.addoption("--convnext-d2-strict", dest=STRICT, action="store_true", default=False,
                    help="warnings (e.g. unused checkpoint tensors) fail the gate too")


class GateItem(pytest.Item):
    """One gate test, run on the command line's files."""

    def __init__(self, *, check: Callable[[GateOptions], None], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._check = check

    def runtest(self) -> None:
        self._check(GateOptions.from_config(self.config))

    def repr_failure(self, excinfo: Any, style: Any = None) -> Any:
        if isinstance(excinfo.value, AssertionError):
            return str(excinfo.value)  # verify's report says everything: no traceback into this plugin
        return super().repr_failure(excinfo)

    def reportinfo(self) -> Tuple[str, Optional[int], str]:
        return self.name, None, f"convnext-d2 gate: {self.name}"


def _loads_clean(options: GateOptions) -> None:
    from . import assert_loads_clean

    assert_loads_clean(options.checkpoint, options.config, options.imports, strict=options.strict)


def _features_equal_source(options: GateOptions) -> None:
    from . import assert_loads_clean

    report = assert_loads_clean(options.checkpoint, options.config, options.imports, options.source, strict=options.strict)
    if report.feature_difference is None:
        raise AssertionError("verify compared no features with --convnext-d2-source (the load had a problem first)")


def _gate_items(session: pytest.Session, options: GateOptions) -> List[pytest.Item]:
    checks = [("test_convnext_d2_roundtrip_checkpoint_loads_clean", _loads_clean)]
    if options.source:
        checks.append(("test_convnext_d2_roundtrip_features_equal_the_source", _features_equal_source))
    # Not under any file: the node id says where they come from ("convnext-d2::test_...").
    return [GateItem.from_parent(session, name=name, nodeid=f"convnext-d2::{name}", check=check) for name, check in checks]


@pytest.hookimpl(tryfirst=True)  # before -k/-m deselection, so `-k roundtrip` applies to these too
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: List[pytest.Item]) -> None:
    options = GateOptions.from_config(config)
    if options.active:
        items.extend(_gate_items(session, options))


def pytest_report_header(config: pytest.Config) -> Optional[str]:
    options = GateOptions.from_config(config)
    if not options.active:
        return None  # inert: an installed plugin leaves other suites' output unchanged
    checked = options.checkpoint or "the config's own weights"
    return f"convnext-d2 gate: {checked}" + (f" with {options.config}" if options.config else "")


@pytest.fixture
def convnext_d2_gate(request: pytest.FixtureRequest) -> GateOptions:
    """The gate's command-line options; skips the test when no `--convnext-d2-checkpoint` was given."""
    options = GateOptions.from_config(request.config)
    if not options.active:
        pytest.skip("no --convnext-d2-checkpoint or --convnext-d2-config given: the weights gate is off")
    return options


@pytest.fixture
def convnext_d2_write_checkpoint(tmp_path: Any) -> Callable[..., str]:
    """`write_synthetic_checkpoint` with the file placed in this test's tmp_path: call it with a file name."""
    from .synthetic import write_synthetic_checkpoint

    def write(name: str = "synthetic.pth", **options: Any) -> str:
        return write_synthetic_checkpoint(os.path.join(str(tmp_path), name), **options)

    return write
