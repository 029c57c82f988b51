"""Which file training loads: the config's own weights, resolved as training resolves them, and
train_net-style overrides from the command line.

Detectron2's `train_net.py` loads `MODEL.WEIGHTS` (a YAML config) and detrex's loads
`train.init_checkpoint` (a LazyConfig), both through `DetectionCheckpointer`, whose path manager
opens a relative path from the working directory and downloads a `detectron2://` or URL path.  A
gate that checks some other file passes while training loads something else, so `verify` checks
the config's own weights unless given a checkpoint, and warns when the two differ.  Nothing here is
downloaded: a remote path is unusable input (download it first, then name the local file).
Overrides come after the options, as train_net.py takes them.  Pure functions: no Detectron2 here.
"""
from __future__ import annotations

import os
import re
from typing import Any, List, Optional, Sequence, Tuple

from .errors import UnusableVerifyInput, describe_exception

YAML_KEY = re.compile(r"^[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)+$")  # MODEL.WEIGHTS, SOLVER.BASE_LR
LAZY_OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.\w+)*=")  # train.init_checkpoint=...
REMOTE = re.compile(r"^[a-z][a-z0-9+.-]*://")  # detectron2://, https://, s3://, manifold://


def split_arguments(args: Sequence[str]) -> Tuple[Optional[str], List[str], List[str]]:
    """(CKPT or None, YAML `KEY VALUE` overrides flattened, LazyConfig `key=value` overrides) from
    verify's positional arguments, in any order after the first: a CKPT is the one item that is
    neither an override key, its value, nor `key=value`.

    Raises:
        UnusableVerifyInput: two checkpoints, or a YAML key without its value.
    """
    checkpoint: Optional[str] = None
    yaml: List[str] = []
    lazy: List[str] = []
    items = list(args)
    i = 0
    while i < len(items):
        item = items[i]
        if YAML_KEY.match(item):
            if i + 1 >= len(items):
                raise UnusableVerifyInput(f"override {item} has no value.",
                                          "Write YAML overrides as KEY VALUE pairs, e.g. MODEL.WEIGHTS path/to.pth.")
            yaml += [item, items[i + 1]]
            i += 2
            continue
        if LAZY_OVERRIDE.match(item):
            lazy.append(item)
        elif checkpoint is None:
            checkpoint = item
        else:
            raise UnusableVerifyInput(
                f"'{item}' is neither the checkpoint ({checkpoint} already is) nor an override.",
                "Give one CKPT; overrides are KEY VALUE (YAML) or key=value (LazyConfig).",
            )
        i += 1
    return checkpoint, yaml, lazy


def apply_yaml_overrides(cfg: Any, config: str, overrides: Sequence[str]) -> None:
    """`cfg.merge_from_list(overrides)` as train_net.py does, but a key the config does not have is
    refused (the user's YAML allows new keys, which would make a misspelt override change nothing)."""
    for key in overrides[::2]:
        node = cfg
        for part in key.split("."):
            if not hasattr(node, "get") or part not in node:
                raise UnusableVerifyInput(f"--config {config}: override {key} names no key of this config.",
                                          "Check the key's spelling (e.g. MODEL.WEIGHTS).")
            node = node[part]
    try:
        cfg.merge_from_list(list(overrides))
    except Exception as err:  # a value of the wrong type for its key
        what = f"overrides {' '.join(overrides)} do not apply ({describe_exception(err)})"
        raise UnusableVerifyInput(f"--config {config}: {what}.",
                                  "Give each key a value of its type.") from None


def check_local_file(path: str, named: str) -> str:
    """`path` (a `?matching_heuristics=True` suffix kept) when it is a usable local file; errors name
    it as `named` says (e.g. "MODEL.WEIGHTS of X.yaml"; "" for the CKPT itself).

    Raises:
        UnusableVerifyInput: remote, missing or empty.
    """
    what = f"{named} {path}".strip()
    if REMOTE.match(path):
        raise UnusableVerifyInput(
            f"{what}: a remote file, which training would download.",
            "Download it first and pass the local file (as CKPT, or override the config's weights with it).",
        )
    local = path.split("?", 1)[0]
    if not os.path.isfile(local):
        cwd = os.getcwd()
        where = "" if os.path.isabs(local) else f" (relative to the working directory {cwd}, as training opens it)"
        raise UnusableVerifyInput(f"{what}: no such file{where}.", "Check the path.")
    if os.path.getsize(local) == 0:
        raise UnusableVerifyInput(f"{what}: the file is empty.", "Save or convert the weights again.")
    return path


def same_file(a: str, b: str) -> bool:
    """Whether two checkpoint paths (query suffixes included) name the same file the same way."""
    pa, _, qa = a.partition("?")
    pb, _, qb = b.partition("?")
    return os.path.realpath(pa) == os.path.realpath(pb) and qa == qb


def resolve(
    checkpoint: Optional[str], config: Optional[str], key: str, value: Optional[str]
) -> Tuple[str, Optional[str], Optional[str]]:
    """(the file to load, the config key it came from, a warning when CKPT is not the config's own
    weights): CKPT when given, else the config's `key` (whose value is `value`).

    Raises:
        UnusableVerifyInput: neither names usable weights.
    """
    if checkpoint is None:
        if not config:
            raise UnusableVerifyInput("no CKPT and no --config: nothing names the weights to check.",
                                      "Pass CKPT, or --config with the training config (its own weights are checked).")
        if not value:
            raise UnusableVerifyInput(f"--config {config} names no weights ({key} is empty) and no CKPT was given.",
                                      f"Pass CKPT, or set {key} (in the config or as an override after the options).")
        return check_local_file(value, f"{key} of {config}"), key, None
    check_local_file(checkpoint, "")
    if not config or not value or (not REMOTE.match(value) and same_file(checkpoint, value)):
        return checkpoint, None, None
    return checkpoint, None, (f"CKPT {checkpoint} is not the config's own weights: training loads {key} = {value} "
                              "(verify without CKPT to check that file, or set it to this one)")
