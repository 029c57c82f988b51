"""Reading sources: the bytes decide the reader, nothing executes, the weights are found in any container."""
from __future__ import annotations

import argparse
import collections
import os
import pickle

import pytest
import torch

from conversion.architecture import Architecture
from conversion.errors import ContainerError, UnreadableCheckpoint, UnsafeCheckpoint
from conversion.containers import select_state_dict, strip_wrapper_prefixes
from conversion.synthetic import random_state_dict

from ..support import read_as_convert_does

SD = random_state_dict(Architecture((1, 1, 1, 1), (4, 4, 4, 4)), seed=3)


@pytest.fixture
def torch_reader():
    """Torch archives are read by the one safe unpickler on every torch version (torch.load is never
    called), so there is one reader to test; torch 1.9 runs these same tests in the legacy env."""
    return "safe-unpickler"


def _same(a, b):
    assert list(a) == list(b)
    for k in a:
        got = a[k] if isinstance(a[k], torch.Tensor) else torch.from_numpy(a[k])
        assert torch.equal(got, b[k]), k


@pytest.mark.parametrize(
    "writer",
    [
        pytest.param(lambda obj, f: torch.save(obj, f), id="torch-zip"),
        pytest.param(lambda obj, f: torch.save(obj, f, _use_new_zipfile_serialization=False), id="torch-legacy"),
        pytest.param(lambda obj, f: pickle.dump(obj, f), id="pickled-tensors"),
        pytest.param(lambda obj, f: pickle.dump({k: {n: t.numpy() for n, t in v.items()} for k, v in obj.items()}, f), id="pickled-numpy"),
    ],
)
@pytest.mark.parametrize("name", ["weights.pth", "weights.pkl", "weights.bin"])
def test_every_pickle_based_format_reads_whatever_its_name(tmp_path, torch_reader, writer, name):
    """torch zip, legacy torch, pickled tensors and pickled numpy all read, under any extension."""
    path = tmp_path / name
    with open(path, "wb") as f:
        writer({"model": SD}, f)
    _same(read_as_convert_does(str(path))["model"], SD)


def test_training_checkpoint_args_and_numpy_are_read_as_data(tmp_path, torch_reader):
    import numpy as np

    torch.save({"model": SD, "args": argparse.Namespace(lr=0.004, model="convnext_tiny"), "mean": np.ones(3)}, tmp_path / "ckpt.pth")
    loaded = read_as_convert_does(str(tmp_path / "ckpt.pth"))
    # Training args are read past as an inert placeholder naming the class (never built); arrays are data.
    assert type(loaded["args"]).__name__ == "Placeholder" and loaded["args"].cls == "argparse.Namespace"
    assert loaded["mean"].tolist() == [1.0, 1.0, 1.0]
    _same(loaded["model"], SD)


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch SENTINEL_SHOULD_NOT_EXIST",))


@pytest.mark.parametrize("how", ["pickle", "torch", "torch-legacy"])
def test_a_pickle_that_would_run_code_is_refused_and_runs_nothing(tmp_path, monkeypatch, torch_reader, how):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pkl"
    save = {
        "pickle": pickle.dump,
        "torch": torch.save,
        "torch-legacy": lambda obj, f: torch.save(obj, f, _use_new_zipfile_serialization=False),
    }[how]
    with open(path, "wb") as f:
        save({"model": SD, "x": _Boom()}, f)
    with pytest.raises(UnsafeCheckpoint, match="refusing"):
        read_as_convert_does(str(path))
    assert not (tmp_path / "SENTINEL_SHOULD_NOT_EXIST").exists()


@pytest.mark.parametrize(
    "content,match",
    [(b"", "empty"), (b"PK\x03\x04garbage", "corrupt"), (b"\x80\x04\x95garbage", "not a readable checkpoint"), (b"hello world", "not a readable checkpoint")],
    ids=["empty", "bad-zip", "bad-pickle", "text"],
)
def test_unreadable_bytes_give_a_clear_error(tmp_path, content, match):
    path = tmp_path / "bad.pth"
    path.write_bytes(content)
    with pytest.raises(UnreadableCheckpoint, match=match):
        read_as_convert_does(str(path))


@pytest.mark.parametrize(
    "head, fmt",
    [
        (b"PK\x03\x04" + b"\x00" * 5, "torch-zip"),
        ((93).to_bytes(8, "little") + b"{", "safetensors"),
        ((1).to_bytes(8, "little") + b"{", "pickle"),  # a header too short to be one
        ((10 ** 9).to_bytes(8, "little") + b"{", "pickle"),  # longer than any header this reader takes
        (b"\x80\x02\x8a\x0al\xfc\x9cF\xf9", "pickle"),  # a legacy torch file: told by its first pickle
        (b"PK", "pickle"),
    ],
    ids=["zip", "safetensors", "short-header", "huge-header", "legacy", "two-bytes"],
)
def test_the_format_is_sniffed_from_the_first_bytes_by_one_rule(head, fmt):
    from conversion.read import sniff

    assert sniff(head) == fmt


def test_missing_file_and_directory_are_named(tmp_path):
    with pytest.raises(UnreadableCheckpoint, match="no such file"):
        read_as_convert_does(str(tmp_path / "nope.pth"))
    with pytest.raises(UnreadableCheckpoint, match="is a directory"):
        read_as_convert_does(str(tmp_path))


@pytest.mark.parametrize("key", ["model", "state_dict", "module"])
def test_container_keys_are_found(key):
    sd, container = select_state_dict({key: SD, "epoch": 3})
    assert container == key and list(sd) == list(SD)


def test_model_is_preferred_over_ema_unless_asked():
    ema = random_state_dict(Architecture((1, 1, 1, 1), (4, 4, 4, 4)), seed=4)
    ckpt = {"model_ema": ema, "model": SD}
    assert select_state_dict(ckpt)[0]["stages.0.0.gamma"] is SD["stages.0.0.gamma"]
    assert select_state_dict(ckpt, ema=True) == (ema, "model_ema")
    assert select_state_dict({"state_dict_ema": ema}, ema=True)[1] == "state_dict_ema"


def test_asking_for_ema_without_one_names_the_keys_and_the_fix():
    with pytest.raises(ContainerError, match=r"--ema .* none .*\['epoch', 'model'\]") as err:
        select_state_dict({"model": SD, "epoch": 1}, ema=True)
    assert "without --ema" in err.value.hint


@pytest.mark.parametrize("obj", [[1, 2], {"epoch": 1, "optimizer": {}}, {}, collections.OrderedDict(a=1)], ids=["list", "no-weights", "empty", "no-arrays"])
def test_no_state_dict_is_a_container_error(obj):
    with pytest.raises(ContainerError):
        select_state_dict(obj)


def test_wrapper_prefix_is_stripped_only_when_every_key_has_it():
    assert list(strip_wrapper_prefixes({"module._orig_mod.a": SD["stages.0.0.gamma"]})) == ["a"]
    mixed = {"module.a": SD["stages.0.0.gamma"], "b": SD["stages.0.0.gamma"]}
    assert list(strip_wrapper_prefixes(mixed)) == ["module.a", "b"]


def test_non_array_entries_are_ignored():
    sd, _ = select_state_dict({"model": {**SD, "_metadata": {"version": 1}, "step": 5}})
    assert list(sd) == list(SD)
