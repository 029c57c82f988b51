"""The regression corpus: every input the fuzzer (tests/fuzz) or a probe ever flagged, replayed
through the real CLI in a child process, each keeping every promise.

A corpus file is a fuzz input: one command byte (tests.fuzz.oracle.command_of: inspect, convert to
.pth or to .pkl, and the source's suffix) and the source's bytes, gzip-compressed when over 16 KB.
The minimised fuzz findings are named `fuzz-*`; the others are the probes of
test_fuzz_findings.py, one per kind.  Add one with `tox -e fuzz -- --minimise FINDING OUT` (run
against the code that broke) and copy OUT here.

The promises, observed from outside the child: exit 0 or 2; stderr without "internal error" or a
traceback, an error in one or two lines; nothing but the destination left (nothing at all after
an error); the child's peak resident memory (wait4's own rusage) within `RSS_BASE_BYTES` plus
`RSS_PER_SOURCE_BYTE` per byte of the source; it ends within `PROCESS_TIMEOUT_S` (a hang bound, not a
speed claim); an exit-0 .pth loads with torch.load(weights_only=True), an exit-0 .pkl with pickle.
"""
from __future__ import annotations

import gzip
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import List, Tuple

import pytest

from ..support.cli import PROCESS_TIMEOUT_S, ROOT, assert_plain_error
from ..fuzz.oracle import lay_out
from ..support import torch_load_weights_only

CORPUS = Path(__file__).resolve().parent / "corpus"
pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="the child's peak memory is read from Linux's /proc")
CASES = sorted(p for p in CORPUS.iterdir() if p.name.endswith((".bin", ".bin.gz")))
EXIT_STATUSES = (0, 2)
# What the CLI may hold before it reads a byte: the interpreter and numpy take ~20-40 MB (torch,
# ~700 MB, is never imported to read or refuse these: the handle readers and writers need only numpy,
# and a safetensors header is refused by safetensors' own check before torch is imported).
RSS_BASE_BYTES = 128 * 2**20
# What a reader may hold per byte of its source (pickled containers cost ~100x their opcodes).
RSS_PER_SOURCE_BYTE = 128


def corpus_input(path: Path) -> bytes:
    data = path.read_bytes()
    return gzip.decompress(data) if path.name.endswith(".gz") else data


# `python -m conversion ARGS`, then the process's own high-water mark (VmHWM: this program's, not
# the forking test process's, which wait4's ru_maxrss would include) written where the test reads it.
_OBSERVED_CLI = """
import os, runpy, sys
sys.argv[0] = "convnext-d2"
try:
    runpy.run_module("conversion", run_name="__main__", alter_sys=True)
finally:
    with open("/proc/self/status") as status, open(os.environ["CONVNEXT_D2_PEAK_FILE"], "w") as peak:
        peak.write(next(line.split()[1] for line in status if line.startswith("VmHWM:")))
"""


def _run_observed(args: List[str], cwd: Path) -> Tuple[int, int, str]:
    """(exit status, peak resident bytes, stderr) of the CLI on `args` in a child process."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    env["CONVNEXT_D2_PEAK_FILE"] = str(cwd / "peak")
    result = subprocess.run([sys.executable, "-c", _OBSERVED_CLI, *args], cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, timeout=PROCESS_TIMEOUT_S)
    peak_kib = int((cwd / "peak").read_text())
    os.remove(cwd / "peak")
    return result.returncode, peak_kib * 1024, result.stderr.decode("utf-8", "replace")


@pytest.mark.parametrize("case", CASES, ids=[p.name.split(".")[0] for p in CASES])
def test_every_input_the_fuzzer_or_a_probe_flagged_keeps_every_promise(case: Path, tmp_path: Path):
    data = corpus_input(case)
    command, src, dst, args = lay_out(data, tmp_path)
    out = dst.parent
    status, peak, stderr = _run_observed(args, tmp_path)
    assert status in EXIT_STATUSES, stderr
    assert "internal error" not in stderr and "Traceback" not in stderr, stderr
    if status != 0:
        assert_plain_error(stderr)
    wanted = [dst.name] if status == 0 and command == "convert" else []
    assert sorted(os.listdir(out)) == wanted and sorted(os.listdir(tmp_path)) == sorted(["out", src.name])
    bound = RSS_BASE_BYTES + RSS_PER_SOURCE_BYTE * len(data)
    assert peak <= bound, f"peak {peak >> 20} MiB for a {len(data)}-byte source (bound {bound >> 20} MiB)"
    if wanted and dst.suffix == ".pth":
        assert isinstance(torch_load_weights_only(dst)["model"], dict)
    elif wanted:
        with open(dst, "rb") as f:
            assert isinstance(pickle.load(f)["model"], dict)


def test_the_corpus_holds_every_kind_and_stays_small():
    """One input per kind the fuzzer or a probe found (docs/design.md, safety), none large."""
    names = {p.name.split(".")[0] for p in CASES}
    kinds = ("safetensors-header-nested", "safetensors-dtype", "zip-directory-flags", "zip-storage-alignment", "zip-serialization-id",
             "zero-width-stage", "zero-size-arrays", "surrogate-in-a-detector-part-name", "surrogate-in-a-top-level-key",
             "newlines-in-a-quoted-name", "empty-sets-around-pickled-tensors", "fuzz-")
    assert [k for k in kinds if not any(n.startswith(k) for n in names)] == []
    assert max(p.stat().st_size for p in CASES) <= 64 * 1024
