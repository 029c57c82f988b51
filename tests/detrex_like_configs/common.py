"""The detrex-like DINO with a ConvNeXt-Tiny backbone (tests/detrex_like.py), as a LazyConfig."""
from detectron2.config import LazyCall as L

from tests.detrex_like import ConvNeXtLike, DeformableTransformerLike, DINOLike

model = L(DINOLike)(
    backbone=L(ConvNeXtLike)(depths=[3, 3, 9, 3], dims=[96, 192, 384, 768], out_indices=(1, 2, 3)),
    transformer=L(DeformableTransformerLike)(embed_dim=256, num_layers=6, use_compiled_op=False),
    embed_dim=256,
    num_classes=80,
    num_queries=900,
    device="cuda",
)

train = dict(
    output_dir="./output/dino_convnext",
    init_checkpoint="",
    max_iter=90000,
    device="cuda",
)
