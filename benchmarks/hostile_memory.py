"""Peak resident memory of convert / inspect / repair on small hostile files, against a valid Tiny file.

Usage: python benchmarks/hostile_memory.py [--out FOLDER]

Each command runs as its own `python -m conversion` process; its peak RSS is what the kernel
reports for that child (wait4's ru_maxrss).  The hostile files are the ones the adversarial
corpus builds (tests/adversarial/assemble.py), at the sizes of the original reports (a list
nested a million deep, bytearray(2.5e9), 31 doubling hex codecs, a deflated index inflating to
2.5 GB).  Not a test: the numbers go to docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from typing import Dict, List, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from conversion.architecture import Architecture  # noqa: E402
from conversion.synthetic import random_state_dict  # noqa: E402
from tests.adversarial import assemble as A  # noqa: E402

TINY = Architecture(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768), num_classes=1000, classifier_norm=True)


def _inflating_zip(path: str, inflated: int) -> None:
    """A torch archive whose deflated data.pkl (a valid pickle, then zeros) inflates to `inflated` bytes."""
    buf = io.BytesIO()
    torch.save({"model": A.tiny_state_dict()}, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if not info.filename.endswith("/data.pkl"):
                dst.writestr(zipfile.ZipInfo(info.filename, date_time=(1980, 1, 1, 0, 0, 0)), data)
                continue
            zinfo = zipfile.ZipInfo(info.filename, date_time=(1980, 1, 1, 0, 0, 0))
            zinfo.compress_type = zipfile.ZIP_DEFLATED
            with dst.open(zinfo, "w", force_zip64=True) as out:
                out.write(data)
                chunk, left = b"\0" * (1 << 24), inflated - len(data)
                while left > 0:
                    out.write(chunk[:left])
                    left -= len(chunk)


def build(folder: str) -> List[Tuple[str, str]]:
    """(case name, path) for every hostile file and the valid Tiny controls."""
    files: List[Tuple[str, str]] = []

    def add(name: str, data: bytes, ext: str) -> None:
        path = os.path.join(folder, name + ext)
        with open(path, "wb") as f:
            f.write(data)
        files.append((name, path))

    sd = random_state_dict(TINY, seed=0)
    tiny_zip = os.path.join(folder, "valid-tiny.pth")
    torch.save({"model": sd}, tiny_zip)
    files.append(("valid Tiny (torch zip)", tiny_zip))
    import pickle

    add("valid Tiny (.pkl)", pickle.dumps({"model": {k: v.numpy() for k, v in sd.items()}}, protocol=4), ".pkl")
    add("junk list 5,000 deep (pickle named .pth)", A.spliced(A.nested_lists(5000), "pkl"), ".pth")
    add("junk list 5,000 deep (torch zip)", A.spliced(A.nested_lists(5000), "torch-zip"), ".pth")
    add("list containing itself (torch zip)", A.spliced(A.self_containing_list(), "torch-zip"), ".pth")
    add("list 1e6 deep (torch zip)", A.spliced(A.nested_lists(1_000_000), "torch-zip"), ".pth")
    add("tuple key 1e6 deep (.pkl)", A.spliced(A.deep_tuple_key(1_000_000), "pkl"), ".pkl")
    add("tuple key 1e6 deep (torch zip)", A.spliced(A.deep_tuple_key(1_000_000), "torch-zip"), ".pth")
    add("ndarray without buffer as a weight (torch zip)", A.spliced(A.array_without_buffer(), "torch-zip", "weight"), ".pth")
    add("bytearray(2.5e9) (.pkl)", A.spliced(A.bytearray_of(2_500_000_000), "pkl"), ".pkl")
    add("31 hex codecs (.pkl)", A.spliced(A.codec_chain(31, seed=1), "pkl"), ".pkl")
    add("31 hex codecs (torch zip)", A.spliced(A.codec_chain(31, seed=1), "torch-zip"), ".pth")
    bomb = os.path.join(folder, "inflating.pth")
    _inflating_zip(bomb, 2_500_000_000)
    files.append(("deflated data.pkl inflating to 2.5 GB (torch zip)", bomb))
    return files


# A forked child's peak RSS starts at its parent's (this process holds torch and the files): the
# CLI is started from a small launcher, so the figure is the CLI's own.
_LAUNCHER = (
    "import os, subprocess, sys, time\n"
    "t = time.monotonic()\n"
    "p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
    "_, status, usage = os.wait4(p.pid, 0)\n"
    "print(os.waitstatus_to_exitcode(status), time.monotonic() - t, usage.ru_maxrss * 1024)\n"
)


def peak_rss(argv: List[str]) -> Tuple[int, float, int]:
    """(exit status, seconds, peak RSS in bytes) of one CLI process."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", _LAUNCHER, sys.executable, "-m", "conversion", *argv],
                         env=env, capture_output=True, text=True, check=True).stdout.split()
    return int(out[0]), float(out[1]), int(out[2])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="folder for the files (default: a temporary one)")
    args = parser.parse_args()
    folder = args.out or tempfile.mkdtemp(prefix="hostile-memory-")
    os.makedirs(folder, exist_ok=True)
    rows: Dict[str, List[str]] = {}
    for name, path in build(folder):
        size = os.path.getsize(path)
        cells = []
        for command in ("convert", "inspect", "repair"):
            dst = os.path.join(folder, "out" + (".pkl" if path.endswith(".pkl") else ".pth"))
            argv = [command, path] + ([dst, "--force"] if command != "inspect" else [])
            status, seconds, rss = peak_rss(argv)
            cells.append(f"{rss / 2**20:.0f} MB (exit {status}, {seconds:.1f} s)")
            if os.path.exists(dst):
                os.unlink(dst)
        rows[name] = [f"{size / 1024:.0f} KiB"] + cells
    print("| file | size | convert | inspect | repair |")
    print("|---|---|---|---|---|")
    for name, cells in rows.items():
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
