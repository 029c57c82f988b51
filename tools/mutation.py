"""Mutation testing of `conversion/`: how many small, plausible bugs does the suite notice?

Why a tool of the project's own: the suite's strongest tests run the converter in other
interpreters (the CLI as `python -m conversion`, the downstream pytest runs of the gate tests, the
fault-injection runs that kill a conversion mid-write).  mutmut 3 switches mutants on with
in-process trampolines and an environment variable read by its own runner, and its per-test
selection comes from its in-process stats run: code run in a child interpreter is neither seen nor
selected.  cosmic-ray mutates the files on disk (so children would see a mutant) but selects no
tests per mutant and runs the whole test command each time (about 70 s here), about six hours per
300 mutants on two cores.  This tool applies each mutant to a scratch copy of the tree that every
process imports (PYTHONPATH), and runs first only the tests that execute the mutated line, learnt
from one coverage run with a context per test in every process.

What it does, in order:

1. Finds the mutation sites of every module under conversion/ (`ast`): comparison swaps
   (`==`/`!=`, `<`/`>=`, `<=`/`>`, `is`/`is not`, `in`/`not in`), boolean swaps (`and`/`or`,
   `not x` -> `x`, True/False), numeric constants (n -> n + 1), `return X` -> `return None`,
   `raise` -> `pass`, statement deletion (a call or an assignment -> `pass`) and slice bounds
   (a bound b -> b + 1).  Docstrings, annotations, `__all__` and `TYPE_CHECKING` blocks are not
   mutated.
2. Draws a reproducible sample, stratified by module (each module's share in proportion to its
   sites, at least one each): the draw in a module is seeded by that module's path and text, so a
   change to one module redraws only that module's mutants.
3. Runs the suite once under coverage (`.coveragerc`'s settings; every process, with a coverage
   context per test: the test's node id, in the xdist workers by this file's pytest plugin and in
   the processes a test starts through an environment variable the children read) and keeps, per
   line, the tests that executed it.  Cached under the output folder, keyed by the tree's text.
4. Runs each mutant in a scratch copy of the repository (one per worker): first the tests that
   executed its line (`-x`, a timeout per mutant); if they all pass, the test files that executed
   anything in the module (processes killed by a test save no coverage, so their lines may have no
   test recorded); if the mutant is at module level (run at import, recorded outside any test) or
   nothing executed the line, the whole suite.  A mutant is killed when a test fails, errors or
   the run times out; survived when every run passed; `no-tests` when no test executes its line
   (uncovered code, reported apart).
5. A survivor whose id is in tools/mutation_equivalent.txt (one line each: id, then the reason,
   judged by hand) is counted as equivalent instead; the score is killed / (killed + survived).

Writes to the output folder (default .mutation/): results.jsonl (one mutant per line: id, module,
line, operator, the original and mutated text, verdict, which stage decided, seconds) and
report.md (the per-module table, then every survivor with its diff, to review or to record) and
coverage.txt and coverage.json (line and branch coverage of the package from the same run, every
process included).

    python tools/mutation.py [--sample 300] [--jobs 2] [--budget SECONDS] [--timeout SECONDS]
                             [--modules io/,pipeline.py] [--out .mutation] [--list]

`tox -e mutation -- --budget 3600` runs it in the coverage environment; with a budget the run
stops starting mutants when the time is spent and reports what it has (unrun mutants are listed).
"""
from __future__ import annotations

import argparse
import ast
import concurrent.futures
import copy
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Set, Tuple

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "conversion"
EQUIVALENT_FILE = ROOT / "tools" / "mutation_equivalent.txt"
# The environment variable through which a test's node id reaches the processes it starts.
CONTEXT_VARIABLE = "CONVNEXT_D2_MUTATION_CONTEXT"
# The file listing the node ids a mutant's run keeps (the others are deselected).
SELECT_VARIABLE = "CONVNEXT_D2_MUTATION_SELECT"
# What a scratch copy leaves out: environments, caches, earlier outputs.
COPY_IGNORE = shutil.ignore_patterns(".git", ".tox", ".venv*", ".mutation", "__pycache__", ".hypothesis",
                                     ".pytest_cache", ".coverage*", "htmlcov", "*.egg-info", "build", "dist")
WHOLE_SUITE_TIMEOUT_S = 900
COMPARISON_SWAPS = {ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.Lt: ast.GtE, ast.GtE: ast.Lt, ast.LtE: ast.Gt,
                    ast.Gt: ast.LtE, ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In}


# ---------------------------------------------------------------- mutants


@dataclass(frozen=True)
class Mutant:
    """One small change to one module: the text from (line, col) to (end_line, end_col) becomes `mutated`."""

    id: str
    module: str  # path relative to the repository root
    operator: str
    line: int
    col: int
    end_line: int
    end_col: int
    original: str
    mutated: str
    module_level: bool  # run when the module is imported, not when a function is called

    def apply(self, text: str) -> str:
        """The module's text with this mutant in it; line numbers are kept (padding newlines)."""
        lines = text.splitlines(keepends=True)
        start = sum(len(x) for x in lines[: self.line - 1]) + self.col
        end = sum(len(x) for x in lines[: self.end_line - 1]) + self.end_col
        padding = "\n" * (self.end_line - self.line)
        replacement = self.mutated + padding if self.operator.startswith("statement") else _bracketed(self.mutated, padding)
        return text[:start] + replacement + text[end:]


def _bracketed(expression: str, padding: str) -> str:
    """An expression that stays one expression wherever it is put, newlines included."""
    return f"({expression}{padding})"


def _column(line_text: str, byte_col: int) -> int:
    """ast gives columns in UTF-8 bytes; mutants are placed by characters (non-ASCII lines differ)."""
    return len(line_text.encode("utf-8")[:byte_col].decode("utf-8", errors="replace"))


class _SiteFinder(ast.NodeVisitor):
    """Collects (operator, node, mutated source) for every site of a module's tree."""

    def __init__(self) -> None:
        self.sites: List[Tuple[str, ast.AST, str, bool, str]] = []
        self._scope: List[str] = []
        self._skip_ids: Set[int] = set()

    # -- scopes and places that are not mutated
    def _visit_scope(self, node: ast.AST, name: str) -> None:
        body = getattr(node, "body", [])
        if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                and isinstance(body[0].value.value, str):
            self._skip_ids.add(id(body[0]))
        for arg_node in ast.walk(node.args) if hasattr(node, "args") and isinstance(node.args, ast.arguments) else []:
            if isinstance(arg_node, ast.arg) and arg_node.annotation is not None:
                self._skip_subtree(arg_node.annotation)
        if getattr(node, "returns", None) is not None:
            self._skip_subtree(node.returns)
        for decorator in getattr(node, "decorator_list", []):
            self._skip_subtree(decorator)
        self._scope.append(name)
        self.generic_visit(node)
        self._scope.pop()

    def _skip_subtree(self, node: ast.AST) -> None:
        self._skip_ids.update(id(n) for n in ast.walk(node))

    def visit_Module(self, node: ast.Module) -> None:
        self._visit_scope(node, "<module>")

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self._visit_scope(node, node.name)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self._visit_scope(node, node.name)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        self._skip_subtree(node.annotation)
        if node.value is not None:  # a declaration alone (a dataclass field) is not a statement that runs
            self._statement(node)
        self.generic_visit(node)

    def visit_If(self, node: ast.If) -> None:
        if "TYPE_CHECKING" in ast.unparse(node.test):
            return
        self.generic_visit(node)

    _in_function = False

    def _add(self, operator: str, node: ast.AST, mutated: str) -> None:
        if id(node) not in self._skip_ids:
            self.sites.append((operator, node, mutated, not self._in_function, ".".join(self._scope[1:]) or "<module>"))

    def visit_JoinedStr(self, node: ast.JoinedStr) -> None:
        """Not mutated: CPython 3.10 gives no reliable positions inside f-strings."""

    def generic_visit(self, node: ast.AST) -> None:
        was = self._in_function
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            self._in_function = True
        super().generic_visit(node)
        self._in_function = was

    # -- statements
    def _statement(self, node: ast.stmt) -> None:
        if id(node) in self._skip_ids:
            return
        if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)) and any(
                isinstance(t, ast.Name) and t.id == "__all__" for t in getattr(node, "targets", [getattr(node, "target", None)])):
            self._skip_subtree(node)
            return
        self._add("statement-deletion", node, "pass")

    def visit_Expr(self, node: ast.Expr) -> None:
        if isinstance(node.value, ast.Call):
            self._statement(node)
        self.generic_visit(node)

    def visit_Assign(self, node: ast.Assign) -> None:
        self._statement(node)
        self.generic_visit(node)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        self._statement(node)
        self.generic_visit(node)

    def visit_Return(self, node: ast.Return) -> None:
        if node.value is not None and not (isinstance(node.value, ast.Constant) and node.value.value is None):
            self._add("statement-return-none", node, "return None")
        self.generic_visit(node)

    def visit_Raise(self, node: ast.Raise) -> None:
        self._add("statement-raise-pass", node, "pass")
        self.generic_visit(node)

    # -- expressions
    def visit_Compare(self, node: ast.Compare) -> None:
        for index, op in enumerate(node.ops):
            swap = COMPARISON_SWAPS.get(type(op))
            if swap is not None:
                mutated = copy.deepcopy(node)
                mutated.ops[index] = swap()
                self._add(f"comparison {_op_text(op)}->{_op_text(swap())}", node, ast.unparse(mutated))
        self.generic_visit(node)

    def visit_BoolOp(self, node: ast.BoolOp) -> None:
        mutated = copy.deepcopy(node)
        mutated.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        self._add("boolean and<->or", node, ast.unparse(mutated))
        self.generic_visit(node)

    def visit_UnaryOp(self, node: ast.UnaryOp) -> None:
        if isinstance(node.op, ast.Not):
            self._add("boolean not x->x", node, ast.unparse(node.operand))
        self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> None:
        value = node.value
        if isinstance(value, bool):
            self._add("boolean True<->False", node, repr(not value))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            self._add("constant n->n+1", node, repr(value + 1))

    def visit_Slice(self, node: ast.Slice) -> None:
        for bound in (node.lower, node.upper):
            if bound is not None:
                self._add("slice bound b->b+1", bound, f"{ast.unparse(bound)} + 1")
        self.generic_visit(node)


def _op_text(op: ast.cmpop) -> str:
    return {ast.Eq: "==", ast.NotEq: "!=", ast.Lt: "<", ast.GtE: ">=", ast.LtE: "<=", ast.Gt: ">", ast.Is: "is",
            ast.IsNot: "is not", ast.In: "in", ast.NotIn: "not in"}[type(op)]


def module_mutants(path: Path) -> List[Mutant]:
    """Every mutant of one module, each with an id stable under edits elsewhere in the module: the
    module, the enclosing scope, the operator and a hash of the original and mutated text (and its
    rank among equal ones in that scope)."""
    text = path.read_text(encoding="utf-8")
    tree = ast.parse(text)
    finder = _SiteFinder()
    finder.visit(tree)
    lines = text.splitlines()
    relative = path.relative_to(ROOT).as_posix()
    seen: Dict[str, int] = {}
    mutants = []
    for operator, node, mutated, module_level, scope in finder.sites:
        line, end_line = node.lineno, node.end_lineno
        col = _column(lines[line - 1], node.col_offset)
        end_col = _column(lines[end_line - 1], node.end_col_offset)
        original = ast.get_source_segment(text, node) or ""
        digest = hashlib.sha1(f"{operator}\0{original}\0{mutated}".encode()).hexdigest()[:8]
        key = f"{relative}:{scope}:{digest}"
        seen[key] = seen.get(key, 0) + 1
        mutant_id = key if seen[key] == 1 else f"{key}.{seen[key]}"
        mutants.append(Mutant(mutant_id, relative, operator, line, col, end_line, end_col, original, mutated, module_level))
    return [m for m in mutants if _compiles(m, text)]


def _compiles(mutant: Mutant, text: str) -> bool:
    """A mutant the compiler refuses (e.g. `pass` where an expression is needed) is no mutant."""
    try:
        compile(mutant.apply(text), mutant.module, "exec")
    except SyntaxError:
        return False
    return mutant.apply(text) != text


def package_modules(selection: Sequence[str]) -> List[Path]:
    modules = sorted((ROOT / PACKAGE).rglob("*.py"))
    if selection:
        modules = [m for m in modules if any(m.relative_to(ROOT / PACKAGE).as_posix().startswith(s) for s in selection)]
    return modules


def draw_sample(per_module: Dict[str, List[Mutant]], texts: Dict[str, str], size: int) -> List[Mutant]:
    """`size` mutants (about), stratified by module: each module's share in proportion to its sites,
    at least one; the draw in a module is seeded by the module's path and text."""
    total = sum(len(ms) for ms in per_module.values())
    sample = []
    for module, mutants in sorted(per_module.items()):
        if not mutants:
            continue
        share = max(1, round(size * len(mutants) / total))
        seed = int(hashlib.sha256(f"{module}\0{texts[module]}".encode()).hexdigest()[:16], 16)
        sample.extend(random.Random(seed).sample(mutants, min(share, len(mutants))))
    return sample


# ---------------------------------------------------------------- the per-test coverage map


def tree_key() -> str:
    """The text of the package and of the tests: the coverage map is reused while neither changes."""
    digest = hashlib.sha256()
    for path in sorted(list((ROOT / PACKAGE).rglob("*.py")) + list((ROOT / "tests").rglob("*.py")) + [ROOT / "conftest.py"]):
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def coverage_map(out: Path, jobs: int) -> Dict[str, Dict[int, List[str]]]:
    """module -> line -> the node ids of the tests that executed it ("" when outside any test)."""
    cached = out / "coverage-map.json"
    key = tree_key()
    if cached.is_file():
        data = json.loads(cached.read_text())
        if data.get("key") == key:
            return {m: {int(k): v for k, v in lines.items()} for m, lines in data["lines"].items()}
    work = out / "map"
    shutil.rmtree(work, ignore_errors=True)
    tree = work / "tree"
    shutil.copytree(ROOT, tree, ignore=COPY_IGNORE)
    rcfile = work / "coveragerc"
    # No `patch = subprocess` here: COVERAGE_PROCESS_START (below) makes every process read this
    # file itself at its start, so `context` takes the node id each process inherits.
    rcfile.write_text(f"[run]\nbranch = true\nsource_pkgs = {PACKAGE}\nparallel = true\ndata_file = {work}/.coverage\n"
                      f"patch = _exit\ncontext = ${{{CONTEXT_VARIABLE}}}\n"
                      f"[paths]\nsource =\n    {tree}/{PACKAGE}/\n    */site/{PACKAGE}/\n    */site-packages/{PACKAGE}/\n"
                      f"[report]\nprecision = 1\nskip_empty = true\n")
    env = _child_environment(tree)
    env["COVERAGE_PROCESS_START"] = str(rcfile)
    started = time.monotonic()
    command = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", "-p", "mutation",
               "-n", str(jobs), "--dist", "loadfile"]
    run = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True)
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
    print(f"coverage map: the suite under coverage, {time.monotonic() - started:.0f} s, exit {run.returncode}: {summary}",
          file=sys.stderr)
    # A test that fails without any mutant would "kill" every mutant it runs for: left out of the
    # map, and named here (fix it, then rerun).
    failing = sorted(set(line.split()[1] for line in run.stdout.splitlines() if line.startswith(("FAILED ", "ERROR "))))
    if run.returncode not in (0, 1) or (run.returncode == 1 and not failing):
        print(run.stdout[-4000:], file=sys.stderr)
        raise SystemExit("the suite does not run without any mutant: fix it first")
    for node_id in failing:
        print(f"coverage map: left out, fails without a mutant: {node_id}", file=sys.stderr)
    import coverage

    combined = coverage.Coverage(data_file=str(work / ".coverage"), config_file=str(rcfile))
    combined.combine(data_paths=[str(work)])
    data = combined.get_data()
    # The same run measures the package's line and branch coverage (as `tox -e coverage` does).
    report = io.StringIO()
    combined.report(file=report)
    text = report.getvalue().replace(f"{tree}/", "").replace(f"{os.path.relpath(tree)}/", "")  # paths as conversion/...
    (out / "coverage.txt").write_text(text, encoding="utf-8")
    combined.json_report(outfile=str(out / "coverage.json"))  # per module: lines and branches, covered and missed
    lines: Dict[str, Dict[int, List[str]]] = {}
    for filename in data.measured_files():
        relative = _package_path(filename, tree)
        if relative is None:
            continue
        merged = lines.setdefault(relative, {})
        for line, contexts in data.contexts_by_lineno(filename).items():
            merged[line] = sorted((set(merged.get(line, [])) | set(contexts)) - set(failing))
    cached.write_text(json.dumps({"key": key, "lines": lines}))
    shutil.rmtree(work, ignore_errors=True)
    return lines


def _package_path(filename: str, tree: Path) -> Optional[str]:
    """conversion/... for a measured file: in the scratch tree, or in a site directory a test
    installed the package into (the wheel test)."""
    path = Path(filename).resolve()
    if path.is_relative_to(tree.resolve()):
        return path.relative_to(tree.resolve()).as_posix()
    for marker in (f"/site/{PACKAGE}/", f"/site-packages/{PACKAGE}/"):
        if marker in filename:
            return PACKAGE + "/" + filename.split(marker, 1)[1]
    return None


# ---------------------------------------------------------------- running mutants


def _child_environment(tree: Path) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COVERAGE_") and k != "PYTEST_ADDOPTS"}
    env["PYTHONPATH"] = os.pathsep.join([str(tree), str(ROOT / "tools")])
    # No bytecode: a mutated module written within the same second as the original, with the same
    # size, would otherwise be read from the original's stale .pyc.
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.setdefault("HYPOTHESIS_PROFILE", "ci")
    env.setdefault("CONVNEXT_D2_FULL", "1")
    return env


@dataclass
class Result:
    id: str
    module: str
    line: int
    operator: str
    original: str
    mutated: str
    verdict: str  # killed, survived, equivalent, no-tests, timeout (the whole suite ran past its limit: rerun)
    stage: str  # which run decided: line-tests, module-files, whole-suite, timeout
    seconds: float
    failing: str = ""


class Worker:
    """A scratch copy of the tree in which one mutant at a time is applied and tested."""

    def __init__(self, out: Path, index: int, timeout: float) -> None:
        self.tree = out / "work" / f"w{index}"
        shutil.rmtree(self.tree, ignore_errors=True)
        shutil.copytree(ROOT, self.tree, ignore=COPY_IGNORE)
        self.select = self.tree.parent / f"select-{index}.txt"
        self.timeout = timeout
        # The whole suite runs serially here: a timeout would be the machine's load, not the mutant.
        self.suite_timeout = max(timeout, WHOLE_SUITE_TIMEOUT_S)

    def run(self, mutant: Mutant, line_tests: List[str], module_tests: List[str]) -> Result:
        started = time.monotonic()
        path = self.tree / mutant.module
        original = path.read_text(encoding="utf-8")
        path.write_text(mutant.apply(original), encoding="utf-8")
        try:
            stages: List[Tuple[str, Optional[List[str]]]] = []
            if line_tests:
                stages.append(("line-tests", line_tests))
            if sorted(set(_file_of(t) for t in module_tests)) != sorted(set(_file_of(t) for t in line_tests)) or not line_tests:
                stages.append(("module-files", sorted(set(_file_of(t) for t in module_tests))))
            if mutant.module_level or not line_tests:
                stages.append(("whole-suite", None))
            verdict, stage, failing = "survived", stages[-1][0] if stages else "", ""
            for stage, tests in stages:
                if tests == []:
                    continue
                outcome, failing = self._pytest(tests, self.timeout if tests is not None else self.suite_timeout)
                if outcome == "timeout" and tests is None:
                    # The whole suite, serially, past its limit: the machine's load as likely as the
                    # mutant; reported apart, to rerun with a longer --timeout, never counted as killed.
                    verdict, stage = "timeout", "whole-suite (timeout)"
                    break
                if outcome != "passed":
                    verdict, stage = "killed", (stage if outcome == "failed" else f"{stage} ({outcome})")
                    break
        finally:
            path.write_text(original, encoding="utf-8")
        return Result(mutant.id, mutant.module, mutant.line, mutant.operator, mutant.original, mutant.mutated, verdict,
                      stage, round(time.monotonic() - started, 1), failing)

    def _pytest(self, tests: Optional[List[str]], timeout: float) -> Tuple[str, str]:
        """passed / failed / timeout, and the first failing test's id."""
        env = _child_environment(self.tree)
        command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "mutation",
                   "--no-header", "-rf", "-W", "ignore::pytest.PytestUnknownMarkWarning"]
        if tests is not None:
            node_ids = [t for t in tests if "::" in t]
            files = sorted(set(_file_of(t) for t in tests))
            if node_ids:
                self.select.write_text("\n".join(node_ids))
                env[SELECT_VARIABLE] = str(self.select)
            command += files
        try:
            run = subprocess.run(command, cwd=self.tree, env=env, capture_output=True, text=True, timeout=timeout,
                                 start_new_session=True)
        except subprocess.TimeoutExpired:
            return "timeout", ""
        if run.returncode == 0:
            return "passed", ""
        failed = [line for line in run.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
        return "failed", (failed[0] if failed else f"exit {run.returncode}")[:300]


def _file_of(node_id: str) -> str:
    return node_id.split("::", 1)[0]


# ---------------------------------------------------------------- the pytest plugin (`-p mutation`)


def pytest_collection_modifyitems(config, items) -> None:  # type: ignore[no-untyped-def]
    """Keep only the node ids listed in SELECT_VARIABLE's file (a mutant's line tests)."""
    listed = os.environ.get(SELECT_VARIABLE)
    if not listed:
        return
    keep = set(Path(listed).read_text().splitlines())
    selected = [item for item in items if item.nodeid in keep]
    if selected:
        config.hook.pytest_deselected(items=[item for item in items if item.nodeid not in keep])
        items[:] = selected


def pytest_runtest_protocol(item, nextitem):  # type: ignore[no-untyped-def]
    """Record this test's node id as the coverage context of this process and of every process it starts."""
    _switch_context(item.nodeid)
    return None


def pytest_runtest_logfinish(nodeid, location) -> None:  # type: ignore[no-untyped-def]
    _switch_context("")


def _switch_context(node_id: str) -> None:
    os.environ[CONTEXT_VARIABLE] = node_id
    try:
        import coverage
    except ImportError:
        return
    current = coverage.Coverage.current()
    if current is not None:
        current.switch_context(node_id)


# ---------------------------------------------------------------- verdicts and the report


def equivalent_judgements() -> Dict[str, str]:
    """id -> reason, from tools/mutation_equivalent.txt (`#` comments; id, whitespace, reason)."""
    judgements = {}
    if EQUIVALENT_FILE.is_file():
        for raw in EQUIVALENT_FILE.read_text(encoding="utf-8").splitlines():
            line = raw.strip()
            if line and not line.startswith("#"):
                mutant_id, _, reason = line.partition(" ")
                judgements[mutant_id] = reason.strip()
    return judgements


def summary_rows(results: Sequence[Result]) -> List[Tuple[str, int, int, int, int, int, str]]:
    """Per module: sampled, killed, survived, equivalent, no-tests, score (killed / non-equivalent run)."""
    rows = []
    modules = sorted(set(r.module for r in results))
    for module in modules + ["all"]:
        rs = [r for r in results if module in ("all", r.module)]
        counts = {v: sum(1 for r in rs if r.verdict == v) for v in ("killed", "survived", "equivalent", "no-tests")}
        decided = counts["killed"] + counts["survived"] + counts["no-tests"]
        score = f"{100 * counts['killed'] / decided:.1f}%" if decided else "-"
        rows.append((module, len(rs), counts["killed"], counts["survived"], counts["equivalent"], counts["no-tests"], score))
    return rows


def write_report(out: Path, results: Sequence[Result], not_run: Sequence[Mutant], elapsed: float, jobs: int) -> str:
    lines = [f"# Mutation report ({len(results)} mutants run in {elapsed / 60:.1f} min on {jobs} workers; "
             f"{len(not_run)} not run within the budget)", "",
             "Score = killed / (killed + survived + no-tests): equivalent mutants (tools/mutation_equivalent.txt) "
             "are left out, mutants no test executes count as survivors.", "",
             "| module | mutants | killed | survived | equivalent | no tests | score |", "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {m} | {n} | {k} | {s} | {e} | {u} | {score} |" for m, n, k, s, e, u, score in summary_rows(results)]
    survivors = [r for r in results if r.verdict in ("survived", "no-tests", "timeout")]
    lines += ["", f"## Survivors, and whole-suite runs past their time limit ({len(survivors)})", ""]
    for r in sorted(survivors, key=lambda r: (r.module, r.line)):
        lines += [f"- `{r.id}` ({r.verdict}, {r.operator}) {r.module}:{r.line}",
                  f"  `{_one_line(r.original)}` -> `{_one_line(r.mutated)}`"]
    equivalents = [r for r in results if r.verdict == "equivalent"]
    judgements = equivalent_judgements()
    lines += ["", f"## Judged equivalent ({len(equivalents)})", ""]
    lines += [f"- `{r.id}` {r.module}:{r.line} `{_one_line(r.original)}` -> `{_one_line(r.mutated)}`: {judgements[r.id]}"
              for r in equivalents]
    if not_run:
        lines += ["", f"## Not run within the budget ({len(not_run)})", ""] + [f"- `{m.id}`" for m in not_run]
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text, encoding="utf-8")
    return text


def _one_line(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= 100 else flat[:97] + "..."


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sample", type=int, default=300, help="about how many mutants to draw (default 300)")
    parser.add_argument("--jobs", type=int, default=2, help="mutants run at once (default 2)")
    parser.add_argument("--budget", type=float, default=0, help="seconds after which no mutant is started (0: none)")
    parser.add_argument("--timeout", type=float, default=240, help="seconds per test run of one mutant (default 240)")
    parser.add_argument("--modules", default="", help="comma-separated prefixes under conversion/ (default: all)")
    parser.add_argument("--out", type=Path, default=ROOT / ".mutation", help="output folder (default .mutation/)")
    parser.add_argument("--list", action="store_true", help="print the sample and stop")
    parser.add_argument("--resume", action="store_true",
                        help="keep the verdicts already in results.jsonl and run only the other mutants of the sample")
    args = parser.parse_args(argv)
    started = time.monotonic()
    modules = package_modules([s for s in args.modules.split(",") if s])
    texts = {m.relative_to(ROOT).as_posix(): m.read_text(encoding="utf-8") for m in modules}
    per_module = {m.relative_to(ROOT).as_posix(): module_mutants(m) for m in modules}
    sample = draw_sample(per_module, texts, args.sample)
    print(f"{sum(len(v) for v in per_module.values())} mutants in {len(modules)} modules; sample of {len(sample)}",
          file=sys.stderr)
    if args.list:
        for m in sample:
            print(f"{m.id}\t{m.line}\t{m.operator}\t{_one_line(m.original)} -> {_one_line(m.mutated)}")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    # The scratch copies first: the tree as it was when the run started, whatever is edited meanwhile.
    workers = [Worker(args.out, i, args.timeout) for i in range(args.jobs)]
    lines = coverage_map(args.out, args.jobs)
    judgements = equivalent_judgements()
    # Run in a seeded shuffled order: a run cut short by --budget is a smaller sample of all modules.
    sample = sorted(sample, key=lambda m: hashlib.sha256(m.id.encode()).hexdigest())
    free = list(workers)
    lock = threading.Lock()
    results: List[Result] = []
    not_run: List[Mutant] = []
    earlier = args.out / "results.jsonl"
    if args.resume and earlier.is_file():
        wanted = {m.id for m in sample}
        results = [Result(**json.loads(line)) for line in earlier.read_text(encoding="utf-8").splitlines() if line.strip()]
        results = [r for r in results if r.id in wanted]
        done = {r.id for r in results}
        sample = [m for m in sample if m.id not in done]
    jsonl = earlier.open("w", encoding="utf-8")
    for result in results:
        jsonl.write(json.dumps(asdict(result)) + "\n")

    def one(mutant: Mutant) -> Result:
        covered = lines.get(mutant.module, {})
        line_tests = sorted(set(t for ln in range(mutant.line, mutant.end_line + 1) for t in covered.get(ln, []) if t))
        module_tests = sorted(set(t for ts in covered.values() for t in ts if t))
        executed = any(covered.get(ln) for ln in range(mutant.line, mutant.end_line + 1))
        with lock:
            # Checked for every mutant alike, so that a run cut short is an unbiased part of the sample.
            if args.budget and time.monotonic() - started > args.budget:
                raise TimeoutError
            if not executed:
                return Result(mutant.id, mutant.module, mutant.line, mutant.operator, mutant.original, mutant.mutated,
                              "no-tests", "", 0.0)
            worker = free.pop()
        try:
            result = worker.run(mutant, line_tests, module_tests)
        finally:
            with lock:
                free.append(worker)
        if result.verdict == "survived" and mutant.id in judgements:
            result.verdict = "equivalent"
        return result

    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(one, m): m for m in sample}
        for future in concurrent.futures.as_completed(futures):
            try:
                result = future.result()
            except TimeoutError:
                not_run.append(futures[future])
                continue
            results.append(result)
            jsonl.write(json.dumps(asdict(result)) + "\n")
            jsonl.flush()
            print(f"[{len(results)}/{len(sample)}] {result.verdict:10} {result.seconds:6.1f}s {result.id}", file=sys.stderr)
    jsonl.close()
    print(write_report(args.out, results, not_run, time.monotonic() - started, args.jobs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
