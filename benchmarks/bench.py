"""Benchmark: convnext-d2 against `cp` and the usual torch.load/rename/torch.save, on synthetic
official-layout checkpoints (Tiny, Large, XXLarge) generated here (nothing can be downloaded).
A "durable copy" (`cp`, then `sync FILE`: an fsync of the copy) is the honest second baseline: convnext-d2
syncs its output before it gets its name, `cp` does not; the table gives each command's ratio to both.

Each command runs as its own process, in turns (each contender once per turn), `--repeat` turns;
the table gives medians of wall time, CPU time (user + system, the child's and its threads'),
peak resident memory (VmHWM of the child), bytes read (the child's /proc/<pid>/io rchar: read
syscalls, and copy_file_range's bytes, which the kernel counts there although they never reach
the process), and ratios to `cp` and to the baseline.  The convnext-d2 trees are byte-compiled
first and the children may use their `.pyc` files (PYTHONDONTWRITEBYTECODE is dropped from their
environment), as an installed package's are: compiling the package's sources at every start
cost about 70 ms per run here.  With
`--before DIR` the convnext-d2 commands of another checkout run in the same turns and both outputs
are compared byte for byte.  The page cache is warm for every command alike (the source is read
once before timing); say so when quoting the numbers, with the load average the table records.

    python benchmarks/bench.py [--variants tiny,large,xxlarge] [--repeat 3] [--workdir DIR] [--markdown FILE] [--before DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from conversion.architecture import RELEASED_VARIANTS, Architecture, canonical_shapes  # noqa: E402

# `cp` then an fsync of the copy (coreutils' `sync FILE`): what `cp` costs once the copy is on disk.
DURABLE = "durable cp (cp, then sync of the copy)"
BASELINE_NAME = "baseline load/rename/save"
VARIANTS = {"tiny": "convnext_tiny", "large": "convnext_large", "xxlarge": "convnext_xxlarge"}

# Runs a command in a child and reports its own peak RSS and bytes read, measured from inside.
_PROBE = r"""
import json, os, resource, runpy, sys, time
argv = json.loads(sys.argv[1]); start = time.perf_counter(); code = 0
try:
    if argv[0] == "-m":
        sys.argv = argv[1:]; runpy.run_module(argv[1], run_name="__main__")
    else:
        sys.argv = argv; runpy.run_path(argv[0], run_name="__main__")
except SystemExit as e:
    code = e.code or 0
io = dict(line.split(": ") for line in open("/proc/self/io").read().splitlines())
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent that forked this process.
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"rss": hwm * 1024, "rchar": int(io["rchar"]), "code": code}), file=sys.stderr)
"""

BASELINE = r"""
import sys, torch
src, dst, mmap = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
ckpt = torch.load(src, map_location="cpu", weights_only=True, mmap=mmap)
sd = ckpt.get("model", ckpt)
out = {"backbone." + k: v for k, v in sd.items() if not k.startswith("head.") and k not in ("norm.weight", "norm.bias")}
torch.save({"model": out, "__author__": "baseline"}, dst)
"""

def make_checkpoint(variant: str, path: str) -> int:
    import torch

    depths, dims = RELEASED_VARIANTS[1][VARIANTS[variant]]
    arch = Architecture(depths, dims, num_classes=1000, classifier_norm=True)
    g = torch.Generator().manual_seed(0)
    sd = {name: torch.randn(shape, generator=g) * 0.02 for name, shape in canonical_shapes(arch).items()}
    torch.save({"model": sd}, path)
    return sum(t.numel() for t in sd.values())


def run(argv: List[str], probe: bool = True, root: str = ROOT) -> Dict[str, float]:
    """Wall time (s), peak RSS (bytes) and bytes read of one child process."""
    if probe:
        cmd = [sys.executable, "-c", _PROBE, json.dumps(argv)]
    else:
        cmd = ["/usr/bin/time", "-f", "%M", *argv]
    env = _child_env(root)
    cpu_before = _children_cpu()
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root)  # `-c` puts the cwd first on sys.path
    wall = time.perf_counter() - start
    cpu = _children_cpu() - cpu_before
    if proc.returncode != 0:
        raise RuntimeError(f"{argv} failed:\n{proc.stderr[-2000:]}")
    if probe:
        stats = json.loads(proc.stderr.strip().splitlines()[-1])
        return {"wall": wall, "cpu": cpu, "rss": stats["rss"], "read": stats["rchar"]}
    return {"wall": wall, "cpu": cpu, "rss": int(proc.stderr.strip().splitlines()[-1]) * 1024, "read": float("nan")}


def _children_cpu() -> float:
    """User + system seconds of every child waited for so far (a child's threads included)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _child_env(root: str) -> Dict[str, str]:
    env = dict(os.environ, PYTHONPATH=root)
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # run from .pyc files, as an installed package does
    return env


def compile_tree(root: str) -> None:
    """Byte-compile a checkout's package once, so that no timed run compiles it."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", os.path.join(root, "conversion")], check=True,
                   env=_child_env(root), stdout=subprocess.DEVNULL)


def machine() -> str:
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
    mem = int(next(l.split()[1] for l in open("/proc/meminfo") if l.startswith("MemTotal"))) / 2**20
    import torch

    return (f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, Python {platform.python_version()}, "
            f"torch {torch.__version__}, {platform.system()} {platform.release()}")


def _git_head(root: str) -> str:
    proc = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return proc.stdout.strip() or os.path.basename(root.rstrip("/"))


def run_in_turns(contenders: List[dict], repeat: int) -> Dict[str, Dict[str, float]]:
    """Each contender once per turn, `repeat` turns, so that a change in the machine's load (it may
    be shared) falls on every contender alike; medians per contender."""
    results: Dict[str, List[Dict[str, float]]] = {c["name"]: [] for c in contenders}
    for turn in range(repeat):
        for c in contenders:
            results[c["name"]].append(run(c["argv"], c.get("probe", True), c.get("root", ROOT)))
            if turn < repeat - 1 or not c.get("compared"):  # outputs compared afterwards are kept from the last turn
                _remove(c.get("cleanup", ()))
    return {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in results.items()}


def _remove(paths: Sequence[str]) -> None:
    """Delete outputs at once: XXLarge's seven outputs of a turn (24 GB) would fill this machine's
    page cache, and the page reclaim (and the source's eviction) would fall on whichever command
    ran next, as it did in runs before 2026-12-01 13:00 (`cp` then took 1.0 to 2.9 s of CPU)."""
    for path in paths:
        if os.path.exists(path):
            os.unlink(path)


def main(argv: Sequence[str] = ()) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", default="tiny,large,xxlarge")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", default=None, help="where the synthetic checkpoints go (needs ~8x the largest)")
    ap.add_argument("--no-baseline", action="store_true", help="leave out torch's load/rename/save (about 4 GB and 10-50 s a run on XXLarge)")
    ap.add_argument("--markdown", default=None, help="also write the table to this file")
    ap.add_argument("--before", default=None, help="another checkout of convnext-d2 (e.g. `git worktree add DIR main`) "
                    "whose convert and inspect run in the same turns, for a before/after table; outputs are compared byte for byte")
    args = ap.parse_args(list(argv))
    work = args.workdir or tempfile.mkdtemp(prefix="convnext-d2-bench-")
    os.makedirs(work, exist_ok=True)
    rows = []
    try:
        for variant in args.variants.split(","):
            src = os.path.join(work, f"{VARIANTS[variant]}_1k_224.pth")
            params = make_checkpoint(variant, src)
            size = os.path.getsize(src)
            with open(src, "rb") as f:  # warm the page cache for every contender alike
                while f.read(1 << 24):
                    pass
            out = lambda name: os.path.join(work, name)  # noqa: E731
            _write(work, "baseline.py", BASELINE)
            trees = [("", ROOT)] + ([(f" (before: {_git_head(args.before)})", os.path.abspath(args.before))] if args.before else [])
            for _, root in trees:
                compile_tree(root)
            contenders = [
                {"name": "cp", "argv": ["cp", src, out("cp.pth")], "probe": False, "cleanup": [out("cp.pth")]},
                {"name": DURABLE, "argv": ["sh", "-c", 'cp "$0" "$1" && sync "$1"', src, out("durable.pth")], "probe": False, "cleanup": [out("durable.pth")]},
            ]
            if not args.no_baseline:
                contenders += [
                    {"name": BASELINE_NAME, "argv": [out("baseline.py"), src, out("base.pth"), "0"], "cleanup": [out("base.pth")], "compared": True},
                    {"name": "baseline, mmap load", "argv": [out("baseline.py"), src, out("base_mmap.pth"), "1"], "cleanup": [out("base_mmap.pth")]},
                ]
            for label, root in trees:
                tag = "before" if label else "ours"
                contenders += [
                    {"name": f"convnext-d2 convert -> .pth{label}", "argv": ["-m", "conversion", "convert", src, out(f"{tag}.pth")], "cleanup": [out(f"{tag}.pth")], "root": root, "compared": True},
                    {"name": f"convnext-d2 convert -> .pkl{label}", "argv": ["-m", "conversion", "convert", src, out(f"{tag}.pkl")], "cleanup": [out(f"{tag}.pkl")], "root": root, "compared": True},
                    {"name": f"convnext-d2 inspect{label}", "argv": ["-m", "conversion", "inspect", src, "--json"], "root": root},
                ]
            load_before = os.getloadavg()  # the machine may be shared: quote the load with the numbers
            medians = run_in_turns(contenders, args.repeat)
            load_after = os.getloadavg()
            cp, durable, base = medians["cp"], medians[DURABLE], medians.get(BASELINE_NAME, {"wall": float("nan")})
            inspected = json.loads(subprocess.run([sys.executable, "-m", "conversion", "inspect", src, "--json"], capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT)).stdout)
            same = None if args.no_baseline else _same_tensors(out("ours.pth"), out("base.pth"))
            identical = {ext: _same_bytes(out(f"ours{ext}"), out(f"before{ext}")) for ext in (".pth", ".pkl")} if args.before else {}
            for c in contenders:
                r = medians[c["name"]]
                rows.append({
                    "variant": VARIANTS[variant], "params": params, "size": size, "tool": c["name"], **r,
                    "x_cp": r["wall"] / cp["wall"], "x_durable": r["wall"] / durable["wall"], "x_base": r["wall"] / base["wall"], "rss_x_file": r["rss"] / size,
                })
                if c["name"] == "convnext-d2 inspect":
                    rows[-1]["inspect_bytes_read"] = inspected.get("bytes_read")
                if c["name"] == "convnext-d2 convert -> .pth":
                    rows[-1]["same_as_baseline"] = same
            rows[-1]["load"] = (load_before, load_after)
            rows[-1]["identical"] = identical
            for f in ("cp.pth", "durable.pth", "base.pth", "base_mmap.pth", "ours.pth", "ours.pkl", "before.pth", "before.pkl"):
                if os.path.exists(out(f)):
                    os.unlink(out(f))
            os.unlink(src)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    table = render(rows)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)
    return 0


def _same_bytes(a: str, b: str) -> bool:
    with open(a, "rb") as x, open(b, "rb") as y:
        while True:
            u, v = x.read(1 << 24), y.read(1 << 24)
            if u != v:
                return False
            if not u:
                return True


def _write(work: str, name: str, text: str) -> None:
    with open(os.path.join(work, name), "w") as f:
        f.write(text)


def _same_tensors(a: str, b: str) -> bool:
    """Our output and the baseline's, loaded: same names, dtypes, values."""
    import torch

    x = torch.load(a, map_location="cpu", weights_only=True, mmap=True)["model"]
    y = torch.load(b, map_location="cpu", weights_only=True, mmap=True)["model"]
    return list(x) == list(y) and all(x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]) for k in x)


def render(rows: List[dict]) -> str:
    lines = [f"Machine: {machine()}. Page cache warm for every command. Medians of repeated runs.", "",
             "| checkpoint | file | command | wall s | x cp | x durable cp | x baseline | CPU s | peak RSS MB | RSS / file | bytes read |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        read = "n/a" if r["read"] != r["read"] else f"{r['read'] / 1e6:.1f} MB"
        if r.get("inspect_bytes_read") is not None:
            read += f" (of the file: {r['inspect_bytes_read'] / 1024:.0f} KiB)"
        note = " (equal to baseline once loaded)" if r.get("same_as_baseline") else (" (DIFFERS from baseline)" if r.get("same_as_baseline") is False else "")
        lines.append(
            f"| {r['variant']} ({r['params'] / 1e6:.0f} M) | {r['size'] / 1e9:.2f} GB | {r['tool']}{note} | {r['wall']:.2f} | "
            f"{r['x_cp']:.2f} | {r['x_durable']:.2f} | {r['x_base']:.2f} | {r['cpu']:.2f} | {r['rss'] / 1e6:.0f} | {r['rss_x_file']:.3f} | {read} |"
        )
    for r in rows:
        if "load" in r:
            (b1, b5, _), (a1, a5, _) = r["load"]
            lines.append(f"\nLoad average (1 min, 5 min) around the {r['variant']} runs: {b1:.2f}, {b5:.2f} before; {a1:.2f}, {a5:.2f} after.")
        for ext, same in r.get("identical", {}).items():
            lines.append(f"{r['variant']}: {ext} output {'byte-identical to' if same else 'DIFFERS from'} the before checkout's.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
