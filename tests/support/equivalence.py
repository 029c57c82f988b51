"""Comparing stage outputs: the converted Detectron2 backbone against an original network, shared by
the forward-equivalence tests (tests/d2/test_equivalence.py against timm, tests/layouts/ against each
library's own model).  `timm_original` is the reference network: timm's ConvNeXt loaded through timm's
own loading path, so that neither side is built from the converter's tables."""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch

from conversion.architecture import Architecture


def timm_original(arch: Architecture, official: Dict[str, torch.Tensor]) -> torch.nn.Module:
    """timm's ConvNeXt for `arch`, loaded from official names through timm's own filter, strictly."""
    from timm.models.convnext import ConvNeXt, checkpoint_filter_fn

    model = ConvNeXt(
        depths=arch.depths,
        dims=arch.dims,
        num_classes=arch.num_classes or 0,
        ls_init_value=1e-6 if arch.version == 1 and arch.layer_scale else None,
        use_grn=arch.version == 2,
    )
    state = checkpoint_filter_fn(official, model)
    if arch.num_classes is None:
        # timm keeps the classifier's pooled norm even with num_classes=0; a headless source
        # has none, so it keeps timm's own init (it never touches a stage output).
        state.update({k: v for k, v in model.state_dict().items() if k.startswith("head.norm.")})
    model.load_state_dict(state, strict=True)
    return model.eval()


def image(shape: Sequence[int], seed: int) -> torch.Tensor:
    """A seeded random input: the same image for both sides of a comparison, and for a rerun."""
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed))


def differences(ref: torch.Tensor, got: torch.Tensor) -> Tuple[float, float]:
    """(max abs difference, max abs difference / max|ref|), computed in fp64."""
    ref, got = ref.detach().double().cpu(), got.detach().double().cpu()
    diff = (got - ref).abs().max().item()
    return diff, diff / max(ref.abs().max().item(), 1e-30)


def assert_stages_close(
    refs: Sequence[torch.Tensor], gots: Sequence[torch.Tensor], *, rtol: float, atol_scale: float, case: str
) -> None:
    """Every stage within `atol_scale * max|ref| + rtol * |ref|`; prints the measured differences."""
    assert len(gots) == len(refs), f"{case}: {len(gots)} outputs, expected {len(refs)}"
    worst = (0.0, 0.0)
    failures = []
    for i, (ref, got) in enumerate(zip(refs, gots)):
        assert got.shape == ref.shape, f"{case} stage {i}: shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
        ref64, got64 = ref.detach().double().cpu(), got.detach().double().cpu()
        bound = atol_scale * ref64.abs().max() + rtol * ref64.abs()
        abs_diff, rel_diff = differences(ref64, got64)
        worst = (max(worst[0], abs_diff), max(worst[1], rel_diff))
        if not bool(((got64 - ref64).abs() <= bound).all()):
            failures.append(f"stage {i}: max abs {abs_diff:.3e}, {rel_diff:.3e} of max|ref|")
    print(f"[equivalence] {case}: max abs diff {worst[0]:.3e}, max rel (to max|ref|) {worst[1]:.3e}")
    assert failures == [], f"{case}: outside rtol={rtol}, atol={atol_scale}*max|ref|: " + "; ".join(failures)
