"""Error types of convnext-d2.

Every failure a user can cause is one of these.  Each carries the two things the
CLI prints: what happened and what to do about it.  The CLI maps them to exit
status 2 (unusable input or arguments); nothing here prints or exits.
"""
from __future__ import annotations

import re

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# torch's long loading errors put the cause (the refused global, a persistent id) on a later line.
_CAUSE_MARKERS = ("WeightsUnpickler", "persistent id")
EXCEPTION_LINE_LIMIT = 240


class ConversionError(Exception):
    """Base class: a problem with the user's input, reported without a traceback.

    Args:
        message: what happened, naming the file or key involved.
        hint: what the user can do about it (one line).
    """

    exit_status = 2

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:  # keeps `str(err)` useful in logs and tests
        return self.message if not self.hint else f"{self.message}\n{self.hint}"

    def as_printed(self, program: str = "convnext-d2") -> str:
        """The one or two lines the CLI prints on stderr (also the message of a failing gate test);
        what the file put into the message (a name holding a newline) cannot add a line."""
        return f"{program}: error: {printable(self.message)}" + (f"\n{program}: {printable(self.hint)}" if self.hint else "")


def printable(text: str, keep_newlines: bool = False) -> str:
    """`text` with every character that is not printable escaped as Python spells it (`\\n`,
    `\\x1b`, `\\u202e`, a lone surrogate `\\ud800`): names come from the file, and a control
    character would forge lines or colours, a surrogate fails to encode.  With `keep_newlines`,
    the line breaks of a formatted report stay."""
    if text.isprintable():
        return text
    if keep_newlines:
        return "\n".join(printable(line) for line in text.split("\n"))
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def plain_text(message: str) -> str:
    """`message` without terminal colours (fvcore colours key names)."""
    return _ANSI.sub("", message)


def describe_exception(err: BaseException) -> str:
    """Someone else's exception (Detectron2's, torch's, a user module's) as one line of our message:
    its type and the line that names the cause, capped at `EXCEPTION_LINE_LIMIT` characters."""
    lines = [plain_text(line).strip() for line in str(err).splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    cause = next((line for line in lines if any(m in line for m in _CAUSE_MARKERS)), lines[0])
    return f"{type(err).__name__}: {cause[:EXCEPTION_LINE_LIMIT]}"


class UnreadableCheckpoint(ConversionError):
    """The source file cannot be read as a checkpoint at all."""


class UnsafeCheckpoint(UnreadableCheckpoint):
    """The file asks the unpickler to build an object we do not allow (code could run)."""


class ContainerError(ConversionError):
    """The checkpoint holds no state dict we can use (or not the one asked for)."""


class NotConvNeXt(ConversionError):
    """The state dict is not a (consistent) ConvNeXt."""


class DestinationError(ConversionError):
    """The destination path cannot or must not be written."""


class VerificationFailed(ConversionError):
    """A written file does not read back equal to what was meant to be written (exit status 1)."""

    exit_status = 1


class NonFiniteWeights(ConversionError):
    """`--strict`: the weights hold NaN or Inf (without it, a warning)."""


class UnusableImport(ConversionError):
    """An `--import` module or file that cannot be used: missing, not Python, raising, registering nothing."""


class UnusableVerifyInput(ConversionError):
    """`verify`: a checkpoint path, a config or a backbone name that cannot be used."""


class PredictedRaise(Exception):
    """Not a user error: Detectron2 (or torch under it) *would* raise loading a file, as predicted
    by `d2_prediction` (and the heuristics it runs).  Caught there and recorded as the prediction's
    `raises`; never reaches the CLI."""
