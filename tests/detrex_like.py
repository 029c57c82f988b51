"""A detrex-like DETR-family project (our own writing), configured by LazyConfig `.py` files in
`tests/detrex_like_configs/`, for `verify --config X.py` and the tied-weights tests.

The facts it carries over from detrex (not its code): the model is instantiated from a LazyConfig
(`instantiate(cfg.model)`), takes a `device` argument and moves itself there; its ConvNeXt
backbone uses the official names (`downsample_layers.*`, `stages.*`) and has an output norm
`norm{i}` only for each of `out_indices` (detrex's DINO-ConvNeXt uses [1, 2, 3]); the decoder ties
one `class_embed` and one `bbox_embed` to every layer, and `transformer.decoder.class_embed` /
`.bbox_embed` are the same modules, so a whole-model state dict holds many views of one storage;
`train.init_checkpoint` names the weights training loads.

`DeformableTransformerLike(use_compiled_op=True)` needs a compiled op that is not installed (like
MultiScaleDeformableAttention without its CUDA build): instantiating the model then fails, and
verify falls back to `cfg.model.backbone` alone.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

COMPILED_OP = "MultiScaleDeformableAttention_not_built"  # a module that does not exist anywhere


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map (the official `channels_first` LayerNorm's parameters)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class Block(nn.Module):
    def __init__(self, dim: int, layer_scale: float) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1, self.pwconv2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(layer_scale * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(F.gelu(self.pwconv1(self.norm(y)))) * self.gamma
        return x + y.permute(0, 3, 1, 2)


class ConvNeXtLike(nn.Module):
    """A ConvNeXt with the official names and output norms `norm{i}` for `out_indices` only."""

    def __init__(self, depths: Sequence[int] = (3, 3, 9, 3), dims: Sequence[int] = (96, 192, 384, 768),
                 out_indices: Sequence[int] = (1, 2, 3), layer_scale_init_value: float = 1e-6) -> None:
        super().__init__()
        self.out_indices = tuple(out_indices)
        self.downsample_layers = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(3, dims[0], 4, stride=4), LayerNorm2d(dims[0], eps=1e-6))]
            + [nn.Sequential(LayerNorm2d(dims[i - 1], eps=1e-6), nn.Conv2d(dims[i - 1], dims[i], 2, stride=2)) for i in range(1, 4)]
        )
        self.stages = nn.ModuleList(nn.Sequential(*(Block(dims[i], layer_scale_init_value) for _ in range(depths[i]))) for i in range(4))
        for i in self.out_indices:
            self.add_module(f"norm{i}", LayerNorm2d(dims[i], eps=1e-6))
        self.channels = [dims[i] for i in self.out_indices]

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        out = {}
        for i in range(4):
            x = self.stages[i](self.downsample_layers[i](x))
            if i in self.out_indices:
                out[f"p{i}"] = getattr(self, f"norm{i}")(x)
        return out


class MLP(nn.Module):
    def __init__(self, width: int, out: int, layers: int = 3) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width if i < layers - 1 else out) for i in range(layers))


class DecoderLayer(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, 8)
        self.cross_attn = nn.Linear(d, d)  # stands for deformable cross-attention: only its names matter here
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.linear1, self.linear2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)


class DeformableTransformerLike(nn.Module):
    def __init__(self, embed_dim: int = 256, num_layers: int = 6, use_compiled_op: bool = False) -> None:
        super().__init__()
        if use_compiled_op:
            __import__(COMPILED_OP)  # ModuleNotFoundError, as a CUDA op that was never built
        self.decoder = nn.Module()
        self.decoder.layers = nn.ModuleList(DecoderLayer(embed_dim) for _ in range(num_layers))
        self.decoder.norm = nn.LayerNorm(embed_dim)
        self.level_embeds = nn.Parameter(torch.zeros(4, embed_dim))
        self.num_layers = num_layers


class DINOLike(nn.Module):
    """The meta-architecture: backbone, a channel-mapper neck, the transformer, tied prediction heads."""

    def __init__(self, backbone: ConvNeXtLike, transformer: DeformableTransformerLike, embed_dim: int = 256,
                 num_classes: int = 80, num_queries: int = 900, pixel_mean: List[float] = (123.675, 116.28, 103.53),
                 pixel_std: List[float] = (58.395, 57.12, 57.375), device: str = "cuda") -> None:
        super().__init__()
        self.backbone, self.transformer = backbone, transformer
        self.neck = nn.ModuleList(nn.Sequential(nn.Conv2d(c, embed_dim, 1), nn.GroupNorm(32, embed_dim)) for c in backbone.channels)
        self.label_enc = nn.Embedding(num_classes, embed_dim)
        self.query_embed = nn.Embedding(num_queries, embed_dim)
        class_embed, bbox_embed = nn.Linear(embed_dim, num_classes), MLP(embed_dim, 4)
        layers = transformer.num_layers
        self.class_embed = nn.ModuleList([class_embed] * layers)  # one module, every layer: detrex's tying
        self.bbox_embed = nn.ModuleList([bbox_embed] * layers)
        self.transformer.decoder.class_embed = self.class_embed
        self.transformer.decoder.bbox_embed = self.bbox_embed
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(3, 1, 1))
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(3, 1, 1))
        self.device = torch.device(device)
        self.to(self.device)  # a CUDA device on a machine without one raises here, as detrex's models do

    def forward(self, batched_inputs: object) -> object:  # loading never runs the model
        raise NotImplementedError("a stand-in for checkpoint loading only")
