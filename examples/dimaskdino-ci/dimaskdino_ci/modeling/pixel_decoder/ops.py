"""The multi-scale deformable attention op, compiled from CUDA sources in the real project.

`DIMaskDINOMSDeformAttn` is never built here (there are no sources): this module fails to import
exactly as MaskDINO's does on a machine without the compiled op.
"""
try:
    import DIMaskDINOMSDeformAttn as _msda  # a compiled extension built by `setup.py build install` (CUDA only)
except ModuleNotFoundError:
    raise ModuleNotFoundError(
        "\n\nPlease compile MultiScaleDeformableAttention CUDA op with the following commands:\n"
        "\t`cd dimaskdino_ci/modeling/pixel_decoder/ops`\n"
        "\t`sh make.sh`\n"
    )


class MSDeformAttnFunction:
    forward = staticmethod(_msda.ms_deform_attn_forward)
