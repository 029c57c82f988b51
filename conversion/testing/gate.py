"""`assert_loads_clean`: the `verify` gate as an assertion a test suite can call."""
from __future__ import annotations

import os
from typing import Any, Optional, Sequence, Union

from ..errors import ConversionError

PathLike = Union[str, "os.PathLike[str]"]


def assert_loads_clean(
    checkpoint: Optional[PathLike] = None,
    config: Optional[PathLike] = None,
    imports: Sequence[str] = (),
    source: Optional[PathLike] = None,
    strict: bool = False,
    overrides: Sequence[str] = (),
) -> Any:
    """Assert that training would start from `checkpoint`'s weights, as `convnext-d2 verify` decides.

    The arguments are `conversion.verify.verify`'s (paths may be `os.PathLike`): `checkpoint` None
    checks the config's own weights, the file training loads; a LazyConfig `config` runs its code,
    as training does; `strict` makes warnings (unused checkpoint tensors, a checkpoint other than
    the config's) fail too.

    Returns:
        verify's report (`.ok`, `.problems`, `.warnings`, ...), for further assertions.

    Raises:
        AssertionError: verify found a problem (the message is its human report), or the input is
            unusable (the message is the CLI's error lines: missing file, import or config failure).

    Example:
        >>> assert_loads_clean("weights/convnext_tiny_d2.pth", config="configs/tiny.yaml",
        ...                    imports=["mypkg/modeling/backbone/convnext.py"])  # doctest: +SKIP
        >>> assert_loads_clean(config="projects/dino/configs/dino_convnext_tiny.py")  # doctest: +SKIP
    """
    from ..summaries import format_verification
    from ..verify import verify

    try:
        report = verify(
            None if checkpoint is None else os.fspath(checkpoint),
            config=None if config is None else os.fspath(config),
            imports=tuple(os.fspath(i) for i in imports),
            source=None if source is None else os.fspath(source),
            strict=strict,
            overrides=tuple(overrides),
        )
    except ConversionError as err:
        raise AssertionError(err.as_printed()) from None  # reads like `convnext-d2 verify`
    if not report.ok:
        raise AssertionError(format_verification(report))
    return report
