"""What Detectron2 would make of a file as it is: one case per documented problem, and silence for a
good file.  (Each problem is also rebuilt end to end in test_repair.py; these pin the wording users
search for and the rule behind each.)"""
from __future__ import annotations

import argparse
import pickle

import numpy as np
import pytest
import torch

from conversion.architecture import Architecture
from conversion.d2_prediction import SAFETENSORS_PATHS, WEIGHTS_ONLY_DEFAULT, Stack, installed_stack, predict
from conversion.diagnose import d2_problems
from conversion.inspection import inspect_checkpoint
from conversion.synthetic import random_state_dict

from ..support import CLASSIFIER_NAMES

ARCH = Architecture((1, 1, 1, 1), (8, 8, 8, 8), num_classes=2, classifier_norm=True)
SD = random_state_dict(ARCH)
BACKBONE = {"backbone." + k: v for k, v in SD.items() if k not in CLASSIFIER_NAMES}
OLD_NUMPY = Stack((1, 9), (0, 6), False, numpy=(1, 24))


def _problems(path):
    return inspect_checkpoint(str(path)).problems


def _one(problems, fragment):
    hits = [p for p in problems if fragment in p]
    assert len(hits) == 1, f"expected one problem mentioning {fragment!r}, got {problems}"
    return hits[0]


def test_a_converted_file_has_no_problem(tmp_path):
    torch.save({"model": BACKBONE, "__author__": "convnext-d2"}, tmp_path / "good.pth")
    assert _problems(tmp_path / "good.pth") == []


def test_a_model_zoo_pkl_with_author_has_no_problem(tmp_path):
    """As this project writes them (arrays spelled `numpy.ndarray`, readable by numpy 1 and 2)."""
    from conversion.write import encode

    (tmp_path / "good.pkl").write_bytes(encode(BACKBONE, "pickle"))
    assert _problems(tmp_path / "good.pkl") == []


def test_a_pkl_pickled_by_numpy_itself_is_fine_where_numpy_reads_it(tmp_path):
    """numpy's own array pickles name numpy._core under numpy 2: numpy >= 1.26 reads them, older numpy
    (the v0.6 stack's) cannot, which the prediction names as that stack's outcome."""
    with open(tmp_path / "np.pkl", "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in BACKBONE.items()}, "__author__": "x"}, f)
    report = inspect_checkpoint(str(tmp_path / "np.pkl"))
    if int(np.__version__.split(".")[0]) >= 2:  # its pickles name numpy._core: fine here, not under numpy < 1.26
        assert report.problems == [] and "numpy._core" in report.detectron2["other_stacks"]["torch 1.9, detectron2 0.6"]
    else:
        assert report.problems == []


def test_pkl_without_author_names_the_caffe2_misreading(tmp_path):
    with open(tmp_path / "x.pkl", "wb") as f:
        pickle.dump({"model": BACKBONE}, f)
    problem = _one(_problems(tmp_path / "x.pkl"), "no '__author__'")
    assert "Caffe2" in problem and "Unsupported type found in checkpoint" in problem


def test_torch_archive_named_pkl_names_the_persistent_id_error(tmp_path):
    torch.save({"model": BACKBONE}, tmp_path / "x.pkl")
    problem = _one(_problems(tmp_path / "x.pkl"), "torch.save archive under a .pkl name")
    assert "persistent id" in problem


def test_no_model_key_names_the_first_value_detectron2_chokes_on(tmp_path):
    torch.save({"epoch": 3, "state_dict": BACKBONE}, tmp_path / "x.pth")
    assert "epoch: int" in _one(_problems(tmp_path / "x.pth"), "no top-level 'model'")


def test_nested_model_is_named(tmp_path):
    torch.save({"model": {"model": BACKBONE}}, tmp_path / "x.pth")
    _one(_problems(tmp_path / "x.pth"), "'model' holds another container")


@pytest.mark.parametrize(
    "extra,kind",
    [({"args": argparse.Namespace(lr=1.0)}, "Namespace"), ({"mean": np.zeros(3)}, "ndarray")],
    ids=["namespace", "numpy"],
)
def test_objects_weights_only_refuses_are_named(tmp_path, extra, kind):
    """A problem where torch >= 2.6 is installed; named as another stack's outcome where it is not."""
    torch.save({"model": BACKBONE, **extra}, tmp_path / "x.pth")
    if installed_stack().torch >= WEIGHTS_ONLY_DEFAULT:
        assert kind in _one(_problems(tmp_path / "x.pth"), "weights_only=True")
    else:
        report = inspect_checkpoint(str(tmp_path / "x.pth"))
        assert report.problems == [] and kind in report.detectron2["other_stacks"]["torch 2.14, detectron2 0.7, safetensors"]


@pytest.mark.parametrize("prefix,fragment", [("", "lack the 'backbone.' prefix"), ("model.", "start with 'model.' instead of 'backbone.'")])
def test_a_wrong_prefix_is_named(tmp_path, prefix, fragment):
    torch.save({"model": {prefix + k: v for k, v in SD.items() if k not in CLASSIFIER_NAMES}}, tmp_path / "x.pth")
    assert "random init" in _one(_problems(tmp_path / "x.pth"), fragment)


def test_classifier_keys_mention_the_heuristics_trap(tmp_path):
    torch.save({"model": {"backbone." + k: v for k, v in SD.items()}}, tmp_path / "x.pth")
    problem = _one(_problems(tmp_path / "x.pth"), "classifier tensors")
    assert "backbone.head.weight" in problem and "matching_heuristics" in problem


def test_a_safetensors_file_is_a_problem_only_where_torch_load_cannot_read_its_path(tmp_path):
    """torch >= 2.13 hands a `.safetensors` path to safetensors.torch.load_file (safetensors installed):
    Detectron2 then loads it cleanly; older torch reads it as a pickle and fails."""
    safetensors = pytest.importorskip("safetensors.torch", reason="safetensors is installed in the full environment only")
    safetensors.save_file({k: v.contiguous() for k, v in BACKBONE.items()}, str(tmp_path / "x.safetensors"))
    report = inspect_checkpoint(str(tmp_path / "x.safetensors"))
    if installed_stack().torch >= SAFETENSORS_PATHS:
        assert report.problems == [] and "safetensors.torch.load_file" in report.detectron2["reader"]
        assert "torch 1.9, detectron2 0.6" in report.detectron2["other_stacks"]
    else:
        _one(report.problems, "safetensors file")


def test_numpy_2_pickles_are_named_for_a_numpy_older_than_1_26():
    """A pickle naming `numpy._core`: numpy < 1.26 cannot import it."""
    problems = d2_problems(predict("x.pkl", "pickle", {"model": {}, "__author__": "x"}, {}, OLD_NUMPY, frozenset({"numpy._core.multiarray"})),
                           "x.pkl", "pickle", {"model": {}, "__author__": "x"}, modules=frozenset({"numpy._core.multiarray"}))
    assert "numpy._core" in _one(problems, "numpy >= 2")


def test_other_layouts_are_named_before_prefix_problems():
    model = {"backbone.stages.0.0.dwconv.weight": (1,)}
    loaded = {"model": {"w": torch.zeros(1)}}
    problems = d2_problems(predict("x.pth", "torch-zip", loaded, model, installed_stack()), "x.pth", "torch-zip", loaded, layout="timm", source_prefix="")
    assert len(problems) == 1 and "names are in the timm layout" in problems[0]


def test_a_heuristics_pkl_without_prefix_is_not_called_unloadable(tmp_path):
    """MaskDINO's converter writes raw official names with `matching_heuristics: True`: Detectron2 matches
    them by suffix (it does load them), so the diagnosis names the heuristics, not random init."""
    raw = {k: v.numpy() for k, v in SD.items()}
    with open(tmp_path / "maskdino_style.pkl", "wb") as f:
        pickle.dump({"model": raw, "__author__": "maskdino", "matching_heuristics": True}, f)

    problem = _one(_problems(tmp_path / "maskdino_style.pkl"), "lack the 'backbone.' prefix")

    assert "matching_heuristics" in problem and "random init" not in problem, problem
