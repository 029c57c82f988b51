"""Command line: parse arguments, call the library, print.  Nothing else lives here.

Exit status (the public contract, docs/design.md): 0 success, 1 a verification found a problem, 2 unusable input
or arguments.  Errors are one or two plain lines on stderr; `--debug` adds the traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import traceback
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

from . import __version__
from .pipeline import ConversionReport, RepairReport, convert, repair
from .errors import ConversionError
from .inspection import InspectReport, inspect_checkpoint
from .layouts import LAYOUTS, LayoutOption, parse_layout_option
from .target import DEFAULT_PREFIX

EXIT_OK, EXIT_PROBLEM, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse exits 2 already; keep its usage line short
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _layout_option(text: str) -> LayoutOption:
    """`--from`, parsed while the arguments are (a wrong name is a usage error, before any file is read)."""
    try:
        option = parse_layout_option(text)
    except ConversionError as err:
        raise argparse.ArgumentTypeError(f"{err.message} {err.hint}") from None
    assert option is not None
    return option


def _layout_help() -> str:
    names = ", ".join(LAYOUTS)
    return f"read names as this layout instead of recognising it ({names}; add -v1/-v2 to pin the version)"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="convnext-d2", description="ConvNeXt checkpoints into Detectron2 files that provably load.")
    parser.add_argument("--version", action="version", version=f"convnext-d2 {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show a traceback on errors")
    common.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    c = sub.add_parser("convert", parents=[common], help="convert a ConvNeXt checkpoint into a Detectron2 .pth or .pkl")
    c.add_argument("src", metavar="SRC", help="checkpoint to read (.pth, .pt, .bin, .pkl, .safetensors, ...)")
    c.add_argument("dst", metavar="DST", help="file to write; .pth/.pt = torch file, .pkl = Detectron2 model zoo")
    c.add_argument("--ema", action="store_true", help="take the EMA weights of a training checkpoint (model_ema)")
    c.add_argument("--prefix", default=DEFAULT_PREFIX, help=f"prepended to every name (default {DEFAULT_PREFIX!r}; '' for none)")
    c.add_argument("--from", dest="layout", metavar="LAYOUT", type=_layout_option, help=_layout_help())
    c.add_argument("--force", action="store_true", help="overwrite DST if it exists")
    c.add_argument("--quiet", action="store_true", help="no progress bar and no summary (errors still go to stderr)")
    c.add_argument("--strict", action="store_true", help="refuse weights holding NaN or Inf (default: convert and warn)")
    r = sub.add_parser("repair", parents=[common], help="diagnose a Detectron2 file that fails to load and write a fixed one")
    r.add_argument("src", metavar="SRC", help="the broken (or suspect) file")
    r.add_argument("dst", metavar="DST", help="file to write; .pth/.pt = torch file, .pkl = Detectron2 model zoo")
    r.add_argument("--force", action="store_true", help="overwrite DST if it exists")
    v = sub.add_parser("verify", parents=[common],
                       help="load a checkpoint as train_net.py would; fail when training would not start from its weights")
    v.add_argument("ckpt", metavar="CKPT", help="the Detectron2 checkpoint (a '?matching_heuristics=True' suffix is honoured)")
    v.add_argument("--config", metavar="YAML", help="the training config (default: this project's backbone, shaped like CKPT)")
    v.add_argument("--import", dest="imports", metavar="MODULE|FILE.py", action="append", default=[],
                   help="module or .py file that registers your backbone (a file is loaded without its package's __init__: the CPU-only CI case); repeatable, in order")
    v.add_argument("--source", metavar="SRC", help="also compare features with the backbone given SRC's weights")
    v.add_argument("--strict", action="store_true", help="warnings (e.g. checkpoint tensors nobody uses) fail too (exit 1)")
    i = sub.add_parser("inspect", parents=[common], help="say what a checkpoint holds and what Detectron2 would make of it")
    i.add_argument("src", metavar="SRC", help="checkpoint to read")
    i.add_argument("--from", dest="layout", metavar="LAYOUT", type=_layout_option, help=_layout_help())
    return parser


def _human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _summarise_names(names: List[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def format_report(r: ConversionReport) -> str:
    name = r.variant or "custom variant"
    lines = [
        f"converted {r.source}",
        f"  layout     {r.layout}" + (f" (container '{r.container}')" if r.container else " (bare state dict)")
        + (f", source prefix '{r.source_prefix}' removed" if r.source_prefix else ""),
        f"  variant    {name}, ConvNeXt V{r.version}, depths {r.depths}, dims {r.dims}",
        f"  kept       {r.kept} tensors, {r.parameters / 1e6:.2f} M parameters, names prefixed '{r.prefix}'",
    ]
    if r.dropped:
        reasons: Dict[str, List[str]] = {}
        for key in r.dropped:
            reasons.setdefault(r.drop_reasons.get(key, "left out"), []).append(key)
        for reason, keys in reasons.items():
            lines.append(f"  dropped    {len(keys)} tensors, {reason}: {_summarise_names(keys)}")
    if r.left_out:
        parts = ", ".join(f"{part} x{count}" for part, count in r.left_out.items())
        lines.append(f"  left out   {sum(r.left_out.values())} tensors of the detector around the backbone: {parts}")
    if r.read_past:
        classes = sorted(set(r.read_past.values()))
        lines.append(f"  read past  {len(r.read_past)} non-weight objects, not built (nothing imported or run): {_summarise_names(classes)}")
    if r.renamed:
        lines.append(f"  renamed    {len(r.renamed)} tensors from {r.layout} names to official names")
    fixes = sorted(set(r.reshaped.values()))
    if fixes:
        lines.append(f"  reshaped   {len(r.reshaped)} tensors ({'; '.join(fixes)}), values unchanged")
    for old, new in r.dtype_changes.items():
        lines.append(f"  dtype      {old} stored as {new} (numpy has no {old}; exact)")
    if r.fresh:
        modules = sorted({key.rsplit(".", 1)[0] for key in r.fresh})
        lines.append(f"  fresh      {len(r.fresh)} output-norm tensors not in any ImageNet file, "
                     f"initialised by the backbone: {', '.join(modules)}")
    fmt = "torch file" if r.format == "torch" else "Detectron2 model-zoo pickle"
    lines.append(f"  wrote      {r.destination} ({_human_size(r.bytes_written)}, {fmt})")
    if r.non_finite is None:
        lines.append("  finite     not checked: streamed conversion (--strict reads every tensor and checks it)")
    elif r.non_finite:
        lines.append(f"  finite     NO: {len(r.non_finite)} tensors hold NaN or Inf: {_summarise_names(r.non_finite, 4)}")
    lines += [f"  note       the source as given: {note}" for note in r.notes]
    return "\n".join(lines)


def format_inspection(r: InspectReport) -> str:
    where = f"under '{r.container}'" if r.container else "bare state dict"
    lines = [
        f"{r.path}",
        f"  file       {_human_size(r.file_bytes)}, {r.format}; weights {where}"
        + (f"; top-level keys {', '.join(r.container_keys)}" if r.container_keys else "")
        + ("; has EMA weights (--ema)" if r.has_ema else ""),
        f"  layout     {r.layout}: {r.layout_description}" + (f"; prefix '{r.source_prefix}'" if r.source_prefix else ""),
        f"  variant    {r.variant or 'custom variant'}, ConvNeXt V{r.version}, depths {r.depths}, dims {r.dims}"
        + (f", classifier {r.num_classes} classes" if r.num_classes else ", no classifier"),
        f"  tensors    {r.tensors} ({r.parameters / 1e6:.2f} M parameters); dtypes "
        + ", ".join(f"{k} x{v}" for k, v in sorted(r.dtypes.items())),
    ]
    if r.reshaped:
        lines.append(f"  reshaped   {len(r.reshaped)} tensors on conversion ({'; '.join(sorted(set(r.reshaped.values())))})")
    if r.left_out:
        lines.append(f"  left out   {len(r.left_out)} tensors on conversion: {_summarise_names(sorted(r.left_out))}")
    if r.detector_parts:
        parts = ", ".join(f"{part} x{count}" for part, count in r.detector_parts.items())
        lines.append(f"  detector   {sum(r.detector_parts.values())} tensors around the backbone, left out on conversion: {parts}")
    if r.problems:
        lines.append("  Detectron2 loading this file as it is:")
        lines += [f"    - {p}" for p in r.problems]
        lines.append("  fix: convnext-d2 convert SRC DST.pth")
    else:
        lines.append("  Detectron2 loading this file as it is: no problem found")
    return "\n".join(lines)


def format_repair(r: RepairReport) -> str:
    if not r.repaired:
        return f"{r.source}\n  fine: Detectron2 loads it as it is; nothing to repair, {r.destination} not written"
    lines = [f"{r.source}", f"  {len(r.causes)} cause(s) found:"]
    lines += [f"    - {cause}" for cause in r.causes]
    assert r.conversion is not None
    lines.append("  repaired by converting:")
    lines += ["  " + line for line in format_report(r.conversion).splitlines()[1:] if "note " not in line]
    return "\n".join(lines)


def _verdict(r: Any) -> str:
    """The first line: what a CI log shows."""
    if r.problems:
        return f"verify: FAIL: {r.problems[0]}"
    if r.warnings and r.strict:
        return f"verify: FAIL: --strict: {r.warnings[0]}"
    return f"verify: OK with warnings ({len(r.warnings)})" if r.warnings else "verify: OK"


def format_verification(r: Any) -> str:
    """The human report of `verify`: the verdict line, then what was loaded into what."""
    source = f" from {r.config}" if r.config else " (this project's, shaped like the checkpoint)"
    lines = [_verdict(r), f"  checkpoint {r.checkpoint}", f"  backbone   {r.backbone}{source}"]
    if not r.load_attempted:
        lines.append(f"  model      not built, nothing loaded: {r.whole_model_reason}")
    elif r.whole_model:
        lines.append(f"  model      {r.meta_architecture}, built whole on CPU as train_net.py builds it")
    else:
        lines.append(f"  model      backbone only: whole model not built: {r.whole_model_reason}; "
                     "checkpoint keys that could match outside the backbone were not checked")
    if r.error is None and r.load_attempted:
        how = " (names matched by matching_heuristics)" if r.heuristics else " (exact names)"
        lines.append(f"  loaded     {r.loaded} backbone tensors{how}")
        lines.append(f"  fresh      {len(r.fresh)} output-norm tensors initialised by the backbone (expected)")
        lines.append(f"  missing    {len(r.missing)}; unused {len(r.unexpected)}; shape-skipped {len(r.shape_skipped)}")
        if r.whole_model:
            lines.append(f"  outside    {r.loaded_outside} tensors loaded outside the backbone; "
                         f"{r.initialised_outside} keep the model's initialisation")
    if r.renamed:
        lines.append(f"  renamed    {len(r.renamed)} by matching_heuristics")
    for change, count in r.dtype_changes.items():
        lines.append(f"  dtype      {count} tensors cast {change} on load")
    if r.feature_difference is not None:
        lines.append(f"  features   max relative difference to --source {r.feature_difference:.1e}")
    shown = 1 if r.problems else 0
    lines += [f"  problem    {p}" for p in r.problems[shown:]]
    shown = 1 if not r.problems and r.strict else 0
    lines += [f"  warning    {w}" for w in r.warnings[shown:]]
    if r.fix and not r.ok:
        lines.append(f"  fix        {r.fix}")
    return "\n".join(lines)


def _emit(args: argparse.Namespace, report: Any, human: Callable[[Any], str]) -> None:
    print(json.dumps(report.to_dict(), indent=2, sort_keys=True) if args.json else human(report))


# Below this many bytes a conversion takes about a second: no bar for it.
PROGRESS_MIN_BYTES = 256 * 2**20


@contextlib.contextmanager
def _progress_bar(enabled: bool) -> Iterator[Optional[Callable[[int, int], None]]]:
    """A tqdm bar on stderr, only for a person watching (a terminal) and only for a large file."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    try:
        from tqdm import tqdm
    except ImportError:  # the bar is a nicety; without tqdm the conversion is the same
        yield None
        return
    bar: List[Any] = []

    def update(done: int, total: int) -> None:
        if total < PROGRESS_MIN_BYTES:
            return
        if not bar:
            bar.append(tqdm(total=total, unit="B", unit_scale=True, desc="convert", file=sys.stderr, leave=False))
        bar[0].update(done - bar[0].n)

    try:
        yield update
    finally:
        if bar:
            bar[0].close()


def _layout_text(option: Optional[LayoutOption]) -> Optional[str]:
    # convert() and inspect_checkpoint() take the option's text today; they will take the parsed
    # LayoutOption itself once they call parse_layout_option (which returns a parsed one as it is).
    return None if option is None else option.text


def _run(args: argparse.Namespace) -> int:
    if args.command == "convert":
        with _progress_bar(enabled=not args.quiet) as progress:
            report = convert(
                args.src, args.dst, ema=args.ema, prefix=args.prefix, layout=_layout_text(args.layout), force=args.force,
                progress=progress, strict=args.strict,
            )
        if report.non_finite:
            print(f"convnext-d2: warning: {len(report.non_finite)} tensor(s) hold NaN or Inf: "
                  f"{_summarise_names(report.non_finite, 4)} (written as they are; --strict refuses them)", file=sys.stderr)
        if not args.quiet:
            _emit(args, report, format_report)
        return EXIT_OK
    if args.command == "repair":
        _emit(args, repair(args.src, args.dst, force=args.force), format_repair)
        return EXIT_OK
    if args.command == "verify":
        from .verify import verify

        report = verify(args.ckpt, config=args.config, imports=args.imports, source=args.source, strict=args.strict)
        _emit(args, report, format_verification)
        return EXIT_OK if report.ok else EXIT_PROBLEM
    if args.command == "inspect":
        _emit(args, inspect_checkpoint(args.src, layout=_layout_text(args.layout)), format_inspection)
        return EXIT_OK
    raise AssertionError(f"unhandled command {args.command}")  # argparse restricts the choices


class _Terminated(BaseException):
    """SIGTERM, raised where the process is, so the writers' cleanup runs (like Ctrl-C)."""


def _terminate(signum: int, frame: Any) -> None:
    raise _Terminated()


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread (embedded use): leave signals alone
        previous = None
    try:
        return _run(args)
    except _Terminated:
        print("convnext-d2: terminated; nothing was written.", file=sys.stderr)
        return 128 + signal.SIGTERM
    except ConversionError as err:
        if args.debug:
            traceback.print_exc()
        print(err.as_printed(), file=sys.stderr)
        return err.exit_status
    except KeyboardInterrupt:
        print("convnext-d2: interrupted; nothing was written.", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `convnext-d2 ... | head`: the reader left; the work itself is done
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (silence the flush at exit)
        return EXIT_OK
    except Exception as err:  # a bug, not the user's fault: say so without a traceback
        if args.debug:
            traceback.print_exc()
        print(f"convnext-d2: internal error: {type(err).__name__}: {err}", file=sys.stderr)
        print("convnext-d2: rerun with --debug and report the traceback.", file=sys.stderr)
        return EXIT_USAGE
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
