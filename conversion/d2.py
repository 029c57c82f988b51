"""The Detectron2 ConvNeXt backbone (with `d2_loading`, the only modules that import detectron2).

Parameter names are the official detection ones (`downsample_layers`, `stages`,
`norm{i}` per requested output), the same as the DI-MaskDINO fork's `D2ConvNeXt`,
OneFormer's and the official mmdet/mmseg code, so files converted for one load
into all of them.  Config keys are the fork's (`MODEL.CONVNEXT.*`), so its YAML
works unchanged; `USE_GRN` switches the blocks to ConvNeXt V2.

Registered as `BACKBONE_NAME`, deliberately not "D2ConvNeXt": the fork and OneFormer
both register that name, and a Detectron2 registry refuses a name twice.

Example:
    >>> from detectron2.config import get_cfg  # doctest: +SKIP
    >>> from conversion.d2 import BACKBONE_NAME, add_convnext_config
    >>> cfg = get_cfg(); add_convnext_config(cfg); cfg.MODEL.BACKBONE.NAME = BACKBONE_NAME
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from torch import nn

from .architecture import DOWNSAMPLE_KERNEL, DWCONV_KERNEL, MLP_RATIO, NUM_STAGES, STEM_PATCH

# Official ConvNeXt uses LayerNorm eps 1e-6 everywhere (models/convnext.py); timm's XXLarge uses
# 1e-5 (norm_eps), hence the MODEL.CONVNEXT.LN_EPS key.
LAYER_NORM_EPS = 1e-6
# GRN divides by (mean norm + 1e-6) (ConvNeXt-V2 models/utils.py).
GRN_EPS = 1e-6
STAGE_STRIDES = tuple(STEM_PATCH * DOWNSAMPLE_KERNEL**i for i in range(NUM_STAGES))


def add_convnext_config(cfg: CfgNode) -> None:
    """Add `MODEL.CONVNEXT` (the DI-MaskDINO fork's keys plus `USE_GRN` and `LN_EPS`); keeps keys already set."""
    defaults = {
        "DEPTHS": [3, 3, 9, 3],
        "DIMS": [96, 192, 384, 768],
        "DROP_PATH_RATE": 0.0,
        "LAYER_SCALE_INIT_VALUE": 1e-6,
        "OUT_FEATURES": ["res2", "res3", "res4", "res5"],
        "USE_GRN": False,
        "LN_EPS": LAYER_NORM_EPS,
    }
    if "CONVNEXT" not in cfg.MODEL:
        cfg.MODEL.CONVNEXT = CfgNode()
    for key, value in defaults.items():
        if key not in cfg.MODEL.CONVNEXT:
            cfg.MODEL.CONVNEXT[key] = value


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map (the official `channels_first` LayerNorm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class GRN(nn.Module):
    """Global Response Normalization on NHWC (ConvNeXt V2); parameters `[1,1,1,E]` as in official files."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, channels))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gx = torch.norm(x, p=2, dim=(1, 2), keepdim=True)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + GRN_EPS)
        return self.gamma * (x * nx) + self.beta + x


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth per sample; the identity at inference."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class Block(nn.Module):
    """`x + drop_path(gamma * pwconv2(grn?(GELU(pwconv1(norm(dwconv(x)))))))`, norm and linears in NHWC."""

    def __init__(
        self, dim: int, drop_path_rate: float, layer_scale_init_value: float, use_grn: bool, ln_eps: float = LAYER_NORM_EPS
    ) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, DWCONV_KERNEL, padding=DWCONV_KERNEL // 2, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=ln_eps)
        self.pwconv1 = nn.Linear(dim, MLP_RATIO * dim)
        self.act = nn.GELU()
        self.grn = GRN(MLP_RATIO * dim) if use_grn else None
        self.pwconv2 = nn.Linear(MLP_RATIO * dim, dim)
        # V2 has no layer scale; V1 has it unless trained with init value 0 (official code).
        self.gamma = (
            nn.Parameter(torch.full((dim,), float(layer_scale_init_value)))
            if layer_scale_init_value > 0 and not use_grn
            else None
        )
        self.drop_path_rate = drop_path_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.act(self.pwconv1(self.norm(y)))
        if self.grn is not None:
            y = self.grn(y)
        y = self.pwconv2(y)
        if self.gamma is not None:
            y = self.gamma * y
        return x + drop_path(y.permute(0, 3, 1, 2), self.drop_path_rate, self.training)


class ConvNeXtBackbone(Backbone):
    """ConvNeXt V1/V2 trunk with channels-first output norms on the requested stages.

    Args:
        depths, dims: blocks and channels per stage.
        out_features: subset of `res2..res5`; `norm{i}` exists only for these.
        drop_path_rate: linearly increasing stochastic depth, as in the official code.
        layer_scale_init_value: V1 layer scale init (0 = no `gamma`).
        use_grn: ConvNeXt V2 blocks (GRN, no layer scale).
        ln_eps: epsilon of every LayerNorm (1e-6 official; timm's XXLarge 1e-5).
    """

    def __init__(
        self,
        depths: Sequence[int] = (3, 3, 9, 3),
        dims: Sequence[int] = (96, 192, 384, 768),
        out_features: Sequence[str] = ("res2", "res3", "res4", "res5"),
        drop_path_rate: float = 0.0,
        layer_scale_init_value: float = 1e-6,
        use_grn: bool = False,
        in_chans: int = 3,
        ln_eps: float = LAYER_NORM_EPS,
    ) -> None:
        super().__init__()
        if len(depths) != NUM_STAGES or len(dims) != NUM_STAGES:
            raise ValueError(f"MODEL.CONVNEXT.DEPTHS and DIMS need {NUM_STAGES} entries, got {list(depths)} and {list(dims)}")
        known = [f"res{i + 2}" for i in range(NUM_STAGES)]
        unknown = [f for f in out_features if f not in known]
        if unknown or not out_features:
            raise ValueError(f"MODEL.CONVNEXT.OUT_FEATURES must be a non-empty subset of {known}, got {list(out_features)}")
        self.depths, self.dims = tuple(depths), tuple(dims)
        self.downsample_layers = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(in_chans, dims[0], STEM_PATCH, stride=STEM_PATCH), LayerNorm2d(dims[0], eps=ln_eps))]
            + [
                nn.Sequential(
                    LayerNorm2d(dims[i - 1], eps=ln_eps),
                    nn.Conv2d(dims[i - 1], dims[i], DOWNSAMPLE_KERNEL, stride=DOWNSAMPLE_KERNEL),
                )
                for i in range(1, NUM_STAGES)
            ]
        )
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.stages = nn.ModuleList()
        for s, depth in enumerate(depths):
            first = sum(depths[:s])
            self.stages.append(
                nn.Sequential(*[Block(dims[s], rates[first + b], layer_scale_init_value, use_grn, ln_eps) for b in range(depth)])
            )
        self._out_features = [f for f in known if f in out_features]
        self._out_indices = [int(f[3:]) - 2 for f in self._out_features]
        for i in self._out_indices:
            self.add_module(f"norm{i}", LayerNorm2d(dims[i], eps=ln_eps))
        self._out_feature_channels = {f"res{i + 2}": dims[i] for i in self._out_indices}
        self._out_feature_strides = {f"res{i + 2}": STAGE_STRIDES[i] for i in self._out_indices}
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # The official init, N(0, 0.02) for convs and linears and zero bias.  (Official code calls
        # trunc_normal_(std=.02), whose default bounds are +-2: 100 standard deviations, so it is
        # this normal distribution, drawn in five passes over the weights instead of one.)
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)

    def stage_outputs(self, x: torch.Tensor, upto: Optional[int] = None) -> List[torch.Tensor]:
        """Raw stage outputs (before the output norms), stages 0..upto."""
        last = NUM_STAGES - 1 if upto is None else upto
        outs = []
        for i in range(last + 1):
            x = self.stages[i](self.downsample_layers[i](x))
            outs.append(x)
        return outs

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        raw = self.stage_outputs(x, upto=self._out_indices[-1])
        return {f"res{i + 2}": getattr(self, f"norm{i}")(raw[i]) for i in self._out_indices}

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            name: ShapeSpec(channels=self._out_feature_channels[name], stride=self._out_feature_strides[name])
            for name in self._out_features
        }

    @property
    def size_divisibility(self) -> int:
        return STAGE_STRIDES[-1]

    def freeze(self, freeze_at: int = 0) -> "ConvNeXtBackbone":
        """Freeze like Detectron2's ResNet: 1 = the stem, k >= 2 = the stem and stages res2..res{k}."""
        modules: List[nn.Module] = []
        if freeze_at >= 1:
            modules.append(self.downsample_layers[0])
        for s in range(min(max(freeze_at - 1, 0), NUM_STAGES)):
            modules += [self.downsample_layers[s], self.stages[s]]
        for module in modules:
            for p in module.parameters():
                p.requires_grad_(False)
        return self


def backbone_kwargs(cfg: CfgNode) -> Dict[str, object]:
    """`ConvNeXtBackbone` arguments from `MODEL.CONVNEXT` (also for other projects' subclasses)."""
    c = cfg.MODEL.CONVNEXT
    return dict(
        depths=c.DEPTHS,
        dims=c.DIMS,
        out_features=c.OUT_FEATURES,
        drop_path_rate=c.DROP_PATH_RATE,
        layer_scale_init_value=c.LAYER_SCALE_INIT_VALUE,
        use_grn=c.get("USE_GRN", False),
        ln_eps=c.get("LN_EPS", LAYER_NORM_EPS),
    )


@BACKBONE_REGISTRY.register()
def build_convnext_d2_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> ConvNeXtBackbone:
    """Build the backbone from `MODEL.CONVNEXT` (see `add_convnext_config`)."""
    backbone = ConvNeXtBackbone(in_chans=input_shape.channels, **backbone_kwargs(cfg))  # type: ignore[arg-type]
    return backbone.freeze(cfg.MODEL.BACKBONE.FREEZE_AT)


# The registry keys builders by function name; this is the value for MODEL.BACKBONE.NAME.
BACKBONE_NAME = build_convnext_d2_backbone.__name__
