"""A stand-in for DI-MaskDINO's package: importing it imports the whole model, as the real one does.

That includes a CUDA-only compiled op (`pixel_decoder/ops.py`), which a CPU-only CI runner does not
have, so `import dimaskdino_ci.modeling.backbone.convnext` fails there although the backbone file
itself needs only torch and Detectron2.  Gate it with `--import dimaskdino_ci/modeling/backbone/convnext.py`.
"""
from . import modeling  # noqa: F401
