"""convnext-d2: ConvNeXt checkpoints into Detectron2 files that provably load.

Importing this package never imports detectron2, timm or transformers; the
Detectron2 backbone lives in `conversion.d2`.
"""
from .pipeline import ConversionReport, convert
from .errors import (
    ContainerError,
    ConversionError,
    DestinationError,
    NonFiniteWeights,
    NotConvNeXt,
    UnreadableCheckpoint,
    UnsafeCheckpoint,
    VerificationFailed,
)

__version__ = "0.1.0"

__all__ = [
    "ConversionError",
    "ConversionReport",
    "ContainerError",
    "DestinationError",
    "NonFiniteWeights",
    "NotConvNeXt",
    "UnreadableCheckpoint",
    "UnsafeCheckpoint",
    "VerificationFailed",
    "convert",
    "__version__",
]
