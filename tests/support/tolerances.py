"""Tolerances of the forward-equivalence tests, stated once with the reasoning behind each number:
the converted Detectron2 backbone against the original network (tests/d2/test_equivalence.py, timm)
and against each library's own model (tests/layouts/test_layout_equivalence.py), on CPU and on CUDA.
"""
from __future__ import annotations

import torch

# A stage output `got` matches its reference `ref` when, elementwise,
#     |got - ref| <= ATOL_SCALE * max|ref| + RTOL * |ref|.
# The absolute part is scaled by the tensor's largest magnitude because near-zero entries
# carry the absolute rounding error of the large ones they were summed from.

# fp32 on CPU: both sides run the same torch ops in the same order (conv, permute,
# layer_norm, linear, GELU, scale, add), so they should agree to the last bit; what
# may legitimately differ is the blocking a kernel picks for a different memory layout,
# which re-associates sums: a few ulp (fp32 ulp = 1.2e-7) per op, over <= ~40 ops.
# 1e-5 (~80 ulp) covers that with margin and still catches real mistakes: a LayerNorm
# eps of 1e-5 instead of the official 1e-6 moves the outputs by 5e-5..8e-4 of max|ref|.
CPU_FP32_RTOL = 1e-5
CPU_FP32_ATOL_SCALE = 1e-5

# Each library's own model against the D2 backbone, fp32 CPU, every layout.  The libraries compute the same functions with the same torch ops, and
# where they differ the difference is one of op order, each worth a few fp32 ulp (1.2e-7) per op:
# - timm conv-MLP and features_only atto models run the MLP as 1x1 convolutions (a GEMM with
#   another blocking than nn.Linear) and their block LayerNorm channels-first;
# - timm's GRN adds in another order (`x + addcmul(bias, weight, x * n)` against the official
#   `gamma * (x * n) + beta + x`);
# - Hugging Face (torch.linalg.vector_norm in GRN) and torchvision (layer scale after the permute
#   back to NCHW) compute the same ops in the same order and are bit-identical here;
# - both sides use F.layer_norm / F.gelu / conv2d for everything else.
# The fp32 bound above (1e-5 of max|ref| plus 1e-5 relative, ~80 ulp) covers that for
# all layouts with margin; a real mistake (a wrong eps, a dropped layer scale or GRN, swapped
# weights) moves outputs by 5e-5 of max|ref| or (much) more.  The measured values are printed.
LIBRARY_FP32_RTOL = CPU_FP32_RTOL
LIBRARY_FP32_ATOL_SCALE = CPU_FP32_ATOL_SCALE

# CUDA.  Unit roundoff u: fp32 2^-24; fp16 2^-11 = 4.9e-4 (10-bit mantissa); bf16
# 2^-8 = 3.9e-3 (7 stored bits, 8 with the implicit one).  cuDNN runs fp32 convolutions
# in TF32 (u = 2^-11) by default on Ampere and later, so CUDA "fp32" is held to the
# fp16 budget against the CPU reference.  Errors accumulate over the blocks of a stage and
# are partly renormalised by each LayerNorm; on CPU, ConvNeXt-Tiny at 2x3x128x128 in bf16/fp16
# lands at 1.3e-2 / 1.9e-3 of max|ref| against fp32, i.e. 3-4 u.  The bound is 16 u: room for
# a different GPU accumulation order, while a structural mistake (a missing layer scale,
# a swapped weight) moves outputs by O(max|ref|) and still fails.
CUDA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CUDA_VS_FP32_REFERENCE_REL = {torch.float32: 16 * 2**-11, torch.float16: 16 * 2**-11, torch.bfloat16: 16 * 2**-8}
# The Detectron2 backbone may be no less accurate than the original in the same dtype:
# its error against the fp32 reference is at most twice timm's, plus one u of max|ref|.
NO_WORSE_THAN_ORIGINAL_FACTOR = 2.0
UNIT_ROUNDOFF = {torch.float32: 2**-11, torch.float16: 2**-11, torch.bfloat16: 2**-8}  # fp32 as TF32
# D2 against timm, both on CUDA in the same dtype: the same kernels on the same inputs,
# so the difference is zero unless a kernel picks another algorithm; allow 4 u.
CUDA_SAME_DTYPE_REL = {torch.float32: 1e-5, torch.float16: 4 * 2**-11, torch.bfloat16: 4 * 2**-8}

# The guard against a vacuous comparison: a norm the comparison relies on (a randomised output norm,
# DINOv3's final norm) must move the outputs by more than this somewhere.  Randomised norms (weights
# 1 + 0.1..0.3 noise, biases 0.1..0.3 noise) move them by O(0.1) or more; an identity norm by nothing.
NORM_MOVES_OUTPUTS_ATOL = 1e-2
