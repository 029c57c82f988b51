"""Coverage-guided fuzzing of `convnext-d2 convert` and `inspect` (atheris, libFuzzer).

    tox -e fuzz                              # fuzz until stopped (Ctrl-C), seeds built on first use
    tox -e fuzz -- -max_total_time=1800      # 30 minutes; any libFuzzer flag passes through
    tox -e fuzz -- --runs 200                # no atheris needed: 200 seeded mutations, then stop
    tox -e fuzz -- --replay FILE...          # the oracle on given inputs (a finding, a corpus file)
    tox -e fuzz -- --minimise FILE OUT       # FILE with what the same broken promise does not need removed

An input is one command byte (`oracle.command_of`: inspect, convert to .pth or to .pkl, and the
source's suffix) and the source file's bytes.  The seeds are `seeds.py`'s synthetic checkpoints;
mutations are `mutators.py`'s structure-aware ones with libFuzzer's byte mutation beneath; the
oracle is `oracle.broken_promises`.  A broken promise does not stop the run: the input is kept in
`.fuzz/findings/` (at most `KEEP_PER_KIND` of each kind, the kind being the message without its
numbers and names) and the run goes on; libFuzzer's own crash, timeout and out-of-memory handling
stay for what takes the process down.  Not part of the suite's run (it goes on for as long as it
is given); tests/fuzz/test_harness.py runs `--runs` briefly.
"""
from __future__ import annotations

import argparse
import hashlib
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

# Imported before atheris instruments anything: only conversion/ is instrumented (the libraries would
# slow every run tenfold and their branches are not this project's).
import numpy  # noqa: F401
import torch  # noqa: F401

HERE = Path(__file__).resolve().parent
STATE = HERE.parent.parent / ".fuzz"
MAX_INPUT_BYTES = 200_000  # the seeds are under 40 KB; room for grown pickles and archives
KEEP_PER_KIND = 3
RSS_WARMUP_RUNS = 20  # the first runs import and cache; the memory bound starts after them
SLOW_RUN_S = 20.0  # a run this long is kept as a finding (libFuzzer's -timeout ends a hung one)


def kind_of(problem: str) -> str:
    """A finding's kind: the words of its message before anything quoted, without numbers and paths."""
    text = re.split(r"['\"(]", problem.replace("convnext-d2: ", ""), maxsplit=1)[0]
    text = re.sub(r"/\S+|\d+", "_", text)
    return re.sub(r"[^A-Za-z_]+", "-", text).strip("-")[:80]


class Findings:
    """Inputs that broke a promise, kept by kind under `folder`."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.counts: Dict[str, int] = {}
        self.total = 0

    def add(self, data: bytes, problems: List[str]) -> None:
        self.total += 1
        kind = kind_of(problems[0])
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if self.counts[kind] > KEEP_PER_KIND:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"{kind[:60]}-{hashlib.sha1(data).hexdigest()[:10]}"
        (self.folder / name).write_bytes(data)
        (self.folder / f"{name}.txt").write_text("\n".join(problems) + "\n", errors="backslashreplace")
        print(f"\n#FINDING {kind}: {problems[0][:200]} -> {self.folder / name}", file=sys.__stderr__, flush=True)


class Target:
    """One input through the oracle, in a fresh temporary folder, with the memory bound kept."""

    def __init__(self, findings: Findings) -> None:
        from .oracle import RSS_PER_INPUT_BYTE, RSS_SLACK_BYTES, broken_promises, peak_rss_bytes

        self._check, self._peak = broken_promises, peak_rss_bytes
        self._per_byte, self._slack = RSS_PER_INPUT_BYTE, RSS_SLACK_BYTES
        self.findings = findings
        self.runs = 0
        self._baseline: Optional[int] = None

    def __call__(self, data: bytes) -> None:
        self.runs += 1
        if self.runs == RSS_WARMUP_RUNS:
            self._baseline = self._peak()
        limit = None if self._baseline is None else self._baseline + self._slack + self._per_byte * len(data)
        start = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="convnext-d2-fuzz-") as tmp:
            problems = self._check(data, Path(tmp), limit)
        if time.monotonic() - start > SLOW_RUN_S:
            problems.append(f"took {time.monotonic() - start:.0f} s on a {len(data)}-byte input")
        if problems:
            self.findings.add(data, problems)
            if limit is not None and self._peak() > limit:
                self._baseline = self._peak()  # the peak only grows: report the next kind, not this again


def _python_raw(rng: random.Random) -> Callable[[bytes, int], bytes]:
    """Byte mutation without libFuzzer (the `--runs` mode): flips, inserts, deletes, splices."""

    def raw(data: bytes, max_size: int) -> bytes:
        out = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            choice = rng.random()
            at = rng.randrange(len(out) + 1)
            if choice < 0.4 and out:
                out[min(at, len(out) - 1)] ^= 1 << rng.randrange(8)
            elif choice < 0.6:
                out[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
            elif choice < 0.8:
                del out[at:at + rng.randint(1, 16)]
            elif out:
                out[at:at + 4] = rng.choice((b"\x00\x00\x00\x00", b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff"))
        return bytes(out[:max_size])

    return raw


def seeds(corpus: Path) -> Path:
    """`corpus`, filled with the seed checkpoints when it is empty or missing."""
    if not corpus.exists() or not any(corpus.iterdir()):
        # In a child: building the seeds imports conversion/, and a module imported before atheris
        # instruments it gives the fuzzer no coverage to follow.
        subprocess.run([sys.executable, "-m", "tests.fuzz.seeds", str(corpus)], check=True, cwd=HERE.parent.parent)
    return corpus


def run_seeded(runs: int, corpus: Path, findings: Findings, seed: int = 0) -> int:
    """`runs` structure-aware mutations of the seeds through the oracle, no atheris; returns the findings."""
    from .mutators import mutate

    rng = random.Random(seed)
    raw = _python_raw(rng)
    inputs = [p.read_bytes() for p in sorted(corpus.iterdir()) if p.is_file()]
    target = Target(findings)
    for data in inputs:  # the seeds themselves keep every promise
        target(data)
    for _ in range(runs):
        target(mutate(rng.choice(inputs), MAX_INPUT_BYTES, rng, raw))
    print(f"{target.runs} runs, {findings.total} finding(s) of {len(findings.counts)} kind(s): {sorted(findings.counts)}")
    return findings.total


def replay(paths: Sequence[str], findings: Findings) -> int:
    target = Target(findings)
    for path in paths:
        target(Path(path).read_bytes())
    print(f"{target.runs} replayed, {findings.total} broke a promise")
    return findings.total


def minimise(data: bytes, trials: int = 400) -> bytes:
    """`data` with chunks removed (halves, then quarters, ... down to single bytes) while the same
    kind of promise still breaks: run against the code that broke it, this is what the regression
    corpus keeps."""
    from .oracle import broken_promises

    def kind(candidate: bytes) -> Optional[str]:
        with tempfile.TemporaryDirectory(prefix="convnext-d2-fuzz-") as tmp:
            problems = broken_promises(candidate, Path(tmp))
        return kind_of(problems[0]) if problems else None

    want = kind(data)
    if want is None:
        return data
    chunk = max(1, (len(data) - 1) // 2)
    while chunk >= 1 and trials > 0:
        at, shrunk = 1, False  # the command byte stays
        while at < len(data) and trials > 0:
            candidate = data[:at] + data[at + chunk:]
            trials -= 1
            if kind(candidate) == want:
                data, shrunk = candidate, True
            else:
                at += chunk
        if not shrunk:
            chunk //= 2
    return data


def fuzz(libfuzzer_args: List[str], corpus: Path, findings: Findings) -> None:
    import atheris

    early = sorted(m for m in sys.modules if m == "conversion" or m.startswith("conversion."))
    if early:  # atheris instruments only what it imports itself: these would run blind
        raise SystemExit(f"conversion modules imported before instrumenting: {', '.join(early[:5])}")
    with atheris.instrument_imports(include=["conversion"]):
        import conversion.cli  # noqa: F401  (the whole package, through the CLI's imports)
        import conversion.inspection  # noqa: F401
        import conversion.pipeline  # noqa: F401
        import conversion.io.torchzip, conversion.io.legacy_torch, conversion.io.safe_pickle  # noqa: F401,E401
        import conversion.io.safetensors_header  # noqa: F401
    from .mutators import mutate

    target = Target(findings)

    def custom_mutator(data: bytes, max_size: int, seed: int) -> bytes:
        return mutate(data, max_size, random.Random(seed), atheris.Mutate)

    argv = [sys.argv[0], f"-max_len={MAX_INPUT_BYTES}", "-timeout=120", "-rss_limit_mb=3072"] + libfuzzer_args + [str(corpus)]
    atheris.Setup(argv, target, custom_mutator=custom_mutator)
    atheris.Fuzz()


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, help="this many seeded mutations without atheris, then stop")
    parser.add_argument("--replay", nargs="+", metavar="FILE", help="run the oracle on these inputs")
    parser.add_argument("--corpus", type=Path, default=STATE / "corpus", help="the corpus folder (seeded when empty)")
    parser.add_argument("--findings", type=Path, default=STATE / "findings", help="where broken promises are kept")
    parser.add_argument("--minimise", nargs=2, metavar=("FILE", "OUT"), help="write FILE minimised (the same kind broken) to OUT")
    args, libfuzzer_args = parser.parse_known_args(argv)
    # Mutated archives repeat names and mutated pickles name old protocols: the libraries warn, the oracle judges.
    warnings.simplefilter("ignore")
    findings = Findings(args.findings)
    if args.minimise:
        data = Path(args.minimise[0]).read_bytes()
        small = minimise(data)
        Path(args.minimise[1]).write_bytes(small)
        print(f"{len(data)} -> {len(small)} bytes")
        return 0
    if args.replay:
        return 1 if replay(args.replay, findings) else 0
    corpus = seeds(args.corpus)
    if args.runs is not None:
        return 1 if run_seeded(args.runs, corpus, findings) else 0
    fuzz(libfuzzer_args, corpus, findings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
