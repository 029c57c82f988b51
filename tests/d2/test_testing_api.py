"""`conversion.testing`, the API downstream suites import: the builders write each library's real
names deterministically, and `assert_loads_clean` is verify's verdict as an assertion."""
from __future__ import annotations

import pickle
import subprocess
import sys

import pytest
import torch

from conversion.architecture import Architecture
from conversion.containers import select_state_dict
from conversion.layouts import to_canonical
from conversion.synthetic import random_state_dict
from conversion.testing import synthetic_layouts, write_synthetic_checkpoint

from ..support import read_as_convert_does, read_written, require

SMALL = Architecture((1, 1, 2, 1), (8, 16, 24, 32), num_classes=5, classifier_norm=True)
SMALL_BACKBONE_ONLY = Architecture((1, 1, 2, 1), (8, 16, 24, 32))

# One name each library's own model has (from the libraries' state dicts, see LAYOUTS in the README):
# the builders must write these exact names, whatever the tables say.
KNOWN_NAME = {
    "official": "downsample_layers.0.0.weight",
    "timm": "stem.0.weight",
    "timm-features": "stem_0.weight",
    "open_clip": "visual.trunk.stem.0.weight",
    "huggingface": "embeddings.patch_embeddings.weight",
    "torchvision": "features.0.0.weight",
    "mmpretrain": "stages.0.0.pointwise_conv1.weight",
    "dinov3": "norms.3.weight",
    "dinov3-hf": "stages.0.layers.0.depthwise_conv.weight",
    "detectron2": "backbone.downsample_layers.0.0.weight",
}


def _read(path):
    loaded = read_as_convert_does(str(path))
    return select_state_dict(loaded)


@pytest.mark.parametrize("layout", synthetic_layouts())
def test_every_layout_is_written_in_its_librarys_names_and_read_back_as_that_layout(tmp_path, layout):
    """The converter recognises the file as `layout` and finds exactly the generator's weights in it."""
    path = write_synthetic_checkpoint(tmp_path / "w.pth", layout=layout, variant=SMALL, seed=3)
    state_dict, _ = _read(path)
    assert KNOWN_NAME[layout] in state_dict, sorted(state_dict)[:8]
    canonical = to_canonical(state_dict)
    assert canonical.layout == ("official" if layout == "detectron2" else layout)
    expected = random_state_dict(SMALL, seed=3)
    # DINOv3's final norm is res5's trained output norm: the generated final norm is read back as norm3.
    as_final_norm = {"norm3.weight": "norm.weight", "norm3.bias": "norm.bias"}
    for name, tensor in canonical.state_dict.items():
        origin = name if name in expected else as_final_norm[name]
        assert torch.equal(tensor, expected[origin]), f"{layout}: {name} differs from the generator's value"


def test_the_known_layouts_are_all_offered():
    """Every layout the converter reads can be written (the list comes from the layout tables)."""
    assert set(KNOWN_NAME) <= set(synthetic_layouts()), sorted(set(KNOWN_NAME) - set(synthetic_layouts()))


def test_a_released_variant_has_its_released_tensor_count(tmp_path):
    """convnext_tiny: 182 tensors with the classifier (20 + 9 * 18); V2 adds GRN and drops layer scale."""
    state_dict, container = _read(write_synthetic_checkpoint(tmp_path / "tiny.pth"))
    assert len(state_dict) == 182 and container == "model"
    assert state_dict["downsample_layers.0.0.weight"].shape == (96, 3, 4, 4)
    v2, _ = _read(write_synthetic_checkpoint(tmp_path / "tiny_v2.pth", version=2, num_classes=None))
    assert "stages.3.2.grn.gamma" in v2 and not any(k.endswith(".gamma") and ".grn." not in k for k in v2)


def test_same_arguments_give_the_same_bytes_and_another_seed_other_values(tmp_path):
    a = write_synthetic_checkpoint(tmp_path / "a.pth", layout="timm", variant=SMALL)
    b = write_synthetic_checkpoint(tmp_path / "b.pth", layout="timm", variant=SMALL)
    c = write_synthetic_checkpoint(tmp_path / "c.pth", layout="timm", variant=SMALL, seed=1)
    assert open(a, "rb").read() == open(b, "rb").read()
    assert open(a, "rb").read() != open(c, "rb").read()


@pytest.mark.parametrize("ext", [".pth", ".pkl"])
def test_the_detectron2_layout_holds_what_convert_writes(tmp_path, ext):
    """layout='detectron2' is the converter's own output (names, values, dtypes, `__author__`), not an imitation."""
    from conversion import convert

    official = write_synthetic_checkpoint(tmp_path / "official.pth", variant=SMALL)
    convert(official, str(tmp_path / f"converted{ext}"))
    ours = write_synthetic_checkpoint(tmp_path / f"synthetic{ext}", layout="detectron2", variant=SMALL)
    # both decoded by torch.load(weights_only=True) / the standard unpickler, not by conversion.read
    theirs_raw, ours_raw = read_written(tmp_path / f"converted{ext}"), read_written(ours)
    assert set(theirs_raw) == set(ours_raw) == {"model", "__author__"} and theirs_raw["__author__"] == ours_raw["__author__"]
    theirs_sd, ours_sd = theirs_raw["model"], ours_raw["model"]
    assert list(theirs_sd) == list(ours_sd)
    t, o = ({k: torch.as_tensor(v) for k, v in sd.items()} for sd in (theirs_sd, ours_sd))
    assert all(torch.equal(t[k], o[k]) and t[k].dtype == o[k].dtype for k in t)


@pytest.mark.parametrize("container", ["bare", "model", "state_dict", "training"])
def test_containers_and_dtypes_are_as_asked(tmp_path, container):
    path = write_synthetic_checkpoint(tmp_path / "w.pth", variant=SMALL, container=container, dtype=torch.float16)
    raw = read_as_convert_does(path) if container == "training" else None
    state_dict, found = _read(path)
    assert {v.dtype for v in state_dict.values()} == {torch.float16}
    assert (found or "bare") == {"bare": "bare", "model": "model", "state_dict": "state_dict", "training": "model"}[container]
    if raw is not None:
        assert {"model", "model_ema", "optimizer", "epoch", "args"} <= set(raw)


def test_a_pkl_holds_numpy_arrays_and_the_extra_entries(tmp_path):
    """The MaskDINO-converter style: numpy arrays, raw official names, `matching_heuristics: True`."""
    np = require("numpy")
    path = write_synthetic_checkpoint(tmp_path / "w.pkl", variant=SMALL, dtype=torch.bfloat16,
                                      extra={"matching_heuristics": True, "__author__": "someone"})
    with open(path, "rb") as f:
        data = pickle.load(f)
    assert data["matching_heuristics"] is True and data["__author__"] == "someone"
    assert all(type(v) is np.ndarray and v.dtype == np.float32 for v in data["model"].values()), "bf16 is stored as float32"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(layout="no-such-layout"), "unknown layout 'no-such-layout'"),
        (dict(variant="convnext_enormous"), "unknown ConvNeXt V1 variant 'convnext_enormous'"),
        (dict(container="crate"), "unknown container 'crate'"),
        (dict(layout="torchvision", version=2), "cannot be written in the torchvision layout"),
        (dict(layout="detectron2", container="bare"), "layout='detectron2' is the converter's own file"),
    ],
)
def test_bad_builder_arguments_say_what_is_known(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        write_synthetic_checkpoint(tmp_path / "w.pth", **{"variant": "convnext_atto", **kwargs})
    assert not (tmp_path / "w.pth").exists()


def test_importing_conversion_testing_needs_neither_hypothesis_nor_detectron2():
    """hypothesis is an extra (`convnext-d2[testing]`): the builders and the plugin import without it;
    the plugin alone imports not even torch (it is loaded into every pytest run where the package is
    installed, and costs nothing until asked)."""
    code = (
        "import sys; sys.modules['hypothesis'] = None\n"
        "import conversion.testing.plugin\n"
        "assert 'torch' not in sys.modules, 'the plugin imported torch'\n"
        "from conversion.testing import assert_loads_clean, write_synthetic_checkpoint, synthetic_state_dict\n"
        "assert 'torch' in sys.modules\n"
        "assert 'detectron2' not in sys.modules, 'detectron2 imported'\n"
        "try:\n    import conversion.testing.strategies\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "pip install 'convnext-d2[testing]'" in out.stdout, out.stdout


def test_conversion_testing_names_are_its_modules_own():
    """The package's lazily loaded names are the defining modules' objects; an unknown name is an AttributeError."""
    import conversion.testing as testing
    from conversion.testing import gate, synthetic

    assert testing.assert_loads_clean is gate.assert_loads_clean
    assert testing.write_synthetic_checkpoint is synthetic.write_synthetic_checkpoint
    assert set(testing.__all__) <= set(dir(testing))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        testing.nope  # noqa: B018


# ---------------------------------------------------------------- assert_loads_clean


@pytest.fixture
def d2():
    return require("detectron2")


def test_assert_loads_clean_passes_a_converted_file_and_returns_the_report(tmp_path, d2):
    from conversion.testing import assert_loads_clean

    path = write_synthetic_checkpoint(tmp_path / "ok.pth", layout="detectron2", variant=SMALL)
    report = assert_loads_clean(path)
    assert report.ok and report.loaded == len(random_state_dict(SMALL)) - 4, "every backbone tensor loaded (classifier dropped)"


def test_assert_loads_clean_fails_with_verifys_report_naming_the_keys(tmp_path, d2):
    from conversion.summaries import format_verification
    from conversion.testing import assert_loads_clean
    from conversion.verify import verify

    path = write_synthetic_checkpoint(tmp_path / "raw.pth", layout="official", variant=SMALL_BACKBONE_ONLY, num_classes=None)
    with pytest.raises(AssertionError) as info:
        assert_loads_clean(path)
    message = str(info.value)
    assert message == format_verification(verify(path)), "the message is verify's human report"
    assert message.startswith("verify: FAIL:") and "backbone.downsample_layers.0.0.bias" in message, message


def test_assert_loads_clean_on_a_missing_file_fails_with_the_cli_message(tmp_path, d2):
    from conversion.testing import assert_loads_clean

    with pytest.raises(AssertionError) as info:
        assert_loads_clean(tmp_path / "nope.pth")
    assert str(info.value).startswith(f"convnext-d2: error: {tmp_path / 'nope.pth'}: no such file."), str(info.value)


def test_assert_loads_clean_strict_makes_warnings_fail(tmp_path, d2):
    """Unused checkpoint tensors are warnings (training starts from every weight); strict=True fails on them."""
    from conversion.testing import assert_loads_clean

    full = random_state_dict(SMALL, seed=0)
    path = tmp_path / "fork_style.pth"
    torch.save({"model": {"backbone." + k: v for k, v in full.items() if not k.startswith("head.")}}, path)
    report = assert_loads_clean(path)
    assert report.warnings, "backbone.norm.* is unused: a warning"
    with pytest.raises(AssertionError, match="backbone.norm"):
        assert_loads_clean(path, strict=True)
