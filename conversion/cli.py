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
from typing import Any, Callable, Iterator, List, Optional, Sequence

from . import __version__
from .errors import ConversionError, DestinationError, printable
from .inspection import inspect_checkpoint
from .layouts import LAYOUTS, LayoutOption, parse_layout_option
from .pipeline import convert, repair
from .summaries import format_inspection, format_repair, format_report, format_verification, summarise_names
from .target import BACKBONE_PREFIX

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


LAYOUT_HELP = f"read names as this layout instead of recognising it ({', '.join(LAYOUTS)}; add -v1/-v2 to pin the version)"


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
    c.add_argument("--prefix", default=BACKBONE_PREFIX, help=f"prepended to every name (default {BACKBONE_PREFIX!r}; '' for none)")
    c.add_argument("--from", dest="layout", metavar="LAYOUT", type=_layout_option, help=LAYOUT_HELP)
    c.add_argument("--force", action="store_true", help="overwrite DST if it exists")
    c.add_argument("--quiet", action="store_true", help="no progress bar and no summary (errors still go to stderr)")
    c.add_argument("--strict", action="store_true", help="refuse weights holding NaN or Inf (default: convert and warn)")
    r = sub.add_parser("repair", parents=[common], help="diagnose a Detectron2 file that fails to load and write a fixed one")
    r.add_argument("src", metavar="SRC", help="the broken (or suspect) file")
    r.add_argument("dst", metavar="DST", help="file to write; .pth/.pt = torch file, .pkl = Detectron2 model zoo")
    r.add_argument("--force", action="store_true", help="overwrite DST if it exists")
    v = sub.add_parser("verify", parents=[common],
                       help="load a checkpoint as train_net.py would; fail when training would not start from its weights")
    v.add_argument("ckpt", metavar="CKPT", nargs="?",
                   help="the Detectron2 checkpoint (a '?matching_heuristics=True' suffix is honoured); default: the "
                        "config's own weights (MODEL.WEIGHTS, or a LazyConfig's train.init_checkpoint), which training loads")
    v.add_argument("--config", metavar="YAML|LAZY.py", action="append", default=[],
                   help="the training config: a Detectron2 YAML or a LazyConfig .py (detrex; loading it runs its code, "
                        "as training does); repeatable: one verdict each, the exit status the worst "
                        "(default: this project's backbone, shaped like CKPT)")
    v.add_argument("--import", dest="imports", metavar="MODULE|FILE.py", action="append", default=[],
                   help="module or .py file that registers your backbone (a file is loaded without its package's __init__: the CPU-only CI case); repeatable, in order")
    v.add_argument("--source", metavar="SRC", help="also compare features with the backbone given SRC's weights")
    v.add_argument("--strict", action="store_true", help="warnings (e.g. checkpoint tensors nobody uses) fail too (exit 1)")
    v.epilog = ("Overrides after the options, as train_net.py takes them: KEY VALUE for a YAML config "
                "(MODEL.WEIGHTS path/to.pth), key=value for a LazyConfig (train.init_checkpoint=path/to.pth).")
    i = sub.add_parser("inspect", parents=[common], help="say what a checkpoint holds and what Detectron2 would make of it")
    i.add_argument("src", metavar="SRC", help="checkpoint to read")
    i.add_argument("--from", dest="layout", metavar="LAYOUT", type=_layout_option, help=LAYOUT_HELP)
    return parser


def _print(text: str, file: Any = None) -> None:
    """Print what may hold names from the file: non-printable characters escaped (errors.printable),
    and anything the stream's encoding lacks backslash-escaped, so that printing cannot fail on it."""
    stream = file or sys.stdout
    encoding = getattr(stream, "encoding", None) or "utf-8"
    text = printable(text, keep_newlines=True)
    print(text.encode(encoding, "backslashreplace").decode(encoding, "replace"), file=stream)


def _emit(args: argparse.Namespace, report: Any, human: Callable[[Any], str]) -> None:
    _print(json.dumps(report.to_dict(), indent=2, sort_keys=True) if args.json else human(report))


def _report_written(args: argparse.Namespace, report: Any) -> None:
    """convert's warning and report, for a file already written: where printing them fails (a
    closed or full stdout), the file is removed, so that an error exit leaves nothing behind."""
    try:
        if report.non_finite:
            _print(f"convnext-d2: warning: {len(report.non_finite)} tensor(s) hold NaN or Inf: "
                   f"{summarise_names(report.non_finite, 4)} (written as they are; --strict refuses them)", file=sys.stderr)
        if not args.quiet:
            _emit(args, report, format_report)
    except BrokenPipeError:  # the reader left (`| head`): the file is fine, and main says so
        raise
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.remove(args.dst)
        if isinstance(err, OSError):
            raise DestinationError(f"{args.dst}: written, then removed: the report could not be printed ({err.strerror or err}).",
                                   "Check where stdout goes, or pass --quiet.") from None
        raise


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


def _run(args: argparse.Namespace) -> int:
    if args.command == "convert":
        with _progress_bar(enabled=not args.quiet) as progress:
            report = convert(
                args.src, args.dst, ema=args.ema, prefix=args.prefix, layout=args.layout, force=args.force,
                progress=progress, strict=args.strict,
            )
        _report_written(args, report)
        return EXIT_OK
    if args.command == "verify":
        return _verify(args)
    if args.command == "repair":
        _emit(args, repair(args.src, args.dst, force=args.force), format_repair)
    else:  # inspect: argparse restricts the choices
        _emit(args, inspect_checkpoint(args.src, layout=args.layout), format_inspection)
    return EXIT_OK


def _verify(args: argparse.Namespace) -> int:
    """One verification per --config (or one without), each report printed, the exit status the worst:
    an unusable config is its error lines (exit 2), the others are still checked."""
    from .verify import verify_all

    results = verify_all(args.positional, configs=args.config, imports=args.imports, source=args.source, strict=args.strict)
    if len(results) == 1 and isinstance(results[0], ConversionError):
        raise results[0]
    reports = [r for r in results if not isinstance(r, ConversionError)]
    if args.json and reports:
        data = [r.to_dict() for r in reports]
        print(json.dumps(data[0] if len(data) == 1 else data, indent=2, sort_keys=True))
    elif reports:
        print("\n".join(format_verification(r) for r in reports))
    statuses = [EXIT_OK if r.ok else EXIT_PROBLEM for r in reports]
    for err in results:
        if isinstance(err, ConversionError):
            print(err.as_printed(), file=sys.stderr)
            statuses.append(err.exit_status)
    return max(statuses)


class _Terminated(BaseException):
    """SIGTERM, raised where the process is, so the writers' cleanup runs (like Ctrl-C)."""


def _terminate(signum: int, frame: Any) -> None:
    raise _Terminated()


def _parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """Parse the command line; verify's positional items (CKPT and train_net-style overrides, in any
    order after the options) are split by `training_weights.split_arguments`."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command != "verify":
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        return args
    options = [e for e in extra if e.startswith("-")]
    if options:
        parser.error(f"unrecognized arguments: {' '.join(options)}")
    args.positional = ([args.ckpt] if args.ckpt else []) + extra
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parse(argv)
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
