"""Shared storages are data, not bombs.

DETR-family decoders tie modules (`bbox_embed`/`class_embed` shared across layers, and
`transformer.decoder.bbox_embed` is `bbox_embed`), so `torch.save(model.state_dict())` writes one
storage under many names.  The reader charges each storage's bytes once and a view only its check
that it lies inside the storage; the writers never write more tensor data than the reader's budget
for the file (twice its size plus `BUDGET_SLACK`), which bounds the `.pkl`, where every array is
written out in full.  Both directions are tested: a real tied model converts, inspects and repairs;
a crafted file that views one storage under every name and thousands more is still bounded.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict

import pytest
import torch
from torch import nn

from conversion.pipeline import convert, repair
from conversion.inspection import inspect_checkpoint
from conversion.cli import main
from conversion.errors import UnreadableCheckpoint
from conversion.io.safe_pickle import BUDGET_SLACK
from conversion.target import to_target
from conversion.testing.synthetic import synthetic_state_dict

from ..support.cli import assert_plain_error
from ..support import read_written

HEAD_WIDTH = 1024  # a head large enough that its tied copies, charged per view, exceed the reader's budget
TIED_LAYERS = 6
HOSTILE_VIEWS = 2_000  # extra names viewing the one storage (each costs the file ~60 bytes of pickle)


class TiedHead(nn.Module):
    """A DETR decoder's tying: one `bbox_embed`/`class_embed` for every layer, reachable twice."""

    def __init__(self) -> None:
        super().__init__()
        bbox, cls = nn.Linear(HEAD_WIDTH, HEAD_WIDTH), nn.Linear(HEAD_WIDTH, 91)
        self.bbox_embed = nn.ModuleList([bbox] * TIED_LAYERS)
        self.class_embed = nn.ModuleList([cls] * TIED_LAYERS)
        self.transformer = nn.Module()
        self.transformer.decoder = nn.Module()
        self.transformer.decoder.bbox_embed = self.bbox_embed
        self.transformer.decoder.class_embed = self.class_embed


def _backbone() -> Dict[str, torch.Tensor]:
    return synthetic_state_dict("official", "convnext_atto", num_classes=None)


@pytest.fixture(scope="module")
def tied_model_final(tmp_path_factory) -> Path:
    """A whole model's `model_final.pth` as Detectron2's trainer writes it: backbone plus tied head."""
    path = tmp_path_factory.mktemp("tied") / "model_final.pth"
    state = {"backbone." + k: v for k, v in _backbone().items()}
    state.update(TiedHead().state_dict())  # state_dict(): a distinct tensor per name, one storage per tied weight
    torch.save({"model": state, "iteration": 90000}, path)
    return path


def test_tied_weights_charged_per_view_would_exceed_the_budget(tied_model_final):
    """The premise: the head's views, each counted in full, are more than twice the file."""
    state = torch.load(tied_model_final, map_location="cpu")["model"]
    per_view = sum(v.numel() * v.element_size() for v in state.values())
    assert per_view > 2 * tied_model_final.stat().st_size + BUDGET_SLACK


def test_a_whole_model_with_tied_modules_converts_with_the_backbone_bit_equal(tied_model_final, tmp_path):
    report = convert(str(tied_model_final), str(tmp_path / "d2.pth"))
    written = read_written(tmp_path / "d2.pth")["model"]
    expected = to_target(_backbone(), prefix="backbone.").state_dict
    assert report.kept == len(written) == len(expected)
    assert report.detector_parts == {"bbox_embed.": 2 * TIED_LAYERS, "class_embed.": 2 * TIED_LAYERS, "transformer.": 4 * TIED_LAYERS}
    for name, value in expected.items():
        assert torch.equal(torch.as_tensor(written[name]), value), name


def test_a_tied_model_converts_to_a_model_zoo_pickle_too(tied_model_final, tmp_path):
    report = convert(str(tied_model_final), str(tmp_path / "d2.pkl"))
    assert report.kept == len(_backbone())
    assert report.bytes_written <= 2 * tied_model_final.stat().st_size + BUDGET_SLACK


def test_inspect_counts_every_tensor_and_each_tied_one_once(tied_model_final):
    report = inspect_checkpoint(str(tied_model_final))
    model = TiedHead()
    distinct_head = sum(p.numel() for p in model.parameters())  # parameters() yields a tied one once
    assert report.tensors == len(_backbone()) + len(model.state_dict())
    assert report.parameters == sum(v.numel() for v in _backbone().values()) + distinct_head


def test_repair_reads_a_tied_whole_model_and_finds_it_loads(tied_model_final, tmp_path):
    report = repair(str(tied_model_final), str(tmp_path / "fixed.pth"))
    assert report.causes == [] and not (tmp_path / "fixed.pth").exists()


def test_repair_of_a_tied_model_saved_under_state_dict_writes_the_backbone(tied_model_final, tmp_path):
    """Saved by a plain training loop (`{"state_dict": ...}`): Detectron2 wraps that dict whole and loads nothing."""
    checkpoint = torch.load(tied_model_final, map_location="cpu")
    wrapped = tmp_path / "state_dict.pth"
    torch.save({"state_dict": checkpoint["model"], "epoch": 12}, wrapped)
    report = repair(str(wrapped), str(tmp_path / "fixed.pth"))
    assert report.repaired and report.conversion is not None
    assert report.conversion.kept == len(_backbone())
    written = read_written(tmp_path / "fixed.pth")["model"]
    for name, value in to_target(_backbone(), prefix="backbone.").state_dict.items():
        assert torch.equal(torch.as_tensor(written[name]), value), name


def _one_storage_everywhere(path: Path, extra_views: int) -> Path:
    """A crafted file: every Atto backbone name, and `extra_views` more, views of one storage just
    large enough for the largest tensor (each has its right shape, all share the same bytes)."""
    names = _backbone()
    largest = max(v.numel() for v in names.values())
    storage = torch.randn(largest)
    state = {"backbone." + k: storage[: v.numel()].view(v.shape) for k, v in names.items()}
    state.update({f"decoder.view{i}": storage[:largest] for i in range(extra_views)})
    torch.save({"model": state}, path)
    return path


def test_one_storage_viewed_thousands_of_times_is_read_once_and_never_written_out_in_full(tmp_path, capsys):
    src = _one_storage_everywhere(tmp_path / "views.pth", HOSTILE_VIEWS)
    size = src.stat().st_size
    report = inspect_checkpoint(str(src))  # metadata only: thousands of views cost their pickle bytes, no more
    assert report.tensors == len(_backbone()) + HOSTILE_VIEWS
    assert report.bytes_read is not None and report.bytes_read <= size
    for argv in (["convert", str(src), str(tmp_path / "d2.pkl")], ["convert", str(src), str(tmp_path / "d2.pth")],
                 ["repair", str(src), str(tmp_path / "fixed.pkl")]):
        status = main(argv)
        _, err = capsys.readouterr()
        assert status == 2, err
        assert_plain_error(err)
        assert "crafted references" in err
    assert not list(tmp_path.glob("d2.*")) and not (tmp_path / "fixed.pkl").exists()


def test_the_output_bound_is_the_readers_budget(tmp_path):
    """Views of one storage whose full bytes exceed the budget are refused; the same views in a
    file large enough to hold them convert."""
    src = _one_storage_everywhere(tmp_path / "views.pth", 0)
    with pytest.raises(UnreadableCheckpoint, match="crafted references"):
        convert(str(src), str(tmp_path / "d2.pkl"))
    # The bound is on bytes: the same file padded past half the output converts (and is then honest data).
    padded = tmp_path / "padded.pth"
    state = torch.load(src, map_location="cpu")["model"]
    wanted = sum(v.numel() * v.element_size() for v in state.values())
    torch.save({"model": state, "padding": torch.zeros(wanted // 8)}, padded)
    assert convert(str(padded), str(tmp_path / "d2.pkl")).kept == len(_backbone())


def test_a_deflated_archive_of_compressible_weights_is_bounded_by_what_it_holds_not_its_size(tmp_path):
    """The bound counts the storages' inflated bytes: an honest zip whose members were deflated (weights
    of 16 distinct values deflate to a fraction of their size, within the reader's 20x) still converts
    to a .pkl several times the file's size."""
    import zipfile

    plain = tmp_path / "plain.pth"
    g = torch.Generator().manual_seed(0)
    torch.save({"model": {k: torch.randint(0, 16, v.shape, generator=g).float() for k, v in _backbone().items()}}, plain)
    deflated = tmp_path / "deflated.pth"
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    written = sum(v.numel() * v.element_size() for v in _backbone().values())
    assert written > 2 * deflated.stat().st_size + BUDGET_SLACK, "the premise: the output is many times the file"
    assert convert(str(deflated), str(tmp_path / "d2.pkl")).kept == len(_backbone())
