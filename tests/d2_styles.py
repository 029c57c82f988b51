"""Detectron2 ConvNeXt backbones as other projects write them, for `verify --import tests.d2_styles`.

Small local classes (nothing is copied): each keeps the official trunk names and differs only in
its output-norm policy, which is what decides the keys a converted file may miss.
- `D2ConvNeXt`: the DI-MaskDINO fork's policy and its registry name (norms only for requested outputs).
- `OneFormerStyleConvNeXt`: norm0..norm3 always, whatever is requested (OneFormer, official detection code).
- `NoNormConvNeXt`: no output norms at all (kMaX-DeepLab style).
Importing this module next to `conversion.d2` also proves the two registry names coexist.
"""
from __future__ import annotations

from detectron2.modeling import BACKBONE_REGISTRY
from torch import nn

from conversion.architecture import NUM_STAGES
from conversion.d2 import LAYER_NORM_EPS, ConvNeXtBackbone, LayerNorm2d, backbone_kwargs


@BACKBONE_REGISTRY.register()
class D2ConvNeXt(ConvNeXtBackbone):
    """The fork registers the class itself under this name, with the (cfg, input_shape) signature."""

    def __init__(self, cfg, input_shape):
        super().__init__(**backbone_kwargs(cfg))


@BACKBONE_REGISTRY.register()
class OneFormerStyleConvNeXt(ConvNeXtBackbone):
    def __init__(self, cfg, input_shape):
        super().__init__(**backbone_kwargs(cfg))
        for i in range(NUM_STAGES):
            if not hasattr(self, f"norm{i}"):
                self.add_module(f"norm{i}", LayerNorm2d(self.dims[i], eps=LAYER_NORM_EPS))


@BACKBONE_REGISTRY.register()
class NoNormConvNeXt(ConvNeXtBackbone):
    def __init__(self, cfg, input_shape):
        super().__init__(**backbone_kwargs(cfg))
        for i in self._out_indices:
            setattr(self, f"norm{i}", nn.Identity())
