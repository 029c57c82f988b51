"""`inspect`: what a checkpoint file is, and what Detectron2 would make of it as it is."""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Hashable, Iterable, List, Mapping, Optional, Union

from .d2_prediction import split_query
from .diagnose import diagnose
from .layouts import LAYOUTS, LayoutOption, recognise
from .containers import check_weight_types, select_state_dict
from .io.handles import TensorRef, numel
from .read import open_source


@dataclass
class InspectReport:
    """Everything `inspect` tells about a file (also its `--json` output)."""

    path: str
    file_bytes: int
    format: str  # torch-zip, torch-legacy, pickle, safetensors
    container_keys: List[str]  # top-level keys of the file
    container: Optional[str]  # where the weights are (None: a bare state dict)
    has_ema: bool
    layout: str
    layout_description: str
    source_prefix: str
    version: int
    variant: Optional[str]
    depths: List[int]
    dims: List[int]
    num_classes: Optional[int]
    tensors: int
    parameters: int  # of every tensor in the state dict (the backbone's and the detector's), tied ones once
    dtypes: Dict[str, int]
    reshaped: Dict[str, str] = field(default_factory=dict)
    drop_reasons: Dict[str, str] = field(default_factory=dict)  # source name -> why a conversion leaves it out (but the classifier)
    # A detector's or segmenter's parts around its `backbone.` (neck., roi_head., ...) -> tensor count.
    detector_parts: Dict[str, int] = field(default_factory=dict)
    problems: List[str] = field(default_factory=list)  # what Detectron2 would hit loading the file as is
    # What Detectron2 does with the file as it is, on the installed stack (d2_prediction.Prediction):
    # reader, raises, heuristics, loaded / missing / unused / shape-skipped names, other stacks' outcomes.
    detectron2: Dict[str, Any] = field(default_factory=dict)
    bytes_read: Optional[int] = None  # of the file: only its metadata is read, whatever the format

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def inspect_checkpoint(path: str, *, layout: Union[None, str, LayoutOption] = None) -> InspectReport:
    """Read, recognise and diagnose `path` without writing anything (`path?matching_heuristics=True`
    predicts the load of that URL, as Detectron2 reads it).

    Raises:
        ConversionError: unreadable, no state dict, or not a ConvNeXt this tool knows.
    """
    # Metadata only, for every format: a torch archive's index, a safetensors header, the pickles of
    # a legacy torch file or a plain pickle (tensors and arrays as handles, payloads left in the file).
    path_asked, (path, _) = path, split_query(path)
    source = open_source(path)
    loaded, fmt, bytes_read = source.objects, source.format, source.bytes_read
    state_dict, container = select_state_dict(loaded)
    check_weight_types(state_dict)
    canonical, arch = recognise(state_dict, layout, lenient=True)
    prediction, problems = diagnose(path_asked, source, canonical, arch)
    return InspectReport(
        path=os.path.abspath(path),
        file_bytes=os.path.getsize(path),
        format=fmt,
        container_keys=sorted(map(str, loaded)) if isinstance(loaded, Mapping) and container else [],
        container=container,
        has_ema=isinstance(loaded, Mapping) and any(k in loaded for k in ("model_ema", "state_dict_ema")),
        layout=canonical.layout,
        layout_description=LAYOUTS[canonical.layout].description,
        source_prefix=canonical.prefix,
        **arch.report_fields(),
        tensors=len(state_dict),
        parameters=distinct_parameters(state_dict.values()),
        dtypes=dict(Counter(str(tensor.dtype).replace("torch.", "") for tensor in canonical.state_dict.values())),
        reshaped={canonical.source_names[k]: fix for k, fix in canonical.reshaped.items()},
        drop_reasons=dict(canonical.dropped),
        detector_parts=dict(canonical.detector_parts),
        problems=problems,
        detectron2=prediction.to_dict(),
        bytes_read=bytes_read,
    )


def _view_identity(tensor: Any) -> Hashable:
    """What makes two state-dict entries the same weights: the same view of the same storage
    (a tied module saves one storage under every name it has)."""
    if isinstance(tensor, TensorRef):
        return (tensor.storage.key, tensor.offset, tensor.shape, tensor.stride)
    if hasattr(tensor, "data_ptr"):  # a torch tensor in memory (data_ptr: its first element's address, any torch)
        return (tensor.data_ptr(), tuple(tensor.shape), tensor.stride(), str(tensor.dtype))
    return id(tensor)


def distinct_parameters(tensors: Iterable[Any]) -> int:
    """Elements of all `tensors`, each tied (shared) one counted once."""
    seen = {_view_identity(t): numel(t) for t in tensors}
    return sum(seen.values())
