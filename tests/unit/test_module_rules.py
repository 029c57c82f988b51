"""The package's structure rules, checked on the source text (parsed with `ast`; nothing of the
package is imported here, so a rule cannot be satisfied by import-time side effects):

- `zipfile` internals only where the expected list below says (the writers lay out the zip
  directory themselves; the reader's check of the end records still reads `start_dir`);
- only `d2.py`, `d2_loading.py`, `lazy_config.py`, `yaml_config.py`, `verify.py` and `conversion/testing/` import detectron2, and only
  `d2_loading.py` (the loading harness) touches `DetectionCheckpointer._load_model`, here or in tests;
- the CLI imports the public verbs only, no reader/writer internals, and nothing imports the CLI;
- no module uses Python's pure-Python pickler/unpickler internals (`pickle._Pickler`, `_Unpickler`,
  their `dispatch`, the framer): the unpickler and the writers handle opcodes themselves;
- nothing in `conversion/io/` imports in a circle (imports inside functions included);
- no file of the repository points to the project's contract files outside it;
- every module longer than 400 lines says why at its top, and a line count a docstring states is still roughly true;
- every error type is in `errors.py`;
- no test module imports another test module (shared helpers live in `tests/support/`).

The expected lists are literals: a change that breaks a rule, or that lets a list shrink, fails
here with a message saying which line to change.
"""
from __future__ import annotations

import ast
import functools
import re
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "conversion"
MAX_LINES = 400

# ---------------------------------------------------------------- the expected lists

# zipfile's documented names; anything else of the module, or the attributes below, is internal.
ZIPFILE_PUBLIC = {
    "ZipFile", "ZipInfo", "ZipExtFile", "PyZipFile", "Path", "BadZipFile", "BadZipfile", "LargeZipFile", "error",
    "is_zipfile", "ZIP_STORED", "ZIP_DEFLATED", "ZIP_BZIP2", "ZIP_LZMA",
}
# Undocumented attributes of ZipFile / ZipInfo objects (the central directory, the header codecs).
ZIPFILE_INTERNAL_ATTRIBUTES = {
    "NameToInfo", "start_dir", "FileHeader", "_EndRecData", "_EndRecData64", "_RealGetContents", "_SharedFile",
    "_writecheck", "_didModify", "_open_to_write", "_end_offset", "_raw_time", "_decodeExtra", "_writing",
    "sizeFileHeader", "structFileHeader", "stringFileHeader", "sizeCentralDir", "structCentralDir",
}
# Today's users, per module: the reader's end-record check alone (conversion/io/torch_writer.py
# writes the central directory with code of its own).
ZIPFILE_INTERNALS_EXPECTED: Dict[str, Set[str]] = {"conversion/io/torchzip.py": {"start_dir"}}

DETECTRON2_ALLOWED = {"conversion/d2.py", "conversion/d2_loading.py", "conversion/lazy_config.py", "conversion/verify.py", "conversion/yaml_config.py"}
DETECTRON2_ALLOWED_FOLDERS = ("conversion/testing/",)
LOAD_MODEL_WRAPPERS = {"conversion/d2_loading.py"}

# What the CLI may import: the public verbs and their report types, the layout names for --help and
# --from, the default prefix, the errors it prints, and the summaries it prints.
CLI_MAY_IMPORT = {
    "conversion", "conversion.errors", "conversion.inspection", "conversion.layouts", "conversion.pipeline",
    "conversion.summaries", "conversion.target", "conversion.verify",
}
CLI_IMPORTED_BY = {"conversion/__main__.py"}

# Attributes of the pure-Python pickle machinery (besides `pickle._Name` itself).
PICKLE_INTERNAL_ATTRIBUTES = {"framer", "_unframer", "current_frame", "commit_frame", "write_large_bytes", "dispatch"}
# Their users, per module: none (conversion/io/safe_pickle.py reads opcodes with a table of its
# own, conversion/io/pickle_writer.py writes them).
PICKLE_INTERNALS_EXPECTED: Dict[str, Set[str]] = {}

# Files of the package (and benchmarks) over MAX_LINES whose docstring does not say why: none.
LONG_WITHOUT_REASON_EXPECTED: Set[str] = set()
# Test modules over MAX_LINES the tests' reorganisation is splitting: none may be added.
LONG_TESTS_BEING_SPLIT = {"tests/io/test_faults.py"}
# How a docstring says it: "Over 400 lines on purpose: ...", "(About 480 lines: one handler per opcode ...)".
LONG_REASON = re.compile(r"\b(over|more than|about|nearly|some|~)\s*(\d{3,})\s+lines\b", re.IGNORECASE)
# A count a docstring states must still be roughly true: "about N lines" within this fraction of the
# file's length, "over N lines" still over N (a count left behind by a split would excuse the next growth).
STATED_COUNT_SLACK = 0.2

# Exception classes defined outside errors.py: only the CLI's SIGTERM signal (a BaseException so
# that no `except Exception` swallows it; it is no error a user can cause).
EXCEPTIONS_OUTSIDE_ERRORS = {"conversion/cli.py": {"_Terminated"}}

# The contract files kept outside the repository (spelled in pieces so this file does not name them).
OUTSIDE_FILES = re.compile(r"\b(" + "|".join(("DESIGN", "LAYOUTS", "BACKGROUND", "STYLE")) + r")\." + "md" + r"\b")
TEXT_SUFFIXES = {".py", ".md", ".toml", ".ini", ".cfg", ".txt", ".yaml", ".yml", ".sh", ".rst", ".json", ""}
SKIPPED_FOLDERS = {".git", ".tox", ".hypothesis", ".pytest_cache", "__pycache__", "build", "dist", ".venv", "venv"}


# ---------------------------------------------------------------- reading the source


def _relative(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _package_modules() -> List[Path]:
    return sorted(PACKAGE.rglob("*.py"))


@functools.lru_cache(maxsize=None)  # each module is parsed once for all the rules
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> Set[str]:
    """Every module `path` imports, anywhere in it (inside functions too), as absolute names."""
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found: Set[str] = set()
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            # `from . import d2_loading` imports a module, `from . import __version__` a name of the
            # package; `from .errors import X` imports from a module.
            if node.module is None:
                folder = ROOT.joinpath(*stem.split("."))
                for alias in node.names:
                    is_module = (folder / f"{alias.name}.py").is_file() or (folder / alias.name).is_dir()
                    found.add(f"{stem}.{alias.name}" if is_module else stem)
            else:
                found.add(stem)
    return found


def imported_names(path: Path, module: str) -> Set[str]:
    """Names taken with `from <module> import ...` (relative imports resolved)."""
    names: Set[str] = set()
    package = _module_name(path).rpartition(".")[0]
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - (node.level - 1)] if node.level else []
            stem = ".".join(base + ([node.module] if node.module else []))
            if stem == module:
                names |= {alias.name for alias in node.names}
    return names


def _attributes_of(tree: ast.AST, module: str) -> Iterator[Tuple[str, ast.Attribute]]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == module:
            yield node.attr, node


def zipfile_internals(path: Path) -> Set[str]:
    tree = _tree(path)
    used = {name for name, _ in _attributes_of(tree, "zipfile") if name not in ZIPFILE_PUBLIC}
    used |= {n for n in imported_names(path, "zipfile") if n not in ZIPFILE_PUBLIC}
    used |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr in ZIPFILE_INTERNAL_ATTRIBUTES}
    return used


def pickle_internals(path: Path) -> Set[str]:
    tree = _tree(path)
    used = {name for name, _ in _attributes_of(tree, "pickle") if name.startswith("_")}
    used |= {n for n in imported_names(path, "pickle") if n.startswith("_")}
    used |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr in PICKLE_INTERNAL_ATTRIBUTES}
    return used


def _repository_text_files() -> Iterator[Path]:
    for path in sorted(ROOT.rglob("*")):
        parts = path.relative_to(ROOT).parts
        if any(part in SKIPPED_FOLDERS or part.endswith(".egg-info") for part in parts[:-1]):
            continue
        if path.is_file() and path.suffix in TEXT_SUFFIXES and path.stat().st_size < 2**20:
            yield path


# ---------------------------------------------------------------- the rules


def test_zipfile_internals_only_where_expected():
    users = {_relative(p): zipfile_internals(p) for p in _package_modules() if zipfile_internals(p)}

    assert users == ZIPFILE_INTERNALS_EXPECTED, (
        f"zipfile internals in use: {users}; expected {ZIPFILE_INTERNALS_EXPECTED} (write the code without them, "
        "or, where one was dropped, shrink ZIPFILE_INTERNALS_EXPECTED)"
    )


def test_only_the_detectron2_side_imports_detectron2():
    importers = sorted(
        _relative(p) for p in _package_modules()
        if any(m == "detectron2" or m.startswith("detectron2.") for m in imported_modules(p))
    )

    outside = [m for m in importers if m not in DETECTRON2_ALLOWED and not m.startswith(DETECTRON2_ALLOWED_FOLDERS)]
    assert outside == [], f"modules importing detectron2 besides d2*.py, verify.py and testing/: {outside}"
    assert "conversion/d2_loading.py" in importers, "the rule reads imports inside functions (d2_loading's are)"


def test_only_the_loading_harness_wraps_load_model():
    sources = _package_modules() + sorted((ROOT / "tests").rglob("*.py")) + sorted((ROOT / "benchmarks").glob("*.py"))
    wrappers = {
        _relative(p) for p in sources
        if any(isinstance(n, ast.Attribute) and n.attr == "_load_model" for n in ast.walk(_tree(p)))
    }

    assert wrappers == LOAD_MODEL_WRAPPERS, (
        f"DetectionCheckpointer._load_model is observed in one place (conversion/d2_loading.py): {sorted(wrappers)}"
    )


def test_the_cli_imports_only_the_public_verbs():
    cli = PACKAGE / "cli.py"
    ours = {m for m in imported_modules(cli) if m == "conversion" or m.startswith("conversion.")}

    assert ours - CLI_MAY_IMPORT == set(), f"cli.py imports library internals: {sorted(ours - CLI_MAY_IMPORT)}"
    private = {f"{m}.{n}" for m in ours for n in imported_names(cli, m) if n.startswith("_") and n != "__version__"}
    assert private == set(), f"cli.py imports private names: {sorted(private)}"


def test_nothing_in_the_library_imports_the_cli():
    importers = {_relative(p) for p in _package_modules() if "conversion.cli" in imported_modules(p)}

    assert importers == CLI_IMPORTED_BY, (
        f"only __main__ may import the CLI (the library must not depend on it): {sorted(importers - CLI_IMPORTED_BY)}"
    )


def test_pickle_internals_only_where_the_redesign_still_leaves_them():
    users = {_relative(p): pickle_internals(p) for p in _package_modules() if pickle_internals(p)}

    added = {m: sorted(names - PICKLE_INTERNALS_EXPECTED.get(m, set())) for m, names in users.items()}
    added = {m: names for m, names in added.items() if names}
    assert added == {}, f"new uses of pickle internals (build on conversion/io/safe_pickle.py instead): {added}"
    gone = {m: sorted(names - users.get(m, set())) for m, names in PICKLE_INTERNALS_EXPECTED.items()}
    gone = {m: names for m, names in gone.items() if names}
    assert gone == {}, f"no longer used, so delete them from PICKLE_INTERNALS_EXPECTED: {gone}"


def import_cycle(graph: Dict[str, Set[str]]) -> List[str]:
    """One import cycle of `graph` (module -> the modules it imports) as the path round it, [] if none."""
    state: Dict[str, str] = {}  # module -> "open" while on the path, "done" after

    def visit(path: List[str]) -> List[str]:
        state[path[-1]] = "open"
        for imported in sorted(graph.get(path[-1], ())):
            if state.get(imported) == "open":
                return path[path.index(imported):] + [imported]
            found = [] if imported in state else visit(path + [imported])
            if found:
                return found
        state[path[-1]] = "done"
        return []

    for module in sorted(graph):
        found = [] if module in state else visit([module])
        if found:
            return found
    return []


def test_nothing_in_io_imports_in_a_circle():
    modules = {_module_name(p): p for p in sorted((PACKAGE / "io").glob("*.py"))}
    graph = {name: {m for m in imported_modules(path) if m in modules and m != name} for name, path in modules.items()}

    assert "conversion.io.torchzip" in graph["conversion.io.tensor_bytes"], "the rule reads imports inside functions (tensor_bytes' are)"
    assert import_cycle({"a": {"b"}, "b": {"c"}, "c": {"b"}}) == ["b", "c", "b"]
    cycle = import_cycle(graph)
    assert cycle == [], f"conversion/io/ imports in a circle (move the shared names down): {' -> '.join(cycle)}"


def test_no_file_points_to_contract_files_outside_the_repository():
    pointers = []
    for path in _repository_text_files():
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if OUTSIDE_FILES.search(line):
                pointers.append(f"{_relative(path)}:{number}: {line.strip()[:100]}")

    assert pointers == [], "write the fact itself instead of pointing outside the repository:\n" + "\n".join(pointers)


def _long_without_reason(paths: List[Path]) -> Dict[str, int]:
    out = {}
    for path in paths:
        lines = len(path.read_text(encoding="utf-8").splitlines())
        said = [int(m.group(2)) for m in LONG_REASON.finditer(ast.get_docstring(_tree(path)) or "")]
        if lines > MAX_LINES and not any(n >= MAX_LINES for n in said):
            out[_relative(path)] = lines
    return out


def _stale_line_counts(paths: List[Path]) -> Dict[str, str]:
    stale = {}
    for path in paths:
        lines = len(path.read_text(encoding="utf-8").splitlines())
        for m in LONG_REASON.finditer(ast.get_docstring(_tree(path)) or ""):
            word, said = m.group(1).lower(), int(m.group(2))
            true = lines > said if word in ("over", "more than") else abs(lines - said) <= STATED_COUNT_SLACK * said
            if not true:
                stale[_relative(path)] = f"says {m.group(0)!r}, has {lines}"
    return stale


def test_every_line_count_a_docstring_states_is_still_roughly_true():
    sources = _package_modules() + sorted((ROOT / "benchmarks").glob("*.py")) + sorted((ROOT / "tests").rglob("*.py"))
    stale = _stale_line_counts(sources)

    assert stale == {}, f"line counts in docstrings that are no longer true (update or drop them): {stale}"


def test_every_package_module_over_400_lines_says_why_at_its_top():
    found = _long_without_reason(_package_modules() + sorted((ROOT / "benchmarks").glob("*.py")))

    new = {m: n for m, n in found.items() if m not in LONG_WITHOUT_REASON_EXPECTED}
    assert new == {}, f"modules over {MAX_LINES} lines without 'Over 400 lines: <why>' in their docstring: {new}"
    fixed = sorted(LONG_WITHOUT_REASON_EXPECTED - set(found))
    assert fixed == [], f"these now say why or are short: delete them from LONG_WITHOUT_REASON_EXPECTED: {fixed}"


def test_no_test_module_grows_over_400_lines_without_saying_why():
    found = _long_without_reason(sorted((ROOT / "tests").rglob("*.py")))

    new = {m: n for m, n in found.items() if m not in LONG_TESTS_BEING_SPLIT}
    assert new == {}, f"test modules over {MAX_LINES} lines without a reason at their top (split by concern): {new}"


def _is_test_module(name: str) -> bool:
    return name.rpartition(".")[2].startswith("test_")


def test_no_test_module_imports_another_test_module():
    """Shared helpers live in tests/support/ (or a non-test module beside the tests): importing a test
    module runs its fixtures' and tests' definitions again under another name, and ties two files'
    tests together."""
    importers = {}
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        imported = sorted(m for m in imported_modules(path) if m.startswith("tests.") and _is_test_module(m))
        if imported:
            importers[_relative(path)] = imported

    assert importers == {}, f"test modules importing test modules (move the helpers to tests/support/): {importers}"


def _base_names(node: ast.ClassDef) -> Set[str]:
    return {b.id if isinstance(b, ast.Name) else b.attr for b in node.bases if isinstance(b, (ast.Name, ast.Attribute))}


def test_every_error_type_is_in_errors_py():
    ours = {n.name for n in ast.walk(_tree(PACKAGE / "errors.py")) if isinstance(n, ast.ClassDef)}
    assert "ConversionError" in ours

    def is_exception(base: str) -> bool:
        return base in ours or base.endswith(("Error", "Exception")) or base in {"Warning", "KeyboardInterrupt"}

    found = {}
    for path in _package_modules():
        if path.name == "errors.py":
            continue
        classes = [n for n in ast.walk(_tree(path)) if isinstance(n, ast.ClassDef)]
        names = {n.name for n in classes if any(map(is_exception, _base_names(n)))}
        if names:
            found[_relative(path)] = names
    assert found == EXCEPTIONS_OUTSIDE_ERRORS, f"error types outside conversion/errors.py (move them there): {found}"
