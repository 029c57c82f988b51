"""Forward equivalence per source layout: each library's own ConvNeXt against the Detectron2 backbone.

For every layout with an installable library, the *original* is that library's model with random
weights (LayerNorm weights near 1, layer scale and GRN clearly non-zero, everything seeded), saved
through the library's own path (`torch.save(model.state_dict())`, or Hugging Face's
`save_pretrained` safetensors file), converted by `conversion.convert` to `.pth`, loaded into the
D2 backbone by the real `DetectionCheckpointer` (`assert_clean_load`), and every raw stage output
(`backbone.stage_outputs`) is compared with the library's own intermediate outputs:

- timm `ConvNeXt` V1, V2 (`use_grn=True`), conv-MLP: `forward_intermediates(x, intermediates_only=True)`;
- timm `features_only` models (`stem_0`, `stages_0`...): their outputs are the stage outputs;
- OpenCLIP: real `open_clip.create_model(...)` CLIP models (random init, a registered tiny text
  tower, timm's convnext_atto image tower), saved whole (`visual.trunk.`) and as the image tower alone
  (`model.visual.state_dict()`: `trunk.` plus `head.proj.weight`, also re-prefixed `visual.`);
- mmpretrain: its `ImageClassifier` with its own `ConvNeXt` (V1, and V2 with GRN and no layer scale),
  saved as mmengine saves a published checkpoint (`meta` + `state_dict`): the raw outputs of its own
  `downsample_layers` / `stages` modules;
- DINOv3 as transformers writes it: `DINOv3ConvNextModel` (`save_pretrained`: the hub's names without
  `model.`; and its `state_dict()`, with it) and `DINOv3ConvNextBackbone` (`feature_maps`);
- Hugging Face `ConvNextForImageClassification`, `ConvNextModel`, `ConvNextBackbone` (also its
  normed `feature_maps` against the D2 forward), `ConvNextV2ForImageClassification`:
  `hidden_states[1:]` of `output_hidden_states=True` (entry 0 is the stem output);
- torchvision `ConvNeXt`: the `features` slices `[0:2]`, `[2:4]`, `[4:6]`, `[6:8]`.

The original DINOv3 repository cannot be installed here (no package, nothing downloadable), so its
files are built from canonical weights with `from_canonical` and the original is timm's `ConvNeXt`
given the same canonical weights through timm's own `checkpoint_filter_fn` (tests/support/equivalence.py's
`timm_original`); tests/layouts/test_libraries.py pins the names it writes to a literal key list taken
from that repository's code.

The originals are built by tests/support/originals.py.  The largest relative difference per layout is
printed (`pytest -s`), with a table at the end.
"""

from __future__ import annotations

import copy
from typing import Sequence

import pytest
import torch
from torch import nn

from tests.support import require
from tests.support.equivalence import assert_stages_close, differences, image
from tests.support.originals import CLASSES, MEASURED, ORIGINALS, Prepared, hf_config, prepare
from tests.support.tolerances import (
    CUDA_VS_FP32_REFERENCE_REL, NO_WORSE_THAN_ORIGINAL_FACTOR, NORM_MOVES_OUTPUTS_ATOL, UNIT_ROUNDOFF,
)
from tests.support.tolerances import LIBRARY_FP32_ATOL_SCALE as ATOL_SCALE
from tests.support.tolerances import LIBRARY_FP32_RTOL as RTOL

transformers = require("transformers")

pytestmark = pytest.mark.detectron2

# 64x64 leaves a 2x2 map at stride 32, so GRN's spatial statistics are not those of one pixel.
INPUT = (2, 3, 64, 64)
INPUT_SEED = 1


@pytest.fixture(scope="module", params=sorted(ORIGINALS))
def prepared(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Prepared:
    return prepare(request.param, str(tmp_path_factory.mktemp(request.param)))


@pytest.fixture(scope="module", autouse=True)
def print_measured_table():
    """After the module: the table of the largest relative difference per layout (see with -s)."""
    yield
    if MEASURED:
        width = max(map(len, MEASURED))
        lines = [f"{'layout'.ljust(width)}  max |D2 - original| / max|original| (fp32 CPU, stage outputs)"]
        lines += [f"{label.ljust(width)}  {value:.3e}" for label, value in sorted(MEASURED.items())]
        print("\n[layout-equivalence]\n" + "\n".join(lines))


def _record(label: str, refs: Sequence[torch.Tensor], gots: Sequence[torch.Tensor]) -> None:
    worst = max(differences(r, g)[1] for r, g in zip(refs, gots))
    MEASURED[label] = max(MEASURED.get(label, 0.0), worst)


# ---------------------------------------------------------------- tests


def test_converted_file_reports_the_librarys_layout(prepared: Prepared):
    """The conversion recognised the library's layout and prefix, the architecture, and dropped what it must."""
    o, r = prepared.original, prepared.report
    assert (r.layout, r.source_prefix) == (o.layout, o.prefix)
    assert (tuple(r.depths), tuple(r.dims), r.version) == (o.arch.depths, o.arch.dims, o.arch.version)
    assert set(o.dropped) <= set(r.dropped), f"not dropped: {sorted(set(o.dropped) - set(r.dropped))}"
    assert sorted(r.fresh) == sorted(o.fresh)


def test_stage_outputs_equal_the_librarys_own(prepared: Prepared):
    """Every raw stage output of the D2 backbone equals the library's own intermediate output (fp32 CPU)."""
    o = prepared.original
    x = image(INPUT, seed=INPUT_SEED)
    with torch.no_grad():
        refs = o.stage_outputs(o.model, x)
        gots = prepared.backbone.stage_outputs(x)
    assert_stages_close(refs, gots, rtol=RTOL, atol_scale=ATOL_SCALE, case=o.label)
    _record(o.label, refs, gots)


def test_hf_backbone_feature_maps_equal_the_d2_forward(tmp_path):
    """ConvNextBackbone's normed `feature_maps` equal the D2 forward: hidden_states_norms.stage{k} became norm{k-1}."""
    hf = prepare("huggingface-v1-backbone", str(tmp_path))
    x = image(INPUT, seed=INPUT_SEED + 1)
    with torch.no_grad():
        refs = list(hf.original.model(pixel_values=x).feature_maps)
        outputs = hf.backbone(x)
        raw = hf.backbone.stage_outputs(x)
    gots = [outputs[f"res{i + 2}"] for i in range(4)]
    label = "huggingface V1 (ConvNextBackbone feature_maps, after output norms)"
    assert_stages_close(refs, gots, rtol=RTOL, atol_scale=ATOL_SCALE, case=label)
    _record(label, refs, gots)
    # The randomised norms are not the identity: this compares something the raw-output test does not.
    moved = [not torch.allclose(r, g, atol=NORM_MOVES_OUTPUTS_ATOL) for r, g in zip(raw, gots)]
    assert all(moved), "output norms changed nothing"


@pytest.mark.parametrize("name", ["dinov3-hf-v1-model", "dinov3-hf-v1-model-state-dict"])
def test_dinov3_final_norm_is_res5s_output_norm_against_transformers_dense_output(tmp_path, name):
    """DINOv3ConvNextModel applies its final `layer_norm` to every patch token of the last stage; read as
    norm3, the D2 res5 output equals those tokens (`last_hidden_state[:, 1:]`, token 0 is the pooled one)."""
    dino = prepare(name, str(tmp_path))
    x = image(INPUT, seed=INPUT_SEED + 2)
    with torch.no_grad():
        tokens = dino.original.model(pixel_values=x).last_hidden_state
        res5 = dino.backbone(x)["res5"]
        raw = dino.backbone.stage_outputs(x)[3]
    n, c, h, w = res5.shape
    assert tokens.shape == (n, 1 + h * w, c), tokens.shape
    dense = tokens[:, 1:].transpose(1, 2).reshape(n, c, h, w)
    label = f"{dino.original.label}: res5 vs last_hidden_state patch tokens"
    assert_stages_close([dense], [res5], rtol=RTOL, atol_scale=ATOL_SCALE, case=label)
    _record(label, [dense], [res5])
    assert not torch.allclose(raw, res5, atol=NORM_MOVES_OUTPUTS_ATOL), "the final norm changed nothing: vacuous"


def test_hf_layer_norm_eps_is_the_official_1e6_except_the_pooled_norm():
    """The equivalence rests on HF's eps: every LayerNorm on the stage path uses 1e-6; only the
    classifier's pooled `layernorm` takes config.layer_norm_eps (1e-12 by default), and it is dropped."""
    for cls, config in (
        (transformers.ConvNextForImageClassification, hf_config(1, num_labels=CLASSES)),
        (transformers.ConvNextV2ForImageClassification, hf_config(2, num_labels=CLASSES)),
    ):
        model = cls(config)
        eps = {name: m.eps for name, m in model.named_modules() if isinstance(m, nn.LayerNorm)}
        pooled = {n for n in eps if n.endswith(".layernorm") and ".encoder." not in n and ".embeddings." not in n}
        assert pooled == {f"{model.base_model_prefix}.layernorm"}, pooled
        assert {eps[n] for n in pooled} == {config.layer_norm_eps}
        assert {e for n, e in eps.items() if n not in pooled} == {1e-6}


# ---------------------------------------------------------------- CUDA (skips without a GPU)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).replace("torch.", ""))
def test_stage_outputs_equal_the_librarys_own_on_cuda(prepared: Prepared, dtype: torch.dtype):
    """On CUDA both sides in `dtype` stay within the CUDA budget of the fp32 CPU original, and D2 is no worse than it.

    Budgets from tests/support/tolerances.py: fp32 runs TF32 convolutions (u = 2^-11), bf16 u = 2^-8; 16 u of max|ref|.
    """
    o = prepared.original
    x = image(INPUT, seed=INPUT_SEED)
    with torch.no_grad():
        reference = o.stage_outputs(o.model, x)  # fp32 CPU
        lib = copy.deepcopy(o.model).to("cuda", dtype)
        d2 = copy.deepcopy(prepared.backbone).to("cuda", dtype)
        xd = x.to("cuda", dtype)
        lib_out = [t.float().cpu() for t in o.stage_outputs(lib, xd)]
        d2_out = [t.float().cpu() for t in d2.stage_outputs(xd)]
    name = str(dtype).replace("torch.", "")
    assert_stages_close(
        reference, d2_out, rtol=0.0, atol_scale=CUDA_VS_FP32_REFERENCE_REL[dtype], case=f"{o.label} cuda {name}"
    )
    for i, (ref, lib_t, d2_t) in enumerate(zip(reference, lib_out, d2_out)):
        lib_err, d2_err = differences(ref, lib_t)[0], differences(ref, d2_t)[0]
        allowed = NO_WORSE_THAN_ORIGINAL_FACTOR * lib_err + UNIT_ROUNDOFF[dtype] * ref.abs().max().item()
        assert d2_err <= allowed, f"stage {i} in {name}: D2 error {d2_err:.3e} vs the library's {lib_err:.3e}"
