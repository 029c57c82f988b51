"""A fork-style ConvNeXt backbone for Detectron2, as detection forks of ConvNeXt write it.

Official parameter names (`downsample_layers`, `stages`, `gamma`), channels-first LayerNorms
`norm{i}` added only for the requested outputs, registered as `D2ConvNeXt`, configured by
`MODEL.CONVNEXT.*`.  Needs only torch and `detectron2.modeling`, so this file can be loaded on
its own (`--import path/to/convnext.py`) where the package's `__init__` cannot be imported.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from detectron2.modeling import BACKBONE_REGISTRY, Backbone, ShapeSpec


class LayerNorm(nn.Module):
    """LayerNorm over channels, for channels-last (N, H, W, C) or channels-first (N, C, H, W) input."""

    def __init__(self, channels, eps=1e-6, channels_first=False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps
        self.channels_first = channels_first
        self.shape = (channels,)

    def forward(self, x):
        if not self.channels_first:
            return F.layer_norm(x, self.shape, self.weight, self.bias, self.eps)
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class Block(nn.Module):
    def __init__(self, dim, drop_path=0.0, layer_scale_init_value=1e-6):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = LayerNorm(dim)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(layer_scale_init_value * torch.ones(dim)) if layer_scale_init_value > 0 else None
        self.drop_path = drop_path

    def forward(self, x):
        shortcut = x
        x = self.dwconv(x).permute(0, 2, 3, 1)
        x = self.pwconv2(self.act(self.pwconv1(self.norm(x))))
        if self.gamma is not None:
            x = self.gamma * x
        x = x.permute(0, 3, 1, 2)
        if self.training and self.drop_path > 0:
            keep = torch.rand(x.shape[0], 1, 1, 1, device=x.device) >= self.drop_path
            x = x * keep / (1 - self.drop_path)
        return shortcut + x


@BACKBONE_REGISTRY.register()
class D2ConvNeXt(Backbone):
    def __init__(self, cfg, input_shape):
        super().__init__()
        c = cfg.MODEL.CONVNEXT
        depths, dims = list(c.DEPTHS), list(c.DIMS)
        self._out_features = list(c.OUT_FEATURES)
        stem = nn.Sequential(nn.Conv2d(input_shape.channels, dims[0], 4, stride=4), LayerNorm(dims[0], channels_first=True))
        self.downsample_layers = nn.ModuleList([stem])
        for i in range(3):
            self.downsample_layers.append(
                nn.Sequential(LayerNorm(dims[i], channels_first=True), nn.Conv2d(dims[i], dims[i + 1], 2, stride=2))
            )
        rates = torch.linspace(0, c.DROP_PATH_RATE, sum(depths)).tolist()
        self.stages = nn.ModuleList()
        start = 0
        for i in range(4):
            self.stages.append(nn.Sequential(*[
                Block(dims[i], rates[start + j], c.LAYER_SCALE_INIT_VALUE) for j in range(depths[i])
            ]))
            start += depths[i]
        self._out_feature_channels = {f"res{i + 2}": dims[i] for i in range(4)}
        self._out_feature_strides = {f"res{i + 2}": 4 * 2 ** i for i in range(4)}
        for i in range(4):
            if f"res{i + 2}" in self._out_features:  # only the requested outputs get a norm
                self.add_module(f"norm{i}", LayerNorm(dims[i], channels_first=True))

    def forward(self, x):
        outputs = {}
        for i in range(4):
            x = self.stages[i](self.downsample_layers[i](x))
            name = f"res{i + 2}"
            if name in self._out_features:
                outputs[name] = getattr(self, f"norm{i}")(x)
        return outputs

    def output_shape(self):
        return {
            name: ShapeSpec(channels=self._out_feature_channels[name], stride=self._out_feature_strides[name])
            for name in self._out_features
        }

    @property
    def size_divisibility(self):
        return 32
