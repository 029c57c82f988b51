"""A whole detector shaped like DI-MaskDINO's (our own writing), for `verify --import tests.dimaskdino_like`.

Only names and shapes matter to checkpoint loading, so the model holds MaskDINO's module layout
with plain layers: the backbone at `backbone` (this project's, or any registered one), a pixel
decoder (`input_proj.{i}` conv + GroupNorm per level, encoder layers with `self_attn.*`, `norm1`,
`norm2` like MaskDINO's deformable encoder) and a transformer decoder (`norm1..3` per layer and a
final `decoder.norm`, as MaskDINO's `decoder_norm`) whose box head is tied as MaskDINO ties it
(`_bbox_embed`, every `bbox_embed.{i}` and `decoder.bbox_embed.{i}` are one module).  The final norm is the trap of issue 13: a
`*.norm.weight` of width `HIDDEN_DIM`, which `matching_heuristics` fills with the classifier's
pooled `norm.weight` when the backbone's last width equals it.  `DECODER_NORMS: 2` adds a second
such module (`refine_decoder.norm`), for which Detectron2 raises instead.

Registered meta-architectures:
- `DIMaskDINOLike`: the model above; `MODEL.DIMASKDINO_LIKE.{HIDDEN_DIM, ENC_LAYERS, DEC_LAYERS,
  ENC_FFN, DEC_FFN, NUM_QUERIES, DECODER_NORMS}` (defaults: MaskDINO's sizes).
- `NeedsItsDataset`: fails in `__init__` like a project that reads its dataset's metadata there
  (Detectron2's real `DatasetCatalog.get` raises for an unregistered name).
"""
from __future__ import annotations

from typing import Any, Dict

import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from torch import nn

import conversion.d2  # noqa: F401  (registers this project's backbone)
import tests.d2_styles  # noqa: F401  (registers the fork-style D2ConvNeXt)

DEFAULTS: Dict[str, int] = {
    "HIDDEN_DIM": 256, "ENC_LAYERS": 6, "DEC_LAYERS": 9, "ENC_FFN": 2048, "DEC_FFN": 2048, "NUM_QUERIES": 300,
    "DECODER_NORMS": 1, "NUM_CLASSES": 80,
}
HEADS, LEVELS, POINTS = 8, 4, 4  # MaskDINO's deformable attention: offsets and weights per head/level/point


def settings(cfg: CfgNode) -> Dict[str, int]:
    own = cfg.MODEL.get("DIMASKDINO_LIKE", CfgNode())
    return {k: int(own.get(k, v)) for k, v in DEFAULTS.items()}


class DeformableAttention(nn.Module):
    """MaskDINO's MSDeformAttn parameter layout (the compiled op is not needed to load weights)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.sampling_offsets = nn.Linear(d, HEADS * LEVELS * POINTS * 2)
        self.attention_weights = nn.Linear(d, HEADS * LEVELS * POINTS)
        self.value_proj = nn.Linear(d, d)
        self.output_proj = nn.Linear(d, d)


class EncoderLayer(nn.Module):
    def __init__(self, d: int, ffn: int) -> None:
        super().__init__()
        self.self_attn = DeformableAttention(d)
        self.norm1 = nn.LayerNorm(d)
        self.linear1, self.linear2 = nn.Linear(d, ffn), nn.Linear(ffn, d)
        self.norm2 = nn.LayerNorm(d)


class DecoderLayer(nn.Module):
    def __init__(self, d: int, ffn: int) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, HEADS)
        self.norm2 = nn.LayerNorm(d)
        self.cross_attn = DeformableAttention(d)
        self.norm1 = nn.LayerNorm(d)
        self.linear1, self.linear2 = nn.Linear(d, ffn), nn.Linear(ffn, d)
        self.norm3 = nn.LayerNorm(d)


class Decoder(nn.Module):
    def __init__(self, d: int, ffn: int, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(d, ffn) for _ in range(layers))
        self.norm = nn.LayerNorm(d)  # MaskDINO's decoder_norm, named `norm` inside the decoder
        self.ref_point_head = nn.Sequential(nn.Linear(2 * d, d), nn.Linear(d, d))
        # `bbox_embed` is the predictor's, set by it (MaskDINO ties one box head to every layer).


class PixelDecoder(nn.Module):
    def __init__(self, in_channels: Dict[str, int], d: int, ffn: int, layers: int) -> None:
        super().__init__()
        levels = sorted(in_channels)[1:]  # MaskDINO encodes res3..res5; res2 feeds the mask features
        self.input_proj = nn.ModuleList(nn.Sequential(nn.Conv2d(in_channels[f], d, 1), nn.GroupNorm(32, d)) for f in levels)
        self.transformer = nn.Module()
        self.transformer.encoder = nn.Module()
        self.transformer.encoder.layers = nn.ModuleList(EncoderLayer(d, ffn) for _ in range(layers))
        self.transformer.level_embed = nn.Parameter(torch.zeros(len(levels), d))
        self.mask_features = nn.Conv2d(d, d, 1)
        self.adapter_1 = nn.Sequential(nn.Conv2d(in_channels[sorted(in_channels)[0]], d, 1, bias=False), nn.GroupNorm(32, d))
        self.layer_1 = nn.Sequential(nn.Conv2d(d, d, 3, padding=1, bias=False), nn.GroupNorm(32, d))


class Predictor(nn.Module):
    def __init__(self, s: Dict[str, int]) -> None:
        super().__init__()
        d = s["HIDDEN_DIM"]
        self.query_feat = nn.Embedding(s["NUM_QUERIES"], d)
        self.query_embed = nn.Embedding(s["NUM_QUERIES"], 4)
        self.enc_output = nn.Linear(d, d)
        self.enc_output_norm = nn.LayerNorm(d)
        self.decoder = Decoder(d, s["DEC_FFN"], s["DEC_LAYERS"])
        if s["DECODER_NORMS"] >= 2:
            self.refine_decoder = Decoder(d, s["DEC_FFN"], 0)  # a second `*.norm` of the same width
        self.class_embed = nn.Linear(d, s["NUM_CLASSES"])
        self.mask_embed = nn.Sequential(nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d))
        # MaskDINO's tying: one box head, kept as `_bbox_embed`, for every decoder layer, and the
        # decoder's `bbox_embed` is the same list: a whole-model state dict saves one storage under
        # 2 * DEC_LAYERS + 1 names per tensor.
        self._bbox_embed = nn.Sequential(nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, 4))
        self.bbox_embed = nn.ModuleList([self._bbox_embed] * s["DEC_LAYERS"])
        self.decoder.bbox_embed = self.bbox_embed


@META_ARCH_REGISTRY.register()
class DIMaskDINOLike(nn.Module):
    def __init__(self, cfg: CfgNode) -> None:
        super().__init__()
        s = settings(cfg)
        self.backbone = build_backbone(cfg)
        channels = {name: spec.channels for name, spec in self.backbone.output_shape().items()}
        self.sem_seg_head = nn.Module()
        self.sem_seg_head.pixel_decoder = PixelDecoder(channels, s["HIDDEN_DIM"], s["ENC_FFN"], s["ENC_LAYERS"])
        self.sem_seg_head.predictor = Predictor(s)
        self.register_buffer("pixel_mean", torch.tensor(cfg.MODEL.PIXEL_MEAN).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(cfg.MODEL.PIXEL_STD).view(-1, 1, 1), False)

    def forward(self, batched_inputs: Any) -> Any:  # loading never runs the model
        raise NotImplementedError("a stand-in for checkpoint loading only")


@META_ARCH_REGISTRY.register()
class NeedsItsDataset(DIMaskDINOLike):
    def __init__(self, cfg: CfgNode) -> None:
        DatasetCatalog.get(cfg.DATASETS.TRAIN[0])  # raises KeyError: the dataset is not registered
        super().__init__(cfg)
