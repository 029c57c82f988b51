"""The fuzz harness's oracle: the promises the CLI makes about any input, checked on one run.

One run is `convnext-d2 inspect SRC` or `convnext-d2 convert SRC DST` through the CLI's own `main`
(its error handling, its printing to a strict UTF-8 stdout like a pipe's), in this process for
speed.  A run keeps its promises when: it exits 0 or 2; an error is one or two lines and never an
"internal error"; nothing but DST is left in the folders (and nothing at all after an error); the
process's peak memory stays within a bound of the input's size; a `.pth` written loads with
`torch.load(weights_only=True)` and a `.pkl` with `pickle`; and, where torch, safetensors or numpy
read the source themselves (tests.adversarial.judge's independent decoder, given at most 1 GiB of
address space: past it there is no reference to compare with), every tensor written holds the
bytes of a tensor they read.
"""
from __future__ import annotations

import contextlib
import io
import os
import pickle
import resource
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator, List, Optional, Set, Tuple

import numpy as np
import torch

from conversion.cli import main
from conversion.testing.loading import torch_load_weights_only

# (command, destination extension) chosen by a seed's first byte, and the source's file name suffix.
COMMANDS: Tuple[Tuple[str, str], ...] = (("inspect", ""), ("convert", ".pth"), ("convert", ".pkl"))
SOURCE_SUFFIXES = (".pth", ".pkl", ".safetensors", ".bin")
EXIT_STATUSES = (0, 2)
INTERRUPTED = (130, 143)  # the CLI's exit statuses for SIGINT and SIGTERM
MAX_ERROR_LINES = 2
WARNING_MARK = "convnext-d2: warning:"
# Peak memory a run may add over the process's own (torch, the harness), per byte of input and in
# all: the readers keep what they hold proportional to the file (docs/design.md, safety).
RSS_PER_INPUT_BYTE = 64
RSS_SLACK_BYTES = 384 * 2**20


def command_of(data: bytes) -> Tuple[str, str, str]:
    """(command, destination extension, source suffix) a fuzz input's first byte asks for."""
    selector = data[0] if data else 0
    command, ext = COMMANDS[selector % len(COMMANDS)]
    return command, ext, SOURCE_SUFFIXES[(selector // len(COMMANDS)) % len(SOURCE_SUFFIXES)]


def selector_for(command: int, suffix: str) -> int:
    """The first byte `command_of` reads back as COMMANDS[command] on a source named `*suffix`."""
    return command + len(COMMANDS) * SOURCE_SUFFIXES.index(suffix)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@contextlib.contextmanager
def _captured() -> Iterator[Tuple[io.BytesIO, io.BytesIO]]:
    """stdout as a pipe has it (UTF-8, strict: what cannot be encoded fails), stderr as Python's."""
    out, err = io.BytesIO(), io.BytesIO()
    old = sys.stdout, sys.stderr
    sys.stdout = io.TextIOWrapper(out, encoding="utf-8", errors="strict", write_through=True)
    sys.stderr = io.TextIOWrapper(err, encoding="utf-8", errors="backslashreplace", write_through=True)
    try:
        yield out, err
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
            with contextlib.suppress(Exception):
                stream.detach()  # keep the BytesIO open (a wrapper closes its buffer when collected)
        sys.stdout, sys.stderr = old


def run_cli(argv: List[str]) -> Tuple[Any, str, str]:
    """(exit status or the escaped exception, stdout, stderr) of the CLI on `argv`, in this process."""
    with _captured() as (out, err):
        try:
            status: Any = main(argv)
        except SystemExit as exit_:
            status = exit_.code
        except BaseException as escaped:  # noqa: BLE001 - reported as the broken promise it is
            status = escaped
    if status in INTERRUPTED:  # the CLI turned the person's Ctrl-C (or a SIGTERM) into its exit status: stop
        raise KeyboardInterrupt
    return status, out.getvalue().decode("utf-8", "replace"), err.getvalue().decode("utf-8", "replace")


def lay_out(data: bytes, workdir: Path) -> Tuple[str, Path, Path, List[str]]:
    """A fuzz input as a run in the empty folder `workdir`: (command, its source written there, the
    destination in `workdir/out`, the CLI's arguments)."""
    command, ext, suffix = command_of(data)
    src, out_dir = workdir / f"source{suffix}", workdir / "out"
    src.write_bytes(data[1:])
    out_dir.mkdir()
    dst = out_dir / f"model_d2{ext}"
    return command, src, dst, [command, str(src)] + ([str(dst)] if command == "convert" else [])


def broken_promises(data: bytes, workdir: Path, rss_limit: Optional[int] = None) -> List[str]:
    """Run the command `data` asks for on its file in the empty folder `workdir`; what went wrong."""
    command, src, dst, argv = lay_out(data, workdir)
    out_dir = dst.parent
    status, stdout, stderr = run_cli(argv)
    problems = _exit_and_messages(status, stderr)
    left = sorted(os.listdir(out_dir)) + sorted(set(os.listdir(workdir)) - {src.name, "out"})
    wanted = [dst.name] if status == 0 and command == "convert" else []
    if left != wanted:
        problems.append(f"left behind after exit {status}: {left} (wanted {wanted})")
    if rss_limit is not None and peak_rss_bytes() > rss_limit:
        problems.append(f"peak memory {peak_rss_bytes() >> 20} MiB over the bound {rss_limit >> 20} MiB for a {len(data)}-byte input")
    if status == 0 and command == "convert" and dst.exists():
        problems += _output_problems(src, dst)
    return problems


def _exit_and_messages(status: Any, stderr: str) -> List[str]:
    if isinstance(status, BaseException):
        return [f"escaped the CLI: {type(status).__name__}: {str(status)[:200]}"]
    problems = []
    if status not in EXIT_STATUSES:
        problems.append(f"exit status {status}: {stderr.strip()[:300]}")
    if "internal error" in stderr:
        problems.append(f"internal error: {stderr.strip()[:300]}")
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith(WARNING_MARK)]
    if len(lines) > MAX_ERROR_LINES:
        problems.append(f"an error of {len(lines)} lines: {stderr[:300]}")
    return problems


def _output_problems(src: Path, dst: Path) -> List[str]:
    try:
        written = _read_written(dst)
    except Exception as err:  # noqa: BLE001 - the promise: every file written loads
        return [f"the written {dst.suffix} does not load ({type(err).__name__}: {str(err)[:200]})"]
    try:
        source = _decode_source(src)
    except Exception:  # noqa: BLE001 - no reference reads this source: nothing to compare with
        return []
    have = _tensor_bytes(source, dst.suffix == ".pkl")
    differ = [name for name, value in written.items() if _bytes_of(_as_tensor(value)) not in have]
    return [f"{len(differ)} written tensor(s) hold no tensor the source decodes to: {differ[:3]}"] if differ else []


def _read_written(dst: Path) -> dict:
    if dst.suffix == ".pkl":
        with open(dst, "rb") as f:
            return pickle.load(f)["model"]  # how Detectron2 reads a model-zoo file
    return torch_load_weights_only(str(dst))["model"]  # weights_only=True where torch has it (>= 1.13)


def _decode_source(src: Path) -> Any:
    from tests.adversarial.judge import decode_independently

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return decode_independently(src)


def _as_tensor(value: Any) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(value))


def _bytes_of(tensor: torch.Tensor) -> Tuple[str, Tuple[int, ...], bytes]:
    flat = tensor.contiguous().reshape(-1)
    same_width = flat.view(torch.int16) if flat.dtype == torch.bfloat16 else flat  # numpy has no bfloat16
    return str(flat.dtype), (flat.numel(),), same_width.numpy().tobytes()


def _tensor_bytes(obj: Any, to_pkl: bool, depth: int = 0) -> Set[Tuple[str, Tuple[int, ...], bytes]]:
    """Every tensor or array in `obj` as (dtype, numel, bytes); bfloat16 also as float32 for a .pkl."""
    found: Set[Tuple[str, Tuple[int, ...], bytes]] = set()
    if depth > 20:
        return found
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        try:
            tensor = _as_tensor(obj)
        except (TypeError, ValueError):  # an object or string array
            return found
        found.add(_bytes_of(tensor))
        if to_pkl and tensor.dtype == torch.bfloat16:
            found.add(_bytes_of(tensor.float()))
    elif isinstance(obj, dict):
        for value in obj.values():
            found |= _tensor_bytes(value, to_pkl, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            found |= _tensor_bytes(value, to_pkl, depth + 1)
    return found
