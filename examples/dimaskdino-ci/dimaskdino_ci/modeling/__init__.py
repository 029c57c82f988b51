from .backbone.convnext import D2ConvNeXt  # noqa: F401
from .pixel_decoder.ops import MSDeformAttnFunction  # noqa: F401
